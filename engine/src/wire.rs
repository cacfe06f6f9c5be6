//! The peer protocol's frame codec. Pure: bytes in, frames out, and back.
//!
//! Every frame is a 32-byte header followed by `len` payload bytes:
//!
//! ```text
//!  0 magic u32 "DUP1"   4 kind u16   6 flags u16   8 id u64   16 offset u64
//! 24 len u32 (payload)  28 crc32 of bytes 0..28
//! ```
//!
//! The header checksum catches a corrupted or desynchronised stream before a length is trusted;
//! block payloads carry their own digest when `data_integrity` is on ([`Digest`]). A decoder
//! tells "need more bytes" (`Ok(None)`) apart from "invalid" (`Err`), so a hostile peer can only
//! make us drop the connection, never misread a frame.

use bytes::{Buf, BufMut, BytesMut};
use sha2::{Digest as _, Sha256};

/// "DUP1".
pub const MAGIC: u32 = 0x4455_5031;
/// The highest protocol version this build speaks.
pub const VERSION: u32 = 2;
/// The lowest (see [`crate::handshake::Versions`]): 2 sealed every frame after the handshake,
/// which version 1 did not.
pub const MIN_VERSION: u32 = 2;
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted (a block of data plus a digest, or a bitmap chunk).
pub const MAX_PAYLOAD: u32 = (32 << 20) + 64;

/// Frame flag: the write must be durable before it is acknowledged.
pub const F_FUA: u16 = 1;
/// Frame flag: the block is all zeros and travels as a hole (no payload data).
pub const F_HOLE: u16 = 1 << 1;
/// Frame flag: zeroing may deallocate.
pub const F_MAY_TRIM: u16 = 1 << 2;
/// Frame flag: last frame of a multi-frame message (bitmap).
pub const F_LAST: u16 = 1 << 3;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Handshake: version, features, names, challenge.
    Hello = 1,
    /// Handshake: HMAC over both challenges.
    Auth = 2,
    /// Handshake: sizes, generations, flags.
    Params = 3,
    /// Out-of-sync bitmap as runs of set bits.
    Bitmap = 4,
    /// Handshake, when both Hellos carry [`crate::handshake::F_CONFIG_KEYS`]: the sender's
    /// configuration keys and a hash of each value.
    ConfigKeys = 6,
    /// The sender refuses the connection; payload is the reason.
    Refuse = 5,
    /// Replicated write.
    Data = 10,
    /// Protocol B: the write was received.
    RecvAck = 11,
    /// The write is on the peer's disk; `offset` carries an errno (0 = ok).
    WriteAck = 12,
    /// Make every write received before this durable.
    Flush = 13,
    /// Flush done; `offset` carries an errno.
    FlushAck = 14,
    /// Zero a range; payload: the length (u32).
    Zero = 15,
    /// Keep-alive.
    Ping = 20,
    /// Keep-alive answer.
    PingAck = 21,
    /// Resync target asks for a range; payload: optional digest of its own data.
    RsRequest = 30,
    /// Resync source sends a range.
    RsData = 31,
    /// Resync source: the target's digest matched, nothing to send.
    RsSame = 32,
    /// Resync target: everything received and written.
    RsDone = 33,
    /// Resync source: the new generations (sync UUID) before the first block.
    SyncUuid = 34,
    /// Mark a range out of sync on the receiver.
    OutOfSync = 35,
    /// A Diskless Primary reads from its peer; payload: the length (u32).
    PeerRead = 36,
    /// The answer to a PeerRead: the block (a hole, or digest and data, as Data).
    PeerReadData = 37,
    /// A PeerRead failed on the peer's disk; `offset` carries the errno.
    PeerReadError = 38,
    /// Verify: hash your copy of this range.
    VerifyRequest = 40,
    /// Verify: the hash of the range.
    VerifyReply = 41,
    /// Verify finished (sent by the verify source after the last reply).
    VerifyDone = 42,
    /// Role or disk state changed.
    State = 50,
    /// Orderly disconnect.
    Disconnect = 60,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Self> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Auth,
            3 => Params,
            4 => Bitmap,
            5 => Refuse,
            6 => ConfigKeys,
            10 => Data,
            11 => RecvAck,
            12 => WriteAck,
            13 => Flush,
            14 => FlushAck,
            15 => Zero,
            20 => Ping,
            21 => PingAck,
            30 => RsRequest,
            31 => RsData,
            32 => RsSame,
            33 => RsDone,
            34 => SyncUuid,
            35 => OutOfSync,
            36 => PeerRead,
            37 => PeerReadData,
            38 => PeerReadError,
            40 => VerifyRequest,
            41 => VerifyReply,
            42 => VerifyDone,
            50 => State,
            60 => Disconnect,
            _ => return None,
        })
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub id: u64,
    pub offset: u64,
    pub len: u32,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not our protocol, or the stream lost its framing.
    #[error("bad frame magic {0:#010x}")]
    Magic(u32),
    /// The header checksum does not match.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// A kind this build does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// The payload is larger than any valid frame.
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
    /// A payload whose content does not parse.
    #[error("malformed {0:?} payload: {1}")]
    Payload(Kind, &'static str),
    /// A block whose digest does not match its data.
    #[error("data digest mismatch at offset {0}")]
    Digest(u64),
}

/// Encodes a header for a payload of `len` bytes.
pub fn encode_header(out: &mut BytesMut, kind: Kind, flags: u16, id: u64, offset: u64, len: u32) {
    let start = out.len();
    out.put_u32(MAGIC);
    out.put_u16(kind as u16);
    out.put_u16(flags);
    out.put_u64(id);
    out.put_u64(offset);
    out.put_u32(len);
    let crc = crc32fast::hash(&out[start..start + 28]);
    out.put_u32(crc);
}

/// Encodes a whole frame.
pub fn encode(out: &mut BytesMut, kind: Kind, flags: u16, id: u64, offset: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payloads are bounded by MAX_PAYLOAD");
    encode_header(out, kind, flags, id, offset, len);
    out.put_slice(payload);
}

/// Decodes a header from the start of `b`. `Ok(None)`: fewer than [`HEADER_LEN`] bytes.
pub fn decode_header(b: &[u8]) -> Result<Option<Header>, WireError> {
    if b.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut c = &b[..HEADER_LEN];
    let magic = c.get_u32();
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let crc = u32::from_be_bytes(b[28..32].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&b[..28]) {
        return Err(WireError::HeaderChecksum);
    }
    let kind = c.get_u16();
    let kind = Kind::from_u16(kind).ok_or(WireError::UnknownKind(kind))?;
    let flags = c.get_u16();
    let id = c.get_u64();
    let offset = c.get_u64();
    let len = c.get_u32();
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    Ok(Some(Header { kind, flags, id, offset, len }))
}

/// Digest on replicated blocks (`data_integrity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// None.
    Off,
    /// CRC32 (4 bytes).
    Crc32,
    /// SHA-256 (32 bytes).
    Sha256,
}

impl Digest {
    /// Bytes the digest takes in front of the data.
    pub fn size(self) -> usize {
        match self {
            Self::Off => 0,
            Self::Crc32 => 4,
            Self::Sha256 => 32,
        }
    }
    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Crc32 => 1,
            Self::Sha256 => 2,
        }
    }
    /// From a wire code.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::Off),
            1 => Some(Self::Crc32),
            2 => Some(Self::Sha256),
            _ => None,
        }
    }
    /// Appends the digest of `data`.
    pub fn put(self, out: &mut BytesMut, data: &[u8]) {
        match self {
            Self::Off => {}
            Self::Crc32 => out.put_u32(crc32fast::hash(data)),
            Self::Sha256 => out.put_slice(&Sha256::digest(data)),
        }
    }
    /// Splits `payload` into digest and data and checks them.
    pub fn check(self, offset: u64, payload: &[u8]) -> Result<&[u8], WireError> {
        let n = self.size();
        if payload.len() < n {
            return Err(WireError::Payload(Kind::Data, "shorter than its digest"));
        }
        let (d, data) = payload.split_at(n);
        let ok = match self {
            Self::Off => true,
            Self::Crc32 => d == crc32fast::hash(data).to_be_bytes(),
            Self::Sha256 => d == Sha256::digest(data).as_slice(),
        };
        if ok { Ok(data) } else { Err(WireError::Digest(offset)) }
    }
}

/// SHA-256 of a block (verify and checksum-based resync).
pub fn hash(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// True when every byte is zero (such blocks travel as holes).
pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u8 → u64 reinterpretation is valid for any bit pattern; align_to handles the
        // unaligned ends.
        unsafe { data.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// A small cursor for structured payloads (Hello, Params) that fails instead of panicking.
#[derive(Debug)]
pub struct Cursor<'a> {
    b: &'a [u8],
    kind: Kind,
}

impl<'a> Cursor<'a> {
    /// Reads `b` as the payload of a `kind` frame.
    pub fn new(kind: Kind, b: &'a [u8]) -> Self {
        Self { b, kind }
    }
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.b.len() < n { Err(WireError::Payload(self.kind, "truncated")) } else { Ok(()) }
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.b.get_u16())
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.b.get_u32())
    }
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.b.get_u64())
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.need(n)?;
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    /// A string of at most `max` bytes, u16-length-prefixed.
    pub fn string(&mut self, max: usize) -> Result<String, WireError> {
        self.need(2)?;
        let n = usize::from(self.b.get_u16());
        if n > max {
            return Err(WireError::Payload(self.kind, "string too long"));
        }
        let s = self.bytes(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| WireError::Payload(self.kind, "string not UTF-8"))
    }
    /// Nothing may follow.
    pub fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Payload(self.kind, "trailing bytes"))
        }
    }
}

/// Appends a u16-length-prefixed string (truncated to 1 KiB).
pub fn put_string(out: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(1024)];
    out.put_u16(u16::try_from(b.len()).expect("≤ 1024"));
    out.put_slice(b);
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KINDS: [u16; 27] = [
        1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 20, 21, 30, 31, 32, 33, 34, 35, 36, 37, 38, 40, 41,
        42, 50, 60,
    ];

    proptest! {
        #[test]
        fn header_round_trip(k in 0usize..KINDS.len(), flags: u16, id: u64, offset: u64, len in 0..=MAX_PAYLOAD) {
            let kind = Kind::from_u16(KINDS[k]).unwrap();
            let mut b = BytesMut::new();
            encode_header(&mut b, kind, flags, id, offset, len);
            prop_assert_eq!(b.len(), HEADER_LEN);
            let h = decode_header(&b).unwrap().unwrap();
            prop_assert_eq!(h, Header { kind, flags, id, offset, len });
            // Any prefix is "incomplete", never an error.
            for n in 0..HEADER_LEN {
                prop_assert_eq!(decode_header(&b[..n]), Ok(None));
            }
        }

        #[test]
        fn any_single_bit_flip_is_caught(bit in 0usize..HEADER_LEN * 8) {
            let mut b = BytesMut::new();
            encode_header(&mut b, Kind::Data, F_FUA, 7, 4096, 4096);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_header(&b).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_header(&bytes);
        }

        #[test]
        fn digests_round_trip(data in proptest::collection::vec(any::<u8>(), 0..512), d in 0u8..3) {
            let d = Digest::from_code(d).unwrap();
            let mut b = BytesMut::new();
            d.put(&mut b, &data);
            b.put_slice(&data);
            prop_assert_eq!(d.check(0, &b).unwrap(), &data[..]);
            if d != Digest::Off && !data.is_empty() {
                let last = b.len() - 1;
                b[last] ^= 0x40;
                prop_assert_eq!(d.check(9, &b), Err(WireError::Digest(9)));
            }
        }
    }

    #[test]
    fn refuses_bad_magic_unknown_kind_and_huge_payloads() {
        let mut b = BytesMut::new();
        encode_header(&mut b, Kind::Ping, 0, 0, 0, 0);
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(matches!(decode_header(&bad), Err(WireError::Magic(_))));

        // Unknown kind and oversized length, each with a valid checksum.
        let forge = |kind: u16, len: u32| {
            let mut f = BytesMut::new();
            f.put_u32(MAGIC);
            f.put_u16(kind);
            f.put_u16(0);
            f.put_u64(0);
            f.put_u64(0);
            f.put_u32(len);
            let crc = crc32fast::hash(&f[..28]);
            f.put_u32(crc);
            f
        };
        assert_eq!(decode_header(&forge(999, 0)), Err(WireError::UnknownKind(999)));
        assert_eq!(decode_header(&forge(10, u32::MAX)), Err(WireError::TooLong(u32::MAX)));
        assert!(decode_header(&forge(10, MAX_PAYLOAD)).unwrap().is_some());
    }

    #[test]
    fn cursor_refuses_truncated_and_trailing() {
        let mut b = BytesMut::new();
        b.put_u32(5);
        put_string(&mut b, "alpha");
        let mut c = Cursor::new(Kind::Hello, &b);
        assert_eq!(c.u32().unwrap(), 5);
        assert_eq!(c.string(64).unwrap(), "alpha");
        c.end().unwrap();
        let mut c = Cursor::new(Kind::Hello, &b[..6]);
        c.u32().unwrap();
        assert!(c.string(64).is_err());
        let mut c = Cursor::new(Kind::Hello, &b);
        c.u32().unwrap();
        assert!(c.string(3).is_err(), "over the limit");
        let c = Cursor::new(Kind::Hello, &b);
        assert!(c.end().is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v));
    }
}
