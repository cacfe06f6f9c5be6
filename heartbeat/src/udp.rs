//! The UDP transport: one socket per link, bound to the link's own address (so each link uses
//! its own interface), sending to the peer's address.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

use crate::frame::MAX_FRAME;

/// Errors of a UDP link.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("cannot bind the heartbeat UDP socket to {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("heartbeat UDP I/O: {0}")]
    Io(std::io::Error),
}

/// One UDP heartbeat link.
#[derive(Debug)]
pub struct UdpLink {
    sock: UdpSocket,
    peer: SocketAddr,
}

impl UdpLink {
    pub async fn bind(local: SocketAddr, peer: SocketAddr) -> Result<Self, UdpError> {
        let sock = UdpSocket::bind(local).await.map_err(|e| UdpError::Bind(local, e))?;
        Ok(Self { sock, peer })
    }

    /// Sends one frame to the peer. A send error (no route yet, interface down) is reported
    /// to the caller, which counts it; the link stays.
    pub async fn send(&self, frame: &[u8]) -> Result<(), UdpError> {
        self.sock.send_to(frame, self.peer).await.map(|_| ()).map_err(UdpError::Io)
    }

    /// Receives one datagram (at most one frame long; longer ones arrive truncated and fail
    /// to decode).
    pub async fn recv(
        &self,
        buf: &mut [u8; MAX_FRAME + 1],
    ) -> Result<(usize, SocketAddr), UdpError> {
        self.sock.recv_from(buf).await.map_err(UdpError::Io)
    }
}
