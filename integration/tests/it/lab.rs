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
    let p = Pair::start_in_lab(lab, ha, PairOpts::default().size);
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

/// The lab, for a test that cuts links with nftables (`None`: skipped, the reason printed).
fn nft_lab() -> Option<Arc<Lab>> {
    let lab = Lab::new()?;
    integration::have("nft").then(|| Arc::new(lab))
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

#[test]
fn a_vip_changed_by_adjust_moves_on_the_master_and_follows_the_next_switchover() {
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let ha = HaOpts { extra: vip_toml(&format!("{}/24", lab::VIP), ""), ..HaOpts::default() };
    let p = lab_pair(&lab, ha);
    assert!(wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP)));
    // The VIP becomes .101, on both nodes, without a restart.
    let new_vip = "10.77.0.101";
    let text = std::fs::read_to_string(&p.config).unwrap();
    let from = format!("address = \"{}/24\"", lab::VIP);
    assert!(text.contains(&from), "{text}");
    std::fs::write(&p.config, text.replace(&from, &format!("address = \"{new_vip}/24\""))).unwrap();
    for i in [1, 0] {
        let out = p.ok(i, &["adjust"]);
        assert!(out.contains("vip[0].address"), "{out}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || lab.holds(0, new_vip) && !lab.holds(0, lab::VIP)),
        "the master did not move the VIP: {}",
        p.events(0)
    );
    assert!(!lab.holds(1, new_vip), "the slave took the new VIP");
    let v = p.cluster(0);
    assert!(v["vips"].to_string().contains(new_vip), "{v}");
    // A client in its namespace reaches the export at the new address.
    let addr = SocketAddr::from(([10, 77, 0, 101], 10809));
    let l = Arc::clone(&lab);
    let reached = std::thread::spawn(move || {
        l.enter(2);
        wait_until(Duration::from_secs(10), || Raw::try_transmission_to(addr).is_some())
    });
    assert!(reached.join().unwrap(), "no NBD at the changed VIP");
    // The slave learnt it too: a switchover moves the new address.
    let out = p.ok(1, &["make-master"]);
    assert!(out.contains("running master"), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || lab.holds(1, new_vip) && !lab.holds(0, new_vip)),
        "the new VIP did not follow the switchover"
    );
    assert!(!lab.holds(1, lab::VIP), "the old VIP came back");
}

#[test]
fn sigterm_of_a_master_whose_peer_is_down_leaves_no_vip_no_moved_mac_and_no_service() {
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let vmac = "02:77:00:00:02:00";
    let extra = format!(
        "{}\n[[service]]\nname = \"marker\"\nstart = \"touch {d}/master-$DUET_NODE\"\nstop = \"rm -f {d}/master-$DUET_NODE\"\nplacement = \"master\"\n",
        vip_toml(&format!("{}/24", lab::VIP), vmac)
    );
    let own_mac = lab.mac(0, "lan0");
    let mut p = lab_pair(&lab, HaOpts { extra, ..HaOpts::default() });
    let marker = dir.path().join("master-alpha");
    assert!(
        wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP)
            && lab.mac(0, "lan0") == vmac
            && marker.exists()),
        "alpha is not the master with its VIP, MAC and service"
    );
    // Beta is gone: nobody can take over, and alpha is told to stop.
    p.kill(1);
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "dead"));
    p.stop(0);
    assert!(!lab.holds(0, lab::VIP), "the VIP outlived the daemon");
    assert_eq!(lab.mac(0, "lan0"), own_mac, "the moved MAC was not restored");
    assert!(!marker.exists(), "the master's service still runs");
    let log = p.log_text(0);
    assert!(log.contains("stopping without a handover"), "{log}");
    assert!(
        log.contains("released locally: exports closed, services stopped, VIPs removed"),
        "{log}"
    );
}

/// Samples who holds the VIP for `d`; returns how often both did.
fn both_held(lab: &Lab, addr: &str, d: Duration) -> usize {
    let end = std::time::Instant::now() + d;
    let mut both = 0;
    while std::time::Instant::now() < end {
        if lab.holds(0, addr) && lab.holds(1, addr) {
            both += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    both
}

/// nftables rules for A that drop everything on the dedicated link (replication and UDP
/// heartbeat), or only replication (TCP 7789).
fn cut_dedicated(replication_only: bool) -> String {
    let m = if replication_only { "tcp dport 7789 " } else { "" };
    let s = if replication_only { "tcp sport 7789 " } else { "" };
    format!(
        "chain in {{ type filter hook input priority -10; iifname \"ded0\" {m}drop; iifname \"ded0\" {s}drop; }}\n\
         chain out {{ type filter hook output priority -10; oifname \"ded0\" {m}drop; oifname \"ded0\" {s}drop; }}"
    )
}

#[test]
fn replication_link_cut_only_no_failover_the_slave_is_outdated_then_resyncs() {
    let Some(lab) = nft_lab() else { return };
    let ha = HaOpts { extra: vip_toml(&format!("{}/24", lab::VIP), ""), ..HaOpts::default() };
    let p = lab_pair(&lab, ha);
    let seed = 33_000;
    let w = client_writer(&lab, seed);
    assert!(w.wait_more(50, Duration::from_secs(30)));
    lab.nft(0, &cut_dedicated(true));
    assert!(
        p.wait_for(1, Duration::from_secs(20), |r| r["disk"] == "Outdated"),
        "beta was not outdated: {}\n{}",
        p.repl(1),
        p.events(0)
    );
    // No failover: alpha keeps the role and the VIP, the client keeps writing.
    assert!(w.wait_more(100, Duration::from_secs(30)), "the master stopped serving");
    assert_eq!(both_held(&lab, lab::VIP, Duration::from_secs(2)), 0);
    assert!(p.is_master(0) && !p.is_master(1));
    assert!(lab.holds(0, lab::VIP) && !lab.holds(1, lab::VIP));
    assert_eq!(p.cluster(1)["peer"], "alive", "the heartbeat still reaches the peer");
    // Heal: reconnect, resync, in sync.
    lab.nft(0, "");
    assert!(p.wait_synced(Duration::from_secs(60)), "{} / {}", p.repl(0), p.repl(1));
    let acked = w.finish();
    client_check(&lab, seed, acked);
    assert!(p.identical());
}

#[test]
fn all_links_cut_follows_the_fencing_policy_and_one_live_link_prevents_a_dual_vip() {
    let Some(lab) = nft_lab() else { return };
    // resource-only with a fence command that cannot confirm (exit 1): no takeover.
    let extra = format!(
        "{}\n[fencing]\npolicy = \"resource-only\"\nfence_command = \"exit 1\"\n",
        vip_toml(&format!("{}/24", lab::VIP), "")
    );
    let p = lab_pair(&lab, HaOpts { extra, ..HaOpts::default() });
    let cable = p.cable.as_ref().unwrap();
    // The dedicated link fails (replication and UDP heartbeat); serial still works.
    lab.nft(0, &cut_dedicated(false));
    assert_eq!(
        both_held(&lab, lab::VIP, Duration::from_secs(3)),
        0,
        "dual VIP with the serial link alive"
    );
    assert_eq!(p.cluster(1)["peer"], "alive");
    assert!(p.wait_for(1, Duration::from_secs(10), |r| r["disk"] == "Outdated"), "{}", p.events(0));
    // Serial too: every link is down. The fence command fails: beta does not take over.
    cable.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(10), || p.cluster(1)["peer"] == "dead"));
    assert_eq!(both_held(&lab, lab::VIP, Duration::from_secs(3)), 0);
    assert!(!p.is_master(1) && lab.holds(0, lab::VIP));
    // (beta's data is Outdated anyway: it would not promote even with a working fence.)
    cable.cut.store(false, std::sync::atomic::Ordering::Relaxed);
    lab.nft(0, "");
    assert!(p.wait_synced(Duration::from_secs(60)));
}

#[test]
fn partition_under_dont_care_then_heal_the_configured_master_keeps_the_vip() {
    let Some(lab) = nft_lab() else { return };
    let extra = format!(
        "{}\n[fencing]\npolicy = \"dont-care\"\n",
        vip_toml(&format!("{}/24", lab::VIP), "")
    );
    let p = lab_pair(&lab, HaOpts { extra, ..HaOpts::default() });
    let cable = p.cable.as_ref().unwrap();
    // A client that talks to the VIP (so it has a neighbour entry for it to be moved).
    let w = client_writer(&lab, 35_000);
    assert!(w.wait_more(20, Duration::from_secs(30)));
    // Cut everything at once: beta sees a dead peer with UpToDate data and takes over.
    cable.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    lab.nft(0, &cut_dedicated(false));
    assert!(
        wait_until(Duration::from_secs(15), || p.is_master(1) && lab.holds(1, lab::VIP)),
        "{}",
        p.events(1)
    );
    assert!(lab.holds(0, lab::VIP), "the partitioned master keeps its VIP (dont-care)");
    // Heal: one master remains (the configured one), beta releases, alpha re-announces.
    cable.cut.store(false, std::sync::atomic::Ordering::Relaxed);
    lab.nft(0, "");
    assert!(
        wait_until(Duration::from_secs(15), || !lab.holds(1, lab::VIP) && !p.is_master(1)),
        "beta kept the VIP after the partition healed: {}",
        p.events(1)
    );
    assert!(p.is_master(0) && lab.holds(0, lab::VIP));
    let mac_a = lab.mac(0, "lan0");
    assert!(
        wait_until(Duration::from_secs(10), || lab.client_neighbour(lab::VIP).as_deref()
            == Some(mac_a.as_str())),
        "client neighbour {:?}, alpha is {mac_a}",
        lab.client_neighbour(lab::VIP)
    );
    drop(w.finish());
    assert!(p.events(0).contains("re-announc"), "{}", p.events(0));
    // The data split: the replicator reports it and moves nothing (the operator decides).
    assert!(wait_until(Duration::from_secs(15), || p.events(0).contains("split brain")
        || p.events(1).contains("split brain")
        || p.synced()));
}

#[test]
fn ipv6_vip_with_a_moved_mac_fails_over_and_fails_back() {
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let vmac = "02:77:00:00:01:00";
    let extra = format!(
        "{}{}",
        vip_toml(&format!("{}/64", lab::VIP6), vmac),
        vip_toml(&format!("{}/24", lab::VIP), "")
    );
    let mut p = lab_pair(&lab, HaOpts { extra, failback: "auto", ..HaOpts::default() });
    // The NIC's own MAC is remembered in the state directory, one file per VIP, while the
    // virtual one is in use.
    let saved = p.dir.path().join("state").join(format!("alpha.mac-lan0-{}", lab::VIP6));
    assert!(wait_until(Duration::from_secs(5), || saved.exists()), "no saved MAC");
    let own_a = std::fs::read_to_string(&saved).unwrap().trim().to_string();
    assert_ne!(own_a, vmac, "the saved MAC is the NIC's own");
    assert!(wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP6)
        && lab.mac(0, "lan0") == vmac));
    let v6 = SocketAddr::from((lab::VIP6.parse::<std::net::Ipv6Addr>().unwrap(), 10809));
    let seed = 34_000;
    let l = Arc::clone(&lab);
    let w = Writer::start_to(v6, seed, move || l.enter(2));
    assert!(w.wait_more(50, Duration::from_secs(30)), "no writes through the IPv6 VIP");
    assert_eq!(lab.client_neighbour(lab::VIP6).as_deref(), Some(vmac));
    p.kill(0);
    assert!(
        wait_until(Duration::from_secs(20), || p.is_master(1) && lab.holds(1, lab::VIP6)),
        "{}",
        p.events(1)
    );
    assert_eq!(lab.mac(1, "lan0"), vmac, "the MAC moved with the VIP");
    assert!(w.wait_more(50, Duration::from_secs(30)), "no writes after the failover");
    // failback = auto: alpha returns, resyncs, and takes the VIP back; beta restores its MAC.
    p.start(0);
    assert!(
        wait_until(Duration::from_secs(60), || p.is_master(0)
            && lab.holds(0, lab::VIP6)
            && !lab.holds(1, lab::VIP6)),
        "no failback: {}",
        p.events(0)
    );
    assert_ne!(lab.mac(1, "lan0"), vmac, "beta kept the virtual MAC after release");
    assert!(w.wait_more(50, Duration::from_secs(30)), "no writes after the failback");
    let acked = w.finish();
    let l = Arc::clone(&lab);
    std::thread::spawn(move || {
        l.enter(2);
        check_log_with(|| Raw::try_transmission_to(v6).expect("connect"), seed, &acked);
    })
    .join()
    .unwrap();
    // alpha was killed holding the virtual MAC and took the VIP back after its restart: what it
    // saved is still the NIC's own MAC, not the virtual one it found in place.
    assert_eq!(std::fs::read_to_string(&saved).unwrap().trim(), own_a);
}

#[test]
fn ext4_through_the_vip_survives_a_sigkill_of_the_master() {
    if !(integration::have("nbdfuse")
        && integration::have("mkfs.ext4")
        && integration::have("nsenter"))
    {
        return;
    }
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let ha = HaOpts { extra: vip_toml(&format!("{}/24", lab::VIP), ""), ..HaOpts::default() };
    let mut p = lab_pair(&lab, ha);
    assert!(wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP)));
    let uri = format!("nbd://{}:10809/vol0", lab::VIP);
    let dir = p.dir.path().join("client");
    // The client (namespace C) makes an ext4 filesystem through the VIP and writes files.
    let mut disk = integration::FuseDisk::attach(&dir, &uri, Some(&lab.ns[2]));
    let (lo, mnt) = (disk.lo.clone(), disk.mnt.clone());
    integration::run_ok(
        std::process::Command::new("mkfs.ext4").args(["-q", "-F", &lo]),
        Duration::from_secs(120),
    );
    integration::run_ok(
        std::process::Command::new("mount").arg(&lo).arg(&mnt),
        Duration::from_secs(30),
    );
    for i in 0..8 {
        std::fs::write(mnt.join(format!("f{i}")), integration::random_bytes(i, 256 * 1024))
            .unwrap();
    }
    integration::run_ok(
        std::process::Command::new("sync").arg("-f").arg(mnt.join("f0")),
        Duration::from_secs(60),
    );
    for i in 8..12 {
        let _ = std::fs::write(mnt.join(format!("f{i}")), integration::random_bytes(i, 256 * 1024));
    }
    eprintln!("phase: files written on alpha");
    // The master dies with the filesystem mounted; beta takes the VIP by itself.
    p.kill(0);
    disk.detach();
    assert!(
        wait_until(Duration::from_secs(20), || p.is_master(1) && lab.holds(1, lab::VIP)),
        "{}",
        p.events(1)
    );
    // The client reattaches through the same VIP: the filesystem mounts (journal replay),
    // every synced file is intact, and e2fsck finds it clean.
    let disk = integration::FuseDisk::attach(&dir, &uri, Some(&lab.ns[2]));
    integration::run_ok(
        std::process::Command::new("mount").arg(&disk.lo).arg(&disk.mnt),
        Duration::from_secs(30),
    );
    for i in 0..8 {
        assert_eq!(
            std::fs::read(disk.mnt.join(format!("f{i}"))).unwrap(),
            integration::random_bytes(i, 256 * 1024),
            "file {i}"
        );
    }
    integration::run_ok(
        std::process::Command::new("umount").arg(&disk.mnt),
        Duration::from_secs(30),
    );
    let (clean, out) = disk.fsck();
    assert!(clean, "e2fsck -fn through the VIP on the new master: {out}");
}

#[test]
fn vip_agent_is_idempotent_reports_a_duplicate_and_names_a_missing_interface() {
    use vip::agent::{Agent, VipSpec, probe};
    let Some(lab) = Lab::new() else { return };
    let lab = Arc::new(lab);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_path_buf();
    let spec = VipSpec {
        interface: "lan0".into(),
        addrs: vec![
            (lab::VIP.parse().unwrap(), 24),
            ("10.77.0.101".parse().unwrap(), 24),
            (lab::VIP6.parse().unwrap(), 64),
        ],
        mac: Some([0x02, 0x77, 0, 0, 0, 9]),
        plan: vip::schedule::Plan {
            count: 1,
            interval: Duration::from_millis(10),
            repeat_after: Duration::ZERO,
            refresh: Duration::ZERO,
        },
    };
    let own_mac = lab.mac(0, "lan0");
    let l = Arc::clone(&lab);
    let s2 = spec.clone();
    let errors = in_ns_async(&lab, 0, move || async move {
        let a = Agent::new(Arc::new(duet::state::MacFiles::new(&state, "t"))).expect("netlink");
        // Twice: the second acquire finds everything in place and succeeds.
        let (i1, m1) = a.acquire(&s2).await.expect("acquire");
        let (i2, m2) = a.acquire(&s2).await.expect("acquire again");
        assert_eq!((i1, m1), (i2, m2));
        assert_eq!(m1, [0x02, 0x77, 0, 0, 0, 9]);
        assert!(a.holds(&s2).await.unwrap());
        assert!(l.holds(0, lab::VIP) && l.holds(0, "10.77.0.101") && l.holds(0, lab::VIP6));
        a.release(&s2).await.expect("release");
        a.release(&s2).await.expect("release again");
        assert!(!a.holds(&s2).await.unwrap());
        let missing = VipSpec { interface: "nope0".into(), ..s2.clone() };
        let e1 = a.acquire(&missing).await.expect_err("no such interface").to_string();
        let e2 = a.release(&missing).await.expect_err("no such interface").to_string();
        vec![e1, e2]
    });
    assert_eq!(lab.mac(0, "lan0"), own_mac, "the NIC's own MAC is back after release");
    for e in errors {
        assert!(e.contains("no network interface named \"nope0\""), "{e}");
    }
    // Another host answers for the VIP: the probe names it.
    let rogue_mac = lab.mac(2, "lan0");
    lab.ip(2, &["addr", "add", &format!("{}/24", lab::VIP), "dev", "lan0"]);
    let (index, mine) = {
        let out = lab.ip(0, &["-o", "link", "show", "lan0"]);
        let index: u32 = out.split(':').next().unwrap().trim().parse().unwrap();
        (index, vip::packets::parse_mac(&lab.mac(0, "lan0")).unwrap())
    };
    let l = Arc::clone(&lab);
    let found = std::thread::spawn(move || {
        l.enter(0);
        probe(index, "lan0", mine, lab::VIP.parse().unwrap(), Duration::from_millis(500))
    })
    .join()
    .unwrap()
    .expect("probe");
    assert_eq!(found.map(|m| vip::packets::mac_string(&m)), Some(rogue_mac));
}

/// Runs an async closure on a current-thread runtime in a thread inside namespace `i`.
fn in_ns_async<F, Fut, T>(lab: &Arc<Lab>, i: usize, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let l = Arc::clone(lab);
    std::thread::spawn(move || {
        l.enter(i);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap()
}

/// Health checks against real targets: the nodes ping the lab's uplink router through a raw
/// ICMP socket, the two router addresses in a `require = "all"` group, and watch their LAN
/// carrier. One router address gone: the master holds (the other answers). The master's
/// uplink cut: it hands over to the slave, which still reaches the router. The new master's
/// LAN port down on the switch: its carrier check hands back.
#[test]
fn ping_and_carrier_checks_on_real_targets_hand_over_as_their_groups_say() {
    let Some(lab) = Lab::with_router() else { return };
    let [r1, r2] = lab::ROUTER_TARGETS;
    let extra = format!(
        r#"
[[health.group]]
name = "uplink"
require = "all"

[[health.check]]
name = "router1"
kind = "ping"
target = "{r1}"
interval_ms = 200
fall = 3
rise = 2
group = "uplink"

[[health.check]]
name = "router2"
kind = "ping"
target = "{r2}"
interval_ms = 200
fall = 3
rise = 2
group = "uplink"

[[health.check]]
name = "lan"
kind = "interface"
target = "lan0"
interval_ms = 200
fall = 3
rise = 2
"#
    );
    let p = lab_pair(&lab, HaOpts { extra, ..HaOpts::default() });
    let healthy = |i: usize| p.cluster(i)["healthy"] == true;
    let changed = |i: usize, check: &str, ok: bool| {
        p.log_text(i).contains(&format!("health check changed check={check} healthy={ok}"))
    };
    assert!(healthy(0) && healthy(1));
    // One of the two uplink addresses stops answering, for both nodes: the group holds.
    lab.router_target(0, false);
    assert!(
        wait_until(Duration::from_secs(30), || changed(0, "router1", false)
            && changed(1, "router1", false)),
        "router1 never failed: {}",
        p.log_text(0)
    );
    assert!(p.is_master(0) && healthy(0) && healthy(1), "{}", p.cluster(0));
    assert!(!p.events(0).contains("local health checks fail"), "{}", p.events(0));
    // The master's own uplink goes: neither address answers it, and it hands over to the
    // slave, which still reaches router2.
    lab.uplink(0, false);
    assert!(
        wait_until(Duration::from_secs(30), || p.is_master(1) && !p.is_master(0)),
        "no handover: {}\n{}",
        p.events(0),
        p.events(1)
    );
    assert!(changed(0, "router2", false), "{}", p.log_text(0));
    let st = p.ok(0, &["status"]);
    assert!(
        st.contains(&format!(
            "health check router2 (ping {r2}, group uplink (require all)): FAILING"
        )) && st.contains("health check lan (interface lan0): ok"),
        "{st}"
    );
    let ev = p.events(0);
    assert!(ev.contains("local health checks fail") && ev.contains("handing over"), "{ev}");
    // Alpha's uplink and router1 come back: alpha is healthy again (and stays slave).
    lab.uplink(0, true);
    lab.router_target(0, true);
    assert!(wait_until(Duration::from_secs(30), || healthy(0)), "{}", p.cluster(0));
    assert!(p.wait_synced(Duration::from_secs(60)));
    // Beta's LAN port goes down on the switch: its carrier check hands the role back.
    lab.lan_port(1, false);
    assert!(
        wait_until(Duration::from_secs(30), || p.is_master(0) && !p.is_master(1)),
        "no handover on carrier loss: {}\n{}",
        p.events(0),
        p.events(1)
    );
    assert!(changed(1, "lan", false), "{}", p.log_text(1));
    assert!(healthy(0) && !healthy(1));
}

/// `duet check-config --connect` run inside each node's namespace, on its real interfaces:
/// the lab pair passes; a file whose VIP is off the LAN's subnet and whose heartbeat peer is
/// off the dedicated link's is named on both counts.
#[test]
fn the_connection_test_reads_the_real_interfaces_and_names_a_vip_and_a_heartbeat_peer_off_their_subnets()
 {
    let Some(lab) = Lab::new() else { return };
    let ha = HaOpts { extra: vip_toml(&format!("{}/24", lab::VIP), ""), ..HaOpts::default() };
    let p = lab_pair(&lab, ha);
    assert!(wait_until(Duration::from_secs(5), || lab.holds(0, lab::VIP)));
    let test = |i: usize, config: &std::path::Path, wait: &str| {
        let o = integration::run(
            lab.exec(i, integration::duet_bin().to_str().unwrap())
                .arg("--config")
                .arg(config)
                .args(["--node", p.n[i].name, "check-config", "--connect", "--wait", wait]),
            Duration::from_secs(60),
        );
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let vip_row = format!("vip {}/24 subnet", lab::VIP);
    for i in 0..2 {
        let (code, t) = test(i, p.config_of(i), "10");
        assert_eq!(code, Some(0), "{t}");
        let lan = lab::LAN[i];
        let vip = t.lines().find(|l| l.starts_with(&vip_row)).unwrap_or_default();
        // (The master holds the VIP on lan0 too: its own address is what counts.)
        assert!(vip.contains(&format!("ok    in {lan}/24 on lan0")), "{t}");
        let hb = t.lines().find(|l| l.starts_with("heartbeat link 0 subnet")).unwrap_or_default();
        assert!(hb.contains("/30 on ded0"), "{t}");
    }
    // Who answers for each VIP, heard from beta with real ARP probes: alpha (the master) for
    // the VIP; the client for an address it took, which a second VIP names (a conflict); nobody
    // for a third.
    lab.ip(2, &["addr", "add", "10.77.0.150/24", "dev", "lan0"]);
    let beta_text = std::fs::read_to_string(p.config_of(1)).unwrap();
    let more = p.dir.path().join("beta-more-vips.toml");
    std::fs::write(
        &more,
        format!(
            "{beta_text}\n{}\n{}",
            vip_toml("10.77.0.150/24", ""),
            vip_toml("10.77.0.151/24", "")
        ),
    )
    .unwrap();
    let (code, t) = test(1, &more, "0");
    assert_eq!(code, Some(1), "{t}");
    let row =
        |check: &str| t.lines().find(|l| l.starts_with(check)).unwrap_or_default().to_string();
    let mac_a = lab.mac(0, "lan0");
    assert!(
        row(&format!("vip {} on the LAN", lab::VIP))
            .contains(&format!("ok    answered by {mac_a} (alpha, the master)")),
        "{t}"
    );
    let mac_c = lab.mac(2, "lan0");
    assert!(
        row("vip 10.77.0.150 on the LAN")
            .contains(&format!("FAIL  another host answers for it ({mac_c})")),
        "{t}"
    );
    assert!(row("vip 10.77.0.151 on the LAN").contains("ok    nobody answers for it: free"), "{t}");

    // Alpha's file as someone got it wrong.
    let text = std::fs::read_to_string(p.config_of(0)).unwrap();
    let hb_peer = format!("peer = \"{}:694\"", lab::DEDICATED[1]);
    assert!(text.contains(&hb_peer), "{text}");
    let wrong = text
        .replace(&format!("address = \"{}/24\"", lab::VIP), "address = \"10.99.0.100/24\"")
        .replacen(&hb_peer, &format!("peer = \"{}:694\"", lab::LAN[1]), 1);
    let bad = p.dir.path().join("alpha-wrong.toml");
    std::fs::write(&bad, wrong).unwrap();
    let (code, t) = test(0, &bad, "0");
    assert_eq!(code, Some(1), "{t}");
    let vip = t.lines().find(|l| l.starts_with("vip 10.99.0.100/24 subnet")).unwrap_or_default();
    assert!(vip.contains("FAIL  outside every subnet of lan0"), "{t}");
    assert!(vip.contains(&format!("{}/24", lab::LAN[0])), "{t}");
    let hb = t.lines().find(|l| l.starts_with("heartbeat link 0 subnet")).unwrap_or_default();
    assert!(
        hb.contains(&format!(
            "FAIL  the peer {}:694 is outside {}/30 (ded0)",
            lab::LAN[1],
            lab::DEDICATED[0]
        )),
        "{t}"
    );
}
