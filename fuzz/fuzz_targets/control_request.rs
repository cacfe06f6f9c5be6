//! A control-socket request line from any local caller: never a panic; a request that decodes
//! is of a version this daemon takes (its lowest or later) and encodes back to one that decodes
//! the same.
#![no_main]

use duet::control::{MIN_VERSION, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        assert!(req.v >= MIN_VERSION, "{}", req.v);
        let again = serde_json::to_vec(&req).expect("a request encodes");
        assert_eq!(decode_request(&again).expect("what we encode decodes"), req);
    }
});
