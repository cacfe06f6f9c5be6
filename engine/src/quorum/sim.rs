//! A deterministic, seeded simulation of [`Quorum`] on three or four nodes.
//!
//! Each node's clock runs at its own rate, up to the configured `drift_ppm` off real time (the
//! extremes are drawn often). Messages take 50 µs to 2 ms, now and then up to two leases (late
//! and out of order); a message on a cut link is dropped when sent, and one in flight when the
//! link is cut arrives or not. Faults drawn from the seed: a node crashes (it keeps only the
//! epoch it stored) and restarts later, one direction of a link is cut, a pair is cut, the
//! nodes split into two groups, links heal, the holder resigns, a burst of late messages.
//!
//! Data nodes stand when their vote is free, stand down when a voter names a rival or nothing
//! comes of it, and while holding replicate "writes" the way the executor must: a write is
//! answered only when every member of the committed epoch has it; a member that is not reached
//! is proposed out first, a reached node that was behind is brought up to date and proposed in.
//!
//! Checked after every event:
//! 1. never two nodes hold at one instant;
//! 2. a node that starts holding has every answered write;
//! 3. a node holds only while it heard, within one lease (real time, slowest clock), from a
//!    majority through links that were up in both directions;
//!
//! and at the end, once every link healed and every node runs again:
//! 4. within a bounded time a node holds and answers new writes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::sim::splitmix;

use super::{Actions, Config, Durable, MAX_NODES, NodeId, ProposeError, Quorum};

const MS: u64 = 1_000_000;

/// The outcome of one seed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub nodes: u8,
    pub data: u8,
    pub lease_ms: u64,
    /// Broken invariants: which (1 to 4) and what.
    pub violations: Vec<(u8, String)>,
    /// How many times a node started holding.
    pub tenures: u64,
    /// Writes answered.
    pub writes: u64,
    pub faults: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// The last lines of the trace (when asked for).
    pub trace: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    Deliver { from: NodeId, to: NodeId, msg: super::Msg },
    Tick(NodeId),
    Fault,
    Restart(NodeId),
}

struct Node {
    q: Option<Quorum>,
    stored: Durable,
    rate_ppm: i64,
    offset: u64,
    /// The newest write this node holds.
    version: u64,
    backoff_until: Option<Instant>,
    cand_since: Option<Instant>,
    holding: bool,
}

struct World {
    rng: u64,
    cfg: Config,
    origin: Instant,
    t: u64,
    nodes: Vec<Node>,
    link: [[bool; MAX_NODES]; MAX_NODES],
    /// Last real time the link a→b was up with a running.
    last_ok: [[u64; MAX_NODES]; MAX_NODES],
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    late_burst: u32,
    /// The newest answered write.
    acked: u64,
    faults_on: bool,
    report: Report,
    keep_trace: bool,
    trace: Vec<String>,
}

impl World {
    fn rand(&mut self, n: u64) -> u64 {
        splitmix(&mut self.rng) % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rand(100) < percent
    }

    fn n(&self) -> NodeId {
        self.cfg.nodes
    }

    fn lease(&self) -> u64 {
        u64::try_from(self.cfg.lease.as_nanos()).unwrap_or(u64::MAX)
    }

    fn local(&self, i: NodeId) -> Instant {
        let nd = &self.nodes[usize::from(i)];
        let t = i128::from(self.t);
        let skew = t * i128::from(nd.rate_ppm) / 1_000_000;
        let ns = u64::try_from(t + skew).unwrap_or(0) + nd.offset;
        self.origin + Duration::from_nanos(ns)
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.keep_trace {
            let l = format!("{:>10.3} ms {}", self.t as f64 / MS as f64, line());
            self.trace.push(l);
        }
    }

    fn alive(&self, i: NodeId) -> bool {
        self.nodes.get(usize::from(i)).is_some_and(|n| n.q.is_some())
    }

    fn refresh(&mut self) {
        for a in 0..self.n() {
            for b in 0..self.n() {
                if a != b && self.link[usize::from(a)][usize::from(b)] && self.alive(a) {
                    self.last_ok[usize::from(a)][usize::from(b)] = self.t;
                }
            }
        }
    }

    fn set_link(&mut self, a: NodeId, b: NodeId, up: bool) {
        self.refresh();
        self.link[usize::from(a)][usize::from(b)] = up;
    }

    fn send(&mut self, from: NodeId, act: Actions) {
        if let Some(e) = act.persist {
            self.nodes[usize::from(from)].stored = e;
        }
        for o in act.send {
            if !self.link[usize::from(from)][usize::from(o.to)] {
                continue;
            }
            let late = self.late_burst > 0 || self.chance(2);
            let delay = if late {
                self.late_burst = self.late_burst.saturating_sub(1);
                self.rand(2 * self.lease())
            } else {
                50_000 + self.rand(2 * MS)
            };
            let t = self.t + delay;
            self.at(t, Ev::Deliver { from, to: o.to, msg: o.msg });
        }
    }

    fn violation(&mut self, inv: u8, what: String) {
        self.log(|| format!("VIOLATION {inv}: {what}"));
        if self.report.violations.len() < 10 {
            self.report.violations.push((inv, what));
        }
    }

    /// Invariants 1 to 3, and who started holding.
    fn check(&mut self) {
        self.refresh();
        let mut holders = Vec::new();
        for i in 0..self.n() {
            let now = self.local(i);
            let holds = self.nodes[usize::from(i)].q.as_ref().is_some_and(|q| q.holds(now));
            let was = self.nodes[usize::from(i)].holding;
            self.nodes[usize::from(i)].holding = holds;
            if !holds {
                continue;
            }
            holders.push(i);
            if !was {
                self.report.tenures += 1;
                let v = self.nodes[usize::from(i)].version;
                self.log(|| format!("node {i} holds (version {v})"));
                if v != self.acked {
                    let a = self.acked;
                    self.violation(2, format!("node {i} holds with version {v}, answered {a}"));
                }
            }
            // A vote counts for at most one lease on the holder's clock: in real time at most
            // lease / (1 - ε).
            let e = u128::from(self.cfg.drift_ppm);
            let bound = u64::try_from(
                u128::from(self.lease()) * 1_000_000 / (1_000_000 - e) + u128::from(MS / 1000),
            )
            .unwrap_or(u64::MAX);
            let heard = (0..self.n())
                .filter(|&v| {
                    v == i
                        || (self.t - self.last_ok[usize::from(v)][usize::from(i)] <= bound
                            && self.t - self.last_ok[usize::from(i)][usize::from(v)] <= bound)
                })
                .count();
            if heard < self.cfg.majority() {
                self.violation(3, format!("node {i} holds having heard from only {heard}"));
            }
        }
        if holders.len() > 1 {
            self.violation(1, format!("nodes {holders:?} hold at once"));
        }
    }

    fn resync_and_write(&mut self, i: NodeId) {
        let now = self.local(i);
        let me = usize::from(i);
        let mine = self.nodes[me].version;
        let mut desired = 1u8 << i;
        for d in 0..self.n() {
            let reached = d != i
                && self.cfg.data & (1 << d) != 0
                && self.alive(d)
                && self.link[me][usize::from(d)]
                && self.link[usize::from(d)][me];
            if !reached {
                continue;
            }
            if self.nodes[usize::from(d)].version < mine {
                // A resync: the node catches up, and may join the next epoch.
                self.nodes[usize::from(d)].version = mine;
            }
            if self.nodes[usize::from(d)].version == mine {
                desired |= 1 << d;
            }
        }
        let Some(q) = self.nodes[me].q.as_mut() else { return };
        if q.committed().is_some_and(|e| e.members == desired) {
            let v = mine + 1;
            for d in 0..self.n() {
                if desired & (1 << d) != 0 {
                    self.nodes[usize::from(d)].version = v;
                }
            }
            self.acked = v;
            self.report.writes += 1;
        } else if q.proposal().is_none_or(|e| e.members != desired) {
            match q.propose(now, desired) {
                Ok(act) => {
                    self.log(|| format!("node {i} proposes {desired:#06b}"));
                    self.send(i, act);
                }
                Err(ProposeError::Superseded(t)) => {
                    // A later tenure stored an epoch: this one is over.
                    let act = q.resign();
                    self.log(|| format!("node {i} superseded by term {t}, stands down"));
                    self.send(i, act);
                }
                Err(e) => self.violation(2, format!("holder {i} could not propose: {e}")),
            }
        }
    }

    fn tick(&mut self, i: NodeId) {
        let now = self.local(i);
        let lease = self.cfg.lease;
        let r = self.rand(u64::try_from(lease.as_nanos() * 2).unwrap_or(1));
        let me = usize::from(i);
        let Some(q) = self.nodes[me].q.as_mut() else { return };
        let act = q.tick(now);
        self.send(i, act);
        if self.cfg.data & (1 << i) == 0 {
            return;
        }
        let (since, backoff) = (self.nodes[me].cand_since, self.nodes[me].backoff_until);
        let q = self.nodes[me].q.as_mut().expect("checked above");
        if q.candidate() {
            if q.holds(now) {
                self.resync_and_write(i);
            } else {
                let since = since.unwrap_or(now);
                if q.setback().is_some() || now.saturating_duration_since(since) > lease * 3 {
                    let act = q.resign();
                    self.nodes[me].backoff_until = Some(now + lease / 2 + Duration::from_nanos(r));
                    self.log(|| format!("node {i} stands down"));
                    self.send(i, act);
                }
            }
        } else if backoff.is_none_or(|b| now >= b) {
            match q.campaign(now) {
                Ok(act) => {
                    self.nodes[me].cand_since = Some(now);
                    self.log(|| format!("node {i} stands"));
                    self.send(i, act);
                }
                Err(_) => {
                    self.nodes[me].backoff_until = Some(now + Duration::from_nanos(r / 4));
                }
            }
        }
    }

    fn crash(&mut self, i: NodeId) {
        self.refresh();
        self.nodes[usize::from(i)].q = None;
        self.nodes[usize::from(i)].holding = false;
        self.log(|| format!("node {i} crashes"));
    }

    fn restart(&mut self, i: NodeId) {
        if self.alive(i) {
            return;
        }
        self.refresh();
        let now = self.local(i);
        let random = splitmix(&mut self.rng);
        let mut cfg = self.cfg;
        cfg.me = i;
        let nd = &mut self.nodes[usize::from(i)];
        nd.q = Some(Quorum::new(cfg, now, nd.stored, random).expect("valid configuration"));
        nd.backoff_until = None;
        nd.cand_since = None;
        self.log(|| format!("node {i} restarts"));
    }

    fn fault(&mut self) {
        self.report.faults += 1;
        let n = u64::from(self.n());
        let a = u8::try_from(self.rand(n)).unwrap_or(0);
        let b = (a + 1 + u8::try_from(self.rand(n - 1)).unwrap_or(0)) % self.n();
        match self.rand(100) {
            0..10 => {
                if self.alive(a) {
                    self.crash(a);
                    let t = self.t + self.rand(3 * self.lease());
                    self.at(t, Ev::Restart(a));
                }
            }
            10..30 => {
                self.log(|| format!("cut {a}->{b}"));
                self.set_link(a, b, false);
            }
            30..45 => {
                self.log(|| format!("cut {a}<->{b}"));
                self.set_link(a, b, false);
                self.set_link(b, a, false);
            }
            45..55 => {
                let side = self.rand(1 << n);
                self.log(|| format!("partition {side:#06b}"));
                for x in 0..self.n() {
                    for y in 0..self.n() {
                        if x != y && ((side >> x) & 1) != ((side >> y) & 1) {
                            self.set_link(x, y, false);
                        }
                    }
                }
            }
            55..75 => {
                self.log(|| format!("heal {a}<->{b}"));
                self.set_link(a, b, true);
                self.set_link(b, a, true);
            }
            75..85 => self.heal_all(),
            85..90 => {
                let holder = (0..self.n()).find(|&x| self.nodes[usize::from(x)].holding);
                if let Some(h) = holder
                    && let Some(q) = self.nodes[usize::from(h)].q.as_mut()
                {
                    let act = q.resign();
                    self.log(|| format!("node {h} resigns (switchover)"));
                    self.send(h, act);
                }
            }
            _ => self.late_burst = 5 + u32::try_from(self.rand(20)).unwrap_or(0),
        }
    }

    fn heal_all(&mut self) {
        self.log(|| "heal all".to_string());
        for x in 0..self.n() {
            for y in 0..self.n() {
                if x != y {
                    self.set_link(x, y, true);
                }
            }
        }
    }

    fn step(&mut self, until: u64) -> bool {
        let Some((&(t, s), &ev)) = self.queue.iter().next() else { return false };
        if t > until {
            return false;
        }
        self.queue.remove(&(t, s));
        self.t = t;
        match ev {
            Ev::Deliver { from, to, msg } => {
                let cut = !self.link[usize::from(from)][usize::from(to)];
                if (cut && self.chance(50)) || !self.alive(to) {
                    return true;
                }
                self.report.delivered += 1;
                let now = self.local(to);
                if let Some(q) = self.nodes[usize::from(to)].q.as_mut() {
                    let act = q.handle(now, from, msg);
                    self.send(to, act);
                }
            }
            Ev::Tick(i) => {
                self.tick(i);
                let period = self.lease() / 20;
                let next = self.t + period / 2 + self.rand(period);
                self.at(next, Ev::Tick(i));
            }
            Ev::Fault => {
                if self.faults_on {
                    self.fault();
                    let gap = self.lease() / 5 + self.rand(2 * self.lease());
                    let next = self.t + gap;
                    self.at(next, Ev::Fault);
                }
            }
            Ev::Restart(i) => self.restart(i),
        }
        self.check();
        true
    }
}

/// Runs one seed: faults for 40 leases, then every link heals and every node restarts, and a
/// holder must answer a new write within 30 leases.
pub fn run_seed(seed: u64, origin: Instant, keep_trace: bool) -> Report {
    run(seed, origin, keep_trace, None)
}

/// The same with clocks drifting `actual_ppm` (each node at either extreme) whatever the nodes
/// were configured to expect: shows that the checks catch a broken assumption.
pub fn run_seed_overdrift(seed: u64, origin: Instant, actual_ppm: i64) -> Report {
    run(seed, origin, false, Some(actual_ppm))
}

fn run(seed: u64, origin: Instant, keep_trace: bool, overdrift: Option<i64>) -> Report {
    let mut rng = seed ^ 0x5155_4F52_554D;
    let _ = splitmix(&mut rng);
    let nodes: u8 = if splitmix(&mut rng).is_multiple_of(2) { 3 } else { 4 };
    let all = (1u8 << nodes) - 1;
    // Tiebreakers: none, or the last node (or the last two of four).
    let data = match splitmix(&mut rng) % 3 {
        0 => all,
        1 => all >> 1,
        _ if nodes == 4 => 0b0011,
        _ => all >> 1,
    };
    let lease_ms = [100, 300, 1000][usize::try_from(splitmix(&mut rng) % 3).unwrap_or(0)];
    let drift_ppm =
        [0, 1_000, 10_000, 50_000][usize::try_from(splitmix(&mut rng) % 4).unwrap_or(0)];
    let cfg = Config { me: 0, nodes, data, lease: Duration::from_millis(lease_ms), drift_ppm };
    let mut w = World {
        rng,
        cfg,
        origin,
        t: 0,
        nodes: Vec::new(),
        link: [[true; MAX_NODES]; MAX_NODES],
        last_ok: [[0; MAX_NODES]; MAX_NODES],
        queue: BTreeMap::new(),
        seq: 0,
        late_burst: 0,
        acked: 0,
        faults_on: true,
        report: Report { seed, nodes, data, lease_ms, ..Report::default() },
        keep_trace,
        trace: Vec::new(),
    };
    for i in 0..nodes {
        let e = i64::from(drift_ppm);
        let rate_ppm = match (w.rand(3), overdrift) {
            (0, Some(x)) => -x,
            (_, Some(x)) => x,
            (0, None) => -e,
            (1, None) => e,
            (_, None) => i64::try_from(w.rand(u64::from(drift_ppm) * 2 + 1)).unwrap_or(0) - e,
        };
        let offset = w.rand(1_000 * MS);
        w.nodes.push(Node {
            q: None,
            stored: Durable::initial(data),
            rate_ppm,
            offset,
            version: 0,
            backoff_until: None,
            cand_since: None,
            holding: false,
        });
        w.restart(i);
        let first = w.rand(w.lease() / 20);
        w.at(first, Ev::Tick(i));
    }
    let first_fault = w.lease() * 2;
    w.at(first_fault, Ev::Fault);
    let faults_end = w.lease() * 40;
    // Bounded in count as well as in virtual time.
    let mut budget = 2_000_000u32;
    // A violation ends the run: the trace then ends where it happened.
    while budget > 0 && w.report.violations.is_empty() && w.step(faults_end) {
        budget -= 1;
    }
    w.faults_on = false;
    w.t = faults_end;
    w.heal_all();
    w.late_burst = 0;
    for i in 0..nodes {
        if !w.alive(i) {
            let t = w.t + w.rand(w.lease());
            w.at(t, Ev::Restart(i));
        }
    }
    let healed_acked = w.acked;
    let deadline = faults_end + w.lease() * 30;
    let mut live = false;
    while budget > 0 && w.report.violations.is_empty() && w.step(deadline) {
        budget -= 1;
        if w.acked > healed_acked && w.nodes.iter().any(|n| n.holding) {
            live = true;
            break;
        }
    }
    if !live && w.report.violations.is_empty() {
        w.violation(
            4,
            format!("no holder answered a write within 30 leases of the heal (budget {budget})"),
        );
    }
    let mut r = w.report;
    if keep_trace {
        let skip = w.trace.len().saturating_sub(300);
        r.trace = w.trace.split_off(skip);
    }
    r
}
