//! The peer connection driver: connect or accept, authenticate, agree on a plan, exchange
//! bitmaps, then run the session (replicated writes, acknowledgements, resync, verify, pings)
//! until it breaks; then tear down (unacknowledged writes marked out of sync) and retry.
//!
//! The node whose name sorts first connects; the other accepts. Everything a peer sends is
//! checked before it is believed: header checksums, lengths, ranges, digests, states.//!
//! Its parts: [`session`] (the handshake up to a live session, and the session's loop),
//! [`frames`] (what each frame from the peer does), [`resync`] (the resync as target, and
//! online verify).

mod frames;
mod resync;
mod session;

pub use resync::verify;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use nix::errno::Errno;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, Semaphore, oneshot, watch};

use super::handshake::{
    self, Hello, P_CRASHED_PRIMARY, P_DISCARD_MY_DATA, P_INCONSISTENT, P_PRIMARY, Params, Refusal,
};
use super::liveness::{self, Liveness, Verdict};
use super::policy::{Facts, Plan, plan};
use super::seal::{self, KeyInput, Opener, SealError, Sealer};
use super::throttle::Throttle;
use super::tx::Tx;
use super::volume::{
    ConnState, DiskState, Peer, Role, Volume, VolumeConfig, block_frame, random_bytes, random_u64,
    small_frame,
};
use super::wire::{self, Cursor, F_FUA, F_HOLE, F_LAST, Header, Kind, WireError};
use crate::generation::{Generations, Side};
use crate::ratectl::{RateController, TICK};
use crate::ratelimit::Limited;
use crate::shutdown::stopped;
use crate::store::IoBuf;
use engine::state::{Event, Sync};
use engine::translog::TransferLog;

/// What a `sync = "scheduled"` node says to a connection while its link is idle on purpose.
pub const IDLE_REFUSAL: &str = "idle between scheduled catch-ups";

/// Largest frame accepted before authentication.
const HANDSHAKE_MAX: u32 = 64 * 1024;
/// Largest resync request, bytes (one bitmap bit when the granularity is larger). Bounded in
/// bytes, not bits: 256 bits of a 64 KiB granularity made 16 MiB requests whose replies
/// outgrew what a resync tick grants, and the resync stood still.
const RS_CHUNK_BYTES: u64 = 1 << 20;
/// Resync requests a peer may have outstanding with us (it keeps at most
/// [`RS_MAX_INFLIGHT`]): past this it is not following the protocol.
const RS_SERVE_MAX: u64 = 4 * RS_MAX_INFLIGHT;
/// Verify requests a peer may have outstanding with us (it sends one at a time).
const VERIFY_SERVE_MAX: u64 = 16;
/// Longest the bitmap exchange may take as a whole, in peer timeouts (`timeout_ms`);
/// application writes wait during it.
const BITMAP_EXCHANGE_TIMEOUTS: u32 = 5;
/// Pause after a failed accept (EMFILE and the like).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Handshakes an acceptor runs at once: a connection from the peer's address that stalls in
/// its handshake (or several) does not keep the real peer waiting in the backlog. One more
/// drops the oldest: a stalled handshake cannot keep a newer one (the real peer's) out.
const PENDING_HANDSHAKES: usize = 4;
/// Longest one handshake (Hello and authentication) may take as a whole, in peer timeouts.
const HANDSHAKE_TIMEOUTS: u32 = 2;
/// Resync requests in flight at most.
const RS_MAX_INFLIGHT: u64 = 64;
/// Verify chunk.
const VERIFY_CHUNK: u64 = 1 << 20;
/// Longest a batch of received frames keeps its acknowledgements corked.
const BATCH_SPAN: Duration = Duration::from_millis(20);
/// Replicated writes a Secondary has handed to its engine and not finished, in KiB: past this,
/// it reads no more frames (TCP then holds the Primary back), as DRBD's `max-buffers`.
const APPLY_ROOM_KIB: u32 = 64 * 1024;

type Res<T> = Result<T, LinkError>;

/// Why a replication session ended or never began (`duet status` shows the last one).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("write: {0}")]
    Write(std::io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed mid-frame ({have} bytes of {want})")]
    ClosedMidFrame { have: usize, want: usize },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("peer did not send {0:?} in time")]
    Late(Kind),
    #[error("peer refused: {0}")]
    PeerRefused(String),
    #[error("expected {want:?}, peer sent {got:?}")]
    Unexpected { want: Kind, got: Kind },
    /// We refused the peer in the handshake (and told it why).
    #[error(transparent)]
    Handshake(#[from] Refusal),
    /// A frame the peer may not send in this state.
    #[error(transparent)]
    Frame(#[from] engine::replica::PeerError),
    #[error(transparent)]
    State(#[from] engine::state::Refusal),
    #[error("no randomness for {0}: {1}")]
    NoRandomness(&'static str, getrandom::Error),
    /// The generations say: not now (the plan's reason).
    #[error("{0}")]
    Retry(String),
    #[error("peer did not send its bitmap in time")]
    BitmapLate,
    #[error(
        "the bitmap exchange took longer than {0:?} ({BITMAP_EXCHANGE_TIMEOUTS} x timeout_ms); writes go on, the link retries"
    )]
    BitmapExchange(Duration),
    #[error("cannot write metadata")]
    Metadata,
    #[error("peer did not answer a ping within {0:?}")]
    NoPong(Duration),
    #[error(
        "peer left a request unanswered for more than {0:?} (timeout_ms); dropping the link, its writes are marked out of sync"
    )]
    Unanswered(Duration),
    #[error("connection lost (send failed)")]
    SendFailed,
    #[error("apply room closed")]
    ApplyRoomClosed,
    #[error("peer sent an unknown disk state")]
    UnknownDisk,
    #[error("peer sent an unknown role")]
    UnknownRole,
    #[error("peer sent a range outside the volume ({offset}+{len})")]
    OutsideVolume { offset: u64, len: u64 },
    #[error("peer asked for an oversized resync block")]
    OversizedResync,
    #[error("peer asked to read an oversized range")]
    OversizedRead,
    #[error("peer sent read data nobody here asked for (not a Diskless Primary)")]
    UnaskedRead,
    #[error("peer has more than {RS_SERVE_MAX} resync requests outstanding with us")]
    TooManyResync,
    #[error("peer asked to verify an oversized range")]
    OversizedVerify,
    #[error("peer has more than {VERIFY_SERVE_MAX} verify requests outstanding with us")]
    TooManyVerify,
    #[error("peer answered unknown verify request {0}")]
    UnknownVerify(u64),
    #[error("peer sent a handshake frame ({0:?}) mid-session")]
    HandshakeMidSession(Kind),
    /// A sealed frame failed: the link is under attack, or broken in a way checksums miss.
    #[error(transparent)]
    Sealed(#[from] SealError),
}

impl LinkError {
    /// Whether the peer's bytes failed authentication (counted apart: someone may be tampering
    /// with the link).
    pub fn is_forgery(&self) -> bool {
        // A bad frame inside a good seal came from the key holder: a broken peer, not a forger.
        matches!(
            self,
            LinkError::Sealed(SealError::Auth | SealError::Length { .. })
                | LinkError::Handshake(Refusal::Auth)
        )
    }
}

/// Reads frames through a buffer, cancel-safe: a frame is taken (and opened) only once all of
/// it is buffered.
struct FrameReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    limit: u32,
    /// After the challenge/response: every frame is sealed.
    opener: Option<Opener>,
}

impl FrameReader {
    async fn fill(&mut self, n: usize) -> Res<()> {
        while self.buf.len() < n {
            self.buf.reserve(n.max(256 * 1024));
            let got = self.rd.read_buf(&mut self.buf).await.map_err(LinkError::Read)?;
            if got == 0 {
                return Err(if self.buf.is_empty() {
                    LinkError::Closed
                } else {
                    LinkError::ClosedMidFrame { have: self.buf.len(), want: n }
                });
            }
        }
        Ok(())
    }

    /// The whole size of the frame at the front of the buffer, once known.
    fn frame_len(&self) -> Res<Option<usize>> {
        if self.opener.is_some() {
            return Ok(Opener::frame_len(&self.buf, self.limit)?);
        }
        let Some(h) = wire::decode_header(&self.buf)? else {
            return Ok(None);
        };
        if h.len > self.limit {
            return Err(WireError::TooLong(h.len).into());
        }
        Ok(Some(wire::HEADER_LEN + h.len as usize))
    }

    /// Takes the frame of `n` bytes at the front of the buffer: header and payload.
    fn take(&mut self, n: usize) -> Res<(Header, BytesMut)> {
        let mut f = self.buf.split_to(n);
        let Some(o) = self.opener.as_mut() else {
            let h = wire::decode_header(&f)?.expect("header buffered");
            f.advance(wire::HEADER_LEN);
            return Ok((h, f));
        };
        let opened = o.open(&mut f, self.limit)?;
        f.truncate(opened.payload.end);
        f.advance(opened.payload.start);
        Ok((opened.header, f))
    }

    /// The next whole frame: header and payload.
    async fn next(&mut self) -> Res<(Header, BytesMut)> {
        let head = if self.opener.is_some() { seal::PREFIX_LEN } else { wire::HEADER_LEN };
        self.fill(head).await?;
        let n = self.frame_len()?.expect("length buffered");
        self.fill(n).await?;
        self.take(n)
    }

    /// The next frame if it is already whole in the buffer (no read).
    fn buffered(&mut self) -> Res<Option<(Header, BytesMut)>> {
        match self.frame_len()? {
            Some(n) if self.buf.len() >= n => self.take(n).map(Some),
            _ => Ok(None),
        }
    }

    async fn expect(&mut self, kind: Kind, timeout: Duration) -> Res<BytesMut> {
        let (h, p) = tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| LinkError::Late(kind))??;
        if h.kind == Kind::Refuse {
            return Err(LinkError::PeerRefused(String::from_utf8_lossy(&p).into_owned()));
        }
        if h.kind != kind {
            return Err(LinkError::Unexpected { want: kind, got: h.kind });
        }
        Ok(p)
    }
}

/// Writes one frame before the session is live (sealed once the keys exist).
async fn send_now(
    wr: &mut OwnedWriteHalf,
    sealer: Option<&mut Sealer>,
    kind: Kind,
    flags: u16,
    payload: &[u8],
) -> Res<()> {
    let mut b = BytesMut::new();
    wire::encode(&mut b, kind, flags, 0, 0, payload);
    let Some(s) = sealer else {
        return wr.write_all(&b).await.map_err(LinkError::Write);
    };
    let mut out = Vec::new();
    s.seal_head(&b, 0, &mut out);
    wr.write_all(&out).await.map_err(LinkError::Write)
}

/// The link task of one volume: runs until `shutdown`.
pub async fn run(
    vol: Arc<Volume>,
    listener: Option<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = vol.config().expect("a replicated volume").clone();
    let connector = cfg.node < cfg.peer;
    let mut changed = vol.watch();
    let log = Limited::new(5, Duration::from_secs(30));
    let mut failures: u32 = 0;
    let warn = |what: &str| crate::warn_limited!(log, "{what}");
    loop {
        if *shutdown.borrow() {
            return;
        }
        let want = vol.with_core(|c| {
            let _ = c.r.st.step(Event::Attempt);
            c.r.st.want_connect
        });
        let sock = if !want {
            // Accept and drop, so the peer sees a refusal rather than a hang.
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = changed.changed() => continue,
                Some(Ok((s, _))) = accept(listener.as_ref()) => {
                    // A scheduled Primary between catch-ups says so (the standby keeps quiet
                    // about it); anyone else just sees the connection close.
                    if vol.scheduled().is_some() {
                        let mut s = s;
                        let mut b = BytesMut::new();
                        wire::encode(&mut b, Kind::Refuse, 0, 0, 0, IDLE_REFUSAL.as_bytes());
                        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&b)).await;
                    }
                    continue;
                }
            }
        } else if connector {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                r = tokio::time::timeout(cfg.timeout, TcpStream::connect(cfg.peer_addr)) => match r {
                    Ok(Ok(s)) => Some(Conn::Dialed(s)),
                    _ => None,
                },
            }
        } else {
            match accept_peer(&vol, &cfg, listener.as_ref(), &mut shutdown, &mut changed, &warn)
                .await
            {
                Accepted::Stop => return,
                Accepted::Again => continue,
                Accepted::Peer(a) => Some(Conn::Authenticated(a)),
            }
        };
        failures = failures.saturating_add(1);
        if let Some(conn) = sock {
            // The connector authenticates its one connection here; the acceptor already did.
            let authed = match conn {
                Conn::Dialed(s) => {
                    let _ = s.set_nodelay(true);
                    let most = cfg.timeout * HANDSHAKE_TIMEOUTS;
                    match tokio::time::timeout(most, session::authenticate(&cfg, s)).await {
                        Ok(r) => r,
                        Err(_) => Err(LinkError::Late(Kind::Auth)),
                    }
                }
                Conn::Authenticated(a) => Ok(*a),
            };
            let ended = match authed {
                Ok(a) => session::session(&vol, a, &mut shutdown).await,
                Err(e) => Err(e),
            };
            match ended {
                Ok(why) => {
                    failures = 0;
                    vol.event(format!("connection closed: {why}"));
                }
                Err(e) => count_failure(&vol, &warn, &e),
            }
            teardown(&vol).await;
        }
        if *shutdown.borrow() {
            return;
        }
        // The connector backs off (connect_retry × 1, 2, 4, 8) while attempts keep failing; a
        // local change (promotion, connect, invalidate) retries at once. The acceptor does not:
        // the peer paces its own attempts, and a pause here would only make it wait (a failed
        // handshake, which anyone who reaches the port can cause, delayed the real peer's
        // reconnection by the whole backoff).
        let delay = if connector {
            cfg.connect_retry * (1u32 << failures.saturating_sub(1).min(3))
        } else {
            Duration::ZERO
        };
        changed.borrow_and_update(); // our own teardown's notification is not a reason to hurry
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(delay) => {}
            _ = changed.changed() => {}
        }
    }
}

/// A connection to the peer, before the session.
enum Conn {
    /// The connector's: not yet authenticated.
    Dialed(TcpStream),
    /// The acceptor's: authenticated.
    Authenticated(Box<session::Authenticated>),
}

/// What the acceptor's wait for the peer ended with.
enum Accepted {
    /// Shutdown.
    Stop,
    /// A local change (or a failed accept): look at the state again.
    Again,
    /// The peer, authenticated.
    Peer(Box<session::Authenticated>),
}

/// Accepts connections and runs up to [`PENDING_HANDSHAKES`] handshakes at once, each within
/// its own deadline, until one of them is the authenticated peer. Connections from other
/// addresses, failed handshakes and the overflow are dropped and counted, and delay nothing.
async fn accept_peer(
    vol: &Arc<Volume>,
    cfg: &VolumeConfig,
    listener: Option<&TcpListener>,
    shutdown: &mut watch::Receiver<bool>,
    changed: &mut watch::Receiver<u64>,
    warn: &impl Fn(&str),
) -> Accepted {
    use futures_util::future::{AbortHandle, Abortable};
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let most = cfg.timeout * HANDSHAKE_TIMEOUTS;
    let mut pending = FuturesUnordered::new();
    // The pending handshakes' abort handles, oldest first, by number.
    let mut handles: std::collections::VecDeque<(u64, AbortHandle)> = Default::default();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = stopped(shutdown) => return Accepted::Stop,
            _ = changed.changed() => return Accepted::Again,
            Some(done) = pending.next(), if !pending.is_empty() => {
                let Ok((id, r)) = done else { continue }; // dropped for a newer one
                handles.retain(|(i, _)| *i != id);
                match r {
                    Ok(Ok(a)) => {
                        // The others were not the peer: dropped with this future's end.
                        let others = u64::try_from(handles.len()).unwrap_or(u64::MAX);
                        vol.stats.foreign_connections.fetch_add(others, Relaxed);
                        return Accepted::Peer(Box::new(a));
                    }
                    Ok(Err(e)) => count_failure(vol, warn, &e),
                    Err(_) => count_failure(vol, warn, &LinkError::Late(Kind::Auth)),
                }
            }
            Some(r) = accept(listener) => match r {
                Ok((s, from)) => {
                    if from.ip() != cfg.peer_addr.ip() {
                        // Dropped and counted, and nothing else: it is no failed attempt of
                        // the peer's, so it must not delay the peer's next one.
                        drop(s);
                        vol.stats.foreign_connections.fetch_add(1, Relaxed);
                        warn(&format!("refusing a replication connection from {from}: not the peer's address"));
                        continue;
                    }
                    if handles.len() >= PENDING_HANDSHAKES
                        && let Some((_, oldest)) = handles.pop_front()
                    {
                        oldest.abort();
                        vol.stats.foreign_connections.fetch_add(1, Relaxed);
                        warn(&format!("{PENDING_HANDSHAKES} replication handshakes pending: dropped the oldest for the connection from {from}"));
                    }
                    let _ = s.set_nodelay(true);
                    let (h, reg) = AbortHandle::new_pair();
                    let id = next_id;
                    next_id += 1;
                    handles.push_back((id, h));
                    let hs = tokio::time::timeout(most, session::authenticate(cfg, s));
                    pending.push(Abortable::new(async move { (id, hs.await) }, reg));
                }
                Err(e) => {
                    // Out of descriptors or memory: a breath before the next accept, so the
                    // loop does not spin.
                    warn(&format!("accepting a replication connection failed: {e}"));
                    tokio::select! {
                        _ = stopped(shutdown) => return Accepted::Stop,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            },
        }
    }
}

/// A session that failed, or a handshake that did not authenticate: counted, logged, shown by
/// `duet status`.
fn count_failure(vol: &Volume, warn: &impl Fn(&str), e: &LinkError) {
    if matches!(e, LinkError::PeerRefused(m) if m == IDLE_REFUSAL) {
        // Not a failure: the scheduled Primary idles until its next catch-up.
        vol.with_core(|c| c.r.last_refusal = Some(e.to_string()));
        return;
    }
    vol.stats.peer_errors.fetch_add(1, Relaxed);
    if e.is_forgery() {
        vol.stats.peer_auth_failures.fetch_add(1, Relaxed);
    }
    warn(&format!("replication link: {e}"));
    vol.with_core(|c| c.r.last_refusal = Some(e.to_string()));
}

async fn accept(l: Option<&TcpListener>) -> Option<std::io::Result<(TcpStream, SocketAddr)>> {
    match l {
        Some(l) => Some(l.accept().await),
        None => std::future::pending().await,
    }
}

/// After a session: writes the peer had not acknowledged are out of sync; state back to
/// Connecting (or StandAlone).
async fn teardown(vol: &Arc<Volume>) {
    // Under one lock: the session's requests and unflushed writes are marked (see
    // `Replica::teardown`); a write that registers after this finds no session and marks its
    // own blocks.
    let (peer, end) = vol.with_core(|c| {
        c.resync = None;
        c.verify = None;
        (c.peer.take(), c.r.teardown())
    });
    drop(end.waiters); // their requests see the peer as lost
    if let Some(p) = peer {
        p.tx.close();
        if let Ok(mut v) = p.verify.lock() {
            v.clear();
        }
        // A Diskless Primary's reads waiting for it fail now (EIO), not at their timeout.
        if let Ok(mut r) = p.reads.lock() {
            r.clear();
        }
    }
    // Data first: a failed flush leaves the bitmap on disk with its bits.
    if let Err(e) = vol.persist(end.persist).await {
        tracing::error!(error = %e, "making the end of the session durable failed");
    }
    vol.al_wake();
    vol.notify();
}

fn encode_gens(g: &Generations) -> Vec<u8> {
    let mut b = BytesMut::new();
    handshake::put_generations(&mut b, g);
    b.to_vec()
}

fn decode_gens(p: &[u8]) -> Result<Generations, WireError> {
    let mut c = Cursor::new(Kind::SyncUuid, p);
    let g = handshake::get_generations(&mut c)?;
    c.end()?;
    Ok(g)
}

/// One of a bounded number of requests the peer may have outstanding with us.
struct Slot(Arc<AtomicU64>);

impl Slot {
    fn take(count: &Arc<AtomicU64>, max: u64) -> Option<Self> {
        count
            .fetch_update(Relaxed, Relaxed, |v| (v < max).then_some(v + 1))
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Bytes of one resync request at bitmap granularity `g` (a whole number of bits, at least one).
fn rs_chunk(g: u64) -> u64 {
    (RS_CHUNK_BYTES / g).max(1) * g
}

struct Session {
    vol: Arc<Volume>,
    peer: Arc<Peer>,
    /// Resync and verify requests of the peer being served (see [`RS_SERVE_MAX`]).
    serving_rs: Arc<AtomicU64>,
    serving_verify: Arc<AtomicU64>,
    /// Replicated writes hold the current barrier shared. A peer FLUSH puts a new one in its
    /// place and waits for the old one exclusively: for exactly the writes received before it,
    /// while later writes go on (a flush on a slow disk does not stall the link).
    barrier: Arc<RwLock<()>>,
    inflight_rs: Arc<AtomicU64>,
    resync: Option<tokio::task::JoinHandle<()>>,
    /// Room for writes applied in tasks (see [`APPLY_ROOM_KIB`]).
    apply_room: Arc<Semaphore>,
}

fn range_of(vol: &Volume, offset: u64, len: u64) -> Res<()> {
    if len == 0 || offset.checked_add(len).is_none_or(|e| e > vol.size()) {
        return Err(LinkError::OutsideVolume { offset, len });
    }
    Ok(())
}

fn u32_payload(kind: Kind, p: &[u8]) -> Res<u64> {
    let mut c = Cursor::new(kind, p);
    let v = c.u32()?;
    Ok(u64::from(v))
}
