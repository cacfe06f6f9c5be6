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
//! Frames are sealed ([`engine::seal`]) as they are queued, under the queue's lock, so their
//! sequence numbers follow the order they leave in.
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
use bytes::BytesMut;
use engine::seal::{Protection, Sealer, TAG_LEN};

use crate::store::IoBuf;

/// A frame queued for the peer: header (and small payload) plus optional block data.
#[derive(Debug)]
pub struct Frame {
    pub head: BytesMut,
    /// Block data, shared with the local write of the same block.
    pub data: Option<Arc<IoBuf>>,
}

/// Bytes queued before senders wait for the socket (backpressure).
pub const QUEUE_LIMIT: usize = 16 << 20;
/// How long the flusher keeps writing queued frames after [`Tx::close`].
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Bytes a cork holds back at most: beyond, the queue is written anyway.
pub const CORK_MAX: usize = 256 << 10;
/// Slices handed to one `writev`.
const IOV_MAX: usize = 64;

/// A frame as it goes out: sealed head, block data (as it is, or encrypted), the data's tag.
#[derive(Debug)]
struct Wire {
    head: Vec<u8>,
    data: Option<Arc<IoBuf>>,
    tag: Option<[u8; TAG_LEN]>,
}

impl Wire {
    fn parts(&self) -> [&[u8]; 3] {
        [
            &self.head,
            self.data.as_deref().map_or(&[][..], |d| &d[..]),
            self.tag.as_ref().map_or(&[][..], |t| &t[..]),
        ]
    }
    fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Wire>,
    /// Seals each frame as it is queued (`None`: sent as it is, in the queue's own tests).
    sealer: Option<Sealer>,
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

impl State {
    /// The frame as it goes out, sealed in order.
    fn seal(&mut self, f: Frame) -> Wire {
        let Some(s) = self.sealer.as_mut() else {
            return Wire { head: f.head.to_vec(), data: f.data, tag: None };
        };
        let body = f.data.as_ref().map_or(0, |d| d.len());
        let mut head = Vec::new();
        s.seal_head(&f.head, body, &mut head);
        let (data, tag) = match f.data {
            None => (None, None),
            Some(d) => match s.protection() {
                Protection::Authenticate => {
                    let tag = s.tag_body(&d);
                    (Some(d), Some(tag))
                }
                // The block is shared with its local write: encrypted in a copy of its own.
                Protection::Encrypt => {
                    let mut c = IoBuf::from_slice(&d);
                    let tag = s.seal_body(&mut c);
                    (Some(Arc::new(c)), Some(tag))
                }
            },
        };
        Wire { head, data, tag }
    }
}

impl Tx {
    /// A queue in front of `sock`, and its flusher task (spawned on the current runtime; it ends
    /// when the link is closed or broken).
    pub fn start(
        sock: OwnedWriteHalf,
        cap: Option<Throttle>,
        sealer: Option<Sealer>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let tx = Arc::new(Self {
            st: Mutex::new(State { sealer, ..State::default() }),
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
                    let w = st.seal(f.take().expect("pushed once"));
                    st.bytes += w.len();
                    st.queue.push_back(w);
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
        match self.write_bounded(st, usize::MAX) {
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
                for part in f.parts() {
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
                let rest = st.queue.front().expect("wrote queued bytes").len() - st.front_done;
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

    /// Holds frames back until the returned guard (and every other cork) is dropped.
    pub fn cork(self: &Arc<Self>) -> Cork {
        self.state().corks += 1;
        Cork { tx: Arc::clone(self) }
    }

    /// Resolves once no cork is held (at once when none is).
    pub async fn uncorked(&self) {
        let room = self.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if self.state().corks == 0 {
            return;
        }
        room.await;
    }

    /// Refuses new frames; the flusher writes what is queued and ends.
    pub fn close(&self) {
        let mut st = self.state();
        st.closed = true;
        self.kick.notify_one();
        self.room.notify_waiters();
    }

    /// Whether a write to the socket failed.
    #[cfg(test)]
    fn broken(&self) -> bool {
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

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::store::IoBuf;
    use bytes::BytesMut;
    use tokio::io::AsyncReadExt;
    use tokio::net::tcp::OwnedReadHalf;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: our `Tx` on one end, the raw receiving socket on the other.
    async fn pair(
        cap: Option<Throttle>,
    ) -> (Arc<Tx>, tokio::task::JoinHandle<()>, TcpStream, OwnedReadHalf) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let (rd, wr) = a.into_split();
        let (tx, flusher) = Tx::start(wr, cap, None);
        (tx, flusher, b, rd)
    }

    /// Frame `i`: a header of 8 bytes naming it, and `len` bytes of data derived from it.
    fn frame(i: u32, len: usize) -> (Frame, Vec<u8>) {
        let mut head = BytesMut::new();
        head.extend_from_slice(&i.to_be_bytes());
        head.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        let data: Vec<u8> =
            (0..len).map(|k| (k as u32 ^ i.wrapping_mul(2_654_435_761)) as u8).collect();
        let mut wire = head.to_vec();
        wire.extend_from_slice(&data);
        let data = (len > 0).then(|| Arc::new(IoBuf::from_slice(&data)));
        (Frame { head, data }, wire)
    }

    async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut b))
            .await
            .expect("the bytes arrive")
            .unwrap();
        b
    }

    #[tokio::test]
    async fn frames_arrive_whole_and_in_order_through_a_full_socket() {
        let (tx, _f, mut rx, _rd) = pair(None).await;
        let mut want = Vec::new();
        // 12 MiB while nobody reads: the socket fills, the rest queues for the flusher.
        for i in 0..48u32 {
            let len = if i % 3 == 0 { 0 } else { 256 << 10 };
            let (f, w) = frame(i, len + i as usize);
            want.extend_from_slice(&w);
            assert!(tx.send(f).await);
        }
        assert!(tx.state().bytes > 0, "a full socket leaves frames queued");
        let got = read_n(&mut rx, want.len()).await;
        assert!(got == want, "bytes differ from the frames sent, in order");
        let queued = tx.state().bytes;
        assert_eq!(queued, 0);
    }

    #[tokio::test]
    async fn a_cork_holds_frames_until_the_last_one_is_dropped() {
        let (tx, _f, mut rx, _rd) = pair(None).await;
        let (c1, c2) = (tx.cork(), tx.cork());
        let (f, w) = frame(1, 100);
        assert!(tx.send(f).await);
        let mut b = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(100), rx.read(&mut b)).await;
        assert!(early.is_err(), "nothing leaves while corked");
        drop(c1);
        let early = tokio::time::timeout(Duration::from_millis(100), rx.read(&mut b)).await;
        assert!(early.is_err(), "one cork is still held");
        let waiter = {
            let tx = Arc::clone(&tx);
            tokio::spawn(async move { tx.uncorked().await })
        };
        drop(c2);
        assert_eq!(read_n(&mut rx, w.len()).await, w);
        tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        // Uncorked: the next frame goes at once.
        let (f, w) = frame(2, 10);
        assert!(tx.send(f).await);
        assert_eq!(read_n(&mut rx, w.len()).await, w);
    }

    #[tokio::test]
    async fn a_cork_never_holds_more_than_its_limit() {
        let (tx, _f, mut rx, _rd) = pair(None).await;
        let _c = tx.cork();
        let mut want = Vec::new();
        for i in 0..8u32 {
            let (f, w) = frame(i, 64 << 10);
            want.extend_from_slice(&w);
            assert!(tx.send(f).await);
        }
        // 512 KiB queued under a cork of 256 KiB: it went out anyway.
        assert_eq!(read_n(&mut rx, want.len()).await, want);
    }

    #[tokio::test]
    async fn senders_wait_for_room_then_go_on() {
        let (tx, _f, mut rx, _rd) = pair(None).await;
        let mut want = Vec::new();
        let mut i = 0u32;
        // Fill until a send has to wait (bounded: the socket buffers plus the queue limit).
        let blocked = loop {
            assert!(i < 4096, "a send must wait once the queue is full");
            let (f, w) = frame(i, 1 << 20);
            want.extend_from_slice(&w);
            i += 1;
            let tx2 = Arc::clone(&tx);
            let mut h = tokio::spawn(async move { tx2.send(f).await });
            if tokio::time::timeout(Duration::from_millis(200), &mut h).await.is_err() {
                break h;
            }
        };
        assert!(tx.state().bytes >= QUEUE_LIMIT);
        let got = read_n(&mut rx, want.len()).await;
        assert!(blocked.await.unwrap(), "the waiting send went through");
        assert!(got == want);
    }

    #[tokio::test]
    async fn close_writes_what_was_queued_and_refuses_more() {
        let (tx, flusher, mut rx, _rd) = pair(None).await;
        let mut want = Vec::new();
        for i in 0..16u32 {
            let (f, w) = frame(i, 512 << 10);
            want.extend_from_slice(&w);
            assert!(tx.send(f).await);
        }
        tx.close();
        let (f, _) = frame(99, 1);
        assert!(!tx.send(f).await, "a closed link takes no frame");
        assert!(read_n(&mut rx, want.len()).await == want);
        tokio::time::timeout(Duration::from_secs(10), flusher).await.unwrap().unwrap();
        assert!(!tx.broken());
    }

    #[tokio::test]
    async fn a_vanished_peer_breaks_the_link_and_senders_learn_it() {
        let (tx, flusher, rx, _rd) = pair(None).await;
        drop(rx);
        let mut refused = false;
        for i in 0..10_000u32 {
            let (f, _) = frame(i, 64 << 10);
            if !tx.send(f).await {
                refused = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(refused, "sends to a closed peer end with false");
        tokio::time::timeout(Duration::from_secs(10), flusher).await.unwrap().unwrap();
        assert!(tx.broken());
    }

    #[tokio::test]
    async fn a_cap_paces_the_bytes() {
        let kib = 2048;
        let (tx, _f, mut rx, _rd) = pair(Throttle::new(kib)).await;
        let t0 = Instant::now();
        let mut sent = 0usize;
        for i in 0..24u32 {
            let (f, w) = frame(i, 128 << 10);
            sent += w.len();
            assert!(tx.send(f).await);
        }
        // Whatever the machine's speed, no more than the burst plus the rate may have arrived
        // by any moment (a slow machine receives less, never more).
        let burst = (kib * 1024 / 10).max(64 * 1024) as f64;
        let mut got = 0usize;
        let mut b = vec![0u8; 64 << 10];
        while got < sent {
            let n = tokio::time::timeout(Duration::from_secs(30), rx.read(&mut b))
                .await
                .expect("paced bytes keep coming")
                .unwrap();
            assert!(n > 0);
            got += n;
            let allowed =
                burst + (kib * 1024) as f64 * t0.elapsed().as_secs_f64() + (256 << 10) as f64;
            assert!((got as f64) <= allowed, "{got} bytes by {:?} exceed the cap", t0.elapsed());
        }
    }
}
