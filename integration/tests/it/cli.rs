//! Acceptance 4 and the operator surface: broken configs fail before anything starts, with the
//! key named; `duet status` and `check-config` work; refusals are clear and have exit codes.

use std::process::Command;
use std::time::Duration;

use integration::{Node, NodeOpts, duet_bin, run, run_ok};

const MIN: Duration = Duration::from_secs(60);

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A table of broken configs: the daemon exits 2, names the key, and starts nothing.
#[test]
fn broken_configs_fail_before_anything_starts() {
    let n = Node::configure(&NodeOpts::default());
    let good = std::fs::read_to_string(&n.config).unwrap();
    let cases: &[(&str, &str, &str, &str)] = &[
        ("unknown key", "direct_io = false", "direct_io = false\nturbo = true", "turbo"),
        ("missing disk", &format!("disk = \"{}\"", n.disk.display()), "", "disk"),
        (
            "bad address",
            "nbd_listen = \"127.0.0.1:",
            "nbd_listen = \"127.0.0.1.1:",
            "is not an address:port",
        ),
        ("bad protocol", "direct_io = false", "direct_io = false\nprotocol = \"Z\"", "protocol"),
        ("bad engine", "io_engine = \"auto\"", "io_engine = \"spdk\"", "io_engine"),
        (
            "unknown master",
            "configured_master = \"alpha\"",
            "configured_master = \"omega\"",
            "cluster.configured_master",
        ),
        (
            "relative disk",
            &format!("disk = \"{}\"", n.disk.display()),
            "disk = \"vol0.img\"",
            "resource[0].on.alpha.disk",
        ),
        (
            "bad heartbeat",
            "[node.alpha]",
            "[node.alpha]\n[heartbeat]\ndeadtime_ms = 100",
            "heartbeat.deadtime_ms",
        ),
        ("not toml", "[cluster]", "[cluster", "line 1"),
    ];
    for (what, from, to, key) in cases {
        assert!(good.contains(from), "{what}: base config lacks {from}");
        std::fs::write(&n.config, good.replacen(from, to, 1)).unwrap();
        let o = run(n.cli().arg("daemon"), MIN);
        assert_eq!(o.status.code(), Some(2), "{what}: {}", stderr_of(&o));
        let e = stderr_of(&o);
        assert!(e.contains(key), "{what}: {e:?} does not name {key}");
        assert!(e.contains("configuration error"), "{what}: {e}");
        assert!(!n.socket.exists(), "{what}: the daemon started something");
        let o = run(n.cli().arg("check-config"), MIN);
        assert_eq!(o.status.code(), Some(2), "{what}: check-config {}", stderr_of(&o));
    }
    // A disk that does not exist: runtime error (exit 1) naming the key and the path.
    std::fs::write(&n.config, good.replace(&n.disk.display().to_string(), "/nonexistent/vol0.img"))
        .unwrap();
    let o = run(n.cli().arg("daemon"), MIN);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let e = stderr_of(&o);
    assert!(e.contains("resource[0].on.alpha.disk") && e.contains("/nonexistent/vol0.img"), "{e}");
    // A missing config file.
    let o =
        run(Command::new(duet_bin()).args(["--config", "/nonexistent/duet.toml", "status"]), MIN);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("/nonexistent/duet.toml"));
    // A node that is not in the file.
    std::fs::write(&n.config, &good).unwrap();
    let o = run(
        Command::new(duet_bin()).arg("--config").arg(&n.config).args(["--node", "zeta", "status"]),
        MIN,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr_of(&o).contains("--node"), "{}", stderr_of(&o));
    // Usage errors come from clap with exit 2.
    let o = run(Command::new(duet_bin()).arg("frobnicate"), MIN);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn check_config_describes_each_node() {
    let n = Node::configure(&NodeOpts::default());
    let out = run_ok(n.cli().arg("check-config"), MIN);
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(
        out.contains("standalone primary") && out.contains(&format!("127.0.0.1:{}", n.port)),
        "{out}"
    );
    // The shipped example (a pair) validates too, and says how it fails over.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../duet.example.toml");
    let out =
        run_ok(Command::new(duet_bin()).arg("--config").arg(&example).arg("check-config"), MIN);
    assert!(
        out.contains("node alpha")
            && out.contains("node beta")
            && out.contains("serial /dev/ttyS0"),
        "{out}"
    );
    assert!(out.contains("failover: a node whose peer is silent on every heartbeat link"), "{out}");
}

#[test]
fn status_text_json_and_metrics() {
    let n = Node::start(&NodeOpts::default());
    let text = run_ok(n.cli().arg("status"), MIN);
    for want in
        ["node alpha", "role Primary", "disk UpToDate", "connection StandAlone", "NBD export vol0"]
    {
        assert!(text.contains(want), "{want} not in {text}");
    }
    let j = n.status();
    assert_eq!(j["node"], "alpha");
    assert_eq!(j["resources"][0]["size_bytes"], 256u64 << 20);
    assert_eq!(j["resources"][0]["exporting"], true);
    // The control socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&n.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Prometheus text on metrics_listen.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", n.metrics_port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(body.contains("duet_size_bytes{node=\"alpha\",resource=\"vol0\"} 268435456"), "{body}");
    assert!(body.contains("# TYPE duet_nbd_writes_total counter"), "{body}");
}

#[test]
fn control_socket_refuses_garbage_and_older_versions_and_answers_newer_ones() {
    let n = Node::start(&NodeOpts::default());
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    for (req, want) in [
        (&b"hello\n"[..], "not JSON"),
        (b"{\"v\":0,\"cmd\":\"status\"}\n", "version 0 is older"),
        // A newer CLI's command this daemon lacks: named in a clear refusal.
        (b"{\"v\":99,\"cmd\":\"grow-volume\"}\n", "unknown variant `grow-volume`"),
        (b"{\"v\":1,\"cmd\":\"wipe\"}\n", "bad request"),
        (b"{\"v\":1,\"cmd\":\"events\",\"since_ms\":\"soon\"}\n", "bad request"),
        (b"{\"v\":1,\"cmd\":\"make-master\",\"force\":2}\n", "bad request"),
        // A single node has no cluster manager: a clear refusal, nothing changes.
        (b"{\"v\":1,\"cmd\":\"make-slave\"}\n", "cluster manager is not running"),
    ] {
        let mut s = UnixStream::connect(&n.socket).unwrap();
        s.write_all(req).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], "false", "{line}");
        assert!(v["error"].as_str().unwrap().contains(want), "{line}");
    }
    // A newer CLI's request this daemon knows is answered (a rolling upgrade: the package's
    // new CLI beside the daemon still running).
    let mut s = UnixStream::connect(&n.socket).unwrap();
    s.write_all(b"{\"v\":99,\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((v["ok"].as_str(), v["result"]["node"].as_str()), (Some("true"), Some("alpha")));
    // Still answering afterwards.
    assert_eq!(n.status()["node"], "alpha");
}

#[test]
fn refusals_for_unreachable_daemon_second_daemon_and_busy_port() {
    let mut n = Node::configure(&NodeOpts::default());
    let o = run(n.cli().arg("status"), MIN);
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("cannot reach the duet daemon"), "{}", stderr_of(&o));
    n.spawn();
    // A second daemon on the same disk (and control socket) is refused, naming the holder, and
    // the first keeps running.
    let o = run(n.cli().arg("daemon"), MIN);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(e.contains("is in use by pid"), "{e}");
    assert!(n.alive());
    assert_eq!(n.status()["node"], "alpha");
    // A different control socket and disk but the same NBD port: the port is named.
    let cfg2 = n.dir.path().join("second.toml");
    let disk2 = n.dir.path().join("second.img");
    std::fs::copy(&n.disk, &disk2).unwrap();
    let text = std::fs::read_to_string(&n.config)
        .unwrap()
        .replace("duet.sock", "second.sock")
        .replace(&n.disk.display().to_string(), &disk2.display().to_string());
    let text = text
        .replace(&format!("127.0.0.1:{}\"\n\n[node", n.metrics_port), "\"\n\n[node")
        .replace("metrics_listen = \"127.0.0.1:\"", "metrics_listen = \"\"");
    std::fs::write(&cfg2, text).unwrap();
    let o = run(
        Command::new(duet_bin()).arg("--config").arg(&cfg2).args(["--node", "alpha", "daemon"]),
        MIN,
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(e.contains("nbd_listen") && e.contains(&n.port.to_string()), "{e}");
}

/// The replication commands refuse bad arguments and wrong situations with a reason and an exit
/// code, and leave the daemon and the metadata as they were.
#[test]
fn replication_commands_refuse_clearly() {
    use integration::pair::{Pair, PairOpts};
    let code = |o: &std::process::Output| o.status.code().unwrap_or(-1);
    let mut p = Pair::configure(&PairOpts::default());
    let md_before = p.ok(0, &["dump-md"]);
    // Unknown resource: usage error, for the offline and the online commands.
    let o = run(p.cli(0).args(["create-md", "--resource", "nope"]), MIN);
    assert_eq!(code(&o), 2);
    assert!(stderr_of(&o).contains("no resource named \"nope\""), "{}", stderr_of(&o));
    // Existing metadata is not overwritten without --force.
    let o = run(p.cli(0).args(["create-md"]), MIN);
    assert_eq!(code(&o), 1);
    assert!(stderr_of(&o).contains("--force"), "{}", stderr_of(&o));
    // A disk without duet metadata: dump-md says so and suggests create-md.
    std::fs::write(&p.n[1].disk, vec![0x42u8; 1 << 20]).unwrap();
    std::fs::File::options().write(true).open(&p.n[1].disk).unwrap().set_len(128 << 20).unwrap();
    let o = run(p.cli(1).args(["dump-md"]), MIN);
    assert_eq!(code(&o), 1);
    assert!(
        stderr_of(&o).contains("create-md") || stderr_of(&o).contains("unusable"),
        "{}",
        stderr_of(&o)
    );
    // ...and the daemon refuses to start on it, naming create-md.
    let o = run(p.cli(1).arg("daemon"), MIN);
    assert_eq!(code(&o), 1);
    assert!(stderr_of(&o).contains("create-md"), "{}", stderr_of(&o));
    p.ok(1, &["create-md", "--force"]);

    p.start(0);
    // create-md while the daemon runs: refused, metadata untouched.
    let o = run(p.cli(0).args(["create-md", "--force"]), MIN);
    assert_eq!(code(&o), 1);
    assert!(stderr_of(&o).contains("stop it"), "{}", stderr_of(&o));
    assert_eq!(p.ok(0, &["dump-md"]).lines().nth(1), md_before.lines().nth(1));
    for (args, want) in [
        (&["secondary", "--resource", "nope"][..], "no resource named"),
        (&["primary"][..], "not UpToDate"),
        (&["verify"][..], "Connected"),
        (&["invalidate"][..], ""),
    ] {
        let o = run(p.cli(0).args(args), MIN);
        if want.is_empty() {
            assert!(o.status.success(), "{args:?}: {}", stderr_of(&o));
        } else {
            assert_eq!(code(&o), 1, "{args:?}");
            assert!(stderr_of(&o).contains(want), "{args:?}: {}", stderr_of(&o));
        }
    }
    p.ok(0, &["primary", "--force"]);
    let o = run(p.cli(0).args(["connect", "--discard-my-data"]), MIN);
    assert_eq!(code(&o), 1);
    assert!(stderr_of(&o).contains("secondary"), "{}", stderr_of(&o));
    // Still up and serving.
    assert_eq!(p.res(0)["exporting"], true);

    // A single-node configuration has no replication metadata or roles.
    let n = Node::start(&NodeOpts::default());
    let o = run(n.cli().arg("create-md"), MIN);
    assert_eq!(code(&o), 2);
    assert!(stderr_of(&o).contains("single node"), "{}", stderr_of(&o));
    let o = run(n.cli().arg("primary"), MIN);
    assert_eq!(code(&o), 1);
    assert!(stderr_of(&o).contains("no peer"), "{}", stderr_of(&o));
}

#[test]
fn cluster_commands_refuse_clearly() {
    use integration::pair::{Pair, PairOpts};
    let code = |o: &std::process::Output| o.status.code().unwrap_or(-1);
    let mut p = Pair::configure(&PairOpts::default());
    // No daemon: exit 3, naming the socket.
    for args in [&["make-master"][..], &["make-slave"][..], &["events"][..]] {
        let o = run(p.cli(0).args(args), MIN);
        assert_eq!(code(&o), 3, "{args:?}: {}", stderr_of(&o));
        assert!(stderr_of(&o).contains("cannot reach the duet daemon"), "{}", stderr_of(&o));
    }
    // Usage errors: exit 2.
    for args in
        [&["make-master", "--forse"][..], &["make-slave", "--force"][..], &["events", "-x"][..]]
    {
        let o = run(p.cli(0).args(args), MIN);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr_of(&o));
    }
    // A pair without heartbeat links has no cluster manager: the switchover commands say so and
    // point at the low-level commands; nothing changes.
    p.start(0);
    p.start(1);
    for args in [&["make-master"][..], &["make-master", "--force"][..], &["make-slave"][..]] {
        let o = run(p.cli(0).args(args), MIN);
        assert_eq!(code(&o), 1, "{args:?}");
        assert!(stderr_of(&o).contains("duet primary"), "{}", stderr_of(&o));
    }
    // Maintenance mode belongs to the cluster manager too.
    let o = run(p.cli(0).args(["maintenance", "on"]), MIN);
    assert_eq!(code(&o), 1);
    assert!(stderr_of(&o).contains("belongs to an HA pair"), "{}", stderr_of(&o));
    assert_eq!(p.repl(0)["role"], "Secondary");
    // The event log still answers (replication events only).
    let got =
        integration::wait_until(Duration::from_secs(10), || p.ok(0, &["events"]).contains("UTC"));
    assert!(got, "no events: {}", p.ok(0, &["events"]));
}

/// Output to a reader that went away (`duet status | head -1`, a pager quit at once): the
/// command ends with status 0 and says nothing, where `println!` panicked with a backtrace.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let n = Node::start(&NodeOpts::default());
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "--watch"],
        &["events"],
        &["events", "--json"],
        &["events", "--follow"],
        &["check-config"],
    ] {
        // A pipe whose reading end is closed before the command writes: every write is EPIPE.
        let (rd, wr) = nix::unistd::pipe().unwrap();
        drop(rd);
        let mut c = n.cli();
        c.args(args).stdout(std::process::Stdio::from(wr)).stderr(std::process::Stdio::piped());
        let out = c.spawn().unwrap().wait_with_output().unwrap();
        let err = stderr_of(&out);
        assert!(out.status.success(), "duet {args:?}: {:?}: {err}", out.status);
        assert!(err.is_empty(), "duet {args:?} said: {err}");
    }
}

/// `duet status --check`: one line and Nagios's exit code, in each state a pair goes through.
#[test]
fn status_check_says_ok_warning_critical_unknown() {
    use integration::pair::{Pair, PairOpts};
    let check = |c: &mut Command| {
        let out = run(c.args(["status", "--check"]), MIN);
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(line.lines().count(), 1, "{line}");
        (out.status.code(), line)
    };
    // A single node serving: OK.
    let mut n = Node::start(&NodeOpts { size: 16 << 20, ..NodeOpts::default() });
    let (code, line) = check(&mut n.cli());
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with("DUET OK: node alpha: vol0 Primary UpToDate"), "{line}");
    // No daemon: UNKNOWN.
    assert!(n.terminate().success());
    let (code, line) = check(&mut n.cli());
    assert_eq!(code, Some(3), "{line}");
    assert!(line.starts_with("DUET UNKNOWN:"), "{line}");
    // A pair in sync: OK on both.
    let mut p = Pair::up(&PairOpts { size: 16 << 20, ..PairOpts::default() });
    for i in 0..2 {
        let (code, line) = check(&mut p.cli(i));
        assert_eq!(code, Some(0), "node {i}: {line}");
        assert!(line.contains("in sync"), "{line}");
    }
    // The Secondary gone: WARNING on the Primary (writes are not replicated).
    p.stop(1);
    assert!(p.wait_for(0, std::time::Duration::from_secs(20), |r| r["connection"] == "Connecting"));
    let (code, line) = check(&mut p.cli(0));
    assert_eq!(code, Some(1), "{line}");
    assert!(line.contains("DUET WARNING") && line.contains("not replicated"), "{line}");
    // Disconnected by the operator: CRITICAL (StandAlone does not come back by itself).
    p.ok(0, &["disconnect"]);
    assert!(p.wait_for(0, std::time::Duration::from_secs(20), |r| r["connection"] == "StandAlone"));
    let (code, line) = check(&mut p.cli(0));
    assert_eq!(code, Some(2), "{line}");
    assert!(line.contains("DUET CRITICAL") && line.contains("StandAlone"), "{line}");
}

/// `duet wait`: returns once the resource is where it is wanted, or says why not at its timeout.
#[test]
fn wait_returns_when_the_resource_is_ready_and_times_out_otherwise() {
    use integration::pair::{Pair, PairOpts};
    let mut p = Pair::configure(&PairOpts { size: 32 << 20, ..PairOpts::default() });
    p.start(0);
    p.start(1);
    // beta waits for its disk while nothing is synced yet; alpha becomes the source.
    let mut waiter = p
        .cli(1)
        .args(["wait", "--uptodate", "vol0", "--timeout", "120"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(waiter.try_wait().unwrap().is_none(), "beta's disk cannot be UpToDate yet");
    p.ok(0, &["primary", "--force"]);
    let mut done = None;
    assert!(integration::wait_until(Duration::from_secs(120), || {
        done = waiter.try_wait().unwrap();
        done.is_some()
    }));
    assert!(done.unwrap().success(), "wait --uptodate failed");
    assert!(p.wait_synced(Duration::from_secs(60)));
    // alpha is Primary with its export open: at once.
    run_ok(p.cli(0).args(["wait", "--primary", "vol0", "--timeout", "10"]), MIN);
    // beta is not: after its timeout, with the reason.
    let out = run(p.cli(1).args(["wait", "--primary", "vol0", "--timeout", "1"]), MIN);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("vol0 after 1 s: still Secondary UpToDate"), "{err}");
    // A resource that does not exist is a configuration error.
    let out = run(p.cli(0).args(["wait", "--primary", "nope"]), MIN);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    // Neither --uptodate nor --primary: a usage error.
    assert!(!run(p.cli(0).args(["wait", "vol0"]), MIN).status.success());
}

/// `duet daemon --log-format json`: every log line is one JSON object with the level, the
/// target and the fields.
#[test]
fn json_logs_are_one_object_per_line() {
    let n = Node::configure(&NodeOpts { size: 16 << 20, ..NodeOpts::default() });
    let mut child = n
        .cli()
        .args(["daemon", "--log-format", "json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&n.log).unwrap())
        .spawn()
        .unwrap();
    assert!(
        integration::wait_until(Duration::from_secs(20), || n
            .log_text()
            .contains("duet daemon running")),
        "{}",
        n.log_text()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let text = n.log_text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let running = lines
        .iter()
        .find(|v| v["fields"]["message"] == "duet daemon running")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(running["level"], "INFO", "{running}");
    assert_eq!(running["fields"]["node"], "alpha", "{running}");
    assert!(running["timestamp"].is_string() && running["target"].is_string(), "{running}");
    assert!(lines.iter().any(|v| v["fields"]["message"] == "stopped cleanly"), "{text}");
}

/// Garbage for the new CLI arguments: a usage error (exit 2) that names the argument, and
/// nothing started.
#[test]
fn bad_values_for_the_new_arguments_are_usage_errors() {
    let n = Node::configure(&NodeOpts { size: 16 << 20, ..NodeOpts::default() });
    for (args, word) in [
        (&["daemon", "--log-format", "xml"][..], "--log-format"),
        (&["wait", "--primary", "vol0", "--timeout", "soon"], "--timeout"),
        (&["wait", "--primary", "--uptodate", "vol0"], "--uptodate"),
        (&["status", "--json", "--check"], "--check"),
        (&["generate", "completions", "cmd.exe"], "cmd.exe"),
        (&["status", "--watch", "--json"], "--json"),
        (&["status", "--watch", "--check"], "--check"),
        (&["adjust", "now"], "now"),
        (&["events", "--follow", "--since", "3"], "--since"),
        (&["maintenance"], "<MODE>"),
        (&["maintenance", "maybe"], "maybe"),
        (&["maintenance", "on", "off"], "off"),
    ] {
        let out = run(n.cli().args(args), MIN);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(word), "{args:?}: {err}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", n.port)).is_err(), "a daemon started");
    // Man pages into a path that cannot be a directory: an error that names it.
    let file = n.dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = run(n.cli().args(["generate", "man"]).arg(&file), MIN);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("not-a-dir"), "{}", stderr_of(&out));
}

#[test]
fn status_watch_redraws_when_an_event_is_pushed() {
    use std::io::Read;
    let n = Node::start(&NodeOpts { size: 16 << 20, ..NodeOpts::default() });
    let mut child = n
        .cli()
        .args(["status", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 || tx.send(String::from_utf8_lossy(&buf[..k]).into_owned()).is_err() {
                return;
            }
        }
    });
    let until = |text: &mut String, want: &str| {
        let end = std::time::Instant::now() + Duration::from_secs(15);
        while !text.contains(want) {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(t) => text.push_str(&t),
                Err(_) => panic!("{want:?} never shown:\n{text}"),
            }
        }
    };
    let mut text = String::new();
    until(&mut text, "last events:");
    assert!(text.contains("node alpha") && text.contains("role Primary"), "{text}");
    // An event: `duet adjust` with nothing changed still says so in the log.
    run_ok(n.cli().arg("adjust"), MIN);
    until(&mut text, "configuration reloaded: nothing changed");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn events_follow_text_and_json_and_bad_follow_requests() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let n = Node::start(&NodeOpts { size: 16 << 20, ..NodeOpts::default() });
    // JSON: the current state first.
    let out = run_ok(n.cli().args(["events", "--json"]), MIN);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1, "{out}");
    assert!(out.contains("\"kind\":\"role\""), "{out}");
    // Hostile follow requests get an error line, and the daemon serves on.
    for (req, want) in [
        (&b"{\"v\":1,\"cmd\":\"follow\",\"since_seq\":\"x\"}\n"[..], "bad request"),
        (b"{\"v\":1,\"cmd\":\"follow\",\"since_seq\":-1}\n", "bad request"),
    ] {
        let mut s = UnixStream::connect(&n.socket).unwrap();
        s.write_all(req).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains(want), "{line}");
    }
    // A raw follower that hangs up early does not disturb the next.
    let mut s = UnixStream::connect(&n.socket).unwrap();
    s.write_all(b"{\"v\":1,\"cmd\":\"follow\",\"since_seq\":0}\n").unwrap();
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"follow\":true"), "{line}");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"type\":\"exists\""), "{line}");
    drop(r);
    drop(s);
    let out = run_ok(n.cli().args(["events"]), MIN);
    assert!(out.contains("role Primary"), "{out}");
}
