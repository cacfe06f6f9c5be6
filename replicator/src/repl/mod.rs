//! Replication between the two nodes of a pair.
//!
//! Pure parts, re-exported from the `engine` crate (no sockets, no clock, no files): [`wire`] (frame codec), [`handshake`] (messages,
//! authentication, compatibility checks), [`bitmap`], [`actlog`] (activity log),
//! [`completion`] (protocol A/B/C completion rules), [`policy`] (connect-time plan: generations,
//! disk states, split-brain policies), [`translog`] (what the peer acknowledged but has not made
//! durable). Drivers: [`meta`] (metadata on disk), [`volume`] (the
//! replicated volume: write path, roles, resync and verify bookkeeping) and [`link`] (the TCP
//! peer connection).

pub use engine::{actlog, bitmap, completion, handshake, liveness, policy, seal, translog, wire};
pub mod link;
pub mod locks;
pub mod meta;
pub mod throttle;
pub mod tx;
pub mod volume;
