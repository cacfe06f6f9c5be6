//! Everything a heartbeat link can deliver: raw datagrams through the receiver (decode, key,
//! MAC, cluster, node, replay), the same bytes re-signed with the right key so the fields behind
//! the MAC are reached too (a frame that decodes must re-encode to the same bytes), and the bytes
//! as a serial stream through the deframer. None may panic.
#![no_main]

use heartbeat::frame::{self, Frame, MAC_LEN};
use heartbeat::receiver::Receiver;
use heartbeat::serial::Deframer;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const KEY: &[u8] = b"fuzz key";

fuzz_target!(|data: &[u8]| {
    let mut rx = Receiver::new(vec![(1, KEY.to_vec())], frame::cluster_id("fuzz"), 1);
    let _ = rx.receive(data);
    if data.len() >= frame::HEADER_LEN + MAC_LEN {
        let mut signed = data.to_vec();
        let n = signed.len();
        let mut m = Hmac::<Sha256>::new_from_slice(KEY).expect("any key length");
        m.update(&signed[..n - MAC_LEN]);
        signed[n - MAC_LEN..].copy_from_slice(&m.finalize().into_bytes());
        if let Ok(f) = Frame::decode(&signed, KEY) {
            assert_eq!(f.encode(KEY), signed, "decode/encode not inverse");
        }
        let _ = rx.receive(&signed);
    }
    let mut d = Deframer::default();
    for chunk in data.chunks(13) {
        d.push(chunk);
        while let Some(f) = d.next_frame() {
            let _ = rx.receive(&f);
        }
    }
});
