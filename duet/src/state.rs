//! What a node keeps in `state_dir` (default `/var/lib/duet`) across restarts, each file written
//! atomically (a temporary file, fsync, rename, fsync of the directory) and never through a
//! symbolic link:
//!
//! - `NODE.boot`: the heartbeat boot counter, incremented and made durable before the first
//!   frame of a run, so a restart always sends a newer boot than any frame recorded before it,
//!   whatever the clock says.
//! - `NODE.peer-PEER`: the peer's last [`Checkpoint`] (boot, ceiling), so a frame recorded before
//!   this node restarted is still a replay after it.
//! - `NODE.mac-INTERFACE-ADDRESS`: the NIC's own MAC while a VIP's virtual MAC replaces it
//!   ([`MacFiles`]), one file per VIP.
//! - `NODE.maintenance`: the cluster's maintenance mode as this node last knew it (`on STAMP`
//!   or `off STAMP`), so a restart keeps it.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use heartbeat::frame::Maintenance;
use heartbeat::replay::Checkpoint;

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} holds {text:?}, not what duet writes there; remove it to start over"
    )]
    Garbled { path: PathBuf, text: String },
}

/// The state directory, created (0700) if missing.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::Dir { path: dir.to_owned(), source })
}

/// Replaces `path` with `bytes` atomically and durably; a symbolic link at `path` is replaced,
/// never followed, and the temporary file is created fresh (O_EXCL, O_NOFOLLOW).
///
/// The temporary file is `<path>.tmp`: one per target, so writers of different files never
/// meet (a shared `<stem>.tmp` let the events writer's rewrite remove the temporary file of a
/// maintenance save made at the same instant, and the save failed). Writers of one target
/// within this process take turns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    static TURNS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let err = |source| StateError::Write { path: path.to_owned(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _turn = TURNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Reads a state file (`None` when there is none), refusing to follow a link.
fn read(path: &Path) -> Result<Option<String>, StateError> {
    use std::io::Read as _;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path: path.to_owned(), source }),
    };
    let mut s = String::new();
    f.read_to_string(&mut s)
        .map_err(|source| StateError::Read { path: path.to_owned(), source })?;
    Ok(Some(s))
}

fn garbled(path: &Path, text: &str) -> StateError {
    StateError::Garbled { path: path.to_owned(), text: text.chars().take(64).collect() }
}

fn boot_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.boot"))
}

fn peer_file(dir: &Path, node: &str, peer: &str) -> PathBuf {
    dir.join(format!("{node}.peer-{peer}"))
}

/// The boot generation of this run: one more than the last, durable before it is returned.
/// The first run starts from the wall clock in microseconds, above any boot generation an
/// earlier release (which sent the clock itself) may have left in a peer's memory.
pub fn next_boot(dir: &Path, node: &str, now_micros: u64) -> Result<u64, StateError> {
    let path = boot_file(dir, node);
    let last = match read(&path)? {
        None => None,
        Some(t) => Some(t.trim().parse::<u64>().map_err(|_| garbled(&path, &t))?),
    };
    let boot = match last {
        Some(b) => b.checked_add(1).ok_or_else(|| garbled(&path, &b.to_string()))?,
        None => now_micros.max(1),
    };
    write_atomic(&path, format!("{boot}\n").as_bytes())?;
    Ok(boot)
}

/// The peer's checkpoint from the last run, if any.
pub fn load_checkpoint(
    dir: &Path,
    node: &str,
    peer: &str,
) -> Result<Option<Checkpoint>, StateError> {
    let path = peer_file(dir, node, peer);
    let Some(t) = read(&path)? else { return Ok(None) };
    let mut it = t.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(boot)), Some(Ok(ceiling)), None) => Ok(Some(Checkpoint { boot, ceiling })),
        _ => Err(garbled(&path, &t)),
    }
}

/// Makes the peer's checkpoint durable.
pub fn save_checkpoint(
    dir: &Path,
    node: &str,
    peer: &str,
    c: Checkpoint,
) -> Result<(), StateError> {
    write_atomic(&peer_file(dir, node, peer), format!("{} {}\n", c.boot, c.ceiling).as_bytes())
}

fn maintenance_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.maintenance"))
}

/// The maintenance mode as last saved (off, stamp 0, when never set).
pub fn load_maintenance(dir: &Path, node: &str) -> Result<Maintenance, StateError> {
    let path = maintenance_file(dir, node);
    let Some(t) = read(&path)? else { return Ok(Maintenance::default()) };
    let mut it = t.split_whitespace();
    let on = match it.next() {
        Some("on") => true,
        Some("off") => false,
        _ => return Err(garbled(&path, &t)),
    };
    match (it.next().map(str::parse::<u64>), it.next()) {
        (Some(Ok(stamp)), None) => Ok(Maintenance { stamp, on }),
        _ => Err(garbled(&path, &t)),
    }
}

/// Makes the maintenance mode durable.
pub fn save_maintenance(dir: &Path, node: &str, m: Maintenance) -> Result<(), StateError> {
    let text = format!("{} {}\n", if m.on { "on" } else { "off" }, m.stamp);
    write_atomic(&maintenance_file(dir, node), text.as_bytes())
}

/// The NIC's own MACs of this node's VIPs, one file per VIP in the state directory.
#[derive(Debug)]
pub struct MacFiles {
    dir: PathBuf,
    node: String,
}

impl MacFiles {
    /// The files of `node` in `dir`.
    pub fn new(dir: &Path, node: &str) -> Self {
        Self { dir: dir.to_owned(), node: node.to_owned() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.mac-{key}", self.node))
    }
}

impl vip::agent::MacStore for MacFiles {
    fn load(&self, key: &str) -> std::io::Result<Option<vip::packets::Mac>> {
        let path = self.path(key);
        let Some(t) = read(&path).map_err(std::io::Error::other)? else { return Ok(None) };
        match vip::packets::parse_mac(t.trim()) {
            Some(m) => Ok(Some(m)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                garbled(&path, &t).to_string(),
            )),
        }
    }

    fn save(&self, key: &str, mac: vip::packets::Mac) -> std::io::Result<()> {
        ensure_dir(&self.dir).map_err(std::io::Error::other)?;
        let text = format!("{}\n", vip::packets::mac_string(&mac));
        write_atomic(&self.path(key), text.as_bytes()).map_err(std::io::Error::other)
    }

    fn forget(&self, key: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_count_up_from_the_clock_once_and_never_follow_it_after() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(next_boot(d.path(), "alpha", 1_000_000).unwrap(), 1_000_000);
        // The clock went back an hour: the counter does not care.
        assert_eq!(next_boot(d.path(), "alpha", 1).unwrap(), 1_000_001);
        assert_eq!(next_boot(d.path(), "alpha", 5_000_000).unwrap(), 1_000_002);
        assert_eq!(next_boot(d.path(), "beta", 7).unwrap(), 7, "per node");
        std::fs::write(d.path().join("alpha.boot"), "twelve").unwrap();
        let e = next_boot(d.path(), "alpha", 1).unwrap_err().to_string();
        assert!(e.contains("alpha.boot") && e.contains("twelve"), "{e}");
    }

    #[test]
    fn checkpoints_round_trip_and_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_checkpoint(d.path(), "a", "b").unwrap(), None);
        let c = Checkpoint { boot: 42, ceiling: 9 };
        save_checkpoint(d.path(), "a", "b", c).unwrap();
        assert_eq!(load_checkpoint(d.path(), "a", "b").unwrap(), Some(c));
        for bad in ["", "1", "1 2 3", "x 2", "-1 2"] {
            std::fs::write(d.path().join("a.peer-b"), bad).unwrap();
            assert!(load_checkpoint(d.path(), "a", "b").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn maintenance_round_trips_and_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load_maintenance(d.path(), "a").unwrap(), Maintenance::default());
        for m in [Maintenance { stamp: 17, on: true }, Maintenance { stamp: 18, on: false }] {
            save_maintenance(d.path(), "a", m).unwrap();
            assert_eq!(load_maintenance(d.path(), "a").unwrap(), m);
        }
        assert_eq!(std::fs::read_to_string(d.path().join("a.maintenance")).unwrap(), "off 18\n");
        for bad in ["", "on", "yes 1", "on x", "on -1", "on 1 2", "ON 1"] {
            std::fs::write(d.path().join("a.maintenance"), bad).unwrap();
            let e = load_maintenance(d.path(), "a").unwrap_err().to_string();
            assert!(e.contains("a.maintenance") && e.contains("remove it"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn writers_of_different_files_at_once_never_fail() {
        // alpha.events, alpha.maintenance and alpha.peer-beta written by threads at once (and
        // two VIPs' MAC files): each write succeeds and each file ends with its own last text.
        let d = tempfile::tempdir().unwrap();
        let names = [
            "alpha.events",
            "alpha.maintenance",
            "alpha.peer-beta",
            "alpha.mac-lan0-192.0.2.10",
            "alpha.mac-lan0-192.0.2.11",
        ];
        std::thread::scope(|s| {
            for name in names {
                let path = d.path().join(name);
                s.spawn(move || {
                    for i in 0..300 {
                        write_atomic(&path, format!("{name} {i}\n").as_bytes()).unwrap();
                    }
                });
            }
        });
        for name in names {
            let text = std::fs::read_to_string(d.path().join(name)).unwrap();
            assert_eq!(text, format!("{name} 299\n"));
        }
        let left: Vec<_> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), names.len(), "temporary files left: {left:?}");
    }

    #[test]
    fn a_link_in_place_of_a_state_file_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("a.boot")).unwrap();
        assert!(next_boot(d.path(), "a", 5).is_err(), "read through a link");
        std::fs::remove_file(d.path().join("a.boot")).unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("a.peer-b")).unwrap();
        save_checkpoint(d.path(), "a", "b", Checkpoint { boot: 1, ceiling: 2 }).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!d.path().join("a.peer-b").is_symlink());
    }

    #[test]
    fn saved_macs_round_trip_per_vip_and_never_through_a_link() {
        use vip::agent::MacStore;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let m = MacFiles::new(&dir, "alpha");
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        assert_eq!(m.load("lan0-192.0.2.10").unwrap(), None);
        m.save("lan0-192.0.2.10", a).unwrap();
        m.save("lan0-2001:db8::10", b).unwrap();
        assert_eq!(m.load("lan0-192.0.2.10").unwrap(), Some(a));
        assert_eq!(m.load("lan0-2001:db8::10").unwrap(), Some(b), "one file per VIP");
        // A link planted where the file goes is replaced, and its target left alone.
        let target = d.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let path = dir.join("alpha.mac-lan0-192.0.2.10");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(m.load("lan0-192.0.2.10").is_err(), "a link is not read through");
        m.save("lan0-192.0.2.10", a).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(m.load("lan0-192.0.2.10").unwrap(), Some(a));
        std::fs::write(&path, "garbage").unwrap();
        let e = m.load("lan0-192.0.2.10").unwrap_err().to_string();
        assert!(e.contains("garbage") && e.contains("remove it"), "{e}");
        m.forget("lan0-192.0.2.10").unwrap();
        m.forget("lan0-192.0.2.10").unwrap();
        assert_eq!(m.load("lan0-192.0.2.10").unwrap(), None);
    }
}
