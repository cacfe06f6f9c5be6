//! `duet check-config`: what each node will do with this file, in words.

use std::fmt::Write as _;

use crate::config::{Config, LinkKind};

fn or_unknown(a: Option<std::net::SocketAddr>) -> String {
    a.map_or_else(|| "?".into(), |a| a.to_string())
}

/// Describes every node's part.
pub fn describe(cfg: &Config) -> String {
    let mut o = String::new();
    let nodes = cfg.node_names();
    let _ = writeln!(
        o,
        "configuration is valid: cluster {}, {} node(s) ({}), configured master {}, failback {:?}",
        cfg.cluster.name,
        nodes.len(),
        nodes.join(", "),
        cfg.cluster.configured_master,
        cfg.cluster.failback
    );
    for n in &nodes {
        let _ = writeln!(o, "\nnode {n}:");
        let _ = writeln!(o, "  control socket {}", cfg.control_socket(n).display());
        let _ = match cfg.metrics_listen(n) {
            None => writeln!(o, "  metrics disabled"),
            Some(m) => writeln!(o, "  metrics on http://{m}/metrics"),
        };
        let peer = cfg.peer_of(n);
        for r in &cfg.resource {
            let on = &r.on[*n];
            let _ = writeln!(
                o,
                "  resource {}: disk {} (metadata {}), io engine {:?}{}",
                r.name,
                on.disk.display(),
                on.meta,
                r.io_engine,
                if r.direct_io { ", O_DIRECT" } else { "" }
            );
            match peer {
                None => {
                    let _ = writeln!(
                        o,
                        "    runs as a standalone primary (no peer) and serves NBD export {} on {}",
                        r.name, r.nbd_listen
                    );
                }
                Some(p) => {
                    let _ = writeln!(
                        o,
                        "    when master, serves NBD export {} on {}; replicates with protocol {:?} from {} to {p} at {}",
                        r.name,
                        r.nbd_listen,
                        r.protocol,
                        or_unknown(on.replication_address),
                        or_unknown(r.on[p].replication_address)
                    );
                }
            }
        }
        for (i, l) in cfg.heartbeat.link.iter().enumerate() {
            let Some(on) = l.on.get(*n) else { continue };
            let _ = match l.kind {
                LinkKind::Udp => writeln!(
                    o,
                    "  heartbeat link {i}: udp {} -> {}",
                    or_unknown(on.bind),
                    or_unknown(on.peer)
                ),
                LinkKind::Serial => writeln!(
                    o,
                    "  heartbeat link {i}: serial {} at {} baud, flow control {:?}",
                    on.device.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
                    l.baud.unwrap_or(115_200),
                    l.flow_control.unwrap_or_default()
                ),
            };
        }
        for v in &cfg.vip {
            let _ = writeln!(
                o,
                "  when master, holds VIP {} on {}{}",
                v.address,
                v.interface,
                v.mac.map(|m| format!(" with MAC {m}")).unwrap_or_default()
            );
        }
    }
    if nodes.len() == 2 {
        if cfg.heartbeat.link.is_empty() {
            let _ = writeln!(
                o,
                "\nno [[heartbeat.link]]: no automatic failover; roles change only by `duet primary` / `duet secondary`."
            );
        } else {
            let h = &cfg.heartbeat;
            let _ = writeln!(
                o,
                "\nfailover: a node whose peer is silent on every heartbeat link for {} ms (keepalive {} ms; {} ms at start) and whose data is UpToDate takes over: {}promote, VIPs up, services up, NBD export open.",
                h.deadtime_ms,
                h.keepalive_ms,
                h.initdead_ms,
                match (cfg.fencing.policy, cfg.fencing.fence_command.trim().is_empty()) {
                    (crate::config::FencingPolicy::DontCare, _)
                    | (crate::config::FencingPolicy::ResourceOnly, true) => String::new(),
                    _ => format!(
                        "fence command {:?} (exit 3, 4, 5 or 7 to proceed), ",
                        cfg.fencing.fence_command
                    ),
                }
            );
            for n in &nodes {
                let d = cfg.fence_delay_ms(n);
                if d > 0 {
                    let _ = writeln!(o, "  {n} waits {d} ms before fencing");
                }
            }
            let _ = writeln!(
                o,
                "fencing {:?}: a master whose replication link breaks while the peer answers on a heartbeat link outdates the peer's data{}.",
                cfg.fencing.policy,
                if cfg.fencing.policy == crate::config::FencingPolicy::ResourceAndStonith {
                    "; a master that loses its peer freezes I/O until the fence command confirms"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                o,
                "failback {:?}; {} health check(s); {} service(s).",
                cfg.cluster.failback,
                cfg.health.check.len(),
                cfg.service.len()
            );
        }
    }
    o
}
