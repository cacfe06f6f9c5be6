//! A log-line rate limiter for lines a client or peer can trigger at will: [`RateLimit`] (pure:
//! the caller passes `now`), [`Limited`] (shared between tasks, reads the clock), and
//! [`warn_limited!`](crate::warn_limited), the one way such a line is logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Logs a warning that a client or a peer can trigger, through a [`Limited`]: at most its burst
/// per period, each line with the number suppressed before it (`suppressed`). Fields and the
/// message follow as in `tracing::warn!`.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            ::tracing::warn!(suppressed, $($arg)+)
        }
    };
}

/// A [`RateLimit`] shared between tasks, on the wall clock.
#[derive(Debug)]
pub struct Limited(Mutex<RateLimit>);

impl Limited {
    /// `burst` lines per `period`.
    pub fn new(burst: u32, period: Duration) -> Self {
        Self(Mutex::new(RateLimit::new(burst, period)))
    }

    /// `Some(n)` if a line may be logged now (`n` suppressed before it); `None` if not.
    pub fn allow(&self) -> Option<u64> {
        self.0.lock().ok()?.allow(Instant::now())
    }
}

/// Allows `burst` lines per `period`; counts what it suppressed.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    burst: u32,
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` lines per `period`.
    pub fn new(burst: u32, period: Duration) -> Self {
        Self { period, burst, window_start: None, used: 0, suppressed: 0 }
    }

    /// `Some(n)` if a line may be logged now, where `n` lines were suppressed before it;
    /// `None` if this one is suppressed.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self.window_start.is_none_or(|s| now.duration_since(s) >= self.period);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(2, Duration::from_secs(1));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), None);
        assert_eq!(r.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), Some(0));
    }
}
