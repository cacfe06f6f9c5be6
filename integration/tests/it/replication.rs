//! Replication between two real daemons on loopback: protocols, crashes, resync, split brain,
//! verify. Every check reads the real backing files or the real daemons' status.

use std::process::Command;
use std::time::Duration;

use integration::hooks::{hook_runs, recording_hooks};
use integration::pair::{Pair, PairOpts};
use integration::rawnbd::Raw;
use integration::{have, random_bytes, run_ok, wait_until};
use replicator::nbd::proto::{CMD_FLUSH, CMD_READ, CMD_WRITE};

/// fio 4 KiB random writes at QD32 with crc32c verify, ending with a flush; `limit` is
/// `--runtime=S` or `--number_ios=N`.
fn fio_randwrite(uri: &str, size: &str, limit: &str) -> String {
    run_ok(
        Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={size}"),
            limit,
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--end_fsync=1",
            "--output-format=json",
        ]),
        Duration::from_secs(300),
    )
}

fn fio_ok(json: &str) -> u64 {
    let start = json.find('{').expect("fio JSON");
    let v: serde_json::Value = serde_json::from_str(&json[start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio error: {json}");
    job["write"]["io_bytes"].as_u64().expect("io_bytes")
}

fn protocol_round(protocol: &'static str) {
    if !have("fio") {
        return;
    }
    let p = Pair::up(&PairOpts { protocol, ..PairOpts::default() });
    let written = fio_ok(&fio_randwrite(&p.uri(), "48M", "--runtime=30"));
    assert!(written >= 48 << 20, "fio wrote {written}");
    // Zeroing and discard replicate too (as zeroes on both sides), then the final flush.
    integration::qemu_io(
        &p.uri(),
        &[
            "write -z 1M 1M",
            "discard 3M 2M",
            "write -z -u 8M 512k",
            "write -P 0x33 20M 64k",
            "flush",
        ],
    );
    // fio ended with a flush. B and C: the peer has every byte now. A: the flush is local plus
    // queued, so the peer catches up within moments.
    if protocol == "A" {
        assert!(wait_until(Duration::from_secs(20), || p.identical()), "replicas differ");
    } else {
        assert!(p.identical(), "replicas differ right after the flush");
    }
    assert!(p.synced());
    let sent = p.num(0, "sent_data_bytes");
    assert!(sent >= written, "replicated {sent} < written {written}");
    assert_eq!(p.num(1, "received_data_bytes"), sent);
}

#[test]
fn protocol_c_fio_verify_both_replicas_identical() {
    protocol_round("C");
}

#[test]
fn protocol_b_identical_after_flush() {
    protocol_round("B");
}

#[test]
fn protocol_a_identical_after_flush() {
    protocol_round("A");
}

/// Writes `count` blocks of 64 KiB (block i at i × 64 KiB, seeded by `seed`) through one
/// connection, pipelined; returns the indices the server acknowledged. Stops at the first error
/// or when the connection dies.
fn write_log(
    port: u16,
    seed: u64,
    count: u64,
    stop_after: Option<(u64, Box<dyn FnOnce() + Send>)>,
) -> Vec<u64> {
    let mut r = Raw::transmission(port);
    let mut acked = Vec::new();
    let mut stop = stop_after;
    let window = 16;
    let mut sent = 0u64;
    while sent < count.min(window) {
        let data = random_bytes(seed + sent, 65536);
        if r.request(CMD_WRITE, 0, sent, sent * 65536, 65536, &data).is_err() {
            return acked;
        }
        sent += 1;
    }
    loop {
        let Ok(rep) = r.reply() else { return acked };
        if rep.error != 0 {
            return acked;
        }
        acked.push(rep.cookie);
        if let Some((n, _)) = &stop
            && acked.len() as u64 == *n
        {
            let (_, f) = stop.take().unwrap();
            f();
        }
        if sent < count {
            let data = random_bytes(seed + sent, 65536);
            if r.request(CMD_WRITE, 0, sent, sent * 65536, 65536, &data).is_err() {
                return acked;
            }
            sent += 1;
        } else if acked.len() as u64 == count {
            return acked;
        }
    }
}

/// Reads block `i` through NBD.
fn read_block(port: u16, i: u64) -> Vec<u8> {
    let mut r = Raw::transmission(port);
    r.request(CMD_READ, 0, 1, i * 65536, 65536, &[]).unwrap();
    let rep = r.reply().unwrap();
    assert_eq!(rep.error, 0);
    r.read_data(65536)
}

#[test]
fn secondary_crash_resends_only_the_dirty_blocks() {
    let mut p = Pair::up(&PairOpts {
        size: 256 << 20,
        peer: format!("{}\nflush_interval_ms = 300", PairOpts::default().peer),
        ..PairOpts::default()
    });
    let port = p.n[0].nbd_port;
    let before = p.num(0, "resync_sent_bytes");
    // 100 blocks replicated, then beta dies (SIGKILL); alpha keeps serving 200 more.
    let acked = write_log(port, 7, 100, None);
    assert_eq!(acked.len(), 100);
    // Until a peer flush covers them, acknowledged writes count as out of sync when the peer
    // goes (it might have lost its cache); the periodic flush (300 ms here) makes them durable
    // there.
    assert!(p.wait_for(0, Duration::from_secs(10), |r| r["peer_unflushed_bytes"] == 0));
    p.kill(1);
    assert!(p.wait_for(0, Duration::from_secs(20), |r| r["connection"] != "Connected"));
    let mut r = Raw::transmission(port);
    for i in 100..300u64 {
        let data = random_bytes(7 + i, 65536);
        r.request(CMD_WRITE, 0, i, i * 65536, 65536, &data).unwrap();
        assert_eq!(r.reply().unwrap().error, 0);
    }
    let dirty = p.num(0, "out_of_sync_bytes");
    assert_eq!(dirty, 200 * 65536, "exactly the blocks written without the peer are out of sync");
    assert_ne!(p.repl(0)["bitmap_generation"], "0000000000000000", "a new generation was started");
    // Beta returns: a bitmap resync of the dirty blocks only.
    p.start(1);
    assert!(p.wait_synced(Duration::from_secs(60)), "resync did not finish");
    let resent = p.num(0, "resync_sent_bytes") - before;
    assert!(resent <= dirty + (1 << 20), "resent {resent} bytes for {dirty} dirty bytes");
    assert!(resent >= dirty / 2, "resent {resent} bytes, expected about {dirty}");
    assert!(resent < p.data_size() / 4, "resent {resent}: that is a full sync, not a bitmap one");
    assert!(p.identical(), "replicas differ after the resync");
}

#[test]
fn primary_crash_promoted_secondary_has_every_acknowledged_write() {
    let mut p = Pair::up(&PairOpts::default());
    let port = p.n[0].nbd_port;
    // Stream writes; SIGKILL alpha after 150 acknowledgements, with more in flight.
    let pid = {
        let out = p.ok(0, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["pid"].as_i64().unwrap()
    };
    let killer: Box<dyn FnOnce() + Send> = Box::new(move || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let acked = write_log(port, 1000, 1000, Some((150, killer)));
    assert!(acked.len() >= 150 && acked.len() < 1000, "acked {}", acked.len());
    p.kill(0);
    // Beta: still UpToDate; promote it without --force.
    assert!(p.wait_for(1, Duration::from_secs(20), |r| r["connection"] != "Connected"));
    assert_eq!(p.repl(1)["disk"], "UpToDate");
    p.ok(1, &["primary"]);
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    for &i in &acked {
        assert_eq!(
            read_block(port, i),
            random_bytes(1000 + i, 65536),
            "acknowledged block {i} lost"
        );
    }
    // A write on beta starts a new generation; alpha returns and becomes sync target from its
    // activity log (rule 50), ending identical.
    let mut r = Raw::transmission(port);
    r.request(CMD_WRITE, 0, 1, 0, 65536, &random_bytes(5, 65536)).unwrap();
    assert_eq!(r.reply().unwrap().error, 0);
    r.request(CMD_FLUSH, 0, 2, 0, 0, &[]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0);
    drop(r);
    p.start(0);
    assert!(p.wait_synced(Duration::from_secs(60)), "old primary did not resync");
    let log = p.log_text(0);
    assert!(log.contains("crashed while Primary"), "alpha did not apply its activity log:\n{log}");
    assert!(log.contains("rule 50"), "{log}");
    let got = p.num(0, "resync_received_bytes");
    assert!(got > 0 && got <= 64 << 20, "alpha received {got} resync bytes");
    assert!(p.identical());
}

#[test]
fn primary_crash_with_ext4_mounted_promoted_node_fsck_clean() {
    if !(integration::is_root("loop devices and mounts") && have("nbdfuse") && have("mkfs.ext4")) {
        return;
    }
    let mut p = Pair::up(&PairOpts::default());
    let d = p.dir.path().to_path_buf();
    let mut disk = integration::FuseDisk::attach(&d, &p.uri(), None);
    let (lo, mnt) = (disk.lo.clone(), disk.mnt.clone());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &lo]), Duration::from_secs(120));
    run_ok(Command::new("mount").arg(&lo).arg(&mnt), Duration::from_secs(30));
    for i in 0..8 {
        std::fs::write(mnt.join(format!("f{i}")), random_bytes(i, 256 * 1024)).unwrap();
    }
    run_ok(Command::new("sync").arg("-f").arg(mnt.join("f0")), Duration::from_secs(60));
    // More writes in flight, then the crash while mounted.
    for i in 8..12 {
        let _ = std::fs::write(mnt.join(format!("f{i}")), random_bytes(i, 256 * 1024));
    }
    p.kill(0);
    disk.detach();
    p.ok(1, &["primary"]);
    let disk = integration::FuseDisk::attach(&d, &p.uri(), None);
    run_ok(Command::new("mount").arg(&disk.lo).arg(&disk.mnt), Duration::from_secs(30)); // replays the journal
    for i in 0..8 {
        assert_eq!(
            std::fs::read(disk.mnt.join(format!("f{i}"))).unwrap(),
            random_bytes(i, 256 * 1024),
            "file {i}"
        );
    }
    run_ok(Command::new("umount").arg(&disk.mnt), Duration::from_secs(30));
    let (clean, out) = disk.fsck();
    assert!(clean, "e2fsck -fn on the promoted node: {out}");
}

/// Writes one 64 KiB block through NBD and flushes.
fn write_block(port: u16, i: u64, seed: u64) {
    let mut r = Raw::transmission(port);
    r.request(CMD_WRITE, 0, 1, i * 65536, 65536, &random_bytes(seed, 65536)).unwrap();
    assert_eq!(r.reply().unwrap().error, 0);
    r.request(CMD_FLUSH, 0, 2, 0, 0, &[]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0);
}

/// Both nodes write while disconnected: alpha `a_blocks` blocks as Primary, then beta (after
/// alpha demoted) `b_blocks` as Primary; `demote_beta` leaves no Primary at reconnect.
fn split(p: &Pair, a_blocks: u64, b_blocks: u64, demote_beta: bool) {
    let port = p.n[0].nbd_port;
    p.ok(0, &["disconnect"]);
    p.ok(1, &["disconnect"]);
    for i in 0..a_blocks {
        write_block(port, i, 100 + i);
    }
    p.ok(0, &["secondary"]);
    p.ok(1, &["primary"]);
    assert!(wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    for i in 0..b_blocks {
        write_block(port, 10 + i, 900 + i);
    }
    if demote_beta {
        p.ok(1, &["secondary"]);
    }
}

#[test]
fn split_brain_detected_by_default_then_recovered_with_discard_my_data() {
    let p = Pair::up(&PairOpts::default());
    split(&p, 3, 5, false);
    let size = p.data_size();
    let (da, db) = (p.digest(0, size), p.digest(1, size));
    assert_ne!(da, db);
    p.ok(0, &["connect"]);
    p.ok(1, &["connect"]);
    for i in 0..2 {
        assert!(
            p.wait_for(i, Duration::from_secs(20), |r| r["split_brain"].is_string()
                && r["connection"] == "StandAlone"),
            "node {i} did not report split brain: {}",
            p.repl(i)
        );
    }
    // Loud: the log says so, and nothing moved.
    assert!(p.log_text(0).contains("SPLIT BRAIN"));
    assert_eq!((p.digest(0, size), p.digest(1, size)), (da.clone(), db.clone()));
    let text = p.ok(0, &["status"]);
    assert!(text.contains("SPLIT BRAIN"), "{text}");
    // Manual recovery: alpha is the victim (beta's data wins).
    p.ok(0, &["connect", "--discard-my-data"]);
    p.ok(1, &["connect"]);
    assert!(p.wait_synced(Duration::from_secs(60)), "no resync after --discard-my-data");
    assert_eq!(p.digest(0, size), db, "the survivor's data did not win");
    assert!(p.identical());
}

#[test]
fn split_brain_automatic_policies_resolve_as_drbd() {
    // discard-least-changes: alpha changed 2 blocks, beta 6 → alpha's changes are discarded.
    let p = Pair::up(&PairOpts {
        split_brain: "after_sb_0pri = \"discard-least-changes\"".into(),
        ..PairOpts::default()
    });
    split(&p, 2, 6, true);
    let size = p.data_size();
    let db = p.digest(1, size);
    p.ok(0, &["connect"]);
    p.ok(1, &["connect"]);
    assert!(p.wait_synced(Duration::from_secs(60)), "least-changes did not resolve: {}", p.repl(0));
    assert_eq!(p.digest(0, size), db);
    drop(p);
    // discard-node-beta: beta's changes go whatever their count.
    let p = Pair::up(&PairOpts {
        split_brain: "after_sb_0pri = \"discard-node-beta\"".into(),
        ..PairOpts::default()
    });
    split(&p, 2, 6, true);
    let da = p.digest(0, size);
    p.ok(0, &["connect"]);
    p.ok(1, &["connect"]);
    assert!(p.wait_synced(Duration::from_secs(60)), "discard-node did not resolve: {}", p.repl(1));
    assert_eq!(p.digest(1, size), da);
    drop(p);
    // discard-zero-changes with changes on both sides: not resolvable → split brain.
    let p = Pair::up(&PairOpts {
        split_brain: "after_sb_0pri = \"discard-zero-changes\"".into(),
        ..PairOpts::default()
    });
    split(&p, 2, 6, true);
    p.ok(0, &["connect"]);
    p.ok(1, &["connect"]);
    assert!(p.wait_for(0, Duration::from_secs(20), |r| r["split_brain"].is_string()));
}

#[test]
fn unrelated_data_is_refused() {
    let mut p = Pair::configure(&PairOpts::default());
    // Each node forced Primary on its own, never connected: no common generation.
    for i in 0..2 {
        p.start(i);
        p.ok(i, &["disconnect"]);
        p.ok(i, &["primary", "--force"]);
        p.ok(i, &["secondary"]);
        p.stop(i);
    }
    p.start(0);
    p.start(1);
    for i in 0..2 {
        assert!(
            p.wait_for(i, Duration::from_secs(20), |r| r["last_refusal"]
                .as_str()
                .is_some_and(|s| s.contains("unrelated"))
                && r["connection"] == "StandAlone"),
            "node {i}: {}",
            p.repl(i)
        );
    }
}

#[test]
fn verify_finds_a_corrupted_block_and_repair_fixes_it() {
    let p = Pair::up(&PairOpts::default());
    for i in 0..32 {
        write_block(p.n[0].nbd_port, i, 40 + i);
    }
    assert!(p.identical());
    // Corrupt 4 KiB of beta's backing file behind duet's back.
    let off = 17 * 65536 + 8192;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p.n[1].disk).unwrap();
        f.write_all_at(&[0xEE; 4096], off).unwrap();
        f.sync_all().unwrap();
    }
    assert!(!p.identical());
    p.ok(0, &["verify"]);
    assert!(p.wait_for(0, Duration::from_secs(60), |r| r["verify"].is_null()
        && r["connection"] == "Connected"));
    let r = p.repl(0);
    assert_eq!(r["verify_mismatches"], serde_json::json!([[off, 4096]]), "{r}");
    assert_eq!(r["out_of_sync_bytes"], 4096);
    assert!(!p.identical(), "verify without --repair changes nothing");
    p.ok(0, &["verify", "--repair"]);
    assert!(wait_until(Duration::from_secs(60), || p.identical()), "repair did not fix the block");
    assert!(p.wait_for(0, Duration::from_secs(30), |r| r["verify"].is_null()));
}

#[test]
fn invalidate_with_checksum_resync_ships_only_differing_blocks() {
    let p = Pair::up(&PairOpts {
        resource_extra: "data_integrity = \"sha256\"".into(),
        resync: "checksum = true\nrate_kib = 512000".into(),
        ..PairOpts::default()
    });
    for i in 0..16 {
        write_block(p.n[0].nbd_port, i, 70 + i);
    }
    assert!(p.identical());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p.n[1].disk).unwrap();
        f.write_all_at(&[0x11; 4096], 5 * 65536).unwrap();
    }
    let (sent0, same0) = (p.num(0, "resync_sent_bytes"), p.num(0, "resync_same_bytes"));
    p.ok(1, &["invalidate"]);
    assert!(p.wait_for(1, Duration::from_secs(20), |r| r["connection"] != "Connected"
        || r["disk"] != "UpToDate"));
    assert!(p.wait_synced(Duration::from_secs(120)), "no full resync after invalidate");
    let sent = p.num(0, "resync_sent_bytes") - sent0;
    let same = p.num(0, "resync_same_bytes") - same0;
    let size = p.data_size();
    assert!(same >= size - (1 << 20), "only {same} of {size} bytes matched by checksum");
    assert!(sent > 0 && sent <= 1 << 20, "{sent} bytes shipped for one differing block");
    assert!(p.identical());
    // A Primary refuses to be invalidated.
    assert!(p.fails(0, &["invalidate"]).contains("Primary"));
}

#[test]
fn frozen_secondary_does_not_stall_the_primary() {
    let mut p = Pair::up(&PairOpts::default());
    let port = p.n[0].nbd_port;
    let out = p.ok(1, &["status", "--json"]);
    let pid =
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["pid"].as_i64().unwrap() as i32;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Under protocol C this write waits for beta; beta is frozen, so after the ping timeout the
    // link drops and the write completes on alpha alone.
    write_block(port, 3, 333);
    let r = p.repl(0);
    assert_ne!(r["connection"], "Connected", "{r}");
    assert!(r["out_of_sync_bytes"].as_u64().unwrap() >= 65536, "{r}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(p.wait_synced(Duration::from_secs(60)), "no resync after the thaw: {}", p.repl(0));
    assert!(p.identical());
    p.stop(1);
}

#[test]
fn resync_finishes_while_the_primary_keeps_writing_the_same_region() {
    let mut p = Pair::up(&PairOpts::default());
    let port = p.n[0].nbd_port;
    let w = crate::writer::Writer::start(port, 77_000);
    assert!(w.wait_more(50, Duration::from_secs(30)));
    p.kill(1);
    assert!(w.wait_more(300, Duration::from_secs(30)), "no writes without the peer");
    p.start(1);
    // The resync runs while the writer keeps rewriting the blocks being resynced.
    let done = p.wait_synced(Duration::from_secs(60));
    let acked = w.finish();
    assert!(done, "resync did not finish under writes: {} / {}", p.repl(0), p.repl(1));
    crate::writer::check_log(port, 77_000, &acked);
    assert!(p.wait_synced(Duration::from_secs(30)));
    assert!(p.identical());
}

/// A node's disk behind nbdkit (a filter stack over the `file` plugin), seen as a file through
/// nbdfuse; the daemon opens a symlink to it. nbdfuse and nbdkit run in a process group of their
/// own: [`NbdkitDisk::power_loss`] kills both at once. Unmounted at drop.
pub(crate) struct NbdkitDisk {
    child: std::process::Child,
    fuse: std::path::PathBuf,
}

impl NbdkitDisk {
    /// `filters`: nbdkit's `--filter=...` arguments; `params`: the filters' `key=value`s.
    pub(crate) fn install(p: &Pair, node: usize, filters: &[&str], params: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let disk = &p.n[node].disk;
        let real = disk.with_extension("real");
        if !real.exists() {
            std::fs::rename(disk, &real).expect("move the image");
        }
        let _ = std::fs::remove_file(disk);
        let fuse = p.dir.path().join(format!("nbdkit-{node}"));
        std::fs::create_dir_all(&fuse).expect("fuse dir");
        let child = Command::new("nbdfuse")
            .arg(&fuse)
            .args(["--command", "nbdkit", "-s"])
            .args(filters)
            .arg("file")
            .arg(&real)
            .args(params)
            .process_group(0)
            .spawn()
            .expect("nbdfuse");
        let d = Self { child, fuse };
        let img = d.fuse.join("nbd");
        assert!(wait_until(Duration::from_secs(20), || img.exists()), "nbdfuse did not start");
        std::os::unix::fs::symlink(&img, disk).expect("symlink");
        d
    }

    /// The disk loses power: nbdkit and nbdfuse are killed together (whatever nbdkit's cache
    /// held and had not written to the file is gone), and the mount is taken away.
    pub(crate) fn power_loss(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = integration::run(
            Command::new("fusermount3").args(["-u", "-z"]).arg(&self.fuse),
            Duration::from_secs(20),
        );
    }
}

impl Drop for NbdkitDisk {
    fn drop(&mut self) {
        let _ = integration::run(
            Command::new("fusermount3").args(["-u", "-z"]).arg(&self.fuse),
            Duration::from_secs(20),
        );
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Node `slow`'s disk takes 60 ms a write; fio QD32 with verify through the Primary (alpha),
/// under the product's default ping timeout (500 ms): a batch of 32 writes would hold a node for
/// two seconds, four times the ping timeout. The link must count progress, not stall on it.
fn slow_disk_round(slow: usize) {
    if !have("fio") || !have("nbdfuse") || !have("nbdkit") {
        eprintln!("skipped: needs fio, nbdfuse and nbdkit");
        return;
    }
    let mut p = Pair::up(&PairOpts {
        size: 32 << 20,
        peer: "ping_interval_ms = 200\nping_timeout_ms = 500\nconnect_retry_ms = 200".into(),
        ..PairOpts::default()
    });
    p.stop(slow);
    let _slow = NbdkitDisk::install(&p, slow, &["--filter=delay"], &["delay-write=60ms"]);
    p.start(slow);
    if slow == 0 {
        // Back as Secondary: it learns it is UpToDate from beta, then takes the Primary role.
        let up = wait_until(Duration::from_secs(60), || p.repl(0)["disk"] == "UpToDate");
        assert!(up, "alpha did not reconnect: {}", p.repl(0));
        p.ok(0, &["primary"]);
    }
    assert!(p.wait_synced(Duration::from_secs(60)), "no reconnect: {}", p.repl(0));
    let connects = p.num(0, "connects");
    let json = fio_randwrite(&p.uri(), "8M", "--number_ios=160");
    let written = fio_ok(&json);
    assert!(written >= 160 * 4096, "fio wrote {written}");
    let r = p.repl(0);
    assert_eq!(r["connection"], "Connected", "{r}");
    assert_eq!(p.num(0, "connects"), connects, "the link dropped under a slow disk: {r}");
    assert_eq!(r["out_of_sync_bytes"], 0, "{r}");
    // The slow node saw it and stopped writing in its data thread for a while; the other not.
    assert!(p.num(slow, "slow_writes") >= 1, "{}", p.repl(slow));
    assert_eq!(p.num(1 - slow, "slow_writes"), 0, "{}", p.repl(1 - slow));
    assert!(p.identical(), "replicas differ");
    p.stop(1);
}

#[test]
fn slow_secondary_disk_keeps_the_link_up_and_the_replicas_identical() {
    slow_disk_round(1);
}

#[test]
fn slow_primary_disk_keeps_the_link_up_and_the_replicas_identical() {
    slow_disk_round(0);
}

#[test]
fn hooks_fire_with_their_variables_on_a_resync_a_role_change_a_verify_mismatch_and_a_split_brain() {
    let hooks = tempfile::tempdir().unwrap();
    // before_resync_target fails at first: the resync waits, the connection drops and retries.
    let o = PairOpts { extra: recording_hooks(hooks.path(), "; exit 7"), ..PairOpts::default() };
    let mut p = Pair::configure(&o);
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    assert!(
        wait_until(Duration::from_secs(20), || hook_runs(
            hooks.path(),
            "beta",
            "before_resync_target"
        )
        .len()
            >= 2),
        "before_resync_target did not run (and retry): {}",
        p.log_text(1)
    );
    assert!(p.events(1).contains("before_resync_target hook failed: exited with 7"));
    assert_ne!(p.repl(1)["disk"], "UpToDate", "the resync ran past a failed before_resync_target");
    assert_eq!(p.repl(1)["resync"]["done_bytes"].as_u64().unwrap_or(0), 0, "{}", p.repl(1));
    // Mended live with `duet adjust`: the next attempt resyncs, and after_resync_target runs.
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(&p.config, text.replace("; exit 7", "")).unwrap();
    assert!(p.ok(1, &["adjust"]).contains("applied hooks.before_resync_target"));
    assert!(p.wait_synced(Duration::from_secs(120)), "no resync after the hook was mended");
    assert!(
        wait_until(Duration::from_secs(10), || !hook_runs(
            hooks.path(),
            "beta",
            "after_resync_target"
        )
        .is_empty()),
        "after_resync_target did not run"
    );
    let before = hook_runs(hooks.path(), "beta", "before_resync_target");
    let b = before.last().unwrap();
    assert_eq!(
        (b["DUET_RESOURCE"].as_str(), b["DUET_NODE"].as_str(), b["DUET_PEER"].as_str()),
        ("vol0", "beta", "alpha")
    );
    assert_eq!(b["DUET_CLUSTER"], "itest-pair");
    // The role change of the manual promotion (no cluster manager: the resource's role).
    let roles = hook_runs(hooks.path(), "alpha", "role_change");
    assert_eq!(roles.len(), 1, "{roles:?}");
    assert_eq!(
        (roles[0]["DUET_OLD_ROLE"].as_str(), roles[0]["DUET_NEW_ROLE"].as_str()),
        ("Secondary", "Primary")
    );
    assert!(
        hook_runs(hooks.path(), "beta", "role_change").is_empty(),
        "beta's role did not change"
    );

    // A verify that finds a corrupted block.
    for i in 0..8 {
        write_block(p.n[0].nbd_port, i, 40 + i);
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p.n[1].disk).unwrap();
        f.write_all_at(&[0xEE; 4096], 3 * 65536).unwrap();
        f.sync_all().unwrap();
    }
    p.ok(0, &["verify"]);
    assert!(
        wait_until(Duration::from_secs(30), || !hook_runs(hooks.path(), "alpha", "out_of_sync")
            .is_empty()),
        "out_of_sync did not run: {}",
        p.events(0)
    );
    assert_eq!(
        hook_runs(hooks.path(), "alpha", "out_of_sync")[0]["DUET_OUT_OF_SYNC_BYTES"],
        "4096"
    );

    // A split brain: both sides run split_brain with the reason.
    split(&p, 2, 3, false);
    p.ok(0, &["connect"]);
    p.ok(1, &["connect"]);
    for node in ["alpha", "beta"] {
        assert!(
            wait_until(Duration::from_secs(20), || !hook_runs(hooks.path(), node, "split_brain")
                .is_empty()),
            "split_brain did not run on {node}"
        );
        let r = &hook_runs(hooks.path(), node, "split_brain")[0];
        assert!(r["DUET_REASON"].contains("split brain detected"), "{r:?}");
        assert_eq!(r["DUET_RESOURCE"], "vol0");
    }
    assert!(p.events(0).contains("hook split_brain ran (exit 0)"), "{}", p.events(0));
}

#[test]
fn call_pri_lost_after_sb_runs_the_losing_primarys_hook_and_resyncs_nothing() {
    let hooks = tempfile::tempdir().unwrap();
    let p = Pair::up(&PairOpts {
        split_brain:
            "after_sb_0pri = \"discard-least-changes\"\nafter_sb_1pri = \"call-pri-lost-after-sb\""
                .into(),
        extra: recording_hooks(hooks.path(), ""),
        ..PairOpts::default()
    });
    // alpha changes 6 blocks as Primary; then beta, promoted, changes 2 and stays Primary: the
    // 0-primary policy discards beta's changes, and beta is Primary.
    split(&p, 6, 2, false);
    let size = p.data_size();
    let (da, db) = (p.digest(0, size), p.digest(1, size));
    p.ok(0, &["connect"]);
    p.ok(1, &["connect"]);
    let runs = || hook_runs(hooks.path(), "beta", "pri_lost_after_sb");
    assert!(
        wait_until(Duration::from_secs(20), || !runs().is_empty()),
        "beta's pri_lost_after_sb hook did not run: {}\n{}",
        p.repl(1),
        p.events(1)
    );
    let r = &runs()[0];
    assert!(r["DUET_REASON"].contains("call-pri-lost-after-sb"), "{r:?}");
    assert_eq!((r["DUET_RESOURCE"].as_str(), r["DUET_NODE"].as_str()), ("vol0", "beta"));
    assert_eq!(p.repl(1)["pri_lost_after_sb"], true);
    // Only the losing Primary runs it; both report the split brain (and its hook); nothing
    // was resynced.
    assert!(hook_runs(hooks.path(), "alpha", "pri_lost_after_sb").is_empty());
    assert_eq!(p.repl(0)["pri_lost_after_sb"], false);
    for i in 0..2 {
        assert!(
            p.wait_for(i, Duration::from_secs(10), |r| r["split_brain"].is_string()
                && r["connection"] == "StandAlone"),
            "{}",
            p.repl(i)
        );
    }
    assert!(wait_until(Duration::from_secs(10), || !hook_runs(
        hooks.path(),
        "alpha",
        "split_brain"
    )
    .is_empty()));
    assert_eq!((p.digest(0, size), p.digest(1, size)), (da, db), "data moved");
}
