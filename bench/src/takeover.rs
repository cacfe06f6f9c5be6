//! Takeover time: from SIGKILL of the master's daemon to the first write completed through
//! the new master, as a client that keeps retrying sees it. Each run is a fresh pair on
//! loopback with a UDP heartbeat link and a serial link over a socat pty pair (when socat is
//! installed), the initial sync done, and the client writing before the kill.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration::rawnbd::Raw;
use replicator::nbd::proto::CMD_WRITE;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One timed takeover; returns seconds.
fn one(duet: &Path, dir: &Path, keepalive: u64, deadtime: u64) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut procs = Procs(Vec::new());
    let serial = Command::new("sh")
        .args(["-c", "command -v socat"])
        .stdout(Stdio::null())
        .status()?
        .success();
    let (pa, pb) = (dir.join("ttyA"), dir.join("ttyB"));
    if serial {
        procs.0.push(
            Command::new("socat")
                .arg(format!("pty,raw,echo=0,link={}", pa.display()))
                .arg(format!("pty,raw,echo=0,link={}", pb.display()))
                .stderr(Stdio::null())
                .spawn()?,
        );
        let t = Instant::now();
        while !(pa.exists() && pb.exists()) {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("socat did not create the pty pair");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let (nbd, r0, r1, u0, u1) =
        (free_port()?, free_port()?, free_port()?, free_port()?, free_port()?);
    for n in ["alpha", "beta"] {
        let f = std::fs::File::create(dir.join(format!("{n}.img")))?;
        f.set_len(64 << 20)?;
    }
    std::fs::write(dir.join("secret"), "takeover-bench-secret")?;
    std::fs::set_permissions(
        dir.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    let serial_link = if serial {
        format!(
            "[[heartbeat.link]]\nkind = \"serial\"\n[heartbeat.link.on.alpha]\ndevice = \"{}\"\n[heartbeat.link.on.beta]\ndevice = \"{}\"\n",
            pa.display(),
            pb.display()
        )
    } else {
        String::new()
    };
    let d = dir.display();
    let cfg = dir.join("duet.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cluster]\nname = \"takeover\"\nsecret_file = \"{d}/secret\"\nconfigured_master = \"alpha\"\ncontrol_socket = \"{d}/alpha.sock\"\nstate_dir = \"{d}/state\"\nmetrics_listen = \"\"\n\
             [node.alpha]\n[node.beta]\ncontrol_socket = \"{d}/beta.sock\"\n\
             [[resource]]\nname = \"vol0\"\nnbd_listen = \"127.0.0.1:{nbd}\"\n\
             [resource.on.alpha]\ndisk = \"{d}/alpha.img\"\nreplication_address = \"127.0.0.1:{r0}\"\n\
             [resource.on.beta]\ndisk = \"{d}/beta.img\"\nreplication_address = \"127.0.0.1:{r1}\"\n\
             [resource.resync]\nmode = \"fixed\"\nrate_kib = 10000000\n\
             [resource.peer]\nconnect_retry_ms = 200\n\
             [heartbeat]\nkeepalive_ms = {keepalive}\nwarntime_ms = {warn}\ndeadtime_ms = {deadtime}\ninitdead_ms = {init}\n\
             [[heartbeat.link]]\nkind = \"udp\"\n[heartbeat.link.on.alpha]\nbind = \"127.0.0.1:{u0}\"\npeer = \"127.0.0.1:{u1}\"\n[heartbeat.link.on.beta]\nbind = \"127.0.0.1:{u1}\"\npeer = \"127.0.0.1:{u0}\"\n\
             {serial_link}",
            warn = (keepalive * 3).min(deadtime - 1),
            init = deadtime * 3,
        ),
    )?;
    let duet_cmd = |node: &str| {
        let mut c = Command::new(duet);
        c.arg("--config").arg(&cfg).args(["--node", node]);
        c
    };
    for n in ["alpha", "beta"] {
        if !duet_cmd(n).arg("create-md").stdout(Stdio::null()).status()?.success() {
            bail!("create-md on {n} failed");
        }
    }
    for n in ["alpha", "beta"] {
        procs
            .0
            .push(duet_cmd(n).arg("daemon").env("DUET_LOG", "warn").stderr(Stdio::null()).spawn()?);
    }
    let ha = |n: &str| -> serde_json::Value {
        duet_cmd(n)
            .args(["status", "--json"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| -> anyhow::Result<()> {
        let t = Instant::now();
        while !f() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    wait("the peer", &|| ha("alpha")["ha"]["peer"] == "alive")?;
    if !duet_cmd("alpha").args(["make-master", "--force"]).stdout(Stdio::null()).status()?.success()
    {
        bail!("make-master --force failed");
    }
    wait("the initial sync", &|| {
        let b = ha("beta");
        let r = &b["resources"][0]["replication"];
        r["disk"] == "UpToDate"
            && r["connection"] == "Connected"
            && ha("alpha")["resources"][0]["exporting"] == true
    })?;
    // A client writing through alpha before the kill.
    let mut c = Raw::try_transmission(nbd).context("connect to alpha")?;
    for i in 0..50u64 {
        c.request(CMD_WRITE, 0, i, i * 4096, 4096, &[7u8; 4096])?;
        if c.reply()?.error != 0 {
            bail!("write through alpha failed");
        }
    }
    drop(c);
    let alpha = procs.0.len() - 2;
    let t0 = Instant::now();
    procs.0[alpha].kill()?;
    let _ = procs.0[alpha].wait();
    // The client retries: connect, write 4 KiB, until one write completes.
    loop {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no write completed within 60 s of the kill");
        }
        if let Some(mut c) = Raw::try_transmission(nbd)
            && c.request(CMD_WRITE, 0, 1, 0, 4096, &[9u8; 4096]).is_ok()
            && c.reply().is_ok_and(|r| r.error == 0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs `runs` takeovers for each (keepalive, deadtime) and prints the table.
pub fn run(duet: &Path, dir: &Path, runs: usize, out: &Path) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (k, d) in [(200u64, 1000u64), (100, 500)] {
        let mut v = Vec::new();
        for i in 0..runs {
            let s = one(duet, &dir.join("takeover"), k, d)?;
            eprintln!("keepalive {k} ms, deadtime {d} ms: run {i}: {:.0} ms", s * 1000.0);
            v.push(s);
        }
        v.sort_by(f64::total_cmp);
        let p50 = v[v.len() / 2];
        let max = v[v.len() - 1];
        let min = v[0];
        rows.push(serde_json::json!({"keepalive_ms": k, "deadtime_ms": d, "runs": runs, "p50_s": p50, "max_s": max, "min_s": min, "samples_s": v}));
    }
    println!("\ntakeover: SIGKILL of the master → first completed write through the new master");
    println!(
        "{:>12} {:>12} {:>6} {:>10} {:>10} {:>10}",
        "keepalive ms", "deadtime ms", "runs", "min ms", "p50 ms", "max ms"
    );
    for r in &rows {
        println!(
            "{:>12} {:>12} {:>6} {:>10.0} {:>10.0} {:>10.0}",
            r["keepalive_ms"].as_u64().unwrap_or(0),
            r["deadtime_ms"].as_u64().unwrap_or(0),
            r["runs"].as_u64().unwrap_or(0),
            r["min_s"].as_f64().unwrap_or(0.0) * 1000.0,
            r["p50_s"].as_f64().unwrap_or(0.0) * 1000.0,
            r["max_s"].as_f64().unwrap_or(0.0) * 1000.0
        );
    }
    if let Some(p) = out.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
    let _ = std::fs::remove_dir_all(dir.join("takeover"));
    Ok(())
}
