//! The last consistent state of a standby with `sync = "scheduled"`: kept before each resync
//! it is the target of, and copied back if the Primary is lost before the resync finished, so
//! a failover never promotes half-synced data.
//!
//! The state is a reflink copy (`FICLONE`) of the whole disk file, next to it on the same XFS
//! or btrfs filesystem, plus a small record of its generations and times (`<copy>.json`, the
//! commit point: a copy without its record is not one). With internal metadata the copy's
//! metadata is rewritten to say "Inconsistent, every block out of sync" before the record is
//! written, so a restore that stops halfway (a crash mid-copy) leaves a disk that is unusable
//! and resyncs in full, never one that looks consistent; the restore ends by writing the kept
//! generations and a Consistent superblock from memory. A disk that is not a regular file keeps
//! its state through `hooks.before_resync_target` (an LVM snapshot, say) and the operator
//! restores that.

use super::*;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::generation::Generations;

/// What `sync = "scheduled"` needs of a volume.
#[derive(Debug, Clone)]
pub struct Scheduled {
    /// Where the disk's last consistent state is kept (a reflink copy next to the disk file);
    /// `None` when the disk is not a regular file (the before_resync_target hook keeps it).
    pub copy: Option<PathBuf>,
    /// Where the time of the last consistent point is recorded (in `state_dir`).
    pub consistent_file: PathBuf,
}

/// The record of a kept state (`<copy>.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Kept {
    /// When the copy was taken (seconds since the Unix epoch).
    pub taken_at: f64,
    /// When the data it holds was last in sync with the peer, if known.
    pub consistent_at: Option<f64>,
    /// Its generations.
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
    /// The disk file's size.
    pub size: u64,
}

/// `<copy>.json`.
pub fn record_path(copy: &Path) -> PathBuf {
    let mut s = copy.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// `<path>.tmp`.
fn tmp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Replaces `dst`'s contents with `src`'s, sharing the blocks (`FICLONE`): nothing is copied,
/// and both must be on one filesystem that supports reflinks (XFS with `reflink=1`, btrfs).
pub fn reflink(dst: &File, src: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open
    // for the duration of the call, and the kernel reads nothing else from our memory.
    let r = unsafe { nix::libc::ioctl(dst.as_raw_fd(), nix::libc::FICLONE, src.as_raw_fd()) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether files in `dir` can be reflinked: a clone of a one-block file there, removed after.
pub fn probe(dir: &Path) -> std::io::Result<()> {
    let a = tempfile::Builder::new().prefix(".duet-reflink-probe").tempfile_in(dir)?;
    a.as_file().write_all_at(&[1u8; 4096], 0)?;
    let b = tempfile::Builder::new().prefix(".duet-reflink-probe").tempfile_in(dir)?;
    reflink(b.as_file(), a.as_file())
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Reads the record of the kept state; `None` when there is none (or it is unreadable: then
/// there is nothing to restore, and the next resync keeps a new one).
pub fn read_kept(copy: &Path) -> Option<Kept> {
    let text = std::fs::read(record_path(copy)).ok()?;
    let k: Kept = serde_json::from_slice(&text).ok()?;
    copy.is_file().then_some(k)
}

/// Removes a kept state: the record first (after that the copy is no state at all).
fn discard(copy: &Path) -> std::io::Result<()> {
    for p in [record_path(copy), copy.to_owned(), tmp_path(copy), tmp_path(&record_path(copy))] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    sync_dir(copy)
}

/// Writes `bytes` to `path` atomically (a temporary file, fsynced, renamed, directory fsynced).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn os(e: std::io::Error) -> String {
    e.to_string()
}

impl Volume {
    /// The scheduled-sync settings, when this resource has them.
    pub fn scheduled(&self) -> Option<&Scheduled> {
        self.cfg.as_ref().and_then(|c| c.scheduled.as_ref())
    }

    /// Keeps the disk's state before a resync makes it the target (called in the handshake,
    /// before the bitmaps are exchanged: nothing of the peer's has reached it yet). Only where
    /// the data is consistent: an interrupted resync keeps the state kept before it began.
    pub(crate) async fn keep_consistent_state(&self) -> Result<Option<Kept>, String> {
        let Some(sched) = self.scheduled() else { return Ok(None) };
        let (disk, uuids, seq) = self.with_core(|c| (c.r.st.disk, c.r.sb.uuids, c.r.sb.sequence));
        if disk < DiskState::Outdated {
            // Half-synced already (a catch-up resumed): what was kept before it still holds.
            return Ok(self.with_core(|c| c.kept.clone()));
        }
        let Some(copy) = sched.copy.clone() else {
            // Not a file on a filesystem with reflinks: the operator's hook keeps the state, here
            // for the same reason (nothing of the peer's has reached the disk yet).
            if let Some(hook) = self.before_resync_target() {
                (hook.0)()
                    .await
                    .map_err(|why| format!("before_resync_target hook failed: {why}"))?;
                self.event("before_resync_target hook kept the last consistent state".into());
            }
            return Ok(None);
        };
        self.store.flush().await.map_err(|e| format!("flush before the copy: {e}"))?;
        let consistent_at = self.last_consistent();
        let store = Arc::clone(&self.store);
        let internal = self.meta.as_ref().filter(|m| m.path() == store.path());
        let g = self.with_core(|c| c.r.bitmap.granularity());
        let size = self.size;
        let take = || -> Result<Kept, String> {
            discard(&copy).map_err(|e| format!("removing the previous copy: {e}"))?;
            let tmp = tmp_path(&copy);
            let src = File::open(store.path()).map_err(os)?;
            let dst = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(os)?;
            reflink(&dst, &src).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("FICLONE {} → {}: {e}", store.path().display(), tmp.display())
            })?;
            drop(dst);
            if let Some(meta) = internal {
                // The copy's own metadata: unusable until a restore finishes (see above).
                let m = meta.in_copy(&tmp).map_err(|e| e.to_string())?;
                let sb =
                    Superblock { sequence: seq, flags: 0, uuids, ..self.with_core(|c| c.r.sb) };
                m.write_sb(&sb).map_err(|e| e.to_string())?;
                let mut bm = Bitmap::new(size, g);
                bm.set_all();
                bm.mark_all_dirty();
                let pages: Vec<_> = bm.take_dirty().into_iter().map(|i| (i, bm.page(i))).collect();
                m.write_bitmap(&pages).map_err(|e| e.to_string())?;
            }
            File::open(&tmp).and_then(|f| f.sync_all()).map_err(os)?;
            std::fs::rename(&tmp, &copy).map_err(os)?;
            let kept = Kept {
                taken_at: now_s(),
                consistent_at,
                current: uuids.current,
                bitmap: uuids.bitmap,
                history: uuids.history,
                size: store.size(),
            };
            let json = serde_json::to_vec_pretty(&kept).map_err(|e| e.to_string())?;
            write_atomic(&record_path(&copy), &json).map_err(os)?;
            Ok(kept)
        };
        self.with_core(|c| c.kept = None);
        let kept = tokio::task::block_in_place(take)?;
        self.with_core(|c| c.kept = Some(kept.clone()));
        self.event(format!(
            "kept the last consistent state before the resync: {} (reflink copy of {})",
            copy.display(),
            self.store.path().display()
        ));
        Ok(Some(kept))
    }

    /// At start: the state kept before a resync that did not finish. A copy beside data that is
    /// consistent (the resync finished, and the daemon stopped before removing it) is none.
    pub(super) fn load_kept_state(&self) {
        // The consistent point recorded before this start (read once; kept in memory after).
        let recorded = self.scheduled().and_then(|s| {
            std::fs::read_to_string(&s.consistent_file).ok()?.trim().parse::<f64>().ok()
        });
        self.with_core(|c| c.in_sync_at = c.in_sync_at.or(recorded));
        let Some(copy) = self.scheduled().and_then(|s| s.copy.clone()) else { return };
        let kept = read_kept(&copy).filter(|k| k.size == self.store.size());
        let half_synced = self.with_core(|c| c.r.st.disk == DiskState::Inconsistent);
        match kept {
            Some(k) if half_synced => {
                self.event(format!(
                    "a consistent state is kept from before the unfinished resync ({}): a promotion restores it unless the resync finishes first",
                    copy.display()
                ));
                self.with_core(|c| c.kept = Some(k));
            }
            Some(_) | None => {
                if let Err(e) = discard(&copy) {
                    tracing::warn!(error = %e, "could not remove a stale kept state");
                }
            }
        }
    }

    /// A kept state that a promotion would restore: this node is a Secondary without a session
    /// whose data is half-synced, and a copy was kept before that resync.
    pub fn restorable(&self) -> Option<Kept> {
        self.with_core(|c| c.kept.clone().filter(|_| Self::restorable_now(c)))
    }

    /// Whether a promotion now would restore a kept state (cheap: the cluster manager asks).
    pub(super) fn restorable_now(c: &Core) -> bool {
        c.kept.is_some()
            && c.r.st.role == Role::Secondary
            && c.r.st.disk == DiskState::Inconsistent
            && !c.r.st.conn.live()
    }

    /// Copies the kept state back over the half-synced data (see the module's order).
    pub(crate) async fn restore_consistent_state(&self, kept: &Kept) -> Result<(), Refused> {
        let Some(copy) = self.scheduled().and_then(|s| s.copy.clone()) else {
            return refuse("no kept state");
        };
        // 1. Every block out of sync on disk before the data changes (it is Inconsistent).
        self.with_core(|c| {
            c.r.bitmap.set_all();
            c.r.bitmap.mark_all_dirty();
        });
        self.persist_bitmap()
            .await
            .map_err(|e| Refused(format!("cannot write the bitmap ({e}); nothing restored")))?;
        // 2. The data (and, internal, the copy's unusable metadata).
        let path = self.store.path().to_owned();
        let copy_back = || -> std::io::Result<()> {
            let src = File::open(&copy)?;
            let dst = OpenOptions::new().write(true).open(&path)?;
            reflink(&dst, &src)?;
            dst.sync_all()
        };
        tokio::task::block_in_place(copy_back).map_err(|e| {
            Refused(format!(
                "cannot copy the kept state {} back over {}: {e}; the disk stays Inconsistent",
                copy.display(),
                path.display()
            ))
        })?;
        // 3. Its generations and a Consistent superblock.
        let uuids =
            Generations { current: kept.current, bitmap: kept.bitmap, history: kept.history };
        let p = self.with_core(|c| c.r.restored(uuids))?;
        self.persist(p)
            .await
            .map_err(|e| Refused(format!("cannot write the metadata ({e}) after the restore")))?;
        let when = kept.consistent_at.unwrap_or(kept.taken_at);
        self.event(format!(
            "restored the last consistent state (in sync with the peer {:.0} s ago) from {}: Consistent, every block out of sync with the peer",
            (now_s() - when).max(0.0),
            copy.display()
        ));
        self.with_core(|c| c.kept = None);
        if let Err(e) = tokio::task::block_in_place(|| discard(&copy)) {
            tracing::warn!(error = %e, "could not remove the restored copy");
        }
        self.notify();
        Ok(())
    }

    /// The copy kept before a resync that finished (or of data that is consistent again) is no
    /// state to restore: removed.
    pub(crate) fn drop_kept_state(&self) {
        let Some(copy) = self.scheduled().and_then(|s| s.copy.clone()) else { return };
        self.with_core(|c| c.kept = None);
        if record_path(&copy).exists() || copy.exists() {
            match tokio::task::block_in_place(|| discard(&copy)) {
                Ok(()) => self.event(format!("removed the kept state {}: in sync", copy.display())),
                Err(e) => tracing::warn!(error = %e, "could not remove the kept state"),
            }
        }
    }

    /// The scheduler's next catch-up (for `duet status`).
    pub fn set_next_run(&self, at: Option<f64>) {
        self.with_core(|c| c.next_run = at);
    }

    /// When this node was last in sync with its peer (now, while it is), if known.
    pub fn last_consistent(&self) -> Option<f64> {
        let (synced, at) = self.with_core(|c| {
            (
                c.r.st.conn == ConnState::Connected
                    && c.r.st.peer_disk == Some(DiskState::UpToDate)
                    && c.r.st.disk == DiskState::UpToDate
                    && c.r.bitmap.weight() == 0,
                c.in_sync_at,
            )
        });
        if synced {
            return Some(now_s());
        }
        at
    }

    /// Records that this node is in sync with its peer now (and, scheduled, on disk: status
    /// shows it after a restart).
    pub(crate) fn mark_in_sync(&self) {
        let now = now_s();
        self.with_core(|c| c.in_sync_at = Some(now));
        if let Some(s) = self.scheduled() {
            let f = s.consistent_file.clone();
            if let Err(e) =
                tokio::task::block_in_place(|| write_atomic(&f, format!("{now}\n").as_bytes()))
            {
                tracing::warn!(error = %e, path = %f.display(), "could not record the consistent point");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_without_its_record_is_no_state() {
        let d = tempfile::tempdir().expect("tempdir");
        let copy = d.path().join("vol.img.consistent");
        std::fs::write(&copy, b"data").expect("write");
        assert_eq!(read_kept(&copy), None);
        let k = Kept {
            taken_at: 1.0,
            consistent_at: Some(0.5),
            current: 3,
            bitmap: 0,
            history: [1, 0],
            size: 4,
        };
        write_atomic(&record_path(&copy), &serde_json::to_vec(&k).expect("json")).expect("record");
        assert_eq!(read_kept(&copy), Some(k));
        std::fs::write(record_path(&copy), b"{garbage").expect("write");
        assert_eq!(read_kept(&copy), None, "an unreadable record is none");
        discard(&copy).expect("discard");
        assert!(!copy.exists() && !record_path(&copy).exists());
        discard(&copy).expect("discarding nothing is fine");
    }
}
