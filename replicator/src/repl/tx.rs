//! The send side of a peer connection: a queue of frames in front of the socket.
//!
//! Whoever sends a frame writes it to the socket itself when nothing is queued ahead of it: a
//! non-blocking `writev` from the sender's own task, no hand-over to a writer task and no
//! wake-up of another thread (that hand-over, and the wake-up on the way back, were most of the
//! cost of a replicated 4 KiB write). What the socket does not take at once stays queued, in
//! order, and the flusher task writes it when the socket is writable again. While the link is
//! *corked* (the NBD server starting a batch of requests), frames only queue; the last uncork
//! writes them all with one `writev`.
//!
//! With a cap on replication traffic (`replication_rate_limit_kib`) every frame goes through the
//! flusher, which paces the bytes.
//!
//! Closing ([`Tx::close`]) refuses new frames at once; the flusher writes what was queued
//! (within [`CLOSE_GRACE`]) and ends. The flusher also ends when a write fails: that is how the
//! session learns the connection broke.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::throttle::Throttle;
use super::volume::Frame;

/// Bytes queued before senders wait for the socket (backpressure).
pub const QUEUE_LIMIT: usize = 16 << 20;
/// How long the flusher keeps writing queued frames after [`Tx::close`].
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Bytes a cork holds back at most: beyond, the queue is written anyway.
pub const CORK_MAX: usize = 256 << 10;
/// Slices handed to one `writev`.
const IOV_MAX: usize = 64;

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Frame>,
    /// Bytes of the front frame already written.
    front_done: usize,
    /// Bytes queued (not yet written).
    bytes: usize,
    /// The flusher owns the queue (the socket was full, or traffic is paced): senders only push.
    flushing: bool,
    corks: u32,
    closed: bool,
    /// A write failed.
    broken: bool,
}

/// The queue and the socket's write half.
#[derive(Debug)]
pub struct Tx {
    st: Mutex<State>,
    sock: OwnedWriteHalf,
    paced: bool,
    /// Wakes the flusher.
    kick: Notify,
    /// Wakes senders waiting for room, and waiters for an uncork.
    room: Notify,
}

fn frame_len(f: &Frame) -> usize {
    f.head.len() + f.data.as_ref().map_or(0, |d| d.len())
}

impl Tx {
    /// A queue in front of `sock`, and its flusher task (spawned on the current runtime; it ends
    /// when the link is closed or broken).
    pub fn start(
        sock: OwnedWriteHalf,
        cap: Option<Throttle>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let tx = Arc::new(Self {
            st: Mutex::new(State::default()),
            sock,
            paced: cap.is_some(),
            kick: Notify::new(),
            room: Notify::new(),
        });
        let flusher = tokio::spawn(Arc::clone(&tx).flusher(cap));
        (tx, flusher)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().expect("peer send queue poisoned")
    }

    /// Queues `f` (waiting while [`QUEUE_LIMIT`] bytes are queued) and writes what it can;
    /// `false` when the connection is closed or broken.
    pub async fn send(&self, f: Frame) -> bool {
        let mut f = Some(f);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut st = self.state();
                if st.closed {
                    return false;
                }
                if st.bytes < QUEUE_LIMIT || st.queue.is_empty() {
                    let f = f.take().expect("pushed once");
                    st.bytes += frame_len(&f);
                    st.queue.push_back(f);
                    if st.corks == 0 || st.bytes >= CORK_MAX {
                        self.push_out(&mut st);
                    }
                    return true;
                }
            }
            room.await;
        }
    }

    /// Writes the queue now unless the flusher owns it; hands the rest to the flusher.
    fn push_out(&self, st: &mut State) {
        if st.flushing || st.closed || st.queue.is_empty() {
            return;
        }
        if self.paced {
            st.flushing = true;
            self.kick.notify_one();
            return;
        }
        match self.write_some(st) {
            Ok(true) => {}
            Ok(false) => {
                st.flushing = true;
                self.kick.notify_one();
            }
            Err(_) => {
                st.broken = true;
                st.closed = true;
                self.kick.notify_one();
                self.room.notify_waiters();
            }
        }
    }

    /// Non-blocking writes until the queue is empty (`Ok(true)`) or the socket is full or `max`
    /// bytes are written (`Ok(false)`).
    fn write_bounded(&self, st: &mut State, mut max: usize) -> std::io::Result<bool> {
        let before = st.bytes;
        let result = loop {
            if st.queue.is_empty() {
                break Ok(true);
            }
            if max == 0 {
                break Ok(false);
            }
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(IOV_MAX);
            let (mut skip, mut room) = (st.front_done, max);
            'frames: for f in &st.queue {
                for part in [&f.head[..], f.data.as_deref().map_or(&[][..], |d| &d[..])] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    let part = &part[skip..part.len().min(skip.saturating_add(room))];
                    skip = 0;
                    room -= part.len();
                    iov.push(IoSlice::new(part));
                    if room == 0 || iov.len() == IOV_MAX {
                        break 'frames;
                    }
                }
            }
            let n = match self.sock.try_write_vectored(&iov) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            drop(iov);
            st.bytes -= n;
            max = max.saturating_sub(n);
            let mut left = n;
            while left > 0 {
                let rest = frame_len(st.queue.front().expect("wrote queued bytes")) - st.front_done;
                if left >= rest {
                    left -= rest;
                    st.queue.pop_front();
                    st.front_done = 0;
                } else {
                    st.front_done += left;
                    left = 0;
                }
            }
        };
        if st.bytes < before {
            self.room.notify_waiters();
        }
        result
    }

    fn write_some(&self, st: &mut State) -> std::io::Result<bool> {
        self.write_bounded(st, usize::MAX)
    }

    /// Holds frames back until the returned guard (and every other cork) is dropped.
    pub fn cork(self: &Arc<Self>) -> Cork {
        self.state().corks += 1;
        Cork { tx: Arc::clone(self) }
    }

    /// Refuses new frames; the flusher writes what is queued and ends.
    pub fn close(&self) {
        let mut st = self.state();
        st.closed = true;
        self.kick.notify_one();
        self.room.notify_waiters();
    }

    /// Whether a write to the socket failed.
    pub fn broken(&self) -> bool {
        self.state().broken
    }

    async fn flusher(self: Arc<Self>, mut cap: Option<Throttle>) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let (closed, work) = {
                let st = self.state();
                (st.closed, !st.queue.is_empty() && (st.flushing || st.closed) && !st.broken)
            };
            if closed && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            if !work {
                if closed {
                    break;
                }
                self.kick.notified().await;
                continue;
            }
            // Pace: take the cap's share for what is queued now; a frame is never split.
            let budget = match cap.as_mut() {
                Some(t) => {
                    let want = self.state().bytes;
                    let d = t.delay(Instant::now(), want as u64);
                    if !d.is_zero() {
                        tokio::time::sleep(d).await;
                    }
                    want
                }
                None => usize::MAX,
            };
            let ready = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.sock.writable()).await.ok(),
                None => Some(self.sock.writable().await),
            };
            if !matches!(ready, Some(Ok(()))) {
                break; // grace over, or the socket failed
            }
            let mut st = self.state();
            match self.write_bounded(&mut st, budget) {
                Ok(true) => st.flushing = false,
                Ok(false) => {}
                Err(_) => {
                    st.broken = true;
                    break;
                }
            }
        }
        self.fail();
    }

    /// The flusher ended: nothing more can be sent.
    fn fail(&self) {
        let mut st = self.state();
        st.closed = true;
        if !st.queue.is_empty() {
            st.broken = true;
        }
        self.room.notify_waiters();
    }
}

/// A cork on a [`Tx`]; the last one dropped writes the queue.
#[derive(Debug)]
pub struct Cork {
    tx: Arc<Tx>,
}

impl Drop for Cork {
    fn drop(&mut self) {
        let mut st = self.tx.state();
        st.corks -= 1;
        if st.corks == 0 {
            self.tx.push_out(&mut st);
            drop(st);
            self.tx.room.notify_waiters();
        }
    }
}
