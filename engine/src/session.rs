//! How a replication session starts, once the handshake has a plan
//! ([`crate::policy::plan`]) and both bitmaps are in: what the executor and the simulation both
//! do between "plan agreed" and "live".

use crate::generation::{Fixup, Generations};
use crate::policy::Plan;
use crate::state::Sync;

/// Applies the rule table's correction to our own generations (rules 34 and 71); corrections
/// of the peer's copy concern only the compare itself.
pub fn apply_fixup(own: &mut Generations, fixup: Fixup) {
    match fixup {
        Fixup::ClearOwnBitmap => own.clear_bitmap(),
        Fixup::UndoOwnSyncUuid => {
            let h = own.history;
            own.bitmap = h[0];
            own.history = [h[1], 0];
        }
        Fixup::None | Fixup::ClearPeerBitmap | Fixup::UndoPeerSyncUuid => {}
    }
}

/// The plan resyncs every block (the bitmap is set whole before the session starts).
pub fn full(plan: &Plan) -> bool {
    matches!(plan, Plan::Source { full: true } | Plan::Target { full: true })
}

/// How the session starts, given the plan and the weight of the OR-ed bitmaps; `None` for a
/// plan that does not go live (split brain, refusal, retry). Same generations but marked
/// blocks (a crashed Primary's hot extents, writes the peer may have lost from its cache):
/// they are resynced from the Primary, or by the tie-break when neither is.
pub fn start(
    plan: &Plan,
    union_weight: u64,
    me_primary: bool,
    peer_primary: bool,
    resolve: bool,
) -> Option<Sync> {
    match plan {
        Plan::NoSync if union_weight > 0 => {
            let source = me_primary || (!peer_primary && !resolve);
            Some(if source { Sync::Source } else { Sync::Target })
        }
        Plan::NoSync => Some(Sync::None),
        Plan::Source { .. } => Some(Sync::Source),
        Plan::Target { .. } => Some(Sync::Target),
        Plan::SplitBrain(_) | Plan::Refuse(_) | Plan::Retry(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_blocks_under_the_same_generation_resync_from_the_primary_or_the_tie_break() {
        assert_eq!(start(&Plan::NoSync, 0, false, false, false), Some(Sync::None));
        assert_eq!(start(&Plan::NoSync, 3, true, false, true), Some(Sync::Source));
        assert_eq!(start(&Plan::NoSync, 3, false, true, false), Some(Sync::Target));
        // Neither Primary: the side without the tie-break bit sends.
        assert_eq!(start(&Plan::NoSync, 3, false, false, false), Some(Sync::Source));
        assert_eq!(start(&Plan::NoSync, 3, false, false, true), Some(Sync::Target));
        assert_eq!(start(&Plan::Source { full: true }, 0, false, false, true), Some(Sync::Source));
        assert_eq!(start(&Plan::Target { full: false }, 0, true, false, true), Some(Sync::Target));
        for p in [Plan::SplitBrain("x".into()), Plan::Refuse("y".into()), Plan::Retry("z".into())] {
            assert_eq!(start(&p, 1, true, false, false), None);
            assert!(!full(&p));
        }
        assert!(full(&Plan::Target { full: true }) && !full(&Plan::Source { full: false }));
    }

    #[test]
    fn fixups_correct_only_our_own_generations() {
        let g = Generations { current: 10, bitmap: 20, history: [30, 40] };
        let mut a = g;
        apply_fixup(&mut a, Fixup::ClearOwnBitmap);
        assert_eq!(a, Generations { current: 10, bitmap: 0, history: [20, 30] });
        let mut b = g;
        apply_fixup(&mut b, Fixup::UndoOwnSyncUuid);
        assert_eq!(b, Generations { current: 10, bitmap: 30, history: [40, 0] });
        for f in [Fixup::None, Fixup::ClearPeerBitmap, Fixup::UndoPeerSyncUuid] {
            let mut c = g;
            apply_fixup(&mut c, f);
            assert_eq!(c, g);
        }
    }
}
