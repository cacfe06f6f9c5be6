//! Everything a replication peer can send, through the pure decoders: frame headers (with the
//! digest check of block payloads), Hello, Params, configuration keys, bitmap runs, activity-log records; sealed
//! frames as they arrive (lengths and tags), and the same bytes sealed with the right key so the
//! header inside is reached too. None may panic, and a header that decodes must re-encode to the
//! same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use replicator::repl::actlog::ActivityLog;
use replicator::repl::bitmap::Bitmap;
use replicator::repl::handshake::{ConfigKeys, Hello, Params};
use replicator::repl::seal::{self, KeyInput, Opener, Protection};
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
    for protection in [Protection::Encrypt, Protection::Authenticate] {
        let keys = |me, peer| {
            seal::derive(&KeyInput {
                secret: b"fuzz",
                cluster: "c",
                resource: "r",
                me,
                peer,
                my_challenge: &[1; 32],
                peer_challenge: &[1; 32],
                protection,
            })
        };
        // As they arrive: forged bytes never open.
        let mut rx = keys("b", "a").recv;
        let mut buf = data.to_vec();
        if let Ok(Some(n)) = Opener::frame_len(&buf, wire::MAX_PAYLOAD)
            && n <= buf.len()
        {
            assert!(rx.open(&mut buf[..n], wire::MAX_PAYLOAD).is_err(), "a forged frame opened");
        }
        // Sealed by the key holder: the header inside is checked, and never trusted blindly.
        if data.len() >= wire::HEADER_LEN {
            let mut tx = keys("a", "b").send;
            let mut rx = keys("b", "a").recv;
            let mut out = Vec::new();
            tx.seal_head(data, 0, &mut out);
            if let Ok(f) = rx.open(&mut out, wire::MAX_PAYLOAD) {
                assert_eq!(f.header.len as usize, f.payload.len());
            }
        }
    }
    let _ = Hello::decode(data);
    let _ = Params::decode(data);
    if let Ok(k) = ConfigKeys::decode(data) {
        // What decodes re-encodes to the same bytes, and compares with anything.
        let mut again = BytesMut::new();
        k.encode(&mut again);
        assert_eq!(&again[..], data);
        let _ = k.differences(&ConfigKeys(vec![("cluster.name".into(), 1)]));
    }
    let mut bm = Bitmap::new(64 << 20, 4096);
    let _ = bm.apply_runs(data);
    let _ = ActivityLog::decode(data);
});
