//! The daemon's wiring: open stores, bind listeners, serve NBD, answer the control socket and
//! the metrics endpoint, and stop gracefully on SIGTERM/SIGINT.
//!
//! Shutdown order, each step's reason:
//! 1. the shutdown watch flips: NBD listeners stop accepting, clients get `NBD_ESHUTDOWN` for new
//!    requests while in-flight ones complete (so nothing acknowledged is half-done);
//! 2. when every NBD connection has ended, each store is fdatasync'd (so every write that was
//!    acknowledged without FUA/FLUSH still reaches the disk before we exit);
//! 3. the control socket is removed (so a later `duet status` says "not running" rather than
//!    "connection refused" on a stale path).
//!
//! Its parts: [`node`] (the node's exports and resources, what the HA runtime drives),
//! [`socket`] (the control socket's server, and the CLI's client), [`http`] (the
//! HTTP endpoint: status page, `/status`, `/metrics`), [`metrics`] (the OpenMetrics text).

mod error;
pub mod hooks;
mod http;
pub mod metrics;
mod node;
pub mod notify;
mod scheduled;
mod socket;

use crate::config::runtime::{meta_of, node_id, read_secret, volume_config};
pub use crate::ha::ExportError;
pub use error::{CommandError, DaemonError};
use http::serve_http;
use node::{Group, State};
pub use socket::{CallError, call, follow};
use socket::{bind_control, serve_control};

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use replicator::nbd::negotiate::ExportInfo;
use replicator::nbd::server::{Export, MAX_PAYLOAD, Server, stopped};
use replicator::repl::link;
use replicator::repl::meta::Meta;
use replicator::repl::volume::read_marker;
use replicator::repl::volume::{Role, Volume};
use replicator::store::{EngineKind, Store, StoreOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::control::{self, Command, Response};
use crate::status::{NodeStatus, ResourceStatus};

/// Who may use the control socket: root, the daemon's own user, and the configured groups.
fn control_policy(cfg: &Config) -> Result<control::Policy, DaemonError> {
    let gid = |key: &'static str, name: &str| -> Result<Option<u32>, DaemonError> {
        if name.is_empty() {
            return Ok(None);
        }
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
            _ => Err(DaemonError::NoGroup { key, name: name.to_string() }),
        }
    };
    Ok(control::Policy {
        owner: nix::unistd::geteuid().as_raw(),
        admin: gid("cluster.admin_group", &cfg.cluster.admin_group)?,
        read: gid("cluster.read_group", &cfg.cluster.read_group)?,
    })
}

/// Runs the daemon for `node` until SIGTERM/SIGINT. Errors before serving are configuration or
/// environment problems and carry their reason.
pub async fn run(cfg: Config, node: String, config_path: PathBuf) -> Result<(), DaemonError> {
    replicator::fault::announce();
    // What `duet adjust` compares the file with later (read again: what was parsed came from it).
    let config_text = std::fs::read_to_string(&config_path).unwrap_or_default();
    let policy = control_policy(&cfg)?;
    let peer = cfg.peer_of(&node).map(str::to_string);
    let secret = match &peer {
        Some(_) => read_secret(&cfg)?,
        None => Vec::new(),
    };
    if peer.is_some() {
        let mut seen = std::collections::HashSet::new();
        for r in &cfg.resource {
            if !seen.insert(&r.nbd_listen) {
                return Err(DaemonError::SharedListen(r.nbd_listen));
            }
        }
    }
    // TLS certificates are read before any disk is opened: a wrong path stops the start early.
    let mut nbd_policies = Vec::new();
    for (i, r) in cfg.resource.iter().enumerate() {
        let tls = match r.nbd.tls_files() {
            None => None,
            Some(files) => Some(replicator::nbd::tls::server_config(&files).map_err(|source| {
                DaemonError::Tls { index: i, name: r.name.clone(), source: Box::new(source) }
            })?),
        };
        nbd_policies.push(r.nbd.policy(tls));
    }
    // The event log first: the volumes report to it from the start.
    let journal = Arc::new(
        crate::events::Journal::open(&cfg.cluster.state_dir, &node).map_err(DaemonError::Events)?,
    );
    if journal.damaged > 0 {
        tracing::warn!(
            "{} line(s) of the events file were not events (a torn write after a crash?) and were dropped",
            journal.damaged
        );
    }
    // The configuration as `duet adjust` last applied it: what hooks read when they run.
    let live = Arc::new(std::sync::Mutex::new(Arc::new(cfg.clone())));
    let (sd_tx, sd_rx) = watch::channel(false);
    let mut by_addr: Vec<(SocketAddr, replicator::nbd::server::Policy, Vec<Export>)> = Vec::new();
    let mut links = Vec::new();
    for (i, r) in cfg.resource.iter().enumerate() {
        let on = &r.on[&node];
        let engine = match r.io_engine {
            config::IoEngine::Auto => EngineKind::Auto,
            config::IoEngine::Uring => EngineKind::Uring,
            config::IoEngine::Threads => EngineKind::Threads,
        };
        let reflink = if r.sync == config::SyncMode::Scheduled && peer.is_some() {
            kept_state_possible(&cfg, i, r, &on.disk)?
        } else {
            false
        };
        let opts = StoreOptions { engine, direct: r.direct_io, read_only: false };
        let store = Arc::new(Store::open(&on.disk, opts).map_err(|source| DaemonError::Store {
            index: i,
            name: r.name.clone(),
            node: node.clone(),
            source,
        })?);
        tracing::info!(resource = %r.name, disk = %on.disk.display(), size = store.size(), engine = store.engine_name(), "store opened");
        let vol = match &peer {
            None => Volume::standalone(store),
            Some(p) => {
                let mut vc = volume_config(&cfg, r, &node, p, &secret)?;
                if let Some(s) = vc.scheduled.as_mut().filter(|_| !reflink) {
                    s.copy = None; // the before_resync_target hook keeps the state
                }
                // A disk detached after an I/O error stays so: neither its data nor its
                // metadata is read again until `duet attach` (or `create-md` on a new disk).
                let detached = vc.detached_marker.as_deref().and_then(read_marker);
                let listener = if node > *p {
                    Some(TcpListener::bind(vc.listen).await.map_err(|source| {
                        DaemonError::PeerListen {
                            addr: vc.listen,
                            index: i,
                            node: node.clone(),
                            source,
                        }
                    })?)
                } else {
                    None
                };
                let vol = match detached {
                    Some(f) => {
                        tracing::warn!(resource = %r.name, disk = %on.disk.display(), "the disk was detached after an I/O error ({} at {}: {}): Diskless; replace or check it, then `duet attach {}` with the daemon stopped", f.op, f.offset, f.error, r.name);
                        Volume::detached(vc, store, f)
                    }
                    None => {
                        let (placement, g) = meta_of(r, &node);
                        let (meta, loaded) =
                            Meta::open(&on.disk, &placement, g, node_id(&cfg, &node)).map_err(
                                |source| DaemonError::Meta {
                                    name: r.name.clone(),
                                    node: node.clone(),
                                    source,
                                },
                            )?;
                        Volume::replicated(vc, store, meta, loaded).map_err(|source| {
                            DaemonError::Volume { name: r.name.clone(), source }
                        })?
                    }
                };
                vol.set_before_resync_target(hooks::before_resync_target(
                    Arc::clone(&live),
                    node.clone(),
                    r.name.clone(),
                ));
                // Every line the link logs says which resource and which peer (an error-level
                // span: enabled whatever DUET_LOG lets through, so its fields always show).
                if let Some(sched) = r.schedule() {
                    tokio::spawn(scheduled::run(Arc::clone(&vol), sched, sd_rx.clone()));
                }
                let span = tracing::error_span!("link", resource = %r.name, peer = %p);
                let run = link::run(Arc::clone(&vol), listener, sd_rx.clone());
                links.push(tokio::spawn(tracing::Instrument::instrument(run, span)));
                vol
            }
        };
        let (j, name) = (Arc::clone(&journal), r.name.clone());
        vol.set_event_sink(replicator::repl::volume::EventSink(Box::new(move |what| {
            j.message(Some(&name), what.to_string());
        })));
        let info = ExportInfo {
            name: r.name.clone(),
            description: format!("duet resource {} on {node}", r.name),
            size: vol.size(),
            read_only: false,
            min_block: vol.store().min_block(),
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
        };
        let export = Export { info, vol, stats: Default::default() };
        let addr = r.nbd_listen;
        match by_addr.iter_mut().find(|(a, _, _)| *a == addr) {
            Some((_, _, v)) => v.push(export),
            None => by_addr.push((addr, nbd_policies[i].clone(), vec![export])),
        }
    }
    let groups: Vec<Group> = by_addr
        .into_iter()
        .map(|(addr, policy, exports)| Group {
            addr,
            data: tokio::runtime::Handle::current(),
            server: Server::new(exports, policy),
            serving: tokio::sync::Mutex::new(None),
        })
        .collect();
    for g in &groups {
        if g.all_primary() {
            g.open().await?;
        }
    }
    let state = Arc::new(State {
        cfg: cfg.clone(),
        node: node.clone(),
        started: Instant::now(),
        groups,
        shutting_down: AtomicBool::new(false),
        sd: sd_rx.clone(),
        ha: std::sync::OnceLock::new(),
        http: metrics::HttpCounters::default(),
        config_path,
        config_text: tokio::sync::Mutex::new(config_text),
        live,
        journal: Arc::clone(&journal),
        followers: Arc::new(tokio::sync::Semaphore::new(socket::FOLLOWERS)),
    });
    if peer.is_some() && crate::ha::enabled(&cfg) {
        let host: Arc<dyn crate::ha::Host> = Arc::clone(&state) as Arc<dyn crate::ha::Host>;
        let ha = crate::ha::start(&cfg, &node, &secret, host, sd_rx.clone()).await?;
        let _ = state.ha.set(ha);
    }
    let watcher = tokio::spawn(node::watch_states(Arc::clone(&state), sd_rx.clone()));
    tokio::spawn(hooks::run_hooks(Arc::clone(&state), sd_rx.clone()));
    // The HTTP endpoint before the control socket: whoever sees the socket (an operator, a
    // unit's ExecStartPost, a test) finds the endpoint up too.
    if let Some(addr) = cfg.metrics_listen(&node) {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Metrics { addr, source })?;
        tokio::spawn(serve_http(l, Arc::clone(&state), sd_rx.clone()));
    }
    let sock_path = cfg.control_socket(&node);
    let control = bind_control(&sock_path, policy.admin.is_some() || policy.read.is_some()).await?;
    let ctl_task = tokio::spawn(serve_control(control, Arc::clone(&state), policy, sd_rx.clone()));
    tracing::info!(node = %node, "duet daemon running");
    notify::ready(&state.summary());
    if state.ha.get().is_none() {
        // Alone: the main runtime pets the watchdog (in a pair the cluster manager's thread
        // does, see `ha`).
        if let Some(mut w) = notify::Watchdog::from_env() {
            let mut sd = sd_rx.clone();
            tokio::spawn(async move {
                let mut t =
                    tokio::time::interval(w.every().max(std::time::Duration::from_millis(10)));
                loop {
                    tokio::select! {
                        _ = t.tick() => w.tick(std::time::Instant::now()),
                        _ = stopped(&mut sd) => return,
                    }
                }
            });
        }
    }

    wait_for_signal(&state).await?;
    notify::stopping();
    handover_before_stop(&state).await;
    release_at_stop(&state).await;
    tracing::info!("shutting down: finishing in-flight requests");
    state.shutting_down.store(true, Ordering::Relaxed);
    for g in &state.groups {
        // Requests a failing disk holds (`on_io_error = "freeze"`) fail now: the drain waits
        // for them.
        for e in g.server.exports() {
            e.vol.give_up_held_io();
        }
        let _ = g.serving.lock().await.as_ref().map(|s| s.0.send(true));
    }
    for g in &state.groups {
        g.close().await;
    }
    // The peer links say goodbye after the exports are drained (nothing left to replicate).
    let _ = sd_tx.send(true);
    for l in links {
        let _ = l.await;
    }
    let mut failed = false;
    for g in &state.groups {
        for e in g.server.exports() {
            e.vol.close().await;
            if let Err(errno) = e.vol.store().sync_now() {
                tracing::error!(resource = %e.info.name, error = %errno, "final fdatasync failed");
                failed = true;
            }
        }
    }
    let _ = ctl_task.await;
    let _ = watcher.await;
    journal.close();
    let _ = std::fs::remove_file(&sock_path);
    if failed {
        return Err(DaemonError::FinalFlush);
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A master stopped on purpose (SIGTERM: `systemctl stop`) hands the role to its peer first,
/// as a make-slave would, so clients move at once instead of after the peer's deadtime. If the
/// peer cannot take over (unreachable, not in sync), the stop goes on and says why.
async fn handover_before_stop(state: &State) {
    use crate::ha::Host as _;
    let Some(ha) = state.ha.get() else { return };
    let _ = ha.requests.send(crate::ha::Request::Stopping).await;
    if !state.volumes().iter().any(|v| v.role() == Role::Primary) {
        return;
    }
    tracing::info!("stopping the master: handing the role to the peer first");
    ha.events.push("stopping the master: handing the role to the peer first".into());
    let (tx, rx) = tokio::sync::oneshot::channel();
    if ha.requests.send(crate::ha::Request::MakeSlave { reply: tx }).await.is_err() {
        return;
    }
    let why = match tokio::time::timeout(crate::ha::SWITCHOVER_TIMEOUT, rx).await {
        Ok(Ok(Ok(m))) => {
            tracing::info!("handed over before stopping: {m}");
            return;
        }
        Ok(Ok(Err(e))) => e.to_string(),
        Ok(Err(_)) | Err(_) => "no answer in time".to_string(),
    };
    // Nobody takes over: what makes this node the master goes with it (see `release_at_stop`).
    let msg = format!(
        "stopping without a handover ({why}): closing the exports, stopping the services, removing the VIPs"
    );
    tracing::warn!("{msg}");
    ha.events.push(msg);
}

/// Whatever the node still holds goes with the daemon, so nothing is left answering for a
/// daemon that is gone: a master that could not hand over its exports, services, VIPs and moved
/// MAC; a slave its services (`slave`, `both`).
async fn release_at_stop(state: &State) {
    let Some(ha) = state.ha.get() else { return };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if ha.requests.send(crate::ha::Request::ReleaseLocal { reply: tx }).await.is_err() {
        return;
    }
    let msg = match tokio::time::timeout(crate::ha::SWITCHOVER_TIMEOUT, rx).await {
        Ok(Ok(failed)) if failed.is_empty() => {
            "released locally: exports closed, services stopped, VIPs removed (MAC restored)"
                .to_string()
        }
        Ok(Ok(failed)) => format!("released locally, with failures: {}", failed.join("; ")),
        Ok(Err(_)) | Err(_) => "releasing locally did not finish in time".to_string(),
    };
    tracing::info!("{msg}");
    ha.events.push(msg);
}

/// Waits for SIGTERM or SIGINT; SIGHUP meanwhile reloads the configuration (`duet adjust`).
async fn wait_for_signal(state: &State) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                notify::reloading();
                if let Err(e) = state.reload().await {
                    tracing::error!("SIGHUP: {e}");
                    state.journal.push(format!("SIGHUP: {e}"));
                }
                notify::ready(&state.summary());
            }
        }
    }
}

/// A scheduled resource's disk can keep its consistent state: a file on a filesystem with
/// reflinks (probed next to it: `Ok(true)`), or any disk with a `before_resync_target` hook
/// (which keeps it the operator's way, an LVM snapshot say: `Ok(false)`).
fn kept_state_possible(
    cfg: &Config,
    index: usize,
    r: &config::Resource,
    disk: &std::path::Path,
) -> Result<bool, DaemonError> {
    let hook = !cfg.hooks.before_resync_target.trim().is_empty();
    let fail = |why: String| DaemonError::NoKeptState { index, name: r.name.clone(), why };
    if !disk.is_file() {
        if hook {
            return Ok(false);
        }
        return Err(fail(format!(
            "{} is not a regular file (a reflink copy needs one); set hooks.before_resync_target to a command that keeps it (an LVM snapshot, say), or put the disk in a file on XFS (mkfs.xfs -m reflink=1) or btrfs",
            disk.display()
        )));
    }
    let dir = disk.parent().unwrap_or(std::path::Path::new("/"));
    match replicator::repl::volume::probe_reflink(dir) {
        Ok(()) => Ok(true),
        Err(e) if hook => {
            tracing::warn!(resource = %r.name, dir = %dir.display(), error = %e, "no reflinks here: the before_resync_target hook keeps the consistent state, and a failover during a catch-up needs it restored by hand");
            Ok(false)
        }
        Err(e) => Err(fail(format!(
            "{} cannot hold a reflink copy of {} (FICLONE: {e}); put the disk file on XFS (mkfs.xfs -m reflink=1) or btrfs, or set hooks.before_resync_target to a command that keeps it",
            dir.display(),
            disk.display()
        ))),
    }
}
