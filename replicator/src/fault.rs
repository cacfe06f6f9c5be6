//! Faults made on purpose, for the tests that show what the daemon does with a broken
//! invariant. Only with the `fault-injection` feature (the integration tests' build); without
//! it every check is empty and the environment is never read.
//!
//! - `DUET_FAULT_PANIC_WRITE_AT=OFFSET`: a client write at exactly `OFFSET` panics in the data
//!   task that serves it.
//! - `DUET_FAULT_HOLD_HA=PATH`: while `PATH` exists (30 s at most), the cluster manager's tick
//!   blocks its thread: a wedged thread, for the systemd watchdog's test.

#[cfg(feature = "fault-injection")]
fn panic_write_at() -> Option<u64> {
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *AT.get_or_init(|| std::env::var("DUET_FAULT_PANIC_WRITE_AT").ok().and_then(|v| v.parse().ok()))
}

/// Says at start which faults are armed (so a test knows its binary has them).
#[cfg(feature = "fault-injection")]
pub fn announce() {
    if let Some(at) = panic_write_at() {
        tracing::warn!("fault injection armed: a client write at offset {at} panics");
    }
}

/// Says at start which faults are armed: none without the feature.
#[cfg(not(feature = "fault-injection"))]
pub fn announce() {}

/// Called by the Primary's write path with each client write's offset.
#[cfg(feature = "fault-injection")]
pub fn write(offset: u64) {
    if panic_write_at() == Some(offset) {
        panic!("fault injection: a client write at offset {offset} (DUET_FAULT_PANIC_WRITE_AT)");
    }
}

/// Called by the Primary's write path with each client write's offset.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn write(_offset: u64) {}

/// Called by the cluster manager's tick: blocks the thread while `DUET_FAULT_HOLD_HA`'s path
/// exists (bounded: 600 naps of 50 ms).
#[cfg(feature = "fault-injection")]
pub fn hold_ha() {
    static PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let Some(p) = PATH.get_or_init(|| std::env::var_os("DUET_FAULT_HOLD_HA").map(Into::into))
    else {
        return;
    };
    for _ in 0..600 {
        if !p.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Called by the cluster manager's tick: nothing without the feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hold_ha() {}
