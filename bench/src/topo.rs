//! Where each process of a benchmark run sits: the topology.
//!
//! - `shared`: everything on loopback in this namespace, on whichever CPU the scheduler picks
//!   (client, both daemons and the references compete for every CPU).
//! - `two-hosts`: the namespace lab's nodes A and B (root), joined by their dedicated veth, which
//!   carries replication. The client and the Primary (and the references, client and server) run
//!   in A on CPU 0; the Secondary (and qsd-mirror's target) in B on CPU 1: as if the pair were
//!   two one-CPU hosts, the client local to the Primary.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration::lab::{self, Lab};

/// A namespace (by its open handle) and a CPU.
#[derive(Debug, Clone, Default)]
pub(crate) struct Place {
    netns: Option<Arc<OwnedFd>>,
    cpu: Option<usize>,
}

impl Place {
    /// Starts `cmd` here: the child enters the namespace and binds to the CPU before it execs,
    /// so its PID is the server's own (CPU accounting reads it).
    pub(crate) fn apply(&self, cmd: &mut Command) {
        let fd = self.netns.as_ref().map(|f| f.as_raw_fd());
        let cpu = self.cpu;
        if fd.is_none() && cpu.is_none() {
            return;
        }
        // SAFETY: between fork and exec the closure calls only setns(2) and
        // sched_setaffinity(2) (async-signal-safe system calls) on values copied in before the
        // fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(c) = cpu {
                    pin_current(c)?;
                }
                Ok(())
            });
        }
    }

    /// Moves the calling thread here (a measuring thread of this process).
    pub(crate) fn enter(&self) -> anyhow::Result<()> {
        if let Some(fd) = &self.netns {
            // SAFETY: setns on a namespace fd this process holds open; it affects the calling
            // thread only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
        }
        if let Some(c) = self.cpu {
            pin_current(c).context("sched_setaffinity")?;
        }
        Ok(())
    }

    /// Runs `f` on a thread placed here.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let me = self.clone();
        std::thread::spawn(move || {
            me.enter()?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a measuring thread panicked"))?
    }
}

/// Binds the calling thread (or, after fork, the process) to one CPU.
fn pin_current(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity(0, ...) act
    // on that local set and the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One topology: where each role runs and at which addresses the daemons replicate.
#[derive(Debug)]
pub(crate) struct Topology {
    pub name: &'static str,
    /// fio.
    pub client: Place,
    /// duet standalone, a pair's Primary, nbdkit, qemu-nbd, qemu-storage-daemon.
    pub primary: Place,
    /// A pair's Secondary, qsd-mirror's target.
    pub secondary: Place,
    /// Replication (and the round trip) addresses of the primary's and the secondary's side.
    pub addr: [&'static str; 2],
    /// Keeps the namespaces while the topology is in use; dropping it deletes them.
    _lab: Option<Lab>,
}

pub(crate) const NAMES: [&str; 2] = ["shared", "two-hosts"];

impl Topology {
    pub(crate) fn new(name: &str) -> anyhow::Result<Self> {
        match name {
            "shared" => Ok(Self {
                name: "shared",
                client: Place::default(),
                primary: Place::default(),
                secondary: Place::default(),
                addr: ["127.0.0.1", "127.0.0.1"],
                _lab: None,
            }),
            "two-hosts" => {
                // SAFETY: sysconf has no preconditions.
                let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
                if cpus < 2 {
                    bail!("--topology two-hosts needs two CPUs; this machine has {cpus}");
                }
                let lab = Lab::new()
                    .context("--topology two-hosts needs root and iproute2 (network namespaces)")?;
                let place = |i: usize, cpu: usize| -> anyhow::Result<Place> {
                    let f = std::fs::File::open(format!("/run/netns/{}", lab.ns[i]))
                        .context("opening the lab's namespace")?;
                    Ok(Place { netns: Some(Arc::new(f.into())), cpu: Some(cpu) })
                };
                // A veth hands each packet to the receiving stack on the sender's CPU: the
                // Secondary's TCP receive work would land on CPU 0. Receive packet steering puts
                // it on the receiver's CPU, as a NIC of its own would.
                for (i, mask) in [(0usize, "1"), (1, "2")] {
                    let o = std::process::Command::new("ip")
                        .args(["netns", "exec", &lab.ns[i], "sh", "-c"])
                        .arg(format!("echo {mask} > /sys/class/net/ded0/queues/rx-0/rps_cpus"))
                        .output()
                        .context("running ip netns exec")?;
                    if !o.status.success() {
                        bail!(
                            "steering the receive side of the veth to its CPU: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        );
                    }
                }
                let a = place(0, 0)?;
                Ok(Self {
                    name: "two-hosts",
                    client: a.clone(),
                    primary: a,
                    secondary: place(1, 1)?,
                    addr: lab::DEDICATED,
                    _lab: Some(lab),
                })
            }
            other => bail!("unknown topology {other} (known: {})", NAMES.join(", ")),
        }
    }

    /// Waits until a server listens on `host:port`, as seen from the client.
    pub(crate) fn wait_port(&self, host: &'static str, port: u16) -> anyhow::Result<()> {
        self.client.run(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if TcpStream::connect((host, port)).is_ok() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            bail!("server on {host}:{port} did not come up")
        })
    }

    /// Round trip of 16 bytes over TCP from the primary's side to an echo on the secondary's
    /// side, each thread blocked in `recv`: one synchronous exchange with the peer (two
    /// wake-ups), the floor under protocol C's extra latency. Median of `n`, in microseconds.
    pub(crate) fn rtt_us(&self, n: usize) -> anyhow::Result<f64> {
        use std::io::{Read, Write};
        let host = self.addr[1];
        let (tx, rx) = std::sync::mpsc::channel();
        let echo = self.secondary.clone();
        let server = std::thread::spawn(move || -> anyhow::Result<()> {
            echo.enter()?;
            let l = std::net::TcpListener::bind((host, 0))?;
            let _ = tx.send(l.local_addr()?);
            let (mut s, _) = l.accept()?;
            s.set_nodelay(true)?;
            let mut b = [0u8; 16];
            while s.read_exact(&mut b).is_ok() {
                s.write_all(&b)?;
            }
            Ok(())
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).context("the echo thread")?;
        let lat = self.primary.run(move || {
            let mut c = TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            let mut b = [7u8; 16];
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                c.write_all(&b)?;
                c.read_exact(&mut b)?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(lat)
        })?;
        let _ = server.join();
        Ok(crate::median(lat))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_topology_is_refused_by_name() {
        let e = Topology::new("three-hosts").unwrap_err().to_string();
        assert!(e.contains("three-hosts") && e.contains("two-hosts"), "{e}");
    }

    #[test]
    fn the_shared_topology_places_nothing_and_measures_a_loopback_round_trip() {
        let t = Topology::new("shared").unwrap();
        let out = {
            let mut c = Command::new("sh");
            c.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
            t.secondary.apply(&mut c);
            c.output().unwrap()
        };
        let mine = std::fs::read_to_string("/proc/self/status").unwrap();
        let mine = mine.lines().find(|l| l.starts_with("Cpus_allowed_list")).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), mine.trim());
        let rtt = t.rtt_us(200).unwrap();
        assert!(rtt > 0.0 && rtt < 1e6, "{rtt}");
    }

    /// The two-hosts topology puts each side's processes in its own namespace and on its own
    /// CPU, and the round trip crosses the veth between them.
    #[test]
    fn two_hosts_places_each_side_in_its_namespace_on_its_cpu() {
        if !integration::is_root("network namespaces") {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
            let e = Topology::new("two-hosts").unwrap_err().to_string();
            assert!(e.contains("two CPUs"), "{e}");
            println!("skipped: one CPU");
            return;
        }
        let t = Topology::new("two-hosts").unwrap();
        for (place, cpu, addr) in
            [(&t.client, "0", lab::DEDICATED[0]), (&t.secondary, "1", lab::DEDICATED[1])]
        {
            let mut c = Command::new("sh");
            c.args(["-c", "grep Cpus_allowed_list /proc/self/status; ip -o -4 addr show"]);
            place.apply(&mut c);
            let out = c.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            let allowed = text.lines().next().unwrap().split_whitespace().nth(1).unwrap();
            assert_eq!(allowed, cpu, "{text}");
            assert!(text.contains(&format!(" {addr}/")), "{addr} not in {text}");
        }
        // Each side's veth end steers its receive work to that side's CPU.
        for (i, mask) in [(0usize, "1"), (1, "2")] {
            let ns = t._lab.as_ref().map(|l| l.ns[i].clone()).unwrap();
            let o = Command::new("ip")
                .args(["netns", "exec", &ns, "cat", "/sys/class/net/ded0/queues/rx-0/rps_cpus"])
                .output()
                .unwrap();
            let got = String::from_utf8_lossy(&o.stdout);
            assert_eq!(
                u32::from_str_radix(got.trim().replace(',', "").as_str(), 16).ok(),
                mask.parse().ok(),
                "{got}"
            );
        }
        // A thread of this process moved to the secondary's side sees its address, not ours.
        let here = t
            .secondary
            .run(|| Ok(std::net::TcpListener::bind((lab::DEDICATED[1], 0))?.local_addr()?));
        assert!(here.is_ok(), "{here:?}");
        assert!(std::net::TcpListener::bind((lab::DEDICATED[1], 0)).is_err());
        let rtt = t.rtt_us(200).unwrap();
        assert!(rtt > 0.0 && rtt < 1e6, "{rtt}");
    }
}
