//! The cluster manager: who is the running master, and when that changes. Pure: it takes
//! inputs (what the failure detector concluded, the peer's advertised state, the local
//! replicator's state, health, operator commands, results of actions) with `now`, and returns
//! actions for the daemon to execute (fence, promote, VIP, services, export, control messages).
//!
//! Takeover runs fence → promote → VIP up → services → export open, one step at a time; the
//! daemon reports each step's outcome with [`Input::Done`]. Release is the reverse: export
//! closed (in-flight requests drained) → services → VIP down → demote.
//!
//! The rules, in the order they are looked at (see `decide`):
//! - a master that sees the peer master too (a partition healed) releases unless it is the
//!   configured master, which keeps the role and re-announces its VIP;
//! - a master whose replication link broke while the peer still answers on a heartbeat link
//!   outdates the peer over that link, so the peer can never promote its stale data;
//! - with `resource-and-stonith`, a master that loses its peer freezes I/O until the fence
//!   command confirms the peer is gone;
//! - a master that is unhealthy hands over to a healthy, in-sync slave;
//! - a slave whose peer is dead on every link takes over if its data is UpToDate (after the
//!   fence command, if the policy asks for one); never with Outdated/Inconsistent data;
//! - with the peer alive and nobody master, the configured master takes the role once its data
//!   is UpToDate (the other node only if the configured master is unhealthy);
//! - with `failback = "auto"`, the configured master takes back the role once in sync, unless
//!   the operator moved it away on purpose;
//! - `make-master` / `make-slave` are coordinated switchovers: the master releases first, the
//!   new master promotes only when the replicator shows it in sync.

pub mod health;
#[cfg(test)]
mod sim;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use heartbeat::detector::PeerState;
use heartbeat::frame::Control;

/// Fencing policy (DRBD's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// No fencing: the survivor promotes (split brain possible after a partition).
    DontCare,
    /// Outdate the peer over a surviving link; run the fence command (if any) before taking over.
    ResourceOnly,
    /// As resource-only, and a master that loses its peer freezes I/O until the fence command
    /// confirms the peer is gone; a takeover needs the fence command's confirmation.
    ResourceAndStonith,
}

/// Settings of the manager.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node is the configured (preferred) master.
    pub configured_master: bool,
    pub failback_auto: bool,
    pub fencing: Fencing,
    /// A fence command is configured.
    pub fence_command: bool,
    /// Wait before fencing (per node, so both sides never fence at once).
    pub fence_delay: Duration,
    /// How long a switchover may take before it is given up.
    pub switchover_timeout: Duration,
    /// How often an unanswered control request is sent again.
    pub resend: Duration,
    /// Wait after a failed automatic takeover or fencing before trying again.
    pub retry: Duration,
    /// Number of resources (outdate masks cover these bits).
    pub resources: usize,
}

impl Settings {
    fn all(&self) -> u32 {
        if self.resources >= 32 { u32::MAX } else { (1u32 << self.resources) - 1 }
    }
}

/// The local replicator, summarised over every resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocalView {
    /// Every resource is Primary.
    pub primary: bool,
    /// Some resource is Primary.
    pub any_primary: bool,
    /// Every disk is UpToDate.
    pub uptodate: bool,
    /// Every resource is connected, not syncing, the peer's disk UpToDate, nothing out of sync.
    pub in_sync: bool,
    /// A resync runs on some resource.
    pub resyncing: bool,
    /// The replication link reports the peer Primary on some resource.
    pub peer_primary: bool,
    /// Resources whose replication link is down (bit i = resource i).
    pub disconnected: u32,
    /// The worst local disk state, for messages ("Outdated", "Inconsistent", ...).
    pub worst_disk: &'static str,
}

/// The peer as its heartbeat frames describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerView {
    pub primary: bool,
    pub any_primary: bool,
    pub uptodate: bool,
    pub healthy: bool,
}

/// Token of an operator command waiting for its answer.
pub type Token = u64;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed (the daemon calls this every few hundred milliseconds).
    Tick,
    /// The failure detector's verdict changed.
    Peer(PeerState),
    /// An authenticated frame described the peer.
    PeerView(PeerView),
    /// A control message from the peer.
    Control(Control),
    /// The local replicator's state.
    Local(LocalView),
    /// Local health (all checks passing).
    Health(bool),
    /// `duet make-master [--force]`.
    MakeMaster { token: Token, force: bool },
    /// `duet make-slave`.
    MakeSlave { token: Token },
    /// The daemon is stopping: hand over if asked, but take nothing over.
    Stopping,
    /// The running step finished.
    Done(Outcome),
    /// An `Outdate` action finished.
    OutdateDone { id: u64, mask: u32, ok: bool },
}

/// Outcome of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    /// The fence command's exit code (None: it could not run or timed out).
    Fence(Option<i32>),
}

/// A step of a takeover or release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Freeze,
    Fence {
        delay: Duration,
    },
    Thaw,
    /// End the replication session with the peer now (it reconnects when the peer is back).
    DropPeer,
    Promote {
        force: bool,
    },
    VipUp,
    /// Services placed on the master start, those placed on the slave stop.
    ServicesMaster,
    ExportOpen,
    ExportClose,
    /// Services placed on the master stop, those placed on the slave start.
    ServicesSlave,
    VipDown,
    Demote,
}

/// What the daemon should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run one step; answer with `Input::Done`.
    Run(Step),
    /// Send a control message on every heartbeat link.
    Send(Control),
    /// Mark the resources in `mask` Outdated on disk; answer with `Input::OutdateDone`.
    Outdate { id: u64, mask: u32 },
    /// Remember on disk that the peer's resources in `mask` are Outdated.
    PeerOutdated { mask: u32 },
    /// Send the VIP announcements again (won back after a dual-master episode).
    Reannounce,
    /// Answer an operator command.
    Reply { token: Token, result: Result<String, String> },
    /// A line for the event log (`duet events`).
    Event(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Takeover,
    Release,
    Stonith,
}

/// What to do when a transition ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    Nothing,
    Reply(Token),
    Released(u64),
    TookOver(u64),
}

#[derive(Debug, Clone)]
struct Transition {
    kind: Kind,
    steps: VecDeque<Step>,
    why: String,
    after: After,
    warnings: Vec<String>,
}

/// Who asked for a make-master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Operator(Token),
    /// The peer's `TakeOver` request (make-slave there, or its health handover).
    Peer(u64),
    /// Failback or health, decided here.
    Auto,
}

#[derive(Debug, Clone)]
enum Pending {
    /// We asked the peer to release; waiting for `Released`.
    Released { id: u64, origin: Origin, deadline: Instant, sent: Instant },
    /// The peer released; waiting for the replicator to show us in sync with a Secondary peer.
    Sync { origin: Origin, deadline: Instant },
    /// We asked the peer to take over; waiting for `TookOver`.
    TookOver { id: u64, origin: Origin, health: bool, deadline: Instant, sent: Instant },
}

/// The manager.
#[derive(Debug)]
pub struct Manager {
    s: Settings,
    now: Instant,
    next_id: u64,
    peer: PeerState,
    peer_view: Option<PeerView>,
    local: LocalView,
    healthy: bool,
    transition: Option<Transition>,
    pending: Option<Pending>,
    /// No automatic promotion before this (we just released at the peer's request).
    hold_until: Option<Instant>,
    /// The operator moved the master role away from this node: no automatic failback.
    operator_released: bool,
    /// Outdate request in flight: (id, mask, last sent).
    outdating: Option<(u64, u32, Instant)>,
    /// Peer resources known Outdated.
    peer_outdated: u32,
    /// I/O is frozen (resource-and-stonith: the replication link broke and the peer is neither
    /// outdated nor fenced yet).
    frozen: bool,
    /// The daemon is stopping.
    stopping: bool,
    /// Both nodes were master at once (a partition healed); re-announce when the peer releases.
    dual_seen: bool,
    /// The fence command confirmed the peer gone (this episode: until the peer is heard again
    /// or replication is back).
    fenced: bool,
    /// The last "not taking over because ..." line, so it is said once per reason.
    said: Option<String>,
    /// No automatic takeover before this (the last one failed).
    retry_at: Option<Instant>,
    /// Requests from the peer being worked on (or answered), by id.
    working: VecDeque<u64>,
    /// Replies already sent, by request id, for requests the peer may resend.
    replied: VecDeque<(u64, Control)>,
    out: Vec<Action>,
}

impl Manager {
    pub fn new(s: Settings, now: Instant) -> Self {
        Self {
            s,
            now,
            next_id: 1,
            peer: PeerState::Unknown,
            peer_view: None,
            local: LocalView::default(),
            healthy: true,
            transition: None,
            pending: None,
            hold_until: None,
            operator_released: false,
            outdating: None,
            peer_outdated: 0,
            frozen: false,
            fenced: false,
            dual_seen: false,
            stopping: false,
            said: None,
            retry_at: None,
            working: VecDeque::new(),
            replied: VecDeque::new(),
            out: Vec::new(),
        }
    }

    /// Seeds request ids (pass something random, so ids differ across restarts).
    pub fn with_id_seed(mut self, seed: u64) -> Self {
        self.next_id = seed | 1;
        self
    }

    /// Feeds one input; returns what to do.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        self.now = now;
        match input {
            Input::Tick => {}
            Input::Peer(p) => self.peer_changed(p),
            Input::PeerView(v) => {
                if v.primary {
                    self.hold_until = None;
                }
                if self.dual_seen && !v.any_primary {
                    self.dual_seen = false;
                    if self.local.any_primary {
                        // The loser's own announcements may have come after ours.
                        self.event("the peer released after the dual-master episode: re-announcing the VIPs");
                        self.out.push(Action::Reannounce);
                    }
                }
                self.peer_view = Some(v);
            }
            Input::Control(c) => self.control(c),
            Input::Local(l) => {
                // Reconnected resources are no longer known-outdated on the peer.
                self.peer_outdated &= l.disconnected;
                self.local = l;
            }
            Input::Health(h) => {
                if h != self.healthy {
                    self.event(if h {
                        "local health checks pass again"
                    } else {
                        "local health checks fail"
                    });
                }
                self.healthy = h;
            }
            Input::MakeMaster { token, force } => self.make_master(Origin::Operator(token), force),
            Input::MakeSlave { token } => self.make_slave(Origin::Operator(token), false),
            Input::Stopping => self.stopping = true,
            Input::Done(o) => self.step_done(o),
            Input::OutdateDone { id, mask, ok } => {
                if ok {
                    self.event(&format!(
                        "outdated local data at the peer's request (resources {mask:#x})"
                    ));
                    self.reply(Control::Outdated { id, mask });
                } else {
                    self.event("could not mark the local data Outdated (metadata write failed)");
                }
            }
        }
        self.timeouts();
        self.decide();
        std::mem::take(&mut self.out)
    }

    /// True while a takeover, release or fencing runs.
    pub fn busy(&self) -> bool {
        self.transition.is_some() || self.pending.is_some()
    }

    pub fn peer(&self) -> PeerState {
        self.peer
    }

    /// What runs now, for `duet status`.
    pub fn activity(&self) -> Option<String> {
        if let Some(t) = &self.transition {
            return Some(format!("{:?}: {} (next: {:?})", t.kind, t.why, t.steps.front()));
        }
        self.pending.as_ref().map(|p| match p {
            Pending::Released { .. } => "switchover: waiting for the peer to release".into(),
            Pending::Sync { .. } => "switchover: waiting to be in sync with the peer".into(),
            Pending::TookOver { .. } => "handover: waiting for the peer to take over".into(),
        })
    }

    fn id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(2);
        self.next_id
    }

    fn event(&mut self, s: &str) {
        self.out.push(Action::Event(s.to_string()));
    }

    /// Says "not doing X because Y" once until the reason changes.
    fn say_once(&mut self, s: String) {
        if self.said.as_deref() != Some(&s) {
            self.event(&s);
            self.said = Some(s);
        }
    }

    fn reply(&mut self, c: Control) {
        self.replied.push_back((c.id(), c.clone()));
        if self.replied.len() > 16 {
            self.replied.pop_front();
        }
        self.out.push(Action::Send(c));
    }

    fn peer_changed(&mut self, p: PeerState) {
        if p == self.peer {
            return;
        }
        let before = std::mem::replace(&mut self.peer, p);
        match p {
            PeerState::Alive => {
                self.event("peer is alive");
                self.fenced = false;
                if self.local.any_primary && before == PeerState::Dead {
                    // Back from a partition: the peer may have announced our VIPs meanwhile.
                    self.event(
                        "the peer is back while this node is master: re-announcing the VIPs",
                    );
                    self.out.push(Action::Reannounce);
                }
            }
            PeerState::Dead => {
                self.event("peer is dead on every heartbeat link");
                self.peer_view = None;
                // A new episode: whatever failed before may work now.
                self.retry_at = None;
            }
            PeerState::Unknown => {}
        }
    }

    // ------------------------------------------------------------------ control messages

    fn control(&mut self, c: Control) {
        // Requests arrive once per link and again when resent: answer a repeat with the answer
        // already given, and ignore one still being worked on.
        if matches!(c, Control::Outdate { .. } | Control::Release { .. } | Control::TakeOver { .. })
        {
            if let Some((_, r)) = self.replied.iter().find(|(id, _)| *id == c.id()).cloned() {
                self.out.push(Action::Send(r));
                return;
            }
            if self.working.contains(&c.id()) {
                return;
            }
            self.working.push_back(c.id());
            if self.working.len() > 16 {
                self.working.pop_front();
            }
        }
        match c {
            Control::Outdate { id, mask } => {
                if self.local.any_primary {
                    self.event("the peer asked to outdate our data, but we are master: refused (dual master?)");
                } else {
                    self.out.push(Action::Outdate { id, mask: mask & self.s.all() });
                }
            }
            Control::Outdated { id, mask } => {
                if self.outdating.is_some_and(|o| o.0 == id) {
                    self.outdating = None;
                    self.peer_outdated |= mask;
                    self.event(&format!("peer confirmed its data Outdated (resources {mask:#x})"));
                    self.out.push(Action::PeerOutdated { mask });
                }
            }
            Control::Release { id } => self.release_requested(id),
            Control::Released { id, ok, reason } => {
                let Some(Pending::Released { id: want, origin, .. }) = self.pending.clone() else {
                    return;
                };
                if want != id {
                    return;
                }
                if ok {
                    self.event("peer released the master role; waiting to be in sync");
                    self.pending = Some(Pending::Sync {
                        origin,
                        deadline: self.now + self.s.switchover_timeout,
                    });
                    self.hold_until = None;
                } else {
                    self.pending = None;
                    self.finish(origin, Err(format!("the peer refused to release: {reason}")));
                }
            }
            Control::TakeOver { id, force } => {
                if self.local.any_primary {
                    self.reply(Control::TookOver { id, ok: true, reason: "already master".into() });
                } else if !self.healthy {
                    self.reply(Control::TookOver {
                        id,
                        ok: false,
                        reason: "the slave's health checks fail too".into(),
                    });
                } else {
                    self.make_master(Origin::Peer(id), force);
                }
            }
            Control::TookOver { id, ok, reason } => {
                let Some(Pending::TookOver { id: want, origin, .. }) = self.pending.clone() else {
                    return;
                };
                if want != id {
                    return;
                }
                self.pending = None;
                let r = if ok {
                    Ok("the peer is the running master now".to_string())
                } else {
                    Err(format!("the peer did not take over: {reason}"))
                };
                self.finish(origin, r);
            }
        }
    }

    fn release_requested(&mut self, id: u64) {
        if !self.local.any_primary {
            self.hold_until = Some(self.now + self.s.switchover_timeout);
            self.reply(Control::Released { id, ok: true, reason: "not master".into() });
            return;
        }
        let refuse = if self.transition.is_some() {
            Some("a takeover or release is already running here".to_string())
        } else if !self.local.in_sync {
            Some("the requester is not in sync with this master (resync running or link down); wait for `duet status` to show it UpToDate".into())
        } else {
            None
        };
        if let Some(r) = refuse {
            self.event(&format!("refused to release for the peer: {r}"));
            self.reply(Control::Released { id, ok: false, reason: r });
            return;
        }
        // A health handover we asked for is not an operator's decision.
        let health = matches!(self.pending, Some(Pending::TookOver { health: true, .. }));
        if !health {
            self.operator_released = true;
        }
        self.hold_until = Some(self.now + self.s.switchover_timeout);
        self.start(
            Kind::Release,
            "the peer takes over the master role".into(),
            After::Released(id),
        );
    }

    // ------------------------------------------------------------------ operator commands

    fn make_master(&mut self, origin: Origin, force: bool) {
        if self.stopping {
            return self.finish(origin, Err("this node is stopping".into()));
        }
        if self.transition.is_some() || self.pending.is_some() {
            return self
                .finish(origin, Err("a switchover is already running; see `duet status`".into()));
        }
        if self.local.primary {
            return self.finish(origin, Ok("already the running master".into()));
        }
        let l = self.local;
        match self.peer {
            PeerState::Alive => {
                let stale = if l.resyncing {
                    Some(
                        "a resync is running; wait until `duet status` shows both nodes UpToDate"
                            .to_string(),
                    )
                } else if !l.uptodate {
                    Some(format!("the local data is {}, not UpToDate", l.worst_disk))
                } else if !l.in_sync {
                    Some("this node is not in sync with the peer (replication link down, or blocks out of sync)".into())
                } else {
                    None
                };
                let peer_master = self.peer_view.is_some_and(|v| v.any_primary);
                if let Some(why) = stale {
                    let hint = if peer_master {
                        " (--force cannot help while the peer is master: it would throw away the master's newer writes)"
                    } else if force {
                        ""
                    } else {
                        "; --force promotes anyway"
                    };
                    if peer_master || !force {
                        return self.finish(origin, Err(format!("refused: {why}{hint}")));
                    }
                }
                if peer_master {
                    let id = self.id();
                    self.event("switchover: asking the peer to release the master role");
                    self.out.push(Action::Send(Control::Release { id }));
                    self.pending = Some(Pending::Released {
                        id,
                        origin,
                        deadline: self.now + self.s.switchover_timeout,
                        sent: self.now,
                    });
                } else {
                    let after = self.after(origin);
                    self.takeover("make-master: no master running".into(), false, force, after);
                }
            }
            PeerState::Dead | PeerState::Unknown => {
                if !force {
                    let why = if self.peer == PeerState::Unknown {
                        "refused: the peer has not been heard yet (waiting up to initdead_ms); try again in a moment, or if you know the peer is down, run `duet make-master --force`"
                    } else {
                        "refused: the peer is unreachable on every heartbeat link, so the switchover cannot be coordinated; if you know the peer is down, run `duet make-master --force`"
                    };
                    return self.finish(origin, Err(why.into()));
                }
                let after = self.after(origin);
                self.takeover(
                    "make-master --force with the peer unreachable".into(),
                    false,
                    true,
                    after,
                );
            }
        }
    }

    fn make_slave(&mut self, origin: Origin, health: bool) {
        if self.transition.is_some() || self.pending.is_some() {
            return self
                .finish(origin, Err("a switchover is already running; see `duet status`".into()));
        }
        if !self.local.any_primary {
            return self.finish(origin, Ok("already a slave".into()));
        }
        if self.peer != PeerState::Alive {
            return self.finish(
                origin,
                Err(
                    "refused: the peer is unreachable; there is no node to hand the master role to"
                        .into(),
                ),
            );
        }
        if !self.local.in_sync {
            return self.finish(origin, Err("refused: the peer is not in sync with this master (resync running or link down); wait until `duet status` shows it UpToDate".into()));
        }
        let id = self.id();
        self.event(if health {
            "handing over: local health checks fail and the peer is healthy and in sync"
        } else {
            "switchover: asking the peer to take over"
        });
        self.out.push(Action::Send(Control::TakeOver { id, force: false }));
        self.pending = Some(Pending::TookOver {
            id,
            origin,
            health,
            deadline: self.now + self.s.switchover_timeout,
            sent: self.now,
        });
    }

    fn after(&self, origin: Origin) -> After {
        match origin {
            Origin::Operator(t) => After::Reply(t),
            Origin::Peer(id) => After::TookOver(id),
            Origin::Auto => After::Nothing,
        }
    }

    /// Answers whoever asked.
    fn finish(&mut self, origin: Origin, r: Result<String, String>) {
        match origin {
            Origin::Operator(token) => self.out.push(Action::Reply { token, result: r }),
            Origin::Peer(id) => {
                let (ok, reason) = split(r);
                self.reply(Control::TookOver { id, ok, reason });
            }
            Origin::Auto => {
                if let Err(e) = r {
                    self.event(&e);
                    self.retry_at = Some(self.now + self.s.retry);
                }
            }
        }
    }

    // ------------------------------------------------------------------ transitions

    fn takeover(&mut self, why: String, peer_dead: bool, force: bool, after: After) {
        let mut steps = VecDeque::new();
        let fence = peer_dead
            && match self.s.fencing {
                Fencing::DontCare => false,
                Fencing::ResourceOnly => self.s.fence_command,
                Fencing::ResourceAndStonith => true,
            };
        if fence {
            steps.push_back(Step::Fence { delay: self.s.fence_delay });
        }
        if peer_dead || force {
            // The heartbeat's verdict is authoritative: a replication session the dead peer
            // left behind (no RST after a power loss) would keep the peer "Primary" until its
            // ping timeout and block the promotion.
            steps.push_back(Step::DropPeer);
        }
        steps.extend([
            Step::Promote { force },
            Step::VipUp,
            Step::ServicesMaster,
            Step::ExportOpen,
        ]);
        self.start_steps(Kind::Takeover, why, after, steps);
    }

    fn start(&mut self, kind: Kind, why: String, after: After) {
        let steps = match kind {
            Kind::Release => VecDeque::from([
                Step::ExportClose,
                Step::ServicesSlave,
                Step::VipDown,
                Step::Demote,
            ]),
            Kind::Takeover | Kind::Stonith => {
                unreachable!("takeovers and fencing start through start_steps()")
            }
        };
        self.start_steps(kind, why, after, steps);
    }

    fn start_steps(&mut self, kind: Kind, why: String, after: After, steps: VecDeque<Step>) {
        self.event(&format!(
            "{}: {why}",
            match kind {
                Kind::Takeover => "taking over",
                Kind::Release => "releasing",
                Kind::Stonith => "fencing",
            }
        ));
        self.said = None;
        let first = *steps.front().expect("transitions have steps");
        self.transition = Some(Transition { kind, steps, why, after, warnings: Vec::new() });
        self.out.push(Action::Run(first));
    }

    fn step_done(&mut self, o: Outcome) {
        let Some(mut t) = self.transition.take() else { return };
        let Some(step) = t.steps.pop_front() else { return };
        let abort: Option<String> = match (step, &o) {
            (Step::Fence { .. }, Outcome::Fence(Some(3 | 4 | 5 | 7))) => {
                let code = if let Outcome::Fence(Some(c)) = o { c } else { 0 };
                self.event(&format!(
                    "fence command: peer {} (exit {code})",
                    match code {
                        3 => "is inconsistent",
                        4 => "is outdated",
                        5 => "is down",
                        _ => "was fenced",
                    }
                ));
                None
            }
            (Step::Fence { .. }, Outcome::Fence(Some(6))) => {
                let id = self.id();
                self.out.push(Action::Outdate { id, mask: self.s.all() });
                Some(
                    "fence command says the peer is primary and we must outdate ourselves (exit 6)"
                        .into(),
                )
            }
            (Step::Fence { .. }, Outcome::Fence(code)) => Some(match code {
                Some(c) => format!("fence command failed (exit {c})"),
                None => "fence command could not run or timed out".into(),
            }),
            (Step::Promote { .. } | Step::Demote, Outcome::Failed(e)) => Some(e.clone()),
            (_, Outcome::Failed(e)) => {
                self.event(&format!("{step:?} failed: {e}"));
                t.warnings.push(format!("{step:?}: {e}"));
                None
            }
            (_, Outcome::Ok | Outcome::Fence(_)) => None,
        };
        if let Some(why) = abort {
            self.event(&format!("{:?} stopped at {step:?}: {why}", t.kind));
            self.retry_at = Some(self.now + self.s.retry);
            let r = Err(format!("{step:?} failed: {why}"));
            self.conclude(t.after, r);
            return;
        }
        // The replicator's report follows; until then this is what the step did.
        match step {
            Step::Promote { .. } => {
                self.operator_released = false;
                self.local.primary = true;
                self.local.any_primary = true;
                self.local.uptodate = true;
            }
            Step::Demote => {
                self.local.primary = false;
                self.local.any_primary = false;
            }
            Step::Freeze => self.frozen = true,
            Step::Thaw => self.frozen = false,
            Step::Fence { .. } if t.kind == Kind::Stonith => self.fenced = true,
            _ => {}
        }
        match t.steps.front() {
            Some(next) => {
                self.out.push(Action::Run(*next));
                self.transition = Some(t);
            }
            None => {
                let msg = match t.kind {
                    Kind::Takeover => "this node is the running master",
                    Kind::Release => "this node is a slave",
                    Kind::Stonith => "fencing step done",
                };
                self.event(&format!("{msg} ({})", t.why));
                let r = if t.warnings.is_empty() {
                    Ok(msg.to_string())
                } else {
                    Ok(format!("{msg}, with errors: {}", t.warnings.join("; ")))
                };
                self.conclude(t.after, r);
            }
        }
    }

    fn conclude(&mut self, after: After, r: Result<String, String>) {
        match after {
            After::Nothing => {}
            After::Reply(token) => self.out.push(Action::Reply { token, result: r }),
            After::Released(id) => {
                let (ok, reason) = split(r);
                self.reply(Control::Released { id, ok, reason });
            }
            After::TookOver(id) => self.finish(Origin::Peer(id), r),
        }
    }

    // ------------------------------------------------------------------ timers and policy

    fn timeouts(&mut self) {
        let now = self.now;
        let resend = self.s.resend;
        match self.pending.clone() {
            Some(Pending::Released { id, origin, deadline, sent }) => {
                if now >= deadline {
                    self.pending = None;
                    self.finish(
                        origin,
                        Err("the peer did not answer the release request in time".into()),
                    );
                } else if now.saturating_duration_since(sent) >= resend {
                    self.out.push(Action::Send(Control::Release { id }));
                    self.pending = Some(Pending::Released { id, origin, deadline, sent: now });
                }
            }
            Some(Pending::TookOver { id, origin, health, deadline, sent }) => {
                if now >= deadline {
                    self.pending = None;
                    self.finish(origin, Err("the peer did not take over in time".into()));
                } else if now.saturating_duration_since(sent) >= resend {
                    self.out.push(Action::Send(Control::TakeOver { id, force: false }));
                    self.pending =
                        Some(Pending::TookOver { id, origin, health, deadline, sent: now });
                }
            }
            Some(Pending::Sync { origin, deadline }) => {
                let l = self.local;
                if l.uptodate
                    && l.in_sync
                    && !l.peer_primary
                    && !self.peer_view.is_some_and(|v| v.any_primary)
                {
                    self.pending = None;
                    let after = self.after(origin);
                    self.takeover(
                        "switchover: the peer released and we are in sync".into(),
                        false,
                        false,
                        after,
                    );
                } else if now >= deadline {
                    self.pending = None;
                    self.finish(origin, Err(format!(
                        "the peer released but this node did not get in sync in time (disk {}, in sync: {})",
                        l.worst_disk, l.in_sync
                    )));
                }
            }
            None => {}
        }
        if let Some((id, mask, sent)) = self.outdating
            && now.saturating_duration_since(sent) >= resend
        {
            self.out.push(Action::Send(Control::Outdate { id, mask }));
            self.outdating = Some((id, mask, now));
        }
    }

    fn decide(&mut self) {
        if self.transition.is_some() {
            return;
        }
        let may_retry = self.retry_at.is_none_or(|t| self.now >= t);
        let l = self.local;
        let pv = self.peer_view;
        let alive = self.peer == PeerState::Alive;
        if l.any_primary {
            if alive && pv.is_some_and(|v| v.any_primary) {
                self.dual_seen = true;
                if self.s.configured_master {
                    let msg = "both nodes are master (a partition healed): the configured master keeps the role and re-announces its VIP";
                    if self.said.as_deref() != Some(msg) {
                        self.say_once(msg.into());
                        self.out.push(Action::Reannounce);
                    }
                } else if self.pending.is_none() {
                    self.start(Kind::Release, "both nodes are master (a partition healed): the configured master keeps the role".into(), After::Nothing);
                }
                return;
            }
            // Outdate the peer over the heartbeat when replication is down but the peer answers.
            let need = l.disconnected & !self.peer_outdated;
            if alive && need != 0 && self.outdating.is_none() {
                let id = self.id();
                self.event(&format!("replication link down but the peer answers on a heartbeat link: outdating its data (resources {need:#x})"));
                self.out.push(Action::Send(Control::Outdate { id, mask: need }));
                self.outdating = Some((id, need, self.now));
            }
            if !alive {
                self.outdating = None;
            }
            if self.s.fencing == Fencing::ResourceAndStonith && self.pending.is_none() {
                // DRBD's resource-and-stonith: the moment replication breaks, writes that reach
                // only this node wait, until the peer is outdated (it answers on a heartbeat
                // link) or fenced (it is silent everywhere), or replication is back.
                let step = |s: Step| VecDeque::from([s]);
                if l.disconnected == 0 {
                    self.fenced = false;
                }
                let exposed = l.disconnected & !self.peer_outdated != 0 && !self.fenced;
                if !self.frozen && exposed {
                    self.start_steps(
                        Kind::Stonith,
                        "replication link down: freezing I/O until the peer is outdated or fenced"
                            .into(),
                        After::Nothing,
                        step(Step::Freeze),
                    );
                    return;
                }
                if self.frozen && !exposed {
                    self.start_steps(
                        Kind::Stonith,
                        "the peer is outdated, fenced, or connected again: resuming I/O".into(),
                        After::Nothing,
                        step(Step::Thaw),
                    );
                    return;
                }
                if self.frozen {
                    if self.peer == PeerState::Dead && may_retry {
                        let f = Step::Fence { delay: self.s.fence_delay };
                        self.start_steps(
                            Kind::Stonith,
                            "the peer is dead on every link: running the fence command".into(),
                            After::Nothing,
                            step(f),
                        );
                    }
                    return;
                }
            }
            if !may_retry {
                return;
            }
            if !self.healthy
                && alive
                && pv.is_some_and(|v| v.healthy && !v.any_primary)
                && l.in_sync
                && self.pending.is_none()
            {
                self.make_slave(Origin::Auto, true);
            }
            return;
        }
        // This node is a slave.
        if self.pending.is_some() || !may_retry || self.stopping {
            return;
        }
        match self.peer {
            PeerState::Unknown => {}
            PeerState::Dead => {
                if l.uptodate {
                    self.takeover(
                        "the peer is dead on every heartbeat link".into(),
                        true,
                        false,
                        After::Nothing,
                    );
                } else {
                    self.say_once(format!(
                        "the peer is dead but the local data is {}: not taking over (`duet make-master --force` overrides)",
                        l.worst_disk
                    ));
                }
            }
            PeerState::Alive => {
                let Some(v) = pv else { return };
                if v.any_primary {
                    if self.s.failback_auto
                        && self.s.configured_master
                        && !self.operator_released
                        && self.healthy
                        && l.uptodate
                        && l.in_sync
                    {
                        self.event(
                            "failback: the configured master is in sync and takes the role back",
                        );
                        self.make_master(Origin::Auto, false);
                    }
                    return;
                }
                if self.hold_until.is_some_and(|t| self.now < t) {
                    return;
                }
                let mine = if self.s.configured_master {
                    self.healthy || !v.healthy
                } else {
                    self.healthy && !v.healthy
                };
                if mine && l.uptodate {
                    let why = if self.s.configured_master {
                        "no master is running: the configured master takes the role"
                    } else {
                        "no master is running and the configured master is unhealthy"
                    };
                    self.takeover(why.into(), false, false, After::Nothing);
                } else if mine {
                    self.say_once(format!(
                        "waiting for UpToDate data before taking the master role (local disk {})",
                        l.worst_disk
                    ));
                }
            }
        }
    }
}

/// A result as the (ok, reason) pair of a control reply.
fn split(r: Result<String, String>) -> (bool, String) {
    match r {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    }
}

#[cfg(test)]
mod tests;
