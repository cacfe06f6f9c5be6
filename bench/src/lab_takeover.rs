//! Takeover as a client sees it, in the namespace lab: from power loss of the master (its LAN
//! and dedicated links down, its serial cable cut, its daemon killed) to the first write
//! completed through the VIP by a client in another namespace that keeps retrying. Beside it,
//! in the same lab and run, keepalived (VRRPv3, advert_int 0.1 s) with the same power-loss
//! method, timed to the first TCP connect through its VIP.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration::lab::{self, Lab};
use integration::pair::{HaOpts, Pair};
use integration::rawnbd::Raw;
use replicator::nbd::proto::CMD_WRITE;

const RETRY_CONNECT: Duration = Duration::from_millis(50);

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 77, 0, 100], 10809))
}

/// Runs `f` on a thread inside namespace `i` and returns its result.
fn in_ns<T: Send + 'static>(lab: &Arc<Lab>, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    let l = Arc::clone(lab);
    std::thread::spawn(move || {
        l.enter(i);
        f()
    })
    .join()
    .expect("namespace thread")
}

fn power_off(lab: &Lab, node: usize) {
    for dev in ["lan0", "ded0"] {
        let _ = Command::new("ip").args(["-n", &lab.ns[node], "link", "set", dev, "down"]).status();
    }
}

/// One duet takeover; seconds from power loss to the first completed write through the VIP.
fn duet_once(duet: &Path, keepalive: u64, deadtime: u64) -> anyhow::Result<f64> {
    let lab = Arc::new(Lab::new().context("the lab needs root and iproute2")?);
    let extra = format!(
        "[[vip]]\ninterface = \"lan0\"\naddress = \"{}/24\"\nannounce_count = 3\nannounce_interval_ms = 100\n",
        lab::VIP
    );
    let ha = HaOpts {
        keepalive_ms: keepalive,
        warntime_ms: (keepalive * 2).min(deadtime - 1),
        deadtime_ms: deadtime,
        initdead_ms: deadtime * 4,
        extra,
        ..HaOpts::default()
    };
    let mut p = Pair::start_in_lab_with(&lab, ha, 32 << 20, Some(duet.to_path_buf()));
    let wait = |what: &str, f: &dyn Fn() -> bool| -> anyhow::Result<()> {
        if integration::wait_until(Duration::from_secs(60), f) {
            Ok(())
        } else {
            bail!("timed out waiting for {what}")
        }
    };
    wait("the peer", &|| p.cluster(0)["peer"] == "alive")?;
    if !integration::wait_until(Duration::from_secs(10), || p.cluster(1)["peer"] == "alive") {
        bail!("beta does not hear alpha: {}\n{}", p.cluster(1), p.log_text(1));
    }
    p.ok(0, &["make-master", "--force"]);
    wait("the initial sync", &|| p.synced() && p.is_master(0) && lab.holds(0, lab::VIP))?;
    // The client writes through the VIP before the power loss (it has a neighbour entry).
    in_ns(&lab, 2, || -> anyhow::Result<()> {
        let mut c = Raw::try_transmission_to(vip()).context("connect through the VIP")?;
        for i in 0..20u64 {
            c.request(CMD_WRITE, 0, i, i * 4096, 4096, &[1u8; 4096])?;
            if c.reply()?.error != 0 {
                bail!("write failed");
            }
        }
        Ok(())
    })?;
    let cable = p.cable.as_ref().context("serial cable")?;
    let t0 = Instant::now();
    power_off(&lab, 0);
    cable.cut.store(true, Ordering::Relaxed);
    p.kill(0);
    let secs = in_ns(&lab, 2, move || -> anyhow::Result<f64> {
        loop {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no write through the VIP within 60 s");
            }
            if let Some(mut c) = Raw::try_transmission_within(vip(), RETRY_CONNECT)
                && c.request(CMD_WRITE, 0, 1, 0, 4096, &[2u8; 4096]).is_ok()
                && c.reply().is_ok_and(|r| r.error == 0)
            {
                return Ok(t0.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })?;
    if secs > deadtime as f64 / 1000.0 * 2.0 {
        eprintln!(
            "slow takeover ({secs:.3} s); beta's events:\n{}\nbeta's log:\n{}",
            p.events(1),
            p.log_text(1)
        );
    }
    Ok(secs)
}

/// keepalived process groups (its VRRP child too), killed at drop; the flag stops the
/// listener threads.
struct Procs(Vec<Child>, Arc<std::sync::atomic::AtomicBool>);

fn kill_group(c: &mut Child) {
    // SAFETY: plain kill(2) on the process group this harness started.
    unsafe {
        libc::kill(-i32::try_from(c.id()).unwrap_or(0), libc::SIGKILL);
    }
    let _ = c.wait();
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            kill_group(c);
        }
        self.1.store(true, Ordering::Relaxed);
    }
}

/// One keepalived takeover; seconds from power loss to the first TCP connect through its VIP.
fn keepalived_once(dir: &Path) -> anyhow::Result<f64> {
    let lab = Arc::new(Lab::new().context("the lab needs root and iproute2")?);
    std::fs::create_dir_all(dir)?;
    let mut procs = Procs(Vec::new(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    for (i, prio) in [(0usize, 150), (1, 100)] {
        let conf = dir.join(format!("keepalived-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  vrrp_version 3\n  router_id node{i}\n}}\n\
                 vrrp_instance VI {{\n  state BACKUP\n  interface lan0\n  virtual_router_id 51\n  priority {prio}\n  advert_int 0.1\n  virtual_ipaddress {{\n    {}/24\n  }}\n}}\n",
                lab::VIP
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns[i], "keepalived", "-n", "-P", "-G", "-f"])
            .process_group(0)
            .arg(&conf)
            .arg("-p")
            .arg(dir.join(format!("ka-{i}-{}.pid", lab.ns[0])))
            .arg("-r")
            .arg(dir.join(format!("ka-vrrp-{i}-{}.pid", lab.ns[0])))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting keepalived")?;
        procs.0.push(child);
        // A TCP service on every node: a connect through the VIP reaches whoever holds it.
        // The thread holds only the namespace's name, and stops with the run.
        let (ns, stop) = (lab.ns[i].clone(), Arc::clone(&procs.1));
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let Ok(s) = TcpListener::bind(("0.0.0.0", 10809)) else { return };
            let _ = s.set_nonblocking(true);
            while !stop.load(Ordering::Relaxed) {
                match s.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
    }
    if !integration::wait_until(Duration::from_secs(30), || lab.holds(0, lab::VIP)) {
        bail!("keepalived on A never took the VIP");
    }
    std::thread::sleep(Duration::from_millis(500));
    in_ns(&lab, 2, || TcpStream::connect_timeout(&vip(), Duration::from_secs(2)).map(drop))
        .context("connect through keepalived's VIP before the power loss")?;
    let t0 = Instant::now();
    power_off(&lab, 0);
    kill_group(&mut procs.0[0]);
    let secs = in_ns(&lab, 2, move || -> anyhow::Result<f64> {
        loop {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no connect through keepalived's VIP within 60 s");
            }
            if TcpStream::connect_timeout(&vip(), RETRY_CONNECT).is_ok() {
                return Ok(t0.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })?;
    Ok(secs)
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Runs the comparison with the `duet` binary given (the release build) and prints the table.
pub fn run(duet: &Path, dir: &Path, runs: usize, out: &Path) -> anyhow::Result<()> {
    let have = |t: &str| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    crate::need_binary(duet)?;
    if !have("keepalived") {
        bail!("the comparison needs keepalived: apt-get install -y keepalived");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (network namespaces)");
    }
    if !have("ip") {
        bail!("the lab needs iproute2: apt-get install -y iproute2");
    }
    let mut rows = Vec::new();
    for (name, k, d) in [("duet defaults", 200u64, 1000u64), ("duet aggressive", 100, 300)] {
        let mut v = Vec::new();
        for i in 0..runs {
            let s = duet_once(duet, k, d)?;
            eprintln!("{name} (keepalive {k} ms, deadtime {d} ms): run {i}: {:.0} ms", s * 1000.0);
            v.push(s);
        }
        rows.push((name.to_string(), v));
    }
    let mut v = Vec::new();
    for i in 0..runs {
        let s = keepalived_once(&dir.join("keepalived"))?;
        eprintln!("keepalived (VRRPv3, advert_int 0.1 s): run {i}: {:.0} ms", s * 1000.0);
        v.push(s);
    }
    rows.push(("keepalived VRRPv3 0.1 s".to_string(), v));
    println!(
        "\npower loss of the master → first completed write (duet) / first TCP connect (keepalived) through the VIP, from a client namespace"
    );
    println!("{:<26} {:>6} {:>10} {:>10} {:>10}", "", "runs", "min ms", "p50 ms", "max ms");
    let mut json = Vec::new();
    for (name, v) in &rows {
        let (min, p50, max) = stats(v.clone());
        println!(
            "{name:<26} {:>6} {:>10.0} {:>10.0} {:>10.0}",
            v.len(),
            min * 1e3,
            p50 * 1e3,
            max * 1e3
        );
        json.push(serde_json::json!({"name": name, "runs": v.len(), "min_s": min, "p50_s": p50, "max_s": max, "samples_s": v}));
    }
    let ka = stats(rows[2].1.clone()).1;
    let ag = stats(rows[1].1.clone()).1;
    println!("aggressive duet p50 / keepalived p50 = {:.2}", ag / ka);
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
