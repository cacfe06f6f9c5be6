//! When announcements go out (pure): `count` frames `interval` apart at acquire, the same burst
//! again `repeat_after` later (0: none), then one every `refresh` (0: never).

use std::time::{Duration, Instant};

/// Announcement settings of one VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub count: u32,
    pub interval: Duration,
    pub repeat_after: Duration,
    pub refresh: Duration,
}

/// Tracks one VIP's announcements since it was acquired.
#[derive(Debug, Clone)]
pub struct Schedule {
    plan: Plan,
    start: Instant,
    sent: u32,
    last: Option<Instant>,
}

impl Schedule {
    pub fn new(plan: Plan, start: Instant) -> Self {
        Self { plan, start, sent: 0, last: None }
    }

    /// When the next announcement is due (None: no more, ever).
    pub fn next(&self) -> Option<Instant> {
        let p = self.plan;
        let count = p.count.max(1);
        let burst = |k: u32, base: Instant| base + p.interval * k;
        if self.sent < count {
            return Some(burst(self.sent, self.start));
        }
        if !p.repeat_after.is_zero() && self.sent < 2 * count {
            return Some(burst(self.sent - count, self.start + p.repeat_after));
        }
        if !p.refresh.is_zero() {
            return self.last.map(|l| l + p.refresh);
        }
        None
    }

    /// Records that the announcement due at or before `now` was sent.
    pub fn sent(&mut self, now: Instant) {
        self.sent = self.sent.saturating_add(1);
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn run(plan: Plan, until: Duration) -> Vec<u64> {
        let t0 = Instant::now();
        let mut s = Schedule::new(plan, t0);
        let mut out = Vec::new();
        while let Some(t) = s.next() {
            if t > t0 + until {
                break;
            }
            out.push(u64::try_from(t.duration_since(t0).as_millis()).expect("small"));
            s.sent(t);
        }
        out
    }

    #[test]
    fn a_burst_then_a_second_burst() {
        let p = Plan { count: 3, interval: ms(200), repeat_after: ms(5000), refresh: ms(0) };
        assert_eq!(run(p, ms(60_000)), vec![0, 200, 400, 5000, 5200, 5400]);
    }

    #[test]
    fn refresh_continues_after_the_bursts() {
        let p = Plan { count: 2, interval: ms(100), repeat_after: ms(0), refresh: ms(1000) };
        assert_eq!(run(p, ms(3200)), vec![0, 100, 1100, 2100, 3100]);
    }

    #[test]
    fn zero_count_still_announces_once() {
        let p = Plan { count: 0, interval: ms(100), repeat_after: ms(0), refresh: ms(0) };
        assert_eq!(run(p, ms(10_000)), vec![0]);
    }
}
