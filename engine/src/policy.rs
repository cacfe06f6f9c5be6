//! What to do after a handshake: the generation verdict ([`crate::generation::compare`]), then
//! disk states, split-brain policies, `--discard-my-data` and the role conflict checks, in the
//! order of DRBD 8.4's `drbd_sync_handshake`. Pure: both sides run it on the same facts (each
//! from its own point of view) and reach mirrored plans.

use crate::generation::{Decision, Side, Verdict, compare};

/// The `after_sb_0pri` names (plus `discard-node-NAME`).
pub const SB0_NAMES: [&str; 5] = [
    "disconnect",
    "discard-younger-primary",
    "discard-older-primary",
    "discard-zero-changes",
    "discard-least-changes",
];
/// The `after_sb_1pri` names.
pub const SB1_NAMES: [&str; 5] =
    ["disconnect", "consensus", "violently-as0p", "discard-secondary", "call-pri-lost-after-sb"];
/// The `after_sb_2pri` names.
pub const SB2_NAMES: [&str; 3] = ["disconnect", "violently-as0p", "call-pri-lost-after-sb"];

/// `after_sb_0pri` (no Primary at connect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sb0 {
    Disconnect,
    DiscardYoungerPrimary,
    DiscardOlderPrimary,
    DiscardZeroChanges,
    DiscardLeastChanges,
    /// The named node's data is discarded.
    DiscardNode(String),
}

/// `after_sb_1pri` (one Primary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sb1 {
    Disconnect,
    Consensus,
    ViolentlyAs0p,
    DiscardSecondary,
    CallPriLostAfterSb,
}

/// `after_sb_2pri` (two Primaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sb2 {
    Disconnect,
    ViolentlyAs0p,
    CallPriLostAfterSb,
}

/// The three policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    pub p0: Sb0,
    pub p1: Sb1,
    pub p2: Sb2,
}

impl Default for Policies {
    fn default() -> Self {
        Self { p0: Sb0::Disconnect, p1: Sb1::Disconnect, p2: Sb2::Disconnect }
    }
}

/// A split-brain policy value that is not one; the message names the key and the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "after_sb_0pri = {0:?}: not a policy; use disconnect, discard-younger-primary, discard-older-primary, discard-zero-changes, discard-least-changes or discard-node-NAME"
    )]
    Sb0(String),
    #[error(
        "after_sb_1pri = {0:?}: not a policy; use disconnect, consensus, violently-as0p, discard-secondary or call-pri-lost-after-sb"
    )]
    Sb1(String),
    #[error(
        "after_sb_2pri = {0:?}: not a policy; use disconnect, violently-as0p or call-pri-lost-after-sb"
    )]
    Sb2(String),
}

/// Why the split-brain policies do not resolve a split brain by themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Unresolved {
    #[error("the split-brain policy does not resolve it")]
    NoVerdict,
    #[error(
        "the policy discards the data of {0}, which is Primary; demote it (`duet secondary`) and run `duet connect --discard-my-data` there"
    )]
    PrimaryLoses(String),
    #[error(
        "call-pri-lost-after-sb: the policy discards the data of {0}, which is Primary; its pri_lost_after_sb hook runs there (demote it, then run `duet connect --discard-my-data` on it)"
    )]
    PriLost(String),
}

impl Policies {
    /// Parses the three config values.
    pub fn parse(p0: &str, p1: &str, p2: &str) -> Result<Self, PolicyError> {
        let p0 = match p0 {
            "disconnect" => Sb0::Disconnect,
            "discard-younger-primary" => Sb0::DiscardYoungerPrimary,
            "discard-older-primary" => Sb0::DiscardOlderPrimary,
            "discard-zero-changes" => Sb0::DiscardZeroChanges,
            "discard-least-changes" => Sb0::DiscardLeastChanges,
            s if s.starts_with("discard-node-") && s.len() > 13 => Sb0::DiscardNode(s[13..].into()),
            s => return Err(PolicyError::Sb0(s.into())),
        };
        let p1 = match p1 {
            "disconnect" => Sb1::Disconnect,
            "consensus" => Sb1::Consensus,
            "violently-as0p" => Sb1::ViolentlyAs0p,
            "discard-secondary" => Sb1::DiscardSecondary,
            "call-pri-lost-after-sb" => Sb1::CallPriLostAfterSb,
            s => return Err(PolicyError::Sb1(s.into())),
        };
        let p2 = match p2 {
            "disconnect" => Sb2::Disconnect,
            "violently-as0p" => Sb2::ViolentlyAs0p,
            "call-pri-lost-after-sb" => Sb2::CallPriLostAfterSb,
            s => return Err(PolicyError::Sb2(s.into())),
        };
        Ok(Self { p0, p1, p2 })
    }
}

/// One side's facts at connect.
#[derive(Debug, Clone)]
pub struct Facts {
    pub name: String,
    pub side: Side,
    pub inconsistent: bool,
    pub discard_my_data: bool,
    /// Bits set in its bitmap ("changes").
    pub weight: u64,
}

/// The plan, from our point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// In sync: Connected.
    NoSync,
    /// We are resync source (`full`: every block).
    Source { full: bool },
    /// We are resync target.
    Target { full: bool },
    /// Split brain not resolved: disconnect, StandAlone, tell the operator.
    SplitBrain(String),
    /// Refuse to connect for another reason (unrelated data, role conflict…).
    Refuse(String),
    /// Not now, but keep trying (both sides Inconsistent: waiting for `primary --force`).
    Retry(String),
}

/// Who loses under an automatic policy: `Some(true)` we are the target.
type Loser = Option<bool>;

fn zero_changes(me: &Facts, peer: &Facts, resolve: bool) -> Loser {
    match (me.weight, peer.weight) {
        (0, 0) => Some(resolve),
        (_, 0) => Some(false),
        (0, _) => Some(true),
        _ => None,
    }
}

fn least_changes(me: &Facts, peer: &Facts, resolve: bool) -> Loser {
    Some(match me.weight.cmp(&peer.weight) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => resolve,
    })
}

/// `after_sb_0pri`.
fn recover_0p(p: &Sb0, me: &Facts, peer: &Facts, resolve: bool) -> Loser {
    // Bit 0 of the bitmap UUID: already Primary when the generations forked.
    let (s, o) = (me.side.uuids.bitmap & 1, peer.side.uuids.bitmap & 1);
    match p {
        Sb0::Disconnect => None,
        Sb0::DiscardYoungerPrimary | Sb0::DiscardOlderPrimary => {
            let younger = *p == Sb0::DiscardYoungerPrimary;
            match (s, o) {
                (0, 1) => Some(younger),
                (1, 0) => Some(!younger),
                _ => zero_changes(me, peer, resolve).or_else(|| least_changes(me, peer, resolve)),
            }
        }
        Sb0::DiscardZeroChanges => zero_changes(me, peer, resolve),
        Sb0::DiscardLeastChanges => least_changes(me, peer, resolve),
        Sb0::DiscardNode(n) if *n == me.name => Some(true),
        Sb0::DiscardNode(n) if *n == peer.name => Some(false),
        Sb0::DiscardNode(_) => None,
    }
}

/// Applies the policy for the number of Primaries; `Err` explains a refusal to resolve.
fn recover(pol: &Policies, me: &Facts, peer: &Facts, resolve: bool) -> Result<bool, Unresolved> {
    let (mp, pp) = (me.side.primary, peer.side.primary);
    let r0 = || recover_0p(&pol.p0, me, peer, resolve);
    let primary_loses = |me_loses: bool| (me_loses && mp) || (!me_loses && pp);
    let r = match (mp, pp) {
        (false, false) => r0(),
        (true, false) | (false, true) => match pol.p1 {
            Sb1::Disconnect => None,
            // Take the 0pri verdict only if it discards the Secondary.
            Sb1::Consensus => r0().filter(|&me_loses| !primary_loses(me_loses)),
            Sb1::DiscardSecondary => Some(!mp),
            Sb1::ViolentlyAs0p | Sb1::CallPriLostAfterSb => r0(),
        },
        (true, true) => match pol.p2 {
            Sb2::Disconnect => None,
            Sb2::ViolentlyAs0p | Sb2::CallPriLostAfterSb => r0(),
        },
    };
    let Some(me_loses) = r else {
        return Err(Unresolved::NoVerdict);
    };
    if primary_loses(me_loses) {
        // A Primary cannot become a sync target under a mounted filesystem here: DRBD's
        // violently-as0p would overwrite it, call-pri-lost-after-sb would reboot it. duet
        // refuses and says which node must be demoted and discarded.
        let loser = if me_loses { &me.name } else { &peer.name };
        // call-pri-lost-after-sb: as violently-as0p, but the losing Primary's hook is called
        // (DRBD's pri-lost-after-sb handler); the data stays untouched until the operator acts.
        let call = match (mp, pp) {
            (true, true) => pol.p2 == Sb2::CallPriLostAfterSb,
            (true, false) | (false, true) => pol.p1 == Sb1::CallPriLostAfterSb,
            (false, false) => false,
        };
        return Err(if call {
            Unresolved::PriLost(loser.clone())
        } else {
            Unresolved::PrimaryLoses(loser.clone())
        });
    }
    Ok(me_loses)
}

/// Under `call-pri-lost-after-sb`: the Primary whose data the policy discards, when [`plan`]
/// ends in split brain for that reason (that node runs its `pri_lost_after_sb` hook).
pub fn pri_lost(pol: &Policies, me: &Facts, peer: &Facts, resolve: bool) -> Option<String> {
    let v = compare(&me.side, &peer.side, resolve);
    if v.decision != Decision::SplitBrainAutoRecover
        || me.inconsistent
        || peer.inconsistent
        || me.discard_my_data
        || peer.discard_my_data
    {
        return None;
    }
    match recover(pol, me, peer, resolve) {
        Err(Unresolved::PriLost(loser)) => Some(loser),
        _ => None,
    }
}

/// Decides what to do after connecting. `resolve` is the tie-break bit (true on exactly one
/// side). Returns the plan and the verdict that led to it (for the log line).
pub fn plan(pol: &Policies, me: &Facts, peer: &Facts, resolve: bool) -> (Plan, Verdict) {
    use Decision::*;
    let v = compare(&me.side, &peer.side, resolve);
    let sb = |what: &str| {
        Plan::SplitBrain(format!(
            "split brain detected (rule {}): both nodes changed the data since they last were connected; {what}. Pick the victim and run `duet connect --discard-my-data` on it",
            v.rule
        ))
    };
    // Disk states first: an Inconsistent side is always the target.
    let mut d = v.decision;
    match (me.inconsistent, peer.inconsistent) {
        (true, true) => {
            return (
                Plan::Retry("both disks are Inconsistent: neither holds good data; run `duet primary --force` on the node whose data is the source".into()),
                v,
            );
        }
        (true, false) if !matches!(d, BitmapTarget | FullTarget) => d = FullTarget,
        (false, true) if !matches!(d, BitmapSource | FullSource) => d = FullSource,
        _ => {}
    }
    let discard = (me.discard_my_data, peer.discard_my_data);
    let p = match d {
        NoSync => Plan::NoSync,
        BitmapSource => Plan::Source { full: false },
        BitmapTarget => Plan::Target { full: false },
        FullSource => Plan::Source { full: true },
        FullTarget => Plan::Target { full: true },
        SplitBrainAutoRecover => match recover(pol, me, peer, resolve) {
            Ok(true) => Plan::Target { full: false },
            Ok(false) => Plan::Source { full: false },
            Err(why) => match discard {
                (true, false) => Plan::Target { full: false },
                (false, true) => Plan::Source { full: false },
                _ => sb(&why.to_string()),
            },
        },
        SplitBrainDisconnect => match discard {
            (true, false) => Plan::Target { full: true },
            (false, true) => Plan::Source { full: true },
            _ => sb("their histories are too far apart for an automatic policy"),
        },
        Unrelated => Plan::Refuse(format!(
            "unrelated data (rule {}): the two disks share no generation; this is not this node's peer, or one side was recreated. Run `duet create-md --force` on the node to overwrite, then connect",
            v.rule
        )),
    };
    // A Primary with good data never becomes a sync target (DRBD's rr-conflict = disconnect).
    if let Plan::Target { .. } = p
        && me.side.primary
        && !me.inconsistent
    {
        {
            return (
                Plan::Refuse(format!(
                    "this node is Primary but the peer's data would overwrite it (rule {}); demote this node with `duet secondary` first",
                    v.rule
                )),
                v,
            );
        }
    }
    (p, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::Generations;

    const A: u64 = 0xA0;
    const B: u64 = 0xB0;
    const C: u64 = 0xC0;

    fn facts(name: &str, current: u64, bitmap: u64, primary: bool, weight: u64) -> Facts {
        Facts {
            name: name.into(),
            side: Side {
                uuids: Generations { current, bitmap, history: [0, 0] },
                crashed_primary: false,
                primary,
            },
            inconsistent: false,
            discard_my_data: false,
            weight,
        }
    }

    /// A split brain: both forked from C. `me_was_pri` / `peer_was_pri` go into bit 0 of the
    /// bitmap UUIDs ("was primary when the split happened").
    fn split(me_was_pri: bool, peer_was_pri: bool, wm: u64, wp: u64) -> (Facts, Facts) {
        (
            facts("alpha", A, C | u64::from(me_was_pri), false, wm),
            facts("beta", B, C | u64::from(peer_was_pri), false, wp),
        )
    }

    fn run(pol: &Policies, me: &Facts, peer: &Facts, resolve: bool) -> Plan {
        let (mine, v) = plan(pol, me, peer, resolve);
        let (theirs, _) = plan(pol, peer, me, !resolve);
        // Both sides reach mirrored plans.
        let mirrored = match &mine {
            Plan::Source { full } => Plan::Target { full: *full },
            Plan::Target { full } => Plan::Source { full: *full },
            p => p.clone(),
        };
        match (&mirrored, &theirs) {
            (Plan::SplitBrain(_), Plan::SplitBrain(_))
            | (Plan::Refuse(_), Plan::Refuse(_))
            | (Plan::Retry(_), Plan::Retry(_)) => {}
            // A Primary refuses where the Secondary would have synced; both end disconnected.
            (Plan::Refuse(_), _) | (_, Plan::Refuse(_)) => {}
            _ => assert_eq!(mirrored, theirs, "verdict {v:?}"),
        }
        mine
    }

    fn p0(p: Sb0) -> Policies {
        Policies { p0: p, ..Policies::default() }
    }

    #[test]
    fn default_policy_reports_split_brain() {
        let (me, peer) = split(false, false, 5, 7);
        assert!(matches!(run(&Policies::default(), &me, &peer, false), Plan::SplitBrain(_)));
    }

    #[test]
    fn zero_changes() {
        let pol = p0(Sb0::DiscardZeroChanges);
        let (me, peer) = split(false, false, 0, 7);
        assert_eq!(run(&pol, &me, &peer, false), Plan::Target { full: false });
        let (me, peer) = split(false, false, 3, 0);
        assert_eq!(run(&pol, &me, &peer, false), Plan::Source { full: false });
        let (me, peer) = split(false, false, 0, 0);
        assert_eq!(run(&pol, &me, &peer, true), Plan::Target { full: false });
        let (me, peer) = split(false, false, 1, 1);
        assert!(matches!(run(&pol, &me, &peer, false), Plan::SplitBrain(_)));
    }

    #[test]
    fn least_changes() {
        let pol = p0(Sb0::DiscardLeastChanges);
        let (me, peer) = split(false, false, 2, 9);
        assert_eq!(run(&pol, &me, &peer, false), Plan::Target { full: false });
        let (me, peer) = split(false, false, 9, 2);
        assert_eq!(run(&pol, &me, &peer, false), Plan::Source { full: false });
        let (me, peer) = split(false, false, 4, 4);
        assert_eq!(run(&pol, &me, &peer, true), Plan::Target { full: false });
        assert_eq!(run(&pol, &me, &peer, false), Plan::Source { full: false });
    }

    #[test]
    fn younger_and_older_primary() {
        // We were promoted during the split (bit 0), the peer was Primary before it.
        let (me, peer) = split(false, true, 1, 1);
        assert_eq!(
            run(&p0(Sb0::DiscardYoungerPrimary), &me, &peer, false),
            Plan::Target { full: false }
        );
        assert_eq!(
            run(&p0(Sb0::DiscardOlderPrimary), &me, &peer, false),
            Plan::Source { full: false }
        );
        // Undecided by role: falls to zero changes, then least changes.
        let (me, peer) = split(true, true, 0, 4);
        assert_eq!(
            run(&p0(Sb0::DiscardYoungerPrimary), &me, &peer, false),
            Plan::Target { full: false }
        );
        let (me, peer) = split(false, false, 6, 4);
        assert_eq!(
            run(&p0(Sb0::DiscardOlderPrimary), &me, &peer, false),
            Plan::Source { full: false }
        );
    }

    #[test]
    fn discard_node() {
        let (me, peer) = split(false, false, 1, 1);
        assert_eq!(
            run(&p0(Sb0::DiscardNode("alpha".into())), &me, &peer, false),
            Plan::Target { full: false }
        );
        assert_eq!(
            run(&p0(Sb0::DiscardNode("beta".into())), &me, &peer, false),
            Plan::Source { full: false }
        );
        assert!(matches!(
            run(&p0(Sb0::DiscardNode("gamma".into())), &me, &peer, false),
            Plan::SplitBrain(_)
        ));
    }

    #[test]
    fn one_primary_policies() {
        let (me, mut peer) = split(false, false, 9, 1);
        peer.side.primary = true; // peer Primary with fewer changes
        let least = |p1| Policies { p0: Sb0::DiscardLeastChanges, p1, p2: Sb2::Disconnect };
        // 0pri verdict discards the Primary (fewer changes): consensus refuses, violently refuses
        // here too (a Primary is never overwritten), discard-secondary discards us.
        assert!(matches!(run(&least(Sb1::Consensus), &me, &peer, false), Plan::SplitBrain(_)));
        assert_eq!(
            run(&least(Sb1::DiscardSecondary), &me, &peer, false),
            Plan::Target { full: false }
        );
        assert!(
            matches!(run(&least(Sb1::ViolentlyAs0p), &me, &peer, false), Plan::SplitBrain(s) if s.contains("Primary"))
        );
        // call-pri-lost-after-sb: split brain too, and the losing Primary (the peer) is named,
        // for its hook; other policies name nobody.
        let call = least(Sb1::CallPriLostAfterSb);
        assert!(matches!(
            run(&call, &me, &peer, false),
            Plan::SplitBrain(s) if s.contains("pri_lost_after_sb hook runs there")
        ));
        assert_eq!(pri_lost(&call, &me, &peer, false).as_deref(), Some(peer.name.as_str()));
        assert_eq!(pri_lost(&call, &peer, &me, true).as_deref(), Some(peer.name.as_str()));
        assert_eq!(pri_lost(&least(Sb1::ViolentlyAs0p), &me, &peer, false), None);
        assert!(matches!(run(&least(Sb1::Disconnect), &me, &peer, false), Plan::SplitBrain(_)));
        // When the 0pri verdict discards the Secondary, consensus agrees.
        let (me, mut peer) = split(false, false, 1, 9);
        peer.side.primary = true;
        assert_eq!(run(&least(Sb1::Consensus), &me, &peer, false), Plan::Target { full: false });
        assert_eq!(
            run(&least(Sb1::ViolentlyAs0p), &me, &peer, false),
            Plan::Target { full: false }
        );
        // The Secondary loses under call-pri-lost-after-sb: resolved, nobody's hook.
        assert_eq!(pri_lost(&least(Sb1::CallPriLostAfterSb), &me, &peer, false), None);
    }

    #[test]
    fn two_primaries_never_resolve_onto_a_primary() {
        let (mut me, mut peer) = split(false, false, 1, 9);
        me.side.primary = true;
        peer.side.primary = true;
        for p2 in [Sb2::Disconnect, Sb2::ViolentlyAs0p, Sb2::CallPriLostAfterSb] {
            let pol = Policies { p0: Sb0::DiscardLeastChanges, p1: Sb1::Disconnect, p2 };
            assert!(matches!(run(&pol, &me, &peer, false), Plan::SplitBrain(_)), "{p2:?}");
        }
    }

    #[test]
    fn discard_my_data_resolves_manually() {
        let (mut me, peer) = split(false, false, 5, 7);
        me.discard_my_data = true;
        assert_eq!(run(&Policies::default(), &me, &peer, false), Plan::Target { full: false });
        // Both asking is no answer.
        let mut peer2 = peer.clone();
        peer2.discard_my_data = true;
        assert!(matches!(run(&Policies::default(), &me, &peer2, false), Plan::SplitBrain(_)));
        // Rule 100 (related by history only): a full sync onto the victim.
        let mut me = facts("alpha", A, 0, false, 1);
        me.side.uuids.history = [C, 0];
        let mut peer = facts("beta", B, 0, false, 1);
        peer.side.uuids.history = [C, 0];
        assert!(matches!(run(&Policies::default(), &me, &peer, false), Plan::SplitBrain(_)));
        me.discard_my_data = true;
        assert_eq!(run(&Policies::default(), &me, &peer, false), Plan::Target { full: true });
    }

    #[test]
    fn unrelated_inconsistent_and_primary_conflicts() {
        let me = facts("alpha", A, 0, false, 0);
        let peer = facts("beta", B, 0, false, 0);
        assert!(
            matches!(run(&Policies::default(), &me, &peer, false), Plan::Refuse(s) if s.contains("unrelated"))
        );
        // Inconsistent side is always the target, whatever the generations say.
        let mut me = facts("alpha", A, 0, false, 0);
        me.inconsistent = true;
        let peer = facts("beta", A, 0, false, 0);
        assert_eq!(run(&Policies::default(), &me, &peer, false), Plan::Target { full: true });
        let mut peer2 = peer.clone();
        peer2.inconsistent = true;
        assert!(matches!(run(&Policies::default(), &me, &peer2, false), Plan::Retry(_)));
        // A Primary is never made a target: rule 50 against a Primary.
        let me = facts("alpha", C, 0, true, 0);
        let peer = facts("beta", A, C, false, 3);
        assert!(
            matches!(run(&Policies::default(), &me, &peer, false), Plan::Refuse(s) if s.contains("demote"))
        );
    }

    #[test]
    fn policy_strings() {
        let p = Policies::parse("discard-node-beta", "consensus", "violently-as0p").unwrap();
        assert_eq!(p.p0, Sb0::DiscardNode("beta".into()));
        assert!(Policies::parse("discard-node-", "disconnect", "disconnect").is_err());
        assert!(
            Policies::parse("disconnect", "bogus", "disconnect")
                .unwrap_err()
                .to_string()
                .contains("after_sb_1pri")
        );
        assert!(Policies::parse("disconnect", "disconnect", "discard-secondary").is_err());
    }
}
