//! A node's VIPs as one group: acquire them all with their announcements (a burst, a second
//! burst, an optional refresh) and an ARP probe for a host that already answers for one;
//! release them all; announce again. What happens is reported through a callback (the
//! daemon's event log), so this crate knows nothing of it.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{Agent, VipError, VipSpec};

/// Where the group's events go (one line each).
pub type Report = Arc<dyn Fn(String) + Send + Sync>;

/// Some VIPs of the group could not be acquired or released; each reason, in order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Failed(pub Vec<String>);

/// The VIPs of this node and what announces them.
pub struct Vips {
    agent: Option<Agent>,
    specs: Vec<VipSpec>,
    announcers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    report: Report,
    /// Whether each spec's addresses are on this node (acquired and not released since).
    held: Mutex<Vec<bool>>,
}

/// One VIP of the group as `duet status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub interface: String,
    /// `address/prefix`, the first one the VIP's own, the rest its aliases.
    pub addresses: Vec<String>,
    /// Acquired by this node and not released since.
    pub here: bool,
}

impl std::fmt::Debug for Vips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vips").field("specs", &self.specs).finish_non_exhaustive()
    }
}

impl Vips {
    /// The group of `specs`; the NIC's own MACs are kept in `macs`. No agent (and no netlink
    /// socket) without a VIP.
    pub fn new(
        specs: Vec<VipSpec>,
        macs: Arc<dyn crate::agent::MacStore>,
        report: Report,
    ) -> Result<Self, VipError> {
        let agent = if specs.is_empty() { None } else { Some(Agent::new(macs)?) };
        let held = Mutex::new(vec![false; specs.len()]);
        Ok(Self { agent, specs, announcers: Mutex::new(Vec::new()), report, held })
    }

    /// Each VIP and whether this node holds it.
    pub fn held(&self) -> Vec<Held> {
        let held = self.held.lock().expect("held poisoned");
        self.specs
            .iter()
            .zip(held.iter())
            .map(|(spec, here)| Held {
                interface: spec.interface.clone(),
                addresses: spec.addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
                here: *here,
            })
            .collect()
    }

    fn set_held(&self, i: usize, here: bool) {
        if let Some(h) = self.held.lock().expect("held poisoned").get_mut(i) {
            *h = here;
        }
    }

    fn stop_announcing(&self) {
        for h in self.announcers.lock().expect("announcers poisoned").drain(..) {
            h.abort();
        }
    }

    fn announce(&self, index: u32, mac: crate::packets::Mac, spec: &VipSpec) {
        let frames = crate::agent::announcements(spec, mac);
        let plan = spec.plan;
        let name = spec.interface.clone();
        let report = Arc::clone(&self.report);
        let h = tokio::spawn(async move {
            let sock = match crate::agent::RawSocket::open(index, crate::packets::ETH_P_ARP, &name)
            {
                Ok(s) => s,
                Err(e) => {
                    report(format!("VIP announcements on {name} impossible: {e}"));
                    return;
                }
            };
            let mut sch = crate::schedule::Schedule::new(plan, Instant::now());
            let mut errors = 0u32;
            while let Some(t) = sch.next() {
                tokio::time::sleep_until(t.into()).await;
                for f in &frames {
                    if sock.send(f).is_err() {
                        errors += 1;
                    }
                }
                sch.sent(Instant::now());
            }
            if errors > 0 {
                report(format!("{errors} VIP announcement(s) on {name} could not be sent"));
            }
        });
        self.announcers.lock().expect("announcers poisoned").push(h);
    }

    /// Acquires every VIP and starts its announcements; reports a host that already answers
    /// for a VIP loudly (the takeover goes on: the cluster manager decided).
    pub async fn up(&self) -> Result<(), Failed> {
        let Some(agent) = &self.agent else { return Ok(()) };
        self.stop_announcing();
        let mut errors = Vec::new();
        for (i, spec) in self.specs.iter().enumerate() {
            let probe = match (agent.link(&spec.interface).await, spec.addrs.first()) {
                (Ok((index, mac)), Some((IpAddr::V4(ip), _))) => {
                    let (name, ip) = (spec.interface.clone(), *ip);
                    let mine = spec.mac.unwrap_or(mac);
                    Some(tokio::task::spawn_blocking(move || {
                        crate::agent::probe(index, &name, mine, ip, Duration::from_millis(300))
                            .map(|r| (ip, r))
                    }))
                }
                _ => None,
            };
            match agent.acquire(spec).await {
                Ok((index, mac)) => {
                    self.set_held(i, true);
                    self.announce(index, mac, spec);
                    let list: Vec<String> =
                        spec.addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect();
                    (self.report)(format!(
                        "VIP {} up on {} (MAC {})",
                        list.join(", "),
                        spec.interface,
                        crate::packets::mac_string(&mac)
                    ));
                }
                Err(e) => errors.push(e.to_string()),
            }
            if let Some(p) = probe {
                let report = Arc::clone(&self.report);
                tokio::spawn(async move {
                    if let Ok(Ok((ip, Some(other)))) = p.await {
                        let msg = format!(
                            "DUPLICATE ADDRESS: host {} also answers for VIP {ip}",
                            crate::packets::mac_string(&other)
                        );
                        tracing::error!("{msg}");
                        report(msg);
                    }
                });
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(Failed(errors)) }
    }

    /// Releases every VIP (addresses gone, MAC restored).
    pub async fn down(&self) -> Result<(), Failed> {
        let Some(agent) = &self.agent else { return Ok(()) };
        self.stop_announcing();
        let mut errors = Vec::new();
        for (i, spec) in self.specs.iter().enumerate() {
            match agent.release(spec).await {
                Ok(()) => {
                    self.set_held(i, false);
                    (self.report)(format!("VIP on {} released", spec.interface));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(Failed(errors)) }
    }

    /// Sends the announcements again (after winning back from a dual-master episode).
    pub async fn reannounce(&self) {
        let Some(agent) = &self.agent else { return };
        self.stop_announcing();
        for spec in &self.specs {
            if let Ok((index, mac)) = agent.link(&spec.interface).await {
                self.announce(index, spec.mac.unwrap_or(mac), spec);
            }
        }
    }
}
