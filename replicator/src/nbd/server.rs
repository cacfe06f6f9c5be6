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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::negotiate::{BASE_ALLOCATION_ID, ExportInfo, Negotiation, Session, Step, Tls};
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
/// Connections served at once by default; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 128;
/// Connections from one address at once by default: one source that opens connections and
/// idles cannot take every slot (a client reconnecting after a failover gets in). Half of them,
/// not fewer: a hypervisor host with several multi-connection disks is one address with many
/// connections.
pub const MAX_PER_SOURCE: usize = MAX_CONNECTIONS / 2;
/// How long a client may leave replies unread (its receive window full) before it is
/// disconnected, by default: a client that stops reading pins no buffers and holds up no
/// demotion.
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
    /// Connections closed at accept: an address outside `allow`, or over a connection limit
    /// (counted on the listener's first export).
    pub clients_refused: AtomicU64,
    /// Connections upgraded to TLS.
    pub tls_sessions: AtomicU64,
    /// TLS handshakes that failed (a bad or missing client certificate, a client that does not
    /// trust ours, a timeout).
    pub tls_failures: AtomicU64,
    /// Connections closed after `idle_timeout_ms` without a request.
    pub idle_disconnects: AtomicU64,
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
    #[serde(default)]
    pub clients_refused: u64,
    #[serde(default)]
    pub tls_sessions: u64,
    #[serde(default)]
    pub tls_failures: u64,
    #[serde(default)]
    pub idle_disconnects: u64,
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
            clients_refused: self.clients_refused.load(Relaxed),
            tls_sessions: self.tls_sessions.load(Relaxed),
            tls_failures: self.tls_failures.load(Relaxed),
            idle_disconnects: self.idle_disconnects.load(Relaxed),
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

/// An IP network of the client allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The network's address (bits past `len` are ignored).
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Network {
    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let bits = |a: u128, width: u32| {
            let len = u32::from(self.len).min(width);
            if len == 0 { 0 } else { a >> (width - len) }
        };
        match (self.addr.to_canonical(), ip.to_canonical()) {
            (V4(n), V4(a)) => {
                bits(u128::from(n.to_bits()), 32) == bits(u128::from(a.to_bits()), 32)
            }
            (V6(n), V6(a)) => bits(n.to_bits(), 128) == bits(a.to_bits(), 128),
            _ => false,
        }
    }
}

/// TLS of one listener.
#[derive(Clone)]
pub enum TlsPolicy {
    /// No TLS: `NBD_OPT_STARTTLS` is unsupported.
    Off,
    /// Clients may upgrade.
    Optional(tokio_rustls::TlsAcceptor),
    /// Clients must upgrade before anything else.
    Require(tokio_rustls::TlsAcceptor),
}

impl std::fmt::Debug for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsPolicy::Off => "Off",
            TlsPolicy::Optional(_) => "Optional",
            TlsPolicy::Require(_) => "Require",
        })
    }
}

impl TlsPolicy {
    /// `Optional` or `Require` with `config`.
    pub fn new(required: bool, config: Arc<rustls::ServerConfig>) -> Self {
        let a = tokio_rustls::TlsAcceptor::from(config);
        if required { TlsPolicy::Require(a) } else { TlsPolicy::Optional(a) }
    }

    fn mode(&self) -> Tls {
        match self {
            TlsPolicy::Off => Tls::Unavailable,
            TlsPolicy::Optional(_) => Tls::Offered,
            TlsPolicy::Require(_) => Tls::Required,
        }
    }

    fn acceptor(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        match self {
            TlsPolicy::Off => None,
            TlsPolicy::Optional(a) | TlsPolicy::Require(a) => Some(a),
        }
    }
}

/// What one listener admits and how long it waits (`[resource.nbd]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// TLS.
    pub tls: TlsPolicy,
    /// Client networks let in; empty: every address.
    pub allow: Vec<Network>,
    /// A connection with nothing in flight that sends no request for this long is closed;
    /// `None`: never.
    pub idle_timeout: Option<Duration>,
    /// How long a client may leave its replies unread.
    pub reply_deadline: Duration,
    /// Connections at once.
    pub max_connections: usize,
    /// Connections from one address at once.
    pub max_per_source: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            tls: TlsPolicy::Off,
            allow: Vec::new(),
            idle_timeout: None,
            reply_deadline: REPLY_DEADLINE,
            max_connections: MAX_CONNECTIONS,
            max_per_source: MAX_PER_SOURCE,
        }
    }
}

impl Policy {
    fn admits(&self, ip: std::net::IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(ip))
    }
}

/// The exports of one listener.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Export>,
    infos: Vec<ExportInfo>,
    policy: Policy,
    log_limit: Limited,
}

impl Server {
    /// A server for `exports` under `policy`.
    pub fn new(exports: Vec<Export>, policy: Policy) -> Arc<Self> {
        let infos = exports.iter().map(|e| e.info.clone()).collect();
        let log_limit = Limited::new(10, Duration::from_secs(10));
        Arc::new(Self { exports, infos, policy, log_limit })
    }

    /// Counts on the listener's first export (connection-level events before an export is
    /// chosen).
    fn listener_stats(&self) -> Option<&Stats> {
        self.exports.first().map(|e| &e.stats)
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
                        let refused = |why: &str| {
                            if let Some(st) = self.listener_stats() {
                                st.clients_refused.fetch_add(1, Relaxed);
                            }
                            self.log_client(peer, why);
                        };
                        if !self.policy.admits(peer.ip()) {
                            refused("the address is not in the allow list");
                            continue;
                        }
                        if conns.len() >= self.policy.max_connections {
                            refused("too many connections");
                            continue;
                        }
                        let Some(slot) = SourceSlot::take(&sources, peer.ip(), self.policy.max_per_source) else {
                            refused(&format!("more than {} connections from this address", self.policy.max_per_source));
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
                        // Out of descriptors: a pause, not a spin, and a few lines, not one
                        // every pause.
                        crate::warn_limited!(self.log_limit, error = %e, "NBD accept failed");
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
        let mut sd_neg = sd.clone();
        let negotiating = self.listener_stats().map(|s| &s.clients_negotiating);
        if let Some(n) = negotiating {
            n.fetch_add(1, Relaxed);
        }
        // A client still negotiating when shutdown begins has nothing in flight: hang up.
        let negotiated = tokio::select! {
            r = self.handshake(sock, &sd) => r,
            _ = stopped(&mut sd_neg) => Ok(None),
        };
        if let Some(n) = negotiating {
            n.fetch_sub(1, Relaxed);
        }
        match negotiated {
            Ok(Some(Ready::Plain(conn, wr, session))) => {
                self.session(conn, wr, session, peer, sd).await;
            }
            Ok(Some(Ready::Tls(conn, wr, session))) => {
                self.session(conn, wr, session, peer, sd).await;
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(st) = self.listener_stats() {
                    st.protocol_errors.fetch_add(1, Relaxed);
                }
                self.log_client(peer, &format!("during negotiation: {e}"));
            }
        }
    }

    async fn session<R, W>(
        &self,
        conn: Reader<R>,
        wr: W,
        session: Session,
        peer: SocketAddr,
        sd: watch::Receiver<bool>,
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let export = &self.exports[session.export];
        export.stats.clients_connected.fetch_add(1, Relaxed);
        export.stats.clients_total.fetch_add(1, Relaxed);
        tracing::debug!(%peer, export = %export.info.name, structured = session.structured, "NBD client connected");
        let limits = Limits::new(&export.info, &session);
        match self.transmit(conn, wr, session.export, limits, sd).await {
            Ok(Ended::Normally) => {}
            Ok(Ended::Idle) => {
                export.stats.idle_disconnects.fetch_add(1, Relaxed);
                tracing::debug!(%peer, "NBD client idle past idle_timeout_ms: disconnected");
            }
            Err(e) => {
                export.stats.protocol_errors.fetch_add(1, Relaxed);
                self.log_client(peer, &e.to_string());
            }
        }
        export.stats.clients_connected.fetch_sub(1, Relaxed);
    }

    /// The greeting, the options, and the TLS upgrade if the client asks for it.
    async fn handshake(
        &self,
        sock: TcpStream,
        sd: &watch::Receiver<bool>,
    ) -> Result<Option<Ready>, ClientError> {
        let (rd, mut wr) = sock.into_split();
        let mut conn = Reader::new(rd);
        let mut out = BytesMut::with_capacity(1024);
        encode_greeting(&mut out);
        written(&mut wr, &out).await?;
        if !conn.fill_timeout(4).await? {
            return Ok(None);
        }
        let flags = decode_client_flags(&conn.buf)?.expect("4 bytes");
        conn.buf.advance(4);
        let mut neg = Negotiation::new(&self.infos, flags, self.policy.tls.mode());
        match self.options(&mut conn, &mut wr, &mut neg, sd).await? {
            Negotiated::Session(s) => return Ok(Some(Ready::Plain(conn, wr, s))),
            Negotiated::Close => return Ok(None),
            Negotiated::StartTls => {}
        }
        // A client waits for the ACK before its ClientHello: bytes already here broke that rule.
        if !conn.buf.is_empty() {
            return Err(ClientError::EarlyTlsData);
        }
        let acceptor = self.policy.tls.acceptor().expect("STARTTLS is acknowledged only with TLS");
        let sock = conn.rd.reunite(wr).expect("the two halves of one socket");
        let failed = || {
            if let Some(st) = self.listener_stats() {
                st.tls_failures.fetch_add(1, Relaxed);
            }
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                failed();
                return Err(ClientError::Tls(e));
            }
            Err(_) => {
                failed();
                return Err(ClientError::Timeout);
            }
        };
        if let Some(st) = self.listener_stats() {
            st.tls_sessions.fetch_add(1, Relaxed);
        }
        let (rd, mut wr) = tokio::io::split(tls);
        let mut conn = Reader::new(rd);
        let mut neg = Negotiation::new(&self.infos, flags, Tls::Established);
        match self.options(&mut conn, &mut wr, &mut neg, sd).await? {
            Negotiated::Session(s) => Ok(Some(Ready::Tls(conn, wr, s))),
            Negotiated::Close => Ok(None),
            Negotiated::StartTls => unreachable!("an established TLS session refuses STARTTLS"),
        }
    }

    /// Option haggling until transmission, a close, or a TLS upgrade.
    async fn options<R, W>(
        &self,
        conn: &mut Reader<R>,
        wr: &mut W,
        neg: &mut Negotiation<'_>,
        sd: &watch::Receiver<bool>,
    ) -> Result<Negotiated, ClientError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::with_capacity(1024);
        loop {
            if !conn.fill_timeout(OPTION_HEADER_LEN).await? {
                return Ok(Negotiated::Close);
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
                Step::Close => return Ok(Negotiated::Close),
                Step::Transmit(s) => return Ok(Negotiated::Session(s)),
                Step::StartTls => return Ok(Negotiated::StartTls),
            }
        }
    }

    /// The transmission phase of one connection, in one task: it reads requests, keeps the
    /// in-flight ones in a `FuturesUnordered`, and writes replies as they complete, coalescing
    /// whatever is ready into one write. One task (instead of a reader, a writer and a task per
    /// request) means no cross-thread wake-ups and no contention on the socket between threads.
    async fn transmit<R, W>(
        &self,
        mut conn: Reader<R>,
        mut wr: W,
        export: usize,
        limits: Limits,
        mut sd: watch::Receiver<bool>,
    ) -> Result<Ended, ClientError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let deadline = self.policy.reply_deadline;
        let idle = self.policy.idle_timeout;
        let mut last_request = tokio::time::Instant::now();
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
                if idle.is_some() {
                    last_request = tokio::time::Instant::now(); // no clock read per request otherwise
                }
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
                        ended = Some(Ok(Ended::Normally));
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
                let sent =
                    send_bounded(&mut wr, &mut out, &mut pending, &sd, shutting_since, deadline);
                match sent.await {
                    Ok(()) => {}
                    Err(Unsent::Io) => break Ok(Ended::Normally), // the client went away
                    Err(Unsent::Stalled) => break Err(ClientError::Stalled(deadline)),
                }
            }
            let grace = shutting_since.map(|t| t + SHUTDOWN_GRACE);
            // Idle: nothing in flight, nothing buffered, no request for `idle`.
            let idle_at = idle
                .filter(|_| inflight.is_empty() && conn.buf.is_empty() && shutting_since.is_none())
                .map(|d| last_request + d);
            tokio::select! {
                biased;
                Some((reply, u)) = inflight.next(), if !inflight.is_empty() => {
                    units -= u;
                    pending.push(reply);
                }
                // Cancel-safe: partial bytes stay in conn.buf.
                r = conn.fill(REQUEST_HEADER_LEN), if room => match r {
                    Ok(true) => {}
                    Ok(false) => break Ok(Ended::Normally), // closed at a request boundary
                    Err(e) => break Err(e),
                },
                _ = stopped(&mut sd), if shutting_since.is_none() => {
                    shutting_since = Some(tokio::time::Instant::now());
                }
                () = until(grace) => {
                    break Ok(Ended::Normally); // grace over: hard disconnect
                }
                () = until(idle_at) => {
                    break Ok(Ended::Idle);
                }
            }
        };
        // Finish what is in flight; answer it if the client still listens (and reads).
        while let Some((reply, _)) = inflight.next().await {
            pending.push(reply);
        }
        let sent = send_bounded(&mut wr, &mut out, &mut pending, &sd, shutting_since, deadline);
        let sent = sent.await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, wr.shutdown()).await;
        match (result, sent) {
            (Ok(_), Err(Unsent::Stalled)) => Err(ClientError::Stalled(deadline)),
            (r, _) => r,
        }
    }

    /// Decodes, validates and (for writes) reads the payload of the next buffered request.
    async fn take_request<R: AsyncRead + Unpin>(
        &self,
        conn: &mut Reader<R>,
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
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("the client sent bytes before the STARTTLS acknowledgement")]
    EarlyTlsData,
}

/// How a transmission phase ended without a protocol error.
enum Ended {
    /// The client disconnected, went away, or shutdown ended it.
    Normally,
    /// Closed after `idle_timeout_ms` without a request.
    Idle,
}

/// What negotiation produced.
enum Negotiated {
    Session(Session),
    Close,
    StartTls,
}

/// A connection ready for transmission, plain or over TLS.
enum Ready {
    Plain(Reader<OwnedReadHalf>, OwnedWriteHalf, Session),
    Tls(
        Reader<ReadHalf<tokio_rustls::server::TlsStream<TcpStream>>>,
        WriteHalf<tokio_rustls::server::TlsStream<TcpStream>>,
        Session,
    ),
}

/// A negotiation reply written within [`HANDSHAKE_TIMEOUT`] (a client that reads nothing does
/// not hold its slot).
async fn written<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> Result<(), ClientError> {
    let write = async {
        wr.write_all(out).await?;
        wr.flush().await
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, write).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClientError::Timeout),
    }
}

/// Sleeps until `at`; never ends without one (a disabled timer reads no clock and registers
/// nothing).
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Why replies were not all written.
enum Unsent {
    /// The connection failed: the client is gone.
    Io,
    /// The client stopped reading: past the reply deadline, or past the grace once shutdown
    /// began.
    Stalled,
}

/// [`send_replies`], bounded: a client that reads nothing cannot hold its connection (and so
/// a demotion, a switchover or SIGTERM) longer than `deadline`, nor past [`SHUTDOWN_GRACE`]
/// once shutdown began, even if it began during the write.
async fn send_bounded<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut BytesMut,
    pending: &mut Vec<Reply>,
    sd: &watch::Receiver<bool>,
    shutting_since: Option<tokio::time::Instant>,
    deadline: Duration,
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
        () = tokio::time::sleep(deadline) => Err(Unsent::Stalled),
        () = grace => Err(Unsent::Stalled),
    }
}

/// One of the connections an address may hold; given back when dropped.
struct SourceSlot {
    sources: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    fn take(
        sources: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Option<Self> {
        let mut m = sources.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
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
struct Reader<R> {
    rd: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    fn new(rd: R) -> Self {
        Self { rd, buf: BytesMut::with_capacity(256 * 1024) }
    }

    /// Ensures `n` bytes are buffered. `Ok(false)`: clean EOF with nothing buffered.
    async fn fill(&mut self, n: usize) -> Result<bool, ClientError> {
        while self.buf.len() < n {
            self.buf.reserve(n.max(64 * 1024));
            let got = match self.rd.read_buf(&mut self.buf).await {
                Ok(n) => n,
                // A reset between messages is a hang-up (a client that closed with our data
                // unread, or was killed), not a protocol violation; so is a TLS client that
                // closes its socket without close_notify.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) && self.buf.is_empty() =>
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
async fn send_replies<W: AsyncWrite + Unpin>(
    wr: &mut W,
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
    // A no-op on a socket; TLS may hold the last record until flushed.
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Network {
        let (a, l) = s.split_once('/').expect("a/len");
        Network { addr: a.parse().expect("address"), len: l.parse().expect("length") }
    }

    #[test]
    fn networks_match_by_prefix_and_family() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("address");
        let n = net("192.0.2.0/24");
        assert!(n.contains(ip("192.0.2.1")) && n.contains(ip("192.0.2.255")));
        assert!(!n.contains(ip("192.0.3.1")));
        assert!(n.contains(ip("::ffff:192.0.2.7")), "a v4-mapped client on a [::] listener");
        assert!(!n.contains(ip("2001:db8::1")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("192.0.2.9/32").contains(ip("192.0.2.9")));
        assert!(!net("192.0.2.9/32").contains(ip("192.0.2.8")));
        let v6 = net("2001:db8:1::/48");
        assert!(v6.contains(ip("2001:db8:1:ffff::1")) && !v6.contains(ip("2001:db8:2::1")));
        assert!(net("::/0").contains(ip("::1")));
        // Host bits in the configured address are ignored, as in a route.
        assert!(net("192.0.2.77/24").contains(ip("192.0.2.1")));
    }

    #[test]
    fn an_empty_allow_list_admits_everyone() {
        let p = Policy::default();
        assert!(p.admits("203.0.113.1".parse().expect("address")));
        let p = Policy { allow: vec![net("10.0.0.0/8")], ..Policy::default() };
        assert!(p.admits("10.9.9.9".parse().expect("address")));
        assert!(!p.admits("11.0.0.1".parse().expect("address")));
    }
}
