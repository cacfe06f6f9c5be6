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
//! What is not here yet: the peer protocol, metadata (generation UUIDs, bitmap, activity log),
//! resync and verify. They arrive with the replication issue; the pure/driver split above is the
//! shape they follow.

pub mod generation;
pub mod nbd;
pub mod ratectl;
pub mod ratelimit;
pub mod store;
