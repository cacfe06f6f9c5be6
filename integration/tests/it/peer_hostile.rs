//! A hostile peer on the replication port: garbage, another cluster, the wrong secret, bad and
//! truncated frames, oversized frames, a smaller volume, frames without the link's seal. Each is
//! refused and logged; nothing is written; the daemon keeps running and later pairs with the real
//! peer. Past the handshake this peer holds the secret and seals its frames as a real one does
//! ([`replicator::repl::seal`]): what it sends is hostile in content, not in form.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use integration::pair::{Pair, PairOpts};
use integration::wait_until;
use replicator::generation::Generations;
use replicator::repl::handshake::{self, AuthInput, Hello, Params};
use replicator::repl::seal::{self, KeyInput, Opener, Protection, Sealer};
use replicator::repl::wire::{self, Kind};

struct Conn {
    s: TcpStream,
    /// Once authenticated: our frames sealed, theirs opened.
    keys: Option<(Sealer, Opener)>,
}

impl Conn {
    fn open(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { s, keys: None }
    }
    /// A frame's bytes as they go out (sealed once authenticated).
    fn seal(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match self.keys.as_mut() {
            Some((s, _)) => s.seal_head(frame, 0, &mut out),
            None => out.extend_from_slice(frame),
        }
        out
    }
    fn send(&mut self, kind: Kind, payload: &[u8]) {
        let mut b = BytesMut::new();
        wire::encode(&mut b, kind, 0, 0, 0, payload);
        let out = self.seal(&b);
        let _ = self.s.write_all(&out);
    }
    /// The next frame, or None when the daemon closed the connection.
    fn frame(&mut self) -> Option<(Kind, Vec<u8>)> {
        if let Some((_, o)) = self.keys.as_mut() {
            let mut b = vec![0u8; seal::PREFIX_LEN];
            self.s.read_exact(&mut b).ok()?;
            let n = Opener::frame_len(&b, wire::MAX_PAYLOAD).ok()??;
            b.resize(n, 0);
            self.s.read_exact(&mut b[seal::PREFIX_LEN..]).ok()?;
            let f = o.open(&mut b, wire::MAX_PAYLOAD).ok()?;
            return Some((f.header.kind, b[f.payload].to_vec()));
        }
        let mut h = [0u8; wire::HEADER_LEN];
        self.s.read_exact(&mut h).ok()?;
        let hd = wire::decode_header(&h).unwrap().unwrap();
        let mut p = vec![0u8; hd.len as usize];
        self.s.read_exact(&mut p).ok()?;
        Some((hd.kind, p))
    }
    /// Reads until the daemon closes; returns any Refuse text seen.
    fn refusal(&mut self) -> String {
        let mut why = String::new();
        while let Some((k, p)) = self.frame() {
            if k == Kind::Refuse {
                why = String::from_utf8_lossy(&p).into_owned();
            }
        }
        why
    }
    /// Reads the daemon's Hello.
    fn their_hello(&mut self) -> Hello {
        let (k, p) = self.frame().expect("daemon Hello");
        assert_eq!(k, Kind::Hello);
        Hello::decode(&p).unwrap()
    }
}

/// Our Hello as `cluster`'s alpha, announcing `features` (0 but where a case is about one: a
/// peer that compares no configuration keys, as a release before that feature).
fn hello(cluster: &str, features: u64) -> Hello {
    Hello {
        version: wire::VERSION,
        features,
        cluster: cluster.into(),
        node: "alpha".into(),
        resource: "vol0".into(),
        challenge: [9; 32],
        protection: Protection::Encrypt.code(),
    }
}

/// Hello and Auth with `secret` as "alpha"; returns the connection and beta's challenge.
fn authenticate(port: u16, secret: &[u8]) -> (Conn, [u8; 32]) {
    authenticate_with(port, secret, 0)
}

fn authenticate_with(port: u16, secret: &[u8], features: u64) -> (Conn, [u8; 32]) {
    let mut c = Conn::open(port);
    let theirs = c.their_hello();
    let mine = hello("itest-pair", features);
    let mut b = BytesMut::new();
    mine.encode(&mut b);
    c.send(Kind::Hello, &b);
    let tag = handshake::auth_tag(
        secret,
        &AuthInput {
            cluster: "itest-pair",
            resource: "vol0",
            prover: "alpha",
            prover_challenge: &mine.challenge,
            verifier: "beta",
            verifier_challenge: &theirs.challenge,
        },
    );
    c.send(Kind::Auth, &tag);
    (c, theirs.challenge)
}

/// Authenticated with the right secret, beta's Auth read, the link's keys on: ready for Params.
fn authenticated(port: u16, secret: &[u8]) -> Conn {
    authenticated_with(port, secret, 0)
}

fn authenticated_with(port: u16, secret: &[u8], features: u64) -> Conn {
    let (mut c, theirs) = authenticate_with(port, secret, features);
    let (k, _) = c.frame().unwrap();
    assert_eq!(k, Kind::Auth);
    let keys = seal::derive(&KeyInput {
        secret,
        cluster: "itest-pair",
        resource: "vol0",
        me: "alpha",
        peer: "beta",
        my_challenge: &[9; 32],
        peer_challenge: &theirs,
        protection: Protection::Encrypt,
    });
    c.keys = Some((keys.send, keys.recv));
    c
}

/// Authenticates, answers the peer's parameters with its own (`flags` ours: Primary or not),
/// and sends an empty bitmap: the session is live after this.
fn in_session(port: u16, secret: &[u8], flags: u32, what: &str) -> Conn {
    let mut c = authenticated(port, secret);
    let (k, theirs) = c.frame().unwrap();
    assert_eq!(k, Kind::Params, "{what}");
    let theirs = Params::decode(&theirs).unwrap();
    let mine = Params { flags, bitmap_weight: 0, ..theirs };
    let mut b = BytesMut::new();
    mine.encode(&mut b);
    c.send(Kind::Params, &b);
    let mut f = BytesMut::new();
    wire::encode(&mut f, Kind::Bitmap, wire::F_LAST, 0, 0, &[]);
    let out = c.seal(&f);
    c.s.write_all(&out).unwrap();
    c
}

#[test]
fn hostile_peers_are_refused_and_nothing_is_written() {
    let mut p = Pair::configure(&PairOpts::default());
    p.start(1); // beta accepts replication connections; alpha stays down
    let port = p.n[1].repl_port;
    let size = p.data_size();
    let before = p.digest(1, size);
    let secret = b"correct horse battery staple";

    // Garbage instead of a Hello.
    let mut c = Conn::open(port);
    let _ = c.their_hello();
    c.s.write_all(&[0x5a; 200]).unwrap();
    assert_eq!(c.refusal(), "");

    // Another cluster.
    let mut c = Conn::open(port);
    let _ = c.their_hello();
    let mut b = BytesMut::new();
    hello("someone-else", 0).encode(&mut b);
    c.send(Kind::Hello, &b);
    assert!(c.refusal().contains("cluster"));

    // The wrong secret (the refusal comes before any key is in use: in the clear).
    let (mut c, _) = authenticate(port, b"not the secret");
    let why = c.refusal();
    assert!(why.contains("authentication"), "{why}");

    // Right secret, then a sealed frame whose header checksum is broken.
    let mut c = authenticated(port, secret);
    let mut f = BytesMut::new();
    wire::encode(&mut f, Kind::Params, 0, 0, 0, &[0; 60]);
    f[10] ^= 0xff;
    let out = c.seal(&f);
    c.s.write_all(&out).unwrap();
    assert_eq!(c.refusal(), "");

    // Right secret, then a well-formed Params frame without the seal (what anyone on the
    // wire could inject): refused as a forgery.
    let mut c = authenticated(port, secret);
    let mut f = BytesMut::new();
    wire::encode(&mut f, Kind::Params, 0, 0, 0, &[0; 60]);
    c.s.write_all(&f).unwrap();
    assert_eq!(c.refusal(), "");

    // Truncated frame: a header promising 1000 bytes, 10 sent, then hang up.
    let mut c = Conn::open(port);
    let _ = c.their_hello();
    let mut f = BytesMut::new();
    wire::encode_header(&mut f, Kind::Hello, 0, 0, 0, 1000);
    c.s.write_all(&f).unwrap();
    c.s.write_all(&[1; 10]).unwrap();
    drop(c);

    // Oversized frame before authentication.
    let mut c = Conn::open(port);
    let _ = c.their_hello();
    let mut f = BytesMut::new();
    wire::encode_header(&mut f, Kind::Hello, 0, 0, 0, 1 << 20);
    c.s.write_all(&f).unwrap();
    assert_eq!(c.refusal(), "");

    // Authenticated, claiming to be Primary of a volume larger than ours.
    let mut c = authenticated(port, secret);
    let (k, theirs) = c.frame().unwrap();
    assert_eq!(k, Kind::Params);
    let theirs = Params::decode(&theirs).unwrap();
    let small = Params {
        size: theirs.size * 2,
        fingerprint: theirs.fingerprint,
        uuids: Generations { current: 0x1234_5679, bitmap: 0, history: [0, 0] },
        flags: handshake::P_PRIMARY,
        bitmap_weight: 0,
    };
    let mut b = BytesMut::new();
    small.encode(&mut b);
    c.send(Kind::Params, &b);
    let why = c.refusal();
    assert!(why.contains("volume"), "{why}");

    // Configuration keys: garbage from a peer that announced them, and keys from one that did
    // not (out of place). Each drops the connection, naming the frame.
    for (features, keys, why) in [
        (
            handshake::F_CONFIG_KEYS,
            &[0xff_u8, 0xff, 1][..],
            "malformed ConfigKeys payload: too many keys",
        ),
        (0, &[0, 0][..], "expected Bitmap, peer sent ConfigKeys"),
    ] {
        let mut c = authenticated_with(port, secret, features);
        let (k, theirs) = c.frame().unwrap();
        assert_eq!(k, Kind::Params);
        let mut b = BytesMut::new();
        Params { flags: 0, bitmap_weight: 0, ..Params::decode(&theirs).unwrap() }.encode(&mut b);
        c.send(Kind::Params, &b);
        c.send(Kind::ConfigKeys, keys);
        let _ = c.refusal();
        let named = |r: &serde_json::Value| r["last_refusal"].as_str() == Some(why);
        assert!(p.wait_for(1, Duration::from_secs(10), named), "{features}: {}", p.repl(1));
    }

    // A data frame right after authentication (skipping Params): refused.
    let mut c = authenticated(port, secret);
    c.send(Kind::Data, &[0xAB; 4096]);
    let _ = c.refusal();

    // The daemon is fine, counted every attempt, logged them (rate-limited), wrote nothing.
    assert!(wait_until(Duration::from_secs(10), || p.num(1, "peer_errors") >= 8), "{}", p.repl(1));
    // The wrong secret and the unsealed frame failed authentication (the sealed frame with a
    // broken header did not: it was sealed with the right key).
    assert_eq!(p.num(1, "peer_auth_failures"), 2, "{}", p.repl(1));
    assert_eq!(p.digest(1, size), before, "a hostile peer changed the disk");
    let log = p.log_text(1);
    assert!(log.contains("replication link"), "{log}");
    let lines = log.lines().filter(|l| l.contains("replication link")).count();
    assert!(lines <= 6, "{lines} log lines for 9 attempts: not rate-limited\n{log}");
    assert_eq!(p.repl(1)["connection"], "Connecting");

    // And the real peer still pairs with it.
    p.start(0);
    p.ok(0, &["primary", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)));
}

/// A peer that authenticates and answers pings but never acknowledges a write (a hung disk):
/// the Primary drops it after `timeout_ms` and completes the write alone, out of sync.
#[test]
fn a_peer_that_never_acknowledges_is_dropped_after_the_timeout() {
    use integration::rawnbd::Raw;
    use replicator::nbd::proto::CMD_WRITE;
    let mut p = Pair::configure(&PairOpts::default());
    p.start(1);
    p.ok(1, &["disconnect"]);
    p.ok(1, &["primary", "--force"]);
    p.ok(1, &["connect"]);
    let secret = b"correct horse battery staple";
    // Same generations, not Primary: the plan is "in sync".
    let c = in_session(p.n[1].repl_port, secret, 0, "silent peer");
    // Answer pings from a thread; swallow everything else.
    c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let pinger = std::thread::spawn(move || {
        let mut conn = c;
        let mut data = 0;
        while let Some((k, _)) = conn.frame() {
            match k {
                Kind::Ping => conn.send(Kind::PingAck, &[]),
                Kind::Data => data += 1,
                _ => {}
            }
        }
        data
    });
    // Beta crashed-primary flag makes this a (empty) bitmap resync as source: live either way.
    let live =
        |r: &serde_json::Value| r["connection"] == "Connected" || r["connection"] == "SyncSource";
    assert!(wait_until(Duration::from_secs(10), || live(&p.repl(1))), "{}", p.repl(1));
    let mut r = Raw::transmission(p.n[0].nbd_port);
    r.request(CMD_WRITE, 0, 1, 0, 4096, &[7; 4096]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0, "the write completes without the peer");
    let st = p.repl(1);
    assert!(!live(&st), "{st}");
    assert_eq!(st["out_of_sync_bytes"], 4096, "{st}");
    assert!(st["last_refusal"].as_str().unwrap_or_default().contains("unanswered"), "{st}");
    assert_eq!(pinger.join().unwrap(), 1, "the peer saw the write");
}

/// A live session, then hostile frames in the middle of a batch (one TCP write holding a good
/// write and a bad frame): the Secondary applies the good write, drops the link on the bad
/// frame, writes nothing of it, and keeps running.
#[test]
fn hostile_frames_mid_session_drop_the_link_and_write_nothing_of_them() {
    let mut p = Pair::configure(&PairOpts::default());
    p.start(1);
    let secret = b"correct horse battery staple";
    let size = p.data_size();
    let block = |p: &Pair, at: u64| -> Vec<u8> {
        let f = std::fs::File::open(&p.n[1].disk).unwrap();
        let mut b = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
        b
    };
    let data = |fill: u8| vec![fill; 4096];
    let data_frame = |f: &mut BytesMut, id: u64, at: u64, payload: &[u8]| {
        wire::encode(f, Kind::Data, 0, id, at, payload);
    };
    // (what, the bad frame's bytes, the offset it names, sealed as the link's frames are)
    let mut cases: Vec<(&str, BytesMut, u64, bool)> = Vec::new();
    let mut f = BytesMut::new();
    data_frame(&mut f, 2, 8192, &data(0xBB));
    f[12] ^= 0x01; // header checksum no longer matches
    cases.push(("broken header checksum", f, 8192, true));
    let mut f = BytesMut::new();
    data_frame(&mut f, 2, size, &data(0xBB));
    cases.push(("range past the end of the volume", f, size, true)); // where the metadata lies
    let mut f = BytesMut::new();
    wire::encode_header(&mut f, Kind::Data, 0, 2, 8192, u32::MAX);
    cases.push(("oversized frame", f, 8192, true));
    let mut f = BytesMut::new();
    wire::encode(&mut f, Kind::Hello, 0, 0, 0, &[0; 16]);
    cases.push(("a handshake frame mid-session", f, 8192, true));
    // A State frame (role, disk) naming a role that does not exist, and one naming a disk
    // state that does not exist.
    let mut f = BytesMut::new();
    wire::encode(&mut f, Kind::State, 0, 0, 0, &[0xEE, 0]);
    cases.push(("a state frame with an unknown role", f, 8192, true));
    let mut f = BytesMut::new();
    wire::encode(&mut f, Kind::State, 0, 0, 0, &[0, 0xEE]);
    cases.push(("a state frame with an unknown disk state", f, 8192, true));
    // A well-formed data frame without the seal: what an attacker on the wire would inject.
    let mut f = BytesMut::new();
    data_frame(&mut f, 2, 8192, &data(0xBB));
    cases.push(("an injected data frame", f, 8192, false));
    for (n, (what, bad, bad_at, sealed)) in cases.into_iter().enumerate() {
        let errors = p.num(1, "peer_errors");
        let untouched = block(&p, bad_at);
        // A Primary with good data and the same history: beta follows it as sync target.
        let mut c = in_session(p.n[1].repl_port, secret, handshake::P_PRIMARY, what);
        let live = |r: &serde_json::Value| {
            r["connection"] == "Connected" || r["connection"] == "SyncTarget"
        };
        assert!(wait_until(Duration::from_secs(10), || live(&p.repl(1))), "{what}: {}", p.repl(1));
        let good = u8::try_from(0x10 + n).unwrap();
        let mut good_frame = BytesMut::new();
        data_frame(&mut good_frame, 1, 0, &data(good));
        let mut batch = c.seal(&good_frame);
        batch.extend_from_slice(&if sealed { c.seal(&bad) } else { bad.to_vec() });
        c.s.write_all(&batch).unwrap();
        // The link is dropped, counted, and the daemon is still there to tell.
        assert!(
            wait_until(Duration::from_secs(10), || p.num(1, "peer_errors") > errors),
            "{what}: {}",
            p.repl(1)
        );
        let _ = c.refusal();
        assert!(!live(&p.repl(1)), "{what}: {}", p.repl(1));
        assert_eq!(block(&p, 0), data(good), "{what}: the good write before it is applied");
        assert_eq!(block(&p, bad_at), untouched, "{what}: the bad frame wrote nothing");
    }
    p.ok(1, &["status"]);
}

/// Beta made Primary alone, with `blocks` 4 KiB blocks written without a peer (out of sync);
/// then a hostile "alpha" in session as Secondary with the same history. Beta is then
/// Connected, or SyncSource of the marked blocks.
fn primary_with_hostile_secondary(blocks: u64) -> (Pair, Conn) {
    use integration::rawnbd::Raw;
    use replicator::nbd::proto::CMD_WRITE;
    let mut p = Pair::configure(&PairOpts::default());
    p.start(1);
    p.ok(1, &["disconnect"]);
    p.ok(1, &["primary", "--force"]);
    // Both nodes' configs name one NBD port (n[0]'s); the Primary opens it.
    let port = p.n[0].nbd_port;
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let mut r = Raw::transmission(port);
    for i in 0..blocks {
        r.request(CMD_WRITE, 0, i, i * 4096, 4096, &[0x42; 4096]).unwrap();
        assert_eq!(r.reply().unwrap().error, 0);
    }
    drop(r);
    p.ok(1, &["connect"]);
    let c = in_session(p.n[1].repl_port, b"correct horse battery staple", 0, "hostile secondary");
    let live =
        |r: &serde_json::Value| r["connection"] == "Connected" || r["connection"] == "SyncSource";
    assert!(wait_until(Duration::from_secs(10), || live(&p.repl(1))), "{}", p.repl(1));
    (p, c)
}

/// Resync frames sent to a Primary (defect: RsData was applied there with no I/O gate and no
/// activity-log entry, RsSame cleared its out-of-sync bits): the link is dropped, nothing is
/// written, the bits stay.
#[test]
fn resync_frames_sent_to_a_primary_are_refused() {
    for kind in [Kind::RsData, Kind::RsSame] {
        let (p, mut c) = primary_with_hostile_secondary(1);
        let errors = p.num(1, "peer_errors");
        assert_eq!(p.num(1, "out_of_sync_bytes"), 4096, "{}", p.repl(1));
        let at = 8192;
        let mut f = BytesMut::new();
        match kind {
            Kind::RsData => wire::encode(&mut f, kind, 0, 0, at, &[0xEE; 4096]),
            _ => wire::encode(&mut f, kind, 0, 0, 0, &4096u32.to_be_bytes()),
        }
        let out = c.seal(&f);
        c.s.write_all(&out).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || p.num(1, "peer_errors") > errors),
            "{kind:?}: {}",
            p.repl(1)
        );
        let st = p.repl(1);
        let why = st["last_refusal"].as_str().unwrap_or_default().to_string();
        assert!(why.contains("resync data") && why.contains("Primary"), "{kind:?}: {why}");
        assert_eq!(st["out_of_sync_bytes"], 4096, "{kind:?}: the bits were cleared: {st}");
        let f = std::fs::File::open(&p.n[1].disk).unwrap();
        let mut b = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
        assert_eq!(b, vec![0; 4096], "{kind:?}: resync data was written on the Primary");
        let mut b0 = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b0, 0).unwrap();
        assert_eq!(b0, vec![0x42; 4096]);
    }
}

/// Diskless reads where they do not belong: a PeerRead to a Primary (only an UpToDate
/// Secondary serves a Diskless Primary), one beyond the size bound, and read data sent to a
/// Primary that has its disk and asked nothing. Each drops the link; nothing is written or sent.
#[test]
fn diskless_read_frames_out_of_place_are_refused() {
    for (kind, len) in
        [(Kind::PeerRead, 4096u32), (Kind::PeerRead, 64 << 20), (Kind::PeerReadData, 4096)]
    {
        let (p, mut c) = primary_with_hostile_secondary(1);
        let errors = p.num(1, "peer_errors");
        let mut f = BytesMut::new();
        match kind {
            Kind::PeerReadData => wire::encode(&mut f, kind, 0, 1, 8192, &[0xEE; 4096]),
            _ => wire::encode(&mut f, kind, 0, 1, 0, &len.to_be_bytes()),
        }
        let out = c.seal(&f);
        c.s.write_all(&out).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || p.num(1, "peer_errors") > errors),
            "{kind:?} {len}: {}",
            p.repl(1)
        );
        if kind == Kind::PeerRead && len == 4096 {
            let why = p.repl(1)["last_refusal"].as_str().unwrap_or_default().to_string();
            assert!(why.contains("only an UpToDate Secondary"), "{why}");
        }
        let st = p.repl(1);
        assert_eq!(
            (st["role"].as_str(), st["disk"].as_str()),
            (Some("Primary"), Some("UpToDate")),
            "{st}"
        );
        let f = std::fs::File::open(&p.n[1].disk).unwrap();
        let mut b = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 8192).unwrap();
        assert_eq!(b, vec![0; 4096], "{kind:?}: read data was written");
    }
}

/// A peer that floods resync requests and reads nothing: past the bound the link is dropped
/// with a reason (before, every request spawned a task with no bound).
#[test]
fn a_flood_of_resync_requests_is_bounded() {
    let (p, mut c) = primary_with_hostile_secondary(0);
    let errors = p.num(1, "peer_errors");
    let mut batch = Vec::new();
    for i in 0..2000u64 {
        let at = (i % 100) * (1 << 20);
        let mut f = BytesMut::new();
        wire::encode(&mut f, Kind::RsRequest, 0, i, at, &(1u32 << 20).to_be_bytes());
        batch.extend_from_slice(&c.seal(&f));
    }
    c.s.write_all(&batch).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || p.num(1, "peer_errors") > errors),
        "{}",
        p.repl(1)
    );
    let why = p.repl(1)["last_refusal"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("resync requests outstanding"), "{why}");
    drop(c);
    p.ok(1, &["status"]);
}

/// A peer that trickles bitmap frames (each in time, never the last) holds the Primary's
/// writes only until the exchange's own deadline (5 x timeout_ms); then the write completes.
#[test]
fn a_trickled_bitmap_exchange_ends_at_its_deadline() {
    use integration::rawnbd::Raw;
    use replicator::nbd::proto::CMD_WRITE;
    let mut p = Pair::configure(&PairOpts {
        peer: "ping_interval_ms = 200\nping_timeout_ms = 500\ntimeout_ms = 1000\nconnect_retry_ms = 200"
            .into(),
        ..PairOpts::default()
    });
    p.start(1);
    p.ok(1, &["disconnect"]);
    p.ok(1, &["primary", "--force"]);
    p.ok(1, &["connect"]);
    let errors = p.num(1, "peer_errors");
    let mut c = authenticated(p.n[1].repl_port, b"correct horse battery staple");
    let (k, theirs) = c.frame().unwrap();
    assert_eq!(k, Kind::Params);
    let theirs = Params::decode(&theirs).unwrap();
    let mut b = BytesMut::new();
    Params { flags: 0, bitmap_weight: 0, ..theirs }.encode(&mut b);
    c.send(Kind::Params, &b);
    // Never the last bitmap frame, one every 300 ms (each within timeout_ms).
    let trickle = std::thread::spawn(move || {
        let mut c = c;
        for _ in 0..100 {
            let mut f = BytesMut::new();
            wire::encode(&mut f, Kind::Bitmap, 0, 0, 0, &[]);
            let out = c.seal(&f);
            if c.s.write_all(&out).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    // A write while the exchange runs: held, then completed once the exchange is cut off.
    let port = p.n[0].nbd_port;
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let writer = std::thread::spawn(move || {
        let mut r = Raw::transmission(port);
        r.request(CMD_WRITE, 0, 1, 0, 4096, &[9; 4096]).unwrap();
        r.reply().unwrap().error
    });
    assert!(
        wait_until(Duration::from_secs(20), || p.num(1, "peer_errors") > errors),
        "{}",
        p.repl(1)
    );
    let why = p.repl(1)["last_refusal"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("bitmap exchange took longer"), "{why}");
    assert_eq!(writer.join().unwrap(), 0, "the held write completes");
    trickle.join().unwrap();
}
