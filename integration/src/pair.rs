//! A replicating pair on loopback: two real daemons ("alpha" and "beta") with file-backed disks,
//! one shared config, the cluster secret, their own control sockets, NBD and replication ports.
//! Processes are killed at drop, even when a test fails.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{duet_bin, free_port, run, run_ok, wait_until};

/// Settings of a pair.
#[derive(Debug, Clone)]
pub struct PairOpts {
    pub size: u64,
    pub protocol: &'static str,
    /// Extra lines for the `[[resource]]` table (before its sub-tables).
    pub resource_extra: String,
    /// `[resource.split_brain]` lines.
    pub split_brain: String,
    /// `[resource.resync]` lines.
    pub resync: String,
    /// `[resource.peer]` lines (ping and timeouts).
    pub peer: String,
    /// Heartbeat links and the cluster manager (None: manual roles only).
    pub ha: Option<HaOpts>,
    /// Extra `[cluster]` lines (`link_encryption = false`).
    pub cluster_extra: String,
    /// Run the two daemons inside these network namespaces (the lab): replication and the UDP
    /// heartbeat on the dedicated link, NBD on every address of the node.
    pub netns: Option<[String; 2]>,
    /// Serve the HTTP endpoint (status page, `/status`, `/metrics`) on a port of each node's.
    pub http: bool,
    /// Extra top-level TOML, at the end (`[hooks]`).
    pub extra: String,
    /// Where the disk files go (default: the pair's directory), e.g. an [`crate::XfsMount`].
    pub disk_dir: Option<PathBuf>,
    /// The duet binary for the daemons and the CLI (default: the debug build, [`duet_bin`]);
    /// a node's own [`PairNode::bin`] still wins for its daemon.
    pub bin: Option<PathBuf>,
}

/// The cluster manager's part of the config.
#[derive(Debug, Clone)]
pub struct HaOpts {
    pub keepalive_ms: u64,
    pub warntime_ms: u64,
    pub deadtime_ms: u64,
    pub initdead_ms: u64,
    /// A UDP link on loopback.
    pub udp: bool,
    /// A serial link over a pty cable.
    pub serial: bool,
    /// `failback = ...` value.
    pub failback: &'static str,
    /// Extra top-level TOML (`[fencing]`, `[[service]]`, `[[health.check]]`).
    pub extra: String,
}

impl Default for HaOpts {
    fn default() -> Self {
        Self {
            keepalive_ms: 100,
            warntime_ms: 300,
            deadtime_ms: 500,
            initdead_ms: 3000,
            udp: true,
            serial: true,
            failback: "off",
            extra: String::new(),
        }
    }
}

impl Default for PairOpts {
    fn default() -> Self {
        Self {
            size: 128 << 20,
            protocol: "C",
            resource_extra: String::new(),
            split_brain: String::new(),
            resync: "rate_kib = 512000\nmin_rate_kib = 20480".into(),
            peer: "ping_interval_ms = 500\nping_timeout_ms = 2000\nconnect_retry_ms = 200".into(),
            ha: None,
            cluster_extra: String::new(),
            netns: None,
            http: false,
            extra: String::new(),
            disk_dir: None,
            bin: None,
        }
    }
}

/// One node of the pair.
#[derive(Debug)]
pub struct PairNode {
    pub name: &'static str,
    pub disk: PathBuf,
    pub socket: PathBuf,
    pub nbd_port: u16,
    pub repl_port: u16,
    /// The HTTP endpoint's port (0: none).
    pub http_port: u16,
    pub log: PathBuf,
    /// Extra environment for the daemon (set before `start`).
    pub env: Vec<(String, String)>,
    /// Another duet binary for this node's daemon (a previous release; set before `start`).
    pub bin: Option<PathBuf>,
    /// A config file of this node's own instead of the shared one (see
    /// [`Pair::route_peer_through`]).
    pub config: Option<PathBuf>,
    child: Option<Child>,
}

/// The pair.
#[derive(Debug)]
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub secret: PathBuf,
    pub n: [PairNode; 2],
    /// The serial cable, when the pair has a serial heartbeat link.
    pub cable: Option<crate::pty::PtyCable>,
    /// The namespaces the daemons run in (lab pairs).
    pub netns: Option<[String; 2]>,
    /// The duet binary of the CLI and (unless a node names its own) the daemons.
    pub bin: PathBuf,
}

fn http_line(port: u16) -> String {
    if port == 0 { String::new() } else { format!("metrics_listen = \"127.0.0.1:{port}\"") }
}

fn kill(c: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = c.wait();
}

impl Pair {
    /// Writes the config and disks and runs `create-md` on both nodes (nothing started).
    pub fn configure(o: &PairOpts) -> Self {
        std::fs::create_dir_all("/var/tmp/duet-tests").expect("create /var/tmp/duet-tests");
        let dir = tempfile::Builder::new()
            .prefix("pair-")
            .tempdir_in("/var/tmp/duet-tests")
            .expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "correct horse battery staple\n").expect("secret");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("secret mode");
        let node = |name: &'static str| {
            let disk = o.disk_dir.as_deref().unwrap_or(dir.path()).join(format!("{name}.img"));
            std::fs::File::create(&disk).and_then(|f| f.set_len(o.size)).expect("disk");
            PairNode {
                name,
                disk,
                socket: dir.path().join(format!("{name}.sock")),
                nbd_port: if o.netns.is_some() { 10809 } else { free_port() },
                repl_port: if o.netns.is_some() { 7789 } else { free_port() },
                http_port: if o.http { free_port() } else { 0 },
                log: dir.path().join(format!("{name}.log")),
                env: Vec::new(),
                bin: None,
                config: None,
                child: None,
            }
        };
        let n = [node("alpha"), node("beta")];
        let config = dir.path().join("duet.toml");
        let cable = o.ha.as_ref().filter(|h| h.serial).map(|_| crate::pty::PtyCable::new());
        let ha_text = match &o.ha {
            None => String::new(),
            Some(h) => {
                let mut t = format!(
                    "\n[heartbeat]\nkeepalive_ms = {}\nwarntime_ms = {}\ndeadtime_ms = {}\ninitdead_ms = {}\n",
                    h.keepalive_ms, h.warntime_ms, h.deadtime_ms, h.initdead_ms
                );
                if h.udp {
                    let (a0, a1, u0, u1) = if o.netns.is_some() {
                        (crate::lab::DEDICATED[0], crate::lab::DEDICATED[1], 694, 694)
                    } else {
                        ("127.0.0.1", "127.0.0.1", free_port(), free_port())
                    };
                    t.push_str(&format!(
                        "\n[[heartbeat.link]]\nkind = \"udp\"\n[heartbeat.link.on.alpha]\nbind = \"{a0}:{u0}\"\npeer = \"{a1}:{u1}\"\n[heartbeat.link.on.beta]\nbind = \"{a1}:{u1}\"\npeer = \"{a0}:{u0}\"\n"
                    ));
                }
                if let Some(c) = &cable {
                    t.push_str(&format!(
                        "\n[[heartbeat.link]]\nkind = \"serial\"\nbaud = 115200\n[heartbeat.link.on.alpha]\ndevice = \"{}\"\n[heartbeat.link.on.beta]\ndevice = \"{}\"\n",
                        c.ends[0].display(),
                        c.ends[1].display()
                    ));
                }
                t.push('\n');
                t.push_str(&h.extra);
                t
            }
        };
        let text = format!(
            r#"[cluster]
name = "itest-pair"
secret_file = "{secret}"
configured_master = "alpha"
failback = "{failback}"
control_socket = "{s0}"
state_dir = "{state}"
metrics_listen = ""
{cluster_extra}

[node.alpha]
{http0}
[node.beta]
control_socket = "{s1}"
{http1}

[[resource]]
name = "vol0"
protocol = "{protocol}"
nbd_listen = "{nbd_host}:{nbd}"
{extra}

[resource.on.alpha]
disk = "{d0}"
meta = "internal"
replication_address = "{h0}:{r0}"

[resource.on.beta]
disk = "{d1}"
meta = "internal"
replication_address = "{h1}:{r1}"

[resource.resync]
{resync}

[resource.split_brain]
{sb}

[resource.peer]
{peer}
{ha}
{top_extra}
"#,
            secret = secret.display(),
            s0 = n[0].socket.display(),
            s1 = n[1].socket.display(),
            protocol = o.protocol,
            nbd = n[0].nbd_port,
            extra = o.resource_extra,
            d0 = n[0].disk.display(),
            d1 = n[1].disk.display(),
            r0 = n[0].repl_port,
            r1 = n[1].repl_port,
            resync = o.resync,
            sb = o.split_brain,
            peer = o.peer,
            failback = o.ha.as_ref().map_or("off", |h| h.failback),
            nbd_host = if o.netns.is_some() { "[::]" } else { "127.0.0.1" },
            h0 = if o.netns.is_some() { crate::lab::DEDICATED[0] } else { "127.0.0.1" },
            h1 = if o.netns.is_some() { crate::lab::DEDICATED[1] } else { "127.0.0.1" },
            ha = ha_text,
            cluster_extra = o.cluster_extra,
            state = dir.path().join("state").display(),
            top_extra = o.extra,
            http0 = http_line(n[0].http_port),
            http1 = http_line(n[1].http_port),
        );
        // Both nodes share one nbd_listen port number in the file; the node that is Primary
        // binds it. On one host only one can be Primary at a time, which the tests respect
        // (and split-brain tests demote before promoting the other, or use separate ports).
        std::fs::write(&config, text).expect("config");
        let bin = o.bin.clone().unwrap_or_else(duet_bin);
        let p = Self { dir, config, secret, n, cable, netns: o.netns.clone(), bin };
        for i in 0..2 {
            run_ok(p.cli(i).args(["create-md"]), Duration::from_secs(30));
        }
        p
    }

    /// Configures, starts both nodes, makes alpha the source with `primary --force`, and waits
    /// until the initial full sync is done.
    pub fn up(o: &PairOpts) -> Self {
        let mut p = Self::configure(o);
        p.start(0);
        p.start(1);
        p.ok(0, &["primary", "--force"]);
        let t = std::time::Instant::now();
        assert!(
            p.wait_synced(Duration::from_secs(120)),
            "initial sync did not finish after {:?}: {} / {}",
            t.elapsed(),
            p.repl(0),
            p.repl(1)
        );
        p
    }

    /// The config file node `i` runs with.
    pub fn config_of(&self, i: usize) -> &std::path::Path {
        self.n[i].config.as_deref().unwrap_or(&self.config)
    }

    /// Gives node `i` a config of its own in which the other node's replication address is
    /// `127.0.0.1:port` (a relay the test runs there), everything else as shared.
    pub fn route_peer_through(&mut self, i: usize, port: u16) {
        let other = self.n[1 - i].repl_port;
        let text = std::fs::read_to_string(&self.config).expect("config");
        let from = format!("replication_address = \"127.0.0.1:{other}\"");
        assert!(text.contains(&from), "no loopback replication address to reroute");
        let path = self.dir.path().join(format!("{}.toml", self.n[i].name));
        let to = format!("replication_address = \"127.0.0.1:{port}\"");
        std::fs::write(&path, text.replace(&from, &to)).expect("config of one node");
        self.n[i].config = Some(path);
    }

    /// Node `i`'s first UDP heartbeat link on loopback: (its bind port, its peer port).
    pub fn udp_ends(&self, i: usize) -> (u16, u16) {
        let text = std::fs::read_to_string(&self.config).expect("config");
        let key = format!("[heartbeat.link.on.{}]\nbind = \"127.0.0.1:", self.n[i].name);
        let at = text.find(&key).expect("a udp link on loopback") + key.len();
        let port = |t: &str| t.split('"').next().and_then(|p| p.parse().ok()).expect("a port");
        let bind = port(&text[at..]);
        let key = "peer = \"127.0.0.1:";
        let at = at + text[at..].find(key).expect("its peer") + key.len();
        (bind, port(&text[at..]))
    }

    /// A `duet` CLI command for node `i`.
    pub fn cli(&self, i: usize) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(self.config_of(i)).args(["--node", self.n[i].name]);
        c
    }

    /// Runs a CLI command on node `i` that must succeed; returns stdout.
    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        run_ok(self.cli(i).args(args), Duration::from_secs(60))
    }

    /// Runs a CLI command on node `i` that must fail; returns stderr.
    pub fn fails(&self, i: usize, args: &[&str]) -> String {
        let o = run(self.cli(i).args(args), Duration::from_secs(60));
        assert!(
            !o.status.success(),
            "{args:?} on {} succeeded: {}",
            self.n[i].name,
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// Starts node `i`'s daemon and waits for its control socket.
    pub fn start(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.n[i].log)
            .expect("log");
        let bin = self.n[i].bin.clone().unwrap_or_else(|| self.bin.clone());
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns[i]]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .arg("--config")
            .arg(self.config_of(i))
            .args(["--node", self.n[i].name, "daemon"])
            .env("DUET_LOG", std::env::var("DUET_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(self.n[i].env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn daemon");
        self.n[i].child = Some(child);
        let sock = self.n[i].socket.clone();
        let up = wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        assert!(up, "{} did not come up:\n{}", self.n[i].name, self.log_text(i));
    }

    /// How node `i`'s daemon ended, once it has (`None` while it runs, or if never started).
    pub fn exit_status(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let st = self.n[i].child.as_mut()?.try_wait().ok().flatten()?;
        self.n[i].child = None;
        Some(st)
    }

    /// SIGKILL node `i` (a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.n[i].child.take() {
            kill(&mut c);
        }
    }

    /// SIGTERM node `i` and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.n[i].child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let mut done = false;
            let exited = wait_until(Duration::from_secs(30), || {
                done = c.try_wait().ok().flatten().is_some();
                done
            });
            if !exited {
                kill(&mut c);
                panic!("{} ignored SIGTERM:\n{}", self.n[i].name, self.log_text(i));
            }
        }
    }

    /// The daemon log of node `i`.
    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.n[i].log).unwrap_or_default()
    }

    /// `duet status --json` of node `i` (Null when the daemon does not answer).
    pub fn status(&self, i: usize) -> serde_json::Value {
        let r = run(self.cli(i).args(["status", "--json"]), Duration::from_secs(10));
        serde_json::from_slice(&r.stdout).unwrap_or_default()
    }

    /// The status of node `i`'s resource vol0.
    pub fn res(&self, i: usize) -> serde_json::Value {
        let v = self.status(i);
        assert!(!v.is_null(), "{} does not answer status", self.n[i].name);
        v["resources"][0].clone()
    }

    /// The replication part of node `i`'s status.
    pub fn repl(&self, i: usize) -> serde_json::Value {
        self.res(i)["replication"].clone()
    }

    /// A replication counter or field as u64.
    pub fn num(&self, i: usize, field: &str) -> u64 {
        self.repl(i)[field].as_u64().unwrap_or_else(|| panic!("{field} missing"))
    }

    /// Both Connected, both UpToDate, nothing out of sync.
    pub fn synced(&self) -> bool {
        (0..2).all(|i| {
            let r = self.repl(i);
            r["connection"] == "Connected" && r["disk"] == "UpToDate" && r["out_of_sync_bytes"] == 0
        })
    }

    /// Polls [`Pair::synced`].
    pub fn wait_synced(&self, limit: Duration) -> bool {
        wait_until(limit, || self.synced())
    }

    /// Polls until node `i`'s replication status satisfies `f`.
    pub fn wait_for(
        &self,
        i: usize,
        limit: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> bool {
        wait_until(limit, || f(&self.repl(i)))
    }

    /// NBD URI (valid on whichever node is Primary).
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.n[0].nbd_port)
    }

    /// Replicated size.
    pub fn data_size(&self) -> u64 {
        self.data_size_of(0)
    }

    /// Replicated size, from node `i`'s metadata.
    pub fn data_size_of(&self, i: usize) -> u64 {
        let out = self.ok(i, &["dump-md"]);
        let line = out.lines().find(|l| l.contains("volume size")).expect("volume size line");
        line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).expect("a number")
    }

    /// SHA-256 of node `i`'s data area.
    pub fn digest(&self, i: usize, size: u64) -> String {
        let out = run_ok(
            Command::new("sh")
                .args(["-c", &format!("head -c {size} {} | sha256sum", self.n[i].disk.display())]),
            Duration::from_secs(60),
        );
        out.split_whitespace().next().unwrap_or_default().to_string()
    }

    /// The data areas of both disks are byte-identical.
    pub fn identical(&self) -> bool {
        let size = self.data_size();
        self.digest(0, size) == self.digest(1, size)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for i in 0..2 {
            if let Some(mut c) = self.n[i].child.take() {
                kill(&mut c);
            }
        }
        if std::thread::panicking() {
            for i in 0..2 {
                eprintln!("--- {} log ---\n{}", self.n[i].name, self.log_text(i));
            }
        }
    }
}

impl Pair {
    /// The cluster part of node `i`'s status.
    pub fn cluster(&self, i: usize) -> serde_json::Value {
        let v = self.status(i);
        assert!(!v.is_null(), "{} does not answer status", self.n[i].name);
        v["ha"].clone()
    }

    /// Node `i` is the running master (every resource Primary and exporting); false when its
    /// daemon does not answer.
    pub fn is_master(&self, i: usize) -> bool {
        let v = self.status(i);
        v["ha"]["running_role"] == "master" && v["resources"][0]["exporting"] == true
    }

    /// `duet events` of node `i`.
    pub fn events(&self, i: usize) -> String {
        run_ok(self.cli(i).args(["events"]), Duration::from_secs(10))
    }
}

impl Pair {
    /// A pair whose daemons run inside the lab's namespaces A and B, both started.
    pub fn start_in_lab(lab: &crate::lab::Lab, ha: HaOpts, size: u64) -> Self {
        Self::start_in_lab_with(lab, ha, size, None)
    }

    /// As [`Pair::start_in_lab`], with `bin` for the daemons and the CLI (`None`: the debug
    /// build).
    pub fn start_in_lab_with(
        lab: &crate::lab::Lab,
        ha: HaOpts,
        size: u64,
        bin: Option<PathBuf>,
    ) -> Self {
        let o = PairOpts {
            size,
            ha: Some(ha),
            netns: Some([lab.ns[0].clone(), lab.ns[1].clone()]),
            bin,
            ..PairOpts::default()
        };
        let mut p = Self::configure(&o);
        p.start(0);
        p.start(1);
        p
    }
}
