//! Replication between the two nodes of a pair.
//!
//! Pure parts (no sockets, no clock, no files): [`wire`] (frame codec), [`handshake`] (messages,
//! authentication, compatibility checks), [`bitmap`], [`actlog`] (activity log),
//! [`completion`] (protocol A/B/C completion rules), [`policy`] (connect-time plan: generations,
//! disk states, split-brain policies), [`translog`] (what the peer acknowledged but has not made
//! durable). Drivers: [`meta`] (metadata on disk), [`volume`] (the
//! replicated volume: write path, roles, resync and verify bookkeeping) and [`link`] (the TCP
//! peer connection).

pub mod actlog;
pub mod bitmap;
pub mod completion;
pub mod handshake;
pub mod link;
pub mod liveness;
pub mod locks;
pub mod meta;
pub mod policy;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod sim;
pub mod throttle;
pub mod translog;
pub mod tx;
pub mod volume;
pub mod wire;
