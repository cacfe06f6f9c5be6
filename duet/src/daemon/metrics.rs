//! `/metrics`: the node's state in the OpenMetrics text format, built with `prometheus-client`
//! from one [`NodeStatus`] per scrape (the values are the daemon's own counters and states; a
//! registry per scrape keeps this a pure function of the status, tested without a daemon).
//!
//! States are state-labelled gauges, as drbd-reactor exports them: `duet_disk_state{state=...}`
//! is 1 for the current state and 0 for every other, so a dashboard can graph and alert on each.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::status::{NodeStatus, ResourceStatus};

/// The content type of [`encode_status`]'s text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`classic`]'s text.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus does; curl and older
/// tools do not, and get the classic text format).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text as [`encode_status`]
/// writes it: a counter's family is named by its `_total` sample and an info's by its `_info`
/// one (typed gauge), and `# EOF` and `# UNIT` lines go. The helps need no other escaping: they
/// hold no backslash or newline (a test checks).
pub fn classic(om: &str) -> String {
    let mut kinds = std::collections::HashMap::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            kinds.insert(name, kind);
        }
    }
    let renamed = |name: &str| match kinds.get(name) {
        Some(&"counter") => format!("{name}_total"),
        Some(&"info") => format!("{name}_info"),
        _ => name.to_string(),
    };
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("# HELP ")
            && let Some((name, help)) = rest.split_once(' ')
        {
            out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
        } else if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let kind = if kind == "info" { "gauge" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

type Labels = Vec<(String, String)>;

const ROLES: [&str; 2] = ["Primary", "Secondary"];
const DISK_STATES: [&str; 5] = ["Diskless", "Inconsistent", "Outdated", "Consistent", "UpToDate"];
const CONN_STATES: [&str; 8] = [
    "StandAlone",
    "Connecting",
    "Connected",
    "SyncSource",
    "SyncTarget",
    "VerifySource",
    "VerifyTarget",
    "Disconnecting",
];
const RUNNING_ROLES: [&str; 3] = ["master", "partly master", "slave"];
const PEER_STATES: [&str; 3] = ["alive", "dead", "unknown"];
const LINK_STATES: [&str; 4] = ["up", "late", "down", "waiting"];

/// One scrape's registry and the label every series carries.
struct Scrape {
    reg: Registry,
    node: String,
}

impl Scrape {
    fn labels(&self, extra: &[(&str, &str)]) -> Labels {
        let mut l = vec![("node".to_string(), self.node.clone())];
        l.extend(extra.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())));
        l
    }

    fn gauge(&mut self, name: &str, help: &str, rows: Vec<(Labels, f64)>) {
        let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (l, v) in rows {
            f.get_or_create(&l).set(v);
        }
        self.reg.register(name, help.trim_end_matches('.'), f);
    }

    /// A counter from its absolute value (`name` without `_total`: the encoder adds it).
    fn counter(&mut self, name: &str, help: &str, rows: Vec<(Labels, u64)>) {
        let f = Family::<Labels, Counter<u64>>::default();
        for (l, v) in rows {
            f.get_or_create(&l).inc_by(v);
        }
        // The encoder ends every help with a period of its own.
        self.reg.register(name, help.trim_end_matches('.'), f);
    }

    /// A state-labelled gauge: 1 for `current`, 0 for every other of `all`, for each row.
    fn states(&mut self, name: &str, help: &str, rows: Vec<(Labels, &str)>, all: &[&str]) {
        let mut out = Vec::new();
        for (l, current) in rows {
            for s in all {
                let mut l = l.clone();
                l.push(("state".into(), (*s).into()));
                out.push((l, f64::from(u8::from(*s == current))));
            }
        }
        self.gauge(name, help, out);
    }
}

type PerResource = (&'static str, &'static str, fn(&ResourceStatus) -> Option<u64>);

/// Gauges per resource.
const RESOURCE_GAUGES: [PerResource; 9] = [
    ("size_bytes", "Size of the volume.", |r| Some(r.size_bytes)),
    ("nbd_clients", "NBD clients connected.", |r| Some(r.stats.clients_connected)),
    ("exporting", "1 while this node serves the resource over NBD.", |r| {
        Some(u64::from(r.exporting))
    }),
    ("out_of_sync_bytes", "Bytes marked out of sync with the peer.", |r| {
        r.replication.as_ref().map(|x| x.out_of_sync_bytes)
    }),
    (
        "peer_unflushed_bytes",
        "Bytes the peer acknowledged that no peer flush covers yet (resynced after its power loss).",
        |r| r.replication.as_ref().map(|x| x.peer_unflushed_bytes),
    ),
    ("split_brain", "1 while the resource is in split brain (it needs an operator).", |r| {
        r.replication.as_ref().map(|x| u64::from(x.split_brain.is_some()))
    }),
    ("io_frozen", "1 while writes are frozen (fencing resource-and-stonith).", |r| {
        r.replication.as_ref().map(|x| u64::from(x.frozen))
    }),
    ("verify_mismatched_bytes", "Bytes the last online verify found different on the peer.", |r| {
        r.replication.as_ref().map(|x| x.verify_mismatches.iter().map(|m| m.1).sum())
    }),
    (
        "resync_remaining_bytes",
        "Bytes the running resync still has to move (0 when none runs).",
        |r| {
            r.replication
                .as_ref()
                .map(|x| x.resync.map_or(0, |p| p.total_bytes.saturating_sub(p.done_bytes)))
        },
    ),
];

/// Counters per resource.
const RESOURCE_COUNTERS: [PerResource; 22] = [
    ("nbd_reads", "NBD reads served.", |r| Some(r.stats.reads)),
    ("nbd_writes", "NBD writes served.", |r| Some(r.stats.writes)),
    ("nbd_read_bytes", "Bytes read by NBD clients.", |r| Some(r.stats.bytes_read)),
    ("nbd_written_bytes", "Bytes written by NBD clients.", |r| Some(r.stats.bytes_written)),
    ("nbd_flushes", "NBD flushes.", |r| Some(r.stats.flushes)),
    ("nbd_request_errors", "NBD requests answered with an error.", |r| {
        Some(r.stats.request_errors)
    }),
    ("nbd_protocol_errors", "NBD connections closed for protocol violations.", |r| {
        Some(r.stats.protocol_errors)
    }),
    (
        "nbd_refused",
        "NBD connections closed at accept (an address outside allow, or over a connection limit).",
        |r| Some(r.stats.clients_refused),
    ),
    ("nbd_tls_sessions", "NBD connections upgraded to TLS.", |r| Some(r.stats.tls_sessions)),
    ("nbd_tls_failures", "NBD TLS handshakes that failed.", |r| Some(r.stats.tls_failures)),
    ("nbd_idle_disconnects", "NBD connections closed after idle_timeout_ms.", |r| {
        Some(r.stats.idle_disconnects)
    }),
    ("replicated_bytes", "Bytes of writes sent to the peer.", |r| {
        r.replication.as_ref().map(|x| x.sent_data_bytes)
    }),
    ("replication_received_bytes", "Bytes of writes received from the peer.", |r| {
        r.replication.as_ref().map(|x| x.received_data_bytes)
    }),
    ("resync_sent_bytes", "Resync bytes sent.", |r| {
        r.replication.as_ref().map(|x| x.resync_sent_bytes)
    }),
    ("resync_received_bytes", "Resync bytes received.", |r| {
        r.replication.as_ref().map(|x| x.resync_received_bytes)
    }),
    ("resync_same_bytes", "Resync bytes found equal by checksum (not sent).", |r| {
        r.replication.as_ref().map(|x| x.resync_same_bytes)
    }),
    ("activity_log_transactions", "Activity log transactions written.", |r| {
        r.replication.as_ref().map(|x| x.al_transactions)
    }),
    ("peer_connects", "Replication sessions established.", |r| {
        r.replication.as_ref().map(|x| x.connects)
    }),
    ("peer_errors", "Peer connections dropped for errors or refusals.", |r| {
        r.replication.as_ref().map(|x| x.peer_errors)
    }),
    (
        "peer_auth_failures",
        "Peer connections dropped because the peer's bytes failed authentication (tampering or a wrong secret).",
        |r| r.replication.as_ref().map(|x| x.peer_auth_failures),
    ),
    (
        "foreign_connections",
        "Connections to the replication port from another address than the peer's (dropped).",
        |r| r.replication.as_ref().map(|x| x.foreign_connections),
    ),
    ("slow_writes", "Page-cache writes that took over 50 ms (a slow disk).", |r| {
        r.replication.as_ref().map(|x| x.slow_writes)
    }),
];

/// Counters of the HTTP endpoint itself.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Requests answered.
    pub requests: AtomicU64,
}

/// The OpenMetrics text of `st` (and the endpoint's own counters).
#[allow(clippy::cast_precision_loss)] // Byte counts and seconds far below 2^53.
pub fn encode_status(st: &NodeStatus, http: &HttpCounters) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = Scrape { reg: Registry::with_prefix("duet"), node: st.node.clone() };
    s.reg.register(
        "build",
        "The duet build and the node it runs as",
        Info::new(vec![
            ("version".to_string(), st.version.clone()),
            ("node".to_string(), st.node.clone()),
            ("cluster".to_string(), st.cluster.clone()),
        ]),
    );
    let up = vec![(s.labels(&[]), st.uptime_s as f64)];
    s.gauge("uptime_seconds", "Seconds since the daemon started.", up);
    let res = |s: &Scrape, r: &ResourceStatus| s.labels(&[("resource", &r.name)]);
    for (name, help, value) in RESOURCE_GAUGES {
        let rows =
            st.resources.iter().filter_map(|r| value(r).map(|v| (res(&s, r), v as f64))).collect();
        s.gauge(name, help, rows);
    }
    for (name, help, value) in RESOURCE_COUNTERS {
        let rows = st.resources.iter().filter_map(|r| value(r).map(|v| (res(&s, r), v))).collect();
        s.counter(name, help, rows);
    }
    let rows = st.resources.iter().map(|r| (res(&s, r), r.role.as_str())).collect();
    s.states(
        "resource_role",
        "The resource's role on this node (1 for the current one).",
        rows,
        &ROLES,
    );
    let rows = st.resources.iter().map(|r| (res(&s, r), r.disk_state.as_str())).collect();
    s.states("disk_state", "This node's disk state (1 for the current one).", rows, &DISK_STATES);
    let rows = st.resources.iter().map(|r| (res(&s, r), r.connection.as_str())).collect();
    s.states(
        "connection_state",
        "The replication connection's state (1 for the current one).",
        rows,
        &CONN_STATES,
    );
    let peer_disk: Vec<(Labels, String)> = st
        .resources
        .iter()
        .filter_map(|r| {
            let d = r.replication.as_ref()?.peer_disk?;
            Some((res(&s, r), format!("{d:?}")))
        })
        .collect();
    let rows = peer_disk.iter().map(|(l, d)| (l.clone(), d.as_str())).collect();
    s.states(
        "peer_disk_state",
        "The peer's disk state as the replication link reports it (absent while disconnected).",
        rows,
        &DISK_STATES,
    );
    let resyncs: Vec<_> = st
        .resources
        .iter()
        .filter_map(|r| r.replication.as_ref()?.resync.map(|p| (res(&s, r), p)))
        .collect();
    let rows = resyncs.iter().map(|(l, p)| (l.clone(), p.rate_bytes_per_s as f64)).collect();
    s.gauge("resync_rate_bytes_per_second", "The running resync's average rate.", rows);
    let rows = resyncs.iter().filter_map(|(l, p)| p.eta_s.map(|e| (l.clone(), e as f64))).collect();
    s.gauge("resync_eta_seconds", "Seconds the running resync still needs at its rate.", rows);
    let scheduled: Vec<_> = st
        .resources
        .iter()
        .filter_map(|r| r.replication.as_ref()?.scheduled.as_ref().map(|x| (res(&s, r), x)))
        .collect();
    let rows =
        scheduled.iter().filter_map(|(l, x)| x.last_consistent.map(|t| (l.clone(), t))).collect();
    s.gauge(
        "scheduled_last_consistent_timestamp_seconds",
        "sync = \"scheduled\": when this node was last in sync with its peer (Unix time; the standby serves that state after a failover).",
        rows,
    );
    let rows = scheduled.iter().filter_map(|(l, x)| x.next_run.map(|t| (l.clone(), t))).collect();
    s.gauge(
        "scheduled_next_run_timestamp_seconds",
        "sync = \"scheduled\": when the Primary starts its next catch-up (Unix time).",
        rows,
    );
    if let Some(h) = &st.ha {
        cluster(&mut s, h);
    }
    s.counter(
        "http_requests",
        "HTTP requests answered.",
        vec![(s.labels(&[]), http.requests.load(Relaxed))],
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &s.reg);
    out
}

/// The cluster manager's series.
#[allow(clippy::cast_precision_loss)]
fn cluster(s: &mut Scrape, h: &crate::status::ClusterStatus) {
    let me = s.labels(&[]);
    s.states(
        "running_role",
        "This node's running role in the pair (1 for the current one).",
        vec![(me.clone(), h.running_role.as_str())],
        &RUNNING_ROLES,
    );
    s.states(
        "peer_state",
        "The peer as the heartbeat sees it (1 for the current one).",
        vec![(me.clone(), h.peer.as_str())],
        &PEER_STATES,
    );
    s.gauge(
        "healthy",
        "1 while this node's health checks pass.",
        vec![(me.clone(), f64::from(u8::from(h.healthy)))],
    );
    let rows = h.peer_healthy.map(|p| (me.clone(), f64::from(u8::from(p)))).into_iter().collect();
    s.gauge("peer_healthy", "1 while the peer says its health checks pass.", rows);
    s.gauge(
        "maintenance",
        "1 while the cluster is in maintenance mode (no automatic takeover, failback or handover).",
        vec![(me.clone(), f64::from(u8::from(h.maintenance)))],
    );
    s.gauge(
        "switchover_possible",
        "1 when make-master/make-slave (without --force) would start now.",
        vec![(me.clone(), f64::from(u8::from(h.switchover.possible)))],
    );
    s.counter(
        "failovers",
        "Times this node became the running master since the daemon started (failover or switchover).",
        vec![(me.clone(), h.takeovers)],
    );
    let link = |s: &Scrape, name: &str| s.labels(&[("link", name)]);
    let rows = h
        .links
        .iter()
        .map(|l| (link(s, &l.name), f64::from(u8::from(l.state == "up" || l.state == "late"))))
        .collect();
    s.gauge("link_up", "1 while the heartbeat link is heard within deadtime.", rows);
    let rows = h.links.iter().map(|l| (link(s, &l.name), l.state.as_str())).collect();
    s.states(
        "link_state",
        "The heartbeat link's state (1 for the current one).",
        rows,
        &LINK_STATES,
    );
    let rows = h
        .links
        .iter()
        .filter_map(|l| l.last_heard_ms.map(|ms| (link(s, &l.name), ms as f64 / 1000.0)))
        .collect();
    s.gauge("link_last_heard_seconds", "Seconds since an authenticated frame on the link.", rows);
    type PerLink = (&'static str, &'static str, fn(&crate::status::LinkStatus) -> u64);
    let per_link: [PerLink; 5] = [
        ("link_frames_received", "Authenticated heartbeat frames received.", |l| l.frames_in),
        ("link_frames_sent", "Heartbeat frames sent.", |l| l.frames_out),
        ("link_frames_dropped", "Heartbeat frames refused on the link.", |l| l.dropped),
        ("link_send_errors", "Heartbeat frames that could not be sent.", |l| l.send_errors),
        ("link_garbage_bytes", "Serial bytes skipped as line noise.", |l| l.garbage_bytes),
    ];
    for (name, help, value) in per_link {
        let rows = h.links.iter().map(|l| (link(s, &l.name), value(l))).collect();
        s.counter(name, help, rows);
    }
    let d = h.drops;
    let rows = [
        ("malformed", d.malformed),
        ("auth", d.auth),
        ("foreign_cluster", d.foreign_cluster),
        ("wrong_node", d.wrong_node),
        ("replay", d.replay),
    ]
    .into_iter()
    .map(|(why, n)| (s.labels(&[("reason", why)]), n))
    .collect();
    s.counter("heartbeat_frames_dropped", "Heartbeat frames dropped, by reason.", rows);
    let rows = h
        .vips
        .iter()
        .map(|v| {
            let addr = v.addresses.first().map_or("", String::as_str);
            let here = v.holder.as_deref() == Some(s.node.as_str());
            (s.labels(&[("vip", addr), ("interface", &v.interface)]), f64::from(u8::from(here)))
        })
        .collect();
    s.gauge("vip_held", "1 while this node holds the VIP.", rows);
    let rows = h
        .services
        .iter()
        .map(|x| (s.labels(&[("service", &x.name)]), f64::from(u8::from(x.state == "running"))))
        .collect();
    s.gauge(
        "service_running",
        "1 while the service's last start succeeded (and no stop since).",
        rows,
    );
    let rows = h
        .checks
        .iter()
        .map(|x| (s.labels(&[("check", &x.name)]), f64::from(u8::from(x.ok))))
        .collect();
    s.gauge("health_check_ok", "1 while the health check passes (after fall / rise).", rows);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::fixture;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn states_are_one_hot_and_counters_carry_their_values() {
        let om = encode_status(&fixture(), &HttpCounters::default());
        assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with EOF");
        let one = |s: &str| value(&om, s).unwrap_or_else(|| panic!("{s} missing:\n{om}"));
        assert_eq!(one(r#"duet_disk_state{node="alpha",resource="vol0",state="UpToDate"}"#), 1.0);
        assert_eq!(one(r#"duet_disk_state{node="alpha",resource="vol0",state="Outdated"}"#), 0.0);
        assert_eq!(one(r#"duet_running_role{node="alpha",state="master"}"#), 1.0);
        assert_eq!(one(r#"duet_running_role{node="alpha",state="slave"}"#), 0.0);
        assert_eq!(one(r#"duet_replicated_bytes_total{node="alpha",resource="vol0"}"#), 4096.0);
        assert_eq!(
            one(r#"duet_activity_log_transactions_total{node="alpha",resource="vol0"}"#),
            3.0
        );
        assert_eq!(one(r#"duet_heartbeat_frames_dropped_total{node="alpha",reason="auth"}"#), 2.0);
        assert_eq!(one(r#"duet_link_last_heard_seconds{node="alpha",link="udp a -> b"}"#), 0.04);
        assert_eq!(one(r#"duet_vip_held{node="alpha",vip="192.0.2.10/24",interface="eth0"}"#), 1.0);
        assert_eq!(one(r#"duet_service_running{node="alpha",service="nfs"}"#), 1.0);
        assert_eq!(one(r#"duet_failovers_total{node="alpha"}"#), 1.0);
        assert_eq!(one(r#"duet_maintenance{node="alpha"}"#), 0.0);
        assert_eq!(one(r#"duet_health_check_ok{node="alpha",check="uplink"}"#), 0.0);
        assert!(
            om.contains("duet_build_info{version=\"0.1.0\",node=\"alpha\",cluster=\"demo\"} 1")
        );
        // Every state of each state gauge appears for each resource.
        let disk = om.lines().filter(|l| l.starts_with("duet_disk_state{")).count();
        assert_eq!(disk, DISK_STATES.len());
        let conn = om.lines().filter(|l| l.starts_with("duet_connection_state{")).count();
        assert_eq!(conn, CONN_STATES.len());
    }

    #[test]
    fn the_classic_format_names_counters_and_infos_by_their_samples() {
        let om = encode_status(&fixture(), &HttpCounters::default());
        let t = classic(&om);
        assert!(!t.contains("# EOF") && !t.contains("# UNIT"));
        assert!(t.contains("# TYPE duet_nbd_reads_total counter\n"), "{t}");
        assert!(t.contains("# HELP duet_nbd_reads_total NBD reads served.\n"), "{t}");
        assert!(t.contains("# TYPE duet_build_info gauge\n"), "{t}");
        // Every sample's family is declared under its own name, before it.
        let mut declared = std::collections::HashSet::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                assert!(declared.contains(name), "{name} has no TYPE line: {l}");
            }
        }
        // Helps need no escaping in either format.
        for l in om.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(!l.contains('\\'), "{l}");
        }
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")) && !wants_openmetrics(None));
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    #[test]
    fn the_grafana_dashboard_queries_only_series_duet_exports() {
        let d: serde_json::Value =
            serde_json::from_str(include_str!("../../../contrib/grafana/duet.json")).unwrap();
        let mut st = crate::status::fixture();
        st.resources[0].replication.as_mut().unwrap().resync =
            Some(replicator::repl::volume::Progress {
                total_bytes: 10,
                done_bytes: 5,
                elapsed_s: 1.0,
                rate_bytes_per_s: 5,
                average_rate_bytes_per_s: 5,
                eta_s: Some(1),
            });
        let om = classic(&encode_status(&st, &HttpCounters::default()));
        let exported: std::collections::HashSet<&str> =
            om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        let panels = d["panels"].as_array().unwrap();
        assert!(panels.len() >= 10);
        let mut n = 0;
        for p in panels {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("duet_") {
                        assert!(
                            exported.contains(word),
                            "{word} in {:?} is not exported",
                            p["title"]
                        );
                        n += 1;
                    }
                }
            }
        }
        assert!(n >= 15, "{n} series queried");
    }
}
