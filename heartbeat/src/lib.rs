//! duet's heartbeat: frames and their authentication, the UDP and RS-232 serial transports, and
//! the failure detector that decides when the peer is dead.
//!
//! - [`frame`]: the frame codec (pure): identity, boot generation and sequence, the node's
//!   replication state, health, an optional control message, and an HMAC-SHA256.
//! - [`replay`]: the anti-replay window (pure).
//! - [`receiver`]: decode → authenticate → replay check, with drop counters (pure).
//! - [`detector`]: per-link up/warn/down and peer alive/dead from `now` (pure).
//! - [`serial`]: byte-stream framing with a resync marker (pure) and the termios device (I/O).
//! - [`udp`]: one socket per link (I/O).
//!
//! It does not decide anything about roles: the cluster manager in `duet` does, from the
//! detector's events and the peer's advertised state.

pub mod detector;
pub mod frame;
pub mod receiver;
pub mod replay;
pub mod serial;
pub mod udp;
