//! The configuration file (`duet.example.toml` is the contract): serde structs that refuse unknown
//! keys, documented defaults, and a `validate()` whose errors name the key, the bad value and the
//! fix.

use replicator::repl::policy::{SB0_NAMES as SB0, SB1_NAMES as SB1, SB2_NAMES as SB2};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem: which key, what is wrong, what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// TOML syntax, an unknown key, or a value of the wrong type.
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A key has a value that is not allowed.
    #[error("{key} = {value}: {problem}; {fix}")]
    Invalid { key: String, value: String, problem: String, fix: String },
}

fn invalid(
    key: impl Into<String>,
    value: impl std::fmt::Display,
    problem: &str,
    fix: &str,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[cluster]`.
    pub cluster: Cluster,
    /// `[node.NAME]`: the one or two nodes.
    #[serde(default)]
    pub node: BTreeMap<String, NodeOverrides>,
    /// `[[resource]]`: replicated volumes.
    #[serde(default)]
    pub resource: Vec<Resource>,
    /// `[heartbeat]`.
    #[serde(default)]
    pub heartbeat: Heartbeat,
    /// `[fencing]`.
    #[serde(default)]
    pub fencing: Fencing,
    /// `[[health.check]]`.
    #[serde(default)]
    pub health: Health,
    /// `[[service]]`.
    #[serde(default)]
    pub service: Vec<Service>,
    /// `[[vip]]`.
    #[serde(default)]
    pub vip: Vec<Vip>,
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Frames from another cluster are dropped.
    pub name: String,
    /// Shared secret; required when two nodes are configured.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The preferred master.
    pub configured_master: String,
    /// off | auto.
    #[serde(default)]
    pub failback: Failback,
    /// CLI ↔ daemon socket. Default `/run/duet/duet.sock`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Prometheus endpoint, "" disables. Default `127.0.0.1:9640`.
    #[serde(default = "default_metrics")]
    pub metrics_listen: String,
    /// Threads of the data path (NBD exports, peer links, resync). Default 1: one event loop
    /// that does a replicated write's steps itself, with no hand-over between threads.
    #[serde(default = "default_data_threads")]
    pub data_threads: usize,
}

/// Most `data_threads` accepted.
pub const MAX_DATA_THREADS: usize = 64;

fn default_data_threads() -> usize {
    1
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/duet/duet.sock")
}
fn default_metrics() -> String {
    "127.0.0.1:9640".into()
}

/// `failback`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// The running master stays master.
    #[default]
    Off,
    /// The configured master takes back once in sync.
    Auto,
}

/// `[node.NAME]`: per-node overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeOverrides {
    /// Overrides `cluster.control_socket`.
    pub control_socket: Option<PathBuf>,
    /// Overrides `cluster.metrics_listen`.
    pub metrics_listen: Option<String>,
    /// Overrides `fencing.delay_ms` for this node (give the nodes different delays so both
    /// never fence each other at once).
    pub fence_delay_ms: Option<u64>,
}

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
    #[serde(default = "default_nbd_listen")]
    pub nbd_listen: String,
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
}

fn default_nbd_listen() -> String {
    "0.0.0.0:10809".into()
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
    pub replication_address: Option<String>,
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

/// `[heartbeat]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    pub keepalive_ms: u64,
    pub warntime_ms: u64,
    pub deadtime_ms: u64,
    pub initdead_ms: u64,
    /// `[[heartbeat.link]]`.
    pub link: Vec<Link>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            keepalive_ms: 200,
            warntime_ms: 600,
            deadtime_ms: 1000,
            initdead_ms: 10_000,
            link: vec![],
        }
    }
}

/// udp | serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// UDP unicast.
    Udp,
    /// RS-232.
    Serial,
}

/// none | rtscts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// No flow control.
    #[default]
    None,
    /// Hardware RTS/CTS.
    Rtscts,
}

/// `[[heartbeat.link]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub kind: LinkKind,
    /// Serial only; default 115200.
    pub baud: Option<u32>,
    /// Serial only; default none.
    pub flow_control: Option<FlowControl>,
    /// `[heartbeat.link.on.NAME]`.
    #[serde(default)]
    pub on: BTreeMap<String, LinkOn>,
}

/// `[heartbeat.link.on.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkOn {
    /// UDP: local address.
    pub bind: Option<String>,
    /// UDP: the peer's address.
    pub peer: Option<String>,
    /// Serial: device path.
    pub device: Option<PathBuf>,
}

/// dont-care | resource-only | resource-and-stonith.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FencingPolicy {
    DontCare,
    #[default]
    ResourceOnly,
    ResourceAndStonith,
}

/// `[fencing]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fencing {
    pub policy: FencingPolicy,
    pub fence_command: String,
    pub delay_ms: u64,
}

/// `[health]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// `[[health.check]]`.
    pub check: Vec<HealthCheck>,
}

/// ping | interface | script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Ping,
    Interface,
    Script,
}

/// `[[health.check]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub name: String,
    pub kind: CheckKind,
    /// Ping: an IP address; interface: its name; script: the command.
    pub target: String,
    #[serde(default = "default_1000")]
    pub interval_ms: u64,
    #[serde(default = "default_5")]
    pub fall: u32,
    #[serde(default = "default_2")]
    pub rise: u32,
}

fn default_1000() -> u64 {
    1000
}
fn default_5() -> u32 {
    5
}
fn default_2() -> u32 {
    2
}

/// master | slave | both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    #[default]
    Master,
    Slave,
    Both,
}

/// `[[service]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub start: String,
    pub stop: String,
    #[serde(default = "default_30000")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub placement: Placement,
}

fn default_30000() -> u64 {
    30_000
}

/// `[[vip]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub interface: String,
    pub address: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub mac: String,
    #[serde(default = "default_5")]
    pub announce_count: u32,
    #[serde(default = "default_200")]
    pub announce_interval_ms: u64,
    #[serde(default = "default_5000")]
    pub announce_repeat_after_ms: u64,
    #[serde(default)]
    pub announce_refresh_ms: u64,
}

fn default_200() -> u64 {
    200
}
fn default_5000() -> u64 {
    5000
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn socket_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        invalid(key, v, "not an address:port", "write it as 192.0.2.1:10809 or [2001:db8::1]:10809")
    })
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(invalid(key, v, "must be greater than 0", "set a positive value"))
    } else {
        Ok(())
    }
}

/// Parses `ADDR/PREFIX`.
pub fn parse_prefix(v: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = v.split_once('/')?;
    let ip: IpAddr = a.parse().ok()?;
    let p: u8 = p.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (p <= max).then_some((ip, p))
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.to_owned(), reason: e.to_string() })?;
        Self::parse(path, &text)
    }

    /// Parses and validates text (`path` is used in messages only).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|sp| {
                let line = text[..sp.start.min(text.len())].matches('\n').count() + 1;
                let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
                format!("line {line} (`{snippet}`): ")
            });
            ConfigError::Parse {
                path: path.to_owned(),
                reason: format!(
                    "{}{}; check the key names and value types against duet.example.toml",
                    at.unwrap_or_default(),
                    e.message().trim_end()
                ),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The node names, in order.
    pub fn node_names(&self) -> Vec<&str> {
        self.node.keys().map(String::as_str).collect()
    }

    /// The other node, if two are configured.
    pub fn peer_of(&self, node: &str) -> Option<&str> {
        self.node.keys().map(String::as_str).find(|n| *n != node)
    }

    /// Control socket of `node`.
    pub fn control_socket(&self, node: &str) -> PathBuf {
        self.node
            .get(node)
            .and_then(|n| n.control_socket.clone())
            .unwrap_or_else(|| self.cluster.control_socket.clone())
    }

    /// Fence delay of `node`.
    pub fn fence_delay_ms(&self, node: &str) -> u64 {
        self.node.get(node).and_then(|n| n.fence_delay_ms).unwrap_or(self.fencing.delay_ms)
    }

    /// Metrics address of `node` ("" disables).
    pub fn metrics_listen(&self, node: &str) -> String {
        self.node
            .get(node)
            .and_then(|n| n.metrics_listen.clone())
            .unwrap_or_else(|| self.cluster.metrics_listen.clone())
    }

    /// Picks this node: `--node`, else the hostname.
    pub fn pick_node(&self, explicit: Option<&str>, hostname: &str) -> Result<String, ConfigError> {
        let names = self.node_names().join(", ");
        match explicit {
            Some(n) if self.node.contains_key(n) => Ok(n.to_string()),
            Some(n) => Err(invalid(
                "--node",
                n,
                "no such [node.NAME] section",
                &format!("use one of: {names}"),
            )),
            None if self.node.contains_key(hostname) => Ok(hostname.to_string()),
            None => {
                let short = hostname.split('.').next().unwrap_or(hostname);
                if self.node.contains_key(short) {
                    return Ok(short.to_string());
                }
                Err(invalid(
                    "hostname",
                    hostname,
                    "this host's name matches no [node.NAME] section",
                    &format!("pass --node with one of: {names}"),
                ))
            }
        }
    }

    /// Checks every value; the first problem is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if !valid_name(&c.name) {
            return Err(invalid(
                "cluster.name",
                &c.name,
                "not a valid name",
                "use 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        match self.node.len() {
            1 | 2 => {}
            n => {
                return Err(invalid(
                    "node",
                    n,
                    "a duet cluster has one or two [node.NAME] sections",
                    "define [node.NAME] for each machine (two for a pair)",
                ));
            }
        }
        for name in self.node.keys() {
            if !valid_name(name) {
                return Err(invalid(
                    format!("node.{name}"),
                    name,
                    "not a valid node name",
                    "use 1-64 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        let known = |n: &str| self.node.contains_key(n);
        let names = self.node_names().join(", ");
        if !known(&c.configured_master) {
            return Err(invalid(
                "cluster.configured_master",
                &c.configured_master,
                "not one of the configured nodes",
                &format!("use one of: {names}"),
            ));
        }
        let pair = self.node.len() == 2;
        match &c.secret_file {
            Some(p) if !p.is_absolute() => {
                return Err(invalid(
                    "cluster.secret_file",
                    p.display(),
                    "must be an absolute path",
                    "write the full path, e.g. /etc/duet/secret",
                ));
            }
            None if pair => {
                return Err(invalid(
                    "cluster.secret_file",
                    "",
                    "missing; a pair authenticates its links with a shared secret",
                    "set secret_file to a file holding the same secret on both nodes",
                ));
            }
            _ => {}
        }
        if !(1..=MAX_DATA_THREADS).contains(&c.data_threads) {
            return Err(invalid(
                "cluster.data_threads",
                c.data_threads,
                "must be between 1 and 64",
                "1 suits one or two resources; add threads for many busy resources",
            ));
        }
        if c.control_socket.as_os_str().is_empty() || !c.control_socket.is_absolute() {
            return Err(invalid(
                "cluster.control_socket",
                c.control_socket.display(),
                "must be an absolute path",
                "e.g. /run/duet/duet.sock",
            ));
        }
        for (n, o) in &self.node {
            if let Some(s) = &o.control_socket
                && !s.is_absolute()
            {
                return Err(invalid(
                    format!("node.{n}.control_socket"),
                    s.display(),
                    "must be an absolute path",
                    "e.g. /run/duet/duet.sock",
                ));
            }
            if let Some(m) = &o.metrics_listen
                && !m.is_empty()
            {
                socket_addr(&format!("node.{n}.metrics_listen"), m)?;
            }
        }
        if !c.metrics_listen.is_empty() {
            socket_addr("cluster.metrics_listen", &c.metrics_listen)?;
        }
        if self.resource.is_empty() {
            return Err(invalid(
                "resource",
                "[]",
                "no [[resource]] defined",
                "add a [[resource]] with a name and [resource.on.NAME] disk for each node",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, r) in self.resource.iter().enumerate() {
            self.validate_resource(i, r, &mut seen)?;
        }
        self.validate_heartbeat()?;
        let f = &self.fencing;
        if f.policy == FencingPolicy::ResourceAndStonith && f.fence_command.trim().is_empty() {
            return Err(invalid(
                "fencing.fence_command",
                "",
                "resource-and-stonith needs a fence command",
                "set fence_command, or use policy = \"resource-only\"",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, h) in self.health.check.iter().enumerate() {
            let k = |f: &str| format!("health.check[{i}].{f}");
            if !valid_name(&h.name) || !names.insert(h.name.clone()) {
                return Err(invalid(
                    k("name"),
                    &h.name,
                    "missing, invalid or duplicate",
                    "give each check a unique name of letters, digits, '-', '_' or '.'",
                ));
            }
            match h.kind {
                CheckKind::Ping if h.target.parse::<IpAddr>().is_err() => {
                    return Err(invalid(
                        k("target"),
                        &h.target,
                        "a ping check needs an IP address",
                        "e.g. target = \"192.0.2.1\"",
                    ));
                }
                CheckKind::Interface | CheckKind::Script if h.target.trim().is_empty() => {
                    return Err(invalid(
                        k("target"),
                        &h.target,
                        "empty",
                        "name the interface (interface) or the command (script)",
                    ));
                }
                _ => {}
            }
            positive(&k("interval_ms"), h.interval_ms)?;
            positive(&k("fall"), u64::from(h.fall))?;
            positive(&k("rise"), u64::from(h.rise))?;
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.service.iter().enumerate() {
            let k = |f: &str| format!("service[{i}].{f}");
            if !valid_name(&s.name) || !names.insert(s.name.clone()) {
                return Err(invalid(
                    k("name"),
                    &s.name,
                    "missing, invalid or duplicate",
                    "give each service a unique name",
                ));
            }
            if s.start.trim().is_empty() {
                return Err(invalid(
                    k("start"),
                    &s.start,
                    "empty",
                    "give the command that starts the service",
                ));
            }
            if s.stop.trim().is_empty() {
                return Err(invalid(
                    k("stop"),
                    &s.stop,
                    "empty",
                    "give the command that stops the service",
                ));
            }
            positive(&k("timeout_ms"), s.timeout_ms)?;
        }
        for (i, v) in self.vip.iter().enumerate() {
            let k = |f: &str| format!("vip[{i}].{f}");
            if v.interface.trim().is_empty() || v.interface.len() > 15 {
                return Err(invalid(
                    k("interface"),
                    &v.interface,
                    "not an interface name",
                    "e.g. interface = \"eth0\"",
                ));
            }
            if parse_prefix(&v.address).is_none() {
                return Err(invalid(
                    k("address"),
                    &v.address,
                    "not ADDRESS/PREFIX",
                    "e.g. \"192.0.2.100/24\" or \"2001:db8::100/64\"",
                ));
            }
            for (j, a) in v.aliases.iter().enumerate() {
                if parse_prefix(a).is_none() {
                    return Err(invalid(
                        format!("vip[{i}].aliases[{j}]"),
                        a,
                        "not ADDRESS/PREFIX",
                        "e.g. \"192.0.2.101/24\"",
                    ));
                }
            }
            if !v.mac.is_empty() && !valid_mac(&v.mac) {
                return Err(invalid(
                    k("mac"),
                    &v.mac,
                    "not a unicast MAC address",
                    "use \"\" or a locally administered unicast MAC such as \"02:00:5e:00:01:01\"",
                ));
            }
            positive(&k("announce_interval_ms"), v.announce_interval_ms)?;
        }
        Ok(())
    }

    fn validate_resource(
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
        socket_addr(&k("nbd_listen"), &r.nbd_listen)?;
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
                (Some(a), _) => addrs.push(socket_addr(&kn("replication_address"), a)?),
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

    fn validate_heartbeat(&self) -> Result<(), ConfigError> {
        let h = &self.heartbeat;
        positive("heartbeat.keepalive_ms", h.keepalive_ms)?;
        if h.deadtime_ms <= 2 * h.keepalive_ms {
            return Err(invalid(
                "heartbeat.deadtime_ms",
                h.deadtime_ms,
                &format!("must be more than 2 x keepalive_ms ({})", 2 * h.keepalive_ms),
                "raise deadtime_ms or lower keepalive_ms",
            ));
        }
        if h.warntime_ms < h.keepalive_ms || h.warntime_ms >= h.deadtime_ms {
            return Err(invalid(
                "heartbeat.warntime_ms",
                h.warntime_ms,
                "must be at least keepalive_ms and less than deadtime_ms",
                "e.g. warntime_ms = 600 with keepalive 200 and deadtime 1000",
            ));
        }
        if h.initdead_ms < h.deadtime_ms {
            return Err(invalid(
                "heartbeat.initdead_ms",
                h.initdead_ms,
                "must be at least deadtime_ms",
                "e.g. initdead_ms = 10000",
            ));
        }
        for (i, l) in h.link.iter().enumerate() {
            let k = |f: &str| format!("heartbeat.link[{i}].{f}");
            for n in l.on.keys() {
                if !self.node.contains_key(n) {
                    return Err(invalid(
                        k(&format!("on.{n}")),
                        n,
                        "not a configured node",
                        "use the names of [node.NAME] sections",
                    ));
                }
            }
            match l.kind {
                LinkKind::Udp => {
                    if l.baud.is_some() || l.flow_control.is_some() {
                        return Err(invalid(
                            k("baud"),
                            l.baud.unwrap_or(0),
                            "baud and flow_control apply to serial links only",
                            "remove them from this udp link",
                        ));
                    }
                }
                LinkKind::Serial => {
                    if let Some(b) = l.baud
                        && !heartbeat::serial::valid_baud(b)
                    {
                        return Err(invalid(
                            k("baud"),
                            b,
                            "not a standard baud rate",
                            "use e.g. 9600, 38400 or 115200",
                        ));
                    }
                }
            }
            for n in self.node.keys() {
                let kn = |f: &str| format!("heartbeat.link[{i}].on.{n}.{f}");
                let Some(on) = l.on.get(n) else {
                    return Err(invalid(
                        format!("heartbeat.link[{i}].on.{n}"),
                        "",
                        "missing",
                        &format!("add [heartbeat.link.on.{n}] for node {n}"),
                    ));
                };
                match l.kind {
                    LinkKind::Udp => {
                        let b = on.bind.as_deref().unwrap_or("");
                        let p = on.peer.as_deref().unwrap_or("");
                        socket_addr(&kn("bind"), b)?;
                        socket_addr(&kn("peer"), p)?;
                        if on.device.is_some() {
                            return Err(invalid(
                                kn("device"),
                                "",
                                "device applies to serial links only",
                                "remove it from this udp link",
                            ));
                        }
                    }
                    LinkKind::Serial => {
                        match &on.device {
                            Some(d) if d.is_absolute() => {}
                            d => {
                                let v =
                                    d.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
                                return Err(invalid(
                                    kn("device"),
                                    v,
                                    "a serial link needs an absolute device path",
                                    "e.g. device = \"/dev/ttyS0\"",
                                ));
                            }
                        }
                        if on.bind.is_some() || on.peer.is_some() {
                            return Err(invalid(
                                kn("bind"),
                                "",
                                "bind and peer apply to udp links only",
                                "remove them from this serial link",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
