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
//!
//! In maintenance mode no rule changes a role: no takeover, failback, handover or release;
//! switchovers are refused, the operator runs roles by hand (`duet primary` / `secondary`).
//! Outdating the peer and resource-and-stonith's freeze and fencing go on: they keep the data
//! safe whoever holds the role. When it ends, a node whose
//! roles the operator changed takes or gives up what a master holds (VIPs, services, export)
//! to match its role, and the rules apply again.

pub mod health;
mod policy;
mod refusal;
mod requests;
#[cfg(test)]
mod sim;
mod transition;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use heartbeat::detector::PeerState;
use heartbeat::frame::Control;

pub use refusal::{Answer, Refusal, Stale};

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
    /// Resources connected and in sync with the peer (bit i = resource i; see `in_sync`).
    pub synced: u32,
    /// Resources whose local disk failed and is detached (bit i = resource i): the peer holds
    /// their only copy (never outdated), and this node is unhealthy (it hands over).
    pub diskless: u32,
    /// Resources with `sync = "scheduled"` (bit i = resource i): their link is idle between
    /// catch-ups on purpose and the standby keeps the last consistent state, so the peer is
    /// never outdated for it and no write waits for it (resource-and-stonith).
    pub scheduled: u32,
    /// Every resource whose disk is not UpToDate holds a consistent state kept before a
    /// resync that was cut off (`sync = "scheduled"`), which a promotion restores: this node
    /// can take over from a dead master.
    pub restorable: bool,
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
    /// Resources whose disk the peer reports Diskless (bit i = resource i).
    pub diskless: u32,
    /// Resources whose disk the peer reports Inconsistent or Outdated: nothing there can be
    /// promoted, so nothing needs outdating (a request sent as the master takes over before
    /// replication is up only reached a resync target later, and dropped its session).
    pub unusable: u32,
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
    /// The cluster's maintenance mode (at start, and whenever it changes).
    Maintenance(bool),
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
    /// What the fence command's exit code says.
    Fence(FenceVerdict),
}

/// The fence command's answer, by DRBD's fence-peer exit codes (see `duet.example.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceVerdict {
    /// 3: the peer's data is Inconsistent.
    PeerInconsistent,
    /// 4: the peer's data is Outdated.
    PeerOutdated,
    /// 5: the peer is down.
    PeerDown,
    /// 6: the peer is primary; this node must outdate its own data.
    OutdateMyself,
    /// 7: the peer was fenced (powered off).
    PeerFenced,
    /// Any other exit code: the peer's state is unknown.
    Failed(i32),
    /// The command could not run, or ran past its timeout.
    NotRun,
}

impl FenceVerdict {
    /// The verdict of exit code `code` (`None`: no exit code, it could not run or timed out).
    pub fn from_exit(code: Option<i32>) -> Self {
        match code {
            Some(3) => Self::PeerInconsistent,
            Some(4) => Self::PeerOutdated,
            Some(5) => Self::PeerDown,
            Some(6) => Self::OutdateMyself,
            Some(7) => Self::PeerFenced,
            Some(c) => Self::Failed(c),
            None => Self::NotRun,
        }
    }

    /// The peer cannot write on: taking over (or writing alone) is safe.
    pub fn peer_gone(self) -> bool {
        matches!(
            self,
            Self::PeerInconsistent | Self::PeerOutdated | Self::PeerDown | Self::PeerFenced
        )
    }
}

impl std::fmt::Display for FenceVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PeerInconsistent => f.write_str("peer is inconsistent (exit 3)"),
            Self::PeerOutdated => f.write_str("peer is outdated (exit 4)"),
            Self::PeerDown => f.write_str("peer is down (exit 5)"),
            Self::OutdateMyself => {
                f.write_str("the peer is primary and we must outdate ourselves (exit 6)")
            }
            Self::PeerFenced => f.write_str("peer was fenced (exit 7)"),
            Self::Failed(c) => write!(f, "failed (exit {c})"),
            Self::NotRun => f.write_str("could not run or timed out"),
        }
    }
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
    Reply { token: Token, result: Answer },
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
    /// Maintenance mode: no automatic action, no switchover.
    maintenance: bool,
    /// What a master holds (VIPs, master services, export) was taken here and not given up:
    /// set by a takeover's `VipUp`, cleared by a release's `VipDown`. Compared with the role
    /// when maintenance mode ends.
    holding: bool,
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
            maintenance: false,
            holding: false,
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
            Input::Maintenance(on) => self.maintenance_changed(on),
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

    /// Whether an operator switchover (without `--force`) would start now: what it would do,
    /// or the refusal it would get. Judged as `make-master` / `make-slave` judge it.
    pub fn switchover_now(&self) -> Result<&'static str, Refusal> {
        if self.stopping {
            return Err(Refusal::Stopping);
        }
        if self.maintenance {
            return Err(Refusal::Maintenance);
        }
        if self.busy() {
            return Err(Refusal::SwitchoverRunning);
        }
        if self.local.any_primary {
            self.slave_refusal()
                .map_or(Ok("make-slave here hands the master role to the peer"), Err)
        } else {
            self.master_refusal(false)
                .map_or(Ok("make-master here takes the master role from the peer"), Err)
        }
    }

    /// Maintenance mode is on.
    pub fn maintenance(&self) -> bool {
        self.maintenance
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
}

/// A result as the (ok, reason) pair of a control reply.
fn split(r: Answer) -> (bool, String) {
    match r {
        Ok(m) => (true, m),
        Err(m) => (false, m.to_string()),
    }
}

#[cfg(test)]
mod tests;
