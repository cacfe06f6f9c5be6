//! SIGTERM shuts down gracefully: every request the server read is answered (done, or refused
//! with NBD_ESHUTDOWN), every acknowledged write is on disk, the daemon exits 0 and removes its
//! control socket; an idle client does not hold the daemon up forever.

use std::time::Duration;

use integration::rawnbd::Raw;
use integration::{Node, NodeOpts, random_bytes, wait_until};
use replicator::nbd::proto::*;

const ESHUTDOWN: u32 = 108;

#[test]
fn sigterm_answers_in_flight_and_keeps_acknowledged_writes() {
    let mut n = Node::start(&NodeOpts { size: 64 << 20, ..NodeOpts::default() });
    let mut r = Raw::transmission(n.port);
    let count = 400u64;
    let block = |i: u64| random_bytes(i + 100, 64 * 1024);
    // Pipeline many 64 KiB writes without waiting for replies.
    let mut sender = r.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..count {
            let mut b = bytes::BytesMut::new();
            encode_request(
                &mut b,
                &RequestHeader {
                    flags: 0,
                    kind: CMD_WRITE,
                    cookie: i,
                    offset: i * 65536 % (64 << 20),
                    len: 65536,
                },
            );
            b.extend_from_slice(&block(i));
            if sender.write_all(&b).is_err() {
                return; // the server closed after its grace period
            }
        }
    });
    // Once the first reply is in, the server is busy with the stream: stop it now.
    let first = r.reply().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(n.pid()), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let mut acked = vec![first.cookie];
    let mut refused = 0;
    let mut seen = std::collections::BTreeSet::from([first.cookie]);
    assert_eq!(first.error, 0);
    while let Ok(rep) = r.reply() {
        assert!(seen.insert(rep.cookie), "cookie {} answered twice", rep.cookie);
        match rep.error {
            0 => acked.push(rep.cookie),
            ESHUTDOWN => refused += 1,
            e => panic!("unexpected error {e} for cookie {}", rep.cookie),
        }
        if seen.len() as u64 == count {
            break;
        }
    }
    // Told to shut down, a client disconnects: do so (soft disconnect).
    let _ = r.request(CMD_DISC, 0, 0, 0, 0, &[]);
    drop(r);
    let _ = writer.join();
    let status = n.terminate_wait();
    assert!(status.success(), "daemon exit status {status}\n{}", n.log_text());
    assert!(!n.socket.exists(), "control socket removed");
    assert!(n.log_text().contains("stopped cleanly"));
    // Every acknowledged write is on disk (each block has a distinct offset: count*64K < 64 MiB).
    let disk = std::fs::read(&n.disk).unwrap();
    for c in &acked {
        let off = (*c * 65536) as usize;
        assert!(disk[off..off + 65536] == block(*c)[..], "acknowledged write {c} is missing");
    }
    eprintln!("{} writes acknowledged, {refused} refused with ESHUTDOWN", acked.len());
}

#[test]
fn idle_clients_do_not_hold_shutdown_forever() {
    let mut n = Node::start(&NodeOpts::default());
    let mut idle = Raw::transmission(n.port);
    let _negotiating = Raw::connect(n.port);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(n.pid()), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    // A request sent while stopping is refused with ESHUTDOWN, not dropped.
    assert!(wait_until(Duration::from_secs(10), || n.log_text().contains("shutting down")));
    idle.request(CMD_READ, 0, 77, 0, 4096, &[]).unwrap();
    let rep = idle.reply().unwrap();
    assert_eq!((rep.cookie, rep.error), (77, ESHUTDOWN));
    // Without a disconnect from us, the grace period ends it.
    assert!(idle.closed_by_server());
    assert!(n.terminate_wait().success());
}
