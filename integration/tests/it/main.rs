//! duet integration tests: real daemons, real NBD clients, real files. One binary, one module per
//! scenario family.

// Test code: a panic is the failure report, and sizes here are small constants.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod cli;
mod clients;
mod engine;
mod failover;
mod hostile;
mod lab;
mod peer_hostile;
mod replication;
mod shutdown;
mod writer;
