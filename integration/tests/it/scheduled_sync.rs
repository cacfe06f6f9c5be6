//! `sync = "scheduled"` with real daemons: disks in files on XFS with reflinks (a loop
//! device), the cluster manager on, catch-ups started by hand (`duet connect` on the master is
//! a run at once), and a master killed in the middle of one.

use std::time::Duration;

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::{XfsMount, duet_bin, have, qemu_io, run, wait_until};

const MIN: Duration = Duration::from_secs(60);

/// A schedule that does not fire while the test runs: daily, twelve hours from now.
fn far_schedule() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Local time may be anything: half a day away in UTC is at least 11 hours away in any zone
    // whose offset does not change during the test.
    let h = (now / 3600 + 12) % 24;
    format!("daily {h:02}:00")
}

/// How many times node `i`'s events say a catch-up ended in sync.
fn runs_done(p: &Pair, i: usize) -> usize {
    p.events(i).matches("the standby is in sync; the link is idle").count()
}

/// Waits until the master (alpha) has ended its `n`th catch-up: both disks UpToDate, the link
/// idle on alpha, nothing out of sync on beta.
fn wait_run_done(p: &Pair, n: usize) {
    assert!(
        wait_until(2 * MIN, || runs_done(p, 0) >= n
            && p.repl(0)["connection"] == "StandAlone"
            && p.repl(1)["disk"] == "UpToDate"),
        "catch-up {n} did not end: {}\n{}\n{}",
        p.repl(0),
        p.repl(1),
        p.events(0)
    );
}

#[test]
fn a_scheduled_standby_catches_up_at_each_run_and_a_failover_mid_catch_up_promotes_its_last_consistent_state()
 {
    if !have("qemu-io") {
        return;
    }
    let Some(xfs) = XfsMount::new(1 << 30) else { return };
    let o = PairOpts {
        size: 64 << 20,
        ha: Some(HaOpts::default()),
        disk_dir: Some(xfs.mnt.clone()),
        resource_extra: format!("sync = \"scheduled\"\nschedule = \"{}\"", far_schedule()),
        // 8 MiB/s: a catch-up of 40 MiB takes seconds, long enough to be cut off.
        resync: "mode = \"fixed\"\nrate_kib = 8192".into(),
        ..PairOpts::default()
    };
    let mut p = Pair::configure(&o);
    p.start(0);
    p.start(1);
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"));
    p.ok(0, &["make-master", "--force"]);
    // The initial full sync is the first catch-up; then the link idles.
    wait_run_done(&p, 1);
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)), "{}", p.cluster(0));
    let size = p.data_size();
    let uri = p.uri();

    // Between runs the link is idle: writes stay on the master, which tracks them.
    qemu_io(&uri, &["write -P 0xa1 0 16M"]);
    assert!(
        wait_until(Duration::from_secs(5), || p.num(0, "out_of_sync_bytes") >= 16 << 20),
        "the master does not track what the standby lacks: {}",
        p.repl(0)
    );
    assert_eq!(p.repl(0)["connection"], "StandAlone", "{}", p.repl(0));
    assert_eq!(p.repl(1)["disk"], "UpToDate", "an idle standby is not outdated: {}", p.repl(1));
    assert_ne!(p.digest(0, size), p.digest(1, size), "the standby got writes between runs");

    // A run catches up: the standby holds exactly the master's data.
    p.ok(0, &["connect"]);
    wait_run_done(&p, 2);
    let consistent = p.digest(0, size);
    assert_eq!(p.digest(1, size), consistent, "the catch-up left the replicas different");
    let sched = &p.repl(1)["scheduled"];
    assert!(sched["last_consistent"].as_f64().is_some(), "no consistent point: {sched}");
    assert!(sched["kept"].is_null(), "the kept state outlived a finished catch-up: {sched}");
    let text = p.ok(1, &["status"]);
    assert!(text.contains("scheduled sync: last consistent point 20"), "{text}");
    // Monitoring sees no fault in the idle link (`--check` exits 0).
    let check = p.ok(0, &["status", "--check"]);
    assert!(check.starts_with("DUET OK") && check.contains("link idle"), "{check}");
    let check = p.ok(1, &["status", "--check"]);
    assert!(check.starts_with("DUET OK") && check.contains("last catch-up"), "{check}");

    // More writes, then a catch-up that the master's death cuts off.
    qemu_io(&uri, &["write -P 0xb2 8M 48M"]);
    assert_ne!(p.digest(0, size), consistent);
    p.ok(0, &["connect"]);
    assert!(
        wait_until(MIN, || {
            let r = p.repl(1);
            r["connection"] == "SyncTarget"
                && r["resync"]["done_bytes"].as_u64().is_some_and(|d| d >= 8 << 20)
        }),
        "the catch-up did not get under way: {}",
        p.repl(1)
    );
    let r = p.repl(1);
    assert_eq!(r["disk"], "Inconsistent", "{r}");
    assert!(!r["scheduled"]["kept"].is_null(), "no consistent state kept: {r}");
    assert!(r["resync"]["done_bytes"].as_u64() < r["resync"]["total_bytes"].as_u64(), "{r}");
    // The standby crashes and comes back mid-catch-up: the state kept before it still holds
    // (the resync goes on; nothing new is kept of the half-synced data).
    let kept = |p: &Pair| p.events(1).matches("kept the last consistent state before").count();
    let kept_before = kept(&p);
    p.kill(1);
    p.start(1);
    assert!(
        wait_until(MIN, || {
            let r = p.repl(1);
            r["connection"] == "SyncTarget" && !r["scheduled"]["kept"].is_null()
        }),
        "the catch-up did not resume with the kept state: {}",
        p.repl(1)
    );
    let ev = p.events(1);
    assert!(ev.contains("a consistent state is kept from before the unfinished resync"), "{ev}");
    assert_eq!(kept(&p), kept_before, "a state was kept of half-synced data: {ev}");
    p.kill(0);

    // Beta takes over with the state of the last finished run, byte for byte.
    assert!(
        wait_until(MIN, || p.is_master(1)),
        "beta did not take over: {}\n{}\n{}",
        p.cluster(1),
        p.repl(1),
        p.events(1)
    );
    let ev = p.events(1);
    assert!(ev.contains("restored the last consistent state"), "{ev}");
    let r = p.repl(1);
    assert_eq!(
        (r["role"].as_str(), r["disk"].as_str()),
        (Some("Primary"), Some("UpToDate")),
        "{r}"
    );
    assert_eq!(r["out_of_sync_bytes"].as_u64(), Some(size), "everything resyncs later: {r}");
    assert_eq!(
        p.digest(1, size),
        consistent,
        "beta promoted something else than its last consistent state"
    );
    // And it serves it.
    let o = qemu_io(&uri, &["read -P 0xa1 0 8M", "read -P 0 16M 32M"]);
    assert!(!o.contains("Pattern verification failed"), "{o}");
    // The old master comes back with writes the new one never saw: a split brain, named as
    // one; the operator discards the old master's writes and it resyncs from the new one.
    p.start(0);
    assert!(
        wait_until(MIN, || p.repl(0)["split_brain"].is_string()),
        "the old master's return is not a split brain: {}\n{}",
        p.repl(0),
        p.events(0)
    );
    p.ok(0, &["connect", "--discard-my-data"]);
    p.ok(1, &["connect"]);
    assert!(
        wait_until(2 * MIN, || runs_done(&p, 1) >= 1 && p.repl(0)["disk"] == "UpToDate"),
        "no resync after the split brain was resolved: {}\n{}",
        p.repl(0),
        p.repl(1)
    );
    assert_eq!(p.digest(0, size), consistent, "the old master did not take the new one's data");
    drop(p);
    drop(xfs);
}

#[test]
fn without_reflinks_scheduled_sync_is_refused_unless_before_resync_target_keeps_the_state() {
    if !have("qemu-io") {
        return;
    }
    std::fs::create_dir_all("/var/tmp/duet-tests").unwrap();
    let disks =
        tempfile::Builder::new().prefix("noreflink-").tempdir_in("/var/tmp/duet-tests").unwrap();
    if replicator::repl::volume::probe_reflink(disks.path()).is_ok() {
        eprintln!(
            "SKIP: {} has reflinks (this test needs a filesystem without)",
            disks.path().display()
        );
        return;
    }
    let beta_disk = disks.path().join("beta.img");
    let scheduled = format!("sync = \"scheduled\"\nschedule = \"{}\"", far_schedule());
    let o = PairOpts {
        disk_dir: Some(disks.path().to_owned()),
        resource_extra: scheduled,
        ..PairOpts::default()
    };
    // No reflinks and no hook: nothing could keep the standby's state; the daemon says so.
    let mut p = Pair::configure(&o);
    let out = run(
        std::process::Command::new(duet_bin())
            .arg("--config")
            .arg(&p.config)
            .args(["--node", "alpha", "daemon"]),
        Duration::from_secs(20),
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a way to keep the state: {e}");
    assert!(
        e.contains("resource[0] (vol0): sync = \"scheduled\"")
            && e.contains("FICLONE")
            && e.contains("mkfs.xfs -m reflink=1")
            && e.contains("before_resync_target"),
        "{e}"
    );
    drop(p);
    // With a hook that keeps it (a plain copy here; an LVM snapshot in life): it runs before a
    // catch-up reaches the standby, once per catch-up, and never of half-synced data.
    let hook = format!(
        "[hooks]\nbefore_resync_target = \"cp --sparse=always {d} {d}.kept-$$\"\ntimeout_ms = 10000\n",
        d = beta_disk.display()
    );
    let _ = std::fs::remove_file(&beta_disk);
    let _ = std::fs::remove_file(disks.path().join("alpha.img"));
    p = Pair::configure(&PairOpts { extra: hook, http: true, ..o });
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    wait_run_done(&p, 1);
    let kept = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(disks.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|f| f.to_string_lossy().contains(".kept-"))
            .collect()
    };
    assert!(kept().is_empty(), "the hook ran before the initial sync (nothing consistent to keep)");
    let size = p.data_size();
    let consistent = p.digest(1, size);
    qemu_io(&p.uri(), &["write -P 0xc3 0 24M"]);
    p.ok(0, &["connect"]);
    wait_run_done(&p, 2);
    let copies = kept();
    assert_eq!(copies.len(), 1, "{copies:?}\n{}", p.events(1));
    let digest_of = |f: &std::path::Path| {
        let o = run(
            std::process::Command::new("sh")
                .args(["-c", &format!("head -c {size} {} | sha256sum", f.display())]),
            Duration::from_secs(60),
        );
        String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    assert_eq!(
        digest_of(&copies[0]),
        consistent,
        "the hook saw more than the last consistent state"
    );
    assert_eq!(p.digest(1, size), p.digest(0, size), "the catch-up left the replicas different");
    assert!(p.events(1).contains("before_resync_target hook kept the last consistent state"));
    // The last consistent point and the next run, for alerting.
    if have("promtool") {
        let m = crate::web::scrape(&p, 1);
        assert!(m.contains("duet_scheduled_last_consistent_timestamp_seconds{"), "{m}");
        let m = crate::web::scrape(&p, 0);
        assert!(m.contains("duet_scheduled_next_run_timestamp_seconds{"), "{m}");
    }
}
