//! A backing store that fails (`on_io_error = "detach"`): the disk sits behind nbdkit's error
//! filter (every request fails while a trigger file exists) seen as a file through nbdfuse. A
//! Primary whose disk fails under fio goes Diskless and serves on through its peer, no error
//! reaching fio; the cluster manager hands over to the in-sync slave with every acknowledged
//! write; a failed Secondary detaches and the Primary goes on; the detach survives a restart
//! and `duet attach` takes the disk back with a full resync.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::failover::{FioLoop, fio, verify_errors};
use crate::replication::NbdkitDisk;
use crate::writer::{Writer, check_log};
use integration::hooks::{hook_runs, recording_hooks};
use integration::pair::{HaOpts, Pair, PairOpts};
use integration::{have, run, run_ok, wait_until};

fn tools() -> bool {
    if !have("fio") || !have("nbdfuse") || !have("nbdkit") {
        eprintln!("skipped: needs fio, nbdfuse and nbdkit");
        return false;
    }
    true
}

/// Node `node`'s disk behind nbdkit's error filter: every request fails with EIO while
/// `trigger` exists.
fn failing_disk(p: &Pair, node: usize, trigger: &Path) -> NbdkitDisk {
    let file = format!("error-file={}", trigger.display());
    NbdkitDisk::install(p, node, &["--filter=error"], &["error-rate=100%", &file])
}

/// A pair whose node `failing` has its disk fail while `trigger` exists (see
/// [`failing_disk`]), alpha Primary and in sync.
fn failing_and_alpha_primary(o: &PairOpts, failing: usize) -> (Pair, PathBuf, NbdkitDisk) {
    let mut p = Pair::configure(o);
    let trigger = p.dir.path().join(format!("{}-fails", p.n[failing].name));
    let disk = failing_disk(&p, failing, &trigger);
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)), "initial sync: {}", p.repl(0));
    (p, trigger, disk)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// fio saw no I/O error from the server (a job cut by a closing connection fails otherwise).
fn no_eio(o: &Output) -> bool {
    let t = text(o);
    !t.contains("Input/output error") && !t.contains("err= 5/") && !t.contains("err=5/")
}

/// SHA-256 of the first `size` bytes served by the export at `uri`.
fn served_digest(uri: &str, size: u64) -> String {
    let cmd = format!("nbdcopy '{uri}' - | head -c {size} | sha256sum");
    let out = run_ok(Command::new("sh").args(["-c", &cmd]), Duration::from_secs(120));
    out.split_whitespace().next().unwrap_or_default().to_string()
}

/// SHA-256 of the first `size` bytes of a file.
fn file_digest(path: &Path, size: u64) -> String {
    let cmd = format!("head -c {size} '{}' | sha256sum", path.display());
    let out = run_ok(Command::new("sh").args(["-c", &cmd]), Duration::from_secs(120));
    out.split_whitespace().next().unwrap_or_default().to_string()
}

/// The image under node `i`'s nbdkit disk.
fn real_image(p: &Pair, i: usize) -> PathBuf {
    p.n[i].disk.with_extension("real")
}

/// Runs fio in a thread, creates `trigger` (the disk fails) once the Primary has replicated
/// 4 MiB of it, and returns fio's output.
fn fio_with_failure(p: &Pair, trigger: &Path, args: &'static [&'static str]) -> Output {
    let uri = p.uri();
    let job = std::thread::spawn(move || fio(&uri, args));
    let base = p.num(0, "sent_data_bytes");
    assert!(
        wait_until(Duration::from_secs(60), || p.num(0, "sent_data_bytes") >= base + (4 << 20)),
        "fio wrote nothing: {}",
        p.repl(0)
    );
    std::fs::write(trigger, b"").expect("trigger");
    job.join().expect("fio thread")
}

#[test]
fn a_failing_primary_disk_detaches_under_fio_and_serves_through_the_peer_until_attached_again() {
    if !tools() {
        return;
    }
    let hooks = tempfile::tempdir().unwrap();
    let o = PairOpts { extra: recording_hooks(hooks.path(), ""), ..PairOpts::default() };
    let (mut p, trigger, disk) = failing_and_alpha_primary(&o, 0);

    let out = fio_with_failure(&p, &trigger, &["--rw=randwrite", "--size=16M"]);
    assert!(out.status.success() && no_eio(&out), "an error reached fio: {}", text(&out));
    assert!(!verify_errors(&out), "fio verify failed: {}", text(&out));
    assert_eq!(p.res(0)["stats"]["request_errors"], 0, "an NBD request failed: {}", p.res(0));
    let r = p.repl(0);
    assert_eq!(r["disk"], "Diskless", "{r}");
    assert_eq!(r["role"], "Primary", "{r}");
    assert_eq!(r["connection"], "Connected", "{r}");
    assert_eq!(r["disk_failure"]["action"], "detached", "{r}");
    assert!(r["disk_failure"]["disk"].as_str().is_some_and(|d| d.contains("alpha")), "{r}");
    assert_eq!(r["disk_failure"]["error"], "I/O error", "{r}");
    // The whole volume reads the same through the Diskless Primary as from beta's disk: every
    // read went to the peer, and the peer has every write.
    let size = p.data_size_of(1);
    assert_eq!(served_digest(&p.uri(), size), file_digest(&p.n[1].disk, size));
    // Verified again by a second pass that only reads.
    let again = fio(&p.uri(), &["--rw=randwrite", "--size=16M", "--verify_only"]);
    assert!(again.status.success() && !verify_errors(&again), "{}", text(&again));
    // Status, events and the io_error hook say which disk failed and what was done.
    let status = p.ok(0, &["status"]);
    assert!(status.contains("DISK FAILED") && status.contains("detached"), "{status}");
    let check = run(p.cli(0).args(["status", "--check"]), Duration::from_secs(10));
    assert_eq!(check.status.code(), Some(2), "{}", text(&check));
    assert!(p.events(0).contains("disk detached (Diskless), serving on through the peer"));
    assert!(
        wait_until(Duration::from_secs(10), || !hook_runs(hooks.path(), "alpha", "io_error")
            .is_empty()),
        "io_error did not run"
    );
    let run1 = &hook_runs(hooks.path(), "alpha", "io_error")[0];
    assert_eq!(run1.get("DUET_ACTION").map(String::as_str), Some("detached"), "{run1:?}");
    assert_eq!(run1.get("DUET_RESOURCE").map(String::as_str), Some("vol0"), "{run1:?}");
    assert!(run1.get("DUET_DISK").is_some_and(|d| d.contains("alpha")), "{run1:?}");
    assert!(run1.get("DUET_REASON").is_some_and(|d| d.contains("I/O error")), "{run1:?}");

    // A restart does not trust the failed disk: Diskless from the start, never connecting,
    // never promoted; beta takes the Primary role.
    p.stop(0);
    p.start(0);
    let r = p.repl(0);
    assert_eq!(
        (r["disk"].as_str(), r["connection"].as_str()),
        (Some("Diskless"), Some("StandAlone")),
        "{r}"
    );
    let err = p.fails(0, &["primary", "--force"]);
    assert!(err.contains("duet attach"), "{err}");
    p.ok(1, &["primary"]);
    // `duet attach` needs the daemon stopped and a disk whose metadata reads.
    let err = p.fails(0, &["attach", "vol0"]);
    assert!(err.contains("is running"), "{err}");
    p.stop(0);
    let err = p.fails(0, &["attach", "vol0"]);
    assert!(err.contains("cannot be read") && err.contains("create-md"), "{err}");
    std::fs::remove_file(&trigger).unwrap();
    let out = p.ok(0, &["attach", "vol0"]);
    assert!(out.contains("attached again") && out.contains("resyncs all of it"), "{out}");
    p.start(0);
    assert!(p.wait_synced(Duration::from_secs(120)), "no full resync after attach: {}", p.repl(0));
    assert_eq!(p.repl(0)["disk_failure"], serde_json::Value::Null);
    p.stop(0);
    p.stop(1);
    assert_eq!(file_digest(&real_image(&p, 0), size), file_digest(&p.n[1].disk, size));
    drop(disk);
}

#[test]
fn a_failing_secondary_disk_detaches_and_the_primary_goes_on() {
    if !tools() {
        return;
    }
    let (mut p, trigger, disk) = failing_and_alpha_primary(&PairOpts::default(), 1);
    let out = fio_with_failure(&p, &trigger, &["--rw=randwrite", "--size=16M"]);
    assert!(out.status.success() && no_eio(&out), "an error reached fio: {}", text(&out));
    assert!(!verify_errors(&out), "{}", text(&out));
    assert_eq!(p.res(0)["stats"]["request_errors"], 0, "an NBD request failed: {}", p.res(0));
    assert!(p.wait_for(1, Duration::from_secs(10), |r| r["disk"] == "Diskless"), "{}", p.repl(1));
    let b = p.repl(1);
    assert_eq!(b["connection"], "StandAlone", "{b}");
    assert_eq!(b["disk_failure"]["action"], "detached", "{b}");
    let a = p.repl(0);
    assert_eq!(
        (a["role"].as_str(), a["disk"].as_str()),
        (Some("Primary"), Some("UpToDate")),
        "{a}"
    );
    assert_ne!(a["connection"], "Connected", "{a}");
    assert!(p.num(0, "out_of_sync_bytes") > 0, "the Primary marks what beta misses: {a}");
    assert!(p.events(1).contains("this node is no longer a failover target"));
    // A Diskless Secondary is refused a promotion.
    assert!(p.fails(1, &["primary", "--force"]).contains("Diskless"));
    // Taken back: a full resync, then identical.
    p.stop(1);
    std::fs::remove_file(&trigger).unwrap();
    p.ok(1, &["attach", "vol0"]);
    p.start(1);
    assert!(p.wait_synced(Duration::from_secs(120)), "no resync after attach: {}", p.repl(1));
    let size = p.data_size_of(0);
    p.stop(0);
    p.stop(1);
    assert_eq!(file_digest(&p.n[0].disk, size), file_digest(&real_image(&p, 1), size));
    drop(disk);
}

#[test]
fn a_master_whose_disk_fails_hands_over_with_every_acknowledged_write_and_is_no_failover_target() {
    if !tools() {
        return;
    }
    let mut p = Pair::configure(&PairOpts { ha: Some(HaOpts::default()), ..PairOpts::default() });
    let trigger = p.dir.path().join("alpha-fails");
    let disk = failing_disk(&p, 0, &trigger);
    p.start(0);
    p.start(1);
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"));
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)), "initial sync: {}", p.repl(1));
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)));
    let port = p.n[0].nbd_port;
    let seed = 7100;
    let w = Writer::start(port, seed);
    // fio jobs back to back: a job cut by the handover fails on its closed connection; none may
    // see an I/O error or a verify failure.
    let fio_loop = FioLoop::start(p.uri());
    assert!(w.wait_more(100, Duration::from_secs(30)));
    std::fs::write(&trigger, b"").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || p.is_master(1) && !p.is_master(0)),
        "no handover: {}\n{}\n{}",
        p.repl(0),
        p.cluster(0),
        p.events(0)
    );
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through beta");
    let outs = fio_loop.finish_after_two_more();
    let acked = w.finish();
    check_log(port, seed, &acked);
    for o in outs.iter() {
        assert!(no_eio(o) && !verify_errors(o), "fio: {}", text(o));
    }
    assert!(outs.last().unwrap().status.success(), "{}", text(outs.last().unwrap()));
    let a = p.repl(0);
    assert_eq!(
        (a["role"].as_str(), a["disk"].as_str()),
        (Some("Secondary"), Some("Diskless")),
        "{a}"
    );
    let ev = p.events(0);
    assert!(ev.contains("this node is unhealthy") || ev.contains("unhealthy"), "{ev}");
    // The Diskless ex-master is no failover target: beta dies, alpha says why it stays slave.
    p.kill(1);
    assert!(
        wait_until(Duration::from_secs(20), || p.events(0).contains("not taking over")),
        "{}",
        p.events(0)
    );
    assert!(!p.is_master(0), "a Diskless node took over");
    drop(disk);
}

/// `on_io_error = "freeze"`: the Primary's disk fails under fio; every failing request is held
/// (no error reaches fio, nothing is detached) until the disk is back and `duet resume-io`
/// retries them; fio finishes and verifies, both disks equal.
#[test]
fn a_frozen_primary_disk_holds_the_clients_io_until_resume_io_and_loses_nothing() {
    if !tools() {
        return;
    }
    let o = PairOpts { resource_extra: "on_io_error = \"freeze\"".into(), ..PairOpts::default() };
    let (mut p, trigger, _disk) = failing_and_alpha_primary(&o, 0);
    assert!(p.ok(0, &["resume-io"]).contains("no I/O was held"));

    let uri = p.uri();
    let job =
        std::thread::spawn(move || fio(&uri, &["--rw=randwrite", "--size=16M", "--fsync=64"]));
    let base = p.num(0, "sent_data_bytes");
    assert!(
        wait_until(Duration::from_secs(60), || p.num(0, "sent_data_bytes") >= base + (4 << 20)),
        "fio wrote nothing: {}",
        p.repl(0)
    );
    std::fs::write(&trigger, b"").unwrap();
    let frozen = |r: &serde_json::Value| {
        r["disk_failure"]["action"].as_str().is_some_and(|a| a.starts_with("frozen"))
    };
    assert!(p.wait_for(0, Duration::from_secs(60), frozen), "never frozen: {}", p.repl(0));
    let r = p.repl(0);
    assert_eq!(
        (r["disk"].as_str(), r["role"].as_str()),
        (Some("UpToDate"), Some("Primary")),
        "{r}"
    );
    let check = run(p.cli(0).args(["status", "--check"]), Duration::from_secs(10));
    assert_eq!(check.status.code(), Some(2), "{}", text(&check));
    assert!(text(&check).contains("I/O frozen by a disk error"), "{}", text(&check));
    assert!(p.events(0).contains("I/O frozen (on_io_error = \"freeze\")"));

    // The disk is back; the operator resumes.
    std::fs::remove_file(&trigger).unwrap();
    assert!(p.ok(0, &["resume-io"]).contains("I/O resumed"));
    let out = job.join().unwrap();
    assert!(out.status.success() && no_eio(&out), "an error reached fio: {}", text(&out));
    assert!(!verify_errors(&out), "fio verify failed: {}", text(&out));
    assert_eq!(p.res(0)["stats"]["request_errors"], 0, "an NBD request failed: {}", p.res(0));
    let r = p.repl(0);
    assert_eq!(r["disk"], "UpToDate", "{r}");
    assert_eq!(r["disk_failure"], serde_json::Value::Null, "{r}");
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    let size = p.data_size_of(1);
    assert_eq!(served_digest(&p.uri(), size), file_digest(&p.n[1].disk, size));
    p.stop(0);
    p.stop(1);
    assert_eq!(file_digest(&real_image(&p, 0), size), file_digest(&p.n[1].disk, size));
}
