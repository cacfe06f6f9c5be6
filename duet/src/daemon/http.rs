//! The HTTP endpoint on `metrics_listen` (hyper, HTTP/1.1 and 1.0, read-only):
//!
//! - `/metrics`: OpenMetrics text when the scraper asks for it (Prometheus does), the classic
//!   text format otherwise ([`super::metrics`]);
//! - `/status`: the JSON of `duet status --json` (schema [`crate::status::SCHEMA`]);
//! - `/`: the status page ([`crate::page`]), HTML with no external assets that refreshes itself.
//!
//! GET and HEAD only (anything else: 405 with `Allow`); unknown paths: 404. At most
//! [`CONNECTIONS`] connections at once: the next is accepted only when one ends (the others wait
//! in the listen backlog, so a scrape after a flood is served late rather than cut off), a
//! request head must arrive within [`HEAD_TIMEOUT`] and a connection ends after
//! [`CONNECTION_TIMEOUT`]: idle connections cannot hold the slots for longer.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::*;

/// Connections served at once.
pub const CONNECTIONS: usize = 16;
/// How long a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay (keep-alive included).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request head.
const MAX_HEAD: usize = 16 * 1024;

pub(super) async fn serve_http(l: TcpListener, state: Arc<State>, mut sd: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let accept_log = replicator::ratelimit::Limited::new(5, Duration::from_secs(30));
    loop {
        // A slot first, then a connection: beyond the cap, clients wait in the backlog.
        let slot = tokio::select! {
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = stopped(&mut sd) => return,
        };
        tokio::select! {
            r = l.accept() => {
                let s = match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors: a breath, not a spin that starves the data path.
                        replicator::warn_limited!(accept_log, error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = hyper::service::service_fn(move |req| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(answer(&st, &req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .max_buf_size(MAX_HEAD)
                        .serve_connection(TokioIo::new(s), svc);
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                });
            }
            _ = stopped(&mut sd) => return,
        }
    }
}

fn reply(code: StatusCode, kind: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The answer to one request.
async fn answer(st: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    st.http.requests.fetch_add(1, Relaxed);
    // HEAD gets GET's head: hyper sends no body for it.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD are served here\n",
        );
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let status = st.status().await;
            let om = metrics::encode_status(&status, &st.http);
            let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
            if metrics::wants_openmetrics(accept) {
                reply(StatusCode::OK, metrics::OPENMETRICS, om)
            } else {
                reply(StatusCode::OK, metrics::CLASSIC, metrics::classic(&om))
            }
        }
        "/status" => {
            let status = st.status().await;
            let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        "/" => {
            let status = st.status().await;
            let events = st.journal.last(crate::page::EVENTS_SHOWN);
            let page = crate::page::render(&status, &events);
            reply(StatusCode::OK, "text/html; charset=utf-8", page)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: this endpoint serves /, /status and /metrics\n",
        ),
    }
}
