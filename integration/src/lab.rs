//! The network-namespace lab: node A, node B and a client C on one LAN (a bridge in a fourth
//! "switch" namespace), plus a dedicated veth between A and B for replication and the UDP
//! heartbeat. Everything lives in namespaces this lab creates; dropping it deletes them (which
//! removes their interfaces) even when a test fails.
//!
//! ```text
//!   A: lan0 10.77.0.1/24 ──┐                ┌── C: lan0 10.77.0.10/24 (the client)
//!                          ├─ S: br0 ───────┤
//!   B: lan0 10.77.0.2/24 ──┘                │   VIP 10.77.0.100/24 (fd77::100/64) on the master
//!   A: ded0 10.78.0.1/30 ──── B: ded0 10.78.0.2/30   (replication, UDP heartbeat)
//! ```
//!
//! [`Lab::with_router`] adds an uplink router R (the "Internet" health checks ping), reached by
//! each node over a link of its own, so one node's uplink can be cut alone:
//!
//! ```text
//!   A: up0 10.79.1.2/30 ──── R: ra 10.79.1.1/30 ┐  R answers for 10.79.0.1 and 10.79.0.2
//!   B: up0 10.79.2.2/30 ──── R: rb 10.79.2.1/30 ┘  (routed from A and B through up0)
//! ```

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::run;

/// Addresses of the lab.
pub const LAN: [&str; 3] = ["10.77.0.1", "10.77.0.2", "10.77.0.10"];
pub const LAN6: [&str; 3] = ["fd77::1", "fd77::2", "fd77::10"];
pub const DEDICATED: [&str; 2] = ["10.78.0.1", "10.78.0.2"];
pub const VIP: &str = "10.77.0.100";
pub const VIP6: &str = "fd77::100";
/// The router's addresses the nodes ping ([`Lab::with_router`]).
pub const ROUTER_TARGETS: [&str; 2] = ["10.79.0.1", "10.79.0.2"];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The lab. `ns[0]` is A, `ns[1]` B, `ns[2]` the client, `ns[3]` the switch.
#[derive(Debug)]
pub struct Lab {
    pub ns: [String; 4],
    /// The uplink router's namespace ([`Lab::with_router`]).
    pub router: Option<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = run(Command::new("ip").args(args), Duration::from_secs(20));
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr)))
    }
}

impl Lab {
    /// Builds the lab; None (with a printed reason) when not root or `ip` is missing.
    pub fn new() -> Option<Self> {
        if !crate::is_root("network namespaces") || !crate::have("ip") {
            return None;
        }
        let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let ns = ["A", "B", "C", "S"].map(|n| format!("duet{n}-{id}"));
        let lab = Self { ns, router: None };
        lab.build().unwrap_or_else(|e| panic!("building the lab: {e}"));
        Some(lab)
    }

    /// The lab with the uplink router R.
    pub fn with_router() -> Option<Self> {
        let mut lab = Self::new()?;
        let r = lab.ns[3].replacen("duetS", "duetR", 1);
        lab.router = Some(r.clone());
        lab.build_router(&r).unwrap_or_else(|e| panic!("building the router: {e}"));
        Some(lab)
    }

    fn build_router(&self, r: &str) -> Result<(), String> {
        ip(&["netns", "add", r])?;
        ip(&["-n", r, "link", "set", "lo", "up"])?;
        for t in ROUTER_TARGETS {
            ip(&["-n", r, "addr", "add", &format!("{t}/32"), "dev", "lo"])?;
        }
        for (i, end) in ["ra", "rb"].into_iter().enumerate() {
            let n = &self.ns[i];
            let net = i + 1;
            ip(&[
                "link", "add", "up0", "netns", n, "type", "veth", "peer", "name", end, "netns", r,
            ])?;
            ip(&["-n", r, "addr", "add", &format!("10.79.{net}.1/30"), "dev", end])?;
            ip(&["-n", n, "addr", "add", &format!("10.79.{net}.2/30"), "dev", "up0"])?;
            ip(&["-n", r, "link", "set", end, "up"])?;
            ip(&["-n", n, "link", "set", "up0", "up"])?;
            ip(&["-n", n, "route", "add", "10.79.0.0/24", "via", &format!("10.79.{net}.1")])?;
        }
        Ok(())
    }

    /// Sets node `i`'s link to the router up or down (at the router's end).
    pub fn uplink(&self, i: usize, up: bool) {
        let r = self.router.as_deref().expect("a lab with a router");
        let end = ["ra", "rb"][i];
        ip(&["-n", r, "link", "set", end, if up { "up" } else { "down" }]).expect("uplink");
    }

    /// Makes the router answer for target `k` or stop answering (for every node).
    pub fn router_target(&self, k: usize, answer: bool) {
        let r = self.router.as_deref().expect("a lab with a router");
        let addr = format!("{}/32", ROUTER_TARGETS[k]);
        ip(&["-n", r, "addr", if answer { "add" } else { "del" }, &addr, "dev", "lo"])
            .expect("router target");
    }

    /// Sets node `i`'s LAN port on the switch up or down (its lan0 loses its carrier).
    pub fn lan_port(&self, i: usize, up: bool) {
        let port = format!("p{i}");
        ip(&["-n", &self.ns[3], "link", "set", &port, if up { "up" } else { "down" }])
            .expect("lan port");
    }

    fn build(&self) -> Result<(), String> {
        let [a, b, c, s] = &self.ns;
        for n in &self.ns {
            ip(&["netns", "add", n])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", s, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", s, "link", "set", "br0", "up"])?;
        for (i, n) in [a, b, c].into_iter().enumerate() {
            let port = format!("p{i}");
            ip(&[
                "link", "add", "lan0", "netns", n, "type", "veth", "peer", "name", &port, "netns",
                s,
            ])?;
            ip(&["-n", s, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", s, "link", "set", &port, "up"])?;
            ip(&["-n", n, "addr", "add", &format!("{}/24", LAN[i]), "dev", "lan0"])?;
            ip(&["-n", n, "addr", "add", &format!("{}/64", LAN6[i]), "dev", "lan0", "nodad"])?;
            ip(&["-n", n, "link", "set", "lan0", "up"])?;
        }
        ip(&[
            "link", "add", "ded0", "netns", a, "type", "veth", "peer", "name", "ded0", "netns", b,
        ])?;
        for (i, n) in [a, b].into_iter().enumerate() {
            ip(&["-n", n, "addr", "add", &format!("{}/30", DEDICATED[i]), "dev", "ded0"])?;
            ip(&["-n", n, "link", "set", "ded0", "up"])?;
        }
        Ok(())
    }

    /// A command run inside namespace `i`.
    pub fn exec(&self, i: usize, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i], prog]);
        c
    }

    /// Output of `ip ARGS` inside namespace `i`.
    pub fn ip(&self, i: usize, args: &[&str]) -> String {
        let o =
            run(Command::new("ip").arg("-n").arg(&self.ns[i]).args(args), Duration::from_secs(10));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The MAC of `dev` in namespace `i`.
    pub fn mac(&self, i: usize, dev: &str) -> String {
        let out = self.ip(i, &["-o", "link", "show", dev]);
        let at = out.find("link/ether ").map(|p| p + 11).unwrap_or(0);
        out[at..].split_whitespace().next().unwrap_or_default().to_string()
    }

    /// Whether namespace `i` holds address `addr` on lan0.
    pub fn holds(&self, i: usize, addr: &str) -> bool {
        self.ip(i, &["-o", "addr", "show", "dev", "lan0"]).contains(&format!(" {addr}/"))
    }

    /// The client's neighbour entry (MAC) for `addr`, if any.
    pub fn client_neighbour(&self, addr: &str) -> Option<String> {
        let out = self.ip(2, &["neigh", "show", addr]);
        let at = out.find("lladdr ")? + 7;
        out[at..].split_whitespace().next().map(str::to_string)
    }

    /// Applies an nftables ruleset inside namespace `i` (replacing the lab's table).
    pub fn nft(&self, i: usize, rules: &str) {
        let _ = run(
            self.exec(i, "nft").args(["delete", "table", "inet", "duetlab"]),
            Duration::from_secs(10),
        );
        if rules.is_empty() {
            return;
        }
        let text = format!("table inet duetlab {{\n{rules}\n}}\n");
        let path = std::env::temp_dir().join(format!("{}-{i}.nft", self.ns[i]));
        std::fs::write(&path, text).expect("nft file");
        let o = run(self.exec(i, "nft").arg("-f").arg(&path), Duration::from_secs(10));
        assert!(o.status.success(), "nft: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Moves the calling thread into namespace `i`'s network stack (for a client thread).
    pub fn enter(&self, i: usize) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.ns[i])).expect("netns file");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in self.ns.iter().chain(self.router.as_ref()) {
            // Whatever still runs inside (a daemon's forked child, say) goes first.
            let o = run(Command::new("ip").args(["netns", "pids", n]), Duration::from_secs(10));
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                if let Ok(p) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = run(Command::new("ip").args(["netns", "del", n]), Duration::from_secs(10));
        }
    }
}
