//! Shared helpers of the unit tests.

use std::time::Instant;

/// The origin of a test's virtual time: the one clock read a test makes (the core itself never
/// reads one; every instant after this is the origin plus a duration the test chose).
#[allow(clippy::disallowed_methods)]
pub fn origin() -> Instant {
    Instant::now()
}
