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
            peer_auth_failures: self.stats.peer_auth_failures.load(Relaxed),
            foreign_connections: self.stats.foreign_connections.load(Relaxed),
            slow_writes: self.store.slow_inline_writes(),
            peer_unflushed_bytes: unflushed,
            events: c.events.iter().rev().take(20).rev().cloned().collect(),
        }
    }
}
