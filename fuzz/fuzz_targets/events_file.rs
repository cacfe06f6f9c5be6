//! The events file in state_dir as a restart reads it (a torn write, a disk error, a hand edit):
//! never a panic; what is read is in increasing order, and writing it back reads the same.
#![no_main]

use duet::events::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (events, bad) = parse(&text);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(events.len() + bad <= text.lines().count());
    let mut again = String::new();
    for e in &events {
        again.push_str(&serde_json::to_string(e).expect("an event encodes"));
        again.push('\n');
    }
    let (back, none) = parse(&again);
    assert_eq!(none, 0);
    assert_eq!(back.len(), events.len());
    for (a, b) in back.iter().zip(&events) {
        assert_eq!((a.seq, a.kind, &a.resource, &a.reason), (b.seq, b.kind, &b.resource, &b.reason));
    }
});
