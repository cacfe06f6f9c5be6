//! The peer connection driver: connect or accept, authenticate, agree on a plan, exchange
//! bitmaps, then run the session (replicated writes, acknowledgements, resync, verify, pings)
//! until it breaks; then tear down (unacknowledged writes marked out of sync) and retry.
//!
//! The node whose name sorts first connects; the other accepts. Everything a peer sends is
//! checked before it is believed: header checksums, lengths, ranges, digests, states.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, Semaphore, oneshot, watch};

use super::handshake::{
    self, Hello, P_CRASHED_PRIMARY, P_DISCARD_MY_DATA, P_INCONSISTENT, P_PRIMARY, Params, Refusal,
};
use super::liveness::{self, Liveness, Verdict};
use super::policy::{Facts, Plan, plan};
use super::throttle::Throttle;
use super::tx::Tx;
use super::volume::{
    ConnState, DiskState, Peer, Role, Volume, block_frame, random_bytes, random_u64, small_frame,
};
use super::wire::{self, Cursor, F_FUA, F_HOLE, F_LAST, Header, Kind, WireError};
use crate::generation::{Generations, Side};
use crate::ratectl::{RateController, TICK};
use crate::ratelimit::RateLimit;
use crate::shutdown::stopped;
use crate::store::IoBuf;
use engine::replica::Persist;
use engine::state::{Event, Sync};
use engine::translog::TransferLog;

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
/// Resync requests in flight at most.
const RS_MAX_INFLIGHT: u64 = 64;
/// Verify chunk.
const VERIFY_CHUNK: u64 = 1 << 20;
/// Longest a batch of received frames keeps its acknowledgements corked.
const BATCH_SPAN: Duration = Duration::from_millis(20);
/// Replicated writes a Secondary has handed to its engine and not finished, in KiB: past this,
/// it reads no more frames (TCP then holds the Primary back), as DRBD's `max-buffers`.
const APPLY_ROOM_KIB: u32 = 64 * 1024;

type Res<T> = Result<T, String>;

/// Reads frames through a buffer, cancel-safe.
struct FrameReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    limit: u32,
}

impl FrameReader {
    async fn fill(&mut self, n: usize) -> Res<()> {
        while self.buf.len() < n {
            self.buf.reserve(n.max(256 * 1024));
            let got = self.rd.read_buf(&mut self.buf).await.map_err(|e| format!("read: {e}"))?;
            if got == 0 {
                return Err(if self.buf.is_empty() {
                    "peer closed the connection".into()
                } else {
                    format!("peer closed mid-frame ({} bytes of {n})", self.buf.len())
                });
            }
        }
        Ok(())
    }

    /// The next whole frame: header and payload.
    async fn next(&mut self) -> Res<(Header, BytesMut)> {
        self.fill(wire::HEADER_LEN).await?;
        let h =
            wire::decode_header(&self.buf).map_err(|e| e.to_string())?.expect("header buffered");
        if h.len > self.limit {
            return Err(WireError::TooLong(h.len).to_string());
        }
        self.fill(wire::HEADER_LEN + h.len as usize).await?;
        self.buf.advance(wire::HEADER_LEN);
        let payload = self.buf.split_to(h.len as usize);
        Ok((h, payload))
    }

    /// The next frame if it is already whole in the buffer (no read).
    fn buffered(&mut self) -> Res<Option<(Header, BytesMut)>> {
        let Some(h) = wire::decode_header(&self.buf).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if h.len > self.limit {
            return Err(WireError::TooLong(h.len).to_string());
        }
        if self.buf.len() < wire::HEADER_LEN + h.len as usize {
            return Ok(None);
        }
        self.buf.advance(wire::HEADER_LEN);
        let payload = self.buf.split_to(h.len as usize);
        Ok(Some((h, payload)))
    }

    async fn expect(&mut self, kind: Kind, timeout: Duration) -> Res<BytesMut> {
        let (h, p) = tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| format!("peer did not send {kind:?} in time"))??;
        if h.kind == Kind::Refuse {
            return Err(format!("peer refused: {}", String::from_utf8_lossy(&p)));
        }
        if h.kind != kind {
            return Err(format!("expected {kind:?}, peer sent {:?}", h.kind));
        }
        Ok(p)
    }
}

async fn send_now(wr: &mut OwnedWriteHalf, kind: Kind, flags: u16, payload: &[u8]) -> Res<()> {
    let mut b = BytesMut::new();
    wire::encode(&mut b, kind, flags, 0, 0, payload);
    wr.write_all(&b).await.map_err(|e| format!("write: {e}"))
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
    let log = Mutex::new(RateLimit::new(5, Duration::from_secs(30)));
    let mut failures: u32 = 0;
    let warn = |what: &str| {
        if let Some(suppressed) = log.lock().ok().and_then(|mut l| l.allow(Instant::now())) {
            tracing::warn!(resource = %cfg.resource, peer = %cfg.peer, suppressed, "{what}");
        }
    };
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
                Some(Ok((s, _))) = accept(listener.as_ref()) => { drop(s); continue; }
            }
        } else if connector {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                r = tokio::time::timeout(cfg.timeout, TcpStream::connect(cfg.peer_addr)) => match r {
                    Ok(Ok(s)) => Some(s),
                    _ => None,
                },
            }
        } else {
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = changed.changed() => continue,
                Some(r) = accept(listener.as_ref()) => match r {
                    Ok((s, from)) => {
                        if from.ip() != cfg.peer_addr.ip() {
                            warn(&format!("refusing a replication connection from {from}: not the peer's address"));
                            None
                        } else { Some(s) }
                    }
                    Err(_) => None,
                },
            }
        };
        failures = failures.saturating_add(1);
        if let Some(sock) = sock {
            let _ = sock.set_nodelay(true);
            match session(&vol, sock, &mut shutdown).await {
                Ok(why) => {
                    failures = 0;
                    vol.event(format!("connection closed: {why}"));
                }
                Err(e) => {
                    vol.stats.peer_errors.fetch_add(1, Relaxed);
                    warn(&format!("replication link: {e}"));
                    vol.with_core(|c| c.r.last_refusal = Some(e.clone()));
                }
            }
            teardown(&vol).await;
        }
        if *shutdown.borrow() {
            return;
        }
        // Back off (connect_retry × 1, 2, 4, 8) while attempts keep failing; a local change
        // (promotion, connect, invalidate) retries at once.
        let delay = cfg.connect_retry * (1u32 << failures.saturating_sub(1).min(3));
        changed.borrow_and_update(); // our own teardown's notification is not a reason to hurry
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(delay) => {}
            _ = changed.changed() => {}
        }
    }
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
    }
    if end.persist.data && vol.store().flush().await.is_err() {
        tracing::error!(
            "flush after an interrupted resync failed; the bitmap on disk keeps its bits"
        );
        vol.notify();
        return;
    }
    let _ = vol.persist(Persist { data: false, ..end.persist }).await;
    vol.al_wake();
    vol.notify();
}

/// One connection from handshake to end. `Ok(reason)` for an orderly end.
async fn session(
    vol: &Arc<Volume>,
    sock: TcpStream,
    shutdown: &mut watch::Receiver<bool>,
) -> Res<String> {
    let cfg = vol.config().expect("replicated").clone();
    let (rd, mut wr) = sock.into_split();
    let mut r = FrameReader { rd, buf: BytesMut::with_capacity(256 * 1024), limit: HANDSHAKE_MAX };
    let t = cfg.timeout;

    // 1. Hello both ways.
    let challenge =
        random_bytes::<32>().map_err(|e| format!("no randomness for a challenge: {e}"))?;
    let hello = Hello {
        version: wire::VERSION,
        features: handshake::FEATURES,
        cluster: cfg.cluster.clone(),
        node: cfg.node.clone(),
        resource: cfg.resource.clone(),
        challenge,
    };
    let mut b = BytesMut::new();
    hello.encode(&mut b);
    send_now(&mut wr, Kind::Hello, 0, &b).await?;
    let theirs = Hello::decode(&r.expect(Kind::Hello, t).await?).map_err(|e| e.to_string())?;
    let refuse = |e: Refusal| e.to_string();
    if let Err(e) = handshake::check_hello(&theirs, &cfg.cluster, &cfg.peer, &cfg.resource) {
        let _ = send_now(&mut wr, Kind::Refuse, 0, e.to_string().as_bytes()).await;
        return Err(refuse(e));
    }
    // 2. Mutual authentication.
    let tag =
        handshake::auth_tag(&cfg.secret, &cfg.cluster, &theirs.challenge, &challenge, &cfg.node);
    send_now(&mut wr, Kind::Auth, 0, &tag).await?;
    let their_tag = r.expect(Kind::Auth, t).await?;
    if let Err(e) = handshake::verify_tag(
        &cfg.secret,
        &cfg.cluster,
        &challenge,
        &theirs.challenge,
        &cfg.peer,
        &their_tag,
    ) {
        let _ = send_now(&mut wr, Kind::Refuse, 0, e.to_string().as_bytes()).await;
        return Err(refuse(e));
    }
    // 3. Parameters and the plan.
    let mine = vol.params();
    let mut b = BytesMut::new();
    mine.encode(&mut b);
    send_now(&mut wr, Kind::Params, 0, &b).await?;
    let peer = Params::decode(&r.expect(Kind::Params, t).await?).map_err(|e| e.to_string())?;
    if let Err(e) = handshake::check_params(&mine, &peer) {
        let _ = send_now(&mut wr, Kind::Refuse, 0, e.to_string().as_bytes()).await;
        return Err(refuse(e));
    }
    let facts = |name: &str, p: &Params| Facts {
        name: name.into(),
        side: Side {
            uuids: p.uuids,
            crashed_primary: p.has(P_CRASHED_PRIMARY),
            primary: p.has(P_PRIMARY),
        },
        inconsistent: p.has(P_INCONSISTENT),
        discard_my_data: p.has(P_DISCARD_MY_DATA),
        weight: p.bitmap_weight,
    };
    let resolve = cfg.node > cfg.peer;
    let (me_f, peer_f) = (facts(&cfg.node, &mine), facts(&cfg.peer, &peer));
    let (the_plan, verdict) = plan(&cfg.policies, &me_f, &peer_f, resolve);
    vol.event(format!(
        "connected to {}: generations compared, rule {} → {:?}; plan {:?}",
        cfg.peer, verdict.rule, verdict.decision, the_plan
    ));
    match &the_plan {
        Plan::SplitBrain(why) => {
            tracing::error!(resource = %cfg.resource, peer = %cfg.peer, "SPLIT BRAIN: {why}");
            vol.with_core(|c| c.r.give_up(true, why.clone()));
            vol.event(format!("SPLIT BRAIN: {why}"));
            return Ok("split brain; StandAlone until the operator resolves it".into());
        }
        Plan::Refuse(why) => {
            tracing::error!(resource = %cfg.resource, peer = %cfg.peer, "refusing to connect: {why}");
            vol.with_core(|c| c.r.give_up(false, why.clone()));
            return Ok(format!("refused: {why}; StandAlone"));
        }
        Plan::Retry(why) => return Err(why.clone()),
        Plan::NoSync | Plan::Source { .. } | Plan::Target { .. } => {}
    }
    vol.with_core(|c| engine::session::apply_fixup(&mut c.r.sb.uuids, verdict.fixup));
    // 4. Bitmaps both ways, OR-ed. From here until the session is live no application write
    // runs: one that missed the peer has marked its blocks before our bitmap is read, and the
    // next one replicates.
    let gate = Arc::clone(&vol.io_gate).write_owned().await;
    r.limit = wire::MAX_PAYLOAD;
    let full = engine::session::full(&the_plan);
    // The writes are held for the whole exchange, so it has a deadline of its own besides the
    // per-frame one: a peer that trickles bitmap frames cannot hold them for long.
    let exchange = async {
        let mut from = Some(0);
        while let Some(f) = from {
            let mut b = BytesMut::new();
            from = vol.with_core(|c| c.r.bitmap.encode_runs(f, 4096, &mut b));
            send_now(&mut wr, Kind::Bitmap, if from.is_none() { F_LAST } else { 0 }, &b).await?;
        }
        loop {
            let (h, p) = tokio::time::timeout(t, r.next())
                .await
                .map_err(|_| "peer did not send its bitmap in time".to_string())??;
            if h.kind != Kind::Bitmap {
                return Err(format!("expected Bitmap, peer sent {:?}", h.kind));
            }
            vol.with_core(|c| c.r.bitmap.apply_runs(&p)).map_err(|e| e.to_string())?;
            if h.flags & F_LAST != 0 {
                return Ok(());
            }
        }
    };
    let most = t * BITMAP_EXCHANGE_TIMEOUTS;
    tokio::time::timeout(most, exchange).await.map_err(|_| {
        format!("the bitmap exchange took longer than {most:?} ({BITMAP_EXCHANGE_TIMEOUTS} x timeout_ms); writes go on, the link retries")
    })??;
    let weight = vol.with_core(|c| {
        if full {
            c.r.bitmap.set_all();
        }
        c.r.bitmap.weight()
    });
    let sides = engine::session::Sides {
        me_primary: mine.has(P_PRIMARY),
        peer_primary: peer.has(P_PRIMARY),
        my_weight: mine.bitmap_weight,
        peer_weight: peer.bitmap_weight,
    };
    let Some(sync) = engine::session::start(&the_plan, weight, sides, resolve) else {
        unreachable!("plans that do not go live returned above")
    };
    // 5. Go live.
    let (tx, writer) = Tx::start(wr, Throttle::new(cfg.replication_rate_limit_kib));
    let tl = TransferLog::new(cfg.transfer_log, vol.al_extent(), vol.size());
    let session = vol.with_core(|c| c.r.new_session(tl));
    let peer_h = Peer::new(tx, session.epoch);
    // The peer is Primary, the peer is Inconsistent.
    let live = (peer.has(P_PRIMARY), peer.has(P_INCONSISTENT));
    let bytes = weight * vol.with_core(|c| c.r.bitmap.granularity());
    let persist = vol.with_core(|c| {
        c.peer = Some(Arc::clone(&peer_h));
        if sync != Sync::None {
            c.resync = Some((Instant::now(), bytes, 0));
        }
        c.r.go_live(session, sync, live.0, live.1)
    });
    drop(gate);
    vol.stats.connects.fetch_add(1, Relaxed);
    if vol.persist(persist).await.is_err() {
        peer_h.tx.close();
        return Err("cannot write metadata".into());
    }
    if sync == Sync::Source {
        let id = random_u64().map_err(|e| format!("no randomness for a sync generation: {e}"))?;
        let g = vol.with_core(|c| c.r.start_sync_source(id));
        let _ = vol.persist_sb().await;
        peer_h.send(small_frame(Kind::SyncUuid, 0, 0, 0, &encode_gens(&g))).await;
        vol.event(format!("resync as source: {bytes} bytes to send to {}", cfg.peer));
    }
    vol.send_state().await;
    vol.notify();
    let mut s = Session {
        vol: Arc::clone(vol),
        peer: peer_h,
        barrier: Arc::new(RwLock::new(())),
        inflight_rs: Arc::new(AtomicU64::new(0)),
        serving_rs: Arc::new(AtomicU64::new(0)),
        serving_verify: Arc::new(AtomicU64::new(0)),
        resync: None,
        apply_room: Arc::new(Semaphore::new(APPLY_ROOM_KIB as usize)),
    };
    let end = s.run(&mut r, shutdown, writer).await;
    if let Some(h) = s.resync.take() {
        h.abort();
    }
    end
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
        return Err(format!("peer sent a range outside the volume ({offset}+{len})"));
    }
    Ok(())
}

fn u32_payload(kind: Kind, p: &[u8]) -> Res<u64> {
    let mut c = Cursor::new(kind, p);
    let v = c.u32().map_err(|e| e.to_string())?;
    Ok(u64::from(v))
}

impl Session {
    async fn run(
        &mut self,
        r: &mut FrameReader,
        shutdown: &mut watch::Receiver<bool>,
        mut writer: tokio::task::JoinHandle<()>,
    ) -> Res<String> {
        let cfg = self.vol.config().expect("replicated").clone();
        let mut tick = tokio::time::interval(liveness::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut live = Liveness::default();
        let mut last_ping = Instant::now();
        let mut ping_out: Option<Instant> = None;
        let mut changed = self.vol.watch();
        loop {
            tokio::select! {
                f = r.next() => {
                    let (h, p) = f?;
                    ping_out = None;
                    // Every frame already received is handled under one cork: their
                    // acknowledgements leave together. A batch that takes long (a slow disk)
                    // lets them out every BATCH_SPAN, so the peer sees progress.
                    let mut cork = self.peer.tx.cork();
                    let mut since = Instant::now();
                    if let Some(end) = self.handle(h, p).await? {
                        return Ok(end);
                    }
                    while let Some((h, p)) = r.buffered()? {
                        if since.elapsed() > BATCH_SPAN {
                            drop(cork);
                            cork = self.peer.tx.cork();
                            since = Instant::now();
                        }
                        if let Some(end) = self.handle(h, p).await? {
                            return Ok(end);
                        }
                    }
                    drop(cork);
                }
                _ = tick.tick() => {
                    // A peer that answers pings but not writes (a hung disk) must not stall the
                    // Primary: after `timeout` the link is dropped and the writes go on without it.
                    let (oldest, due) = self.vol.with_core(|c| {
                        let s = c.r.session.as_ref();
                        (s.and_then(|s| s.oldest()), c.r.flush_due(Instant::now()))
                    });
                    match live.tick(Instant::now(), ping_out, oldest, cfg.ping_timeout, cfg.timeout) {
                        Verdict::Alive => {}
                        Verdict::NoPong => {
                            return Err(format!("peer did not answer a ping within {:?}", cfg.ping_timeout));
                        }
                        Verdict::Unanswered => return Err(format!(
                            "peer left a request unanswered for more than {:?} (timeout_ms); dropping the link, its writes are marked out of sync",
                            cfg.timeout
                        )),
                    }
                    // The transfer log's bound: acknowledged writes do not wait longer (or pile up
                    // more) than configured for a flush that makes them durable on the peer.
                    if due {
                        self.vol.send_flush(&self.peer, true).await;
                    }
                    if ping_out.is_none() && last_ping.elapsed() >= cfg.ping_interval {
                        last_ping = Instant::now();
                        ping_out = Some(last_ping);
                        self.peer.send(small_frame(Kind::Ping, 0, 0, 0, &[])).await;
                    }
                }
                _ = changed.changed() => {
                    if self.vol.with_core(|c| c.r.st.conn == ConnState::Disconnecting) {
                        self.peer.send(small_frame(Kind::Disconnect, 0, 0, 0, &[])).await;
                        return Ok("disconnected on request (the operator, or the cluster manager after the heartbeat declared the peer dead)".into());
                    }
                }
                _ = stopped(shutdown) => {
                    self.peer.send(small_frame(Kind::Disconnect, 0, 0, 0, &[])).await;
                    return Ok("shutting down".into());
                }
                _ = &mut writer => return Err("connection lost (send failed)".into()),
            }
        }
    }

    /// Handles one frame; `Ok(Some(reason))` ends the session in order.
    async fn handle(&mut self, h: Header, p: BytesMut) -> Res<Option<String>> {
        let vol = Arc::clone(&self.vol);
        let digest = vol.config().expect("replicated").digest;
        match h.kind {
            // Answered in order, under the batch's cork: no task per ping.
            Kind::Ping => {
                self.peer.send(small_frame(Kind::PingAck, 0, 0, 0, &[])).await;
            }
            Kind::PingAck => {}
            Kind::Data | Kind::Zero => {
                if vol.role() == Role::Primary {
                    return Err("peer sent a replicated write to a Primary".into());
                }
                let (data, len) = if h.kind == Kind::Zero {
                    (None, u32_payload(Kind::Zero, &p)?)
                } else {
                    self.block_payload(&h, &p, digest)?
                };
                range_of(&vol, h.offset, len)?;
                let lock = vol.lock_range(h.offset, len).await;
                let bar = Arc::clone(&self.barrier).read_owned().await;
                if cfg_protocol(&vol) == super::completion::Protocol::B {
                    self.peer.send(small_frame(Kind::RecvAck, 0, h.id, 0, &[])).await;
                }
                vol.app_writes.fetch_add(1, Relaxed);
                if h.kind == Kind::Data {
                    vol.stats.received_data_bytes.fetch_add(len, Relaxed);
                }
                let peer = Arc::clone(&self.peer);
                let fua = h.flags & F_FUA != 0;
                match data {
                    // A page-cache copy: done here, before the next frame is read (no task, no
                    // thread hand-over); its acknowledgement leaves with the batch's others.
                    Some(d) if vol.store().writes_inline(d.len(), fua) => {
                        let r = vol.store().write_now(h.offset, d);
                        drop((lock, bar));
                        acknowledge(&vol, &peer, &h, len, r).await;
                    }
                    data => {
                        let kib = u32::try_from(len.div_ceil(1024))
                            .map_or(APPLY_ROOM_KIB, |k| k.min(APPLY_ROOM_KIB));
                        let room = Arc::clone(&self.apply_room)
                            .acquire_many_owned(kib)
                            .await
                            .map_err(|_| "apply room closed".to_string())?;
                        let data = data.map(IoBuf::from_slice);
                        tokio::spawn(async move {
                            let r = vol.apply_write(h.offset, data, len, h.flags).await;
                            drop((lock, bar, room));
                            acknowledge(&vol, &peer, &h, len, r).await;
                        });
                    }
                }
            }
            Kind::Flush => {
                let before = std::mem::replace(&mut self.barrier, Arc::new(RwLock::new(())));
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    // Every replicated write received before the flush is done once the old
                    // barrier is ours.
                    drop(before.write_owned().await);
                    // Answered only once the data and our metadata (bits of failed writes)
                    // are durable.
                    let r = match vol.store().flush().await {
                        Ok(()) => vol.persist_bitmap().await,
                        Err(e) => Err(e),
                    };
                    let errno = r.err().unwrap_or(0);
                    peer.send(small_frame(
                        Kind::FlushAck,
                        0,
                        h.id,
                        errno.unsigned_abs().into(),
                        &[],
                    ))
                    .await;
                });
            }
            Kind::RecvAck => {
                let w = vol.with_core(|c| {
                    let s = c.r.session.as_mut()?;
                    s.waiter_mut(h.id).and_then(|w| w.recv.take())
                });
                if let Some(tx) = w {
                    let _ = tx.send(());
                }
            }
            Kind::WriteAck | Kind::FlushAck => {
                let r = if h.offset == 0 {
                    Ok(())
                } else {
                    Err(i32::try_from(h.offset).unwrap_or(libc::EIO))
                };
                // Held in the transfer log until a flush covers it, or out of sync if it
                // failed; a flush forgets (or loses) the epochs it covers.
                let now = Instant::now();
                let p = vol
                    .with_core(|c| c.r.peer_acked(h.id, r.is_ok(), now))
                    .map_err(|e| e.to_string())?;
                if p.flush {
                    // Extents it unpinned may leave the activity log now.
                    vol.al_wake();
                }
                p.waiter.answer(r);
            }
            Kind::State => {
                let mut c = Cursor::new(Kind::State, &p);
                let (role, disk) =
                    (c.u8().map_err(|e| e.to_string())?, c.u8().map_err(|e| e.to_string())?);
                let Some(disk) = DiskState::from_code(disk) else {
                    return Err("peer sent an unknown disk state".into());
                };
                let role = if role == 1 { Role::Primary } else { Role::Secondary };
                vol.with_core(|c| c.r.peer_report(role, disk)).map_err(|r| r.to_string())?;
                vol.notify();
            }
            Kind::SyncUuid => {
                let g = decode_gens(&p).map_err(|e| e.to_string())?;
                if vol.with_core(|c| c.r.st.conn) != ConnState::SyncTarget {
                    return Err(
                        "peer sent a sync generation while we are not its resync target".into()
                    );
                }
                let p = vol.with_core(|c| c.r.sync_uuid(g)).map_err(|e| e.to_string())?;
                let _ = vol.persist(p).await;
                let v = Arc::clone(&vol);
                let peer = Arc::clone(&self.peer);
                let inflight = Arc::clone(&self.inflight_rs);
                self.resync = Some(tokio::spawn(resync_target(v, peer, inflight)));
            }
            Kind::RsRequest => {
                let len = u32_payload(Kind::RsRequest, &p)?;
                range_of(&vol, h.offset, len)?;
                if len > rs_chunk(vol.with_core(|c| c.r.bitmap.granularity())) {
                    return Err("peer asked for an oversized resync block".into());
                }
                if vol.with_core(|c| c.r.st.conn) == ConnState::SyncTarget {
                    return Err(
                        "peer asked us for resync data while we are its resync target".into()
                    );
                }
                let Some(slot) = Slot::take(&self.serving_rs, RS_SERVE_MAX) else {
                    return Err(format!(
                        "peer has more than {RS_SERVE_MAX} resync requests outstanding with us"
                    ));
                };
                let their = if p.len() == 4 + 32 { Some(p[4..].to_vec()) } else { None };
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    // The range lock is taken here, not in the reader: an application write
                    // holds its range while it waits for the peer's WriteAck, which only this
                    // reader can deliver; waiting for the lock inline would stall the link.
                    let _slot = slot;
                    let lock = vol.lock_range(h.offset, len).await;
                    let n = usize::try_from(len).expect("bounded");
                    let Ok(buf) = vol.read(h.offset, n).await else {
                        tracing::error!("resync read failed at {}", h.offset);
                        return;
                    };
                    let f = if their.as_deref() == Some(&wire::hash(&buf)[..]) {
                        vol.stats.resync_same_bytes.fetch_add(len, Relaxed);
                        small_frame(
                            Kind::RsSame,
                            0,
                            h.id,
                            h.offset,
                            &u32::try_from(len).expect("bounded").to_be_bytes(),
                        )
                    } else {
                        vol.stats.resync_sent_bytes.fetch_add(len, Relaxed);
                        block_frame(Kind::RsData, 0, h.id, h.offset, buf, digest)
                    };
                    let sent = peer.send(f).await;
                    drop(lock);
                    // Resync data needs no transfer log: the target clears its own bits on disk
                    // only once the data is flushed (its teardown and the end of the resync
                    // flush first), so after its power loss the union of the bitmaps covers it.
                    // The bits go only while the session is live: after a teardown nothing is
                    // cleared.
                    if sent {
                        vol.with_core(|c| {
                            if c.r.resync_served(peer.epoch, h.offset, len)
                                && let Some(r) = c.resync.as_mut()
                            {
                                r.2 += len;
                            }
                        });
                    }
                });
            }
            Kind::RsData | Kind::RsSame => {
                // Resync data only goes to a Secondary that asked for it: a resync target, or
                // a verify's repair (RsSame only answers a target's checksum request). On a
                // Primary it would bypass the I/O gate and the activity log.
                let (role, conn) = vol.with_core(|c| (c.r.st.role, c.r.st.conn));
                let taken = role == Role::Secondary
                    && match h.kind {
                        Kind::RsSame => conn == ConnState::SyncTarget,
                        _ => matches!(
                            conn,
                            ConnState::SyncTarget
                                | ConnState::Connected
                                | ConnState::VerifySource
                                | ConnState::VerifyTarget
                        ),
                    };
                if !taken {
                    return Err(format!(
                        "peer sent resync data ({:?}) to a {role:?} in state {conn:?}; only a Secondary that is a resync or repair target takes it",
                        h.kind
                    ));
                }
                let (data, len) = if h.kind == Kind::RsSame {
                    (None, u32_payload(Kind::RsSame, &p)?)
                } else {
                    let (d, len) = self.block_payload(&h, &p, digest)?;
                    (d.map(IoBuf::from_slice), len)
                };
                range_of(&vol, h.offset, len)?;
                let same = h.kind == Kind::RsSame;
                let lock = vol.lock_range(h.offset, len).await;
                let inflight = Arc::clone(&self.inflight_rs);
                tokio::spawn(async move {
                    let r = if same {
                        Ok(())
                    } else {
                        vol.apply_write(h.offset, data, len, h.flags & F_HOLE).await
                    };
                    drop(lock);
                    if r.is_ok() {
                        vol.with_core(|c| {
                            c.r.resync_applied(h.offset, len);
                            if let Some(r) = c.resync.as_mut() {
                                r.2 += len;
                            }
                        });
                        if same {
                            vol.stats.resync_same_bytes.fetch_add(len, Relaxed);
                        } else {
                            vol.stats.resync_received_bytes.fetch_add(len, Relaxed);
                        }
                    }
                    vol.resync_acked.fetch_add(len, Relaxed);
                    let _ = inflight.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
                    vol.resync_wake.notify_one();
                });
            }
            Kind::RsDone => {
                let p = vol
                    .with_core(|c| {
                        c.resync = None;
                        c.r.source_done()
                    })
                    .map_err(|r| r.to_string())?;
                let _ = vol.persist(p).await;
                vol.event("resync finished (source): the peer is UpToDate".into());
                vol.notify();
            }
            Kind::OutOfSync => {
                let mut c = Cursor::new(Kind::OutOfSync, &p);
                let len = c.u64().map_err(|e| e.to_string())?;
                range_of(&vol, h.offset, len)?;
                vol.with_core(|c| c.r.bitmap.set_range(h.offset, len));
            }
            Kind::VerifyRequest => {
                let len = u32_payload(Kind::VerifyRequest, &p)?;
                range_of(&vol, h.offset, len)?;
                if len > VERIFY_CHUNK {
                    return Err("peer asked to verify an oversized range".into());
                }
                let Some(slot) = Slot::take(&self.serving_verify, VERIFY_SERVE_MAX) else {
                    return Err(format!(
                        "peer has more than {VERIFY_SERVE_MAX} verify requests outstanding with us"
                    ));
                };
                vol.with_core(|c| c.r.st.step(Event::PeerVerifyStart))
                    .map_err(|r| r.to_string())?;
                let peer = Arc::clone(&self.peer);
                tokio::spawn(async move {
                    // Locked in the task, not the reader (see RsRequest).
                    let _slot = slot;
                    let lock = vol.lock_range(h.offset, len).await;
                    let g = vol.with_core(|c| c.r.bitmap.granularity());
                    let n = usize::try_from(len).expect("bounded");
                    let out = match vol.read(h.offset, n).await {
                        Ok(buf) => hashes(&buf, g),
                        Err(_) => Vec::new(),
                    };
                    drop(lock);
                    peer.send(small_frame(Kind::VerifyReply, 0, h.id, h.offset, &out)).await;
                });
            }
            Kind::VerifyReply => {
                let tx = self.peer.verify.lock().ok().and_then(|mut m| m.remove(&h.id));
                let Some(tx) = tx else {
                    return Err(format!("peer answered unknown verify request {}", h.id));
                };
                let _ = tx.send(p.to_vec());
            }
            Kind::VerifyDone => {
                vol.with_core(|c| c.r.st.step(Event::PeerVerifyEnd)).map_err(|r| r.to_string())?;
                vol.notify();
            }
            Kind::Refuse => return Err(format!("peer refused: {}", String::from_utf8_lossy(&p))),
            Kind::Disconnect => return Ok(Some("the peer disconnected".into())),
            Kind::Hello | Kind::Auth | Kind::Params | Kind::Bitmap => {
                return Err(format!("peer sent a handshake frame ({:?}) mid-session", h.kind));
            }
        }
        // A finished resync as target: all blocks in, nothing in flight.
        Ok(None)
    }

    /// The block a Data or RsData frame carries (`None`: a hole), checked against its digest.
    fn block_payload<'p>(
        &self,
        h: &Header,
        p: &'p [u8],
        digest: wire::Digest,
    ) -> Res<(Option<&'p [u8]>, u64)> {
        if h.flags & F_HOLE != 0 {
            return Ok((None, u32_payload(h.kind, p)?));
        }
        match digest.check(h.offset, p) {
            Ok(data) => Ok((Some(data), data.len() as u64)),
            Err(e) => {
                // Corrupted in flight: the block is out of sync (if the range is one of ours at
                // all); drop the link (resync follows).
                let len = p.len().saturating_sub(digest.size()) as u64;
                if range_of(&self.vol, h.offset, len).is_ok() {
                    self.vol.with_core(|c| c.r.bitmap.set_range(h.offset, len));
                }
                Err(e.to_string())
            }
        }
    }
}

/// After applying a replicated write: a failed block is out of sync here; the Primary learns
/// the outcome.
async fn acknowledge(vol: &Volume, peer: &Peer, h: &Header, len: u64, r: Result<(), i32>) {
    if let Err(e) = r {
        // Found by the simulation: a Secondary that stayed UpToDate and Connected after a
        // failed write was a failover target without that block. It is Inconsistent now (on
        // disk), and the session ends so the reconnect resyncs it.
        let p = vol.with_core(|c| c.r.local_write_failed(h.offset, len));
        let _ = vol.persist(p).await;
        vol.event(format!(
            "a replicated write failed on this disk at {} (errno {e}): Inconsistent until resynced",
            h.offset
        ));
        vol.notify();
    }
    let errno = r.err().unwrap_or(0);
    peer.send(small_frame(Kind::WriteAck, 0, h.id, errno.unsigned_abs().into(), &[])).await;
}

fn cfg_protocol(vol: &Volume) -> super::completion::Protocol {
    vol.config().map_or(super::completion::Protocol::C, |c| c.protocol)
}

fn hashes(buf: &[u8], g: u64) -> Vec<u8> {
    let g = usize::try_from(g).expect("granularity fits");
    buf.chunks(g).flat_map(wire::hash).collect()
}

/// The resync as target: request out-of-sync blocks at the controller's rate until none are left.
async fn resync_target(vol: Arc<Volume>, peer: Arc<Peer>, inflight: Arc<AtomicU64>) {
    let cfg = vol.config().expect("replicated").clone();
    let mut ctl = RateController::new(cfg.resync);
    let g = vol.with_core(|c| c.r.bitmap.granularity());
    let mut cursor = 0u64;
    let mut tick = tokio::time::interval(TICK);
    let mut budget = 0u64;
    loop {
        // Each tick grants a budget; completions wake us to spend what is left of it, so the
        // in-flight window refills at once instead of once per tick.
        tokio::select! {
            _ = tick.tick() => {
                if vol.with_core(|c| c.r.st.conn) != ConnState::SyncTarget {
                    return;
                }
                // Up to one request's worth carries over (so a budget just short of a whole
                // request is not lost every tick); the rest was granted, not asked for, and is
                // not in flight.
                let carry = budget.min(rs_chunk(g) / 1024);
                ctl.unused(budget - carry);
                let acked = vol.resync_acked.swap(0, Relaxed) / 1024;
                let busy = vol.app_writes.swap(0, Relaxed) > 0;
                budget = carry + ctl.tick(Instant::now(), acked, busy);
            }
            _ = vol.resync_wake.notified() => {}
        }
        loop {
            if inflight.load(Relaxed) >= RS_MAX_INFLIGHT {
                break;
            }
            let next = vol.with_core(|c| {
                c.r.bitmap.next_set(cursor).map(|s| (s, c.r.bitmap.run_end(s, rs_chunk(g) / g)))
            });
            let Some((s, e)) = next else { break };
            let (off, len) = (s * g, ((e - s) * g).min(vol.size() - s * g));
            let kib = len.div_ceil(1024);
            if kib > budget {
                break;
            }
            budget -= kib;
            cursor = e;
            let mut payload = BytesMut::new();
            payload.put_u32(u32::try_from(len).expect("bounded"));
            if cfg.checksum_resync
                && let Ok(buf) = vol.read(off, usize::try_from(len).expect("bounded")).await
            {
                payload.put_slice(&wire::hash(&buf));
            }
            inflight.fetch_add(1, Relaxed);
            if !peer.send(small_frame(Kind::RsRequest, 0, 0, off, &payload)).await {
                return;
            }
        }
        let done = vol.with_core(|c| c.r.bitmap.next_set(cursor).is_none());
        if done && inflight.load(Relaxed) == 0 {
            if vol.with_core(|c| c.r.bitmap.weight()) > 0 {
                cursor = 0; // blocks marked again meanwhile (failed writes): another pass
                continue;
            }
            finish_target(&vol, &peer).await;
            return;
        }
    }
}

async fn finish_target(vol: &Arc<Volume>, peer: &Arc<Peer>) {
    // The resynced blocks are durable before this node calls itself UpToDate on disk and the
    // source forgets them.
    if let Err(e) = vol.store().flush().await {
        tracing::error!(errno = e, "flush at the end of the resync failed; dropping the link");
        peer.tx.close();
        return;
    }
    let p = vol.with_core(|c| {
        c.resync = None;
        c.r.target_done()
    });
    // (Refused only when the connection changed meanwhile: the teardown takes over.)
    let Ok(p) = p else { return };
    let _ = vol.persist(p).await;
    peer.send(small_frame(Kind::RsDone, 0, 0, 0, &[])).await;
    vol.event("resync finished (target): this node is UpToDate".into());
    vol.send_state().await;
    vol.notify();
}

/// `duet verify [--repair]`: compares every block's hash with the peer's. Runs in the
/// background; progress and findings show in `duet status`.
pub fn verify(vol: &Arc<Volume>, repair: bool) -> Result<String, super::volume::Refused> {
    let peer = vol.with_core(|c| {
        c.r.st.step(Event::VerifyStart)?;
        c.verify = Some((Instant::now(), vol.size(), 0));
        c.verify_found.clear();
        Ok::<_, engine::state::Refusal>(c.peer.clone())
    })?;
    let Some(peer) = peer else { return Err(super::volume::Refused("not connected".into())) };
    vol.event(format!("online verify started{}", if repair { " (with repair)" } else { "" }));
    vol.notify();
    let v = Arc::clone(vol);
    tokio::spawn(async move { run_verify(v, peer, repair).await });
    Ok("verify started; watch `duet status`".into())
}

async fn run_verify(vol: Arc<Volume>, peer: Arc<Peer>, repair: bool) {
    let g = vol.with_core(|c| c.r.bitmap.granularity());
    let digest = vol.config().expect("replicated").digest;
    let mut off = 0u64;
    let mut found: Vec<(u64, u64)> = Vec::new();
    let size = vol.size();
    while off < size {
        if vol.with_core(|c| c.r.st.conn) != ConnState::VerifySource {
            vol.event("verify stopped: the connection changed".into());
            return;
        }
        let len = VERIFY_CHUNK.min(size - off);
        let n = usize::try_from(len).expect("bounded");
        let (tx, rx) = oneshot::channel();
        let id = peer.next_verify.fetch_add(1, Relaxed);
        if let Ok(mut m) = peer.verify.lock() {
            m.insert(id, tx);
        }
        let lock = vol.lock_range(off, len).await;
        let local = vol.read(off, n).await;
        let sent = peer
            .send(small_frame(
                Kind::VerifyRequest,
                0,
                id,
                off,
                &u32::try_from(len).expect("bounded").to_be_bytes(),
            ))
            .await;
        drop(lock);
        let (Ok(local), true) = (local, sent) else { break };
        let Ok(theirs) = rx.await else { break };
        let mine = hashes(&local, g);
        if theirs.len() != mine.len() {
            tracing::error!("verify reply of the wrong length at {off}");
            break;
        }
        for (i, (a, b)) in mine.chunks(32).zip(theirs.chunks(32)).enumerate() {
            if a != b {
                let bo = off + i as u64 * g;
                let bl = g.min(size - bo);
                match found.last_mut() {
                    Some((o, l)) if *o + *l == bo => *l += bl,
                    _ => found.push((bo, bl)),
                }
                vol.stats.verify_mismatch_bytes.fetch_add(bl, Relaxed);
                vol.with_core(|c| c.r.bitmap.set_range(bo, bl));
                let mut p = BytesMut::new();
                p.put_u64(bl);
                peer.send(small_frame(Kind::OutOfSync, 0, 0, bo, &p)).await;
            }
        }
        off += len;
        vol.with_core(|c| {
            if let Some(v) = c.verify.as_mut() {
                v.2 = off;
            }
            c.verify_found = found.clone();
        });
    }
    peer.send(small_frame(Kind::VerifyDone, 0, 0, 0, &[])).await;
    let total: u64 = found.iter().map(|r| r.1).sum();
    vol.event(format!("online verify finished: {} out-of-sync ranges, {total} bytes", found.len()));
    if repair && !found.is_empty() {
        // The Primary's data wins; with no Primary, the node that ran verify.
        let peer_primary = vol.with_core(|c| c.r.st.peer_role == Some(Role::Primary));
        let chunk = rs_chunk(g);
        let pieces = found.iter().flat_map(|&(o, l)| {
            (0..l.div_ceil(chunk)).map(move |i| (o + i * chunk, chunk.min(l - i * chunk)))
        });
        for (o, l) in pieces {
            if peer_primary {
                let mut p = BytesMut::new();
                p.put_u32(u32::try_from(l).expect("one chunk"));
                peer.send(small_frame(Kind::RsRequest, 0, 0, o, &p)).await;
            } else {
                let lock = vol.lock_range(o, l).await;
                if let Ok(buf) = vol.read(o, usize::try_from(l).expect("bounded")).await {
                    peer.send(block_frame(Kind::RsData, 0, 0, o, buf, digest)).await;
                    vol.stats.resync_sent_bytes.fetch_add(l, Relaxed);
                    vol.with_core(|c| c.r.bitmap.clear_range(o, l));
                }
                drop(lock);
            }
        }
        vol.event(format!(
            "verify repair: {total} bytes resynced ({})",
            if peer_primary { "from the Primary peer" } else { "from this node" }
        ));
    }
    vol.with_core(|c| {
        let _ = c.r.st.step(Event::VerifyEnd);
        c.verify = None;
    });
    vol.notify();
}
