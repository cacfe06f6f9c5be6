//! One resource's replication state and every decision about it, in one place: the state
//! machine ([`State`]), the superblock's fields, the out-of-sync bitmap and the live peer
//! session ([`PeerSession`]). Each input is a method; what must then reach the disk comes back
//! as [`Persist`] (in its order: data, bitmap, superblock), what must reach the peer or a
//! client comes back as the values the method returns. Time, randomness and new identifiers are
//! arguments.
//!
//! The executor (`replicator::repl`) and the simulation ([`crate::sim`]) both drive this type:
//! what the simulation checks is what the daemon decides.

mod peer;
#[cfg(test)]
mod tests;

use std::time::Instant;

pub use peer::{PeerSession, Pending};

use crate::bitmap::Bitmap;
use crate::generation::Generations;
use crate::state::{ConnState, DiskState, Event, Outcome, Refusal, Role, State, Sync};
use crate::superblock::{
    FLAG_CONSISTENT, FLAG_CRASHED_PRIMARY, FLAG_NEW_CURRENT, FLAG_OUTDATED, FLAG_PEER_OUTDATED,
    FLAG_WAS_PRIMARY, Superblock,
};
use crate::translog::TransferLog;

/// What the caller makes durable after a transition, in this order: the data (a flush of the
/// store), the dirty bitmap pages, the superblock (from [`Replica::next_superblock`]).
#[must_use = "a transition's metadata must reach the disk"]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Persist {
    pub data: bool,
    pub bitmap: bool,
    pub superblock: bool,
}

impl Persist {
    pub const NOTHING: Self = Self { data: false, bitmap: false, superblock: false };
    pub const SUPERBLOCK: Self = Self { data: false, bitmap: false, superblock: true };
    pub const METADATA: Self = Self { data: false, bitmap: true, superblock: true };
    pub const ALL: Self = Self { data: true, bitmap: true, superblock: true };
}

/// The answer to `duet primary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    Already,
    /// Promoted; the superblock must be written (on failure: [`Replica::promotion_failed`]).
    /// `fresh`: forced from Inconsistent, a new data history.
    Promoted {
        fresh: bool,
        was: DiskState,
    },
}

/// A frame the peer had no business sending now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("peer sent a sync generation while we are not its resync target")]
    NotResyncTarget,
    #[error("peer acknowledged unknown request {0}")]
    UnknownRequest(u64),
    #[error("peer sent a replicated write to a Primary")]
    WriteToPrimary,
    #[error("peer asked us for resync data while we are its resync target")]
    RequestToTarget,
    #[error(
        "peer sent resync data ({what}) to a {role:?} in state {conn:?}; only a Secondary that is a resync or repair target takes it"
    )]
    ResyncDataRefused { what: &'static str, role: Role, conn: ConnState },
    #[error(
        "peer asked to read from a {role:?} whose disk is {disk:?}; only an UpToDate Secondary serves a Diskless Primary's reads"
    )]
    ReadRefused { role: Role, disk: DiskState },
    #[error("peer asked a Diskless node for data")]
    NoDisk,
}

/// A demotion must wait: the peer holds this many acknowledged bytes not yet durable there
/// (see [`Replica::demote`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer holds {0} acknowledged bytes not yet durable; flush it before demoting")]
pub struct Unflushed(pub u64);

/// Where a read goes (see [`Replica::read_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    Local,
    /// The peer of live session `epoch`.
    Peer(u64),
    /// Diskless and no live session: the read fails.
    Nowhere,
}

/// What a session's end leaves to the caller.
#[derive(Debug)]
pub struct Teardown<W> {
    /// Requests that were waiting for the peer, oldest first: they completed without it (their
    /// ranges are out of sync already).
    pub waiters: Vec<W>,
    pub persist: Persist,
}

/// One resource's replication state.
#[derive(Debug)]
pub struct Replica<W> {
    /// Role, disk and connection states: changed only through [`State::step`].
    pub st: State,
    pub sb: Superblock,
    pub bitmap: Bitmap,
    pub discard_my_data: bool,
    pub split_brain: Option<String>,
    pub last_refusal: Option<String>,
    /// The live session, if any.
    pub session: Option<PeerSession<W>>,
    /// A resync runs in the current session (as source or target).
    pub resyncing: bool,
    /// The resync source's generations (from SyncUuid), adopted when the resync finishes.
    pub sync_source_gens: Option<Generations>,
    /// The peer's volume size, from the last handshake that reached its parameters.
    pub peer_size: Option<u64>,
    epochs: u64,
}

impl<W> Replica<W> {
    fn with(st: State, sb: Superblock, bitmap: Bitmap) -> Self {
        Self {
            st,
            sb,
            bitmap,
            discard_my_data: false,
            split_brain: None,
            last_refusal: None,
            session: None,
            resyncing: false,
            sync_source_gens: None,
            peer_size: None,
            epochs: 0,
        }
    }

    /// A node whose disk failed and was detached before this start (its marker is in the state
    /// directory): Diskless Secondary, not connecting, its metadata not read (`sb` and `bitmap`
    /// are placeholders of the right size).
    pub fn detached(sb: Superblock, mut bitmap: Bitmap) -> Self {
        bitmap.set_all();
        let st = State { want_connect: false, ..State::attached(DiskState::Diskless, false) };
        Self::with(st, sb, bitmap)
    }

    /// The local disk is detached: no I/O may reach it.
    pub fn diskless(&self) -> bool {
        self.st.disk == DiskState::Diskless
    }

    /// What of `p` can reach a disk: nothing once Diskless.
    fn on_disk(&self, p: Persist) -> Persist {
        if self.diskless() { Persist::NOTHING } else { p }
    }

    /// A single node: always Primary and UpToDate, no peer.
    pub fn standalone(sb: Superblock, bitmap: Bitmap) -> Self {
        Self::with(
            State { role: Role::Primary, ..State::attached(DiskState::UpToDate, false) },
            sb,
            bitmap,
        )
    }

    /// Attaches from the metadata on disk (starts Secondary). After a crash as Primary, the
    /// activity log's `hot` ranges may differ from the peer: they are marked out of sync (and
    /// the bitmap must be written).
    pub fn attach(sb: Superblock, mut bitmap: Bitmap, hot: &[(u64, u64)]) -> (Self, Persist) {
        let crashed = sb.flags & FLAG_CRASHED_PRIMARY != 0;
        if crashed {
            for &(o, l) in hot {
                bitmap.set_range(o, l);
            }
        }
        let disk = if sb.flags & FLAG_CONSISTENT == 0 {
            DiskState::Inconsistent
        } else if sb.flags & FLAG_OUTDATED != 0 {
            DiskState::Outdated
        } else if sb.flags & FLAG_PEER_OUTDATED != 0 {
            // The peer was outdated while we were Primary: nothing newer exists anywhere.
            DiskState::UpToDate
        } else {
            DiskState::Consistent
        };
        let persist = Persist { bitmap: crashed && !hot.is_empty(), ..Persist::NOTHING };
        (Self::with(State::attached(disk, true), sb, bitmap), persist)
    }

    /// The superblock to write now: a new sequence number, flags from the disk state.
    pub fn next_superblock(&mut self) -> Superblock {
        self.sb.sequence += 1;
        let mut f = self.sb.flags & !(FLAG_CONSISTENT | FLAG_OUTDATED);
        if self.st.disk >= DiskState::Outdated {
            f |= FLAG_CONSISTENT;
        }
        if self.st.disk == DiskState::Outdated {
            f |= FLAG_OUTDATED;
        }
        self.sb.flags = f;
        self.sb
    }

    /// A new current generation was made since the peer was last connected (see
    /// [`Replica::new_generation`]).
    pub fn bumped(&self) -> bool {
        self.sb.flags & FLAG_NEW_CURRENT != 0
    }

    /// "Crashed while Primary" is on disk (so the next attach marks the hot extents).
    pub fn crashed_primary(&self) -> bool {
        self.sb.flags & FLAG_CRASHED_PRIMARY != 0
    }

    // ------------------------------------------------------------------ operator commands

    /// `duet primary [--force]`; `fresh` is a new random identifier (used when forced from
    /// Inconsistent: a new data history with no bitmap base, so the peer gets a full sync and
    /// two nodes forced this way are unrelated, not split).
    pub fn promote(&mut self, force: bool, fresh: u64) -> Result<Promotion, Refusal> {
        if self.st.role == Role::Primary {
            return Ok(Promotion::Already);
        }
        let was = self.st.disk;
        let new_history = was == DiskState::Inconsistent && force;
        // A bigger volume beside a smaller peer replicates one way only (the receiver needs the
        // sender's size): this node's writes past the peer's end would break the session.
        if self.st.conn.in_session()
            && let Some(peer) = self.peer_size.filter(|&p| p < self.sb.volume_size)
        {
            return Err(Refusal::PeerTooSmall { mine: self.sb.volume_size, peer });
        }
        self.st.step(Event::Promote { force })?;
        self.sb.flags |= FLAG_WAS_PRIMARY | FLAG_CRASHED_PRIMARY;
        if new_history {
            self.sb.uuids = Generations { current: fresh & !1 | 1, bitmap: 0, history: [0, 0] };
            self.sb.flags |= FLAG_NEW_CURRENT;
        }
        Ok(Promotion::Promoted { fresh: new_history, was })
    }

    /// The promotion's superblock could not be written: back to what it was.
    pub fn promotion_failed(&mut self, was: DiskState) {
        let _ = self.st.step(Event::PromotionFailed { disk: was });
    }

    /// `duet secondary` (nothing in flight: the export is closed). `Ok(None)` when already
    /// Secondary; else the data, the bitmap and a clean superblock must reach the disk.
    ///
    /// Refused while the peer holds acknowledged writes it has not made durable: the clean
    /// superblock drops "crashed while Primary", so after a power loss of both nodes nothing
    /// would mark those writes, and the peer's disk (about to be the Primary's) would silently
    /// lack them (found by the simulation). The caller flushes the peer first, or ends the
    /// session (whose teardown marks them).
    pub fn demote(&mut self) -> Result<Option<Persist>, Unflushed> {
        if self.st.role == Role::Secondary {
            return Ok(None);
        }
        if let Some(s) = &self.session
            && s.tl.held_bytes() > 0
        {
            return Err(Unflushed(s.tl.held_bytes()));
        }
        let _ = self.st.step(Event::Demote);
        self.sb.flags &= !FLAG_CRASHED_PRIMARY;
        Ok(Some(self.on_disk(Persist::ALL)))
    }

    /// Outdated at the peer's request. `None`: already Inconsistent (nothing to write).
    pub fn outdate(&mut self) -> Result<Option<Persist>, Refusal> {
        let o = self.st.step(Event::Outdate)?;
        if o == Outcome::Unchanged && self.st.disk == DiskState::Inconsistent {
            return Ok(None);
        }
        Ok(Some(Persist::SUPERBLOCK))
    }

    /// The peer is known to be Outdated (recorded, so a restart alone knows we are newest).
    /// Ignored within a session: the confirmation is about the session before (the handshake
    /// since compared generations and planned any resync), and a flag left on disk from it
    /// would make a later restart alone call this data UpToDate whatever happened meanwhile.
    pub fn peer_outdated(&mut self) -> Persist {
        if self.st.conn.in_session() {
            return Persist::NOTHING;
        }
        self.sb.flags |= FLAG_PEER_OUTDATED;
        let _ = self.st.step(Event::PeerOutdated);
        Persist::SUPERBLOCK
    }

    /// `duet connect [--discard-my-data]`; `Ok(true)` when a session is live already.
    pub fn connect(&mut self, discard_my_data: bool) -> Result<bool, Refusal> {
        self.st.step(Event::Connect { discard_my_data })?;
        self.discard_my_data = discard_my_data;
        self.split_brain = None;
        Ok(self.session.is_some())
    }

    /// `duet invalidate`: every block out of sync, disk Inconsistent.
    pub fn invalidate(&mut self) -> Result<Persist, Refusal> {
        self.st.step(Event::Invalidate)?;
        self.bitmap.set_all();
        Ok(Persist::METADATA)
    }

    /// A clean stop: nothing is left for a crash recovery to mark.
    pub fn close(&mut self) -> Persist {
        self.sb.flags &= !FLAG_CRASHED_PRIMARY;
        self.on_disk(Persist::ALL)
    }

    /// The local disk failed (`on_io_error = "detach"`, see [`Event::Detach`]): Diskless, and
    /// every block out of sync here (nothing of the old disk is trusted again; a reattach is a
    /// full resync). Nothing reaches the failed disk: its record is the executor's marker in
    /// the state directory. A Primary's requests in flight complete on the peer's answer only.
    pub fn detach(&mut self) -> Result<Outcome, Refusal> {
        let o = self.st.step(Event::Detach)?;
        if o == Outcome::Changed {
            self.bitmap.set_all();
            let _ = self.bitmap.take_dirty();
        }
        Ok(o)
    }

    /// Where a read is served: the local disk, or (Diskless) the live session's peer.
    pub fn read_from(&self) -> ReadFrom {
        if !self.diskless() {
            return ReadFrom::Local;
        }
        match &self.session {
            Some(s) if self.st.conn == ConnState::Connected => ReadFrom::Peer(s.epoch),
            _ => ReadFrom::Nowhere,
        }
    }

    /// A read request from a Diskless Primary: served by an UpToDate Secondary.
    pub fn check_read_request(&self) -> Result<(), PeerError> {
        if self.st.role == Role::Secondary && self.st.disk == DiskState::UpToDate {
            return Ok(());
        }
        Err(PeerError::ReadRefused { role: self.st.role, disk: self.st.disk })
    }

    // ------------------------------------------------------------------ the write path

    /// Registers a request with the live session `epoch`; `Err(waiter)` when that session is
    /// gone (the request completes without the peer).
    pub fn register(
        &mut self,
        epoch: u64,
        offset: u64,
        len: u64,
        now: Instant,
        waiter: W,
    ) -> Result<u64, W> {
        match self.session.as_mut() {
            Some(s) if s.epoch == epoch => Ok(s.register(offset, len, false, now, waiter)),
            _ => Err(waiter),
        }
    }

    /// Registers a flush with the live session `epoch` (see [`PeerSession::register_flush`]).
    pub fn register_flush(
        &mut self,
        epoch: u64,
        ours: bool,
        now: Instant,
        waiter: W,
    ) -> Result<u64, W> {
        match self.session.as_mut() {
            Some(s) if s.epoch == epoch => Ok(s.register_flush(now, ours, waiter)),
            _ => Err(waiter),
        }
    }

    /// The peer answered request `id`. A write it did is held in the transfer log until a
    /// flush covers it; a failed one is out of sync here. A flush forgets the epochs it covers
    /// (or, failed, marks them out of sync).
    pub fn peer_acked(&mut self, id: u64, ok: bool, now: Instant) -> Result<Pending<W>, PeerError> {
        let s = self.session.as_mut().ok_or(PeerError::UnknownRequest(id))?;
        let p = s.take(id).ok_or(PeerError::UnknownRequest(id))?;
        if p.flush {
            for (o, l) in s.tl.flushed(id, ok) {
                self.bitmap.set_range(o, l);
            }
        } else if ok {
            s.tl.acked(now, p.offset, p.len);
        } else if p.len > 0 {
            self.bitmap.set_range(p.offset, p.len);
        }
        Ok(p)
    }

    /// The transfer log's bound asks for a flush now.
    pub fn flush_due(&self, now: Instant) -> bool {
        self.session.as_ref().is_some_and(|s| s.tl.due(now))
    }

    /// Activity-log extent `e` holds writes the peer has not flushed (it must not be evicted).
    pub fn pinned(&self, e: u32) -> bool {
        self.session.as_ref().is_some_and(|s| s.tl.pins(e))
    }

    /// The activity log is full: ask the peer to flush soon.
    pub fn hurry(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.tl.hurry();
        }
    }

    /// A write completed without the peer: its range is out of sync.
    pub fn written_alone(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.bitmap.set_range(offset, len);
        }
    }

    /// Before acknowledging a write the peer does not have: a new current generation (with
    /// `fresh`), once per disconnected period. `Some(superblock)` to write before the reply.
    ///
    /// "Once" holds across restarts (the flag is on disk): a second new generation after a
    /// restart alone would push the base the peer holds into history, and the next connect
    /// would fall back to a full resync, or after two restarts in a split brain call the two
    /// disks unrelated (found by the simulation). DRBD's shortcut, "not while a bitmap
    /// generation is set", is not enough: a resync source whose link drops before the
    /// target's RsDone still holds the sync generation, and writes alone under the current
    /// the target has adopted; if the target is then forced Primary, the connect takes the
    /// target as source and drops those writes silently (also found by the simulation).
    pub fn new_generation(&mut self, fresh: u64) -> Option<Superblock> {
        if self.bumped() || self.diskless() {
            return None;
        }
        let primary = self.st.role == Role::Primary;
        self.sb.uuids.new_current(fresh, primary);
        self.sb.sequence += 1;
        self.sb.flags |= FLAG_NEW_CURRENT;
        Some(self.sb)
    }

    /// A replicated write failed on this (Secondary) disk: the block is out of sync here, the
    /// disk Inconsistent until resynced, and the session ends so the reconnect resyncs it.
    pub fn local_write_failed(&mut self, offset: u64, len: u64) -> Persist {
        self.bitmap.set_range(offset, len);
        let _ = self.st.step(Event::LocalWriteFailed);
        Persist::SUPERBLOCK
    }

    // ------------------------------------------------------------------ sessions

    /// A session for the connection being set up (its epoch is new).
    pub fn new_session(&mut self, tl: TransferLog) -> PeerSession<W> {
        self.epochs += 1;
        PeerSession::new(self.epochs, tl)
    }

    /// The bitmaps are exchanged and the plan says `sync`: the session is live.
    pub fn go_live(
        &mut self,
        session: PeerSession<W>,
        sync: Sync,
        peer_primary: bool,
        peer_inconsistent: bool,
    ) -> Persist {
        self.discard_my_data = false;
        self.split_brain = None;
        self.last_refusal = None;
        self.sb.flags &= !(FLAG_PEER_OUTDATED | FLAG_NEW_CURRENT);
        if self.st.role != Role::Primary {
            self.sb.flags &= !FLAG_CRASHED_PRIMARY;
        }
        let _ = self.st.step(Event::Live { sync, peer_primary, peer_inconsistent });
        self.session = Some(session);
        self.resyncing = sync != Sync::None;
        self.sync_source_gens = None;
        // Durable before any resync data moves: the target is Inconsistent on disk, the
        // bitmaps hold the union.
        Persist::METADATA
    }

    /// As resync source, with a fresh identifier: the generations to send with SyncUuid (the
    /// superblock must be written).
    pub fn start_sync_source(&mut self, fresh: u64) -> Generations {
        self.sb.uuids.start_sync_source(fresh);
        self.sb.uuids
    }

    /// The session ended (or never went live). Requests still waiting and writes acknowledged
    /// but not known durable on the peer (its cache may be gone) are out of sync; after this
    /// nothing more is forgotten. A resync target's cleared bits go to disk only with the data
    /// they stand for (`persist.data`), so after a power loss its bitmap still names every
    /// block it may not have.
    pub fn teardown(&mut self) -> Teardown<W> {
        // Judged by the resync and the disk, not the connection state, which may say
        // Disconnecting by now (found by the simulation: a disconnect during a resync skipped
        // the flush).
        let was_target = self.resyncing && self.st.disk == DiskState::Inconsistent;
        let persist = self.on_disk(Persist { data: was_target, bitmap: true, superblock: false });
        let _ = self.st.step(Event::LinkLost);
        self.resyncing = false;
        let Some(mut s) = self.session.take() else {
            return Teardown { waiters: Vec::new(), persist };
        };
        let mut waiters = Vec::new();
        for p in s.drain() {
            if p.len > 0 {
                self.bitmap.set_range(p.offset, p.len);
            }
            waiters.push(p.waiter);
        }
        for (o, l) in s.tl.drain() {
            self.bitmap.set_range(o, l);
        }
        Teardown { waiters, persist }
    }

    /// The connect plan will not go live: StandAlone until the operator acts. A split brain
    /// is reported in status; a refusal (unrelated data, a Primary that would be overwritten)
    /// is kept as the last refusal.
    pub fn give_up(&mut self, split_brain: bool, why: String) {
        if split_brain {
            self.split_brain = Some(why);
        } else {
            self.last_refusal = Some(why);
        }
        let _ = self.st.step(Event::GiveUp);
    }

    /// A replicated write (Data or Zero) from the peer: only a Secondary applies one.
    pub fn check_replicated_write(&self) -> Result<(), PeerError> {
        if self.st.role == Role::Primary {
            return Err(PeerError::WriteToPrimary);
        }
        Ok(())
    }

    /// A resync request from the peer: served unless we are its target (then it would be
    /// asking for our older data).
    pub fn check_resync_request(&self) -> Result<(), PeerError> {
        if self.diskless() {
            return Err(PeerError::NoDisk);
        }
        if self.st.conn == ConnState::SyncTarget {
            return Err(PeerError::RequestToTarget);
        }
        Ok(())
    }

    /// Resync data from the peer (`same`: RsSame, "your block already matches"). Only a
    /// Secondary that asked takes it: a resync target, or a verify's repair (RsSame only answers
    /// a target's checksum request). On a Primary it would bypass the I/O gate and the activity
    /// log, and RsSame would clear its out-of-sync bits.
    pub fn check_resync_data(&self, same: bool) -> Result<(), PeerError> {
        let conn = self.st.conn;
        let taken = self.st.role == Role::Secondary
            && if same {
                conn == ConnState::SyncTarget
            } else {
                matches!(
                    conn,
                    ConnState::SyncTarget
                        | ConnState::Connected
                        | ConnState::VerifySource
                        | ConnState::VerifyTarget
                )
            };
        if taken {
            return Ok(());
        }
        let what = if same { "RsSame" } else { "RsData" };
        Err(PeerError::ResyncDataRefused { what, role: self.st.role, conn })
    }

    /// The peer's role and disk state.
    pub fn peer_report(&mut self, role: Role, disk: DiskState) -> Result<Outcome, Refusal> {
        self.st.step(Event::PeerReport { role, disk })
    }

    /// The source's SyncUuid (as target).
    pub fn sync_uuid(&mut self, g: Generations) -> Result<Persist, PeerError> {
        if self.st.conn != ConnState::SyncTarget {
            return Err(PeerError::NotResyncTarget);
        }
        self.sb.uuids.receive_sync_uuid(g.bitmap);
        self.sync_source_gens = Some(g);
        Ok(Persist::SUPERBLOCK)
    }

    /// As source: the range went to the peer in session `epoch`; its bits go while that session
    /// is live (resync data needs no transfer log: the target clears its own bits on disk only
    /// once the data is flushed). `false`: the session is gone, nothing cleared.
    pub fn resync_served(&mut self, epoch: u64, offset: u64, len: u64) -> bool {
        if self.session.as_ref().is_none_or(|s| s.epoch != epoch) {
            return false;
        }
        self.bitmap.clear_range(offset, len);
        true
    }

    /// As target: resync data for the range is written here.
    pub fn resync_applied(&mut self, offset: u64, len: u64) {
        self.bitmap.clear_range(offset, len);
    }

    /// As target, every block in and flushed: UpToDate, with the source's generations.
    pub fn target_done(&mut self) -> Result<Persist, Refusal> {
        self.st.step(Event::TargetDone)?;
        self.resyncing = false;
        if let Some(g) = self.sync_source_gens.take() {
            self.sb.uuids.finish_sync_target(&g);
        }
        Ok(Persist::METADATA)
    }

    /// The last consistent state kept before a resync as target was copied back over the
    /// half-synced data (see [`Event::Restored`]): Consistent with that state's generations,
    /// and every block out of sync, since the interrupted resync may have moved blocks the
    /// peer no longer counts as out of sync, and whatever the peer holds now is unknown here.
    /// The superblock and the whole bitmap must reach the disk.
    ///
    /// The kept generation also goes to the front of the history: the peer holds it in its own
    /// history by now (it moved on while the link idled, and rotated its sync generation at
    /// each catch-up), so once this node writes anew the two are recognised as related, a
    /// split brain to resolve, not unrelated data.
    pub fn restored(&mut self, uuids: Generations) -> Result<Persist, Refusal> {
        self.st.step(Event::Restored)?;
        let older = if uuids.bitmap != 0 { uuids.bitmap } else { uuids.history[0] };
        self.sb.uuids =
            Generations { current: uuids.current, bitmap: 0, history: [uuids.current, older] };
        self.sync_source_gens = None;
        self.resyncing = false;
        self.bitmap.set_all();
        self.bitmap.mark_all_dirty();
        Ok(Persist::METADATA)
    }

    /// As source, the target says it has everything.
    pub fn source_done(&mut self) -> Result<Persist, Refusal> {
        self.st.step(Event::SourceDone)?;
        self.resyncing = false;
        self.bitmap.clear_all();
        self.sb.uuids.clear_bitmap();
        Ok(Persist::METADATA)
    }
}
