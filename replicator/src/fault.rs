//! Faults made on purpose, for the tests that show what the daemon does with a broken
//! invariant. Only with the `fault-injection` feature (the integration tests' build); without
//! it every check is empty and the environment is never read.
//!
//! - `DUET_FAULT_PANIC_WRITE_AT=OFFSET`: a client write at exactly `OFFSET` panics in the data
//!   task that serves it.

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
