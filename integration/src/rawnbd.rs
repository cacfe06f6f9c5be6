//! A deliberately minimal blocking NBD client for tests: it can do the handshake properly, and
//! it can also send whatever bytes a test wants, so hostile input reaches the real server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use replicator::nbd::proto::*;

/// A connection to the server.
#[derive(Debug)]
pub struct Raw {
    pub s: TcpStream,
}

/// One reply as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// An option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl Raw {
    /// Connects and reads the 18-byte greeting.
    pub fn connect(port: u16) -> Self {
        Self::over(TcpStream::connect(("127.0.0.1", port)).expect("connect"))
    }

    /// Connects from `127.0.0.<last>` (see [`crate::tcp_from`]) and reads the greeting.
    pub fn connect_from(last: u8, port: u16) -> Self {
        Self::over(crate::tcp_from(last, port).expect("connect from another loopback address"))
    }

    fn over(s: TcpStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut r = Self { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        r
    }

    /// Sends raw bytes.
    pub fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// Sends client flags (FIXED_NEWSTYLE | NO_ZEROES).
    pub fn flags(&mut self) {
        self.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
    }

    /// Sends one option.
    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(option);
        b.put_u32(u32::try_from(data.len()).expect("small"));
        b.put_slice(data);
        self.send(&b).expect("option");
    }

    /// Reads one option reply.
    pub fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply header");
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).expect("option reply data");
        OptReply { option, kind, data }
    }

    /// GO for `name`; returns the final reply kind (ACK on success).
    pub fn go(&mut self, name: &str) -> u32 {
        let mut d = BytesMut::new();
        d.put_u32(u32::try_from(name.len()).expect("small"));
        d.put_slice(name.as_bytes());
        d.put_u16(0);
        self.option(OPT_GO, &d);
        loop {
            let r = self.opt_reply();
            if r.kind != REP_INFO {
                return r.kind;
            }
        }
    }

    /// Full handshake into transmission with simple replies.
    pub fn transmission(port: u16) -> Self {
        let mut r = Self::connect(port);
        r.flags();
        assert_eq!(r.go("vol0"), REP_ACK);
        r
    }

    /// Sends a request (and a payload for writes).
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        encode_request(&mut b, &RequestHeader { flags, kind, cookie, offset, len });
        b.put_slice(payload);
        self.send(&b)
    }

    /// Reads a simple reply header (READ data, if any, is left for [`Raw::read_data`]).
    pub fn reply(&mut self) -> std::io::Result<SimpleReply> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes(), "simple reply magic");
        Ok(SimpleReply {
            error: u32::from_be_bytes(h[4..8].try_into().expect("4")),
            cookie: u64::from_be_bytes(h[8..16].try_into().expect("8")),
        })
    }

    /// Reads `len` bytes of READ data.
    pub fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.s.read_exact(&mut v).expect("read data");
        v
    }

    /// True when the server has closed the connection (EOF, or reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

impl Raw {
    /// [`Raw::transmission`] that reports failure (server down or going away) instead of
    /// panicking; for clients that reconnect across a failover.
    pub fn try_transmission(port: u16) -> Option<Self> {
        Self::try_transmission_to(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// [`Raw::try_transmission`] to any address (a VIP inside a lab namespace).
    pub fn try_transmission_to(addr: std::net::SocketAddr) -> Option<Self> {
        Self::try_transmission_within(addr, Duration::from_secs(2))
    }

    /// [`Raw::try_transmission_to`] with its own connect timeout.
    pub fn try_transmission_within(addr: std::net::SocketAddr, connect: Duration) -> Option<Self> {
        let s = TcpStream::connect_timeout(&addr, connect).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        let mut r = Self { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).ok()?;
        if g[..8] != NBD_MAGIC.to_be_bytes() {
            return None;
        }
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).ok()?;
        let mut d = BytesMut::new();
        d.put_u32(4);
        d.put_slice(b"vol0");
        d.put_u16(0);
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(OPT_GO);
        b.put_u32(u32::try_from(d.len()).ok()?);
        b.put_slice(&d);
        r.send(&b).ok()?;
        loop {
            let mut h = [0u8; 20];
            r.s.read_exact(&mut h).ok()?;
            let kind = u32::from_be_bytes(h[12..16].try_into().ok()?);
            let len = u32::from_be_bytes(h[16..20].try_into().ok()?) as usize;
            let mut data = vec![0u8; len];
            r.s.read_exact(&mut data).ok()?;
            if kind != REP_INFO {
                return (kind == REP_ACK).then_some(r);
            }
        }
    }
}
