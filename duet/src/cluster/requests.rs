//! Requests: the peer's control messages, and make-master / make-slave from the operator, the
//! peer or this node's own policy; each answered to whoever asked.

use super::*;

impl Manager {
    pub(super) fn control(&mut self, c: Control) {
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
                    self.finish(origin, Err(Refusal::PeerRefusedRelease(reason)));
                }
            }
            Control::TakeOver { id, force } => {
                if self.maintenance {
                    let reason = Refusal::Maintenance.to_string();
                    self.reply(Control::TookOver { id, ok: false, reason });
                } else if self.local.any_primary {
                    self.reply(Control::TookOver { id, ok: true, reason: "already master".into() });
                } else if !self.healthy {
                    let reason = Refusal::UnhealthyToo.to_string();
                    self.reply(Control::TookOver { id, ok: false, reason });
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
                    Err(Refusal::PeerDidNotTakeOver(reason))
                };
                self.finish(origin, r);
            }
        }
    }

    pub(super) fn release_requested(&mut self, id: u64) {
        if self.maintenance {
            let reason = Refusal::Maintenance.to_string();
            self.reply(Control::Released { id, ok: false, reason });
            return;
        }
        if !self.local.any_primary {
            self.hold_until = Some(self.now + self.s.switchover_timeout);
            self.reply(Control::Released { id, ok: true, reason: "not master".into() });
            return;
        }
        let refuse = if self.transition.is_some() {
            Some(Refusal::BusyHere)
        } else if !self.local.in_sync {
            Some(Refusal::RequesterNotInSync)
        } else {
            None
        };
        if let Some(r) = refuse {
            self.event(&format!("refused to release for the peer: {r}"));
            self.reply(Control::Released { id, ok: false, reason: r.to_string() });
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

    /// Why a make-master (`force`: with `--force`) cannot start now, judged on the local data
    /// and the peer as last seen (`None`: it can). Busy and stopping are the caller's.
    pub(super) fn master_refusal(&self, force: bool) -> Option<Refusal> {
        let l = self.local;
        match self.peer {
            PeerState::Alive => {
                let stale = if l.resyncing {
                    Some(Stale::Resyncing)
                } else if !l.uptodate {
                    Some(Stale::NotUpToDate(l.worst_disk))
                } else if !l.in_sync {
                    Some(Stale::NotInSync)
                } else {
                    None
                };
                let peer_master = self.peer_view.is_some_and(|v| v.any_primary);
                stale
                    .filter(|_| peer_master || !force)
                    .map(|why| Refusal::Stale { why, peer_master })
            }
            PeerState::Unknown if !force => Some(Refusal::PeerNotHeard),
            PeerState::Dead if !force => Some(Refusal::PeerUnreachable),
            PeerState::Dead | PeerState::Unknown => None,
        }
    }

    /// Why a make-slave cannot start now (`None`: it can). Busy is the caller's.
    pub(super) fn slave_refusal(&self) -> Option<Refusal> {
        if self.peer != PeerState::Alive {
            Some(Refusal::NoNodeToHandTo)
        } else if !self.local.in_sync {
            Some(Refusal::PeerNotInSync)
        } else {
            None
        }
    }

    pub(super) fn make_master(&mut self, origin: Origin, force: bool) {
        if self.stopping {
            return self.finish(origin, Err(Refusal::Stopping));
        }
        if self.maintenance {
            return self.finish(origin, Err(Refusal::Maintenance));
        }
        if self.transition.is_some() || self.pending.is_some() {
            return self.finish(origin, Err(Refusal::SwitchoverRunning));
        }
        if self.local.primary {
            return self.finish(origin, Ok("already the running master".into()));
        }
        if let Some(why) = self.master_refusal(force) {
            return self.finish(origin, Err(why));
        }
        match self.peer {
            PeerState::Alive => {
                if self.peer_view.is_some_and(|v| v.any_primary) {
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

    pub(super) fn make_slave(&mut self, origin: Origin, health: bool) {
        if self.maintenance {
            return self.finish(origin, Err(Refusal::Maintenance));
        }
        if self.transition.is_some() || self.pending.is_some() {
            return self.finish(origin, Err(Refusal::SwitchoverRunning));
        }
        if !self.local.any_primary {
            return self.finish(origin, Ok("already a slave".into()));
        }
        if let Some(why) = self.slave_refusal() {
            return self.finish(origin, Err(why));
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

    pub(super) fn after(&self, origin: Origin) -> After {
        match origin {
            Origin::Operator(t) => After::Reply(t),
            Origin::Peer(id) => After::TookOver(id),
            Origin::Auto => After::Nothing,
        }
    }

    /// Answers whoever asked.
    pub(super) fn finish(&mut self, origin: Origin, r: Answer) {
        match origin {
            Origin::Operator(token) => self.out.push(Action::Reply { token, result: r }),
            Origin::Peer(id) => {
                let (ok, reason) = split(r);
                self.reply(Control::TookOver { id, ok, reason });
            }
            Origin::Auto => {
                if let Err(e) = r {
                    self.event(&e.to_string());
                    self.retry_at = Some(self.now + self.s.retry);
                }
            }
        }
    }
}
