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

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use replicator::nbd::negotiate::ExportInfo;
use replicator::nbd::server::{Export, MAX_PAYLOAD, Server, stopped};
use replicator::ratectl;
use replicator::repl::completion::Protocol;
use replicator::repl::handshake;
use replicator::repl::link;
use replicator::repl::meta::{Geometry, Meta, Placement};
use replicator::repl::policy::Policies;
use replicator::repl::volume::{Role, Volume, VolumeConfig};
use replicator::repl::wire::Digest;
use replicator::store::{EngineKind, Store, StoreOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::control::{self, Command, Response};
use crate::status::{NodeStatus, ResourceStatus};

/// Prometheus metrics: name, help, type, and how to read the value from a resource's status.
type Metric = (&'static str, &'static str, &'static str, fn(&ResourceStatus) -> Option<u64>);
const METRICS: [Metric; 17] = [
    ("size_bytes", "Size of the volume.", "gauge", |r| Some(r.size_bytes)),
    ("nbd_clients", "NBD clients connected.", "gauge", |r| Some(r.stats.clients_connected)),
    ("nbd_reads_total", "NBD reads served.", "counter", |r| Some(r.stats.reads)),
    ("nbd_writes_total", "NBD writes served.", "counter", |r| Some(r.stats.writes)),
    ("nbd_read_bytes_total", "Bytes read by NBD clients.", "counter", |r| Some(r.stats.bytes_read)),
    ("nbd_written_bytes_total", "Bytes written by NBD clients.", "counter", |r| {
        Some(r.stats.bytes_written)
    }),
    ("nbd_flushes_total", "NBD flushes.", "counter", |r| Some(r.stats.flushes)),
    ("nbd_request_errors_total", "NBD requests answered with an error.", "counter", |r| {
        Some(r.stats.request_errors)
    }),
    (
        "nbd_protocol_errors_total",
        "NBD connections closed for protocol violations.",
        "counter",
        |r| Some(r.stats.protocol_errors),
    ),
    ("out_of_sync_bytes", "Bytes marked out of sync with the peer.", "gauge", |r| {
        r.replication.as_ref().map(|x| x.out_of_sync_bytes)
    }),
    ("replicated_bytes_total", "Bytes of writes sent to the peer.", "counter", |r| {
        r.replication.as_ref().map(|x| x.sent_data_bytes)
    }),
    ("resync_sent_bytes_total", "Resync bytes sent.", "counter", |r| {
        r.replication.as_ref().map(|x| x.resync_sent_bytes)
    }),
    ("resync_received_bytes_total", "Resync bytes received.", "counter", |r| {
        r.replication.as_ref().map(|x| x.resync_received_bytes)
    }),
    ("peer_connected", "1 when the peer link is up.", "gauge", |r| {
        r.replication.as_ref().map(|x| {
            u64::from(!matches!(
                x.connection,
                replicator::repl::volume::ConnState::StandAlone
                    | replicator::repl::volume::ConnState::Connecting
            ))
        })
    }),
    ("peer_errors_total", "Peer connections dropped for errors or refusals.", "counter", |r| {
        r.replication.as_ref().map(|x| x.peer_errors)
    }),
    (
        "slow_writes_total",
        "Page-cache writes that took over 50 ms (a slow disk).",
        "counter",
        |r| r.replication.as_ref().map(|x| x.slow_writes),
    ),
    (
        "peer_unflushed_bytes",
        "Bytes the peer acknowledged that no peer flush covers yet (resynced after its power loss).",
        "gauge",
        |r| r.replication.as_ref().map(|x| x.peer_unflushed_bytes),
    ),
];

/// An open export: its stop signal, its task, and the address it is bound to.
type Serving = (watch::Sender<bool>, tokio::task::JoinHandle<()>, SocketAddr);

/// One NBD listener and the resources it exports. It is open while every one of them is
/// Primary (a single node's resources always are; in a pair each resource has its own listener).
struct Group {
    addr: SocketAddr,
    /// The data path's runtime.
    data: tokio::runtime::Handle,
    server: Arc<Server>,
    serving: tokio::sync::Mutex<Option<Serving>>,
}

impl Group {
    fn all_primary(&self) -> bool {
        self.server.exports().iter().all(|e| e.vol.role() == Role::Primary)
    }

    /// Opens the export (binds and serves) if it is not open. The listener and its connections
    /// live on the data path's runtime, whichever thread asks (the cluster manager has its own).
    async fn open(&self) -> anyhow::Result<()> {
        let mut s = self.serving.lock().await;
        if s.is_some() {
            return Ok(());
        }
        let names: Vec<String> =
            self.server.exports().iter().map(|e| e.info.name.clone()).collect();
        let addr = self.addr;
        let (tx, rx) = watch::channel(false);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let server = Arc::clone(&self.server);
        let task = self.data.spawn(async move {
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            let _ = bound_tx.send(listener.local_addr());
            server.serve(listener, rx).await;
        });
        let bound = bound_rx.await.context("the NBD listener's task ended")?.with_context(|| {
            format!(
                "cannot listen for NBD on {addr} (nbd_listen of {}): is another server using it?",
                names.join(", ")
            )
        })?;
        tracing::info!(%bound, exports = ?names, "serving NBD");
        *s = Some((tx, task, bound));
        Ok(())
    }

    /// Closes the export: new requests are refused, in-flight ones finish, clients are gone.
    async fn close(&self) {
        let taken = self.serving.lock().await.take();
        if let Some((tx, task, bound)) = taken {
            let _ = tx.send(true);
            let _ = task.await;
            tracing::info!(%bound, "NBD export closed");
        }
    }

    async fn bound(&self) -> Option<SocketAddr> {
        self.serving.lock().await.as_ref().map(|s| s.2)
    }
}

/// Everything the control socket and metrics need to describe this node.
struct State {
    cfg: Config,
    node: String,
    started: Instant,
    groups: Vec<Group>,
    shutting_down: AtomicBool,
    sd: watch::Receiver<bool>,
    /// The cluster manager, when heartbeat links are configured.
    ha: std::sync::OnceLock<crate::ha::Ha>,
}

impl crate::ha::Host for State {
    fn volumes(&self) -> Vec<Arc<Volume>> {
        self.cfg
            .resource
            .iter()
            .filter_map(|r| self.find(&r.name).map(|(_, e)| Arc::clone(&e.vol)))
            .filter(|v| v.config().is_some())
            .collect()
    }

    fn open_exports(&self) -> futures_util::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for g in &self.groups {
                if g.all_primary() && !self.shutting_down.load(Ordering::Relaxed) {
                    g.open().await.map_err(|e| format!("{e:#}"))?;
                }
            }
            Ok(())
        })
    }

    fn close_exports(&self) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            for g in &self.groups {
                g.close().await;
            }
        })
    }
}

impl State {
    fn find(&self, name: &str) -> Option<(&Group, &Export)> {
        self.groups
            .iter()
            .find_map(|g| g.server.exports().iter().find(|e| e.info.name == name).map(|e| (g, e)))
    }

    async fn status(&self) -> NodeStatus {
        let mut resources = Vec::new();
        for r in &self.cfg.resource {
            let Some((g, e)) = self.find(&r.name) else { continue };
            let bound = g.bound().await;
            let repl = e.vol.config().map(|_| e.vol.status());
            let (role, disk, conn) = match &repl {
                Some(s) => (
                    format!("{:?}", s.role),
                    format!("{:?}", s.disk),
                    format!("{:?}", s.connection),
                ),
                None => ("Primary".into(), "UpToDate".into(), "StandAlone".into()),
            };
            resources.push(ResourceStatus {
                name: r.name.clone(),
                role,
                disk_state: disk,
                connection: conn,
                protocol: format!("{:?}", r.protocol),
                disk: e.vol.store().path().display().to_string(),
                size_bytes: e.vol.size(),
                io_engine: e.vol.store().engine_name().into(),
                direct_io: e.vol.store().direct(),
                nbd_listen: bound.map(|a| a.to_string()),
                exporting: bound.is_some() && !self.shutting_down.load(Ordering::Relaxed),
                stats: e.stats.snapshot(),
                replication: repl,
            });
        }
        NodeStatus {
            node: self.node.clone(),
            cluster: self.cfg.cluster.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            peer: self.cfg.peer_of(&self.node).map(str::to_string),
            shutting_down: self.shutting_down.load(Ordering::Relaxed),
            resources,
            ha: self.ha.get().map(|h| h.status.lock().expect("status poisoned").clone()),
        }
    }

    /// The merged event log: the cluster manager's and every resource's, oldest first.
    fn events(&self, since_ms: u64) -> Vec<crate::ha::LogEntry> {
        let since = since_ms as f64 / 1000.0;
        let mut all = self.ha.get().map(|h| h.events.since(since)).unwrap_or_default();
        for r in &self.cfg.resource {
            let Some((_, e)) = self.find(&r.name) else { continue };
            if e.vol.config().is_none() {
                continue;
            }
            for ev in e.vol.events() {
                if ev.at > since {
                    all.push(crate::ha::LogEntry {
                        at: ev.at,
                        what: format!("{}: {}", r.name, ev.what),
                    });
                }
            }
        }
        all.sort_by(|a, b| a.at.total_cmp(&b.at));
        all
    }

    /// make-master / make-slave through the cluster manager.
    async fn switchover(&self, master: bool, force: bool) -> Result<serde_json::Value, String> {
        let ha = self.ha.get().ok_or(
            "the cluster manager is not running (no [[heartbeat.link]] configured): use `duet primary` / `duet secondary`",
        )?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = if master {
            crate::ha::Request::MakeMaster { force, reply: tx }
        } else {
            crate::ha::Request::MakeSlave { reply: tx }
        };
        ha.requests.send(req).await.map_err(|_| "the cluster manager stopped".to_string())?;
        match tokio::time::timeout(
            crate::ha::SWITCHOVER_TIMEOUT + std::time::Duration::from_secs(15),
            rx,
        )
        .await
        {
            Ok(Ok(Ok(m))) => Ok(serde_json::json!({ "cluster": m })),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err("the cluster manager dropped the request".into()),
            Err(_) => Err("the switchover did not finish in time; see `duet events`".into()),
        }
    }

    async fn metrics(&self) -> String {
        let st = self.status().await;
        let mut o = String::new();
        for (name, help, kind, value) in METRICS {
            o.push_str(&format!("# HELP duet_{name} {help}\n# TYPE duet_{name} {kind}\n"));
            for r in &st.resources {
                let Some(v) = value(r) else { continue };
                o.push_str(&format!(
                    "duet_{name}{{node=\"{}\",resource=\"{}\"}} {v}\n",
                    st.node, r.name
                ));
            }
        }
        o
    }

    /// Runs a role or connection command on the named resource (or all of them).
    async fn act(
        &self,
        resource: Option<&str>,
        cmd: &Command,
    ) -> Result<serde_json::Value, String> {
        let targets: Vec<(&Group, &Export)> = match resource {
            Some(n) => vec![
                self.find(n)
                    .ok_or_else(|| format!("no resource named {n:?} in the configuration"))?,
            ],
            None => self
                .groups
                .iter()
                .flat_map(|g| g.server.exports().iter().map(move |e| (g, e)))
                .collect(),
        };
        let mut out = serde_json::Map::new();
        for (group, e) in targets {
            let name = e.info.name.clone();
            if e.vol.config().is_none() {
                return Err(format!(
                    "resource {name} has no peer: it is always Primary and replicates nowhere"
                ));
            }
            let r = match cmd {
                Command::Status
                | Command::MakeMaster { .. }
                | Command::MakeSlave
                | Command::Events { .. } => unreachable!("handled by the caller"),
                Command::Primary { force, .. } => match e.vol.promote(*force).await {
                    Ok(msg) => {
                        if group.all_primary() {
                            if let Err(err) = group.open().await {
                                let _ = e.vol.demote().await;
                                Err(format!("{err:#}; demoted again"))
                            } else {
                                Ok(msg)
                            }
                        } else {
                            Ok(msg)
                        }
                    }
                    Err(r) => Err(r.0),
                },
                Command::Secondary { .. } => {
                    group.close().await;
                    e.vol.demote().await.map_err(|r| r.0)
                }
                Command::Connect { discard_my_data, .. } => {
                    e.vol.connect(*discard_my_data).map_err(|r| r.0)
                }
                Command::Disconnect { .. } => e.vol.disconnect().map_err(|r| r.0),
                Command::Invalidate { .. } => e.vol.invalidate().await.map_err(|r| r.0),
                Command::Verify { repair, .. } => link::verify(&e.vol, *repair).map_err(|r| r.0),
            };
            match r {
                Ok(msg) => {
                    out.insert(name, serde_json::Value::String(msg));
                }
                Err(why) => return Err(format!("{name}: {why}")),
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// Reads the cluster secret; refuses an empty or unreadable one.
fn read_secret(cfg: &Config) -> anyhow::Result<Vec<u8>> {
    let path =
        cfg.cluster.secret_file.as_ref().context("cluster.secret_file is required for a pair")?;
    let s = std::fs::read(path).with_context(|| {
        format!("cannot read cluster.secret_file {}: create it with the same content on both nodes (e.g. head -c 32 /dev/urandom | base64 > {})", path.display(), path.display())
    })?;
    let s = s.trim_ascii().to_vec();
    if s.len() < 8 {
        bail!(
            "cluster.secret_file {} holds {} bytes: use a secret of at least 8 bytes (e.g. 32 random bytes, base64)",
            path.display(),
            s.len()
        );
    }
    Ok(s)
}

/// Geometry and placement of a resource's metadata on `node`.
pub fn meta_of(r: &config::Resource, node: &str) -> (Placement, Geometry) {
    let on = &r.on[node];
    let placement = if on.meta == "internal" {
        Placement::Internal
    } else {
        Placement::External(on.meta.clone().into())
    };
    let g = Geometry {
        granularity: r.bitmap_granularity_kib * 1024,
        al_extent_size: r.activity_log_extent_kib * 1024,
        al_extents: r.activity_log_extents,
    };
    (placement, g)
}

/// Node id stored in metadata: the node's index in name order.
pub fn node_id(cfg: &Config, node: &str) -> u32 {
    cfg.node_names().iter().position(|n| *n == node).map_or(0, |i| u32::try_from(i).unwrap_or(0))
}

fn volume_config(
    cfg: &Config,
    r: &config::Resource,
    node: &str,
    peer: &str,
    secret: &[u8],
) -> anyhow::Result<VolumeConfig> {
    let policies = Policies::parse(
        &r.split_brain.after_sb_0pri,
        &r.split_brain.after_sb_1pri,
        &r.split_brain.after_sb_2pri,
    )
    .map_err(|e| anyhow::anyhow!("resource {}: {e}", r.name))?;
    let addr = |n: &str| -> anyhow::Result<SocketAddr> {
        let a = r.on[n].replication_address.as_deref().unwrap_or_default();
        a.parse()
            .with_context(|| format!("resource[{}].on.{n}.replication_address = {a:?}", r.name))
    };
    let protocol = match r.protocol {
        config::Protocol::A => Protocol::A,
        config::Protocol::B => Protocol::B,
        config::Protocol::C => Protocol::C,
    };
    let digest = match r.data_integrity {
        config::DataIntegrity::Off => Digest::Off,
        config::DataIntegrity::Crc32 => Digest::Crc32,
        config::DataIntegrity::Sha256 => Digest::Sha256,
    };
    let s = &r.resync;
    let ms = std::time::Duration::from_millis;
    Ok(VolumeConfig {
        resource: r.name.clone(),
        node: node.into(),
        peer: peer.into(),
        cluster: cfg.cluster.name.clone(),
        protocol,
        digest,
        fingerprint: handshake::fingerprint(&[
            &r.name,
            &format!("{:?}", r.protocol),
            &r.bitmap_granularity_kib.to_string(),
            &format!("{:?}", r.data_integrity),
        ]),
        policies,
        resync: ratectl::Settings {
            mode: if s.mode == config::ResyncMode::Fixed {
                ratectl::Mode::Fixed
            } else {
                ratectl::Mode::Dynamic
            },
            rate_kib: s.rate_kib,
            plan_ahead: ms(s.plan_ahead_ms),
            fill_target_kib: s.fill_target_kib,
            delay_target: ms(s.delay_target_ms),
            max_rate_kib: s.max_rate_kib,
            min_rate_kib: s.min_rate_kib,
        },
        checksum_resync: s.checksum,
        replication_rate_limit_kib: s.replication_rate_limit_kib,
        secret: secret.to_vec(),
        ping_interval: ms(r.peer.ping_interval_ms),
        ping_timeout: ms(r.peer.ping_timeout_ms),
        timeout: ms(r.peer.timeout_ms),
        connect_retry: ms(r.peer.connect_retry_ms),
        transfer_log: replicator::repl::translog::Bound {
            interval: ms(r.peer.flush_interval_ms),
            max_bytes: r.peer.flush_after_kib.saturating_mul(1024),
        },
        listen: addr(node)?,
        peer_addr: addr(peer)?,
    })
}

/// Runs the daemon for `node` until SIGTERM/SIGINT. Errors before serving are configuration or
/// environment problems and carry their reason.
pub async fn run(cfg: Config, node: String) -> anyhow::Result<()> {
    let peer = cfg.peer_of(&node).map(str::to_string);
    let secret = match &peer {
        Some(_) => read_secret(&cfg)?,
        None => Vec::new(),
    };
    if peer.is_some() {
        let mut seen = std::collections::HashSet::new();
        for r in &cfg.resource {
            if !seen.insert(&r.nbd_listen) {
                bail!(
                    "in a pair every resource needs its own nbd_listen ({} is used twice): an export opens and closes with its resource's role",
                    r.nbd_listen
                );
            }
        }
    }
    let (sd_tx, sd_rx) = watch::channel(false);
    let mut by_addr: Vec<(SocketAddr, Vec<Export>)> = Vec::new();
    let mut links = Vec::new();
    for (i, r) in cfg.resource.iter().enumerate() {
        let on = &r.on[&node];
        let engine = match r.io_engine {
            config::IoEngine::Auto => EngineKind::Auto,
            config::IoEngine::Uring => EngineKind::Uring,
            config::IoEngine::Threads => EngineKind::Threads,
        };
        let opts = StoreOptions { engine, direct: r.direct_io, read_only: false };
        let store = Arc::new(Store::open(&on.disk, opts).with_context(|| {
            format!("resource[{i}] ({}): resource[{i}].on.{node}.disk", r.name)
        })?);
        tracing::info!(resource = %r.name, disk = %on.disk.display(), size = store.size(), engine = store.engine_name(), "store opened");
        let vol = match &peer {
            None => Volume::standalone(store),
            Some(p) => {
                let (placement, g) = meta_of(r, &node);
                let (meta, loaded) = Meta::open(&on.disk, &placement, g, node_id(&cfg, &node))
                    .with_context(|| format!("resource {} on {node}: cannot attach the metadata (a new disk needs `duet create-md`)", r.name))?;
                let vc = volume_config(&cfg, r, &node, p, &secret)?;
                let listener = if node > *p {
                    Some(TcpListener::bind(vc.listen).await.with_context(|| {
                        format!("cannot listen for the peer on {} (resource[{i}].on.{node}.replication_address)", vc.listen)
                    })?)
                } else {
                    None
                };
                let vol = Volume::replicated(vc, store, meta, loaded)
                    .with_context(|| format!("resource {}", r.name))?;
                links.push(tokio::spawn(link::run(Arc::clone(&vol), listener, sd_rx.clone())));
                vol
            }
        };
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
        let addr: SocketAddr = r.nbd_listen.parse().expect("validated by Config::validate");
        match by_addr.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, v)) => v.push(export),
            None => by_addr.push((addr, vec![export])),
        }
    }
    let groups: Vec<Group> = by_addr
        .into_iter()
        .map(|(addr, exports)| Group {
            addr,
            data: tokio::runtime::Handle::current(),
            server: Server::new(exports),
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
    });
    if peer.is_some() && crate::ha::enabled(&cfg) {
        let host: Arc<dyn crate::ha::Host> = Arc::clone(&state) as Arc<dyn crate::ha::Host>;
        let ha = crate::ha::start(&cfg, &node, &secret, host, sd_rx.clone()).await?;
        let _ = state.ha.set(ha);
    }
    let sock_path = cfg.control_socket(&node);
    let control = bind_control(&sock_path).await?;
    let ctl_task = tokio::spawn(serve_control(control, Arc::clone(&state), sd_rx.clone()));
    let metrics_addr = cfg.metrics_listen(&node);
    if !metrics_addr.is_empty() {
        let addr: SocketAddr = metrics_addr.parse().expect("validated by Config::validate");
        let l = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen for metrics on {addr} (metrics_listen); set it to \"\" to disable"
            )
        })?;
        tokio::spawn(serve_metrics(l, Arc::clone(&state), sd_rx.clone()));
    }
    tracing::info!(node = %node, "duet daemon running");

    wait_for_signal().await?;
    handover_before_stop(&state).await;
    tracing::info!("shutting down: finishing in-flight requests");
    state.shutting_down.store(true, Ordering::Relaxed);
    for g in &state.groups {
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
                tracing::error!(resource = %e.info.name, errno, "final fdatasync failed");
                failed = true;
            }
        }
    }
    let _ = ctl_task.await;
    let _ = std::fs::remove_file(&sock_path);
    if failed {
        bail!("the final flush of a backing store failed; see the log above");
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
    match tokio::time::timeout(crate::ha::SWITCHOVER_TIMEOUT, rx).await {
        Ok(Ok(Ok(m))) => tracing::info!("handed over before stopping: {m}"),
        Ok(Ok(Err(e))) => tracing::warn!("stopping without a handover: {e}"),
        Ok(Err(_)) | Err(_) => tracing::warn!("stopping without a handover: no answer in time"),
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {} for the control socket", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another duet daemon is running on control socket {}; stop it first, or give this node its own control_socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
    Ok(l)
}

async fn serve_control(l: UnixListener, state: Arc<State>, mut sd: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = l.accept() => {
                let Ok((s, _)) = r else { continue };
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    let _ = handle_control(s, &st).await;
                });
            }
            _ = stopped(&mut sd) => return,
        }
    }
}

async fn handle_control(s: UnixStream, state: &State) -> std::io::Result<()> {
    let (rd, mut wr) = s.into_split();
    let mut line = Vec::new();
    let mut rd = BufReader::new(rd).take(control::MAX_LINE as u64 + 1);
    let resp = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        rd.read_until(b'\n', &mut line),
    )
    .await
    {
        Err(_) => Response::err("timed out waiting for a request"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => match control::decode_request(line.trim_ascii()) {
            Err(e) => Response::err(e),
            Ok(req) => match &req.cmd {
                Command::Status => {
                    Response::ok(serde_json::to_value(state.status().await).unwrap_or_default())
                }
                cmd if *state.sd.borrow() => {
                    let _ = cmd;
                    Response::err("the daemon is shutting down")
                }
                Command::Events { since_ms } => {
                    Response::ok(serde_json::to_value(state.events(*since_ms)).unwrap_or_default())
                }
                Command::MakeMaster { force } => match state.switchover(true, *force).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                },
                Command::MakeSlave => match state.switchover(false, false).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                },
                cmd => match state.act(cmd.resource(), cmd).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                },
            },
        },
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
}

async fn serve_metrics(l: TcpListener, state: Arc<State>, mut sd: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = l.accept() => {
                let Ok((mut s, _)) = r else { continue };
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    let body = st.metrics().await;
                    // Read (and ignore) the request head, then answer with the text format.
                    let mut buf = [0u8; 2048];
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf)).await;
                    let head = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
            _ = stopped(&mut sd) => return,
        }
    }
}

/// Sends one request to the daemon of `node` and returns its result.
pub async fn call(sock: &PathBuf, cmd: Command) -> Result<serde_json::Value, CallError> {
    let s = UnixStream::connect(sock)
        .await
        .map_err(|e| CallError::Unreachable(sock.clone(), e.to_string()))?;
    let (rd, mut wr) = s.into_split();
    let mut req = serde_json::to_vec(&control::Request { v: control::VERSION, cmd })
        .expect("requests serialise");
    req.push(b'\n');
    wr.write_all(&req).await.map_err(|e| CallError::Protocol(e.to_string()))?;
    let mut line = Vec::new();
    let mut rd = BufReader::new(rd).take(16 << 20);
    rd.read_until(b'\n', &mut line).await.map_err(|e| CallError::Protocol(e.to_string()))?;
    let resp: Response = serde_json::from_slice(&line)
        .map_err(|e| CallError::Protocol(format!("bad reply: {e}")))?;
    if resp.v != control::VERSION {
        return Err(CallError::Protocol(format!(
            "daemon speaks control protocol {} and this CLI speaks {}; use the CLI of the daemon's release",
            resp.v,
            control::VERSION
        )));
    }
    match resp.body {
        control::Body::Ok { result } => Ok(result),
        control::Body::Err { error } => Err(CallError::Refused(error)),
    }
}

/// Why a CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No daemon listening.
    #[error("cannot reach the duet daemon at {0}: {1}; is it running (duet daemon)?")]
    Unreachable(PathBuf, String),
    /// The exchange broke.
    #[error("control protocol error: {0}")]
    Protocol(String),
    /// The daemon said no.
    #[error("{0}")]
    Refused(String),
}
