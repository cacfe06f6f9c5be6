//! The duet node: configuration, the cluster manager and the HA runtime around it, daemon
//! wiring, control socket, status. The `duet` binary is a thin CLI over this library.
//!
//! - [`config`]: the TOML contract, parsed and validated with errors that name the key, and
//!   its mapping to the runtime's settings ([`config::runtime`]);
//! - [`cluster`]: the cluster manager (pure: inputs and `now` in, actions out), with a
//!   simulated pair;
//! - [`ha`]: the HA runtime that drives it: heartbeat links, steps, health probes, VIPs;
//! - [`daemon`]: opens stores, serves NBD, the control socket and metrics, stops gracefully;
//! - [`control`]: the versioned JSON-lines protocol between CLI and daemon, and its client;
//! - [`status`]: the `duet status` model and its text form; [`events`]: the event log;
//! - [`md`]: `create-md` and `dump-md`; [`plan`]: `duet check-config`'s description of what
//!   each node will do.

pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
pub mod ha;
pub mod md;
pub mod plan;
pub mod status;

/// An error with its sources, `outer: inner: …` (for messages that leave as one string: a
/// control reply, an event line).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
