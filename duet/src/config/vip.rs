//! `[[vip]]` (its address and MAC syntaxes are in [`super::syntax`]).

use super::ha::default_5;
use super::*;

/// `[[vip]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub interface: String,
    pub address: IpPrefix,
    #[serde(default)]
    pub aliases: Vec<IpPrefix>,
    /// `""` (the default): the interface keeps its own MAC.
    #[serde(default, deserialize_with = "syntax::mac_or_none")]
    pub mac: Option<Mac>,
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
