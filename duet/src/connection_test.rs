//! `duet check-config --connect`: the connection test an operator runs before trusting a pair
//! (Synology and Thecus run one before pairing). Pure judging over what the CLI gathered: the
//! configuration, this host's interface addresses and the local daemon's status, whose live
//! replication session (or the refusal that ended its last handshake) and heartbeat links say
//! what the peer answered. The daemons must run on both nodes: the test is of the pair as
//! configured, through the same sockets, secret and handshake it will use.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::Config;
use crate::config::LinkKind;
use crate::status::NodeStatus;
use replicator::nbd::server::Network;

/// One address of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub interface: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// This host's interface addresses (IPv4 and IPv6).
pub fn local_addrs() -> std::io::Result<Vec<IfAddr>> {
    let mut out = Vec::new();
    for i in nix::ifaddrs::getifaddrs()? {
        let (Some(a), Some(m)) = (i.address, i.netmask) else { continue };
        let (addr, prefix) = if let (Some(a), Some(m)) = (a.as_sockaddr_in(), m.as_sockaddr_in()) {
            (IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones())
        } else if let (Some(a), Some(m)) = (a.as_sockaddr_in6(), m.as_sockaddr_in6()) {
            (IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones())
        } else {
            continue;
        };
        out.push(IfAddr {
            interface: i.interface_name,
            addr,
            prefix: u8::try_from(prefix).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Whether `a` lies in `net/prefix` (the NBD allow-list's [`Network`] test; a prefix longer
/// than the family's is no network).
pub fn in_subnet(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let width = if net.is_ipv4() { 32 } else { 128 };
    prefix <= width
        && a.is_ipv4() == net.is_ipv4()
        && Network { addr: net, len: prefix }.contains(a)
}

/// What an ARP probe for a VIP heard, by VIP address: the MAC of a host that answered, none,
/// or why it could not be sent.
pub type Probes = Vec<(IpAddr, Result<Option<[u8; 6]>, String>)>;

/// ARP-probes each IPv4 VIP this node does not hold on its interface (300 ms each): whether
/// some host answers for it. Needs root (a raw socket). IPv6 VIPs are not probed.
pub async fn probe_vips(cfg: &Config, node: &str, addrs: &[IfAddr]) -> Probes {
    let mut out = Vec::new();
    let macs = std::sync::Arc::new(crate::state::MacFiles::new(&cfg.cluster.state_dir, node));
    let agent = vip::agent::Agent::new(macs);
    for v in &cfg.vip {
        let IpAddr::V4(ip) = v.address.addr else { continue };
        if addrs.iter().any(|a| a.interface == v.interface && a.addr == v.address.addr) {
            continue; // held here: this node answers for it
        }
        let r = match &agent {
            Err(e) => Err(e.to_string()),
            Ok(agent) => match agent.link(&v.interface).await {
                Err(e) => Err(e.to_string()),
                Ok((index, mac)) => {
                    let (name, mine) = (v.interface.clone(), v.mac.map_or(mac, |m| m.0));
                    tokio::task::spawn_blocking(move || {
                        let wait = std::time::Duration::from_millis(300);
                        vip::agent::probe(index, &name, mine, ip, wait)
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                }
            },
        };
        out.push((v.address.addr, r));
    }
    out
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn row(check: impl Into<String>, ok: bool, detail: impl Into<String>) -> Row {
    Row { check: check.into(), ok, detail: detail.into() }
}

/// Every check, in the order the table shows them. `status`: the local daemon's, or why it
/// could not be had.
pub fn judge(
    cfg: &Config,
    node: &str,
    addrs: &[IfAddr],
    probes: &Probes,
    status: Result<&NodeStatus, String>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let Some(peer) = cfg.peer_of(node).map(str::to_string) else {
        rows.push(row("peer", false, "this configuration has no second node: nothing to test"));
        return rows;
    };
    local_addresses(cfg, node, addrs, &mut rows);
    answered(&peer, probes, status.as_ref().ok().copied(), &mut rows);
    let s = match status {
        Ok(s) => s,
        Err(why) => {
            rows.push(row(
                "local daemon",
                false,
                format!("{why}: start it (on both nodes) and run the test again"),
            ));
            return rows;
        }
    };
    for r in &cfg.resource {
        replication(r, &peer, s, &mut rows);
    }
    configuration(cfg, &peer, s, &mut rows);
    heartbeat(cfg, node, s, &mut rows);
    rows
}

/// Both files, key by key, as the last handshake compared them.
fn configuration(cfg: &Config, peer: &str, s: &NodeStatus, rows: &mut Vec<Row>) {
    let Some(x) = s.resources.iter().find_map(|r| r.replication.as_ref()) else { return };
    let name = "configuration";
    rows.push(match &x.config_differs {
        Some(d) if d.is_empty() => {
            row(name, true, format!("the same as {peer}'s ({} keys compared)", cfg.keys.len()))
        }
        Some(d) => row(
            name,
            false,
            format!("{peer}'s file differs in: {}; use the same file on both nodes", d.join(", ")),
        ),
        None if x.connection.in_session() => row(
            name,
            true,
            format!("not compared: {peer} runs a release that does not compare configurations"),
        ),
        None => row(name, false, "unknown: no handshake with the peer got this far"),
    });
}

/// The addresses this node's configuration names are this host's, and each peer it talks to
/// and each VIP sits in the subnet of the interface that reaches it.
fn local_addresses(cfg: &Config, node: &str, addrs: &[IfAddr], rows: &mut Vec<Row>) {
    let on_host = |ip: IpAddr| ip.is_unspecified() || addrs.iter().any(|a| a.addr == ip);
    for r in &cfg.resource {
        if let Some(a) = r.on.get(node).and_then(|o| o.replication_address) {
            let ok = on_host(a.ip());
            let detail = if ok {
                format!("{a} is an address of this host")
            } else {
                format!("{a} is no address of this host: the peer cannot reach it here")
            };
            rows.push(row(format!("replication address ({})", r.name), ok, detail));
        }
    }
    for (i, l) in cfg.heartbeat.link.iter().enumerate() {
        if l.kind != LinkKind::Udp {
            continue;
        }
        let Some((bind, to)) = l.on.get(node).and_then(crate::config::LinkOn::udp) else {
            continue;
        };
        let name = format!("heartbeat link {i} subnet");
        let local: Vec<&IfAddr> = addrs.iter().filter(|a| a.addr == bind.ip()).collect();
        if bind.ip().is_unspecified() {
            let reach = addrs.iter().find(|a| in_subnet(to.ip(), a.addr, a.prefix));
            rows.push(match reach {
                Some(a) => row(name, true, format!("{to} is on {} ({}/{})", a.interface, a.addr, a.prefix)),
                None => row(name, false, format!("{to} is in no subnet of this host's interfaces: the frames would go through a router, or nowhere")),
            });
        } else if local.is_empty() {
            rows.push(row(
                name,
                false,
                format!("bind address {} is no address of this host", bind.ip()),
            ));
        } else if let Some(a) = local.iter().find(|a| in_subnet(to.ip(), a.addr, a.prefix)) {
            rows.push(row(
                name,
                true,
                format!("{to} is in {}/{} on {}", a.addr, a.prefix, a.interface),
            ));
        } else {
            let a = local[0];
            rows.push(row(
                name,
                false,
                format!(
                    "the peer {to} is outside {}/{} ({}), the subnet of bind address {}",
                    a.addr,
                    a.prefix,
                    a.interface,
                    bind.ip()
                ),
            ));
        }
    }
    for v in &cfg.vip {
        let name = format!("vip {}/{} subnet", v.address.addr, v.address.len);
        let on_if: Vec<&IfAddr> = addrs
            .iter()
            .filter(|a| a.interface == v.interface && a.addr != v.address.addr)
            .collect();
        if !addrs.iter().any(|a| a.interface == v.interface) {
            rows.push(row(
                name,
                false,
                format!("interface {} does not exist or has no address here", v.interface),
            ));
        } else if let Some(a) = on_if.iter().find(|a| in_subnet(v.address.addr, a.addr, a.prefix)) {
            rows.push(row(name, true, format!("in {}/{} on {}", a.addr, a.prefix, v.interface)));
        } else {
            rows.push(row(
                name,
                false,
                format!(
                    "outside every subnet of {}: clients on that LAN would not reach it (addresses there: {})",
                    v.interface,
                    on_if.iter().map(|a| format!("{}/{}", a.addr, a.prefix)).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
}

/// Who answers for each VIP this node does not hold: the peer, when it is the master that holds
/// it; nobody, when nobody does; anyone else is an address conflict.
fn answered(peer: &str, probes: &Probes, s: Option<&NodeStatus>, rows: &mut Vec<Row>) {
    for (ip, r) in probes {
        let name = format!("vip {ip} on the LAN");
        let holder = s.and_then(|s| s.ha.as_ref()).and_then(|h| {
            h.vips.iter().find(|v| v.addresses.iter().any(|a| a.starts_with(&format!("{ip}/"))))
        });
        let by_peer = holder.and_then(|v| v.holder.as_deref()) == Some(peer);
        rows.push(match r {
            Err(why) => row(name, false, format!("not probed: {why} (the ARP probe needs root)")),
            Ok(Some(mac)) if by_peer => row(
                name,
                true,
                format!("answered by {} ({peer}, the master)", vip::packets::mac_string(mac)),
            ),
            Ok(Some(mac)) => row(
                name,
                false,
                format!(
                    "another host answers for it ({}): an address conflict; no node of this pair holds it",
                    vip::packets::mac_string(mac)
                ),
            ),
            Ok(None) if by_peer => row(
                name,
                false,
                format!("{peer} is the master and holds it, yet nothing answers for it here: is this node on that LAN?"),
            ),
            Ok(None) => row(name, true, "nobody answers for it: free"),
        });
    }
}

fn replication(r: &crate::config::Resource, peer: &str, s: &NodeStatus, rows: &mut Vec<Row>) {
    let Some(rs) = s.resources.iter().find(|x| x.name == r.name) else {
        rows.push(row(
            format!("replication ({})", r.name),
            false,
            "the daemon does not serve this resource: restart it with this configuration",
        ));
        return;
    };
    let Some(x) = &rs.replication else {
        rows.push(row(
            format!("replication ({})", r.name),
            false,
            "the daemon runs this resource unreplicated",
        ));
        return;
    };
    let to = r.on.get(peer).and_then(|o| o.replication_address);
    let at = to.map_or_else(String::new, |a| format!(" at {a}"));
    let name = format!("replication ({})", r.name);
    let live = x.connection.in_session();
    if live {
        let v = x.protocol_version.map_or_else(String::new, |v| format!(", protocol version {v}"));
        rows.push(row(
            name,
            true,
            format!("{peer}{at} reached and authenticated ({:?}{v})", x.connection),
        ));
    } else if let Some(why) = &x.last_refusal {
        rows.push(row(name, false, format!("{peer}{at}: {why}")));
    } else {
        rows.push(row(name, false, format!("{peer}{at} not connected ({:?}) and no handshake has failed: nothing answers there (is its daemon running, a firewall in the way?)", x.connection)));
    }
    // The node that would receive the data holds at least the sender's size.
    let size = format!("volume size ({})", r.name);
    match x.peer_size_bytes {
        None => rows.push(row(
            size,
            false,
            "unknown: no handshake with the peer reached its parameters",
        )),
        Some(theirs) => {
            let mine = rs.size_bytes;
            let (ok, detail) = if theirs == mine {
                (true, format!("{mine} bytes on both nodes"))
            } else {
                let (small, big) =
                    if theirs < mine { (peer, s.node.as_str()) } else { (s.node.as_str(), peer) };
                (
                    false,
                    format!(
                        "{} has {mine} bytes, {peer} {theirs}: {small} cannot hold all of {big}'s data, so with {big} as the master nothing would replicate; give both the same size",
                        s.node
                    ),
                )
            };
            rows.push(row(size, ok, detail));
        }
    }
}

fn heartbeat(cfg: &Config, node: &str, s: &NodeStatus, rows: &mut Vec<Row>) {
    if cfg.heartbeat.link.is_empty() {
        return;
    }
    let Some(ha) = &s.ha else {
        rows.push(row(
            "heartbeat",
            false,
            "the daemon runs no cluster manager: restart it with this configuration",
        ));
        return;
    };
    for (i, l) in cfg.heartbeat.link.iter().enumerate() {
        let what = match l.kind {
            LinkKind::Udp => {
                l.on.get(node).and_then(|o| o.peer).map_or("udp".into(), |p| format!("udp to {p}"))
            }
            LinkKind::Serial => {
                l.on.get(node)
                    .and_then(|o| o.device.clone())
                    .map_or("serial".into(), |d| format!("serial {}", d.display()))
            }
        };
        let name = format!("heartbeat link {i}");
        let Some(st) = ha.links.get(i) else {
            rows.push(row(
                name,
                false,
                format!(
                    "{what}: the daemon does not run this link: restart it with this configuration"
                ),
            ));
            continue;
        };
        let ok = st.state == "up";
        let heard = st.last_heard_ms.map_or("never heard from the peer".to_string(), |ms| {
            format!("last authenticated frame {ms} ms ago")
        });
        let detail = if ok {
            format!("{what}: up, {heard}")
        } else if st.dropped > 0 {
            format!(
                "{what}: {}, {heard}; {} frame(s) refused (wrong secret, cluster or node name?)",
                st.state, st.dropped
            )
        } else {
            format!("{what}: {}, {heard}", st.state)
        };
        rows.push(row(name, ok, detail));
    }
}

/// The table, and whether every check passed.
pub fn table(rows: &[Row]) -> (String, bool) {
    let w = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    let mut o = String::new();
    for r in rows {
        let _ =
            writeln!(o, "{:<w$}  {:<4}  {}", r.check, if r.ok { "ok" } else { "FAIL" }, r.detail);
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed == 0 {
        let _ = writeln!(o, "all {} checks passed", rows.len());
    } else {
        let _ = writeln!(o, "{failed} of {} checks failed", rows.len());
    }
    (o, failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let text = include_str!("../../duet.example.toml");
        Config::parse(std::path::Path::new("duet.example.toml"), text).unwrap()
    }

    fn addr(interface: &str, a: &str, prefix: u8) -> IfAddr {
        IfAddr { interface: interface.into(), addr: a.parse().unwrap(), prefix }
    }

    /// Alpha's host as the example means it: the dedicated link and the LAN.
    fn good() -> Vec<IfAddr> {
        vec![
            addr("lo", "127.0.0.1", 8),
            addr("eth1", "198.51.100.1", 24),
            addr("eth0", "192.0.2.11", 24),
        ]
    }

    fn find<'a>(rows: &'a [Row], check: &str) -> &'a Row {
        rows.iter().find(|r| r.check == check).unwrap_or_else(|| panic!("no {check}: {rows:?}"))
    }

    #[test]
    fn who_answers_for_a_vip_is_judged_by_who_holds_it() {
        use crate::status::{ClusterStatus, VipStatus};
        let status = |holder: Option<&str>| NodeStatus {
            schema: 1,
            node: "alpha".into(),
            cluster: "c".into(),
            version: "0".into(),
            pid: 1,
            uptime_s: 1,
            peer: Some("beta".into()),
            shutting_down: false,
            resources: vec![],
            ha: Some(ClusterStatus {
                vips: vec![VipStatus {
                    interface: "eth0".into(),
                    addresses: vec!["192.0.2.100/24".into()],
                    holder: holder.map(str::to_string),
                }],
                ..ClusterStatus::default()
            }),
        };
        let ip: IpAddr = "192.0.2.100".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 9];
        let one = |r: Result<Option<[u8; 6]>, String>, s: Option<&NodeStatus>| {
            let mut rows = Vec::new();
            answered("beta", &vec![(ip, r)], s, &mut rows);
            rows.pop().unwrap()
        };
        let (peer, nobody) = (status(Some("beta")), status(None));
        let r = one(Ok(Some(mac)), Some(&peer));
        assert!(r.ok && r.detail == "answered by 02:00:00:00:00:09 (beta, the master)", "{r:?}");
        let r = one(Ok(Some(mac)), Some(&nobody));
        assert!(!r.ok && r.detail.contains("an address conflict"), "{r:?}");
        let r = one(Ok(Some(mac)), None);
        assert!(!r.ok && r.detail.contains("an address conflict"), "{r:?}");
        let r = one(Ok(None), Some(&peer));
        assert!(!r.ok && r.detail.contains("nothing answers for it here"), "{r:?}");
        let r = one(Ok(None), Some(&nobody));
        assert!(r.ok && r.detail.contains("free"), "{r:?}");
        let r = one(Err("Operation not permitted".into()), Some(&nobody));
        assert!(!r.ok && r.detail.contains("needs root"), "{r:?}");
        assert_eq!(r.check, "vip 192.0.2.100 on the LAN");
    }

    #[test]
    fn subnets_of_both_families() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_subnet(ip("10.1.2.3"), ip("10.1.0.1"), 16));
        assert!(!in_subnet(ip("10.2.2.3"), ip("10.1.0.1"), 16));
        assert!(in_subnet(ip("10.2.2.3"), ip("10.1.0.1"), 0));
        assert!(in_subnet(ip("10.1.0.1"), ip("10.1.0.1"), 32));
        assert!(!in_subnet(ip("10.1.0.2"), ip("10.1.0.1"), 32));
        assert!(in_subnet(ip("fd00::5"), ip("fd00::1"), 64));
        assert!(!in_subnet(ip("fd01::5"), ip("fd00::1"), 64));
        assert!(!in_subnet(ip("10.1.0.1"), ip("fd00::1"), 0), "families differ");
        assert!(!in_subnet(ip("10.1.0.1"), ip("10.1.0.1"), 33), "no such prefix");
    }

    #[test]
    fn the_local_checks_pass_on_the_host_the_config_describes() {
        let rows = judge(
            &cfg(),
            "alpha",
            &good(),
            &Vec::new(),
            Err("cannot reach the duet daemon".into()),
        );
        for check in
            ["replication address (vol0)", "heartbeat link 0 subnet", "vip 192.0.2.100/24 subnet"]
        {
            assert!(find(&rows, check).ok, "{check}: {rows:?}");
        }
        let d = find(&rows, "local daemon");
        assert!(!d.ok && d.detail.contains("start it (on both nodes)"), "{d:?}");
        let (text, ok) = table(&rows);
        assert!(!ok && text.ends_with("1 of 4 checks failed\n"), "{text}");
        let vip = text.lines().find(|l| l.starts_with("vip ")).unwrap();
        assert!(vip.ends_with("subnet   ok    in 192.0.2.11/24 on eth0"), "{text}");
    }

    #[test]
    fn each_address_problem_is_named() {
        let c = cfg();
        // The replication and heartbeat address on no interface here.
        let rows =
            judge(&c, "alpha", &[addr("eth0", "192.0.2.11", 24)], &Vec::new(), Err(String::new()));
        let r = find(&rows, "replication address (vol0)");
        assert!(
            !r.ok && r.detail.contains("198.51.100.1:7789 is no address of this host"),
            "{r:?}"
        );
        let h = find(&rows, "heartbeat link 0 subnet");
        assert!(!h.ok && h.detail.contains("bind address 198.51.100.1 is no address"), "{h:?}");
        // The dedicated NIC with a prefix too narrow for the peer.
        let narrow = vec![addr("eth1", "198.51.100.1", 31), addr("eth0", "192.0.2.11", 24)];
        let rows = judge(&c, "alpha", &narrow, &Vec::new(), Err(String::new()));
        let h = find(&rows, "heartbeat link 0 subnet");
        assert!(
            !h.ok
                && h.detail.contains("the peer 198.51.100.2:694 is outside 198.51.100.1/31 (eth1)"),
            "{h:?}"
        );
        // The VIP's interface on another subnet, and missing altogether.
        let other = vec![addr("eth1", "198.51.100.1", 24), addr("eth0", "203.0.113.5", 24)];
        let rows = judge(&c, "alpha", &other, &Vec::new(), Err(String::new()));
        let v = find(&rows, "vip 192.0.2.100/24 subnet");
        assert!(
            !v.ok
                && v.detail.contains("outside every subnet of eth0")
                && v.detail.contains("203.0.113.5/24"),
            "{v:?}"
        );
        let rows = judge(&c, "alpha", &good()[..2], &Vec::new(), Err(String::new()));
        let v = find(&rows, "vip 192.0.2.100/24 subnet");
        assert!(!v.ok && v.detail.contains("interface eth0 does not exist"), "{v:?}");
        // The VIP itself on the interface (this node holds it) is no subnet of its own.
        let only_vip = vec![addr("eth1", "198.51.100.1", 24), addr("eth0", "192.0.2.100", 24)];
        let rows = judge(&c, "alpha", &only_vip, &Vec::new(), Err(String::new()));
        assert!(!find(&rows, "vip 192.0.2.100/24 subnet").ok);
        // A single node has nothing to test.
        let single = Config::parse(
            std::path::Path::new("s.toml"),
            "[cluster]\nname = \"d\"\nconfigured_master = \"alpha\"\n[node.alpha]\n[[resource]]\nname = \"v\"\n[resource.on.alpha]\ndisk = \"/tmp/x\"\n",
        )
        .unwrap();
        let rows = judge(&single, "alpha", &good(), &Vec::new(), Err(String::new()));
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].ok && rows[0].detail.contains("no second node"));
    }
}
