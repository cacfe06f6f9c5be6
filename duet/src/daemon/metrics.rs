//! The Prometheus metrics endpoint.

use super::*;

/// Prometheus metrics: name, help, type, and how to read the value from a resource's status.
pub(super) type Metric =
    (&'static str, &'static str, &'static str, fn(&ResourceStatus) -> Option<u64>);
pub(super) const METRICS: [Metric; 23] = [
    ("size_bytes", "Size of the volume.", "gauge", |r| Some(r.size_bytes)),
    ("nbd_clients", "NBD clients connected.", "gauge", |r| Some(r.stats.clients_connected)),
    ("nbd_reads_total", "NBD reads served.", "counter", |r| Some(r.stats.reads)),
    ("nbd_writes_total", "NBD writes served.", "counter", |r| Some(r.stats.writes)),
    ("nbd_read_bytes_total", "Bytes read by NBD clients.", "counter", |r| Some(r.stats.bytes_read)),
    ("nbd_written_bytes_total", "Bytes written by NBD clients.", "counter", |r| {
        Some(r.stats.bytes_written)
    }),
    ("nbd_flushes_total", "NBD flushes.", "counter", |r| Some(r.stats.flushes)),
    ("nbd_request_errors_total", "NBD requests answered with an error.", "counter", |r| {
        Some(r.stats.request_errors)
    }),
    (
        "nbd_protocol_errors_total",
        "NBD connections closed for protocol violations.",
        "counter",
        |r| Some(r.stats.protocol_errors),
    ),
    (
        "nbd_refused_total",
        "NBD connections closed at accept (an address outside allow, or over a connection limit).",
        "counter",
        |r| Some(r.stats.clients_refused),
    ),
    ("nbd_tls_sessions_total", "NBD connections upgraded to TLS.", "counter", |r| {
        Some(r.stats.tls_sessions)
    }),
    ("nbd_tls_failures_total", "NBD TLS handshakes that failed.", "counter", |r| {
        Some(r.stats.tls_failures)
    }),
    (
        "nbd_idle_disconnects_total",
        "NBD connections closed after idle_timeout_ms.",
        "counter",
        |r| Some(r.stats.idle_disconnects),
    ),
    ("out_of_sync_bytes", "Bytes marked out of sync with the peer.", "gauge", |r| {
        r.replication.as_ref().map(|x| x.out_of_sync_bytes)
    }),
    ("replicated_bytes_total", "Bytes of writes sent to the peer.", "counter", |r| {
        r.replication.as_ref().map(|x| x.sent_data_bytes)
    }),
    ("resync_sent_bytes_total", "Resync bytes sent.", "counter", |r| {
        r.replication.as_ref().map(|x| x.resync_sent_bytes)
    }),
    ("resync_received_bytes_total", "Resync bytes received.", "counter", |r| {
        r.replication.as_ref().map(|x| x.resync_received_bytes)
    }),
    ("peer_connected", "1 when the peer link is up.", "gauge", |r| {
        r.replication.as_ref().map(|x| {
            u64::from(!matches!(
                x.connection,
                replicator::repl::volume::ConnState::StandAlone
                    | replicator::repl::volume::ConnState::Connecting
            ))
        })
    }),
    ("peer_errors_total", "Peer connections dropped for errors or refusals.", "counter", |r| {
        r.replication.as_ref().map(|x| x.peer_errors)
    }),
    (
        "peer_auth_failures_total",
        "Peer connections dropped because the peer's bytes failed authentication (tampering or a wrong secret).",
        "counter",
        |r| r.replication.as_ref().map(|x| x.peer_auth_failures),
    ),
    (
        "foreign_connections_total",
        "Connections to the replication port from another address than the peer's (dropped).",
        "counter",
        |r| r.replication.as_ref().map(|x| x.foreign_connections),
    ),
    (
        "slow_writes_total",
        "Page-cache writes that took over 50 ms (a slow disk).",
        "counter",
        |r| r.replication.as_ref().map(|x| x.slow_writes),
    ),
    (
        "peer_unflushed_bytes",
        "Bytes the peer acknowledged that no peer flush covers yet (resynced after its power loss).",
        "gauge",
        |r| r.replication.as_ref().map(|x| x.peer_unflushed_bytes),
    ),
];

/// Metrics connections served at once.
const METRICS_CONNECTIONS: usize = 8;

pub(super) async fn serve_metrics(
    l: TcpListener,
    state: Arc<State>,
    mut sd: watch::Receiver<bool>,
) {
    // A scrape at a time is the norm; a flood gets a few slots and the rest are closed at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    let accept_log = replicator::ratelimit::Limited::new(5, std::time::Duration::from_secs(30));
    loop {
        tokio::select! {
            r = l.accept() => {
                let mut s = match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors: a breath, not a spin that starves the data path.
                        replicator::warn_limited!(accept_log, error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else { continue };
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    let _slot = slot;
                    let body = st.metrics().await;
                    // Read (and ignore) the request head, then answer with the text format.
                    let mut buf = [0u8; 2048];
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf)).await;
                    let head = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let answer = async {
                        s.write_all(head.as_bytes()).await?;
                        s.write_all(body.as_bytes()).await?;
                        s.shutdown().await
                    };
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), answer).await;
                });
            }
            _ = stopped(&mut sd) => return,
        }
    }
}
