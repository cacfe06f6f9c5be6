//! The systemd notify protocol against a socket the test listens on as `NOTIFY_SOCKET`: READY=1
//! only once the export accepts connections, WATCHDOG=1 at half of `WATCHDOG_USEC`, and none
//! while the cluster manager's thread is held.

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
