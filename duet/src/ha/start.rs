//! Starting the HA runtime: its own thread and runtime, the heartbeat links, the VIPs, the
//! health checks, and the loop.

use super::*;
use links::{LinkCounters, Transport, spawn_link};

/// Why the HA runtime could not start (each names the setting or the resource to look at).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the cluster manager's thread")]
    Thread(#[source] std::io::Error),
    #[error("the cluster manager's thread ended at start")]
    ThreadEnded,
    #[error("cannot start the cluster manager's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the cluster manager's start task ended")]
    Task(#[source] tokio::task::JoinError),
    #[error("the cluster manager needs a peer")]
    NoPeer,
    #[error("heartbeat timing")]
    Timing(#[source] heartbeat::detector::TimingError),
    #[error("heartbeat.link[{link}].on.{node} is missing")]
    NoLinkEnd { link: usize, node: String },
    #[error("heartbeat.link[{link}].on.{node} needs both bind and peer for a udp link")]
    NoUdpEnds { link: usize, node: String },
    #[error("heartbeat.link[{link}]")]
    Udp {
        link: usize,
        #[source]
        source: heartbeat::udp::UdpError,
    },
    #[error("heartbeat.link[{link}].on.{node}.device is missing")]
    NoDevice { link: usize, node: String },
    #[error("heartbeat.link[{link}]")]
    Serial {
        link: usize,
        #[source]
        source: heartbeat::serial::SerialError,
    },
    #[error("VIP agent")]
    Vips(#[source] vip::agent::VipError),
    #[error("heartbeat state")]
    State(#[source] crate::state::StateError),
    #[error("cannot release the VIPs at start")]
    VipsDown(#[source] vip::group::Failed),
}

/// Starts a runtime with one worker on a thread of its own, for the heartbeat and the cluster
/// manager: the data path copies into the page cache on its own thread and may be held there
/// (the kernel throttles writers when dirty pages pile up), and heartbeats must not wait for
/// that. Returns its handle and the sender that stops it when dropped.
pub(super) fn own_thread() -> Result<(tokio::runtime::Handle, oneshot::Sender<()>), StartError> {
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
        .map_err(StartError::Thread)?;
    let handle =
        handle_rx.recv().map_err(|_| StartError::ThreadEnded)?.map_err(StartError::Runtime)?;
    Ok((handle, stop_tx))
}

/// Opens the links and starts the loop.
pub async fn start(
    cfg: &Config,
    node: &str,
    secret: &[u8],
    host: Arc<dyn Host>,
    sd: watch::Receiver<bool>,
) -> Result<Ha, StartError> {
    let (rt, stop) = own_thread()?;
    let (cfg, node, secret) = (cfg.clone(), node.to_string(), secret.to_vec());
    let mut ha = rt
        .spawn(async move { start_here(&cfg, &node, &secret, host, sd).await })
        .await
        .map_err(StartError::Task)??;
    ha._thread = Some(Arc::new(stop));
    Ok(ha)
}

/// The detector's timing of `[heartbeat]`.
pub(super) fn timing_of(h: &config::Heartbeat) -> Timing {
    let ms = Duration::from_millis;
    Timing {
        keepalive: ms(h.keepalive_ms),
        warntime: ms(h.warntime_ms),
        deadtime: ms(h.deadtime_ms),
        initdead: ms(h.initdead_ms),
    }
}

/// `start`, on the cluster manager's own runtime: its sockets and tasks live there.
async fn start_here(
    cfg: &Config,
    node: &str,
    secret: &[u8],
    host: Arc<dyn Host>,
    sd: watch::Receiver<bool>,
) -> Result<Ha, StartError> {
    let peer = cfg.peer_of(node).ok_or(StartError::NoPeer)?.to_string();
    let h = &cfg.heartbeat;
    let ms = Duration::from_millis;
    let timing = timing_of(h);
    timing.validate().map_err(StartError::Timing)?;
    let (in_tx, in_rx) = mpsc::channel::<(usize, Vec<u8>)>(256);
    let mut links = Vec::new();
    for (i, l) in h.link.iter().enumerate() {
        let on =
            l.on.get(node)
                .ok_or_else(|| StartError::NoLinkEnd { link: i, node: node.to_string() })?;
        let (name, t) = match l.kind {
            config::LinkKind::Udp => {
                let (bind, to) = on
                    .udp()
                    .ok_or_else(|| StartError::NoUdpEnds { link: i, node: node.to_string() })?;
                let u = UdpLink::bind(bind, to)
                    .await
                    .map_err(|source| StartError::Udp { link: i, source })?;
                (format!("udp {bind} -> {to}"), Transport::Udp(Arc::new(u)))
            }
            config::LinkKind::Serial => {
                let dev: PathBuf = on
                    .device
                    .clone()
                    .ok_or_else(|| StartError::NoDevice { link: i, node: node.to_string() })?;
                let baud = l.baud.unwrap_or(115_200);
                let rts = l.flow_control == Some(config::FlowControl::Rtscts);
                let p = SerialPort::open(&dev, baud, rts)
                    .map_err(|source| StartError::Serial { link: i, source })?;
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
    // The boot generation is a counter on disk, durable before the first frame: a restart is
    // always newer, whatever the clock did. The peer's checkpoint makes a frame recorded before
    // our restart a replay still.
    let dir = &cfg.cluster.state_dir;
    crate::state::ensure_dir(dir).map_err(StartError::State)?;
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let boot = crate::state::next_boot(dir, node, clock).map_err(StartError::State)?;
    let checkpoint = crate::state::load_checkpoint(dir, node, &peer).map_err(StartError::State)?;
    let maintenance = crate::state::load_maintenance(dir, node).map_err(StartError::State)?;
    // Test-only: hold this node to an older heartbeat version, as the previous release speaks
    // (the rolling-upgrade test). Not a configuration key: nothing else should ever set it.
    let max_version = std::env::var("DUET_TEST_HEARTBEAT_VERSION")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .unwrap_or(frame::VERSION);
    let my_id = u8::try_from(crate::config::runtime::node_id(cfg, node)).unwrap_or(0);
    let peer_id = u8::try_from(crate::config::runtime::node_id(cfg, &peer)).unwrap_or(1);
    let cluster = frame::cluster_id(&cfg.cluster.name);
    let (req_tx, req_rx) = mpsc::channel(16);
    let status = Arc::new(Mutex::new(ClusterStatus {
        configured_master: cfg.cluster.configured_master.clone(),
        failback: format!("{:?}", cfg.cluster.failback).to_lowercase(),
        fencing: format!("{:?}", cfg.fencing.policy),
        healthy: true,
        maintenance: maintenance.on,
        services: cfg
            .service
            .iter()
            .map(|s| crate::status::ServiceStatus {
                name: s.name.clone(),
                placement: format!("{:?}", s.placement).to_lowercase(),
                state: if s.placement == config::Placement::Both {
                    "running".into()
                } else {
                    "not started".into()
                },
            })
            .collect(),
        ..Default::default()
    }));
    let events = host.journal();
    let changed = Arc::new(tokio::sync::Notify::new());
    let vips = Arc::new(vips(cfg, node, &events)?);
    // A node starts as a slave: a VIP left over from a crash while master goes now.
    vips.down().await.map_err(StartError::VipsDown)?;
    let (back_tx, back_rx) = mpsc::channel(64);
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
        rx: Receiver::new(vec![(1, secret.to_vec())], cluster, peer_id)
            .resume(checkpoint)
            .max_version(max_version),
        mgr: Manager::new(settings, now).with_id_seed(boot),
        maintenance,
        peer_maintenance_on: None,
        newest_frame: None,
        versions: frame::Versions::new(max_version),
        held: std::collections::VecDeque::new(),
        checkpoint_failing: false,
        links,
        host,
        vips: Arc::clone(&vips),
        vips_wanted: None,
        back: back_tx,
        replies: HashMap::new(),
        next_token: 1,
        health: vec![true; cfg.health.check.len()],
        probes: Vec::new(),
        probes_gen: 0,
        sd: sd.clone(),
        healthy: true,
        peer_view: None,
        local: LocalView::default(),
        limiter: Limited::new(1, Duration::from_secs(5)),
        status: Arc::clone(&status),
        events: Arc::clone(&events),
        changed: Arc::clone(&changed),
        timing,
        watchdog: crate::daemon::notify::Watchdog::from_env(),
        told: crate::daemon::notify::enabled().then(String::new),
    };
    let span = tracing::error_span!("ha", node = %node, peer = %lp.peer);
    tokio::spawn(tracing::Instrument::instrument(lp.run(in_rx, req_rx, back_rx, sd), span));
    Ok(Ha { requests: req_tx, status, events, changed, _thread: None })
}
