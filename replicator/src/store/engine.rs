//! The I/O-engine trait: the store hands an operation and a completion channel to an engine; the
//! engine performs it in full (short transfers are continued) and reports the outcome.

use nix::errno::Errno;
use std::fmt::Debug;
use std::sync::Arc;
use tokio::sync::oneshot;

use super::buf::IoBuf;

/// One operation on the backing store. Buffers travel with the op and come back in [`IoDone`].
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from `offset`.
    Read { offset: u64, buf: IoBuf },
    /// Write `buf` at `offset`; `fua`: durable (RWF_DSYNC) before completion. Shared: the same
    /// block may be on its way to the peer meanwhile.
    Write { offset: u64, buf: Arc<IoBuf>, fua: bool },
    /// fdatasync.
    Flush,
    /// fallocate(mode, offset, len).
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// Outcome of an [`IoOp`]: `Err(errno)` on failure; a read's buffer is returned either way.
#[derive(Debug)]
pub struct IoDone {
    /// `Ok` when the whole op succeeded, else the errno.
    pub result: Result<(), Errno>,
    /// The read's buffer, handed back.
    pub buf: Option<IoBuf>,
}

/// An engine executes ops against one file descriptor.
pub trait IoEngine: Send + Sync + Debug {
    /// Short name for status output ("uring", "threads").
    fn name(&self) -> &'static str;
    /// Starts `op`; `done` receives the outcome. Never blocks on the I/O itself.
    fn submit(&self, op: IoOp, done: oneshot::Sender<IoDone>);
    /// While plugged, an engine may hold submissions back to hand them to the kernel together
    /// at [`IoEngine::unplug`]. Every plug is matched by an unplug (see `Store::plug`).
    fn plug(&self) {}
    /// Ends a plug; submits what was held back once no plug remains.
    fn unplug(&self) {}
}

/// Which engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring when the kernel allows it, else threads.
    Auto,
    /// io_uring or fail.
    Uring,
    /// The portable pread/pwrite thread pool.
    Threads,
}
