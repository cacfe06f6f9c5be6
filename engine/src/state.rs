//! Role, disk and connection states of one resource, and every transition between them.
//!
//! [`State::step`] is the one place where a role, disk or connection state changes: one
//! exhaustive `match` over [`Event`], each arm saying what the event does in every state (no
//! `_` arm anywhere, so a new state or event must be decided here). A refused event changes
//! nothing and comes back as a [`Refusal`] whose message says what to do. The executor feeds
//! operator commands, link events and peer reports in, and carries out the effects (metadata,
//! frames, the NBD export) itself.

/// Role of this node for the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Serves NBD; its writes are mirrored.
    Primary,
    /// Receives the Primary's writes; exports nothing.
    Secondary,
}

/// Local disk state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum DiskState {
    /// No local disk: it failed and was detached (`on_io_error = "detach"`). A Primary serves
    /// through its connected peer; a Secondary holds nothing. Lowest of all: never a source,
    /// never promoted, never connects until the disk is replaced or checked (`duet attach`).
    Diskless,
    /// Being written by a resync, or never synced: not usable.
    Inconsistent,
    /// Consistent but known to be older than the peer's.
    Outdated,
    /// Consistent; whether it is the newest is not known (not connected since start).
    Consistent,
    /// The newest data.
    UpToDate,
}

impl Role {
    /// The wire code (State frames, heartbeat): 1 Primary, 0 Secondary.
    pub fn code(self) -> u8 {
        match self {
            Self::Primary => 1,
            Self::Secondary => 0,
        }
    }

    /// The role of a wire code; `None` for an unknown one.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Self::Primary),
            0 => Some(Self::Secondary),
            _ => None,
        }
    }
}

impl DiskState {
    /// Its name, as status shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Diskless => "Diskless",
            Self::Inconsistent => "Inconsistent",
            Self::Outdated => "Outdated",
            Self::Consistent => "Consistent",
            Self::UpToDate => "UpToDate",
        }
    }

    /// The wire and status code (State frames, heartbeat).
    pub fn code(self) -> u8 {
        match self {
            Self::Diskless => 4,
            Self::Inconsistent => 0,
            Self::Outdated => 1,
            Self::Consistent => 2,
            Self::UpToDate => 3,
        }
    }

    /// The state of a wire code; `None` for an unknown one.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::Inconsistent),
            1 => Some(Self::Outdated),
            2 => Some(Self::Consistent),
            3 => Some(Self::UpToDate),
            4 => Some(Self::Diskless),
            _ => None,
        }
    }
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConnState {
    /// Not trying to connect (operator said disconnect, or split brain / refusal).
    StandAlone,
    /// Trying to reach the peer.
    Connecting,
    /// Connected and in sync.
    Connected,
    /// Connected; we send the resync.
    SyncSource,
    /// Connected; we receive the resync.
    SyncTarget,
    /// Connected; we run an online verify.
    VerifySource,
    /// Connected; the peer runs an online verify.
    VerifyTarget,
    /// Tearing the connection down.
    Disconnecting,
}

impl ConnState {
    /// The heartbeat's code: 0 not connected, 1 Connected, 2 SyncSource, 3 SyncTarget, 4 a
    /// verify running.
    pub fn code(self) -> u8 {
        match self {
            Self::StandAlone | Self::Connecting | Self::Disconnecting => 0,
            Self::Connected => 1,
            Self::SyncSource => 2,
            Self::SyncTarget => 3,
            Self::VerifySource | Self::VerifyTarget => 4,
        }
    }

    /// A replication session is live (frames flow to the peer).
    /// A session is up and not being torn down.
    pub fn in_session(self) -> bool {
        self.live() && self != Self::Disconnecting
    }

    pub fn live(self) -> bool {
        match self {
            Self::Connected
            | Self::SyncSource
            | Self::SyncTarget
            | Self::VerifySource
            | Self::VerifyTarget
            | Self::Disconnecting => true,
            Self::StandAlone | Self::Connecting => false,
        }
    }
}

/// How a session that went live starts (the handshake's plan, without its refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// In sync already.
    None,
    /// We send a resync: our data is the newer.
    Source,
    /// We receive a resync.
    Target,
}

/// What happens to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `duet primary [--force]`.
    Promote { force: bool },
    /// The promotion could not be made durable: back to Secondary with the disk it had.
    PromotionFailed { disk: DiskState },
    /// `duet secondary` (the export is closed).
    Demote,
    /// The peer asks us to mark our data Outdated (its link to us broke while it writes).
    Outdate,
    /// We recorded that the peer's data is Outdated.
    PeerOutdated,
    /// `duet invalidate`: throw the local data away, resync everything from the peer.
    Invalidate,
    /// `duet connect [--discard-my-data]`.
    Connect { discard_my_data: bool },
    /// `duet disconnect`.
    Disconnect,
    /// The heartbeat declared the peer dead: end the session.
    DropPeer,
    /// The link task starts an attempt to connect (or stays StandAlone).
    Attempt,
    /// The handshake found split brain or refused: stop trying until the operator connects.
    GiveUp,
    /// A session went live.
    Live { sync: Sync, peer_primary: bool, peer_inconsistent: bool },
    /// The session ended.
    LinkLost,
    /// The peer reported its role and disk.
    PeerReport { role: Role, disk: DiskState },
    /// The resync target reported the resync we sent finished.
    SourceDone,
    /// The resync we received is complete and durable.
    TargetDone,
    /// `duet verify`: we compare our blocks with the peer's.
    VerifyStart,
    /// Our verify ended (finished or stopped).
    VerifyEnd,
    /// The peer started a verify against us.
    PeerVerifyStart,
    /// The peer's verify finished.
    PeerVerifyEnd,
    /// A replicated write failed on our disk: as a Secondary our data is now known bad in a
    /// block the peer believes we have. (A Primary's failed write fails the client's request
    /// and is marked out of sync; see [`Event::Detach`] for what `on_io_error = "detach"` does.)
    LocalWriteFailed,
    /// The local disk failed (`on_io_error = "detach"`): Diskless from now on, and never
    /// connecting again until the disk is replaced. A Secondary leaves the session (the Primary
    /// goes on alone), unless it is the resync source (the only good copy: refused). A Primary detaches only beside a connected, UpToDate Secondary, through
    /// which it serves on; otherwise its disk holds the only good copy and it is refused.
    Detach,
    /// The last consistent state, kept before a resync as target (`sync = "scheduled"`), was
    /// copied back over the half-synced data: Consistent again, with that state's generations.
    /// Only a Secondary outside a session whose disk is Inconsistent has one to restore.
    Restored,
}

/// Why an event was refused. The message says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the peer is Primary; run `duet secondary` there first (dual-primary is not supported)"
    )]
    PeerIsPrimary,
    #[error(
        "the connected peer's volume is {peer} bytes, this node's {mine}: as Primary it could not receive all of this one's; give both the same size (`duet check-config --connect` compares them)"
    )]
    PeerTooSmall { mine: u64, peer: u64 },
    #[error(
        "this node is receiving a resync (SyncTarget); wait until it finishes (see `duet status`)"
    )]
    ReceivingResync,
    #[error(
        "the local disk is {0:?}, not UpToDate: promoting could serve stale data; connect to the peer first, or pass --force if you are sure this node's data is the one to keep"
    )]
    NotUpToDate(DiskState),
    #[error("this node is Primary: its data cannot be outdated")]
    PrimaryCannotBeOutdated,
    #[error(
        "this node is Primary: run `duet secondary` first (a Primary's data cannot be thrown away under its clients)"
    )]
    PrimaryCannotBeInvalidated,
    #[error(
        "the connected peer's disk is {0:?}, not UpToDate: it has no good data to resync from, and this node's may be the only copy; wait until the peer is UpToDate"
    )]
    PeerNotUpToDate(Option<DiskState>),
    #[error("this node is Primary: run `duet secondary` before discarding its data")]
    PrimaryCannotDiscard,
    #[error("both nodes are Primary: disconnecting (dual-primary is not supported)")]
    BothPrimary,
    #[error("the peer reported a finished resync we did not run (we are {0:?})")]
    NotSyncSource(ConnState),
    #[error("verify needs a Connected, in-sync peer; the connection is {0:?}")]
    VerifyNeedsConnected(ConnState),
    #[error(
        "this node's disk failed and is detached (Diskless); replace or check it, then run `duet attach` with the daemon stopped (a full resync from the peer follows)"
    )]
    Diskless,
    #[error(
        "cannot detach the failed disk: the peer is not a connected UpToDate Secondary (connection {0:?}, peer disk {1:?}), so this disk holds the only good copy; its errors go to the clients"
    )]
    OnlyCopy(ConnState, Option<DiskState>),
    #[error(
        "nothing to restore: the kept consistent state replaces only half-synced data of a Secondary without a session (this one is {0:?}, disk {1:?}, connection {2:?})"
    )]
    NotRestorable(Role, DiskState, ConnState),
}

/// What an accepted event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed.
    Changed,
    /// Nothing to do (already so).
    Unchanged,
}

/// The states of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub role: Role,
    pub disk: DiskState,
    pub conn: ConnState,
    /// The peer's role and disk while a session is live (its last report).
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    /// The link tries to connect.
    pub want_connect: bool,
}

impl State {
    /// A resource as it attaches: Secondary, not connected, trying to connect if it has a peer.
    pub fn attached(disk: DiskState, has_peer: bool) -> Self {
        Self {
            role: Role::Secondary,
            disk,
            conn: ConnState::StandAlone,
            peer_role: None,
            peer_disk: None,
            want_connect: has_peer,
        }
    }

    /// Applies `e`: the one function where states change. A refusal changes nothing.
    pub fn step(&mut self, e: Event) -> Result<Outcome, Refusal> {
        let before = *self;
        let mut next = *self;
        match e {
            Event::Promote { force } => match self.role {
                Role::Primary => {}
                Role::Secondary => {
                    if self.disk == DiskState::Diskless {
                        return Err(Refusal::Diskless);
                    }
                    if self.peer_role == Some(Role::Primary) && self.conn.live() {
                        return Err(Refusal::PeerIsPrimary);
                    }
                    if self.conn == ConnState::SyncTarget {
                        return Err(Refusal::ReceivingResync);
                    }
                    match (self.disk, force) {
                        (DiskState::UpToDate, _)
                        | (
                            DiskState::Consistent | DiskState::Outdated | DiskState::Inconsistent,
                            true,
                        ) => {}
                        (d @ (DiskState::Consistent | DiskState::Outdated), false)
                        | (d @ DiskState::Inconsistent, false) => {
                            return Err(Refusal::NotUpToDate(d));
                        }
                        (DiskState::Diskless, _) => return Err(Refusal::Diskless),
                    }
                    next.role = Role::Primary;
                    next.disk = DiskState::UpToDate;
                }
            },
            Event::PromotionFailed { disk } => {
                next.role = Role::Secondary;
                next.disk = disk;
            }
            Event::Demote => {
                next.role = Role::Secondary;
                // A Diskless Secondary has nothing to give the peer: it leaves the session.
                if self.disk == DiskState::Diskless && self.conn.live() {
                    next.conn = ConnState::Disconnecting;
                }
            }
            Event::Outdate => match (self.role, self.disk) {
                (Role::Primary, _) => return Err(Refusal::PrimaryCannotBeOutdated),
                (Role::Secondary, DiskState::Inconsistent | DiskState::Diskless) => {}
                (
                    Role::Secondary,
                    DiskState::Outdated | DiskState::Consistent | DiskState::UpToDate,
                ) => {
                    next.disk = DiskState::Outdated;
                    // The peer asks because it lost the session while we still hold one: we
                    // have not noticed the loss yet, or the request is older than a reconnect.
                    // Either way the session goes, and the next handshake resyncs whatever the
                    // peer holds that this Outdated disk lacks (nothing, if it was in sync): a
                    // late request never leaves us Outdated beside an UpToDate peer.
                    if self.conn.in_session() {
                        next.conn = ConnState::Disconnecting;
                    }
                }
            },
            // Only outside a session: within one, the peer's own reports are the truth, and a
            // confirmation that arrives after a reconnect is about the session before.
            Event::PeerOutdated => {
                if !self.conn.in_session() {
                    next.peer_disk = Some(DiskState::Outdated);
                }
            }
            Event::Invalidate => match self.role {
                Role::Primary => return Err(Refusal::PrimaryCannotBeInvalidated),
                Role::Secondary if self.disk == DiskState::Diskless => {
                    return Err(Refusal::Diskless);
                }
                Role::Secondary
                    if self.conn.live() && self.peer_disk != Some(DiskState::UpToDate) =>
                {
                    // The peer holds no good data to resync from: this could be the only copy.
                    return Err(Refusal::PeerNotUpToDate(self.peer_disk));
                }
                Role::Secondary => {
                    next.disk = DiskState::Inconsistent;
                    if self.conn.live() {
                        // Reconnect, so the handshake plans the full resync.
                        next.conn = ConnState::Disconnecting;
                    }
                }
            },
            Event::Connect { discard_my_data } => {
                if self.disk == DiskState::Diskless {
                    return Err(Refusal::Diskless);
                }
                if discard_my_data && self.role == Role::Primary {
                    return Err(Refusal::PrimaryCannotDiscard);
                }
                next.want_connect = true;
            }
            Event::Disconnect => {
                next.want_connect = false;
                next.conn =
                    if self.conn.live() { ConnState::Disconnecting } else { ConnState::StandAlone };
            }
            Event::DropPeer => {
                if self.conn.live() {
                    next.conn = ConnState::Disconnecting;
                }
            }
            Event::Attempt => {
                next.conn = match (self.want_connect, self.conn) {
                    (false, _) => ConnState::StandAlone,
                    (true, ConnState::StandAlone | ConnState::Disconnecting) => {
                        ConnState::Connecting
                    }
                    (
                        true,
                        c @ (ConnState::Connecting
                        | ConnState::Connected
                        | ConnState::SyncSource
                        | ConnState::SyncTarget
                        | ConnState::VerifySource
                        | ConnState::VerifyTarget),
                    ) => c,
                };
            }
            Event::GiveUp => next.want_connect = false,
            Event::Live { sync, peer_primary, peer_inconsistent } => {
                next.peer_role = Some(if peer_primary { Role::Primary } else { Role::Secondary });
                next.peer_disk = Some(if peer_inconsistent {
                    DiskState::Inconsistent
                } else {
                    DiskState::Consistent
                });
                match sync {
                    Sync::None => {
                        next.conn = ConnState::Connected;
                        if self.disk >= DiskState::Outdated {
                            next.disk = DiskState::UpToDate;
                        }
                        next.peer_disk = Some(DiskState::UpToDate);
                    }
                    Sync::Source => {
                        next.conn = ConnState::SyncSource;
                        next.peer_disk = Some(DiskState::Inconsistent);
                        // The generations say our data is the newer: a Consistent source is
                        // UpToDate (as `None` raises it). Without this, a source that restarted
                        // Consistent stayed so after the resync and could not be promoted.
                        if self.disk == DiskState::Consistent {
                            next.disk = DiskState::UpToDate;
                        }
                    }
                    Sync::Target => {
                        next.conn = ConnState::SyncTarget;
                        if self.disk != DiskState::Diskless {
                            next.disk = DiskState::Inconsistent;
                        }
                    }
                }
            }
            Event::LinkLost => {
                next.peer_role = None;
                next.peer_disk = None;
                next.conn =
                    if self.want_connect { ConnState::Connecting } else { ConnState::StandAlone };
            }
            Event::PeerReport { role, disk } => {
                if role == Role::Primary && self.role == Role::Primary {
                    return Err(Refusal::BothPrimary);
                }
                next.peer_role = Some(role);
                next.peer_disk = Some(disk);
            }
            Event::SourceDone => match self.conn {
                ConnState::SyncSource => {
                    next.conn = ConnState::Connected;
                    next.peer_disk = Some(DiskState::UpToDate);
                }
                c @ (ConnState::StandAlone
                | ConnState::Connecting
                | ConnState::Connected
                | ConnState::SyncTarget
                | ConnState::VerifySource
                | ConnState::VerifyTarget
                | ConnState::Disconnecting) => return Err(Refusal::NotSyncSource(c)),
            },
            Event::TargetDone => {
                if self.disk == DiskState::Diskless {
                    return Err(Refusal::Diskless);
                }
                next.conn = ConnState::Connected;
                next.disk = DiskState::UpToDate;
                next.peer_disk = Some(DiskState::UpToDate);
            }
            Event::VerifyStart => match self.conn {
                ConnState::Connected => next.conn = ConnState::VerifySource,
                c @ (ConnState::StandAlone
                | ConnState::Connecting
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::VerifySource
                | ConnState::VerifyTarget
                | ConnState::Disconnecting) => return Err(Refusal::VerifyNeedsConnected(c)),
            },
            Event::VerifyEnd => {
                if self.conn == ConnState::VerifySource {
                    next.conn = ConnState::Connected;
                }
            }
            Event::PeerVerifyStart => {
                if self.conn == ConnState::Connected {
                    next.conn = ConnState::VerifyTarget;
                }
            }
            Event::PeerVerifyEnd => {
                if self.conn == ConnState::VerifyTarget {
                    next.conn = ConnState::Connected;
                }
            }
            Event::LocalWriteFailed => match self.role {
                Role::Primary => {}
                Role::Secondary if self.disk == DiskState::Diskless => {}
                Role::Secondary => {
                    // Never a failover target with a block it does not have; the reconnect
                    // resyncs it.
                    next.disk = DiskState::Inconsistent;
                    if self.conn.live() {
                        next.conn = ConnState::Disconnecting;
                    }
                }
            },
            Event::Detach => match (self.role, self.disk) {
                (_, DiskState::Diskless) => {}
                // A resync source is the good copy the peer is being made from.
                (Role::Secondary, _) if self.conn == ConnState::SyncSource => {
                    return Err(Refusal::OnlyCopy(self.conn, self.peer_disk));
                }
                (Role::Secondary, _) => {
                    next.disk = DiskState::Diskless;
                    next.want_connect = false;
                    next.conn = if self.conn.live() {
                        ConnState::Disconnecting
                    } else {
                        ConnState::StandAlone
                    };
                }
                (Role::Primary, _) => {
                    // Served on through the peer: it must hold every block, now and later.
                    if self.conn != ConnState::Connected
                        || self.peer_disk != Some(DiskState::UpToDate)
                        || self.peer_role != Some(Role::Secondary)
                    {
                        return Err(Refusal::OnlyCopy(self.conn, self.peer_disk));
                    }
                    next.disk = DiskState::Diskless;
                    next.want_connect = false;
                }
            },
            Event::Restored => match (self.role, self.disk, self.conn.live()) {
                (Role::Secondary, DiskState::Inconsistent, false) => {
                    next.disk = DiskState::Consistent;
                }
                (r @ (Role::Primary | Role::Secondary), d, _) => {
                    return Err(Refusal::NotRestorable(r, d, self.conn));
                }
            },
        }
        *self = next;
        Ok(if next == before { Outcome::Unchanged } else { Outcome::Changed })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn codes_round_trip_and_refuse_unknown_values() {
        for r in [Role::Primary, Role::Secondary] {
            assert_eq!(Role::from_code(r.code()), Some(r));
        }
        assert_eq!(Role::from_code(2), None);
        for d in [
            DiskState::Diskless,
            DiskState::Inconsistent,
            DiskState::Outdated,
            DiskState::Consistent,
            DiskState::UpToDate,
        ] {
            assert_eq!(DiskState::from_code(d.code()), Some(d));
            assert_eq!(d.name(), format!("{d:?}"));
        }
        assert_eq!(DiskState::from_code(5), None);
        assert_eq!(ConnState::Disconnecting.code(), 0);
        assert_eq!(ConnState::VerifyTarget.code(), 4);
    }
    use super::*;
    use ConnState as C;
    use DiskState as D;

    fn st(role: Role, disk: D, conn: C) -> State {
        State { role, disk, conn, peer_role: None, peer_disk: None, want_connect: true }
    }

    const SECONDARY: Role = Role::Secondary;
    const PRIMARY: Role = Role::Primary;

    #[test]
    fn promote_needs_up_to_date_data_unless_forced() {
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        assert_eq!(s.step(Event::Promote { force: false }), Ok(Outcome::Changed));
        assert_eq!((s.role, s.disk), (PRIMARY, D::UpToDate));
        assert_eq!(s.step(Event::Promote { force: false }), Ok(Outcome::Unchanged));
        for d in [D::Consistent, D::Outdated, D::Inconsistent] {
            let mut s = st(SECONDARY, d, C::Connecting);
            assert_eq!(s.step(Event::Promote { force: false }), Err(Refusal::NotUpToDate(d)));
            assert_eq!(s, st(SECONDARY, d, C::Connecting), "a refusal changes nothing");
            assert!(Refusal::NotUpToDate(d).to_string().contains("--force"));
            assert_eq!(s.step(Event::Promote { force: true }), Ok(Outcome::Changed));
            assert_eq!((s.role, s.disk), (PRIMARY, D::UpToDate));
        }
    }

    #[test]
    fn promote_is_refused_beside_a_live_primary_and_as_sync_target() {
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        s.peer_role = Some(PRIMARY);
        assert_eq!(s.step(Event::Promote { force: true }), Err(Refusal::PeerIsPrimary));
        // The peer's last report does not count once the session is gone.
        s.conn = C::Connecting;
        assert_eq!(s.step(Event::Promote { force: false }), Ok(Outcome::Changed));
        let mut s = st(SECONDARY, D::Inconsistent, C::SyncTarget);
        assert_eq!(s.step(Event::Promote { force: true }), Err(Refusal::ReceivingResync));
    }

    #[test]
    fn a_failed_promotion_restores_role_and_disk() {
        let mut s = st(SECONDARY, D::Consistent, C::StandAlone);
        s.step(Event::Promote { force: true }).unwrap();
        s.step(Event::PromotionFailed { disk: D::Consistent }).unwrap();
        assert_eq!(s, st(SECONDARY, D::Consistent, C::StandAlone));
    }

    #[test]
    fn demote_makes_a_secondary_and_keeps_the_disk() {
        let mut s = st(PRIMARY, D::UpToDate, C::Connected);
        assert_eq!(s.step(Event::Demote), Ok(Outcome::Changed));
        assert_eq!(s, st(SECONDARY, D::UpToDate, C::Connected));
        assert_eq!(s.step(Event::Demote), Ok(Outcome::Unchanged));
    }

    #[test]
    fn outdate_marks_a_secondary_and_refuses_a_primary() {
        let mut s = st(PRIMARY, D::UpToDate, C::Connecting);
        assert_eq!(s.step(Event::Outdate), Err(Refusal::PrimaryCannotBeOutdated));
        for d in [D::Outdated, D::Consistent, D::UpToDate] {
            let mut s = st(SECONDARY, d, C::Connecting);
            s.step(Event::Outdate).unwrap();
            assert_eq!(s.disk, D::Outdated);
        }
        let mut s = st(SECONDARY, D::Inconsistent, C::Connecting);
        assert_eq!(s.step(Event::Outdate), Ok(Outcome::Unchanged), "already unusable");
        let mut s = st(PRIMARY, D::UpToDate, C::Connecting);
        s.step(Event::PeerOutdated).unwrap();
        assert_eq!(s.peer_disk, Some(D::Outdated));
    }

    #[test]
    fn a_late_outdate_ends_the_session_and_a_late_confirmation_is_ignored() {
        // The Secondary, outdated while it still holds a session, leaves it (the reconnect
        // resyncs it); an Inconsistent one has nothing to protect and stays.
        for c in [C::Connected, C::SyncSource, C::VerifyTarget] {
            let mut s = st(SECONDARY, D::UpToDate, c);
            s.step(Event::Outdate).unwrap();
            assert_eq!((s.disk, s.conn), (D::Outdated, C::Disconnecting), "{c:?}");
        }
        let mut s = st(SECONDARY, D::Inconsistent, C::SyncTarget);
        assert_eq!(s.step(Event::Outdate), Ok(Outcome::Unchanged));
        assert_eq!(s.conn, C::SyncTarget);
        // The Primary, connected again, keeps what the session says of the peer.
        for c in [C::Connected, C::SyncSource] {
            let mut s = st(PRIMARY, D::UpToDate, c);
            s.peer_disk = Some(D::UpToDate);
            assert_eq!(s.step(Event::PeerOutdated), Ok(Outcome::Unchanged), "{c:?}");
            assert_eq!(s.peer_disk, Some(D::UpToDate));
        }
        let mut s = st(PRIMARY, D::UpToDate, C::Disconnecting);
        s.step(Event::PeerOutdated).unwrap();
        assert_eq!(s.peer_disk, Some(D::Outdated));
    }

    #[test]
    fn invalidate_throws_the_data_away_and_reconnects() {
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        s.peer_disk = Some(D::Inconsistent);
        assert_eq!(s.step(Event::Invalidate), Err(Refusal::PeerNotUpToDate(Some(D::Inconsistent))));
        s.peer_disk = Some(D::UpToDate);
        s.step(Event::Invalidate).unwrap();
        assert_eq!((s.disk, s.conn), (D::Inconsistent, C::Disconnecting));
        let mut s = st(SECONDARY, D::UpToDate, C::StandAlone);
        s.step(Event::Invalidate).unwrap();
        assert_eq!((s.disk, s.conn), (D::Inconsistent, C::StandAlone));
        let mut s = st(PRIMARY, D::UpToDate, C::Connected);
        assert_eq!(s.step(Event::Invalidate), Err(Refusal::PrimaryCannotBeInvalidated));
    }

    #[test]
    fn connect_and_disconnect_set_the_wish_and_end_a_live_session() {
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        s.step(Event::Disconnect).unwrap();
        assert_eq!((s.want_connect, s.conn), (false, C::Disconnecting));
        let mut s = st(SECONDARY, D::UpToDate, C::Connecting);
        s.step(Event::Disconnect).unwrap();
        assert_eq!((s.want_connect, s.conn), (false, C::StandAlone));
        s.step(Event::Connect { discard_my_data: true }).unwrap();
        assert!(s.want_connect);
        let mut s = st(PRIMARY, D::UpToDate, C::StandAlone);
        s.want_connect = false;
        assert_eq!(
            s.step(Event::Connect { discard_my_data: true }),
            Err(Refusal::PrimaryCannotDiscard)
        );
        assert!(!s.want_connect);
        assert_eq!(s.step(Event::Connect { discard_my_data: false }), Ok(Outcome::Changed));
    }

    #[test]
    fn drop_peer_ends_only_a_live_session() {
        let mut s = st(SECONDARY, D::UpToDate, C::SyncSource);
        s.step(Event::DropPeer).unwrap();
        assert_eq!(s.conn, C::Disconnecting);
        let mut s = st(SECONDARY, D::UpToDate, C::Connecting);
        assert_eq!(s.step(Event::DropPeer), Ok(Outcome::Unchanged));
    }

    #[test]
    fn attempts_follow_the_wish() {
        let mut s = st(SECONDARY, D::UpToDate, C::StandAlone);
        s.step(Event::Attempt).unwrap();
        assert_eq!(s.conn, C::Connecting);
        s.conn = C::Disconnecting;
        s.step(Event::Attempt).unwrap();
        assert_eq!(s.conn, C::Connecting);
        s.step(Event::GiveUp).unwrap();
        s.step(Event::Attempt).unwrap();
        assert_eq!(s.conn, C::StandAlone);
    }

    #[test]
    fn a_live_session_starts_as_its_plan_says() {
        let live = |sync, peer_primary, peer_inconsistent| Event::Live {
            sync,
            peer_primary,
            peer_inconsistent,
        };
        let mut s = st(SECONDARY, D::Consistent, C::Connecting);
        s.step(live(Sync::None, true, false)).unwrap();
        assert_eq!((s.conn, s.disk, s.peer_disk), (C::Connected, D::UpToDate, Some(D::UpToDate)));
        assert_eq!(s.peer_role, Some(PRIMARY));
        let mut s = st(SECONDARY, D::Inconsistent, C::Connecting);
        s.step(live(Sync::None, false, false)).unwrap();
        assert_eq!(s.disk, D::Inconsistent, "no sync does not make bad data good");
        // Defect 2: a source that restarted Consistent is UpToDate.
        let mut s = st(SECONDARY, D::Consistent, C::Connecting);
        s.step(live(Sync::Source, false, true)).unwrap();
        assert_eq!(
            (s.conn, s.disk, s.peer_disk),
            (C::SyncSource, D::UpToDate, Some(D::Inconsistent))
        );
        let mut s = st(SECONDARY, D::Outdated, C::Connecting);
        s.step(live(Sync::Source, false, true)).unwrap();
        assert_eq!(s.disk, D::Outdated, "an outdated source stays so");
        let mut s = st(SECONDARY, D::UpToDate, C::Connecting);
        s.step(live(Sync::Target, true, false)).unwrap();
        assert_eq!((s.conn, s.disk), (C::SyncTarget, D::Inconsistent));
        assert_eq!(s.peer_disk, Some(D::Consistent));
    }

    #[test]
    fn a_lost_link_forgets_the_peer_and_retries_if_wanted() {
        let mut s = st(PRIMARY, D::UpToDate, C::Connected);
        s.peer_role = Some(SECONDARY);
        s.peer_disk = Some(D::UpToDate);
        s.step(Event::LinkLost).unwrap();
        assert_eq!(s, st(PRIMARY, D::UpToDate, C::Connecting));
        s.want_connect = false;
        s.conn = C::Disconnecting;
        s.step(Event::LinkLost).unwrap();
        assert_eq!(s.conn, C::StandAlone);
    }

    #[test]
    fn peer_reports_are_taken_unless_both_are_primary() {
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        s.step(Event::PeerReport { role: PRIMARY, disk: D::UpToDate }).unwrap();
        assert_eq!((s.peer_role, s.peer_disk), (Some(PRIMARY), Some(D::UpToDate)));
        let mut s = st(PRIMARY, D::UpToDate, C::Connected);
        assert_eq!(
            s.step(Event::PeerReport { role: PRIMARY, disk: D::UpToDate }),
            Err(Refusal::BothPrimary)
        );
        assert_eq!(s.peer_role, None);
    }

    #[test]
    fn resync_ends_on_both_sides() {
        let mut s = st(PRIMARY, D::UpToDate, C::SyncSource);
        s.step(Event::SourceDone).unwrap();
        assert_eq!((s.conn, s.peer_disk), (C::Connected, Some(D::UpToDate)));
        assert_eq!(s.step(Event::SourceDone), Err(Refusal::NotSyncSource(C::Connected)));
        let mut s = st(SECONDARY, D::Inconsistent, C::SyncTarget);
        s.step(Event::TargetDone).unwrap();
        assert_eq!((s.conn, s.disk, s.peer_disk), (C::Connected, D::UpToDate, Some(D::UpToDate)));
    }

    #[test]
    fn verify_runs_from_connected_and_returns_there() {
        let mut s = st(PRIMARY, D::UpToDate, C::SyncSource);
        assert_eq!(s.step(Event::VerifyStart), Err(Refusal::VerifyNeedsConnected(C::SyncSource)));
        s.conn = C::Connected;
        s.step(Event::VerifyStart).unwrap();
        assert_eq!(s.conn, C::VerifySource);
        s.step(Event::VerifyEnd).unwrap();
        assert_eq!(s.conn, C::Connected);
        assert_eq!(s.step(Event::VerifyEnd), Ok(Outcome::Unchanged));
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        s.step(Event::PeerVerifyStart).unwrap();
        assert_eq!(s.conn, C::VerifyTarget);
        s.step(Event::PeerVerifyEnd).unwrap();
        assert_eq!(s.conn, C::Connected);
        let mut s = st(SECONDARY, D::Inconsistent, C::SyncTarget);
        assert_eq!(s.step(Event::PeerVerifyStart), Ok(Outcome::Unchanged));
    }

    #[test]
    fn a_failed_replicated_write_makes_a_secondary_inconsistent_and_reconnect() {
        let mut s = st(SECONDARY, D::UpToDate, C::Connected);
        s.step(Event::LocalWriteFailed).unwrap();
        assert_eq!((s.disk, s.conn), (D::Inconsistent, C::Disconnecting));
        let mut s = st(PRIMARY, D::UpToDate, C::Connected);
        assert_eq!(s.step(Event::LocalWriteFailed), Ok(Outcome::Unchanged));
    }

    #[test]
    fn a_failed_disk_detaches_a_secondary_and_a_primary_beside_a_good_peer_only() {
        for conn in [C::Connected, C::SyncTarget, C::Connecting, C::StandAlone] {
            let mut s = st(SECONDARY, D::UpToDate, conn);
            assert_eq!(s.step(Event::Detach), Ok(Outcome::Changed));
            assert_eq!(s.disk, D::Diskless);
            assert!(!s.want_connect);
            let leaves = if conn.live() { C::Disconnecting } else { C::StandAlone };
            assert_eq!(s.conn, leaves);
            assert_eq!(s.step(Event::Detach), Ok(Outcome::Unchanged));
        }
        let mut s = st(PRIMARY, D::UpToDate, C::Connected);
        s.peer_role = Some(SECONDARY);
        s.peer_disk = Some(D::UpToDate);
        assert_eq!(s.step(Event::Detach), Ok(Outcome::Changed));
        assert_eq!((s.role, s.disk, s.conn), (PRIMARY, D::Diskless, C::Connected));
        // The only good copy stays attached: the peer is away, syncing or not UpToDate.
        for (conn, peer) in [
            (C::Connecting, None),
            (C::SyncSource, Some(D::Inconsistent)),
            (C::Connected, Some(D::Outdated)),
            (C::VerifySource, Some(D::UpToDate)),
        ] {
            let mut s = st(SECONDARY, D::UpToDate, C::SyncSource);
            s.peer_disk = Some(D::Inconsistent);
            assert_eq!(s.step(Event::Detach), Err(Refusal::OnlyCopy(C::SyncSource, s.peer_disk)));
            let mut s = st(PRIMARY, D::UpToDate, conn);
            s.peer_role = peer.map(|_| SECONDARY);
            s.peer_disk = peer;
            let before = s;
            assert_eq!(s.step(Event::Detach), Err(Refusal::OnlyCopy(conn, peer)));
            assert_eq!(s, before);
            assert!(Refusal::OnlyCopy(conn, peer).to_string().contains("only good copy"));
        }
    }

    #[test]
    fn a_diskless_node_is_never_promoted_connected_or_resynced() {
        let mut s = st(SECONDARY, D::Diskless, C::StandAlone);
        s.want_connect = false;
        for e in [
            Event::Promote { force: true },
            Event::Promote { force: false },
            Event::Connect { discard_my_data: false },
            Event::Invalidate,
            Event::TargetDone,
        ] {
            assert_eq!(s.step(e), Err(Refusal::Diskless), "{e:?}");
        }
        assert!(Refusal::Diskless.to_string().contains("duet attach"));
        assert_eq!(s.step(Event::Outdate), Ok(Outcome::Unchanged));
        assert_eq!(s.step(Event::LocalWriteFailed), Ok(Outcome::Unchanged));
        s.step(Event::Attempt).unwrap();
        assert_eq!(s.conn, C::StandAlone);
        // A Diskless Primary demoted (its handover) leaves the session.
        let mut s = st(PRIMARY, D::Diskless, C::Connected);
        s.step(Event::Demote).unwrap();
        assert_eq!((s.role, s.conn), (SECONDARY, C::Disconnecting));
        assert_eq!(DiskState::from_code(D::Diskless.code()), Some(D::Diskless));
        assert!(D::Diskless < D::Inconsistent, "the lowest disk state");
    }

    #[test]
    fn only_a_half_synced_secondary_without_a_session_is_restored() {
        let mut s = st(SECONDARY, D::Inconsistent, C::Connecting);
        assert_eq!(s.step(Event::Restored), Ok(Outcome::Changed));
        assert_eq!((s.role, s.disk, s.conn), (SECONDARY, D::Consistent, C::Connecting));
        for (role, disk, conn) in [
            (SECONDARY, D::Inconsistent, C::SyncTarget),
            (SECONDARY, D::Inconsistent, C::Disconnecting),
            (SECONDARY, D::UpToDate, C::StandAlone),
            (SECONDARY, D::Consistent, C::StandAlone),
            (SECONDARY, D::Diskless, C::StandAlone),
            (PRIMARY, D::UpToDate, C::StandAlone),
        ] {
            let mut s = st(role, disk, conn);
            let before = s;
            assert_eq!(s.step(Event::Restored), Err(Refusal::NotRestorable(role, disk, conn)));
            assert_eq!(s, before);
        }
        assert!(
            Refusal::NotRestorable(SECONDARY, D::UpToDate, C::StandAlone)
                .to_string()
                .contains("nothing to restore")
        );
    }

    #[test]
    fn disk_codes_round_trip_and_unknown_codes_are_none() {
        for d in [D::Diskless, D::Inconsistent, D::Outdated, D::Consistent, D::UpToDate] {
            assert_eq!(DiskState::from_code(d.code()), Some(d));
        }
        assert_eq!(DiskState::from_code(5), None);
    }
}
