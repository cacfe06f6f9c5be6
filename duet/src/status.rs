//! What `duet status` shows: the daemon builds a [`NodeStatus`], sends it as JSON, and the CLI
//! prints it as JSON (`--json`) or as text ([`render`]).

use heartbeat::receiver::DropCounts;
use replicator::nbd::server::Snapshot;
use replicator::repl::volume::ReplStatus;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The version of [`NodeStatus`]'s JSON (`duet status --json`, `/status`): raised when a field
/// is removed or changes meaning; fields are only ever added within a version.
pub const SCHEMA: u32 = 1;

/// One node's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// [`SCHEMA`] of the daemon that built it.
    #[serde(default)]
    pub schema: u32,
    /// This node's name.
    pub node: String,
    /// The cluster's name.
    pub cluster: String,
    /// duet version.
    pub version: String,
    /// Daemon process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// The other node, if configured.
    pub peer: Option<String>,
    /// Set while the daemon is stopping.
    pub shutting_down: bool,
    /// Every resource.
    pub resources: Vec<ResourceStatus>,
    /// The cluster manager (when heartbeat links are configured).
    #[serde(default)]
    pub ha: Option<ClusterStatus>,
}

/// One link as `duet status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub name: String,
    /// up | late | down | waiting (not heard yet, within initdead).
    pub state: String,
    /// Milliseconds since the last authenticated frame.
    pub last_heard_ms: Option<u64>,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Frames refused on this link (malformed, bad MAC, foreign, replayed).
    pub dropped: u64,
    pub send_errors: u64,
    /// Serial only: bytes skipped as line noise.
    pub garbage_bytes: u64,
}

/// The cluster part of `duet status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterStatus {
    pub configured_master: String,
    /// master | slave (this node).
    pub running_role: String,
    /// alive | dead | unknown.
    pub peer: String,
    pub peer_role: Option<String>,
    pub peer_healthy: Option<bool>,
    pub healthy: bool,
    pub failback: String,
    pub fencing: String,
    /// What the manager is doing, if anything.
    pub activity: Option<String>,
    pub links: Vec<LinkStatus>,
    pub drops: Drops,
    /// Whether an operator switchover would start now, and if not, why.
    #[serde(default)]
    pub switchover: Switchover,
    /// Times this node became the running master since the daemon started.
    #[serde(default)]
    pub takeovers: u64,
    /// Each VIP and who holds it.
    #[serde(default)]
    pub vips: Vec<VipStatus>,
    /// Each `[[service]]` and what its last start or stop did.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Maintenance mode (cluster-wide): the cluster manager changes no role by itself.
    #[serde(default)]
    pub maintenance: bool,
    /// The maintenance mode in the peer's last frame (`None`: not heard).
    #[serde(default)]
    pub peer_maintenance: Option<bool>,
    /// Each `[[health.check]]` and its verdict (after `fall` / `rise`).
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
}

/// One `[[health.check]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStatus {
    pub name: String,
    /// ping | interface | script, and its target.
    pub what: String,
    /// The `[[health.group]]` it belongs to, and the group's `require`.
    pub group: Option<String>,
    pub ok: bool,
}

/// Whether `duet make-master` / `make-slave` (without `--force`) would start now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Switchover {
    pub possible: bool,
    /// What it would do, or why it would be refused.
    pub why: String,
}

/// One VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub interface: String,
    /// `address/prefix`: the VIP's own first, then its aliases.
    pub addresses: Vec<String>,
    /// The node holding it (this one when it acquired it; the peer when the peer says it is
    /// master); `None` when nobody does as far as this node knows.
    pub holder: Option<String>,
}

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// master | slave | both: where it runs.
    pub placement: String,
    /// not started | running | stopped | start failed: ... | stop failed: ...
    pub state: String,
}

/// Dropped frames by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Drops {
    pub malformed: u64,
    pub auth: u64,
    pub foreign_cluster: u64,
    pub wrong_node: u64,
    pub replay: u64,
}

impl From<DropCounts> for Drops {
    fn from(d: DropCounts) -> Self {
        Self {
            malformed: d.malformed,
            auth: d.auth,
            foreign_cluster: d.cluster,
            wrong_node: d.node,
            replay: d.replay,
        }
    }
}

/// One resource's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    /// Primary | Secondary.
    pub role: String,
    /// Diskless | Inconsistent | Outdated | Consistent | UpToDate.
    pub disk_state: String,
    /// StandAlone | Connecting | Connected | ...
    pub connection: String,
    pub protocol: String,
    pub disk: String,
    pub size_bytes: u64,
    pub io_engine: String,
    pub direct_io: bool,
    /// Address the NBD export is served on, when exporting.
    pub nbd_listen: Option<String>,
    pub exporting: bool,
    pub stats: Snapshot,
    /// Replication state (pairs only).
    #[serde(default)]
    pub replication: Option<ReplStatus>,
}

/// Human-readable size.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// `2026-11-22 06:41:07.123 UTC` from seconds since the Unix epoch.
// Event times are positive and far below 2^53 ms: the float-to-int conversion is exact enough.
#[allow(clippy::cast_possible_truncation)]
pub fn timestamp(at: f64) -> String {
    let ms = (at * 1000.0) as i64;
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{milli:03} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The text form of `duet status`.
pub fn render(s: &NodeStatus) -> String {
    let mut o = String::new();
    let peer = s.peer.as_deref().map_or("no peer configured".to_string(), |p| format!("peer {p}"));
    let _ = writeln!(
        o,
        "node {} of cluster {} ({peer}); duet {}, pid {}, up {}s{}",
        s.node,
        s.cluster,
        s.version,
        s.pid,
        s.uptime_s,
        if s.shutting_down { ", SHUTTING DOWN" } else { "" }
    );
    if let Some(c) = &s.ha {
        let _ = writeln!(
            o,
            "cluster: this node is {} (configured master {}), peer {}{}{}; health {}; failback {}, fencing {}",
            c.running_role,
            c.configured_master,
            c.peer,
            c.peer_role.as_deref().map_or(String::new(), |r| format!(" ({r})")),
            match c.peer_healthy {
                Some(false) => ", peer unhealthy",
                _ => "",
            },
            if c.healthy { "ok" } else { "FAILING" },
            c.failback,
            c.fencing
        );
        if c.maintenance {
            let _ = writeln!(
                o,
                "  MAINTENANCE MODE: no automatic takeover, failback or handover; roles by hand (`duet primary` / `secondary`); `duet maintenance off` ends it{}",
                match c.peer_maintenance {
                    Some(false) => " (the peer has not taken it yet)",
                    _ => "",
                }
            );
        } else if c.peer_maintenance == Some(true) {
            let _ = writeln!(o, "  the peer is in maintenance mode and this node not yet");
        }
        if let Some(a) = &c.activity {
            let _ = writeln!(o, "  now: {a}");
        }
        for h in &c.checks {
            let _ = writeln!(
                o,
                "  health check {} ({}{}): {}",
                h.name,
                h.what,
                h.group.as_deref().map_or(String::new(), |g| format!(", group {g}")),
                if h.ok { "ok" } else { "FAILING" }
            );
        }
        for l in &c.links {
            let heard = l
                .last_heard_ms
                .map_or("never heard".to_string(), |m| format!("last heard {m} ms ago"));
            let _ = writeln!(
                o,
                "  link {}: {} ({heard}; {} in, {} out, {} dropped, {} send errors{})",
                l.name,
                l.state,
                l.frames_in,
                l.frames_out,
                l.dropped,
                l.send_errors,
                if l.garbage_bytes > 0 {
                    format!(", {} bytes of line noise", l.garbage_bytes)
                } else {
                    String::new()
                }
            );
        }
        let d = &c.drops;
        if d.malformed + d.auth + d.foreign_cluster + d.wrong_node + d.replay > 0 {
            let _ = writeln!(
                o,
                "  dropped frames: {} malformed, {} bad MAC, {} foreign cluster, {} wrong node, {} replayed",
                d.malformed, d.auth, d.foreign_cluster, d.wrong_node, d.replay
            );
        }
    }
    for r in &s.resources {
        let _ = writeln!(
            o,
            "{}: role {}, disk {}, connection {}, protocol {}",
            r.name, r.role, r.disk_state, r.connection, r.protocol
        );
        let _ = writeln!(
            o,
            "  disk {} ({}, {} engine{})",
            r.disk,
            bytes(r.size_bytes),
            r.io_engine,
            if r.direct_io { ", O_DIRECT" } else { "" }
        );
        if let Some(f) = r.replication.as_ref().and_then(|x| x.disk_failure.as_ref()) {
            let _ = writeln!(
                o,
                "  DISK FAILED: {} at {} on {}: {} ({})",
                f.op, f.offset, f.disk, f.error, f.action
            );
        }
        if let Some(sc) = r.replication.as_ref().and_then(|x| x.scheduled.as_ref()) {
            let when = |t: Option<f64>| t.map_or("not yet".to_string(), timestamp);
            let _ = writeln!(
                o,
                "  scheduled sync: last consistent point {}; next catch-up {}",
                when(sc.last_consistent),
                sc.next_run.map_or("when the Primary starts one".to_string(), timestamp)
            );
            if let Some(k) = &sc.kept {
                let _ = writeln!(
                    o,
                    "  kept consistent state (in sync at {}){}",
                    when(k.consistent_at.or(Some(k.taken_at))),
                    if sc.restorable {
                        ": the catch-up was cut off; a promotion restores it"
                    } else {
                        ", until the catch-up finishes"
                    }
                );
            }
        }
        match (&r.nbd_listen, r.exporting) {
            (Some(a), true) => {
                let _ = writeln!(o, "  NBD export {} on {a}", r.name);
            }
            _ => {
                let _ = writeln!(o, "  NBD export closed");
            }
        }
        let c = &r.stats;
        let _ = writeln!(
            o,
            "  clients {} connected, {} negotiating ({} since start, {} over TLS; {} refused, {} TLS failures, {} idle closed); reads {} ({}), writes {} ({}), flushes {}, trims {}, zeroes {}; errors: {} request, {} protocol",
            c.clients_connected,
            c.clients_negotiating,
            c.clients_total,
            c.tls_sessions,
            c.clients_refused,
            c.tls_failures,
            c.idle_disconnects,
            c.reads,
            bytes(c.bytes_read),
            c.writes,
            bytes(c.bytes_written),
            c.flushes,
            c.trims,
            c.zeroes,
            c.request_errors,
            c.protocol_errors
        );
        if let Some(x) = &r.replication {
            let _ = writeln!(
                o,
                "  peer: role {}, disk {}; out of sync {}; generation {} (bitmap {}, history {} {})",
                x.peer_role.map_or("unknown".into(), |r| format!("{r:?}")),
                x.peer_disk.map_or("DUnknown".into(), |d| format!("{d:?}")),
                bytes(x.out_of_sync_bytes),
                x.current_generation,
                x.bitmap_generation,
                x.history[0],
                x.history[1]
            );
            if let Some(p) = &x.resync {
                let _ = writeln!(
                    o,
                    "  resync: {} of {} done, {}/s, ETA {}",
                    bytes(p.done_bytes),
                    bytes(p.total_bytes),
                    bytes(p.rate_bytes_per_s),
                    p.eta_s.map_or("unknown".into(), |s| format!("{s}s"))
                );
            }
            if let Some(p) = &x.verify {
                let _ = writeln!(
                    o,
                    "  verify: {} of {} compared",
                    bytes(p.done_bytes),
                    bytes(p.total_bytes)
                );
            }
            if !x.verify_mismatches.is_empty() {
                let _ = writeln!(
                    o,
                    "  verify found {} out-of-sync ranges: {:?}",
                    x.verify_mismatches.len(),
                    &x.verify_mismatches[..x.verify_mismatches.len().min(10)]
                );
            }
            if let Some(sb) = &x.split_brain {
                let _ = writeln!(o, "  SPLIT BRAIN: {sb}");
            }
            if let Some(r) = &x.last_refusal {
                let _ = writeln!(o, "  last refusal: {r}");
            }
            let _ = writeln!(
                o,
                "  replicated {}, received {}; resync sent {}, received {}, skipped by checksum {}; {} connects, {} peer errors ({} failed authentication), {} connections from foreign addresses refused, {} activity-log transactions, {} slow disk writes; {} acknowledged by the peer, not yet flushed there",
                bytes(x.sent_data_bytes),
                bytes(x.received_data_bytes),
                bytes(x.resync_sent_bytes),
                bytes(x.resync_received_bytes),
                bytes(x.resync_same_bytes),
                x.connects,
                x.peer_errors,
                x.peer_auth_failures,
                x.foreign_connections,
                x.al_transactions,
                x.slow_writes,
                bytes(x.peer_unflushed_bytes)
            );
        }
    }
    o
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn render_mentions_everything() {
        let s = NodeStatus {
            schema: SCHEMA,
            node: "alpha".into(),
            cluster: "demo".into(),
            version: "0.1.0".into(),
            pid: 42,
            uptime_s: 3,
            peer: None,
            shutting_down: false,
            ha: None,
            resources: vec![ResourceStatus {
                name: "vol0".into(),
                role: "Primary".into(),
                disk_state: "UpToDate".into(),
                connection: "StandAlone".into(),
                protocol: "C".into(),
                disk: "/v.img".into(),
                size_bytes: 1 << 26,
                io_engine: "uring".into(),
                direct_io: false,
                nbd_listen: Some("127.0.0.1:10809".into()),
                exporting: true,
                stats: Snapshot { writes: 7, ..Snapshot::default() },
                replication: None,
            }],
        };
        let t = render(&s);
        for want in [
            "node alpha",
            "no peer configured",
            "role Primary",
            "UpToDate",
            "StandAlone",
            "64.0 MiB",
            "uring",
            "127.0.0.1:10809",
            "writes 7",
        ] {
            assert!(t.contains(want), "{want} missing in {t}");
        }
    }
}

#[cfg(test)]
mod maintenance_tests {
    use super::*;

    #[test]
    fn maintenance_mode_is_shown_and_is_a_warning() {
        let mut f = fixture();
        assert!(!render(&f).contains("MAINTENANCE"));
        assert_eq!(check::node(&f).0, check::Level::Ok);
        let h = f.ha.as_mut().unwrap();
        h.maintenance = true;
        h.peer_maintenance = Some(false);
        let t = render(&f);
        assert!(t.contains("MAINTENANCE MODE") && t.contains("maintenance off"), "{t}");
        assert!(
            t.contains(
                "health check uplink (ping 192.0.2.1, group internet (require all)): FAILING"
            ),
            "{t}"
        );
        assert!(t.contains("the peer has not taken it yet"), "{t}");
        let (level, line) = check::node(&f);
        assert_eq!(level, check::Level::Warning, "{line}");
        assert!(line.contains("maintenance mode"), "{line}");
        let h = f.ha.as_mut().unwrap();
        h.maintenance = false;
        h.peer_maintenance = Some(true);
        assert!(render(&f).contains("the peer is in maintenance mode and this node not yet"));
    }
}

#[cfg(test)]
mod timestamp_tests {
    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(super::timestamp(0.0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(super::timestamp(1_795_329_667.123), "2026-11-22 06:41:07.123 UTC");
        assert_eq!(super::timestamp(951_782_400.5), "2000-02-29 00:00:00.500 UTC");
    }
}

/// `duet status --check`: a monitoring verdict with Nagios's exit codes.
pub mod check {
    use replicator::repl::volume::{ConnState, DiskState, Role};

    use super::{NodeStatus, bytes};

    /// The verdict, ordered from best to worst; the exit code is its value.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        Ok = 0,
        Warning = 1,
        Critical = 2,
        Unknown = 3,
    }

    impl Level {
        /// The word Nagios plugins print.
        pub fn word(self) -> &'static str {
            match self {
                Level::Ok => "OK",
                Level::Warning => "WARNING",
                Level::Critical => "CRITICAL",
                Level::Unknown => "UNKNOWN",
            }
        }
    }

    /// What the verdict of one replicated resource is made of.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Replica {
        pub role: Role,
        pub disk: DiskState,
        pub connection: ConnState,
        pub peer_disk: Option<DiskState>,
        pub out_of_sync_bytes: u64,
        pub split_brain: bool,
        /// `sync = "scheduled"`: the link idles between catch-ups on purpose.
        pub scheduled: bool,
        /// A scheduled standby cut off mid-catch-up holds a state a promotion restores.
        pub restorable: bool,
    }

    /// One resource's level and why.
    pub fn judge(r: &Replica) -> (Level, String) {
        use ConnState::*;
        use DiskState::*;
        if r.split_brain {
            return (Level::Critical, "split brain".into());
        }
        if r.disk == Diskless {
            return (Level::Critical, "the local disk failed and is detached (Diskless)".into());
        }
        if r.role == Role::Primary && r.disk != UpToDate {
            return (Level::Critical, format!("Primary on a {:?} disk", r.disk));
        }
        if r.scheduled {
            // Between catch-ups an idle link is the plan: the master writes alone and tracks
            // what the standby lacks; the standby waits with the last run's data.
            match (r.role, r.connection, r.disk) {
                (Role::Primary, StandAlone, _) => {
                    return (Level::Ok, "scheduled sync: link idle until the next catch-up".into());
                }
                (Role::Secondary, Connecting, UpToDate | Consistent) => {
                    return (
                        Level::Ok,
                        "scheduled sync: the standby holds the last catch-up's data".into(),
                    );
                }
                (Role::Secondary, Connecting, Inconsistent) if r.restorable => {
                    return (
                        Level::Warning,
                        "scheduled sync: a catch-up was cut off; the standby keeps its last consistent state (a promotion restores it)".into(),
                    );
                }
                _ => {}
            }
        }
        match r.connection {
            StandAlone => {
                return (Level::Critical, "StandAlone: not replicating, and not trying".into());
            }
            Connecting | Disconnecting => {
                return (Level::Warning, "peer not connected: writes are not replicated".into());
            }
            SyncSource | SyncTarget => {
                let left = bytes(r.out_of_sync_bytes);
                return (Level::Warning, format!("resync running, {left} left"));
            }
            Connected | VerifySource | VerifyTarget => {}
        }
        if r.disk != UpToDate || r.peer_disk != Some(UpToDate) {
            let peer = r.peer_disk.map_or("unknown".to_string(), |d| format!("{d:?}"));
            return (Level::Warning, format!("disks {:?}/{peer}", r.disk));
        }
        if r.out_of_sync_bytes > 0 {
            return (Level::Warning, format!("{} out of sync", bytes(r.out_of_sync_bytes)));
        }
        (Level::Ok, "in sync".into())
    }

    /// The node's verdict: the worst of its resources and of the cluster manager's view, and a
    /// line to print (`DUET OK: …`).
    pub fn node(s: &NodeStatus) -> (Level, String) {
        let mut level = Level::Ok;
        let mut parts = Vec::new();
        for r in &s.resources {
            let frozen = r
                .replication
                .as_ref()
                .and_then(|x| x.disk_failure.as_ref())
                .filter(|f| f.action.starts_with("frozen"));
            let (l, why) = match &r.replication {
                _ if frozen.is_some() => (
                    Level::Critical,
                    format!(
                        "I/O frozen by a disk error ({}): `duet resume-io` once the disk is back",
                        frozen.map_or("", |f| f.error.as_str())
                    ),
                ),
                None => (Level::Ok, "single node".to_string()),
                Some(x) => judge(&Replica {
                    role: x.role,
                    disk: x.disk,
                    connection: x.connection,
                    peer_disk: x.peer_disk,
                    out_of_sync_bytes: x.out_of_sync_bytes,
                    split_brain: x.split_brain.is_some(),
                    scheduled: x.scheduled.is_some(),
                    restorable: x.scheduled.as_ref().is_some_and(|s| s.restorable),
                }),
            };
            level = level.max(l);
            parts.push(format!("{} {} {}: {why}", r.name, r.role, r.disk_state));
        }
        if let Some(h) = &s.ha {
            let (l, why) = match (h.running_role.as_str(), h.peer.as_str()) {
                ("partly master", _) => (Level::Critical, "partly master"),
                ("slave", "dead") => (Level::Critical, "slave and the peer is dead: no master"),
                (_, "dead") => (Level::Warning, "peer dead"),
                _ if !h.healthy => (Level::Warning, "a health check fails"),
                _ if h.maintenance => (Level::Warning, "maintenance mode: no automatic failover"),
                _ => (Level::Ok, ""),
            };
            level = level.max(l);
            let role = format!("{}, peer {}", h.running_role, h.peer);
            parts.push(if why.is_empty() { role } else { format!("{role}: {why}") });
        }
        if s.shutting_down {
            level = level.max(Level::Warning);
            parts.push("stopping".into());
        }
        (level, format!("DUET {}: node {}: {}", level.word(), s.node, parts.join("; ")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn good() -> Replica {
            Replica {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                connection: ConnState::Connected,
                peer_disk: Some(DiskState::UpToDate),
                out_of_sync_bytes: 0,
                split_brain: false,
                scheduled: false,
                restorable: false,
            }
        }

        #[test]
        fn each_state_has_its_level() {
            let cases: Vec<(Replica, Level, &str)> = vec![
                (good(), Level::Ok, "in sync"),
                (Replica { role: Role::Secondary, ..good() }, Level::Ok, "in sync"),
                (Replica { split_brain: true, ..good() }, Level::Critical, "split brain"),
                (
                    Replica { disk: DiskState::Inconsistent, ..good() },
                    Level::Critical,
                    "Primary on",
                ),
                (
                    Replica { connection: ConnState::StandAlone, ..good() },
                    Level::Critical,
                    "StandAlone",
                ),
                (
                    Replica { connection: ConnState::Connecting, ..good() },
                    Level::Warning,
                    "not connected",
                ),
                (
                    Replica {
                        connection: ConnState::SyncSource,
                        out_of_sync_bytes: 1 << 20,
                        ..good()
                    },
                    Level::Warning,
                    "1.0 MiB left",
                ),
                (
                    Replica {
                        role: Role::Secondary,
                        disk: DiskState::Inconsistent,
                        connection: ConnState::SyncTarget,
                        ..good()
                    },
                    Level::Warning,
                    "resync",
                ),
                (
                    Replica { peer_disk: Some(DiskState::Outdated), ..good() },
                    Level::Warning,
                    "Outdated",
                ),
                (Replica { peer_disk: None, ..good() }, Level::Warning, "unknown"),
                (Replica { out_of_sync_bytes: 4096, ..good() }, Level::Warning, "out of sync"),
                (Replica { connection: ConnState::VerifySource, ..good() }, Level::Ok, "in sync"),
                // Scheduled sync: the idle link between catch-ups is no fault.
                (
                    Replica { connection: ConnState::StandAlone, scheduled: true, ..good() },
                    Level::Ok,
                    "link idle",
                ),
                (
                    Replica {
                        role: Role::Secondary,
                        connection: ConnState::Connecting,
                        scheduled: true,
                        peer_disk: None,
                        ..good()
                    },
                    Level::Ok,
                    "last catch-up",
                ),
                (
                    Replica {
                        role: Role::Secondary,
                        disk: DiskState::Inconsistent,
                        connection: ConnState::Connecting,
                        scheduled: true,
                        restorable: true,
                        ..good()
                    },
                    Level::Warning,
                    "cut off",
                ),
                // ... but a standby the operator disconnected, or a catch-up waiting for its
                // peer, is.
                (
                    Replica {
                        role: Role::Secondary,
                        connection: ConnState::StandAlone,
                        scheduled: true,
                        ..good()
                    },
                    Level::Critical,
                    "StandAlone",
                ),
                (
                    Replica { connection: ConnState::Connecting, scheduled: true, ..good() },
                    Level::Warning,
                    "not connected",
                ),
            ];
            for (r, level, word) in cases {
                let (l, why) = judge(&r);
                assert_eq!(l, level, "{r:?}: {why}");
                assert!(why.contains(word), "{r:?}: {why}");
            }
        }

        #[test]
        fn exit_codes_are_nagios_s() {
            assert_eq!(
                [Level::Ok, Level::Warning, Level::Critical, Level::Unknown].map(|l| l as u8),
                [0, 1, 2, 3]
            );
            assert!(Level::Critical > Level::Warning && Level::Unknown > Level::Critical);
        }
    }
}

/// `duet wait`: whether a resource is where the caller waits for it.
pub mod wait {
    use super::NodeStatus;

    /// What `duet wait` waits for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Want {
        /// The local disk UpToDate.
        UpToDate,
        /// Primary here, UpToDate, the export open.
        Primary,
    }

    /// `Ok` when `resource` is as wanted; else what it is now.
    pub fn met(s: &NodeStatus, resource: &str, want: Want) -> Result<(), String> {
        let Some(r) = s.resources.iter().find(|r| r.name == resource) else {
            return Err(format!("the daemon has no resource {resource}"));
        };
        let now = format!(
            "{} {} {}, export {}",
            r.role,
            r.disk_state,
            r.connection,
            if r.exporting { "open" } else { "closed" }
        );
        let ok = match want {
            Want::UpToDate => r.disk_state == "UpToDate",
            Want::Primary => r.role == "Primary" && r.disk_state == "UpToDate" && r.exporting,
        };
        if ok && !s.shutting_down { Ok(()) } else { Err(format!("still {now}")) }
    }
}

/// A pair's status as tests build it: node `alpha` (master, Primary) with peer `beta`, one
/// resource `vol0` Connected and UpToDate on both sides, two heartbeat links up.
#[cfg(test)]
pub(crate) fn fixture() -> NodeStatus {
    let repl = serde_json::json!({
        "role": "Primary", "disk": "UpToDate", "connection": "Connected",
        "peer_role": "Secondary", "peer_disk": "UpToDate", "out_of_sync_bytes": 0,
        "current_generation": "1", "bitmap_generation": "0", "history": ["0", "0"],
        "resync": null, "verify": null, "verify_mismatches": [], "split_brain": null,
        "last_refusal": null, "frozen": false, "sent_data_bytes": 4096,
        "received_data_bytes": 0, "resync_sent_bytes": 0, "resync_received_bytes": 0,
        "resync_same_bytes": 0, "al_transactions": 3, "connects": 1, "peer_errors": 0,
        "slow_writes": 0, "events": []
    });
    let link = |name: &str| LinkStatus {
        name: name.into(),
        state: "up".into(),
        last_heard_ms: Some(40),
        frames_in: 10,
        frames_out: 11,
        dropped: 0,
        send_errors: 0,
        garbage_bytes: 0,
    };
    NodeStatus {
        schema: SCHEMA,
        node: "alpha".into(),
        cluster: "demo".into(),
        version: "0.1.0".into(),
        pid: 42,
        uptime_s: 75,
        peer: Some("beta".into()),
        shutting_down: false,
        resources: vec![ResourceStatus {
            name: "vol0".into(),
            role: "Primary".into(),
            disk_state: "UpToDate".into(),
            connection: "Connected".into(),
            protocol: "C".into(),
            disk: "/dev/vdb".into(),
            size_bytes: 64 << 20,
            io_engine: "uring".into(),
            direct_io: false,
            nbd_listen: Some("127.0.0.1:10809".into()),
            exporting: true,
            stats: Snapshot::default(),
            replication: Some(serde_json::from_value(repl).expect("a ReplStatus")),
        }],
        ha: Some(ClusterStatus {
            configured_master: "alpha".into(),
            running_role: "master".into(),
            peer: "alive".into(),
            peer_role: Some("slave".into()),
            peer_healthy: Some(true),
            healthy: true,
            failback: "off".into(),
            fencing: "ResourceOnly".into(),
            activity: None,
            links: vec![link("udp a -> b"), link("serial /dev/ttyS0")],
            drops: Drops { auth: 2, ..Drops::default() },
            switchover: Switchover { possible: true, why: "make-slave here hands over".into() },
            takeovers: 1,
            vips: vec![VipStatus {
                interface: "eth0".into(),
                addresses: vec!["192.0.2.10/24".into()],
                holder: Some("alpha".into()),
            }],
            checks: vec![CheckStatus {
                name: "uplink".into(),
                what: "ping 192.0.2.1".into(),
                group: Some("internet (require all)".into()),
                ok: false,
            }],
            maintenance: false,
            peer_maintenance: Some(false),
            services: vec![ServiceStatus {
                name: "nfs".into(),
                placement: "master".into(),
                state: "running".into(),
            }],
        }),
    }
}
