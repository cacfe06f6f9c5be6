//! The portable engine: a fixed pool of threads doing pread/pwritev2/fdatasync/fallocate.
//! Used where io_uring is unavailable (containers with seccomp, `io_uring_disabled`), and tested
//! with the same suite as the io_uring engine.

use nix::errno::Errno;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::engine::{IoDone, IoEngine, IoOp};

type Job = (IoOp, oneshot::Sender<IoDone>);

/// A pool of worker threads sharing one job queue.
#[derive(Debug)]
pub struct ThreadsEngine {
    tx: Mutex<Option<Sender<Job>>>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadsEngine {
    /// Starts `threads` workers on `file`.
    pub fn new(file: Arc<File>, threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let (rx, file) = (Arc::clone(&rx), Arc::clone(&file));
            workers.push(
                std::thread::Builder::new()
                    .name(format!("duet-io-{i}"))
                    .spawn(move || worker(&file, &rx))?,
            );
        }
        Ok(Self { tx: Mutex::new(Some(tx)), workers })
    }
}

fn worker(file: &File, rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for one job; a poisoned lock means another worker
        // panicked, and a broken invariant ends the process (style rule 12).
        let job = rx.lock().expect("io worker queue poisoned").recv();
        let Ok((op, done)) = job else { return };
        let _ = done.send(run(file, op));
    }
}

/// Executes one op synchronously.
fn run(file: &File, op: IoOp) -> IoDone {
    let fd = file.as_raw_fd();
    match op {
        IoOp::Read { offset, mut buf } => {
            let r = pread_all(fd, &mut buf, offset);
            IoDone { result: r, buf: Some(buf) }
        }
        IoOp::Write { offset, buf, fua } => {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            IoDone { result: pwrite_all(fd, &buf, offset, flags), buf: None }
        }
        IoOp::Flush => IoDone { result: errno_of(file.sync_data()), buf: None },
        IoOp::Fallocate { offset, len, mode } => {
            let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
                return IoDone { result: Err(Errno::EINVAL), buf: None };
            };
            // SAFETY: plain syscall on a valid fd; no memory is passed.
            let rc = unsafe { libc::fallocate(fd, mode, o, l) };
            IoDone { result: if rc == 0 { Ok(()) } else { Err(last_errno()) }, buf: None }
        }
    }
}

fn last_errno() -> Errno {
    Errno::last()
}

fn errno_of(r: std::io::Result<()>) -> Result<(), Errno> {
    r.map_err(|e| super::errno(&e))
}

/// Repeats `op(done, offset)` (a pread/pwrite of the rest) until `len` bytes are transferred.
fn transfer_all(
    len: usize,
    mut offset: u64,
    mut op: impl FnMut(usize, i64) -> isize,
) -> Result<(), Errno> {
    let mut done = 0;
    while done < len {
        let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        match op(done, off) {
            0 => return Err(Errno::EIO), // unexpected end of file: the store shrank
            n if n < 0 => match last_errno() {
                Errno::EINTR => continue,
                e => return Err(e),
            },
            n => {
                let n = n.unsigned_abs();
                done += n;
                offset += n as u64;
            }
        }
    }
    Ok(())
}

fn pread_all(fd: i32, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
    transfer_all(buf.len(), offset, |done, off| {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable region of rest.len() bytes.
        unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), off) }
    })
}

pub(super) fn pwrite_all(fd: i32, buf: &[u8], offset: u64, flags: i32) -> Result<(), Errno> {
    transfer_all(buf.len(), offset, |done, off| {
        let rest = &buf[done..];
        let iov = libc::iovec { iov_base: rest.as_ptr() as *mut _, iov_len: rest.len() };
        // SAFETY: one iovec describing a valid readable region; the kernel only reads it.
        unsafe { libc::pwritev2(fd, &iov, 1, off, flags) }
    })
}

impl IoEngine for ThreadsEngine {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn submit(&self, op: IoOp, done: oneshot::Sender<IoDone>) {
        let tx = self.tx.lock().expect("io queue lock poisoned");
        let Some(tx) = tx.as_ref() else {
            let _ = done.send(IoDone { result: Err(Errno::ESHUTDOWN), buf: None });
            return;
        };
        if let Err(e) = tx.send((op, done)) {
            let (_, done) = e.0;
            let _ = done.send(IoDone { result: Err(Errno::ESHUTDOWN), buf: None });
        }
    }
}

impl Drop for ThreadsEngine {
    fn drop(&mut self) {
        // Closing the queue lets every worker finish the job in hand and exit.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
