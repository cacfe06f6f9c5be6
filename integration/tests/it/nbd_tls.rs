//! NBD over TLS with real clients (libnbd's `nbdinfo`/`nbdcopy` and `qemu-io`, both GnuTLS),
//! the client allow-list and the idle timeout.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::rawnbd::Raw;
use integration::tls::Certs;
use integration::{Node, NodeOpts, have, run, run_ok, wait_until};
use replicator::nbd::proto::{CMD_FLUSH, OPT_STARTTLS, REP_ACK, REP_ERR_TLS_REQD};

fn tools() -> bool {
    have("nbdinfo") && have("qemu-io") && have("openssl") && have("nbdcopy")
}

fn tls_node(certs: &Certs, tls: &str, client_ca: bool) -> Node {
    let opts = NodeOpts {
        size: 64 << 20,
        resource_extra: certs.nbd_section(tls, client_ca),
        ..NodeOpts::default()
    };
    Node::start(&opts)
}

fn nbds(n: &Node, dir: &Path) -> String {
    format!("nbds://127.0.0.1:{}/vol0?tls-certificates={}", n.port, dir.display())
}

/// `qemu-io` over TLS with the credentials in `dir`.
fn qemu_io_tls(n: &Node, dir: &Path, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args([
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", dir.display()),
        "--image-opts",
        &format!("driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0", n.port),
    ]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c, Duration::from_secs(60))
}

fn stat(n: &Node, key: &str) -> u64 {
    n.status()["resources"][0]["stats"][key].as_u64().unwrap_or(0)
}

#[test]
fn tls_required_serves_libnbd_and_qemu_over_tls_and_refuses_plain_clients() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path());
    let n = tls_node(&certs, "require", false);
    // qemu-io writes a pattern over TLS and reads it back.
    let out = qemu_io_tls(&n, &certs.anonymous_dir, &["write -P 0x5a 1M 2M", "read -P 0x5a 1M 2M"]);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("verification failed"), "{text}");
    // nbdinfo sees the export over TLS; nbdcopy reads the pattern qemu wrote.
    let info = run_ok(
        Command::new("nbdinfo").arg(nbds(&n, &certs.anonymous_dir)),
        Duration::from_secs(30),
    );
    assert!(info.contains(&(64u64 << 20).to_string()), "{info}");
    let copy = dir.path().join("copy.img");
    run_ok(
        Command::new("nbdcopy").arg(nbds(&n, &certs.anonymous_dir)).arg(&copy),
        Duration::from_secs(60),
    );
    let data = std::fs::read(&copy).unwrap();
    assert!(data[1 << 20..3 << 20].iter().all(|b| *b == 0x5a), "the pattern over TLS");
    assert!(data[..1 << 20].iter().all(|b| *b == 0), "nothing else was written");
    // And it is on the disk.
    let disk = std::fs::read(&n.disk).unwrap();
    assert_eq!(&disk[..64 << 20], &data[..], "what TLS clients read is the disk");
    assert!(stat(&n, "tls_sessions") >= 3, "{}", n.status());
    // A plain client is refused (libnbd reports NBD_REP_ERR_TLS_REQD as "not supported").
    let plain = run(Command::new("nbdinfo").arg(n.uri()), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success(), "a plain client got in: {err}");
    assert!(err.contains("opt_go"), "{err}");
    // A raw client sees the spec's answers: TLS_REQD for GO, ACK for STARTTLS.
    let mut r = Raw::connect(n.port);
    r.flags();
    assert_eq!(r.go("vol0"), REP_ERR_TLS_REQD);
    r.option(OPT_STARTTLS, &[]);
    let ack = r.opt_reply();
    assert_eq!((ack.option, ack.kind), (OPT_STARTTLS, REP_ACK));
    // Garbage where the ClientHello belongs: the handshake fails, is counted, and the server
    // serves the next client.
    let garbage_before = stat(&n, "tls_failures");
    r.send(&[0x42; 512]).unwrap();
    // (rustls may answer with an alert first: read to the end.)
    let mut rest = Vec::new();
    let end = r.s.read_to_end(&mut rest);
    assert!(
        !matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "garbage instead of a ClientHello was not refused: {end:?}"
    );
    assert!(wait_until(Duration::from_secs(10), || stat(&n, "tls_failures") > garbage_before));
    run_ok(Command::new("nbdinfo").arg(nbds(&n, &certs.anonymous_dir)), Duration::from_secs(30));
    drop(r);
    // A client that does not trust our certificate fails its handshake; it is counted.
    let before = stat(&n, "tls_failures");
    let stranger =
        run(Command::new("nbdinfo").arg(nbds(&n, &certs.stranger_dir)), Duration::from_secs(30));
    assert!(!stranger.status.success(), "a client trusting another CA connected");
    assert!(
        wait_until(Duration::from_secs(10), || stat(&n, "tls_failures") > before),
        "{}",
        n.status()
    );
}

#[test]
fn optional_tls_with_a_client_ca_serves_plain_clients_and_certified_tls_clients_only() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path());
    let n = tls_node(&certs, "optional", true);
    // Plain still works in optional mode.
    let info = run_ok(Command::new("nbdinfo").arg(n.uri()), Duration::from_secs(30));
    assert!(info.contains("export-size"), "{info}");
    // A TLS client with a certificate the CA signed writes and reads.
    let out = qemu_io_tls(&n, &certs.client_dir, &["write -P 0xc3 0 1M", "read -P 0xc3 0 1M"]);
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("verification failed"), "{text}");
    run_ok(Command::new("nbdinfo").arg(nbds(&n, &certs.client_dir)), Duration::from_secs(30));
    // A TLS client without a certificate is refused in the handshake.
    let before = stat(&n, "tls_failures");
    let anon =
        run(Command::new("nbdinfo").arg(nbds(&n, &certs.anonymous_dir)), Duration::from_secs(30));
    assert!(!anon.status.success(), "a TLS client without a certificate got in");
    assert!(wait_until(Duration::from_secs(10), || stat(&n, "tls_failures") > before));
    let disk = std::fs::read(&n.disk).unwrap();
    assert!(disk[..1 << 20].iter().all(|b| *b == 0xc3));
}

#[test]
fn a_bad_tls_key_or_certificate_stops_the_start_with_a_message() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path());
    let cases = [
        ("world-readable key", 0o644, false, "chmod 600"),
        ("certificate that is no PEM", 0o600, true, "no usable PEM certificate"),
    ];
    for (what, mode, garble, want) in cases {
        std::fs::set_permissions(
            &certs.server_key,
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
        let saved = std::fs::read(&certs.server_cert).unwrap();
        if garble {
            std::fs::write(&certs.server_cert, b"not a certificate\n").unwrap();
        }
        let n = Node::configure(&NodeOpts {
            resource_extra: certs.nbd_section("require", false),
            ..NodeOpts::default()
        });
        let out = run(n.cli().arg("daemon").env("DUET_LOG", "warn"), Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the daemon started");
        assert!(err.contains(want) && err.contains("resource[0].nbd"), "{what}: {err}");
        assert!(TcpStream::connect(("127.0.0.1", n.port)).is_err(), "{what}: NBD is served");
        std::fs::write(&certs.server_cert, saved).unwrap();
    }
}

#[test]
fn the_allow_list_closes_other_addresses_at_accept() {
    let n = Node::start(&NodeOpts {
        size: 64 << 20,
        resource_extra: "[resource.nbd]\nallow = [\"127.0.0.2/32\"]\n".into(),
        ..NodeOpts::default()
    });
    // 127.0.0.2 negotiates and is served.
    let mut ok = Raw::connect_from(2, n.port);
    ok.flags();
    assert_eq!(ok.go("vol0"), REP_ACK);
    // 127.0.0.1 is closed before a byte is sent.
    let mut s = TcpStream::connect(("127.0.0.1", n.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 18];
    let got = s.read(&mut b);
    assert!(matches!(got, Ok(0) | Err(_)), "a refused address got {got:?}");
    assert!(wait_until(Duration::from_secs(10), || stat(&n, "clients_refused") >= 1));
    if have("nbdinfo") {
        let plain = run(Command::new("nbdinfo").arg(n.uri()), Duration::from_secs(30));
        assert!(!plain.status.success(), "nbdinfo from 127.0.0.1 got in");
    }
    assert!(n.log_text().contains("not in the allow list"), "{}", n.log_text());
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout_and_a_busy_one_stays() {
    let n = Node::start(&NodeOpts {
        size: 64 << 20,
        resource_extra: "[resource.nbd]\nidle_timeout_ms = 2000\n".into(),
        ..NodeOpts::default()
    });
    let mut idle = Raw::transmission(n.port);
    let mut busy = Raw::transmission(n.port);
    // The busy client flushes every 200 ms, well inside the timeout, until the idle one is
    // closed (bounded: 100 rounds, 20 s).
    let mut closed = false;
    idle.s.set_nonblocking(true).unwrap();
    for cookie in 0..100u64 {
        busy.request(CMD_FLUSH, 0, cookie, 0, 0, &[]).unwrap();
        let r = busy.reply().unwrap();
        assert_eq!((r.error, r.cookie), (0, cookie), "the busy client was answered");
        let mut b = [0u8; 1];
        match idle.s.read(&mut b) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => panic!("the idle client got bytes it did not ask for"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed, "the idle connection was not closed");
    // The busy one still works.
    busy.request(CMD_FLUSH, 0, 999, 0, 0, &[]).unwrap();
    assert_eq!(busy.reply().unwrap().cookie, 999);
    assert_eq!(stat(&n, "idle_disconnects"), 1, "{}", n.status());
}
