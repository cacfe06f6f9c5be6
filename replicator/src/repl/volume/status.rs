//! What `duet status` and the cluster manager read of a replicated volume.

use super::*;

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
    /// The split brain discards this Primary's data under `call-pri-lost-after-sb`: its
    /// `pri_lost_after_sb` hook runs.
    #[serde(default)]
    pub pri_lost_after_sb: bool,
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
    /// Of `peer_errors`, those where the peer's bytes failed authentication (tampering, or a
    /// wrong secret).
    #[serde(default)]
    pub peer_auth_failures: u64,
    /// Connections to the replication port from another address than the peer's (dropped at
    /// once; they delay nothing).
    #[serde(default)]
    pub foreign_connections: u64,
    /// Page-cache writes that took over 50 ms (a slow disk): each sent this node's writes past
    /// its data thread for a second.
    pub slow_writes: u64,
    /// Bytes the peer acknowledged that no peer flush has covered yet: what a power loss of
    /// the peer would cost to resync (bounded by `flush_interval_ms` / `flush_after_kib`).
    #[serde(default)]
    pub peer_unflushed_bytes: u64,
    /// The local disk failed: which, what failed, what was done (see `on_io_error`).
    #[serde(default)]
    pub disk_failure: Option<super::DiskFailure>,
    /// The peer's volume size, from the last handshake that reached its parameters.
    #[serde(default)]
    pub peer_size_bytes: Option<u64>,
    /// The replication protocol version agreed at the last authenticated handshake.
    #[serde(default)]
    pub protocol_version: Option<u32>,
    /// The configuration keys in which the peer's file differs from this node's, from the last
    /// handshake that compared them (`None`: none did).
    #[serde(default)]
    pub config_differs: Option<Vec<String>>,
    /// `sync = "scheduled"`: the catch-ups and the kept state.
    #[serde(default)]
    pub scheduled: Option<ScheduledStatus>,
    pub events: Vec<Event>,
}

/// What `duet status` shows of a `sync = "scheduled"` resource.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScheduledStatus {
    /// When this node was last in sync with the peer (seconds since the epoch; now while it
    /// is): the standby's data is the Primary's of that moment.
    pub last_consistent: Option<f64>,
    /// When the next catch-up starts, if this node's scheduler runs them (the Primary's).
    pub next_run: Option<f64>,
    /// The consistent state kept before the resync that has not finished, if any.
    pub kept: Option<super::Kept>,
    /// A promotion now restores the kept state (the resync was cut off).
    pub restorable: bool,
}

/// How long a pace window lasts: the rate `duet status` shows is the one over the last window.
const PACE_WINDOW: Duration = Duration::from_secs(1);

/// A resync's or an online verify's progress: bytes to move, bytes moved, and its pace over the
/// last [`PACE_WINDOW`] (so a changed rate shows within seconds, not diluted by the run's
/// average).
#[derive(Debug, Clone, Copy)]
pub struct Run {
    start: Instant,
    total: u64,
    done: u64,
    /// Start of the current window and `done` then.
    window: (Instant, u64),
    /// Bytes per second over the last full window.
    pace: Option<u64>,
}

fn per_s(bytes: u64, d: Duration) -> u64 {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    bytes.saturating_mul(1000) / ms
}

impl Run {
    pub fn new(total: u64, now: Instant) -> Self {
        Self { start: now, total, done: 0, window: (now, 0), pace: None }
    }

    /// `n` more bytes done.
    pub fn add(&mut self, n: u64, now: Instant) {
        self.set_done(self.done.saturating_add(n), now);
    }

    /// `done` bytes done in all.
    pub fn set_done(&mut self, done: u64, now: Instant) {
        self.done = done;
        let el = now.saturating_duration_since(self.window.0);
        if el >= PACE_WINDOW {
            self.pace = Some(per_s(done.saturating_sub(self.window.1), el));
            self.window = (now, done);
        }
    }

    /// The snapshot `duet status` shows; `left`: bytes still to do.
    pub fn progress(&self, left: u64, now: Instant) -> Progress {
        let el = now.saturating_duration_since(self.start);
        let average = per_s(self.done, el);
        let since = now.saturating_duration_since(self.window.0);
        // A window that has not closed for long means the run stalled: its own pace, falling.
        let rate = match self.pace {
            Some(_) if since > 3 * PACE_WINDOW => per_s(self.done - self.window.1, since),
            Some(p) => p,
            None => average,
        };
        Progress {
            total_bytes: self.total,
            done_bytes: self.done,
            elapsed_s: el.as_secs_f64().max(1e-3),
            rate_bytes_per_s: rate,
            average_rate_bytes_per_s: average,
            eta_s: (rate > 0).then(|| left / rate),
        }
    }

    /// Bytes to do at the start.
    pub fn total(&self) -> u64 {
        self.total
    }
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
    /// `sync = "scheduled"`: the link is idle between catch-ups on purpose.
    pub scheduled: bool,
    /// A promotion would restore the state kept before a resync that was cut off (so this
    /// Inconsistent disk can still take over).
    pub restorable: bool,
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
            // A Diskless node's bits say what its own (failed) disk lacks, not the peer.
            out_of_sync_bytes: if self.meta.is_some() && !c.r.diskless() {
                c.r.bitmap.out_of_sync_bytes()
            } else {
                0
            },
            generation: c.r.sb.uuids.current,
            scheduled: self.scheduled().is_some(),
            restorable: Self::restorable_now(&c),
        }
    }

    /// What `duet status` shows.
    pub fn status(&self) -> ReplStatus {
        let now = Instant::now();
        let last_consistent = self.scheduled().and_then(|_| self.last_consistent());
        let c = self.core.lock().expect("volume state poisoned");
        let unflushed = c.r.session.as_ref().map_or(0, |s| s.tl.held_bytes());
        let oos =
            if self.meta.is_some() && !c.r.diskless() { c.r.bitmap.out_of_sync_bytes() } else { 0 };
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
            resync: c.resync.map(|r| r.progress(oos, now)),
            verify: c.verify.map(|v| v.progress(v.total.saturating_sub(v.done), now)),
            verify_mismatches: c.verify_found.iter().take(100).copied().collect(),
            split_brain: c.r.split_brain.clone(),
            pri_lost_after_sb: c.pri_lost && c.r.split_brain.is_some(),
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
            peer_auth_failures: self.stats.peer_auth_failures.load(Relaxed),
            foreign_connections: self.stats.foreign_connections.load(Relaxed),
            slow_writes: self.store.slow_inline_writes(),
            peer_unflushed_bytes: unflushed,
            disk_failure: c.disk_failure.clone(),
            peer_size_bytes: c.r.peer_size,
            protocol_version: c.protocol_version,
            config_differs: c.config_differs.clone(),
            scheduled: self.scheduled().map(|_| ScheduledStatus {
                last_consistent,
                next_run: c.next_run,
                kept: c.kept.clone(),
                restorable: Self::restorable_now(&c),
            }),
            events: c.events.iter().rev().take(20).rev().cloned().collect(),
        }
    }
}
