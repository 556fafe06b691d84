//! The gateway's one port: its own endpoints (`/health`, `/gateway/status`,
//! `/metrics`, and the logs, history and streams of `observe.rs`) and
//! everything else handed to the API worker.
//!
//! The listener is bound before anything slow happens, so a taken port is
//! reported at once and `/health` answers 503 with component states while
//! PostgreSQL and the worker are still starting. At stop it stays bound
//! through the drain, so `/health` answers 503 (not "connection refused")
//! while in-flight requests finish.
//!
//! Layer: the HTTP surface, above the storage layers (`relay`, `pitr`,
//! `pg`) whose state it shows and `supervise`/`status`/`config`. The
//! worker's policy is above it and publishes its address through
//! [`upstream::Upstreams`].

pub mod gateway_auth;
pub mod internal;
pub mod logring;
pub mod metrics;
pub mod metrics_history;
pub mod observe;
pub mod proxy;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpLimits;
use crate::pg::external::ExternalDatabase;
use crate::serve::proxy::Proxy;
use crate::status::{Board, GatewayState, State};

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
    /// The recent log, for `/gateway/logs` and its stream.
    pub logs: Arc<crate::serve::logring::LogRing>,
    /// The last hour of counters, for `/gateway/metrics/history`.
    pub history: crate::serve::metrics_history::History,
    /// Asks the worker whether a request may read the protected endpoints.
    pub auth: crate::serve::gateway_auth::GatewayAuth,
    /// The live streams' tasks (`observe.rs`); awaited after the drain.
    pub streams: TaskTracker,
    /// Cancelled when the gateway begins to stop: streams end at once, so
    /// the drain does not wait for responses that never finish.
    pub stop_streams: CancellationToken,
    /// `/gateway/internal/…`, the worker's channel to the gateway.
    pub internal: Arc<crate::serve::internal::Internal>,
    /// Live streams per client address (`observe.rs`).
    pub stream_slots: crate::serve::observe::StreamSlots,
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

/// Serves until `stop` is cancelled, then drains: connections already open
/// finish their in-flight requests (for up to `limits.drain_timeout`) while
/// the listener stays open so `/health` keeps answering 503 to load
/// balancers; proxied requests on connections accepted during the drain are
/// refused with 503. After the drain, whatever is still open (slow requests,
/// upgraded connections) is closed, and every task is awaited.
///
/// Shutdown is one mechanism: `stop` says "finish", `close_all` says "now",
/// and each connection task runs on a [`TaskTracker`] whose `wait` is the
/// "all done".
pub async fn serve(listener: TcpListener, surface: Arc<Surface>, stop: CancellationToken, limits: HttpLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Connections accepted before the stop: the drain waits for these.
    let open = TaskTracker::new();
    // Connections accepted during the drain: answered at once, never waited for.
    let late = TaskTracker::new();
    let close_all = CancellationToken::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
    loop {
        let Some((stream, peer, permit)) = (tokio::select! {
            accepted = accept(&listener, &slots) => accepted,
            _ = stop.cancelled() => break,
        }) else {
            continue;
        };
        let conn = http1.serve_connection(TokioIo::new(stream), service(&surface, peer, false)).with_upgrades();
        let (stop, close_all) = (stop.clone(), close_all.clone());
        open.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = close_all.cancelled() => {}
                    }
                }
            }
            drop(permit);
        });
    }

    // The drain. `/health` already answers 503 (the board says stopping).
    open.close();
    let mut http1_closing = http1.clone();
    http1_closing.keep_alive(false);
    let answer_late = async {
        loop {
            let Some((stream, peer, permit)) = accept(&listener, &slots).await else { continue };
            let conn = http1_closing.serve_connection(TokioIo::new(stream), service(&surface, peer, true));
            let close_all = close_all.clone();
            late.spawn(async move {
                tokio::select! {
                    _ = conn => {}
                    _ = close_all.cancelled() => {}
                }
                drop(permit);
            });
        }
    };
    let drained = tokio::select! {
        _ = open.wait() => true,
        _ = answer_late => unreachable!("answering during the drain only ends with the drain"),
        _ = tokio::time::sleep(limits.drain_timeout) => false,
    };
    if !drained {
        tracing::warn!("in-flight requests still running after {} s; closing them", limits.drain_timeout.as_secs());
    }
    drop(listener);
    close_all.cancel();
    surface.streams.close();
    surface.streams.wait().await;
    surface.proxy.close_tunnels.cancel();
    surface.proxy.tunnels.close();
    late.close();
    open.wait().await;
    late.wait().await;
    surface.proxy.tunnels.wait().await;
}

/// Waits for a connection slot and a client; `None` after an accept error
/// (out of file descriptors and the like), having paused so as not to spin.
async fn accept(listener: &TcpListener, slots: &Arc<Semaphore>) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // At the connection limit, stop accepting until one closes: the
    // kernel's backlog holds further clients instead of us dropping them.
    let permit = slots.clone().acquire_owned().await.expect("semaphore is never closed");
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer, permit))
        }
        Err(e) => {
            tracing::warn!("accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// The request handler of one connection; `draining` for those accepted after a stop began.
fn service(surface: &Arc<Surface>, peer: SocketAddr, draining: bool) -> impl hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send> + Send {
    let surface = surface.clone();
    let peer = Arc::new(crate::serve::proxy::Peer::new(peer));
    hyper::service::service_fn(move |req| {
        let (surface, peer) = (surface.clone(), peer.clone());
        async move { Ok::<_, Infallible>(route(&surface, &peer, req, draining).await) }
    })
}

/// Gateway-owned paths are answered here; everything else goes to the worker.
async fn route(surface: &Arc<Surface>, conn: &crate::serve::proxy::Peer, req: Request<Incoming>, draining: bool) -> Response<Body> {
    let peer = conn.addr;
    let is_read = matches!(*req.method(), Method::GET | Method::HEAD);
    let client = crate::serve::proxy::client_addr(req.headers(), peer.ip(), &surface.proxy.limits.trusted_proxies);
    match req.uri().path() {
        "/health" if is_read => health(surface).await,
        "/gateway/status" if is_read => {
            let mut doc = surface.board.to_json();
            if let Some(db) = &surface.database {
                doc["database"] = db.status_json().await.0;
            }
            json(StatusCode::OK, &doc)
        }
        "/metrics" if is_read => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(full(surface.proxy.metrics.render(&surface.board)))
            .expect("static response parts are valid"),
        "/gateway/logs" if is_read => crate::serve::observe::logs(surface, req, client).await,
        "/gateway/logs/stream" if is_read => crate::serve::observe::logs_stream(surface, req, client).await,
        "/gateway/metrics/history" if is_read => crate::serve::observe::metrics_history(surface, req, client).await,
        "/gateway/events" if is_read => crate::serve::observe::events(surface, client).await,
        "/health" | "/gateway/status" | "/metrics" => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        "/gateway/logs" | "/gateway/logs/stream" | "/gateway/metrics/history" | "/gateway/events" => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        // Only the worker, on this machine, has business here.
        path if path.starts_with("/gateway/internal/") && !peer.ip().to_canonical().is_loopback() => {
            error(StatusCode::FORBIDDEN, "forbidden", "the gateway's internal endpoints answer only on the loopback interface, to its own worker")
        }
        path if path.starts_with("/gateway/internal/") => crate::serve::internal::handle(&surface.internal, req).await,
        // A client that connected after the stop began gets a clear answer
        // instead of a request the drain would have to wait for.
        _ if draining => error(StatusCode::SERVICE_UNAVAILABLE, "gateway_stopping", "the gateway is stopping; retry in a moment or on another instance"),
        _ => surface.proxy.handle(req, conn).await,
    }
}

async fn health(surface: &Surface) -> Response<Body> {
    let board = &surface.board;
    let (snapshot, mut doc) = board.snapshot_and_json();
    let mut problems: Vec<String> = Vec::new();
    if snapshot.gateway == GatewayState::Stopping {
        problems.push("the gateway is stopping".into());
    }
    problems.extend(snapshot.iter().filter(|(n, c)| c.state != State::Ready && !crate::status::is_auxiliary(n)).map(|(n, c)| match &c.detail {
        Some(d) => format!("{n} is {} ({d})", c.state),
        None => format!("{n} is {}", c.state),
    }));
    if let Some(db) = &surface.database {
        let (view, problem) = db.status_json().await;
        problems.extend(problem);
        doc["database"] = view;
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
