//! Rules of the manager one at a time (the scenarios are in `sim.rs`).

use super::*;

fn s(master: bool) -> Settings {
    Settings {
        configured_master: master,
        failback_auto: false,
        fencing: Fencing::ResourceOnly,
        fence_command: false,
        fence_delay: Duration::from_millis(0),
        switchover_timeout: Duration::from_secs(10),
        resend: Duration::from_millis(500),
        retry: Duration::from_secs(5),
        resources: 2,
    }
}

fn master_view() -> LocalView {
    LocalView {
        primary: true,
        any_primary: true,
        uptodate: true,
        in_sync: true,
        resyncing: false,
        peer_primary: false,
        disconnected: 0,
        synced: 0b11,
        diskless: 0,
        scheduled: 0,
        restorable: false,
        worst_disk: "UpToDate",
    }
}

fn slave_view() -> LocalView {
    LocalView { primary: false, any_primary: false, ..master_view() }
}

fn peer(primary: bool) -> PeerView {
    PeerView {
        primary,
        any_primary: primary,
        uptodate: true,
        healthy: true,
        diskless: 0,
        unusable: 0,
    }
}

fn alive(m: &mut Manager, t: Instant, local: LocalView, pv: PeerView) {
    m.handle(t, Input::Local(local));
    m.handle(t, Input::PeerView(pv));
    m.handle(t, Input::Peer(PeerState::Alive));
}

fn sends(a: &[Action]) -> Vec<&Control> {
    a.iter().filter_map(|x| if let Action::Send(c) = x { Some(c) } else { None }).collect()
}

#[test]
fn a_master_refuses_to_release_to_a_peer_that_is_not_in_sync() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, LocalView { in_sync: false, ..master_view() }, peer(false));
    let a = m.handle(t, Input::Control(Control::Release { id: 5 }));
    let c = sends(&a);
    assert!(
        matches!(c[..], [Control::Released { id: 5, ok: false, reason }] if reason.contains("not in sync")),
        "{a:?}"
    );
    assert!(!a.iter().any(|x| matches!(x, Action::Run(_))), "nothing may run: {a:?}");
}

#[test]
fn a_resent_request_gets_the_same_answer_and_runs_once() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    let a = m.handle(t, Input::Control(Control::Release { id: 9 }));
    assert_eq!(a.iter().filter(|x| matches!(x, Action::Run(Step::ExportClose))).count(), 1);
    for st in [Step::ExportClose, Step::ServicesSlave, Step::VipDown] {
        let a = m.handle(t, Input::Done(Outcome::Ok));
        assert!(!a.is_empty(), "after {st:?}");
    }
    m.handle(t, Input::Local(slave_view()));
    let a = m.handle(t, Input::Done(Outcome::Ok));
    assert!(
        sends(&a).iter().any(|c| matches!(c, Control::Released { id: 9, ok: true, .. })),
        "{a:?}"
    );
    let again = m.handle(t, Input::Control(Control::Release { id: 9 }));
    assert!(matches!(sends(&again)[..], [Control::Released { id: 9, ok: true, .. }]), "{again:?}");
    assert!(!again.iter().any(|x| matches!(x, Action::Run(_))));
}

#[test]
fn a_master_does_not_outdate_itself_for_the_peer() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    let a = m.handle(t, Input::Control(Control::Outdate { id: 3, mask: 1 }));
    assert!(!a.iter().any(|x| matches!(x, Action::Outdate { .. })), "{a:?}");
}

#[test]
fn a_slave_outdates_only_configured_resources_and_confirms() {
    let t = Instant::now();
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    let a = m.handle(t, Input::Control(Control::Outdate { id: 3, mask: 0xff }));
    assert!(a.contains(&Action::Outdate { id: 3, mask: 0b11 }), "{a:?}");
    let a = m.handle(t, Input::OutdateDone { id: 3, mask: 0b11, ok: true });
    assert!(sends(&a).contains(&&Control::Outdated { id: 3, mask: 0b11 }), "{a:?}");
}

#[test]
fn the_master_outdates_a_peer_that_answers_only_on_the_heartbeat_and_stops_when_confirmed() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    let a = m.handle(t, Input::Local(LocalView { disconnected: 0b10, ..master_view() }));
    let id = match sends(&a)[..] {
        [Control::Outdate { id, mask: 0b10 }] => *id,
        _ => panic!("no outdate request: {a:?}"),
    };
    // Resent while unanswered.
    let a = m.handle(t + Duration::from_millis(600), Input::Tick);
    assert!(matches!(sends(&a)[..], [Control::Outdate { mask: 0b10, .. }]), "{a:?}");
    let a = m.handle(
        t + Duration::from_millis(700),
        Input::Control(Control::Outdated { id, mask: 0b10 }),
    );
    assert!(a.contains(&Action::PeerOutdated { mask: 0b10 }), "{a:?}");
    let a = m.handle(t + Duration::from_millis(2000), Input::Tick);
    assert!(sends(&a).is_empty(), "no more requests once confirmed: {a:?}");
}

#[test]
fn a_peer_whose_frames_say_its_disk_is_unusable_is_not_outdated_until_they_say_otherwise() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    // Resource 1 Inconsistent at the peer (a resync target, say): nothing to outdate there.
    alive(&mut m, t, master_view(), PeerView { unusable: 0b10, ..peer(false) });
    let a = m.handle(t, Input::Local(LocalView { disconnected: 0b10, ..master_view() }));
    assert!(sends(&a).is_empty(), "{a:?}");
    let a = m.handle(t + Duration::from_millis(600), Input::Tick);
    assert!(sends(&a).is_empty(), "{a:?}");
    // Its next frame says UpToDate (the resync finished just before the link broke): outdated.
    let a = m.handle(t + Duration::from_millis(700), Input::PeerView(peer(false)));
    assert!(matches!(sends(&a)[..], [Control::Outdate { mask: 0b10, .. }]), "{a:?}");
    // Under resource-and-stonith, an unusable peer disk exposes nothing: no freeze.
    for (unusable, freezes) in [(0b1, false), (0, true)] {
        let mut m = Manager::new(Settings { fencing: Fencing::ResourceAndStonith, ..s(true) }, t);
        alive(&mut m, t, master_view(), PeerView { unusable, ..peer(false) });
        let a = m.handle(t, Input::Local(LocalView { disconnected: 0b1, ..master_view() }));
        assert_eq!(a.iter().any(|x| matches!(x, Action::Run(Step::Freeze))), freezes, "{a:?}");
    }
}

#[test]
fn takeover_steps_run_in_order_and_a_failed_promotion_stops_them() {
    let t = Instant::now();
    let mut m = Manager::new(Settings { fence_command: true, ..s(false) }, t);
    m.handle(t, Input::Local(slave_view()));
    let a = m.handle(t, Input::Peer(PeerState::Dead));
    assert!(a.contains(&Action::Run(Step::Fence { delay: Duration::ZERO })), "{a:?}");
    let a = m.handle(t, Input::Done(Outcome::Fence(FenceVerdict::PeerDown)));
    assert!(a.contains(&Action::Run(Step::DropPeer)), "{a:?}");
    let a = m.handle(t, Input::Done(Outcome::Ok));
    assert!(a.contains(&Action::Run(Step::Promote { force: false })), "{a:?}");
    let a = m.handle(t, Input::Done(Outcome::Failed("disk gone".into())));
    assert!(!a.iter().any(|x| matches!(x, Action::Run(_))), "{a:?}");
    assert!(a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("disk gone"))), "{a:?}");
}

#[test]
fn a_failed_vip_is_reported_but_the_takeover_completes() {
    let t = Instant::now();
    let mut m = Manager::new(s(false), t);
    m.handle(t, Input::Local(slave_view()));
    m.handle(t, Input::Peer(PeerState::Dead));
    m.handle(t, Input::Done(Outcome::Ok)); // DropPeer
    let a = m.handle(t, Input::Done(Outcome::Ok));
    assert!(a.contains(&Action::Run(Step::VipUp)), "{a:?}");
    let a = m.handle(t, Input::Done(Outcome::Failed("no such interface".into())));
    assert!(a.contains(&Action::Run(Step::ServicesMaster)), "{a:?}");
    m.handle(t, Input::Done(Outcome::Ok));
    let a = m.handle(t, Input::Done(Outcome::Ok));
    assert!(
        a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("running master"))),
        "{a:?}"
    );
    assert!(!m.busy());
}

#[test]
fn operator_commands_while_busy_are_refused() {
    let t = Instant::now();
    let mut m = Manager::new(s(false), t);
    m.handle(t, Input::Local(slave_view()));
    m.handle(t, Input::Peer(PeerState::Dead));
    assert!(m.busy());
    let a = m.handle(t, Input::MakeMaster { token: 1, force: true });
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Reply { token: 1, result: Err(Refusal::SwitchoverRunning) }
        )),
        "{a:?}"
    );
}

#[test]
fn the_winner_of_a_dual_master_episode_re_announces_when_the_loser_releases() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    // Both Primary: the replication link cannot be connected.
    let dual = LocalView { disconnected: 0b11, in_sync: false, synced: 0, ..master_view() };
    alive(&mut m, t, dual, peer(true));
    // Seeing both masters: the configured master keeps the role and announces.
    let seen = m.handle(t, Input::Tick);
    assert!(
        !seen.iter().any(|x| matches!(x, Action::Run(_))),
        "the winner keeps the role: {seen:?}"
    );
    // The loser releases: announce again, after its last announcements.
    let a = m.handle(t, Input::PeerView(peer(false)));
    assert!(a.contains(&Action::Reannounce), "{a:?}");
    // Only once.
    let a = m.handle(t, Input::PeerView(peer(false)));
    assert!(!a.contains(&Action::Reannounce), "{a:?}");
}

#[test]
fn a_heartbeat_frame_older_than_the_peers_demotion_is_not_a_second_master() {
    let t = Instant::now();
    // Connected on every resource and the replication link says the peer is Secondary: the
    // frame that says "master" was sent before the peer demoted.
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, master_view(), peer(true));
    let a = m.handle(t, Input::Tick);
    assert!(runs(&a).is_empty(), "released for a stale frame: {a:?}");
    // The same with the link down: two masters, the other one is configured: release.
    let a = m.handle(t, Input::Local(LocalView { disconnected: 0b01, ..master_view() }));
    assert_eq!(runs(&a), [Step::ExportClose], "{a:?}");
}

#[test]
fn a_stopping_node_takes_nothing_over() {
    let t = Instant::now();
    let mut m = Manager::new(s(false), t);
    m.handle(t, Input::Local(slave_view()));
    m.handle(t, Input::Stopping);
    let a = m.handle(t, Input::Peer(PeerState::Dead));
    assert!(!a.iter().any(|x| matches!(x, Action::Run(_))), "{a:?}");
    // A master asking it to take over is told no.
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    m.handle(t, Input::Stopping);
    let a = m.handle(t, Input::Control(Control::TakeOver { id: 4, force: false }));
    assert!(
        sends(&a).iter().any(|c| matches!(c, Control::TookOver { id: 4, ok: false, reason } if reason.contains("stopping"))),
        "{a:?}"
    );
}

#[test]
fn switchover_now_answers_as_make_master_and_make_slave_would() {
    let t = Instant::now();
    // A master in sync with a live peer: make-slave would hand over.
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    assert!(m.switchover_now().is_ok_and(|w| w.contains("make-slave")), "{:?}", m.switchover_now());
    // Out of sync: make-slave refuses, as the real command does.
    m.handle(t, Input::Local(LocalView { in_sync: false, ..master_view() }));
    assert_eq!(m.switchover_now(), Err(Refusal::PeerNotInSync));
    let token = 1;
    let a = m.handle(t, Input::MakeSlave { token });
    assert!(
        a.iter().any(|x| matches!(x, Action::Reply { result: Err(Refusal::PeerNotInSync), .. })),
        "{a:?}"
    );
    // The peer dead: nobody to hand over to.
    m.handle(t, Input::Local(master_view()));
    m.handle(t, Input::Peer(PeerState::Dead));
    assert_eq!(m.switchover_now(), Err(Refusal::NoNodeToHandTo));

    // A slave, UpToDate, the peer master: make-master would ask it to release.
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    assert!(m.switchover_now().is_ok_and(|w| w.contains("make-master")));
    // Resyncing: refused as Stale, and the real make-master says the same.
    m.handle(t, Input::Local(LocalView { resyncing: true, in_sync: false, ..slave_view() }));
    let want = Refusal::Stale { why: refusal::Stale::Resyncing, peer_master: true };
    assert_eq!(m.switchover_now(), Err(want.clone()));
    let a = m.handle(t, Input::MakeMaster { token: 2, force: false });
    assert!(
        a.iter().any(|x| matches!(x, Action::Reply { result: Err(r), .. } if *r == want)),
        "{a:?}"
    );
    // The peer not heard yet.
    let mut m = Manager::new(s(false), t);
    m.handle(t, Input::Local(slave_view()));
    assert_eq!(m.switchover_now(), Err(Refusal::PeerNotHeard));
    // Stopping.
    m.handle(t, Input::Stopping);
    assert_eq!(m.switchover_now(), Err(Refusal::Stopping));
}

#[test]
fn a_diskless_master_never_outdates_the_peer_that_holds_the_only_copy() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    let v = LocalView { disconnected: 0b11, diskless: 0b01, in_sync: false, ..master_view() };
    let a = m.handle(t, Input::Local(v));
    assert!(matches!(sends(&a)[..], [Control::Outdate { mask: 0b10, .. }]), "{a:?}");
    // Resource 1 is cut off too: this node keeps the role (and resource 1's newer writes).
    assert!(!a.iter().any(|x| matches!(x, Action::Run(Step::ExportClose))), "{a:?}");
}

#[test]
fn a_slave_takes_over_from_a_released_diskless_master_it_was_the_copy_of() {
    for peer_diskless in [0b11, 0b01] {
        let t = Instant::now();
        let mut m = Manager::new(s(false), t);
        alive(&mut m, t, slave_view(), peer(true));
        let a = m.handle(t, Input::MakeMaster { token: 1, force: false });
        let id = match sends(&a)[..] {
            [Control::Release { id }] => *id,
            _ => panic!("no release request: {a:?}"),
        };
        // The Diskless peer left the replication session as it demoted.
        let v = LocalView { in_sync: false, synced: 0b10, disconnected: 0b01, ..slave_view() };
        m.handle(t, Input::Local(v));
        let mut a =
            m.handle(t, Input::Control(Control::Released { id, ok: true, reason: String::new() }));
        let pv = PeerView { diskless: peer_diskless, ..peer(false) };
        a.extend(m.handle(t, Input::PeerView(pv)));
        a.extend(m.handle(t + Duration::from_millis(100), Input::Tick));
        let promotes = a.iter().any(|x| matches!(x, Action::Run(Step::Promote { .. })));
        // Resource 0's copy is complete here only if the peer's disk 0 is the detached one.
        assert_eq!(promotes, peer_diskless & 1 == 1, "{peer_diskless:#b}: {a:?}");
    }
}

#[test]
fn a_master_whose_diskless_resource_lost_its_session_releases_the_role() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    // Diskless but connected: serving through the peer, nothing to release for.
    let a = m.handle(t, Input::Local(LocalView { diskless: 0b01, ..master_view() }));
    assert!(!a.iter().any(|x| matches!(x, Action::Run(Step::ExportClose))), "{a:?}");
    let v = LocalView { diskless: 0b01, disconnected: 0b01, in_sync: false, ..master_view() };
    let a = m.handle(t, Input::Local(v));
    assert!(a.iter().any(|x| matches!(x, Action::Run(Step::ExportClose))), "{a:?}");
    assert!(sends(&a).iter().all(|c| !matches!(c, Control::Outdate { .. })), "{a:?}");
}

fn runs(a: &[Action]) -> Vec<Step> {
    a.iter().filter_map(|x| if let Action::Run(s) = x { Some(*s) } else { None }).collect()
}

/// Answers every step with Ok until the transition ends; returns the steps run.
fn run_out(m: &mut Manager, t: Instant, first: &[Action]) -> Vec<Step> {
    let mut all = runs(first);
    for _ in 0..16 {
        if !m.busy() {
            break;
        }
        all.extend(runs(&m.handle(t, Input::Done(Outcome::Ok))));
    }
    assert!(!m.busy(), "the transition did not end: {all:?}");
    all
}

fn refused_with_maintenance(a: &[Action]) -> bool {
    a.iter().any(|x| matches!(x, Action::Reply { result: Err(Refusal::Maintenance), .. }))
}

#[test]
fn maintenance_mode_stops_every_automatic_action_and_refuses_switchovers() {
    let t = Instant::now();
    // A slave whose peer dies is not taken over from while maintenance is on.
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    let a = m.handle(t, Input::Maintenance(true));
    assert!(a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("maintenance mode on"))));
    assert!(m.switchover_now() == Err(Refusal::Maintenance));
    let a = m.handle(t, Input::Peer(PeerState::Dead));
    assert!(runs(&a).is_empty(), "took over in maintenance: {a:?}");
    assert!(
        a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("does not take over"))),
        "{a:?}"
    );
    for i in 1..20 {
        let a = m.handle(t + Duration::from_secs(i), Input::Tick);
        assert!(runs(&a).is_empty(), "{a:?}");
    }
    let a = m.handle(t, Input::MakeMaster { token: 1, force: true });
    assert!(refused_with_maintenance(&a), "{a:?}");
    // Once off, the rules apply again: the dead peer's role is taken.
    let a = m.handle(t + Duration::from_secs(30), Input::Maintenance(false));
    let steps = runs(&a);
    assert!(matches!(steps[..], [Step::DropPeer]), "{a:?}");

    // A master: no health handover, no release or takeover for the peer, no make-slave; but
    // a replication link that breaks still outdates the peer (found by the simulation: a slave
    // that missed writes took over with them once maintenance ended).
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    m.handle(t, Input::Maintenance(true));
    let a = m.handle(t, Input::Local(LocalView { disconnected: 0b01, ..master_view() }));
    assert!(matches!(sends(&a)[..], [Control::Outdate { mask: 0b01, .. }]), "{a:?}");
    m.handle(t, Input::Local(master_view()));
    let a = m.handle(t, Input::Health(false));
    assert!(sends(&a).is_empty() && runs(&a).is_empty(), "handed over in maintenance: {a:?}");
    m.handle(t, Input::Local(master_view()));
    let a = m.handle(t, Input::Control(Control::Release { id: 11 }));
    assert!(
        matches!(sends(&a)[..], [Control::Released { id: 11, ok: false, reason }] if reason.contains("maintenance")),
        "{a:?}"
    );
    assert!(runs(&a).is_empty());
    let a = m.handle(t, Input::Control(Control::TakeOver { id: 13, force: false }));
    assert!(matches!(sends(&a)[..], [Control::TookOver { id: 13, ok: false, .. }]), "{a:?}");
    let a = m.handle(t, Input::MakeSlave { token: 2 });
    assert!(refused_with_maintenance(&a), "{a:?}");
    // The peer's Outdate is still honoured: it only makes this node's data less trusted.
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    m.handle(t, Input::Maintenance(true));
    let a = m.handle(t, Input::Control(Control::Outdate { id: 3, mask: 1 }));
    assert!(a.contains(&Action::Outdate { id: 3, mask: 1 }), "{a:?}");
}

#[test]
fn ending_maintenance_matches_what_a_master_holds_to_the_role_the_operator_left() {
    let t = Instant::now();
    // A node that took over (and so holds the VIPs) and was demoted by hand in maintenance
    // gives them up when it ends, without demoting anything.
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, slave_view(), peer(false));
    let a = m.handle(t, Input::Tick);
    let steps = run_out(&mut m, t, &a);
    assert!(steps.contains(&Step::VipUp), "{steps:?}");
    m.handle(t, Input::Local(master_view()));
    m.handle(t, Input::Maintenance(true));
    m.handle(t, Input::Local(slave_view()));
    m.handle(t, Input::PeerView(peer(true)));
    let a = m.handle(t, Input::Maintenance(false));
    let steps = run_out(&mut m, t, &a);
    assert_eq!(steps, [Step::ExportClose, Step::ServicesSlave, Step::VipDown]);
    // Nothing more to give up the next time.
    m.handle(t, Input::Maintenance(true));
    let a = m.handle(t, Input::Maintenance(false));
    assert!(runs(&a).is_empty(), "{a:?}");

    // A slave promoted by hand takes the VIPs, services and export (no promotion step).
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    m.handle(t, Input::Maintenance(true));
    m.handle(t, Input::Local(master_view()));
    m.handle(t, Input::PeerView(peer(false)));
    let a = m.handle(t, Input::Maintenance(false));
    let steps = run_out(&mut m, t, &a);
    assert_eq!(steps, [Step::VipUp, Step::ServicesMaster, Step::ExportOpen]);

    // Primary for one resource only: said, nothing run.
    let mut m = Manager::new(s(false), t);
    alive(&mut m, t, slave_view(), peer(true));
    m.handle(t, Input::Maintenance(true));
    m.handle(t, Input::Local(LocalView { primary: false, ..master_view() }));
    m.handle(t, Input::PeerView(peer(false)));
    let a = m.handle(t, Input::Maintenance(false));
    assert!(runs(&a).is_empty(), "{a:?}");
    assert!(a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("some resources only"))));
}

#[test]
fn an_outdate_request_is_withdrawn_when_replication_comes_back_before_the_answer() {
    let t = Instant::now();
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    let a = m.handle(t, Input::Local(LocalView { disconnected: 0b01, ..master_view() }));
    assert!(matches!(sends(&a)[..], [Control::Outdate { mask: 0b01, .. }]), "{a:?}");
    // Reconnected (and resynced) before the peer answered: no more copies go out, so none can
    // outdate a peer that is in sync again.
    let a = m.handle(t + Duration::from_millis(100), Input::Local(master_view()));
    assert!(a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("withdrawn"))), "{a:?}");
    for i in 1..5 {
        let a = m.handle(t + Duration::from_millis(600 * i), Input::Tick);
        assert!(sends(&a).is_empty(), "{a:?}");
    }
}

#[test]
fn a_scheduled_peer_is_never_outdated_nor_a_reason_to_freeze() {
    let t = Instant::now();
    // Resource 1 syncs on a schedule: its idle link outdates nothing; resource 0's still does.
    let mut m = Manager::new(s(true), t);
    alive(&mut m, t, master_view(), peer(false));
    let idle = LocalView { disconnected: 0b10, scheduled: 0b10, ..master_view() };
    let a = m.handle(t, Input::Local(idle));
    assert!(sends(&a).is_empty(), "{a:?}");
    let a = m.handle(t + Duration::from_millis(600), Input::Tick);
    assert!(sends(&a).is_empty(), "{a:?}");
    let a = m.handle(
        t + Duration::from_millis(700),
        Input::Local(LocalView { disconnected: 0b11, ..idle }),
    );
    assert!(matches!(sends(&a)[..], [Control::Outdate { mask: 0b01, .. }]), "{a:?}");
    // Under resource-and-stonith an idle scheduled link holds no write back.
    for (scheduled, freezes) in [(0b1, false), (0, true)] {
        let mut m = Manager::new(Settings { fencing: Fencing::ResourceAndStonith, ..s(true) }, t);
        alive(&mut m, t, master_view(), peer(false));
        let a =
            m.handle(t, Input::Local(LocalView { disconnected: 0b1, scheduled, ..master_view() }));
        assert_eq!(a.iter().any(|x| matches!(x, Action::Run(Step::Freeze))), freezes, "{a:?}");
    }
}

#[test]
fn a_slave_cut_off_mid_catch_up_takes_over_only_with_a_kept_state() {
    let t = Instant::now();
    let half_synced = LocalView {
        uptodate: false,
        in_sync: false,
        worst_disk: "Inconsistent",
        disconnected: 0b11,
        synced: 0,
        ..slave_view()
    };
    for (restorable, takes_over) in [(true, true), (false, false)] {
        let mut m = Manager::new(s(false), t);
        m.handle(t, Input::Local(LocalView { restorable, ..half_synced }));
        let a = m.handle(t, Input::Peer(PeerState::Dead));
        let promotes = a.iter().any(|x| matches!(x, Action::Run(Step::Promote { .. })))
            || run_out(&mut m, t, &a).iter().any(|s| matches!(s, Step::Promote { .. }));
        assert_eq!(promotes, takes_over, "restorable {restorable}: {a:?}");
        if !takes_over {
            assert!(
                a.iter().any(|x| matches!(x, Action::Event(e) if e.contains("Inconsistent"))),
                "{a:?}"
            );
        }
    }
}
