//! Quorum for three or four nodes: who may be Primary, decided by a majority that cannot be
//! split in two, even when links fail in one direction only or messages arrive late.
//!
//! Pure: `now` and messages in, messages (and what to persist) out. Not wired into the daemon
//! yet (issue 17); two-node configurations never use it.
//!
//! # Votes are leases
//!
//! Every node is a voter (data nodes and diskless tiebreakers alike); only data nodes stand.
//! A candidate asks every voter for its vote and counts a vote from the instant it *sent* the
//! request, for `lease` on its own clock. A voter grants at most one candidate at a time and
//! holds its promise for [`Config::promise`] on *its* clock from the instant it *received* the
//! request: `lease × (1 + ε) / (1 − ε)` plus a margin, ε being the largest rate error of any
//! node's monotonic clock (`drift_ppm`). So a promise always outlives, in real time, every
//! lease counted on it, whatever the clocks' rates and however long the request travelled; a
//! voter that granted A grants B only after A can no longer count that vote. Every candidacy
//! also has a term, above every term its node voted in or heard of; a voter votes once per term
//! and never for a term below one it voted in, and stores its vote before it answers, so
//! later tenures have higher terms. A candidate holds
//! while its own vote and its unexpired grants make a strict majority of all voters, and renews
//! every `lease / 3`. Two holders at one instant would need one voter promising two candidates
//! at once, which it never does. A majority is strict: four voters split two and two leave
//! both halves without a holder (the operator adds a tiebreaker or resolves it by hand).
//!
//! A voter that restarts has forgotten its promises, so it grants nothing (not even to itself)
//! for one promise period. Request ids start at a random value per incarnation, so a grant that
//! answers a request of an earlier life is never matched to a newer send time.
//!
//! # Epochs: only an up-to-date node can win
//!
//! Mutual exclusion is not enough: a node that missed acknowledged writes must not win either.
//! The holder keeps an [`Epoch`]: a number and the set of data nodes that hold every
//! acknowledged write. Before it acknowledges a write that some member does not have (the
//! member was lost), it proposes a new epoch without that member and answers no write until a majority of
//! voters stored it durably ([`Quorum::committed`]); when a node has resynced it proposes the
//! node back in. A voter grants only a candidate that is a member of the newest epoch it knows
//! (its own, or the candidate's if newer). Any majority that elects later shares a voter with the
//! majority that stored the epoch, so a node that missed a write is refused. Epoch numbers are
//! `term << 20 | sequence`: a proposal of a later tenure outranks every proposal of an earlier
//! one, even one that only its proposer stored (ordering by anything else would let such a
//! leftover outrank the epoch that dropped a node). A consequence operators know from DRBD's Outdated
//! state: if every member of the newest epoch is gone, the remaining nodes do not promote on
//! their own.
//!
//! [`wire`] is the messages' byte form. [`sim`] runs three and four nodes with drifting clocks, delays, lost and late messages,
//! one-way link cuts, partitions and crashes, and checks that no two nodes hold at one
//! instant, that a node cut off from a majority stops holding within one lease, that every
//! new holder has every acknowledged write, and that a holder emerges once the faults stop.

pub mod sim;
#[cfg(test)]
mod tests;
pub mod wire;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// At most this many nodes take part.
pub const MAX_NODES: usize = 4;

/// A node: its index in the configuration's node list.
pub type NodeId = u8;

fn bit(n: NodeId) -> u8 {
    1 << n
}

/// Bits of an epoch number below the term.
const SEQ_BITS: u32 = 20;

/// The data nodes holding every acknowledged write, under a number that only grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    /// `term << 20 | sequence`; 0 for the configured initial epoch.
    pub number: u64,
    /// Bit `n` set: node `n` is a member.
    pub members: u8,
}

impl Epoch {
    /// The epoch a new cluster starts from: every data node holds the same data.
    pub fn initial(data: u8) -> Self {
        Self { number: 0, members: data }
    }

    /// Whether node `n` is a member.
    pub fn has(&self, n: NodeId) -> bool {
        usize::from(n) < MAX_NODES && self.members & bit(n) != 0
    }

    /// The term of the tenure that proposed it.
    pub fn term(&self) -> u64 {
        self.number >> SEQ_BITS
    }

    fn newest(self, other: Self) -> Self {
        if other.number > self.number { other } else { self }
    }
}

/// What a node keeps in `state_dir` for quorum: written atomically and fsynced before any
/// message that depends on it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// The highest term this node voted in.
    pub term: u64,
    /// Whom it voted for in that term.
    pub voted: Option<NodeId>,
    /// The newest epoch it knows.
    pub epoch: Epoch,
}

impl Durable {
    /// A node that never voted, in the initial epoch.
    pub fn initial(data: u8) -> Self {
        Self { term: 0, voted: None, epoch: Epoch::initial(data) }
    }
}

/// Fixed parameters, the same on every node except `me`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// This node.
    pub me: NodeId,
    /// How many voters (nodes) there are: 3 or 4.
    pub nodes: u8,
    /// Bit `n` set: node `n` has a disk and may stand; the others are tiebreakers.
    pub data: u8,
    /// How long a candidate counts a vote, from the instant it sent the request.
    pub lease: Duration,
    /// The largest rate error of any node's monotonic clock, in parts per million.
    pub drift_ppm: u32,
}

/// Why a configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("quorum needs 3 or 4 nodes, not {0}")]
    Nodes(u8),
    #[error("node index {me} is not below the node count {nodes}")]
    Me { me: NodeId, nodes: u8 },
    #[error("at least two of the nodes must have a disk, and only configured nodes can")]
    Data,
    #[error("the lease must be at least 30 ms, not {0:?}")]
    Lease(Duration),
    #[error("a clock rate error of {0} ppm is beyond the 10 % this design assumes")]
    Drift(u32),
}

impl Config {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(3..=4).contains(&self.nodes) {
            return Err(ConfigError::Nodes(self.nodes));
        }
        if self.me >= self.nodes {
            return Err(ConfigError::Me { me: self.me, nodes: self.nodes });
        }
        let all = (1u8 << self.nodes) - 1;
        if self.data & !all != 0 || self.data.count_ones() < 2 {
            return Err(ConfigError::Data);
        }
        if self.lease < Duration::from_millis(30) {
            return Err(ConfigError::Lease(self.lease));
        }
        if self.drift_ppm > 100_000 {
            return Err(ConfigError::Drift(self.drift_ppm));
        }
        Ok(())
    }

    /// Votes needed: a strict majority of all nodes.
    pub fn majority(&self) -> usize {
        usize::from(self.nodes) / 2 + 1
    }

    /// How long a voter keeps its promise, on its own clock, from receiving a request:
    /// `lease × (1 + ε) / (1 − ε)` and a margin of 1 % of the lease.
    pub fn promise(&self) -> Duration {
        let e = u128::from(self.drift_ppm);
        let l = self.lease.as_nanos();
        let p = l * (1_000_000 + e) / (1_000_000 - e) + l / 100;
        Duration::from_nanos(u64::try_from(p).unwrap_or(u64::MAX))
    }

    /// How often a candidate renews.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// Whether the nodes in `mask` are a majority.
    fn is_majority(&self, mask: u8) -> bool {
        mask.count_ones() as usize >= self.majority()
    }

    fn is_data(&self, n: NodeId) -> bool {
        n < self.nodes && self.data & bit(n) != 0
    }
}

/// Why a vote (or a campaign) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The voter's promise to this node is still running.
    Promised(NodeId),
    /// The voter restarted less than one promise period ago.
    Quiet,
    /// The candidate is not a member of the newest epoch the voter knows (it missed writes).
    Outdated(Epoch),
    /// The candidate has no disk.
    Diskless,
    /// The voter already voted in this term or a higher one, the one given.
    Term(u64),
}

/// What the nodes say to each other about quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// A candidate asks for (or renews) its vote in `term`; `epoch` is the newest it knows.
    Request { id: u64, term: u64, epoch: Epoch },
    /// The vote for request `id`; `epoch` is the newest the voter knows.
    Grant { id: u64, epoch: Epoch },
    /// No vote for request `id`.
    Refuse { id: u64, why: Refusal },
    /// The candidate stopped standing in `term`: its voters may promise someone else now. (A
    /// release that arrives late, after the same node stood again, names an older term and
    /// frees nothing.)
    Release { term: u64 },
    /// The holder proposes a new epoch; a voter stores it, then answers `Stored`.
    Propose { epoch: Epoch },
    /// Epoch `number` is stored durably.
    Stored { number: u64 },
}

/// One message to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Out {
    pub to: NodeId,
    pub msg: Msg,
}

/// What a step asks of the executor, in this order: store `persist` durably, then send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actions {
    /// The vote or the newest known epoch changed: write it to `state_dir` first.
    pub persist: Option<Durable>,
    pub send: Vec<Out>,
}

/// What [`Quorum::status`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// This node stands.
    pub candidate: bool,
    /// This node holds quorum now.
    pub holds: bool,
    /// Bit `n` set: node `n`'s vote counts for us now (our own included).
    pub counted: u8,
    /// Votes needed.
    pub needed: usize,
    /// Whom our own vote is promised to, if anyone.
    pub promised: Option<NodeId>,
    /// The newest epoch we know.
    pub epoch: Epoch,
    /// The epoch a majority stored during our current tenure, if any.
    pub committed: Option<Epoch>,
    /// Our candidacy's term, or the highest we voted in.
    pub term: u64,
}

#[derive(Debug)]
struct Candidacy {
    term: u64,
    /// The sequence number of our last proposal.
    seq: u64,
    /// Request id → when it was sent (our clock).
    sent: BTreeMap<u64, Instant>,
    last_sent: Instant,
    /// Each voter's vote counts until then (ours included).
    until: [Option<Instant>; MAX_NODES],
    /// The epoch we proposed and who stored it (committed once that is a majority).
    proposal: Option<(Epoch, u8)>,
    /// A voter told us it promised someone else, or voted in a later term.
    setback: Option<Refusal>,
}

/// One node's quorum state: its vote, and its candidacy when it stands.
#[derive(Debug)]
pub struct Quorum {
    cfg: Config,
    known: Epoch,
    term: u64,
    voted: Option<NodeId>,
    /// The highest term heard of, for the next candidacy.
    seen_term: u64,
    quiet_until: Instant,
    promise: Option<(NodeId, Instant)>,
    cand: Option<Candidacy>,
    next_id: u64,
}

impl Quorum {
    /// A node starting at `now` with what it stored (or [`Durable::initial`]) and a random
    /// value for its request ids. It grants nothing for one promise period.
    pub fn new(
        cfg: Config,
        now: Instant,
        stored: Durable,
        random: u64,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            known: stored.epoch,
            term: stored.term,
            voted: stored.voted,
            seen_term: stored.term,
            quiet_until: now + cfg.promise(),
            promise: None,
            cand: None,
            next_id: random,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The newest epoch this node knows.
    pub fn epoch(&self) -> Epoch {
        self.known
    }

    fn durable(&self) -> Durable {
        Durable { term: self.term, voted: self.voted, epoch: self.known }
    }

    fn learn(&mut self, e: Epoch, out: &mut Actions) {
        let n = self.known.newest(e);
        if n != self.known {
            self.known = n;
            self.seen_term = self.seen_term.max(n.term());
            out.persist = Some(self.durable());
        }
    }

    fn promised_other(&self, now: Instant, who: NodeId) -> Option<NodeId> {
        match self.promise {
            Some((p, until)) if p != who && until > now => Some(p),
            _ => None,
        }
    }

    fn others(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.cfg.nodes).filter(move |&n| n != self.cfg.me)
    }

    fn broadcast(&self, msg: Msg, out: &mut Actions) {
        out.send.extend(self.others().map(|to| Out { to, msg }));
    }

    /// Whether this node may vote for candidate `who` (itself included) in `term` at `now`,
    /// given the newest epoch it knows after hearing the candidate's.
    fn may_grant(&self, now: Instant, who: NodeId, term: u64) -> Result<(), Refusal> {
        if !self.cfg.is_data(who) {
            return Err(Refusal::Diskless);
        }
        if now < self.quiet_until {
            return Err(Refusal::Quiet);
        }
        if !self.known.has(who) {
            return Err(Refusal::Outdated(self.known));
        }
        if let Some(p) = self.promised_other(now, who) {
            return Err(Refusal::Promised(p));
        }
        if term < self.term || (term == self.term && self.voted.is_some_and(|v| v != who)) {
            return Err(Refusal::Term(self.term));
        }
        Ok(())
    }

    /// Votes for `who` in `term` (checked by `may_grant`) and promises it.
    fn vote(&mut self, now: Instant, who: NodeId, term: u64, out: &mut Actions) {
        if term != self.term || self.voted != Some(who) {
            self.term = term;
            self.voted = Some(who);
            self.seen_term = self.seen_term.max(term);
            out.persist = Some(self.durable());
        }
        self.promise_to(now, who);
    }

    fn promise_to(&mut self, now: Instant, who: NodeId) {
        let mut until = now + self.cfg.promise();
        if let Some((p, u)) = self.promise
            && p == who
        {
            until = until.max(u);
        }
        self.promise = Some((who, until));
    }

    /// One message from node `from`.
    pub fn handle(&mut self, now: Instant, from: NodeId, msg: Msg) -> Actions {
        let mut out = Actions::default();
        if from >= self.cfg.nodes || from == self.cfg.me {
            return out;
        }
        match msg {
            Msg::Request { id, term, epoch } => {
                self.learn(epoch, &mut out);
                let reply = match self.may_grant(now, from, term) {
                    Ok(()) => {
                        self.vote(now, from, term, &mut out);
                        Msg::Grant { id, epoch: self.known }
                    }
                    Err(why) => Msg::Refuse { id, why },
                };
                out.send.push(Out { to: from, msg: reply });
            }
            Msg::Grant { id, epoch } => {
                self.learn(epoch, &mut out);
                let lease = self.cfg.lease;
                if let Some(c) = self.cand.as_mut()
                    && let Some(&sent) = c.sent.get(&id)
                {
                    let until = sent + lease;
                    let slot = &mut c.until[usize::from(from)];
                    *slot = Some(slot.map_or(until, |u| u.max(until)));
                }
            }
            Msg::Refuse { id, why } => {
                match why {
                    Refusal::Outdated(e) => self.learn(e, &mut out),
                    Refusal::Term(t) => self.seen_term = self.seen_term.max(t),
                    Refusal::Promised(_) | Refusal::Quiet | Refusal::Diskless => {}
                }
                let me = self.cfg.me;
                let mut ours = false;
                if let Some(c) = self.cand.as_mut()
                    && c.sent.contains_key(&id)
                {
                    ours = true;
                    let setback = match why {
                        Refusal::Promised(p) => p != me,
                        Refusal::Term(t) => t >= c.term,
                        Refusal::Outdated(_) | Refusal::Quiet | Refusal::Diskless => false,
                    };
                    if setback && c.setback.is_none() {
                        c.setback = Some(why);
                    }
                }
                if ours && !self.known.has(me) {
                    // We missed writes: standing is pointless, and our promise frees no one.
                    out.send.extend(self.resign().send);
                }
            }
            Msg::Release { term } => {
                if matches!(self.promise, Some((p, _)) if p == from)
                    && self.term == term
                    && self.voted == Some(from)
                {
                    self.promise = None;
                }
            }
            Msg::Propose { epoch } => {
                // Only from the candidate we promise to: a late proposal of a former holder
                // is not stored.
                if matches!(self.promise, Some((p, until)) if p == from && until > now)
                    && epoch.number >= self.known.number
                {
                    self.learn(epoch, &mut out);
                    out.send.push(Out { to: from, msg: Msg::Stored { number: epoch.number } });
                }
            }
            Msg::Stored { number } => {
                if let Some(c) = self.cand.as_mut()
                    && let Some((e, acked)) = c.proposal.as_mut()
                    && e.number == number
                {
                    *acked |= bit(from);
                }
            }
        }
        out
    }

    fn request(&mut self, now: Instant, out: &mut Actions) {
        let me = self.cfg.me;
        let Some(term) = self.cand.as_ref().map(|c| c.term) else { return };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        // Our own vote goes through the voter's rules like anyone's.
        if self.may_grant(now, me, term).is_ok() {
            self.vote(now, me, term, out);
            if let Some(c) = self.cand.as_mut() {
                c.until[usize::from(me)] = Some(now + self.cfg.lease);
            }
        }
        let lease = self.cfg.lease;
        if let Some(c) = self.cand.as_mut() {
            c.sent.insert(id, now);
            c.last_sent = now;
            c.sent.retain(|_, &mut t| t + lease > now);
            if let Some((e, acked)) = c.proposal
                && !self.cfg.is_majority(acked)
            {
                // Voters that missed the proposal get it again with the renewal.
                for to in (0..self.cfg.nodes).filter(|&n| n != me && acked & bit(n) == 0) {
                    out.send.push(Out { to, msg: Msg::Propose { epoch: e } });
                }
            }
        }
        self.broadcast(Msg::Request { id, term, epoch: self.known }, out);
    }

    /// Starts standing at `now`, in a term above every term this node voted in or heard of.
    /// Refused when this node has no disk, restarted less than a promise period ago, is not in
    /// the newest epoch it knows, or promised its vote to another.
    pub fn campaign(&mut self, now: Instant) -> Result<Actions, Refusal> {
        let mut out = Actions::default();
        if self.cand.is_none() {
            let term = self.seen_term.max(self.term) + 1;
            self.may_grant(now, self.cfg.me, term)?;
            self.cand = Some(Candidacy {
                term,
                seq: 0,
                sent: BTreeMap::new(),
                last_sent: now,
                until: [None; MAX_NODES],
                proposal: None,
                setback: None,
            });
            self.request(now, &mut out);
        }
        Ok(out)
    }

    /// Stops standing: no longer holds, and frees the voters' promises.
    pub fn resign(&mut self) -> Actions {
        let mut out = Actions::default();
        if let Some(c) = self.cand.take() {
            if matches!(self.promise, Some((p, _)) if p == self.cfg.me) {
                self.promise = None;
            }
            self.broadcast(Msg::Release { term: c.term }, &mut out);
        }
        out
    }

    /// The timer: a candidate renews its votes every `lease / 3`.
    pub fn tick(&mut self, now: Instant) -> Actions {
        let mut out = Actions::default();
        let due = self
            .cand
            .as_ref()
            .is_some_and(|c| now.saturating_duration_since(c.last_sent) >= self.cfg.renew_every());
        if due {
            self.request(now, &mut out);
        }
        out
    }

    fn counted(&self, now: Instant) -> u8 {
        let Some(c) = self.cand.as_ref() else { return 0 };
        let mut mask = 0;
        for (n, u) in c.until.iter().enumerate() {
            if u.is_some_and(|u| u > now) {
                mask |= 1 << n;
            }
        }
        mask
    }

    /// Whether this node holds quorum at `now`. The executor checks it before it promotes and
    /// before it answers a write; when it turns false the Primary freezes or demotes.
    pub fn holds(&self, now: Instant) -> bool {
        self.cfg.is_majority(self.counted(now))
    }

    /// Whether this node stands.
    pub fn candidate(&self) -> bool {
        self.cand.is_some()
    }

    /// The first refusal that means another node stands or stood after us: a voter promised
    /// someone else, or voted in a later term. A candidate that does not hold stands down.
    pub fn setback(&self) -> Option<Refusal> {
        self.cand.as_ref().and_then(|c| c.setback)
    }

    /// The holder proposes `members` as the new epoch (it must be one of them). A write that a
    /// former member does not have may be answered once [`Self::committed`] shows it.
    pub fn propose(&mut self, now: Instant, members: u8) -> Result<Actions, ProposeError> {
        if !self.holds(now) {
            return Err(ProposeError::NotHolder);
        }
        let me = self.cfg.me;
        if members & bit(me) == 0 || members & !self.cfg.data != 0 {
            return Err(ProposeError::Members(members));
        }
        let Some(c) = self.cand.as_mut() else { return Err(ProposeError::NotHolder) };
        if self.known.term() > c.term {
            // A later tenure existed: ours cannot outrank what it stored.
            return Err(ProposeError::Superseded(self.known.term()));
        }
        if c.seq + 1 >= 1 << SEQ_BITS {
            return Err(ProposeError::Exhausted);
        }
        c.seq += 1;
        let epoch = Epoch { number: c.term << SEQ_BITS | c.seq, members };
        c.proposal = Some((epoch, bit(me)));
        let mut out = Actions::default();
        self.learn(epoch, &mut out);
        self.broadcast(Msg::Propose { epoch }, &mut out);
        Ok(out)
    }

    /// The epoch proposed in this tenure, stored by a majority or not.
    pub fn proposal(&self) -> Option<Epoch> {
        self.cand.as_ref()?.proposal.map(|(e, _)| e)
    }

    /// The epoch a majority stored in this tenure, when it is the latest proposed.
    pub fn committed(&self) -> Option<Epoch> {
        let (e, acked) = self.cand.as_ref()?.proposal?;
        self.cfg.is_majority(acked).then_some(e)
    }

    /// What `duet status` shows about quorum.
    pub fn status(&self, now: Instant) -> Status {
        let counted = self.counted(now);
        Status {
            candidate: self.cand.is_some(),
            holds: self.cfg.is_majority(counted),
            counted,
            needed: self.cfg.majority(),
            promised: self.promise.filter(|&(_, u)| u > now).map(|(p, _)| p),
            epoch: self.known,
            committed: self.committed(),
            term: self.cand.as_ref().map_or(self.term, |c| c.term),
        }
    }
}

/// Why [`Quorum::propose`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("only the node holding quorum proposes an epoch")]
    NotHolder,
    #[error("members {0:#06b} must include the proposer and only data nodes")]
    Members(u8),
    #[error("a later tenure (term {0}) stored an epoch: this holder must stand down")]
    Superseded(u64),
    #[error("this tenure proposed 2^20 epochs: stand down and stand again")]
    Exhausted,
}

/// A data node the cluster manager could promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub id: NodeId,
    pub name: &'a str,
    /// Its disk is attached and it answers.
    pub healthy: bool,
    /// The configured `priority`: higher wins.
    pub priority: i32,
}

/// The most up-to-date healthy node to promote: a member of `epoch` (holding every
/// acknowledged write), then the highest priority, then the first name. `None` when no
/// healthy node is a member: promoting another would lose writes.
pub fn best_candidate(epoch: &Epoch, cands: &[Candidate<'_>]) -> Option<NodeId> {
    cands
        .iter()
        .filter(|c| c.healthy && epoch.has(c.id))
        .min_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(b.name)))
        .map(|c| c.id)
}
