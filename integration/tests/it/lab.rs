//! The network-namespace lab: real daemons in namespaces A and B, a client in C reaching the
//! volume through the VIP, replication and the UDP heartbeat on a dedicated link, the serial
//! heartbeat over a pty cable. Failover and switchover as the client sees them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use integration::lab::{self, Lab};
use integration::pair::{HaOpts, Pair, PairOpts};
use integration::rawnbd::Raw;
use integration::wait_until;

use crate::writer::{Writer, check_log_with};

fn vip_toml(address: &str, mac: &str) -> String {
    format!(
        r#"
[[vip]]
interface = "lan0"
address = "{address}"
mac = "{mac}"
announce_count = 3
announce_interval_ms = 100
announce_repeat_after_ms = 1000
"#
    )
}

/// A lab pair with alpha the running master and in sync.
fn lab_pair(lab: &Lab, ha: HaOpts) -> Pair {
    let o = PairOpts {
        ha: Some(ha),
        netns: Some([lab.ns[0].clone(), lab.ns[1].clone()]),
        ..PairOpts::default()
    };
    let mut p = Pair::configure(&o);
    p.start(0);
    p.start(1);
    assert!(
        wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"),
        "{}",
        p.log_text(0)
    );
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)), "{} / {}", p.repl(0), p.repl(1));
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)));
    p
}

fn vip_addr() -> SocketAddr {
    SocketAddr::from(([10, 77, 0, 100], 10809))
}

/// A writer in the client namespace, through the VIP.
fn client_writer(lab: &Arc<Lab>, seed: u64) -> Writer {
    let l = Arc::clone(lab);
    Writer::start_to(vip_addr(), seed, move || l.enter(2))
}

/// Checks the write log through the VIP from the client namespace.
fn client_check(lab: &Arc<Lab>, seed: u64, acked: Vec<u64>) {
    let l = Arc::clone(lab);
    std::thread::spawn(move || {
        l.enter(2);
        check_log_with(
            || Raw::try_transmission_to(vip_addr()).expect("connect through the VIP"),
            seed,
            &acked,
        );
    })
    .join()
    .expect("log check");
}

#[test]
fn sigkill_of_the_master_the_client_follows_the_vip_to_the_new_master() {
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let ha = HaOpts { extra: vip_toml(&format!("{}/24", lab::VIP), ""), ..HaOpts::default() };
    let mut p = lab_pair(&lab, ha);
    assert!(
        wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP)),
        "VIP not on A: {}",
        p.events(0)
    );
    assert!(!lab.holds(1, lab::VIP), "VIP on the slave too");
    let (mac_a, mac_b) = (lab.mac(0, "lan0"), lab.mac(1, "lan0"));
    let seed = 31_000;
    let w = client_writer(&lab, seed);
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes through the VIP");
    assert_eq!(lab.client_neighbour(lab::VIP).as_deref(), Some(mac_a.as_str()));
    p.kill(0);
    assert!(
        wait_until(Duration::from_secs(20), || p.is_master(1) && lab.holds(1, lab::VIP)),
        "beta did not take the VIP: {}",
        p.events(1)
    );
    // The client's neighbour entry follows the gratuitous ARP, and its writes go on.
    assert!(
        wait_until(Duration::from_secs(10), || lab.client_neighbour(lab::VIP).as_deref()
            == Some(mac_b.as_str())),
        "client still sends to {:?}, beta is {mac_b}",
        lab.client_neighbour(lab::VIP)
    );
    assert!(
        w.wait_more(100, Duration::from_secs(30)),
        "no writes through the VIP after the failover"
    );
    let acked = w.finish();
    client_check(&lab, seed, acked);
    // alpha restarts: as a slave it makes sure it holds no VIP (a crash left it configured).
    p.start(0);
    assert!(
        wait_until(Duration::from_secs(10), || !lab.holds(0, lab::VIP)),
        "stale VIP on A after restart"
    );
    assert!(p.wait_synced(Duration::from_secs(60)));
    assert!(lab.holds(1, lab::VIP));
}

#[test]
fn make_master_moves_the_vip_and_the_old_master_releases_it() {
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let ha = HaOpts { extra: vip_toml(&format!("{}/24", lab::VIP), ""), ..HaOpts::default() };
    let p = lab_pair(&lab, ha);
    assert!(wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP)));
    let seed = 32_000;
    let w = client_writer(&lab, seed);
    assert!(w.wait_more(100, Duration::from_secs(30)));
    let out = p.ok(1, &["make-master"]);
    assert!(out.contains("running master"), "{out}");
    assert!(lab.holds(1, lab::VIP) && !lab.holds(0, lab::VIP), "the VIP did not move");
    let mac_b = lab.mac(1, "lan0");
    assert!(wait_until(Duration::from_secs(10), || lab.client_neighbour(lab::VIP).as_deref()
        == Some(mac_b.as_str())));
    assert!(w.wait_more(100, Duration::from_secs(30)), "no writes after the switchover");
    let acked = w.finish();
    client_check(&lab, seed, acked);
    assert!(p.wait_synced(Duration::from_secs(30)));
    assert!(p.identical());
}
