//! The local backing store: a regular file or a block device, opened once, driven through an
//! [`IoEngine`] (io_uring or a thread pool). NBD semantics live here: FLUSH is fdatasync, TRIM
//! punches a hole, WRITE_ZEROES zeroes a range (falling back to writing zeros), and allocation is
//! reported from SEEK_DATA/SEEK_HOLE.

mod buf;
mod engine;
pub mod lock;
mod threads;
mod uring;

use nix::errno::Errno;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use buf::{ALIGN, IoBuf};
pub use engine::{EngineKind, IoDone, IoEngine, IoOp};
pub use threads::ThreadsEngine;
pub use uring::UringEngine;

/// Allocation bits of an [`Extent`], with NBD's `base:allocation` values: a hole (no storage
/// behind it) ...
pub const STATE_HOLE: u32 = 1 << 0;
/// ... reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Allocation of a range: `len` bytes with `flags` ([`STATE_HOLE`], [`STATE_ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0).
    pub len: u32,
    /// `STATE_HOLE` / `STATE_ZERO` bits.
    pub flags: u32,
}

/// Threads in the portable engine's pool.
pub const THREADS: usize = 16;
/// Chunk size of the write-zeros fallback.
const ZERO_CHUNK: u64 = 1 << 20;
/// Buffered writes up to this size are done in the calling thread (see [`Store::writes_inline`]).
pub const INLINE_MAX: usize = 1 << 20;
/// An inline write slower than this means the page cache is not taking writes at memory speed
/// (a slow disk behind it, or the kernel throttling dirtiers hard)... Not lower: a busy machine
/// preempts a 1 MiB copy for 10-30 ms now and then, and the engine is slower for streams.
pub const SLOW_INLINE: Duration = Duration::from_millis(50);
/// ...and writes go through the engine for this long, so the calling thread (which also serves
/// the peer link's pings and every other export of the node) is not held in the kernel.
pub const INLINE_BACKOFF: Duration = Duration::from_secs(1);

/// Errors opening a store. Each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing path could not be opened.
    #[error("cannot open backing store {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    /// The backing path is neither a regular file nor a block device.
    #[error("backing store {path} is neither a regular file nor a block device")]
    NotFileOrDevice { path: PathBuf },
    /// The backing store has size zero.
    #[error("backing store {path} is empty; create it with a size first (truncate -s 1G {path})")]
    Empty { path: PathBuf },
    /// O_DIRECT was requested but the store's size is not a multiple of 4096.
    #[error("backing store {path} is {size} bytes, not a multiple of 4096, which direct_io needs")]
    Unaligned { path: PathBuf, size: u64 },
    /// The engine could not start.
    #[error("cannot start the {engine} I/O engine: {source}")]
    Engine { engine: &'static str, source: std::io::Error },
    /// Another process (or another open) holds the store.
    #[error(transparent)]
    Busy(#[from] lock::Busy),
}

/// How to open a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Engine choice.
    pub engine: EngineKind,
    /// Open with O_DIRECT (requests must then be 4096-aligned).
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// An open backing store.
#[derive(Debug)]
pub struct Store {
    file: Arc<File>,
    engine: Box<dyn IoEngine>,
    size: u64,
    path: PathBuf,
    direct: bool,
    block_device: bool,
    inline: InlineGate,
    /// Writes handed to the engine and not finished.
    engine_writes: AtomicU64,
}

/// Counts a write in flight in the engine while it lives.
struct Queued<'a>(&'a AtomicU64);

impl<'a> Queued<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Relaxed);
        Self(n)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Whether buffered writes may be done in the calling thread: closed for [`INLINE_BACKOFF`]
/// after an inline write took longer than [`SLOW_INLINE`]. Time is passed in.
#[derive(Debug)]
pub struct InlineGate {
    born: Instant,
    /// Microseconds after `born` until which writes go through the engine.
    closed_until: AtomicU64,
    /// How often it closed.
    closings: AtomicU64,
}

impl InlineGate {
    pub fn new(born: Instant) -> Self {
        Self { born, closed_until: AtomicU64::new(0), closings: AtomicU64::new(0) }
    }

    fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.born).as_micros()).unwrap_or(u64::MAX)
    }

    /// May a write started at `now` be done inline?
    pub fn open_at(&self, now: Instant) -> bool {
        self.micros(now) >= self.closed_until.load(Relaxed)
    }

    /// An inline write that started at `start` took `took`; `true` when that closed the gate.
    pub fn record(&self, start: Instant, took: Duration) -> bool {
        let slow = took > SLOW_INLINE;
        if slow {
            self.closed_until.store(self.micros(start + took + INLINE_BACKOFF), Relaxed);
            self.closings.fetch_add(1, Relaxed);
        }
        slow
    }

    /// How often a slow inline write closed the gate.
    pub fn closings(&self) -> u64 {
        self.closings.load(Relaxed)
    }
}

/// The errno of an I/O error (EIO when it has none).
pub(crate) fn errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

impl Store {
    /// Opens `path` and starts the engine.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_owned(), source };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            return Err(StoreError::NotFileOrDevice { path: path.to_owned() });
        }
        // A writer holds the disk for as long as it is open.
        if !opts.read_only {
            lock::exclusive(&file, path)?;
        }
        // SEEK_END gives the size of regular files and block devices alike.
        // SAFETY: plain syscall on a valid fd.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        let size = u64::try_from(end).map_err(|_| open_err(std::io::Error::last_os_error()))?;
        if size == 0 {
            return Err(StoreError::Empty { path: path.to_owned() });
        }
        if opts.direct && size % ALIGN as u64 != 0 {
            return Err(StoreError::Unaligned { path: path.to_owned(), size });
        }
        let file = Arc::new(file);
        let engine = Self::start_engine(&file, opts.engine, opts.direct)?;
        Ok(Self {
            file,
            engine,
            size,
            path: path.to_owned(),
            direct: opts.direct,
            block_device,
            inline: InlineGate::new(Instant::now()),
            engine_writes: AtomicU64::new(0),
        })
    }

    fn start_engine(
        file: &Arc<File>,
        kind: EngineKind,
        direct: bool,
    ) -> Result<Box<dyn IoEngine>, StoreError> {
        let threads = || -> Result<Box<dyn IoEngine>, StoreError> {
            ThreadsEngine::new(Arc::clone(file), THREADS)
                .map(|e| Box::new(e) as Box<dyn IoEngine>)
                .map_err(|source| StoreError::Engine { engine: "threads", source })
        };
        match kind {
            EngineKind::Threads => threads(),
            EngineKind::Uring => UringEngine::new(Arc::clone(file), direct)
                .map(|e| Box::new(e) as Box<dyn IoEngine>)
                .map_err(|source| StoreError::Engine { engine: "uring", source }),
            EngineKind::Auto => match UringEngine::new(Arc::clone(file), direct) {
                Ok(e) => Ok(Box::new(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using the thread-pool engine");
                    threads()
                }
            },
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Name of the engine in use.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }
    /// Opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }
    /// Is a block device (not a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
    /// Smallest I/O unit clients must respect.
    pub fn min_block(&self) -> u32 {
        if self.direct { 4096 } else { 1 }
    }

    async fn run(&self, op: IoOp) -> IoDone {
        let (tx, rx) = oneshot::channel();
        self.engine.submit(op, tx);
        rx.await.unwrap_or(IoDone { result: Err(Errno::ESHUTDOWN), buf: None })
    }

    /// Holds submissions back until the guard drops, so a batch of requests costs one syscall.
    pub fn plug(&self) -> PlugGuard<'_> {
        self.engine.plug();
        PlugGuard { engine: self.engine.as_ref() }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, Errno> {
        let d = self.run(IoOp::Read { offset, buf: IoBuf::with_len(len) }).await;
        d.result.map(|()| d.buf.expect("a read returns its buffer"))
    }

    /// Writes `buf` at `offset`; with `fua` it is durable on return.
    pub async fn write(
        &self,
        offset: u64,
        buf: impl Into<Arc<IoBuf>>,
        fua: bool,
    ) -> Result<(), Errno> {
        let buf = buf.into();
        if self.writes_inline(buf.len(), fua) {
            return self.write_now(offset, &buf);
        }
        let _queued = Queued::new(&self.engine_writes);
        self.run(IoOp::Write { offset, buf, fua }).await.result
    }

    /// Whether a write of `len` bytes is done by [`Store::write_now`] in the calling thread.
    /// A buffered write without FUA is a copy into the page cache: a few microseconds, less than
    /// handing it to another thread and being woken again (which was two thirds of the cost of a
    /// 4 KiB write). O_DIRECT and FUA writes wait for the device and go through the engine, and
    /// so does every write for a while after an inline one was slow (see [`InlineGate`]), and while
    /// the engine has writes of this store in flight: an inline write would wait behind them (for the
    /// file's lock, on a slow disk for seconds) and hold the thread meanwhile.
    pub fn writes_inline(&self, len: usize, fua: bool) -> bool {
        !self.direct
            && !fua
            && len <= INLINE_MAX
            && self.engine_writes.load(Relaxed) == 0
            // No clock read until a slow write ever closed the gate.
            && (self.inline.closings() == 0 || self.inline.open_at(Instant::now()))
    }

    /// A buffered write, done now in this thread (see [`Store::writes_inline`]).
    pub fn write_now(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let start = Instant::now();
        let r = threads::pwrite_all(self.file.as_raw_fd(), data, offset, 0);
        let took = start.elapsed();
        if self.inline.record(start, took) {
            tracing::debug!(path = %self.path.display(), ?took, "slow page-cache write: writes go through the engine for a while");
        }
        r
    }

    /// How often a slow page-cache write sent writes through the engine for a while.
    pub fn slow_inline_writes(&self) -> u64 {
        self.inline.closings()
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), Errno> {
        self.run(IoOp::Flush).await.result
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        self.run(IoOp::Fallocate { offset, len, mode }).await.result
    }

    /// Discards a range. Unsupported discards are not errors (TRIM is advisory).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Errno> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(offset, len, mode).await {
            Ok(()) => {}
            Err(Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::EINVAL) => return Ok(()),
            Err(e) => return Err(e),
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Zeroes a range: punch a hole when `may_trim`, else zero-range; if the kernel cannot,
    /// write zeros — unless `fast_only`, which then fails with EOPNOTSUPP having done nothing.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
        fast_only: bool,
    ) -> Result<(), Errno> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let mut modes = vec![libc::FALLOC_FL_ZERO_RANGE | keep];
        if may_trim {
            modes.insert(0, libc::FALLOC_FL_PUNCH_HOLE | keep);
        }
        let mut done = false;
        for mode in modes {
            match self.fallocate(offset, len, mode).await {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        if !done {
            if fast_only {
                return Err(Errno::EOPNOTSUPP);
            }
            let mut at = offset;
            while at < offset + len {
                let n = ZERO_CHUNK.min(offset + len - at);
                let buf = IoBuf::zeroed(usize::try_from(n).expect("chunk is 1 MiB"));
                self.write(at, buf, false).await?;
                at += n;
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Hints the kernel to read a range ahead.
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), Errno> {
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Errno::EINVAL);
        };
        // SAFETY: plain syscall on a valid fd; it only schedules readahead.
        let rc =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), o, l, libc::POSIX_FADV_WILLNEED) };
        if rc == 0 { Ok(()) } else { Err(Errno::from_raw(rc)) }
    }

    /// Allocation of `[offset, offset+len)` as `base:allocation` extents, at most `max` of them
    /// (they may cover less than the range; never more).
    pub async fn block_status(
        &self,
        offset: u64,
        len: u32,
        max: usize,
    ) -> Result<Vec<Extent>, Errno> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || allocation(&file, offset, len, max))
            .await
            .map_err(|_| Errno::EIO)?
    }

    /// fdatasync outside the engine (used at shutdown).
    pub fn sync_now(&self) -> Result<(), Errno> {
        self.file.sync_data().map_err(|e| errno(&e))
    }
}

/// Ends a plug when dropped.
#[derive(Debug)]
pub struct PlugGuard<'a> {
    engine: &'a dyn IoEngine,
}

impl Drop for PlugGuard<'_> {
    fn drop(&mut self) {
        self.engine.unplug();
    }
}

fn seek(fd: i32, offset: u64, whence: i32) -> Result<Option<u64>, Errno> {
    let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r >= 0 {
        return Ok(Some(r.unsigned_abs()));
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => Ok(None), // no data (or no hole) after offset
        Some(e) => Err(Errno::from_raw(e)),
        None => Err(Errno::EIO),
    }
}

/// SEEK_DATA/SEEK_HOLE walk. Filesystems without support report everything as data.
fn allocation(file: &File, offset: u64, len: u32, max: usize) -> Result<Vec<Extent>, Errno> {
    let fd = file.as_raw_fd();
    let end = offset + u64::from(len);
    let mut out = Vec::new();
    let mut at = offset;
    while at < end && out.len() < max.max(1) {
        let data = match seek(fd, at, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                return Ok(vec![Extent {
                    len: u32::try_from(end - at).expect("≤ len"), flags: 0
                }]);
            }
            Err(e) => return Err(e),
        };
        let (next, flags) = match data {
            Some(d) if d <= at => {
                let hole = seek(fd, at, libc::SEEK_HOLE)?.unwrap_or(end);
                (hole, 0)
            }
            Some(d) => (d, STATE_HOLE | STATE_ZERO),
            None => (end, STATE_HOLE | STATE_ZERO),
        };
        let next = next.clamp(at + 1, end);
        out.push(Extent { len: u32::try_from(next - at).expect("≤ len"), flags });
        at = next;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
