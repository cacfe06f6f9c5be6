//! The replication engine's core: everything about replication that can be decided without
//! touching a disk, a socket or a clock.
//!
//! What is here:
//! - [`replica`]: one resource's replication state and every decision on it: each input (a
//!   write, the peer's answer, a command, the session's start and end, resync frames) is a
//!   method; what must reach the disk comes back as a `Persist`. The daemon and the simulation
//!   both run it;
//! - [`state`]: role, disk and connection states and every transition between them (one
//!   exhaustive `match`), with typed refusals;
//! - [`session`]: how a session starts once the handshake agreed;
//! - [`translog`]: what the peer acknowledged and has not yet made durable (the transfer log);
//! - [`generation`]: generation UUIDs and DRBD's connect-time rule table; [`policy`]: the
//!   connect plan (disk states, split-brain policies);
//! - [`bitmap`] (out-of-sync bits), [`actlog`] (activity log), [`completion`] (when a write
//!   is answered under protocol A, B or C), [`liveness`] (ping and request timeouts),
//!   [`ratectl`] (the resync rate controller);
//! - the codecs: [`wire`] (peer frames), [`handshake`] (its messages and authentication),
//!   [`superblock`] (metadata);
//! - [`quorum`]: majority votes held as leases, and epochs of up-to-date nodes, so that three or
//!   four nodes never have two Primaries nor promote one that missed writes (not wired yet);
//! - [`sim`]: a deterministic simulation of a pair of [`replica::Replica`]s (virtual clock, disks
//!   with a volatile write cache, a link that delays, cuts and heals, seeded faults), run by the
//!   `duet-sim` binary and the test suite.
//!
//! What is not: the executor (`replicator::repl::volume` and `link`) does the I/O, holds the
//! locks and carries out what the `Replica` returns. The crate's `clippy.toml` forbids clocks, sleeps, files and
//! sockets here.

pub mod actlog;
pub mod bitmap;
pub mod completion;
pub mod generation;
pub mod handshake;
pub mod liveness;
pub mod policy;
pub mod quorum;
pub mod ratectl;
pub mod replica;
pub mod seal;
pub mod session;
pub mod sim;
pub mod state;
pub mod superblock;
#[cfg(test)]
mod testutil;
pub mod translog;
pub mod wire;
