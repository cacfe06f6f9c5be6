//! The replication link against someone on the wire: a relay between the nodes flips, drops,
//! replays and injects frames while a client writes; connections from foreign addresses while
//! the Secondary restarts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::pair::{Pair, PairOpts};
use integration::rawnbd::Raw;
use integration::relay::{Dir, Relay, Tamper};
use integration::{random_bytes, wait_until};
use replicator::nbd::proto::CMD_WRITE;

const BLOCK: usize = 4096;
/// The writer's region: the first 8 MiB.
const REGION_BLOCKS: u64 = 2048;
const MARKER: &[u8; 16] = b"DUET-PLAINTEXT!!";
const MARKER_AT: u64 = 12 << 20;

/// A pair whose connector (alpha) reaches beta only through a relay; alpha Primary, in sync.
fn relayed_pair(cluster_extra: &str) -> (Pair, Relay) {
    let mut p = Pair::configure(&PairOpts {
        size: 16 << 20,
        cluster_extra: cluster_extra.into(),
        ..PairOpts::default()
    });
    let relay = Relay::start(p.n[1].repl_port);
    p.route_peer_through(0, relay.port);
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    (p, relay)
}

/// Writes blocks of MARKER at MARKER_AT and waits until the peer has them.
fn write_marker(p: &Pair) {
    let mut r = Raw::transmission(p.n[0].nbd_port);
    let block = MARKER.repeat(BLOCK / MARKER.len());
    for i in 0..16u64 {
        r.request(CMD_WRITE, 0, i, MARKER_AT + i * BLOCK as u64, BLOCK as u32, &block).unwrap();
        assert_eq!(r.reply().unwrap().error, 0);
    }
    assert!(p.wait_synced(Duration::from_secs(30)), "{}", p.repl(0));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A client writing distinct blocks over the region until told to stop; the image of what it
/// was told was written.
struct Writer {
    stop: Arc<AtomicBool>,
    image: Arc<Mutex<Vec<u8>>>,
    thread: std::thread::JoinHandle<u64>,
}

impl Writer {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let image = Arc::new(Mutex::new(vec![0u8; REGION_BLOCKS as usize * BLOCK]));
        let (st, im) = (Arc::clone(&stop), Arc::clone(&image));
        let thread = std::thread::spawn(move || {
            let mut r = Raw::transmission(port);
            let mut k = 0u64;
            // Bounded: at most a million writes (the test stops it long before).
            while !st.load(SeqCst) && k < 1_000_000 {
                let at = (k * 7919) % REGION_BLOCKS;
                let data = random_bytes(k, BLOCK);
                r.request(CMD_WRITE, 0, k, at * BLOCK as u64, BLOCK as u32, &data).unwrap();
                assert_eq!(r.reply().unwrap().error, 0, "write {k} failed");
                let off = at as usize * BLOCK;
                im.lock().unwrap()[off..off + BLOCK].copy_from_slice(&data);
                k += 1;
            }
            k
        });
        Self { stop, image, thread }
    }

    fn finish(self) -> (u64, Vec<u8>) {
        self.stop.store(true, SeqCst);
        let n = self.thread.join().expect("writer");
        (n, self.image.lock().unwrap().clone())
    }
}

fn region(p: &Pair, i: usize) -> Vec<u8> {
    let f = std::fs::File::open(&p.n[i].disk).unwrap();
    let mut b = vec![0u8; REGION_BLOCKS as usize * BLOCK];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0).unwrap();
    b
}

/// Arms `t` in `dir` and waits until it was carried out, the node that received it counted a
/// frame that failed authentication, and the pair is back in sync.
fn tamper_and_recover(p: &Pair, relay: &Relay, dir: Dir, t: Tamper) {
    let what = format!("{t:?} {dir:?}");
    let receiver = match dir {
        Dir::Forward => 1,
        Dir::Back => 0,
    };
    assert!(p.wait_synced(Duration::from_secs(60)), "{what}: not in sync before");
    let failures = p.num(receiver, "peer_auth_failures");
    let done = relay.done(dir);
    relay.arm(dir, t);
    assert!(wait_until(Duration::from_secs(20), || relay.done(dir) > done), "{what}: not done");
    assert!(
        wait_until(Duration::from_secs(20), || p.num(receiver, "peer_auth_failures") > failures),
        "{what}: the receiver did not notice: {}",
        p.repl(receiver)
    );
    let why = p.repl(receiver)["last_refusal"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("failed authentication") || why.contains("out of bounds"),
        "{what}: {why}"
    );
    assert!(
        p.wait_synced(Duration::from_secs(60)),
        "{what}: no resync: {} / {}",
        p.repl(0),
        p.repl(1)
    );
}

#[test]
fn a_relay_that_tampers_with_the_encrypted_link_is_caught_and_the_pair_ends_identical() {
    let (p, relay) = relayed_pair("");
    write_marker(&p);
    let w = Writer::start(p.n[0].nbd_port);
    // A forged WriteAck: the shape of a sealed acknowledgement (a 32-byte head, no body), bytes
    // that no key made.
    let mut forged = Vec::new();
    forged.extend_from_slice(&32u32.to_be_bytes());
    forged.extend_from_slice(&0u32.to_be_bytes());
    forged.extend_from_slice(&random_bytes(99, 48));
    for (dir, t) in [
        (Dir::Forward, Tamper::Flip),
        (Dir::Forward, Tamper::Drop),
        (Dir::Forward, Tamper::Replay),
        (Dir::Back, Tamper::Inject(forged)),
        (Dir::Back, Tamper::Flip),
    ] {
        tamper_and_recover(&p, &relay, dir, t);
    }
    let (writes, image) = w.finish();
    assert!(writes > 0);
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    // Every write the client saw acknowledged is on both disks, and nothing else is.
    assert!(region(&p, 0) == image, "the Primary's disk differs from what was acknowledged");
    assert!(region(&p, 1) == image, "the Secondary's disk differs from what was acknowledged");
    assert!(p.identical());
    // Encrypted: the marker blocks went over the link, and not one copy of it is in the capture.
    let capture = relay.capture(Dir::Forward);
    assert!(capture.len() > 16 * BLOCK, "the relay saw {} bytes", capture.len());
    assert!(!contains(&capture, MARKER), "a payload pattern is visible on the encrypted link");
}

/// `link_encryption = false`: the payload is visible (the capture check above can fail), and
/// every frame is still authenticated.
#[test]
fn without_encryption_the_data_is_visible_and_still_authenticated() {
    let (p, relay) = relayed_pair("link_encryption = false");
    write_marker(&p);
    assert!(contains(&relay.capture(Dir::Forward), MARKER), "the marker should be in the clear");
    let w = Writer::start(p.n[0].nbd_port);
    tamper_and_recover(&p, &relay, Dir::Forward, Tamper::Flip);
    tamper_and_recover(&p, &relay, Dir::Back, Tamper::Replay);
    let (_, image) = w.finish();
    assert!(p.wait_synced(Duration::from_secs(60)));
    assert!(region(&p, 1) == image, "the Secondary's disk differs from what was acknowledged");
}

/// Nodes that disagree on link_encryption refuse each other by name.
#[test]
fn nodes_that_disagree_on_encryption_say_so() {
    let mut p = Pair::configure(&PairOpts::default());
    let text = std::fs::read_to_string(&p.config).unwrap();
    let plain = p.dir.path().join("plain.toml");
    std::fs::write(
        &plain,
        text.replace("metrics_listen = \"\"", "metrics_listen = \"\"\nlink_encryption = false"),
    )
    .unwrap();
    p.n[1].config = Some(plain);
    p.start(0);
    p.start(1);
    let says = |r: &serde_json::Value| {
        r["last_refusal"].as_str().is_some_and(|w| w.contains("link_encryption"))
    };
    assert!(p.wait_for(0, Duration::from_secs(20), says), "{}", p.repl(0));
    assert!(p.wait_for(1, Duration::from_secs(20), says), "{}", p.repl(1));
}

/// Someone connects to the Secondary's replication port every 2 s from another address (a
/// monitoring check, a scan) while it restarts: each is dropped and counted, and the real peer
/// reconnects on its own schedule (connect_retry 1 s, backing off to 8 s while the Secondary
/// was down). Before, each such connection counted as a failed attempt and put the acceptor in
/// its own 8 s backoff, longer than the peer waits for a Hello: the link stayed down.
#[test]
fn foreign_connections_do_not_delay_the_real_peer() {
    let mut p = Pair::up(&PairOpts {
        size: 16 << 20,
        peer: "ping_interval_ms = 500\nping_timeout_ms = 1000\ntimeout_ms = 2000\nconnect_retry_ms = 1000"
            .into(),
        ..PairOpts::default()
    });
    let target: SocketAddr = format!("127.0.0.1:{}", p.n[1].repl_port).parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let pest = {
        let (stop, made) = (Arc::clone(&stop), Arc::clone(&made));
        std::thread::spawn(move || {
            for _ in 0..60 {
                if stop.load(SeqCst) {
                    return;
                }
                if connect_from_elsewhere(target) {
                    made.fetch_add(1, SeqCst);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    p.stop(1);
    p.start(1);
    // The peer's normal time: its backoff at most 8 x connect_retry, then a handshake.
    let back = p.wait_for(1, Duration::from_secs(12), |r| r["connection"] == "Connected");
    // The link stays up while two more come (a live session accepts nothing: they wait in the
    // backlog, and are dropped when the link next listens).
    let connects = p.num(1, "connects");
    let at = made.load(SeqCst);
    let more = wait_until(Duration::from_secs(10), || made.load(SeqCst) >= at + 2);
    stop.store(true, SeqCst);
    pest.join().unwrap();
    assert!(back, "the peer did not reconnect in its normal time: {}", p.repl(1));
    assert!(more, "the foreign connections stopped");
    assert_eq!(p.num(1, "connects"), connects, "the link was disturbed: {}", p.repl(1));
    // While the Secondary listens, each is dropped and counted at once.
    p.ok(0, &["disconnect"]);
    assert!(p.wait_for(1, Duration::from_secs(10), |r| r["connection"] == "Connecting"));
    let before = p.num(1, "foreign_connections");
    assert!(connect_from_elsewhere(target));
    assert!(
        p.wait_for(1, Duration::from_secs(10), |r| r["foreign_connections"].as_u64()
            > Some(before)),
        "{}",
        p.repl(1)
    );
    p.ok(0, &["connect"]);
    assert!(p.wait_synced(Duration::from_secs(30)), "{} / {}", p.repl(0), p.repl(1));
}

/// Connections from the peer's own address that open and then say nothing (a stalled or
/// hostile handshake, a half-dead NAT entry) hold the acceptor's pending handshakes; the real
/// peer's connection still gets its handshake at once. Before, the acceptor ran one handshake
/// at a time: four stalled ones kept the peer out for four handshake timeouts.
#[test]
fn stalled_handshakes_from_the_peers_address_do_not_delay_the_real_peer() {
    let mut p = Pair::up(&PairOpts {
        size: 16 << 20,
        peer: "ping_interval_ms = 500\nping_timeout_ms = 1000\ntimeout_ms = 4000\nconnect_retry_ms = 500"
            .into(),
        ..PairOpts::default()
    });
    // beta (the later name) accepts; alpha connects.
    let target: SocketAddr = format!("127.0.0.1:{}", p.n[1].repl_port).parse().unwrap();
    p.stop(0);
    assert!(p.wait_for(1, Duration::from_secs(20), |r| r["connection"] == "Connecting"));
    let errors = p.num(1, "peer_errors");
    // Four connections from 127.0.0.1 (the peer's address) that never send a Hello: every
    // handshake slot is taken, each waiting up to timeout_ms for a Hello.
    let stalled: Vec<std::net::TcpStream> =
        (0..4).map(|_| std::net::TcpStream::connect(target).unwrap()).collect();
    let t = std::time::Instant::now();
    p.start(0);
    let back = p.wait_for(1, Duration::from_secs(30), |r| r["connection"] == "Connected");
    let took = t.elapsed();
    assert!(back, "the peer did not reconnect: {}", p.repl(1));
    // Well inside one handshake timeout (4 s): the peer did not wait for the stalled ones.
    assert!(took < Duration::from_millis(3500), "the peer waited {took:?}");
    assert!(p.wait_synced(Duration::from_secs(30)), "{} / {}", p.repl(0), p.repl(1));
    drop(stalled);
    // The stalled handshakes that ran out were counted (the one dropped for the peer's is a
    // foreign connection).
    assert!(
        p.wait_for(1, Duration::from_secs(20), |r| r["peer_errors"].as_u64().unwrap_or(0)
            + r["foreign_connections"].as_u64().unwrap_or(0)
            >= errors + 4),
        "{}",
        p.repl(1)
    );
}

/// A TCP connection to `to` from 127.0.0.2 (loopback, not the peer's 127.0.0.1), closed at once.
fn connect_from_elsewhere(to: SocketAddr) -> bool {
    integration::tcp_from(2, to.port()).is_ok()
}

/// A rolling upgrade on the replication link (the test-only setting stands in for the next
/// release): a node that also speaks a newer version replicates with this one at the version
/// both speak, in both roles; a node that speaks only a newer one, or only an older one, is
/// refused on both sides with a message naming both versions, and nothing is replicated.
#[test]
fn replication_versions_are_negotiated_and_a_node_outside_the_range_is_refused_by_name() {
    let size = 16u64 << 20;
    let mut p = Pair::configure(&PairOpts { size, ..PairOpts::default() });
    p.n[1].env.push(("DUET_TEST_PEER_PROTOCOL".into(), "2-3".into()));
    // Nor does it compare configurations (a release before that feature).
    p.n[1].env.push(("DUET_TEST_PEER_FEATURES".into(), "0".into()));
    p.start(0);
    p.start(1);
    p.ok(0, &["primary", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    for i in 0..2 {
        let ev = p.events(i);
        assert!(ev.contains("(protocol version 2)"), "{ev}");
        assert_eq!(p.repl(i)["config_differs"], serde_json::Value::Null, "{}", p.repl(i));
    }
    // Data both ways: alpha writes, the roles swap, beta reads it and writes, and back.
    let uri = |p: &Pair, i: usize| {
        let open = || p.status(i)["resources"][0]["exporting"] == true;
        assert!(wait_until(Duration::from_secs(10), open), "{}", p.status(i));
        p.uri()
    };
    integration::qemu_io(&uri(&p, 0), &["write -P 0x3a 0 1M"]);
    p.ok(0, &["secondary"]);
    p.ok(1, &["primary"]);
    integration::qemu_io(&uri(&p, 1), &["read -P 0x3a 0 1M", "write -P 0x3b 1M 1M"]);
    p.ok(1, &["secondary"]);
    p.ok(0, &["primary"]);
    integration::qemu_io(&uri(&p, 0), &["read -P 0x3a 0 1M", "read -P 0x3b 1M 1M"]);

    // Beta speaks only a newer version: it refuses alpha, and alpha shows beta's words.
    let refused = |p: &Pair, words: &[&str]| {
        (0..2).all(|i| {
            p.wait_for(i, Duration::from_secs(20), |r| {
                r["last_refusal"].as_str().is_some_and(|w| words.iter().all(|x| w.contains(x)))
            })
        })
    };
    let upgrade = "upgrade the older node";
    for (range, words) in [
        ("3", ["versions up to 2, this node only 3", upgrade]),
        ("1", ["versions up to 1, this node only 2", upgrade]),
    ] {
        p.stop(1);
        p.n[1].env = vec![("DUET_TEST_PEER_PROTOCOL".into(), range.into())];
        p.start(1);
        assert!(refused(&p, &words), "{range}: {} / {}", p.repl(0), p.repl(1));
        for i in 0..2 {
            assert_ne!(p.repl(i)["connection"], "Connected", "{range}");
        }
    }
}
