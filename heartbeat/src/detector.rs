//! The failure detector (pure: the caller passes `now`). Each link is up while the peer's
//! frames arrive on it, warned about after `warntime` of silence, and down after `deadtime`. A
//! link never heard from counts as down only once `initdead` has passed since start (a node that
//! boots before its peer gives it time). The **peer** is dead only when every link is down.

use std::time::{Duration, Instant};

/// Heartbeat timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub keepalive: Duration,
    pub warntime: Duration,
    pub deadtime: Duration,
    pub initdead: Duration,
}

/// A timing that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("heartbeat.keepalive_ms must be greater than 0")]
    Keepalive,
    #[error(
        "heartbeat.deadtime_ms ({0} ms) must be more than 2 × keepalive_ms ({1} ms): one lost frame would declare the peer dead"
    )]
    Deadtime(u128, u128),
    #[error(
        "heartbeat.warntime_ms ({0} ms) must be at least keepalive_ms and below deadtime_ms ({1} ms)"
    )]
    Warntime(u128, u128),
    #[error("heartbeat.initdead_ms ({0} ms) must be at least deadtime_ms ({1} ms)")]
    Initdead(u128, u128),
}

impl Timing {
    /// Checks the relations between the values.
    pub fn validate(&self) -> Result<(), TimingError> {
        let ms = |d: Duration| d.as_millis();
        if self.keepalive.is_zero() {
            return Err(TimingError::Keepalive);
        }
        if self.deadtime <= self.keepalive * 2 {
            return Err(TimingError::Deadtime(ms(self.deadtime), ms(self.keepalive)));
        }
        if self.warntime < self.keepalive || self.warntime >= self.deadtime {
            return Err(TimingError::Warntime(ms(self.warntime), ms(self.deadtime)));
        }
        if self.initdead < self.deadtime {
            return Err(TimingError::Initdead(ms(self.initdead), ms(self.deadtime)));
        }
        Ok(())
    }
}

/// State of one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not heard from yet; within `initdead` of start.
    Init,
    /// Frames arrive.
    Up,
    /// Silent for more than `warntime`.
    Late,
    /// Silent for more than `deadtime` (or never heard within `initdead`).
    Down,
}

/// What the detector concludes about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Not heard yet; waiting up to `initdead`.
    Unknown,
    /// At least one link is up.
    Alive,
    /// Every link is down.
    Dead,
}

/// A change the caller acts on and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    LinkUp(usize),
    /// The link has been silent this long (past warntime).
    LinkLate(usize, Duration),
    LinkDown(usize),
    PeerAlive,
    PeerDead,
}

#[derive(Debug, Clone, Copy)]
struct Link {
    state: LinkState,
    last: Option<Instant>,
}

/// The detector.
#[derive(Debug, Clone)]
pub struct Detector {
    timing: Timing,
    start: Instant,
    links: Vec<Link>,
    peer: PeerState,
}

impl Detector {
    pub fn new(timing: Timing, links: usize, now: Instant) -> Self {
        Self {
            timing,
            start: now,
            links: vec![Link { state: LinkState::Init, last: None }; links],
            peer: PeerState::Unknown,
        }
    }

    /// New timing (a live reload): each link keeps its state and when it was last heard; the
    /// next tick judges them by the new times.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
    }

    /// An authenticated frame arrived on `link`.
    pub fn heard(&mut self, link: usize, now: Instant) -> Vec<Event> {
        let mut ev = Vec::new();
        let Some(l) = self.links.get_mut(link) else { return ev };
        l.last = Some(now);
        if l.state != LinkState::Up {
            l.state = LinkState::Up;
            ev.push(Event::LinkUp(link));
        }
        self.update_peer(&mut ev);
        ev
    }

    /// Advances time: links fall silent, the peer may die.
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut ev = Vec::new();
        let t = self.timing;
        let init_over = now.saturating_duration_since(self.start) >= t.initdead;
        for (i, l) in self.links.iter_mut().enumerate() {
            let next = match l.last {
                None if init_over => LinkState::Down,
                None => LinkState::Init,
                Some(last) => {
                    let silent = now.saturating_duration_since(last);
                    if silent >= t.deadtime {
                        LinkState::Down
                    } else if silent >= t.warntime {
                        LinkState::Late
                    } else {
                        LinkState::Up
                    }
                }
            };
            if next != l.state {
                match next {
                    LinkState::Down => ev.push(Event::LinkDown(i)),
                    LinkState::Late => ev.push(Event::LinkLate(
                        i,
                        l.last.map_or(Duration::ZERO, |x| now.saturating_duration_since(x)),
                    )),
                    LinkState::Up | LinkState::Init => {}
                }
                l.state = next;
            }
        }
        self.update_peer(&mut ev);
        ev
    }

    fn update_peer(&mut self, ev: &mut Vec<Event>) {
        let any_up = self.links.iter().any(|l| matches!(l.state, LinkState::Up | LinkState::Late));
        let all_down = self.links.iter().all(|l| l.state == LinkState::Down);
        let next = if any_up {
            PeerState::Alive
        } else if all_down {
            PeerState::Dead
        } else {
            self.peer
        };
        if next != self.peer {
            self.peer = next;
            ev.push(if next == PeerState::Alive { Event::PeerAlive } else { Event::PeerDead });
        }
    }

    pub fn peer(&self) -> PeerState {
        self.peer
    }

    pub fn link(&self, i: usize) -> Option<LinkState> {
        self.links.get(i).map(|l| l.state)
    }

    /// When the link was last heard.
    pub fn last_heard(&self, i: usize) -> Option<Instant> {
        self.links.get(i).and_then(|l| l.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_timing_judges_the_links_at_the_next_tick() {
        let ms = Duration::from_millis;
        let t =
            Timing { keepalive: ms(100), warntime: ms(300), deadtime: ms(500), initdead: ms(500) };
        let t0 = Instant::now();
        let mut d = Detector::new(t, 1, t0);
        d.heard(0, t0);
        assert!(d.tick(t0 + ms(400)).contains(&Event::LinkLate(0, ms(400))));
        // A longer deadtime: 600 ms of silence is not death any more.
        d.set_timing(Timing { deadtime: ms(2000), warntime: ms(1000), initdead: ms(2000), ..t });
        let ev = d.tick(t0 + ms(600));
        assert!(!ev.contains(&Event::PeerDead) && !ev.contains(&Event::LinkDown(0)), "{ev:?}");
        assert_eq!(d.peer(), PeerState::Alive);
        assert!(d.tick(t0 + ms(2100)).contains(&Event::PeerDead));
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn timing() -> Timing {
        Timing { keepalive: ms(200), warntime: ms(600), deadtime: ms(1000), initdead: ms(3000) }
    }

    #[test]
    fn timing_relations_are_checked_with_the_key_named() {
        assert_eq!(timing().validate(), Ok(()));
        let e = Timing { deadtime: ms(400), ..timing() }.validate().expect_err("400 ≤ 2 × 200");
        assert!(e.to_string().contains("deadtime_ms"), "{e}");
        let e = Timing { warntime: ms(1000), ..timing() }.validate().expect_err("warn = dead");
        assert!(e.to_string().contains("warntime_ms"), "{e}");
        let e = Timing { initdead: ms(500), ..timing() }.validate().expect_err("initdead");
        assert!(e.to_string().contains("initdead_ms"), "{e}");
        let e = Timing { keepalive: ms(0), ..timing() }.validate().expect_err("zero");
        assert!(e.to_string().contains("keepalive_ms"), "{e}");
    }

    #[test]
    fn the_peer_is_dead_only_when_every_link_is_down() {
        let t0 = Instant::now();
        let mut d = Detector::new(timing(), 2, t0);
        assert_eq!(d.heard(0, t0), vec![Event::LinkUp(0), Event::PeerAlive]);
        assert_eq!(d.heard(1, t0), vec![Event::LinkUp(1)]);
        // Link 0 keeps talking, link 1 falls silent.
        for k in 1..=10 {
            let now = t0 + ms(200 * k);
            d.heard(0, now);
            let ev = d.tick(now);
            match k {
                3 => assert_eq!(ev, vec![Event::LinkLate(1, ms(600))]),
                5 => assert_eq!(ev, vec![Event::LinkDown(1)]),
                _ => assert!(ev.is_empty(), "k={k}: {ev:?}"),
            }
        }
        assert_eq!(d.peer(), PeerState::Alive);
        assert_eq!(d.link(1), Some(LinkState::Down));
        // Now link 0 goes silent too: the peer dies at deadtime after its last frame.
        let last = t0 + ms(2000);
        assert!(d.tick(last + ms(999)).iter().all(|e| !matches!(e, Event::PeerDead)));
        assert_eq!(d.tick(last + ms(1000)), vec![Event::LinkDown(0), Event::PeerDead]);
        // One frame on any link brings it back.
        assert_eq!(d.heard(1, last + ms(1500)), vec![Event::LinkUp(1), Event::PeerAlive]);
    }

    #[test]
    fn a_peer_never_heard_is_dead_only_after_initdead() {
        let t0 = Instant::now();
        let mut d = Detector::new(timing(), 2, t0);
        assert!(d.tick(t0 + ms(2999)).is_empty());
        assert_eq!(d.peer(), PeerState::Unknown);
        assert_eq!(
            d.tick(t0 + ms(3000)),
            vec![Event::LinkDown(0), Event::LinkDown(1), Event::PeerDead]
        );
    }

    #[test]
    fn one_link_heard_then_lost_before_initdead_waits_for_the_other() {
        let t0 = Instant::now();
        let mut d = Detector::new(timing(), 2, t0);
        d.heard(0, t0);
        assert_eq!(d.tick(t0 + ms(1000)), vec![Event::LinkDown(0)]);
        // Link 1 is still in its initdead grace: the peer is not declared dead yet.
        assert_ne!(d.peer(), PeerState::Dead);
        assert_eq!(d.tick(t0 + ms(3000)), vec![Event::LinkDown(1), Event::PeerDead]);
    }

    #[test]
    fn flapping_link_reports_each_change_and_keeps_the_peer_alive_through_the_other() {
        let t0 = Instant::now();
        let mut d = Detector::new(timing(), 2, t0);
        let mut now = t0;
        let mut downs = 0;
        for round in 0..20u64 {
            // Link 1 steady; link 0 speaks only in even rounds of 1.2 s.
            for _ in 0..6 {
                now += ms(200);
                d.heard(1, now);
                if round % 2 == 0 {
                    d.heard(0, now);
                }
                for e in d.tick(now) {
                    if e == Event::LinkDown(0) {
                        downs += 1;
                    }
                    assert!(!matches!(e, Event::PeerDead), "peer declared dead while link 1 is up");
                }
            }
        }
        assert_eq!(downs, 10);
    }
}
