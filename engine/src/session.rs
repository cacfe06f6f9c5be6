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

/// The two sides as a session starts: their roles and the weights of their own bitmaps as
/// each sent them (before the OR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sides {
    pub me_primary: bool,
    pub peer_primary: bool,
    pub my_weight: u64,
    pub peer_weight: u64,
}

/// How the session starts, given the plan and the weight of the OR-ed bitmaps; `None` for a
/// plan that does not go live (split brain, refusal, retry).
///
/// Same generations but marked blocks: a node marks a block when the peer may not have its
/// version of it (writes the peer never acknowledged, or acknowledged but never flushed and
/// may have lost with its cache; a crashed Primary's hot extents). So the Primary sends; with
/// no Primary, the side whose bitmap has bits sends; only when both have bits does the
/// tie-break decide. (Found by the simulation: the tie-break alone made a node that had lost
/// its cache the source of the very blocks its peer had marked for it.)
pub fn start(plan: &Plan, union_weight: u64, sides: Sides, resolve: bool) -> Option<Sync> {
    let Sides { me_primary, peer_primary, my_weight, peer_weight } = sides;
    match plan {
        Plan::NoSync if union_weight > 0 => {
            let source = if me_primary || peer_primary {
                me_primary
            } else if (my_weight > 0) != (peer_weight > 0) {
                my_weight > 0
            } else {
                !resolve
            };
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
    fn marked_blocks_under_the_same_generation_resync_from_the_side_that_marked_them() {
        let s = |me_primary, peer_primary, my_weight, peer_weight| Sides {
            me_primary,
            peer_primary,
            my_weight,
            peer_weight,
        };
        assert_eq!(start(&Plan::NoSync, 0, s(false, false, 0, 0), false), Some(Sync::None));
        // The Primary sends, whoever marked.
        assert_eq!(start(&Plan::NoSync, 3, s(true, false, 0, 3), true), Some(Sync::Source));
        assert_eq!(start(&Plan::NoSync, 3, s(false, true, 3, 0), false), Some(Sync::Target));
        // No Primary: the side with bits sends, whatever the tie-break bit says.
        assert_eq!(start(&Plan::NoSync, 3, s(false, false, 3, 0), true), Some(Sync::Source));
        assert_eq!(start(&Plan::NoSync, 3, s(false, false, 0, 3), false), Some(Sync::Target));
        // Both marked: the side without the tie-break bit sends.
        assert_eq!(start(&Plan::NoSync, 3, s(false, false, 1, 2), false), Some(Sync::Source));
        assert_eq!(start(&Plan::NoSync, 3, s(false, false, 2, 1), true), Some(Sync::Target));
        let n = s(false, false, 0, 0);
        assert_eq!(start(&Plan::Source { full: true }, 0, n, true), Some(Sync::Source));
        assert_eq!(
            start(&Plan::Target { full: false }, 0, s(true, false, 0, 0), true),
            Some(Sync::Target)
        );
        for p in [Plan::SplitBrain("x".into()), Plan::Refuse("y".into()), Plan::Retry("z".into())] {
            assert_eq!(start(&p, 1, s(true, false, 1, 0), false), None);
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
