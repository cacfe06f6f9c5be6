//! One simulated node: the engine's parts, a disk with a volatile write cache, durable
//! metadata, and the bookkeeping the executor does around them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{BLOCK, Msg, off};
use crate::actlog::{ActivityLog, Begin};
use crate::bitmap::Bitmap;
use crate::generation::{Generations, Side};
use crate::policy::Facts;
use crate::state::{DiskState, Event, Refusal, Role, State, Sync};
use crate::translog::{Bound, TransferLog};

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
    gens: Generations,
    consistent: bool,
    outdated: bool,
    crashed_primary: bool,
    peer_outdated: bool,
    bitmap: Bitmap,
    al_hot: Vec<u32>,
}

/// A write waiting for the peer.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingWrite {
    pub block: u64,
    pub seq: u64,
    /// A client waits for it.
    pub client: Option<()>,
}

/// A live session's state on this node.
#[derive(Debug)]
struct Sess {
    tl: TransferLog,
    pending: BTreeMap<u64, PendingWrite>,
    /// Flushes sent to the peer: id → the client flush waiting for it, if any.
    flushes: BTreeMap<u64, Option<u64>>,
    next_id: u64,
    /// Resync requests in flight (as target).
    rs_inflight: BTreeSet<u64>,
    /// The source's generations (SyncUuid), adopted when the resync finishes.
    sync_gens: Option<Generations>,
    /// A resync runs in this session (the executor's `Core::resync`).
    resyncing: bool,
}

/// One node.
#[derive(Debug)]
pub(super) struct Node {
    pub name: &'static str,
    pub alive: bool,
    pub st: State,
    pub gens: Generations,
    crashed_primary: bool,
    peer_outdated: bool,
    bumped: bool,
    pub bitmap: Bitmap,
    al: ActivityLog,
    pub disk: Disk,
    meta: Meta,
    sess: Option<Sess>,
    /// Client flushes whose peer flush was lost with the session.
    pending_flush_clients: Vec<u64>,
    discard_my_data: bool,
    pub split_brain: bool,
    pub slow_until: u64,
    pub fail_next_write: bool,
    pub promoted_at: usize,
    pub promote_after_report: bool,
    pub was_primary_at_death: bool,
}

impl Node {
    pub(super) fn new(name: &'static str, blocks: u64) -> Self {
        let bitmap = Bitmap::new(blocks * BLOCK, BLOCK);
        let gens = Generations::just_created();
        Self {
            name,
            alive: true,
            st: State::attached(DiskState::Inconsistent, true),
            gens,
            crashed_primary: false,
            peer_outdated: false,
            bumped: false,
            bitmap: bitmap.clone(),
            al: ActivityLog::new(4 * BLOCK, 4),
            disk: Disk::new(blocks),
            meta: Meta {
                gens,
                consistent: false,
                outdated: false,
                crashed_primary: false,
                peer_outdated: false,
                bitmap,
                al_hot: Vec::new(),
            },
            sess: None,
            pending_flush_clients: Vec::new(),
            discard_my_data: false,
            split_brain: false,
            slow_until: 0,
            fail_next_write: false,
            promoted_at: 0,
            promote_after_report: false,
            was_primary_at_death: false,
        }
    }

    pub(super) fn has_session(&self) -> bool {
        self.sess.is_some()
    }

    // ------------------------------------------------------------------ metadata

    pub(super) fn persist_sb(&mut self) {
        self.meta.gens = self.gens;
        self.meta.consistent = self.st.disk >= DiskState::Outdated;
        self.meta.outdated = self.st.disk == DiskState::Outdated;
        self.meta.crashed_primary = self.crashed_primary;
        self.meta.peer_outdated = self.peer_outdated;
    }

    fn persist_bitmap(&mut self) {
        self.meta.bitmap = self.bitmap.clone();
    }

    pub(super) fn persist_all(&mut self) {
        self.persist_bitmap();
        self.persist_sb();
    }

    // ------------------------------------------------------------------ roles

    /// `duet primary [--force]` (the executor's `promote`).
    pub(super) fn promote(&mut self, force: bool, fresh_id: u64) -> Result<(), Refusal> {
        if self.st.role == Role::Primary {
            return Ok(());
        }
        let was = self.st.disk;
        let fresh = was == DiskState::Inconsistent && force;
        self.st.step(Event::Promote { force })?;
        self.crashed_primary = true;
        if fresh {
            self.gens = Generations { current: fresh_id & !1 | 1, bitmap: 0, history: [0, 0] };
            self.bumped = true;
        }
        self.persist_sb();
        Ok(())
    }

    /// `duet secondary` (the executor's `demote`).
    pub(super) fn demote(&mut self) {
        let _ = self.st.step(Event::Demote);
        self.crashed_primary = false;
        self.disk.flush();
        self.persist_all();
    }

    pub(super) fn connect(&mut self, discard: bool) {
        if self.st.step(Event::Connect { discard_my_data: discard }).is_ok() {
            self.discard_my_data = discard;
            self.split_brain = false;
        }
    }

    pub(super) fn report(&self) -> Msg {
        Msg::Report { role: self.st.role, disk: self.st.disk }
    }

    pub(super) fn facts(&self) -> Facts {
        Facts {
            name: self.name.into(),
            side: Side {
                uuids: self.gens,
                crashed_primary: self.crashed_primary,
                primary: self.st.role == Role::Primary,
            },
            inconsistent: self.st.disk == DiskState::Inconsistent,
            discard_my_data: self.discard_my_data,
            weight: self.bitmap.weight(),
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
    ) -> Result<Option<u64>, String> {
        if self.st.role != Role::Primary {
            return Err("not Primary".into());
        }
        let tl = self.sess.as_ref().map(|s| &s.tl);
        let b = self.al.begin_unless(off(block), BLOCK, |e| tl.is_some_and(|t| t.pins(e)));
        match b {
            Begin::Hot => {}
            Begin::Need { add, evict } => {
                // Data and bits of evicted extents reach the disk before they leave the log:
                // after a crash only the log's extents are assumed to differ.
                if !evict.is_empty() {
                    self.disk.flush();
                    self.persist_bitmap();
                }
                let rec = self.al.record(&add, &evict);
                self.meta.al_hot = ActivityLog::decode(&rec).map_err(|e| e.to_string())?.1;
                self.al.commit(off(block), BLOCK, &add, &evict);
            }
            Begin::Busy => {
                if let Some(s) = self.sess.as_mut() {
                    s.tl.hurry();
                }
                return Err(
                    "activity log busy (in flight, or pinned until the peer flushes)".into()
                );
            }
        }
        self.disk.write(block, seq);
        if !live {
            self.al.end(off(block), BLOCK);
            return Ok(None);
        }
        let s = self.sess.as_mut().expect("live");
        let id = s.next_id;
        s.next_id += 1;
        s.pending.insert(id, PendingWrite { block, seq, client: Some(()) });
        Ok(Some(id))
    }

    /// A write answered without the peer: out of sync, and a new current generation before
    /// the reply (the executor's `complete` with `out_of_sync`).
    pub(super) fn finish_alone(&mut self, block: u64, fresh_id: u64) {
        self.bitmap.set_range(off(block), BLOCK);
        if !self.bumped {
            let primary = self.st.role == Role::Primary;
            self.gens.new_current(fresh_id, primary);
            self.bumped = true;
            self.persist_sb();
        }
    }

    /// The peer's WriteAck (the executor's reader): the write is done on the peer, held in the
    /// transfer log until a flush covers it; a failed one is out of sync.
    pub(super) fn write_acked(&mut self, id: u64, ok: bool, now: Instant) -> Option<PendingWrite> {
        let s = self.sess.as_mut()?;
        let w = s.pending.remove(&id)?;
        if ok {
            s.tl.acked(now, off(w.block), BLOCK);
        } else {
            self.bitmap.set_range(off(w.block), BLOCK);
        }
        self.al.end(off(w.block), BLOCK);
        Some(w)
    }

    /// A flush to the peer (a client's): closes the open transfer-log epoch.
    pub(super) fn send_flush(&mut self, client: Option<u64>) -> u64 {
        let s = self.sess.as_mut().expect("live");
        let id = s.next_id;
        s.next_id += 1;
        s.tl.barrier(id, client.is_none());
        s.flushes.insert(id, client);
        id
    }

    /// The transfer log asks for a flush.
    pub(super) fn flush_due(&mut self, now: Instant) -> Option<u64> {
        let due = self.sess.as_ref()?.tl.due(now);
        due.then(|| self.send_flush(None))
    }

    /// The peer's FlushAck: the epochs it covers are forgotten; the client flush it answers.
    pub(super) fn flush_acked(&mut self, id: u64) -> Option<u64> {
        let s = self.sess.as_mut()?;
        let failed = s.tl.flushed(id, true);
        debug_assert!(failed.is_empty());
        s.flushes.remove(&id).flatten()
    }

    /// Client flushes still waiting for the peer (answered by the caller after a teardown).
    pub(super) fn take_flush_waiters(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_flush_clients)
    }

    /// A replicated write on the Secondary (the executor's `handle` for Data).
    pub(super) fn apply_replicated(&mut self, block: u64, seq: u64) -> bool {
        if self.fail_next_write {
            self.fail_next_write = false;
            self.bitmap.set_range(off(block), BLOCK);
            let _ = self.st.step(Event::LocalWriteFailed);
            self.persist_sb();
            return false;
        }
        self.disk.write(block, seq);
        true
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
        self.discard_my_data = false;
        self.split_brain = false;
        self.bumped = false;
        self.peer_outdated = false;
        if self.st.role != Role::Primary {
            self.crashed_primary = false;
        }
        let _ = self.st.step(Event::Live { sync, peer_primary, peer_inconsistent });
        self.sess = Some(Sess {
            tl: TransferLog::new(BOUND, 4 * BLOCK, u64::MAX),
            pending: BTreeMap::new(),
            flushes: BTreeMap::new(),
            next_id: 1,
            rs_inflight: BTreeSet::new(),
            sync_gens: None,
            resyncing: sync != Sync::None,
        });
        self.persist_all();
        if sync == Sync::Source {
            self.gens.start_sync_source(fresh_id);
            self.persist_sb();
            return Some(self.gens);
        }
        None
    }

    /// The session ends (the executor's `teardown`). Returns the writes that waited for the
    /// peer; client flushes waiting for it are kept for [`Node::take_flush_waiters`].
    pub(super) fn teardown(&mut self) -> Vec<PendingWrite> {
        let _ = self.st.step(Event::LinkLost);
        let Some(mut s) = self.sess.take() else { return Vec::new() };
        let was_target = s.resyncing && self.st.disk == DiskState::Inconsistent;
        let waiting: Vec<PendingWrite> = std::mem::take(&mut s.pending).into_values().collect();
        for w in &waiting {
            self.bitmap.set_range(off(w.block), BLOCK);
            self.al.end(off(w.block), BLOCK);
        }
        for (o, l) in s.tl.drain() {
            self.bitmap.set_range(o, l);
        }
        self.pending_flush_clients.extend(s.flushes.into_values().flatten());
        if was_target {
            self.disk.flush();
        }
        self.persist_bitmap();
        waiting
    }

    /// The source's SyncUuid, as target.
    pub(super) fn sync_uuid(&mut self, g: Generations) {
        if self.st.conn != crate::state::ConnState::SyncTarget {
            return;
        }
        self.gens.receive_sync_uuid(g.bitmap);
        if let Some(s) = self.sess.as_mut() {
            s.sync_gens = Some(g);
        }
        self.persist_sb();
    }

    /// Resync requests to send now (as target), keeping up to `window` in flight.
    pub(super) fn resync_requests(&mut self, window: usize) -> Vec<u64> {
        if self.st.conn != crate::state::ConnState::SyncTarget {
            return Vec::new();
        }
        let Some(s) = self.sess.as_mut() else { return Vec::new() };
        if s.sync_gens.is_none() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut from = 0;
        while s.rs_inflight.len() < window {
            let Some(b) = self.bitmap.next_set(from) else { break };
            from = b + 1;
            if s.rs_inflight.insert(b) {
                out.push(b);
            }
        }
        out
    }

    /// A resync request from the target (as source): the block's data; the bit goes.
    pub(super) fn serve_resync(&mut self, block: u64) -> Option<u64> {
        if self.st.conn == crate::state::ConnState::SyncTarget {
            return None;
        }
        let v = self.disk.read(block);
        if self.sess.is_some() {
            self.bitmap.clear_range(off(block), BLOCK);
        }
        Some(v)
    }

    /// Resync data (as target).
    pub(super) fn apply_resync(&mut self, block: u64, seq: u64) {
        if self.st.role != Role::Secondary {
            return;
        }
        self.disk.write(block, seq);
        self.bitmap.clear_range(off(block), BLOCK);
        if let Some(s) = self.sess.as_mut() {
            s.rs_inflight.remove(&block);
        }
    }

    /// Every block is in and nothing in flight (as target).
    pub(super) fn resync_finished(&self) -> bool {
        self.st.conn == crate::state::ConnState::SyncTarget
            && self.bitmap.weight() == 0
            && self.sess.as_ref().is_some_and(|s| s.rs_inflight.is_empty() && s.sync_gens.is_some())
    }

    /// The end of the resync as target (after [`Event::TargetDone`]).
    pub(super) fn finish_target(&mut self) {
        self.disk.flush();
        if let Some(s) = self.sess.as_mut() {
            s.resyncing = false;
        }
        if let Some(g) = self.sess.as_mut().and_then(|s| s.sync_gens.take()) {
            self.gens.finish_sync_target(&g);
        }
        self.persist_all();
    }

    /// The end of the resync as source (after [`Event::SourceDone`]).
    pub(super) fn source_done(&mut self) {
        if let Some(s) = self.sess.as_mut() {
            s.resyncing = false;
        }
        self.bitmap.clear_all();
        self.gens.clear_bitmap();
        self.persist_all();
    }

    /// Nothing in flight.
    pub(super) fn quiet(&self) -> bool {
        self.sess.as_ref().is_some_and(|s| {
            s.pending.is_empty() && s.rs_inflight.is_empty() && s.flushes.is_empty()
        })
    }

    // ------------------------------------------------------------------ crashes

    /// The process dies; with `power`, the disk's cache too.
    pub(super) fn die(&mut self, power: bool) {
        self.alive = false;
        self.was_primary_at_death = self.st.role == Role::Primary;
        if power {
            self.disk.power_loss();
        }
        self.sess = None;
        self.pending_flush_clients.clear();
    }

    /// The daemon starts again from its metadata (the executor's `Volume::replicated`).
    pub(super) fn restart(&mut self) {
        // What survived in the cache (a process crash) is made durable before anything else.
        self.disk.flush();
        let m = self.meta.clone();
        self.gens = m.gens;
        self.crashed_primary = m.crashed_primary;
        self.peer_outdated = m.peer_outdated;
        self.bitmap = m.bitmap.clone();
        self.al = ActivityLog::new(4 * BLOCK, 4);
        if m.crashed_primary {
            for &e in &m.al_hot {
                self.bitmap.set_range(u64::from(e) * 4 * BLOCK, 4 * BLOCK);
            }
            self.persist_bitmap();
        }
        let disk = if !m.consistent {
            DiskState::Inconsistent
        } else if m.outdated {
            DiskState::Outdated
        } else if m.peer_outdated {
            DiskState::UpToDate
        } else {
            DiskState::Consistent
        };
        self.st = State::attached(disk, true);
        self.bumped = false;
        self.discard_my_data = false;
        self.split_brain = false;
        self.slow_until = 0;
        self.fail_next_write = false;
        self.promote_after_report = false;
        self.alive = true;
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{} {:?} {:?} {:?} oos {} gens {:x?}{}",
            self.name,
            self.st.role,
            self.st.disk,
            self.st.conn,
            self.bitmap.weight(),
            self.gens,
            if self.split_brain { " SPLIT BRAIN" } else { "" }
        )
    }
}
