//! The HA runtime's loop: one task owns the failure detector, the receiver (authentication,
//! anti-replay) and the cluster manager, so no decision state is shared; it executes the
//! manager's actions (fence, promote, VIP, services, export, outdate) and feeds the results
//! back. The decisions are in [`crate::cluster`]; this module only wires.
//!
//! Its parts: [`start`] (the runtime thread and opening everything), [`links`] (heartbeat link
//! tasks: one reader and one writer per link, so a stuck serial line cannot delay the UDP
//! link), [`steps`] (fence, services, the shell runner; steps run in spawned tasks and report
//! back, one at a time), [`probes`] (health checks), [`view`] (the local and peer views and
//! their wire codes), [`vips`] (the VIPs and their announcements).

mod links;
mod probes;
mod start;
mod steps;
mod view;
mod vips;

pub use start::{StartError, start};
pub use steps::shell;
pub use vips::Vips;
use vips::vips;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heartbeat::detector::{Detector, Event as DetEvent, LinkState, PeerState, Timing};
use heartbeat::frame::{self, Control, Frame, ResourceState};
use heartbeat::receiver::Receiver;
use heartbeat::serial::{Deframer, SerialPort, wrap};
use heartbeat::udp::UdpLink;
use replicator::nbd::server::stopped;
use replicator::ratelimit::Limited;
use replicator::repl::volume::{ConnState, DiskState, Role, Volume};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cluster::health::Hysteresis;
use crate::cluster::{
    self, Action, FenceVerdict, Fencing, Input, LocalView, Manager, Outcome, PeerView, Step,
};
use crate::config::{self, Config};
use crate::events::Journal;
use crate::status::{ClusterStatus, LinkStatus};

use links::Link;
use steps::run_step;

/// How long a fence command may run.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a switchover may take.
pub const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an NBD export could not open.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the NBD listener's task ended")]
    TaskEnded,
    #[error("cannot listen for NBD on {addr} (nbd_listen of {names}): is another server using it?")]
    Listen {
        addr: std::net::SocketAddr,
        names: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the HA runtime needs from the daemon.
pub trait Host: Send + Sync + 'static {
    /// The replicated volumes, in resource order.
    fn volumes(&self) -> Vec<Arc<Volume>>;
    /// Opens every export whose resources are all Primary.
    fn open_exports(&self) -> futures_util::future::BoxFuture<'_, Result<(), ExportError>>;
    /// Closes every export, draining in-flight requests.
    fn close_exports(&self) -> futures_util::future::BoxFuture<'_, ()>;
    /// The node's event log.
    fn journal(&self) -> Arc<Journal>;
}

/// A request from the control socket.
#[derive(Debug)]
pub enum Request {
    MakeMaster {
        force: bool,
        reply: oneshot::Sender<cluster::Answer>,
    },
    MakeSlave {
        reply: oneshot::Sender<cluster::Answer>,
    },
    /// The daemon is stopping: take nothing over from now on.
    Stopping,
    /// `duet adjust`: the configuration the next steps read ([[service]], [hooks]).
    Reload(Box<Config>),
    /// `duet maintenance on|off`: cluster-wide (the peer takes it from our frames), persisted.
    Maintenance {
        on: bool,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// The daemon stops (after a handover, or without one): close the exports (draining), stop
    /// the services running here, remove the VIPs (restoring a moved MAC). The answer lists
    /// what failed.
    ReleaseLocal {
        reply: oneshot::Sender<Vec<String>>,
    },
}

/// The handle the daemon keeps.
#[derive(Debug, Clone)]
pub struct Ha {
    pub requests: mpsc::Sender<Request>,
    pub status: Arc<Mutex<ClusterStatus>>,
    pub events: Arc<Journal>,
    /// Woken when the running role, the peer, a link, health, a VIP or a service changes.
    pub changed: Arc<tokio::sync::Notify>,
    /// Keeps the cluster manager's thread running (it stops when this is dropped).
    _thread: Option<Arc<oneshot::Sender<()>>>,
}

/// Results coming back to the loop.
enum Back {
    Step(Outcome),
    Outdate {
        id: u64,
        mask: u32,
        ok: bool,
    },
    /// A health check's new verdict: (the generation of the checks it belongs to, index, ok).
    Health(u64, usize, bool),
    /// A replay checkpoint write ended (the error's text if it failed).
    Checkpoint(heartbeat::replay::Checkpoint, Result<(), String>),
}

/// Accepted frames kept while their replay checkpoint is written (the oldest go first: the
/// newest carry the peer's state).
const HELD_FRAMES: usize = 64;

/// Whether `cfg` asks for the cluster manager (heartbeat links configured).
pub fn enabled(cfg: &Config) -> bool {
    !cfg.heartbeat.link.is_empty() && cfg.node_names().len() == 2
}

struct Loop {
    node: String,
    peer: String,
    cfg: Config,
    key: Vec<u8>,
    cluster: u64,
    my_id: u8,
    boot: u64,
    seq: u64,
    det: Detector,
    rx: Receiver,
    mgr: Manager,
    /// The maintenance mode as this node knows it (its own command, or the peer's newer one).
    maintenance: frame::Maintenance,
    /// The maintenance mode in the peer's newest frame.
    peer_maintenance_on: Option<bool>,
    /// (boot, sequence) of the peer's newest frame: its state is the peer's.
    newest_frame: Option<(u64, u64)>,
    /// The heartbeat versions to send the peer.
    versions: frame::Versions,
    /// Accepted frames waiting for the replay checkpoint that covers them (by link).
    held: std::collections::VecDeque<(usize, Frame)>,
    /// The last checkpoint write failed: frames are acted on without waiting.
    checkpoint_failing: bool,
    links: Vec<Link>,
    host: Arc<dyn Host>,
    vips: Arc<Vips>,
    /// A `duet adjust` changed `[[vip]]`: applied by [`Loop::apply_vips`].
    vips_wanted: Option<Config>,
    back: mpsc::Sender<Back>,
    replies: HashMap<u64, oneshot::Sender<cluster::Answer>>,
    next_token: u64,
    health: Vec<bool>,
    /// The health checks' tasks, and their generation (a reload replaces them).
    probes: Vec<tokio::task::JoinHandle<()>>,
    probes_gen: u64,
    sd: watch::Receiver<bool>,
    healthy: bool,
    peer_view: Option<(PeerView, Instant)>,
    /// The replicator's state as last read (each tick and after each step).
    local: LocalView,
    limiter: Limited,
    status: Arc<Mutex<ClusterStatus>>,
    events: Arc<Journal>,
    changed: Arc<tokio::sync::Notify>,
    timing: Timing,
    /// systemd's watchdog, petted from this thread's tick: a wedged cluster manager is restarted.
    watchdog: Option<crate::daemon::notify::Watchdog>,
    /// The STATUS= line last sent; `None` when not under systemd.
    told: Option<String>,
}

impl Loop {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<(usize, Vec<u8>)>,
        mut requests: mpsc::Receiver<Request>,
        mut back: mpsc::Receiver<Back>,
        mut sd: watch::Receiver<bool>,
    ) {
        let tick =
            (self.timing.keepalive / 4).clamp(Duration::from_millis(10), Duration::from_millis(50));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_send = Instant::now();
        // As a slave first: its services and those of every node run from the start.
        steps::boot_services(&self.step_ctx()).await;
        if self.maintenance.on {
            self.log("maintenance mode is on (kept from before the restart)".into());
        }
        self.feed(Input::Maintenance(self.maintenance.on));
        self.start_probes();
        self.log(format!("cluster manager running: configured master {}, peer {}, {} heartbeat link(s); waiting up to {} ms for the peer", self.cfg.cluster.configured_master, self.peer, self.links.len(), self.timing.initdead.as_millis()));
        loop {
            tokio::select! {
                Some((link, bytes)) = inbox.recv() => self.received(link, &bytes),
                Some(r) = requests.recv() => {
                    let token = self.next_token;
                    self.next_token += 1;
                    let input = match r {
                        Request::MakeMaster { force, reply } => {
                            self.replies.insert(token, reply);
                            self.log(format!("operator: make-master{}", if force { " --force" } else { "" }));
                            Input::MakeMaster { token, force }
                        }
                        Request::MakeSlave { reply } => {
                            self.replies.insert(token, reply);
                            self.log("operator: make-slave".into());
                            Input::MakeSlave { token }
                        }
                        Request::Stopping => Input::Stopping,
                        Request::Reload(cfg) => {
                            self.reload(*cfg);
                            continue;
                        }
                        Request::Maintenance { on, reply } => {
                            let _ = reply.send(self.set_maintenance(on));
                            self.publish();
                            continue;
                        }
                        Request::ReleaseLocal { reply } => {
                            let ctx = self.step_ctx();
                            tokio::spawn(async move {
                                let _ = reply.send(steps::release_local(&ctx).await);
                            });
                            continue;
                        }
                    };
                    // Judged on the replicator's state now, not as of the last tick (a stop
                    // right after a resync finished was refused as "not in sync").
                    self.refresh_local();
                    self.feed(input);
                }
                Some(b) = back.recv() => match b {
                    Back::Step(o) => {
                        self.refresh_local();
                        self.feed(Input::Done(o));
                    }
                    Back::Outdate { id, mask, ok } => self.feed(Input::OutdateDone { id, mask, ok }),
                    Back::Checkpoint(c, r) => self.checkpoint_written(c, r),
                    Back::Health(generation, _, _) if generation != self.probes_gen => {}
                    Back::Health(_, i, ok) => {
                        if let Some(h) = self.health.get_mut(i) {
                            *h = ok;
                        }
                        self.healthy = self.cfg.health.healthy(&self.health);
                        let h = self.health_now();
                        self.feed(Input::Health(h));
                    }
                },
                _ = ticker.tick() => {
                    replicator::fault::hold_ha();
                    let now = Instant::now();
                    if let Some(w) = &mut self.watchdog {
                        w.tick(now);
                    }
                    self.tell_systemd();
                    let ev = self.det.tick(now);
                    self.detector_events(ev);
                    self.refresh_local();
                    self.feed(Input::Tick);
                    self.apply_vips();
                    if now >= next_send {
                        self.send(None);
                        next_send = now + self.timing.keepalive;
                    }
                }
                _ = stopped(&mut sd) => return,
            }
            // After every input, so `duet status` never lags a finished step.
            self.publish();
        }
    }

    /// `duet maintenance on|off` here: a command newer than anything known, durable before it
    /// takes effect and before the peer hears of it.
    fn set_maintenance(&mut self, on: bool) -> Result<String, String> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let m = frame::Maintenance::set(self.maintenance, on, now_ms);
        crate::state::save_maintenance(&self.cfg.cluster.state_dir, &self.node, m)
            .map_err(|e| format!("maintenance mode not changed: {}", crate::error_chain(&e)))?;
        let was = self.maintenance.on;
        self.maintenance = m;
        self.log(format!("operator: maintenance {}", if on { "on" } else { "off" }));
        self.refresh_local();
        self.feed(Input::Maintenance(on));
        self.send(None);
        let peer = if self.det.peer() == PeerState::Alive {
            format!("{} takes it with this heartbeat", self.peer)
        } else {
            format!("{} is not heard now and takes it when it is", self.peer)
        };
        Ok(match (was, on) {
            (true, true) => format!("maintenance mode was already on; {peer}"),
            (false, false) => format!("maintenance mode was already off; {peer}"),
            (false, true) => format!(
                "maintenance mode on, cluster-wide ({peer}): no automatic takeover, failback or handover; change roles with `duet primary` / `duet secondary`; `duet maintenance off` ends it"
            ),
            (true, false) => format!(
                "maintenance mode off, cluster-wide ({peer}): the cluster manager acts again"
            ),
        })
    }

    /// The peer's maintenance mode, from an authenticated frame: taken when newer than ours
    /// (made durable first; if that fails it is taken anyway, and said).
    fn peer_maintenance(&mut self, m: frame::Maintenance) {
        if m <= self.maintenance {
            return;
        }
        let changed = m.on != self.maintenance.on;
        if let Err(e) = crate::state::save_maintenance(&self.cfg.cluster.state_dir, &self.node, m) {
            self.log(format!(
                "the peer's maintenance mode could not be saved (a restart forgets it): {}",
                crate::error_chain(&e)
            ));
        }
        self.maintenance = m;
        if changed {
            self.log(format!(
                "maintenance mode {} (set on {})",
                if m.on { "on" } else { "off" },
                self.peer
            ));
            self.refresh_local();
            self.feed(Input::Maintenance(m.on));
        }
    }

    /// Starts the health checks of `self.cfg` (a new generation: results of older ones are
    /// ignored).
    fn start_probes(&mut self) {
        for t in self.probes.drain(..) {
            t.abort();
        }
        self.probes_gen += 1;
        let checks = self.cfg.health.check.clone();
        self.health = vec![true; checks.len()];
        for (i, c) in checks.into_iter().enumerate() {
            let task = probes::health_check(
                self.probes_gen,
                i,
                c,
                self.node.clone(),
                self.back.clone(),
                self.sd.clone(),
            );
            self.probes.push(tokio::spawn(task));
        }
    }

    /// `duet adjust`: the configuration the next steps read; new heartbeat timing for the
    /// detector; the health checks started again if they changed (each starts healthy, as at
    /// start, and reports from its next probe).
    fn reload(&mut self, cfg: Config) {
        let timing = start::timing_of(&cfg.heartbeat);
        if timing != self.timing {
            self.det.set_timing(timing);
            self.timing = timing;
        }
        let checks_changed = format!("{:?}", cfg.health) != format!("{:?}", self.cfg.health);
        if format!("{:?}", cfg.vip) != format!("{:?}", self.cfg.vip) {
            self.vips_wanted = Some(cfg.clone());
        }
        self.cfg = cfg;
        self.apply_vips();
        if checks_changed {
            self.start_probes();
            self.healthy = true;
            let h = self.health_now();
            self.feed(Input::Health(h));
        }
    }

    /// `[[vip]]` changed by `duet adjust`: the new group replaces the old one once no step runs
    /// (a takeover or release moving the old set finishes first). A master gives up the old
    /// addresses (its MAC restored) and takes the new ones; a slave only knows them from now on.
    fn apply_vips(&mut self) {
        if self.mgr.busy() {
            return; // at a later tick
        }
        let Some(cfg) = self.vips_wanted.take() else { return };
        let new = match vips(&cfg, &self.node, &self.events) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                self.log(format!("the changed [[vip]] cannot be applied: {e}; the old VIPs stay"));
                return;
            }
        };
        let old = std::mem::replace(&mut self.vips, Arc::clone(&new));
        let master = self.local.primary || old.held().iter().any(|h| h.here);
        self.log(format!(
            "[[vip]] changed: {} VIP(s) now{}",
            new.held().len(),
            if master { "; moving the addresses" } else { "" }
        ));
        if master {
            let events = Arc::clone(&self.events);
            tokio::spawn(async move {
                if let Err(e) = old.down().await {
                    events.push(format!("releasing the old VIPs: {}", e.0.join("; ")));
                }
                if let Err(e) = new.up().await {
                    events.push(format!("acquiring the changed VIPs: {}", e.0.join("; ")));
                }
            });
        }
    }

    /// systemd's STATUS= line: the running role, what the manager does, the peer; sent when it
    /// changes (looked at each tick, and only under systemd).
    fn tell_systemd(&mut self) {
        let Some(told) = &mut self.told else { return };
        let line = {
            let s = self.status.lock().expect("status poisoned");
            match &s.activity {
                Some(a) => format!("{} ({a}), peer {}", s.running_role, s.peer),
                None => format!("{}, peer {}", s.running_role, s.peer),
            }
        };
        if line != *told {
            crate::daemon::notify::status(&line);
            *told = line;
        }
    }

    fn log(&self, s: String) {
        tracing::info!(target: "duet::cluster", "{s}");
        self.events.push(s);
    }

    fn received(&mut self, link: usize, b: &[u8]) {
        match self.rx.receive(b) {
            Ok(f) => {
                if let Some(l) = self.links.get(link) {
                    l.counters.frames_in.fetch_add(1, Relaxed);
                }
                // Durable before the frame is acted on (after a restart it is a replay),
                // written ahead and off this thread: an fsync stuck behind the disk's writeback
                // never stops the heartbeat.
                if let Some(c) = self.rx.take_due() {
                    self.write_checkpoint(c);
                }
                if self.rx.covers(&f) || self.checkpoint_failing {
                    self.heard(link, &f);
                } else {
                    self.held.push_back((link, f));
                    if self.held.len() > HELD_FRAMES {
                        self.held.pop_front();
                    }
                }
            }
            Err(why) => {
                if let Some(l) = self.links.get(link) {
                    l.counters.dropped.fetch_add(1, Relaxed);
                }
                if let Some(held) = self.limiter.allow() {
                    let name = self.links.get(link).map_or("?", |l| l.name.as_str());
                    tracing::warn!(link = %name, suppressed = held, "heartbeat frame dropped: {why}");
                    self.events.push(format!(
                        "heartbeat frame dropped on {name}: {why}{}",
                        if held > 0 { format!(" ({held} more not logged)") } else { String::new() }
                    ));
                }
            }
        }
    }

    /// Writes the replay checkpoint `c` in the background; the loop hears of it as
    /// [`Back::Checkpoint`].
    fn write_checkpoint(&self, c: heartbeat::replay::Checkpoint) {
        let (dir, node, peer) =
            (self.cfg.cluster.state_dir.clone(), self.node.clone(), self.peer.clone());
        let back = self.back.clone();
        tokio::task::spawn_blocking(move || {
            let r = crate::state::save_checkpoint(&dir, &node, &peer, c)
                .map_err(|e| crate::error_chain(&e));
            let _ = back.blocking_send(Back::Checkpoint(c, r));
        });
    }

    /// A checkpoint write ended: the frames it covers are acted on, in the order they came.
    /// If it failed, every held frame is (replay protection across a restart is lost while
    /// the state directory cannot be written; the heartbeat is not), and it is said.
    fn checkpoint_written(&mut self, c: heartbeat::replay::Checkpoint, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.rx.made_durable(c);
                self.checkpoint_failing = false;
            }
            Err(e) => {
                self.rx.write_failed(c);
                self.checkpoint_failing = true;
                if let Some(held) = self.limiter.allow() {
                    tracing::error!(suppressed = held, "{e}");
                    self.events.push(format!(
                        "the heartbeat replay checkpoint cannot be saved (frames are acted on anyway): {e}"
                    ));
                }
            }
        }
        for (link, f) in std::mem::take(&mut self.held) {
            if self.rx.covers(&f) || self.checkpoint_failing {
                self.heard(link, &f);
            } else {
                self.held.push_back((link, f));
            }
        }
    }

    /// An accepted frame, covered by the replay checkpoint: the peer is heard, its state and
    /// control message taken.
    fn heard(&mut self, link: usize, f: &Frame) {
        let now = Instant::now();
        let before = self.versions.to_send();
        self.versions.heard(f.boot, f.version);
        let speak = self.versions.to_send();
        if speak != before && speak.start() == speak.end() {
            let v = *speak.start();
            self.log(format!(
                "the peer speaks heartbeat version {} (this node up to {}): sending version {v}",
                f.version.max(v),
                self.versions.max()
            ));
        }
        let ev = self.det.heard(link, now);
        self.detector_events(ev);
        // The serial line lags the UDP link, so frames arrive out of order: only the
        // newest tells the peer's state (an older one would undo a change, and a
        // demoted peer would look master still).
        if self.newest_frame.is_none_or(|n| (f.boot, f.seq) > n) {
            self.newest_frame = Some((f.boot, f.seq));
            let view = view::peer_view(f);
            self.peer_view = Some((view, now));
            self.feed(Input::PeerView(view));
            self.peer_maintenance_on = Some(f.maintenance.on);
            self.peer_maintenance(f.maintenance);
        }
        if let Some(c) = f.control.clone() {
            // The peer's requests too are judged on the replicator's state now.
            self.refresh_local();
            self.feed(Input::Control(c));
        }
    }

    fn detector_events(&mut self, ev: Vec<DetEvent>) {
        for e in ev {
            let name = |i: usize| self.links.get(i).map_or("?".to_string(), |l| l.name.clone());
            match e {
                DetEvent::LinkUp(i) => self.log(format!("heartbeat link {} is up", name(i))),
                DetEvent::LinkLate(i, d) => self.log(format!(
                    "heartbeat link {} silent for {} ms (warntime)",
                    name(i),
                    d.as_millis()
                )),
                DetEvent::LinkDown(i) => self.log(format!("heartbeat link {} is down", name(i))),
                DetEvent::PeerAlive => self.feed(Input::Peer(PeerState::Alive)),
                DetEvent::PeerDead => {
                    self.peer_view = None;
                    self.feed(Input::Peer(PeerState::Dead));
                }
            }
        }
    }

    /// Reads the replicator's state, keeps it for `duet status`, and tells the manager.
    fn refresh_local(&mut self) {
        let before = self.health_now();
        self.local = self.local_view();
        let l = self.local;
        self.feed(Input::Local(l));
        let now = self.health_now();
        if now != before {
            if !now {
                self.log(format!(
                    "a local disk failed and is detached (resources {:#x}): this node is unhealthy",
                    l.diskless
                ));
            }
            self.feed(Input::Health(now));
        }
    }

    /// Healthy: every health check passes and no local disk is detached (a Diskless master
    /// hands over to an in-sync, healthy slave; a Diskless slave is never a takeover target).
    fn health_now(&self) -> bool {
        self.healthy && self.local.diskless == 0
    }

    fn local_view(&self) -> LocalView {
        let summaries: Vec<_> = self.host.volumes().iter().map(|v| v.summary()).collect();
        view::local_view(&summaries)
    }

    /// Sends our state (and a control message) on every link, in each frame version the peer
    /// may speak ([`frame::Versions`]).
    fn send(&mut self, control: Option<Control>) {
        let resources: Vec<ResourceState> =
            self.host.volumes().iter().map(|v| view::resource_state(&v.summary())).collect();
        for (l, version) in
            self.links.iter().flat_map(|l| self.versions.to_send().map(move |v| (l, v)))
        {
            self.seq += 1;
            let f = Frame {
                version,
                key_id: 1,
                node_id: self.my_id,
                cluster: self.cluster,
                boot: self.boot,
                seq: self.seq,
                health: if self.health_now() { 100 } else { 0 },
                maintenance: self.maintenance,
                resources: Vec::clone(&resources),
                control: control.clone(),
            };
            if l.out.try_send(f.encode(&self.key)).is_err() {
                l.counters.send_errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// What a step works with, as of now.
    fn step_ctx(&self) -> steps::StepCtx {
        steps::StepCtx {
            host: Arc::clone(&self.host),
            vips: Arc::clone(&self.vips),
            cfg: self.cfg.clone(),
            node: self.node.clone(),
            peer: self.peer.clone(),
            events: Arc::clone(&self.events),
            status: Arc::clone(&self.status),
        }
    }

    fn feed(&mut self, input: Input) {
        let actions = self.mgr.handle(Instant::now(), input);
        for a in actions {
            self.act(a);
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Run(step) => {
                let ctx = self.step_ctx();
                let back = self.back.clone();
                tokio::spawn(async move {
                    let o = run_step(step, &ctx).await;
                    let _ = back.send(Back::Step(o)).await;
                });
            }
            Action::Send(c) => self.send(Some(c)),
            Action::Outdate { id, mask } => {
                let vols = self.host.volumes();
                let back = self.back.clone();
                tokio::spawn(async move {
                    let mut ok = true;
                    for (i, v) in vols.iter().enumerate() {
                        if i < 32 && mask & (1 << i) != 0 {
                            // (A session still up ends there: see the engine's `Outdate`.)
                            ok &= v.outdate().await.is_ok();
                        }
                    }
                    let _ = back.send(Back::Outdate { id, mask, ok }).await;
                });
            }
            Action::PeerOutdated { mask } => {
                let vols = self.host.volumes();
                tokio::spawn(async move {
                    for (i, v) in vols.iter().enumerate() {
                        if i < 32 && mask & (1 << i) != 0 {
                            let _ = v.set_peer_outdated().await;
                        }
                    }
                });
            }
            Action::Reannounce => {
                let vips = Arc::clone(&self.vips);
                tokio::spawn(async move { vips.reannounce().await });
            }
            Action::Reply { token, result } => {
                if let Some(r) = self.replies.remove(&token) {
                    let _ = r.send(result);
                }
            }
            Action::Event(e) => self.log(e),
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let links = self
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| LinkStatus {
                name: l.name.clone(),
                state: match self.det.link(i) {
                    Some(LinkState::Up) => "up",
                    Some(LinkState::Late) => "late",
                    Some(LinkState::Down) => "down",
                    Some(LinkState::Init) | None => "waiting",
                }
                .into(),
                last_heard_ms: self.det.last_heard(i).map(|t| {
                    u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)
                }),
                frames_in: l.counters.frames_in.load(Relaxed),
                frames_out: l.counters.frames_out.load(Relaxed),
                dropped: l.counters.dropped.load(Relaxed),
                send_errors: l.counters.send_errors.load(Relaxed),
                garbage_bytes: l.counters.garbage_bytes.load(Relaxed),
            })
            .collect();
        let lv = self.local;
        let peer_master =
            self.peer_view.is_some_and(|(v, _)| v.primary) && self.det.peer() == PeerState::Alive;
        let vips = self
            .vips
            .held()
            .into_iter()
            .map(|h| crate::status::VipStatus {
                interface: h.interface,
                addresses: h.addresses,
                holder: if h.here {
                    Some(self.node.clone())
                } else if peer_master {
                    Some(self.peer.clone())
                } else {
                    None
                },
            })
            .collect();
        let switchover = match self.mgr.switchover_now() {
            Ok(what) => crate::status::Switchover { possible: true, why: what.into() },
            Err(why) => crate::status::Switchover { possible: false, why: why.to_string() },
        };
        let mut s = self.status.lock().expect("status poisoned");
        let seen = |s: &ClusterStatus| {
            (
                s.running_role.clone(),
                s.peer.clone(),
                s.healthy,
                s.maintenance,
                s.links.iter().map(|l| l.state.clone()).collect::<Vec<_>>(),
                s.vips.iter().map(|v| v.holder.clone()).collect::<Vec<_>>(),
                s.services.iter().map(|x| x.state.clone()).collect::<Vec<_>>(),
            )
        };
        let before = seen(&s);
        if lv.primary && s.running_role != "master" && !s.running_role.is_empty() {
            s.takeovers += 1;
        }
        s.vips = vips;
        s.switchover = switchover;
        s.running_role = if lv.primary {
            "master"
        } else if lv.any_primary {
            "partly master"
        } else {
            "slave"
        }
        .into();
        s.peer = match self.det.peer() {
            PeerState::Alive => "alive",
            PeerState::Dead => "dead",
            PeerState::Unknown => "unknown",
        }
        .into();
        s.peer_role =
            self.peer_view.map(|(v, _)| if v.primary { "master" } else { "slave" }.to_string());
        s.peer_healthy = self.peer_view.map(|(v, _)| v.healthy);
        s.healthy = self.health_now();
        s.checks = self
            .cfg
            .health
            .check
            .iter()
            .zip(&self.health)
            .map(|(c, ok)| crate::status::CheckStatus {
                name: c.name.clone(),
                what: format!("{} {}", format!("{:?}", c.kind).to_lowercase(), c.target),
                group: c.group.as_ref().map(|g| {
                    let group = self.cfg.health.group.iter().find(|x| x.name == *g);
                    let req = group.map_or("any", |x| x.require.word());
                    format!("{g} (require {req})")
                }),
                ok: *ok,
            })
            .collect();
        s.maintenance = self.mgr.maintenance();
        s.peer_maintenance = self.peer_view.and(self.peer_maintenance_on);
        s.activity = self.mgr.activity();
        s.links = links;
        s.drops = self.rx.drops.into();
        if seen(&s) != before {
            self.changed.notify_one();
        }
    }
}
