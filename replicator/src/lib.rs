//! duet's block replication engine.
//!
//! What is here today:
//! - [`nbd`]: the NBD server — a pure wire codec ([`nbd::proto`]), the fixed-newstyle option
//!   negotiation as a state machine ([`nbd::negotiate`]), request validation
//!   ([`nbd::request`]), and the tokio connection driver ([`nbd::server`]);
//! - [`store`]: the local backing store (file or block device) behind an I/O-engine trait, with
//!   an io_uring engine and a portable thread-pool engine;
//! - [`ratelimit`]: rate limiting for log lines that clients can trigger;
//! - [`repl`]: replication between the two nodes: the peer frame codec, handshake, bitmap,
//!   activity log, completion rules and connect policies (pure), and the drivers for metadata,
//!   the replicated volume and the peer link;
//! - re-exported from the pure core (the `engine` crate): [`generation`] (generation UUIDs and
//!   DRBD's connect-time rule table), [`ratectl`] (the resync rate controller), [`superblock`]
//!   (the metadata superblock codec).

pub use engine::{generation, ratectl, superblock};
pub mod fault;
pub mod nbd;
pub mod ratelimit;
pub mod repl;
pub mod shutdown;
pub mod store;
