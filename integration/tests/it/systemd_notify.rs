//! The systemd notify protocol against a socket the test listens on as `NOTIFY_SOCKET`: READY=1
//! only once the export accepts connections, WATCHDOG=1 at half of `WATCHDOG_USEC`, and none
//! while the cluster manager's thread is held.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::{Node, NodeOpts};

/// The notify socket of a test.
struct Listener {
    sock: UnixDatagram,
}

impl Listener {
    fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Self { sock }
    }

    /// The next message within `limit`.
    fn next(&self, limit: Duration) -> Option<String> {
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        while t.elapsed() < limit {
            if let Ok(n) = self.sock.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// Every message during `span`.
    fn during(&self, span: Duration) -> Vec<String> {
        let t = Instant::now();
        let mut v = Vec::new();
        while t.elapsed() < span {
            if let Some(m) = self.next(span.saturating_sub(t.elapsed())) {
                v.push(m);
            }
        }
        v
    }
}

fn watchdogs(msgs: &[String]) -> usize {
    msgs.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count()
}

#[test]
fn ready_comes_once_the_export_serves_and_the_watchdog_is_petted() {
    let n = Node::configure(&NodeOpts { size: 64 << 20, ..NodeOpts::default() });
    let path = n.dir.path().join("notify.sock");
    let l = Listener::bind(&path);
    let mut child = n
        .cli()
        .arg("daemon")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&n.log).unwrap())
        .spawn()
        .unwrap();
    // Until READY=1 the messages may be anything else; when it comes, the export serves and the
    // control socket answers.
    let mut ready = None;
    for _ in 0..200 {
        let Some(m) = l.next(Duration::from_secs(20)) else { break };
        if m.lines().any(|x| x == "READY=1") {
            let nbd = TcpStream::connect(("127.0.0.1", n.port)).is_ok();
            let control = std::os::unix::net::UnixStream::connect(&n.socket).is_ok();
            ready = Some((m, nbd, control));
            break;
        }
    }
    let (msg, nbd, control) = ready.unwrap_or_else(|| panic!("no READY=1; log:\n{}", n.log_text()));
    assert!(nbd, "READY=1 before the export accepted connections");
    assert!(control, "READY=1 before the control socket answered");
    assert!(msg.contains("STATUS=node alpha: vol0"), "{msg}");
    // WATCHDOG_USEC = 400 ms: petted every 200 ms.
    let got = watchdogs(&l.during(Duration::from_secs(2)));
    assert!((4..=15).contains(&got), "{got} WATCHDOG=1 in 2 s");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping =
        (0..100).find_map(|_| l.next(Duration::from_secs(10)).filter(|m| m.contains("STOPPING=1")));
    assert!(stopping.is_some(), "no STOPPING=1 at SIGTERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn no_watchdog_while_the_cluster_managers_thread_is_held() {
    let ha = HaOpts { serial: false, ..HaOpts::default() };
    let mut p = Pair::configure(&PairOpts { ha: Some(ha), ..PairOpts::default() });
    let path = p.dir.path().join("notify.sock");
    let hold = p.dir.path().join("hold-ha");
    let l = Listener::bind(&path);
    p.n[0].env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    p.n[0].env.push(("WATCHDOG_USEC".into(), "400000".into()));
    p.n[0].env.push(("DUET_FAULT_HOLD_HA".into(), hold.display().to_string()));
    p.start(0);
    assert!(watchdogs(&l.during(Duration::from_secs(2))) >= 4, "no watchdog from the pair's node");
    // The cluster manager's tick blocks its thread: the pets stop (one already on its way may
    // still arrive in the first half second).
    std::fs::write(&hold, b"").unwrap();
    let _ = l.during(Duration::from_millis(500));
    let held = watchdogs(&l.during(Duration::from_millis(1500)));
    std::fs::remove_file(&hold).unwrap();
    assert_eq!(held, 0, "WATCHDOG=1 while the cluster manager was held");
    // Released: they come again.
    assert!(watchdogs(&l.during(Duration::from_secs(2))) >= 3, "the watchdog did not resume");
}

#[test]
fn under_systemd_the_logs_go_to_the_journal_with_their_priorities() {
    if !integration::is_root("the journal test mounts a tmpfs in a mount namespace") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = std::os::unix::net::UnixDatagram::bind(dir.path().join("socket")).unwrap();
    let opts = NodeOpts { journal: Some(dir.path().to_path_buf()), ..NodeOpts::default() };
    let mut n = Node::configure(&opts);
    // A damaged events file: the daemon starts, and warns.
    std::fs::create_dir_all(n.dir.path().join("state")).unwrap();
    std::fs::write(
        n.dir.path().join("state/alpha.events"),
        "garbage\n{\"seq\":1,\"at\":1.0,\"kind\":\"message\",\"reason\":\"old\"}\n{\"seq\":",
    )
    .unwrap();
    n.spawn();
    // Journal entries, one datagram each, in journald's native protocol.
    // Drained all along, as journald does: a full socket would block the daemon's logging.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(len) = sock.recv(&mut buf) {
            if tx.send(journal_fields(&buf[..len])).is_err() {
                return;
            }
        }
    });
    let mut entries = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let has =
        |e: &BTreeMap<String, String>, msg: &str| e.get("MESSAGE").is_some_and(|m| m.contains(msg));
    while !(entries.iter().any(|e| has(e, "duet daemon running"))
        && entries.iter().any(|e| has(e, "were not events")))
    {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let Ok(e) = rx.recv_timeout(left) else { break };
        entries.push(e);
    }
    let find = |msg: &str| {
        entries
            .iter()
            .find(|e| has(e, msg))
            .unwrap_or_else(|| panic!("no journal entry {msg:?}: {entries:#?}"))
    };
    let running = find("duet daemon running");
    assert_eq!(running["PRIORITY"], "5", "info is priority 5: {running:?}");
    assert_eq!(running["SYSLOG_IDENTIFIER"], "duet", "{running:?}");
    assert_eq!(running["F_NODE"], "alpha", "the event's fields are the entry's: {running:?}");
    let warned = find("were not events");
    assert_eq!(warned["PRIORITY"], "4", "a warning is priority 4: {warned:?}");
    assert!(warned["MESSAGE"].starts_with("2 line(s)"), "{warned:?}");
    // Nothing went to stderr as text meanwhile.
    assert!(!n.log_text().contains("duet daemon running"), "{}", n.log_text());
    // The event kept in the file is still there.
    let ev = integration::run_ok(n.cli().arg("events"), Duration::from_secs(10));
    assert!(ev.contains("  old\n"), "{ev}");
    assert!(n.terminate().success(), "{}", n.log_text());
}

/// The fields of one datagram of journald's native protocol: `KEY=value` lines, or `KEY`, a
/// newline, a little-endian u64 length, the value and a newline.
fn journal_fields(mut b: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            b = &b[(nl + 1).min(b.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[(nl + 1).min(b.len())..];
            if rest.len() < 8 {
                break;
            }
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
            let v = &rest[8..(8 + len).min(rest.len())];
            out.insert(key, String::from_utf8_lossy(v).into_owned());
            b = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}
