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
        "maintenance",
        "attach",
        "events",
        "wait",
        "adjust",
    ];
    let mut pages = vec!["duet.1".to_string(), "duet.toml.5".to_string()];
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
            if p == "duet.toml.5" {
                for want in ["[resource.resync]", "rate_kib", "[hooks]", "before_resync_target"] {
                    assert!(text.contains(want), "{want} not in duet.toml(5):\n{text}");
                }
            }
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

/// Removes the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run(Command::new("dpkg").args(["--purge", "duet"]), Duration::from_secs(120));
    }
}

/// `scripts/deb.sh` builds the .deb; it holds the binary, the units, the conffile, the man pages
/// and the completions; `dpkg -i` installs a working `duet` whose units verify, and
/// `dpkg --purge` leaves none of its files behind.
#[test]
fn the_debian_package_installs_and_purges_cleanly() {
    if !integration::is_root("dpkg -i") || !have("dpkg-deb") || !have("cargo") {
        return;
    }
    if run(Command::new("dpkg").args(["-s", "duet"]), Duration::from_secs(30)).status.success() {
        eprintln!("SKIP: a duet package is installed on this machine; not touching it");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = run(
        // The binary under test as it is: a cargo build here would rebuild it without the
        // integration tests' features under the other tests' feet.
        Command::new(root.join("scripts/deb.sh"))
            .arg("--binary")
            .arg(duet_bin())
            .current_dir(&root),
        Duration::from_secs(900),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/deb.sh failed: {log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout.lines().rev().find(|l| l.trim().ends_with(".deb")).expect("the .deb path");
    let deb = root.join(deb.trim());
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb), Duration::from_secs(60));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let files: Vec<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in [
        "/usr/bin/duet",
        "/lib/systemd/system/duet.service",
        "/lib/systemd/system/duet-wait@.service",
        "/etc/duet/duet.toml",
        "/usr/share/man/man1/duet.1.gz",
        "/usr/share/man/man1/duet-status.1.gz",
        "/usr/share/man/man1/duet-adjust.1.gz",
        "/usr/share/man/man5/duet.toml.5.gz",
        "/usr/share/doc/duet/grafana-dashboard.json",
        "/usr/share/bash-completion/completions/duet",
        "/usr/share/zsh/vendor-completions/_duet",
        "/usr/share/fish/vendor_completions.d/duet.fish",
    ] {
        assert!(files.iter().any(|f| f == want), "{want} not in the package:\n{listing}");
    }
    let info =
        run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"), Duration::from_secs(60));
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(info.contains("/etc/duet/duet.toml"), "the configuration is a conffile: {info}");
    let guard = Installed;
    let out = run(Command::new("dpkg").arg("-i").arg(&deb), Duration::from_secs(300));
    assert!(out.status.success(), "dpkg -i: {}", String::from_utf8_lossy(&out.stderr));
    let v = run(Command::new("/usr/bin/duet").arg("--version"), Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("duet "), "{v:?}");
    // The installed units against the installed binary.
    let out = run(
        Command::new("systemd-analyze").arg("verify").args([
            "/lib/systemd/system/duet.service",
            "/lib/systemd/system/duet-wait@vol0.service",
        ]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("duet"), "{err}");
    if have("man") {
        let out = run(
            Command::new("man").args(["--warnings", "duet-status"]).env("MANWIDTH", "80"),
            Duration::from_secs(30),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("SYNOPSIS"), "man duet-status");
    }
    drop(guard);
    let left: Vec<&String> = files.iter().filter(|f| std::path::Path::new(f).exists()).collect();
    assert!(left.is_empty(), "left behind after dpkg --purge: {left:?}");
    assert!(!std::path::Path::new("/etc/duet").exists(), "/etc/duet left behind");
}
