//! duet's block replication engine.
//!
//! What is here today:
//! - [`nbd`]: the NBD server — a pure wire codec ([`nbd::proto`]), the fixed-newstyle option
//!   negotiation as a state machine ([`nbd::negotiate`]), request validation
//!   ([`nbd::request`]), and the tokio connection driver ([`nbd::server`]);
//! - [`store`]: the local backing store (file or block device) behind an I/O-engine trait, with
//!   an io_uring engine and a portable thread-pool engine;
//! - [`ratelimit`]: rate limiting for log lines that clients can trigger.
//!
//! Pure groundwork for replication, tested but not wired into the daemon yet:
//! - [`generation`]: generation UUIDs and DRBD's connect-time rule table (`compare`);
//! - [`ratectl`]: the resync rate controller (fixed, or dynamic with plan-ahead);
//! - [`superblock`]: the metadata superblock codec (two alternating checksummed copies).
//!
//! What is not here yet: the peer protocol, metadata placement, the bitmap and activity log,
//! resync and verify. They arrive with the replication issue; the pure/driver split above is the
//! shape they follow.

pub mod generation;
pub mod nbd;
pub mod ratectl;
pub mod ratelimit;
pub mod repl;
pub mod store;
pub mod superblock;
