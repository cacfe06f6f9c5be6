//! This node's VIPs from the configuration (the group itself is the `vip` crate's).

use super::*;

pub use vip::group::Vips;

/// The VIP group of `node`, reporting to `events`.
pub(super) fn vips(
    cfg: &Config,
    node: &str,
    events: &Arc<Journal>,
) -> Result<Vips, start::StartError> {
    let mut specs = Vec::new();
    for v in &cfg.vip {
        let addrs =
            std::iter::once(&v.address).chain(&v.aliases).map(|p| (p.addr, p.len)).collect();
        specs.push(vip::agent::VipSpec {
            interface: v.interface.clone(),
            addrs,
            mac: v.mac.map(|m| m.0),
            plan: vip::schedule::Plan {
                count: v.announce_count,
                interval: Duration::from_millis(v.announce_interval_ms),
                repeat_after: Duration::from_millis(v.announce_repeat_after_ms),
                refresh: Duration::from_millis(v.announce_refresh_ms),
            },
        });
    }
    let macs = Arc::new(crate::state::MacFiles::new(&cfg.cluster.state_dir, node));
    let events = Arc::clone(events);
    let report: vip::group::Report = Arc::new(move |what| events.push(what));
    Vips::new(specs, macs, report).map_err(start::StartError::Vips)
}
