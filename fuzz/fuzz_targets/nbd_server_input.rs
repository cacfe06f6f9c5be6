//! Everything a hostile client can send before and during transmission, through the pure parts
//! of the NBD server: client flags, option headers, option data into the negotiation state
//! machine, then request headers into validation. Must never panic; every request that
//! validation accepts must be inside the export.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use replicator::nbd::negotiate::{ExportInfo, Negotiation, Step};
use replicator::nbd::proto::*;
use replicator::nbd::request::{Command, Limits, validate};

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
    let mut neg = Negotiation::new(&exports, flags);
    let mut out = BytesMut::new();
    let session = loop {
        let Ok(Some(h)) = decode_option_header(rest) else { return };
        rest = &rest[OPTION_HEADER_LEN..];
        let len = (h.len as usize).min(rest.len());
        let (opt, tail) = rest.split_at(len);
        rest = tail;
        out.clear();
        match neg.handle(h.option, opt, &mut out) {
            Step::Continue => {}
            Step::Close => return,
            Step::Transmit(s) => break s,
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
