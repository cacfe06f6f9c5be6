//! The systemd notify protocol (`Type=notify`, through the `sd-notify` crate): `READY=1` once
//! the daemon serves (control socket bound, the exports that should be open open), `STATUS=`
//! with what it does, `STOPPING=1` on the way out, and `WATCHDOG=1` from the thread that must
//! not wedge: the cluster manager's in a pair, the main runtime's alone. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends `states`; a failure is logged once (systemd would then restart or time us out, and
/// says so itself).
fn send(states: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(false, states)
        && !WARNED.swap(true, Relaxed)
    {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Whether systemd listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The daemon serves.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What the daemon does now (`systemctl status` shows it).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The daemon re-reads its configuration (SIGHUP); [`ready`] follows when it is done.
pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading the configuration")]);
}

/// The daemon stops.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1` at half the interval systemd asked for (`WATCHDOG_USEC`), as
/// sd_watchdog_enabled(3) advises, from whoever calls [`Watchdog::tick`].
#[derive(Debug)]
pub struct Watchdog {
    every: Duration,
    last: Option<Instant>,
}

impl Watchdog {
    /// The watchdog systemd asked this process for, if any: `WATCHDOG_USEC`, and
    /// `WATCHDOG_PID` when set must be ours (as libsystemd's sd_watchdog_enabled(3) reads them;
    /// the crate's helper also insists on the PID being set).
    pub fn from_env() -> Option<Self> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.trim().parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        (usec > 0).then(|| Self { every: Duration::from_micros(usec / 2), last: None })
    }

    /// How often it pets.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Pets the watchdog if it is due at `now`.
    pub fn tick(&mut self, now: Instant) {
        if self.last.is_none_or(|t| now.duration_since(t) >= self.every) {
            send(&[NotifyState::Watchdog]);
            self.last = Some(now);
        }
    }
}
