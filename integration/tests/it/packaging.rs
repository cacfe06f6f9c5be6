//! What ships beside the binary: the systemd unit.

use std::process::Command;
use std::time::Duration;

use integration::{duet_bin, have, run};

/// `systemd-analyze verify` accepts `contrib/systemd/duet.service` (with ExecStart pointed at
/// the binary under test: verify checks that it exists) and says nothing about it.
#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze") {
        return;
    }
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd/duet.service");
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("duet.service");
    let bin = duet_bin();
    std::fs::write(&copy, text.replace("/usr/bin/duet", &bin.display().to_string())).unwrap();
    let out =
        run(Command::new("systemd-analyze").arg("verify").arg(&copy), Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("duet.service"), "systemd-analyze found fault with the unit: {err}");
}
