//! The node's event log (failover, heartbeat): what `duet status` and `duet log` show.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub what: String,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The node's event log (failover, heartbeat); bounded.
#[derive(Debug, Default)]
pub struct EventLog {
    entries: Mutex<VecDeque<LogEntry>>,
}

impl EventLog {
    pub fn push(&self, what: String) {
        let mut e = self.entries.lock().expect("event log poisoned");
        e.push_back(LogEntry { at: unix_now(), what });
        if e.len() > 2000 {
            e.pop_front();
        }
    }
    pub fn since(&self, at: f64) -> Vec<LogEntry> {
        let e = self.entries.lock().expect("event log poisoned");
        e.iter().filter(|x| x.at > at).cloned().collect()
    }
}
