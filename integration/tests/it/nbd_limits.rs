//! NBD clients that hold on: one that stops reading its replies, and a crowd of idle
//! connections from one address. Neither may hold up SIGTERM or a switchover, or lock others out.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::rawnbd::Raw;
use integration::{Node, NodeOpts, wait_until};
use replicator::nbd::proto::CMD_READ;
use replicator::nbd::server::{MAX_PER_SOURCE, SHUTDOWN_GRACE};

/// A client that asks for 256 MiB of reads and reads none of the replies: the daemon's socket
/// fills and its reply writes block.
fn stuck_client(port: u16) -> Raw {
    let mut r = Raw::transmission(port);
    for i in 0..256u64 {
        r.request(CMD_READ, 0, i, (i % 64) << 20, 1 << 20, &[]).unwrap();
    }
    r
}

#[test]
fn a_client_that_reads_nothing_does_not_hold_up_sigterm() {
    let mut n = Node::start(&NodeOpts::default());
    let _stuck = stuck_client(n.port);
    // The daemon has taken reads and sits with replies the client does not read.
    assert!(
        wait_until(Duration::from_secs(20), || n.status()["resources"][0]["stats"]["reads"]
            .as_u64()
            .unwrap_or(0)
            >= 8),
        "{}",
        n.status()
    );
    let t = Instant::now();
    let st = n.terminate();
    let took = t.elapsed();
    assert!(st.success(), "{st:?}");
    assert!(took < SHUTDOWN_GRACE * 3, "SIGTERM took {took:?} with a client that reads nothing");
    assert!(n.log_text().contains("read none of its replies"), "{}", n.log_text());
}

#[test]
fn a_client_that_reads_nothing_does_not_hold_up_make_slave() {
    let ha = HaOpts { serial: false, ..HaOpts::default() };
    let mut p = Pair::configure(&PairOpts { ha: Some(ha), ..PairOpts::default() });
    p.start(0);
    p.start(1);
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"));
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)));
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)));
    let _stuck = stuck_client(p.n[0].nbd_port);
    assert!(wait_until(Duration::from_secs(20), || p.res(0)["stats"]["reads"]
        .as_u64()
        .unwrap_or(0)
        >= 8));
    let t = Instant::now();
    p.ok(0, &["make-slave"]);
    let took = t.elapsed();
    assert!(wait_until(Duration::from_secs(20), || p.is_master(1)), "{}", p.cluster(1));
    assert!(took < Duration::from_secs(30), "make-slave took {took:?}");
}

#[test]
fn idle_connections_from_one_address_do_not_lock_out_another() {
    let n = Node::start(&NodeOpts::default());
    // 200 connections from 127.0.0.1 that never say a word.
    let idle: Vec<TcpStream> =
        (0..200).filter_map(|_| TcpStream::connect(("127.0.0.1", n.port)).ok()).collect();
    assert!(idle.len() >= 100, "only {} connected", idle.len());
    let negotiating =
        || n.status()["resources"][0]["stats"]["clients_negotiating"].as_u64().unwrap_or(u64::MAX);
    assert!(
        wait_until(Duration::from_secs(20), || negotiating() == MAX_PER_SOURCE as u64),
        "{}",
        n.status()
    );
    // A client from another address negotiates and reads.
    let mut other = Raw::connect_from(2, n.port);
    other.flags();
    assert_eq!(other.go("vol0"), replicator::nbd::proto::REP_ACK);
    other.request(CMD_READ, 0, 1, 0, 4096, &[]).unwrap();
    assert_eq!(other.reply().unwrap().error, 0);
    // duet status says who sits in negotiation.
    let text =
        String::from_utf8(integration::run(n.cli().arg("status"), Duration::from_secs(10)).stdout)
            .unwrap();
    assert!(text.contains(&format!("{MAX_PER_SOURCE} negotiating")), "{text}");
    drop(idle);
}

/// CPU seconds (user + system) the process has used, from /proc/PID/stat.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// Every descriptor the daemon may open is taken by a flood of NBD and metrics connections:
/// its accept loops pause instead of spinning, and once the flood ends it serves again.
#[test]
fn a_connection_flood_at_the_descriptor_limit_neither_spins_nor_wedges_the_daemon() {
    if !integration::have("prlimit") {
        return;
    }
    let n = Node::start(&NodeOpts { size: 64 << 20, nofile: Some(64), ..NodeOpts::default() });
    let pid = n.pid();
    let mut flood = Vec::new();
    for port in [n.port, n.metrics_port] {
        for _ in 0..60 {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                flood.push(s);
            }
        }
    }
    // The daemon runs out of descriptors: it says so.
    assert!(
        wait_until(Duration::from_secs(20), || n.log_text().contains("Too many open files")),
        "{}",
        n.log_text()
    );
    // While the flood holds, the accept loops cost next to nothing (a spin burns a whole core:
    // 2 CPU seconds of the 2 s below).
    let before = cpu_seconds(pid);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.5, "the daemon used {used:.2} CPU seconds in 2 s at EMFILE");
    drop(flood);
    // And it serves again: NBD, metrics and the control socket.
    assert!(
        wait_until(Duration::from_secs(30), || Raw::try_transmission(n.port).is_some_and(
            |mut r| {
                r.request(CMD_READ, 0, 7, 0, 4096, &[]).is_ok()
                    && r.reply().is_ok_and(|x| x.error == 0)
            }
        )),
        "NBD did not come back: {}",
        n.log_text()
    );
    assert!(n.status()["resources"][0]["stats"]["reads"].as_u64().unwrap_or(0) >= 1);
    let mut m = TcpStream::connect(("127.0.0.1", n.metrics_port)).unwrap();
    m.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(&mut m, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = std::io::Read::read_to_string(&mut m, &mut body);
    assert!(body.contains("duet_nbd_reads_total"), "{body}");
}
