//! Shared helpers for the integration tests: start real `duet` daemons in their own process
//! groups (killed at drop, even when a test fails), run real clients with deadlines, poll instead
//! of sleeping, and speak raw NBD for the hostile-input tests.

pub mod hooks;
pub mod lab;
pub mod pair;
pub mod pty;
pub mod rawnbd;
pub mod relay;
pub mod tls;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `duet` binary under test: `$DUET_BIN`, else `target/debug/duet` of this workspace.
pub fn duet_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DUET_BIN") {
        return PathBuf::from(p);
    }
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(root.join("target"));
    let p = target.join("debug").join("duet");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p duet` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// True if `tool` is on PATH; otherwise prints why the calling test is skipped.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed (scripts/test.sh installs it)");
    }
    ok
}

/// True if running as root; otherwise prints why the calling test is skipped.
pub fn is_root(why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("SKIP: needs root for {why}");
    }
    root
}

/// A TCP connection to `127.0.0.1:port` from the loopback address `127.0.0.<last>` (all of
/// 127/8 is loopback on Linux): a client on "another host" for the server's per-address checks.
pub fn tcp_from(last: u8, port: u16) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let s = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(s.as_raw_fd(), &SockaddrIn::new(127, 0, 0, last, 0))?;
    connect(s.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))?;
    Ok(TcpStream::from(s))
}

/// A port that was free a moment ago on 127.0.0.1, and that this process has not handed out
/// before: the kernel may return a port just released by a previous `bind(0)`, and two nodes
/// of one pair given the same port was a test flake ("both nodes use the same address").
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("port list");
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind port 0")
            .local_addr()
            .expect("local addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no fresh port in 1000 tries");
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion with a deadline; kills its process group if it overruns.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= end {
            kill_group(&child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs a command and asserts it succeeded; returns stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let o = run(cmd, limit);
    assert!(
        o.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn kill_group(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
}

/// Options for one node's configuration.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    /// Size of the backing file.
    pub size: u64,
    /// `io_engine`.
    pub engine: &'static str,
    /// `direct_io`.
    pub direct: bool,
    /// TOML appended after the resource's `[resource.on.alpha]` (e.g. a `[resource.nbd]`).
    pub resource_extra: String,
    /// The daemon's open-file limit (`prlimit --nofile`), for tests that exhaust it.
    pub nofile: Option<u64>,
    /// Run the daemon as under systemd with its stderr in the journal: in a mount namespace of
    /// its own where `/run/systemd/journal` is this directory (the test's journal socket), with
    /// `JOURNAL_STREAM` naming its log file.
    pub journal: Option<PathBuf>,
}

impl Default for NodeOpts {
    fn default() -> Self {
        Self {
            size: 256 << 20,
            engine: "auto",
            direct: false,
            resource_extra: String::new(),
            nofile: None,
            journal: None,
        }
    }
}

/// A running standalone daemon with its own directory, config, disk and ports.
#[derive(Debug)]
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub disk: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
    nofile: Option<u64>,
    journal: Option<PathBuf>,
    child: Option<Child>,
}

impl Node {
    /// Writes a config for a single node "alpha" (not started).
    pub fn configure(opts: &NodeOpts) -> Self {
        // Under /var/tmp (a real filesystem) rather than a tmpfs /tmp, so O_DIRECT and
        // hole punching behave as on a server.
        std::fs::create_dir_all("/var/tmp/duet-tests").expect("create /var/tmp/duet-tests");
        let dir = tempfile::Builder::new()
            .prefix("node-")
            .tempdir_in("/var/tmp/duet-tests")
            .expect("tempdir");
        let disk = dir.path().join("vol0.img");
        std::fs::File::create(&disk).and_then(|f| f.set_len(opts.size)).expect("create disk");
        let socket = dir.path().join("duet.sock");
        let (port, metrics_port) = (free_port(), free_port());
        let config = dir.path().join("duet.toml");
        std::fs::write(
            &config,
            format!(
                r#"[cluster]
name = "itest"
configured_master = "alpha"
control_socket = "{sock}"
state_dir = "{state}"
metrics_listen = "127.0.0.1:{metrics_port}"

[node.alpha]

[[resource]]
name = "vol0"
nbd_listen = "127.0.0.1:{port}"
io_engine = "{engine}"
direct_io = {direct}

[resource.on.alpha]
disk = "{disk}"
{extra}
"#,
                sock = socket.display(),
                state = dir.path().join("state").display(),
                engine = opts.engine,
                direct = opts.direct,
                disk = disk.display(),
                extra = opts.resource_extra
            ),
        )
        .expect("write config");
        let log = dir.path().join("daemon.log");
        Self {
            dir,
            config,
            disk,
            socket,
            port,
            metrics_port,
            log,
            nofile: opts.nofile,
            journal: opts.journal.clone(),
            child: None,
        }
    }

    /// Configures and starts a node, waiting until it serves NBD.
    pub fn start(opts: &NodeOpts) -> Self {
        let mut n = Self::configure(opts);
        n.spawn();
        n
    }

    /// Starts the daemon and waits for its NBD port and control socket.
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("log file");
        let mut cmd = match (self.nofile, &self.journal) {
            // prlimit sets the limit and execs the daemon: same pid.
            (Some(n), _) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(duet_bin());
                c
            }
            (None, Some(dir)) => {
                use std::os::unix::fs::MetadataExt;
                let m = log.metadata().expect("log metadata");
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(
                        "mount -t tmpfs duet-test /run && mkdir -p /run/systemd/journal && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
                    )
                    .arg(dir)
                    .arg(duet_bin())
                    .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
                c
            }
            (None, None) => Command::new(duet_bin()),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(["--node", "alpha", "daemon"])
            .env("DUET_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn duet daemon");
        self.child = Some(child);
        let port = self.port;
        let sock = self.socket.clone();
        let up = wait_until(Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() && sock.exists()
        });
        assert!(up, "daemon did not come up; log:\n{}", self.log_text());
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nbd://` URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.port)
    }

    /// A `duet` CLI command against this node's config.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(duet_bin());
        c.arg("--config").arg(&self.config).args(["--node", "alpha"]);
        c
    }

    /// `duet status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(self.cli().args(["status", "--json"]), Duration::from_secs(10));
        serde_json::from_str(&out).expect("status JSON")
    }

    /// PID of the daemon.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().expect("started").id()).expect("pid fits")
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.terminate_wait()
    }

    /// Waits (bounded) for the daemon to exit after a signal was sent.
    pub fn terminate_wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("started");
        let mut status = None;
        let exited = wait_until(Duration::from_secs(30), || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        if !exited {
            kill_group(&child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!("daemon ignored SIGTERM for 30 s; log:\n{}", self.log_text());
        }
        status.expect("exited")
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&c, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Runs `qemu-io` with each of `cmds` against `uri`, asserting it succeeded and that no pattern
/// check failed; returns its output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c, Duration::from_secs(120));
    assert!(!out.contains("verification failed"), "{out}");
    out
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An NBD export as a local block device: `nbdfuse` exposes it as a file, a loop device
/// attaches that file. Optionally the NBD connection is made from inside a network namespace
/// (`nsenter --net`, which keeps the mount namespace, so the FUSE mount is visible here).
#[derive(Debug)]
pub struct FuseDisk {
    child: Option<Child>,
    /// Loop devices are taken one test at a time (`losetup -f` races between processes).
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
    pub fuse: PathBuf,
    pub mnt: PathBuf,
    /// The loop device.
    pub lo: String,
}

impl FuseDisk {
    /// Attaches `uri` under `dir` (folders `fuse` and `mnt` are created there).
    pub fn attach(dir: &Path, uri: &str, netns: Option<&str>) -> Self {
        let fuse = dir.join("fuse");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&fuse).expect("fuse dir");
        std::fs::create_dir_all(&mnt).expect("mnt dir");
        let _ = std::fs::create_dir_all("/var/tmp/duet-tests");
        let f = std::fs::File::create("/var/tmp/duet-tests/loop.lock").expect("lock file");
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("nbdfuse");
                c
            }
            None => Command::new("nbdfuse"),
        };
        let child = cmd.arg(&fuse).arg("--uri").arg(uri).spawn().expect("nbdfuse");
        let img = fuse.join("nbd");
        assert!(
            wait_until(Duration::from_secs(20), || img.exists()),
            "nbdfuse did not attach {uri}"
        );
        let lo = run_ok(
            Command::new("losetup").args(["-f", "--show"]).arg(&img),
            Duration::from_secs(20),
        );
        Self { child: Some(child), lock, fuse, mnt, lo: lo.trim().to_string() }
    }

    /// Unmounts (lazily), detaches the loop device and the FUSE mount, stops nbdfuse.
    pub fn detach(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(&self.mnt), Duration::from_secs(20));
        let _ = run(Command::new("losetup").args(["-d", &self.lo]), Duration::from_secs(20));
        let _ = run(
            Command::new("fusermount3").args(["-u", "-z"]).arg(&self.fuse),
            Duration::from_secs(20),
        );
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.lock = None;
    }

    /// `e2fsck -fn` on the loop device: (clean, output).
    pub fn fsck(&self) -> (bool, String) {
        let o = run(Command::new("e2fsck").args(["-fn", &self.lo]), Duration::from_secs(120));
        let out =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), out)
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

/// An XFS filesystem with reflinks (`mkfs.xfs -m reflink=1`) on a loop device over a sparse
/// file, mounted under a temporary directory: a place for disk files a reflink copy can be
/// taken of. Unmounted and detached at drop, even when a test fails.
#[derive(Debug)]
pub struct XfsMount {
    pub mnt: PathBuf,
    lo: String,
    _dir: tempfile::TempDir,
}

impl XfsMount {
    /// `None` (the reason printed) without root or `mkfs.xfs`.
    pub fn new(size: u64) -> Option<Self> {
        if !is_root("a loop device and a mount") || !have("mkfs.xfs") {
            return None;
        }
        let _ = std::fs::create_dir_all("/var/tmp/duet-tests");
        let dir = tempfile::Builder::new()
            .prefix("xfs-")
            .tempdir_in("/var/tmp/duet-tests")
            .expect("tempdir");
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("image");
        let lo = {
            let f = std::fs::File::create("/var/tmp/duet-tests/loop.lock").expect("lock file");
            let _lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok();
            run_ok(
                Command::new("losetup").args(["-f", "--show"]).arg(&img),
                Duration::from_secs(20),
            )
            .trim()
            .to_string()
        };
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).expect("mount point");
        let me = Self { mnt, lo, _dir: dir };
        run_ok(
            Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1", &me.lo]),
            Duration::from_secs(60),
        );
        run_ok(Command::new("mount").arg(&me.lo).arg(&me.mnt), Duration::from_secs(30));
        Some(me)
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg(&self.mnt), Duration::from_secs(30));
        let _ = run(Command::new("umount").arg("-l").arg(&self.mnt), Duration::from_secs(30));
        let _ = run(Command::new("losetup").args(["-d", &self.lo]), Duration::from_secs(20));
    }
}

/// One HTTP/1.0 GET (or another method) to 127.0.0.1:`port`: the status code, the head, the
/// body. Panics if the server does not answer within 10 s.
pub fn http(port: u16, method: &str, path: &str, headers: &str) -> (u16, String, String) {
    use std::io::Write as _;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: duet\r\n{headers}\r\n").expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, head.to_string(), body.to_string())
}
