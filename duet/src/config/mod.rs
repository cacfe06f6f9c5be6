//! The configuration file (`duet.example.toml` is the contract): serde structs that refuse unknown
//! keys, documented defaults, and a `validate()` whose errors name the key, the bad value and the
//! fix. Addresses, prefixes and MACs are typed as the file is read ([`syntax`]): a bad one is a
//! parse error at its line, and the runtime takes the values as they are, parsing nothing again.
//!
//! By section: [`cluster`] (`[cluster]` and the node overrides), [`resource`]
//! (`[[resource]]` with its peer timers, resync and split-brain policies), [`heartbeat`],
//! [`ha`] (fencing, health checks, services), [`vip`]; each with its validation. The
//! mapping to the runtime's settings is [`runtime`].

mod cluster;
mod ha;
mod heartbeat;
mod nbd;
pub mod reload;
mod resource;
pub mod runtime;
mod syntax;
mod vip;

pub use cluster::*;
pub use ha::*;
pub use heartbeat::*;
pub use nbd::*;
pub use resource::*;
pub use syntax::{IpPrefix, Listen, Mac};
pub use vip::*;

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
    /// `[hooks]`.
    #[serde(default)]
    pub hooks: Hooks,
    /// Every key the file sets, by its path (`cluster.failback`, `resource[0].resync.rate_kib`),
    /// with a hash of its value: what the replication handshake compares with the peer's, to
    /// name the keys in which the two nodes' files differ.
    #[serde(skip)]
    pub keys: Vec<(String, u64)>,
}

/// The leaves of a TOML table, by path, each with a hash of its value.
fn leaves(prefix: &str, t: &toml::Table, out: &mut Vec<(String, u64)>) {
    for (k, v) in t {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => leaves(&path, t, out),
            toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
                for (i, t) in a.iter().enumerate() {
                    if let toml::Value::Table(t) = t {
                        leaves(&format!("{path}[{i}]"), t, out);
                    }
                }
            }
            v => {
                let h = replicator::repl::handshake::fingerprint(&[&v.to_string()]);
                out.push((path, h));
            }
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(invalid(key, v, "must be greater than 0", "set a positive value"))
    } else {
        Ok(())
    }
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
            let m = e.message().trim_end();
            // The value syntaxes' own messages already say what to write ("...; write it as").
            let hint = if m.contains("; ") {
                ""
            } else {
                "; check the key names and value types against duet.example.toml"
            };
            ConfigError::Parse {
                path: path.to_owned(),
                reason: format!("{}{m}{hint}", at.unwrap_or_default()),
            }
        })?;
        cfg.validate()?;
        let mut cfg = cfg;
        if let Ok(t) = text.parse::<toml::Table>() {
            leaves("", &t, &mut cfg.keys);
        }
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

    /// Metrics address of `node` (`None`: "" turned it off).
    pub fn metrics_listen(&self, node: &str) -> Option<SocketAddr> {
        self.node
            .get(node)
            .and_then(|n| n.metrics_listen)
            .unwrap_or(self.cluster.metrics_listen)
            .addr()
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
        for (key, g) in
            [("cluster.admin_group", &c.admin_group), ("cluster.read_group", &c.read_group)]
        {
            if !g.is_empty() && !valid_name(g) {
                return Err(invalid(
                    key,
                    g,
                    "not a group name",
                    "name a group of /etc/group, e.g. \"duet-admin\", or \"\" for root only",
                ));
            }
        }
        if !c.state_dir.is_absolute() {
            return Err(invalid(
                "cluster.state_dir",
                c.state_dir.display(),
                "must be an absolute path",
                "e.g. /var/lib/duet",
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
            r.nbd.validate(i)?;
            // Resources on one listener share its policy.
            if let Some(j) = self.resource[..i]
                .iter()
                .position(|o| o.nbd_listen == r.nbd_listen && o.nbd != r.nbd)
            {
                return Err(invalid(
                    format!("resource[{i}].nbd"),
                    r.nbd_listen,
                    &format!(
                        "resource[{j}] serves NBD on the same address with other [resource.nbd] settings"
                    ),
                    "give resources that share nbd_listen the same [resource.nbd], or each its own nbd_listen",
                ));
            }
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
            if let Some(g) = &h.group
                && !self.health.group.iter().any(|x| x.name == *g)
            {
                return Err(invalid(
                    k("group"),
                    g,
                    "no [[health.group]] of that name",
                    "add [[health.group]] with name = that group (and require = \"any\" or \"all\"), or remove group",
                ));
            }
        }
        let mut groups = BTreeSet::new();
        for (i, g) in self.health.group.iter().enumerate() {
            let key = format!("health.group[{i}].name");
            if !valid_name(&g.name) || !groups.insert(g.name.clone()) {
                return Err(invalid(
                    key,
                    &g.name,
                    "missing, invalid or duplicate",
                    "give each group a unique name of letters, digits, '-', '_' or '.'",
                ));
            }
            if !self.health.check.iter().any(|c| c.group.as_deref() == Some(g.name.as_str())) {
                return Err(invalid(
                    key,
                    &g.name,
                    "a group without checks",
                    "set group = \"NAME\" on the [[health.check]] entries it holds, or remove it",
                ));
            }
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
        let mut moved_macs = BTreeMap::new();
        for (i, v) in self.vip.iter().enumerate() {
            let k = |f: &str| format!("vip[{i}].{f}");
            // An interface has one MAC: two VIPs moving theirs onto it would fight over it (and
            // over the saved original).
            if v.mac.is_some()
                && let Some(j) = moved_macs.insert(v.interface.clone(), i)
            {
                return Err(invalid(
                    k("mac"),
                    v.mac.map(|m| m.to_string()).unwrap_or_default(),
                    &format!("vip[{j}] already moves a MAC onto interface {}", v.interface),
                    "give one VIP per interface the mac (the others follow it), or use another interface",
                ));
            }
            if v.interface.trim().is_empty() || v.interface.len() > 15 {
                return Err(invalid(
                    k("interface"),
                    &v.interface,
                    "not an interface name",
                    "e.g. interface = \"eth0\"",
                ));
            }
            positive(&k("announce_interval_ms"), v.announce_interval_ms)?;
        }
        positive("hooks.timeout_ms", self.hooks.timeout_ms)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
