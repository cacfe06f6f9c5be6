//! The node: its NBD exports (one listener per group of resources, open while all of them are
//! Primary) and resources, as the control socket, the metrics and the HA runtime see them.

use super::*;

/// An open export: its stop signal, its task, and the address it is bound to.
pub(super) type Serving = (watch::Sender<bool>, tokio::task::JoinHandle<()>, SocketAddr);

/// One NBD listener and the resources it exports. It is open while every one of them is
/// Primary (a single node's resources always are; in a pair each resource has its own listener).
pub(super) struct Group {
    pub(super) addr: SocketAddr,
    /// The data path's runtime.
    pub(super) data: tokio::runtime::Handle,
    pub(super) server: Arc<Server>,
    pub(super) serving: tokio::sync::Mutex<Option<Serving>>,
}

impl Group {
    pub(super) fn all_primary(&self) -> bool {
        self.server.exports().iter().all(|e| e.vol.role() == Role::Primary)
    }

    /// Opens the export (binds and serves) if it is not open. The listener and its connections
    /// live on the data path's runtime, whichever thread asks (the cluster manager has its own).
    pub(super) async fn open(&self) -> Result<(), ExportError> {
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
        let span = tracing::error_span!("nbd", exports = %names.join(","));
        let task = self.data.spawn(tracing::Instrument::instrument(
            async move {
                let listener = match TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                let _ = bound_tx.send(listener.local_addr());
                server.serve(listener, rx).await;
            },
            span,
        ));
        let bound = bound_rx
            .await
            .map_err(|_| ExportError::TaskEnded)?
            .map_err(|source| ExportError::Listen { addr, names: names.join(", "), source })?;
        tracing::info!(%bound, exports = ?names, "serving NBD");
        *s = Some((tx, task, bound));
        Ok(())
    }

    /// Closes the export: new requests are refused, in-flight ones finish, clients are gone.
    pub(super) async fn close(&self) {
        let taken = self.serving.lock().await.take();
        if let Some((tx, task, bound)) = taken {
            let _ = tx.send(true);
            let _ = task.await;
            tracing::info!(%bound, "NBD export closed");
        }
    }

    pub(super) async fn bound(&self) -> Option<SocketAddr> {
        self.serving.lock().await.as_ref().map(|s| s.2)
    }
}

/// Everything the control socket and metrics need to describe this node.
pub(super) struct State {
    pub(super) cfg: Config,
    pub(super) node: String,
    pub(super) started: Instant,
    pub(super) groups: Vec<Group>,
    pub(super) shutting_down: AtomicBool,
    pub(super) sd: watch::Receiver<bool>,
    /// The cluster manager, when heartbeat links are configured.
    pub(super) ha: std::sync::OnceLock<crate::ha::Ha>,
    /// The HTTP endpoint's own counters.
    pub(super) http: super::metrics::HttpCounters,
    /// The configuration file and its text as last applied (at start, or by `duet adjust`).
    pub(super) config_path: PathBuf,
    pub(super) config_text: tokio::sync::Mutex<String>,
    /// The configuration as last applied: what hooks and services read.
    pub(super) live: Arc<std::sync::Mutex<Arc<Config>>>,
    /// The event log.
    pub(super) journal: Arc<crate::events::Journal>,
    /// Slots for `duet events --follow` connections.
    pub(super) followers: Arc<tokio::sync::Semaphore>,
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

    fn open_exports(&self) -> futures_util::future::BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            for g in &self.groups {
                if g.all_primary() && !self.shutting_down.load(Ordering::Relaxed) {
                    g.open().await?;
                }
            }
            Ok(())
        })
    }

    fn journal(&self) -> Arc<crate::events::Journal> {
        Arc::clone(&self.journal)
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
    /// One line for systemd's STATUS=: each resource's role, disk and connection.
    pub(super) fn summary(&self) -> String {
        let parts: Vec<String> = self
            .groups
            .iter()
            .flat_map(|g| g.server.exports())
            .map(|e| match e.vol.config() {
                Some(_) => {
                    let s = e.vol.status();
                    format!("{} {:?} {:?} {:?}", e.info.name, s.role, s.disk, s.connection)
                }
                None => format!("{} Primary (single node)", e.info.name),
            })
            .collect();
        format!("node {}: {}", self.node, parts.join("; "))
    }

    pub(super) fn find(&self, name: &str) -> Option<(&Group, &Export)> {
        self.groups
            .iter()
            .find_map(|g| g.server.exports().iter().find(|e| e.info.name == name).map(|e| (g, e)))
    }

    pub(super) async fn status(&self) -> NodeStatus {
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
            schema: crate::status::SCHEMA,
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

    /// The event log after a time (milliseconds since the Unix epoch), oldest first.
    pub(super) fn events(&self, since_ms: u64) -> Vec<crate::events::Event> {
        self.journal.since(since_ms as f64 / 1000.0)
    }

    /// `duet adjust` and SIGHUP: re-reads the configuration file, and applies its changes if
    /// every one can be applied live (else nothing, naming the key). Returns the keys applied.
    pub(super) async fn reload(&self) -> Result<Vec<String>, CommandError> {
        let mut applied = self.config_text.lock().await;
        let text = std::fs::read_to_string(&self.config_path).map_err(|e| {
            CommandError::Reload(format!("cannot read {}: {e}", self.config_path.display()))
        })?;
        let cfg = Config::parse(&self.config_path, &text)
            .map_err(|e| CommandError::Reload(format!("configuration error: {e}")))?;
        let keys = crate::config::reload::plan(&applied, &text)
            .map_err(|e| CommandError::Reload(e.to_string()))?;
        for r in &cfg.resource {
            if let Some((_, e)) = self.find(&r.name) {
                e.vol.set_resync_settings(crate::config::runtime::resync_settings(&r.resync));
            }
        }
        if let Some(ha) = self.ha.get() {
            ha.requests
                .send(crate::ha::Request::Reload(Box::new(cfg.clone())))
                .await
                .map_err(|_| CommandError::ManagerStopped)?;
        }
        *self.live.lock().expect("config poisoned") = Arc::new(cfg);
        *applied = text;
        let what = if keys.is_empty() { "nothing changed".into() } else { keys.join(", ") };
        tracing::info!("configuration reloaded: {what}");
        self.journal.push(format!("configuration reloaded: {what}"));
        Ok(keys)
    }

    /// make-master / make-slave through the cluster manager.
    pub(super) async fn switchover(
        &self,
        master: bool,
        force: bool,
    ) -> Result<serde_json::Value, CommandError> {
        let ha = self.ha.get().ok_or(CommandError::NoClusterManager)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = if master {
            crate::ha::Request::MakeMaster { force, reply: tx }
        } else {
            crate::ha::Request::MakeSlave { reply: tx }
        };
        ha.requests.send(req).await.map_err(|_| CommandError::ManagerStopped)?;
        match tokio::time::timeout(
            crate::ha::SWITCHOVER_TIMEOUT + std::time::Duration::from_secs(15),
            rx,
        )
        .await
        {
            Ok(Ok(Ok(m))) => Ok(serde_json::json!({ "cluster": m })),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(_)) => Err(CommandError::Dropped),
            Err(_) => Err(CommandError::SwitchoverTimeout),
        }
    }

    /// `duet maintenance on|off` through the cluster manager.
    pub(super) async fn maintenance(&self, on: bool) -> Result<serde_json::Value, CommandError> {
        let ha = self.ha.get().ok_or_else(|| {
            CommandError::Maintenance(
                "refused: maintenance mode belongs to an HA pair (heartbeat links configured); without the cluster manager nothing acts by itself".into(),
            )
        })?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        ha.requests
            .send(crate::ha::Request::Maintenance { on, reply })
            .await
            .map_err(|_| CommandError::ManagerStopped)?;
        match rx.await {
            Ok(Ok(m)) => Ok(serde_json::json!({ "cluster": m })),
            Ok(Err(e)) => Err(CommandError::Maintenance(e)),
            Err(_) => Err(CommandError::Dropped),
        }
    }

    /// In an HA pair outside maintenance mode, the role and link commands are the cluster
    /// manager's (Pacemaker's rule): refused, naming what to use instead.
    fn managed_by_cluster(&self, cmd: &Command) -> Result<(), CommandError> {
        let Some(ha) = self.ha.get() else { return Ok(()) };
        if ha.status.lock().expect("status poisoned").maintenance {
            return Ok(());
        }
        let (cmd, instead) = match cmd {
            Command::Primary { force: false, .. } => ("primary", "`duet make-master`"),
            Command::Primary { force: true, .. } => {
                ("primary --force", "`duet make-master --force`")
            }
            Command::Secondary { .. } => ("secondary", "`duet make-slave`"),
            Command::Disconnect { .. } => ("disconnect", "`duet make-slave` (or stop the daemon)"),
            _ => return Ok(()),
        };
        Err(CommandError::ManagedByCluster { cmd, instead })
    }

    /// Runs a role or connection command on the named resource (or all of them).
    pub(super) async fn act(
        &self,
        resource: Option<&str>,
        cmd: &Command,
    ) -> Result<serde_json::Value, CommandError> {
        self.managed_by_cluster(cmd)?;
        let targets: Vec<(&Group, &Export)> = match resource {
            Some(n) => {
                vec![self.find(n).ok_or_else(|| CommandError::NoSuchResource(n.to_string()))?]
            }
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
                return Err(CommandError::NoPeer(name));
            }
            let r = match cmd {
                Command::Status
                | Command::MakeMaster { .. }
                | Command::MakeSlave
                | Command::Adjust
                | Command::Maintenance { .. }
                | Command::Follow { .. }
                | Command::Events { .. } => unreachable!("handled by the caller"),
                Command::Primary { force, .. } => match e.vol.promote(*force).await {
                    Ok(msg) => {
                        if group.all_primary() {
                            if let Err(err) = group.open().await {
                                let _ = e.vol.demote().await;
                                return Err(CommandError::ExportAfterPromote {
                                    resource: name,
                                    err,
                                });
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
                Command::ResumeIo { .. } => Ok(if e.vol.resume_io() {
                    "I/O resumed: the held requests are tried again".into()
                } else {
                    "no I/O was held".into()
                }),
                Command::Verify { repair, .. } => link::verify(&e.vol, *repair).map_err(|r| r.0),
            };
            match r {
                Ok(msg) => {
                    out.insert(name, serde_json::Value::String(msg));
                }
                Err(why) => return Err(CommandError::Resource { resource: name, why }),
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// Records the changes of state as events: woken by every role or connection change of a
/// volume and every change the cluster manager publishes, and once a second besides (a disk
/// state or a verify's end changes without a wake-up of its own).
pub(super) async fn watch_states(state: Arc<State>, mut sd: watch::Receiver<bool>) {
    use crate::events::{diff, snap};
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut forwarders = Vec::new();
    for g in &state.groups {
        for e in g.server.exports() {
            let mut rx = e.vol.watch();
            let w = Arc::clone(&wake);
            forwarders.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    w.notify_one();
                }
            }));
        }
    }
    let ha_changed = state.ha.get().map(|h| Arc::clone(&h.changed));
    let mut prev = snap(&state.status().await);
    for c in diff(None, &prev) {
        state.journal.record(crate::events::Change { reason: "at start".into(), ..c });
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = async {
                match &ha_changed {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = tick.tick() => {}
            _ = stopped(&mut sd) => break,
        }
        let now = snap(&state.status().await);
        for c in diff(Some(&prev), &now) {
            state.journal.record(c);
        }
        prev = now;
    }
    for f in forwarders {
        f.abort();
    }
}
