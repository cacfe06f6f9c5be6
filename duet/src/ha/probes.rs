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
            config::CheckKind::Ping => {
                let secs = every.as_secs().max(1).to_string();
                let cmd = format!("ping -n -q -c 1 -W {secs} {}", c.target);
                matches!(shell(&cmd, &[], every + Duration::from_secs(1)).await, Ok(Some(0)))
            }
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
