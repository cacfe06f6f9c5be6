//! The NBD server: a pure codec ([`proto`]), the option negotiation ([`negotiate`]), request
//! validation ([`request`]), and the thin connection driver over tokio ([`server`]).

pub mod negotiate;
pub mod proto;
pub mod request;
pub mod server;
pub mod tls;
