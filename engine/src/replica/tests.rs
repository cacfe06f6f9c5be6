use std::time::Duration;

use super::*;
use crate::testutil::origin;
use crate::translog::Bound;

const G: u64 = 4096;
const SIZE: u64 = 64 * G;

fn sb(flags: u32) -> Superblock {
    Superblock {
        sequence: 7,
        volume_size: SIZE,
        node_id: 0,
        flags,
        bitmap_granularity: 4096,
        al_extent_size: 16 * 4096,
        al_extents: 4,
        uuids: Generations { current: 0x10, bitmap: 0, history: [0, 0] },
    }
}

fn bound() -> Bound {
    Bound { interval: Duration::from_secs(1), max_bytes: 1 << 40 }
}

/// A Secondary attached Consistent.
fn secondary() -> Replica<u32> {
    Replica::attach(sb(FLAG_CONSISTENT), Bitmap::new(SIZE, G), &[]).0
}

/// A Secondary attached UpToDate (its peer was outdated).
fn up_to_date() -> Replica<u32> {
    Replica::attach(sb(FLAG_CONSISTENT | FLAG_PEER_OUTDATED), Bitmap::new(SIZE, G), &[]).0
}

/// A Primary with a live session (no resync).
fn primary_live() -> (Replica<u32>, u64) {
    let mut r = up_to_date();
    r.promote(false, 1).expect("UpToDate may promote");
    let s = r.new_session(TransferLog::new(bound(), 16 * G, u64::MAX));
    let epoch = s.epoch;
    let _ = r.go_live(s, Sync::None, false, false);
    (r, epoch)
}

#[test]
fn attach_takes_the_disk_state_from_the_flags() {
    let disk = |f| Replica::<()>::attach(sb(f), Bitmap::new(SIZE, G), &[]).0.st.disk;
    assert_eq!(disk(0), DiskState::Inconsistent);
    assert_eq!(disk(FLAG_CONSISTENT), DiskState::Consistent);
    assert_eq!(disk(FLAG_CONSISTENT | FLAG_OUTDATED), DiskState::Outdated);
    assert_eq!(disk(FLAG_CONSISTENT | FLAG_PEER_OUTDATED), DiskState::UpToDate);
    let r = Replica::<()>::attach(sb(FLAG_CONSISTENT), Bitmap::new(SIZE, G), &[]).0;
    assert_eq!(r.st.role, Role::Secondary);
}

#[test]
fn attach_after_a_crash_as_primary_marks_the_hot_extents() {
    let hot = [(0, 16 * G), (32 * G, 16 * G)];
    let (r, p) = Replica::<()>::attach(
        sb(FLAG_CONSISTENT | FLAG_CRASHED_PRIMARY),
        Bitmap::new(SIZE, G),
        &hot,
    );
    assert_eq!(r.bitmap.weight(), 32);
    assert!(p.bitmap);
    let (r, p) = Replica::<()>::attach(sb(FLAG_CONSISTENT), Bitmap::new(SIZE, G), &hot);
    assert_eq!(r.bitmap.weight(), 0, "a clean stop marks nothing");
    assert!(!p.bitmap);
}

#[test]
fn next_superblock_follows_the_disk_state() {
    let mut r = secondary();
    let s = r.next_superblock();
    assert_eq!(s.sequence, 8);
    assert_eq!(s.flags & (FLAG_CONSISTENT | FLAG_OUTDATED), FLAG_CONSISTENT);
    r.outdate().expect("a Secondary can be outdated");
    assert_eq!(r.next_superblock().flags & FLAG_OUTDATED, FLAG_OUTDATED);
    r.st.disk = DiskState::Inconsistent;
    assert_eq!(r.next_superblock().flags & (FLAG_CONSISTENT | FLAG_OUTDATED), 0);
}

#[test]
fn promote_marks_crashed_primary_and_forced_from_nothing_starts_a_new_history() {
    let mut r = secondary();
    assert_eq!(r.promote(false, 9), Err(Refusal::NotUpToDate(DiskState::Consistent)));
    let mut r = up_to_date();
    assert_eq!(
        r.promote(false, 9),
        Ok(Promotion::Promoted { fresh: false, was: DiskState::UpToDate })
    );
    assert!(r.crashed_primary());
    assert_eq!(r.sb.uuids.current, 0x10, "no new history for a plain promotion");
    assert_eq!(r.promote(false, 9), Ok(Promotion::Already));

    let mut r = Replica::<()>::attach(sb(0), Bitmap::new(SIZE, G), &[]).0;
    assert_eq!(r.promote(false, 9), Err(Refusal::NotUpToDate(DiskState::Inconsistent)));
    assert_eq!(
        r.promote(true, 0x40),
        Ok(Promotion::Promoted { fresh: true, was: DiskState::Inconsistent })
    );
    assert_eq!(r.sb.uuids, Generations { current: 0x41, bitmap: 0, history: [0, 0] });
    assert!(r.bumped(), "no second new generation for its first write alone");
    r.promotion_failed(DiskState::Inconsistent);
    assert_eq!((r.st.role, r.st.disk), (Role::Secondary, DiskState::Inconsistent));
}

#[test]
fn demote_clears_crashed_primary_and_persists_everything() {
    let mut r = up_to_date();
    assert_eq!(r.demote(), Ok(None));
    r.promote(false, 1).expect("UpToDate may promote");
    assert_eq!(r.demote(), Ok(Some(Persist::ALL)));
    assert!(!r.crashed_primary());
    assert_eq!(r.st.role, Role::Secondary);
}

#[test]
fn outdate_is_refused_on_a_primary_and_a_noop_when_inconsistent() {
    let (mut r, _) = primary_live();
    assert_eq!(r.outdate(), Err(Refusal::PrimaryCannotBeOutdated));
    let mut r = Replica::<()>::attach(sb(0), Bitmap::new(SIZE, G), &[]).0;
    assert_eq!(r.outdate(), Ok(None));
    let mut r = secondary();
    assert_eq!(r.outdate(), Ok(Some(Persist::SUPERBLOCK)));
    assert_eq!(r.st.disk, DiskState::Outdated);
}

#[test]
fn peer_outdated_is_recorded_and_survives_an_attach() {
    let (mut r, _) = primary_live();
    let _ = r.teardown();
    assert_eq!(r.peer_outdated(), Persist::SUPERBLOCK);
    let s = r.next_superblock();
    let back = Replica::<()>::attach(s, Bitmap::new(SIZE, G), &[]).0;
    assert_eq!(back.st.disk, DiskState::UpToDate);
}

#[test]
fn a_confirmation_of_the_outdate_that_arrives_in_a_new_session_is_not_recorded() {
    let (mut r, _) = primary_live();
    assert_eq!(r.peer_outdated(), Persist::NOTHING);
    assert_eq!(r.st.peer_disk, Some(DiskState::UpToDate));
    assert_eq!(r.next_superblock().flags & FLAG_PEER_OUTDATED, 0);
}

#[test]
fn connect_and_invalidate() {
    let mut r = secondary();
    r.split_brain = Some("x".into());
    assert_eq!(r.connect(true), Ok(false));
    assert!(r.discard_my_data);
    assert_eq!(r.split_brain, None);
    assert_eq!(r.invalidate(), Ok(Persist::METADATA));
    assert_eq!(r.bitmap.weight(), 64);
    assert_eq!(r.st.disk, DiskState::Inconsistent);
    let (mut p, _) = primary_live();
    assert_eq!(p.connect(false), Ok(true), "already connected");
    assert_eq!(p.invalidate(), Err(Refusal::PrimaryCannotBeInvalidated));
}

#[test]
fn register_refuses_a_stale_or_missing_session() {
    let (mut r, epoch) = primary_live();
    let t = origin();
    assert_eq!(r.register(epoch + 1, 0, G, t, 5), Err(5));
    assert!(r.register(epoch, 0, G, t, 5).is_ok());
    let _ = r.teardown();
    assert_eq!(r.register(epoch, 0, G, t, 6), Err(6));
    assert_eq!(r.register_flush(epoch, false, t, 7), Err(7));
}

#[test]
fn an_acknowledged_write_is_held_until_a_flush_covers_it() {
    let (mut r, epoch) = primary_live();
    let t = origin();
    let id = r.register(epoch, 0, G, t, 1).expect("live");
    let p = r.peer_acked(id, true, t).expect("known");
    assert_eq!((p.offset, p.len, p.waiter, p.flush), (0, G, 1, false));
    assert_eq!(r.bitmap.weight(), 0);
    assert!(r.pinned(0), "its extent stays in the activity log");
    let f = r.register_flush(epoch, false, t, 2).expect("live");
    assert!(r.peer_acked(f, true, t).expect("known").flush);
    assert!(!r.pinned(0));
    let end = r.teardown();
    assert!(end.waiters.is_empty());
    assert_eq!(r.bitmap.weight(), 0, "flushed on the peer: nothing to resync");
}

#[test]
fn the_teardown_marks_unflushed_and_unanswered_writes() {
    let (mut r, epoch) = primary_live();
    let t = origin();
    let a = r.register(epoch, 0, G, t, 1).expect("live");
    let _ = r.peer_acked(a, true, t);
    r.register(epoch, 8 * G, 2 * G, t, 2).expect("live");
    let end = r.teardown();
    assert_eq!(end.waiters, vec![2]);
    assert_eq!(end.persist, Persist { data: false, bitmap: true, superblock: false });
    assert!(r.bitmap.get(0) && r.bitmap.get(8) && r.bitmap.get(9));
    assert_eq!(r.bitmap.weight(), 3);
    assert_eq!(r.st.conn, ConnState::Connecting);
}

#[test]
fn a_failed_write_or_flush_on_the_peer_is_out_of_sync() {
    let (mut r, epoch) = primary_live();
    let t = origin();
    let a = r.register(epoch, 4 * G, G, t, 1).expect("live");
    let _ = r.peer_acked(a, false, t);
    assert!(r.bitmap.get(4));
    let b = r.register(epoch, 6 * G, G, t, 2).expect("live");
    let _ = r.peer_acked(b, true, t);
    let f = r.register_flush(epoch, true, t, 3).expect("live");
    let _ = r.peer_acked(f, false, t);
    assert!(r.bitmap.get(6), "a failed flush loses what it covered");
    assert_eq!(r.peer_acked(99, true, t).map(|p| p.waiter), Err(PeerError::UnknownRequest(99)));
}

#[test]
fn the_flush_bound_and_the_oldest_request() {
    let (mut r, epoch) = primary_live();
    let t = origin();
    assert!(!r.flush_due(t));
    let a = r.register(epoch, 0, G, t, 1).expect("live");
    let _ = r.register(epoch, G, G, t + Duration::from_millis(5), 2).expect("live");
    assert_eq!(r.session.as_ref().and_then(PeerSession::oldest), Some(t));
    let _ = r.peer_acked(a, true, t);
    assert!(!r.flush_due(t + Duration::from_millis(999)));
    assert!(r.flush_due(t + Duration::from_secs(1)));
    r.hurry();
    assert!(r.flush_due(t));
}

#[test]
fn one_new_generation_per_disconnected_period() {
    let (mut r, _) = primary_live();
    let _ = r.teardown();
    r.written_alone(0, G);
    let s = r.new_generation(0x80).expect("first write alone");
    assert_eq!(s.uuids.current, 0x81, "marked as made by a Primary");
    assert_eq!(s.uuids.bitmap, 0x10);
    assert_eq!(r.new_generation(0x90), None);
    assert!(r.bitmap.get(0));
    // Also after a restart alone: the base the peer holds stays the bitmap generation.
    let sb = r.next_superblock();
    let mut back = Replica::<u32>::attach(sb, Bitmap::new(SIZE, G), &[]).0;
    assert_eq!(back.new_generation(0xa0), None);
    assert_eq!(back.sb.uuids.bitmap, 0x10);
}

#[test]
fn an_interrupted_resync_source_still_makes_a_new_generation_alone() {
    let (mut r, _) = primary_live();
    let _ = r.teardown();
    let s = r.new_session(TransferLog::new(bound(), G, SIZE));
    let _ = r.go_live(s, Sync::Source, false, true);
    let g = r.start_sync_source(0x500);
    let _ = r.teardown();
    let sb = r.new_generation(0x700).expect("the sync generation is no base of ours");
    assert_eq!(sb.uuids.bitmap, 0x10, "the current the target adopts or holds");
    assert_eq!(sb.uuids.history[0], g.bitmap);
}

#[test]
fn a_failed_local_write_makes_the_secondary_inconsistent() {
    let mut r = secondary();
    assert_eq!(r.local_write_failed(3 * G, G), Persist::SUPERBLOCK);
    assert!(r.bitmap.get(3));
    assert_eq!(r.st.disk, DiskState::Inconsistent);
}

#[test]
fn go_live_resets_what_the_session_settles() {
    let mut r = Replica::<()>::attach(
        sb(FLAG_CONSISTENT | FLAG_CRASHED_PRIMARY | FLAG_PEER_OUTDATED),
        Bitmap::new(SIZE, G),
        &[],
    )
    .0;
    r.sb.flags |= FLAG_NEW_CURRENT;
    r.discard_my_data = true;
    let s = r.new_session(TransferLog::new(bound(), G, SIZE));
    assert_eq!(r.go_live(s, Sync::Target, false, false), Persist::METADATA);
    assert!(!r.bumped() && !r.discard_my_data && r.resyncing);
    assert_eq!(r.sb.flags & (FLAG_CRASHED_PRIMARY | FLAG_PEER_OUTDATED | FLAG_NEW_CURRENT), 0);
    assert_eq!(r.st.conn, ConnState::SyncTarget);
    assert_eq!(r.st.disk, DiskState::Inconsistent);
}

#[test]
fn a_resync_as_target_from_sync_uuid_to_done() {
    let mut r = secondary();
    assert_eq!(r.sync_uuid(Generations::just_created()), Err(PeerError::NotResyncTarget));
    let s = r.new_session(TransferLog::new(bound(), G, SIZE));
    let _ = r.go_live(s, Sync::Target, true, false);
    r.bitmap.set_range(0, 2 * G);
    let src = Generations { current: 0x21, bitmap: 0x30, history: [0x10, 0] };
    assert_eq!(r.sync_uuid(src), Ok(Persist::SUPERBLOCK));
    assert_eq!(r.sb.uuids.current, 0x30);
    r.resync_applied(0, 2 * G);
    assert_eq!(r.bitmap.weight(), 0);
    assert_eq!(r.target_done(), Ok(Persist::METADATA));
    assert_eq!(r.st.disk, DiskState::UpToDate);
    assert_eq!(r.sb.uuids.current, 0x21, "the source's generations");
    assert!(!r.resyncing);
}

#[test]
fn an_interrupted_resync_target_flushes_before_its_bits_are_written() {
    let mut r = secondary();
    let s = r.new_session(TransferLog::new(bound(), G, SIZE));
    let _ = r.go_live(s, Sync::Target, true, false);
    let _ = r.st.step(Event::Disconnect);
    let end = r.teardown();
    assert!(end.persist.data, "judged by the resync, not the (Disconnecting) state");
    assert!(!r.resyncing);
}

#[test]
fn a_resync_source_clears_bits_only_for_its_own_live_session() {
    let (mut r, epoch) = primary_live();
    r.bitmap.set_range(0, 4 * G);
    assert!(!r.resync_served(epoch + 1, 0, G));
    assert!(r.resync_served(epoch, 0, G));
    assert_eq!(r.bitmap.weight(), 3);
    let _ = r.teardown();
    assert!(!r.resync_served(epoch, G, G), "after the teardown nothing is cleared");
    assert_eq!(r.bitmap.weight(), 3);
}

#[test]
fn source_done_clears_the_bitmap_and_its_generation() {
    let (mut r, _) = primary_live();
    assert!(r.source_done().is_err(), "not a sync source");
    let _ = r.teardown();
    let s = r.new_session(TransferLog::new(bound(), G, SIZE));
    let _ = r.go_live(s, Sync::Source, false, true);
    let g = r.start_sync_source(0x500);
    assert_ne!(g.bitmap, 0);
    r.bitmap.set_all();
    assert_eq!(r.source_done(), Ok(Persist::METADATA));
    assert_eq!((r.bitmap.weight(), r.sb.uuids.bitmap), (0, 0));
    assert_eq!(r.st.conn, ConnState::Connected);
}

#[test]
fn peer_report_refuses_two_primaries() {
    let (mut r, _) = primary_live();
    assert_eq!(r.peer_report(Role::Primary, DiskState::UpToDate), Err(Refusal::BothPrimary));
    assert!(r.peer_report(Role::Secondary, DiskState::UpToDate).is_ok());
}

#[test]
fn close_clears_crashed_primary() {
    let (mut r, _) = primary_live();
    assert_eq!(r.close(), Persist::ALL);
    assert!(!r.crashed_primary());
}

#[test]
fn standalone_is_primary_and_up_to_date() {
    let r = Replica::<()>::standalone(sb(FLAG_CONSISTENT), Bitmap::new(1, G));
    assert_eq!((r.st.role, r.st.disk), (Role::Primary, DiskState::UpToDate));
}

#[test]
fn give_up_reports_and_stands_alone() {
    let mut r = secondary();
    r.give_up(true, "both changed".into());
    assert_eq!(r.split_brain.as_deref(), Some("both changed"));
    assert_eq!(r.st.conn, ConnState::StandAlone);
    let mut r = secondary();
    r.give_up(false, "unrelated".into());
    assert_eq!((r.split_brain.as_deref(), r.last_refusal.as_deref()), (None, Some("unrelated")));
    assert_eq!(r.st.conn, ConnState::StandAlone);
}

#[test]
fn frames_a_node_takes_only_in_the_right_state() {
    let (mut p, _) = primary_live();
    assert_eq!(p.check_replicated_write(), Err(PeerError::WriteToPrimary));
    assert!(p.check_resync_request().is_ok(), "a Primary serves resync data");
    let refused = PeerError::ResyncDataRefused {
        what: "RsData",
        role: Role::Primary,
        conn: ConnState::Connected,
    };
    assert_eq!(p.check_resync_data(false), Err(refused));
    assert!(p.check_resync_data(true).is_err());
    let _ = p.teardown();

    let mut t = secondary();
    assert!(t.check_replicated_write().is_ok());
    assert!(t.check_resync_data(false).is_err(), "not connected: nobody asked");
    let s = t.new_session(TransferLog::new(bound(), G, SIZE));
    let _ = t.go_live(s, Sync::Target, true, false);
    assert_eq!(t.check_resync_request(), Err(PeerError::RequestToTarget));
    assert!(t.check_resync_data(false).is_ok() && t.check_resync_data(true).is_ok());

    let mut c = up_to_date();
    let s = c.new_session(TransferLog::new(bound(), G, SIZE));
    let _ = c.go_live(s, Sync::None, true, false);
    assert!(c.check_resync_data(false).is_ok(), "a verify's repair");
    assert!(c.check_resync_data(true).is_err(), "RsSame answers only a target's request");
}

#[test]
fn a_bigger_volume_beside_a_smaller_connected_peer_is_not_promoted() {
    let mut r = up_to_date();
    let s = r.new_session(TransferLog::new(bound(), 16 * G, u64::MAX));
    let _ = r.go_live(s, Sync::None, false, false);
    r.peer_size = Some(SIZE - G);
    assert_eq!(r.promote(false, 1), Err(Refusal::PeerTooSmall { mine: SIZE, peer: SIZE - G }));
    assert_eq!(r.st.role, Role::Secondary);
    // A peer as big, or bigger, and a peer no longer connected: promoted.
    r.peer_size = Some(SIZE + G);
    assert!(matches!(r.promote(false, 1), Ok(Promotion::Promoted { .. })));
    let mut r = up_to_date();
    r.peer_size = Some(SIZE - G);
    assert!(matches!(r.promote(false, 1), Ok(Promotion::Promoted { .. })));
}

#[test]
fn a_restored_state_is_consistent_with_its_generations_and_all_out_of_sync() {
    // Half-synced: Inconsistent, the session gone.
    let mut r = Replica::<u32>::attach(sb(0), Bitmap::new(SIZE, G), &[]).0;
    let _ = r.bitmap.take_dirty();
    let kept = Generations { current: 0x20, bitmap: 0, history: [0x10, 0] };
    assert_eq!(r.restored(kept), Ok(Persist::METADATA));
    assert_eq!(r.st.disk, DiskState::Consistent);
    assert_eq!(r.sb.uuids, Generations { current: 0x20, bitmap: 0, history: [0x20, 0x10] });
    // Promoted and written, it meets a peer that moved on from the kept generation (0x20 in
    // its history) as a split brain, not as unrelated data.
    r.sb.uuids.new_current(0x41, true);
    use crate::generation::Side;
    let me = Side { uuids: r.sb.uuids, crashed_primary: false, primary: true };
    let peer = Side {
        uuids: Generations { current: 0x51, bitmap: 0x62, history: [0x61, 0x20] },
        crashed_primary: true,
        primary: false,
    };
    let v = crate::generation::compare(&me, &peer, false);
    assert_eq!((v.decision, v.rule), (crate::generation::Decision::SplitBrainDisconnect, 100));
    assert_eq!(r.bitmap.weight(), r.bitmap.bits(), "every block out of sync");
    assert!(!r.bitmap.take_dirty().is_empty(), "the whole bitmap goes to disk");
    assert!(r.next_superblock().flags & FLAG_CONSISTENT != 0);
    // Never over data that is consistent already, or with a session up.
    let mut r = secondary();
    assert_eq!(
        r.restored(kept),
        Err(Refusal::NotRestorable(Role::Secondary, DiskState::Consistent, ConnState::StandAlone))
    );
    assert_eq!(r.sb.uuids.current, 0x10, "a refusal changes nothing");
}
