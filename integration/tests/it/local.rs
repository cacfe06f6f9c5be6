//! The node's own surfaces against a careless operator: a secret others can read, a second
//! daemon or a `create-md` on a disk in use.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use integration::pair::{Pair, PairOpts};
use integration::{duet_bin, run};

/// `duet --config CONFIG --node alpha ARGS`, run to its end: its exit status and stderr.
fn alpha_with(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let o = run(
        std::process::Command::new(duet_bin())
            .arg("--config")
            .arg(config)
            .args(["--node", "alpha"])
            .args(args),
        Duration::from_secs(20),
    );
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_secret_that_others_can_read_is_refused() {
    let p = Pair::configure(&PairOpts::default());
    std::fs::set_permissions(&p.secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, e) = alpha_with(&p.config, &["daemon"]);
    assert!(!ok, "the daemon started with a 0644 secret");
    assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
    assert!(!p.n[0].socket.exists(), "it got as far as its control socket");
}

/// A group that does not exist stops the daemon before it opens anything, naming the key.
#[test]
fn an_unknown_control_group_is_refused_at_start() {
    let p = Pair::configure(&PairOpts {
        cluster_extra: "admin_group = \"duet-no-such-group\"".into(),
        ..PairOpts::default()
    });
    let (ok, e) = alpha_with(&p.config, &["daemon"]);
    assert!(!ok, "the daemon started with an unknown admin_group");
    assert!(e.contains("cluster.admin_group") && e.contains("no such group"), "{e}");
    assert!(!p.n[0].socket.exists());
}

#[test]
fn a_second_daemon_and_create_md_on_a_disk_in_use_are_refused() {
    let mut p = Pair::configure(&PairOpts::default());
    p.start(0);
    let pid = p.status(0)["pid"].as_u64();
    let before = p.ok(0, &["dump-md"]);
    // A second daemon for the same node (the same disk).
    let (ok, e) = alpha_with(&p.config, &["daemon"]);
    assert!(!ok, "a second daemon started on a disk in use");
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
    let (ok, e) = alpha_with(&other, &["create-md", "--force"]);
    assert!(!ok, "create-md overwrote the metadata of a disk in use");
    assert!(e.contains("is in use by pid") && e.contains("(duet)"), "{e}");
    // The running daemon and its metadata are untouched; with it stopped, create-md works.
    assert_eq!(p.ok(0, &["dump-md"]), before);
    p.ok(0, &["status"]);
    p.stop(0);
    p.ok(0, &["create-md", "--force"]);
}

/// A system user the test creates (and removes), in a group of its own name.
struct TestUser {
    name: &'static str,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create(name: &'static str) -> Self {
        let _ = std::process::Command::new("/usr/sbin/useradd")
            .args(["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"])
            .arg(name)
            .status();
        let u = nix::unistd::User::from_name(name).unwrap().expect("the test user exists");
        Self { name, uid: u.uid.as_raw(), gid: u.gid.as_raw() }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("/usr/sbin/userdel").arg(self.name).status();
        let _ = std::process::Command::new("/usr/sbin/groupdel").arg(self.name).status();
    }
}

/// With `read_group` set, a member gets status and events but no command that changes
/// anything, and a uid in no group gets nothing; without groups the socket is root's alone.
#[test]
fn an_unprivileged_caller_reads_the_status_and_changes_nothing() {
    use std::os::unix::process::CommandExt;
    if !integration::is_root("creating a user and running the CLI as it") {
        return;
    }
    // Without groups: 0600, root only.
    let mut plain = Pair::configure(&PairOpts::default());
    plain.start(0);
    let mode = std::fs::metadata(&plain.n[0].socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    plain.stop(0);

    let user = TestUser::create("duet-itest-ro");
    let mut p = Pair::configure(&PairOpts {
        cluster_extra: format!("read_group = \"{}\"", user.name),
        ..PairOpts::default()
    });
    // The user can reach the config and the socket (the secret stays root's).
    std::fs::set_permissions(p.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&p.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.start(0);
    let as_user = |uid: u32, gid: u32, args: &[&str]| {
        let mut c = p.cli(0);
        c.args(args).uid(uid).gid(gid);
        run(&mut c, Duration::from_secs(20))
    };
    let o = as_user(user.uid, user.gid, &["status", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["node"], "alpha");
    assert!(as_user(user.uid, user.gid, &["events"]).status.success());
    for cmd in [&["make-master"][..], &["primary", "--force"], &["disconnect"], &["invalidate"]] {
        let o = as_user(user.uid, user.gid, cmd);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{cmd:?} ran for a reader");
        assert!(e.contains("permission denied") && e.contains("admin_group"), "{cmd:?}: {e}");
    }
    assert_eq!(p.repl(0)["role"], "Secondary", "a reader changed the role");
    assert_eq!(p.repl(0)["connection"], "Connecting", "a reader disconnected the link");
    // A uid in neither group (no passwd entry at all) reads nothing.
    let o = as_user(64_999, 64_999, &["status"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("permission denied"), "{e}");
    // Root still does everything.
    p.ok(0, &["primary", "--force"]);
}
