//! Which worker the proxy sends traffic to, right now.
//!
//! A worker becomes the upstream when it passes its readiness check and stops
//! being it when its run ends. Each published worker is a *generation* with
//! its own connection pool: after a reload (SIGHUP) the old worker's pooled
//! connections are never reused, so no request races the old worker closing
//! an idle connection. Requests that find no upstream wait (bounded) on a
//! `watch` channel for the next one instead of failing at once.
//!
//! Proxied requests travel on a [`Link`]: each client connection keeps its
//! own keep-alive connection to the worker, made on its first request and
//! driven by the client connection's own task ([`Drivers`]). A request and
//! its answer then cross no pool lock, no channel to another task and no
//! thread: the client's bytes in, the worker's bytes out, on one task. (One
//! client connection carries one request at a time, so one worker
//! connection per client connection is all it can use.)

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, watch};

use crate::serve::Body;

/// One published worker.
pub struct Upstream {
    pub addr: SocketAddr,
    /// `addr` as a URI authority and as the `Host` header the worker
    /// receives, made once here rather than formatted for every request.
    pub authority: hyper::http::uri::Authority,
    pub host: hyper::header::HeaderValue,
    pub generation: u64,
    /// A pooled client for the gateway's own questions to the worker
    /// (`gateway_auth.rs`); proxied requests use their connection's [`Link`].
    pub client: Client<HttpConnector, Body>,
    /// Set when a reload published a successor while this one still ran:
    /// it drains gracefully, so a request it dropped was never processed.
    /// (A crashed worker is withdrawn instead, and this stays false.)
    pub replaced: AtomicBool,
}

/// The current upstream, shared by the worker's policy (writer) and the proxy (readers).
#[derive(Clone)]
pub struct Upstreams {
    tx: watch::Sender<Option<Arc<Upstream>>>,
    next_generation: Arc<AtomicU64>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams { tx: watch::Sender::new(None), next_generation: Arc::new(AtomicU64::new(1)) }
    }
}

impl Upstreams {
    /// Makes `addr` the upstream; returns its generation.
    pub fn publish(&self, addr: SocketAddr) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let authority: hyper::http::uri::Authority = addr.to_string().parse().expect("a socket address is a valid authority");
        let host = hyper::header::HeaderValue::from_str(authority.as_str()).expect("a socket address is a valid header value");
        let upstream = Arc::new(Upstream { addr, authority, host, generation, client: pooled_client(), replaced: AtomicBool::new(false) });
        if let Some(previous) = self.tx.send_replace(Some(upstream)) {
            previous.replaced.store(true, Ordering::Relaxed);
        }
        generation
    }

    /// Removes `generation` if it is still the current upstream.
    pub fn withdraw(&self, generation: u64) {
        self.tx.send_if_modified(|cur| match cur {
            Some(u) if u.generation == generation => {
                *cur = None;
                true
            }
            _ => false,
        });
    }

    pub fn current(&self) -> Option<Arc<Upstream>> {
        self.tx.borrow().clone()
    }

    /// Waits up to `timeout` for an upstream whose generation is not `not`.
    pub async fn wait_for(&self, not: Option<u64>, timeout: Duration) -> Option<Arc<Upstream>> {
        // Fast path, taken by nearly every request: no timer, no subscription.
        if let Some(u) = self.current() {
            if Some(u.generation) != not {
                return Some(u);
            }
        }
        let mut rx = self.tx.subscribe();
        let wait = async {
            loop {
                if let Some(u) = rx.borrow_and_update().clone() {
                    if Some(u.generation) != not {
                        return Some(u);
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

/// Keep-alive pool to one worker. Idle connections are evicted after 20 s,
/// below the worker's own idle limit, so the pool never hands out a
/// connection the worker is about to close.
fn pooled_client() -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(20))
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// How long a worker connection may sit idle and still be used: below any
/// idle limit the worker may have, like the pool's eviction above.
const LINK_IDLE: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to the worker that the client connection's task polls.
type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One client connection's link to the worker (see the module doc).
pub struct Link {
    held: Mutex<Option<Held>>,
    drivers: mpsc::UnboundedSender<Driver>,
}

/// The worker connection kept between two requests.
struct Held {
    generation: u64,
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Why a request got no answer from the worker.
pub enum SendError {
    /// Nothing reached the worker (no connection could be made): the
    /// request is handed back and may be sent elsewhere.
    NotSent(Request<Body>, String),
    /// The request went out and the connection failed before its answer.
    Failed(hyper::Error),
}

/// The worker connections of one client connection, polled by its task
/// beside the client connection itself ([`Drivers::run`]).
pub struct Drivers {
    rx: mpsc::UnboundedReceiver<Driver>,
    running: FuturesUnordered<Driver>,
}

/// A link and the drivers its connections need polled.
pub fn link() -> (Link, Drivers) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Link { held: Mutex::new(None), drivers: tx }, Drivers { rx, running: FuturesUnordered::new() })
}

impl Link {
    /// Sends `req` to `upstream` on this link's worker connection, made
    /// first when there is none (or it belongs to another generation, sat
    /// idle too long, or was closed). A kept connection that turns out closed
    /// before the request left is replaced once, the request unchanged.
    pub async fn send(&self, upstream: &Upstream, mut req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let kept = self.held.lock().expect("link lock").take().filter(|h| h.generation == upstream.generation && h.since.elapsed() < LINK_IDLE && !h.sender.is_closed());
        if let Some(mut held) = kept {
            if held.sender.ready().await.is_ok() {
                match held.sender.try_send_request(req).await {
                    Ok(resp) => return Ok(self.keep(upstream, held.sender, resp)),
                    Err(mut e) => match e.take_message() {
                        // Closed under us before anything was written: a new connection.
                        Some(back) => req = back,
                        None => return Err(SendError::Failed(e.into_error())),
                    },
                }
            }
        }
        let mut sender = match self.connect(upstream).await {
            Ok(s) => s,
            Err(why) => return Err(SendError::NotSent(req, why)),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(self.keep(upstream, sender, resp)),
            Err(mut e) => match e.take_message() {
                Some(back) => Err(SendError::NotSent(back, format!("{}", e.error()))),
                None => Err(SendError::Failed(e.into_error())),
            },
        }
    }

    /// Keeps `sender` for the next request, unless the answer upgrades the
    /// connection (it then belongs to the tunnel).
    fn keep(&self, upstream: &Upstream, sender: http1::SendRequest<Body>, resp: Response<Incoming>) -> Response<Incoming> {
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            *self.held.lock().expect("link lock") = Some(Held { generation: upstream.generation, sender, since: Instant::now() });
        }
        resp
    }

    async fn connect(&self, upstream: &Upstream) -> Result<http1::SendRequest<Body>, String> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(upstream.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connecting to the worker at {}: {e}", upstream.addr)),
            Err(_) => return Err(format!("connecting to the worker at {}: no answer within {} s", upstream.addr, CONNECT_TIMEOUT.as_secs())),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| format!("connecting to the worker at {}: {e}", upstream.addr))?;
        let driver: Driver = Box::pin(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("worker connection ended: {e}");
            }
        });
        // The receiver lives as long as the client connection's task; after
        // it, nobody waits for this request's answer anyway.
        let _ = self.drivers.send(driver);
        Ok(sender)
    }

    /// Lets the kept worker connection close once it is idle (the client
    /// connection ended).
    pub fn release(&self) {
        self.held.lock().expect("link lock").take();
    }
}

impl Drivers {
    /// Polls the worker connections as they come; never returns (run it
    /// beside the client connection in a `select!`).
    pub async fn run(&mut self) {
        loop {
            tokio::select! {
                Some(driver) = self.rx.recv() => self.running.push(driver),
                Some(()) = self.running.next(), if !self.running.is_empty() => {}
                else => std::future::pending::<()>().await,
            }
        }
    }

    /// After the client connection: polls what is left until each
    /// connection has ended (idle with its sender released, or handed to a
    /// tunnel), for at most `limit`.
    pub async fn finish(mut self, limit: Duration) {
        self.rx.close();
        while let Ok(driver) = self.rx.try_recv() {
            self.running.push(driver);
        }
        let _ = tokio::time::timeout(limit, async { while self.running.next().await.is_some() {} }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_reload_marks_the_previous_worker_replaced() {
        let ups = Upstreams::default();
        let a = ups.publish("127.0.0.1:1".parse().unwrap());
        let first = ups.current().unwrap();
        let b = ups.publish("127.0.0.1:2".parse().unwrap());
        assert_ne!(a, b);
        assert!(first.replaced.load(Ordering::Relaxed), "replaced by a reload");
        let second = ups.current().unwrap();
        ups.withdraw(a);
        assert_eq!(ups.current().unwrap().generation, b, "withdrawing a stale generation changes nothing");
        ups.withdraw(b);
        assert!(ups.current().is_none());
        assert!(!second.replaced.load(Ordering::Relaxed), "a crashed worker is withdrawn, not replaced");
        assert!(ups.wait_for(None, Duration::from_millis(20)).await.is_none());
    }
}
