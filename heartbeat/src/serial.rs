//! The serial transport. On the wire each heartbeat frame is wrapped as
//!
//! ```text
//! marker A5 5A C3 3C | length u16 | frame (length bytes) | crc32 of length and frame
//! ```
//!
//! [`Deframer`] (pure) finds frames in a byte stream that may hold line noise, half frames (a
//! peer that restarted mid-write) or a garbage marker with a plausible length: a candidate whose
//! length or CRC is wrong costs one byte of scanning, never the bytes after it, so garbage costs
//! at most the frame it overlaps. [`SerialPort`] opens the device raw 8N1 at the configured baud,
//! with optional RTS/CTS, and gives async reads and writes with a write timeout.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::termios::{self, BaudRate, ControlFlags, SetArg};
use tokio::io::unix::AsyncFd;

use crate::frame::MAX_FRAME;

/// Start-of-frame marker.
pub const MARKER: [u8; 4] = [0xA5, 0x5A, 0xC3, 0x3C];
const OVERHEAD: usize = 4 + 2 + 4;

/// Wraps one frame for the line.
pub fn wrap(frame: &[u8]) -> Vec<u8> {
    let len = u16::try_from(frame.len()).expect("frames are shorter than 64 KiB");
    let mut o = Vec::with_capacity(frame.len() + OVERHEAD);
    o.extend_from_slice(&MARKER);
    o.extend_from_slice(&len.to_be_bytes());
    o.extend_from_slice(frame);
    let crc = crc32fast::hash(&o[4..]);
    o.extend_from_slice(&crc.to_be_bytes());
    o
}

/// Finds wrapped frames in a byte stream.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
    /// Bytes skipped as not part of any frame.
    pub garbage_bytes: u64,
    /// Candidates refused (bad length or CRC).
    pub bad_candidates: u64,
}

impl Deframer {
    /// Adds received bytes.
    pub fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// The next whole frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            let Some(at) = self.buf.windows(4).position(|w| w == MARKER) else {
                // Keep a possible partial marker at the end.
                let keep = self.buf.len().min(3);
                let drop = self.buf.len() - keep;
                self.skip(drop);
                return None;
            };
            self.skip(at);
            if self.buf.len() < 6 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([self.buf[4], self.buf[5]]));
            if len == 0 || len > MAX_FRAME {
                self.reject();
                continue;
            }
            if self.buf.len() < OVERHEAD + len {
                // Incomplete, or a garbage length. If a whole valid frame already sits further
                // on, the candidate was garbage: a real frame cannot contain another wrapped
                // frame with a good CRC (its bytes are signed state, not chosen wire data), so
                // waiting would only delay the frames behind it.
                match (1..self.buf.len()).find(|&i| self.valid_at(i).is_some()) {
                    Some(i) => {
                        self.bad_candidates += 1;
                        self.skip(i);
                        continue;
                    }
                    None => return None,
                }
            }
            match self.valid_at(0) {
                Some(len) => {
                    let frame = self.buf[6..6 + len].to_vec();
                    self.buf.drain(..OVERHEAD + len);
                    return Some(frame);
                }
                None => {
                    self.reject();
                    continue;
                }
            }
        }
    }

    /// The payload length of a complete frame with a good CRC starting at `at`.
    fn valid_at(&self, at: usize) -> Option<usize> {
        let b = self.buf.get(at..)?;
        if b.len() < OVERHEAD || b[..4] != MARKER {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([b[4], b[5]]));
        if len == 0 || len > MAX_FRAME || b.len() < OVERHEAD + len {
            return None;
        }
        let want = u32::from_be_bytes(b[6 + len..10 + len].try_into().expect("4 bytes"));
        (crc32fast::hash(&b[4..6 + len]) == want).then_some(len)
    }

    fn skip(&mut self, n: usize) {
        self.garbage_bytes += n as u64;
        self.buf.drain(..n);
    }

    fn reject(&mut self) {
        self.bad_candidates += 1;
        self.skip(1);
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The device could not be opened.
    #[error("cannot open serial device {0}: {1}")]
    Open(PathBuf, nix::Error),
    /// The device refused the line settings.
    #[error("cannot configure serial device {0} (is it a tty?): {1}")]
    Configure(PathBuf, nix::Error),
    /// A baud rate the kernel does not offer.
    #[error(
        "baud {0} is not a standard rate; use 9600, 19200, 38400, 57600, 115200, 230400 or 460800"
    )]
    Baud(u32),
    /// A write did not finish in time (flow control holding, or no cable).
    #[error("write to the serial line timed out")]
    WriteTimeout,
    /// Read or write failed.
    #[error("serial I/O on {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn baud(b: u32) -> Result<BaudRate, SerialError> {
    Ok(match b {
        1200 => BaudRate::B1200,
        2400 => BaudRate::B2400,
        4800 => BaudRate::B4800,
        9600 => BaudRate::B9600,
        19200 => BaudRate::B19200,
        38400 => BaudRate::B38400,
        57600 => BaudRate::B57600,
        115_200 => BaudRate::B115200,
        230_400 => BaudRate::B230400,
        460_800 => BaudRate::B460800,
        921_600 => BaudRate::B921600,
        other => return Err(SerialError::Baud(other)),
    })
}

/// Checks a baud rate without opening anything (configuration validation).
pub fn valid_baud(b: u32) -> bool {
    baud(b).is_ok()
}

/// An open serial device in raw mode, non-blocking under tokio.
#[derive(Debug)]
pub struct SerialPort {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl SerialPort {
    /// Opens `path` raw 8N1 at `rate`, RTS/CTS if asked. Must run inside a tokio runtime.
    pub fn open(path: &Path, rate: u32, rtscts: bool) -> Result<Self, SerialError> {
        use nix::fcntl::{OFlag, open};
        use nix::sys::stat::Mode;
        let speed = baud(rate)?;
        let fd = open(
            path,
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SerialError::Open(path.into(), e))?;
        let cfg = |e| SerialError::Configure(path.into(), e);
        let mut t = termios::tcgetattr(&fd).map_err(cfg)?;
        termios::cfmakeraw(&mut t);
        termios::cfsetspeed(&mut t, speed).map_err(cfg)?;
        t.control_flags &= !(ControlFlags::PARENB | ControlFlags::CSTOPB | ControlFlags::CSIZE);
        t.control_flags |= ControlFlags::CS8 | ControlFlags::CLOCAL | ControlFlags::CREAD;
        t.control_flags.set(ControlFlags::CRTSCTS, rtscts);
        termios::tcsetattr(&fd, SetArg::TCSANOW, &t).map_err(cfg)?;
        // Whatever sat in the buffers from before is not ours.
        let _ = termios::tcflush(&fd, termios::FlushArg::TCIOFLUSH);
        // SAFETY: `fd` is an OwnedFd we just opened; the AsyncFd owns it, so it stays open and
        // refers to the same open file description until the AsyncFd is dropped.
        let fd =
            unsafe { AsyncFd::register(fd) }.map_err(|e| SerialError::Io(path.into(), e.into()))?;
        Ok(Self { fd, path: path.into() })
    }

    /// Reads what is there (waits for at least one byte).
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize, SerialError> {
        loop {
            let mut g =
                self.fd.readable().await.map_err(|e| SerialError::Io(self.path.clone(), e))?;
            match g.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from))
            {
                Ok(r) => return r.map_err(|e| SerialError::Io(self.path.clone(), e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `b` within `timeout`; on timeout the unsent output is discarded (the next
    /// frame starts clean after a marker, so the peer loses one frame at most).
    pub async fn write_all(&self, b: &[u8], timeout: Duration) -> Result<(), SerialError> {
        let r = tokio::time::timeout(timeout, async {
            let mut off = 0;
            while off < b.len() {
                let mut g =
                    self.fd.writable().await.map_err(|e| SerialError::Io(self.path.clone(), e))?;
                match g.try_io(|fd| {
                    nix::unistd::write(fd.get_ref(), &b[off..]).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(n)) => off += n,
                    Ok(Err(e)) => return Err(SerialError::Io(self.path.clone(), e)),
                    Err(_would_block) => continue,
                }
            }
            Ok(())
        })
        .await;
        match r {
            Ok(r) => r,
            Err(_) => {
                let _ = termios::tcflush(self.fd.get_ref(), termios::FlushArg::TCOFLUSH);
                Err(SerialError::WriteTimeout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(d: &mut Deframer) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    proptest! {
        /// Frames separated by arbitrary garbage, fed in arbitrary chunks, come out intact; a
        /// frame is lost only when garbage lands inside it, and nothing is ever misread.
        #[test]
        fn garbage_between_frames_costs_nothing(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 1..20),
            garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 20),
            chunk in 1usize..64,
        ) {
            let mut line = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                line.extend_from_slice(&garbage[i]);
                line.extend_from_slice(&wrap(p));
            }
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for c in line.chunks(chunk) {
                d.push(c);
                got.extend(frames(&mut d));
            }
            prop_assert_eq!(got, payloads);
        }

        /// Garbage spliced into a frame: that frame is lost (or survives, when the noise left its
        /// marker whole), every other frame arrives, and nothing arrives that was not sent.
        #[test]
        fn garbage_inside_a_frame_costs_that_frame(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 8..100), 3..10),
            victim in 0usize..3,
            cut in 1usize..8,
            noise in proptest::collection::vec(any::<u8>(), 1..40),
        ) {
            let mut line = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let mut w = wrap(p);
                if i == victim {
                    w.splice(cut..cut, noise.iter().copied());
                }
                line.extend_from_slice(&w);
            }
            let mut d = Deframer::default();
            d.push(&line);
            let got = frames(&mut d);
            let want: Vec<_> = payloads.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, p)| p.clone()).collect();
            // Noise that lands before the real marker (cut inside the marker can leave it
            // whole after the noise) costs nothing; otherwise exactly the victim is lost.
            prop_assert!(got == want || got == payloads, "got {:?}", got);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(b in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut d = Deframer::default();
            for c in b.chunks(97) {
                d.push(c);
                let _ = frames(&mut d);
                prop_assert!(d.pending() <= MAX_FRAME + OVERHEAD + 97);
            }
        }
    }

    #[test]
    fn a_fake_marker_with_a_huge_length_does_not_swallow_the_next_frame() {
        let mut line = MARKER.to_vec();
        line.extend_from_slice(&[0x01, 0x00]); // claims 256 bytes
        line.extend_from_slice(&wrap(b"real frame"));
        line.extend_from_slice(&vec![0u8; 300]);
        let mut d = Deframer::default();
        d.push(&line);
        assert_eq!(frames(&mut d), vec![b"real frame".to_vec()]);
        assert!(d.bad_candidates >= 1);
    }

    #[test]
    fn baud_rates_are_checked() {
        assert!(valid_baud(115_200));
        assert!(valid_baud(9600));
        assert!(!valid_baud(115_201));
        assert!(SerialError::Baud(7).to_string().contains("115200"));
    }

    #[tokio::test]
    async fn a_pty_pair_carries_frames_both_ways() {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let name = nix::unistd::ttyname(&pty.slave).expect("ttyname");
        let port = SerialPort::open(&name, 115_200, false).expect("open pty slave");
        // SAFETY: the pty master is an OwnedFd moved into the AsyncFd, which keeps it open.
        let master = unsafe { AsyncFd::register(pty.master) }.expect("asyncfd");
        // Make the master side non-blocking for the test's reads.
        nix::fcntl::fcntl(
            master.get_ref(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("nonblock");
        port.write_all(&wrap(b"hello"), Duration::from_secs(2)).await.expect("write");
        let mut d = Deframer::default();
        let mut buf = [0u8; 256];
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut g = master.readable().await.expect("readable");
                if let Ok(Ok(n)) = g.try_io(|fd| {
                    nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
                }) {
                    d.push(&buf[..n]);
                    if let Some(f) = d.next_frame() {
                        return f;
                    }
                }
            }
        })
        .await
        .expect("frame within 5 s");
        assert_eq!(got, b"hello");
        nix::unistd::write(master.get_ref(), &wrap(b"back")).expect("write master");
        let n = tokio::time::timeout(Duration::from_secs(5), port.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        let mut d = Deframer::default();
        d.push(&buf[..n]);
        let mut f = d.next_frame();
        while f.is_none() {
            let n = port.read(&mut buf).await.expect("read");
            d.push(&buf[..n]);
            f = d.next_frame();
        }
        assert_eq!(f.expect("frame"), b"back");
    }

    #[test]
    fn opening_a_missing_device_names_it() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let _g = rt.enter();
        let e = SerialPort::open(Path::new("/dev/duet-no-such-tty"), 115_200, false)
            .expect_err("no such device");
        assert!(e.to_string().contains("/dev/duet-no-such-tty"), "{e}");
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let e = SerialPort::open(f.path(), 115_200, false).expect_err("not a tty");
        assert!(e.to_string().contains("is it a tty"), "{e}");
    }
}
