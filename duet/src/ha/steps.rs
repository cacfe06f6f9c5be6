//! The steps of a takeover or release: fence, promote or demote, VIPs, services, export;
//! and the shell runner they (and the health checks) use.

use super::*;

/// What a step works with: a snapshot of the loop's state taken when the step starts.
pub(super) struct StepCtx {
    pub(super) host: Arc<dyn Host>,
    pub(super) vips: Arc<Vips>,
    pub(super) cfg: Config,
    pub(super) node: String,
    pub(super) peer: String,
    pub(super) events: Arc<Journal>,
    pub(super) status: Arc<Mutex<ClusterStatus>>,
}

/// Runs one step of a takeover or release.
pub(super) async fn run_step(step: Step, ctx: &StepCtx) -> Outcome {
    let StepCtx { host, vips, cfg, node, peer, events, status } = ctx;
    let (node, peer) = (node.as_str(), peer.as_str());
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
            let record = |name: &str, state: String| {
                let mut st = status.lock().expect("status poisoned");
                if let Some(x) = st.services.iter_mut().find(|x| x.name == name) {
                    x.state = state;
                }
            };
            for s in cfg.service.iter().rev().filter(|s| s.placement == stop) {
                match service(s, &s.stop, "stop", node).await {
                    Ok(()) => record(&s.name, "stopped".into()),
                    Err(e) => {
                        record(&s.name, format!("stop failed: {e}"));
                        errors.push(e.to_string());
                    }
                }
            }
            for s in cfg.service.iter().filter(|s| s.placement == start) {
                match service(s, &s.start, "start", node).await {
                    Ok(()) => record(&s.name, "running".into()),
                    Err(e) => {
                        record(&s.name, format!("start failed: {e}"));
                        errors.push(e.to_string());
                    }
                }
            }
            for e in &errors {
                events.push(e.clone());
            }
            if errors.is_empty() { Outcome::Ok } else { Outcome::Failed(errors.join("; ")) }
        }
    }
}

/// At start: the services that run on a slave (`placement = "slave"`) and everywhere
/// (`"both"`) start, as the node starts as a slave; a takeover later stops the slave's ones.
pub(super) async fn boot_services(ctx: &StepCtx) {
    for s in ctx
        .cfg
        .service
        .iter()
        .filter(|s| matches!(s.placement, config::Placement::Slave | config::Placement::Both))
    {
        let state = match service(s, &s.start, "start", &ctx.node).await {
            Ok(()) => "running".to_string(),
            Err(e) => {
                ctx.events.push(e.to_string());
                format!("start failed: {e}")
            }
        };
        let mut st = ctx.status.lock().expect("status poisoned");
        if let Some(x) = st.services.iter_mut().find(|x| x.name == s.name) {
            x.state = state;
        }
    }
}

/// A stopping node gives up what it holds here: its exports (closed after the requests in
/// flight), every service running (in reverse order: a master's, a slave's, `both`), its VIPs
/// (a moved MAC restored). Returns what failed; each step is tried whatever the others did.
/// Idempotent: after a handover only the slave's services are left to stop.
pub(super) async fn release_local(ctx: &StepCtx) -> Vec<String> {
    let mut failed = Vec::new();
    ctx.host.close_exports().await;
    let running: Vec<String> = {
        let st = ctx.status.lock().expect("status poisoned");
        st.services.iter().filter(|x| x.state == "running").map(|x| x.name.clone()).collect()
    };
    for s in ctx.cfg.service.iter().rev().filter(|s| running.contains(&s.name)) {
        let r = service(s, &s.stop, "stop", &ctx.node).await;
        let state = match &r {
            Ok(()) => "stopped".to_string(),
            Err(e) => {
                failed.push(e.to_string());
                format!("stop failed: {e}")
            }
        };
        let mut st = ctx.status.lock().expect("status poisoned");
        if let Some(x) = st.services.iter_mut().find(|x| x.name == s.name) {
            x.state = state;
        }
    }
    if let Err(e) = ctx.vips.down().await {
        failed.extend(e.0);
    }
    failed
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
///
/// The hook runs in a process group of its own, and a timeout kills the group: what the shell
/// started (an `ipmitool`, an `ssh`) dies with it, so a retry never runs beside a fence still
/// going. It inherits descriptors 0-2 only (stdin is /dev/null): no socket, serial port or
/// disk of the daemon's.
pub async fn shell(
    cmd: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Option<i32>, ShellError> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).kill_on_drop(true).stdin(std::process::Stdio::null()).process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    // SAFETY: the closure runs in the child between fork and exec and makes one
    // async-signal-safe system call; it touches no memory of the parent's.
    unsafe {
        c.pre_exec(|| {
            // Every descriptor from 3 up closes at exec, whoever opened it without O_CLOEXEC.
            let r = libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
    let cmd = cmd.to_string();
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(source) => return Err(ShellError::Spawn { cmd, source }),
    };
    let group = child.id().and_then(|p| i32::try_from(p).ok()).map(nix::unistd::Pid::from_raw);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) => Ok(st.code()),
        Ok(Err(source)) => Err(ShellError::Wait { cmd, source }),
        Err(_) => {
            if let Some(g) = group {
                let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.kill().await;
            Err(ShellError::Timeout { cmd, ms: timeout.as_millis() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(marker: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
    }

    /// A fence hook that starts a long command and times out: the command dies with the shell.
    #[tokio::test]
    async fn a_timed_out_hook_leaves_nothing_behind() {
        // A marker no other process has in its command line.
        let marker = format!("600.{}", std::process::id());
        let cmd = format!("sleep {marker} & sleep {marker}; true");
        let r = shell(&cmd, &[], Duration::from_millis(300)).await;
        assert!(matches!(r, Err(ShellError::Timeout { .. })), "{r:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while running(&marker) {
            assert!(std::time::Instant::now() < deadline, "a sleep {marker} outlived its hook");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A hook sees descriptors 0-2 and nothing of the daemon's, even one opened without
    /// O_CLOEXEC.
    #[tokio::test]
    async fn a_hook_inherits_only_the_standard_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let leak = nix::fcntl::open(
            &dir.path().join("leak"),
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_RDWR,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let out = dir.path().join("fds");
        let o = out.display().to_string();
        // `exec >` moves the shell's stdout for good (no saved copy); then ls, a child, lists
        // the shell's descriptors (its own directory descriptor is in its own process).
        let list = "exec > \"$OUT\"; ls /proc/$$/fd";
        let code = shell(list, &[("OUT", &o)], Duration::from_secs(10)).await.unwrap();
        assert_eq!(code, Some(0));
        let fds: Vec<String> =
            std::fs::read_to_string(&out).unwrap().split_whitespace().map(String::from).collect();
        assert_eq!(fds, ["0", "1", "2"], "descriptor {leak:?} of the daemon's leaked");
    }
}
