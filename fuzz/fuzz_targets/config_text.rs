//! Any configuration file text: parsing and validation never panic, and a file that is accepted
//! maps to the runtime's NBD policy without panicking either.
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
        }
        let _ = cfg.node_names();
    }
});
