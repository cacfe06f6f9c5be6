//! NBD wire format: constants and a pure codec (bytes in, values out; values in, bytes out).
//!
//! Written against `NetworkBlockDevice/nbd` `doc/proto.md`. Decoders tell "need more bytes"
//! (`Ok(None)`) apart from "this is not NBD" (`Err`), so a driver can read incrementally and a
//! fuzzer can feed anything.

use bytes::{Buf, BufMut, BytesMut};

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_*` items.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` status bits (the store's, which speaks the protocol's values).
pub use crate::store::{STATE_HOLE, STATE_ZERO};

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// NBD error values (the only ones allowed on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error on the backing store.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument: bad range, flag, alignment or command.
    Inval = 22,
    /// No space: write beyond the end of the export.
    NoSpc = 28,
    /// Too large for the advertised limits.
    Overflow = 75,
    /// Not supported (fast zero that would be slow).
    NotSup = 95,
    /// The server is shutting down; the client should disconnect.
    Shutdown = 108,
}

impl NbdError {
    /// Maps an OS errno from the store to the closest NBD error.
    pub fn from_errno(errno: nix::errno::Errno) -> Self {
        use nix::errno::Errno;
        match errno {
            Errno::EPERM | Errno::EACCES | Errno::EROFS => Self::Perm,
            Errno::ENOMEM => Self::NoMem,
            Errno::EINVAL => Self::Inval,
            Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG => Self::NoSpc,
            Errno::EOVERFLOW => Self::Overflow,
            Errno::EOPNOTSUPP => Self::NotSup,
            Errno::ESHUTDOWN => Self::Shutdown,
            _ => Self::Io,
        }
    }

    /// The value carried on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Why bytes from a client are not NBD. The connection that sent them is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// An option did not start with IHAVEOPT.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// A request did not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// The client's handshake flags contain bits we do not know.
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// The client did not set FIXED_NEWSTYLE.
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// An option's payload is larger than we accept.
    #[error("option {option} carries {len} bytes, more than the {max} accepted")]
    OptionTooLong { option: u32, len: u32, max: u32 },
}

/// An option header from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// Decodes the 4-byte client flags that follow the server's greeting.
pub fn decode_client_flags(buf: &[u8]) -> Result<Option<u32>, ProtoError> {
    let Some(mut b) = buf.get(..4) else { return Ok(None) };
    let flags = b.get_u32();
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::BadClientFlags(flags));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(Some(flags))
}

/// Decodes an option header.
pub fn decode_option_header(buf: &[u8]) -> Result<Option<OptionHeader>, ProtoError> {
    let Some(mut b) = buf.get(..OPTION_HEADER_LEN) else { return Ok(None) };
    let magic = b.get_u64();
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    Ok(Some(OptionHeader { option: b.get_u32(), len: b.get_u32() }))
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length in bytes (for WRITE, the payload that follows).
    pub len: u32,
}

/// Decodes a request header; the payload of a WRITE follows and is read by the caller.
pub fn decode_request(buf: &[u8]) -> Result<Option<RequestHeader>, ProtoError> {
    let Some(mut b) = buf.get(..REQUEST_HEADER_LEN) else { return Ok(None) };
    let magic = b.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    Ok(Some(RequestHeader {
        flags: b.get_u16(),
        kind: b.get_u16(),
        cookie: b.get_u64(),
        offset: b.get_u64(),
        len: b.get_u32(),
    }))
}

/// Encodes a request header (used by tests, benchmarks and the fuzz corpus).
pub fn encode_request(out: &mut BytesMut, h: &RequestHeader) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(h.flags);
    out.put_u16(h.kind);
    out.put_u64(h.cookie);
    out.put_u64(h.offset);
    out.put_u32(h.len);
}

/// The server's first bytes: magic, IHAVEOPT, handshake flags.
pub fn encode_greeting(out: &mut BytesMut) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// An option reply: header plus `data`.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(u32::try_from(data.len()).expect("option reply data is small"));
    out.put_slice(data);
}

/// A simple reply header; READ data (if any) follows.
pub fn encode_simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn encode_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(len);
}

/// Header of a final OFFSET_DATA chunk for `data_len` bytes at `offset` (the data follows).
pub fn encode_read_chunk_header(out: &mut BytesMut, cookie: u64, offset: u64, data_len: u32) {
    let len = data_len.checked_add(8).expect("read length is bounded by the max block size");
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, len);
    out.put_u64(offset);
}

/// A final ERROR chunk.
pub fn encode_error_chunk(out: &mut BytesMut, cookie: u64, error: NbdError, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let msg_len = u16::try_from(msg.len()).expect("message is capped at 4096 bytes");
    let len = 6 + u32::from(msg_len);
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len);
    out.put_u32(error.code());
    out.put_u16(msg_len);
    out.put_slice(msg);
}

/// One `base:allocation` extent (the store describes allocation in the protocol's terms).
pub use crate::store::Extent;

/// A final BLOCK_STATUS chunk for one context.
pub fn encode_block_status(out: &mut BytesMut, cookie: u64, context_id: u32, extents: &[Extent]) {
    let len = u32::try_from(4 + extents.len() * 8).expect("extent count is capped");
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.len);
        out.put_u32(e.flags);
    }
}

/// A reader over option data that never panics on short input.
#[derive(Debug)]
pub struct OptReader<'a> {
    buf: &'a [u8],
}

impl<'a> OptReader<'a> {
    /// Wraps option data.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// A big-endian u16, or `None` when short.
    pub fn u16(&mut self) -> Option<u16> {
        (self.buf.len() >= 2).then(|| self.buf.get_u16())
    }
    /// A big-endian u32, or `None` when short.
    pub fn u32(&mut self) -> Option<u32> {
        (self.buf.len() >= 4).then(|| self.buf.get_u32())
    }
    /// A u32-length-prefixed UTF-8 string, or `None` when short or not UTF-8.
    pub fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        let s = self.buf.get(..len)?;
        self.buf = &self.buf[len..];
        std::str::from_utf8(s).ok()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
            let h = RequestHeader { flags, kind, cookie, offset, len };
            let mut out = BytesMut::new();
            encode_request(&mut out, &h);
            prop_assert_eq!(out.len(), REQUEST_HEADER_LEN);
            prop_assert_eq!(decode_request(&out).unwrap(), Some(h));
            for cut in 0..REQUEST_HEADER_LEN {
                prop_assert_eq!(decode_request(&out[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn decoders_never_panic(bytes: Vec<u8>) {
            let _ = decode_request(&bytes);
            let _ = decode_option_header(&bytes);
            let _ = decode_client_flags(&bytes);
            let mut r = OptReader::new(&bytes);
            while r.string().is_some() {}
        }
    }

    #[test]
    fn bad_magic_is_invalid_not_incomplete() {
        let buf = [0u8; REQUEST_HEADER_LEN];
        assert_eq!(decode_request(&buf), Err(ProtoError::BadRequestMagic(0)));
        assert_eq!(decode_option_header(&[0u8; 16]), Err(ProtoError::BadOptionMagic(0)));
    }

    #[test]
    fn client_flags() {
        assert_eq!(decode_client_flags(&[0, 0, 0, 3]), Ok(Some(3)));
        assert_eq!(decode_client_flags(&[0, 0, 0]), Ok(None));
        assert_eq!(decode_client_flags(&[0, 0, 0, 2]), Err(ProtoError::NotFixedNewstyle(2)));
        assert_eq!(decode_client_flags(&[0, 0, 0, 5]), Err(ProtoError::BadClientFlags(5)));
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = BytesMut::new();
        encode_error_chunk(&mut out, 7, NbdError::Inval, "bad");
        assert_eq!(out.len(), 20 + 6 + 3);
        assert_eq!(&out[20..24], &22u32.to_be_bytes());
        assert_eq!(&out[24..26], &3u16.to_be_bytes());
    }

    #[test]
    fn opt_reader_short_string() {
        let mut r = OptReader::new(&[0, 0, 0, 9, b'a']);
        assert_eq!(r.string(), None);
        let mut r = OptReader::new(&[0, 0, 0, 1, b'a', 0, 1]);
        assert_eq!(r.string(), Some("a"));
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
    }
}
