//! The HA runtime: opens the heartbeat links, runs the failure detector and the cluster manager
//! in one task, executes the manager's actions (fence, promote, VIP, services, export, outdate)
//! and feeds the results back. The decisions are in [`crate::cluster`]; this file only wires.
//!
//! One task owns the detector, the receiver (authentication, anti-replay) and the manager, so
//! no decision state is shared. Link I/O runs in its own tasks (one reader and one writer per
//! link), so a stuck serial line cannot delay the UDP link. Steps run in spawned tasks and
//! report back through a channel; the manager allows one step at a time.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use heartbeat::detector::{Detector, Event as DetEvent, LinkState, PeerState, Timing};
use heartbeat::frame::{self, Control, Frame, ResourceState};
use heartbeat::receiver::{DropCounts, LogLimiter, Receiver};
use heartbeat::serial::{Deframer, SerialPort, wrap};
use heartbeat::udp::UdpLink;
use replicator::nbd::server::stopped;
use replicator::repl::volume::{ConnState, DiskState, Role, Volume};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cluster::health::Hysteresis;
use crate::cluster::{self, Action, Fencing, Input, LocalView, Manager, Outcome, PeerView, Step};
use crate::config::{self, Config};

/// How long a fence command may run.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a switchover may take.
pub const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the HA runtime needs from the daemon.
pub trait Host: Send + Sync + 'static {
    /// The replicated volumes, in resource order.
    fn volumes(&self) -> Vec<Arc<Volume>>;
    /// Opens every export whose resources are all Primary.
    fn open_exports(&self) -> futures_util::future::BoxFuture<'_, Result<(), String>>;
    /// Closes every export, draining in-flight requests.
    fn close_exports(&self) -> futures_util::future::BoxFuture<'_, ()>;
}

/// A request from the control socket.
#[derive(Debug)]
pub enum Request {
    MakeMaster {
        force: bool,
        reply: oneshot::Sender<Result<String, String>>,
    },
    MakeSlave {
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// The daemon is stopping: take nothing over from now on.
    Stopping,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub what: String,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The node's event log (failover, heartbeat); bounded.
#[derive(Debug, Default)]
pub struct EventLog {
    entries: Mutex<VecDeque<LogEntry>>,
}

impl EventLog {
    pub fn push(&self, what: String) {
        let mut e = self.entries.lock().expect("event log poisoned");
        e.push_back(LogEntry { at: unix_now(), what });
        if e.len() > 2000 {
            e.pop_front();
        }
    }
    pub fn since(&self, at: f64) -> Vec<LogEntry> {
        let e = self.entries.lock().expect("event log poisoned");
        e.iter().filter(|x| x.at > at).cloned().collect()
    }
}

/// Counters of one link.
#[derive(Debug, Default)]
struct LinkCounters {
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    dropped: AtomicU64,
    send_errors: AtomicU64,
    garbage_bytes: AtomicU64,
}

/// One link as `duet status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub name: String,
    /// up | late | down | waiting (not heard yet, within initdead).
    pub state: String,
    /// Milliseconds since the last authenticated frame.
    pub last_heard_ms: Option<u64>,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Frames refused on this link (malformed, bad MAC, foreign, replayed).
    pub dropped: u64,
    pub send_errors: u64,
    /// Serial only: bytes skipped as line noise.
    pub garbage_bytes: u64,
}

/// The cluster part of `duet status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterStatus {
    pub configured_master: String,
    /// master | slave (this node).
    pub running_role: String,
    /// alive | dead | unknown.
    pub peer: String,
    pub peer_role: Option<String>,
    pub peer_healthy: Option<bool>,
    pub healthy: bool,
    pub failback: String,
    pub fencing: String,
    /// What the manager is doing, if anything.
    pub activity: Option<String>,
    pub links: Vec<LinkStatus>,
    pub drops: Drops,
}

/// Dropped frames by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Drops {
    pub malformed: u64,
    pub auth: u64,
    pub foreign_cluster: u64,
    pub wrong_node: u64,
    pub replay: u64,
}

impl From<DropCounts> for Drops {
    fn from(d: DropCounts) -> Self {
        Self {
            malformed: d.malformed,
            auth: d.auth,
            foreign_cluster: d.cluster,
            wrong_node: d.node,
            replay: d.replay,
        }
    }
}

/// The handle the daemon keeps.
#[derive(Debug, Clone)]
pub struct Ha {
    pub requests: mpsc::Sender<Request>,
    pub status: Arc<Mutex<ClusterStatus>>,
    pub events: Arc<EventLog>,
    /// Keeps the cluster manager's thread running (it stops when this is dropped).
    _thread: Option<Arc<oneshot::Sender<()>>>,
}

/// Starts a runtime with one worker on a thread of its own, for the heartbeat and the cluster
/// manager: the data path copies into the page cache on its own thread and may be held there
/// (the kernel throttles writers when dirty pages pile up), and heartbeats must not wait for
/// that. Returns its handle and the sender that stops it when dropped.
fn own_thread() -> anyhow::Result<(tokio::runtime::Handle, oneshot::Sender<()>)> {
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("duet-ha".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("duet-ha")
                .enable_all()
                .build();
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                    return;
                }
            };
            let _ = handle_tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stop_rx.await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        })
        .context("cannot start the cluster manager's thread")?;
    let handle = handle_rx
        .recv()
        .context("the cluster manager's thread ended at start")?
        .context("cannot start the cluster manager's runtime")?;
    Ok((handle, stop_tx))
}

enum Transport {
    Udp(Arc<UdpLink>),
    Serial(Arc<SerialPort>),
}

struct Link {
    name: String,
    out: mpsc::Sender<Vec<u8>>,
    counters: Arc<LinkCounters>,
}

/// Results coming back to the loop.
enum Back {
    Step(Outcome),
    Outdate { id: u64, mask: u32, ok: bool },
    Health(usize, bool),
}

/// The VIPs of this node and what announces them.
#[derive(Debug)]
pub struct Vips {
    agent: Option<vip::agent::Agent>,
    specs: Vec<vip::agent::VipSpec>,
    announcers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Vips {
    fn new(cfg: &Config, node: &str) -> anyhow::Result<Self> {
        let mut specs = Vec::new();
        for v in &cfg.vip {
            let mut addrs = Vec::new();
            for a in std::iter::once(&v.address).chain(&v.aliases) {
                addrs.push(config::parse_prefix(a).context("validated by Config::validate")?);
            }
            specs.push(vip::agent::VipSpec {
                interface: v.interface.clone(),
                addrs,
                mac: if v.mac.is_empty() { None } else { vip::packets::parse_mac(&v.mac) },
                plan: vip::schedule::Plan {
                    count: v.announce_count,
                    interval: Duration::from_millis(v.announce_interval_ms),
                    repeat_after: Duration::from_millis(v.announce_repeat_after_ms),
                    refresh: Duration::from_millis(v.announce_refresh_ms),
                },
            });
        }
        let agent = if specs.is_empty() {
            None
        } else {
            let dir = cfg
                .control_socket(node)
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| "/run/duet".into());
            Some(vip::agent::Agent::new(dir, node).map_err(|e| anyhow::anyhow!("VIP agent: {e}"))?)
        };
        Ok(Self { agent, specs, announcers: Mutex::new(Vec::new()) })
    }

    fn stop_announcing(&self) {
        for h in self.announcers.lock().expect("announcers poisoned").drain(..) {
            h.abort();
        }
    }

    fn announce(
        &self,
        index: u32,
        mac: vip::packets::Mac,
        spec: &vip::agent::VipSpec,
        events: &Arc<EventLog>,
    ) {
        let frames = vip::agent::announcements(spec, mac);
        let plan = spec.plan;
        let name = spec.interface.clone();
        let events = Arc::clone(events);
        let h = tokio::spawn(async move {
            let sock = match vip::agent::RawSocket::open(index, vip::packets::ETH_P_ARP, &name) {
                Ok(s) => s,
                Err(e) => {
                    events.push(format!("VIP announcements on {name} impossible: {e}"));
                    return;
                }
            };
            let mut sch = vip::schedule::Schedule::new(plan, Instant::now());
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
                events.push(format!("{errors} VIP announcement(s) on {name} could not be sent"));
            }
        });
        self.announcers.lock().expect("announcers poisoned").push(h);
    }

    /// Acquires every VIP and starts its announcements; reports a host that already answers
    /// for a VIP loudly (the takeover goes on: the cluster manager decided).
    async fn up(&self, events: &Arc<EventLog>) -> Result<(), String> {
        let Some(agent) = &self.agent else { return Ok(()) };
        self.stop_announcing();
        let mut errors = Vec::new();
        for spec in &self.specs {
            let probe = match (agent.link(&spec.interface).await, spec.addrs.first()) {
                (Ok((index, mac)), Some((IpAddr::V4(ip), _))) => {
                    let (name, ip) = (spec.interface.clone(), *ip);
                    let mine = spec.mac.unwrap_or(mac);
                    Some(tokio::task::spawn_blocking(move || {
                        vip::agent::probe(index, &name, mine, ip, Duration::from_millis(300))
                            .map(|r| (ip, r))
                    }))
                }
                _ => None,
            };
            match agent.acquire(spec).await {
                Ok((index, mac)) => {
                    self.announce(index, mac, spec, events);
                    let list: Vec<String> =
                        spec.addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect();
                    events.push(format!(
                        "VIP {} up on {} (MAC {})",
                        list.join(", "),
                        spec.interface,
                        vip::packets::mac_string(&mac)
                    ));
                }
                Err(e) => errors.push(e.to_string()),
            }
            if let Some(p) = probe {
                let events = Arc::clone(events);
                tokio::spawn(async move {
                    if let Ok(Ok((ip, Some(other)))) = p.await {
                        let msg = format!(
                            "DUPLICATE ADDRESS: host {} also answers for VIP {ip}",
                            vip::packets::mac_string(&other)
                        );
                        tracing::error!("{msg}");
                        events.push(msg);
                    }
                });
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// Releases every VIP (addresses gone, MAC restored).
    async fn down(&self, events: &EventLog) -> Result<(), String> {
        let Some(agent) = &self.agent else { return Ok(()) };
        self.stop_announcing();
        let mut errors = Vec::new();
        for spec in &self.specs {
            match agent.release(spec).await {
                Ok(()) => events.push(format!("VIP on {} released", spec.interface)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// Sends the announcements again (after winning back from a dual-master episode).
    async fn reannounce(&self, events: &Arc<EventLog>) {
        let Some(agent) = &self.agent else { return };
        self.stop_announcing();
        for spec in &self.specs {
            if let Ok((index, mac)) = agent.link(&spec.interface).await {
                self.announce(index, spec.mac.unwrap_or(mac), spec, events);
            }
        }
    }
}

/// Whether `cfg` asks for the cluster manager (heartbeat links configured).
pub fn enabled(cfg: &Config) -> bool {
    !cfg.heartbeat.link.is_empty() && cfg.node_names().len() == 2
}

/// Opens the links and starts the loop.
pub async fn start(
    cfg: &Config,
    node: &str,
    secret: &[u8],
    host: Arc<dyn Host>,
    sd: watch::Receiver<bool>,
) -> anyhow::Result<Ha> {
    let (rt, stop) = own_thread()?;
    let (cfg, node, secret) = (cfg.clone(), node.to_string(), secret.to_vec());
    let mut ha = rt
        .spawn(async move { start_here(&cfg, &node, &secret, host, sd).await })
        .await
        .context("the cluster manager's start failed")??;
    ha._thread = Some(Arc::new(stop));
    Ok(ha)
}

/// `start`, on the cluster manager's own runtime: its sockets and tasks live there.
async fn start_here(
    cfg: &Config,
    node: &str,
    secret: &[u8],
    host: Arc<dyn Host>,
    sd: watch::Receiver<bool>,
) -> anyhow::Result<Ha> {
    let peer = cfg.peer_of(node).context("the cluster manager needs a peer")?.to_string();
    let h = &cfg.heartbeat;
    let ms = Duration::from_millis;
    let timing = Timing {
        keepalive: ms(h.keepalive_ms),
        warntime: ms(h.warntime_ms),
        deadtime: ms(h.deadtime_ms),
        initdead: ms(h.initdead_ms),
    };
    timing.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (in_tx, in_rx) = mpsc::channel::<(usize, Vec<u8>)>(256);
    let mut links = Vec::new();
    for (i, l) in h.link.iter().enumerate() {
        let on =
            l.on.get(node).with_context(|| format!("heartbeat.link[{i}].on.{node} is missing"))?;
        let (name, t) = match l.kind {
            config::LinkKind::Udp => {
                let parse = |k: &str, v: &Option<String>| -> anyhow::Result<std::net::SocketAddr> {
                    let v = v.as_deref().unwrap_or_default();
                    v.parse().with_context(|| format!("heartbeat.link[{i}].on.{node}.{k} = {v:?}"))
                };
                let bind = parse("bind", &on.bind)?;
                let to = parse("peer", &on.peer)?;
                let u = UdpLink::bind(bind, to)
                    .await
                    .with_context(|| format!("heartbeat.link[{i}]"))?;
                (format!("udp {bind} -> {to}"), Transport::Udp(Arc::new(u)))
            }
            config::LinkKind::Serial => {
                let dev: PathBuf = on
                    .device
                    .clone()
                    .with_context(|| format!("heartbeat.link[{i}].on.{node}.device is missing"))?;
                let baud = l.baud.unwrap_or(115_200);
                let rts = l.flow_control == Some(config::FlowControl::Rtscts);
                let p = SerialPort::open(&dev, baud, rts)
                    .with_context(|| format!("heartbeat.link[{i}]"))?;
                (format!("serial {} @{baud}", dev.display()), Transport::Serial(Arc::new(p)))
            }
        };
        let counters = Arc::new(LinkCounters::default());
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(16);
        spawn_link(
            i,
            t,
            out_rx,
            in_tx.clone(),
            Arc::clone(&counters),
            timing.keepalive,
            sd.clone(),
        );
        links.push(Link { name, out: out_tx, counters });
    }
    let fencing = match cfg.fencing.policy {
        config::FencingPolicy::DontCare => Fencing::DontCare,
        config::FencingPolicy::ResourceOnly => Fencing::ResourceOnly,
        config::FencingPolicy::ResourceAndStonith => Fencing::ResourceAndStonith,
    };
    let settings = cluster::Settings {
        configured_master: cfg.cluster.configured_master == node,
        failback_auto: cfg.cluster.failback == config::Failback::Auto,
        fencing,
        fence_command: !cfg.fencing.fence_command.trim().is_empty(),
        fence_delay: ms(cfg.fence_delay_ms(node)),
        switchover_timeout: SWITCHOVER_TIMEOUT,
        resend: timing.keepalive * 2,
        retry: Duration::from_secs(5).max(timing.deadtime * 2),
        resources: cfg.resource.len(),
    };
    let now = Instant::now();
    let boot = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let my_id = u8::try_from(crate::daemon::node_id(cfg, node)).unwrap_or(0);
    let peer_id = u8::try_from(crate::daemon::node_id(cfg, &peer)).unwrap_or(1);
    let cluster = frame::cluster_id(&cfg.cluster.name);
    let (req_tx, req_rx) = mpsc::channel(16);
    let status = Arc::new(Mutex::new(ClusterStatus {
        configured_master: cfg.cluster.configured_master.clone(),
        failback: format!("{:?}", cfg.cluster.failback).to_lowercase(),
        fencing: format!("{:?}", cfg.fencing.policy),
        healthy: true,
        ..Default::default()
    }));
    let events = Arc::new(EventLog::default());
    let vips = Arc::new(Vips::new(cfg, node)?);
    // A node starts as a slave: a VIP left over from a crash while master goes now.
    if let Err(e) = vips.down(&events).await {
        anyhow::bail!("cannot release the VIPs at start: {e}");
    }
    let (back_tx, back_rx) = mpsc::channel(64);
    for (i, c) in cfg.health.check.iter().enumerate() {
        tokio::spawn(health_check(i, c.clone(), node.to_string(), back_tx.clone(), sd.clone()));
    }
    let lp = Loop {
        node: node.to_string(),
        peer,
        cfg: cfg.clone(),
        key: secret.to_vec(),
        cluster,
        my_id,
        boot,
        seq: 0,
        det: Detector::new(timing, links.len(), now),
        rx: Receiver::new(vec![(1, secret.to_vec())], cluster, peer_id),
        mgr: Manager::new(settings, now).with_id_seed(boot),
        links,
        host,
        vips: Arc::clone(&vips),
        back: back_tx,
        replies: HashMap::new(),
        next_token: 1,
        health: vec![true; cfg.health.check.len()],
        healthy: true,
        peer_view: None,
        local: LocalView::default(),
        limiter: LogLimiter::new(Duration::from_secs(5)),
        status: Arc::clone(&status),
        events: Arc::clone(&events),
        timing,
    };
    tokio::spawn(lp.run(in_rx, req_rx, back_rx, sd));
    Ok(Ha { requests: req_tx, status, events, _thread: None })
}

fn spawn_link(
    i: usize,
    t: Transport,
    mut out: mpsc::Receiver<Vec<u8>>,
    inbox: mpsc::Sender<(usize, Vec<u8>)>,
    c: Arc<LinkCounters>,
    keepalive: Duration,
    sd: watch::Receiver<bool>,
) {
    match t {
        Transport::Udp(u) => {
            let u2 = Arc::clone(&u);
            let c2 = Arc::clone(&c);
            tokio::spawn(async move {
                while let Some(b) = out.recv().await {
                    match u2.send(&b).await {
                        Ok(()) => c2.frames_out.fetch_add(1, Relaxed),
                        Err(_) => c2.send_errors.fetch_add(1, Relaxed),
                    };
                }
            });
            let mut sd = sd;
            tokio::spawn(async move {
                let mut buf = Box::new([0u8; frame::MAX_FRAME + 1]);
                loop {
                    tokio::select! {
                        r = u.recv(&mut buf) => match r {
                            Ok((n, _)) => {
                                if inbox.send((i, buf[..n].to_vec())).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        },
                        _ = stopped(&mut sd) => return,
                    }
                }
            });
        }
        Transport::Serial(p) => {
            let p2 = Arc::clone(&p);
            let c2 = Arc::clone(&c);
            tokio::spawn(async move {
                while let Some(b) = out.recv().await {
                    match p2.write_all(&wrap(&b), keepalive).await {
                        Ok(()) => c2.frames_out.fetch_add(1, Relaxed),
                        Err(_) => c2.send_errors.fetch_add(1, Relaxed),
                    };
                }
            });
            let mut sd = sd;
            tokio::spawn(async move {
                let mut d = Deframer::default();
                let mut buf = vec![0u8; 4096];
                loop {
                    tokio::select! {
                        r = p.read(&mut buf) => match r {
                            Ok(0) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            Ok(n) => {
                                d.push(&buf[..n]);
                                while let Some(f) = d.next_frame() {
                                    if inbox.send((i, f)).await.is_err() {
                                        return;
                                    }
                                }
                                c.garbage_bytes.store(d.garbage_bytes, Relaxed);
                            }
                        },
                        _ = stopped(&mut sd) => return,
                    }
                }
            });
        }
    }
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
    links: Vec<Link>,
    host: Arc<dyn Host>,
    vips: Arc<Vips>,
    back: mpsc::Sender<Back>,
    replies: HashMap<u64, oneshot::Sender<Result<String, String>>>,
    next_token: u64,
    health: Vec<bool>,
    healthy: bool,
    peer_view: Option<(PeerView, Instant)>,
    /// The replicator's state as last read (each tick and after each step).
    local: LocalView,
    limiter: LogLimiter,
    status: Arc<Mutex<ClusterStatus>>,
    events: Arc<EventLog>,
    timing: Timing,
}

fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::Inconsistent => 0,
        DiskState::Outdated => 1,
        DiskState::Consistent => 2,
        DiskState::UpToDate => 3,
    }
}

fn conn_code(c: ConnState) -> u8 {
    match c {
        ConnState::StandAlone | ConnState::Connecting | ConnState::Disconnecting => 0,
        ConnState::Connected => 1,
        ConnState::SyncSource => 2,
        ConnState::SyncTarget => 3,
        ConnState::VerifySource | ConnState::VerifyTarget => 4,
    }
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
                    Back::Health(i, ok) => {
                        if let Some(h) = self.health.get_mut(i) {
                            *h = ok;
                        }
                        self.healthy = self.health.iter().all(|h| *h);
                        let h = self.healthy;
                        self.feed(Input::Health(h));
                    }
                },
                _ = ticker.tick() => {
                    let now = Instant::now();
                    let ev = self.det.tick(now);
                    self.detector_events(ev);
                    self.refresh_local();
                    self.feed(Input::Tick);
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

    fn log(&self, s: String) {
        tracing::info!(target: "duet::cluster", "{s}");
        self.events.push(s);
    }

    fn received(&mut self, link: usize, b: &[u8]) {
        let now = Instant::now();
        match self.rx.receive(b) {
            Ok(f) => {
                if let Some(l) = self.links.get(link) {
                    l.counters.frames_in.fetch_add(1, Relaxed);
                }
                let ev = self.det.heard(link, now);
                self.detector_events(ev);
                let n = f.resources.len();
                let view = PeerView {
                    primary: n > 0 && f.resources.iter().all(|r| r.role == 1),
                    any_primary: f.resources.iter().any(|r| r.role == 1),
                    uptodate: n > 0 && f.resources.iter().all(|r| r.disk == 3),
                    healthy: f.health == 100,
                };
                self.peer_view = Some((view, now));
                self.feed(Input::PeerView(view));
                if let Some(c) = f.control {
                    // The peer's requests too are judged on the replicator's state now.
                    self.refresh_local();
                    self.feed(Input::Control(c));
                }
            }
            Err(why) => {
                if let Some(l) = self.links.get(link) {
                    l.counters.dropped.fetch_add(1, Relaxed);
                }
                if let Some(held) = self.limiter.allow(now) {
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
        self.local = self.local_view();
        let l = self.local;
        self.feed(Input::Local(l));
    }

    fn local_view(&self) -> LocalView {
        let vols = self.host.volumes();
        let mut v = LocalView {
            primary: !vols.is_empty(),
            any_primary: false,
            uptodate: !vols.is_empty(),
            in_sync: !vols.is_empty(),
            resyncing: false,
            peer_primary: false,
            disconnected: 0,
            worst_disk: "UpToDate",
        };
        let mut worst = DiskState::UpToDate;
        for (i, vol) in vols.iter().enumerate() {
            let s = vol.summary();
            let primary = s.role == Role::Primary;
            v.primary &= primary;
            v.any_primary |= primary;
            v.uptodate &= s.disk == DiskState::UpToDate;
            worst = worst.min(s.disk);
            v.in_sync &= s.connection == ConnState::Connected
                && s.peer_disk == Some(DiskState::UpToDate)
                && s.out_of_sync_bytes == 0;
            v.resyncing |= matches!(s.connection, ConnState::SyncSource | ConnState::SyncTarget);
            v.peer_primary |= s.peer_role == Some(Role::Primary);
            if matches!(
                s.connection,
                ConnState::StandAlone | ConnState::Connecting | ConnState::Disconnecting
            ) && i < 32
            {
                v.disconnected |= 1 << i;
            }
        }
        v.worst_disk = match worst {
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Consistent => "Consistent",
            DiskState::UpToDate => "UpToDate",
        };
        v
    }

    /// Sends our state (and a control message) on every link.
    fn send(&mut self, control: Option<Control>) {
        let resources = self
            .host
            .volumes()
            .iter()
            .map(|v| {
                let s = v.summary();
                ResourceState {
                    role: u8::from(s.role == Role::Primary),
                    disk: disk_code(s.disk),
                    conn: conn_code(s.connection),
                    generation: s.generation,
                }
            })
            .collect();
        for l in &self.links {
            self.seq += 1;
            let f = Frame {
                key_id: 1,
                node_id: self.my_id,
                cluster: self.cluster,
                boot: self.boot,
                seq: self.seq,
                health: if self.healthy { 100 } else { 0 },
                resources: Vec::clone(&resources),
                control: control.clone(),
            };
            if l.out.try_send(f.encode(&self.key)).is_err() {
                l.counters.send_errors.fetch_add(1, Relaxed);
            }
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
                let host = Arc::clone(&self.host);
                let vips = Arc::clone(&self.vips);
                let back = self.back.clone();
                let cfg = self.cfg.clone();
                let (node, peer) = (self.node.clone(), self.peer.clone());
                let events = Arc::clone(&self.events);
                tokio::spawn(async move {
                    let o = run_step(step, &*host, &vips, &cfg, &node, &peer, &events).await;
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
                let events = Arc::clone(&self.events);
                tokio::spawn(async move { vips.reannounce(&events).await });
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
        let mut s = self.status.lock().expect("status poisoned");
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
        s.healthy = self.healthy;
        s.activity = self.mgr.activity();
        s.links = links;
        s.drops = self.rx.drops.into();
    }
}

/// Runs one step of a takeover or release.
async fn run_step(
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
                Ok(code) => Outcome::Fence(code),
                Err(e) => {
                    events.push(format!("fence command: {e}"));
                    Outcome::Fence(None)
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
            Err(e) => Outcome::Failed(e),
        },
        Step::ExportClose => {
            host.close_exports().await;
            Outcome::Ok
        }
        Step::VipUp | Step::VipDown => {
            let r =
                if step == Step::VipUp { vips.up(events).await } else { vips.down(events).await };
            match r {
                Ok(()) => Outcome::Ok,
                Err(e) => Outcome::Failed(e),
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
                    errors.push(e);
                }
            }
            for s in cfg.service.iter().filter(|s| s.placement == start) {
                if let Err(e) = service(s, &s.start, "start", node).await {
                    errors.push(e);
                }
            }
            for e in &errors {
                events.push(e.clone());
            }
            if errors.is_empty() { Outcome::Ok } else { Outcome::Failed(errors.join("; ")) }
        }
    }
}

async fn service(s: &config::Service, cmd: &str, what: &str, node: &str) -> Result<(), String> {
    let env = [("DUET_SERVICE", s.name.as_str()), ("DUET_NODE", node)];
    match shell(cmd, &env, Duration::from_millis(s.timeout_ms)).await {
        Ok(Some(0)) => Ok(()),
        Ok(code) => Err(format!("service {}: {what} command exited with {code:?}", s.name)),
        Err(e) => Err(format!("service {}: {what} command: {e}", s.name)),
    }
}

/// Runs `sh -c cmd` with a timeout; the exit code (None: killed by a signal).
pub async fn shell(
    cmd: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Option<i32>, String> {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).kill_on_drop(true).stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) => Ok(st.code()),
        Ok(Err(e)) => Err(format!("waiting for {cmd:?}: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("{cmd:?} did not finish within {} ms; killed", timeout.as_millis()))
        }
    }
}

/// One health check, probing every `interval_ms`; reports each change of verdict.
async fn health_check(
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
            if back.send(Back::Health(i, v)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut sd) => return,
        }
    }
}
