//! The HTTP endpoint of a live pair: `/metrics` checked by `promtool`, the status page read in
//! headless Chromium (its DOM, and a screenshot kept under `target/test-screenshots/`), before
//! and after a failover and during a resync; and `duet adjust` changing the rate of that resync.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::{have, http, qemu_io, run, run_ok, wait_until};

/// The value of the series `series` (its name and labels exactly as written) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `/metrics` of node `i`, checked by `promtool check metrics`.
pub(crate) fn scrape(p: &Pair, i: usize) -> String {
    let (code, head, body) = http(p.n[i].http_port, "GET", "/metrics", "");
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("duet_build_info{"), "{body}");
    let mut c = Command::new("sh");
    c.args(["-c", "promtool check metrics < \"$0\""]);
    let file = p.dir.path().join(format!("metrics-{i}.txt"));
    std::fs::write(&file, &body).unwrap();
    c.arg(&file);
    let o = run(&mut c, Duration::from_secs(30));
    assert!(
        o.status.success(),
        "promtool refused {}'s metrics: {}{}\n{body}",
        p.n[i].name,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    body
}

fn gauge(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("{series} missing in\n{text}"))
}

/// The status page of node `i` as headless Chromium renders it: its DOM, and a screenshot
/// saved as `name.png` (checked to be a PNG of some size).
fn page(p: &Pair, i: usize, name: &str) -> String {
    let url = format!("http://127.0.0.1:{}/", p.n[i].http_port);
    let profile = p.dir.path().join(format!("chromium-{name}"));
    let chromium = |extra: &[&str]| {
        let mut c = Command::new("chromium");
        c.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url);
        c
    };
    let dom = run_ok(&mut chromium(&["--dump-dom"]), Duration::from_secs(60));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&shot);
    run_ok(
        &mut chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1200,1000"]),
        Duration::from_secs(60),
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5000, "no screenshot at {shot:?}");
    eprintln!("status page of {} saved as {}", p.n[i].name, shot.display());
    dom
}

/// The text of `<... data-field="field">` inside the element whose opening tag has `scope`
/// (`data-node="alpha"`), or in the whole page when `scope` is empty.
fn field(dom: &str, scope: &str, field: &str) -> String {
    let at = if scope.is_empty() {
        0
    } else {
        dom.find(scope).unwrap_or_else(|| panic!("{scope} not on the page:\n{dom}"))
    };
    let rest = &dom[at..];
    let key = format!("data-field=\"{field}\"");
    let start = rest.find(&key).unwrap_or_else(|| panic!("{field} not under {scope}:\n{dom}"));
    let text = &rest[start..];
    let text = &text[text.find('>').expect("a tag") + 1..];
    text[..text.find('<').unwrap_or(text.len())].to_string()
}

fn resync_bytes_per_s(p: &Pair, i: usize) -> u64 {
    p.repl(i)["resync"]["rate_bytes_per_s"].as_u64().unwrap_or(0)
}

#[test]
fn metrics_and_the_status_page_of_a_live_pair_follow_a_failover_and_a_resync_and_adjust_changes_its_rate()
 {
    if !have("promtool") || !have("chromium") || !have("qemu-io") {
        return;
    }
    let o = PairOpts {
        size: 96 << 20,
        ha: Some(HaOpts::default()),
        http: true,
        resync: "rate_kib = 512000\nmin_rate_kib = 1024".into(),
        ..Default::default()
    };
    let mut p = Pair::configure(&o);
    p.start(0);
    p.start(1);
    // Fresh metadata is Inconsistent on both nodes: the operator names the first master.
    assert!(wait_until(Duration::from_secs(20), || p.cluster(0)["peer"] == "alive"));
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(120)), "the initial sync did not finish");
    assert!(wait_until(Duration::from_secs(10), || p.is_master(0)), "alpha never became master");
    // The outdate alpha sent when it became master before replication was up arrives while
    // beta is already its (Inconsistent) resync target: a no-op, which neither restarts the
    // resync nor, confirmed late, leaves alpha calling the synced peer Outdated.
    let ev = p.events(0);
    assert_eq!(ev.matches("resync as source").count(), 1, "{ev}");
    let links: Vec<String> = p.cluster(1)["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(links.len(), 2, "a UDP and a serial link");
    let up = |m: &str, node: &str, l: &str| {
        value(m, &format!("duet_link_up{{node=\"{node}\",link=\"{l}\"}}"))
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = scrape(&p, 1);
            links.iter().all(|l| up(&m, "beta", l) == Some(1.0))
        }),
        "beta's links never all up: {}",
        scrape(&p, 1)
    );

    // Before: alpha master, beta slave, both links up, one takeover (alpha's at start).
    let m = scrape(&p, 0);
    assert_eq!(gauge(&m, r#"duet_running_role{node="alpha",state="master"}"#), 1.0);
    assert_eq!(gauge(&m, r#"duet_running_role{node="alpha",state="slave"}"#), 0.0);
    assert_eq!(gauge(&m, r#"duet_failovers_total{node="alpha"}"#), 1.0);
    assert_eq!(
        gauge(&m, r#"duet_resource_role{node="alpha",resource="vol0",state="Primary"}"#),
        1.0
    );
    assert_eq!(gauge(&m, r#"duet_disk_state{node="alpha",resource="vol0",state="UpToDate"}"#), 1.0);
    assert_eq!(
        gauge(&m, r#"duet_connection_state{node="alpha",resource="vol0",state="Connected"}"#),
        1.0
    );
    assert_eq!(gauge(&m, r#"duet_peer_state{node="alpha",state="alive"}"#), 1.0);
    assert_eq!(gauge(&m, r#"duet_switchover_possible{node="alpha"}"#), 1.0);
    let m1 = scrape(&p, 1);
    assert_eq!(gauge(&m1, r#"duet_running_role{node="beta",state="slave"}"#), 1.0);
    assert_eq!(gauge(&m1, r#"duet_failovers_total{node="beta"}"#), 0.0);
    let frames = format!("duet_link_frames_received_total{{node=\"beta\",link=\"{}\"}}", links[0]);
    assert!(gauge(&m1, &frames) > 0.0);

    let dom = page(&p, 0, "pair-before-failover");
    assert_eq!(field(&dom, "", "verdict"), "Healthy", "{dom}");
    assert_eq!(field(&dom, "data-node=\"alpha\"", "running"), "master");
    assert_eq!(field(&dom, "data-node=\"alpha\"", "configured"), "master");
    assert_eq!(field(&dom, "data-node=\"beta\"", "running"), "slave");
    assert_eq!(field(&dom, "data-resource=\"vol0\"", "role"), "Primary");
    assert_eq!(field(&dom, "data-resource=\"vol0\"", "peer-disk"), "UpToDate");
    assert_eq!(field(&dom, "data-link=\"0\"", "state"), "up");
    assert_eq!(field(&dom, "data-link=\"1\"", "state"), "up");
    assert!(field(&dom, "", "switchover").starts_with("possible now"), "{dom}");

    // The failover: alpha dies, beta takes over.
    p.kill(0);
    assert!(wait_until(Duration::from_secs(20), || p.is_master(1)), "beta did not take over");
    let m1 = scrape(&p, 1);
    assert_eq!(gauge(&m1, r#"duet_running_role{node="beta",state="master"}"#), 1.0);
    assert_eq!(gauge(&m1, r#"duet_failovers_total{node="beta"}"#), 1.0);
    assert_eq!(gauge(&m1, r#"duet_peer_state{node="beta",state="dead"}"#), 1.0);
    for l in &links {
        assert_eq!(up(&m1, "beta", l), Some(0.0), "{l}");
    }
    assert_eq!(gauge(&m1, r#"duet_switchover_possible{node="beta"}"#), 0.0);
    let dom = page(&p, 1, "pair-after-failover");
    assert_eq!(field(&dom, "", "verdict"), "Degraded", "{dom}");
    assert_eq!(field(&dom, "data-node=\"beta\"", "running"), "master");
    assert_eq!(field(&dom, "data-node=\"alpha\"", "state"), "peer dead");
    assert_eq!(field(&dom, "data-resource=\"vol0\"", "role"), "Primary");
    assert!(field(&dom, "", "switchover").contains("no node to hand the master role to"), "{dom}");

    // Writes while alpha is away, then alpha back with a slow resync: 2 MiB/s.
    qemu_io(&p.uri(), &["write -P 0x5a 0 40M"]);
    let text = std::fs::read_to_string(&p.config).unwrap();
    let slow = text.replace(
        "rate_kib = 512000\nmin_rate_kib = 1024",
        "mode = \"fixed\"\nrate_kib = 2048\nmin_rate_kib = 1024",
    );
    assert_ne!(slow, text);
    std::fs::write(&p.config, &slow).unwrap();
    p.start(0);
    assert!(
        p.wait_for(0, Duration::from_secs(30), |r| r["connection"] == "SyncTarget"
            && r["resync"]["done_bytes"].as_u64().unwrap_or(0) > 0),
        "alpha never resynced: {}",
        p.repl(0)
    );
    // The rate over a full pace window.
    assert!(
        wait_until(Duration::from_secs(10), || resync_bytes_per_s(&p, 0) > 0
            && p.repl(0)["resync"]["elapsed_s"].as_f64().unwrap_or(0.0) > 1.5),
        "no resync rate: {}",
        p.repl(0)
    );
    let before = resync_bytes_per_s(&p, 0);
    assert!(before <= 3 << 20, "the resync runs at 2 MiB/s, not {before} B/s");
    let m1 = scrape(&p, 1);
    assert_eq!(
        gauge(&m1, r#"duet_connection_state{node="beta",resource="vol0",state="SyncSource"}"#),
        1.0
    );
    assert!(gauge(&m1, r#"duet_resync_remaining_bytes{node="beta",resource="vol0"}"#) > 0.0);
    assert!(value(&m1, r#"duet_resync_eta_seconds{node="beta",resource="vol0"}"#).is_some());
    let dom = page(&p, 1, "pair-during-resync");
    assert_eq!(field(&dom, "", "verdict"), "Syncing", "{dom}");
    assert_eq!(field(&dom, "data-resource=\"vol0\"", "connection"), "SyncSource");
    let at = dom.find("data-percent=\"").expect("a resync progress") + "data-percent=\"".len();
    let pct: u32 = dom[at..].split('"').next().unwrap().parse().unwrap();
    assert!(pct < 100, "resync progress {pct} %");
    assert!(field(&dom, "data-resource=\"vol0\"", "eta").contains(" s"), "{dom}");
    assert_eq!(field(&dom, "data-node=\"alpha\"", "running"), "slave");

    // `duet adjust` on the resync target: 16 MiB/s, and `duet status` follows.
    let fast = slow.replace("rate_kib = 2048", "rate_kib = 16384");
    std::fs::write(&p.config, &fast).unwrap();
    let out = p.ok(0, &["adjust"]);
    assert!(out.contains("applied resource[0].resync.rate_kib"), "{out}");
    assert!(
        wait_until(Duration::from_secs(15), || resync_bytes_per_s(&p, 0) > 3 * before
            || p.repl(0)["connection"] == "Connected"),
        "the rate did not follow: {}",
        p.repl(0)
    );
    let after = resync_bytes_per_s(&p, 0);
    assert!(
        after > 3 * before,
        "the resync rate did not follow the adjust ({before} -> {after} B/s): {}",
        p.repl(0)
    );
    assert!(p.wait_synced(Duration::from_secs(60)), "the resync did not finish");
    assert!(p.identical(), "the disks differ after the resync");

    // A change that needs a restart is refused by name, and nothing of the file is applied.
    let moved = fast.replace(&format!("127.0.0.1:{}\"", p.n[1].repl_port), "127.0.0.1:1\"");
    assert_ne!(moved, fast);
    std::fs::write(&p.config, moved.replace("rate_kib = 16384", "rate_kib = 4096")).unwrap();
    let e = p.fails(0, &["adjust"]);
    assert!(e.contains("resource[0].on.beta.replication_address") && e.contains("restart"), "{e}");
    // SIGHUP does the same and says so in the log.
    let pid = i32::try_from(p.status(0)["pid"].as_u64().unwrap()).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || p
            .log_text(0)
            .contains("SIGHUP: not reloaded: resource[0].on.beta.replication_address")),
        "{}",
        p.log_text(0)
    );
    assert!(p.synced(), "the refused reload disturbed the pair");

    // Maintenance mode, turned on at the slave: the master's page and metrics say so.
    p.ok(0, &["maintenance", "on"]);
    assert!(
        wait_until(Duration::from_secs(10), || gauge(
            &scrape(&p, 1),
            r#"duet_maintenance{node="beta"}"#
        ) == 1.0),
        "{}",
        scrape(&p, 1)
    );
    let dom = page(&p, 1, "pair-in-maintenance");
    assert!(field(&dom, "", "maintenance").starts_with("MAINTENANCE MODE"), "{dom}");
    assert!(field(&dom, "", "check").contains("maintenance mode"), "{dom}");
    assert!(field(&dom, "", "switchover").contains("maintenance mode is on"), "{dom}");
    p.ok(1, &["maintenance", "off"]);
    assert!(wait_until(Duration::from_secs(10), || gauge(
        &scrape(&p, 0),
        r#"duet_maintenance{node="alpha"}"#
    ) == 0.0));
}

#[test]
fn the_http_endpoint_refuses_bad_requests_and_floods_and_keeps_serving() {
    use integration::{Node, NodeOpts};
    use std::io::{Read, Write};
    let n = Node::start(&NodeOpts::default());
    let port = n.metrics_port;
    let ok = || {
        let (code, head, body) = http(port, "GET", "/status", "");
        assert_eq!(code, 200, "{head}");
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["schema"], 1);
        assert_eq!(j["node"], "alpha");
    };
    ok();
    // Methods and paths.
    let (code, head, _) = http(port, "POST", "/metrics", "Content-Length: 0\r\n");
    assert_eq!(code, 405, "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: get, head"), "{head}");
    let (code, _, body) = http(port, "GET", "/etc/passwd", "");
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "the 404 says what is served: {body}");
    let (code, head, body) = http(port, "HEAD", "/", "");
    assert_eq!(code, 200, "{head}");
    assert!(body.is_empty() && head.contains("text/html"), "{head}");
    let (code, head, body) =
        http(port, "GET", "/metrics", "Accept: application/openmetrics-text;version=1.0.0\r\n");
    assert_eq!(code, 200);
    assert!(head.contains("application/openmetrics-text") && body.ends_with("# EOF\n"), "{head}");
    // Garbage, an oversized head, a request line that never ends.
    let raw = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let a = raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n");
    assert!(a.is_empty() || a.starts_with("HTTP/1.1 400"), "{a}");
    let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 * 1024));
    big.extend(b"\r\n\r\n");
    let a = raw(&big);
    assert!(a.is_empty() || a.starts_with("HTTP/1.1 431") || a.starts_with("HTTP/1.1 400"), "{a}");
    ok();
    // A flood of idle connections: the slots fill, the rest wait in the backlog; the idle ones
    // are closed after the head timeout and the waiting request is answered.
    let mut idle: Vec<_> = (0..24)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HT").unwrap();
            s
        })
        .collect();
    let (code, _, body) = http(port, "GET", "/metrics", "");
    assert_eq!(code, 200);
    let served = value(&body, "duet_http_requests_total{node=\"alpha\"}").unwrap();
    assert!(served >= 6.0, "{body}");
    // Every idle connection was closed by the server, none got an answer.
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    drop(idle);
    ok();
}
