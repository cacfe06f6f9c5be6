//! The activity log: the set of "hot" extents (4 MiB by default) a Primary may be writing to.
//! Before a write touches a cold extent, the new set is written to disk; after a Primary crash,
//! every extent in the last set is marked out of sync, so the crash costs a resync of the hot set
//! (at most `extents × extent_size`), never of the whole volume.
//!
//! Pure: [`ActivityLog::begin`] says whether a write may go ahead or which transaction must be
//! persisted first; the driver persists [`ActivityLog::record`] and calls `commit`. Extents with
//! writes in flight are never evicted; the least recently used idle one is.

use std::collections::HashMap;

/// "DUETALOG".
const MAGIC: u64 = 0x4455_4554_414c_4f47;

/// What a write needs before it may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Every extent is hot: go (the references are taken).
    Hot,
    /// Persist a transaction adding `add` and evicting `evict` first, then call `commit`.
    Need { add: Vec<u32>, evict: Vec<u32> },
    /// Every slot holds an extent with writes in flight: retry after some complete.
    Busy,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    refs: u32,
    used: u64,
}

/// The in-memory activity log.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    extent_size: u64,
    capacity: usize,
    hot: HashMap<u32, Entry>,
    clock: u64,
    seq: u64,
}

/// Why an on-disk activity-log record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlError {
    #[error("activity log record is not duet's (bad magic)")]
    Magic,
    #[error("activity log record checksum mismatch (torn write)")]
    Checksum,
    #[error("activity log record is malformed: {0}")]
    Malformed(&'static str),
}

impl ActivityLog {
    /// An empty log of `capacity` extents of `extent_size` bytes.
    pub fn new(extent_size: u64, capacity: usize) -> Self {
        Self { extent_size, capacity: capacity.max(1), hot: HashMap::new(), clock: 0, seq: 0 }
    }

    /// Bytes on disk of one record slot for `capacity` extents (whole 4 KiB blocks).
    pub fn slot_bytes(capacity: usize) -> u64 {
        (24 + 4 * capacity as u64 + 4).div_ceil(4096) * 4096
    }

    fn extents(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u32> {
        let first = offset / self.extent_size;
        let last = (offset + len.max(1) - 1) / self.extent_size;
        let c = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
        c(first)..=c(last)
    }

    /// Asks to write `[offset, offset+len)`.
    pub fn begin(&mut self, offset: u64, len: u64) -> Begin {
        self.begin_unless(offset, len, |_| false)
    }

    /// [`ActivityLog::begin`], never evicting an extent for which `pinned` says so: one that
    /// holds writes the peer has acknowledged but not yet flushed (the transfer log). Were it
    /// evicted, a crash of this node together with a power loss of the peer would lose those
    /// writes with nothing marking them: the peer's copy was in its cache, and after the crash
    /// only the log's extents are resynced. [`Begin::Busy`] then: the next peer flush frees it.
    pub fn begin_unless(&mut self, offset: u64, len: u64, pinned: impl Fn(u32) -> bool) -> Begin {
        let range = self.extents(offset, len);
        let add: Vec<u32> = range.clone().filter(|e| !self.hot.contains_key(e)).collect();
        if add.is_empty() {
            self.clock += 1;
            for e in range {
                let ent = self.hot.get_mut(&e).expect("hot");
                ent.refs += 1;
                ent.used = self.clock;
            }
            return Begin::Hot;
        }
        let free = self.capacity.saturating_sub(self.hot.len());
        let mut evict = Vec::new();
        if add.len() > free {
            let mut idle: Vec<(u64, u32)> = self
                .hot
                .iter()
                .filter(|(e, ent)| ent.refs == 0 && !range.contains(e) && !pinned(**e))
                .map(|(e, ent)| (ent.used, *e))
                .collect();
            idle.sort_unstable();
            let need = add.len() - free;
            if idle.len() < need {
                return Begin::Busy;
            }
            evict = idle.into_iter().take(need).map(|(_, e)| e).collect();
        }
        Begin::Need { add, evict }
    }

    /// Records a persisted transaction and takes the write's references.
    pub fn commit(&mut self, offset: u64, len: u64, add: &[u32], evict: &[u32]) {
        for e in evict {
            self.hot.remove(e);
        }
        for &e in add {
            self.hot.insert(e, Entry { refs: 0, used: 0 });
        }
        self.seq += 1;
        assert_eq!(
            self.begin(offset, len),
            Begin::Hot,
            "a committed transaction makes the range hot"
        );
    }

    /// The record that a transaction persists: the hot set after applying `add` and `evict`.
    pub fn record(&self, add: &[u32], evict: &[u32]) -> Vec<u8> {
        let mut set: Vec<u32> = self
            .hot
            .keys()
            .copied()
            .filter(|e| !evict.contains(e))
            .chain(add.iter().copied())
            .collect();
        set.sort_unstable();
        let mut b = vec![0u8; usize::try_from(Self::slot_bytes(self.capacity)).expect("small")];
        b[0..8].copy_from_slice(&MAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&(self.seq + 1).to_be_bytes());
        b[16..20].copy_from_slice(&u32::try_from(set.len()).expect("≤ capacity").to_be_bytes());
        for (i, e) in set.iter().enumerate() {
            b[24 + 4 * i..28 + 4 * i].copy_from_slice(&e.to_be_bytes());
        }
        let end = 24 + 4 * set.len();
        let crc = crc32fast::hash(&b[..end]);
        b[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes a record: its sequence and hot extents.
    pub fn decode(b: &[u8]) -> Result<(u64, Vec<u32>), AlError> {
        if b.len() < 28 {
            return Err(AlError::Malformed("short"));
        }
        if b[0..8] != MAGIC.to_be_bytes() {
            return Err(AlError::Magic);
        }
        let seq = u64::from_be_bytes(b[8..16].try_into().expect("8"));
        let n = u32::from_be_bytes(b[16..20].try_into().expect("4")) as usize;
        let end = n.checked_mul(4).and_then(|x| x.checked_add(24)).filter(|&e| e + 4 <= b.len());
        let Some(end) = end else { return Err(AlError::Malformed("count beyond the slot")) };
        let crc = u32::from_be_bytes(b[end..end + 4].try_into().expect("4"));
        if crc != crc32fast::hash(&b[..end]) {
            return Err(AlError::Checksum);
        }
        let set = (0..n)
            .map(|i| u32::from_be_bytes(b[24 + 4 * i..28 + 4 * i].try_into().expect("4")))
            .collect();
        Ok((seq, set))
    }

    /// Picks the newer valid record of two slots (a torn write falls back to the other); both
    /// empty/never written → no hot extents.
    pub fn pick(a: &[u8], b: &[u8]) -> Result<(u64, Vec<u32>), AlError> {
        let never = |x: &[u8]| x.iter().all(|&v| v == 0);
        match (Self::decode(a), Self::decode(b)) {
            (Ok(x), Ok(y)) => Ok(if x.0 >= y.0 { x } else { y }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(_), Err(_)) if never(a) && never(b) => Ok((0, Vec::new())),
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// Continues numbering after a loaded record (so the next write goes to the other slot).
    pub fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
    /// Sequence of the last committed transaction (slot = seq % 2).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Drops the write's references.
    pub fn end(&mut self, offset: u64, len: u64) {
        for e in self.extents(offset, len) {
            if let Some(ent) = self.hot.get_mut(&e) {
                ent.refs = ent.refs.saturating_sub(1);
            }
        }
    }

    /// Whether `[offset, offset+len)` is one piece of [`ActivityLog::pieces`] (almost every
    /// request): the caller can skip the split.
    pub fn fits(&self, offset: u64, len: u64) -> bool {
        let r = self.extents(offset, len);
        u64::from(r.end() - r.start()) < (self.capacity / 2).max(1) as u64
    }

    /// Splits `[offset, offset+len)` into pieces of at most half the log's extents each, cut at
    /// extent boundaries. A request that spans more extents than the log holds could never
    /// become hot at once ([`Begin::Busy`] forever, even with an empty log); half leaves room
    /// for the other writes in flight. Almost every request is one piece.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let most = (self.capacity / 2).max(1) as u64 * self.extent_size;
        let mut out = Vec::new();
        let (mut o, end) = (offset, offset.saturating_add(len));
        while o < end {
            let limit = (o / self.extent_size) * self.extent_size + most;
            let e = end.min(limit);
            out.push((o, e - o));
            o = e;
        }
        if out.is_empty() {
            out.push((offset, len));
        }
        out
    }

    /// Byte range of an extent.
    pub fn extent_range(&self, e: u32) -> (u64, u64) {
        (u64::from(e) * self.extent_size, self.extent_size)
    }
    /// Hot extents now.
    pub fn hot_count(&self) -> usize {
        self.hot.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: u64 = 4 << 20;

    fn go(al: &mut ActivityLog, off: u64, len: u64) -> Option<(Vec<u32>, Vec<u32>)> {
        match al.begin(off, len) {
            Begin::Hot => None,
            Begin::Need { add, evict } => {
                al.commit(off, len, &add, &evict);
                Some((add, evict))
            }
            Begin::Busy => panic!("busy"),
        }
    }

    #[test]
    fn cold_extents_need_a_transaction_hot_ones_do_not() {
        let mut al = ActivityLog::new(X, 2);
        assert_eq!(go(&mut al, 0, 4096), Some((vec![0], vec![])));
        assert_eq!(go(&mut al, 4096, 4096), None);
        // A write straddling two extents adds the second.
        assert_eq!(go(&mut al, X - 4096, 8192), Some((vec![1], vec![])));
        al.end(0, 4096);
        al.end(4096, 4096);
        al.end(X - 4096, 8192);
        // Third extent evicts the least recently used idle one (0, last used before 1).
        assert_eq!(go(&mut al, 2 * X, 1), Some((vec![2], vec![0])));
    }

    #[test]
    fn busy_extents_are_never_evicted() {
        let mut al = ActivityLog::new(X, 1);
        go(&mut al, 0, 1);
        assert_eq!(al.begin(X, 1), Begin::Busy);
        al.end(0, 1);
        assert_eq!(al.begin(X, 1), Begin::Need { add: vec![1], evict: vec![0] });
    }

    #[test]
    fn records_round_trip_and_torn_ones_fall_back() {
        let mut al = ActivityLog::new(X, 1237);
        go(&mut al, 0, 1);
        let rec1 = al.record(&[], &[]);
        go(&mut al, 9 * X, 1);
        let rec2 = al.record(&[5], &[0]);
        assert_eq!(ActivityLog::decode(&rec1).unwrap(), (2, vec![0]));
        assert_eq!(ActivityLog::decode(&rec2).unwrap(), (3, vec![5, 9]));
        assert_eq!(rec1.len() as u64, ActivityLog::slot_bytes(1237));
        assert_eq!(ActivityLog::pick(&rec1, &rec2).unwrap().0, 3);
        let mut torn = rec2.clone();
        torn[30] ^= 1;
        assert_eq!(ActivityLog::decode(&torn), Err(AlError::Checksum));
        assert_eq!(ActivityLog::pick(&rec1, &torn).unwrap().0, 2);
        let zero = vec![0u8; rec1.len()];
        assert_eq!(ActivityLog::pick(&zero, &zero).unwrap(), (0, vec![]));
        assert_eq!(ActivityLog::pick(&torn, &zero), Err(AlError::Checksum));
        let mut hostile = rec1.clone();
        hostile[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(ActivityLog::decode(&hostile), Err(AlError::Malformed(_))));
        assert_eq!(ActivityLog::decode(&[1; 64]), Err(AlError::Magic));
    }

    #[test]
    fn extents_pinned_by_the_transfer_log_are_not_evicted() {
        let mut al = ActivityLog::new(4096, 2);
        for e in 0..2u64 {
            let Begin::Need { add, evict } = al.begin(e * 4096, 4096) else { panic!() };
            al.commit(e * 4096, 4096, &add, &evict);
            al.end(e * 4096, 4096);
        }
        // Extent 0 is the least recently used, but pinned: extent 1 goes instead.
        assert_eq!(
            al.begin_unless(2 * 4096, 4096, |e| e == 0),
            Begin::Need { add: vec![2], evict: vec![1] }
        );
        // Both pinned: busy until a flush frees one.
        assert_eq!(al.begin_unless(2 * 4096, 4096, |_| true), Begin::Busy);
        assert_eq!(al.begin(2 * 4096, 4096), Begin::Need { add: vec![2], evict: vec![0] });
    }

    #[test]
    fn a_request_wider_than_the_log_is_split_into_pieces_that_fit() {
        let mut al = ActivityLog::new(64 << 10, 7);
        // 32 MiB (NBD's largest write) over 64 KiB extents: 512 extents, the log holds 7.
        let (off, len) = (12345, 32 << 20);
        let p = al.pieces(off, len);
        assert!(p.len() > 1);
        assert_eq!(p[0].0, off);
        assert_eq!(p.iter().map(|x| x.1).sum::<u64>(), len, "the pieces cover the request");
        for w in p.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "contiguous");
        }
        for &(o, l) in &p {
            assert!(al.extents(o, l).count() <= 3, "{o}+{l} spans more than half the log");
            // Each piece becomes hot by itself, even while another piece is hot.
            match al.begin(o, l) {
                Begin::Need { add, evict } => al.commit(o, l, &add, &evict),
                b => assert_eq!(b, Begin::Hot),
            }
            al.end(o, l);
        }
        // The whole request at once could never go.
        assert_eq!(ActivityLog::new(64 << 10, 7).begin(off, len), Begin::Busy);
        assert!(!al.fits(off, len));
        assert!(p.iter().all(|&(o, l)| al.fits(o, l)));
        // A small request is one piece, unchanged; so is an empty one.
        assert!(al.fits(4096, 4096) && al.fits(4096, 0));
        assert_eq!(al.pieces(4096, 4096), vec![(4096, 4096)]);
        assert_eq!(al.pieces(4096, 0), vec![(4096, 0)]);
    }
}
