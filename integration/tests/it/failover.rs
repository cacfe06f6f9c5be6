//! The cluster manager with real daemons on loopback: a UDP heartbeat link and a serial link
//! over a pty cable, automatic failover on SIGKILL, planned switchovers, hostile frames.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::writer::{Writer, check_log};

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::rawnbd::Raw;
use integration::{have, random_bytes, run, wait_until};
use replicator::nbd::proto::CMD_WRITE;

pub(crate) fn fio(uri: &str, extra: &[&str]) -> std::process::Output {
    let mut c = Command::new("fio");
    c.args([
        "--name=v",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--bs=4k",
        "--iodepth=8",
        "--offset=0",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randseed=42",
    ])
    .args(extra);
    run(&mut c, Duration::from_secs(120))
}

/// fio jobs (4 MiB of random writes, verified) back to back through `uri`, from a thread.
pub(crate) struct FioLoop {
    stop: Arc<AtomicBool>,
    outputs: Arc<Mutex<Vec<std::process::Output>>>,
    thread: std::thread::JoinHandle<()>,
}

impl FioLoop {
    pub(crate) fn start(uri: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outputs = Arc::new(Mutex::new(Vec::new()));
        let (st, out) = (Arc::clone(&stop), Arc::clone(&outputs));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let o = fio(&uri, &["--rw=randwrite", "--size=4M"]);
                out.lock().unwrap().push(o);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { stop, outputs, thread }
    }

    /// Waits until two more jobs have ended (so one ran whole where the loop is now), stops
    /// the loop and returns every job's output, in order.
    pub(crate) fn finish_after_two_more(self) -> Vec<std::process::Output> {
        let done = self.outputs.lock().unwrap().len();
        assert!(
            wait_until(Duration::from_secs(60), || self.outputs.lock().unwrap().len() >= done + 2),
            "fio jobs stopped ending"
        );
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        std::mem::take(&mut *self.outputs.lock().unwrap())
    }
}

pub(crate) fn verify_errors(o: &std::process::Output) -> bool {
    let text =
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    text.contains("verify: bad") || text.contains("verify failed") || text.contains("err=84")
}

/// A pair with the cluster manager, the initial sync done and alpha the running master.
fn ha_pair(ha: HaOpts) -> Pair {
    ha_pair_with(ha, PairOpts::default())
}

fn ha_pair_with(ha: HaOpts, o: PairOpts) -> Pair {
    ha_pair_set_up(ha, o, |_| {})
}

/// As [`ha_pair_with`], with `setup` run on the configured pair before it starts.
fn ha_pair_set_up(ha: HaOpts, o: PairOpts, setup: impl FnOnce(&mut Pair)) -> Pair {
    let mut p = Pair::configure(&PairOpts { ha: Some(ha), ..o });
    setup(&mut p);
    p.start(0);
    p.start(1);
    // Fresh metadata is Inconsistent on both nodes: nobody takes over by itself; the operator
    // names the first master.
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!p.is_master(0) && !p.is_master(1), "a node promoted Inconsistent data");
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)), "initial sync: {} / {}", p.repl(0), p.repl(1));
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)));
    p
}

/// Beta becomes the running master by itself, the writer `w` (reconnecting to the same port,
/// now beta's) goes on through it, and every write it saw acknowledged reads back.
fn beta_takes_over_with_every_acknowledged_write(p: &Pair, w: Writer, port: u16, seed: u64) {
    assert!(
        wait_until(Duration::from_secs(20), || p.is_master(1)),
        "beta did not take over: {}\n{}",
        p.cluster(1),
        p.events(1)
    );
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through the new master");
    let acked = w.finish();
    check_log(port, seed, &acked);
}

fn links_up(p: &Pair, i: usize) -> bool {
    let c = p.cluster(i);
    c["links"].as_array().is_some_and(|l| !l.is_empty() && l.iter().all(|x| x["state"] == "up"))
}

#[test]
fn serial_link_over_a_pty_survives_line_noise_without_misreading() {
    let p = ha_pair(HaOpts::default());
    assert!(wait_until(Duration::from_secs(10), || links_up(&p, 0) && links_up(&p, 1)));
    let cable = p.cable.as_ref().expect("serial cable");
    let serial_in = |i: usize| p.cluster(i)["links"][1]["frames_in"].as_u64().unwrap();
    for round in 0..10u64 {
        // Noise of every shape: random bytes, a fake marker with a huge length, a fake marker
        // with a plausible length, a half frame.
        let mut noise = random_bytes(round, 37 + round as usize * 13);
        noise.extend_from_slice(&[0xA5, 0x5A, 0xC3, 0x3C, 0xff, 0xff]);
        noise.extend_from_slice(&[0xA5, 0x5A, 0xC3, 0x3C, 0x00, 0x40, 1, 2, 3]);
        cable.inject(&noise);
        std::thread::sleep(Duration::from_millis(150));
    }
    // Within a few keepalives the serial link delivers again.
    let before = serial_in(1);
    assert!(
        wait_until(Duration::from_secs(2), || serial_in(1) >= before + 3),
        "serial link did not recover: {}",
        p.cluster(1)
    );
    for i in 0..2 {
        let c = p.cluster(i);
        assert_eq!(c["drops"]["auth"], 0, "a frame was misread: {c}");
        assert_eq!(c["drops"]["malformed"], 0, "a frame was misread: {c}");
        assert_eq!(c["links"][1]["state"], "up", "{c}");
    }
    let c = p.cluster(1);
    assert!(c["links"][1]["garbage_bytes"].as_u64().unwrap() > 0, "the noise never arrived: {c}");
    // No failover happened because of the noise.
    assert!(p.is_master(0) && !p.is_master(1));
}

#[test]
fn sigkill_of_the_master_during_writes_the_slave_takes_over_by_itself() {
    if !have("fio") {
        return;
    }
    let mut p = ha_pair(HaOpts::default());
    let uri = p.uri();
    let port = p.n[0].nbd_port;
    // fio writes its region (crc32c headers) and flushes; it is verified after the failover.
    let o = fio(&uri, &["--rw=randwrite", "--do_verify=0", "--end_fsync=1"]);
    assert!(o.status.success(), "fio write: {}", String::from_utf8_lossy(&o.stderr));
    // Writes stream while alpha is SIGKILLed.
    let seed = 7000;
    let w = Writer::start(port, seed);
    assert!(w.wait_more(200, Duration::from_secs(30)), "writer stalled before the crash");
    p.kill(0);
    beta_takes_over_with_every_acknowledged_write(&p, w, port, seed);
    let o = fio(&uri, &["--rw=randwrite", "--verify_only"]);
    assert!(
        o.status.success() && !verify_errors(&o),
        "fio verify through beta: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let ev = p.events(1);
    assert!(
        ev.contains("peer is dead on every heartbeat link") && ev.contains("taking over"),
        "{ev}"
    );
    // The old master returns as a slave and resyncs; beta stays master (failback off).
    p.start(0);
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    assert!(p.is_master(1) && !p.is_master(0));
    assert!(p.identical());
}

#[test]
fn make_master_on_the_slave_and_back_with_writes_and_fio_running() {
    if !have("fio") {
        return;
    }
    let p = ha_pair(HaOpts::default());
    let uri = p.uri();
    let port = p.n[0].nbd_port;
    let seed = 9000;
    let w = Writer::start(port, seed);
    // fio jobs back to back: each writes its region and verifies it. A job cut by the
    // switchover fails with an I/O error; none may fail verification.
    let fio_loop = FioLoop::start(uri.clone());
    assert!(w.wait_more(100, Duration::from_secs(30)));
    let out = p.ok(1, &["make-master"]);
    assert!(out.contains("running master"), "{out}");
    assert!(
        p.is_master(1) && !p.is_master(0),
        "{out}\n{}\n{}\n{}",
        p.ok(1, &["status"]),
        p.events(1),
        p.events(0)
    );
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through beta");
    // And back, from the other side: make-slave on the master.
    let out = p.ok(1, &["make-slave"]);
    assert!(out.contains("peer is the running master"), "{out}");
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0) && !p.is_master(1)));
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through alpha");
    // Let one fio job finish on the final master.
    let outs = fio_loop.finish_after_two_more();
    let acked = w.finish();
    check_log(port, seed, &acked);
    for o in outs.iter() {
        assert!(!verify_errors(o), "fio verify error: {}", String::from_utf8_lossy(&o.stdout));
    }
    assert!(
        outs.last().unwrap().status.success(),
        "the last fio job failed: {}",
        String::from_utf8_lossy(&outs.last().unwrap().stderr)
    );
    assert!(p.wait_synced(Duration::from_secs(30)));
    assert!(p.identical());
    let ev = p.events(0);
    assert!(ev.contains("releasing") && ev.contains("taking over"), "{ev}");
}

#[test]
fn make_master_is_refused_during_resync_and_when_the_peer_is_unreachable() {
    // A resync slow enough (16 MiB/s: about 4 s for the 64 MiB below) to still run while both
    // make-master attempts are judged.
    let mut p = ha_pair_with(
        HaOpts::default(),
        PairOpts {
            size: 80 << 20,
            resync: "mode = \"fixed\"\nrate_kib = 16384\nmin_rate_kib = 16384".into(),
            ..PairOpts::default()
        },
    );
    // Beta goes away; alpha writes 64 MiB without it; beta returns to a slow resync.
    p.kill(1);
    let port = p.n[0].nbd_port;
    let mut r = Raw::transmission(port);
    for i in 0..64u64 {
        r.request(CMD_WRITE, 0, i, i * (1 << 20), 1 << 20, &random_bytes(i, 1 << 20)).unwrap();
        assert_eq!(r.reply().unwrap().error, 0);
    }
    drop(r);
    // Alpha alone, once it has seen the peer dead (what the refusal is about): refused
    // without --force.
    assert!(
        wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "dead"),
        "alpha never saw beta dead: {}",
        p.cluster(0)
    );
    let err = p.fails(0, &["make-slave"]);
    assert!(err.contains("unreachable"), "{err}");
    p.start(1);
    assert!(wait_until(Duration::from_secs(20), || p.repl(1)["connection"] == "SyncTarget"
        && p.cluster(1)["peer"] == "alive"));
    let err = p.fails(1, &["make-master"]);
    assert!(err.contains("resync"), "{err}");
    let err = p.fails(1, &["make-master", "--force"]);
    assert!(err.contains("--force cannot help"), "{err}");
    assert!(p.is_master(0) && !p.is_master(1));
    assert!(p.wait_synced(Duration::from_secs(60)));
    // Already master / already slave are answered, not refused.
    assert!(p.ok(0, &["make-master"]).contains("already"));
    assert!(p.ok(1, &["make-slave"]).contains("already"));
}

#[test]
fn replication_link_cut_outdates_the_slave_over_the_heartbeat() {
    // Alpha (the connector) reaches beta's replication port only through a relay.
    let mut relay = None;
    let mut p = ha_pair_set_up(HaOpts::default(), PairOpts::default(), |p| {
        let r = integration::relay::Relay::start(p.n[1].repl_port);
        p.route_peer_through(0, r.port);
        relay = Some(r);
    });
    // Break only replication (the heartbeat links stay up): the relay goes.
    drop(relay);
    assert!(
        p.wait_for(1, Duration::from_secs(10), |r| r["disk"] == "Outdated"),
        "beta was not outdated: {}\n{}",
        p.repl(1),
        p.events(0)
    );
    assert!(p.is_master(0), "the master keeps serving");
    // An Outdated slave does not take over even when the master dies.
    p.kill(0);
    std::thread::sleep(Duration::from_millis(2000));
    assert!(!p.is_master(1), "an Outdated slave promoted");
    let ev = p.events(1);
    assert!(ev.contains("not taking over"), "{ev}");
    // The state survives a restart of beta.
    p.kill(1);
    p.start(1);
    assert_eq!(p.repl(1)["disk"], "Outdated");
}

#[test]
fn maintenance_mode_holds_the_cluster_manager_back_until_it_is_off() {
    let mut p = ha_pair(HaOpts::default());
    // Outside maintenance mode the roles are the cluster manager's.
    for (i, cmd, instead) in [
        (1, &["primary"][..], "`duet make-master`"),
        (1, &["primary", "--force"][..], "`duet make-master --force`"),
        (0, &["secondary"][..], "`duet make-slave`"),
        (0, &["disconnect"][..], "`duet make-slave`"),
    ] {
        let e = p.fails(i, cmd);
        assert!(
            e.contains("the cluster manager owns the roles")
                && e.contains(instead)
                && e.contains("duet maintenance on"),
            "{cmd:?}: {e}"
        );
    }
    assert!(p.is_master(0) && !p.is_master(1));
    assert_eq!(p.repl(0)["connection"], "Connected", "a refused disconnect disconnected");
    // On, from the slave: the master takes it with the next heartbeat.
    let out = p.ok(1, &["maintenance", "on"]);
    assert!(out.contains("maintenance mode on, cluster-wide"), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || p.cluster(0)["maintenance"] == true
            && p.cluster(1)["peer_maintenance"] == true),
        "{}",
        p.cluster(0)
    );
    assert!(p.ok(0, &["status"]).contains("MAINTENANCE MODE"));
    let o = run(p.cli(0).args(["status", "--check"]), Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("maintenance mode"));
    let e = p.fails(1, &["make-master"]);
    assert!(e.contains("maintenance mode is on"), "{e}");
    assert!(p.fails(0, &["make-slave"]).contains("maintenance mode is on"));
    // Kept across a restart (beta's file, not only alpha's frames).
    p.kill(1);
    let saved = std::fs::read_to_string(p.dir.path().join("state/beta.maintenance")).unwrap();
    assert!(saved.starts_with("on "), "{saved:?}");
    p.start(1);
    assert!(
        wait_until(Duration::from_secs(10), || p
            .events(1)
            .contains("kept from before the restart")),
        "{}",
        p.events(1)
    );
    assert!(wait_until(Duration::from_secs(20), || p.wait_synced(Duration::from_secs(1))));
    // The master dies under writes: nobody takes over while maintenance mode is on.
    let port = p.n[0].nbd_port;
    let seed = 7300;
    let w = Writer::start(port, seed);
    assert!(w.wait_more(100, Duration::from_secs(30)), "writer stalled");
    p.kill(0);
    assert!(
        wait_until(Duration::from_secs(20), || p.events(1).contains("does not take over")),
        "{}",
        p.events(1)
    );
    assert!(!p.is_master(1), "beta took over in maintenance mode: {}", p.cluster(1));
    assert_eq!(p.repl(1)["role"], "Secondary");
    // Off: beta takes over with every write alpha acknowledged.
    let out = p.ok(1, &["maintenance", "off"]);
    assert!(out.contains("maintenance mode off") && out.contains("not heard now"), "{out}");
    beta_takes_over_with_every_acknowledged_write(&p, w, port, seed);
    // Alpha comes back with its own file saying "on" and takes beta's newer "off".
    p.start(0);
    assert!(
        wait_until(Duration::from_secs(20), || p.cluster(0)["maintenance"] == false
            && p.cluster(0)["peer"] == "alive"),
        "{}",
        p.cluster(0)
    );
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    assert!(p.is_master(1) && !p.is_master(0));
    let ev = p.events(0);
    assert!(ev.contains("maintenance mode off (set on beta)"), "{ev}");
    let kinds = p.ok(1, &["events", "--json"]);
    assert!(kinds.contains(r#""kind":"maintenance""#), "{kinds}");
}

#[test]
fn roles_changed_by_hand_in_maintenance_mode_are_taken_up_when_it_ends() {
    let p = ha_pair(HaOpts::default());
    p.ok(0, &["maintenance", "on"]);
    assert!(wait_until(Duration::from_secs(10), || p.cluster(1)["maintenance"] == true));
    // A manual switchover: alpha Secondary, beta Primary, by hand.
    assert!(p.ok(0, &["secondary"]).contains("Secondary"));
    assert!(p.ok(1, &["primary"]).contains("Primary"));
    assert!(wait_until(Duration::from_secs(5), || p.cluster(1)["running_role"] == "master"));
    // The cluster manager did nothing about it: beta serves (its export opened with the
    // promotion), and alpha still holds what the master holds until maintenance ends.
    let c0 = p.cluster(0);
    assert!(c0["activity"].is_null(), "{c0}");
    p.ok(1, &["maintenance", "off"]);
    let ev = |i| p.events(i);
    assert!(
        wait_until(Duration::from_secs(20), || ev(1).contains(
            "this node is the running master (maintenance mode ended with this node Primary"
        ) && ev(0)
            .contains("this node is a slave (maintenance mode ended with this node Secondary")),
        "{}\n{}",
        ev(0),
        ev(1)
    );
    assert!(p.is_master(1) && !p.is_master(0), "{}\n{}", ev(0), ev(1));
    // And the cluster manager acts again: make-master moves the role back.
    p.ok(0, &["make-master"]);
    assert!(wait_until(Duration::from_secs(20), || p.is_master(0) && !p.is_master(1)));
    assert!(p.wait_synced(Duration::from_secs(60)));
    assert!(p.identical());
}

/// A rolling upgrade's middle: beta speaks only heartbeat version 1, as the release before
/// maintenance mode did (the test-only setting; or, with `DUET_PREVIOUS_RELEASE_BIN` naming a
/// binary of that release, beta runs it). The pair settles on version 1, and switches over
/// both ways under writes with every acknowledged write kept; a frame of an unknown version
/// is refused naming the range this build speaks.
#[test]
fn a_node_speaking_the_previous_heartbeat_version_pairs_and_switches_over_both_ways() {
    let mut p =
        ha_pair_set_up(HaOpts::default(), PairOpts::default(), |p| {
            match std::env::var_os("DUET_PREVIOUS_RELEASE_BIN") {
                Some(bin) => p.n[1].bin = Some(bin.into()),
                None => p.n[1].env.push(("DUET_TEST_HEARTBEAT_VERSION".into(), "1".into())),
            }
        });
    assert!(
        wait_until(Duration::from_secs(10), || p.events(0).contains(
            "the peer speaks heartbeat version 1 (this node up to 2): sending version 1"
        )),
        "{}",
        p.events(0)
    );
    assert!(wait_until(Duration::from_secs(10), || links_up(&p, 0) && links_up(&p, 1)));
    let port = p.n[0].nbd_port;
    let seed = 7700;
    let w = Writer::start(port, seed);
    assert!(w.wait_more(100, Duration::from_secs(30)), "writer stalled");
    // To the old-speaking node and back.
    assert!(p.ok(1, &["make-master"]).contains("running master"));
    assert!(p.is_master(1) && !p.is_master(0));
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through beta");
    assert!(p.wait_synced(Duration::from_secs(60)));
    assert!(p.ok(1, &["make-slave"]).contains("running master"));
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0) && !p.is_master(1)));
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through alpha again");
    let acked = w.finish();
    check_log(port, seed, &acked);
    // The old-speaking node never heard a frame it could not read after the first ones (it
    // drops alpha's version-2 frames only until alpha settles).
    let early = p.cluster(1)["drops"]["malformed"].as_u64().unwrap();
    assert!(early <= 8, "beta dropped {early} frames");
    if std::env::var_os("DUET_PREVIOUS_RELEASE_BIN").is_some() {
        // That release knows no maintenance mode: its event log says it ran.
        assert!(!p.events(1).contains("maintenance"), "beta is not the previous release");
    }
    // A frame of a version nobody speaks.
    let f = heartbeat::frame::Frame {
        version: heartbeat::frame::VERSION,
        key_id: 1,
        node_id: 1,
        cluster: heartbeat::frame::cluster_id("itest-pair"),
        boot: u64::MAX / 2,
        seq: 1,
        health: 100,
        maintenance: heartbeat::frame::Maintenance::default(),
        resources: vec![],
        control: None,
    };
    let mut b = f.encode(b"correct horse battery staple");
    b[4] = 3;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(&b, ("127.0.0.1", p.udp_ends(0).0)).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || p
            .events(0)
            .contains("unsupported heartbeat version 3 (this build speaks 1 to 2)")),
        "{}",
        p.events(0)
    );
    p.stop(1);
    p.stop(0);
}

#[test]
fn hostile_heartbeat_frames_are_dropped_and_counted() {
    use heartbeat::frame::{Frame, ResourceState, cluster_id};
    let p = ha_pair(HaOpts::default());
    let target = p.udp_ends(0).0;
    let secret = b"correct horse battery staple";
    let frame = |cluster: &str, node: u8, boot: u64, key: &[u8]| {
        Frame {
            version: heartbeat::frame::VERSION,
            key_id: 1,
            node_id: node,
            cluster: cluster_id(cluster),
            boot,
            seq: 1,
            health: 0,
            // Forged frames that would turn maintenance mode on for good, were they believed.
            maintenance: heartbeat::frame::Maintenance { on: true, stamp: u64::MAX },
            resources: vec![ResourceState { role: 1, disk: 3, conn: 0, generation: 1 }],
            control: Some(heartbeat::frame::Control::Release { id: 77 }),
        }
        .encode(key)
    };
    let wrong_secret = frame("itest-pair", 1, u64::MAX / 2, b"not the secret");
    let wrong_cluster = frame("other-pair", 1, u64::MAX / 2, secret);
    let replayed = frame("itest-pair", 1, 1, secret); // an older boot than beta's
    let oversized = vec![0x44u8; 3000];
    let mut truncated = frame("itest-pair", 1, 1, secret);
    truncated.truncate(50);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        for f in [&wrong_secret, &wrong_cluster, &replayed, &oversized, &truncated] {
            sock.send_to(f, ("127.0.0.1", target)).unwrap();
        }
    }
    // The same through the serial line (wrapped, so they reach the frame decoder).
    let cable = p.cable.as_ref().unwrap();
    for f in [&wrong_secret, &wrong_cluster, &replayed, &truncated] {
        cable.inject(&heartbeat::serial::wrap(f));
    }
    let drops = |c: &serde_json::Value, k: &str| c["drops"][k].as_u64().unwrap();
    let c = {
        let mut last = serde_json::Value::Null;
        let ok = wait_until(Duration::from_secs(10), || {
            // Serial noise goes to alpha's peer end (beta's line is end 1): check both nodes.
            last = p.cluster(0);
            drops(&last, "auth") >= 20
                && drops(&last, "foreign_cluster") >= 20
                && drops(&last, "replay") >= 20
                && drops(&last, "malformed") >= 40
        });
        assert!(ok, "drops not counted: {last}");
        last
    };
    // On beta these frames claim to come from beta itself: dropped as "wrong node" (a loop).
    let mut b = serde_json::Value::Null;
    let serial_seen = wait_until(Duration::from_secs(10), || {
        b = p.cluster(1);
        drops(&b, "auth") >= 1
            && drops(&b, "foreign_cluster") >= 1
            && drops(&b, "wrong_node") >= 1
            && drops(&b, "malformed") >= 1
    });
    assert!(serial_seen, "serial drops on beta: {b}");
    // Nothing changed: the forged "Release" was never believed, roles and links are intact.
    assert!(p.is_master(0) && !p.is_master(1), "{c}");
    for i in 0..2 {
        assert_eq!(p.cluster(i)["maintenance"], false, "forged maintenance believed");
    }
    assert!(
        wait_until(Duration::from_secs(5), || links_up(&p, 0) && links_up(&p, 1)),
        "{}",
        p.cluster(0)
    );
    let ev = p.events(0);
    assert!(ev.contains("heartbeat frame dropped"), "drops are logged: {ev}");
    assert!(!ev.contains("releasing"), "{ev}");
    // Rate-limited: 100 bad UDP frames do not make 100 lines.
    assert!(ev.matches("heartbeat frame dropped").count() < 20, "{ev}");
}

#[test]
fn fence_command_services_and_health_checks_run_for_real() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(dir.path().join("fence.exit"), "1").unwrap();
    let extra = format!(
        r#"
[fencing]
policy = "resource-only"
fence_command = "echo $DUET_NODE fences $DUET_PEER >> {d}/fence.log; exit $(cat {d}/fence.exit)"

[[service]]
name = "marker"
start = "touch {d}/master-$DUET_NODE"
stop = "rm -f {d}/master-$DUET_NODE"
placement = "master"

[[health.check]]
name = "sick-file"
kind = "script"
target = "test ! -e {d}/sick-$DUET_NODE"
interval_ms = 100
fall = 2
rise = 2
"#
    );
    let mut p = ha_pair(HaOpts { extra, ..HaOpts::default() });
    let marker = |n: &str| dir.path().join(format!("master-{n}")).exists();
    assert!(marker("alpha") && !marker("beta"), "the master's service runs on the master only");
    // alpha's health check fails: it hands over to the healthy, in-sync beta.
    std::fs::write(dir.path().join("sick-alpha"), "").unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || p.is_master(1) && !p.is_master(0)),
        "no health handover: {}\n{}",
        p.events(0),
        p.events(1)
    );
    assert!(wait_until(Duration::from_secs(5), || marker("beta") && !marker("alpha")));
    assert_eq!(p.cluster(0)["healthy"], false);
    std::fs::remove_file(dir.path().join("sick-alpha")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || p.cluster(0)["healthy"] == true));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(p.is_master(1), "failback is off: beta keeps the role");
    // beta dies; alpha's fence command fails (exit 1): no takeover.
    p.kill(1);
    assert!(
        wait_until(Duration::from_secs(10), || p
            .events(0)
            .contains("fence command failed (exit 1)")),
        "{}",
        p.events(0)
    );
    assert!(!p.is_master(0), "took over although the fence command failed");
    let log = std::fs::read_to_string(dir.path().join("fence.log")).unwrap();
    assert!(log.contains("alpha fences beta"), "{log}");
    // The fence command now confirms (exit 7, peer fenced): the retry takes over.
    std::fs::write(dir.path().join("fence.exit"), "7").unwrap();
    assert!(wait_until(Duration::from_secs(20), || p.is_master(0)), "{}", p.events(0));
    assert!(marker("alpha"));
    assert!(p.events(0).contains("fence command: peer was fenced (exit 7)"), "{}", p.events(0));
}

#[test]
fn resource_and_stonith_holds_writes_until_the_fence_command_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let extra = format!(
        r#"
[fencing]
policy = "resource-and-stonith"
fence_command = "while [ ! -e {d}/go ]; do sleep 0.05; done; exit 7"
"#
    );
    let mut p = ha_pair(HaOpts { extra, ..HaOpts::default() });
    let port = p.n[0].nbd_port;
    // The slave dies: the master freezes at once, and a write that can reach only the master
    // is not answered while the fence command runs.
    p.kill(1);
    assert!(wait_until(Duration::from_secs(10), || p.repl(0)["frozen"] == true), "{}", p.events(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut r = Raw::transmission(port);
        r.request(CMD_WRITE, 0, 1, 0, 4096, &[0x5a; 4096]).unwrap();
        tx.send(r.reply().unwrap().error).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a write was answered while I/O was frozen"
    );
    assert!(p.events(0).contains("fence command"), "{}", p.events(0));
    // The fence command confirms: I/O resumes and the write is answered.
    std::fs::write(dir.path().join("go"), "").unwrap();
    let err = rx.recv_timeout(Duration::from_secs(20)).expect("the write was never answered");
    assert_eq!(err, 0);
    writer.join().unwrap();
    assert_eq!(p.repl(0)["frozen"], false);
    assert!(p.is_master(0));
    assert!(p.events(0).contains("peer was fenced (exit 7)"), "{}", p.events(0));
}

#[test]
fn sigterm_of_the_master_hands_over_before_it_stops() {
    // A long deadtime: the peer must not need it.
    let ha = HaOpts {
        keepalive_ms: 200,
        warntime_ms: 600,
        deadtime_ms: 5000,
        initdead_ms: 10_000,
        ..HaOpts::default()
    };
    let mut p = ha_pair(ha);
    p.stop(0);
    // alpha exits only after beta took over: no waiting here.
    assert!(p.is_master(1), "beta is not master when alpha has stopped: {}", p.events(1));
    let ev = p.events(1);
    assert!(ev.contains("switchover: the peer released"), "{ev}");
    assert!(!ev.contains("peer is dead"), "{ev}");
    assert!(p.log_text(0).contains("handed over before stopping"), "{}", p.log_text(0));
    // The old master returns as a slave and syncs.
    p.start(0);
    assert!(p.wait_synced(Duration::from_secs(60)));
    assert!(p.is_master(1) && !p.is_master(0));
}

/// A panic in a data task is a broken invariant: the daemon stops at once (abort, not a task
/// that tokio catches while the node runs on without it), and the peer takes over with every
/// acknowledged write. The panic is injected (`replicator::fault`, the tests' build only) into
/// the task serving one client write.
#[test]
fn a_panic_in_a_data_task_takes_the_daemon_down_and_the_peer_takes_over() {
    const AT: u64 = 100 << 20; // outside the writer's log region
    let mut p = Pair::configure(&PairOpts { ha: Some(HaOpts::default()), ..PairOpts::default() });
    p.n[0].env.push(("DUET_FAULT_PANIC_WRITE_AT".into(), AT.to_string()));
    p.start(0);
    assert!(
        p.log_text(0).contains("fault injection armed"),
        "the duet binary under test has no fault injection: build it with the workspace \
         (`cargo build --workspace`, as scripts/test.sh does), not `cargo build -p duet`"
    );
    p.start(1);
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"));
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)), "initial sync: {} / {}", p.repl(0), p.repl(1));
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)));
    let port = p.n[0].nbd_port;
    let seed = 7100;
    let w = Writer::start(port, seed);
    assert!(w.wait_more(200, Duration::from_secs(30)), "writer stalled before the panic");
    // The write that panics gets no reply: the daemon is gone.
    let mut r = Raw::transmission(port);
    r.request(CMD_WRITE, 0, 1, AT, 4096, &[0x5A; 4096]).unwrap();
    assert!(r.reply().is_err(), "the poisoned write was answered");
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = p.exit_status(0);
            status.is_some()
        }),
        "alpha still runs after a panic in a data task:\n{}",
        p.log_text(0)
    );
    let status = status.expect("exited");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGABRT),
        "alpha ended with {status:?}, not an abort:\n{}",
        p.log_text(0)
    );
    let log = p.log_text(0);
    assert!(log.contains("fault injection") && log.contains("stopping this node"), "{log}");
    beta_takes_over_with_every_acknowledged_write(&p, w, port, seed);
}

/// `duet events --json --follow` of node `i`: every JSON line it prints, as it prints it.
fn follow_events(
    p: &Pair,
    i: usize,
) -> (std::process::Child, std::sync::mpsc::Receiver<serde_json::Value>) {
    use std::io::BufRead;
    let mut child = p
        .cli(i)
        .args(["events", "--json", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Receives from `rx` until an event satisfies `f` (or 20 s pass); returns it and what came
/// before it.
fn wait_event(
    rx: &std::sync::mpsc::Receiver<serde_json::Value>,
    f: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(v) if f(&v) => return (v, seen),
            Ok(v) => seen.push(v),
            Err(_) => break,
        }
    }
    panic!("no such event; got {seen:#?}");
}

#[test]
fn events_are_pushed_to_followers_as_a_failover_happens_and_survive_a_restart() {
    let hooks = tempfile::tempdir().unwrap();
    let extra = integration::hooks::recording_hooks(hooks.path(), "");
    let mut p = ha_pair(HaOpts { extra, ..HaOpts::default() });
    let (mut child, rx) = follow_events(&p, 1);
    // The current state first, as `exists` records.
    let (e, _) = wait_event(&rx, |v| v["type"] == "exists" && v["kind"] == "role");
    assert_eq!((e["resource"].as_str(), e["new"].as_str()), (Some("vol0"), Some("Secondary")));
    let (e, _) = wait_event(&rx, |v| v["type"] == "exists" && v["kind"] == "running-role");
    assert_eq!(e["new"], "slave", "{e}");
    // The failover, each change pushed as it happens.
    p.kill(0);
    // Which of these the daemon sees first depends on the moment (one look at the state may
    // find all three changed): each arrives once, in any order.
    let mut got = Vec::new();
    let want = [("peer", "dead"), ("role", "Primary"), ("running-role", "master")];
    let found = |got: &[serde_json::Value], (kind, new): (&str, &str)| {
        got.iter().filter(|v| v["kind"] == kind && v["new"] == new).cloned().collect::<Vec<_>>()
    };
    while !want.iter().all(|w| !found(&got, *w).is_empty()) {
        let (v, _) = wait_event(&rx, |_| true);
        got.push(v);
    }
    std::thread::sleep(Duration::from_millis(300));
    got.extend(rx.try_iter());
    for w in want {
        assert_eq!(found(&got, w).len(), 1, "{w:?} once: {got:#?}");
    }
    let [dead, role, master] = want.map(|w| found(&got, w)[0].clone());
    assert_eq!((dead["type"].as_str(), dead["old"].as_str()), (Some("change"), Some("alive")));
    assert_eq!(role["old"], "Secondary");
    assert_eq!(master["old"], "slave");
    let received =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let at = master["at"].as_f64().unwrap();
    assert!(received - at < 2.0, "pushed {:.3} s after it happened", received - at);
    // (The running role is master from the promotion on; the export opens after the services'
    // step, so the takeover's last step may still run.)
    assert!(wait_until(Duration::from_secs(10), || p.is_master(1)), "{}", p.events(1));
    // The failover ran beta's role_change hook.
    let runs = || integration::hooks::hook_runs(hooks.path(), "beta", "role_change");
    assert!(wait_until(Duration::from_secs(10), || !runs().is_empty()), "no role_change on beta");
    let r = &runs()[0];
    assert_eq!((r["DUET_OLD_ROLE"].as_str(), r["DUET_NEW_ROLE"].as_str()), ("slave", "master"));
    assert_eq!(r["DUET_PEER"], "alpha");
    // The daemon stops: the stream ends, the follower says so.
    p.stop(1);
    let status = wait_until(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    assert!(status, "the follower did not end with the daemon");
    // After a restart the events are still there, with their numbers.
    p.start(1);
    let out = p.ok(1, &["events", "--json"]);
    let all: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for want in [&dead, &role, &master] {
        assert!(all.contains(want), "{want} lost across the restart:\n{out}");
    }
    let seqs: Vec<u64> = all.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "numbers increase: {seqs:?}");
    let text = p.events(1);
    assert!(text.contains("running-role slave -> master"), "{text}");
    let _ = child.kill();
}

#[test]
fn a_health_check_changed_by_adjust_runs_live_and_the_failing_master_hands_over() {
    let check = "[[health.check]]\nname = \"app\"\nkind = \"script\"\ntarget = \"true\"\ninterval_ms = 100\nfall = 2\nrise = 1\n";
    let mut p = ha_pair(HaOpts { extra: check.into(), ..HaOpts::default() });
    assert!(p.cluster(0)["healthy"] == true);
    // The same check, now failing, applied without a restart: alpha is unhealthy and hands
    // the master role to its healthy peer.
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(&p.config, text.replace("target = \"true\"", "target = \"false\"")).unwrap();
    let out = p.ok(0, &["adjust"]);
    assert!(out.contains("applied health.check[0].target"), "{out}");
    assert!(
        wait_until(Duration::from_secs(20), || p.cluster(0)["healthy"] == false),
        "the new check never ran: {}",
        p.cluster(0)
    );
    assert!(
        wait_until(Duration::from_secs(30), || p.is_master(1)),
        "the unhealthy master did not hand over: {}\n{}",
        p.cluster(0),
        p.events(0)
    );
    // And a heartbeat timing change is taken too (refused keys are named elsewhere).
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(&p.config, text.replace("deadtime_ms = 500", "deadtime_ms = 900")).unwrap();
    assert!(p.ok(0, &["adjust"]).contains("applied heartbeat.deadtime_ms"));
    p.stop(1);
    p.start(1);
}

#[test]
fn slave_and_both_services_run_where_they_should_from_boot_through_a_switchover_and_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let svc = |name: &str, placement: &str| {
        format!(
            "\n[[service]]\nname = \"{name}\"\nstart = \"touch {d}/{name}-$DUET_NODE\"\nstop = \"rm -f {d}/{name}-$DUET_NODE\"\nplacement = \"{placement}\"\n"
        )
    };
    let extra = format!("{}{}{}", svc("m", "master"), svc("s", "slave"), svc("b", "both"));
    let mut p = ha_pair(HaOpts { extra, ..HaOpts::default() });
    let on = |name: &str, node: &str| dir.path().join(format!("{name}-{node}")).exists();
    let placed = |master: &str, slave: &str| {
        on("m", master)
            && !on("m", slave)
            && on("s", slave)
            && !on("s", master)
            && on("b", master)
            && on("b", slave)
    };
    assert!(
        wait_until(Duration::from_secs(10), || placed("alpha", "beta")),
        "after a cold start: {}",
        p.events(1)
    );
    let out = p.ok(1, &["make-master"]);
    assert!(out.contains("running master"), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || placed("beta", "alpha")),
        "after a switchover: {}",
        p.events(0)
    );
    // beta dies: alpha takes over, stops its slave service, starts the master's.
    p.kill(1);
    assert!(
        wait_until(Duration::from_secs(20), || p.is_master(0)
            && on("m", "alpha")
            && !on("s", "alpha")),
        "after a failover: {}",
        p.events(0)
    );
    assert!(on("b", "alpha"));
    // Stopped without a partner: nothing of alpha's keeps running.
    p.stop(0);
    for name in ["m", "s", "b"] {
        assert!(!on(name, "alpha"), "{name} still runs on alpha after its daemon stopped");
    }
    assert!(p.log_text(0).contains("released locally"), "{}", p.log_text(0));
}
