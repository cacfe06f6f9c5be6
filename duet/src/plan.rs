//! `duet check-config`: what each node will do with this file, in words.

use std::fmt::Write as _;

use crate::config::{Config, LinkKind};

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
        let m = cfg.metrics_listen(n);
        let _ = writeln!(
            o,
            "  metrics {}",
            if m.is_empty() { "disabled".to_string() } else { format!("on http://{m}/metrics") }
        );
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
                        on.replication_address.as_deref().unwrap_or("?"),
                        r.on[p].replication_address.as_deref().unwrap_or("?")
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
                    on.bind.as_deref().unwrap_or("?"),
                    on.peer.as_deref().unwrap_or("?")
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
                if v.mac.is_empty() { String::new() } else { format!(" with MAC {}", v.mac) }
            );
        }
    }
    if nodes.len() == 2 {
        let _ = writeln!(
            o,
            "\nnote: this duet release runs single-node configurations only; `duet daemon` refuses a pair until replication lands."
        );
    }
    o
}
