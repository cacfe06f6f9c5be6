//! What ships beside the binary: the systemd units.

use std::process::Command;
use std::time::Duration;

use integration::{duet_bin, have, run};

/// `systemd-analyze verify` of `units` (source name under contrib/systemd, name to verify it
/// as), with ExecStart pointed at the binary under test (verify checks that it exists): they
/// must pass and draw no remark.
fn verify(units: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let bin = duet_bin();
    let mut paths = Vec::new();
    for (src, name) in units {
        let file = format!("{}/../contrib/systemd/{src}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&file).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("/usr/bin/duet", &bin.display().to_string())).unwrap();
        paths.push(path);
    }
    let out =
        run(Command::new("systemd-analyze").arg("verify").args(&paths), Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for (_, name) in units {
        assert!(!err.contains(name), "systemd-analyze found fault with {name}: {err}");
    }
}

/// `duet.service` (Type=notify, watchdog) and `duet-wait@.service` (an instance) verify.
#[test]
fn the_systemd_units_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd/duet.service");
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{text}");
    verify(&[("duet.service", "duet.service"), ("duet-wait@.service", "duet-wait@vol0.service")]);
}
