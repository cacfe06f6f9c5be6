//! Validation of transmission requests: a header and the session's limits in, a typed command or
//! the NBD error to reply with out. Pure.

use super::negotiate::{ExportInfo, Session};
use super::proto::*;

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// Write the `len`-byte payload at `offset`; `fua`: durable before the reply.
    Write { offset: u64, len: u32, fua: bool },
    /// Make every write replied to so far durable.
    Flush,
    /// Discard a range (reads of it become unspecified; we punch a hole).
    Trim { offset: u64, len: u32, fua: bool },
    /// Zero a range; `may_trim` unless NO_HOLE; `fast_only` for FAST_ZERO.
    WriteZeroes { offset: u64, len: u32, fua: bool, may_trim: bool, fast_only: bool },
    /// Prefetch a range.
    Cache { offset: u64, len: u32 },
    /// Report allocation of a range; `req_one`: a single extent.
    BlockStatus { offset: u64, len: u32, req_one: bool },
    /// Soft disconnect.
    Disconnect,
}

/// Limits a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Offsets and lengths of data commands must be multiples of this.
    pub min_block: u32,
    /// Largest READ/WRITE payload.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
}

impl Limits {
    /// Limits of `export` for `session`.
    pub fn new(export: &ExportInfo, session: &Session) -> Self {
        Self {
            size: export.size,
            read_only: export.read_only,
            min_block: export.min_block,
            max_payload: export.max_payload,
            structured: session.structured,
            base_allocation: session.base_allocation,
        }
    }
}

/// Why a request was refused, for the reply and a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The NBD error sent back.
    pub error: NbdError,
    /// A short reason (goes into structured error chunks).
    pub reason: &'static str,
}

fn refuse(error: NbdError, reason: &'static str) -> Refusal {
    Refusal { error, reason }
}

/// Checks one request header against the limits.
pub fn validate(h: &RequestHeader, lim: &Limits) -> Result<Command, Refusal> {
    use NbdError::*;
    let allowed = match h.kind {
        CMD_READ if lim.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(refuse(Inval, "unknown command")),
    };
    if h.flags & !allowed != 0 {
        return Err(refuse(Inval, "flag not valid for this command"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.read_only {
        return Err(refuse(Perm, "export is read-only"));
    }
    if h.len == 0 {
        return Err(refuse(Inval, "zero length"));
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > lim.max_payload {
        return Err(refuse(Inval, "length over the maximum payload"));
    }
    let end = h.offset.checked_add(u64::from(h.len));
    if end.is_none_or(|end| end > lim.size) {
        let err = if h.kind == CMD_WRITE || h.kind == CMD_WRITE_ZEROES { NoSpc } else { Inval };
        return Err(refuse(err, "range beyond the end of the export"));
    }
    let mb = u64::from(lim.min_block.max(1));
    let aligned = h.offset.is_multiple_of(mb) && u64::from(h.len).is_multiple_of(mb);
    // The end of an export whose size is not a multiple of the block size is reachable.
    let tail_ok = h.offset.is_multiple_of(mb) && end == Some(lim.size);
    if !aligned && !tail_ok && matches!(h.kind, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
    {
        return Err(refuse(Inval, "not aligned to the minimum block size"));
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_BLOCK_STATUS => {
            if !lim.base_allocation {
                return Err(refuse(Inval, "no metadata context negotiated"));
            }
            Command::BlockStatus { offset, len, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 }
        }
        _ => unreachable!("command kinds were filtered above"),
    })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIM: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        min_block: 1,
        max_payload: 1 << 16,
        structured: false,
        base_allocation: false,
    };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 1, offset, len }
    }

    fn err(h: RequestHeader, lim: &Limits) -> NbdError {
        validate(&h, lim).unwrap_err().error
    }

    #[test]
    fn good_requests() {
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, 512), &LIM),
            Ok(Command::Read { offset: 0, len: 512 })
        );
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 4096), &LIM),
            Ok(Command::Write { offset: 4096, len: 4096, fua: true })
        );
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), &LIM), Ok(Command::Flush));
        assert_eq!(validate(&req(CMD_DISC, 0, 0, 0), &LIM), Ok(Command::Disconnect));
        assert_eq!(
            validate(
                &req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 1 << 20),
                &LIM
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                may_trim: false,
                fast_only: true
            })
        );
        // Trim and write-zeroes are not bounded by the payload maximum.
        assert!(validate(&req(CMD_TRIM, 0, 0, 1 << 20), &LIM).is_ok());
        // The last byte of the export.
        assert!(validate(&req(CMD_READ, 0, (1 << 20) - 1, 1), &LIM).is_ok());
    }

    #[test]
    fn range_errors() {
        assert_eq!(err(req(CMD_READ, 0, 1 << 20, 1), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_WRITE, 0, (1 << 20) - 1, 2), &LIM), NbdError::NoSpc);
        assert_eq!(err(req(CMD_TRIM, 0, u64::MAX, 2), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_WRITE_ZEROES, 0, u64::MAX - 1, 4), &LIM), NbdError::NoSpc);
        assert_eq!(err(req(CMD_READ, 0, 0, 0), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_WRITE, 0, 0, (1 << 16) + 1), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_CACHE, 0, 1 << 21, 1), &LIM), NbdError::Inval);
    }

    #[test]
    fn flag_and_command_errors() {
        assert_eq!(err(req(9, 0, 0, 1), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_READ, CMD_FLAG_DF, 0, 1), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &LIM), NbdError::Inval);
        assert_eq!(err(req(CMD_READ, 1 << 9, 0, 1), &LIM), NbdError::Inval);
        // FUA is accepted on every command, as the spec demands.
        assert!(validate(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), &LIM).is_ok());
        let s = Limits { structured: true, ..LIM };
        assert!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &s).is_ok());
        assert_eq!(err(req(CMD_BLOCK_STATUS, 0, 0, 1), &s), NbdError::Inval);
        let b = Limits { base_allocation: true, ..s };
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &b),
            Ok(Command::BlockStatus { offset: 0, len: 1, req_one: true })
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let ro = Limits { read_only: true, ..LIM };
        for k in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(err(req(k, 0, 0, 1), &ro), NbdError::Perm);
        }
        assert!(validate(&req(CMD_READ, 0, 0, 1), &ro).is_ok());
    }

    #[test]
    fn alignment() {
        let a = Limits { min_block: 4096, size: 4096 * 3 + 100, ..LIM };
        assert_eq!(err(req(CMD_READ, 0, 512, 4096), &a), NbdError::Inval);
        assert_eq!(err(req(CMD_WRITE, 0, 0, 100), &a), NbdError::Inval);
        assert!(validate(&req(CMD_WRITE, 0, 4096, 8192), &a).is_ok());
        // The unaligned tail of the export.
        assert!(validate(&req(CMD_READ, 0, 4096 * 3, 100), &a).is_ok());
    }

    proptest! {
        #[test]
        fn accepted_requests_are_in_range(kind in 0u16..10, flags: u16, offset: u64, len: u32) {
            let lim = Limits { structured: true, base_allocation: true, ..LIM };
            if let Ok(cmd) = validate(&req(kind, flags, offset, len), &lim) {
                match cmd {
                    Command::Flush | Command::Disconnect => {}
                    _ => {
                        prop_assert!(len > 0);
                        prop_assert!(offset + u64::from(len) <= lim.size);
                    }
                }
            }
        }
    }
}
