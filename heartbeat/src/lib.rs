//! duet's heartbeat: frames and their authentication, UDP and RS-232 serial transports, and the
//! failure detector that decides when the peer is dead.
//!
//! Not built yet: it arrives with the heartbeat and cluster-manager issue. The crate exists now so
//! the workspace has its final shape and the daemon's wiring has a place to grow into.
