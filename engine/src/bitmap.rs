//! The out-of-sync bitmap: one bit per `granularity` bytes of the volume (4 KiB by default); a
//! set bit means "this block may differ from the peer". Pure, in memory; `replicator::repl::meta` stores
//! it in 4 KiB pages and writes back only the pages marked dirty.
//!
//! On the wire it travels as runs of set bits ([`Bitmap::encode_runs`]), so an in-sync volume
//! costs a few bytes whatever its size, and the receiver ORs it into its own.

use bytes::{BufMut, BytesMut};

use crate::wire::{Cursor, Kind, WireError};

/// Bytes in one on-disk bitmap page.
pub const PAGE: usize = 4096;
const BITS_PER_PAGE: u64 = (PAGE * 8) as u64;

/// The bitmap.
#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    granularity: u64,
    weight: u64,
    dirty: Vec<bool>,
}

impl Bitmap {
    /// A clear bitmap for `size` bytes at `granularity` bytes per bit.
    pub fn new(size: u64, granularity: u64) -> Self {
        let bits = size.div_ceil(granularity);
        let words = usize::try_from(bits.div_ceil(64)).expect("bitmap fits in memory");
        let pages = usize::try_from(bits.div_ceil(BITS_PER_PAGE)).expect("fits");
        Self { words: vec![0; words], bits, granularity, weight: 0, dirty: vec![false; pages] }
    }

    /// Bits in the map.
    pub fn bits(&self) -> u64 {
        self.bits
    }
    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }
    /// Set bits.
    pub fn weight(&self) -> u64 {
        self.weight
    }
    /// Bytes marked out of sync.
    pub fn out_of_sync_bytes(&self) -> u64 {
        self.weight * self.granularity
    }
    /// Bytes of the on-disk form (whole pages).
    pub fn disk_bytes(&self) -> u64 {
        self.dirty.len() as u64 * PAGE as u64
    }

    /// Bits covering the byte range `[offset, offset+len)`.
    pub fn bit_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / self.granularity;
        let end = (offset + len).div_ceil(self.granularity).min(self.bits);
        (first, end.max(first))
    }

    fn update(&mut self, first: u64, end: u64, set: bool) -> u64 {
        let mut changed = 0;
        let mut b = first;
        while b < end {
            let w = usize::try_from(b / 64).expect("in range");
            let lo = b % 64;
            let n = (64 - lo).min(end - b);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << lo };
            let old = self.words[w];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                changed += u64::from((old ^ new).count_ones());
                self.words[w] = new;
                self.dirty[usize::try_from(b / BITS_PER_PAGE).expect("in range")] = true;
            }
            b += n;
        }
        if set {
            self.weight += changed;
        } else {
            self.weight -= changed;
        }
        changed
    }

    /// Marks a byte range out of sync. Returns the bits that changed.
    pub fn set_range(&mut self, offset: u64, len: u64) -> u64 {
        let (a, b) = self.bit_range(offset, len);
        self.update(a, b, true)
    }
    /// Marks a byte range in sync (only whole blocks inside it are cleared by callers that pass
    /// block-aligned ranges).
    pub fn clear_range(&mut self, offset: u64, len: u64) -> u64 {
        let (a, b) = self.bit_range(offset, len);
        self.update(a, b, false)
    }
    /// Sets bits `[first, end)`.
    pub fn set_bits(&mut self, first: u64, end: u64) -> u64 {
        self.update(first, end.min(self.bits), true)
    }
    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.update(0, self.bits, true);
    }
    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.update(0, self.bits, false);
    }
    /// Is bit `b` set.
    pub fn get(&self, b: u64) -> bool {
        b < self.bits
            && self.words[usize::try_from(b / 64).expect("in range")] & (1 << (b % 64)) != 0
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut w = usize::try_from(from / 64).expect("in range");
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let b = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (b < self.bits).then_some(b);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// The end of the run of set bits starting at `from`, at most `max` bits long.
    pub fn run_end(&self, from: u64, max: u64) -> u64 {
        let limit = from.saturating_add(max).min(self.bits);
        let mut b = from;
        while b < limit && self.get(b) {
            b += 1;
        }
        b
    }

    /// ORs `other` in (same geometry).
    pub fn or(&mut self, other: &Bitmap) {
        let mut b = 0;
        while let Some(s) = other.next_set(b) {
            let e = other.run_end(s, u64::MAX);
            self.set_bits(s, e);
            b = e;
        }
    }

    /// Runs of set bits as (first, count) pairs, at most `max_runs`, starting at bit `from`.
    /// Returns the payload and the bit to continue from (None when done).
    pub fn encode_runs(&self, from: u64, max_runs: usize, out: &mut BytesMut) -> Option<u64> {
        let mut b = from;
        for _ in 0..max_runs {
            let s = self.next_set(b)?;
            let e = self.run_end(s, u64::MAX);
            out.put_u64(s);
            out.put_u64(e - s);
            b = e;
        }
        self.next_set(b).map(|_| b)
    }

    /// ORs a payload of runs in; runs outside the map are refused.
    pub fn apply_runs(&mut self, payload: &[u8]) -> Result<u64, WireError> {
        if !payload.len().is_multiple_of(16) {
            return Err(WireError::Payload(Kind::Bitmap, "not a whole number of runs"));
        }
        let mut c = Cursor::new(Kind::Bitmap, payload);
        let mut runs = Vec::with_capacity(payload.len() / 16);
        for _ in 0..payload.len() / 16 {
            let (s, n) = (c.u64()?, c.u64()?);
            if n == 0 || s >= self.bits || n > self.bits - s {
                return Err(WireError::Payload(Kind::Bitmap, "run outside the volume"));
            }
            runs.push((s, n));
        }
        Ok(runs.into_iter().map(|(s, n)| self.set_bits(s, s + n)).sum())
    }

    /// Pages changed since the last [`Bitmap::take_dirty`], cleared.
    pub fn take_dirty(&mut self) -> Vec<usize> {
        let v: Vec<usize> = (0..self.dirty.len()).filter(|&i| self.dirty[i]).collect();
        for &i in &v {
            self.dirty[i] = false;
        }
        v
    }
    /// Marks every page dirty (after a wholesale change).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.iter_mut().for_each(|d| *d = true);
    }
    /// Marks the pages covering a byte range dirty.
    pub fn mark_dirty(&mut self, offset: u64, len: u64) {
        let (a, b) = self.bit_range(offset, len);
        if b > a {
            for p in a / BITS_PER_PAGE..=(b - 1) / BITS_PER_PAGE {
                self.dirty[usize::try_from(p).expect("in range")] = true;
            }
        }
    }

    /// Page `i` in its on-disk form (little-endian words).
    pub fn page(&self, i: usize) -> Vec<u8> {
        let words = PAGE / 8;
        let mut out = vec![0u8; PAGE];
        for (k, w) in self.words.iter().skip(i * words).take(words).enumerate() {
            out[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Loads the whole map from its on-disk form; bits past the end are ignored.
    pub fn load(&mut self, disk: &[u8]) {
        for (i, w) in self.words.iter_mut().enumerate() {
            let b = disk.get(i * 8..i * 8 + 8).map_or([0; 8], |s| s.try_into().expect("8"));
            *w = u64::from_le_bytes(b);
        }
        if let Some(last) = self.words.last_mut() {
            let tail = self.bits % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
        self.weight = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.dirty.iter_mut().for_each(|d| *d = false);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300_000, 1u64..70_000), 1..40)) {
            let size = 300_000u64;
            let mut bm = Bitmap::new(size, 4096);
            let mut model = BTreeSet::new();
            for (set, off, len) in ops {
                let len = len.min(size - off.min(size - 1));
                let off = off.min(size - 1);
                let (a, b) = bm.bit_range(off, len);
                if set { bm.set_range(off, len); for x in a..b { model.insert(x); } }
                else { bm.clear_range(off, len); for x in a..b { model.remove(&x); } }
                prop_assert_eq!(bm.weight(), model.len() as u64);
            }
            let got: BTreeSet<u64> = (0..bm.bits()).filter(|&b| bm.get(b)).collect();
            prop_assert_eq!(&got, &model);
            // Runs round-trip, in small chunks.
            let mut copy = Bitmap::new(size, 4096);
            let mut from = Some(0);
            while let Some(f) = from {
                let mut out = BytesMut::new();
                from = bm.encode_runs(f, 3, &mut out);
                copy.apply_runs(&out).unwrap();
            }
            let got: BTreeSet<u64> = (0..copy.bits()).filter(|&b| copy.get(b)).collect();
            prop_assert_eq!(got, model);
            // Disk form round-trips.
            let mut disk = Vec::new();
            for p in 0..(bm.disk_bytes() as usize / PAGE) { disk.extend(bm.page(p)); }
            let mut loaded = Bitmap::new(size, 4096);
            loaded.load(&disk);
            prop_assert_eq!(loaded.weight(), bm.weight());
        }
    }

    #[test]
    fn hostile_runs_are_refused() {
        let mut bm = Bitmap::new(1 << 20, 4096); // 256 bits
        let mut p = BytesMut::new();
        p.put_u64(250);
        p.put_u64(10);
        assert!(bm.apply_runs(&p).is_err());
        let mut p = BytesMut::new();
        p.put_u64(u64::MAX);
        p.put_u64(2);
        assert!(bm.apply_runs(&p).is_err());
        assert!(bm.apply_runs(&[0; 15]).is_err());
        let mut p = BytesMut::new();
        p.put_u64(0);
        p.put_u64(0);
        assert!(bm.apply_runs(&p).is_err());
        assert_eq!(bm.weight(), 0, "nothing applied from a refused payload");
    }

    #[test]
    fn dirty_pages_and_partial_blocks() {
        let mut bm = Bitmap::new(1 << 30, 4096); // 262144 bits = 8 pages
        assert!(bm.take_dirty().is_empty());
        bm.set_range(4095, 2); // touches blocks 0 and 1
        assert_eq!(bm.weight(), 2);
        bm.set_range(200 << 20, 4096);
        assert_eq!(bm.take_dirty(), vec![0, 1]);
        assert!(bm.take_dirty().is_empty());
        assert_eq!(bm.next_set(2), Some((200 << 20) / 4096));
        assert_eq!(bm.run_end(0, 100), 2);
        bm.set_all();
        assert_eq!(bm.out_of_sync_bytes(), 1 << 30);
    }
}
