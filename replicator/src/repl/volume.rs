//! The replicated volume: what the NBD server writes to. It owns the local store, the metadata,
//! the bitmap and activity log, the role and disk state, and (through [`Peer`]) the live peer
//! connection. The decisions are the pure modules' (completion rules, activity log, policies);
//! this file executes them and keeps the order that makes them safe:
//!
//! - an activity-log transaction is durable before a write to a cold extent starts;
//! - a write is sent to the peer while its range is locked, so both nodes apply overlapping
//!   writes in one order;
//! - when the peer is absent or lost, the range is marked out of sync and a new current
//!   generation is durable before the write is acknowledged.
//!
//! A volume without a peer (a single-node configuration) has no metadata and is always Primary.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What a replicated write waits for: receipt (protocol B) and the peer's write.
type Acks = Option<Answers>;

use bytes::BytesMut;
use tokio::sync::{oneshot, watch};

use super::actlog::{ActivityLog, Begin};
use super::bitmap::Bitmap;
use super::completion::{Completion, Protocol};
use super::handshake::{
    P_CRASHED_PRIMARY, P_DISCARD_MY_DATA, P_INCONSISTENT, P_OUTDATED, P_PRIMARY, Params,
};
use super::locks::{RangeGuard, RangeLocks};
use super::meta::{Loaded, Meta, MetaError};
use super::tx::{Cork, Tx};
use super::wire::{self, Digest, F_FUA, F_HOLE, F_MAY_TRIM, Kind};
use crate::store::Extent;
use crate::store::{IoBuf, Store};
use crate::superblock::{FLAG_CONSISTENT, Superblock};
use engine::replica::{Persist, Promotion, Replica};

use engine::state::Event as Ev;
pub use engine::state::{ConnState, DiskState, Role};

/// Static settings of a replicated volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub resource: String,
    pub node: String,
    pub peer: String,
    pub cluster: String,
    pub protocol: Protocol,
    pub digest: Digest,
    pub fingerprint: u64,
    pub policies: super::policy::Policies,
    pub resync: crate::ratectl::Settings,
    pub checksum_resync: bool,
    /// Cap on everything sent to the peer, KiB/s (0: none).
    pub replication_rate_limit_kib: u64,
    pub secret: Vec<u8>,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub timeout: Duration,
    pub connect_retry: Duration,
    /// When the Primary asks the peer for a flush (see [`super::translog`]).
    pub transfer_log: super::translog::Bound,
    pub listen: std::net::SocketAddr,
    pub peer_addr: std::net::SocketAddr,
}

/// Counters (status and metrics).
#[derive(Debug, Default)]
pub struct ReplStats {
    pub sent_data_bytes: AtomicU64,
    pub received_data_bytes: AtomicU64,
    pub resync_sent_bytes: AtomicU64,
    pub resync_received_bytes: AtomicU64,
    pub resync_same_bytes: AtomicU64,
    pub al_transactions: AtomicU64,
    pub peer_errors: AtomicU64,
    pub connects: AtomicU64,
    pub verify_mismatch_bytes: AtomicU64,
}

/// Progress of a resync or verify.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Bytes to do at the start.
    pub total_bytes: u64,
    /// Bytes done.
    pub done_bytes: u64,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Bytes per second over the run so far.
    pub rate_bytes_per_s: u64,
    /// Seconds left at that rate (None when unknown).
    pub eta_s: Option<u64>,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub what: String,
}

/// State under the volume's mutex.
#[derive(Debug)]
pub(crate) struct Core {
    /// Every replication decision: the engine's pure core (see [`Replica`]).
    pub r: Replica<Waiter>,
    /// The live connection's sending side (its session state is `r.session`).
    pub peer: Option<Arc<Peer>>,
    /// Resync progress for `duet status`: start, bytes to move, bytes moved.
    pub resync: Option<(Instant, u64, u64)>,
    pub verify: Option<(Instant, u64, u64)>,
    pub verify_found: Vec<(u64, u64)>,
    pub events: VecDeque<Event>,
}

/// The volume.
#[derive(Debug)]
pub struct Volume {
    pub(crate) cfg: Option<VolumeConfig>,
    pub(crate) store: Arc<Store>,
    pub(crate) meta: Option<Meta>,
    size: u64,
    pub(crate) core: Mutex<Core>,
    al: Mutex<ActivityLog>,
    /// Woken when a write leaves the activity log (a busy log may have room now).
    al_freed: tokio::sync::Notify,
    /// Serialises activity-log transactions and superblock writes.
    meta_io: tokio::sync::Mutex<()>,
    pub(crate) locks: Arc<RangeLocks>,
    /// Application writes hold this shared until they have marked what the peer missed; the
    /// link takes it exclusively from the bitmap exchange until the session is live, so no
    /// write can fall between the bitmap it sent and the replication it starts.
    pub(crate) io_gate: Arc<tokio::sync::RwLock<()>>,
    pub stats: ReplStats,
    /// Bumped on every role / connection change (the daemon opens and closes NBD on it).
    changed: watch::Sender<u64>,
    /// Bytes resync-acknowledged since the controller last asked.
    pub(crate) resync_acked: AtomicU64,
    /// Application writes since the resync controller last asked.
    pub(crate) app_writes: AtomicU64,
    /// Wakes the resync requester when a block arrived (room in the window).
    pub(crate) resync_wake: tokio::sync::Notify,
    /// I/O frozen (fencing in progress): writes that reached only this node wait before their
    /// reply.
    frozen: watch::Sender<bool>,
}

/// Largest range one Zero frame carries.
const ZERO_PIECE: u64 = 1 << 30;

/// Why a role or connection command was refused. The message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl From<engine::state::Refusal> for Refused {
    fn from(r: engine::state::Refusal) -> Self {
        Self(r.to_string())
    }
}

fn refuse<T>(s: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(s.into()))
}

/// Fresh randomness for generations and challenges, from the kernel (getrandom(2): no file
/// descriptor, so a full descriptor table cannot make it fail). An error is the caller's to
/// report; nothing is made up instead.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)?;
    Ok(b)
}

/// A random generation identifier.
pub fn random_u64() -> Result<u64, getrandom::Error> {
    random_bytes::<8>().map(u64::from_le_bytes)
}

pub use super::tx::Frame;

/// What waits for the peer's answer to a request (held in the engine's pending table; a
/// waiter dropped unanswered tells its request that the peer is lost).
#[derive(Debug)]
pub(crate) struct Waiter {
    /// The receipt (protocol B).
    pub recv: Option<oneshot::Sender<()>>,
    pub done: Option<oneshot::Sender<Result<(), i32>>>,
}

/// The receiving ends of a [`Waiter`].
type Answers = (Option<oneshot::Receiver<()>>, oneshot::Receiver<Result<(), i32>>);

impl Waiter {
    fn new(receipt: bool) -> (Self, Answers) {
        let (rtx, rrx) = if receipt {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let (dtx, drx) = oneshot::channel();
        (Self { recv: rtx, done: Some(dtx) }, (rrx, drx))
    }

    /// Delivers the peer's answer.
    pub(crate) fn answer(mut self, r: Result<(), i32>) {
        if let Some(tx) = self.recv.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.done.take() {
            let _ = tx.send(r);
        }
    }
}

/// The live connection's sending side, as the write path sees it.
#[derive(Debug)]
pub struct Peer {
    pub(crate) tx: Arc<Tx>,
    /// The engine session this connection carries (see `PeerSession::epoch`).
    pub(crate) epoch: u64,
    /// Verify requests waiting for the peer's hashes, by id (from `next_verify`).
    pub(crate) verify: Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>,
    pub(crate) next_verify: AtomicU64,
}

impl Peer {
    pub(crate) fn new(tx: Arc<Tx>, epoch: u64) -> Arc<Self> {
        Arc::new(Self {
            tx,
            epoch,
            verify: Mutex::new(HashMap::new()),
            next_verify: AtomicU64::new(1),
        })
    }

    /// Queues a frame; `false` when the connection is gone.
    pub(crate) async fn send(&self, f: Frame) -> bool {
        self.tx.send(f).await
    }
}

/// Builds a block frame (Data or RsData): zero blocks become holes, the digest goes first.
pub(crate) fn block_frame(
    kind: Kind,
    flags: u16,
    id: u64,
    offset: u64,
    buf: impl Into<Arc<IoBuf>>,
    digest: Digest,
) -> Frame {
    let buf = buf.into();
    let mut head = BytesMut::with_capacity(wire::HEADER_LEN + 36);
    if wire::is_zero(&buf) {
        let len = u32::try_from(buf.len()).expect("blocks are bounded");
        wire::encode(&mut head, kind, flags | F_HOLE, id, offset, &len.to_be_bytes());
        return Frame { head, data: None };
    }
    let dl = digest.size();
    let len = u32::try_from(dl + buf.len()).expect("blocks are bounded");
    wire::encode_header(&mut head, kind, flags, id, offset, len);
    digest.put(&mut head, &buf);
    Frame { head, data: Some(buf) }
}

/// Builds a frame with a small payload.
pub(crate) fn small_frame(kind: Kind, flags: u16, id: u64, offset: u64, payload: &[u8]) -> Frame {
    let mut head = BytesMut::with_capacity(wire::HEADER_LEN + payload.len());
    wire::encode(&mut head, kind, flags, id, offset, payload);
    Frame { head, data: None }
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// A plug on the local store and a cork on the peer link (see [`Volume::plug`]). The cork is
/// dropped first, so the frames leave before the local submissions.
#[derive(Debug)]
pub struct VolumePlug<'a> {
    _cork: Option<Cork>,
    _store: crate::store::PlugGuard<'a>,
}

/// Ends an activity-log reference when the write is done.
struct AlRef<'a> {
    v: &'a Volume,
    offset: u64,
    len: u64,
}

impl Drop for AlRef<'_> {
    fn drop(&mut self) {
        if let Ok(mut al) = self.v.al.lock() {
            al.end(self.offset, self.len);
        }
        if self.len > 0 {
            self.v.al_freed.notify_waiters();
        }
    }
}

impl Volume {
    /// A single-node volume: no metadata, always Primary and UpToDate.
    pub fn standalone(store: Arc<Store>) -> Arc<Self> {
        let size = store.size();
        let sb = Superblock {
            sequence: 0,
            volume_size: size,
            node_id: 0,
            flags: FLAG_CONSISTENT,
            bitmap_granularity: 4096,
            al_extent_size: 4 << 20,
            al_extents: 1,
            uuids: crate::generation::Generations::just_created(),
        };
        let r = Replica::standalone(sb, Bitmap::new(1, 4096));
        Self::build(None, store, None, size, r, ActivityLog::new(4 << 20, 1))
    }

    fn build(
        cfg: Option<VolumeConfig>,
        store: Arc<Store>,
        meta: Option<Meta>,
        size: u64,
        r: Replica<Waiter>,
        al: ActivityLog,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            store,
            meta,
            size,
            core: Mutex::new(Core {
                r,
                peer: None,
                resync: None,
                verify: None,
                verify_found: Vec::new(),
                events: VecDeque::new(),
            }),
            al: Mutex::new(al),
            al_freed: tokio::sync::Notify::new(),
            meta_io: tokio::sync::Mutex::new(()),
            locks: Arc::new(RangeLocks::default()),
            io_gate: Arc::new(tokio::sync::RwLock::new(())),
            stats: ReplStats::default(),
            changed: watch::channel(0).0,
            resync_acked: AtomicU64::new(0),
            app_writes: AtomicU64::new(0),
            resync_wake: tokio::sync::Notify::new(),
            frozen: watch::channel(false).0,
        })
    }

    /// A replicated volume from opened metadata. Starts Secondary. After a crash while Primary,
    /// the hot activity-log extents are marked out of sync (they may differ from the peer).
    pub fn replicated(
        cfg: VolumeConfig,
        store: Arc<Store>,
        meta: Meta,
        loaded: Loaded,
    ) -> Result<Arc<Self>, MetaError> {
        // Whatever survived a crash of the daemon in the page cache is made durable first (found
        // by the simulation: a later power loss lost writes the generations called in sync).
        store.sync_now().map_err(|e| MetaError::Io {
            path: store.path().to_path_buf(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        let Loaded { sb, bitmap, al_hot, al_seq } = loaded;
        let mut al = ActivityLog::new(u64::from(sb.al_extent_size), sb.al_extents as usize);
        al.set_seq(al_seq);
        let size = meta.layout.data_size;
        let hot: Vec<(u64, u64)> = al_hot
            .iter()
            .map(|&e| {
                let (o, l) = al.extent_range(e);
                (o, l.min(size.saturating_sub(o)))
            })
            .collect();
        let (mut r, persist) = Replica::attach(sb, bitmap, &hot);
        if persist.bitmap {
            let bm = &mut r.bitmap;
            let pages: Vec<_> = bm.take_dirty().into_iter().map(|i| (i, bm.page(i))).collect();
            meta.write_bitmap(&pages)?;
            tracing::warn!(resource = %cfg.resource, extents = al_hot.len(), "this node crashed while Primary: its hot activity-log extents are marked out of sync");
        }
        let v = Self::build(Some(cfg), store, Some(meta), size, r, al);
        if persist.bitmap {
            v.event(format!(
                "attached after a crash as Primary: {} hot extents marked out of sync",
                al_hot.len()
            ));
        }
        Ok(v)
    }

    /// Replicated size (what clients see).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The local store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
    /// Settings (None for a single-node volume).
    pub fn config(&self) -> Option<&VolumeConfig> {
        self.cfg.as_ref()
    }
    /// Subscribe to role and connection changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
    pub(crate) fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.core.lock().expect("volume state poisoned").r.st.role
    }
    fn protocol(&self) -> Protocol {
        self.cfg.as_ref().map_or(Protocol::C, |c| c.protocol)
    }

    /// The whole event ring (the last 200), oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.core.lock().expect("volume state poisoned").events.iter().cloned().collect()
    }

    /// Appends to the event log (and logs it).
    pub fn event(&self, what: String) {
        let name = self.cfg.as_ref().map_or("", |c| c.resource.as_str());
        tracing::info!(resource = %name, "{what}");
        if let Ok(mut c) = self.core.lock() {
            c.events.push_back(Event { at: now_s(), what });
            while c.events.len() > 200 {
                c.events.pop_front();
            }
        }
    }

    // ------------------------------------------------------------------ metadata

    /// Writes the superblock from the in-memory state (flags follow role and disk state).
    pub(crate) async fn persist_sb(&self) -> Result<(), i32> {
        let Some(meta) = &self.meta else { return Ok(()) };
        let _g = self.meta_io.lock().await;
        let sb = self.core.lock().expect("volume state poisoned").r.next_superblock();
        write_meta(move || meta.write_sb(&sb)).await
    }

    /// Carries out what a transition asks to make durable, in its order (see [`Persist`]).
    pub(crate) async fn persist(&self, p: Persist) -> Result<(), i32> {
        if p.data {
            self.store.flush().await?;
        }
        if p.bitmap {
            self.persist_bitmap().await?;
        }
        if p.superblock {
            self.persist_sb().await?;
        }
        Ok(())
    }

    /// Writes the dirty bitmap pages.
    pub(crate) async fn persist_bitmap(&self) -> Result<(), i32> {
        let Some(meta) = &self.meta else { return Ok(()) };
        let _g = self.meta_io.lock().await;
        let pages: Vec<_> = {
            let mut c = self.core.lock().expect("volume state poisoned");
            let bm = &mut c.r.bitmap;
            bm.take_dirty().into_iter().map(|i| (i, bm.page(i))).collect()
        };
        write_meta(move || meta.write_bitmap(&pages)).await
    }

    /// Makes `[offset, offset+len)` hot in the activity log (durably) and takes a reference.
    async fn al_begin(&self, offset: u64, len: u64) -> Result<AlRef<'_>, i32> {
        if self.meta.is_none() {
            return Ok(AlRef { v: self, offset, len: 0 });
        }
        loop {
            // Registered before the check: a write that ends in between still wakes us.
            let freed = self.al_freed.notified();
            let b = self.al_try(offset, len);
            match b {
                Begin::Hot => return Ok(AlRef { v: self, offset, len }),
                // Every slot holds writes in flight, or writes the peer has not flushed yet;
                // requests are split to fit (see `ActivityLog::pieces`), so some of those end
                // and free one, and the peer is asked to flush now.
                Begin::Busy => {
                    self.with_core(|c| c.r.hurry());
                    freed.await;
                }
                Begin::Need { .. } => {
                    let _g = self.meta_io.lock().await;
                    // Recheck under the transaction lock: another write may have done it.
                    let b = self.al_try(offset, len);
                    let Begin::Need { add, evict } = b else {
                        if b == Begin::Hot {
                            return Ok(AlRef { v: self, offset, len });
                        }
                        continue;
                    };
                    let meta = self.meta.as_ref().expect("checked above");
                    // Data and bits of evicted extents must be on disk before the extent leaves
                    // the log: after a crash only the log's extents are assumed to differ (found
                    // by the simulation: a power loss lost unflushed writes of an evicted extent
                    // that the peer had, and nothing marked them).
                    if !evict.is_empty() {
                        self.store.flush().await?;
                    }
                    let pages: Vec<_> = if evict.is_empty() {
                        Vec::new()
                    } else {
                        let mut c = self.core.lock().expect("volume state poisoned");
                        let bm = &mut c.r.bitmap;
                        bm.take_dirty().into_iter().map(|i| (i, bm.page(i))).collect()
                    };
                    let (seq, rec) = {
                        let al = self.al.lock().expect("activity log poisoned");
                        (al.seq() + 1, al.record(&add, &evict))
                    };
                    write_meta(move || {
                        meta.write_bitmap(&pages)?;
                        meta.write_al(seq, &rec)
                    })
                    .await?;
                    self.stats.al_transactions.fetch_add(1, Relaxed);
                    self.al
                        .lock()
                        .expect("activity log poisoned")
                        .commit(offset, len, &add, &evict);
                    return Ok(AlRef { v: self, offset, len });
                }
            }
        }
    }

    /// The activity log's answer for `[offset, offset+len)`, never evicting an extent the
    /// peer's transfer log pins (see `ActivityLog::begin_unless`).
    fn al_try(&self, offset: u64, len: u64) -> Begin {
        // Almost always the extents are hot, or free slots take them: no eviction, no pins to
        // consult (and no state lock on the write path).
        let b = self.al.lock().expect("activity log poisoned").begin(offset, len);
        if matches!(&b, Begin::Hot) || matches!(&b, Begin::Need { evict, .. } if evict.is_empty()) {
            return b;
        }
        // Lock order: the state, then the activity log.
        let c = self.core.lock().expect("volume state poisoned");
        self.al.lock().expect("activity log poisoned").begin_unless(offset, len, |e| c.r.pinned(e))
    }

    /// Wakes writes waiting for room in the activity log (a peer flush unpinned extents, or
    /// the session ended).
    pub(crate) fn al_wake(&self) {
        self.al_freed.notify_waiters();
    }

    /// Bytes of an activity-log extent.
    pub(crate) fn al_extent(&self) -> u64 {
        u64::from(self.core.lock().expect("volume state poisoned").r.sb.al_extent_size)
    }

    /// Before acknowledging a write the peer does not have: a new current generation, durable.
    async fn ensure_new_generation(&self) -> Result<(), i32> {
        let Some(meta) = &self.meta else { return Ok(()) };
        let _g = self.meta_io.lock().await;
        let fresh = random_u64().map_err(|e| {
            tracing::error!(error = %e, "no randomness for a new generation identifier");
            libc::EIO
        })?;
        let Some(sb) = self.with_core(|c| c.r.new_generation(fresh)) else { return Ok(()) };
        write_meta(move || meta.write_sb(&sb)).await?;
        self.event(format!(
            "new current generation {:#018x} (writing without the peer)",
            sb.uuids.current
        ));
        Ok(())
    }

    fn mark_out_of_sync(&self, offset: u64, len: u64) {
        if self.meta.is_some() {
            self.core.lock().expect("volume state poisoned").r.written_alone(offset, len);
        }
    }

    /// Holds back local submissions and frames to the peer until the guard drops, so a batch
    /// of requests costs one system call each way.
    pub fn plug(&self) -> VolumePlug<'_> {
        let cork = self.peer().map(|p| p.tx.cork());
        VolumePlug { _store: self.store.plug(), _cork: cork }
    }

    /// The connection writes go to, if any.
    fn peer(&self) -> Option<Arc<Peer>> {
        let c = self.core.lock().expect("volume state poisoned");
        match c.r.st.conn {
            ConnState::Connected
            | ConnState::SyncSource
            | ConnState::SyncTarget
            | ConnState::VerifySource
            | ConnState::VerifyTarget => c.peer.clone(),
            ConnState::StandAlone | ConnState::Connecting | ConnState::Disconnecting => None,
        }
    }

    fn writable(&self) -> Result<(), i32> {
        let c = self.core.lock().expect("volume state poisoned");
        if c.r.st.role != Role::Primary {
            return Err(libc::EROFS);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ the NBD-facing I/O

    /// Reads locally.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, i32> {
        self.store.read(offset, len).await
    }

    /// The pieces a request is replicated in: one, unless it spans more activity-log extents
    /// than fit at once (see [`ActivityLog::pieces`]).
    /// `None` for the common single piece (no allocation on the write path).
    fn pieces(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        self.meta.as_ref()?; // a single node has no activity log
        let al = self.al.lock().expect("activity log poisoned");
        (!al.fits(offset, len)).then(|| al.pieces(offset, len))
    }

    /// A replicated write, answered under the protocol's completion rule (once every piece is).
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<(), i32> {
        let Some(pieces) = self.pieces(offset, buf.len() as u64) else {
            return self.write_piece(offset, buf, fua).await;
        };
        for (o, l) in pieces {
            let at = usize::try_from(o - offset).expect("within the buffer");
            let n = usize::try_from(l).expect("within the buffer");
            self.write_piece(o, IoBuf::from_slice(&buf[at..at + n]), fua).await?;
        }
        Ok(())
    }

    async fn write_piece(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<(), i32> {
        self.writable()?;
        let gate = Arc::clone(&self.io_gate).read_owned().await;
        let len = buf.len() as u64;
        let _al = self.al_begin(offset, len).await?;
        let _range = self.locks.lock(offset, len).await;
        self.app_writes.fetch_add(1, Relaxed);
        let peer = self.peer();
        let mut comp = Completion::new(self.protocol(), fua, peer.is_some());
        let digest = self.cfg.as_ref().map_or(Digest::Off, |c| c.digest);
        let flags = if fua { F_FUA } else { 0 };
        // One buffer for both: the peer's frame and the local write share it.
        let buf = Arc::new(buf);
        let acks = self
            .send_to_peer(peer.as_ref(), &mut comp, offset, len, |id| {
                block_frame(Kind::Data, flags, id, offset, Arc::clone(&buf), digest)
            })
            .await;
        if let Some(p) = &peer
            && acks.is_some()
        {
            self.stats.sent_data_bytes.fetch_add(len, Relaxed);
            // In a batch (see `plug`) the frames leave together first; the local copies
            // follow while the peer makes its own.
            p.tx.uncorked().await;
        }
        comp.local_done(self.store.write(offset, buf, fua).await);
        self.complete(comp, acks, offset, len, Some(gate)).await
    }

    /// Registers a request with the peer (if connected) and queues its frame, built with the
    /// request id; records "queued" or "lost" in `comp`. The acknowledgements to wait for come
    /// back (a receipt too under protocol B).
    async fn send_to_peer(
        &self,
        peer: Option<&Arc<Peer>>,
        comp: &mut Completion,
        offset: u64,
        len: u64,
        frame: impl FnOnce(u64) -> Frame,
    ) -> Acks {
        let p = peer?;
        let Some((id, answers)) = self.register(p, offset, len) else {
            comp.peer_lost();
            return None;
        };
        let sent = p.send(frame(id)).await;
        settle(comp, sent.then_some(answers))
    }

    /// Registers a request with the peer's session; `None` when that session has ended.
    fn register(&self, p: &Peer, offset: u64, len: u64) -> Option<(u64, Answers)> {
        let (w, answers) = Waiter::new(self.protocol() == Protocol::B);
        let now = Instant::now();
        let id = self.with_core(|c| c.r.register(p.epoch, offset, len, now, w)).ok()?;
        Some((id, answers))
    }

    /// Registers a flush with the peer's session and queues it (the open transfer-log epoch
    /// closes first). `ours`: the transfer log asked for it (nobody waits for the answer).
    /// `None` when the session has ended or the frame could not be queued.
    pub(crate) async fn send_flush(&self, p: &Peer, ours: bool) -> Option<Answers> {
        let (w, answers) = Waiter::new(false);
        let now = Instant::now();
        let id = self.with_core(|c| c.r.register_flush(p.epoch, ours, now, w)).ok()?;
        p.send(small_frame(Kind::Flush, 0, id, 0, &[])).await.then_some(answers)
    }

    async fn complete(
        &self,
        mut comp: Completion,
        acks: Acks,
        offset: u64,
        len: u64,
        gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
    ) -> Result<(), i32> {
        let mut acks = acks;
        loop {
            if let Some(out) = comp.ready() {
                if out.out_of_sync {
                    if len > 0 {
                        self.mark_out_of_sync(offset, len);
                    }
                    self.ensure_new_generation().await?;
                    // Marked: a reconnect may take its bitmap now.
                    drop(gate);
                    // Reached only this node: while fencing runs, the client must not learn
                    // of it (the peer may be taking over).
                    self.thawed().await;
                }
                return out.result;
            }
            let Some((recv, done)) = acks.as_mut() else {
                comp.peer_lost();
                continue;
            };
            if let Some(r) = recv.as_mut() {
                match r.await {
                    Ok(()) => comp.received(),
                    Err(_) => comp.peer_lost(),
                }
                *recv = None;
                continue;
            }
            match done.await {
                Ok(r) => comp.written(r),
                Err(_) => comp.peer_lost(),
            }
        }
    }

    /// FLUSH: durable locally, and on the peer for B and C (and for A once queued).
    pub async fn flush(&self) -> Result<(), i32> {
        let peer = self.peer();
        let mut comp = Completion::new(self.protocol(), true, peer.is_some());
        let acks = match &peer {
            None => None,
            Some(p) => {
                let answers = self.send_flush(p, false).await;
                settle(&mut comp, answers)
            }
        };
        comp.local_done(self.store.flush().await);
        self.complete(comp, acks, 0, 0, None).await
    }

    /// TRIM and WRITE_ZEROES: both become "zero this range" on both nodes (so the replicas stay
    /// byte-identical even where one side cannot discard).
    pub async fn zero(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> Result<(), i32> {
        let pieces = self.pieces(offset, len).unwrap_or_else(|| vec![(offset, len)]);
        for (o, l) in pieces {
            // A Zero frame carries a 32-bit length: pieces of at most ZERO_PIECE.
            let end = o + l;
            let mut at = o;
            loop {
                let n = (end - at).min(ZERO_PIECE);
                self.zero_piece(at, n, fua, may_trim, fast_only).await?;
                at += n;
                if at >= end {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn zero_piece(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> Result<(), i32> {
        self.writable()?;
        let gate = Arc::clone(&self.io_gate).read_owned().await;
        let _al = self.al_begin(offset, len).await?;
        let _range = self.locks.lock(offset, len).await;
        let peer = self.peer();
        let mut comp = Completion::new(self.protocol(), fua, peer.is_some());
        let local = self.store.write_zeroes(offset, len, fua, may_trim, fast_only).await;
        if local == Err(libc::EOPNOTSUPP) {
            return local; // nothing happened (fast_only); nothing to replicate
        }
        let mut flags = if fua { F_FUA } else { 0 };
        if may_trim {
            flags |= F_MAY_TRIM;
        }
        let l = u32::try_from(len).expect("zero pieces are at most ZERO_PIECE");
        let acks = self
            .send_to_peer(peer.as_ref(), &mut comp, offset, len, |id| {
                small_frame(Kind::Zero, flags, id, offset, &l.to_be_bytes())
            })
            .await;
        comp.local_done(local);
        self.complete(comp, acks, offset, len, Some(gate)).await
    }

    /// TRIM (see [`Volume::zero`]); a single-node volume just punches a hole.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), i32> {
        if self.meta.is_none() {
            return self.store.trim(offset, len, fua).await;
        }
        self.zero(offset, len, fua, true, false).await
    }

    /// Readahead hint.
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.store.cache(offset, len)
    }

    /// Allocation status.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        max: usize,
    ) -> Result<Vec<Extent>, i32> {
        self.store.block_status(offset, len, max).await
    }

    // ------------------------------------------------------------------ roles

    /// `duet primary [--force]`.
    pub async fn promote(&self, force: bool) -> Result<String, Refused> {
        let new_id = random_u64().map_err(|e| {
            Refused(format!(
                "the kernel gave no randomness for a generation identifier ({e}); not promoted"
            ))
        })?;
        let Promotion::Promoted { fresh, was } = self.with_core(|c| c.r.promote(force, new_id))?
        else {
            return Ok("already Primary".into());
        };
        if self.persist_sb().await.is_err() {
            self.with_core(|c| c.r.promotion_failed(was));
            return refuse("cannot write the metadata (I/O error); not promoted");
        }
        self.send_state().await;
        self.event(format!("promoted to Primary{}", if force { " (forced)" } else { "" }));
        self.notify();
        Ok(if fresh {
            "Primary (forced: this node's data is now the source of truth)".into()
        } else {
            "Primary".into()
        })
    }

    /// Freezes (or thaws) I/O: while frozen, writes that could not reach the peer are not
    /// answered (resource-and-stonith fencing).
    pub fn set_frozen(&self, on: bool) {
        if self.frozen.send_replace(on) != on {
            self.event(if on {
                "I/O frozen while the peer is fenced".into()
            } else {
                "I/O resumed".into()
            });
        }
    }

    async fn thawed(&self) {
        let mut rx = self.frozen.subscribe();
        let _ = rx.wait_for(|f| !*f).await;
    }

    /// Marks this node's data Outdated (on disk) at the peer's request: its replication link
    /// is down while it still writes, so our data is behind and must not be promoted.
    pub async fn outdate(&self) -> Result<String, Refused> {
        if self.cfg.is_none() {
            return refuse("this resource has no peer");
        }
        let Some(p) = self.with_core(|c| c.r.outdate())? else {
            return Ok("Inconsistent (already unusable)".into());
        };
        self.persist(p).await.map_err(|_| Refused("cannot write the metadata".into()))?;
        self.event("outdated at the peer's request: this data must not be promoted".into());
        self.notify();
        Ok("Outdated".into())
    }

    /// Records on disk that the peer's data is Outdated (so after a restart alone this node
    /// knows its data is the newest).
    pub async fn set_peer_outdated(&self) -> Result<(), Refused> {
        let p = self.with_core(|c| c.r.peer_outdated());
        self.persist(p).await.map_err(|_| Refused("cannot write the metadata".into()))
    }

    /// `duet secondary`, after the daemon closed the NBD export (nothing in flight).
    pub async fn demote(&self) -> Result<String, Refused> {
        let Some(p) = self.with_core(|c| c.r.demote()) else {
            return Ok("already Secondary".into());
        };
        if self.persist(p).await.is_err() {
            tracing::error!("writing data and metadata at demotion failed");
        }
        self.send_state().await;
        self.event("demoted to Secondary".into());
        self.notify();
        Ok("Secondary".into())
    }

    pub(crate) async fn send_state(&self) {
        let (peer, role, disk) = {
            let c = self.core.lock().expect("volume state poisoned");
            (c.peer.clone(), c.r.st.role, c.r.st.disk)
        };
        if let Some(p) = peer {
            let payload = [u8::from(role == Role::Primary), disk.code()];
            p.send(small_frame(Kind::State, 0, 0, 0, &payload)).await;
        }
    }

    /// The Params this node sends at connect.
    pub(crate) fn params(&self) -> Params {
        let c = self.core.lock().expect("volume state poisoned");
        let mut flags = 0;
        if c.r.st.role == Role::Primary {
            flags |= P_PRIMARY;
        }
        if c.r.crashed_primary() {
            flags |= P_CRASHED_PRIMARY;
        }
        if c.r.discard_my_data {
            flags |= P_DISCARD_MY_DATA;
        }
        match c.r.st.disk {
            DiskState::Inconsistent => flags |= P_INCONSISTENT,
            DiskState::Outdated => flags |= P_OUTDATED,
            DiskState::Consistent | DiskState::UpToDate => {}
        }
        Params {
            size: self.size,
            fingerprint: self.cfg.as_ref().map_or(0, |c| c.fingerprint),
            uuids: c.r.sb.uuids,
            flags,
            bitmap_weight: c.r.bitmap.weight(),
        }
    }

    /// `duet connect [--discard-my-data]`.
    pub fn connect(&self, discard_my_data: bool) -> Result<String, Refused> {
        if self.cfg.is_none() {
            return refuse("this resource has no peer in the configuration");
        }
        if self.with_core(|c| c.r.connect(discard_my_data))? {
            return Ok("already connected".into());
        }
        self.notify();
        Ok(if discard_my_data {
            "connecting; this node's changes will be discarded".into()
        } else {
            "connecting".into()
        })
    }

    /// Ends the current replication session (the peer was declared dead by the heartbeat) and
    /// waits up to `wait` for the teardown; the link reconnects when the peer is back.
    pub async fn drop_peer(&self, wait: Duration) {
        let had = {
            let mut c = self.core.lock().expect("volume state poisoned");
            let had = c.peer.is_some();
            let _ = c.r.st.step(Ev::DropPeer);
            had
        };
        if !had {
            return;
        }
        self.event("replication session dropped: the heartbeat declared the peer dead".into());
        self.notify();
        let end = Instant::now() + wait;
        while self.core.lock().expect("volume state poisoned").peer.is_some()
            && Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `duet disconnect`.
    pub fn disconnect(&self) -> Result<String, Refused> {
        let mut c = self.core.lock().expect("volume state poisoned");
        let _ = c.r.st.step(Ev::Disconnect);
        drop(c);
        self.notify();
        Ok("disconnecting".into())
    }

    /// `duet invalidate`: every block out of sync, disk Inconsistent; the next connect resyncs
    /// everything from the peer.
    pub async fn invalidate(&self) -> Result<String, Refused> {
        if self.cfg.is_none() {
            return refuse("this resource has no peer to resync from");
        }
        let p = self.with_core(|c| c.r.invalidate())?;
        let _ = self.persist(p).await;
        self.event("invalidated: every block out of sync, full resync from the peer".into());
        self.notify();
        Ok("invalidated; a full resync from the peer follows".into())
    }

    /// At shutdown: flush, write the bitmap, and clear "crashed primary" (this is a clean stop).
    pub async fn close(&self) {
        if self.meta.is_none() {
            let _ = self.store.flush().await;
            return;
        }
        let p = self.with_core(|c| c.r.close());
        let _ = self.persist(p).await;
    }

    // ------------------------------------------------------------------ peer-side apply

    /// Applies a replicated write received from the peer (under its range lock).
    pub(crate) async fn apply_write(
        &self,
        offset: u64,
        data: Option<IoBuf>,
        len: u64,
        flags: u16,
    ) -> Result<(), i32> {
        let fua = flags & F_FUA != 0;
        match data {
            Some(buf) => self.store.write(offset, buf, fua).await,
            None => self.store.write_zeroes(offset, len, fua, flags & F_MAY_TRIM != 0, false).await,
        }
    }

    /// Takes a range lock.
    pub(crate) async fn lock_range(&self, offset: u64, len: u64) -> RangeGuard {
        self.locks.lock(offset, len).await
    }

    /// Runs `f` under the state lock.
    pub(crate) fn with_core<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        f(&mut self.core.lock().expect("volume state poisoned"))
    }
}

/// Records in `comp` whether a request's frame reached the send queue; the acknowledgements to
/// wait for when it did.
fn settle(comp: &mut Completion, answers: Option<Answers>) -> Acks {
    if answers.is_some() {
        comp.queued();
    } else {
        comp.peer_lost();
    }
    answers
}

async fn write_meta(f: impl FnOnce() -> Result<(), MetaError> + Send) -> Result<(), i32> {
    // Metadata writes are few (AL transactions, role changes); doing them on this thread keeps
    // the ordering obvious. block_in_place lets the runtime move other tasks off this worker.
    tokio::task::block_in_place(f).map_err(|e| {
        tracing::error!(error = %e, "metadata write failed");
        libc::EIO
    })
}

/// Status snapshot of a replicated volume.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplStatus {
    pub role: Role,
    pub disk: DiskState,
    pub connection: ConnState,
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    pub out_of_sync_bytes: u64,
    pub current_generation: String,
    pub bitmap_generation: String,
    pub history: [String; 2],
    pub resync: Option<Progress>,
    pub verify: Option<Progress>,
    pub verify_mismatches: Vec<(u64, u64)>,
    pub split_brain: Option<String>,
    pub last_refusal: Option<String>,
    #[serde(default)]
    pub frozen: bool,
    pub sent_data_bytes: u64,
    pub received_data_bytes: u64,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
    pub resync_same_bytes: u64,
    pub al_transactions: u64,
    pub connects: u64,
    pub peer_errors: u64,
    /// Page-cache writes that took over 50 ms (a slow disk): each sent this node's writes past
    /// its data thread for a second.
    pub slow_writes: u64,
    /// Bytes the peer acknowledged that no peer flush has covered yet: what a power loss of
    /// the peer would cost to resync (bounded by `flush_interval_ms` / `flush_after_kib`).
    #[serde(default)]
    pub peer_unflushed_bytes: u64,
    pub events: Vec<Event>,
}

fn progress(p: Option<(Instant, u64, u64)>, left: u64) -> Option<Progress> {
    let (start, total, done) = p?;
    let el = start.elapsed().as_secs_f64().max(1e-3);
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
    let rate = done.saturating_mul(1000) / ms;
    Some(Progress {
        total_bytes: total,
        done_bytes: done,
        elapsed_s: el,
        rate_bytes_per_s: rate,
        eta_s: (rate > 0).then(|| left / rate),
    })
}

/// A cheap summary of a replicated volume's state (the cluster manager reads it often).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub role: Role,
    pub disk: DiskState,
    pub connection: ConnState,
    pub peer_disk: Option<DiskState>,
    /// The peer's role as the replication link last reported it.
    pub peer_role: Option<Role>,
    pub out_of_sync_bytes: u64,
    pub generation: u64,
}

impl Volume {
    /// Role, disk, connection, peer disk, out-of-sync bytes and current generation.
    pub fn summary(&self) -> Summary {
        let c = self.core.lock().expect("volume state poisoned");
        Summary {
            role: c.r.st.role,
            disk: c.r.st.disk,
            connection: c.r.st.conn,
            peer_disk: c.r.st.peer_disk,
            peer_role: if c.peer.is_some() { c.r.st.peer_role } else { None },
            out_of_sync_bytes: if self.meta.is_some() { c.r.bitmap.out_of_sync_bytes() } else { 0 },
            generation: c.r.sb.uuids.current,
        }
    }

    /// What `duet status` shows.
    pub fn status(&self) -> ReplStatus {
        let c = self.core.lock().expect("volume state poisoned");
        let unflushed = c.r.session.as_ref().map_or(0, |s| s.tl.held_bytes());
        let oos = if self.meta.is_some() { c.r.bitmap.out_of_sync_bytes() } else { 0 };
        let g = |x: u64| format!("{x:016x}");
        ReplStatus {
            role: c.r.st.role,
            disk: c.r.st.disk,
            connection: c.r.st.conn,
            peer_role: c.r.st.peer_role,
            peer_disk: c.r.st.peer_disk,
            out_of_sync_bytes: oos,
            current_generation: g(c.r.sb.uuids.current),
            bitmap_generation: g(c.r.sb.uuids.bitmap),
            history: [g(c.r.sb.uuids.history[0]), g(c.r.sb.uuids.history[1])],
            resync: progress(c.resync, oos),
            verify: progress(c.verify, c.verify.map_or(0, |(_, t, d)| t.saturating_sub(d))),
            verify_mismatches: c.verify_found.iter().take(100).copied().collect(),
            split_brain: c.r.split_brain.clone(),
            last_refusal: c.r.last_refusal.clone(),
            frozen: *self.frozen.borrow(),
            sent_data_bytes: self.stats.sent_data_bytes.load(Relaxed),
            received_data_bytes: self.stats.received_data_bytes.load(Relaxed),
            resync_sent_bytes: self.stats.resync_sent_bytes.load(Relaxed),
            resync_received_bytes: self.stats.resync_received_bytes.load(Relaxed),
            resync_same_bytes: self.stats.resync_same_bytes.load(Relaxed),
            al_transactions: self.stats.al_transactions.load(Relaxed),
            connects: self.stats.connects.load(Relaxed),
            peer_errors: self.stats.peer_errors.load(Relaxed),
            slow_writes: self.store.slow_inline_writes(),
            peer_unflushed_bytes: unflushed,
            events: c.events.iter().rev().take(20).rev().cloned().collect(),
        }
    }
}
