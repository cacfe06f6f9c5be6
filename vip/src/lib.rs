//! duet's virtual-IP agent: moves addresses (and optionally MAC addresses) between the two nodes
//! through netlink and announces them with gratuitous ARP / unsolicited neighbour advertisements.
//!
//! Not built yet: it arrives with the VIP and network-lab issue. The crate exists now so the
//! workspace has its final shape.
