//! Health checks: each probes on its interval and reports every change of verdict.

use super::*;

/// One health check, probing every `interval_ms`; reports each change of verdict.
pub(super) async fn health_check(
    generation: u64,
    i: usize,
    c: config::HealthCheck,
    node: String,
    back: mpsc::Sender<Back>,
    mut sd: watch::Receiver<bool>,
) {
    let mut h = Hysteresis::new(c.fall, c.rise);
    let every = Duration::from_millis(c.interval_ms.max(50));
    let mut pinger = match c.kind {
        config::CheckKind::Ping => Pinger::new(&c.target, i).await,
        _ => Err("not a ping check".into()),
    };
    let mut said = false;
    loop {
        let ok = match c.kind {
            config::CheckKind::Interface => {
                std::fs::read_to_string(format!("/sys/class/net/{}/carrier", c.target))
                    .is_ok_and(|s| s.trim() == "1")
            }
            config::CheckKind::Script => {
                let env = [("DUET_CHECK", c.name.as_str()), ("DUET_NODE", node.as_str())];
                matches!(
                    shell(&c.target, &env, every.max(Duration::from_secs(1))).await,
                    Ok(Some(0))
                )
            }
            config::CheckKind::Ping => match &mut pinger {
                Ok(p) => p.echo(every).await,
                Err(e) => {
                    if !said {
                        said = true;
                        tracing::error!(check = %c.name, "{e}: the check fails until the daemon can open one");
                    }
                    false
                }
            },
        };
        if let Some(v) = h.record(ok) {
            tracing::warn!(check = %c.name, healthy = v, "health check changed");
            if back.send(Back::Health(generation, i, v)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut sd) => return,
        }
    }
}

/// One ICMP echo target, through a socket of the daemon's own (an ICMP datagram socket where
/// `net.ipv4.ping_group_range` allows it, else a raw one: root or CAP_NET_RAW), not a spawned
/// `ping`: no fork per probe, no PATH, no locale in the way.
struct Pinger {
    pinger: surge_ping::Pinger,
    seq: u16,
    // Keeps the socket and its receiving task alive.
    _client: surge_ping::Client,
}

impl Pinger {
    async fn new(target: &str, index: usize) -> Result<Self, String> {
        let addr: std::net::IpAddr =
            target.parse().map_err(|_| format!("ping target {target:?} is not an IP address"))?;
        let kind = if addr.is_ipv4() { surge_ping::ICMP::V4 } else { surge_ping::ICMP::V6 };
        let client = surge_ping::Client::new(&surge_ping::Config::builder().kind(kind).build())
            .map_err(|e| format!("cannot open an ICMP socket for {addr}: {e}"))?;
        // Distinct per daemon and per check, so replies meant for another pinger are not ours.
        let low = |x: u64| u16::try_from(x & 0xffff).unwrap_or(0);
        let ident = low(u64::from(std::process::id()).wrapping_mul(31).wrapping_add(index as u64));
        let pinger = client.pinger(addr, surge_ping::PingIdentifier(ident)).await;
        Ok(Self { pinger, seq: 0, _client: client })
    }

    /// One echo request; true when its reply came within `timeout` (at least a second).
    async fn echo(&mut self, timeout: Duration) -> bool {
        self.seq = self.seq.wrapping_add(1);
        self.pinger.timeout(timeout.max(Duration::from_secs(1)));
        self.pinger.ping(surge_ping::PingSequence(self.seq), &[0u8; 16]).await.is_ok()
    }
}
