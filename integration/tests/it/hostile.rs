//! Acceptance 3: malformed and hostile input. Each case gets the right NBD error (and the
//! connection stays usable) or a closed connection; afterwards real clients still work against the
//! same daemon, and the daemon counted what happened.

use std::process::Command;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use integration::rawnbd::Raw;
use integration::{Node, NodeOpts, have, qemu_io, random_bytes, run_ok};
use replicator::nbd::proto::*;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

fn real_clients_still_work(n: &Node) {
    if have("qemu-io") {
        qemu_io(&n.uri(), &["write -P 0x61 0 64k", "read -P 0x61 0 64k"]);
    }
    if have("nbdinfo") {
        run_ok(Command::new("nbdinfo").arg(n.uri()), Duration::from_secs(60));
    }
}

#[test]
fn garbage_handshakes_close_only_that_connection() {
    let n = Node::start(&NodeOpts::default());
    // TCP health checks (connect, hang up) are not protocol errors and log nothing loud.
    for _ in 0..3 {
        drop(std::net::TcpStream::connect(("127.0.0.1", n.port)).unwrap());
        drop(Raw::connect(n.port));
    }
    assert!(integration::wait_until(
        Duration::from_secs(5),
        || n.status()["resources"][0]["stats"]["clients_total"] == 0
    ));
    assert_eq!(n.status()["resources"][0]["stats"]["protocol_errors"], 0);
    assert!(!n.log_text().contains("WARN"), "{}", n.log_text());
    // Random bytes instead of client flags.
    let mut r = Raw::connect(n.port);
    r.send(&random_bytes(7, 300)).unwrap();
    assert!(r.closed_by_server());
    // Flags without FIXED_NEWSTYLE, and unknown flag bits.
    for flags in [0u32, 2, 0x80] {
        let mut r = Raw::connect(n.port);
        r.send(&flags.to_be_bytes()).unwrap();
        assert!(r.closed_by_server(), "flags {flags:#x}");
    }
    // An option with a bad magic.
    let mut r = Raw::connect(n.port);
    r.flags();
    r.send(&[0xde; 16]).unwrap();
    assert!(r.closed_by_server());
    // An option that claims a gigabyte of data.
    let mut r = Raw::connect(n.port);
    r.flags();
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(OPT_GO);
    b.put_u32(1 << 30);
    r.send(&b).unwrap();
    assert!(r.closed_by_server());
    // Half an option, then hang up.
    let mut r = Raw::connect(n.port);
    r.flags();
    r.send(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(r);
    real_clients_still_work(&n);
    let s = n.status();
    assert!(s["resources"][0]["stats"]["protocol_errors"].as_u64().unwrap() >= 6, "{s}");
}

#[test]
fn unknown_options_and_exports_keep_negotiating() {
    let n = Node::start(&NodeOpts::default());
    let mut r = Raw::connect(n.port);
    r.flags();
    r.option(0x4242, b"whatever");
    let rep = r.opt_reply();
    assert_eq!((rep.option, rep.kind), (0x4242, REP_ERR_UNSUP));
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().kind, REP_ERR_UNSUP);
    assert_eq!(r.go("nope"), REP_ERR_UNKNOWN);
    // Malformed GO data.
    r.option(OPT_GO, &[0, 0, 0, 200, b'x']);
    assert_eq!(r.opt_reply().kind, REP_ERR_INVALID);
    // Block status context before structured replies.
    r.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.opt_reply().kind, REP_ERR_INVALID);
    // Negotiation still works on the same connection.
    assert_eq!(r.go("vol0"), REP_ACK);
    r.request(CMD_READ, 0, 1, 0, 512, &[]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0);
    r.read_data(512);
    // EXPORT_NAME of an unknown export: no error reply exists, the server closes.
    let mut r = Raw::connect(n.port);
    r.flags();
    r.option(OPT_EXPORT_NAME, b"nope");
    assert!(r.closed_by_server());
    if have("nbdinfo") {
        let o = integration::run(
            Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/nope", n.port)),
            Duration::from_secs(60),
        );
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(
            err.contains("unknown")
                || err.contains("no such")
                || err.contains("not found")
                || err.contains("does not exist"),
            "{err}"
        );
    }
    real_clients_still_work(&n);
}

#[test]
fn bad_requests_get_errors_and_the_connection_stays_usable() {
    let n = Node::start(&NodeOpts { size: 64 << 20, ..NodeOpts::default() });
    let size = 64u64 << 20;
    let mut r = Raw::transmission(n.port);
    let mut cookie = 0;
    let mut expect =
        |r: &mut Raw, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8], want: u32| {
            cookie += 1;
            r.request(kind, flags, cookie, offset, len, payload).unwrap();
            let rep = r.reply().unwrap();
            assert_eq!(rep.cookie, cookie);
            assert_eq!(rep.error, want, "kind {kind} flags {flags:#x} offset {offset} len {len}");
            if want == 0 && kind == CMD_READ {
                r.read_data(len as usize);
            }
        };
    expect(&mut r, CMD_READ, 0, size, 1, &[], EINVAL); // past the end
    expect(&mut r, CMD_READ, 0, size - 1, 2, &[], EINVAL); // straddles the end
    expect(&mut r, CMD_READ, 0, u64::MAX - 10, 100, &[], EINVAL); // offset overflow
    expect(&mut r, CMD_READ, 0, 0, 0, &[], EINVAL); // zero length
    expect(&mut r, CMD_READ, 0, 0, (32 << 20) + 1, &[], EINVAL); // over the maximum payload
    expect(&mut r, CMD_WRITE, 0, size - 2, 4, &[1, 2, 3, 4], ENOSPC); // past the end, payload consumed
    expect(&mut r, CMD_TRIM, 0, size, 4096, &[], EINVAL);
    expect(&mut r, CMD_WRITE_ZEROES, 0, size, 4096, &[], ENOSPC);
    expect(&mut r, 42, 0, 0, 1, &[], EINVAL); // unknown command
    expect(&mut r, CMD_READ, 1 << 9, 0, 1, &[], EINVAL); // unknown flag
    expect(&mut r, CMD_READ, CMD_FLAG_DF, 0, 1, &[], EINVAL); // DF without structured replies
    expect(&mut r, CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 3, b"abc", EINVAL); // flag of another command
    expect(&mut r, CMD_BLOCK_STATUS, 0, 0, 4096, &[], EINVAL); // no context negotiated
    // An oversized write (33 MiB) is refused, its payload skipped, and the stream stays in step.
    let big = vec![0x5au8; (33 << 20) as usize];
    expect(&mut r, CMD_WRITE, 0, 0, big.len() as u32, &big, EINVAL);
    // Good requests still work on the same connection, and nothing bad reached the disk.
    expect(&mut r, CMD_WRITE, CMD_FLAG_FUA, 4096, 4, b"duet", 0);
    expect(&mut r, CMD_FLUSH, 0, 0, 0, &[], 0);
    cookie += 1;
    r.request(CMD_READ, 0, cookie, 4096, 4, &[]).unwrap();
    assert_eq!(r.reply().unwrap().error, 0);
    assert_eq!(r.read_data(4), b"duet");
    let raw = std::fs::read(&n.disk).unwrap();
    assert!(raw[..4096].iter().all(|&b| b == 0), "refused writes left no trace");
    assert_eq!(&raw[4096..4100], b"duet");
    let s = n.status();
    assert_eq!(s["resources"][0]["stats"]["request_errors"], 14, "{s}");
    real_clients_still_work(&n);
}

#[test]
fn garbage_and_truncated_request_streams_close_the_connection() {
    let n = Node::start(&NodeOpts::default());
    // Random bytes after GO.
    let mut r = Raw::transmission(n.port);
    r.send(&random_bytes(3, 4096)).unwrap();
    assert!(r.closed_by_server());
    // A valid request followed by a bad magic: the first is answered, then the close.
    let mut r = Raw::transmission(n.port);
    r.request(CMD_FLUSH, 0, 9, 0, 0, &[]).unwrap();
    r.send(&[0u8; 28]).unwrap();
    assert_eq!(r.reply().unwrap().cookie, 9);
    assert!(r.closed_by_server());
    // A write whose payload never comes (half sent, then hang up).
    let mut r = Raw::transmission(n.port);
    r.request(CMD_WRITE, 0, 1, 0, 8192, &[1u8; 100]).unwrap();
    drop(r);
    // Half a header.
    let mut r = Raw::transmission(n.port);
    r.send(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(r);
    // A write payload far above the maximum: closed as abusive rather than read.
    let mut r = Raw::transmission(n.port);
    r.request(CMD_WRITE, 0, 1, 0, 1 << 30, &[]).unwrap();
    assert!(r.closed_by_server());
    // Many at once: the daemon keeps serving.
    let hostile: Vec<Raw> = (0..20).map(|_| Raw::connect(n.port)).collect();
    real_clients_still_work(&n);
    drop(hostile);
    assert!(integration::wait_until(Duration::from_secs(10), || {
        n.status()["resources"][0]["stats"]["protocol_errors"].as_u64().unwrap() >= 5
    }));
    let raw = std::fs::read(&n.disk).unwrap();
    assert!(raw[65536..].iter().all(|&b| b == 0), "nothing from the hostile streams was written");
}
