//! `duet-bench`: fio's `nbd` engine against duet (standalone, and replicating pairs under
//! protocols A, B and C), `nbdkit file`, `qemu-nbd`, and `qemu-storage-daemon` exporting a volume
//! with a synchronous `blockdev-mirror` (copy-mode=write-blocking) to a second NBD server, on the
//! same kind of backing file, in one run, interleaved, several repetitions. Prints a table with the
//! median of each figure and the ratio duet/peer, and writes every sample as JSON. Pairs also
//! report how fast their initial full sync ran (`--resync-rate-kib` caps it; 0 = unlimited).
//!
//! The machines this runs on are shared and noisy, so only ratios within one run mean anything;
//! the order of servers rotates every repetition so that none always runs first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod lab_takeover;
mod report;
mod takeover;
mod topo;

use anyhow::{Context, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};
use topo::Topology;

#[derive(Debug, Parser)]
#[command(about = "Benchmark duet's NBD server against nbdkit and qemu-nbd with fio")]
struct Args {
    /// The duet binary (release build).
    #[arg(long, default_value = "target/release/duet")]
    duet: PathBuf,
    /// A second duet binary (an earlier build) to measure against in the same run: servers
    /// `base-A`, `base-B`, `base-C` are its pairs, and the summary adds duet-X / base-X.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Repetitions of every (workload, server) pair.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 8)]
    runtime: u64,
    /// Backing file size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where the backing files go (a real filesystem, not tmpfs).
    #[arg(long, default_value = "/var/tmp/duet-bench")]
    dir: PathBuf,
    /// JSON results file.
    #[arg(long, default_value = "bench-results/nbd.json")]
    out: PathBuf,
    /// Only these servers (duet, nbdkit, qemu-nbd); default all.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// duet's io_engine (auto, uring, threads).
    #[arg(long, default_value = "auto")]
    duet_engine: String,
    /// Only these workloads (by name); default all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Resync rate for the pairs' initial full sync, KiB/s (0: unlimited).
    #[arg(long, default_value_t = 0)]
    resync_rate_kib: u64,
    /// Instead of fio runs: start a pair on two sparse files of this many TiB, let the full sync
    /// run for a few seconds, and report each daemon's resident memory (VmRSS).
    #[arg(long)]
    rss_tib: Option<u64>,
    /// Instead of fio runs: time this many takeovers (SIGKILL of the master to the first write
    /// completed through the new master) at the default and at the aggressive heartbeat timing.
    #[arg(long)]
    takeover_runs: Option<usize>,
    /// Instead of fio runs: in the namespace lab (root), time this many takeovers as a client
    /// sees them through the VIP (power loss of the master), duet at the default and the
    /// aggressive timing, and keepalived beside it.
    #[arg(long)]
    lab_takeover_runs: Option<usize>,
    /// Before every fio run, also drop the page cache (root): every server then starts from
    /// the same cold cache, instead of whatever its image copy and initial sync left cached.
    #[arg(long)]
    drop_caches: bool,
    /// Where the processes run: `shared` (everything on loopback, on any CPU) and/or
    /// `two-hosts` (root: the pair in two network namespaces joined by a veth, the client and
    /// the Primary on CPU 0, the Secondary on CPU 1). Several, comma-separated, run in turn
    /// within each repetition.
    #[arg(long, value_delimiter = ',', default_value = "shared")]
    topology: Vec<String>,
    /// Also write an HTML report with SVG charts into this directory: of this run, or with
    /// `--from`, of earlier results (and the takeover JSON files found beside them).
    #[arg(long)]
    report: Option<PathBuf>,
    /// With --report: draw from this results file instead of running anything.
    #[arg(long, requires = "report")]
    from: Option<PathBuf>,
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn rss_check(args: &Args, tib: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let file = args.dir.join("rss-alpha.img");
    let _ = std::fs::remove_file(&file);
    std::fs::File::create(&file)?.set_len(tib << 40)?;
    // Beta gets its own sparse file (start_pair would copy alpha's, 1 TiB of holes).
    let beta = args.dir.join("beta.img");
    let _ = std::fs::remove_file(&beta);
    std::fs::File::create(&beta)?.set_len(tib << 40)?;
    let shared = Topology::new("shared")?;
    let r = start_pair_nowait("C", args, &shared, &file, 20999)?;
    std::thread::sleep(Duration::from_secs(8));
    for (i, c) in r.children.iter().enumerate() {
        let kib = vm_rss_kib(c.id());
        println!(
            "{} daemon, {tib} TiB volume, full sync running: VmRSS {} MiB",
            ["alpha", "beta"][i],
            kib / 1024
        );
    }
    drop(r);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&beta);
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
    /// Report latency percentiles instead of throughput.
    latency: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "randwrite-4k-qd32", rw: "randwrite", bs: "4k", qd: 32, latency: false },
    Workload { name: "randread-4k-qd32", rw: "randread", bs: "4k", qd: 32, latency: false },
    Workload { name: "seqwrite-1m-qd8", rw: "write", bs: "1m", qd: 8, latency: false },
    Workload { name: "write-4k-qd1", rw: "randwrite", bs: "4k", qd: 1, latency: true },
];

const SERVERS: [&str; 12] = [
    "duet",
    "duet-A",
    "duet-B",
    "duet-C",
    "duet-C-plain",
    "base-A",
    "base-B",
    "base-C",
    "base-C-plain",
    "nbdkit",
    "qemu-nbd",
    "qsd-mirror",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    /// `shared` or `two-hosts` (results from before topologies existed are `shared`).
    #[serde(default = "shared")]
    topology: String,
    workload: String,
    server: String,
    rep: usize,
    iops: f64,
    mib_s: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    /// CPU time (user + system) of the server's processes per I/O, over the whole fio run
    /// (ramp included, so the I/O count is estimated as IOPS × (runtime + ramp)).
    cpu_us_per_io: f64,
}

fn shared() -> String {
    "shared".into()
}

/// CPU seconds (user + system, all threads) used so far by these processes.
fn cpu_seconds(children: &[Child]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    children
        .iter()
        .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/stat", c.id())).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): state is the first,
            // utime the 12th and stime the 13th.
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / hz
}

/// Running server processes, killed on drop.
struct Running {
    children: Vec<Child>,
    uri: String,
    /// For pairs: seconds and bytes of the initial full sync.
    sync: Option<(f64, u64)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A duet pair on loopback: `file` is alpha's disk, a copy of it beta's. Returns when the
/// initial full sync is done (timed).
fn start_pair(
    protocol: &str,
    bin: &Path,
    args: &Args,
    topo: &Topology,
    file: &Path,
    port: u16,
) -> anyhow::Result<Running> {
    std::fs::copy(file, args.dir.join("beta.img")).context("copying the image for beta")?;
    start_pair_inner(protocol, bin, args, topo, file, port, true)
}

/// A pair whose beta disk already exists, promoted but not waited for.
fn start_pair_nowait(
    protocol: &str,
    args: &Args,
    topo: &Topology,
    file: &Path,
    port: u16,
) -> anyhow::Result<Running> {
    start_pair_inner(protocol, &args.duet, args, topo, file, port, false)
}

fn start_pair_inner(
    protocol: &str,
    bin: &Path,
    args: &Args,
    topo: &Topology,
    file: &Path,
    port: u16,
    wait: bool,
) -> anyhow::Result<Running> {
    let d = &args.dir;
    // "C-plain": protocol C with link_encryption = false (authenticated, not encrypted).
    let (protocol, cluster_extra) = match protocol.strip_suffix("-plain") {
        Some(p) => (p, "link_encryption = false\n"),
        None => (protocol, ""),
    };
    let beta = d.join("beta.img");
    std::fs::write(d.join("secret"), "bench-secret-0123456789")?;
    std::fs::set_permissions(
        d.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let rate = if args.resync_rate_kib == 0 {
        "mode = \"fixed\"\nrate_kib = 100000000".to_string()
    } else {
        format!("mode = \"fixed\"\nrate_kib = {}", args.resync_rate_kib)
    };
    let cfg = d.join("pair.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cluster]\nname = \"bench\"\nsecret_file = \"{secret}\"\nconfigured_master = \"alpha\"\ncontrol_socket = \"{d}/alpha.sock\"\nstate_dir = \"{d}/state\"\nmetrics_listen = \"\"\n{cluster_extra}\
             [node.alpha]\n[node.beta]\ncontrol_socket = \"{d}/beta.sock\"\n\
             [[resource]]\nname = \"vol0\"\nprotocol = \"{protocol}\"\nio_engine = \"{engine}\"\nnbd_listen = \"127.0.0.1:{port}\"\n\
             [resource.on.alpha]\ndisk = \"{a}\"\nreplication_address = \"{h0}:{r0}\"\n\
             [resource.on.beta]\ndisk = \"{b}\"\nreplication_address = \"{h1}:{r1}\"\n\
             [resource.resync]\n{rate}\n",
            secret = d.join("secret").display(),
            d = d.display(),
            engine = args.duet_engine,
            a = file.display(),
            b = beta.display(),
            h0 = topo.addr[0],
            h1 = topo.addr[1],
            r0 = port + 100,
            r1 = port + 101,
        ),
    )?;
    let duet = |node: &str| {
        let mut c = Command::new(bin);
        c.arg("--config").arg(&cfg).args(["--node", node]);
        c
    };
    for n in ["alpha", "beta"] {
        let mut o = duet(n).args(["create-md", "--force"]).stdout(Stdio::null()).output()?;
        // A build from before `state_dir` (a --base binary) keeps its state beside the control
        // socket: the same configuration without that key.
        if !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("unknown field `state_dir`")
        {
            let text = std::fs::read_to_string(&cfg)?;
            let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("state_dir =")).collect();
            std::fs::write(&cfg, kept.join("\n") + "\n")?;
            o = duet(n).args(["create-md", "--force"]).stdout(Stdio::null()).output()?;
        }
        if !o.status.success() {
            bail!("create-md on {n} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
    }
    let mut children = Vec::new();
    for (n, place) in [("alpha", &topo.primary), ("beta", &topo.secondary)] {
        let mut c = duet(n);
        c.arg("daemon")
            .env("DUET_LOG", std::env::var("DUET_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null());
        place.apply(&mut c);
        children.push(c.spawn()?);
    }
    let mut r = Running { children, uri: format!("nbd://127.0.0.1:{port}/vol0"), sync: None };
    let status = |n: &str| -> Option<serde_json::Value> {
        let o = duet(n).args(["status", "--json"]).stderr(Stdio::null()).output().ok()?;
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .map(|v| v["resources"][0]["replication"].clone())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status("alpha").is_none() || status("beta").is_none() {
        if Instant::now() > deadline {
            bail!("pair did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !duet("alpha").args(["primary", "--force"]).stdout(Stdio::null()).status()?.success() {
        bail!("primary --force failed");
    }
    if !wait {
        return Ok(r);
    }
    // Timed from the moment beta is SyncTarget (after the reconnect) to UpToDate.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut t0 = None;
    loop {
        let b = status("beta").unwrap_or_default();
        if t0.is_none() && b["connection"] == "SyncTarget" {
            t0 = Some(Instant::now());
        }
        if b["connection"] == "Connected" && b["disk"] == "UpToDate" {
            break;
        }
        if Instant::now() > deadline {
            bail!("initial sync did not finish: {b}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bytes = status("alpha").map_or(0, |a| a["resync_sent_bytes"].as_u64().unwrap_or(0));
    r.sync = Some((t0.map_or(0.0, |t| t.elapsed().as_secs_f64()), bytes));
    topo.wait_port("127.0.0.1", port)?;
    Ok(r)
}

/// qemu-storage-daemon exporting `file` over NBD with an active (write-blocking) mirror to an
/// `nbdkit file` target: every write completes on both before it is acknowledged.
fn start_qsd_mirror(
    file: &Path,
    args: &Args,
    topo: &Topology,
    port: u16,
) -> anyhow::Result<Running> {
    let target = args.dir.join("mirror-target.img");
    std::fs::copy(file, &target)?;
    let tport = port + 200;
    let thost = topo.addr[1];
    let mut c = Command::new("nbdkit");
    c.args(["-f", "-p", &tport.to_string(), "-i", thost, "file"])
        .arg(format!("file={}", target.display()))
        .stdout(Stdio::null());
    topo.secondary.apply(&mut c);
    let nbdkit = c.spawn().context("starting nbdkit (mirror target)")?;
    let mut r =
        Running { children: vec![nbdkit], uri: format!("nbd://127.0.0.1:{port}/vol0"), sync: None };
    topo.wait_port(thost, tport)?;
    let qmp = args.dir.join("qsd.qmp");
    let _ = std::fs::remove_file(&qmp);
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!("driver=file,filename={},node-name=src-file,cache.direct=off", file.display()))
        .args(["--blockdev", "driver=raw,file=src-file,node-name=src"])
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={thost},server.port={tport},node-name=dst"
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"))
        .args(["--export", "type=nbd,id=exp0,node-name=src,name=vol0,writable=on"])
        .arg("--chardev")
        .arg(format!("socket,path={},server=on,wait=off,id=qmp0", qmp.display()))
        .args(["--monitor", "chardev=qmp0"])
        .stdout(Stdio::null());
    topo.primary.apply(&mut c);
    let qsd = c.spawn().context("starting qemu-storage-daemon (apt-get install qemu-utils)")?;
    r.children.push(qsd);
    topo.wait_port("127.0.0.1", port)?;
    let t0 = Instant::now();
    qmp_mirror(&qmp)?;
    r.sync = Some((t0.elapsed().as_secs_f64(), 0));
    Ok(r)
}

/// Starts the mirror job over QMP and waits until it is ready (background copy done).
fn qmp_mirror(path: &Path) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => bail!("QMP socket: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut rd = BufReader::new(s.try_clone()?);
    let mut w = s;
    let mut line = String::new();
    rd.read_line(&mut line)?; // greeting
    let mut call = |cmd: serde_json::Value| -> anyhow::Result<serde_json::Value> {
        writeln!(w, "{cmd}")?;
        loop {
            line.clear();
            if rd.read_line(&mut line)? == 0 {
                bail!("QMP closed");
            }
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v.get("return").is_some() {
                return Ok(v["return"].clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP error: {e}");
            }
        }
    };
    call(serde_json::json!({"execute": "qmp_capabilities"}))?;
    call(serde_json::json!({"execute": "blockdev-mirror", "arguments": {
        "job-id": "m0", "device": "src", "target": "dst", "sync": "full", "copy-mode": "write-blocking"}}))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = call(serde_json::json!({"execute": "query-block-jobs"}))?;
        if jobs[0]["ready"] == true {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("mirror did not become ready: {jobs}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(
    server: &str,
    args: &Args,
    topo: &Topology,
    file: &Path,
    port: u16,
) -> anyhow::Result<Running> {
    let null = || Stdio::null();
    let (mut cmd, what, uri) = match server {
        "duet-A" | "duet-B" | "duet-C" | "duet-C-plain" => {
            return start_pair(&server[5..], &args.duet, args, topo, file, port);
        }
        "base-A" | "base-B" | "base-C" | "base-C-plain" => {
            let Some(bin) = &args.base else { bail!("{server} needs --base BINARY") };
            return start_pair(&server[5..], bin, args, topo, file, port);
        }
        "qsd-mirror" => return start_qsd_mirror(file, args, topo, port),
        "duet" => {
            let cfg = args.dir.join("duet.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[cluster]\nname = \"bench\"\nconfigured_master = \"bench\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\nmetrics_listen = \"\"\n\
                     [node.bench]\n[[resource]]\nname = \"vol0\"\nio_engine = \"{}\"\nnbd_listen = \"127.0.0.1:{port}\"\n[resource.on.bench]\ndisk = \"{}\"\n",
                    args.dir.join("duet.sock").display(),
                    args.dir.join("state").display(),
                    args.duet_engine,
                    file.display()
                ),
            )?;
            let mut c = Command::new(&args.duet);
            c.args(["--config"])
                .arg(&cfg)
                .args(["--node", "bench", "daemon"])
                .env("DUET_LOG", std::env::var("DUET_LOG").unwrap_or_else(|_| "warn".into()))
                .stdout(null());
            (c, args.duet.display().to_string(), format!("nbd://127.0.0.1:{port}/vol0"))
        }
        "nbdkit" => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-p", &port.to_string(), "-i", "127.0.0.1", "file"])
                .arg(format!("file={}", file.display()))
                .stdout(null());
            (c, "nbdkit (apt-get install nbdkit)".into(), format!("nbd://127.0.0.1:{port}/"))
        }
        "qemu-nbd" => {
            let mut c = Command::new("qemu-nbd");
            c.args([
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-x",
                "vol0",
                "--persistent",
                "--shared=8",
            ])
            .arg(file)
            .stdout(null());
            (
                c,
                "qemu-nbd (apt-get install qemu-utils)".into(),
                format!("nbd://127.0.0.1:{port}/vol0"),
            )
        }
        other => bail!("unknown server {other}"),
    };
    // A reference server runs where the Primary would, its client beside it.
    topo.primary.apply(&mut cmd);
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let r = Running { children: vec![child], uri, sync: None };
    topo.wait_port("127.0.0.1", port)?;
    Ok(r)
}

fn fio(
    uri: &str,
    w: &Workload,
    args: &Args,
    topo: &Topology,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=bench",
        "--ioengine=nbd",
        "--output-format=json",
        "--time_based",
        "--norandommap",
        "--randrepeat=0",
    ])
    .arg(format!("--uri={uri}"))
    .arg(format!("--rw={}", w.rw))
    .arg(format!("--bs={}", w.bs))
    .arg(format!("--iodepth={}", w.qd))
    .arg(format!("--size={}M", args.size_mib))
    .arg(format!("--runtime={}", args.runtime))
    .arg(format!("--ramp_time={RAMP_S}"));
    topo.client.apply(&mut cmd);
    let out = cmd.output().context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    let json = &text[text.find('{').context("no JSON in fio output")?..];
    let v: serde_json::Value = serde_json::from_str(json).context("parsing fio JSON")?;
    let job = &v["jobs"][0];
    if job["error"].as_i64() != Some(0) {
        bail!("fio reported error {}", job["error"]);
    }
    let side = if w.rw.contains("read") { &job["read"] } else { &job["write"] };
    let iops = side["iops"].as_f64().unwrap_or(0.0);
    let mib_s = side["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok((iops, mib_s, pct("50.000000"), pct("99.000000")))
}

/// fio's ramp before it counts, seconds.
const RAMP_S: u64 = 1;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Median over repetitions of a per-repetition figure of two servers (`f(a, b)`), for the pairs
/// measured in the same repetition.
fn per_rep(
    samples: &[Sample],
    w: &str,
    a: &str,
    b: &str,
    f: &dyn Fn(&Sample, &Sample) -> f64,
) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|x| x.workload == w && x.server == a)
        .filter_map(|x| {
            samples
                .iter()
                .find(|y| y.workload == w && y.server == b && y.rep == x.rep)
                .map(|y| f(x, y))
        })
        .collect();
    (!v.is_empty()).then(|| median(v))
}

/// Every mode runs the binaries it is given: each must exist (a release build: `cargo build
/// --release -p duet`), said before anything starts.
pub(crate) fn need_binary(p: &std::path::Path) -> anyhow::Result<()> {
    if !p.is_file() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p duet`), or name another with --duet / --base",
            p.display()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(from), Some(dir)) = (&args.from, &args.report) {
        return report::from_file(from, dir);
    }
    if let Some(tib) = args.rss_tib {
        return rss_check(&args, tib);
    }
    if let Some(runs) = args.lab_takeover_runs {
        let out = args.out.with_file_name("lab-takeover.json");
        return lab_takeover::run(&args.duet, &args.dir, runs.max(1), &out);
    }
    if let Some(runs) = args.takeover_runs {
        let out = args.out.with_file_name("takeover.json");
        need_binary(&args.duet)?;
        return takeover::run(&args.duet, &args.dir, runs.max(1), &out);
    }
    need_binary(&args.duet)?;
    if let Some(b) = &args.base {
        need_binary(b)?;
    }
    let servers: Vec<&str> = SERVERS
        .iter()
        .copied()
        .filter(|s| {
            if args.servers.is_empty() {
                !s.starts_with("base") || args.base.is_some()
            } else {
                args.servers.iter().any(|x| x == s)
            }
        })
        .collect();
    let workloads: Vec<Workload> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|x| x == w.name))
        .collect();
    std::fs::create_dir_all(&args.dir)?;
    // One random source image, copied to a file per server, so every server reads real data from
    // a fully allocated file of the same layout.
    let seed = args.dir.join("seed.img");
    let want = args.size_mib << 20;
    if std::fs::metadata(&seed).map(|m| m.len()).unwrap_or(0) != want {
        eprintln!("creating a {} MiB random seed image...", args.size_mib);
        let st = Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none", "iflag=fullblock"])
            .arg(format!("of={}", seed.display()))
            .arg(format!("count={}", args.size_mib))
            .status()?;
        if !st.success() {
            bail!("dd failed");
        }
    }
    let topologies =
        args.topology.iter().map(|t| Topology::new(t)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut samples = Vec::new();
    let mut syncs = Vec::new();
    let mut rtts = Vec::new();
    for rep in 0..args.reps {
        for topo in &topologies {
            let t = topo.name;
            let rtt = topo.rtt_us(20_000)?;
            eprintln!(
                "rep {rep} {t}: TCP round trip, Primary's side to Secondary's: p50 {rtt:.1} us"
            );
            rtts.push(RoundTrip { topology: t.into(), rep, us: rtt });
            for w in &workloads {
                // Every other repetition runs the servers in reverse order, and the rotation
                // moves on every two: a rotation alone keeps each server behind the same
                // predecessor, whose writeback it then meets every time (seen as a steady 15 %
                // on sequential writes for the server that always followed qsd-mirror).
                let n = servers.len();
                for k in 0..n {
                    let at = (k + rep / 2) % n;
                    let server = if rep % 2 == 0 { servers[at] } else { servers[n - 1 - at] };
                    let file = args.dir.join(format!("{server}.img"));
                    std::fs::copy(&seed, &file).context("copying the seed image")?;
                    let port = 20809 + 10 * u16::try_from(k).unwrap_or(0);
                    let r = start(server, &args, topo, &file, port)?;
                    if let Some((secs, bytes)) = r.sync {
                        eprintln!(
                            "rep {rep} {t} {server}: initial sync of {} MiB took {secs:.2} s ({:.0} MiB/s)",
                            bytes >> 20,
                            bytes as f64 / 1048576.0 / secs
                        );
                        syncs.push(serde_json::json!({"topology": t, "server": server, "rep": rep, "seconds": secs, "bytes": bytes}));
                    }
                    // The image copies and the initial sync leave a gigabyte or two dirty:
                    // write it back now, so no server is measured against another's writeback.
                    // SAFETY: sync(2) takes no arguments and cannot fail.
                    unsafe { libc::sync() };
                    if args.drop_caches {
                        std::fs::write("/proc/sys/vm/drop_caches", "3")
                            .context("dropping the page cache (needs root)")?;
                    }
                    let cpu0 = cpu_seconds(&r.children);
                    let (iops, mib_s, p50, p99) = fio(&r.uri, w, &args, topo)?;
                    let cpu = cpu_seconds(&r.children) - cpu0;
                    let ios = iops * (args.runtime + RAMP_S) as f64;
                    let cpu_us_per_io = if ios > 0.0 { cpu * 1e6 / ios } else { 0.0 };
                    drop(r);
                    eprintln!(
                        "rep {rep} {t:<9} {:<18} {server:<12} {iops:>9.0} IOPS {mib_s:>8.1} MiB/s p50 {p50:>7.1}us p99 {p99:>7.1}us",
                        w.name
                    );
                    samples.push(Sample {
                        topology: t.into(),
                        workload: w.name.into(),
                        server: server.into(),
                        rep,
                        iops,
                        mib_s,
                        lat_p50_us: p50,
                        lat_p99_us: p99,
                        cpu_us_per_io,
                    });
                }
            }
        }
    }
    let results = Results {
        reps: args.reps,
        runtime_s: args.runtime,
        size_mib: args.size_mib,
        samples,
        round_trips: rtts,
        initial_syncs: syncs,
        medians: Vec::new(),
        replication: Vec::new(),
    };
    let results = summarize(results, &servers, &workloads);
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    println!("\nall samples written to {}", args.out.display());
    for s in &servers {
        let _ = std::fs::remove_file(args.dir.join(format!("{s}.img")));
    }
    for f in ["beta.img", "mirror-target.img"] {
        let _ = std::fs::remove_file(args.dir.join(f));
    }
    if let Some(dir) = &args.report {
        report::write(&results, &args.out, dir)?;
    }
    Ok(())
}

/// One round trip measurement (see [`Topology::rtt_us`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundTrip {
    topology: String,
    rep: usize,
    us: f64,
}

/// Everything a fio run of the benchmark found; the results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Results {
    reps: usize,
    runtime_s: u64,
    size_mib: u64,
    samples: Vec<Sample>,
    #[serde(default)]
    round_trips: Vec<RoundTrip>,
    #[serde(default)]
    initial_syncs: Vec<serde_json::Value>,
    /// Per topology, workload and server: the median of each figure.
    #[serde(default)]
    medians: Vec<serde_json::Value>,
    /// Per-repetition ratios of the pairs against their references.
    #[serde(default)]
    replication: Vec<serde_json::Value>,
}

/// The targets of the throughput issue (18), for the summary's brackets.
fn target(topology: &str, server: &str, peer: &str, workload: &str) -> &'static str {
    match (topology, server, peer, workload) {
        ("shared", "duet-C", "nbdkit", "randwrite-4k-qd32") => " [>= 0.9]",
        ("shared", "duet-C", "nbdkit", "seqwrite-1m-qd8") => " [>= 0.6]",
        ("shared", "duet-C", "qsd-mirror", "randwrite-4k-qd32") => " [>= 5]",
        ("shared", "duet-C", "qsd-mirror", "seqwrite-1m-qd8") => " [>= 4]",
        ("two-hosts", "duet-C", "nbdkit", "randwrite-4k-qd32" | "seqwrite-1m-qd8") => " [>= 1.0]",
        // Link encryption costs at most 10 % against authentication alone.
        (_, "duet-C", "duet-C-plain", "randwrite-4k-qd32") => " [>= 0.9]",
        _ => "",
    }
}

/// Prints the medians and the per-repetition ratios of each topology and fills them in.
fn summarize(mut res: Results, servers: &[&str], workloads: &[Workload]) -> Results {
    let topologies: Vec<String> = {
        let mut t: Vec<String> = res.samples.iter().map(|s| s.topology.clone()).collect();
        t.dedup();
        t.sort();
        t.dedup();
        t
    };
    for topo in &topologies {
        let samples: Vec<Sample> =
            res.samples.iter().filter(|s| &s.topology == topo).cloned().collect();
        let rtt_of = |rep: usize| {
            res.round_trips.iter().find(|r| &r.topology == topo && r.rep == rep).map(|r| r.us)
        };
        let pick = |w: &str, s: &str, f: &dyn Fn(&Sample) -> f64| {
            median(samples.iter().filter(|x| x.workload == w && x.server == s).map(f).collect())
        };
        println!(
            "\n{topo}: medians of {} repetitions, {} s each (ratio = duet/peer; >1 is better for IOPS and MiB/s, <1 for latency)",
            res.reps, res.runtime_s
        );
        println!(
            "{:<18} {:<12} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>12}",
            "workload",
            "server",
            "IOPS",
            "MiB/s",
            "p50 us",
            "p99 us",
            "IOPS ratio",
            "p50 ratio",
            "CPU us/IO"
        );
        for w in workloads {
            let duet_iops = pick(w.name, "duet", &|x| x.iops);
            let duet_p50 = pick(w.name, "duet", &|x| x.lat_p50_us);
            for s in servers {
                let (iops, mib, p50, p99, cpu) = (
                    pick(w.name, s, &|x| x.iops),
                    pick(w.name, s, &|x| x.mib_s),
                    pick(w.name, s, &|x| x.lat_p50_us),
                    pick(w.name, s, &|x| x.lat_p99_us),
                    pick(w.name, s, &|x| x.cpu_us_per_io),
                );
                // The ratios compare standalone duet with each server (blank when it did not
                // run).
                let ratio = if *s == "duet" || iops == 0.0 || duet_iops == 0.0 {
                    String::new()
                } else {
                    format!("{:.2}", duet_iops / iops)
                };
                let lratio = if *s == "duet" || p50 == 0.0 || duet_p50 == 0.0 || !w.latency {
                    String::new()
                } else {
                    format!("{:.2}", duet_p50 / p50)
                };
                println!(
                    "{:<18} {:<12} {:>10.0} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>12} {:>12.1}",
                    w.name, s, iops, mib, p50, p99, ratio, lratio, cpu
                );
                res.medians.push(serde_json::json!({"topology": topo, "workload": w.name, "server": s, "iops": iops, "mib_s": mib, "lat_p50_us": p50, "lat_p99_us": p99, "cpu_us_per_io": cpu}));
            }
        }
        // Replication against its references, repetition by repetition (servers of one
        // repetition run back to back, so the machine's mood is shared).
        let rtt =
            median(res.round_trips.iter().filter(|r| &r.topology == topo).map(|r| r.us).collect());
        println!("\n{topo}: replication, per-repetition medians (issue 18's targets in brackets)");
        for w in workloads {
            for p in [
                "duet-A",
                "duet-B",
                "duet-C",
                "duet-C-plain",
                "base-A",
                "base-B",
                "base-C",
                "base-C-plain",
            ] {
                let base = format!("base-{}", &p[5..]);
                let peers: &[&str] = if p == "duet-C" {
                    &["nbdkit", "qsd-mirror", &base, "duet-C-plain"]
                } else if p.starts_with("duet") {
                    &["nbdkit", "qsd-mirror", &base]
                } else {
                    &["nbdkit", "qsd-mirror"]
                };
                for &peer in peers {
                    let Some(r) = per_rep(&samples, w.name, p, peer, &|a, b| a.iops / b.iops)
                    else {
                        continue;
                    };
                    let t = target(topo, p, peer, w.name);
                    println!("{:<18} {p} / {peer:<12} throughput {r:>6.2}x{t}", w.name);
                    let mut row = serde_json::json!({"topology": topo, "workload": w.name, "server": p, "peer": peer, "ratio": r});
                    if let Some(c) = per_rep(&samples, w.name, p, peer, &|a, b| {
                        a.cpu_us_per_io / b.cpu_us_per_io
                    }) {
                        let t = if p == "duet-C" && peer == "nbdkit" && w.name == "seqwrite-1m-qd8"
                        {
                            " [<= 2]"
                        } else {
                            ""
                        };
                        println!("{:<18} {p} / {peer:<12} server CPU per I/O {c:>6.2}x{t}", w.name);
                        row["cpu_per_io_ratio"] = c.into();
                    }
                    if w.latency {
                        let d =
                            per_rep(&samples, w.name, p, peer, &|a, b| a.lat_p50_us - b.lat_p50_us)
                                .unwrap_or(0.0);
                        // The extra latency in round trips of the same repetition.
                        let trips = per_rep(&samples, w.name, p, peer, &|a, b| {
                            rtt_of(a.rep).map_or(f64::NAN, |r| (a.lat_p50_us - b.lat_p50_us) / r)
                        })
                        .unwrap_or(f64::NAN);
                        let t = if p == "duet-C" && peer == "nbdkit" { " [<= 1.0]" } else { "" };
                        println!(
                            "{:<18} {p} - {peer:<12} p50 latency {d:>+7.1} us = {trips:>5.2} round trips{t} (round trip p50 {rtt:.1} us)",
                            w.name
                        );
                        row["p50_extra_us"] = d.into();
                        row["p50_extra_round_trips"] = trips.into();
                    }
                    res.replication.push(row);
                }
            }
        }
    }
    res
}
