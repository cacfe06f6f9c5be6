//! Generation identifiers (DRBD's "data generation UUIDs") and the connect-time comparison that
//! decides who resyncs from whom, or that the two copies split.
//!
//! Pure: callers pass random values in and persist what comes out. Rule numbers follow DRBD 8.4's
//! `drbd_uuid_compare()` (see `shared/reference/drbd.md` §1) so log lines and tests can name them;
//! the "new current UUID on the first write after losing the peer" timing is DRBD 9's.
//!
//! [`crate::policy`] builds the connect plan on [`compare`]; `replicator::repl::volume` and
//! `replicator::repl::link` apply the transitions and persist them.

/// The "was primary" marker in bit 0 of a UUID. Masked in every comparison.
pub const UUID_PRIMARY: u64 = 1;
/// The current UUID of freshly created metadata.
pub const UUID_JUST_CREATED: u64 = 4;
/// Added to the bitmap UUID when a resync source starts a new resync generation.
pub const UUID_NEW_BM_OFFSET: u64 = 1 << 48;

fn m(x: u64) -> u64 {
    x & !UUID_PRIMARY
}

/// One node's generation identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generations {
    /// The generation of the data now.
    pub current: u64,
    /// The generation the out-of-sync bitmap tracks changes against; 0 when in sync.
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

impl Generations {
    /// What `create-md` writes.
    pub fn just_created() -> Self {
        Self { current: UUID_JUST_CREATED, bitmap: 0, history: [0, 0] }
    }

    /// Starts a new generation: the old current becomes the bitmap UUID (the bitmap now records
    /// changes against it). Called before the first write after losing the peer is acknowledged.
    /// `random` must be fresh randomness; `primary` sets the marker bit.
    pub fn new_current(&mut self, random: u64, primary: bool) {
        self.push_bitmap(self.current);
        self.current = (random & !UUID_PRIMARY) | u64::from(primary);
    }

    /// Sets the bitmap UUID, pushing a non-zero old one into history.
    fn push_bitmap(&mut self, bm: u64) {
        if self.bitmap != 0 {
            self.history = [self.bitmap, self.history[0]];
        }
        self.bitmap = bm;
    }

    /// A sync source starting a resync: a new bitmap generation derived from the old one (so a
    /// target that never heard of it can be recognised, rules 51/71). Returns the sync UUID to
    /// send to the target.
    pub fn start_sync_source(&mut self, random: u64) -> u64 {
        let next = match m(self.bitmap) {
            0 | UUID_JUST_CREATED => m(random),
            b => b.wrapping_add(UUID_NEW_BM_OFFSET),
        };
        self.push_bitmap(next);
        self.bitmap
    }

    /// A sync target receiving the source's sync UUID.
    pub fn receive_sync_uuid(&mut self, sync: u64) {
        self.current = sync;
        self.bitmap = 0;
    }

    /// A finished resync on the target: it takes the source's generations.
    pub fn finish_sync_target(&mut self, source: &Generations) {
        let own = self.current;
        *self = *source;
        self.bitmap = own;
        self.clear_bitmap();
    }

    /// Both sides after a finished resync: the bitmap generation moves to history.
    pub fn clear_bitmap(&mut self) {
        if self.bitmap != 0 {
            self.history = [self.bitmap, self.history[0]];
            self.bitmap = 0;
        }
    }
}

/// One side as seen at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    /// Its generations.
    pub uuids: Generations,
    /// It crashed while Primary (metadata flag, sent as a UUID flag).
    pub crashed_primary: bool,
    /// It is Primary now.
    pub primary: bool,
}

/// What to do after connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Same data: no resync.
    NoSync,
    /// We resync the peer from our bitmap (ours OR theirs).
    BitmapSource,
    /// The peer resyncs us from the bitmaps.
    BitmapTarget,
    /// We send the whole device.
    FullSource,
    /// We receive the whole device.
    FullTarget,
    /// Both sides changed since one common generation: an automatic policy may decide.
    SplitBrainAutoRecover,
    /// Related, but no common base the policies can judge: disconnect, tell the operator.
    SplitBrainDisconnect,
    /// No common history at all: refuse.
    Unrelated,
}

impl Decision {
    /// The decision the peer reaches on the same input.
    pub fn mirror(self) -> Self {
        match self {
            Self::BitmapSource => Self::BitmapTarget,
            Self::BitmapTarget => Self::BitmapSource,
            Self::FullSource => Self::FullTarget,
            Self::FullTarget => Self::FullSource,
            d @ (Self::NoSync
            | Self::SplitBrainAutoRecover
            | Self::SplitBrainDisconnect
            | Self::Unrelated) => d,
        }
    }
}

/// A correction to stored UUIDs that a rule implies (a lost "resync finished" or sync UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    /// Nothing to correct.
    None,
    /// Rule 34: we missed "resync finished" as source: our bitmap UUID moves to history.
    ClearOwnBitmap,
    /// Rule 35: the peer missed it; our copy of its UUIDs gets the same correction.
    ClearPeerBitmap,
    /// Rule 71: our sync UUID was lost: bitmap ← `history[0]`, history shifts back.
    UndoOwnSyncUuid,
    /// Rule 51: the peer's sync UUID was lost: the same on our copy of its UUIDs.
    UndoPeerSyncUuid,
}

/// The outcome of [`compare`], with the rule that decided (for the log and the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: u32,
    pub fixup: Fixup,
}

fn v(decision: Decision, rule: u32) -> Verdict {
    Verdict { decision, rule, fixup: Fixup::None }
}

/// Compares our generations with the peer's, first matching rule wins. `resolve_conflicts` is
/// the per-connection tie-break bit: the side holding it becomes target in symmetric ties.
pub fn compare(me: &Side, peer: &Side, resolve_conflicts: bool) -> Verdict {
    use Decision::*;
    let (s, p) = (&me.uuids, &peer.uuids);
    let (sc, pc) = (m(s.current), m(p.current));
    let jc = UUID_JUST_CREATED;
    if sc == jc && pc == jc {
        return v(NoSync, 10);
    }
    if (sc == jc || sc == 0) && pc != jc {
        return v(FullTarget, 20);
    }
    if sc != jc && (pc == jc || pc == 0) {
        return v(FullSource, 30);
    }
    if sc == pc {
        let (sb, pb) = (m(s.bitmap), m(p.bitmap));
        if pb == 0 && sb != 0 {
            // We were sync source and still hold a bitmap generation the peer already retired.
            if sb == m(p.history[0]) && m(s.history[0]) == m(p.history[1]) {
                return Verdict { decision: BitmapSource, rule: 34, fixup: Fixup::ClearOwnBitmap };
            }
            return v(BitmapSource, 36);
        }
        if sb == 0 && pb != 0 {
            if pb == m(s.history[0]) && m(p.history[0]) == m(s.history[1]) {
                return Verdict { decision: BitmapTarget, rule: 35, fixup: Fixup::ClearPeerBitmap };
            }
            return v(BitmapTarget, 37);
        }
        let rct = u8::from(me.crashed_primary) + 2 * u8::from(peer.crashed_primary);
        if rct == 0 {
            return v(NoSync, 40);
        }
        match (me.primary, peer.primary) {
            (true, true) => return v(SplitBrainDisconnect, 41),
            (true, false) => return v(BitmapSource, 41),
            (false, true) => return v(BitmapTarget, 41),
            (false, false) => {}
        }
        // Both Secondary after a crash: the crashed Primary's hot extents are resynced from it.
        return match rct {
            1 => v(BitmapSource, 40),
            2 => v(BitmapTarget, 40),
            _ => v(if resolve_conflicts { BitmapTarget } else { BitmapSource }, 40),
        };
    }
    if sc == m(p.bitmap) {
        return v(BitmapTarget, 50);
    }
    if sc == m(p.history[0]) && m(p.bitmap) == m(p.history[0]).wrapping_add(UUID_NEW_BM_OFFSET) {
        return Verdict { decision: BitmapTarget, rule: 51, fixup: Fixup::UndoPeerSyncUuid };
    }
    if sc == m(p.history[0]) || sc == m(p.history[1]) {
        return v(FullTarget, 60);
    }
    if m(s.bitmap) == pc {
        return v(BitmapSource, 70);
    }
    if m(s.history[0]) == pc && m(s.bitmap) == m(s.history[0]).wrapping_add(UUID_NEW_BM_OFFSET) {
        return Verdict { decision: BitmapSource, rule: 71, fixup: Fixup::UndoOwnSyncUuid };
    }
    if pc == m(s.history[0]) || pc == m(s.history[1]) {
        return v(FullSource, 80);
    }
    if m(s.bitmap) == m(p.bitmap) && m(s.bitmap) != 0 {
        return v(SplitBrainAutoRecover, 90);
    }
    // Empty slots and the just-created marker are not generations: they relate nothing.
    let real = |x: u64| m(x) != 0 && m(x) != jc;
    let related = s.history.iter().any(|&a| real(a) && p.history.iter().any(|&b| m(a) == m(b)));
    if related {
        return v(SplitBrainDisconnect, 100);
    }
    v(Unrelated, 1000)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use Decision::*;
    use proptest::prelude::*;

    fn side(current: u64, bitmap: u64, h0: u64, h1: u64) -> Side {
        Side {
            uuids: Generations { current, bitmap, history: [h0, h1] },
            crashed_primary: false,
            primary: false,
        }
    }

    fn check(me: Side, peer: Side, want: Decision, rule: u32) {
        let got = compare(&me, &peer, false);
        assert_eq!((got.decision, got.rule), (want, rule), "me {me:?} peer {peer:?}");
    }

    const A: u64 = 0xa000_0000_0000_0010;
    const B: u64 = 0xb000_0000_0000_0020;
    const C: u64 = 0xc000_0000_0000_0030;
    const D: u64 = 0xd000_0000_0000_0040;
    const E: u64 = 0xe000_0000_0000_0050;

    #[test]
    fn rule_10_fresh_pair() {
        check(side(4, 0, 0, 0), side(4, 0, 0, 0), NoSync, 10);
        check(side(5, 0, 0, 0), side(4, 0, 0, 0), NoSync, 10); // the primary bit is masked
    }

    #[test]
    fn rule_20_and_30_one_side_fresh() {
        check(side(4, 0, 0, 0), side(A, 0, 0, 0), FullTarget, 20);
        check(side(0, 0, 0, 0), side(A, 0, 0, 0), FullTarget, 20);
        check(side(A, 0, 0, 0), side(4, 0, 0, 0), FullSource, 30);
        check(side(A, 0, 0, 0), side(0, 0, 0, 0), FullSource, 30);
    }

    #[test]
    fn rules_34_to_37_lost_resync_finished() {
        let v = compare(&side(A, B, C, 0), &side(A, 0, B, C), false);
        assert_eq!((v.decision, v.rule, v.fixup), (BitmapSource, 34, Fixup::ClearOwnBitmap));
        let v = compare(&side(A, 0, B, C), &side(A, B, C, 0), false);
        assert_eq!((v.decision, v.rule, v.fixup), (BitmapTarget, 35, Fixup::ClearPeerBitmap));
        check(side(A, B, 0, 0), side(A, 0, D, 0), BitmapSource, 36);
        check(side(A, 0, D, 0), side(A, B, 0, 0), BitmapTarget, 37);
    }

    #[test]
    fn rule_40_equal_currents() {
        check(side(A, 0, B, 0), side(A | 1, 0, B, 0), NoSync, 40);
        let mut me = side(A, 0, 0, 0);
        let mut peer = side(A, 0, 0, 0);
        me.crashed_primary = true;
        check(me, peer, BitmapSource, 40);
        check(peer, me, BitmapTarget, 40);
        peer.crashed_primary = true;
        assert_eq!(compare(&me, &peer, false).decision, BitmapSource);
        assert_eq!(compare(&me, &peer, true).decision, BitmapTarget, "tie goes by the resolve bit");
    }

    #[test]
    fn rule_41_crash_with_a_primary() {
        let mut me = side(A, 0, 0, 0);
        let mut peer = side(A, 0, 0, 0);
        me.crashed_primary = true;
        me.primary = true;
        check(me, peer, BitmapSource, 41);
        check(peer, me, BitmapTarget, 41);
        peer.primary = true;
        check(me, peer, SplitBrainDisconnect, 41);
    }

    #[test]
    fn rules_50_and_70_one_side_moved_on() {
        check(side(A, 0, 0, 0), side(B, A, 0, 0), BitmapTarget, 50);
        check(side(B, A, 0, 0), side(A, 0, 0, 0), BitmapSource, 70);
    }

    #[test]
    fn rules_51_and_71_lost_sync_uuid() {
        let bm = A.wrapping_add(UUID_NEW_BM_OFFSET);
        let v = compare(&side(A, 0, 0, 0), &side(B, bm, A, 0), false);
        assert_eq!((v.decision, v.rule, v.fixup), (BitmapTarget, 51, Fixup::UndoPeerSyncUuid));
        let v = compare(&side(B, bm, A, 0), &side(A, 0, 0, 0), false);
        assert_eq!((v.decision, v.rule, v.fixup), (BitmapSource, 71, Fixup::UndoOwnSyncUuid));
    }

    #[test]
    fn rules_60_and_80_only_history_links() {
        check(side(A, 0, 0, 0), side(B, C, A, 0), FullTarget, 60);
        check(side(A, 0, 0, 0), side(B, C, D, A), FullTarget, 60);
        check(side(B, C, A, 0), side(A, 0, 0, 0), FullSource, 80);
        check(side(B, C, D, A), side(A, 0, 0, 0), FullSource, 80);
    }

    #[test]
    fn rule_90_split_brain_from_one_generation() {
        check(side(B, A, 0, 0), side(C, A | 1, 0, 0), SplitBrainAutoRecover, 90);
    }

    #[test]
    fn rule_100_related_but_ambiguous() {
        check(side(B, C, A, 0), side(D, E, A, 0), SplitBrainDisconnect, 100);
    }

    #[test]
    fn unrelated_data() {
        check(side(A, 0, 0, 0), side(B, 0, 0, 0), Unrelated, 1000);
        // Empty history slots do not make two nodes related.
        check(side(A, C, 0, 0), side(B, D, 0, 0), Unrelated, 1000);
        // Nor does the just-created marker that initial syncs leave in history.
        check(side(A, C, 4, 0), side(B, D, 4, 0), Unrelated, 1000);
    }

    /// The lifecycle as the replicator will drive it, checked end to end.
    #[test]
    fn lifecycle_scenarios() {
        // Fresh pair; alpha is forced primary and writes: it starts a generation.
        let mut a = Generations::just_created();
        let mut b = Generations::just_created();
        a.new_current(A, true);
        let sa = |g: Generations| Side { uuids: g, crashed_primary: false, primary: false };
        assert_eq!(compare(&sa(a), &sa(b), false).decision, FullSource);
        // Initial full sync: source rotates a sync UUID, target adopts it, then finishes.
        let sync = a.start_sync_source(B);
        b.receive_sync_uuid(sync);
        b.finish_sync_target(&a);
        a.clear_bitmap();
        assert_eq!(m(a.current), m(b.current));
        assert_eq!(compare(&sa(a), &sa(b), false), v(NoSync, 40));
        // The peer goes away and alpha writes: new generation; reconnect is a bitmap resync.
        a.new_current(C, true);
        assert_eq!(compare(&sa(a), &sa(b), false), v(BitmapSource, 70));
        assert_eq!(compare(&sa(b), &sa(a), false), v(BitmapTarget, 50));
        // Split brain: beta is promoted while disconnected and writes too.
        b.new_current(D, true);
        assert_eq!(compare(&sa(a), &sa(b), false).decision, SplitBrainAutoRecover);
        assert_eq!(compare(&sa(b), &sa(a), false).decision, SplitBrainAutoRecover);
    }

    fn any_generations() -> impl Strategy<Value = Generations> {
        let id =
            prop_oneof![Just(0u64), Just(4u64), Just(A), Just(B), Just(C), Just(D), any::<u64>()];
        (id.clone(), id.clone(), id.clone(), id).prop_map(|(current, bitmap, h0, h1)| Generations {
            current,
            bitmap,
            history: [h0, h1],
        })
    }

    proptest! {
        /// The primary bit never changes a verdict.
        #[test]
        fn primary_bit_is_masked(a in any_generations(), b in any_generations(), rc: bool, bits in 0u8..16) {
            let flip = |x: u64, i: u8| if bits & (1 << i) != 0 { x ^ UUID_PRIMARY } else { x };
            let me = Side { uuids: a, crashed_primary: false, primary: false };
            let peer = Side { uuids: b, crashed_primary: false, primary: false };
            let a2 = Generations { current: flip(a.current, 0), bitmap: flip(a.bitmap, 1), history: [flip(a.history[0], 2), a.history[1]] };
            let b2 = Generations { current: flip(b.current, 3), ..b };
            prop_assert_eq!(compare(&me, &peer, rc), compare(&Side { uuids: a2, ..me }, &Side { uuids: b2, ..peer }, rc));
        }

        /// Whenever both sides reach a decision by rules that do not depend on order, they agree
        /// on who is source: one side's verdict is the mirror of the other's.
        #[test]
        fn both_sides_agree(a in any_generations(), b in any_generations(), ca: bool, cb: bool, rc: bool) {
            let me = Side { uuids: a, crashed_primary: ca, primary: false };
            let peer = Side { uuids: b, crashed_primary: cb, primary: false };
            let x = compare(&me, &peer, rc);
            let y = compare(&peer, &me, !rc);
            let mirrored_rule = |r: u32| match r { 20 => 30, 30 => 20, 34 => 35, 35 => 34, 36 => 37, 37 => 36, 50 => 70, 70 => 50, 51 => 71, 71 => 51, 60 => 80, 80 => 60, r => r };
            if mirrored_rule(x.rule) == y.rule {
                prop_assert_eq!(x.decision.mirror(), y.decision, "{:?} vs {:?}", x, y);
            }
        }
    }
}
