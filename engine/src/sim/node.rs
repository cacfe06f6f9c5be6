//! One simulated node: the engine's [`Replica`] (what the daemon runs), its activity log, a
//! disk with a volatile write cache and durable metadata, carried out as the executor does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{BLOCK, Msg, off};
use crate::actlog::{ActivityLog, Begin};
use crate::bitmap::Bitmap;
use crate::generation::{Generations, Side};
use crate::policy::Facts;
use crate::replica::{PeerError, Persist, Promotion, Replica};
use crate::state::{ConnState, DiskState, Refusal, Role, Sync};
use crate::superblock::Superblock;
use crate::translog::{Bound, TransferLog};

/// Why a simulated client write did not start (logged; the client tries another).
#[derive(Debug, thiserror::Error)]
pub(super) enum NotStarted {
    #[error("not Primary")]
    NotPrimary,
    #[error("activity log busy (in flight, or pinned until the peer flushes)")]
    AlBusy,
    #[error("Diskless and not connected: no copy to write to (EIO)")]
    NoDisk,
    #[error(transparent)]
    Al(#[from] crate::actlog::AlError),
}

/// The transfer log's bound in the simulation (shorter than the product's default, so that
/// both paths, flushed and not, are common).
const BOUND: Bound = Bound { interval: Duration::from_millis(200), max_bytes: 16 * BLOCK };

/// A disk: what is on stable storage, and a volatile write cache over it. Values are write
/// sequence numbers (0: never written).
#[derive(Debug, Clone)]
pub(super) struct Disk {
    durable: Vec<u64>,
    cache: BTreeMap<u64, u64>,
}

impl Disk {
    fn new(blocks: u64) -> Self {
        Self { durable: vec![0; usize::try_from(blocks).expect("small")], cache: BTreeMap::new() }
    }
    /// What a read returns.
    pub(super) fn read(&self, b: u64) -> u64 {
        self.cache.get(&b).copied().unwrap_or(self.durable[usize::try_from(b).expect("small")])
    }
    fn write(&mut self, b: u64, v: u64) {
        self.cache.insert(b, v);
    }
    /// fdatasync: the cache reaches stable storage.
    pub(super) fn flush(&mut self) {
        for (b, v) in std::mem::take(&mut self.cache) {
            self.durable[usize::try_from(b).expect("small")] = v;
        }
    }
    fn power_loss(&mut self) {
        self.cache.clear();
    }
}

/// What the metadata holds on disk (written synchronously, as the executor fsyncs it).
#[derive(Debug, Clone)]
struct Meta {
    sb: Superblock,
    bitmap: Bitmap,
    al_hot: Vec<u32>,
}

/// What waits for the peer's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waiter {
    /// A client's write.
    Write { block: u64, seq: u64 },
    /// A flush: the client flush waiting for it, if any (none: the transfer log's own).
    Flush(Option<u64>),
}

/// A client write that waited for the peer.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingWrite {
    pub block: u64,
    pub seq: u64,
}

/// One node: the engine's [`Replica`] (the code the daemon runs) with a simulated disk and
/// metadata, executing what it asks for.
#[derive(Debug)]
pub(super) struct Node {
    pub name: &'static str,
    pub alive: bool,
    pub r: Replica<Waiter>,
    al: ActivityLog,
    pub disk: Disk,
    meta: Meta,
    /// Resync requests in flight (as target; the executor's window).
    rs_inflight: BTreeSet<u64>,
    /// Client flushes whose peer flush was lost with the session.
    pending_flush_clients: Vec<u64>,
    pub slow_until: u64,
    pub fail_next_write: bool,
    pub promoted_at: usize,
    pub promote_after_report: bool,
    pub was_primary_at_death: bool,
    /// The disk hardware failed (until the operator replaces it, across restarts).
    pub disk_dead: bool,
    /// The executor's marker in the state directory: detached, durable across restarts.
    detached: bool,
    /// The export is closed for a handover (no new client requests) until the demotion.
    pub closing: bool,
}

fn created(blocks: u64) -> Superblock {
    Superblock {
        sequence: 0,
        volume_size: blocks * BLOCK,
        node_id: 0,
        flags: 0,
        bitmap_granularity: u32::try_from(BLOCK).expect("small"),
        al_extent_size: u32::try_from(4 * BLOCK).expect("small"),
        al_extents: 4,
        uuids: Generations::just_created(),
    }
}

impl Node {
    pub(super) fn new(name: &'static str, blocks: u64) -> Self {
        let bitmap = Bitmap::new(blocks * BLOCK, BLOCK);
        let sb = created(blocks);
        let (r, _) = Replica::attach(sb, bitmap.clone(), &[]);
        Self {
            name,
            alive: true,
            r,
            al: ActivityLog::new(4 * BLOCK, 4),
            disk: Disk::new(blocks),
            meta: Meta { sb, bitmap, al_hot: Vec::new() },
            rs_inflight: BTreeSet::new(),
            pending_flush_clients: Vec::new(),
            slow_until: 0,
            fail_next_write: false,
            promoted_at: 0,
            promote_after_report: false,
            was_primary_at_death: false,
            disk_dead: false,
            detached: false,
            closing: false,
        }
    }

    /// The disk fails and is detached at once (the executor's next I/O finds it); `false`
    /// when refused (a Primary whose disk holds the only good copy keeps it).
    pub(super) fn fail_disk(&mut self) -> bool {
        if self.r.detach().is_err() {
            return false;
        }
        self.disk_dead = true;
        self.detached = true;
        true
    }

    /// The operator replaces the failed disk (`create-md` on a new one): empty, fresh metadata,
    /// the marker gone; the node starts again from it.
    pub(super) fn replace_disk(&mut self, blocks: u64) {
        self.disk = Disk::new(blocks);
        self.meta = Meta {
            sb: created(blocks),
            bitmap: Bitmap::new(blocks * BLOCK, BLOCK),
            al_hot: Vec::new(),
        };
        self.disk_dead = false;
        self.detached = false;
        self.restart();
    }

    /// The local disk is detached.
    pub(super) fn diskless(&self) -> bool {
        self.r.diskless()
    }

    pub(super) fn has_session(&self) -> bool {
        self.r.session.is_some()
    }

    fn epoch(&self) -> u64 {
        self.r.session.as_ref().map_or(0, |s| s.epoch)
    }

    // ------------------------------------------------------------------ metadata

    /// Carries out what a transition asks to make durable (the executor's `persist`).
    pub(super) fn persist(&mut self, p: Persist) {
        if self.diskless() {
            return;
        }
        if p.data {
            self.disk.flush();
        }
        if p.bitmap {
            self.meta.bitmap = self.r.bitmap.clone();
        }
        if p.superblock {
            self.meta.sb = self.r.next_superblock();
        }
    }

    // ------------------------------------------------------------------ roles

    /// `duet primary [--force]` (the executor's `promote`).
    pub(super) fn promote(&mut self, force: bool, fresh_id: u64) -> Result<(), Refusal> {
        if let Promotion::Promoted { .. } = self.r.promote(force, fresh_id)? {
            self.persist(Persist::SUPERBLOCK);
        }
        Ok(())
    }

    /// `duet secondary` (the executor's `demote`).
    /// `Err`: the peer must flush first (the executor flushes it, or ends the session).
    pub(super) fn demote(&mut self) -> Result<(), crate::replica::Unflushed> {
        if let Some(p) = self.r.demote()? {
            self.persist(p);
        }
        self.closing = false;
        Ok(())
    }

    pub(super) fn connect(&mut self, discard: bool) {
        let _ = self.r.connect(discard);
    }

    /// Outdated over the heartbeat (the executor's `outdate`).
    pub(super) fn outdate(&mut self) -> bool {
        match self.r.outdate() {
            Ok(Some(p)) => {
                self.persist(p);
                true
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// The peer was outdated (the executor's `set_peer_outdated`).
    pub(super) fn peer_outdated(&mut self) {
        let p = self.r.peer_outdated();
        self.persist(p);
    }

    /// `duet invalidate`.
    pub(super) fn invalidate(&mut self) -> bool {
        match self.r.invalidate() {
            Ok(p) => {
                self.persist(p);
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn report(&self) -> Msg {
        Msg::Report { role: self.r.st.role, disk: self.r.st.disk }
    }

    pub(super) fn facts(&self) -> Facts {
        Facts {
            name: self.name.into(),
            side: Side {
                uuids: self.r.sb.uuids,
                crashed_primary: self.r.crashed_primary(),
                primary: self.r.st.role == Role::Primary,
            },
            inconsistent: self.r.st.disk == DiskState::Inconsistent,
            discard_my_data: self.r.discard_my_data,
            weight: self.r.bitmap.weight(),
        }
    }

    // ------------------------------------------------------------------ the write path

    /// A client write on this node (the executor's `Volume::write` up to the peer frame):
    /// the activity log first, then the local copy; `Some(id)` when it went to the peer.
    pub(super) fn write_begin(
        &mut self,
        block: u64,
        seq: u64,
        live: bool,
        now: Instant,
    ) -> Result<Option<u64>, NotStarted> {
        if self.r.st.role != Role::Primary || self.closing {
            return Err(NotStarted::NotPrimary);
        }
        if self.diskless() {
            // Peer-only (no activity log, no local copy): answered on the peer's write.
            let epoch = self.epoch();
            if !live {
                return Err(NotStarted::NoDisk);
            }
            let w = Waiter::Write { block, seq };
            return self
                .r
                .register(epoch, off(block), BLOCK, now, w)
                .map(Some)
                .map_err(|_| NotStarted::NoDisk);
        }
        let r = &self.r;
        let b = self.al.begin_unless(off(block), BLOCK, |e| r.pinned(e));
        match b {
            Begin::Hot => {}
            Begin::Need { add, evict } => {
                // Data and bits of evicted extents reach the disk before they leave the log:
                // after a crash only the log's extents are assumed to differ.
                if !evict.is_empty() {
                    self.persist(Persist { data: true, bitmap: true, superblock: false });
                }
                let rec = self.al.record(&add, &evict);
                self.meta.al_hot = ActivityLog::decode(&rec)?.1;
                self.al.commit(off(block), BLOCK, &add, &evict);
            }
            Begin::Busy => {
                self.r.hurry();
                return Err(NotStarted::AlBusy);
            }
        }
        self.disk.write(block, seq);
        if live {
            let epoch = self.epoch();
            if let Ok(id) =
                self.r.register(epoch, off(block), BLOCK, now, Waiter::Write { block, seq })
            {
                return Ok(Some(id));
            }
        }
        self.al.end(off(block), BLOCK);
        Ok(None)
    }

    /// A write answered without the peer: out of sync, and a new current generation before
    /// the reply (the executor's `complete` with `out_of_sync`).
    pub(super) fn finish_alone(&mut self, block: u64, fresh_id: u64) {
        self.r.written_alone(off(block), BLOCK);
        if let Some(sb) = self.r.new_generation(fresh_id) {
            self.meta.sb = sb;
        }
    }

    /// The peer's WriteAck (the executor's reader): the write is done on the peer, held in the
    /// transfer log until a flush covers it; a failed one is out of sync.
    pub(super) fn write_acked(&mut self, id: u64, ok: bool, now: Instant) -> Option<PendingWrite> {
        let p = self.r.peer_acked(id, ok, now).ok()?;
        match p.waiter {
            Waiter::Write { block, seq } => {
                if !self.diskless() {
                    self.al.end(p.offset, p.len);
                }
                Some(PendingWrite { block, seq })
            }
            Waiter::Flush(_) => None,
        }
    }

    /// A flush to the peer (a client's): closes the open transfer-log epoch.
    pub(super) fn send_flush(&mut self, client: Option<u64>, now: Instant) -> Option<u64> {
        let epoch = self.epoch();
        self.r.register_flush(epoch, client.is_none(), now, Waiter::Flush(client)).ok()
    }

    /// The transfer log asks for a flush.
    pub(super) fn flush_due(&mut self, now: Instant) -> Option<u64> {
        if self.r.flush_due(now) { self.send_flush(None, now) } else { None }
    }

    /// The peer's FlushAck: the epochs it covers are forgotten; the client flush it answers.
    pub(super) fn flush_acked(&mut self, id: u64, now: Instant) -> Option<u64> {
        match self.r.peer_acked(id, true, now).ok()?.waiter {
            Waiter::Flush(client) => client,
            Waiter::Write { .. } => None,
        }
    }

    /// Client flushes still waiting for the peer (answered by the caller after a teardown).
    pub(super) fn take_flush_waiters(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_flush_clients)
    }

    /// A replicated write on the Secondary (the executor's `handle` for Data).
    pub(super) fn apply_replicated(&mut self, block: u64, seq: u64) -> Result<bool, PeerError> {
        self.r.check_replicated_write()?;
        if self.fail_next_write {
            self.fail_next_write = false;
            let p = self.r.local_write_failed(off(block), BLOCK);
            self.persist(p);
            return Ok(false);
        }
        self.disk.write(block, seq);
        Ok(true)
    }

    // ------------------------------------------------------------------ sessions

    /// The session goes live (the executor's `session` after the bitmap exchange). Returns the
    /// generations to send with SyncUuid when we are the source.
    pub(super) fn go_live(
        &mut self,
        sync: Sync,
        peer_primary: bool,
        peer_inconsistent: bool,
        fresh_id: u64,
    ) -> Option<Generations> {
        let s = self.r.new_session(TransferLog::new(BOUND, 4 * BLOCK, u64::MAX));
        self.rs_inflight.clear();
        let p = self.r.go_live(s, sync, peer_primary, peer_inconsistent);
        self.persist(p);
        if sync == Sync::Source {
            let g = self.r.start_sync_source(fresh_id);
            self.persist(Persist::SUPERBLOCK);
            return Some(g);
        }
        None
    }

    /// The session ends (the executor's `teardown`). Returns the writes that waited for the
    /// peer; client flushes waiting for it are kept for [`Node::take_flush_waiters`].
    pub(super) fn teardown(&mut self) -> Vec<PendingWrite> {
        let end = self.r.teardown();
        let mut writes = Vec::new();
        for w in end.waiters {
            match w {
                Waiter::Write { block, seq } => {
                    if !self.diskless() {
                        self.al.end(off(block), BLOCK);
                    }
                    writes.push(PendingWrite { block, seq });
                }
                Waiter::Flush(client) => self.pending_flush_clients.extend(client),
            }
        }
        self.rs_inflight.clear();
        self.persist(end.persist);
        writes
    }

    /// The source's SyncUuid, as target.
    pub(super) fn sync_uuid(&mut self, g: Generations) {
        if let Ok(p) = self.r.sync_uuid(g) {
            self.persist(p);
        }
    }

    /// Resync requests to send now (as target), keeping up to `window` in flight.
    pub(super) fn resync_requests(&mut self, window: usize) -> Vec<u64> {
        if self.r.st.conn != ConnState::SyncTarget || self.r.sync_source_gens.is_none() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut from = 0;
        while self.rs_inflight.len() < window {
            let Some(b) = self.r.bitmap.next_set(from) else { break };
            from = b + 1;
            if self.rs_inflight.insert(b) {
                out.push(b);
            }
        }
        out
    }

    /// A resync request from the target (as source): the block's data; the bit goes.
    pub(super) fn serve_resync(&mut self, block: u64) -> Result<u64, PeerError> {
        self.r.check_resync_request()?;
        let v = self.disk.read(block);
        let epoch = self.epoch();
        self.r.resync_served(epoch, off(block), BLOCK);
        Ok(v)
    }

    /// Resync data (as target).
    pub(super) fn apply_resync(&mut self, block: u64, seq: u64) -> Result<(), PeerError> {
        self.r.check_resync_data(false)?;
        self.disk.write(block, seq);
        self.r.resync_applied(off(block), BLOCK);
        self.rs_inflight.remove(&block);
        Ok(())
    }

    /// Every block is in and nothing in flight (as target).
    pub(super) fn resync_finished(&self) -> bool {
        self.r.st.conn == ConnState::SyncTarget
            && self.r.bitmap.weight() == 0
            && self.has_session()
            && self.rs_inflight.is_empty()
            && self.r.sync_source_gens.is_some()
    }

    /// The end of the resync as target: the data is flushed first, then UpToDate.
    pub(super) fn finish_target(&mut self) {
        self.disk.flush();
        if let Ok(p) = self.r.target_done() {
            self.persist(p);
        }
    }

    /// The end of the resync as source.
    pub(super) fn source_done(&mut self) {
        if let Ok(p) = self.r.source_done() {
            self.persist(p);
        }
    }

    /// Nothing in flight.
    pub(super) fn quiet(&self) -> bool {
        self.r.session.as_ref().is_some_and(|s| s.in_flight() == 0) && self.rs_inflight.is_empty()
    }

    // ------------------------------------------------------------------ crashes

    /// The process dies; with `power`, the disk's cache too.
    pub(super) fn die(&mut self, power: bool) {
        self.alive = false;
        self.closing = false;
        self.was_primary_at_death = self.r.st.role == Role::Primary;
        if power {
            self.disk.power_loss();
        }
        self.r.session = None;
        self.rs_inflight.clear();
        self.pending_flush_clients.clear();
    }

    /// The daemon starts again from its metadata (the executor's `Volume::replicated`).
    pub(super) fn restart(&mut self) {
        // What survived in the cache (a process crash) is made durable before anything else.
        self.disk.flush();
        let m = self.meta.clone();
        self.al = ActivityLog::new(4 * BLOCK, 4);
        let hot: Vec<(u64, u64)> =
            m.al_hot.iter().map(|&e| (u64::from(e) * 4 * BLOCK, 4 * BLOCK)).collect();
        if self.detached {
            // The marker: Diskless from the start, the failed disk's metadata not read.
            self.r = Replica::detached(m.sb, m.bitmap);
        } else {
            let (r, p) = Replica::attach(m.sb, m.bitmap, &hot);
            self.r = r;
            self.persist(p);
        }
        self.rs_inflight.clear();
        self.slow_until = 0;
        self.fail_next_write = false;
        self.promote_after_report = false;
        self.alive = true;
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{} {:?} {:?} {:?} oos {} gens {:x?}{}",
            self.name,
            self.r.st.role,
            self.r.st.disk,
            self.r.st.conn,
            self.r.bitmap.weight(),
            self.r.sb.uuids,
            if self.r.split_brain.is_some() { " SPLIT BRAIN" } else { "" }
        )
    }
}
