//! Timers and policy: resending and giving up on requests, and `decide`, the rules of the
//! module's documentation in their order.

use super::*;

impl Manager {
    pub(super) fn timeouts(&mut self) {
        let now = self.now;
        let resend = self.s.resend;
        match self.pending.clone() {
            Some(Pending::Released { id, origin, deadline, sent }) => {
                if now >= deadline {
                    self.pending = None;
                    self.finish(origin, Err(Refusal::ReleaseUnanswered));
                } else if now.saturating_duration_since(sent) >= resend {
                    self.out.push(Action::Send(Control::Release { id }));
                    self.pending = Some(Pending::Released { id, origin, deadline, sent: now });
                }
            }
            Some(Pending::TookOver { id, origin, health, deadline, sent }) => {
                if now >= deadline {
                    self.pending = None;
                    self.finish(origin, Err(Refusal::TakeOverUnanswered));
                } else if now.saturating_duration_since(sent) >= resend {
                    self.out.push(Action::Send(Control::TakeOver { id, force: false }));
                    self.pending =
                        Some(Pending::TookOver { id, origin, health, deadline, sent: now });
                }
            }
            Some(Pending::Sync { origin, deadline }) => {
                let l = self.local;
                // In sync, or the peer's disk is detached: a Diskless Primary wrote only
                // through us (its demotion flushed us first), so our UpToDate disk is all of it.
                let diskless = self.peer_view.map_or(0, |v| v.diskless);
                let complete = l.in_sync || (l.synced | diskless) & self.s.all() == self.s.all();
                if l.uptodate
                    && complete
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
                    let (disk, in_sync) = (l.worst_disk, l.in_sync);
                    self.finish(origin, Err(Refusal::NoSyncInTime { disk, in_sync }));
                }
            }
            None => {}
        }
        // Replication came back before the peer confirmed: the request is withdrawn, so a late
        // copy does not outdate a peer that is connected and in sync again.
        if let Some((_, mask, _)) = self.outdating
            && mask & self.local.disconnected == 0
        {
            self.outdating = None;
            self.event(
                "replication is back before the peer confirmed the outdate: request withdrawn",
            );
        }
        if let Some((id, mask, sent)) = self.outdating
            && now.saturating_duration_since(sent) >= resend
        {
            self.out.push(Action::Send(Control::Outdate { id, mask }));
            self.outdating = Some((id, mask, now));
        }
    }

    pub(super) fn decide(&mut self) {
        if self.transition.is_some() {
            return;
        }
        // Maintenance mode suspends every change of role; what keeps the data safe goes on
        // (outdating the peer, resource-and-stonith's freeze and fencing), as DRBD's fencing
        // does whatever Pacemaker's maintenance mode says: a slave that missed writes while the
        // replication link was down must never look good enough to take over afterwards.
        let maint = self.maintenance;
        let may_retry = self.retry_at.is_none_or(|t| self.now >= t);
        let l = self.local;
        let pv = self.peer_view;
        let alive = self.peer == PeerState::Alive;
        if l.any_primary {
            // Both masters, unless the replication link, connected on every resource, says the
            // peer is Secondary: its heartbeat frame is older than its demotion (a manual
            // switchover in maintenance mode, say).
            let peer_master = l.peer_primary || l.disconnected != 0;
            if alive && pv.is_some_and(|v| v.any_primary) && peer_master {
                self.dual_seen = true;
                if maint {
                    self.say_once("maintenance mode: both nodes are master; nothing is released until `duet maintenance off`".into());
                } else if self.s.configured_master {
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
            // A Diskless resource without its replication session serves only errors: the
            // master gives the role up so that the peer, which holds that resource's only copy,
            // can take over (it is UpToDate and not outdated: see below). Not while another
            // resource is cut off too: this node may hold writes of it the peer lacks, and it
            // keeps serving it (outdating the peer's copy).
            if l.diskless & l.disconnected != 0
                && l.disconnected & !l.diskless == 0
                && self.pending.is_none()
                && !self.stopping
                && !maint
            {
                self.start(
                    Kind::Release,
                    "a detached (Diskless) resource lost its replication session: nothing to serve; releasing the master role for the peer"
                        .into(),
                    After::Nothing,
                );
                return;
            }
            // Outdate the peer over the heartbeat when replication is down but the peer answers.
            // (Never where this node is Diskless: the peer's copy is the only one; nor where
            // the peer's own frames say its disk is already unusable.)
            let unusable = pv.map_or(0, |v| v.unusable);
            // Nor for scheduled sync: its link idles between catch-ups on purpose, and the standby's
            // last consistent state is what a failover is meant to promote.
            let need =
                l.disconnected & !self.peer_outdated & !l.diskless & !unusable & !l.scheduled;
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
                let exposed = l.disconnected & !(self.peer_outdated | unusable | l.scheduled) != 0
                    && !self.fenced;
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
            if !may_retry || maint {
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
        if maint {
            if self.peer == PeerState::Dead {
                self.say_once("maintenance mode is on: the peer is dead on every heartbeat link, and this node does not take over (`duet maintenance off` lets the cluster manager act)".into());
            }
            return;
        }
        if self.pending.is_some() || !may_retry || self.stopping {
            return;
        }
        match self.peer {
            PeerState::Unknown => {}
            PeerState::Dead => {
                if l.uptodate || l.restorable {
                    if l.restorable {
                        self.event("the peer died during a scheduled catch-up: taking over with the last consistent state kept before it");
                    }
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
