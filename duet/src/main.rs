//! `duet`: the daemon and the CLI in one binary. The binary is thin: it parses arguments, loads
//! the configuration, and calls into the library's `daemon` or the control socket.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error; 3 the daemon is not
//! reachable.

use duet::{config, control, daemon, md, plan, status};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// duet: two machines, one replicated block device, automatic failover.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (one file, identical on both nodes).
    #[arg(long, global = true, default_value = "/etc/duet/duet.toml")]
    config: PathBuf,
    /// This node's name (a [node.NAME] section); default: the hostname.
    #[arg(long, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `duet daemon --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `duet maintenance on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// What `duet generate` writes (for packaging; no configuration is read).
#[derive(Debug, Subcommand)]
enum Generate {
    /// Manual pages: duet.1 and one page per command (duet-status.1, …) in DIR.
    Man { dir: PathBuf },
    /// Shell completions on stdout.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run this node.
    Daemon {
        /// Log lines as text, or as one JSON object per line (for a log shipper).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Roles, disk and connection states, NBD clients and counters.
    Status {
        /// Machine-readable output.
        #[arg(long, conflicts_with = "check")]
        json: bool,
        /// One line for monitoring, and Nagios's exit codes: 0 OK, 1 WARNING (syncing, peer
        /// away, out of sync), 2 CRITICAL (split brain, StandAlone, a Primary without good
        /// data, no master), 3 UNKNOWN (the daemon does not answer).
        #[arg(long)]
        check: bool,
        /// A live view: redrawn at each event the daemon pushes (and each second, for resync
        /// progress), with the last events under it, until interrupted.
        #[arg(long, conflicts_with_all = ["check", "json"])]
        watch: bool,
    },
    /// Validate the configuration and print what each node will do.
    CheckConfig {
        /// Test the pair as configured, through the running daemons (start them on both nodes
        /// first): this node's addresses, the replication handshake with the peer (reached,
        /// authenticated, same settings, volume sizes), every heartbeat link, and the subnets
        /// of the heartbeat peers and the VIPs. Prints a table; exit 1 when a check fails.
        #[arg(long)]
        connect: bool,
        /// With --connect: how long to wait for a link that is still coming up, in seconds.
        #[arg(long, default_value_t = 10, requires = "connect")]
        wait: u64,
    },
    /// Initialise the replication metadata of this node's disks (the daemon must be stopped).
    CreateMd {
        /// Only this resource.
        #[arg(long)]
        resource: Option<String>,
        /// Overwrite existing metadata (the next connect does a full resync).
        #[arg(long)]
        force: bool,
    },
    /// Take a disk detached after an I/O error back (the daemon must be stopped): its metadata
    /// is read and marked Inconsistent, so the next connect resyncs all of it from the peer.
    /// After a disk replacement, run `create-md --force` instead.
    Attach {
        /// The resource whose disk is taken back.
        resource: String,
    },
    /// Print the replication metadata of this node's disks.
    DumpMd {
        /// Only this resource.
        #[arg(long)]
        resource: Option<String>,
    },
    /// Become Primary for a resource (or all): open the NBD export.
    Primary {
        #[arg(long)]
        resource: Option<String>,
        /// Promote even without UpToDate data (this node's data becomes the source of truth).
        #[arg(long)]
        force: bool,
    },
    /// Close the NBD export (in-flight requests drain) and become Secondary.
    Secondary {
        #[arg(long)]
        resource: Option<String>,
    },
    /// Connect to the peer.
    Connect {
        #[arg(long)]
        resource: Option<String>,
        /// Split-brain recovery: this node is the victim; the peer's data wins.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the peer link and stay StandAlone.
    Disconnect {
        #[arg(long)]
        resource: Option<String>,
    },
    /// Throw away this node's data: full resync from the peer.
    Invalidate {
        #[arg(long)]
        resource: Option<String>,
    },
    /// Retry the requests a failing disk holds (`on_io_error = "freeze"`), once it is back.
    ResumeIo {
        #[arg(long)]
        resource: Option<String>,
    },
    /// Planned switchover: make this node the running master (the peer releases first).
    MakeMaster {
        /// Take the role even with the peer unreachable or the local data not UpToDate.
        #[arg(long)]
        force: bool,
    },
    /// Planned switchover: hand the master role to the peer.
    MakeSlave,
    /// Maintenance mode, for the whole pair (run on either node; kept across restarts): while
    /// on, the cluster manager changes no role by itself (no takeover, failback or handover;
    /// outdating and fencing go on) and refuses switchovers, and `duet primary` / `secondary` /
    /// `disconnect` act by hand. When it goes off, a Primary takes the VIPs and services, a
    /// Secondary gives them up, and the cluster manager acts again.
    Maintenance {
        /// on | off.
        mode: OnOff,
    },
    /// Wait until a resource is UpToDate on this node (`--uptodate`), or Primary here with
    /// its export open (`--primary`): for ordering mounts and NFS after duet (duet-wait@.service).
    /// Exit 0 when it is, 1 when the timeout passed first.
    #[command(group(clap::ArgGroup::new("until").required(true).args(["uptodate", "primary"])))]
    Wait {
        /// Until the local disk is UpToDate.
        #[arg(long)]
        uptodate: bool,
        /// Until this node is Primary, UpToDate, and serving the export.
        #[arg(long)]
        primary: bool,
        /// The resource.
        resource: String,
        /// Give up after this many seconds (0: never). A daemon not running yet is waited for.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
    /// Man pages and shell completions, for packaging.
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Apply the configuration file's changes to the running daemon: resync rates, [[service]]
    /// and [hooks]. A change that needs a restart is refused, naming its key, and nothing is
    /// applied (SIGHUP to the daemon does the same)
    Adjust,
    /// The failover, heartbeat and sync log.
    Events {
        /// Keep printing new events as the daemon pushes them, until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per event (with --follow: the current state first, as `exists`
        /// records, then each change).
        #[arg(long)]
        json: bool,
    },
    /// Online verify: compare every block with the peer's.
    Verify {
        #[arg(long)]
        resource: Option<String>,
        /// Resync the blocks found different (the Primary's data wins).
        #[arg(long)]
        repair: bool,
    },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Generate { what } = &cli.cmd {
        return generate(what);
    }
    let cfg = match config::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duet: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Cmd::CheckConfig { connect: false, .. } = cli.cmd {
        duet::out!("{}", plan::describe(&cfg));
        return ExitCode::SUCCESS;
    }
    let node = match cfg.pick_node(cli.node.as_deref(), &hostname()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("duet: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The daemon's data path runs on `data_threads` workers (the heartbeat has its own thread,
    // see `ha::start`); the CLI commands need one.
    let workers = if matches!(cli.cmd, Cmd::Daemon { .. }) { cfg.cluster.data_threads } else { 1 };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("duet-data")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duet: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let call = match cli.cmd {
        Cmd::CheckConfig { wait, .. } => return connection_test(&rt, &cfg, &node, wait),
        Cmd::Generate { .. } => unreachable!("handled above"),
        Cmd::CreateMd { resource, force } => {
            return md::create(&rt, &cfg, &node, resource.as_deref(), force);
        }
        Cmd::DumpMd { resource } => return md::dump(&cfg, &node, resource.as_deref()),
        Cmd::Attach { resource } => return md::attach(&rt, &cfg, &node, &resource),
        Cmd::Daemon { log_format } => {
            return run_daemon(&rt, cfg, node, cli.config.clone(), log_format);
        }
        Cmd::Adjust => return adjust(&rt, &cfg, &node),
        Cmd::Status { watch: true, .. } => return watch_status(&rt, &cfg, &node),
        Cmd::Status { json, check, .. } => return show_status(&rt, &cfg, &node, json, check),
        Cmd::Primary { resource, force } => control::Command::Primary { resource, force },
        Cmd::Secondary { resource } => control::Command::Secondary { resource },
        Cmd::Connect { resource, discard_my_data } => {
            control::Command::Connect { resource, discard_my_data }
        }
        Cmd::Disconnect { resource } => control::Command::Disconnect { resource },
        Cmd::Invalidate { resource } => control::Command::Invalidate { resource },
        Cmd::ResumeIo { resource } => control::Command::ResumeIo { resource },
        Cmd::Verify { resource, repair } => control::Command::Verify { resource, repair },
        Cmd::MakeMaster { force } => control::Command::MakeMaster { force },
        Cmd::MakeSlave => control::Command::MakeSlave,
        Cmd::Maintenance { mode } => control::Command::Maintenance { on: mode == OnOff::On },
        Cmd::Events { follow, json } => return show_events(&rt, &cfg, &node, follow, json),
        Cmd::Wait { uptodate: _, primary, resource, timeout } => {
            let want =
                if primary { status::wait::Want::Primary } else { status::wait::Want::UpToDate };
            return wait_for(&rt, &cfg, &node, &resource, want, timeout);
        }
    };
    let sock = cfg.control_socket(&node);
    match rt.block_on(daemon::call(&sock, call)) {
        Ok(v) => {
            if let Some(m) = v.as_object() {
                for (res, msg) in m {
                    duet::outln!("{res}: {}", msg.as_str().unwrap_or_default());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => call_failed(&e),
    }
}

fn adjust(rt: &tokio::runtime::Runtime, cfg: &config::Config, node: &str) -> ExitCode {
    let sock = cfg.control_socket(node);
    match rt.block_on(daemon::call(&sock, control::Command::Adjust)) {
        Ok(v) => {
            let keys: Vec<&str> = v
                .get("applied")
                .and_then(|a| a.as_array())
                .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
                .unwrap_or_default();
            if keys.is_empty() {
                duet::outln!("nothing changed");
            } else {
                for k in keys {
                    duet::outln!("applied {k}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => call_failed(&e),
    }
}

/// `duet check-config --connect`: judged again every 200 ms until every check passes or
/// `wait` seconds went by (a peer just started is still connecting), then the table.
fn connection_test(
    rt: &tokio::runtime::Runtime,
    cfg: &config::Config,
    node: &str,
    wait: u64,
) -> ExitCode {
    use duet::connection_test::{judge, local_addrs, probe_vips, table};
    let addrs = match local_addrs() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("duet: cannot list this host's addresses: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let probes = rt.block_on(probe_vips(cfg, node, &addrs));
    let sock = cfg.control_socket(node);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        let status = rt
            .block_on(daemon::call(&sock, control::Command::Status))
            .map_err(|e| e.to_string())
            .and_then(|v| {
                serde_json::from_value::<status::NodeStatus>(v)
                    .map_err(|e| format!("the daemon's status does not read: {e}"))
            });
        let rows = judge(cfg, node, &addrs, &probes, status.as_ref().map_err(Clone::clone));
        let (text, ok) = table(&rows);
        if ok || std::time::Instant::now() >= end {
            duet::out!("{text}");
            return if ok { ExitCode::SUCCESS } else { ExitCode::from(EXIT_RUNTIME) };
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn call_failed(e: &daemon::CallError) -> ExitCode {
    eprintln!("duet: {e}");
    match e {
        daemon::CallError::Unreachable(..) => ExitCode::from(EXIT_UNREACHABLE),
        daemon::CallError::Protocol(_) | daemon::CallError::Refused(_) => {
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn run_daemon(
    rt: &tokio::runtime::Runtime,
    cfg: config::Config,
    node: String,
    config_path: std::path::PathBuf,
    format: LogFormat,
) -> ExitCode {
    // rustls logs every client's quirks (GnuTLS sends an IP address as SNI) at WARN: only its
    // errors are shown unless DUET_LOG names it.
    let mut spec = std::env::var("DUET_LOG").unwrap_or_else(|_| "info".into());
    if !spec.contains("rustls") {
        spec.push_str(",rustls=error");
    }
    let filter = || {
        tracing_subscriber::EnvFilter::try_new(&spec)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"))
    };
    let journal = match format {
        // Under systemd: the journal's own fields and priorities (error 3, warn 4, info 5, ...)
        // instead of text lines it would timestamp again.
        LogFormat::Text if duet::stderr_is_journal() => Some(tracing_journald::layer()),
        _ => None,
    };
    let logs = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr);
    match (format, journal) {
        (LogFormat::Text, Some(Ok(layer))) => {
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::util::SubscriberInitExt as _;
            tracing_subscriber::registry()
                .with(filter())
                .with(layer.with_syslog_identifier("duet".into()))
                .init();
        }
        (LogFormat::Text, Some(Err(e))) => {
            logs.with_ansi(false).init();
            tracing::warn!(
                "stderr is the journal but its socket cannot be used ({e}): logging as text"
            );
        }
        (LogFormat::Text, None) => {
            logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
        }
        // One object per line: timestamp, level, target, fields (message among them), spans.
        (LogFormat::Json, _) => logs.json().with_current_span(false).init(),
    }
    // A panic is a broken invariant: the node stops at once, and the peer takes over, instead
    // of running on without the task that panicked (tokio would catch it and carry on). The
    // release profile aborts on panic anyway; this makes every build do so.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("duet: a panic is a broken invariant: stopping this node (abort)");
        std::process::abort();
    }));
    match rt.block_on(daemon::run(cfg, node, config_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet: {}", duet::error_chain(&e));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn show_status(
    rt: &tokio::runtime::Runtime,
    cfg: &config::Config,
    node: &str,
    json: bool,
    check: bool,
) -> ExitCode {
    let sock = cfg.control_socket(node);
    let answer = rt.block_on(daemon::call(&sock, control::Command::Status));
    if check {
        use status::check::Level;
        let (level, line) = match answer.map(serde_json::from_value::<status::NodeStatus>) {
            Ok(Ok(s)) => status::check::node(&s),
            Ok(Err(e)) => {
                (Level::Unknown, format!("DUET UNKNOWN: unexpected status from the daemon: {e}"))
            }
            Err(e) => (Level::Unknown, format!("DUET UNKNOWN: {e}")),
        };
        duet::outln!("{line}");
        return ExitCode::from(level as u8);
    }
    match answer {
        Ok(v) => {
            if json {
                duet::outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return ExitCode::SUCCESS;
            }
            match serde_json::from_value::<status::NodeStatus>(v) {
                Ok(s) => {
                    duet::out!("{}", status::render(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("duet: unexpected status from the daemon: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Err(e) => call_failed(&e),
    }
}

/// Events shown under `duet status --watch`.
const WATCH_EVENTS: usize = 8;

/// `duet status --watch`: the status text redrawn at each pushed event and each second, the
/// last events under it. Ends when the daemon goes away (exit 3) or the reader does (exit 0).
fn watch_status(rt: &tokio::runtime::Runtime, cfg: &config::Config, node: &str) -> ExitCode {
    let sock = cfg.control_socket(node);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let follow_sock = sock.clone();
    let follower = rt.spawn(async move {
        daemon::follow(&follow_sock, Some(0), move |e| tx.send(e).is_ok()).await
    });
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last: std::collections::VecDeque<duet::events::Event> = Default::default();
    loop {
        let status = match rt.block_on(daemon::call(&sock, control::Command::Status)) {
            Ok(v) => v,
            Err(e) => return call_failed(&e),
        };
        let Ok(s) = serde_json::from_value::<status::NodeStatus>(status) else {
            eprintln!("duet: unexpected status from the daemon");
            return ExitCode::from(EXIT_RUNTIME);
        };
        let mut frame = String::new();
        if tty {
            // Home and clear: the view stays in place.
            frame.push_str("\x1b[H\x1b[2J");
        }
        frame.push_str(&status::render(&s));
        frame.push_str("\nlast events:\n");
        for e in &last {
            frame.push_str(&format!("  {}  {}\n", status::timestamp(e.at), e.line()));
        }
        frame.push_str(&format!(
            "-- {} (redrawn at each event; Ctrl-C ends)\n",
            status::timestamp(duet::events::unix_now())
        ));
        duet::out!("{frame}");
        // The next event, or a second.
        let next = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await
        });
        match next {
            Ok(Some(e)) => {
                let mut put = |e: duet::events::Event| {
                    if e.record == duet::events::Record::Change {
                        last.push_back(e);
                        if last.len() > WATCH_EVENTS {
                            last.pop_front();
                        }
                    }
                };
                put(e);
                while let Ok(e) = rx.try_recv() {
                    put(e);
                }
            }
            Ok(None) => {
                // The stream ended: the daemon stopped, or refused the follower.
                return match rt.block_on(follower) {
                    Ok(Err(e)) => call_failed(&e),
                    _ => {
                        eprintln!("duet: the daemon ended the event stream (it stopped)");
                        ExitCode::from(EXIT_UNREACHABLE)
                    }
                };
            }
            Err(_) => {}
        }
    }
}

fn generate(what: &Generate) -> ExitCode {
    use clap::CommandFactory;
    match what {
        Generate::Man { dir } => {
            let page =
                duet::manpage::config_page(duet::manpage::EXAMPLE, env!("CARGO_PKG_VERSION"));
            let made = std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
                .and_then(|()| std::fs::write(dir.join("duet.toml.5"), page));
            if let Err(e) = made {
                eprintln!("duet: writing man pages to {}: {e}", dir.display());
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
        Generate::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "duet", &mut out);
            duet::out!("{}", String::from_utf8_lossy(&out));
        }
    }
    ExitCode::SUCCESS
}

/// `duet wait`: looks at the daemon's status at each event it pushes (and each second while no
/// daemon answers) until the resource is where it is wanted.
fn wait_for(
    rt: &tokio::runtime::Runtime,
    cfg: &config::Config,
    node: &str,
    resource: &str,
    want: status::wait::Want,
    timeout: u64,
) -> ExitCode {
    if !cfg.resource.iter().any(|r| r.name == resource) {
        eprintln!("duet: no resource {resource} in the configuration");
        return ExitCode::from(EXIT_CONFIG);
    }
    let sock = cfg.control_socket(node);
    let start = std::time::Instant::now();
    let mut last = String::from("the daemon did not answer");
    // Woken by the daemon's events (no polling while it runs); a second at most between looks,
    // for a daemon not started yet.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut follower: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if follower.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
            let (tx, sock) = (tx.clone(), sock.clone());
            follower = Some(rt.spawn(async move {
                let _ = daemon::follow(&sock, None, move |_| tx.send(()).is_ok()).await;
            }));
        }
        if let Ok(v) = rt.block_on(daemon::call(&sock, control::Command::Status))
            && let Ok(s) = serde_json::from_value::<status::NodeStatus>(v)
        {
            match status::wait::met(&s, resource, want) {
                Ok(()) => return ExitCode::SUCCESS,
                Err(why) => last = why,
            }
        }
        if timeout > 0 && start.elapsed() >= std::time::Duration::from_secs(timeout) {
            eprintln!("duet: {resource} after {timeout} s: {last}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        rt.block_on(async {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await;
        });
        while rx.try_recv().is_ok() {}
    }
}

fn show_events(
    rt: &tokio::runtime::Runtime,
    cfg: &config::Config,
    node: &str,
    follow: bool,
    json: bool,
) -> ExitCode {
    let sock = cfg.control_socket(node);
    let print = |e: &duet::events::Event| {
        if json {
            duet::outln!("{}", serde_json::to_string(e).unwrap_or_default());
        } else if e.record == duet::events::Record::Change {
            duet::outln!("{}  {}", status::timestamp(e.at), e.line());
        }
    };
    if !follow {
        return match rt.block_on(daemon::call(&sock, control::Command::Events { since_ms: 0 })) {
            Ok(v) => {
                let list: Vec<duet::events::Event> = serde_json::from_value(v).unwrap_or_default();
                list.iter().for_each(print);
                ExitCode::SUCCESS
            }
            Err(e) => call_failed(&e),
        };
    }
    // Pushed by the daemon as they happen: JSON gets the current state first (as `drbdsetup
    // events2` does), text the stored log; then every new event.
    let since = if json { None } else { Some(0) };
    match rt.block_on(daemon::follow(&sock, since, |e| {
        print(&e);
        true
    })) {
        Ok(()) => {
            eprintln!("duet: the daemon ended the event stream (it stopped)");
            ExitCode::from(EXIT_UNREACHABLE)
        }
        Err(e) => call_failed(&e),
    }
}
