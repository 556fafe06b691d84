//! Which worker the proxy sends traffic to, right now.
//!
//! A worker becomes the upstream when it passes its readiness check and stops
//! being it when its run ends. Each published worker is a *generation* with
//! its own connection pool: after a reload (SIGHUP) the old worker's pooled
//! connections are never reused, so no request races the old worker closing
//! an idle connection. Requests that find no upstream wait (bounded) on a
//! `watch` channel for the next one instead of failing at once.
//!
//! Each HTTP thread (`serve/mod.rs`) has its own pool to each generation,
//! so a proxied request, its pooled connection and that connection's task
//! stay on one thread and one runtime: no other thread is woken for it.
//!
//! A worker listens on a Unix socket in the gateway's private directory
//! (`worker/mod.rs`): only the gateway can reach it, and a request costs
//! the kernel less than over loopback TCP (no TCP state, acks or timers).
//!
//! The pool ([`WorkerPool`]) is hyper's HTTP/1 connections kept idle in a
//! stack: a request takes the most recently used one (or connects), and its
//! response body gives the connection back when it ends ([`Pooled`]), on the
//! same thread, with no task spawned for it. A request that a reused
//! connection never sent (the worker closed it while idle) is sent on
//! another.

use std::cell::Cell;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::serve::Body;

/// One published worker.
pub struct Upstream {
    /// The worker's Unix socket.
    pub addr: Arc<Path>,
    /// The `Host` header the worker receives (`localhost`).
    pub host: hyper::header::HeaderValue,
    pub generation: u64,
    /// One pool per HTTP thread, the last for any other thread (made on first use).
    pools: Box<[OnceLock<Arc<WorkerPool>>]>,
    /// Set when a reload published a successor while this one still ran:
    /// it drains gracefully, so a request it dropped was never processed.
    /// (A crashed worker is withdrawn instead, and this stays false.)
    pub replaced: AtomicBool,
}

thread_local! {
    /// This thread's index among the HTTP threads, if it is one.
    static HTTP_THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as HTTP thread `index` (`serve/mod.rs`): its
/// requests use that thread's pools.
pub fn set_http_thread(index: usize) {
    HTTP_THREAD.with(|t| t.set(Some(index)));
}

impl Upstream {
    /// The calling thread's pool to this worker.
    pub fn client(&self) -> &Arc<WorkerPool> {
        let shared = self.pools.len() - 1;
        let slot = HTTP_THREAD.with(Cell::get).filter(|i| *i < shared).unwrap_or(shared);
        self.pools[slot].get_or_init(|| WorkerPool::new(self.addr.clone()))
    }
}

/// The current upstream, shared by the worker's policy (writer) and the proxy (readers).
#[derive(Clone)]
pub struct Upstreams {
    tx: watch::Sender<Option<Arc<Upstream>>>,
    next_generation: Arc<AtomicU64>,
    /// How many HTTP threads serve: each generation gets a pool for each.
    http_threads: Arc<AtomicUsize>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams { tx: watch::Sender::new(None), next_generation: Arc::new(AtomicU64::new(1)), http_threads: Arc::default() }
    }
}

impl Upstreams {
    /// Says how many HTTP threads serve, before they start.
    pub fn set_http_threads(&self, threads: usize) {
        self.http_threads.store(threads, Ordering::Relaxed);
    }

    /// Makes the worker listening on the Unix socket `addr` the upstream; returns its generation.
    pub fn publish(&self, addr: Arc<Path>) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let host = hyper::header::HeaderValue::from_static("localhost");
        let pools = (0..=self.http_threads.load(Ordering::Relaxed)).map(|_| OnceLock::new()).collect();
        let upstream = Arc::new(Upstream { addr, host, generation, pools, replaced: AtomicBool::new(false) });
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

/// Idle connections one HTTP thread's pool keeps to a worker. A pooled
/// connection costs about 18 KiB here (hyper's read and write buffers, its
/// task) and as much in the worker; a burst of 1,000 clients used to leave
/// 1,000 of them idle for 20 s (bench/tls.py, "HTTPS"). Under steady load
/// the idle ones are few (each is taken again at once), so the cap only
/// trims what a burst leaves behind: 128 per thread is twice what the
/// 64-connection benchmarks keep busy on one thread.
const POOL_MAX_IDLE: usize = 128;

/// How long an idle connection is kept: below any idle limit a worker may
/// have, so the pool never hands out a connection about to be closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Idle connections kept past [`POOL_SURPLUS_AFTER`], the most recently
/// used: enough for the next requests after a lull.
const POOL_KEEP_WARM: usize = 8;

/// How long an idle connection beyond the [`POOL_KEEP_WARM`] most recent is
/// kept. Requests take the most recently used first, so under steady load
/// the ones at the bottom of the stack are those the load no longer needs:
/// a burst's surplus, closed two seconds after it (with its memory, here
/// and in the worker) instead of twenty.
const POOL_SURPLUS_AFTER: Duration = Duration::from_secs(2);

/// How often the pool looks for connections to close.
const POOL_EVICT_EVERY: Duration = Duration::from_secs(1);

/// One thread's keep-alive connections to one worker.
pub struct WorkerPool {
    socket: Arc<Path>,
    /// Idle connections, the most recently used last.
    idle: Mutex<Vec<(SendRequest<Body>, Instant)>>,
}

/// Why a request to the worker got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the worker: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP handshake with the worker failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("the worker's connection failed: {0}")]
    Exchange(#[source] hyper::Error),
}

impl UpstreamError {
    /// Whether nothing of the request reached the worker.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::Handshake(_))
    }
}

impl WorkerPool {
    fn new(socket: Arc<Path>) -> Arc<WorkerPool> {
        let pool = Arc::new(WorkerPool { socket, idle: Mutex::new(Vec::new()) });
        // Closes connections idle for too long even when no request comes
        // to notice (a burst's leftovers); ends with the pool.
        let weak = Arc::downgrade(&pool);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(POOL_EVICT_EVERY).await;
                    match weak.upgrade() {
                        Some(pool) => pool.evict(Instant::now()),
                        None => return,
                    }
                }
            });
        }
        pool
    }

    /// Closes, as of `now`, the idle connections kept too long.
    fn evict(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let warm_from = idle.len().saturating_sub(POOL_KEEP_WARM);
        let mut i = 0;
        idle.retain(|(sender, since)| {
            let keep = !sender.is_closed() && now.saturating_duration_since(*since) < if i >= warm_from { POOL_IDLE_TIMEOUT } else { POOL_SURPLUS_AFTER };
            i += 1;
            keep
        });
    }

    fn take(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= POOL_MAX_IDLE {
            // The oldest goes: it is the likeliest to stay unused.
            idle.remove(0);
        }
        idle.push((sender, Instant::now()));
    }

    async fn connect(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let stream = UnixStream::connect(&*self.socket).await.map_err(UpstreamError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(UpstreamError::Handshake)?;
        // On this thread's runtime, beside the request that uses it.
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("a connection to the worker ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends `request` on an idle connection, or a new one. Its response's
    /// body gives the connection back to the pool once it ends.
    pub async fn request(self: &Arc<Self>, mut request: Request<Body>) -> Result<Response<Pooled>, UpstreamError> {
        // hyper's connection writes the target as it is: the worker gets the
        // origin form (`/path?query`), and a Host.
        if request.uri().scheme().is_some() || request.uri().authority().is_some() {
            let target = request.uri().path_and_query().cloned().unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
            *request.uri_mut() = hyper::Uri::from(target);
        }
        request.headers_mut().entry(hyper::header::HOST).or_insert(hyper::header::HeaderValue::from_static("localhost"));
        while let Some(mut sender) = self.take() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled(response, sender)),
                Err(mut failed) => match failed.take_message() {
                    // Never written: the worker closed this idle connection meanwhile.
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Exchange(failed.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(self.pooled(response, sender)),
            Err(e) => Err(UpstreamError::Exchange(e)),
        }
    }

    fn pooled(self: &Arc<Self>, response: Response<Incoming>, sender: SendRequest<Body>) -> Response<Pooled> {
        // A protocol switch takes the connection for good.
        let back = (response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS).then(|| (sender, Arc::downgrade(self)));
        response.map(|body| Pooled { body, back })
    }
}

/// A response body from the worker that gives its connection back to the
/// pool when it has been read to its end (or was empty). Dropped before
/// its end, it drops the connection with it: hyper closes it.
pub struct Pooled {
    body: Incoming,
    back: Option<(SendRequest<Body>, Weak<WorkerPool>)>,
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            if let Some(pool) = pool.upgrade() {
                pool.give_back(sender);
            }
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.body) {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A worker stand-in on a Unix socket: answers `ok` (with `Connection:
    /// close` when `close`), counting the connections it accepts.
    async fn socket_server(close: bool) -> (Arc<Path>, Arc<AtomicUsize>, std::path::PathBuf) {
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("omni-pool-test-{}-{}", std::process::id(), SERVERS.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path: Arc<Path> = dir.join("api.sock").into();
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async { Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")))) });
                    let _ = hyper::server::conn::http1::Builder::new().keep_alive(!close).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        (path, accepted, dir)
    }

    async fn get(pool: &Arc<WorkerPool>) -> Bytes {
        let request = Request::get("http://localhost/x").body(crate::serve::full("")).unwrap();
        let response = pool.request(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read_and_dropped_when_the_worker_closes_it() {
        let (path, accepted, dir) = socket_server(false).await;
        let pool = WorkerPool::new(path);
        for _ in 0..5 {
            assert_eq!(get(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for requests one after another");
        // Two at once need two; both are kept afterwards.
        let (a, b) = tokio::join!(get(&pool), get(&pool));
        assert_eq!((a, b), (Bytes::from_static(b"ok"), Bytes::from_static(b"ok")));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();

        // A worker that closes after each answer: no closed connection is handed out.
        let (path, accepted, dir) = socket_server(true).await;
        let pool = WorkerPool::new(path);
        for _ in 0..3 {
            assert_eq!(get(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_bursts_surplus_is_closed_after_two_seconds_and_the_most_recent_kept_warm_until_the_idle_timeout() {
        let (path, accepted, dir) = socket_server(false).await;
        let pool = WorkerPool::new(path);
        let burst = POOL_KEEP_WARM + 4;
        let answers = futures::future::join_all((0..burst).map(|_| get(&pool))).await;
        assert!(answers.iter().all(|a| a == "ok"));
        assert_eq!((accepted.load(Ordering::SeqCst), pool.idle.lock().unwrap().len()), (burst, burst));
        let newest: Vec<_> = pool.idle.lock().unwrap()[burst - POOL_KEEP_WARM..].iter().map(|(_, since)| *since).collect();
        let now = Instant::now();
        pool.evict(now + POOL_SURPLUS_AFTER / 2);
        assert_eq!(pool.idle.lock().unwrap().len(), burst, "nothing is surplus yet");
        pool.evict(now + POOL_SURPLUS_AFTER);
        let kept: Vec<_> = pool.idle.lock().unwrap().iter().map(|(_, since)| *since).collect();
        assert_eq!(kept, newest, "the most recently used are kept warm");
        pool.evict(now + POOL_IDLE_TIMEOUT);
        assert!(pool.idle.lock().unwrap().is_empty(), "nothing outlives the idle timeout");
        assert_eq!(get(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), burst + 1, "a request after it connects anew");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn only_a_reload_marks_the_previous_worker_replaced() {
        let ups = Upstreams::default();
        let a = ups.publish(Path::new("/nonexistent/api-1.sock").into());
        let first = ups.current().unwrap();
        let b = ups.publish(Path::new("/nonexistent/api-2.sock").into());
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

    #[test]
    fn each_http_thread_has_its_own_pool_to_a_worker() {
        let ups = Upstreams::default();
        ups.set_http_threads(2);
        ups.publish(Path::new("/nonexistent/api-1.sock").into());
        let upstream = ups.current().unwrap();
        let pool = |index: Option<usize>| {
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                if let Some(i) = index {
                    set_http_thread(i);
                }
                let first = upstream.client() as *const _ as usize;
                assert_eq!(first, upstream.client() as *const _ as usize, "one pool per thread, kept");
                first
            })
            .join()
            .unwrap()
        };
        let (zero, one, other, beyond) = (pool(Some(0)), pool(Some(1)), pool(None), pool(Some(7)));
        assert_ne!(zero, one, "two HTTP threads share a pool");
        assert!(other != zero && other != one, "a thread that is not an HTTP thread uses an HTTP thread's pool");
        assert_eq!(other, beyond, "an index past the threads falls back to the shared pool");
        assert_eq!(zero, pool(Some(0)), "a thread's pool is the same on every call");
    }
}
