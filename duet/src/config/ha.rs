//! `[fencing]`, `[health]`, `[[service]]` and `[hooks]`.

use super::*;

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
    /// `[[health.group]]`.
    pub group: Vec<HealthGroup>,
}

/// How many of a group's checks must fail for the group to fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Require {
    /// One failing check fails the group (a check outside any group is a group of one).
    #[default]
    Any,
    /// The group fails only when every one of its checks fails ("the Internet is down" when
    /// no uplink answers, not when one router does not).
    All,
}

impl Require {
    /// The word in the configuration.
    pub fn word(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::All => "all",
        }
    }
}

/// `[[health.group]]`: checks judged together.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthGroup {
    pub name: String,
    #[serde(default)]
    pub require: Require,
}

impl Health {
    /// Healthy, given each check's verdict (in `check` order): no group failed. A check outside
    /// any group fails the node by itself.
    pub fn healthy(&self, ok: &[bool]) -> bool {
        let verdict = |i: usize| ok.get(i).copied().unwrap_or(true);
        let single = self.check.iter().enumerate().filter(|(_, c)| c.group.is_none());
        if single.into_iter().any(|(i, _)| !verdict(i)) {
            return false;
        }
        self.group.iter().all(|g| {
            let mut members = self
                .check
                .iter()
                .enumerate()
                .filter(|(_, c)| c.group.as_deref() == Some(g.name.as_str()))
                .map(|(i, _)| verdict(i));
            match g.require {
                Require::Any => members.all(|v| v),
                Require::All => members.any(|v| v),
            }
        })
    }
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
    /// The `[[health.group]]` this check belongs to (none: it counts alone).
    #[serde(default)]
    pub group: Option<String>,
}

fn default_1000() -> u64 {
    1000
}
pub(super) fn default_5() -> u32 {
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

/// `[hooks]`: commands run (`/bin/sh -c`) when something happens, with `DUET_*` variables
/// (DRBD's handlers and keepalived's notify scripts are the models). `""`: none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hooks {
    /// Split brain detected on a resource (`DUET_RESOURCE`, `DUET_REASON`).
    pub split_brain: String,
    /// An online verify found blocks that differ (`DUET_OUT_OF_SYNC_BYTES`).
    pub out_of_sync: String,
    /// Before this node starts a resync as its target; the resync waits for it, and a non-zero
    /// exit drops the connection (as DRBD's before-resync-target: a snapshot of the old data).
    pub before_resync_target: String,
    /// A resync this node was the target of finished: its data is UpToDate.
    pub after_resync_target: String,
    /// This node's running role changed (`DUET_OLD_ROLE`, `DUET_NEW_ROLE`: master | slave);
    /// without a cluster manager, a resource's role (Primary | Secondary).
    pub role_change: String,
    /// Split brain under `call-pri-lost-after-sb` on the Primary whose data the policy
    /// discards (DRBD's pri-lost-after-sb handler: typically demote this node, or reboot it);
    /// `DUET_REASON`.
    pub pri_lost_after_sb: String,
    /// The local disk failed (`DUET_DISK`, `DUET_ACTION`: detached, or passed to the client and
    /// why; `DUET_REASON`: what failed, where, the error), as DRBD's local-io-error handler.
    pub io_error: String,
    /// How long a hook may run before its process group is killed.
    pub timeout_ms: u64,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            split_brain: String::new(),
            out_of_sync: String::new(),
            before_resync_target: String::new(),
            after_resync_target: String::new(),
            role_change: String::new(),
            pri_lost_after_sb: String::new(),
            io_error: String::new(),
            timeout_ms: default_30000(),
        }
    }
}
