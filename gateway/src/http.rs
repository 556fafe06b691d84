//! The gateway's one port: its own endpoints (`/health`, `/gateway/status`,
//! `/metrics`) and everything else handed to the API worker.
//!
//! The listener is bound before anything slow happens, so a taken port is
//! reported at once and `/health` answers 503 with component states while
//! PostgreSQL and the worker are still starting.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::HttpLimits;
use crate::external::ExternalDatabase;
use crate::proxy::Proxy;
use crate::status::{Board, State};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head (request line + headers) accepted; larger gets 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Shared by every connection.
pub struct Surface {
    pub board: Board,
    /// Also owns the metrics, which `/metrics` renders.
    pub proxy: Proxy,
    /// With `DATABASE_URL`, the server `/health` must vouch for: nobody
    /// supervises it, so its state is not on the board.
    pub database: Option<Arc<ExternalDatabase>>,
}

/// Binds the gateway's address, naming `OMNI_PORT`/`OMNI_HOST` on failure.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr}: the port is already in use. Set OMNI_PORT to a free port, or stop what listens on {}",
            addr.port()
        ),
        _ => anyhow::anyhow!("cannot listen on {addr} ({e}); check OMNI_HOST and OMNI_PORT"),
    })
}

/// Accepts connections until `stop` turns true, then lets in-flight requests
/// finish for up to `limits.drain_timeout`.
///
/// Shutdown is one mechanism: every connection task holds a clone of
/// `stop` (the broadcast to finish) and of `done_tx` (whose closing, once all
/// clones are dropped, means "all connections are gone").
pub async fn serve(listener: TcpListener, surface: Arc<Surface>, mut stop: watch::Receiver<bool>, limits: HttpLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
    loop {
        // At the connection limit, stop accepting until one closes: the
        // kernel's backlog holds further clients instead of us dropping them.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc_surface = surface.clone();
        let service = hyper::service::service_fn(move |req| {
            let surface = svc_surface.clone();
            async move { Ok::<_, Infallible>(route(&surface, peer, req).await) }
        });
        let conn = http1.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let mut conn_stop = stop.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = conn_stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
            drop(done);
        });
    }
    drop(listener);
    drop(done_tx);
    if tokio::time::timeout(limits.drain_timeout, done_rx.recv()).await.is_err() {
        tracing::warn!("in-flight requests still running after {} s; closing them", limits.drain_timeout.as_secs());
    }
}

/// Gateway-owned paths are answered here; everything else goes to the worker.
async fn route(surface: &Surface, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let is_read = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/health" if is_read => health(surface).await,
        "/gateway/status" if is_read => json(StatusCode::OK, &surface.board.to_json()),
        "/metrics" if is_read => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(full(surface.proxy.metrics.render(&surface.board)))
            .expect("static response parts are valid"),
        "/health" | "/gateway/status" | "/metrics" => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        _ => surface.proxy.handle(req, peer).await,
    }
}

async fn health(surface: &Surface) -> Response<Body> {
    let board = &surface.board;
    let mut doc = board.to_json();
    let mut problems: Vec<String> = board
        .snapshot()
        .iter()
        .filter(|(_, c)| c.state != State::Ready)
        .map(|(n, c)| format!("{n} is {}", c.state))
        .collect();
    if let Some(db) = &surface.database {
        let (state, detail) = match db.check().await {
            Ok(()) => ("ready", None),
            Err(e) => {
                problems.push(format!("{e:#}"));
                ("unavailable", Some(format!("{e:#}")))
            }
        };
        doc["database"] = serde_json::json!({ "kind": "external", "url": db.display_url, "state": state, "detail": detail });
    }
    let ok = problems.is_empty();
    doc["status"] = serde_json::Value::from(if ok { "ok" } else { "unavailable" });
    if !ok {
        doc["detail"] = serde_json::Value::from(problems.join(", "));
    }
    json(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &doc)
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(full(value.to_string()))
        .expect("static response parts are valid")
}

/// The JSON error shape of SPEC §5.
pub fn error(status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    let body = omni_contract::error_body::ErrorBody::new(code, detail);
    json(status, &serde_json::to_value(body).expect("two strings serialize"))
}
