//! A failing local disk (`on_io_error`): which errors count, detaching it (the engine's
//! [`Replica::detach`] decides; this carries it out), the marker in the state directory that
//! keeps a restart from trusting the failed disk again, and a Diskless Primary's reads through
//! its peer.

use super::*;
use engine::replica::ReadFrom;
use engine::state::Outcome;
use std::path::PathBuf;

/// Largest piece of one read through the peer (a PeerReadData frame, digest included, stays
/// far below the wire's payload limit).
pub(crate) const PEER_READ_MAX: u64 = 1 << 20;

/// What a failing local disk does (`on_io_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnIoError {
    /// Detach it (Diskless): a Primary serves on through its connected, UpToDate peer and
    /// hands over; a Secondary leaves the session and is no longer a failover target.
    #[default]
    Detach,
    /// Pass the error to the client (a Secondary's failed replicated write makes it
    /// Inconsistent until resynced).
    Pass,
    /// A Primary holds each request its disk refuses (while the disk fails, that is every
    /// request that reaches it) until the operator runs `duet resume-io` (the path to the disk is back: a SAN, a multipath
    /// failover), then retries them: no error reaches a client, nothing is detached. A
    /// Secondary detaches as under `Detach` (holding its writes would stall the Primary's).
    Freeze,
}

/// What a request does after its local I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The disk is detached: the request goes on without it.
    Detached,
    /// The error is the request's answer.
    Stands,
    /// I/O was held and has been resumed: try again.
    Retry,
}

/// Whether I/O is held by a disk error (`on_io_error = "freeze"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    Off,
    On,
    /// The daemon stops: what was held fails (it is answered, never acknowledged).
    GiveUp,
}

/// What `duet status` (and the marker) say about the failed disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskFailure {
    /// Seconds since the Unix epoch of the first error.
    pub at: u64,
    /// The backing store.
    pub disk: String,
    /// What failed: "write", "read", "flush", "activity log", ...
    pub op: String,
    pub offset: u64,
    /// The error, as the system names it.
    pub error: String,
    /// "detached", or "passed to the client" (and why it was not detached).
    pub action: String,
    /// Replicated bytes (so a restart can export the right size without reading the disk).
    #[serde(default)]
    pub size: u64,
}

/// Whether `e` from the local store means the disk failed (as opposed to a request the store
/// could not take, such as an unsupported fast zero).
pub fn is_disk_error(e: Errno) -> bool {
    matches!(
        e,
        Errno::EIO
            | Errno::ENXIO
            | Errno::ENODEV
            | Errno::EREMOTEIO
            | Errno::ENOSPC
            | Errno::EDQUOT
            | Errno::EROFS
            | Errno::EBADMSG
            | Errno::ENODATA
            | Errno::ENOTCONN
            | Errno::ESTALE
            | Errno::ETIMEDOUT
    )
}

/// The marker's path: `state_dir/NODE.RESOURCE.detached`.
pub fn marker_path(state_dir: &std::path::Path, node: &str, resource: &str) -> PathBuf {
    state_dir.join(format!("{node}.{resource}.detached"))
}

/// The marker left by a detach, if any. A marker that does not parse still says "detached":
/// the failed disk is never trusted by accident.
pub fn read_marker(path: &std::path::Path) -> Option<DiskFailure> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or(DiskFailure {
        at: 0,
        disk: String::new(),
        op: "unknown (the marker did not parse)".into(),
        offset: 0,
        error: String::new(),
        action: "detached".into(),
        size: 0,
    }))
}

/// Writes the marker atomically and durably (a temporary file, fsync, rename, fsync of the
/// directory).
pub fn write_marker(path: &std::path::Path, f: &DiskFailure) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("detached.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(serde_json::to_string_pretty(f).map_err(std::io::Error::other)?.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Volume {
    /// The local disk is detached: no I/O may reach it.
    pub fn diskless(&self) -> bool {
        // A flag, not the state lock: every write asks (set once, under the lock, as the
        // engine detaches; a detach lasts as long as the process).
        self.detached.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The failed disk, if one failed.
    pub fn disk_failure(&self) -> Option<DiskFailure> {
        self.with_core(|c| c.disk_failure.clone())
    }

    /// The local store returned `e` for `op` at `offset`. `true`: the disk is (now) detached and
    /// the caller goes on without it; `false`: the error stands (not a disk error, a single
    /// node, `on_io_error = "pass"`, or the engine refused: this disk holds the only good copy).
    pub(crate) async fn disk_failed(&self, op: &str, offset: u64, e: Errno) -> bool {
        let Some(cfg) = &self.cfg else { return false };
        if !is_disk_error(e) {
            return false;
        }
        let (outcome, role) = self.with_core(|c| {
            let o = match cfg.on_io_error {
                OnIoError::Detach | OnIoError::Freeze => Some(c.r.detach()),
                OnIoError::Pass => None,
            };
            if c.r.diskless() {
                self.detached.store(true, std::sync::atomic::Ordering::Release);
            }
            (o, c.r.st.role)
        });
        let disk = self.store.path().display().to_string();
        let mut failure = DiskFailure {
            at: now_secs(),
            disk: disk.clone(),
            op: op.to_string(),
            offset,
            error: e.desc().to_string(),
            action: String::new(),
            size: self.size,
        };
        match outcome {
            Some(Ok(Outcome::Unchanged)) => true,
            Some(Ok(Outcome::Changed)) => {
                failure.action = "detached".into();
                self.with_core(|c| c.disk_failure = Some(failure.clone()));
                let marker = cfg.detached_marker.clone();
                let f = failure.clone();
                let written = tokio::task::block_in_place(|| marker.map(|m| write_marker(&m, &f)));
                if let Some(Err(err)) = written {
                    tracing::error!(error = %err, "cannot write the detached marker: a restart would attach the failed disk");
                }
                let how = if role == Role::Primary {
                    "serving on through the peer"
                } else {
                    "this node is no longer a failover target"
                };
                self.event(format!(
                    "I/O error on {disk}: {op} at {offset} failed ({e}); disk detached (Diskless), {how}"
                ));
                self.send_state().await;
                self.notify();
                true
            }
            refused => {
                let why = match refused {
                    Some(Err(r)) => format!("passed to the client: {r}"),
                    _ => "passed to the client (on_io_error = \"pass\")".into(),
                };
                failure.action = why.clone();
                let first = self.with_core(|c| {
                    let first = c.disk_failure.as_ref().is_none_or(|f| f.action != why);
                    c.disk_failure = Some(failure);
                    first
                });
                if first {
                    self.event(format!(
                        "I/O error on {disk}: {op} at {offset} failed ({e}); {why}"
                    ));
                    self.notify();
                }
                false
            }
        }
    }

    /// A Primary's local I/O for `op` at `offset` failed with `e`: held until `duet resume-io`
    /// under `on_io_error = "freeze"` (then tried again), else [`Volume::disk_failed`].
    pub(crate) async fn local_fault(&self, op: &str, offset: u64, e: Errno) -> Fault {
        let freezes = self.cfg.as_ref().is_some_and(|c| c.on_io_error == OnIoError::Freeze)
            && is_disk_error(e)
            && self.with_core(|c| c.r.st.role) == Role::Primary;
        if !freezes {
            return if self.disk_failed(op, offset, e).await {
                Fault::Detached
            } else {
                Fault::Stands
            };
        }
        let mut rx = self.disk_hold.subscribe();
        if *rx.borrow() == Hold::GiveUp {
            return Fault::Stands;
        }
        let disk = self.store.path().display().to_string();
        let first = self.disk_hold.send_if_modified(|h| {
            let was = *h == Hold::Off;
            *h = Hold::On;
            was
        });
        if first {
            let failure = DiskFailure {
                at: now_secs(),
                disk: disk.clone(),
                op: op.to_string(),
                offset,
                error: e.desc().to_string(),
                action: "frozen: I/O waits for `duet resume-io`".into(),
                size: self.size,
            };
            self.with_core(|c| c.disk_failure = Some(failure));
            self.event(format!(
                "I/O error on {disk}: {op} at {offset} failed ({e}); I/O frozen (on_io_error = \"freeze\"): every request waits until `duet resume-io`"
            ));
            self.notify();
        }
        let _ = rx.wait_for(|h| *h != Hold::On).await;
        if *rx.borrow() == Hold::GiveUp { Fault::Stands } else { Fault::Retry }
    }

    /// `duet resume-io`: requests held by a disk error are tried again (one that fails again
    /// freezes I/O again). `false`: nothing was held.
    pub fn resume_io(&self) -> bool {
        let held = self.disk_hold.send_if_modified(|h| {
            let was = *h == Hold::On;
            if was {
                *h = Hold::Off;
            }
            was
        });
        if held {
            self.with_core(|c| c.disk_failure = None);
            self.event("I/O resumed (`duet resume-io`): held requests are tried again".into());
            self.notify();
        }
        held
    }

    /// At shutdown: requests held by a disk error fail (answered, never acknowledged).
    pub fn give_up_held_io(&self) {
        self.disk_hold.send_replace(Hold::GiveUp);
    }

    /// Reads through the peer (a Diskless Primary), in pieces of at most [`PEER_READ_MAX`].
    pub(crate) async fn peer_read(&self, offset: u64, len: usize) -> Result<IoBuf, Errno> {
        let mut out = IoBuf::zeroed(len);
        let mut at = 0usize;
        while at < len {
            let n = (len - at).min(usize::try_from(PEER_READ_MAX).expect("small"));
            let piece = self.peer_read_piece(offset + at as u64, n).await?;
            out[at..at + n].copy_from_slice(&piece);
            at += n;
        }
        Ok(out)
    }

    async fn peer_read_piece(&self, offset: u64, len: usize) -> Result<IoBuf, Errno> {
        let peer = match self.with_core(|c| (c.r.read_from(), c.peer.clone())) {
            (ReadFrom::Peer(epoch), Some(p)) if p.epoch == epoch => p,
            _ => return Err(Errno::EIO),
        };
        let id = peer.next_read.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        peer.reads.lock().expect("reads poisoned").insert(id, tx);
        let l = u32::try_from(len).expect("pieces are bounded");
        let sent = peer.send(small_frame(Kind::PeerRead, 0, id, offset, &l.to_be_bytes())).await;
        let limit = self.cfg.as_ref().map_or(Duration::from_secs(30), |c| c.timeout * 4);
        let r = if sent { tokio::time::timeout(limit, rx).await.ok() } else { None };
        peer.reads.lock().expect("reads poisoned").remove(&id);
        match r {
            Some(Ok(r)) => r,
            // Not sent, timed out, or the session ended (its senders dropped).
            _ => Err(Errno::EIO),
        }
    }
}
