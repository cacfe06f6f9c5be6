//! The transfer log: what the peer has acknowledged but not yet made durable.
//!
//! A peer's acknowledgement of a write means "in its page cache (or its disk's volatile cache)",
//! not "on stable storage". Were the Primary to forget a write at that point, a power loss of
//! the Secondary would lose it while both nodes went on to report "in sync". So the Primary keeps
//! every acknowledged range here, grouped in epochs, until a flush on the peer covers it:
//!
//! - acknowledged ranges go into the open epoch ([`TransferLog::acked`]);
//! - sending a flush to the peer closes the open epoch under that flush's request id
//!   ([`TransferLog::barrier`]); everything in it was written by the peer before the flush
//!   reached it (the peer acknowledged it before we sent the flush, on one ordered stream);
//! - the flush's acknowledgement forgets that epoch and every older one
//!   ([`TransferLog::flushed`]);
//! - when the link is lost, every range still held is out of sync ([`TransferLog::drain`]).
//!
//! [`TransferLog::due`] says when to ask for a flush: after `interval` since the open epoch's
//! first range, or once it holds `max_bytes`, with at most one such flush outstanding. That
//! bounds what a Secondary's power loss costs (a resync of at most that much), never a silent
//! divergence. This is DRBD's transfer log and barrier epochs, with ranges rather than requests;
//! DRBD flushes at every epoch boundary, we at a bounded interval, because a flush on this path
//! costs the Secondary a full writeback.
//!
//! Pure: time is an argument. Memory is bounded by what is acknowledged between two flushes
//! (adjacent ranges merge, so a sequential stream is one entry).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most ranges the open epoch holds before a flush is asked for (the memory bound: 16 bytes a
/// range, so 16 MiB), whatever the other bounds say.
pub const MAX_RANGES: usize = 1 << 20;

/// When to ask the peer for a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Longest a range waits for a flush to cover it.
    pub interval: Duration,
    /// Most bytes held in the open epoch before a flush is asked for.
    pub max_bytes: u64,
}

/// One epoch: ranges acknowledged between two flushes.
#[derive(Debug, Default, Clone)]
struct Epoch {
    ranges: Vec<(u64, u64)>,
    bytes: u64,
    /// The activity-log extents its ranges touch (see [`TransferLog::pins`]).
    extents: std::collections::BTreeSet<u32>,
}

impl Epoch {
    fn add(&mut self, offset: u64, len: u64, extent: u64) {
        self.bytes = self.bytes.saturating_add(len);
        let (first, last) = (offset / extent, (offset.saturating_add(len) - 1) / extent);
        for e in first..=last {
            self.extents.insert(u32::try_from(e).unwrap_or(u32::MAX));
        }
        if let Some((o, l)) = self.ranges.last_mut()
            && o.checked_add(*l) == Some(offset)
        {
            *l += len;
            return;
        }
        self.ranges.push((offset, len));
    }
}

/// The transfer log of one peer.
#[derive(Debug, Clone)]
pub struct TransferLog {
    bound: Bound,
    /// Bytes of an activity-log extent.
    extent: u64,
    open: Epoch,
    /// When the open epoch got its first range.
    opened: Option<Instant>,
    /// Closed epochs, oldest first, each with the id of the flush that covers it.
    closed: VecDeque<(u64, Epoch)>,
    /// The id of the flush [`TransferLog::due`] asked for, until it is answered.
    asked: Option<u64>,
    /// A flush is wanted now, whatever the bound says.
    hurry: bool,
}

impl TransferLog {
    /// An empty log; `extent` is the activity log's extent size (see [`TransferLog::pins`]).
    /// `volume` is the replicated size: on a volume no larger than `bound.max_bytes` the size
    /// bound holds by itself (a power loss of the peer can never cost more than the volume to
    /// resync), so only the interval and the memory bound ask for flushes.
    pub fn new(bound: Bound, extent: u64, volume: u64) -> Self {
        let bound = Bound {
            max_bytes: if volume <= bound.max_bytes { u64::MAX } else { bound.max_bytes },
            ..bound
        };
        Self {
            bound,
            extent: extent.max(1),
            open: Epoch::default(),
            opened: None,
            closed: VecDeque::new(),
            asked: None,
            hurry: false,
        }
    }

    /// Whether activity-log extent `e` holds writes the peer has not made durable: it must
    /// stay in the activity log until a flush covers them (see
    /// `ActivityLog::begin_unless`).
    pub fn pins(&self, e: u32) -> bool {
        self.open.extents.contains(&e) || self.closed.iter().any(|(_, ep)| ep.extents.contains(&e))
    }

    /// Asks for a flush at the next chance (a write waits for a pinned extent).
    pub fn hurry(&mut self) {
        self.hurry = true;
    }

    /// The peer acknowledged `[offset, offset+len)` (written, not yet durable).
    pub fn acked(&mut self, now: Instant, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.opened.is_none() {
            self.opened = Some(now);
        }
        self.open.add(offset, len, self.extent);
    }

    /// Whether a flush should be sent now (none of ours outstanding, and the open epoch is
    /// old or big enough).
    pub fn due(&self, now: Instant) -> bool {
        if self.asked.is_some() {
            return false;
        }
        if self.hurry && self.held_bytes() > 0 {
            return true;
        }
        let Some(opened) = self.opened else { return false };
        now.saturating_duration_since(opened) >= self.bound.interval
            || self.open.bytes >= self.bound.max_bytes
            || self.open.ranges.len() >= MAX_RANGES
    }

    /// A flush with request id `id` is being sent: it covers the open epoch. `ours` marks a
    /// flush the log asked for (see [`TransferLog::due`]), as opposed to a client's FLUSH.
    pub fn barrier(&mut self, id: u64, ours: bool) {
        if ours {
            self.asked = Some(id);
            self.hurry = false;
        }
        if self.opened.take().is_some() {
            self.closed.push_back((id, std::mem::take(&mut self.open)));
        }
    }

    /// The flush `id` was answered. On success, every epoch it covers is durable on the peer and
    /// forgotten; on failure their ranges come back, to be marked out of sync now.
    pub fn flushed(&mut self, id: u64, ok: bool) -> Vec<(u64, u64)> {
        if self.asked == Some(id) {
            self.asked = None;
        }
        let mut failed = Vec::new();
        // Flush ids grow with the request ids, so epochs up to `id` are covered.
        while self.closed.front().is_some_and(|(i, _)| *i <= id) {
            let (_, e) = self.closed.pop_front().expect("checked");
            if !ok {
                failed.extend(e.ranges);
            }
        }
        failed
    }

    /// The link is lost: every range not known durable on the peer, to be marked out of sync.
    pub fn drain(&mut self) -> Vec<(u64, u64)> {
        self.asked = None;
        self.hurry = false;
        self.opened = None;
        let mut out = std::mem::take(&mut self.open).ranges;
        for (_, e) in self.closed.drain(..) {
            out.extend(e.ranges);
        }
        out
    }

    /// Bytes held (status: what a power loss of the peer would cost at most).
    pub fn held_bytes(&self) -> u64 {
        self.closed.iter().map(|(_, e)| e.bytes).sum::<u64>() + self.open.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bound = Bound { interval: Duration::from_millis(1000), max_bytes: 1 << 20 };

    #[test]
    fn acknowledged_ranges_are_held_until_a_flush_covers_them() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        tl.acked(t0, 0, 4096);
        tl.acked(t0, 8192, 4096);
        assert_eq!(tl.held_bytes(), 8192);
        tl.barrier(7, false);
        // Acknowledged after the flush was sent: not covered by it.
        tl.acked(t0, 65536, 4096);
        assert!(tl.flushed(7, true).is_empty());
        assert_eq!(tl.held_bytes(), 4096);
        assert_eq!(tl.drain(), vec![(65536, 4096)]);
        assert_eq!(tl.held_bytes(), 0);
    }

    #[test]
    fn a_lost_link_returns_everything_not_yet_durable() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        tl.acked(t0, 0, 4096);
        tl.barrier(3, true);
        tl.acked(t0, 4096 * 10, 4096);
        tl.barrier(5, false);
        tl.acked(t0, 4096 * 20, 4096);
        let mut d = tl.drain();
        d.sort_unstable();
        assert_eq!(d, vec![(0, 4096), (40960, 4096), (81920, 4096)]);
        assert!(tl.drain().is_empty(), "drained once");
        assert!(!tl.due(t0 + Duration::from_secs(60)), "nothing held, nothing due");
    }

    #[test]
    fn a_later_flush_covers_the_older_epochs_too() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        tl.acked(t0, 0, 4096);
        tl.barrier(3, true);
        tl.acked(t0, 4096, 4096);
        tl.barrier(4, false);
        assert!(tl.flushed(4, true).is_empty());
        assert_eq!(tl.held_bytes(), 0);
        // The answer to 3 comes late: nothing left to forget, and ours is no longer asked.
        assert!(tl.flushed(3, true).is_empty());
        tl.acked(t0, 0, 1);
        assert!(tl.due(t0 + B.interval));
    }

    #[test]
    fn a_failed_flush_returns_its_ranges() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        tl.acked(t0, 0, 4096);
        tl.barrier(9, true);
        assert_eq!(tl.flushed(9, false), vec![(0, 4096)]);
        assert_eq!(tl.held_bytes(), 0);
    }

    #[test]
    fn a_flush_is_due_after_the_interval_or_the_size_and_one_at_a_time() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        assert!(!tl.due(t0), "empty");
        tl.acked(t0, 0, 4096);
        assert!(!tl.due(t0 + Duration::from_millis(999)));
        assert!(tl.due(t0 + B.interval), "interval reached");
        tl.barrier(1, true);
        tl.acked(t0, 0, B.max_bytes);
        assert!(!tl.due(t0 + B.interval * 5), "ours still outstanding");
        tl.flushed(1, true);
        assert!(tl.due(t0 + Duration::from_millis(1)), "size reached");
        // A client's flush answered meanwhile does not clear ours.
        tl.barrier(2, true);
        tl.acked(t0, 0, 4096);
        tl.barrier(3, false);
        tl.flushed(3, true);
        tl.acked(t0, 0, 4096);
        assert!(!tl.due(t0 + B.interval * 5), "ours (2) not answered yet");
    }

    #[test]
    fn on_a_volume_within_the_size_bound_only_time_and_memory_ask_for_flushes() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, B.max_bytes);
        tl.acked(t0, 0, B.max_bytes * 3);
        assert!(!tl.due(t0), "a volume of max_bytes can never need more to resync");
        assert!(tl.due(t0 + B.interval));
        let mut tl = TransferLog::new(B, 4096, B.max_bytes);
        for i in 0..MAX_RANGES as u64 {
            tl.acked(t0, i * 8192, 4096); // never adjacent: one range each
        }
        assert!(tl.due(t0), "the memory bound");
    }

    #[test]
    fn adjacent_ranges_merge_so_a_stream_is_one_entry() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        for i in 0..1000u64 {
            tl.acked(t0, i * 4096, 4096);
        }
        assert_eq!(tl.open.ranges.len(), 1);
        assert_eq!(tl.drain(), vec![(0, 4096 * 1000)]);
    }

    #[test]
    fn extents_stay_pinned_until_a_flush_covers_them() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 1 << 20, 1 << 40);
        tl.acked(t0, (3 << 20) - 4096, 8192); // straddles extents 2 and 3
        assert!(tl.pins(2) && tl.pins(3) && !tl.pins(4));
        tl.barrier(1, false);
        assert!(tl.pins(2), "closed, not yet answered");
        tl.acked(t0, 5 << 20, 4096);
        tl.flushed(1, true);
        assert!(!tl.pins(2) && !tl.pins(3) && tl.pins(5));
        // A waiting write hurries the flush along.
        assert!(!tl.due(t0));
        tl.hurry();
        assert!(tl.due(t0));
        tl.barrier(2, true);
        assert!(!tl.due(t0 + B.interval * 10), "ours is outstanding");
        tl.drain();
        assert!(!tl.pins(5));
    }

    #[test]
    fn a_barrier_with_nothing_open_closes_no_epoch() {
        let t0 = crate::testutil::origin();
        let mut tl = TransferLog::new(B, 4096, 1 << 40);
        tl.barrier(1, false);
        assert!(tl.closed.is_empty());
        tl.acked(t0, u64::MAX - 10, 10);
        tl.acked(t0, 0, 0);
        assert_eq!(tl.drain(), vec![(u64::MAX - 10, 10)]);
    }
}
