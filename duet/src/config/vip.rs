//! `[[vip]]`, and the address and MAC syntax it uses.

use super::ha::default_5;
use super::*;

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

/// Parses `ADDR/PREFIX`.
pub fn parse_prefix(v: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = v.split_once('/')?;
    let ip: IpAddr = a.parse().ok()?;
    let p: u8 = p.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (p <= max).then_some((ip, p))
}

pub(super) fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}
