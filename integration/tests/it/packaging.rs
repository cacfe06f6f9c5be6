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

/// `duet generate man DIR` writes duet.1 and a page per command, and `man -l` renders each
/// without a warning; `duet generate completions SHELL` writes bash, zsh and fish completions
/// that name the commands (and bash parses its own).
#[test]
fn man_pages_render_and_completions_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out =
        run(Command::new(duet_bin()).args(["generate", "man"]).arg(&man), Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let commands = [
        "daemon",
        "status",
        "check-config",
        "create-md",
        "dump-md",
        "primary",
        "secondary",
        "connect",
        "disconnect",
        "invalidate",
        "verify",
        "make-master",
        "make-slave",
        "events",
        "wait",
    ];
    let mut pages = vec!["duet.1".to_string()];
    pages.extend(commands.iter().map(|c| format!("duet-{c}.1")));
    for p in &pages {
        assert!(man.join(p).exists(), "{p} missing");
    }
    assert!(!man.join("duet-generate.1").exists(), "the hidden packaging command has no page");
    if have("man") {
        for p in &pages {
            let out = run(
                Command::new("man")
                    .args(["--warnings", "-l"])
                    .arg(man.join(p))
                    .env("MANWIDTH", "80"),
                Duration::from_secs(30),
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && err.trim().is_empty(), "{p}: {err}");
            assert!(text.contains("SYNOPSIS"), "{p}: {text}");
        }
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = run(
            Command::new(duet_bin()).args(["generate", "completions", shell]),
            Duration::from_secs(30),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        assert!(text.contains("make-master") && text.contains("check-config"), "{shell}: {text}");
        if shell == "bash" && have("bash") {
            let f = dir.path().join("duet.bash");
            std::fs::write(&f, text.as_bytes()).unwrap();
            assert!(
                run(Command::new("bash").arg("-n").arg(&f), Duration::from_secs(30))
                    .status
                    .success()
            );
        }
    }
}
