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

use std::cell::Cell;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::serve::Body;

/// One published worker.
pub struct Upstream {
    /// The worker's Unix socket.
    pub addr: Arc<Path>,
    /// The URI authority and `Host` header the worker receives
    /// (`localhost`), made once here rather than for every request.
    pub authority: hyper::http::uri::Authority,
    pub host: hyper::header::HeaderValue,
    pub generation: u64,
    /// One pool per HTTP thread, the last for any other thread (made on first use).
    pools: Box<[OnceLock<Client<WorkerSocket, Body>>]>,
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
    pub fn client(&self) -> &Client<WorkerSocket, Body> {
        let shared = self.pools.len() - 1;
        let slot = HTTP_THREAD.with(Cell::get).filter(|i| *i < shared).unwrap_or(shared);
        self.pools[slot].get_or_init(|| pooled_client(WorkerSocket(self.addr.clone())))
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
        let authority = hyper::http::uri::Authority::from_static("localhost");
        let host = hyper::header::HeaderValue::from_static("localhost");
        let pools = (0..=self.http_threads.load(Ordering::Relaxed)).map(|_| OnceLock::new()).collect();
        let upstream = Arc::new(Upstream { addr, authority, host, generation, pools, replaced: AtomicBool::new(false) });
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

/// Keep-alive pool to one worker. Idle connections are evicted after 20 s,
/// below the worker's own idle limit, so the pool never hands out a
/// connection the worker is about to close.
fn pooled_client(socket: WorkerSocket) -> Client<WorkerSocket, Body> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(20))
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .build(socket)
}

/// The pool's connector: every connection goes to the worker's socket,
/// whatever the request's URI says. A connect on a Unix socket succeeds or
/// fails at once (no handshake to wait for, no timeout needed); a worker
/// that is gone refuses it, which the proxy retries like any refused connect.
#[derive(Clone)]
pub struct WorkerSocket(Arc<Path>);

impl tower_service::Service<Uri> for WorkerSocket {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { UnixStream::connect(&*path).await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
