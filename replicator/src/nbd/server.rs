//! The NBD connection driver: sockets and tasks around the pure codec, negotiation and
//! validation. One task reads requests, one task per request does the I/O, one task writes
//! replies in completion order.
//!
//! Shutdown (spec, "Terminating the transmission phase"): once the shutdown signal fires, options
//! that would start transmission are refused, new requests are answered `NBD_ESHUTDOWN` (a client
//! must then disconnect), requests already in flight are finished and answered, and a connection
//! whose client does not disconnect within [`SHUTDOWN_GRACE`] is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::negotiate::{BASE_ALLOCATION_ID, ExportInfo, Negotiation, Step};
use super::proto::*;
use super::request::{Command, Limits, Refusal, validate};
use crate::ratelimit::Limited;
use crate::repl::volume::Volume;
use crate::store::IoBuf;

/// Largest option payload accepted during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE payload advertised.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// An oversized WRITE up to this length is read and discarded (the connection stays usable);
/// beyond it the connection is closed as abusive.
pub const MAX_DISCARD: u32 = 64 << 20;
/// How long a client may take for one negotiation step.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may stay open after shutdown began.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 128;
/// Connections from one address at once: one source that opens connections and idles cannot
/// take every slot (a client reconnecting after a failover gets in). Half of them, not fewer: a
/// hypervisor host with several multi-connection disks is one address with many connections.
pub const MAX_PER_SOURCE: usize = MAX_CONNECTIONS / 2;
/// How long a client may leave replies unread (its receive window full) before it is
/// disconnected: a client that stops reading pins no buffers and holds up no demotion.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(30);
/// Per-connection budget of in-flight buffer memory, in 4 KiB units (64 MiB).
const INFLIGHT_UNITS: u32 = 16 * 1024;
/// Requests taken from the buffer before pending replies are written.
const MAX_BATCH: usize = 64;
/// Replies are coalesced up to this many bytes per write.
const COALESCE: usize = 256 * 1024;
/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;

/// Counters of one server, read by `duet status` and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub clients_connected: AtomicU64,
    /// Connections still negotiating (counted on the listener's first export).
    pub clients_negotiating: AtomicU64,
    pub clients_total: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub request_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
}

/// Counter values at one moment: a plain copy of [`Stats`] (what `duet status` shows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub clients_connected: u64,
    #[serde(default)]
    pub clients_negotiating: u64,
    pub clients_total: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub request_errors: u64,
    pub protocol_errors: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            clients_connected: self.clients_connected.load(Relaxed),
            clients_negotiating: self.clients_negotiating.load(Relaxed),
            clients_total: self.clients_total.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            trims: self.trims.load(Relaxed),
            zeroes: self.zeroes.load(Relaxed),
            request_errors: self.request_errors.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
        }
    }
}

pub use crate::shutdown::stopped;

/// An export: what clients see, and the store behind it.
#[derive(Debug)]
pub struct Export {
    /// Negotiation-time description.
    pub info: ExportInfo,
    /// The volume behind it (local store, and replication when paired).
    pub vol: Arc<Volume>,
    /// Counters.
    pub stats: Stats,
}

/// The exports of one listener.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Export>,
    infos: Vec<ExportInfo>,
    log_limit: Limited,
}

impl Server {
    /// A server for `exports`.
    pub fn new(exports: Vec<Export>) -> Arc<Self> {
        let infos = exports.iter().map(|e| e.info.clone()).collect();
        Arc::new(Self { exports, infos, log_limit: Limited::new(10, Duration::from_secs(10)) })
    }

    /// The exports.
    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// Logs a client-triggerable problem, rate-limited.
    fn log_client(&self, peer: SocketAddr, what: &str) {
        crate::warn_limited!(self.log_limit, %peer, "closing NBD connection: {what}");
    }

    /// Accepts connections until `shutdown` turns true, then waits for every connection to end.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut conns = JoinSet::new();
        let for_conns = shutdown.clone();
        let sources = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((sock, peer)) => {
                        if conns.len() >= MAX_CONNECTIONS {
                            self.log_client(peer, "too many connections");
                            continue;
                        }
                        let Some(slot) = SourceSlot::take(&sources, peer.ip()) else {
                            self.log_client(peer, &format!("more than {MAX_PER_SOURCE} connections from this address"));
                            continue;
                        };
                        let srv = Arc::clone(&self);
                        let span = tracing::error_span!("client", %peer);
                        let conn = srv.connection(sock, peer, for_conns.clone());
                        conns.spawn(tracing::Instrument::instrument(
                            async move {
                                conn.await;
                                drop(slot);
                            },
                            span,
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(&mut shutdown) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
    }

    async fn connection(
        self: Arc<Self>,
        sock: TcpStream,
        peer: SocketAddr,
        sd: watch::Receiver<bool>,
    ) {
        let _ = sock.set_nodelay(true);
        let (rd, mut wr) = sock.into_split();
        let mut conn = Reader { rd, buf: BytesMut::with_capacity(256 * 1024) };
        let mut sd_neg = sd.clone();
        let negotiating = self.exports.first().map(|e| &e.stats.clients_negotiating);
        if let Some(n) = negotiating {
            n.fetch_add(1, Relaxed);
        }
        // A client still negotiating when shutdown begins has nothing in flight: hang up.
        let negotiated = tokio::select! {
            r = self.negotiate(&mut conn, &mut wr, &sd) => r,
            _ = stopped(&mut sd_neg) => Ok(None),
        };
        if let Some(n) = negotiating {
            n.fetch_sub(1, Relaxed);
        }
        let session = match negotiated {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                if let Some(ex) = self.exports.first() {
                    ex.stats.protocol_errors.fetch_add(1, Relaxed);
                }
                self.log_client(peer, &format!("during negotiation: {e}"));
                return;
            }
        };
        let export = &self.exports[session.export];
        export.stats.clients_connected.fetch_add(1, Relaxed);
        export.stats.clients_total.fetch_add(1, Relaxed);
        tracing::debug!(%peer, export = %export.info.name, structured = session.structured, "NBD client connected");
        let limits = Limits::new(&export.info, &session);
        if let Err(e) = self.transmit(conn, wr, session.export, limits, sd).await {
            export.stats.protocol_errors.fetch_add(1, Relaxed);
            self.log_client(peer, &e.to_string());
        }
        export.stats.clients_connected.fetch_sub(1, Relaxed);
    }

    async fn negotiate(
        &self,
        conn: &mut Reader,
        wr: &mut OwnedWriteHalf,
        sd: &watch::Receiver<bool>,
    ) -> Result<Option<super::negotiate::Session>, ClientError> {
        let mut out = BytesMut::with_capacity(1024);
        encode_greeting(&mut out);
        written(wr, &out).await?;
        if !conn.fill_timeout(4).await? {
            return Ok(None);
        }
        let flags = decode_client_flags(&conn.buf)?.expect("4 bytes");
        conn.buf.advance(4);
        let mut neg = Negotiation::new(&self.infos, flags);
        loop {
            if !conn.fill_timeout(OPTION_HEADER_LEN).await? {
                return Ok(None);
            }
            let h = decode_option_header(&conn.buf)?.expect("16 bytes");
            if h.len > MAX_OPTION_LEN {
                let e =
                    ProtoError::OptionTooLong { option: h.option, len: h.len, max: MAX_OPTION_LEN };
                return Err(e.into());
            }
            let len = h.len as usize;
            if !conn.fill_timeout(OPTION_HEADER_LEN + len).await? {
                return Err(ClientError::ClosedInOption);
            }
            conn.buf.advance(OPTION_HEADER_LEN);
            let data = conn.buf.split_to(len);
            let stopping = *sd.borrow();
            if stopping {
                neg.set_shutting_down();
            }
            out.clear();
            let step = neg.handle(h.option, &data, &mut out);
            written(wr, &out).await?;
            match step {
                Step::Continue => {}
                Step::Close => return Ok(None),
                Step::Transmit(s) => return Ok(Some(s)),
            }
        }
    }

    /// The transmission phase of one connection, in one task: it reads requests, keeps the
    /// in-flight ones in a `FuturesUnordered`, and writes replies as they complete, coalescing
    /// whatever is ready into one write. One task (instead of a reader, a writer and a task per
    /// request) means no cross-thread wake-ups and no contention on the socket between threads.
    async fn transmit(
        &self,
        mut conn: Reader,
        mut wr: OwnedWriteHalf,
        export: usize,
        limits: Limits,
        mut sd: watch::Receiver<bool>,
    ) -> Result<(), ClientError> {
        let mut inflight = FuturesUnordered::new();
        let mut units: u32 = 0;
        let mut pending: Vec<Reply> = Vec::new();
        let mut out = BytesMut::with_capacity(COALESCE);
        let mut shutting_since: Option<tokio::time::Instant> = None;
        let result = loop {
            // Take every request already buffered (up to a batch) before starting any.
            let (mut ended, mut batch) = (None, 0);
            while units < INFLIGHT_UNITS
                && batch < MAX_BATCH
                && conn.buf.len() >= REQUEST_HEADER_LEN
            {
                batch += 1;
                match self.take_request(&mut conn, export, &limits, shutting_since.is_some()).await
                {
                    Ok(Taken::Reply(r)) => pending.push(r),
                    Ok(Taken::Start(h, cmd, payload, u)) => {
                        units += u;
                        inflight.push(Box::pin(async move {
                            (self.execute(export, &h, cmd, payload, limits).await, u)
                        }));
                    }
                    Ok(Taken::Disconnect) => {
                        ended = Some(Ok(()));
                        break;
                    }
                    Err(e) => {
                        ended = Some(Err(e));
                        break;
                    }
                }
            }
            // Start them (and take whatever completed meanwhile) under one plug when there are
            // several: their frames reach the peer and their submissions the kernel together.
            {
                let _plug = (batch > 1).then(|| self.exports[export].vol.plug());
                while let Some(Some((reply, u))) = inflight.next().now_or_never() {
                    units -= u;
                    pending.push(reply);
                }
            }
            if let Some(end) = ended {
                break end;
            }
            let room = units < INFLIGHT_UNITS;
            if !pending.is_empty() {
                match send_bounded(&mut wr, &mut out, &mut pending, &sd, shutting_since).await {
                    Ok(()) => {}
                    Err(Unsent::Io) => break Ok(()), // the client went away; nothing to answer
                    Err(Unsent::Stalled) => break Err(ClientError::Stalled(REPLY_DEADLINE)),
                }
            }
            let grace = shutting_since.map(|t| t + SHUTDOWN_GRACE);
            tokio::select! {
                biased;
                Some((reply, u)) = inflight.next(), if !inflight.is_empty() => {
                    units -= u;
                    pending.push(reply);
                }
                // Cancel-safe: partial bytes stay in conn.buf.
                r = conn.fill(REQUEST_HEADER_LEN), if room => match r {
                    Ok(true) => {}
                    Ok(false) => break Ok(()), // client closed at a request boundary
                    Err(e) => break Err(e),
                },
                _ = stopped(&mut sd), if shutting_since.is_none() => {
                    shutting_since = Some(tokio::time::Instant::now());
                }
                _ = tokio::time::sleep_until(grace.unwrap_or_else(tokio::time::Instant::now)), if grace.is_some() => {
                    break Ok(()); // grace over: hard disconnect
                }
            }
        };
        // Finish what is in flight; answer it if the client still listens (and reads).
        while let Some((reply, _)) = inflight.next().await {
            pending.push(reply);
        }
        let sent = send_bounded(&mut wr, &mut out, &mut pending, &sd, shutting_since).await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, wr.shutdown()).await;
        match (result, sent) {
            (Ok(()), Err(Unsent::Stalled)) => Err(ClientError::Stalled(REPLY_DEADLINE)),
            (r, _) => r,
        }
    }

    /// Decodes, validates and (for writes) reads the payload of the next buffered request.
    async fn take_request(
        &self,
        conn: &mut Reader,
        export: usize,
        limits: &Limits,
        shutting: bool,
    ) -> Result<Taken, ClientError> {
        let h = match decode_request(&conn.buf) {
            Ok(Some(h)) => h,
            Ok(None) => unreachable!("the caller checked a whole header is buffered"),
            Err(e) => return Err(e.into()),
        };
        conn.buf.advance(REQUEST_HEADER_LEN);
        let cmd = if shutting && h.kind != CMD_DISC {
            Err(Refusal { error: NbdError::Shutdown, reason: "server is shutting down" })
        } else {
            validate(&h, limits)
        };
        let cmd = match cmd {
            Ok(c) => c,
            Err(r) => {
                if h.kind == CMD_WRITE {
                    if h.len > MAX_DISCARD {
                        return Err(ClientError::AbusivePayload(h.len));
                    }
                    conn.discard(h.len as usize).await?;
                }
                self.exports[export].stats.request_errors.fetch_add(1, Relaxed);
                return Ok(Taken::Reply(Reply::error(&h, limits.structured, r)));
            }
        };
        let payload = match cmd {
            Command::Disconnect => return Ok(Taken::Disconnect),
            Command::Write { len, .. } => Some(conn.payload(len as usize).await?),
            _ => None,
        };
        let units = 1 + match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => len.div_ceil(4096),
            _ => 0,
        };
        Ok(Taken::Start(h, cmd, payload, units))
    }

    async fn execute(
        &self,
        export: usize,
        h: &RequestHeader,
        cmd: Command,
        payload: Option<IoBuf>,
        limits: Limits,
    ) -> Reply {
        let ex = &self.exports[export];
        let (store, st) = (&ex.vol, &ex.stats);
        let r = match cmd {
            Command::Read { offset, len } => match store.read(offset, len as usize).await {
                Ok(buf) => {
                    st.reads.fetch_add(1, Relaxed);
                    st.bytes_read.fetch_add(u64::from(len), Relaxed);
                    return Reply::read(h.cookie, offset, buf, limits.structured);
                }
                Err(e) => Err(e),
            },
            Command::Write { offset, len, fua } => {
                let buf = payload.expect("writes carry a payload");
                let r = store.write(offset, buf, fua).await;
                if r.is_ok() {
                    st.writes.fetch_add(1, Relaxed);
                    st.bytes_written.fetch_add(u64::from(len), Relaxed);
                }
                r
            }
            Command::Flush => {
                st.flushes.fetch_add(1, Relaxed);
                store.flush().await
            }
            Command::Trim { offset, len, fua } => {
                st.trims.fetch_add(1, Relaxed);
                store.trim(offset, u64::from(len), fua).await
            }
            Command::WriteZeroes { offset, len, fua, may_trim, fast_only } => {
                st.zeroes.fetch_add(1, Relaxed);
                store.zero(offset, u64::from(len), fua, may_trim, fast_only).await
            }
            Command::Cache { offset, len } => store.cache(offset, u64::from(len)),
            Command::BlockStatus { offset, len, req_one } => {
                let max = if req_one { 1 } else { MAX_EXTENTS };
                match store.block_status(offset, len, max).await {
                    Ok(ext) => return Reply::block_status(h.cookie, &ext),
                    Err(e) => Err(e),
                }
            }
            Command::Disconnect => unreachable!("handled by the reader"),
        };
        match r {
            Ok(()) => Reply::ok(h.cookie),
            Err(errno) => {
                st.request_errors.fetch_add(1, Relaxed);
                let error = NbdError::from_errno(errno);
                let reason = if error == NbdError::NotSup {
                    "zeroing would not be fast"
                } else {
                    "I/O error"
                };
                if error == NbdError::Io {
                    tracing::error!(error = %errno, export = %ex.info.name, "backing store I/O error");
                }
                Reply::error(h, limits.structured, Refusal { error, reason })
            }
        }
    }
}

/// Why a client's connection was closed (logged, rate-limited, and counted).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("client closed in the middle of an option")]
    ClosedInOption,
    #[error("write payload of {0} bytes is abusive")]
    AbusivePayload(u32),
    #[error("truncated frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("negotiation timed out")]
    Timeout,
    #[error("truncated write payload: {0}")]
    TruncatedPayload(std::io::Error),
    #[error("truncated write payload")]
    PayloadEnded,
    #[error(
        "the client read none of its replies for {0:?} (or past the shutdown grace): disconnected"
    )]
    Stalled(Duration),
}

/// A negotiation reply written within [`HANDSHAKE_TIMEOUT`] (a client that reads nothing does
/// not hold its slot).
async fn written(wr: &mut OwnedWriteHalf, out: &[u8]) -> Result<(), ClientError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, wr.write_all(out)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClientError::Timeout),
    }
}

/// Why replies were not all written.
enum Unsent {
    /// The connection failed: the client is gone.
    Io,
    /// The client stopped reading: past [`REPLY_DEADLINE`], or past the grace once shutdown
    /// began.
    Stalled,
}

/// [`send_replies`], bounded: a client that reads nothing cannot hold its connection (and so
/// a demotion, a switchover or SIGTERM) longer than [`REPLY_DEADLINE`], nor past
/// [`SHUTDOWN_GRACE`] once shutdown began, even if it began during the write.
async fn send_bounded(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    pending: &mut Vec<Reply>,
    sd: &watch::Receiver<bool>,
    shutting_since: Option<tokio::time::Instant>,
) -> Result<(), Unsent> {
    let mut sd = sd.clone();
    let grace = async {
        let since = match shutting_since {
            Some(t) => t,
            None => {
                stopped(&mut sd).await;
                tokio::time::Instant::now()
            }
        };
        tokio::time::sleep_until(since + SHUTDOWN_GRACE).await;
    };
    // Biased: the write is polled first, and when the socket takes it at once (the common
    // case) the timers are never polled, so never registered.
    tokio::select! {
        biased;
        r = send_replies(wr, out, pending) => r.map_err(|_| Unsent::Io),
        () = tokio::time::sleep(REPLY_DEADLINE) => Err(Unsent::Stalled),
        () = grace => Err(Unsent::Stalled),
    }
}

/// One of the [`MAX_PER_SOURCE`] connections an address may hold; given back when dropped.
struct SourceSlot {
    sources: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    fn take(
        sources: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut m = sources.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self { sources: Arc::clone(sources), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sources.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Reads from a socket through a buffer, so waiting for a header is cancel-safe.
struct Reader {
    rd: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// Ensures `n` bytes are buffered. `Ok(false)`: clean EOF with nothing buffered.
    async fn fill(&mut self, n: usize) -> Result<bool, ClientError> {
        while self.buf.len() < n {
            self.buf.reserve(n.max(64 * 1024));
            let got = match self.rd.read_buf(&mut self.buf).await {
                Ok(n) => n,
                // A reset between messages is a hang-up (a client that closed with our data
                // unread, or was killed), not a protocol violation.
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionReset && self.buf.is_empty() =>
                {
                    0
                }
                Err(e) => return Err(e.into()),
            };
            if got == 0 {
                return if self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(ClientError::Truncated { have: self.buf.len(), want: n })
                };
            }
        }
        Ok(true)
    }

    /// Like `fill` with the handshake timeout. `Ok(false)`: the client hung up cleanly between
    /// messages (a TCP health check, a client that changed its mind): not an error.
    async fn fill_timeout(&mut self, n: usize) -> Result<bool, ClientError> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.fill(n)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Reads a write payload into an aligned buffer.
    async fn payload(&mut self, len: usize) -> Result<IoBuf, ClientError> {
        let mut b = IoBuf::with_len(len);
        let have = self.buf.len().min(len);
        b[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        if have < len {
            self.rd.read_exact(&mut b[have..]).await.map_err(ClientError::TruncatedPayload)?;
        }
        Ok(b)
    }

    /// Skips a payload we refused.
    async fn discard(&mut self, mut len: usize) -> Result<(), ClientError> {
        while len > 0 {
            if self.buf.is_empty() && !self.fill(1).await? {
                return Err(ClientError::PayloadEnded);
            }
            let n = self.buf.len().min(len);
            self.buf.advance(n);
            len -= n;
        }
        Ok(())
    }
}

/// What [`Server::take_request`] made of a request.
enum Taken {
    /// Answer at once (a refusal).
    Reply(Reply),
    /// Start it: header, command, write payload, budget units it holds.
    Start(RequestHeader, Command, Option<IoBuf>, u32),
    /// The client asked to disconnect.
    Disconnect,
}

/// A reply ready to send: header bytes and optional READ data.
struct Reply {
    head: BytesMut,
    data: Option<IoBuf>,
}

impl Reply {
    fn ok(cookie: u64) -> Self {
        let mut head = BytesMut::with_capacity(16);
        encode_simple_reply(&mut head, 0, cookie);
        Self { head, data: None }
    }

    fn read(cookie: u64, offset: u64, data: IoBuf, structured: bool) -> Self {
        let mut head = BytesMut::with_capacity(32);
        if structured {
            let len = u32::try_from(data.len()).expect("reads are bounded by MAX_PAYLOAD");
            encode_read_chunk_header(&mut head, cookie, offset, len);
        } else {
            encode_simple_reply(&mut head, 0, cookie);
        }
        Self { head, data: Some(data) }
    }

    fn block_status(cookie: u64, extents: &[Extent]) -> Self {
        let mut head = BytesMut::with_capacity(24 + extents.len() * 8);
        encode_block_status(&mut head, cookie, BASE_ALLOCATION_ID, extents);
        Self { head, data: None }
    }

    fn error(h: &RequestHeader, structured: bool, r: Refusal) -> Self {
        let mut head = BytesMut::with_capacity(64);
        // A READ (and BLOCK_STATUS) under structured replies must be answered with a chunk.
        if structured && (h.kind == CMD_READ || h.kind == CMD_BLOCK_STATUS) {
            encode_error_chunk(&mut head, h.cookie, r.error, r.reason);
        } else {
            encode_simple_reply(&mut head, r.error.code(), h.cookie);
        }
        Self { head, data: None }
    }
}

/// Writes `pending` replies: small ones coalesced into one write, large READ data written
/// straight from its buffer.
async fn send_replies(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    pending: &mut Vec<Reply>,
) -> std::io::Result<()> {
    for r in pending.drain(..) {
        out.extend_from_slice(&r.head);
        if let Some(d) = r.data {
            if d.len() <= 64 * 1024 {
                out.extend_from_slice(&d);
            } else {
                wr.write_all(out).await?;
                out.clear();
                wr.write_all(&d).await?;
            }
        }
        if out.len() >= COALESCE {
            wr.write_all(out).await?;
            out.clear();
        }
    }
    if !out.is_empty() {
        wr.write_all(out).await?;
        out.clear();
    }
    Ok(())
}
