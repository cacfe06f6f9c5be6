//! The catch-up runs of `sync = "scheduled"` resources: the thin executor of
//! [`crate::schedule`]. On the Primary, each run connects the link and, once the standby is in
//! sync, disconnects it until the next run (`duet connect` starts one at once). A Secondary
//! keeps its link ready (connecting), so whichever node is Primary decides when runs happen.

use std::sync::Arc;
use std::time::Duration;

use chrono::Local;
use replicator::repl::volume::{ConnState, DiskState, Role, Volume};
use tokio::sync::watch;

use crate::schedule::Schedule;
use replicator::nbd::server::stopped;

/// Longest the scheduler sleeps between looks (a changed wall clock is noticed within it).
const LOOK: Duration = Duration::from_secs(1);

fn epoch_s(t: chrono::DateTime<Local>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Runs until `shutdown`.
pub(super) async fn run(vol: Arc<Volume>, schedule: Schedule, mut shutdown: watch::Receiver<bool>) {
    let mut changed = vol.watch();
    let mut next = schedule.next_after(&Local::now());
    // A catch-up in progress on this (Primary) node.
    let mut running = false;
    let mut last_role: Option<Role> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let s = vol.summary();
        let want = s.connection != ConnState::StandAlone;
        match s.role {
            Role::Secondary => {
                // Ready for the Primary's runs; an operator's disconnect here is kept.
                if last_role != Some(Role::Secondary) && !want && s.disk != DiskState::Diskless {
                    let _ = vol.connect(false);
                }
                running = false;
                vol.set_next_run(None);
            }
            Role::Primary => {
                let now = Local::now();
                if now >= next {
                    next = schedule.next_after(&now);
                    if !want && s.disk != DiskState::Diskless {
                        vol.event(format!("scheduled sync ({schedule}): catch-up started"));
                        let _ = vol.connect(false);
                        running = true;
                    }
                }
                if want && !running {
                    // Connected when it became Primary, or `duet connect`: a catch-up too.
                    running = true;
                }
                let in_sync = s.connection == ConnState::Connected
                    && s.disk == DiskState::UpToDate
                    && s.peer_disk == Some(DiskState::UpToDate)
                    && s.out_of_sync_bytes == 0;
                if running && in_sync {
                    running = false;
                    let _ = vol.disconnect();
                    vol.event(format!(
                        "scheduled sync: the standby is in sync; the link is idle until {}",
                        next.format("%Y-%m-%d %H:%M %Z")
                    ));
                } else if running && !want {
                    running = false; // the operator disconnected
                }
                vol.set_next_run(Some(epoch_s(next)));
            }
        }
        last_role = Some(s.role);
        tokio::select! {
            _ = stopped(&mut shutdown) => return,
            _ = changed.changed() => {}
            _ = tokio::time::sleep(LOOK) => {}
        }
    }
}
