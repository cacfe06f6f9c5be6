//! A serial "cable" between two daemons on one host: two pseudo-terminals whose master sides
//! this process relays to each other. Each daemon opens its pty's slave side as its serial
//! device (raw 8N1 through termios, like a real /dev/ttyS*). The relay can inject line noise
//! and cut the cable; it stops when dropped.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The cable.
#[derive(Debug)]
pub struct PtyCable {
    /// Device paths for the two ends (give one to each daemon).
    pub ends: [PathBuf; 2],
    stop: Arc<AtomicBool>,
    /// Drop all bytes while set.
    pub cut: Arc<AtomicBool>,
    /// Bytes to write into the line towards end 1 (as if noise arrived on it).
    pub noise: Arc<Mutex<Vec<u8>>>,
    /// Bytes relayed end 0 → end 1 and back.
    pub relayed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    // The slave fds stay open here so the masters never see a hangup between daemon restarts.
    _slaves: [OwnedFd; 2],
}

fn open() -> (OwnedFd, OwnedFd, PathBuf) {
    let p = nix::pty::openpty(None, None).expect("openpty");
    let name = nix::unistd::ttyname(&p.slave).expect("ttyname");
    // Raw on the slave side too, so the line discipline never echoes or translates bytes
    // before a daemon opens the device.
    let mut t = nix::sys::termios::tcgetattr(&p.slave).expect("tcgetattr");
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&p.slave, nix::sys::termios::SetArg::TCSANOW, &t)
        .expect("tcsetattr");
    let fl = nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&p.master, nix::fcntl::FcntlArg::F_SETFL(fl)).expect("nonblock");
    (p.master, p.slave, name)
}

impl PtyCable {
    pub fn new() -> Self {
        let (m0, s0, n0) = open();
        let (m1, s1, n1) = open();
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let noise = Arc::new(Mutex::new(Vec::new()));
        let relayed = Arc::new(AtomicU64::new(0));
        let (st, ct, nz, rl) = (stop.clone(), cut.clone(), noise.clone(), relayed.clone());
        let thread = std::thread::spawn(move || relay(&m0, &m1, &st, &ct, &nz, &rl));
        Self { ends: [n0, n1], stop, cut, noise, relayed, thread: Some(thread), _slaves: [s0, s1] }
    }

    /// Queues noise to be written into the line towards end 1, between relayed chunks.
    pub fn inject(&self, bytes: &[u8]) {
        self.noise.lock().expect("noise").extend_from_slice(bytes);
    }
}

impl Default for PtyCable {
    fn default() -> Self {
        Self::new()
    }
}

fn relay(
    m0: &OwnedFd,
    m1: &OwnedFd,
    stop: &AtomicBool,
    cut: &AtomicBool,
    noise: &Mutex<Vec<u8>>,
    relayed: &AtomicU64,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            PollFd::new(m0.as_fd(), PollFlags::POLLIN),
            PollFd::new(m1.as_fd(), PollFlags::POLLIN),
        ];
        if nix::poll::poll(&mut fds, PollTimeout::from(20u16)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let pending: Vec<u8> = std::mem::take(&mut *noise.lock().expect("noise"));
        if !pending.is_empty() {
            let _ = nix::unistd::write(m1, &pending);
        }
        for (from, to) in [(m0, m1), (m1, m0)] {
            match nix::unistd::read(from, &mut buf) {
                Ok(n) if n > 0 && !cut.load(Ordering::Relaxed) => {
                    {
                        let mut off = 0;
                        // Bounded: a full buffer on the other side drops the rest, like a line.
                        for _ in 0..100 {
                            match nix::unistd::write(to, &buf[off..n]) {
                                Ok(w) => off += w,
                                Err(_) => std::thread::sleep(Duration::from_millis(1)),
                            }
                            if off >= n {
                                break;
                            }
                        }
                        relayed.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
    }
}

impl Drop for PtyCable {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
