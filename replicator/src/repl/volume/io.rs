//! The NBD-facing I/O of a replicated volume: reads, writes, flushes, zeroes and trims, the
//! activity log around them, and the peer's part of each (registered with the engine's
//! session, answered under the protocol's completion rule).

use super::failure::Fault;
use super::*;

/// What a replicated write waits for: receipt (protocol B) and the peer's write.
type Acks = Option<Answers>;

/// Largest range one Zero frame carries.
const ZERO_PIECE: u64 = 1 << 30;

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
    /// Makes `[offset, offset+len)` hot in the activity log (durably) and takes a reference.
    async fn al_begin(&self, offset: u64, len: u64) -> Result<AlRef<'_>, Errno> {
        if self.meta.is_none() || self.diskless() {
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
    async fn ensure_new_generation(&self) -> Result<(), Errno> {
        let Some(meta) = &self.meta else { return Ok(()) };
        let _g = self.meta_io.lock().await;
        let fresh = random_u64().map_err(|e| {
            tracing::error!(error = %e, "no randomness for a new generation identifier");
            Errno::EIO
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
        if replicating(c.r.st.conn) { c.peer.clone() } else { None }
    }

    fn writable(&self) -> Result<(), Errno> {
        let c = self.core.lock().expect("volume state poisoned");
        if c.r.st.role != Role::Primary {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ the NBD-facing I/O

    /// Reads locally; a Diskless Primary reads through its peer, and a read the failing disk
    /// refuses is detached and read there (see [`Volume::disk_failed`]).
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, Errno> {
        if self.cfg.is_some() && self.diskless() {
            return self.peer_read(offset, len).await;
        }
        loop {
            match self.store.read(offset, len).await {
                Err(e) => match self.local_fault("read", offset, e).await {
                    Fault::Detached => return self.peer_read(offset, len).await,
                    Fault::Stands => return Err(e),
                    Fault::Retry => {}
                },
                r => return r,
            }
        }
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
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<(), Errno> {
        crate::fault::write(offset);
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

    async fn write_piece(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<(), Errno> {
        self.writable()?;
        let gate = Arc::clone(&self.io_gate).read_owned().await;
        let len = buf.len() as u64;
        let _al = self.al_begin_or_detach(offset, len).await?;
        let _range = self.locks.lock(offset, len).await;
        self.app_writes.fetch_add(1, Relaxed);
        let reg = self.register_live(offset, len);
        let mut comp = Completion::new(self.protocol(), fua, reg.is_some());
        let digest = self.cfg.as_ref().map_or(Digest::Off, |c| c.digest);
        let flags = if fua { F_FUA } else { 0 };
        // One buffer for both: the peer's frame and the local write share it.
        let buf = Arc::new(buf);
        let mut acks = None;
        if let Some((p, id, answers)) = reg {
            let f = block_frame(Kind::Data, flags, id, offset, Arc::clone(&buf), digest);
            acks = settle(&mut comp, p.send(f).await.then_some(answers));
            if acks.is_some() {
                self.stats.sent_data_bytes.fetch_add(len, Relaxed);
                // In a batch (see `plug`) the frames leave together first; the local copies
                // follow while the peer makes its own.
                p.tx.uncorked().await;
            }
        }
        if self.diskless() {
            comp.peer_only();
        } else {
            loop {
                match self.store.write(offset, Arc::clone(&buf), fua).await {
                    Err(e) => match self.local_fault("write", offset, e).await {
                        // Detached: the peer's copy is the write.
                        Fault::Detached => comp.peer_only(),
                        Fault::Stands => comp.local_done(Err(e)),
                        Fault::Retry => continue,
                    },
                    r => comp.local_done(r),
                }
                break;
            }
        }
        self.complete(comp, acks, offset, len, Some(gate)).await
    }

    /// [`Volume::al_begin`], and a failing activity-log write detaches the disk (the write goes
    /// on without it) instead of failing the request.
    async fn al_begin_or_detach(&self, offset: u64, len: u64) -> Result<AlRef<'_>, Errno> {
        loop {
            match self.al_begin(offset, len).await {
                Err(e) => match self.local_fault("activity log write", offset, e).await {
                    Fault::Detached => return Ok(AlRef { v: self, offset, len: 0 }),
                    Fault::Stands => return Err(e),
                    Fault::Retry => {}
                },
                r => return r,
            }
        }
    }

    /// Registers a request with the live session, if any, under one lock: the connection to
    /// send its frame on, the request id, and the answers to wait for (a receipt too under
    /// protocol B). `None`: no peer to replicate to.
    fn register_live(&self, offset: u64, len: u64) -> Option<(Arc<Peer>, u64, Answers)> {
        let receipt = self.protocol() == Protocol::B;
        let mut c = self.core.lock().expect("volume state poisoned");
        if !replicating(c.r.st.conn) {
            return None;
        }
        let p = c.peer.clone()?;
        // Built only once there is a session to wait on (no allocation when alone).
        let (w, answers) = Waiter::new(receipt);
        let id = c.r.register(p.epoch, offset, len, Instant::now(), w).ok()?;
        Some((p, id, answers))
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
    ) -> Result<(), Errno> {
        let mut acks = acks;
        loop {
            if let Some(out) = comp.ready() {
                if out.out_of_sync && self.diskless() {
                    // Written before the detach, on a disk no longer read, and not on the
                    // peer: it exists nowhere.
                    return Err(Errno::EIO);
                }
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
    pub async fn flush(&self) -> Result<(), Errno> {
        let peer = self.peer();
        let mut comp = Completion::new(self.protocol(), true, peer.is_some());
        let acks = match &peer {
            None => None,
            Some(p) => {
                let answers = self.send_flush(p, false).await;
                settle(&mut comp, answers)
            }
        };
        if self.cfg.is_some() && self.diskless() {
            comp.peer_only();
        } else {
            loop {
                match self.store.flush().await {
                    Err(e) => match self.local_fault("flush", 0, e).await {
                        Fault::Detached => comp.peer_only(),
                        Fault::Stands => comp.local_done(Err(e)),
                        Fault::Retry => continue,
                    },
                    r => comp.local_done(r),
                }
                break;
            }
        }
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
    ) -> Result<(), Errno> {
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
    ) -> Result<(), Errno> {
        self.writable()?;
        let gate = Arc::clone(&self.io_gate).read_owned().await;
        let _al = self.al_begin_or_detach(offset, len).await?;
        let _range = self.locks.lock(offset, len).await;
        // `None`: no local part (Diskless, or detached by this request's failure).
        let local = if self.diskless() {
            if fast_only {
                return Err(Errno::EOPNOTSUPP); // the peer's speed is not known here
            }
            None
        } else {
            loop {
                match self.store.write_zeroes(offset, len, fua, may_trim, fast_only).await {
                    Err(Errno::EOPNOTSUPP) => return Err(Errno::EOPNOTSUPP), // nothing happened
                    Err(e) => match self.local_fault("write zeroes", offset, e).await {
                        Fault::Detached => break None,
                        Fault::Stands => break Some(Err(e)),
                        Fault::Retry => {}
                    },
                    r => break Some(r),
                }
            }
        };
        // Registered only now: a request registered and never sent would wait for an answer
        // until the link's timeout.
        let reg = self.register_live(offset, len);
        let mut comp = Completion::new(self.protocol(), fua, reg.is_some());
        let mut flags = if fua { F_FUA } else { 0 };
        if may_trim {
            flags |= F_MAY_TRIM;
        }
        let l = u32::try_from(len).expect("zero pieces are at most ZERO_PIECE");
        let mut acks = None;
        if let Some((p, id, answers)) = reg {
            let f = small_frame(Kind::Zero, flags, id, offset, &l.to_be_bytes());
            acks = settle(&mut comp, p.send(f).await.then_some(answers));
        }
        match local {
            Some(r) => comp.local_done(r),
            None => comp.peer_only(),
        }
        self.complete(comp, acks, offset, len, Some(gate)).await
    }

    /// TRIM (see [`Volume::zero`]); a single-node volume just punches a hole.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        if self.cfg.is_none() {
            return self.store.trim(offset, len, fua).await;
        }
        self.zero(offset, len, fua, true, false).await
    }

    /// Readahead hint.
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), Errno> {
        if self.cfg.is_some() && self.diskless() {
            return Ok(()); // a hint; nothing local to warm
        }
        self.store.cache(offset, len)
    }

    /// Allocation status.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        max: usize,
    ) -> Result<Vec<Extent>, Errno> {
        if self.cfg.is_some() && self.diskless() {
            // Not known without the disk: all data (always a correct answer).
            return Ok(vec![Extent { len, flags: 0 }]);
        }
        self.store.block_status(offset, len, max).await
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

/// New writes go to the peer in this connection state (not while it is being torn down).
fn replicating(conn: ConnState) -> bool {
    match conn {
        ConnState::Connected
        | ConnState::SyncSource
        | ConnState::SyncTarget
        | ConnState::VerifySource
        | ConnState::VerifyTarget => true,
        ConnState::StandAlone | ConnState::Connecting | ConnState::Disconnecting => false,
    }
}
