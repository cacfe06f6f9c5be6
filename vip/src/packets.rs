//! Announcement frames, built byte by byte (pure).
//!
//! - Gratuitous ARP, request form: `who-has VIP tell VIP` from our MAC, to broadcast. Linux and
//!   most switches update an existing neighbour entry from it; some devices only listen to the
//!   reply form, so both can be sent.
//! - ARP probe (RFC 5227): sender IP 0.0.0.0, target the VIP: anyone who answers holds it.
//! - Unsolicited neighbour advertisement (RFC 4861 §7.2.6): from the VIP to all-nodes
//!   (ff02::1), hop limit 255, Override set, with the target link-layer address option.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

/// The broadcast MAC.
pub const BROADCAST: Mac = [0xff; 6];
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    Request = 1,
    Reply = 2,
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16, o: &mut Vec<u8>) {
    o.extend_from_slice(&dst);
    o.extend_from_slice(&src);
    o.extend_from_slice(&ethertype.to_be_bytes());
}

fn arp(op: ArpOp, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr, o: &mut Vec<u8>) {
    o.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    o.extend_from_slice(&(op as u16).to_be_bytes());
    o.extend_from_slice(&sha);
    o.extend_from_slice(&spa.octets());
    o.extend_from_slice(&tha);
    o.extend_from_slice(&tpa.octets());
}

/// A gratuitous ARP for `ip` at `mac` (42 bytes; the NIC pads to 60).
pub fn gratuitous_arp(op: ArpOp, mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let mut o = Vec::with_capacity(42);
    ethernet(BROADCAST, mac, ETH_P_ARP, &mut o);
    let tha = if op == ArpOp::Reply { BROADCAST } else { [0; 6] };
    arp(op, mac, ip, tha, ip, &mut o);
    o
}

/// An ARP probe for `ip` (who holds it?).
pub fn arp_probe(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let mut o = Vec::with_capacity(42);
    ethernet(BROADCAST, mac, ETH_P_ARP, &mut o);
    arp(ArpOp::Request, mac, Ipv4Addr::UNSPECIFIED, [0; 6], ip, &mut o);
    o
}

/// From an Ethernet frame: the sender of an ARP reply (or request) claiming `ip`, if it is one.
pub fn arp_claim(frame: &[u8], ip: Ipv4Addr) -> Option<Mac> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = &frame[14..];
    if a[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    (spa == ip).then(|| a[8..14].try_into().expect("6 bytes"))
}

/// The 16-bit one's complement sum used by IPv6/ICMPv6 checksums.
fn ones_complement(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

/// The multicast MAC of an IPv6 multicast address (33:33 + its last 32 bits).
pub fn multicast_mac(ip: Ipv6Addr) -> Mac {
    let o = ip.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// An unsolicited neighbour advertisement of `ip` at `mac`, to all nodes.
pub fn unsolicited_na(mac: Mac, ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    // ICMPv6: type 136, code 0, checksum, flags (Override), reserved, target, option 2 (TLLA).
    let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let len = u16::try_from(icmp.len()).expect("32 bytes");
    // Pseudo-header: source, destination, upper-layer length, next header.
    let mut sum = ones_complement(0, &ip.octets());
    sum = ones_complement(sum, &all_nodes.octets());
    sum += u32::from(len) + 58;
    sum = ones_complement(sum, &icmp);
    let c = fold(sum).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    let mut o = Vec::with_capacity(14 + 40 + icmp.len());
    ethernet(multicast_mac(all_nodes), mac, ETH_P_IPV6, &mut o);
    o.extend_from_slice(&[0x60, 0, 0, 0]);
    o.extend_from_slice(&len.to_be_bytes());
    o.extend_from_slice(&[58, 255]);
    o.extend_from_slice(&ip.octets());
    o.extend_from_slice(&all_nodes.octets());
    o.extend_from_slice(&icmp);
    o
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: Mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    #[test]
    fn gratuitous_arp_request_layout() {
        let f = gratuitous_arp(ArpOp::Request, MAC, Ipv4Addr::new(192, 0, 2, 100));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &[192, 0, 2, 100], "sender IP = VIP");
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[192, 0, 2, 100], "target IP = VIP");
        let r = gratuitous_arp(ArpOp::Reply, MAC, Ipv4Addr::new(192, 0, 2, 100));
        assert_eq!(&r[20..22], &[0, 2], "reply");
        assert_eq!(&r[32..38], &BROADCAST);
        assert_eq!(arp_claim(&r, Ipv4Addr::new(192, 0, 2, 100)), Some(MAC));
        assert_eq!(arp_claim(&r, Ipv4Addr::new(192, 0, 2, 101)), None);
    }

    #[test]
    fn an_arp_probe_claims_nothing() {
        let p = arp_probe(MAC, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(&p[28..32], &[0, 0, 0, 0]);
        assert_eq!(arp_claim(&p, Ipv4Addr::new(10, 0, 0, 1)), None);
    }

    #[test]
    fn unsolicited_na_checksum_verifies() {
        let ip: Ipv6Addr = "2001:db8::100".parse().expect("ip");
        let f = unsolicited_na(MAC, ip);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip6 = &f[14..54];
        assert_eq!(ip6[7], 255, "hop limit");
        assert_eq!(ip6[6], 58, "ICMPv6");
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4] & 0x20, 0x20, "override");
        assert_eq!(&icmp[8..24], &ip.octets());
        assert_eq!(&icmp[24..26], &[2, 1]);
        assert_eq!(&icmp[26..32], &MAC);
        // Summing everything, checksum included, gives 0xffff.
        let mut sum = ones_complement(0, &ip6[8..40]);
        sum += u32::try_from(icmp.len()).expect("small") + 58;
        sum = ones_complement(sum, icmp);
        assert_eq!(fold(sum), 0);
    }

    #[test]
    fn macs_parse_and_print() {
        assert_eq!(parse_mac("02:11:22:33:44:55"), Some(MAC));
        assert_eq!(mac_string(&MAC), "02:11:22:33:44:55");
        for bad in
            ["", "02:11:22:33:44", "02:11:22:33:44:5g", "021:1:22:33:44:55", "02-11-22-33-44-55"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn arp_claim_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = arp_claim(&b, Ipv4Addr::new(1, 2, 3, 4));
        }
    }
}
