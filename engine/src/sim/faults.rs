//! The faults the simulation draws: crashes, power loss, restarts, link cuts and heals, slow and
//! failing disks, and operator commands at random points.

use super::*;

impl Sim {
    pub(super) fn crash(&mut self, power: bool) {
        let i = usize::try_from(self.rand(2)).expect("0 or 1");
        if !self.n[i].alive {
            return;
        }
        let kind = if power { Fault::PowerLoss } else { Fault::Crash };
        let name = self.n[i].name;
        self.fault(kind, name.into());
        self.kill(i, power);
    }

    pub(super) fn kill(&mut self, i: usize, power: bool) {
        self.n[i].die(power);
        // The client's flushes through it are gone with it.
        if self.link.live {
            self.link_lost("the peer died");
        }
        if power {
            self.note_power_loss(i);
        }
    }

    /// After node `i` lost power: its own acknowledged, never-flushed writes that did not reach
    /// its disk are excused (see [`Acked::lost`]); every other acknowledged write is still owed
    /// (a Secondary's power loss excuses nothing: the transfer log's guarantee).
    ///
    /// A Diskless Primary's writes live on its peer's disk alone: the peer's power loss is the
    /// power loss of their only disk, and the Diskless node's own excuses nothing.
    pub(super) fn note_power_loss(&mut self, i: usize) {
        for b in 0..BLOCKS {
            let held = self.n[i].disk.read(b);
            for a in &mut self.acked[idx(b)] {
                let on_this_disk = (a.writer == i) != a.via_peer;
                if on_this_disk && !a.flushed && held < a.seq {
                    a.lost = true;
                }
            }
        }
    }

    pub(super) fn both_restart(&mut self) {
        let power = self.chance(500);
        self.fault(Fault::BothRestart, if power { "power loss" } else { "crash" }.into());
        for i in 0..2 {
            if self.n[i].alive {
                self.kill(i, power);
            }
        }
        for i in 0..2 {
            self.n[i].restart();
        }
    }

    pub(super) fn restart_dead(&mut self) {
        for i in 0..2 {
            if !self.n[i].alive {
                let name = self.n[i].name;
                self.fault(Fault::Restart, name.into());
                self.n[i].restart();
                return;
            }
        }
    }

    pub(super) fn cut(&mut self) {
        if !self.link.up {
            return;
        }
        self.fault(Fault::Cut, "replication link".into());
        self.link.up = false;
        if self.link.live {
            self.link_lost("link cut");
        }
    }

    pub(super) fn heal(&mut self) {
        if self.link.up {
            return;
        }
        self.fault(Fault::Heal, "replication link".into());
        self.link.up = true;
    }

    pub(super) fn slow_disk(&mut self) {
        let i = usize::try_from(self.rand(2)).expect("0 or 1");
        let ms = 50 + self.rand(500);
        self.fault(Fault::SlowDisk, format!("{} for {ms} ms", self.n[i].name));
        self.n[i].slow_until = self.now_ms + ms;
    }

    pub(super) fn disk_error(&mut self) {
        let Some(s) = (0..2).find(|&i| self.n[i].alive && self.n[i].r.st.role == Role::Secondary)
        else {
            return;
        };
        // (Not beside a Diskless Primary: this disk is the only one, a double failure.)
        if self.n[1 - s].disk_dead {
            return;
        }
        let name = self.n[s].name;
        self.fault(Fault::DiskError, format!("{name}: the next replicated write fails"));
        self.n[s].fail_next_write = true;
    }

    /// A node's disk fails for good and is detached (`on_io_error = "detach"`). Drawn only where
    /// the engine accepts the detach (a Secondary, or a Primary beside a connected UpToDate
    /// Secondary): a Primary's refused detach is a double failure, the only copy gone.
    pub(super) fn disk_fail(&mut self) {
        let i = usize::try_from(self.rand(2)).expect("0 or 1");
        let o = &self.n[1 - i];
        // Not the last good copy (a double failure loses data whatever the software does):
        // the other node is alive with its disk and has every write — the Primary, or an
        // UpToDate peer in a live session.
        let covered = o.alive
            && !o.disk_dead
            && !o.fail_next_write
            && o.r.st.disk == DiskState::UpToDate
            && (o.r.st.role == Role::Primary || self.link.live);
        if !self.n[i].alive || self.n[i].disk_dead || self.episode || !covered {
            return;
        }
        if !self.n[i].fail_disk() {
            return;
        }
        let name = self.n[i].name;
        self.fault(
            Fault::DiskFail,
            format!("{name}: disk failed, detached ({:?})", self.n[i].r.st.role),
        );
        if self.n[i].r.st.conn == ConnState::Disconnecting {
            self.link_lost("the Secondary's disk failed");
        } else {
            let r = self.n[i].report();
            self.send(i, r);
        }
    }

    /// `duet make-master` on the Secondary of a connected, in-sync pair.
    pub(super) fn switchover(&mut self) {
        let Some(p) = self.serving() else { return };
        let s = 1 - p;
        let synced = self.link.live
            && self.n[s].alive
            && self.n[s].r.st.conn == ConnState::Connected
            && self.n[s].r.st.disk == DiskState::UpToDate;
        if !synced || self.episode {
            // Given up (the peer is not in sync): the export opens again.
            self.n[p].closing = false;
            return;
        }
        // The export is closed and drained before the demotion (the executor's release): no
        // new requests, and the switchover completes at a later draw once none is in flight.
        self.n[p].closing = true;
        if !self.n[p].quiet() {
            return;
        }
        if self.n[p].demote().is_err() {
            // The peer flushes first (the executor's demote asks, then demotes).
            let now = self.now();
            if let Some(id) = self.n[p].send_flush(None, now) {
                self.send(p, Msg::Flush { id });
            }
            return;
        }
        let kind = if self.n[p].diskless() { Fault::Handover } else { Fault::Switchover };
        self.fault(kind, format!("{} → {}", self.n[p].name, self.n[s].name));
        if self.n[p].diskless() {
            // The handover of a failed disk: the Diskless node leaves the session as it is
            // demoted; the heartbeat tells the peer, which promotes.
            self.link_lost("the Diskless Primary handed over");
            let fresh = self.rand(u64::MAX);
            if self.n[s].promote(false, fresh).is_ok() {
                self.took_over(s);
            }
            return;
        }
        let report = self.n[p].report();
        self.send(p, report);
        // The Secondary promotes once it has heard the demotion (the real manager waits so).
        self.n[s].promote_after_report = true;
    }

    pub(super) fn disconnect(&mut self) {
        let i = usize::try_from(self.rand(2)).expect("0 or 1");
        if !self.n[i].alive || !self.n[i].r.st.want_connect {
            return;
        }
        self.fault(Fault::Disconnect, self.n[i].name.into());
        let _ = self.n[i].r.st.step(Event::Disconnect);
        if self.link.live {
            self.link_lost("disconnected on request");
        }
    }

    pub(super) fn connect(&mut self) {
        for i in 0..2 {
            if self.n[i].alive && !self.n[i].r.st.want_connect {
                self.fault(Fault::Connect, self.n[i].name.into());
                // A split brain is resolved by the operator: one victim discards its changes
                // (beta, unless only beta is Primary), demoted first if it is Primary.
                let victim = if self.n[1].r.st.role == Role::Primary
                    && self.n[0].r.st.role == Role::Secondary
                {
                    0
                } else {
                    1
                };
                if self.n[i].r.split_brain.is_some()
                    && i == victim
                    && self.n[i].r.st.role == Role::Primary
                {
                    self.n[i].demote().expect("a split brain has no live session");
                    self.log(format!("{}: secondary (the split brain's victim)", self.n[i].name));
                }
                let discard = self.n[i].r.split_brain.is_some()
                    && i == victim
                    && self.n[i].r.st.role == Role::Secondary;
                self.n[i].connect(discard);
                return;
            }
        }
    }

    pub(super) fn invalidate(&mut self) {
        // An operator who knows what it does: on a Secondary connected to an UpToDate peer.
        let Some(s) = (0..2).find(|&i| {
            self.n[i].alive
                && self.n[i].r.st.role == Role::Secondary
                && self.link.live
                && self.n[1 - i].r.st.disk == DiskState::UpToDate
        }) else {
            return;
        };
        if self.n[s].invalidate() {
            self.fault(Fault::Invalidate, self.n[s].name.into());
            if self.link.live {
                self.link_lost("invalidate reconnects");
            }
        }
    }

    /// An operator promotes the Secondary while the link is cut and the Primary lives on: a
    /// dual-Primary episode that must end in a reported split brain.
    pub(super) fn partition_promote(&mut self) {
        let Some(p) = self.serving() else { return };
        let s = 1 - p;
        // (An operator forces a node with consistent, if stale, data; forcing an Inconsistent
        // one starts an unrelated history, which only `create-md --force` undoes.)
        if self.link.up
            || !self.n[s].alive
            || self.n[s].r.st.role == Role::Primary
            || self.n[s].r.st.disk == DiskState::Inconsistent
        {
            return;
        }
        let fresh = self.rand(u64::MAX);
        if self.n[s].promote(true, fresh).is_ok() {
            self.fault(
                Fault::PartitionPromote,
                format!("{} beside {}", self.n[s].name, self.n[p].name),
            );
            self.took_over(s);
            self.episode = true;
        }
    }

    /// The cluster manager's failover: the Primary is dead, the Secondary's data is UpToDate;
    /// or its handover: the Primary's disk is detached, the Secondary in sync.
    pub(super) fn failover(&mut self) {
        if let Some(p) = self.serving().filter(|&p| self.n[p].diskless()) {
            // The export closes (drained) and the handover waits for what is in flight.
            self.n[p].closing = true;
            self.switchover();
            return;
        }
        for s in 0..2 {
            let p = 1 - s;
            if self.n[s].alive
                && !self.n[p].alive
                && self.n[s].r.st.role == Role::Secondary
                && self.n[p].was_primary_at_death
            {
                let fresh = self.rand(u64::MAX);
                if self.n[s].promote(false, fresh).is_ok() {
                    self.took_over(s);
                    self.n[p].was_primary_at_death = false;
                    let name = self.n[s].name;
                    self.log(format!("{name}: took over (failover)"));
                }
            }
        }
    }
}
