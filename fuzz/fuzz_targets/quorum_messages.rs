//! Everything a node can send about quorum, through the pure decoder, then into a candidate:
//! decoding never panics, what decodes re-encodes to the same bytes, and no message sequence
//! makes the candidate hold quorum unless another node granted the one request it sent.
#![no_main]

use std::time::{Duration, Instant};

use engine::quorum::{Config, Durable, Msg, Quorum, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = Config { me: 0, nodes: 3, data: 0b111, lease: Duration::from_secs(1), drift_ppm: 10_000 };
    let t0 = Instant::now();
    let Ok(mut q) = Quorum::new(cfg, t0, Durable::initial(0b111), 0) else { return };
    let now = t0 + cfg.promise();
    // Its one request has id 0 (the ids start at the random value given, 0 here).
    if q.campaign(now).is_err() {
        return;
    }
    let mut granted = false;
    // Each chunk: the sender, a length byte, the message.
    let mut rest = data;
    while let [from, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (msg, more) = tail.split_at(n);
        rest = more;
        if let Ok(m) = wire::decode(msg) {
            assert_eq!(wire::encode(&m), msg);
            granted |= matches!(m, Msg::Grant { id: 0, .. }) && (1..3).contains(from);
            let _ = q.handle(now, *from, m);
        }
        assert!(!q.holds(now) || granted, "holds without a grant of its request");
    }
});
