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
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::status::{Board, State};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Shared by every connection.
pub struct Surface {
    pub board: Board,
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

/// Accepts connections until `stop` turns true, then waits up to `drain` for
/// in-flight requests to finish.
pub async fn serve(listener: TcpListener, surface: Arc<Surface>, mut stop: watch::Receiver<bool>, drain: Duration) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let surface = surface.clone();
                let service = hyper::service::service_fn(move |req| handle(surface.clone(), peer, req));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("in-flight requests still running after {} s; closing them", drain.as_secs());
    }
}

async fn handle(surface: Arc<Surface>, _peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let response = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/health") => health(&surface.board),
        (&Method::GET | &Method::HEAD, "/gateway/status") => json(StatusCode::OK, &surface.board.to_json()),
        (_, "/health" | "/gateway/status") => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "worker_unavailable", "the API worker is not running; see /gateway/status"),
    };
    Ok(response)
}

fn health(board: &Board) -> Response<Body> {
    let mut doc = board.to_json();
    let ok = board.all_ready();
    doc["status"] = serde_json::Value::from(if ok { "ok" } else { "unavailable" });
    if !ok {
        let waiting: Vec<String> = board
            .snapshot()
            .iter()
            .filter(|(_, c)| c.state != State::Ready)
            .map(|(n, c)| format!("{n} is {}", c.state))
            .collect();
        doc["detail"] = serde_json::Value::from(waiting.join(", "));
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
    json(status, &serde_json::json!({ "detail": detail, "code": code }))
}
