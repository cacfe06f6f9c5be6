//! Any configuration file text: parsing and validation never panic, and a file that is accepted
//! maps to the runtime's NBD policy and its catch-up schedule without panicking either. The text
//! is also read as a schedule alone, whose next run is always later.
#![no_main]

use std::path::Path;

use duet::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = Config::parse(Path::new("fuzz.toml"), text) {
        for r in &cfg.resource {
            let _ = r.nbd.policy(None);
            let _ = r.nbd.tls_files();
            if let Some(s) = r.schedule() {
                let _ = s.next_after_utc(1_796_000_000);
            }
        }
        let _ = cfg.node_names();
    }
    if let Ok(s) = text.parse::<duet::schedule::Schedule>() {
        let round = s.to_string().parse::<duet::schedule::Schedule>();
        assert_eq!(round, Ok(s), "a schedule prints back as itself");
        for t in [0i64, 1_796_000_000, 4_102_444_800] {
            if let Some(n) = s.next_after_utc(t) {
                assert!(n > t && n <= t + 8 * 86_400, "{s}: next run {n} after {t}");
            }
        }
    }
});
