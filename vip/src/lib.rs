//! duet's virtual-IP agent: moves addresses (and optionally a MAC address) to the node that
//! becomes master, and tells the network at once.
//!
//! - [`packets`]: gratuitous ARP (request and reply forms), ARP probes, and IPv6 unsolicited
//!   neighbour advertisements, as Ethernet frames (pure), plus the parser for ARP replies.
//! - [`schedule`]: when announcements go out: a burst, a second burst later, optional periodic
//!   refresh (pure, time passed in).
//! - [`agent`]: netlink (address add/delete, MAC set/restore, link lookup) and AF_PACKET sends.
//! - [`group`]: a node's VIPs as one group (acquire all with announcements and a probe,
//!   release all), reporting through a callback.
//!
//! Acquire and release are idempotent: an address already present is not an error on acquire,
//! an address already gone is not an error on release.

pub mod agent;
pub mod group;
pub mod packets;
pub mod schedule;
