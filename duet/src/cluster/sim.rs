//! A simulated pair for the cluster manager: two managers with real failure detectors, two
//! heartbeat links that can be cut, a replication link, a model of the replicator (roles, disk
//! states, data versions, resync), a client writing to whoever is master, and a virtual clock.
//! Every scenario checks the invariants at every step:
//!
//! - no node promotes while the other is master and a heartbeat link between them works;
//! - no automatic promotion with data that is not UpToDate;
//! - two masters with a working heartbeat link do not last (one releases within 3 s);
//! - a frozen master acknowledges nothing;
//! - in maintenance mode no takeover or release starts (one already running ends; outdating,
//!   freezing and fencing go on).
//!
//! Scenarios that involve no partition also check that every acknowledged write survives.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use heartbeat::detector::{Detector, Event, Timing};
use heartbeat::frame::Control;

use super::*;

const DT: Duration = Duration::from_millis(10);
const STEP_TIME: Duration = Duration::from_millis(30);

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    Inconsistent,
    Outdated,
    Consistent,
    UpToDate,
}

#[derive(Debug)]
struct Node {
    name: &'static str,
    up: bool,
    mgr: Manager,
    det: Detector,
    primary: bool,
    disk: Disk,
    /// Data version: how many writes this node's disk holds.
    ver: u64,
    /// Persisted "peer is outdated" flag.
    peer_outdated: bool,
    frozen: bool,
    healthy: bool,
    fence_exit: Option<i32>,
    running: Option<(Step, Instant)>,
    feed: VecDeque<Input>,
    replies: Vec<(Token, Answer)>,
    promotions: u32,
}

struct Msg {
    at: Instant,
    to: usize,
    link: usize,
    view: PeerView,
    control: Option<Control>,
}

struct World {
    origin: Instant,
    now: Instant,
    timing: Timing,
    settings: [Settings; 2],
    n: [Node; 2],
    hb_cut: [bool; 2],
    repl_cut: bool,
    connected: bool,
    split_brain: bool,
    resync_until: Option<Instant>,
    resync_time: Duration,
    inflight: Vec<Msg>,
    last_frame: Instant,
    /// Highest data version acknowledged to the client.
    acked: u64,
    dual_since: Option<Instant>,
    log: Vec<String>,
    write: bool,
    next_token: Token,
    /// The pair's maintenance mode (both nodes told at once; the frames carry it for real).
    maintenance: bool,
}

fn timing() -> Timing {
    Timing { keepalive: ms(200), warntime: ms(600), deadtime: ms(1000), initdead: ms(3000) }
}

fn settings(master: bool) -> Settings {
    Settings {
        configured_master: master,
        failback_auto: false,
        fencing: Fencing::ResourceOnly,
        fence_command: false,
        fence_delay: Duration::ZERO,
        switchover_timeout: ms(10_000),
        resend: ms(500),
        retry: ms(5000),
        resources: 1,
    }
}

impl World {
    fn new(tweak: impl Fn(&mut Settings)) -> Self {
        let now = Instant::now();
        let mut s = [settings(true), settings(false)];
        for x in &mut s {
            tweak(x);
        }
        let node = |name, s: &Settings| Node {
            name,
            up: false,
            mgr: Manager::new(s.clone(), now),
            det: Detector::new(timing(), 2, now),
            primary: false,
            disk: Disk::Consistent,
            ver: 0,
            peer_outdated: false,
            frozen: false,
            healthy: true,
            fence_exit: None,
            running: None,
            feed: VecDeque::new(),
            replies: Vec::new(),
            promotions: 0,
        };
        let n = [node("alpha", &s[0]), node("beta", &s[1])];
        Self {
            origin: now,
            now,
            timing: timing(),
            settings: s,
            n,
            hb_cut: [false; 2],
            repl_cut: false,
            connected: false,
            split_brain: false,
            resync_until: None,
            resync_time: ms(2000),
            inflight: Vec::new(),
            last_frame: now,
            acked: 0,
            dual_since: None,
            log: Vec::new(),
            write: true,
            next_token: 1,
            maintenance: false,
        }
    }

    /// Both nodes start and run until alpha is master and in sync.
    fn running_pair(tweak: impl Fn(&mut Settings)) -> Self {
        let mut w = Self::new(tweak);
        w.start(0);
        w.start(1);
        w.run_until(ms(10_000), |w| w.n[0].primary && w.in_sync());
        assert!(w.n[0].primary && !w.n[1].primary, "alpha should be master: {:#?}", w.log);
        w.run(ms(1000));
        w
    }

    fn start(&mut self, i: usize) {
        let s = self.settings[i].clone();
        let t = self.t();
        let now = self.now;
        let timing = self.timing;
        let n = &mut self.n[i];
        n.up = true;
        n.mgr = Manager::new(s, now)
            .with_id_seed(1000 * (i as u64 + 1) + u64::try_from(t.as_millis()).unwrap_or(0) * 4);
        n.det = Detector::new(timing, 2, now);
        n.primary = false;
        n.frozen = false;
        n.running = None;
        n.feed.clear();
        n.disk = if n.disk == Disk::Inconsistent {
            Disk::Inconsistent
        } else if n.disk == Disk::Outdated {
            Disk::Outdated
        } else if n.peer_outdated {
            Disk::UpToDate
        } else {
            Disk::Consistent
        };
        let name = n.name;
        self.log.push(format!("{t:?} {name} starts"));
        // As the daemon does from its state file.
        let m = self.maintenance;
        self.feed(i, Input::Maintenance(m));
    }

    /// Maintenance mode on or off, on both nodes.
    fn set_maintenance(&mut self, on: bool) {
        self.maintenance = on;
        self.log.push(format!("{:?} maintenance {}", self.t(), if on { "on" } else { "off" }));
        for i in 0..2 {
            self.feed(i, Input::Maintenance(on));
        }
    }

    /// In maintenance mode, the operator moves the role by hand (connected and in sync only,
    /// as the replicator would allow): the master demoted, the other node promoted.
    fn manual_switchover(&mut self) {
        let Some(m) = self.master() else { return };
        if !self.maintenance || !self.in_sync() || !self.n[1 - m].up {
            return;
        }
        self.n[m].primary = false;
        self.n[1 - m].primary = true;
        self.log.push(format!(
            "{:?} by hand: {} Secondary, {} Primary",
            self.t(),
            self.n[m].name,
            self.n[1 - m].name
        ));
    }

    fn crash(&mut self, i: usize) {
        self.n[i].up = false;
        self.n[i].primary = false;
        self.connected = false;
        self.resync_until = None;
        self.log.push(format!("{:?} {} crashes", self.t(), self.n[i].name));
    }

    fn t(&self) -> Duration {
        self.now.duration_since(self.origin)
    }

    fn in_sync(&self) -> bool {
        self.connected && self.resync_until.is_none() && self.n[0].ver == self.n[1].ver
    }

    fn local_view(&self, i: usize) -> LocalView {
        let me = &self.n[i];
        let other = &self.n[1 - i];
        LocalView {
            primary: me.primary,
            any_primary: me.primary,
            uptodate: me.disk == Disk::UpToDate,
            in_sync: self.in_sync() && other.disk == Disk::UpToDate && me.disk == Disk::UpToDate,
            resyncing: self.connected && self.resync_until.is_some(),
            peer_primary: self.connected && other.up && other.primary,
            disconnected: u32::from(!self.connected),
            synced: u32::from(
                self.in_sync() && other.disk == Disk::UpToDate && me.disk == Disk::UpToDate,
            ),
            diskless: 0,
            scheduled: 0,
            restorable: false,
            worst_disk: match me.disk {
                Disk::Inconsistent => "Inconsistent",
                Disk::Outdated => "Outdated",
                Disk::Consistent => "Consistent",
                Disk::UpToDate => "UpToDate",
            },
        }
    }

    fn peer_view(&self, i: usize) -> PeerView {
        let me = &self.n[i];
        PeerView {
            primary: me.primary,
            any_primary: me.primary,
            uptodate: me.disk == Disk::UpToDate,
            healthy: me.healthy,
            diskless: 0,
            unusable: u32::from(matches!(me.disk, Disk::Inconsistent | Disk::Outdated)),
        }
    }

    fn link_alive(&self) -> bool {
        self.n[0].up && self.n[1].up && self.hb_cut.iter().any(|c| !c)
    }

    fn send(&mut self, from: usize, control: Option<Control>) {
        if !self.n[from].up {
            return;
        }
        let view = self.peer_view(from);
        for link in 0..2 {
            if !self.hb_cut[link] {
                self.inflight.push(Msg {
                    at: self.now + ms(1 + link as u64 * 5),
                    to: 1 - from,
                    link,
                    view,
                    control: control.clone(),
                });
            }
        }
    }

    fn feed(&mut self, i: usize, input: Input) {
        if !self.n[i].up {
            return;
        }
        let was_busy = self.n[i].mgr.busy();
        let actions = self.n[i].mgr.handle(self.now, input);
        let role_step = |a: &Action| matches!(a, Action::Run(st) if !matches!(st, Step::Freeze | Step::Thaw | Step::Fence { .. }));
        if self.maintenance && !was_busy && actions.iter().any(role_step) {
            panic!(
                "{}: a transition started in maintenance mode: {actions:?}\n{:#?}",
                self.n[i].name, self.log
            );
        }
        for a in actions {
            self.act(i, a);
        }
    }

    fn act(&mut self, i: usize, a: Action) {
        let name = self.n[i].name;
        match a {
            Action::Run(step) => {
                assert!(self.n[i].running.is_none(), "{name}: two steps at once");
                self.n[i].running = Some((step, self.now + STEP_TIME));
            }
            Action::Send(c) => self.send(i, Some(c)),
            Action::Outdate { id, mask } => {
                let ok = !self.n[i].primary;
                if ok {
                    self.n[i].disk = Disk::Outdated;
                }
                self.n[i].feed.push_back(Input::OutdateDone { id, mask, ok });
            }
            Action::PeerOutdated { .. } => self.n[i].peer_outdated = true,
            Action::Reannounce => self.log.push(format!("{name}: reannounce")),
            Action::Reply { token, result } => self.n[i].replies.push((token, result)),
            Action::Event(e) => self.log.push(format!("{:?} {name}: {e}", self.t())),
        }
    }

    /// Executes a finished step's effect; returns its outcome.
    fn finish_step(&mut self, i: usize, step: Step) -> Outcome {
        let other_primary = self.n[1 - i].up && self.n[1 - i].primary;
        let link_alive = self.link_alive();
        let tail: Vec<String> = self.log.iter().rev().take(40).rev().cloned().collect();
        let me = &mut self.n[i];
        match step {
            Step::Freeze => {
                me.frozen = true;
                Outcome::Ok
            }
            Step::Thaw => {
                me.frozen = false;
                Outcome::Ok
            }
            Step::Fence { .. } => Outcome::Fence(FenceVerdict::from_exit(me.fence_exit)),
            // Only a session with a peer that is really gone ends; the model's replication link
            // already follows the nodes' liveness.
            Step::DropPeer => Outcome::Ok,
            Step::Promote { force } => {
                if self.connected && other_primary {
                    return Outcome::Failed("the peer is Primary".into());
                }
                if me.disk != Disk::UpToDate && !force {
                    panic!("{}: automatic promotion with {:?} data: {tail:#?}", me.name, me.disk);
                }
                assert!(
                    !(other_primary && link_alive),
                    "{} promoted while the peer is master and a heartbeat link works",
                    me.name
                );
                me.primary = true;
                me.disk = Disk::UpToDate;
                me.promotions += 1;
                Outcome::Ok
            }
            Step::Demote => {
                me.primary = false;
                Outcome::Ok
            }
            Step::VipUp
            | Step::VipDown
            | Step::ServicesMaster
            | Step::ServicesSlave
            | Step::ExportOpen
            | Step::ExportClose => Outcome::Ok,
        }
    }

    fn replication(&mut self) {
        let can = self.n[0].up && self.n[1].up && !self.repl_cut && !self.split_brain;
        if !can {
            if self.connected {
                self.connected = false;
                self.resync_until = None;
                self.log.push(format!("{:?} replication link down", self.t()));
            }
            return;
        }
        if !self.connected {
            let (a, b) = (&self.n[0], &self.n[1]);
            if a.primary && b.primary {
                self.split_brain = true;
                self.log.push("replication: split brain (both primary)".into());
                return;
            }
            // The source: the primary, else the newer data.
            let src = if a.primary {
                0
            } else if b.primary {
                1
            } else if a.ver >= b.ver {
                0
            } else {
                1
            };
            let tgt = 1 - src;
            if self.n[tgt].ver > self.n[src].ver {
                self.split_brain = true;
                self.log
                    .push("replication: split brain (target has writes the source lacks)".into());
                return;
            }
            self.connected = true;
            if self.n[tgt].ver != self.n[src].ver || self.n[tgt].disk == Disk::Inconsistent {
                self.n[tgt].disk = Disk::Inconsistent;
                self.resync_until = Some(self.now + self.resync_time);
            } else {
                self.n[0].disk = Disk::UpToDate;
                self.n[1].disk = Disk::UpToDate;
            }
            self.n[0].peer_outdated = false;
            self.n[1].peer_outdated = false;
            self.log.push(format!("{:?} replication connected", self.t()));
        }
        if let Some(t) = self.resync_until
            && self.now >= t
        {
            let v = self.n[0].ver.max(self.n[1].ver);
            self.n[0].ver = v;
            self.n[1].ver = v;
            self.n[0].disk = Disk::UpToDate;
            self.n[1].disk = Disk::UpToDate;
            self.resync_until = None;
        }
    }

    fn client(&mut self) {
        if !self.write {
            return;
        }
        let Some(m) = (0..2).find(|&i| self.n[i].up && self.n[i].primary) else { return };
        if self.n[m].frozen {
            return;
        }
        self.n[m].ver += 1;
        if self.connected {
            let o = 1 - m;
            if self.resync_until.is_none() {
                self.n[o].ver = self.n[m].ver;
            }
        }
        self.acked = self.acked.max(self.n[m].ver);
    }

    fn step(&mut self) {
        self.now += DT;
        // Deliver frames.
        let due: Vec<Msg> = {
            let (d, keep) = self.inflight.drain(..).partition(|m| m.at <= self.now);
            self.inflight = keep;
            d
        };
        for m in due {
            if !self.n[m.to].up || self.hb_cut[m.link] {
                continue;
            }
            let ev = self.n[m.to].det.heard(m.link, self.now);
            self.detector_events(m.to, ev);
            self.feed(m.to, Input::PeerView(m.view));
            if let Some(c) = m.control {
                self.feed(m.to, Input::Control(c));
            }
        }
        for i in 0..2 {
            if !self.n[i].up {
                continue;
            }
            let ev = self.n[i].det.tick(self.now);
            self.detector_events(i, ev);
            if let Some((step, at)) = self.n[i].running
                && self.now >= at
            {
                self.n[i].running = None;
                let o = self.finish_step(i, step);
                self.feed(i, Input::Done(o));
            }
            while let Some(x) = self.n[i].feed.pop_front() {
                self.feed(i, x);
            }
            let lv = self.local_view(i);
            self.feed(i, Input::Local(lv));
            let h = self.n[i].healthy;
            self.feed(i, Input::Health(h));
            self.feed(i, Input::Tick);
        }
        if self.now.duration_since(self.last_frame) >= self.timing.keepalive {
            self.last_frame = self.now;
            self.send(0, None);
            self.send(1, None);
        }
        self.replication();
        self.client();
        self.invariants();
    }

    fn detector_events(&mut self, i: usize, ev: Vec<Event>) {
        for e in ev {
            match e {
                Event::PeerAlive => self.feed(i, Input::Peer(PeerState::Alive)),
                Event::PeerDead => self.feed(i, Input::Peer(PeerState::Dead)),
                Event::LinkUp(_) | Event::LinkLate(..) | Event::LinkDown(_) => {}
            }
        }
    }

    fn invariants(&mut self) {
        let dual = self.n[0].up && self.n[1].up && self.n[0].primary && self.n[1].primary;
        // (In maintenance mode the operator owns the roles: two masters are theirs to end.)
        if dual && self.link_alive() && !self.maintenance {
            let since = *self.dual_since.get_or_insert(self.now);
            assert!(
                self.now.duration_since(since) < ms(3000),
                "two masters with a working heartbeat link for 3 s: {:#?}",
                self.log
            );
        } else {
            self.dual_since = None;
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    fn run_until(&mut self, limit: Duration, f: impl Fn(&World) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if f(self) {
                return true;
            }
            self.step();
        }
        f(self)
    }

    fn command(&mut self, i: usize, make_master: bool, force: bool) -> Answer {
        let token = self.next_token;
        self.next_token += 1;
        let input = if make_master {
            Input::MakeMaster { token, force }
        } else {
            Input::MakeSlave { token }
        };
        self.feed(i, input);
        let done = self.run_until(ms(15_000), |w| w.n[i].replies.iter().any(|r| r.0 == token));
        assert!(done, "no answer to the command: {:#?}", self.log);
        let pos = self.n[i].replies.iter().position(|r| r.0 == token).expect("answered");
        self.n[i].replies.remove(pos).1
    }

    fn master(&self) -> Option<usize> {
        let m: Vec<usize> = (0..2).filter(|&i| self.n[i].up && self.n[i].primary).collect();
        (m.len() == 1).then(|| m[0])
    }

    fn no_acknowledged_write_lost(&self) {
        let m = self.master().expect("one master");
        assert!(
            self.n[m].ver >= self.acked,
            "{} is master with version {} but the client saw {} acknowledged",
            self.n[m].name,
            self.n[m].ver,
            self.acked
        );
    }
}

// ---------------------------------------------------------------------------- scenarios

#[test]
fn cold_start_of_both_nodes_makes_the_configured_master_master() {
    let mut w = World::new(|_| {});
    w.start(0);
    w.start(1);
    assert!(w.run_until(ms(10_000), |w| w.n[0].primary && w.in_sync()), "{:#?}", w.log);
    w.run(ms(5000));
    assert!(w.n[0].primary && !w.n[1].primary);
    assert_eq!(w.n[1].promotions, 0);
}

#[test]
fn master_crash_fails_over_and_loses_no_acknowledged_write() {
    let mut w = World::running_pair(|_| {});
    w.crash(0);
    assert!(w.run_until(ms(5000), |w| w.n[1].primary), "beta did not take over: {:#?}", w.log);
    w.no_acknowledged_write_lost();
    // The old master returns: it becomes a slave, resyncs, and (failback off) stays a slave.
    w.start(0);
    assert!(w.run_until(ms(15_000), |w| w.in_sync()), "{:#?}", w.log);
    w.run(ms(5000));
    assert_eq!(w.master(), Some(1));
    assert!(!w.n[0].primary);
    w.no_acknowledged_write_lost();
}

#[test]
fn failback_auto_returns_the_role_once_in_sync() {
    let mut w = World::running_pair(|s| s.failback_auto = true);
    w.crash(0);
    assert!(w.run_until(ms(5000), |w| w.n[1].primary));
    w.start(0);
    assert!(w.run_until(ms(20_000), |w| w.n[0].primary && !w.n[1].primary), "{:#?}", w.log);
    w.no_acknowledged_write_lost();
    w.run(ms(5000));
    assert_eq!(w.master(), Some(0), "no ping-pong after failback");
}

#[test]
fn slave_crash_keeps_the_master_and_resyncs_on_return() {
    let mut w = World::running_pair(|_| {});
    w.crash(1);
    w.run(ms(5000));
    assert_eq!(w.master(), Some(0));
    w.start(1);
    assert!(w.run_until(ms(15_000), |w| w.in_sync()), "{:#?}", w.log);
    assert_eq!(w.master(), Some(0));
    assert_eq!(w.n[1].promotions, 0);
    w.no_acknowledged_write_lost();
}

#[test]
fn one_heartbeat_link_cut_changes_nothing() {
    for link in 0..2 {
        let mut w = World::running_pair(|_| {});
        w.hb_cut[link] = true;
        w.run(ms(10_000));
        assert_eq!(w.master(), Some(0));
        assert_eq!(w.n[1].promotions, 0);
        assert_eq!(w.n[1].det.link(link), Some(heartbeat::detector::LinkState::Down));
        assert_eq!(w.n[1].det.link(1 - link), Some(heartbeat::detector::LinkState::Up));
        assert_eq!(w.n[1].mgr.peer(), PeerState::Alive);
        w.no_acknowledged_write_lost();
    }
}

#[test]
fn replication_cut_outdates_the_slave_which_then_never_promotes() {
    let mut w = World::running_pair(|_| {});
    w.repl_cut = true;
    assert!(
        w.run_until(ms(3000), |w| w.n[1].disk == Disk::Outdated && w.n[0].peer_outdated),
        "{:#?}",
        w.log
    );
    assert!(w.n[0].peer_outdated, "the master records the peer as outdated");
    assert_eq!(w.master(), Some(0), "the master keeps serving");
    // Now every heartbeat link dies too: the Outdated slave must not take over.
    w.hb_cut = [true, true];
    w.run(ms(10_000));
    assert_eq!(w.n[1].promotions, 0);
    assert!(w.log.iter().any(|l| l.contains("not taking over")), "{:#?}", w.log);
    // Heal: resync, in sync, still one master.
    w.hb_cut = [false, false];
    w.repl_cut = false;
    assert!(w.run_until(ms(15_000), |w| w.in_sync()), "{:#?}", w.log);
    assert_eq!(w.master(), Some(0));
    w.no_acknowledged_write_lost();
}

#[test]
fn all_links_cut_follows_the_fencing_policy() {
    // dont-care and resource-only without a fence command: the slave takes over (the data may
    // split; the replicator reports it), and when a link returns one master remains.
    for policy in [Fencing::DontCare, Fencing::ResourceOnly] {
        let mut w = World::running_pair(|s| s.fencing = policy);
        w.hb_cut = [true, true];
        w.repl_cut = true;
        assert!(w.run_until(ms(5000), |w| w.n[1].primary), "{policy:?}: {:#?}", w.log);
        assert!(w.n[0].primary, "the partitioned master keeps serving");
        w.hb_cut = [false, false];
        assert!(w.run_until(ms(5000), |w| w.master().is_some()), "{policy:?}: {:#?}", w.log);
        assert_eq!(w.master(), Some(0), "the configured master keeps the role");
    }
    // resource-only with a fence command that fails: no takeover.
    let mut w = World::running_pair(|s| s.fence_command = true);
    w.n[1].fence_exit = Some(1);
    w.hb_cut = [true, true];
    w.repl_cut = true;
    w.run(ms(8000));
    assert_eq!(w.n[1].promotions, 0, "{:#?}", w.log);
    // ... and one that says the peer is fenced: takeover.
    let mut w = World::running_pair(|s| s.fence_command = true);
    w.n[1].fence_exit = Some(7);
    w.crash(0);
    assert!(w.run_until(ms(5000), |w| w.n[1].primary), "{:#?}", w.log);
    // Exit 6: outdate myself, no takeover.
    let mut w = World::running_pair(|s| s.fence_command = true);
    w.n[1].fence_exit = Some(6);
    w.hb_cut = [true, true];
    w.repl_cut = true;
    w.run(ms(8000));
    assert_eq!(w.n[1].promotions, 0);
    assert_eq!(w.n[1].disk, Disk::Outdated);
}

#[test]
fn resource_and_stonith_freezes_the_master_until_the_peer_is_fenced() {
    let mut w = World::running_pair(|s| {
        s.fencing = Fencing::ResourceAndStonith;
        s.fence_command = true;
    });
    // alpha's fence command fails at first: I/O stays frozen, no write is acknowledged.
    w.n[0].fence_exit = Some(1);
    w.n[1].fence_exit = Some(1);
    w.crash(1);
    assert!(w.run_until(ms(3000), |w| w.n[0].frozen), "{:#?}", w.log);
    let acked = w.acked;
    w.run(ms(3000));
    assert_eq!(w.acked, acked, "a frozen master acknowledged writes");
    assert!(w.n[0].frozen);
    // The peer comes back: a new episode; when it dies again and the fence works, I/O resumes.
    w.start(1);
    assert!(w.run_until(ms(5000), |w| w.n[0].mgr.peer() == PeerState::Alive));
    w.n[0].fence_exit = Some(7);
    w.crash(1);
    assert!(w.run_until(ms(5000), |w| !w.n[0].frozen && w.acked > acked), "{:#?}", w.log);
    // Fenced: I/O stays thawed for the rest of the episode.
    w.run(ms(5000));
    assert!(!w.n[0].frozen, "refroze after a successful fence: {:#?}", w.log);
}

#[test]
fn resource_and_stonith_resumes_io_once_the_live_peer_is_outdated() {
    let mut w = World::running_pair(|s| {
        s.fencing = Fencing::ResourceAndStonith;
        s.fence_command = true;
    });
    w.repl_cut = true;
    assert!(w.run_until(ms(2000), |w| w.n[0].frozen), "{:#?}", w.log);
    assert!(
        w.run_until(ms(3000), |w| !w.n[0].frozen && w.n[1].disk == Disk::Outdated),
        "{:#?}",
        w.log
    );
    let acked = w.acked;
    w.run(ms(500));
    assert!(w.acked > acked, "writes resume once the peer is outdated");
    assert_eq!(w.n[1].promotions, 0);
}

#[test]
fn flapping_links_never_cause_a_failover() {
    let mut w = World::running_pair(|_| {});
    for k in 0..60 {
        // Links take turns going down for 1.5 s, overlapping so one is always up.
        w.hb_cut = [k % 2 == 0, k % 2 == 1];
        w.run(ms(1500));
    }
    assert_eq!(w.n[1].promotions, 0, "{:#?}", w.log);
    assert_eq!(w.master(), Some(0));
    w.no_acknowledged_write_lost();
}

#[test]
fn make_master_is_refused_during_resync_and_works_in_sync() {
    let mut w = World::running_pair(|_| {});
    w.crash(1);
    w.run(ms(2000));
    w.resync_time = ms(8000);
    w.start(1);
    assert!(
        w.run_until(ms(5000), |w| w.resync_until.is_some()
            && w.n[1].mgr.peer() == PeerState::Alive),
        "{:#?}",
        w.log
    );
    let r = w.command(1, true, false);
    assert!(matches!(r, Err(Refusal::Stale { why: Stale::Resyncing, .. })), "{r:?}");
    let r = w.command(1, true, true);
    assert!(
        matches!(r, Err(Refusal::Stale { peer_master: true, .. })),
        "force cannot override a live master: {r:?}"
    );
    assert_eq!(w.master(), Some(0));
    assert!(w.run_until(ms(15_000), |w| w.in_sync()));
    w.run(ms(500));
    let r = w.command(1, true, false);
    assert!(r.is_ok(), "{r:?}: {:#?}", w.log);
    assert_eq!(w.master(), Some(1));
    w.no_acknowledged_write_lost();
    // And back, from the master's side with make-slave.
    w.run(ms(1000));
    let r = w.command(1, false, false);
    assert!(r.is_ok(), "{r:?}: {:#?}", w.log);
    assert_eq!(w.master(), Some(0));
    w.no_acknowledged_write_lost();
    // No automatic failback after an operator's switchover... and none either way here.
    w.run(ms(5000));
    assert_eq!(w.master(), Some(0));
}

#[test]
fn make_master_on_the_master_and_make_slave_on_the_slave_are_no_ops() {
    let mut w = World::running_pair(|_| {});
    assert_eq!(w.command(0, true, false), Ok("already the running master".into()));
    assert_eq!(w.command(1, false, false), Ok("already a slave".into()));
}

#[test]
fn make_master_with_an_unreachable_peer_needs_force() {
    let mut w = World::running_pair(|_| {});
    w.hb_cut = [true, true];
    w.repl_cut = true;
    w.n[0].up = false; // power loss without the crash bookkeeping
    w.n[0].primary = false;
    // The slave would take over by itself; make it Outdated first so only force helps.
    w.n[1].disk = Disk::Outdated;
    w.run(ms(3000));
    let r = w.command(1, true, false);
    assert!(r == Err(Refusal::PeerUnreachable), "{r:?}");
    let r = w.command(1, true, true);
    assert!(r.is_ok(), "{r:?}");
    assert!(w.n[1].primary);
}

#[test]
fn health_handover_moves_the_master_to_a_healthy_in_sync_slave() {
    let mut w = World::running_pair(|_| {});
    w.n[0].healthy = false;
    assert!(w.run_until(ms(8000), |w| w.master() == Some(1)), "{:#?}", w.log);
    w.no_acknowledged_write_lost();
    // Healthy again: with failback off the role stays where it is.
    w.n[0].healthy = true;
    w.run(ms(5000));
    assert_eq!(w.master(), Some(1));
    // Both unhealthy: no ping-pong.
    w.n[1].healthy = false;
    w.n[0].healthy = false;
    w.run(ms(5000));
    assert_eq!(w.master(), Some(1));
}

#[test]
fn health_handover_then_failback_auto_when_healthy_again() {
    let mut w = World::running_pair(|s| s.failback_auto = true);
    w.n[0].healthy = false;
    assert!(w.run_until(ms(8000), |w| w.master() == Some(1)), "{:#?}", w.log);
    w.n[0].healthy = true;
    assert!(w.run_until(ms(8000), |w| w.master() == Some(0)), "{:#?}", w.log);
    w.no_acknowledged_write_lost();
}

#[test]
fn a_node_starting_alone_waits_and_does_not_promote_unknown_data() {
    let mut w = World::new(|_| {});
    w.start(0);
    w.run(ms(10_000));
    assert!(!w.n[0].primary, "Consistent data promoted without the peer");
    assert!(w.log.iter().any(|l| l.contains("not taking over")), "{:#?}", w.log);
    // With "peer outdated" on disk the data is known good: it promotes after initdead.
    let mut w = World::new(|_| {});
    w.n[0].peer_outdated = true;
    w.start(0);
    w.run(ms(2500));
    assert!(!w.n[0].primary, "promoted before initdead");
    assert!(w.run_until(ms(3000), |w| w.n[0].primary), "{:#?}", w.log);
}

#[test]
fn a_lost_control_message_is_resent() {
    let mut w = World::running_pair(|_| {});
    // Drop everything for a moment while the switchover request goes out.
    w.hb_cut = [true, true];
    let token = 99;
    w.feed(1, Input::MakeMaster { token, force: false });
    w.run(ms(400));
    w.hb_cut = [false, false];
    assert!(w.run_until(ms(10_000), |w| w.n[1].replies.iter().any(|r| r.0 == token)));
    assert!(w.n[1].replies.iter().any(|r| r.0 == token && r.1.is_ok()), "{:#?}", w.log);
    assert_eq!(w.master(), Some(1));
}

/// Random crashes, restarts, cuts, heals, health changes and switchovers; the invariants are
/// checked at every step of every run.
#[test]
fn random_chaos_keeps_the_invariants() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for run in 0..200 {
        let policy =
            [Fencing::DontCare, Fencing::ResourceOnly, Fencing::ResourceAndStonith][run % 3];
        let mut w = World::running_pair(|s| {
            s.fencing = policy;
            s.fence_command = policy == Fencing::ResourceAndStonith;
            s.failback_auto = run % 4 == 0;
        });
        // The fence command works in half of the stonith runs.
        for n in &mut w.n {
            n.fence_exit = Some(if run % 6 == 2 { 7 } else { 1 });
        }
        for _ in 0..25 {
            match rnd(11) {
                9 => {
                    let on = !w.maintenance;
                    w.set_maintenance(on);
                }
                10 => w.manual_switchover(),
                0 => {
                    let i = usize::from(rnd(2) == 1);
                    if w.n[i].up && w.n[1 - i].up {
                        w.crash(i);
                    }
                }
                1 | 2 => {
                    for i in 0..2 {
                        if !w.n[i].up {
                            w.start(i);
                        }
                    }
                }
                3 => w.hb_cut[usize::from(rnd(2) == 1)] = true,
                4 => w.hb_cut = [false, false],
                5 => w.repl_cut = rnd(2) == 0,
                6 => {
                    let i = usize::from(rnd(2) == 1);
                    w.n[i].healthy = !w.n[i].healthy;
                }
                7 => {
                    let i = usize::from(rnd(2) == 1);
                    if w.n[i].up {
                        let token = 10_000 + rnd(1 << 20);
                        w.feed(i, Input::MakeMaster { token, force: false });
                    }
                }
                _ => {
                    // A partition that healed leaves a split brain in the replicator; the
                    // operator resolves it (discard the slave's data), as they would.
                    if w.split_brain && w.master().is_some() {
                        let m = w.master().expect("one");
                        w.n[1 - m].ver = 0;
                        w.n[1 - m].disk = Disk::Inconsistent;
                        w.split_brain = false;
                    }
                }
            }
            w.run(ms(100 + rnd(3000)));
        }
        // Heal everything: the pair must settle with exactly one master. (Maintenance mode ends
        // once the links are back: a takeover decided the instant a partition heals races the
        // model's resync, which the real replicator answers by refusing the promotion.)
        w.hb_cut = [false, false];
        w.repl_cut = false;
        for i in 0..2 {
            w.n[i].healthy = true;
            if !w.n[i].up {
                w.start(i);
            }
        }
        if w.maintenance {
            w.run(ms(2000));
            w.set_maintenance(false);
        }
        w.run(ms(5000));
        if w.split_brain {
            if let Some(m) = w.master() {
                w.n[1 - m].ver = 0;
                w.n[1 - m].disk = Disk::Inconsistent;
            }
            w.split_brain = false;
        }
        let settled = w.run_until(ms(30_000), |w| w.master().is_some() && w.in_sync());
        assert!(settled, "run {run}: no single master in sync after healing: {:#?}", w.log);
    }
}
