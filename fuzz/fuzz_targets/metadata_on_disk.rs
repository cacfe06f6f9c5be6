//! Metadata as read back from a disk that lies: the two superblock copies, the two
//! activity-log slots, and bitmap pages. Never a panic; what decodes is consistent.
#![no_main]

use engine::actlog::ActivityLog;
use engine::bitmap::Bitmap;
use engine::superblock::{BLOCK, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Superblock: one copy, then the pair.
    if let Ok(sb) = Superblock::decode(data) {
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb), "a decoded copy re-encodes to itself");
    }
    if data.len() >= 2 * BLOCK {
        let (a, b) = (&data[..BLOCK], &data[BLOCK..2 * BLOCK]);
        if let Ok((sb, next)) = Superblock::pick(a, b) {
            // `next` is the slot the next write goes to: the other one holds the copy picked.
            let kept = if next == 0 { b } else { a };
            assert_eq!(Superblock::decode(kept), Ok(sb), "the picked copy is a valid one");
            let other = if next == 0 { a } else { b };
            if let Ok(o) = Superblock::decode(other) {
                assert!(o.sequence <= sb.sequence, "the newer valid copy wins");
            }
        }
    }
    // Activity log: a record, then two slots of whatever split.
    if let Ok((_, hot)) = ActivityLog::decode(data) {
        assert!(hot.len() * 4 + 28 <= data.len());
    }
    let half = data.len() / 2;
    let _ = ActivityLog::pick(&data[..half], &data[half..]);
    // Bitmap: any bytes load; the weight is the number of bits set inside the map.
    let bits = u64::from(data.first().copied().unwrap_or(0)) * 64 + u64::from(data.get(1).copied().unwrap_or(1));
    let mut bm = Bitmap::new(bits.max(1) * 4096, 4096);
    bm.load(data);
    assert!(bm.weight() <= bm.bits());
});
