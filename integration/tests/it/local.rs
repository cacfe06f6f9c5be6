//! The node's own surfaces against a careless operator: a secret others can read, a second
//! daemon or a `create-md` on a disk in use.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use integration::pair::{Pair, PairOpts};
use integration::{duet_bin, run};

#[test]
fn a_secret_that_others_can_read_is_refused() {
    let p = Pair::configure(&PairOpts::default());
    std::fs::set_permissions(&p.secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(
        std::process::Command::new(duet_bin())
            .arg("--config")
            .arg(&p.config)
            .args(["--node", "alpha", "daemon"]),
        Duration::from_secs(20),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the daemon started with a 0644 secret");
    assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
    assert!(!p.n[0].socket.exists(), "it got as far as its control socket");
}

#[test]
fn a_second_daemon_and_create_md_on_a_disk_in_use_are_refused() {
    let mut p = Pair::configure(&PairOpts::default());
    p.start(0);
    let pid = p.status(0)["pid"].as_u64();
    let before = p.ok(0, &["dump-md"]);
    // A second daemon for the same node (the same disk).
    let o = run(
        std::process::Command::new(duet_bin())
            .arg("--config")
            .arg(&p.config)
            .args(["--node", "alpha", "daemon"]),
        Duration::from_secs(20),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a second daemon started on a disk in use");
    assert!(e.contains("is in use by pid") && e.contains("(duet)"), "{e}");
    if let Some(pid) = pid {
        assert!(e.contains(&format!("pid {pid} ")), "the holder is not named: {e}");
    }
    // create-md on the running node, even forced: refused by the running daemon's control
    // socket, and by the disk's lock through a config that names another socket (a second
    // copy of the file, an old one).
    let e = p.fails(0, &["create-md", "--force"]);
    assert!(e.contains("is running"), "{e}");
    let text = std::fs::read_to_string(&p.config).unwrap();
    let sock = p.n[0].socket.display().to_string();
    let other = p.dir.path().join("other.toml");
    std::fs::write(&other, text.replace(&sock, &format!("{sock}.other"))).unwrap();
    let o = run(
        std::process::Command::new(duet_bin()).arg("--config").arg(&other).args([
            "--node",
            "alpha",
            "create-md",
            "--force",
        ]),
        Duration::from_secs(20),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "create-md overwrote the metadata of a disk in use");
    assert!(e.contains("is in use by pid") && e.contains("(duet)"), "{e}");
    // The running daemon and its metadata are untouched; with it stopped, create-md works.
    assert_eq!(p.ok(0, &["dump-md"]), before);
    p.ok(0, &["status"]);
    p.stop(0);
    p.ok(0, &["create-md", "--force"]);
}
