//! Exclusive use of a backing store or a metadata file: an `flock(2)` on the open file, held as
//! long as the file is open. A second daemon on the same disk, or `create-md` on a disk a daemon
//! serves, is refused with the holder named (from `/proc/locks`), instead of two writers
//! corrupting one disk.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The file is locked by another open file (another process, or another open in this one).
#[derive(Debug, thiserror::Error)]
#[error("{path} is in use by {holder}; stop it first (two writers on one disk corrupt it)")]
pub struct Busy {
    pub path: PathBuf,
    /// "pid 1234 (duet)", or "another process" when `/proc/locks` does not say.
    pub holder: String,
}

/// Takes the exclusive lock on `file` (opened from `path`), or says who holds it.
pub fn exclusive(file: &File, path: &Path) -> Result<(), Busy> {
    // SAFETY: flock on a descriptor this function borrows, valid for the call.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let holder = holder(file).unwrap_or_else(|| "another process".into());
    Err(Busy { path: path.to_owned(), holder })
}

/// The process holding an flock on `file`'s inode, from `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`; device numbers in hex).
fn holder(file: &File) -> Option<String> {
    let md = file.metadata().ok()?;
    let dev = md.dev();
    let want = format!("{:02x}:{:02x}:{}", libc::major(dev), libc::minor(dev), md.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Waiters are listed as "N: -> FLOCK ..."; holders have the kind second.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want).then(|| f[4].to_string())
    })?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    Some(format!("pid {pid} ({})", comm.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_and_the_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let a = File::open(&p).unwrap();
        exclusive(&a, &p).unwrap();
        let b = File::open(&p).unwrap();
        let e = exclusive(&b, &p).unwrap_err();
        let me = std::process::id().to_string();
        assert!(e.holder.contains(&me), "{e}");
        assert!(e.to_string().contains("is in use by pid"), "{e}");
        drop(a);
        exclusive(&b, &p).unwrap();
    }
}
