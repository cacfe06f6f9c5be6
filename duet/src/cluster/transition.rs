//! Transitions: a takeover or a release as a list of steps, run one at a time, and what ends
//! them (every step done, or one that must not fail failed).

use super::*;

impl Manager {
    pub(super) fn takeover(&mut self, why: String, peer_dead: bool, force: bool, after: After) {
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

    /// Maintenance mode turned on or off. When it ends, what a master holds is made to match
    /// the role the operator left: a Primary takes the VIPs, starts the master's services and
    /// opens its export; a Secondary still holding them gives them up.
    pub(super) fn maintenance_changed(&mut self, on: bool) {
        if on == self.maintenance {
            return;
        }
        self.maintenance = on;
        self.said = None;
        if on {
            self.event("maintenance mode on: the cluster manager changes no role by itself (no takeover, failback or handover) and refuses switchovers until `duet maintenance off`; a slave is still outdated when replication breaks");
            return;
        }
        self.event("maintenance mode off: the cluster manager acts again");
        if self.transition.is_some() {
            return;
        }
        let l = self.local;
        if l.primary && !self.holding {
            self.start_steps(
                Kind::Takeover,
                "maintenance mode ended with this node Primary: taking the VIPs, starting the master's services, opening the export".into(),
                After::Nothing,
                VecDeque::from([Step::VipUp, Step::ServicesMaster, Step::ExportOpen]),
            );
        } else if !l.any_primary && self.holding {
            self.start_steps(
                Kind::Release,
                "maintenance mode ended with this node Secondary: giving up the VIPs and the master's services".into(),
                After::Nothing,
                VecDeque::from([Step::ExportClose, Step::ServicesSlave, Step::VipDown]),
            );
        } else if l.any_primary && !l.primary {
            self.say_once("maintenance mode ended with this node Primary for some resources only: it is master of none; turn maintenance on and finish with `duet primary` or `duet secondary`".into());
        }
    }

    pub(super) fn start(&mut self, kind: Kind, why: String, after: After) {
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

    pub(super) fn start_steps(
        &mut self,
        kind: Kind,
        why: String,
        after: After,
        steps: VecDeque<Step>,
    ) {
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

    pub(super) fn step_done(&mut self, o: Outcome) {
        let Some(mut t) = self.transition.take() else { return };
        let Some(step) = t.steps.pop_front() else { return };
        let abort: Option<String> = match (step, &o) {
            (Step::Fence { .. }, Outcome::Fence(v)) if v.peer_gone() => {
                self.event(&format!("fence command: {v}"));
                None
            }
            (Step::Fence { .. }, Outcome::Fence(v @ FenceVerdict::OutdateMyself)) => {
                let id = self.id();
                self.out.push(Action::Outdate { id, mask: self.s.all() });
                Some(format!("fence command says {v}"))
            }
            (Step::Fence { .. }, Outcome::Fence(v)) => Some(format!("fence command {v}")),
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
            let r = Err(Refusal::StepFailed { step, why });
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
            Step::VipUp => self.holding = true,
            Step::VipDown => self.holding = false,
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

    pub(super) fn conclude(&mut self, after: After, r: Answer) {
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
}
