//! The cap on replication traffic (`replication_rate_limit_kib`): a token bucket over the bytes
//! written to the peer link. Pure: the writer asks how long to wait before sending `n` bytes at
//! `now`, and sleeps that long. Debt is allowed (a frame is never split), so the average holds
//! exactly and a single large frame waits for its share.

use std::time::{Duration, Instant};

/// The bucket.
#[derive(Debug, Clone)]
pub struct Throttle {
    rate: u64,
    burst: i128,
    tokens: i128,
    last: Option<Instant>,
}

impl Throttle {
    /// A cap of `kib_per_s`; `None` when the cap is off (0).
    pub fn new(kib_per_s: u64) -> Option<Self> {
        if kib_per_s == 0 {
            return None;
        }
        let rate = kib_per_s.saturating_mul(1024);
        // A tenth of a second of traffic may go at once.
        let burst = i128::from((rate / 10).max(64 * 1024));
        Some(Self { rate, burst, tokens: burst, last: None })
    }

    /// Takes `bytes` and returns how long to wait before sending them.
    pub fn delay(&mut self, now: Instant, bytes: u64) -> Duration {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_nanos();
            let add =
                i128::try_from(dt * u128::from(self.rate) / 1_000_000_000).unwrap_or(i128::MAX);
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= i128::from(bytes);
        if self.tokens >= 0 {
            return Duration::ZERO;
        }
        let nanos = (-self.tokens).unsigned_abs() * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that sleeps as told, on a simulated clock.
    fn run(kib: u64, sizes: impl Iterator<Item = u64>, secs: u64) -> f64 {
        let mut t = Throttle::new(kib).unwrap();
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        for n in sizes {
            // The frame goes out once its wait is over.
            now += t.delay(now, n);
            sent += n;
            if now.duration_since(start) >= Duration::from_secs(secs) {
                break;
            }
        }
        sent as f64 / now.duration_since(start).as_secs_f64() / 1024.0
    }

    #[test]
    fn holds_the_rate_within_5_percent() {
        for kib in [512, 20480, 102400] {
            let mut x = 12345u64;
            let sizes = std::iter::from_fn(move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                Some(32 + x % (1 << 20))
            });
            let got = run(kib, sizes, 60);
            assert!((got / kib as f64 - 1.0).abs() < 0.05, "{kib} KiB/s: got {got:.0}");
        }
    }

    #[test]
    fn burst_then_waits_and_off_means_off() {
        assert!(Throttle::new(0).is_none());
        let mut t = Throttle::new(1024).unwrap(); // 1 MiB/s, burst 104857 bytes
        let now = Instant::now();
        assert_eq!(t.delay(now, 100_000), Duration::ZERO);
        // The next 1 MiB must wait about a second (debt).
        let d = t.delay(now, 1 << 20);
        assert!(d > Duration::from_millis(950) && d < Duration::from_millis(1050), "{d:?}");
        // Idle time refills only up to the burst.
        let later = now + Duration::from_secs(60);
        let d = t.delay(later, 1);
        assert_eq!(d, Duration::ZERO);
    }
}
