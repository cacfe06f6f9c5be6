//! duet integration tests: real daemons, real NBD clients, real files. One binary, one module per
//! scenario family.

// Test code: a panic is the failure report, and sizes here are small constants. This crate is
// all tests (`tests_outside_test_module` is for tests among library code).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, clippy::tests_outside_test_module)]

mod cli;
mod clients;
mod connection_test;
mod disk_failure;
mod engine;
mod failover;
mod heartbeat_state;
mod hostile;
mod lab;
mod link_security;
mod local;
mod nbd_limits;
mod nbd_tls;
mod packaging;
mod peer_hostile;
mod replication;
mod scheduled_sync;
mod shutdown;
mod systemd_notify;
mod web;
mod writer;
