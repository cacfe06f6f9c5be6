//! Health check hysteresis (pure): a check turns unhealthy after `fall` failures in a row and
//! healthy again after `rise` successes in a row, so one lost ping does not move the master.

/// One check's state.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    fall: u32,
    rise: u32,
    healthy: bool,
    streak: u32,
}

impl Hysteresis {
    /// Starts healthy (a node is not punished before its first probe).
    pub fn new(fall: u32, rise: u32) -> Self {
        Self { fall: fall.max(1), rise: rise.max(1), healthy: true, streak: 0 }
    }

    /// Records one probe; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let need = if self.healthy { self.fall } else { self.rise };
        if self.streak >= need {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise_need_streaks() {
        let mut h = Hysteresis::new(3, 2);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success resets the failure streak");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.healthy());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None, "a failure resets the success streak");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.healthy());
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let mut h = Hysteresis::new(0, 0);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(true), Some(true));
    }
}
