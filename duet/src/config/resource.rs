//! `[[resource]]`: the volume, its peer timers, resync and split-brain policies; and its validation.

use super::*;

/// Replication protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// Local write done and data queued to the peer.
    A,
    /// Local write done and the peer received the data.
    B,
    /// Local write done and the peer wrote the data.
    #[default]
    C,
}

impl Protocol {
    /// The name in the peer handshake's configuration fingerprint.
    pub fn fingerprint_name(self) -> &'static str {
        match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        }
    }
}

/// `io_engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoEngine {
    /// io_uring where available, else threads.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Thread pool.
    Threads,
}

/// `on_io_error`: what a failing backing store does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnIoError {
    /// Detach it: a Primary serves on through its in-sync peer and hands over.
    #[default]
    Detach,
    /// Return the error to the client.
    Pass,
    /// A Primary holds each request its disk refuses until `duet resume-io`, then retries it.
    Freeze,
}

/// `sync`: how the standby follows the Primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every write reaches the peer as `protocol` says.
    #[default]
    Continuous,
    /// The link is idle between the runs of `schedule`; at each run the standby catches up,
    /// keeping its last consistent state (a reflink copy, or `hooks.before_resync_target`)
    /// until it is in sync. A failover loses what was written since the last run.
    Scheduled,
}

/// `data_integrity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataIntegrity {
    /// No digest.
    #[default]
    Off,
    /// CRC32 per block.
    Crc32,
    /// SHA-256 per block.
    Sha256,
}

impl DataIntegrity {
    /// The name in the peer handshake's configuration fingerprint (the names of releases that
    /// hashed the Debug text, so a rolling upgrade still connects).
    pub fn fingerprint_name(self) -> &'static str {
        match self {
            DataIntegrity::Off => "Off",
            DataIntegrity::Crc32 => "Crc32",
            DataIntegrity::Sha256 => "Sha256",
        }
    }
}

/// `[[resource]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// Resource and NBD export name.
    pub name: String,
    /// A | B | C (default C).
    #[serde(default)]
    pub protocol: Protocol,
    /// Where the running master serves NBD. Default `0.0.0.0:10809`.
    #[serde(default = "default_nbd_listen", deserialize_with = "syntax::socket")]
    pub nbd_listen: SocketAddr,
    /// auto | uring | threads.
    #[serde(default)]
    pub io_engine: IoEngine,
    /// O_DIRECT on the backing store.
    #[serde(default)]
    pub direct_io: bool,
    /// Default 4.
    #[serde(default = "default_4")]
    pub bitmap_granularity_kib: u32,
    /// Default 4096.
    #[serde(default = "default_4096")]
    pub activity_log_extent_kib: u32,
    /// Default 1237.
    #[serde(default = "default_1237")]
    pub activity_log_extents: u32,
    /// off | crc32 | sha256.
    #[serde(default)]
    pub data_integrity: DataIntegrity,
    /// detach | pass | freeze.
    #[serde(default)]
    pub on_io_error: OnIoError,
    /// continuous | scheduled.
    #[serde(default)]
    pub sync: SyncMode,
    /// With `sync = "scheduled"`: when the standby catches up (see [`crate::schedule`]).
    #[serde(default)]
    pub schedule: String,
    /// `[resource.on.NAME]`.
    #[serde(default)]
    pub on: BTreeMap<String, ResourceOn>,
    /// `[resource.resync]`.
    #[serde(default)]
    pub resync: Resync,
    /// `[resource.split_brain]`.
    #[serde(default)]
    pub split_brain: SplitBrain,
    /// `[resource.peer]`.
    #[serde(default)]
    pub peer: PeerTimers,
    /// `[resource.nbd]`.
    #[serde(default)]
    pub nbd: Nbd,
}

fn default_nbd_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 10809))
}
fn default_4() -> u32 {
    4
}
fn default_4096() -> u32 {
    4096
}
fn default_1237() -> u32 {
    1237
}

/// `[resource.on.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceOn {
    /// Block device or file (absolute path).
    pub disk: PathBuf,
    /// "internal" or an absolute path.
    #[serde(default = "default_meta")]
    pub meta: String,
    /// This node's end of the peer link; required with two nodes.
    #[serde(default, deserialize_with = "syntax::socket_opt")]
    pub replication_address: Option<SocketAddr>,
}

fn default_meta() -> String {
    "internal".into()
}

/// fixed | dynamic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncMode {
    /// Constant `rate_kib`.
    Fixed,
    /// DRBD-style dynamic controller.
    #[default]
    Dynamic,
}

/// `[resource.resync]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resync {
    pub mode: ResyncMode,
    pub rate_kib: u64,
    pub plan_ahead_ms: u64,
    pub fill_target_kib: u64,
    pub delay_target_ms: u64,
    pub max_rate_kib: u64,
    pub min_rate_kib: u64,
    pub checksum: bool,
    pub replication_rate_limit_kib: u64,
}

impl Default for Resync {
    fn default() -> Self {
        Self {
            mode: ResyncMode::Dynamic,
            rate_kib: 102_400,
            plan_ahead_ms: 2000,
            fill_target_kib: 0,
            delay_target_ms: 1000,
            max_rate_kib: 0,
            min_rate_kib: 20_480,
            checksum: false,
            replication_rate_limit_kib: 0,
        }
    }
}

/// `[resource.split_brain]` (policy names as in DRBD).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitBrain {
    pub after_sb_0pri: String,
    pub after_sb_1pri: String,
    pub after_sb_2pri: String,
}

impl Default for SplitBrain {
    fn default() -> Self {
        Self {
            after_sb_0pri: "disconnect".into(),
            after_sb_1pri: "disconnect".into(),
            after_sb_2pri: "disconnect".into(),
        }
    }
}

/// `[resource.peer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTimers {
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub timeout_ms: u64,
    pub connect_retry_ms: u64,
    /// The Primary asks the peer to flush at least this often while it holds acknowledged,
    /// not yet durable writes (the transfer log: a power loss of the peer costs a resync of
    /// at most what was written since, never a silent divergence).
    pub flush_interval_ms: u64,
    /// ... or once this much was acknowledged since the last flush.
    pub flush_after_kib: u64,
}

impl Default for PeerTimers {
    fn default() -> Self {
        Self {
            ping_interval_ms: 1000,
            ping_timeout_ms: 500,
            timeout_ms: 6000,
            connect_retry_ms: 1000,
            flush_interval_ms: 30_000,
            flush_after_kib: 4 << 20,
        }
    }
}

impl Resource {
    /// The catch-up schedule of a `sync = "scheduled"` resource (validated: `None` only for
    /// continuous sync).
    pub fn schedule(&self) -> Option<crate::schedule::Schedule> {
        match self.sync {
            SyncMode::Continuous => None,
            SyncMode::Scheduled => self.schedule.parse().ok(),
        }
    }
}

impl Config {
    pub(super) fn validate_resource(
        &self,
        i: usize,
        r: &Resource,
        seen: &mut BTreeSet<String>,
    ) -> Result<(), ConfigError> {
        let k = |f: &str| format!("resource[{i}].{f}");
        if !valid_name(&r.name) {
            return Err(invalid(
                k("name"),
                &r.name,
                "not a valid resource name",
                "use 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if !seen.insert(r.name.clone()) {
            return Err(invalid(
                k("name"),
                &r.name,
                "duplicate resource name",
                "give each [[resource]] its own name",
            ));
        }
        let g = r.bitmap_granularity_kib;
        if !g.is_power_of_two() || !(4..=1024).contains(&g) {
            return Err(invalid(
                k("bitmap_granularity_kib"),
                g,
                "must be a power of two from 4 to 1024",
                "use 4 (the default)",
            ));
        }
        let al = r.activity_log_extent_kib;
        if !al.is_power_of_two() || !(64..=65536).contains(&al) || al < g {
            return Err(invalid(
                k("activity_log_extent_kib"),
                al,
                "must be a power of two from 64 to 65536 and at least the bitmap granularity",
                "use 4096 (the default)",
            ));
        }
        if !(7..=65534).contains(&r.activity_log_extents) {
            return Err(invalid(
                k("activity_log_extents"),
                r.activity_log_extents,
                "must be between 7 and 65534",
                "use 1237 (the default)",
            ));
        }
        for n in r.on.keys() {
            if !self.node.contains_key(n) {
                return Err(invalid(
                    format!("resource[{i}].on.{n}"),
                    n,
                    "not a configured node",
                    &format!("use one of: {}", self.node_names().join(", ")),
                ));
            }
        }
        let mut addrs = Vec::new();
        for n in self.node.keys() {
            let kn = |f: &str| format!("resource[{i}].on.{n}.{f}");
            let Some(on) = r.on.get(n) else {
                return Err(invalid(
                    format!("resource[{i}].on.{n}"),
                    "",
                    "missing",
                    &format!("add [resource.on.{n}] with the disk of node {n}"),
                ));
            };
            if on.disk.as_os_str().is_empty() || !on.disk.is_absolute() {
                return Err(invalid(
                    kn("disk"),
                    on.disk.display(),
                    "must be an absolute path",
                    "e.g. disk = \"/var/lib/duet/vol0.img\" or \"/dev/sdb\"",
                ));
            }
            if on.meta != "internal" && !Path::new(&on.meta).is_absolute() {
                return Err(invalid(
                    kn("meta"),
                    &on.meta,
                    "must be \"internal\" or an absolute path",
                    "use \"internal\" or e.g. \"/var/lib/duet/vol0.meta\"",
                ));
            }
            match (&on.replication_address, self.node.len()) {
                (Some(a), _) => addrs.push(*a),
                (None, 2) => {
                    return Err(invalid(
                        kn("replication_address"),
                        "",
                        "missing; a pair needs this node's end of the peer link",
                        "e.g. replication_address = \"198.51.100.1:7789\"",
                    ));
                }
                (None, _) => {}
            }
        }
        if addrs.len() == 2 && addrs[0] == addrs[1] {
            return Err(invalid(
                k("on.*.replication_address"),
                addrs[0],
                "both nodes use the same address",
                "give each node its own address",
            ));
        }
        match (r.sync, r.schedule.trim().is_empty()) {
            (SyncMode::Continuous, true) => {}
            (SyncMode::Continuous, false) => {
                return Err(invalid(
                    k("schedule"),
                    &r.schedule,
                    "a schedule needs sync = \"scheduled\" (this resource syncs continuously)",
                    "add sync = \"scheduled\", or remove schedule",
                ));
            }
            (SyncMode::Scheduled, true) => {
                return Err(invalid(
                    k("schedule"),
                    "",
                    "missing; sync = \"scheduled\" needs to know when the standby catches up",
                    "e.g. schedule = \"daily 02:00\", \"hourly\" or \"every 30m\"",
                ));
            }
            (SyncMode::Scheduled, false) => {
                if let Err(e) = r.schedule.parse::<crate::schedule::Schedule>() {
                    return Err(invalid(
                        k("schedule"),
                        &r.schedule,
                        "not a schedule",
                        &e.to_string(),
                    ));
                }
                if self.node.len() != 2 {
                    return Err(invalid(
                        k("sync"),
                        "scheduled",
                        "needs a peer: a single node has no standby to sync",
                        "use sync = \"continuous\" (the default) on a single node",
                    ));
                }
            }
        }
        let s = &r.resync;
        let ks = |f: &str| format!("resource[{i}].resync.{f}");
        positive(&ks("rate_kib"), s.rate_kib)?;
        if s.mode == ResyncMode::Dynamic {
            positive(&ks("plan_ahead_ms"), s.plan_ahead_ms)?;
            if s.fill_target_kib == 0 {
                positive(&ks("delay_target_ms"), s.delay_target_ms)?;
            }
        }
        if s.max_rate_kib != 0 && s.min_rate_kib > s.max_rate_kib {
            return Err(invalid(
                ks("min_rate_kib"),
                s.min_rate_kib,
                "larger than max_rate_kib",
                "lower min_rate_kib or raise max_rate_kib (0 = unlimited)",
            ));
        }
        let sb = &r.split_brain;
        let kb = |f: &str| format!("resource[{i}].split_brain.{f}");
        let node_victim = sb
            .after_sb_0pri
            .strip_prefix("discard-node-")
            .is_some_and(|n| self.node.contains_key(n));
        if !SB0.contains(&sb.after_sb_0pri.as_str()) && !node_victim {
            return Err(invalid(
                kb("after_sb_0pri"),
                &sb.after_sb_0pri,
                "unknown policy",
                &format!("use one of: {}, discard-node-NAME", SB0.join(", ")),
            ));
        }
        if !SB1.contains(&sb.after_sb_1pri.as_str()) {
            return Err(invalid(
                kb("after_sb_1pri"),
                &sb.after_sb_1pri,
                "unknown policy",
                &format!("use one of: {}", SB1.join(", ")),
            ));
        }
        if !SB2.contains(&sb.after_sb_2pri.as_str()) {
            return Err(invalid(
                kb("after_sb_2pri"),
                &sb.after_sb_2pri,
                "unknown policy",
                &format!("use one of: {}", SB2.join(", ")),
            ));
        }
        let p = &r.peer;
        let kp = |f: &str| format!("resource[{i}].peer.{f}");
        for (f, v) in [
            ("ping_interval_ms", p.ping_interval_ms),
            ("ping_timeout_ms", p.ping_timeout_ms),
            ("timeout_ms", p.timeout_ms),
            ("connect_retry_ms", p.connect_retry_ms),
            ("flush_interval_ms", p.flush_interval_ms),
            ("flush_after_kib", p.flush_after_kib),
        ] {
            positive(&kp(f), v)?;
        }
        if p.flush_interval_ms > 60_000 {
            return Err(invalid(
                kp("flush_interval_ms"),
                p.flush_interval_ms,
                "must be at most 60000 (what a power loss of the peer may cost to resync grows with it)",
                "use 30000 (the default)",
            ));
        }
        if !(1024..=16 << 20).contains(&p.flush_after_kib) {
            return Err(invalid(
                kp("flush_after_kib"),
                p.flush_after_kib,
                "must be from 1024 (1 MiB) to 16777216 (16 GiB)",
                "use 4194304 (the default, 4 GiB)",
            ));
        }
        if p.ping_timeout_ms >= p.timeout_ms {
            return Err(invalid(
                kp("ping_timeout_ms"),
                p.ping_timeout_ms,
                "must be less than timeout_ms",
                "e.g. ping_timeout_ms = 500 with timeout_ms = 6000",
            ));
        }
        Ok(())
    }
}
