//! The resync rate controller, in the shape of DRBD's (`shared/reference/drbd.md` §5): either a
//! fixed rate, or a dynamic controller that plans ahead and steers the amount of resync data in
//! flight towards a fill target (or towards what the link carries in a target delay), capped by a
//! maximum rate. While applications are busy the controller yields down to the minimum rate, which
//! is guaranteed.
//!
//! Pure: the caller calls [`RateController::tick`] every [`TICK`] with `now`, the resync data the
//! peer acknowledged since the last tick, and whether application I/O is busy; it answers how much
//! resync data to request now. The resync target in `replicator::repl::link` drives it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often the controller runs.
pub const TICK: Duration = Duration::from_millis(100);

/// Fixed or dynamic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Always `rate_kib` per second.
    Fixed,
    /// Plan-ahead controller.
    Dynamic,
}

/// Controller settings (the `[resource.resync]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// Fixed rate, and the dynamic controller's first guess (KiB/s).
    pub rate_kib: u64,
    /// How far ahead the dynamic controller plans.
    pub plan_ahead: Duration,
    /// KiB in flight to aim for; 0 = use `delay_target`.
    pub fill_target_kib: u64,
    /// Aim for as much in flight as the link delivers in this time.
    pub delay_target: Duration,
    /// Cap (KiB/s); 0 = none.
    pub max_rate_kib: u64,
    /// Guaranteed even while applications are busy (KiB/s).
    pub min_rate_kib: u64,
}

/// Controller state.
#[derive(Debug, Clone)]
pub struct RateController {
    s: Settings,
    plan: VecDeque<i64>,
    plan_total: i64,
    in_flight: i64,
    /// Acknowledged KiB per tick, exponentially smoothed (weight 1/4 per tick): the delay target
    /// follows this, not one tick's sample, which let a single empty tick swing the plan into a
    /// limit cycle (found by the capped-link test).
    acked_avg: i64,
    last: Option<Instant>,
}

fn per_tick(kib_per_s: u64, dt: Duration) -> i64 {
    i64::try_from(u128::from(kib_per_s) * dt.as_millis() / 1000).unwrap_or(i64::MAX)
}

impl RateController {
    /// A controller with nothing in flight.
    pub fn new(s: Settings) -> Self {
        let steps = (s.plan_ahead.as_millis() / TICK.as_millis()).max(1);
        let steps = usize::try_from(steps).unwrap_or(1);
        Self {
            s,
            plan: VecDeque::from(vec![0; steps]),
            plan_total: 0,
            in_flight: 0,
            acked_avg: 0,
            last: None,
        }
    }

    /// New settings for a running resync: what is in flight stays counted, the plan keeps its
    /// entries (resized to the new horizon), and the next tick asks at the new rate.
    pub fn adjust(&mut self, s: Settings) {
        let steps =
            usize::try_from((s.plan_ahead.as_millis() / TICK.as_millis()).max(1)).unwrap_or(1);
        self.plan.resize(steps, 0);
        self.plan_total = self.plan.iter().sum();
        self.s = s;
    }

    /// KiB requested and not yet acknowledged.
    pub fn in_flight_kib(&self) -> u64 {
        self.in_flight.max(0).unsigned_abs()
    }

    /// Gives back budget that was granted but not requested (nothing left to resync this tick).
    pub fn unused(&mut self, kib: u64) {
        let k = i64::try_from(kib).unwrap_or(i64::MAX).min(self.in_flight);
        self.in_flight -= k.max(0);
    }

    /// One controller step: `acked_kib` came back since the last call; returns the KiB of resync
    /// requests to send now.
    pub fn tick(&mut self, now: Instant, acked_kib: u64, app_busy: bool) -> u64 {
        let dt = self
            .last
            .map_or(TICK, |l| now.saturating_duration_since(l))
            .max(Duration::from_millis(1));
        self.last = Some(now);
        // More cannot come back than was asked for.
        let acked = i64::try_from(acked_kib).unwrap_or(i64::MAX).clamp(0, self.in_flight);
        self.in_flight -= acked;
        let mut req = match self.s.mode {
            Mode::Fixed => per_tick(self.s.rate_kib, dt),
            Mode::Dynamic => self.dynamic(acked, dt),
        };
        if self.s.max_rate_kib != 0 {
            req = req.min(per_tick(self.s.max_rate_kib, dt));
        }
        if app_busy {
            // Applications first: the resync yields to the guaranteed minimum, and gets that
            // minimum even when the controller's estimate of the link is lower (a link busy
            // with application writes acknowledges resync slowly, which would otherwise shrink
            // the estimate, and with it the resync, towards nothing).
            req = per_tick(self.s.min_rate_kib, dt).max(1);
        }
        let req = req.max(0);
        self.in_flight = self.in_flight.saturating_add(req);
        req.unsigned_abs()
    }

    fn dynamic(&mut self, acked: i64, dt: Duration) -> i64 {
        let steps = i64::try_from(self.plan.len()).unwrap_or(1);
        let tick_ms = i128::try_from(TICK.as_millis()).unwrap_or(100);
        let dt_ms = i128::try_from(dt.as_millis()).unwrap_or(i128::MAX).max(1);
        // Scale what came back to one tick, so a late tick does not look like a faster link.
        let acked_per_tick = i64::try_from(i128::from(acked) * tick_ms / dt_ms).unwrap_or(i64::MAX);
        self.acked_avg = self.acked_avg.saturating_add((acked_per_tick - self.acked_avg) / 4);
        let want = if self.in_flight == 0 && self.plan_total == 0 && acked == 0 {
            // Nothing known yet: plan for the configured rate over the planning horizon.
            per_tick(self.s.rate_kib, self.s.plan_ahead)
        } else if self.s.fill_target_kib != 0 {
            i64::try_from(self.s.fill_target_kib).unwrap_or(i64::MAX)
        } else {
            let ticks =
                i64::try_from(self.s.delay_target.as_millis() / TICK.as_millis()).unwrap_or(1);
            self.acked_avg.saturating_mul(ticks.max(1))
        };
        let correction = want.saturating_sub(self.in_flight).saturating_sub(self.plan_total);
        let per_step = correction / steps;
        for slot in &mut self.plan {
            *slot = slot.saturating_add(per_step);
        }
        self.plan_total = self.plan_total.saturating_add(per_step.saturating_mul(steps));
        let now_slot = self.plan.pop_front().unwrap_or(0);
        self.plan.push_back(0);
        self.plan_total = self.plan_total.saturating_sub(now_slot);
        acked_per_tick.saturating_add(now_slot)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            mode: Mode::Dynamic,
            rate_kib: 10_240,
            plan_ahead: Duration::from_millis(2000),
            fill_target_kib: 0,
            delay_target: Duration::from_millis(1000),
            max_rate_kib: 0,
            min_rate_kib: 1024,
        }
    }

    #[test]
    fn adjusted_settings_take_effect_at_the_next_tick_and_keep_what_is_in_flight() {
        // A capped dynamic controller on a fast link runs at its cap; lowering the cap mid-run
        // brings the next ticks down to the new cap, raising it again lets it climb back.
        let s = Settings { max_rate_kib: 50_000, ..settings() };
        let mut c = RateController::new(s);
        let t0 = crate::testutil::origin();
        let mut i = 0u32;
        let mut run = |c: &mut RateController, ticks: u32| {
            let mut asked = 0;
            for _ in 0..ticks {
                // A link fast enough to acknowledge everything asked by the next tick.
                let inflight = c.in_flight_kib();
                asked += c.tick(t0 + TICK * i, inflight, false);
                i += 1;
            }
            asked * 10 / u64::from(ticks)
        };
        let fast = run(&mut c, 50);
        assert!((45_000..=50_000).contains(&fast), "capped at 50000 KiB/s: {fast}");
        c.adjust(Settings { max_rate_kib: 2_000, ..s });
        let slow = run(&mut c, 50);
        assert!((1_800..=2_000).contains(&slow), "capped at 2000 KiB/s after adjust: {slow}");
        c.adjust(Settings { max_rate_kib: 50_000, plan_ahead: Duration::from_millis(500), ..s });
        assert_eq!(c.plan.len(), 5, "the plan follows the new horizon");
        let back = run(&mut c, 100);
        assert!(back > 20_000, "climbs back after the cap is raised: {back}");
        let fixed = Settings { mode: Mode::Fixed, rate_kib: 3_000, ..s };
        c.adjust(fixed);
        let f = run(&mut c, 20);
        assert!((2_900..=3_000).contains(&f), "fixed 3000 KiB/s: {f}");
    }

    /// A link that carries `kib_per_s` after `latency`: requests queue, are served at that rate,
    /// and come back as acks. Returns the rate achieved over the last half of the run (KiB/s)
    /// and the highest in-flight amount seen.
    fn simulate(
        s: Settings,
        kib_per_s: u64,
        latency_ticks: usize,
        ticks: usize,
        busy: impl Fn(usize) -> bool,
    ) -> (f64, u64) {
        let mut c = RateController::new(s);
        let t0 = crate::testutil::origin();
        let mut queue: u64 = 0;
        let mut pipe: VecDeque<u64> = VecDeque::from(vec![0; latency_ticks]);
        let mut acked = 0;
        let mut delivered_late = 0u64;
        let mut max_in_flight = 0;
        for i in 0..ticks {
            let req = c.tick(t0 + TICK * i as u32, acked, busy(i));
            queue += req;
            let served = queue.min(kib_per_s / 10);
            queue -= served;
            pipe.push_back(served);
            acked = pipe.pop_front().unwrap_or(0);
            if i >= ticks / 2 {
                delivered_late += acked;
            }
            max_in_flight = max_in_flight.max(c.in_flight_kib());
        }
        (delivered_late as f64 / ((ticks - ticks / 2) as f64 / 10.0), max_in_flight)
    }

    #[test]
    fn fixed_mode_is_exact() {
        let mut c =
            RateController::new(Settings { mode: Mode::Fixed, rate_kib: 5000, ..settings() });
        let t0 = crate::testutil::origin();
        assert_eq!(c.tick(t0, 0, false), 500);
        assert_eq!(c.tick(t0 + TICK, 0, false), 500);
        // A late tick asks for proportionally more.
        assert_eq!(c.tick(t0 + TICK * 3, 0, false), 1000);
        assert_eq!(c.in_flight_kib(), 2000);
        assert_eq!(c.tick(t0 + TICK * 4, 2000, false), 500);
        assert_eq!(c.in_flight_kib(), 500);
    }

    #[test]
    fn dynamic_finds_the_link_rate_from_a_low_guess() {
        // The first guess is 10 MiB/s; the link does 100 MiB/s with 200 ms of delay.
        let (rate, _) = simulate(settings(), 102_400, 2, 600, |_| false);
        assert!(rate > 0.9 * 102_400.0, "reached {rate:.0} KiB/s");
    }

    #[test]
    fn dynamic_does_not_flood_a_slow_link() {
        // 1 MiB/s link, first guess 100 MiB/s: in flight must settle near rate x delay target,
        // not grow without bound.
        let s = Settings { rate_kib: 102_400, ..settings() };
        let (rate, _) = simulate(s, 1024, 1, 600, |_| false);
        assert!(rate > 0.9 * 1024.0, "reached {rate:.0} KiB/s");
        let mut c = RateController::new(s);
        let t0 = crate::testutil::origin();
        let mut queue = 0u64;
        let mut acked = 0;
        for i in 0..600u32 {
            queue += c.tick(t0 + TICK * i, acked, false);
            acked = queue.min(102);
            queue -= acked;
        }
        assert!(
            c.in_flight_kib() < 4 * 1024,
            "in flight {} KiB on a 1 MiB/s link",
            c.in_flight_kib()
        );
    }

    #[test]
    fn fill_target_holds_in_flight() {
        // 50 MiB/s over 200 ms needs 10 MiB in flight: a 16 MiB target reaches the link rate...
        let s = Settings { fill_target_kib: 16_384, ..settings() };
        let (rate, max_in_flight) = simulate(s, 51_200, 2, 600, |_| false);
        assert!(rate > 0.9 * 51_200.0, "reached {rate:.0} KiB/s");
        assert!(max_in_flight < 2 * 16_384 + 20_480, "in flight peaked at {max_in_flight} KiB");
        // ...an 8 MiB target holds the link at what 8 MiB in flight carries (40 MiB/s).
        let s = Settings { fill_target_kib: 8192, ..settings() };
        let (rate, _) = simulate(s, 51_200, 2, 600, |_| false);
        assert!((0.9 * 40_960.0..=1.05 * 40_960.0).contains(&rate), "{rate:.0} KiB/s");
    }

    #[test]
    fn max_rate_caps() {
        let s = Settings { max_rate_kib: 20_480, ..settings() };
        let (rate, _) = simulate(s, 102_400, 2, 600, |_| false);
        assert!(rate <= 20_480.0 * 1.01, "{rate:.0} KiB/s over the cap");
        assert!(rate > 0.9 * 20_480.0, "{rate:.0} KiB/s");
    }

    #[test]
    fn busy_applications_get_priority_but_the_minimum_is_kept() {
        let s = Settings { min_rate_kib: 4096, ..settings() };
        let (rate, _) = simulate(s, 102_400, 2, 600, |_| true);
        assert!(rate <= 4096.0 * 1.01, "{rate:.0} KiB/s while applications are busy");
        assert!(rate > 0.9 * 4096.0, "minimum not kept: {rate:.0} KiB/s");
        // Once applications are idle again, the controller climbs back.
        let (rate, _) = simulate(s, 102_400, 2, 1200, |i| i < 300);
        assert!(rate > 0.9 * 102_400.0, "did not recover: {rate:.0} KiB/s");
    }

    #[test]
    fn never_negative_never_panics_on_odd_input() {
        let mut c = RateController::new(settings());
        let t0 = crate::testutil::origin();
        // Acks larger than anything requested, time going backwards, huge gaps.
        assert!(c.tick(t0, u64::MAX, false) < u64::MAX);
        let _ = c.tick(t0 - Duration::from_secs(5), 0, true);
        let _ = c.tick(t0 + Duration::from_secs(3600), 10, false);
        assert!(c.in_flight_kib() < u64::MAX / 2);
    }
}
