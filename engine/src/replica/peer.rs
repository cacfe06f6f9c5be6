//! One peer's live session, as the Primary's write path sees it: the requests sent and not yet
//! answered, and the transfer log of what the peer acknowledged but has not made durable.
//!
//! Generic over `W`, what waits for an answer: the executor's reply channels, the simulation's
//! client bookkeeping. A later issue adds Secondaries by holding one of these per peer.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::translog::TransferLog;

/// A request sent to the peer and not yet answered.
#[derive(Debug)]
pub struct Pending<W> {
    pub offset: u64,
    pub len: u64,
    /// When it was sent (a peer that leaves a request unanswered for `timeout` is dropped).
    pub sent: Instant,
    /// A flush (its answer closes transfer-log epochs), not a write.
    pub flush: bool,
    pub waiter: W,
}

/// A live session with one peer.
#[derive(Debug)]
pub struct PeerSession<W> {
    /// Which session this is (a write that looked up an older one cannot register here).
    pub epoch: u64,
    next_id: u64,
    /// By id: ids rise with time, so the first entry is the oldest.
    pending: BTreeMap<u64, Pending<W>>,
    pub tl: TransferLog,
}

impl<W> PeerSession<W> {
    pub fn new(epoch: u64, tl: TransferLog) -> Self {
        Self { epoch, next_id: 1, pending: BTreeMap::new(), tl }
    }

    /// A new request; its id goes in the frame.
    pub fn register(&mut self, offset: u64, len: u64, flush: bool, now: Instant, waiter: W) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, Pending { offset, len, sent: now, flush, waiter });
        id
    }

    /// A flush to the peer: the open transfer-log epoch closes first, so everything in it was
    /// acknowledged before the flush left. `ours`: the transfer log asked for it.
    pub fn register_flush(&mut self, now: Instant, ours: bool, waiter: W) -> u64 {
        let id = self.register(0, 0, true, now, waiter);
        self.tl.barrier(id, ours);
        id
    }

    /// The waiter of a request still in flight (a receipt under protocol B).
    pub fn waiter_mut(&mut self, id: u64) -> Option<&mut W> {
        self.pending.get_mut(&id).map(|p| &mut p.waiter)
    }

    /// Removes an answered request.
    pub fn take(&mut self, id: u64) -> Option<Pending<W>> {
        self.pending.remove(&id)
    }

    /// When the oldest unanswered request was sent.
    pub fn oldest(&self) -> Option<Instant> {
        self.pending.first_key_value().map(|(_, p)| p.sent)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Everything in flight, oldest first (the session ends).
    pub(super) fn drain(&mut self) -> Vec<Pending<W>> {
        std::mem::take(&mut self.pending).into_values().collect()
    }
}
