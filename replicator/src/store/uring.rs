//! The io_uring engine. Submitters push their op and call `io_uring_enter` themselves, under a
//! mutex, and reap whatever completed: io_uring performs a page-cache read inside that very
//! syscall, so such an op completes with no thread switch at all. Ops that went asynchronous
//! (buffered writes that io_uring hands to its io-wq workers, O_DIRECT I/O) complete later; the
//! kernel then signals a registered eventfd, which a tokio task watches (`AsyncFd`) and reaps.
//! While a submitter is inside the ring it reaps for itself, so eventfd notifications are turned
//! off (`IORING_CQ_EVENTFD_DISABLED`) for that window, and the ring is reaped once more after they
//! are turned back on. (`IORING_REGISTER_EVENTFD_ASYNC` is not enough: it only signals
//! completions posted by io-wq workers, not O_DIRECT completions run as task work, and those would
//! never be reaped.) Short transfers are continued; at most [`DEPTH`] ops are in the kernel, the
//! rest wait in a backlog.
//!
//! (The first version owned the ring in a dedicated thread fed through a channel and an eventfd;
//! the extra wake-up per batch cost a third of the 4 KiB write rate. See the benchmark notes.)

use nix::errno::Errno;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::engine::{IoDone, IoEngine, IoOp};
use super::threads::ThreadsEngine;

/// Threads that take buffered writes when several are in flight.
const WRITE_POOL: usize = 8;

/// Ops in flight in the kernel at most; the completion queue is twice as large.
const DEPTH: u32 = 256;

/// An op in flight: what it is, how much is done, who waits for it.
struct Slot {
    op: IoOp,
    done: oneshot::Sender<IoDone>,
    progress: usize,
}

/// Completed ops, delivered after the ring lock is released.
type Finished = Vec<(oneshot::Sender<IoDone>, IoDone)>;

struct Ring {
    ring: IoUring,
    /// Plugs held (by any thread); while > 0, submissions wait for the last unplug.
    plugs: u32,
    fd: i32,
    /// Opened with O_DIRECT.
    direct: bool,
    /// Buffered writes in the ring now.
    buffered_writes: u32,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    backlog: VecDeque<Slot>,
    in_flight: u32,
}

struct Inner {
    ring: Mutex<Ring>,
    /// Keeps the file (and so `Ring::fd`) open while ops may reference it.
    _file: Arc<File>,
}

/// The io_uring engine.
pub struct UringEngine {
    inner: Arc<Inner>,
    /// Takes buffered writes that would queue behind others (see `submit`).
    pool: Option<ThreadsEngine>,
    reaper: tokio::task::AbortHandle,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringEngine")
    }
}

impl UringEngine {
    /// Creates a ring for `file`. Fails when the kernel refuses io_uring (disabled by sysctl or
    /// seccomp), lacks an opcode we need, or when called outside a tokio runtime.
    pub fn new(file: Arc<File>, direct: bool) -> std::io::Result<Self> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| std::io::Error::other("the io_uring engine needs a tokio runtime"))?;
        let ring: IoUring = IoUring::builder().setup_cqsize(DEPTH * 2).build(DEPTH)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(std::io::Error::other(format!("io_uring lacks {name}")));
            }
        }
        // SAFETY: eventfd returns a new descriptor we own, or -1 (checked).
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh, valid descriptor owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let fd = file.as_raw_fd();
        let pool =
            if direct { None } else { Some(ThreadsEngine::new(Arc::clone(&file), WRITE_POOL)?) };
        let inner = Arc::new(Inner {
            ring: Mutex::new(Ring {
                ring,
                plugs: 0,
                fd,
                direct,
                buffered_writes: 0,
                slots: Vec::new(),
                free: Vec::new(),
                backlog: VecDeque::new(),
                in_flight: 0,
            }),
            _file: file,
        });
        let afd = {
            let _guard = handle.enter();
            // SAFETY: `efd` is an OwnedFd moved into the AsyncFd: it stays open and refers to
            // the same eventfd for the AsyncFd's whole life.
            unsafe { AsyncFd::register(efd) }.map_err(|e| std::io::Error::other(e.to_string()))?
        };
        let reaper = handle.spawn(reap_async(afd, Arc::clone(&inner))).abort_handle();
        Ok(Self { inner, pool, reaper })
    }
}

/// Waits for the kernel's "asynchronous completion" signal and reaps.
async fn reap_async(afd: AsyncFd<OwnedFd>, inner: Arc<Inner>) {
    loop {
        let Ok(mut guard) = afd.readable().await else { return };
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        let n = unsafe { libc::read(afd.get_ref().as_raw_fd(), (&raw mut count).cast(), 8) };
        if n < 0 {
            guard.clear_ready();
        }
        inner.pump_and_deliver(None);
    }
}

impl Inner {
    /// Queues `op` (if any), submits what fits, reaps what completed, and delivers the results
    /// outside the lock.
    fn pump_and_deliver(&self, op: Option<Slot>) {
        let mut finished = Finished::new();
        {
            let mut r = self.ring.lock().expect("io_uring state lock poisoned");
            if let Some(op) = op {
                r.backlog.push_back(op);
            }
            r.pump(&mut finished);
        }
        for (done, d) in finished {
            let _ = done.send(d);
        }
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn submit(&self, op: IoOp, done: oneshot::Sender<IoDone>) {
        let buffered_write = matches!(op, IoOp::Write { .. }) && self.pool.is_some();
        let slot = Slot { op, done, progress: 0 };
        {
            let mut r = self.inner.ring.lock().expect("io_uring state lock poisoned");
            // io_uring hands buffered writes to its io-wq workers and runs those to one file one
            // at a time. A lone write goes that way (the quickest wake-up); a write that would
            // queue behind others goes to our pool, which runs them side by side. Measured in the
            // benchmark notes; FLUSH (fdatasync) covers completed writes from either path.
            if buffered_write && r.buffered_writes > 0 {
                drop(r);
                if let Some(pool) = &self.pool {
                    pool.submit(slot.op, slot.done);
                }
                return;
            }
            if buffered_write {
                r.buffered_writes += 1; // until its completion is reaped
            }
            if r.plugs > 0 {
                r.backlog.push_back(slot);
                return;
            }
        }
        self.inner.pump_and_deliver(Some(slot));
    }

    fn plug(&self) {
        self.inner.ring.lock().expect("io_uring state lock poisoned").plugs += 1;
    }

    fn unplug(&self) {
        let last = {
            let mut r = self.inner.ring.lock().expect("io_uring state lock poisoned");
            r.plugs -= 1;
            r.plugs == 0 && !r.backlog.is_empty()
        };
        if last {
            self.inner.pump_and_deliver(None);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.reaper.abort();
        // Buffers of ops still in the kernel must outlive them: wait for every completion.
        let mut r = self.inner.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut finished = Finished::new();
        while r.in_flight > 0 || !r.backlog.is_empty() {
            r.pump(&mut finished);
            if r.in_flight > 0 {
                let _ = r.ring.submit_and_wait(1);
            }
        }
        drop(r);
        for (done, d) in finished {
            let _ = done.send(d);
        }
    }
}

impl Ring {
    fn pump(&mut self, finished: &mut Finished) {
        loop {
            self.ring.completion().disable_eventfd();
            loop {
                while self.in_flight < DEPTH {
                    let Some(slot) = self.backlog.pop_front() else { break };
                    self.push(slot, finished);
                }
                self.submit(finished);
                let requeued = self.reap(finished);
                if !requeued || self.in_flight >= DEPTH {
                    break;
                }
            }
            self.ring.completion().enable_eventfd();
            // Completions posted while notifications were off signalled nobody: take them now.
            let requeued = self.reap(finished);
            if !requeued || self.in_flight >= DEPTH {
                return;
            }
        }
    }

    fn submit(&mut self, finished: &mut Finished) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Completion queue full: make room, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap(finished);
                }
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
        }
    }

    fn push(&mut self, mut slot: Slot, finished: &mut Finished) {
        let fd = types::Fd(self.fd);
        let p = slot.progress;
        let entry = match &mut slot.op {
            IoOp::Read { offset, buf } => {
                let len = u32::try_from(buf.len() - p).expect("io sizes are bounded by u32");
                // SAFETY: p < buf.len(); the pointer stays inside the buffer.
                let ptr = unsafe { buf.as_mut_ptr().add(p) };
                opcode::Read::new(fd, ptr, len).offset(*offset + p as u64).build()
            }
            IoOp::Write { offset, buf, fua } => {
                let len = u32::try_from(buf.len() - p).expect("io sizes are bounded by u32");
                // SAFETY: as above.
                let ptr = unsafe { buf.as_ptr().add(p) };
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                let e = opcode::Write::new(fd, ptr, len).offset(*offset + p as u64).rw_flags(flags);
                if self.direct {
                    e.build()
                } else {
                    // Buffered writes on ext4 (and most filesystems) cannot be done without
                    // blocking, so io_uring tries, fails and punts them to io-wq: go there at once.
                    e.build().flags(squeue::Flags::ASYNC)
                }
            }
            IoOp::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            IoOp::Fallocate { offset, len, mode } => {
                opcode::Fallocate::new(fd, *len).offset(*offset).mode(*mode).build()
            }
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Some(slot);
        self.in_flight += 1;
        self.push_entry(&entry.user_data(idx as u64), finished);
    }

    fn push_entry(&mut self, e: &squeue::Entry, finished: &mut Finished) {
        loop {
            // SAFETY: every buffer an entry references lives in a Slot that is kept until its
            // completion is reaped (and Drop waits for all completions).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            // Submission queue full: hand what we have to the kernel and try again.
            self.submit(finished);
        }
    }

    /// Reaps completions; returns whether a short transfer was put back in the backlog.
    fn reap(&mut self, finished: &mut Finished) -> bool {
        let mut requeued = false;
        let done: Vec<(u64, i32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            let idx = usize::try_from(ud).expect("user_data is a slot index");
            let mut slot = self.slots[idx].take().expect("completion for an empty slot");
            self.free.push(idx);
            self.in_flight -= 1;
            let result = if res < 0 {
                Err(Errno::from_raw(-res))
            } else {
                let n = res.unsigned_abs() as usize;
                let len = match &slot.op {
                    IoOp::Read { buf, .. } => Some(buf.len()),
                    IoOp::Write { buf, .. } => Some(buf.len()),
                    IoOp::Flush | IoOp::Fallocate { .. } => None,
                };
                match len {
                    Some(len) => {
                        if n == 0 {
                            Err(Errno::EIO) // end of file inside the export: the store shrank
                        } else if slot.progress + n < len {
                            // Short transfer: continue where it stopped.
                            slot.progress += n;
                            self.backlog.push_front(slot);
                            requeued = true;
                            continue;
                        } else {
                            Ok(())
                        }
                    }
                    None => Ok(()),
                }
            };
            if !self.direct && matches!(slot.op, IoOp::Write { .. }) {
                self.buffered_writes -= 1;
            }
            let buf = match slot.op {
                IoOp::Read { buf, .. } => Some(buf),
                IoOp::Write { .. } | IoOp::Flush | IoOp::Fallocate { .. } => None,
            };
            finished.push((slot.done, IoDone { result, buf }));
        }
        requeued
    }
}
