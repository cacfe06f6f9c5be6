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
use replicator::store::{EngineKind, Store, StoreOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::config::{self, Config};
use crate::control::{self, Command, Response};
use crate::status::{NodeStatus, ResourceStatus};

/// Prometheus metrics: name, help, type, and how to read the value from a resource's status.
type Metric = (&'static str, &'static str, &'static str, fn(&ResourceStatus) -> u64);
const METRICS: [Metric; 9] = [
    ("size_bytes", "Size of the volume.", "gauge", |r| r.size_bytes),
    ("nbd_clients", "NBD clients connected.", "gauge", |r| r.stats.clients_connected),
    ("nbd_reads_total", "NBD reads served.", "counter", |r| r.stats.reads),
    ("nbd_writes_total", "NBD writes served.", "counter", |r| r.stats.writes),
    ("nbd_read_bytes_total", "Bytes read by NBD clients.", "counter", |r| r.stats.bytes_read),
    ("nbd_written_bytes_total", "Bytes written by NBD clients.", "counter", |r| {
        r.stats.bytes_written
    }),
    ("nbd_flushes_total", "NBD flushes.", "counter", |r| r.stats.flushes),
    ("nbd_request_errors_total", "NBD requests answered with an error.", "counter", |r| {
        r.stats.request_errors
    }),
    (
        "nbd_protocol_errors_total",
        "NBD connections closed for protocol violations.",
        "counter",
        |r| r.stats.protocol_errors,
    ),
];

/// Everything the control socket and metrics need to describe this node.
struct State {
    cfg: Config,
    node: String,
    started: Instant,
    /// Each NBD listener: its server (one or more exports) and the address it is bound to.
    servers: Vec<(Arc<Server>, SocketAddr)>,
    shutting_down: AtomicBool,
}

impl State {
    fn status(&self) -> NodeStatus {
        let mut resources = Vec::new();
        for r in &self.cfg.resource {
            let found = self.servers.iter().find_map(|(srv, addr)| {
                srv.exports().iter().find(|e| e.info.name == r.name).map(|e| (e, *addr))
            });
            let Some((e, addr)) = found else { continue };
            resources.push(ResourceStatus {
                name: r.name.clone(),
                role: "Primary".into(),
                disk_state: "UpToDate".into(),
                connection: "StandAlone".into(),
                protocol: format!("{:?}", r.protocol),
                disk: e.store.path().display().to_string(),
                size_bytes: e.store.size(),
                io_engine: e.store.engine_name().into(),
                direct_io: e.store.direct(),
                nbd_listen: Some(addr.to_string()),
                exporting: !self.shutting_down.load(Ordering::Relaxed),
                stats: e.stats.snapshot(),
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
        }
    }

    fn metrics(&self) -> String {
        let st = self.status();
        let mut o = String::new();
        for (name, help, kind, value) in METRICS {
            o.push_str(&format!("# HELP duet_{name} {help}\n# TYPE duet_{name} {kind}\n"));
            for r in &st.resources {
                let v = value(r);
                o.push_str(&format!(
                    "duet_{name}{{node=\"{}\",resource=\"{}\"}} {v}\n",
                    st.node, r.name
                ));
            }
        }
        o
    }
}

/// Runs the daemon for `node` until SIGTERM/SIGINT. Errors before serving are configuration or
/// environment problems and carry their reason.
pub async fn run(cfg: Config, node: String) -> anyhow::Result<()> {
    if let Some(peer) = cfg.peer_of(&node) {
        bail!(
            "this configuration defines a pair ({node} and {peer}), but this duet release runs a single node only: \
             replication arrives in the next release. Remove [node.{peer}] (and its [resource.on.{peer}]) to run {node} standalone"
        );
    }
    let mut by_addr: Vec<(SocketAddr, Vec<Export>)> = Vec::new();
    for (i, r) in cfg.resource.iter().enumerate() {
        let on = &r.on[&node];
        let engine = match r.io_engine {
            config::IoEngine::Auto => EngineKind::Auto,
            config::IoEngine::Uring => EngineKind::Uring,
            config::IoEngine::Threads => EngineKind::Threads,
        };
        let opts = StoreOptions { engine, direct: r.direct_io, read_only: false };
        let store = Store::open(&on.disk, opts)
            .with_context(|| format!("resource[{i}] ({}): resource[{i}].on.{node}.disk", r.name))?;
        tracing::info!(resource = %r.name, disk = %on.disk.display(), size = store.size(), engine = store.engine_name(), "store opened");
        let info = ExportInfo {
            name: r.name.clone(),
            description: format!("duet resource {} on {node}", r.name),
            size: store.size(),
            read_only: false,
            min_block: store.min_block(),
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
        };
        let export = Export { info, store: Arc::new(store), stats: Default::default() };
        let addr: SocketAddr = r.nbd_listen.parse().expect("validated by Config::validate");
        match by_addr.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, v)) => v.push(export),
            None => by_addr.push((addr, vec![export])),
        }
    }
    let (sd_tx, sd_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let mut tasks = Vec::new();
    for (addr, exports) in by_addr {
        let names: Vec<String> = exports.iter().map(|e| e.info.name.clone()).collect();
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen for NBD on {addr} (nbd_listen of {}): is another server using it?",
                names.join(", ")
            )
        })?;
        let bound = listener.local_addr().context("local address of the NBD listener")?;
        tracing::info!(%bound, exports = ?names, "serving NBD");
        let srv = Server::new(exports);
        servers.push((Arc::clone(&srv), bound));
        tasks.push(tokio::spawn(srv.serve(listener, sd_rx.clone())));
    }
    let state = Arc::new(State {
        cfg: cfg.clone(),
        node: node.clone(),
        started: Instant::now(),
        servers,
        shutting_down: AtomicBool::new(false),
    });
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
    tracing::info!("shutting down: finishing in-flight requests");
    state.shutting_down.store(true, Ordering::Relaxed);
    let _ = sd_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let mut failed = false;
    for (srv, _) in &state.servers {
        for e in srv.exports() {
            if let Err(errno) = e.store.sync_now() {
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
            Ok(req) => match req.cmd {
                Command::Status => {
                    Response::ok(serde_json::to_value(state.status()).unwrap_or_default())
                }
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
                let body = state.metrics();
                tokio::spawn(async move {
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
