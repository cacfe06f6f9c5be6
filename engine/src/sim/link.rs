//! The simulated link: frames in order with a delay, the handshake (the engine's plan and
//! session start), the teardown on both sides, and delivery to the nodes.

use super::*;
use crate::replica::Persist;

impl Sim {
    pub(super) fn send(&mut self, from: usize, m: Msg) {
        if !self.link.live {
            return;
        }
        let delay = 1 + self.rand(5);
        let at = self.now_ms + delay;
        // In order: never before what is already queued.
        let at = self.link.q[1 - from].back().map_or(at, |x| x.0.max(at));
        let s = self.link.session;
        self.link.q[1 - from].push_back((at, s, m));
    }

    /// Both sides tear the session down (the executor's `teardown`): unacknowledged and
    /// unflushed writes are out of sync, client writes waiting for the peer complete alone.
    pub(super) fn link_lost(&mut self, why: &str) {
        self.log(format!("link lost: {why}"));
        // The cluster manager's answer while the heartbeat still reaches the peer: the Primary
        // outdates the Secondary, so it never takes over with data the Primary goes on
        // changing (the heartbeat is not simulated; it is assumed up).
        // (Never by a Diskless Primary: the Secondary holds the only copy.)
        // The Secondary is outdated before its own teardown (it may not have noticed the loss
        // yet); the Primary records the confirmation once its session is gone, as the real
        // one hears it only after it saw the link down.
        let outdated = self.serving().filter(|&p| {
            !self.n[p].diskless()
                && self.n[1 - p].alive
                && self.n[1 - p].r.st.role == Role::Secondary
                && self.n[1 - p].outdate()
        });
        if let Some(p) = outdated {
            self.log(format!("{} outdated over the heartbeat", self.n[1 - p].name));
        }
        self.link.live = false;
        self.link.q = [VecDeque::new(), VecDeque::new()];
        for i in 0..2 {
            if !self.n[i].alive {
                continue;
            }
            let waiting = self.n[i].teardown();
            if self.n[i].diskless() {
                // Nowhere written: each fails (EIO), never acknowledged.
                for w in waiting {
                    self.log(format!(
                        "{}: write b{} s{} fails (Diskless, peer lost)",
                        self.n[i].name, w.block, w.seq
                    ));
                }
                let _ = self.n[i].take_flush_waiters();
                continue;
            }
            for w in waiting {
                let fresh = self.rand(u64::MAX);
                self.n[i].finish_alone(w.block, fresh);
                self.ack_write(i, w.block, w.seq, false);
            }
            // Client flushes waiting for the peer: answered locally (durable here).
            for fid in self.n[i].take_flush_waiters() {
                self.n[i].disk.flush();
                self.flush_acked(fid);
            }
        }
        if let Some(p) = outdated {
            self.n[p].peer_outdated();
        }
    }

    /// The handshake, both sides at once, with the engine's plan and session start.
    pub(super) fn try_connect(&mut self) {
        if self.link.live || !self.link.up || !(self.n[0].alive && self.n[1].alive) {
            return;
        }
        for i in 0..2 {
            let _ = self.n[i].r.st.step(Event::Attempt);
        }
        if !(self.n[0].r.st.want_connect && self.n[1].r.st.want_connect) {
            return;
        }
        let facts = [self.n[0].facts(), self.n[1].facts()];
        let plans = [
            plan(&self.policies, &facts[0], &facts[1], false),
            plan(&self.policies, &facts[1], &facts[0], true),
        ];
        // Invariant 4: both sides served acknowledged writes apart, and nobody discards:
        // split brain, reported.
        let diverged = self.solo[0] > 0 && self.solo[1] > 0;
        let discard = facts[0].discard_my_data || facts[1].discard_my_data;
        for (i, (p, v)) in plans.iter().enumerate() {
            self.log(format!("{}: connect, rule {} → {:?}", self.n[i].name, v.rule, p));
        }
        if diverged && !discard {
            for (p, _) in &plans {
                if !matches!(p, Plan::SplitBrain(_) | Plan::Refuse(_)) {
                    let why =
                        format!("both nodes served writes apart, yet the connect plan is {p:?}");
                    self.violate(4, why);
                    return;
                }
            }
        }
        let mut go = true;
        for (i, (p, _)) in plans.iter().enumerate() {
            match p {
                Plan::SplitBrain(why) | Plan::Refuse(why) => {
                    self.n[i].r.give_up(matches!(p, Plan::SplitBrain(_)), why.clone());
                    go = false;
                }
                Plan::Retry(_) => go = false,
                Plan::NoSync | Plan::Source { .. } | Plan::Target { .. } => {}
            }
        }
        if !go {
            return;
        }
        for (i, (_, v)) in plans.iter().enumerate() {
            crate::session::apply_fixup(&mut self.n[i].r.sb.uuids, v.fixup);
        }
        // Bitmaps both ways, OR-ed.
        let (b0, b1) = (self.n[0].r.bitmap.clone(), self.n[1].r.bitmap.clone());
        self.n[0].r.bitmap.or(&b1);
        self.n[1].r.bitmap.or(&b0);
        let mut syncs = [Sync::None; 2];
        for (i, (p, _)) in plans.iter().enumerate() {
            if crate::session::full(p) {
                self.n[i].r.bitmap.set_all();
            }
            let w = self.n[i].r.bitmap.weight();
            let sides = crate::session::Sides {
                me_primary: self.n[i].r.st.role == Role::Primary,
                peer_primary: self.n[1 - i].r.st.role == Role::Primary,
                my_weight: facts[i].weight,
                peer_weight: facts[1 - i].weight,
            };
            syncs[i] = crate::session::start(p, w, sides, i == 1).expect("live plans only");
        }
        self.link.session += 1;
        self.link.live = true;
        self.solo = [0, 0];
        let peer_primary =
            [self.n[1].r.st.role == Role::Primary, self.n[0].r.st.role == Role::Primary];
        let peer_inconsistent = [
            self.n[1].r.st.disk == DiskState::Inconsistent,
            self.n[0].r.st.disk == DiskState::Inconsistent,
        ];
        for i in 0..2 {
            let fresh = self.rand(u64::MAX);
            if let Some(g) =
                self.n[i].go_live(syncs[i], peer_primary[i], peer_inconsistent[i], fresh)
            {
                self.send(i, Msg::SyncUuid(g));
            }
            let r = self.n[i].report();
            self.send(i, r);
        }
        if self.episode && discard {
            // The operator resolved the split brain: the survivor's data is the truth now.
            self.episode = false;
            self.rebase_on(usize::from(facts[0].discard_my_data));
        }
        let differ: Vec<String> = (0..BLOCKS)
            .filter(|&b| self.n[0].disk.read(b) != self.n[1].disk.read(b))
            .map(|b| format!("b{b}:{}/{}", self.n[0].disk.read(b), self.n[1].disk.read(b)))
            .collect();
        let bits = |i: usize| -> String {
            let w = self.n[i].r.bitmap.weight();
            if w == BLOCKS {
                return "all".into();
            }
            (0..BLOCKS)
                .filter(|&b| self.n[i].r.bitmap.get(b))
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        self.log(format!(
            "session {} live: {:?} / {:?}; oos [{}] / [{}]; differing {}",
            self.link.session,
            syncs[0],
            syncs[1],
            bits(0),
            bits(1),
            differ.join(" ")
        ));
    }

    /// Node `i` became Primary: it serves what it holds, and the writes it owes that are not
    /// flushed are now in its care (its own power loss may lose them, as NBD allows).
    pub(super) fn took_over(&mut self, i: usize) {
        self.n[i].promoted_at = self.step;
        for list in &mut self.acked {
            for a in list.iter_mut().filter(|a| !a.flushed && !a.lost) {
                a.writer = i;
                a.via_peer = false;
            }
        }
    }

    /// After an operator's decision (a discarded side): what is owed is what node `i` holds.
    pub(super) fn rebase_on(&mut self, i: usize) {
        for b in 0..BLOCKS {
            let v = self.n[i].disk.read(b);
            self.acked[idx(b)] =
                vec![Acked { seq: v, flushed: false, writer: i, lost: false, via_peer: false }];
        }
    }

    /// Delivers due frames and runs the nodes' timers.
    pub(super) fn tick(&mut self) {
        self.try_connect();
        for to in 0..2 {
            loop {
                if !self.link.live {
                    break;
                }
                // A slow disk holds the node's frames back.
                if self.n[to].slow_until > self.now_ms {
                    break;
                }
                let Some(&(at, s, m)) = self.link.q[to].front() else { break };
                if at > self.now_ms {
                    break;
                }
                self.link.q[to].pop_front();
                if s != self.link.session || !self.n[to].alive {
                    continue;
                }
                self.deliver(to, m);
            }
        }
        let now = self.now();
        for i in 0..2 {
            if !(self.link.live && self.n[i].alive) {
                continue;
            }
            // The transfer log's bound (the executor's session tick).
            if let Some(id) = self.n[i].flush_due(now) {
                self.send(i, Msg::Flush { id });
            }
            // The resync target asks for what is left.
            for block in self.n[i].resync_requests(4) {
                self.send(i, Msg::RsRequest { block });
            }
            if self.n[i].resync_finished() {
                let name = self.n[i].name;
                self.log(format!("{name}: resync finished (target)"));
                self.n[i].finish_target();
                self.send(i, Msg::RsDone);
                let r = self.n[i].report();
                self.send(i, r);
            }
        }
    }

    pub(super) fn deliver(&mut self, to: usize, m: Msg) {
        match m {
            Msg::Data { id, block, seq } => {
                // A frame refused ends the session, as the executor's reader does.
                let ok = match self.n[to].apply_replicated(block, seq) {
                    Ok(ok) => ok,
                    Err(e) => return self.link_lost(&e.to_string()),
                };
                self.send(to, Msg::WriteAck { id, ok });
                if self.n[to].r.st.conn == ConnState::Disconnecting {
                    self.link_lost("a replicated write failed on the Secondary");
                }
            }
            Msg::WriteAck { id, ok } => {
                let now = self.now();
                if let Some(w) = self.n[to].write_acked(id, ok, now) {
                    if !ok && self.n[to].diskless() {
                        self.log(format!(
                            "{}: write b{} s{} fails (Diskless, the peer's failed)",
                            self.n[to].name, w.block, w.seq
                        ));
                        return;
                    }
                    if !ok {
                        let fresh = self.rand(u64::MAX);
                        self.n[to].finish_alone(w.block, fresh);
                    }
                    self.ack_write(to, w.block, w.seq, ok);
                }
            }
            Msg::Flush { id } => {
                // Durable data and metadata before the answer (the executor's Flush).
                self.n[to].persist(Persist { data: true, bitmap: true, superblock: false });
                self.send(to, Msg::FlushAck { id });
            }
            Msg::FlushAck { id } => {
                let now = self.now();
                if let Some(fid) = self.n[to].flush_acked(id, now) {
                    self.flush_acked(fid);
                }
            }
            Msg::RsRequest { block } => match self.n[to].serve_resync(block) {
                Ok(seq) => self.send(to, Msg::RsData { block, seq }),
                Err(e) => self.link_lost(&e.to_string()),
            },
            Msg::RsData { block, seq } => {
                if let Err(e) = self.n[to].apply_resync(block, seq) {
                    self.link_lost(&e.to_string());
                }
            }
            Msg::RsDone => {
                self.n[to].source_done();
            }
            Msg::SyncUuid(g) => self.n[to].sync_uuid(g),
            Msg::Report { role, disk } => {
                if self.n[to].r.peer_report(role, disk).is_err() {
                    self.link_lost("both Primary");
                    return;
                }
                if self.n[to].promote_after_report && role == Role::Secondary {
                    self.n[to].promote_after_report = false;
                    let fresh = self.rand(u64::MAX);
                    if self.n[to].promote(false, fresh).is_ok() {
                        self.took_over(to);
                        let r = self.n[to].report();
                        self.send(to, r);
                    }
                }
            }
        }
    }
}
