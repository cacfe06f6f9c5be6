//! A deterministic simulation of a replicating pair, seeded, on a virtual clock.
//!
//! Two nodes run the engine's own parts — [`State::step`] for every role, disk and connection
//! change, [`TransferLog`], [`crate::policy::plan`] and [`crate::session`] at every connect,
//! [`Generations`], [`Bitmap`], [`ActivityLog`] and [`Completion`] — wired the way the
//! executor (`replicator::repl::volume` and `link`) wires them. Each node has a disk with a
//! volatile write cache (what is not flushed is lost at a power loss; a process crash keeps
//! it) and metadata that is durable when written, as the executor's fsynced metadata is. A
//! link carries frames in order after a delay and can be cut and healed; a client writes and
//! flushes through whichever node is Primary and records what was acknowledged.
//!
//! Faults drawn from the seed: process crash, power loss, both nodes restarting, link cut and
//! heal, slow disk, a disk write error on the Secondary, a disk that fails for good and is
//! detached (a Diskless Primary serves through its peer, then hands over; the operator replaces
//! the disk when the faults stop), operator commands (switchover,
//! disconnect and connect, invalidate, a promotion beside a partitioned Primary). Checked after
//! every step, and after the faults stop and the link heals:
//!
//! 1. a write acknowledged before a crash of either node is on the node that serves next;
//! 2. a write covered by an acknowledged FLUSH survives a power loss of either node;
//! 3. after the faults stop, within a bounded virtual time both nodes are UpToDate, Connected
//!    and identical, or split brain is reported — no stuck state;
//! 4. split brain is never resolved silently; never two Primaries while connected;
//! 5. a Primary never serves data older than its last acknowledged write.
//!
//! (1, 2 and 5 are one check: the serving Primary holds, for every block, the newest write that
//! was acknowledged and may not have been lost. A write may have been lost only if it was never
//! covered by a FLUSH and a power loss left no node holding it.)

mod check;
mod faults;
mod link;
mod node;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::policy::{Plan, Policies, plan};
use crate::state::{ConnState, DiskState, Event, Role, Sync};
use node::Node;

/// Blocks of the simulated volume (one bitmap bit each).
pub const BLOCKS: u64 = 32;
/// Bytes per block (the bitmap granularity).
const BLOCK: u64 = 4096;

/// The kinds of fault, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Crash,
    PowerLoss,
    BothRestart,
    Restart,
    Cut,
    Heal,
    SlowDisk,
    DiskError,
    DiskFail,
    /// A Diskless Primary hands over to its in-sync Secondary.
    Handover,
    Switchover,
    Disconnect,
    Connect,
    Invalidate,
    PartitionPromote,
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which of the five.
    pub invariant: u8,
    pub what: String,
    /// The step it was found at.
    pub step: usize,
}

/// The outcome of one seed.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub faults: BTreeMap<Fault, u64>,
    pub violation: Option<Violation>,
    /// What happened, a line a step (kept whole only when asked for).
    pub trace: Vec<String>,
    pub writes_acked: u64,
    pub flushes_acked: u64,
}

/// A frame on the simulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Data { id: u64, block: u64, seq: u64 },
    WriteAck { id: u64, ok: bool },
    Flush { id: u64 },
    FlushAck { id: u64 },
    RsRequest { block: u64 },
    RsData { block: u64, seq: u64 },
    RsDone,
    SyncUuid(crate::generation::Generations),
    Report { role: Role, disk: DiskState },
}

/// An acknowledged write the client remembers.
#[derive(Debug, Clone, Copy)]
struct Acked {
    seq: u64,
    /// Covered by an acknowledged FLUSH.
    flushed: bool,
    /// The node that served it (Primary when it was acknowledged).
    writer: usize,
    /// Excused: not flushed, and its writer lost power before it was durable there (NBD lets
    /// an unflushed write go at a power loss, and the pair's rules let the writer's data win
    /// when it returns: a crashed Primary resyncs its hot extents to the peer).
    lost: bool,
    /// Acknowledged by a Diskless Primary: the peer's write was its only copy (the peer's
    /// power loss may lose it unflushed, as a local disk's would).
    via_peer: bool,
}

/// The link between the two nodes.
#[derive(Debug, Default)]
struct Link {
    up: bool,
    /// The live session's number; frames of an older one are dropped.
    session: u64,
    live: bool,
    /// Frames to node 0 and to node 1: (deliver at ms, session, frame), in order.
    q: [VecDeque<(u64, u64, Msg)>; 2],
}

/// The simulated pair.
pub struct Sim {
    rng: u64,
    origin: Instant,
    now_ms: u64,
    step: usize,
    n: [Node; 2],
    link: Link,
    next_seq: u64,
    /// Per block, the acknowledged writes, oldest first.
    acked: Vec<Vec<Acked>>,
    /// Client flushes in flight: their id on the Primary → the writes acknowledged before.
    flushes: BTreeMap<u64, Vec<(u64, u64)>>,
    next_flush: u64,
    /// A dual-Primary episode (an operator promoted beside a partitioned Primary): the
    /// freshness check waits until the split brain is resolved.
    episode: bool,
    /// Acknowledged writes each node served while not connected (split brain needs both).
    solo: [u64; 2],
    policies: Policies,
    faults: BTreeMap<Fault, u64>,
    trace: Vec<String>,
    keep_trace: bool,
    violation: Option<Violation>,
    writes_acked: u64,
    flushes_acked: u64,
}

/// The simulations' random source (SplitMix64): small, fast, and the same on every machine.
pub(crate) fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Sim {
    /// A fresh pair (metadata just created on both) for `seed`. `origin` is the instant virtual
    /// time starts from; only offsets from it matter.
    pub fn new(seed: u64, origin: Instant, keep_trace: bool) -> Self {
        let mut rng = seed;
        let _ = splitmix(&mut rng);
        Self {
            rng,
            origin,
            now_ms: 0,
            step: 0,
            n: [Node::new("alpha", BLOCKS), Node::new("beta", BLOCKS)],
            link: Link { up: true, ..Link::default() },
            next_seq: 1,
            acked: vec![Vec::new(); idx(BLOCKS)],
            flushes: BTreeMap::new(),
            next_flush: 1,
            episode: false,
            solo: [0, 0],
            policies: Policies::default(),
            faults: BTreeMap::new(),
            trace: Vec::new(),
            keep_trace,
            violation: None,
            writes_acked: 0,
            flushes_acked: 0,
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        splitmix(&mut self.rng) % n.max(1)
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.rand(1000) < per_mille
    }

    fn now(&self) -> Instant {
        self.origin + Duration::from_millis(self.now_ms)
    }

    fn log(&mut self, what: String) {
        if self.keep_trace {
            let line = format!("[{:>5}] t={:>6}ms {what}", self.step, self.now_ms);
            self.trace.push(line);
        }
    }

    fn fault(&mut self, f: Fault, what: String) {
        *self.faults.entry(f).or_default() += 1;
        self.log(format!("FAULT {f:?}: {what}"));
    }

    fn violate(&mut self, invariant: u8, what: String) {
        if self.violation.is_none() {
            self.log(format!("VIOLATION of invariant {invariant}: {what}"));
            self.violation = Some(Violation { invariant, what, step: self.step });
        }
    }

    /// Runs `steps` steps of faults and traffic, then lets the pair settle and checks that it
    /// converged.
    pub fn run(mut self, steps: usize) -> Report {
        // Bootstrap as an operator would: alpha's data is the source of truth.
        let fresh = self.rand(u64::MAX);
        let _ = self.n[0].promote(true, fresh);
        self.log("alpha: primary --force".into());
        for _ in 0..steps {
            self.step += 1;
            self.now_ms += 1 + self.rand(15);
            self.act();
            self.tick();
            self.check();
            if self.violation.is_some() {
                break;
            }
        }
        if self.violation.is_none() {
            self.settle();
        }
        Report {
            seed: 0,
            faults: self.faults,
            violation: self.violation,
            trace: self.trace,
            writes_acked: self.writes_acked,
            flushes_acked: self.flushes_acked,
        }
    }

    // ------------------------------------------------------------------ traffic (faults: see `faults`)

    /// One random action: mostly client I/O, sometimes a fault or an operator command.
    fn act(&mut self) {
        let r = self.rand(1000);
        match r {
            0..=639 => self.client_write(),
            640..=679 => self.client_flush(),
            680..=689 => self.crash(false),
            690..=697 => self.crash(true),
            698..=699 => self.both_restart(),
            700..=759 => self.restart_dead(),
            760..=769 => self.cut(),
            770..=819 => self.heal(),
            820..=827 => self.slow_disk(),
            828..=831 => self.disk_error(),
            832..=833 => self.disk_fail(),
            834..=873 => self.switchover(),
            874..=879 => self.disconnect(),
            880..=883 => self.disk_fail(),
            884..=909 => self.connect(),
            910..=913 => self.invalidate(),
            914..=919 => self.partition_promote(),
            _ => self.failover(),
        }
    }

    /// What a read of block `b` through node `p` returns: its disk, or a Diskless Primary's
    /// peer's (`None`: the read fails, no peer).
    fn served(&self, p: usize, b: u64) -> Option<u64> {
        if !self.n[p].diskless() {
            return Some(self.n[p].disk.read(b));
        }
        let q = 1 - p;
        (self.link.live && self.n[p].has_session() && self.n[q].alive)
            .then(|| self.n[q].disk.read(b))
    }

    /// The node the client writes to: the alive Primary (the one promoted last if two).
    fn serving(&self) -> Option<usize> {
        let p: Vec<usize> =
            (0..2).filter(|&i| self.n[i].alive && self.n[i].r.st.role == Role::Primary).collect();
        match p.as_slice() {
            [i] => Some(*i),
            [a, b] => Some(if self.n[*a].promoted_at >= self.n[*b].promoted_at { *a } else { *b }),
            _ => None,
        }
    }

    fn client_write(&mut self) {
        // In a dual-Primary episode the client writes to either (each side sees its own).
        let target = if self.episode && self.chance(500) {
            (0..2).find(|&i| self.n[i].alive && self.n[i].r.st.role == Role::Primary)
        } else {
            self.serving()
        };
        let Some(p) = target else { return };
        let block = self.rand(BLOCKS);
        let seq = self.next_seq;
        self.next_seq += 1;
        let live = self.link.live && self.n[p].has_session();
        let now = self.now();
        match self.n[p].write_begin(block, seq, live, now) {
            Err(why) => {
                self.log(format!("{}: write b{block} s{seq} not started: {why}", self.n[p].name))
            }
            Ok(None) => {
                // No peer: answered on the local result, the block out of sync.
                let fresh = self.rand(u64::MAX);
                self.n[p].finish_alone(block, fresh);
                self.ack_write(p, block, seq, false);
            }
            Ok(Some(id)) => {
                self.send(p, Msg::Data { id, block, seq });
                self.log(format!("{}: write b{block} s{seq} sent as {id}", self.n[p].name));
            }
        }
    }

    fn ack_write(&mut self, p: usize, block: u64, seq: u64, replicated: bool) {
        let b = usize::try_from(block).expect("small");
        let via_peer = self.n[p].diskless();
        self.acked[b].push(Acked { seq, flushed: false, writer: p, lost: false, via_peer });
        self.writes_acked += 1;
        if !replicated {
            self.solo[p] += 1;
        }
        self.log(format!(
            "{}: ACK write b{block} s{seq}{}",
            self.n[p].name,
            if replicated { "" } else { " (alone)" }
        ));
    }

    fn client_flush(&mut self) {
        let Some(p) = self.serving() else { return };
        if self.n[p].closing {
            return;
        }
        let covered: Vec<(u64, u64)> =
            (0..BLOCKS).filter_map(|b| self.acked[idx(b)].last().map(|a| (b, a.seq))).collect();
        let fid = self.next_flush;
        self.next_flush += 1;
        if !self.n[p].diskless() {
            self.n[p].disk.flush();
        }
        let now = self.now();
        let sent = if self.link.live { self.n[p].send_flush(Some(fid), now) } else { None };
        if let Some(id) = sent {
            self.flushes.insert(fid, covered);
            self.send(p, Msg::Flush { id });
        } else if self.n[p].diskless() {
            self.log(format!("{}: flush {fid} fails (Diskless, no peer)", self.n[p].name));
        } else {
            // Alone: durable locally, which is all there is.
            self.flushes.insert(fid, covered);
            self.flush_acked(fid);
        }
    }

    fn flush_acked(&mut self, fid: u64) {
        let Some(covered) = self.flushes.remove(&fid) else { return };
        for (b, seq) in covered {
            for a in &mut self.acked[idx(b)] {
                if a.seq <= seq {
                    a.flushed = true;
                }
            }
        }
        self.flushes_acked += 1;
        self.log(format!("ACK flush {fid}"));
    }
}

/// Runs one seed; `keep_trace` keeps the whole trace (for a replay).
pub fn run_seed(seed: u64, steps: usize, origin: Instant, keep_trace: bool) -> Report {
    let mut r = Sim::new(seed, origin, keep_trace).run(steps);
    r.seed = seed;
    r
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("step", &self.step).field("now_ms", &self.now_ms).finish()
    }
}

#[cfg(test)]
mod tests;

/// The block's byte offset (the engine's parts speak bytes).
fn off(block: u64) -> u64 {
    block * BLOCK
}

/// A block number as an index.
fn idx(b: u64) -> usize {
    usize::try_from(b).expect("a block of the simulated volume")
}
