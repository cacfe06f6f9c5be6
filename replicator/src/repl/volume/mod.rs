//! The replicated volume: what the NBD server writes to. It owns the local store, the metadata,
//! the activity log, the engine's [`Replica`] (role, disk and connection states, superblock,
//! bitmap, the peer session) and (through [`Peer`]) the live connection's sending side. The
//! decisions are the engine's (the `Replica`, completion rules, activity log); this module
//! carries them out and keeps the order that makes them safe:
//!
//! - an activity-log transaction is durable before a write to a cold extent starts;
//! - a write is sent to the peer while its range is locked, so both nodes apply overlapping
//!   writes in one order;
//! - when the peer is absent or lost, the range is marked out of sync and a new current
//!   generation is durable before the write is acknowledged.
//!
//! A volume without a peer (a single-node configuration) has no metadata and is always Primary.
//!
//! Its parts: [`io`] (the NBD-facing I/O and the activity log), [`roles`] (operator and cluster
//! commands), [`status`] (what `duet status` shows).

mod failure;
mod io;
mod roles;
mod snapshot;
mod status;

pub(crate) use failure::PEER_READ_MAX;
pub use failure::{DiskFailure, OnIoError, is_disk_error, marker_path, read_marker, write_marker};
pub use io::VolumePlug;
pub use snapshot::{Kept, Scheduled, probe as probe_reflink, read_kept, record_path};
pub use status::{ReplStatus, Run, ScheduledStatus, Summary};

use nix::errno::Errno;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// After the handshake: frames encrypted and authenticated, or authenticated only
    /// (`link_encryption`).
    pub protection: super::seal::Protection,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub timeout: Duration,
    pub connect_retry: Duration,
    /// When the Primary asks the peer for a flush (see [`super::translog`]).
    pub transfer_log: super::translog::Bound,
    pub listen: std::net::SocketAddr,
    pub peer_addr: std::net::SocketAddr,
    /// What a failing local disk does.
    pub on_io_error: OnIoError,
    /// Where a detach is recorded (see [`marker_path`]); `None`: nowhere (tests).
    pub detached_marker: Option<std::path::PathBuf>,
    /// The replication protocol versions spoken ([`handshake::Versions::THIS`] but in the
    /// rolling-upgrade tests).
    pub versions: super::handshake::Versions,
    /// The Hello's features ([`handshake::FEATURES`] but in the rolling-upgrade tests).
    pub features: u64,
    /// This node's configuration keys, compared with the peer's at each handshake.
    pub config_keys: super::handshake::ConfigKeys,
    /// `sync = "scheduled"`: the link idles between catch-ups (see [`Scheduled`]).
    pub scheduled: Option<Scheduled>,
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
    /// Connections to the replication port from another address than the peer's (dropped).
    pub foreign_connections: AtomicU64,
    /// Of those, sessions ended by a frame (or handshake tag) that failed authentication.
    pub peer_auth_failures: AtomicU64,
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
    /// Bytes per second over the last second or so (falling when the run stalls).
    pub rate_bytes_per_s: u64,
    /// Bytes per second over the run so far.
    #[serde(default)]
    pub average_rate_bytes_per_s: u64,
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
    pub resync: Option<status::Run>,
    pub verify: Option<status::Run>,
    pub verify_found: Vec<(u64, u64)>,
    pub events: VecDeque<Event>,
    /// The last split brain discards this Primary's data under call-pri-lost-after-sb.
    pub pri_lost: bool,
    /// The local disk failed (see [`Volume::disk_failure`]).
    pub disk_failure: Option<DiskFailure>,
    /// The protocol version agreed at the last authenticated handshake (`duet check-config
    /// --connect` shows it).
    pub protocol_version: Option<u32>,
    /// The configuration keys in which the peer's file differs from ours, from the last
    /// handshake that compared them (`None`: none did; the peer's release does not).
    pub config_differs: Option<Vec<String>>,
    /// When this node was last in sync with its peer (seconds since the epoch), since start.
    pub in_sync_at: Option<f64>,
    /// The consistent state kept before the current resync (`sync = "scheduled"`).
    pub kept: Option<snapshot::Kept>,
    /// When the scheduler next starts a catch-up (seconds since the epoch), if it set one.
    pub next_run: Option<f64>,
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
    /// I/O held by a disk error (`on_io_error = "freeze"`) until `duet resume-io`.
    pub(crate) disk_hold: watch::Sender<failure::Hold>,
    /// The resync controller's settings now (the configuration's at start; `duet adjust`
    /// changes them, and a running resync follows at its next tick). `None`: not replicated.
    resync_settings: watch::Sender<Option<crate::ratectl::Settings>>,
    /// Where each event goes besides the ring (the daemon's event log), once set.
    sink: std::sync::OnceLock<EventSink>,
    /// Run before this node starts a resync as its target (the resync waits for it).
    before_resync_target: std::sync::OnceLock<BeforeResync>,
    /// The disk is detached (the engine's Diskless, mirrored for the write path's checks).
    detached: std::sync::atomic::AtomicBool,
}

/// What runs before a resync as target: `Err(why)` drops the connection instead (the resync
/// waits for the next one), as DRBD's before-resync-target handler does.
pub struct BeforeResync(pub Box<dyn Fn() -> HookFuture + Send + Sync>);

/// What a [`BeforeResync`] hook returns: its run, to be awaited.
pub type HookFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

impl std::fmt::Debug for BeforeResync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeResync")
    }
}

/// A receiver of a volume's events (one line each).
pub struct EventSink(pub Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

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
    pub done: Option<oneshot::Sender<Result<(), Errno>>>,
}

/// The receiving ends of a [`Waiter`].
type Answers = (Option<oneshot::Receiver<()>>, oneshot::Receiver<Result<(), Errno>>);

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
    pub(crate) fn answer(mut self, r: Result<(), Errno>) {
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
    /// A Diskless Primary's reads waiting for the peer's data, by id (from `next_read`).
    pub(crate) reads: Mutex<HashMap<u64, oneshot::Sender<Result<IoBuf, Errno>>>>,
    pub(crate) next_read: AtomicU64,
}

impl Peer {
    pub(crate) fn new(tx: Arc<Tx>, epoch: u64) -> Arc<Self> {
        Arc::new(Self {
            tx,
            epoch,
            verify: Mutex::new(HashMap::new()),
            next_verify: AtomicU64::new(1),
            reads: Mutex::new(HashMap::new()),
            next_read: AtomicU64::new(1),
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
        let resync_settings = watch::channel(cfg.as_ref().map(|c| c.resync)).0;
        let r_diskless = r.diskless();
        Arc::new(Self {
            cfg,
            resync_settings,
            sink: std::sync::OnceLock::new(),
            before_resync_target: std::sync::OnceLock::new(),
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
                pri_lost: false,
                disk_failure: None,
                protocol_version: None,
                config_differs: None,
                in_sync_at: None,
                kept: None,
                next_run: None,
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
            disk_hold: watch::channel(failure::Hold::Off).0,
            detached: std::sync::atomic::AtomicBool::new(r_diskless),
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
            source: std::io::Error::from_raw_os_error(e as i32),
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
        v.load_kept_state();
        if persist.bitmap {
            v.event(format!(
                "attached after a crash as Primary: {} hot extents marked out of sync",
                al_hot.len()
            ));
        }
        Ok(v)
    }

    /// A replicated volume whose disk failed before this start (`failure` is its marker): a
    /// Diskless Secondary that reads nothing of the failed disk, not its metadata either, and
    /// never connects until the disk is replaced or checked (`duet attach`).
    pub fn detached(cfg: VolumeConfig, store: Arc<Store>, failure: DiskFailure) -> Arc<Self> {
        let size = if failure.size > 0 { failure.size } else { store.size() };
        let sb = Superblock {
            sequence: 0,
            volume_size: size,
            node_id: 0,
            flags: 0,
            bitmap_granularity: 4096,
            al_extent_size: 4 << 20,
            al_extents: 1,
            uuids: crate::generation::Generations::just_created(),
        };
        let r = Replica::detached(sb, Bitmap::new(size, 4096));
        let v = Self::build(Some(cfg), store, None, size, r, ActivityLog::new(4 << 20, 1));
        v.with_core(|c| c.disk_failure = Some(failure.clone()));
        v.event(format!(
            "disk {} was detached after an I/O error ({} at {}: {}); Diskless until it is replaced or checked and `duet attach` is run",
            failure.disk, failure.op, failure.offset, failure.error
        ));
        v
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

    /// The resync controller's settings now.
    pub fn resync_settings(&self) -> Option<crate::ratectl::Settings> {
        *self.resync_settings.borrow()
    }

    /// Changes the resync controller's settings; a running resync follows at its next tick.
    pub fn set_resync_settings(&self, s: crate::ratectl::Settings) {
        if self.cfg.is_some() {
            self.resync_settings.send_replace(Some(s));
        }
    }

    /// Subscribes to the resync controller's settings.
    pub(crate) fn watch_resync_settings(
        &self,
    ) -> watch::Receiver<Option<crate::ratectl::Settings>> {
        self.resync_settings.subscribe()
    }

    /// The whole event ring (the last 200), oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.core.lock().expect("volume state poisoned").events.iter().cloned().collect()
    }

    /// Runs `hook` before each resync this node is the target of (the first call wins).
    pub fn set_before_resync_target(&self, hook: BeforeResync) {
        let _ = self.before_resync_target.set(hook);
    }

    /// The hook to run before a resync as target, if one is set.
    pub(crate) fn before_resync_target(&self) -> Option<&BeforeResync> {
        self.before_resync_target.get()
    }

    /// Sends every event to `sink` too (the first call wins): those of the ring so far (what
    /// the volume found as it attached), then every later one.
    pub fn set_event_sink(&self, sink: EventSink) {
        let earlier: Vec<String> = self.events().into_iter().map(|e| e.what).collect();
        if self.sink.set(sink).is_ok()
            && let Some(s) = self.sink.get()
        {
            for what in &earlier {
                (s.0)(what);
            }
        }
    }

    /// Appends to the event log (and logs it).
    pub fn event(&self, what: String) {
        let name = self.cfg.as_ref().map_or("", |c| c.resource.as_str());
        tracing::info!(resource = %name, "{what}");
        if let Some(s) = self.sink.get() {
            (s.0)(&what);
        }
        if let Ok(mut c) = self.core.lock() {
            c.events.push_back(Event { at: now_s(), what });
            while c.events.len() > 200 {
                c.events.pop_front();
            }
        }
    }

    // ------------------------------------------------------------------ metadata

    /// Writes the superblock from the in-memory state (flags follow role and disk state).
    pub(crate) async fn persist_sb(&self) -> Result<(), Errno> {
        let Some(meta) = &self.meta else { return Ok(()) };
        if self.diskless() {
            return Ok(()); // nothing reaches a failed disk
        }
        let _g = self.meta_io.lock().await;
        let sb = self.core.lock().expect("volume state poisoned").r.next_superblock();
        write_meta(move || meta.write_sb(&sb)).await
    }

    /// Carries out what a transition asks to make durable, in its order (see [`Persist`]).
    pub(crate) async fn persist(&self, p: Persist) -> Result<(), Errno> {
        if self.diskless() {
            return Ok(()); // nothing reaches a failed disk
        }
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
    pub(crate) async fn persist_bitmap(&self) -> Result<(), Errno> {
        let Some(meta) = &self.meta else { return Ok(()) };
        if self.diskless() {
            return Ok(()); // nothing reaches a failed disk
        }
        let _g = self.meta_io.lock().await;
        let pages: Vec<_> = {
            let mut c = self.core.lock().expect("volume state poisoned");
            let bm = &mut c.r.bitmap;
            bm.take_dirty().into_iter().map(|i| (i, bm.page(i))).collect()
        };
        write_meta(move || meta.write_bitmap(&pages)).await
    }

    // ------------------------------------------------------------------ peer-side apply

    /// Applies a replicated write received from the peer (under its range lock).
    pub(crate) async fn apply_write(
        &self,
        offset: u64,
        data: Option<IoBuf>,
        len: u64,
        flags: u16,
    ) -> Result<(), Errno> {
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

async fn write_meta(f: impl FnOnce() -> Result<(), MetaError> + Send) -> Result<(), Errno> {
    // Metadata writes are few (AL transactions, role changes); doing them on this thread keeps
    // the ordering obvious. block_in_place lets the runtime move other tasks off this worker.
    tokio::task::block_in_place(f).map_err(|e| {
        tracing::error!(error = %e, "metadata write failed");
        Errno::EIO
    })
}
