//! `duet check-config --connect` against real daemons: a good pair passes every check, and each
//! failure it names is shown by a pair that has it.

use std::time::Duration;

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::{run, wait_until};

/// Runs the connection test on node `i`: exit code and the table.
fn connect_test(p: &Pair, i: usize, wait: u64) -> (Option<i32>, String) {
    let o = run(
        p.cli(i).args(["check-config", "--connect", "--wait", &wait.to_string()]),
        Duration::from_secs(60),
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    (o.status.code(), format!("{out}{}", String::from_utf8_lossy(&o.stderr)))
}

/// The table's line for `check`, which must be there.
fn line<'a>(table: &'a str, check: &str) -> &'a str {
    let l = table.lines().find(|l| l.starts_with(&format!("{check}  ")));
    l.unwrap_or_else(|| panic!("no line {check:?} in\n{table}"))
}

fn passed(table: &str, check: &str) -> bool {
    line(table, check)[check.len()..].trim_start().starts_with("ok ")
}

fn ha() -> PairOpts {
    PairOpts { size: 16 << 20, ha: Some(HaOpts::default()), ..PairOpts::default() }
}

#[test]
fn a_good_pair_passes_every_check_from_either_node() {
    let mut p = Pair::configure(&ha());
    p.start(0);
    p.start(1);
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)));
    let connects = p.repl(0)["connects"].clone();
    let both = format!("{} bytes on both nodes", p.data_size());
    for i in 0..2 {
        let (code, t) = connect_test(&p, i, 10);
        assert_eq!(code, Some(0), "{t}");
        for check in [
            "replication address (vol0)",
            "heartbeat link 0 subnet",
            "replication (vol0)",
            "volume size (vol0)",
            "configuration",
            "heartbeat link 0",
            "heartbeat link 1",
        ] {
            assert!(passed(&t, check), "{check}: {t}");
        }
        assert!(line(&t, "replication (vol0)").contains("authenticated"), "{t}");
        assert!(line(&t, "replication (vol0)").contains("protocol version 2"), "{t}");
        assert!(line(&t, "volume size (vol0)").contains(&both), "{t}");
        assert!(line(&t, "heartbeat link 1").contains("serial"), "{t}");
        assert!(line(&t, "configuration").contains("the same as"), "{t}");
        assert!(t.contains("all 7 checks passed"), "{t}");
    }
    // Nothing the test did disturbed the pair.
    assert!(p.synced() && p.is_master(0));
    assert_eq!(p.repl(0)["connects"], connects, "{}", p.repl(0));
}

#[test]
fn a_peer_whose_daemon_is_not_running_is_named_and_so_is_a_node_without_its_own() {
    let mut p = Pair::configure(&ha());
    let (code, t) = connect_test(&p, 0, 0);
    assert_eq!(code, Some(1), "{t}");
    assert!(line(&t, "local daemon").contains("cannot reach the duet daemon"), "{t}");
    // The local checks ran all the same.
    assert!(passed(&t, "replication address (vol0)"), "{t}");
    p.start(0);
    let (code, t) = connect_test(&p, 0, 1);
    assert_eq!(code, Some(1), "{t}");
    assert!(line(&t, "replication (vol0)").contains("nothing answers there"), "{t}");
    assert!(line(&t, "volume size (vol0)").contains("unknown"), "{t}");
    for l in ["heartbeat link 0", "heartbeat link 1"] {
        assert!(line(&t, l).contains("never heard from the peer"), "{l}: {t}");
    }
    assert!(t.contains("checks failed"), "{t}");
    // Beta runs, and the handshake names what is left: no data to replicate yet.
    p.start(1);
    let (code, t) = connect_test(&p, 0, 20);
    assert_eq!(code, Some(1), "{t}");
    assert!(line(&t, "replication (vol0)").contains("both disks are Inconsistent"), "{t}");
    assert!(passed(&t, "heartbeat link 0") && passed(&t, "volume size (vol0)"), "{t}");
    p.ok(0, &["make-master", "--force"]);
    let (code, t) = connect_test(&p, 0, 20);
    assert_eq!(code, Some(0), "{t}");
}

#[test]
fn a_wrong_secret_is_named_on_the_replication_link_and_the_heartbeat() {
    let mut p = Pair::configure(&ha());
    let other = p.dir.path().join("other-secret");
    std::fs::write(&other, "not the same secret at all, really").unwrap();
    let text = std::fs::read_to_string(&p.config).unwrap();
    let mine = p.secret.display().to_string();
    assert!(text.contains(&mine));
    let beta = p.dir.path().join("beta.toml");
    std::fs::write(&beta, text.replace(&mine, &other.display().to_string())).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p.n[1].config = Some(beta);
    p.start(0);
    p.start(1);
    let (code, t) = connect_test(&p, 0, 3);
    assert_eq!(code, Some(1), "{t}");
    assert!(line(&t, "replication (vol0)").contains("wrong cluster secret"), "{t}");
    assert!(line(&t, "heartbeat link 0").contains("refused"), "{t}");
    let (code, t) = connect_test(&p, 1, 3);
    assert_eq!(code, Some(1), "{t}");
    assert!(line(&t, "replication (vol0)").contains("wrong cluster secret"), "{t}");
}

#[test]
fn volumes_of_different_sizes_are_named_and_the_bigger_standby_still_syncs() {
    let mut p = {
        let mut p = Pair::configure(&PairOpts { size: 16 << 20, ..PairOpts::default() });
        // Beta's disk twice alpha's, its metadata made again for that size.
        let f = std::fs::OpenOptions::new().write(true).open(&p.n[1].disk).unwrap();
        f.set_len(32 << 20).unwrap();
        drop(f);
        p.ok(1, &["create-md", "--force"]);
        p.start(0);
        p.start(1);
        p
    };
    p.ok(0, &["primary", "--force"]);
    // (A first handshake, both Secondary, was refused for the sizes: wait for the session the
    // promotion allows.)
    let live =
        |r: &serde_json::Value| r["connection"] == "Connected" || r["connection"] == "SyncSource";
    assert!(p.wait_for(0, Duration::from_secs(60), live), "{}", p.repl(0));
    let (code, t) = connect_test(&p, 0, 0);
    assert_eq!(code, Some(1), "{t}");
    let l = line(&t, "volume size (vol0)");
    let (a, b) = (p.data_size_of(0), p.data_size_of(1));
    assert!(a < b, "{a} {b}");
    assert!(l.contains(&format!("alpha has {a} bytes, beta {b}")), "{t}");
    assert!(l.contains("with beta as the master nothing would replicate"), "{t}");
    assert!(passed(&t, "replication (vol0)"), "{t}");
    // The bigger standby gets all of the smaller one's data (its blocks past alpha's size are
    // not asked for) and is UpToDate.
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    integration::qemu_io(&p.uri(), &["write -P 0x71 0 1M"]);
    assert!(p.wait_synced(Duration::from_secs(30)));
    // What the line warns of: beta, the bigger, is not promoted beside alpha (its writes past
    // alpha's end could not replicate); alone, it is, with alpha's data.
    p.ok(0, &["secondary"]);
    let e = p.fails(1, &["primary"]);
    assert!(e.contains("as Primary it could not receive all of this one's"), "{e}");
    p.stop(0);
    assert!(wait_until(Duration::from_secs(20), || p.repl(1)["connection"] != "Connected"));
    p.ok(1, &["primary"]);
    integration::qemu_io(&p.uri(), &["read -P 0x71 0 1M"]);
    // Alpha back: the handshake refuses to make it the receiver of a bigger volume.
    p.start(0);
    let small = |r: &serde_json::Value| {
        r["last_refusal"].as_str().is_some_and(|w| w.contains("needs at least the primary's size"))
    };
    assert!(p.wait_for(1, Duration::from_secs(20), small), "{}", p.repl(1));
}

#[test]
fn keys_in_which_the_two_files_differ_are_named() {
    let mut p = Pair::configure(&PairOpts { resync: "rate_kib = 100000".into(), ..ha() });
    let text = std::fs::read_to_string(&p.config).unwrap();
    assert!(text.contains("failback = \"off\"") && text.contains("rate_kib = 100000"));
    let beta = p.dir.path().join("beta.toml");
    let changed = text
        .replace("failback = \"off\"", "failback = \"auto\"")
        .replace("rate_kib = 100000", "rate_kib = 200000\nmin_rate_kib = 1024");
    std::fs::write(&beta, changed).unwrap();
    p.n[1].config = Some(beta);
    p.start(0);
    p.start(1);
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)));
    for (i, other) in [(0, "beta"), (1, "alpha")] {
        let (code, t) = connect_test(&p, i, 0);
        assert_eq!(code, Some(1), "{t}");
        let l = line(&t, "configuration");
        assert!(l.contains(&format!("{other}'s file differs in: cluster.failback, ")), "{t}");
        assert!(l.contains("resource[0].resync.rate_kib"), "{t}");
        let only = if i == 0 { "(only on the peer)" } else { "(only here)" };
        assert!(l.contains(&format!("resource[0].resync.min_rate_kib {only}")), "{t}");
        assert!(passed(&t, "replication (vol0)"), "{t}");
        assert!(p.events(i).contains(&format!("the configuration differs from {other}'s in")));
    }
}
