//! The peer link's timer: is the peer still answering? Pure: times in, a verdict out.
//!
//! Two rules, as DRBD's `ping-timeout` and `timeout`: a ping must be answered (by any frame)
//! within `ping_timeout`, and no replicated request may stay unanswered longer than `timeout`.
//!
//! One exception: a tick that comes late means this node's own thread was held (a slow local
//! write, a stopped process), and what the peer sent meanwhile may still be unread. Blaming the
//! peer for that would drop a healthy link, so that tick gives no verdict; the reader runs
//! first. Only one tick in a row is excused, so a node that keeps stalling still judges.

use std::time::{Duration, Instant};

/// How often the link's timer ticks.
pub const TICK: Duration = Duration::from_millis(50);
/// A tick this late means our own thread was held.
pub const STALL: Duration = Duration::from_millis(200);

/// What a tick decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// No frame since the ping sent at least `ping_timeout` ago.
    NoPong,
    /// A request has waited longer than `timeout`.
    Unanswered,
}

/// The timer's memory between ticks.
#[derive(Debug, Default)]
pub struct Liveness {
    last_tick: Option<Instant>,
    excused: bool,
}

impl Liveness {
    /// One tick at `now`. `ping_out`: when the unanswered ping left (cleared by any frame);
    /// `oldest`: when the oldest unanswered request left.
    pub fn tick(
        &mut self,
        now: Instant,
        ping_out: Option<Instant>,
        oldest: Option<Instant>,
        ping_timeout: Duration,
        timeout: Duration,
    ) -> Verdict {
        let late = self.last_tick.is_some_and(|t| now.saturating_duration_since(t) > STALL);
        self.last_tick = Some(now);
        if late && !self.excused {
            self.excused = true;
            return Verdict::Alive;
        }
        self.excused = false;
        let over =
            |t: Option<Instant>, limit| t.is_some_and(|t| now.saturating_duration_since(t) > limit);
        if over(ping_out, ping_timeout) {
            Verdict::NoPong
        } else if over(oldest, timeout) {
            Verdict::Unanswered
        } else {
            Verdict::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT: Duration = Duration::from_millis(500);
    const T: Duration = Duration::from_secs(6);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_ping_answered_in_time_or_none_out_is_alive() {
        let t0 = crate::testutil::origin();
        let mut l = Liveness::default();
        for i in 0..40 {
            assert_eq!(l.tick(ms(t0, i * 50), None, None, PT, T), Verdict::Alive);
        }
        let mut l = Liveness::default();
        assert_eq!(l.tick(ms(t0, 500), Some(t0), None, PT, T), Verdict::Alive, "exactly the limit");
    }

    #[test]
    fn an_unanswered_ping_on_regular_ticks_is_no_pong() {
        let t0 = crate::testutil::origin();
        let mut l = Liveness::default();
        let mut verdicts = Vec::new();
        for i in 0..=12 {
            verdicts.push(l.tick(ms(t0, i * 50), Some(t0), None, PT, T));
        }
        assert!(verdicts[..=10].iter().all(|v| *v == Verdict::Alive), "{verdicts:?}");
        assert_eq!(verdicts[11], Verdict::NoPong);
    }

    #[test]
    fn a_request_unanswered_past_the_timeout_is_reported() {
        let t0 = crate::testutil::origin();
        let mut l = Liveness::default();
        assert_eq!(l.tick(ms(t0, 5950), None, Some(t0), PT, T), Verdict::Alive);
        assert_eq!(l.tick(ms(t0, 6000), None, Some(t0), PT, T), Verdict::Alive);
        assert_eq!(l.tick(ms(t0, 6050), None, Some(t0), PT, T), Verdict::Unanswered);
        // A missing pong is reported first: it is the older fault.
        assert_eq!(l.tick(ms(t0, 6100), Some(t0), Some(t0), PT, T), Verdict::NoPong);
    }

    #[test]
    fn a_late_tick_is_excused_once_then_judged() {
        let t0 = crate::testutil::origin();
        let mut l = Liveness::default();
        assert_eq!(l.tick(t0, Some(t0), None, PT, T), Verdict::Alive);
        // Our thread was held for 900 ms: the pong may be unread. No verdict on this tick...
        assert_eq!(l.tick(ms(t0, 900), Some(t0), None, PT, T), Verdict::Alive);
        // ...the next one, on time, judges (the reader ran in between and found nothing).
        assert_eq!(l.tick(ms(t0, 950), Some(t0), None, PT, T), Verdict::NoPong);
    }

    #[test]
    fn a_node_that_keeps_stalling_still_judges_every_other_tick() {
        let t0 = crate::testutil::origin();
        let mut l = Liveness::default();
        let mut got = Vec::new();
        for i in 0..6 {
            got.push(l.tick(ms(t0, 1000 * i), Some(t0), None, PT, T));
        }
        assert_eq!(got[0], Verdict::Alive, "the first tick has no predecessor");
        assert_eq!(got[1], Verdict::Alive, "late: excused");
        assert_eq!(got[2], Verdict::NoPong, "late again: not excused twice");
        assert_eq!(got[3], Verdict::Alive);
        assert_eq!(got[4], Verdict::NoPong);
    }

    #[test]
    fn clock_values_before_the_ping_do_not_panic() {
        let t0 = crate::testutil::origin();
        let mut l = Liveness::default();
        assert_eq!(l.tick(t0, Some(ms(t0, 10)), Some(ms(t0, 10)), PT, T), Verdict::Alive);
    }
}
