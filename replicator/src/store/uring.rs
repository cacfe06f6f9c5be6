//! The io_uring engine: one thread owns a ring; submitters queue ops and poke an eventfd; the
//! thread batches every queued op into one `io_uring_enter`, reaps completions and continues short
//! transfers. Many ops are in flight at once (up to the ring depth); the rest wait in a backlog.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{IoUring, Probe, opcode, squeue, types};
use tokio::sync::oneshot;

use super::engine::{IoDone, IoEngine, IoOp};

/// Ops in flight in the kernel at most; the completion queue is twice as large.
const DEPTH: u32 = 256;
/// user_data of the eventfd read that wakes the ring thread.
const WAKE: u64 = u64::MAX;

enum Msg {
    Op(IoOp, oneshot::Sender<IoDone>),
    Stop,
}

/// An op in flight: what it is, how much is done, who waits for it.
struct Slot {
    op: IoOp,
    done: oneshot::Sender<IoDone>,
    progress: usize,
}

/// The io_uring engine.
#[derive(Debug)]
pub struct UringEngine {
    tx: Mutex<Sender<Msg>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Creates a ring for `file` and starts its thread. Fails when the kernel refuses io_uring
    /// (disabled by sysctl or seccomp) or lacks an opcode we need.
    pub fn new(file: Arc<File>) -> std::io::Result<Self> {
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
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh, valid descriptor owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = channel();
        let wake2 = Arc::clone(&wake);
        let thread = std::thread::Builder::new()
            .name("duet-uring".into())
            .spawn(move || RingThread::new(ring, file, wake2).run(&rx))?;
        Ok(Self { tx: Mutex::new(tx), wake, thread: Some(thread) })
    }

    fn send(&self, msg: Msg) -> Result<(), Msg> {
        let r = self.tx.lock().expect("uring queue lock poisoned").send(msg).map_err(|e| e.0);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        r
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn submit(&self, op: IoOp, done: oneshot::Sender<IoDone>) {
        if let Err(Msg::Op(_, done)) = self.send(Msg::Op(op, done)) {
            let _ = done.send(IoDone { result: Err(libc::ESHUTDOWN), buf: None });
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The thread finishes everything queued and in flight, then exits.
        let _ = self.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct RingThread {
    ring: IoUring,
    file: Arc<File>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    backlog: VecDeque<(IoOp, oneshot::Sender<IoDone>, usize)>,
    in_flight: u32,
    stopping: bool,
}

impl RingThread {
    fn new(ring: IoUring, file: Arc<File>, wake: Arc<OwnedFd>) -> Self {
        Self {
            ring,
            file,
            wake,
            wake_buf: Box::new(0),
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            stopping: false,
        }
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        self.arm_wake();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Msg::Op(op, done)) => self.backlog.push_back((op, done, 0)),
                    Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => self.stopping = true,
                    Err(TryRecvError::Empty) => break,
                }
            }
            while self.in_flight < DEPTH {
                let Some((op, done, progress)) = self.backlog.pop_front() else { break };
                self.push(Slot { op, done, progress });
            }
            if self.stopping && self.in_flight == 0 && self.backlog.is_empty() {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {} // reap, then retry
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
            self.reap();
        }
    }

    fn arm_wake(&mut self) {
        let ptr = (&raw mut *self.wake_buf).cast::<u8>();
        let e = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), ptr, 8).build().user_data(WAKE);
        self.push_entry(&e);
    }

    fn push_entry(&mut self, e: &squeue::Entry) {
        loop {
            // SAFETY: every buffer referenced by an entry lives in a Slot (or wake_buf) that is
            // kept until its completion is reaped.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            // Submission queue full: hand what we have to the kernel and try again.
            if let Err(err) = self.ring.submit() {
                if err.raw_os_error() != Some(libc::EBUSY) {
                    panic!("io_uring submit failed: {err}");
                }
                self.reap();
            }
        }
    }

    fn push(&mut self, mut slot: Slot) {
        let fd = types::Fd(self.file.as_raw_fd());
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
                let ptr = unsafe { buf.as_mut_ptr().add(p) };
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, len).offset(*offset + p as u64).rw_flags(flags).build()
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
        self.push_entry(&entry.user_data(idx as u64));
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> =
            self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            if ud == WAKE {
                self.arm_wake();
                continue;
            }
            let idx = usize::try_from(ud).expect("user_data is a slot index");
            let mut slot = self.slots[idx].take().expect("completion for an empty slot");
            self.free.push(idx);
            self.in_flight -= 1;
            let result = if res < 0 {
                Err(-res)
            } else {
                let n = res.unsigned_abs() as usize;
                match &slot.op {
                    IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => {
                        if n == 0 {
                            Err(libc::EIO) // end of file inside the export: the store shrank
                        } else if slot.progress + n < buf.len() {
                            // Short transfer: continue where it stopped.
                            slot.progress += n;
                            self.backlog.push_front((slot.op, slot.done, slot.progress));
                            continue;
                        } else {
                            Ok(())
                        }
                    }
                    IoOp::Flush | IoOp::Fallocate { .. } => Ok(()),
                }
            };
            let buf = match slot.op {
                IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
                IoOp::Flush | IoOp::Fallocate { .. } => None,
            };
            let _ = slot.done.send(IoDone { result, buf });
        }
    }
}
