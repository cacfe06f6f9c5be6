//! The I/O half: netlink for addresses and MACs, AF_PACKET for announcements and probes.
//!
//! A moved MAC is restored on release. The interface's own MAC is remembered in a small file in
//! the state directory (the control socket's folder), so a daemon that crashed while holding a
//! VIP still restores it after a restart.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec};

use crate::packets::{self, ArpOp, Mac};
use crate::schedule::Plan;

/// One VIP: an interface, its addresses (the VIP and aliases), an optional MAC to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSpec {
    pub interface: String,
    pub addrs: Vec<(IpAddr, u8)>,
    pub mac: Option<Mac>,
    pub plan: Plan,
}

/// Why a VIP operation failed. Each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("cannot open a netlink socket: {0}")]
    Netlink(std::io::Error),
    #[error("no network interface named {0:?} (vip.interface); check `ip link`")]
    NoSuchInterface(String),
    #[error(
        "not permitted to change {0} (duet needs CAP_NET_ADMIN and CAP_NET_RAW; run it as root)"
    )]
    Permission(String),
    #[error("{what} on {interface}: {error}")]
    Request { what: String, interface: String, error: String },
    #[error("raw socket on {0}: {1}")]
    Packet(String, std::io::Error),
    #[error("the saved MAC of {0} (in the state directory): {1}")]
    MacState(String, std::io::Error),
}

/// Where the NIC's own MAC is kept while a VIP's MAC replaces it, so a node that crashed
/// holding the VIP still gives the NIC its MAC back on release. The daemon keeps it in its state
/// directory (atomically written, never through a link); `key` names one VIP.
pub trait MacStore: Send + Sync + std::fmt::Debug {
    /// The MAC saved under `key`, if any.
    fn load(&self, key: &str) -> std::io::Result<Option<Mac>>;
    /// Saves `mac` under `key`, durably.
    fn save(&self, key: &str, mac: Mac) -> std::io::Result<()>;
    /// Forgets `key`.
    fn forget(&self, key: &str) -> std::io::Result<()>;
}

/// The store key of `v`'s saved MAC: its interface and first address (one file per VIP).
pub fn mac_key(v: &VipSpec) -> String {
    match v.addrs.first() {
        Some((ip, _)) => format!("{}-{ip}", v.interface),
        None => v.interface.clone(),
    }
}

/// The agent: one netlink connection.
#[derive(Debug, Clone)]
pub struct Agent {
    handle: Handle,
    macs: std::sync::Arc<dyn MacStore>,
}

const EEXIST: i32 = -libc::EEXIST;
/// Size of a link-layer socket address (20 bytes: always fits).
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_LL_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
const EADDRNOTAVAIL: i32 = -libc::EADDRNOTAVAIL;
const EPERM: i32 = -libc::EPERM;

fn code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code()),
        _ => None,
    }
}

impl Agent {
    /// Connects to the kernel. Must run inside a tokio runtime.
    pub fn new(macs: std::sync::Arc<dyn MacStore>) -> Result<Self, VipError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(VipError::Netlink)?;
        tokio::spawn(conn);
        Ok(Self { handle, macs })
    }

    /// Index and current MAC of `name`.
    pub async fn link(&self, name: &str) -> Result<(u32, Mac), VipError> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        let msg = match s.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return Err(VipError::NoSuchInterface(name.into())),
        };
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(v) if v.len() == 6 => v.as_slice().try_into().ok(),
                _ => None,
            })
            .unwrap_or([0; 6]);
        Ok((msg.header.index, mac))
    }

    fn err(what: &str, interface: &str, e: &rtnetlink::Error) -> VipError {
        if code(e) == Some(EPERM) {
            return VipError::Permission(interface.into());
        }
        VipError::Request { what: what.into(), interface: interface.into(), error: e.to_string() }
    }

    async fn set_mac(&self, index: u32, interface: &str, mac: Mac) -> Result<(), VipError> {
        let msg = LinkUnspec::new_with_index(index).address(mac.to_vec()).build();
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| Self::err("setting the MAC", interface, &e))
    }

    /// Makes this node hold the VIP: MAC first (if moved), then every address. Already present
    /// is fine. Returns the interface index and the MAC the addresses now answer with.
    pub async fn acquire(&self, v: &VipSpec) -> Result<(u32, Mac), VipError> {
        let (index, mut mac) = self.link(&v.interface).await?;
        if let Some(want) = v.mac
            && want != mac
        {
            // The NIC does not carry the virtual MAC, so what it carries is its own: remember
            // it (before changing it) and release restores it. A node that crashed holding the
            // VIP finds the virtual MAC in place and keeps what it saved then.
            self.macs
                .save(&mac_key(v), mac)
                .map_err(|e| VipError::MacState(v.interface.clone(), e))?;
            self.set_mac(index, &v.interface, want).await?;
            mac = want;
        }
        for &(ip, prefix) in &v.addrs {
            let mut req = self.handle.address().add(index, ip, prefix);
            if ip.is_ipv6() {
                // Announce at once: duplicate address detection would hold the address
                // tentative (unusable) for a second or more during a takeover.
                req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            match req.execute().await {
                Ok(()) => {}
                Err(e) if code(&e) == Some(EEXIST) => {}
                Err(e) => {
                    return Err(Self::err(&format!("adding {ip}/{prefix}"), &v.interface, &e));
                }
            }
        }
        Ok((index, mac))
    }

    /// The addresses of `v` present on its interface now.
    pub async fn present(&self, v: &VipSpec) -> Result<Vec<AddressMessage>, VipError> {
        let (index, _) = self.link(&v.interface).await?;
        let mut s = self.handle.address().get().set_link_index_filter(index).execute();
        let mut found = Vec::new();
        while let Some(m) =
            s.try_next().await.map_err(|e| Self::err("listing addresses", &v.interface, &e))?
        {
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if v.addrs.iter().any(|(ip, p)| Some(*ip) == addr && *p == m.header.prefix_len) {
                found.push(m);
            }
        }
        Ok(found)
    }

    /// Whether this node holds any of `v`'s addresses.
    pub async fn holds(&self, v: &VipSpec) -> Result<bool, VipError> {
        Ok(!self.present(v).await?.is_empty())
    }

    /// Gives the VIP up: addresses deleted, the NIC's own MAC restored. Already gone is fine.
    pub async fn release(&self, v: &VipSpec) -> Result<(), VipError> {
        for m in self.present(v).await? {
            match self.handle.address().del(m).execute().await {
                Ok(()) => {}
                Err(e) if code(&e) == Some(EADDRNOTAVAIL) => {}
                Err(e) => return Err(Self::err("deleting the VIP", &v.interface, &e)),
            }
        }
        if v.mac.is_some() {
            let key = mac_key(v);
            let saved =
                self.macs.load(&key).map_err(|e| VipError::MacState(v.interface.clone(), e))?;
            if let Some(orig) = saved {
                let (index, now) = self.link(&v.interface).await?;
                if now != orig {
                    self.set_mac(index, &v.interface, orig).await?;
                }
                self.macs.forget(&key).map_err(|e| VipError::MacState(v.interface.clone(), e))?;
            }
        }
        Ok(())
    }
}

/// The frames that announce `v`'s addresses at `mac`: for IPv4 a gratuitous ARP request and a
/// reply, for IPv6 an unsolicited neighbour advertisement.
pub fn announcements(v: &VipSpec, mac: Mac) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (ip, _) in &v.addrs {
        match ip {
            IpAddr::V4(a) => {
                out.push(packets::gratuitous_arp(ArpOp::Request, mac, *a));
                out.push(packets::gratuitous_arp(ArpOp::Reply, mac, *a));
            }
            IpAddr::V6(a) => out.push(packets::unsolicited_na(mac, *a)),
        }
    }
    out
}

/// A raw AF_PACKET socket bound to one interface.
#[derive(Debug)]
pub struct RawSocket {
    fd: std::os::fd::OwnedFd,
    index: u32,
}

impl RawSocket {
    /// Opens a socket for `ethertype` frames on interface `index`.
    pub fn open(index: u32, ethertype: u16, name: &str) -> Result<Self, VipError> {
        use std::os::fd::FromRawFd;
        let proto = i32::from(ethertype.to_be());
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(VipError::Permission(name.into()));
            }
            return Err(VipError::Packet(name.into(), e));
        }
        // SAFETY: fd is a fresh, valid descriptor owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let s = Self { fd, index };
        let sa = s.addr(ethertype);
        // SAFETY: sa is a valid sockaddr_ll and its size is passed with it.
        let r = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&s.fd),
                std::ptr::from_ref(&sa).cast(),
                SOCKADDR_LL_LEN,
            )
        };
        if r < 0 {
            return Err(VipError::Packet(name.into(), std::io::Error::last_os_error()));
        }
        Ok(s)
    }

    fn addr(&self, ethertype: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits");
        sa.sll_protocol = ethertype.to_be();
        sa.sll_ifindex = i32::try_from(self.index).unwrap_or(0);
        sa.sll_halen = 6;
        sa
    }

    /// Sends one complete Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let mut sa = self.addr(ethertype);
        sa.sll_addr[..6].copy_from_slice(&frame[0..6]);
        // SAFETY: frame and sa are valid for the lengths passed.
        let r = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&sa).cast(),
                SOCKADDR_LL_LEN,
            )
        };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Receives one frame, waiting at most `timeout`.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Option<usize> {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        usize::try_from(n).ok()
    }
}

/// Duplicate-address probe (IPv4): sends an ARP probe for `ip` and listens for `wait` for a
/// host other than `mine` claiming it. Blocking: run it off the runtime's worker threads.
pub fn probe(
    index: u32,
    name: &str,
    mine: Mac,
    ip: Ipv4Addr,
    wait: Duration,
) -> Result<Option<Mac>, VipError> {
    let s = RawSocket::open(index, packets::ETH_P_ARP, name)?;
    s.send(&packets::arp_probe(mine, ip)).map_err(|e| VipError::Packet(name.into(), e))?;
    let end = Instant::now() + wait;
    let mut buf = [0u8; 1600];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let Some(n) = s.recv(&mut buf, left) else { break };
        if let Some(m) = packets::arp_claim(&buf[..n], ip)
            && m != mine
        {
            return Ok(Some(m));
        }
    }
    Ok(None)
}
