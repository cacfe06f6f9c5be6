//! Everything a replication peer can send, through the pure decoders: frame headers (with the
//! digest check of block payloads), Hello, Params, bitmap runs, activity-log records. None may
//! panic, and a header that decodes must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use replicator::repl::actlog::ActivityLog;
use replicator::repl::bitmap::Bitmap;
use replicator::repl::handshake::{Hello, Params};
use replicator::repl::wire::{self, Digest};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(h)) = wire::decode_header(rest) {
        let mut again = BytesMut::new();
        wire::encode_header(&mut again, h.kind, h.flags, h.id, h.offset, h.len);
        assert_eq!(&again[..], &rest[..wire::HEADER_LEN]);
        rest = &rest[wire::HEADER_LEN..];
        let n = (h.len as usize).min(rest.len());
        let payload = &rest[..n];
        for d in [Digest::Off, Digest::Crc32, Digest::Sha256] {
            let _ = d.check(h.offset, payload);
        }
        rest = &rest[n..];
    }
    let _ = Hello::decode(data);
    let _ = Params::decode(data);
    let mut bm = Bitmap::new(64 << 20, 4096);
    let _ = bm.apply_runs(data);
    let _ = ActivityLog::decode(data);
});
