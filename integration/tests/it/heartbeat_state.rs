//! The heartbeat across restarts: a node whose clock went back is heard at once (its boot
//! generation is a counter on disk, not the clock), and a frame recorded before a restart of
//! either node is a replay after it (the receiver's window is on disk too).

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::pair::{HaOpts, Pair, PairOpts};
use integration::wait_until;

/// A pair with a UDP heartbeat only, alpha the master, both hearing each other.
fn pair(reroute: impl FnOnce(&mut Pair)) -> Pair {
    let ha = HaOpts { serial: false, ..HaOpts::default() };
    let mut p = Pair::configure(&PairOpts { ha: Some(ha), ..PairOpts::default() });
    reroute(&mut p);
    p.start(0);
    p.start(1);
    assert!(wait_until(Duration::from_secs(20), || hears(&p, 1) && hears(&p, 0)));
    p.ok(0, &["make-master", "--force"]);
    assert!(p.wait_synced(Duration::from_secs(60)));
    p
}

fn hears(p: &Pair, i: usize) -> bool {
    p.cluster(i)["peer"] == "alive"
}

fn replays(p: &Pair, i: usize) -> u64 {
    p.cluster(i)["drops"]["replay"].as_u64().unwrap()
}

/// libfaketime's preload library, if installed.
fn faketime_lib() -> Option<String> {
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(String::from)
}

#[test]
fn a_node_restarted_with_its_clock_an_hour_back_is_heard_at_once() {
    let Some(lib) = faketime_lib() else {
        assert!(std::env::var_os("CI").is_none(), "libfaketime missing in CI");
        eprintln!("SKIP: libfaketime is not installed (apt-get install faketime)");
        return;
    };
    let mut p = pair(|_| {});
    p.stop(1);
    // Beta's wall clock an hour behind (its timers keep the true monotonic clock).
    p.n[1].env = vec![
        ("LD_PRELOAD".into(), lib),
        ("FAKETIME".into(), "-1h".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    let before = replays(&p, 0);
    p.start(1);
    assert!(
        wait_until(Duration::from_secs(10), || hears(&p, 0) && hears(&p, 1)),
        "alpha does not hear beta restarted with its clock back: {}",
        p.cluster(0)
    );
    assert_eq!(replays(&p, 0), before, "beta's frames were taken for replays: {}", p.cluster(0));
    // And the clock really was an hour back in beta's process.
    let log = p.log_text(1);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let stamp = log.lines().last().and_then(|l| l.get(..13)).unwrap_or_default().to_string();
    let this_hour = humantime_hour(now.as_secs());
    assert!(!stamp.is_empty() && !stamp.ends_with(&this_hour), "{stamp} vs {this_hour}");
}

/// "HH" of a UNIX time, as the log's RFC 3339 stamps show it (UTC).
fn humantime_hour(secs: u64) -> String {
    format!("T{:02}", (secs / 3600) % 24)
}

/// Alpha's frames to beta pass through a relay that keeps them; one is sent again to beta after
/// beta restarts, and after alpha restarts.
#[test]
fn a_recorded_frame_is_a_replay_after_either_node_restarts() {
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let recorded: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut beta_port = 0;
    let mut forward = None;
    let mut p = pair(|p| {
        let (alpha_bind, beta_bind) = p.udp_ends(0);
        beta_port = beta_bind;
        let text = std::fs::read_to_string(&p.config).unwrap();
        let from = format!(
            "[heartbeat.link.on.alpha]\nbind = \"127.0.0.1:{alpha_bind}\"\npeer = \"127.0.0.1:{beta_bind}\""
        );
        let to = format!(
            "[heartbeat.link.on.alpha]\nbind = \"127.0.0.1:{alpha_bind}\"\npeer = \"127.0.0.1:{relay_port}\""
        );
        assert!(text.contains(&from));
        let path = p.dir.path().join("alpha.toml");
        std::fs::write(&path, text.replace(&from, &to)).unwrap();
        p.n[0].config = Some(path);
        // The relay runs before the daemons start.
        let (relay, recorded, stop) =
            (relay.try_clone().unwrap(), Arc::clone(&recorded), Arc::clone(&stop));
        relay.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        forward = Some(std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            while !stop.load(SeqCst) {
                if let Ok((n, _)) = relay.recv_from(&mut b) {
                    let _ = relay.send_to(&b[..n], ("127.0.0.1", beta_bind));
                    let mut r = recorded.lock().unwrap();
                    if r.len() < 10_000 {
                        r.push(b[..n].to_vec());
                    }
                }
            }
        }));
    });
    // Frames flowed through the relay; keep one.
    assert!(wait_until(Duration::from_secs(10), || recorded.lock().unwrap().len() >= 5));
    let old = recorded.lock().unwrap().last().unwrap().clone();
    let inject = UdpSocket::bind("127.0.0.1:0").unwrap();

    // Beta restarts (its window comes back from disk), then alpha (its new boot generation
    // makes the recording older still): the recording is a replay after each.
    for (node, who) in [(1, "beta"), (0, "alpha")] {
        p.stop(node);
        p.start(node);
        assert!(wait_until(Duration::from_secs(10), || hears(&p, 1)), "{}", p.cluster(1));
        let before = replays(&p, 1);
        inject.send_to(&old, ("127.0.0.1", beta_port)).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || replays(&p, 1) > before),
            "the recorded frame was accepted after {who} restarted: {}",
            p.cluster(1)
        );
    }
    assert!(wait_until(Duration::from_secs(10), || hears(&p, 1) && hears(&p, 0)));
    stop.store(true, SeqCst);
    forward.unwrap().join().unwrap();
}
