//! The metadata superblock: a 4 KiB block, stored twice (slots A and B) and written alternately
//! with a rising sequence number, so a write torn by a crash leaves the previous good copy to
//! fall back on. Each copy carries a magic, a format version and a CRC32 of the whole block.
//!
//! Pure codec: bytes in, [`Superblock`] or a refusal out (and back). Where the two slots live on
//! disk is `replicator::repl::meta`'s business.

use crate::generation::Generations;

/// Size of one superblock copy.
pub const BLOCK: usize = 4096;
/// "DUETMETA".
pub const MAGIC: u64 = 0x4455_4554_4d45_5441;
/// Format version written by this build.
pub const VERSION: u32 = 1;

/// Flag: the data is consistent (not in the middle of a resync as target).
pub const FLAG_CONSISTENT: u32 = 1 << 0;
/// Flag: this node was Primary when the metadata was last written.
pub const FLAG_WAS_PRIMARY: u32 = 1 << 1;
/// Flag: this node was Primary and did not demote cleanly (set while Primary, cleared on demote).
pub const FLAG_CRASHED_PRIMARY: u32 = 1 << 2;
/// Flag: the peer is known to be Outdated.
pub const FLAG_PEER_OUTDATED: u32 = 1 << 3;
/// Flag: this node's data is known to be older than the peer's (it was outdated over the
/// heartbeat while the replication link was down); it must not be promoted without --force.
pub const FLAG_OUTDATED: u32 = 1 << 4;
/// Flag: a new current generation was made since the peer was last connected (its bitmap
/// generation is the base the peer holds; no second one is made, even after a restart).
pub const FLAG_NEW_CURRENT: u32 = 1 << 5;
const KNOWN_FLAGS: u32 = FLAG_CONSISTENT
    | FLAG_WAS_PRIMARY
    | FLAG_CRASHED_PRIMARY
    | FLAG_PEER_OUTDATED
    | FLAG_OUTDATED
    | FLAG_NEW_CURRENT;

/// What the superblock records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every write; the valid copy with the highest wins.
    pub sequence: u64,
    /// Size of the replicated data area in bytes.
    pub volume_size: u64,
    /// Which node wrote it (index of the node in the configuration, stable by name order).
    pub node_id: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bytes per bitmap bit.
    pub bitmap_granularity: u32,
    /// Bytes per activity-log extent.
    pub al_extent_size: u32,
    /// Activity-log extents that may be hot at once.
    pub al_extents: u32,
    /// Generation UUIDs.
    pub uuids: Generations,
}

/// Why a superblock copy (or both) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// Not a duet superblock at all (another program's data, or nothing written yet).
    #[error("no duet metadata here (magic {0:#018x}); run `duet create-md` to initialise it")]
    Foreign(u64),
    /// Written by a newer duet with a format this build cannot read.
    #[error(
        "metadata format version {0} is newer than this duet understands ({VERSION}); upgrade duet"
    )]
    TooNew(u32),
    /// The checksum does not match: a torn or corrupted write.
    #[error("metadata checksum mismatch (torn or corrupted write)")]
    Checksum,
    /// Fields that cannot be valid.
    #[error("metadata field {0} is invalid")]
    Invalid(&'static str),
    /// Buffer is not one block.
    #[error("metadata block is {0} bytes, expected {BLOCK}")]
    Length(usize),
    /// Neither copy is usable.
    #[error(
        "both metadata copies are unusable (A: {a}; B: {b}); the metadata is damaged, do not guess: restore it or recreate it with `duet create-md` and resync"
    )]
    BothBad { a: Box<SuperblockError>, b: Box<SuperblockError> },
}

const OFF_CRC: usize = BLOCK - 4;

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn get64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

impl Superblock {
    /// Encodes one copy (4 KiB, big-endian, CRC32 last).
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        put64(&mut b, 0, MAGIC);
        put32(&mut b, 8, VERSION);
        put32(&mut b, 12, self.flags);
        put64(&mut b, 16, self.sequence);
        put64(&mut b, 24, self.volume_size);
        put32(&mut b, 32, self.node_id);
        put32(&mut b, 36, self.bitmap_granularity);
        put32(&mut b, 40, self.al_extent_size);
        put32(&mut b, 44, self.al_extents);
        put64(&mut b, 48, self.uuids.current);
        put64(&mut b, 56, self.uuids.bitmap);
        put64(&mut b, 64, self.uuids.history[0]);
        put64(&mut b, 72, self.uuids.history[1]);
        let crc = crc32fast::hash(&b[..OFF_CRC]);
        put32(&mut b, OFF_CRC, crc);
        b
    }

    /// Decodes and checks one copy.
    pub fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() != BLOCK {
            return Err(SuperblockError::Length(b.len()));
        }
        let magic = get64(b, 0);
        if magic != MAGIC {
            return Err(SuperblockError::Foreign(magic));
        }
        if crc32fast::hash(&b[..OFF_CRC]) != get32(b, OFF_CRC) {
            return Err(SuperblockError::Checksum);
        }
        let version = get32(b, 8);
        if version > VERSION {
            return Err(SuperblockError::TooNew(version));
        }
        if version == 0 {
            return Err(SuperblockError::Invalid("version"));
        }
        let sb = Self {
            flags: get32(b, 12),
            sequence: get64(b, 16),
            volume_size: get64(b, 24),
            node_id: get32(b, 32),
            bitmap_granularity: get32(b, 36),
            al_extent_size: get32(b, 40),
            al_extents: get32(b, 44),
            uuids: Generations {
                current: get64(b, 48),
                bitmap: get64(b, 56),
                history: [get64(b, 64), get64(b, 72)],
            },
        };
        if sb.flags & !KNOWN_FLAGS != 0 {
            return Err(SuperblockError::Invalid("flags"));
        }
        if !sb.bitmap_granularity.is_power_of_two() || sb.bitmap_granularity < 4096 {
            return Err(SuperblockError::Invalid("bitmap_granularity"));
        }
        if !sb.al_extent_size.is_power_of_two() || sb.al_extent_size < sb.bitmap_granularity {
            return Err(SuperblockError::Invalid("al_extent_size"));
        }
        if sb.volume_size == 0 || sb.al_extents == 0 {
            return Err(SuperblockError::Invalid("volume_size"));
        }
        Ok(sb)
    }

    /// Picks the newest valid copy of the two slots; returns it and which slot (0 = A, 1 = B)
    /// the next write must go to (the other one, so the good copy survives a torn write).
    pub fn pick(a: &[u8], b: &[u8]) -> Result<(Self, usize), SuperblockError> {
        match (Self::decode(a), Self::decode(b)) {
            (Ok(x), Ok(y)) if y.sequence > x.sequence => Ok((y, 0)),
            (Ok(x), Ok(_)) | (Ok(x), Err(_)) => Ok((x, 1)),
            (Err(_), Ok(y)) => Ok((y, 0)),
            (Err(ea), Err(eb)) => {
                Err(SuperblockError::BothBad { a: Box::new(ea), b: Box::new(eb) })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sb(sequence: u64) -> Superblock {
        Superblock {
            sequence,
            volume_size: 1 << 30,
            node_id: 1,
            flags: FLAG_CONSISTENT | FLAG_WAS_PRIMARY,
            bitmap_granularity: 4096,
            al_extent_size: 4 << 20,
            al_extents: 1237,
            uuids: Generations { current: 0xabcd_0001, bitmap: 0, history: [0x1234, 0] },
        }
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, size in 1u64.., node: u32, flags in 0u32..32, cur: u64, bm: u64, h0: u64, h1: u64) {
            let s = Superblock { sequence: seq, volume_size: size, node_id: node, flags, uuids: Generations { current: cur, bitmap: bm, history: [h0, h1] }, ..sb(0) };
            prop_assert_eq!(Superblock::decode(&s.encode()), Ok(s));
        }

        #[test]
        fn any_single_byte_damage_is_detected(pos in 0usize..BLOCK, byte: u8) {
            let good = sb(7).encode();
            let mut bad = good;
            bad[pos] = byte;
            prop_assume!(bad != good);
            prop_assert!(Superblock::decode(&bad).is_err());
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&data);
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let zeros = [0u8; BLOCK];
        let e = Superblock::decode(&zeros).unwrap_err();
        assert_eq!(e, SuperblockError::Foreign(0));
        assert!(e.to_string().contains("duet create-md"));
        let mut newer = sb(1).encode();
        put32(&mut newer, 8, VERSION + 1);
        let crc = crc32fast::hash(&newer[..OFF_CRC]);
        put32(&mut newer, OFF_CRC, crc);
        assert!(Superblock::decode(&newer).unwrap_err().to_string().contains("upgrade duet"));
        let mut flags = sb(1).encode();
        put32(&mut flags, 12, 1 << 20);
        let crc = crc32fast::hash(&flags[..OFF_CRC]);
        put32(&mut flags, OFF_CRC, crc);
        assert_eq!(Superblock::decode(&flags), Err(SuperblockError::Invalid("flags")));
        assert_eq!(Superblock::decode(&[0u8; 100]), Err(SuperblockError::Length(100)));
    }

    #[test]
    fn torn_write_falls_back_to_the_other_copy() {
        let (a, b) = (sb(10).encode(), sb(11).encode());
        assert_eq!(Superblock::pick(&a, &b), Ok((sb(11), 0)), "newest wins; next write goes to A");
        assert_eq!(Superblock::pick(&b, &a), Ok((sb(11), 1)));
        // The write of copy B (sequence 11) was torn half way: A (10) is used, B rewritten next.
        let mut torn = b;
        torn[2048..].copy_from_slice(&[0u8; 2048]);
        assert_eq!(Superblock::pick(&a, &torn), Ok((sb(10), 1)));
        // Both gone: refuse, never guess.
        let e = Superblock::pick(&torn, &[0u8; BLOCK]).unwrap_err();
        assert!(matches!(e, SuperblockError::BothBad { .. }));
        assert!(e.to_string().contains("do not guess"), "{e}");
    }
}
