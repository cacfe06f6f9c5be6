//! Everything a hostile client can send before and during transmission, through the pure parts
//! of the NBD server: client flags, option headers, option data into the negotiation state
//! machine, then request headers into validation. Must never panic; every request that
//! validation accepts must be inside the export.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use replicator::nbd::negotiate::{ExportInfo, Negotiation, Step, Tls};
use replicator::nbd::proto::*;
use replicator::nbd::request::{Command, Limits, validate};

/// The types of the option replies in `out` (stops at anything that is not one: the
/// EXPORT_NAME answer).
fn reply_types(mut out: &[u8]) -> Vec<u32> {
    let mut v = Vec::new();
    while out.len() >= 20 && out[..8] == OPT_REPLY_MAGIC.to_be_bytes() {
        let word = |i: usize| u32::from_be_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]);
        v.push(word(12));
        let len = word(16) as usize;
        out = &out[(20 + len).min(out.len())..];
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let exports = vec![ExportInfo {
        name: "vol0".into(),
        description: "fuzz".into(),
        size: 1 << 30,
        read_only: data.first().is_some_and(|b| b & 1 == 1),
        min_block: if data.get(1).is_some_and(|b| b & 1 == 1) { 4096 } else { 1 },
        preferred_block: 4096,
        max_payload: 32 << 20,
    }];
    let Ok(Some(flags)) = decode_client_flags(data) else { return };
    let mut rest = &data[4..];
    // The listener's TLS mode from a byte of the input; a STARTTLS that is acknowledged is
    // followed (as on the wire) by a fresh negotiation over the upgraded stream.
    let mode = match data.get(2).map(|b| b % 3) {
        Some(1) => Tls::Offered,
        Some(2) => Tls::Required,
        _ => Tls::Unavailable,
    };
    let mut neg = Negotiation::new(&exports, flags, mode);
    let mut upgraded = false;
    let mut out = BytesMut::new();
    let session = loop {
        let Ok(Some(h)) = decode_option_header(rest) else { return };
        rest = &rest[OPTION_HEADER_LEN..];
        let len = (h.len as usize).min(rest.len());
        let (opt, tail) = rest.split_at(len);
        rest = tail;
        out.clear();
        let step = neg.handle(h.option, opt, &mut out);
        // After the upgrade, TLS is never demanded again (the spec's MUST NOT).
        assert!(!(upgraded && reply_types(&out).contains(&REP_ERR_TLS_REQD)));
        match step {
            Step::Continue => {}
            Step::Close => return,
            Step::Transmit(s) => {
                // With TLS required, no export without the upgrade.
                assert!(upgraded || mode != Tls::Required);
                break s;
            }
            Step::StartTls => {
                assert!(!upgraded && mode != Tls::Unavailable, "STARTTLS acknowledged twice or without TLS");
                upgraded = true;
                neg = Negotiation::new(&exports, flags, Tls::Established);
            }
        }
    };
    let limits = Limits::new(&exports[session.export], &session);
    while let Ok(Some(h)) = decode_request(rest) {
        rest = &rest[REQUEST_HEADER_LEN..];
        if let Ok(cmd) = validate(&h, &limits) {
            match cmd {
                Command::Read { offset, len }
                | Command::Write { offset, len, .. }
                | Command::Trim { offset, len, .. }
                | Command::WriteZeroes { offset, len, .. }
                | Command::Cache { offset, len }
                | Command::BlockStatus { offset, len, .. } => {
                    assert!(len > 0 && offset + u64::from(len) <= limits.size);
                    assert!(!limits.read_only || matches!(cmd, Command::Read { .. } | Command::Cache { .. } | Command::BlockStatus { .. }));
                }
                Command::Flush | Command::Disconnect => {}
            }
        }
    }
});
