//! The duet node: configuration, daemon wiring, control socket, status, and (with later issues)
//! the cluster manager. The `duet` binary is a thin CLI over this library.
//!
//! - [`config`]: the TOML contract, parsed and validated with errors that name the key;
//! - [`control`]: the versioned JSON-lines protocol between CLI and daemon;
//! - [`daemon`]: opens stores, serves NBD, the control socket and metrics, stops gracefully;
//! - [`status`]: the `duet status` model and its text form;
//! - [`plan`]: `duet check-config`'s description of what each node will do.

pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod ha;
pub mod md;
pub mod plan;
pub mod status;
