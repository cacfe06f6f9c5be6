//! The value syntaxes the file uses (addresses, prefixes, MACs), parsed while the file is read:
//! the structs hold the typed values, so nothing downstream parses them again. A bad value is a
//! parse error that points at its line and says what to write instead.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, de::Error as _};

use super::{IpAddr, SocketAddr};

/// A value that is not what its key takes (the parse error at its line says which).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("{0:?} is not an address:port; write it as 192.0.2.1:10809 or [2001:db8::1]:10809")]
    Address(String),
    #[error("{0:?} is not ADDRESS/PREFIX; write e.g. \"192.0.2.100/24\" or \"2001:db8::100/64\"")]
    Prefix(String),
    #[error(
        "{0:?} is not a unicast MAC address; use \"\" or a locally administered unicast MAC such as \"02:00:5e:00:01:01\""
    )]
    Mac(String),
}

fn parse_socket(v: &str) -> Result<SocketAddr, SyntaxError> {
    v.parse().map_err(|_| SyntaxError::Address(v.to_string()))
}

/// `ADDRESS:PORT`.
pub(super) fn socket<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_socket(&String::deserialize(d)?).map_err(D::Error::custom)
}

/// An optional `ADDRESS:PORT` (absent is `None`; use with `#[serde(default)]`).
pub(super) fn socket_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket(d).map(Some)
}

/// A listening address that `""` turns off (`metrics_listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// `""`: not served.
    Off,
    /// Served here.
    At(SocketAddr),
}

impl Listen {
    /// The address, unless off.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(a) => Some(a),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = String::deserialize(d)?;
        if v.is_empty() {
            return Ok(Listen::Off);
        }
        parse_socket(&v)
            .map(Listen::At)
            .map_err(|e| D::Error::custom(format!("{e}, or \"\" to turn it off")))
    }
}

/// `ADDRESS/PREFIX`, IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length (at most 32 or 128).
    pub len: u8,
}

impl FromStr for IpPrefix {
    type Err = SyntaxError;

    fn from_str(v: &str) -> Result<Self, SyntaxError> {
        let bad = || SyntaxError::Prefix(v.to_string());
        let (a, p) = v.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let len: u8 = p.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(IpPrefix { addr, len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// A unicast MAC address, `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = SyntaxError;

    fn from_str(v: &str) -> Result<Self, SyntaxError> {
        match vip::packets::parse_mac(v) {
            Some(m) if m[0] & 1 == 0 => Ok(Mac(m)),
            _ => Err(SyntaxError::Mac(v.to_string())),
        }
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// A MAC, or `""` for none (use with `#[serde(default)]`).
pub(super) fn mac_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mac>, D::Error> {
    let v = String::deserialize(d)?;
    if v.is_empty() {
        return Ok(None);
    }
    v.parse().map(Some).map_err(D::Error::custom)
}
