//! The steps of a takeover or release: fence, promote or demote, VIPs, services, export;
//! and the shell runner they (and the health checks) use.

use super::*;

/// Runs one step of a takeover or release.
pub(super) async fn run_step(
    step: Step,
    host: &dyn Host,
    vips: &Vips,
    cfg: &Config,
    node: &str,
    peer: &str,
    events: &Arc<EventLog>,
) -> Outcome {
    let vols = host.volumes();
    match step {
        Step::Freeze | Step::Thaw => {
            for v in &vols {
                v.set_frozen(step == Step::Freeze);
            }
            Outcome::Ok
        }
        Step::Fence { delay } => {
            tokio::time::sleep(delay).await;
            let names: Vec<&str> = cfg.resource.iter().map(|r| r.name.as_str()).collect();
            let env = [
                ("DUET_NODE", node),
                ("DUET_PEER", peer),
                ("DUET_CLUSTER", cfg.cluster.name.as_str()),
                ("DUET_RESOURCES", &names.join(" ")),
            ];
            match shell(&cfg.fencing.fence_command, &env, FENCE_TIMEOUT).await {
                Ok(code) => Outcome::Fence(FenceVerdict::from_exit(code)),
                Err(e) => {
                    events.push(format!("fence command: {e}"));
                    Outcome::Fence(FenceVerdict::NotRun)
                }
            }
        }
        Step::DropPeer => {
            for v in &vols {
                v.drop_peer(Duration::from_secs(2)).await;
            }
            Outcome::Ok
        }
        Step::Promote { force } => {
            for v in &vols {
                if let Err(e) = v.promote(force).await {
                    return Outcome::Failed(e.0);
                }
            }
            Outcome::Ok
        }
        Step::Demote => {
            for v in &vols {
                if let Err(e) = v.demote().await {
                    return Outcome::Failed(e.0);
                }
            }
            Outcome::Ok
        }
        Step::ExportOpen => match host.open_exports().await {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Failed(crate::error_chain(&e)),
        },
        Step::ExportClose => {
            host.close_exports().await;
            Outcome::Ok
        }
        Step::VipUp | Step::VipDown => {
            let r = if step == Step::VipUp { vips.up().await } else { vips.down().await };
            match r {
                Ok(()) => Outcome::Ok,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        Step::ServicesMaster | Step::ServicesSlave => {
            let to_master = step == Step::ServicesMaster;
            let (stop, start) = if to_master {
                (config::Placement::Slave, config::Placement::Master)
            } else {
                (config::Placement::Master, config::Placement::Slave)
            };
            let mut errors = Vec::new();
            for s in cfg.service.iter().rev().filter(|s| s.placement == stop) {
                if let Err(e) = service(s, &s.stop, "stop", node).await {
                    errors.push(e.to_string());
                }
            }
            for s in cfg.service.iter().filter(|s| s.placement == start) {
                if let Err(e) = service(s, &s.start, "start", node).await {
                    errors.push(e.to_string());
                }
            }
            for e in &errors {
                events.push(e.clone());
            }
            if errors.is_empty() { Outcome::Ok } else { Outcome::Failed(errors.join("; ")) }
        }
    }
}

/// Why a command of ours (a service's start or stop, the fence command, a probe) failed.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("cannot run {cmd:?}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("waiting for {cmd:?}: {source}")]
    Wait { cmd: String, source: std::io::Error },
    #[error("{cmd:?} did not finish within {ms} ms; killed")]
    Timeout { cmd: String, ms: u128 },
    #[error("service {service}: {what} command exited with {code:?}")]
    Exit { service: String, what: &'static str, code: Option<i32> },
    #[error("service {service}: {what} command: {source}")]
    Service { service: String, what: &'static str, source: Box<ShellError> },
}

pub(super) async fn service(
    s: &config::Service,
    cmd: &str,
    what: &'static str,
    node: &str,
) -> Result<(), ShellError> {
    let env = [("DUET_SERVICE", s.name.as_str()), ("DUET_NODE", node)];
    match shell(cmd, &env, Duration::from_millis(s.timeout_ms)).await {
        Ok(Some(0)) => Ok(()),
        Ok(code) => Err(ShellError::Exit { service: s.name.clone(), what, code }),
        Err(e) => Err(ShellError::Service { service: s.name.clone(), what, source: Box::new(e) }),
    }
}

/// Runs `sh -c cmd` with a timeout; the exit code (None: killed by a signal).
pub async fn shell(
    cmd: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Option<i32>, ShellError> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).kill_on_drop(true).stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let cmd = cmd.to_string();
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(source) => return Err(ShellError::Spawn { cmd, source }),
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) => Ok(st.code()),
        Ok(Err(source)) => Err(ShellError::Wait { cmd, source }),
        Err(_) => {
            let _ = child.kill().await;
            Err(ShellError::Timeout { cmd, ms: timeout.as_millis() })
        }
    }
}
