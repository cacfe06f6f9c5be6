//! A man in the middle of a replication link: a TCP relay the test puts between the two nodes
//! (see [`crate::pair::Pair::route_peer_through`]). It passes the handshake's two plain frames
//! each way, then cuts the stream into sealed frames by their length prefix, and on request
//! flips a byte of one, drops one, replays one, or injects a frame of its own. It records every
//! byte it passes, so a test can look for a payload in the capture.
//!
//! Threads with blocking sockets, every read with a timeout so the relay stops when dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The two directions through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the node that connects (the name that sorts first) to the one that accepts.
    Forward,
    /// Back.
    Back,
}

/// What to do to the next sealed frame in a direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tamper {
    /// Flip one bit in the middle of it.
    Flip,
    /// Leave it out.
    Drop,
    /// Send it twice.
    Replay,
    /// Send these bytes before it.
    Inject(Vec<u8>),
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    armed: Mutex<[Option<Tamper>; 2]>,
    /// Tampers carried out, per direction.
    done: [AtomicU64; 2],
    capture: [Mutex<Vec<u8>>; 2],
}

/// The relay; it stops when dropped.
#[derive(Debug)]
pub struct Relay {
    pub port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);
const HEADER_LEN: usize = 32;

impl Relay {
    /// Listens on a free loopback port and relays each connection to `127.0.0.1:to`.
    pub fn start(to: u16) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("relay port");
        let port = l.local_addr().expect("relay address").port();
        l.set_nonblocking(true).expect("nonblocking listener");
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || {
            let mut pumps = Vec::new();
            while !sh.stop.load(SeqCst) {
                match l.accept() {
                    Ok((a, _)) => {
                        let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else {
                            continue;
                        };
                        let _ = a.set_nonblocking(false);
                        for (src, dst, dir) in [(&a, &b, Dir::Forward), (&b, &a, Dir::Back)] {
                            let (src, dst) = (src.try_clone(), dst.try_clone());
                            let (Ok(src), Ok(dst)) = (src, dst) else { continue };
                            let sh = Arc::clone(&sh);
                            pumps.push(std::thread::spawn(move || pump(&src, &dst, dir, &sh)));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(_) => std::thread::sleep(POLL),
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Self { port, shared, acceptor: Some(acceptor) }
    }

    /// Arms `t` for the next sealed frame in `dir`.
    pub fn arm(&self, dir: Dir, t: Tamper) {
        self.shared.armed.lock().expect("armed")[dir as usize] = Some(t);
    }

    /// Tampers carried out in `dir` so far.
    pub fn done(&self, dir: Dir) -> u64 {
        self.shared.done[dir as usize].load(SeqCst)
    }

    /// Every byte relayed in `dir` so far.
    pub fn capture(&self, dir: Dir) -> Vec<u8> {
        self.shared.capture[dir as usize].lock().expect("capture").clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes")) as usize
}

/// The length of the frame at the front of `buf`, once its length is there: plain frames
/// (header with its payload length at bytes 24..28), or sealed ones (two lengths in front).
fn frame_len(buf: &[u8], plain: bool) -> Option<usize> {
    if plain {
        return (buf.len() >= HEADER_LEN).then(|| HEADER_LEN + be32(&buf[24..]));
    }
    if buf.len() < 8 {
        return None;
    }
    let (head, body) = (be32(buf), be32(&buf[4..]));
    Some(8 + head + 16 + if body == 0 { 0 } else { body + 16 })
}

fn pump(src: &TcpStream, dst: &TcpStream, dir: Dir, sh: &Shared) {
    let d = dir as usize;
    let _ = src.set_read_timeout(Some(POLL));
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    // Hello and Auth travel in the clear; everything after them is sealed.
    let mut plain_left = 2;
    let mut out = dst;
    let mut input = src;
    while !sh.stop.load(SeqCst) {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        sh.capture[d].lock().expect("capture").extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = frame_len(&buf, plain_left > 0) {
            if buf.len() < len {
                break;
            }
            let mut frame: Vec<u8> = buf.drain(..len).collect();
            let tamper = if plain_left > 0 {
                plain_left -= 1;
                None
            } else {
                sh.armed.lock().expect("armed")[d].take()
            };
            let sent = match tamper {
                None => out.write_all(&frame),
                Some(t) => {
                    sh.done[d].fetch_add(1, SeqCst);
                    match t {
                        Tamper::Flip => {
                            let mid = frame.len() / 2;
                            frame[mid] ^= 0x10;
                            out.write_all(&frame)
                        }
                        Tamper::Drop => Ok(()),
                        Tamper::Replay => {
                            out.write_all(&frame).and_then(|()| out.write_all(&frame))
                        }
                        Tamper::Inject(b) => out.write_all(&b).and_then(|()| out.write_all(&frame)),
                    }
                }
            };
            if sent.is_err() {
                let _ = src.shutdown(Shutdown::Both);
                return;
            }
        }
    }
    let _ = dst.shutdown(Shutdown::Both);
    let _ = src.shutdown(Shutdown::Both);
}
