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
pub mod park;
pub mod plain;
pub mod proxy;
pub mod trim;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
    /// `OMNI_TLS_CERT`/`OMNI_TLS_KEY`: the port speaks HTTPS.
    pub https: Option<Arc<Https>>,
}

/// HTTPS on the gateway's port: TLS from the certificate `live` holds
/// (replaced while serving), then HTTP/2 or HTTP/1.1 as ALPN chose.
pub struct Https {
    pub config: Arc<rustls::ServerConfig>,
    pub live: Arc<crate::tls::Live>,
    pub settings: crate::tls::settings::HttpsSettings,
    /// With `OMNI_TLS_DOMAINS`: the ACME client's status.
    pub acme: Option<Arc<crate::tls::acme::Acme>>,
    /// `Strict-Transport-Security`, `None` with `OMNI_HSTS_MAX_AGE=0`.
    hsts: Option<hyper::header::HeaderValue>,
    /// Idle HTTP/1.1 connections parked ([`park`]).
    parks: park::Parks,
}

impl Https {
    pub fn new(live: Arc<crate::tls::Live>, settings: crate::tls::settings::HttpsSettings, acme: Option<Arc<crate::tls::acme::Acme>>) -> Https {
        let hsts = (settings.hsts_max_age > 0).then(|| hyper::header::HeaderValue::from_str(&format!("max-age={}", settings.hsts_max_age)).expect("digits are a valid header value"));
        Https { config: crate::tls::server_config(live.clone()), live, settings, acme, hsts, parks: park::Parks::default() }
    }

    /// The `tls` member of `/gateway/status`.
    fn status_json(&self) -> serde_json::Value {
        let info = self.live.info();
        let (reloads, last_error) = self.live.reloads();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut doc = serde_json::json!({
            "enabled": true,
            "source": "files",
            "subject": info.subject,
            "issuer": info.issuer,
            "not_after": info.not_after,
            "expires_in_s": info.not_after.saturating_sub(now),
            "chain_length": info.chain_length,
            "http_port": self.settings.http_port,
            "hsts_max_age": self.settings.hsts_max_age,
        });
        match (&self.settings.source, &self.acme) {
            (crate::tls::settings::Source::Files(files), _) => {
                doc["cert_file"] = files.cert.display().to_string().into();
                doc["key_file"] = files.key.display().to_string().into();
                doc["reloads"] = reloads.into();
                doc["last_reload_error"] = last_error.into();
            }
            (crate::tls::settings::Source::Acme(settings), Some(acme)) => {
                let status = acme.status();
                doc["source"] = "acme".into();
                doc["state"] = status.state.clone().into();
                doc["last_error"] = status.last_error.clone().into();
                doc["acme"] = serde_json::json!({
                    "domains": settings.domains,
                    "directory": settings.directory,
                    "store": settings.store.display().to_string(),
                    "orders": status.orders,
                    "failures": status.failures,
                    "last_error_at": status.last_error_at,
                    "next_attempt_at": status.next_attempt_at,
                });
            }
            (crate::tls::settings::Source::Acme(_), None) => {}
        }
        doc
    }

    /// `/metrics` lines: when the served certificate expires, and the
    /// parked connections.
    fn metrics(&self) -> String {
        let (reloads, last_error) = self.live.reloads();
        let tls = format!(
            "# HELP omni_tls_certificate_expiry_seconds When the certificate served on the HTTPS port expires (Unix seconds).\n# TYPE omni_tls_certificate_expiry_seconds gauge\nomni_tls_certificate_expiry_seconds {}\n# HELP omni_tls_reloads_total Certificate file changes read since start.\n# TYPE omni_tls_reloads_total counter\nomni_tls_reloads_total {reloads}\n# HELP omni_tls_reload_failed 1 when the last change of the certificate files was refused (the previous certificate is still served).\n# TYPE omni_tls_reload_failed gauge\nomni_tls_reload_failed {}\n",
            self.live.info().not_after,
            u8::from(last_error.is_some()),
        );
        tls + &self.parks.metrics() + &self.acme.as_ref().map_or_else(String::new, |acme| {
            let status = acme.status();
            format!(
                "# HELP omni_tls_acme_last_error 1 when the last attempt to obtain a certificate by ACME failed (see tls.last_error in /gateway/status).\n# TYPE omni_tls_acme_last_error gauge\nomni_tls_acme_last_error {}\n# HELP omni_tls_acme_orders_total Certificates obtained by ACME since start.\n# TYPE omni_tls_acme_orders_total counter\nomni_tls_acme_orders_total {}\n",
                u8::from(status.last_error.is_some()),
                status.orders,
            )
        })
    }

    /// HSTS for a request naming `host`: never for localhost or an IP
    /// address (browsers ignore it there, and it would pin a development
    /// machine's every port to HTTPS).
    fn hsts_for(&self, host: Option<&str>) -> Option<hyper::header::HeaderValue> {
        let value = self.hsts.as_ref()?;
        let host = host?.trim().to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
            None => host.rsplit_once(':').map_or(host.as_str(), |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host.as_str() }).to_string(),
        };
        let name = name.trim_end_matches('.');
        if name.is_empty() || name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::IpAddr>().is_ok() {
            return None;
        }
        Some(value.clone())
    }
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
/// The connections are served by `limits.threads` HTTP threads
/// (`OMNI_HTTP_THREADS`), each a current-thread runtime accepting on the
/// same listening socket: a connection, its requests, its pooled upstream
/// connection (`upstream.rs`) and their tasks stay on the thread that
/// accepted it, so no request wakes another thread. This future runs on
/// the main runtime (supervision, PostgreSQL, the worker), steers the
/// drain, and ends once every HTTP thread has finished; dropped (a hurried
/// stop), it ends them at once, cutting off what is still in flight.
///
/// Shutdown is one mechanism: `stop` says "finish", `close_all` says "now",
/// and each connection task runs on a [`TaskTracker`] whose `wait` is the
/// "all done".
pub async fn serve(listener: TcpListener, surface: Arc<Surface>, stop: CancellationToken, limits: HttpLimits) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
    let mut tls_http = auto::Builder::new(TokioExecutor::new());
    tls_http.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
    // No HTTP/2 PINGs: their traffic would keep an idle connection from
    // looking idle (`serve_tls` closes those, dead peers included).
    tls_http.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEAD_BYTES as u32);
    let mut tls_http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    tls_http2.timer(TokioTimer::new()).max_header_list_size(MAX_HEAD_BYTES as u32);
    let shared = Arc::new(Shared {
        surface: surface.clone(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        open: TaskTracker::new(),
        late: TaskTracker::new(),
        stop,
        drained: CancellationToken::new(),
        close_all: CancellationToken::new(),
        finished: CancellationToken::new(),
        http1,
        tls_http,
        tls_http2,
        handshake_timeout: limits.header_timeout,
        main: tokio::runtime::Handle::current(),
    });
    // Dropped before the end (a hurried stop): the HTTP threads end at once.
    let _finish = shared.finished.clone().drop_guard();
    surface.proxy.upstreams.set_http_threads(limits.threads);
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot hand the listening socket to the HTTP threads ({e}); serving on the main runtime");
            return serve_here(shared, None, limits.drain_timeout).await;
        }
    };
    let mut threads = Vec::new();
    let mut here = None;
    for index in 0..limits.threads {
        match start_thread(index, &listener, &shared) {
            Ok(done) => threads.push(done),
            Err(e) => {
                tracing::error!("cannot start HTTP thread {index} ({e}); its share is served on the main runtime");
                if here.is_none() {
                    here = listener.try_clone().ok().and_then(|l| TcpListener::from_std(l).ok());
                }
            }
        }
    }
    if threads.is_empty() && here.is_none() {
        here = TcpListener::from_std(listener).ok();
    } else {
        // The threads hold their own descriptors of the socket; it closes
        // when the last of them is dropped, after the drain.
        drop(listener);
    }
    serve_here(shared, here, limits.drain_timeout).await;
    for done in threads {
        let _ = done.await;
    }
}

/// What every HTTP thread shares with the others and with [`serve`].
struct Shared {
    surface: Arc<Surface>,
    /// `OMNI_MAX_CONNECTIONS`, over all threads.
    slots: Arc<Semaphore>,
    /// Connections accepted before the stop: the drain waits for these.
    open: TaskTracker,
    /// Connections accepted during the drain: answered at once, never waited for.
    late: TaskTracker,
    /// The stop: accept no more, finish what is in flight.
    stop: CancellationToken,
    /// The drain is over: stop answering newcomers, close the listener.
    drained: CancellationToken,
    /// Cut off what is still open.
    close_all: CancellationToken,
    /// Every task of every thread is done (or the stop is hurried): the threads end.
    finished: CancellationToken,
    http1: hyper::server::conn::http1::Builder,
    /// With HTTPS: HTTP/2 or HTTP/1.1 over the TLS stream, for a client
    /// whose handshake named neither (and for the drain's answers).
    tls_http: auto::Builder<TokioExecutor>,
    /// With HTTPS: HTTP/2, for a client whose handshake chose it (ALPN);
    /// `http1` serves those that chose HTTP/1.1.
    tls_http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// A TLS client must finish its handshake within `OMNI_HEADER_TIMEOUT_S`.
    handshake_timeout: Duration,
    /// The main runtime, where work that outlives a request is spawned.
    main: tokio::runtime::Handle,
}

thread_local! {
    /// On an HTTP thread: the main runtime's handle.
    static MAIN_RUNTIME: std::cell::RefCell<Option<tokio::runtime::Handle>> = const { std::cell::RefCell::new(None) };
}

/// Runs `task` on the main runtime when called from an HTTP thread (so it
/// does not end with that thread's runtime), on the current one otherwise.
pub fn spawn_on_main<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match MAIN_RUNTIME.with(|m| m.borrow().clone()) {
        Some(main) => main.spawn(task),
        None => tokio::spawn(task),
    }
}

/// Starts HTTP thread `index` on its own descriptor of `listener`; the
/// receiver completes when the thread has finished.
fn start_thread(index: usize, listener: &std::net::TcpListener, shared: &Arc<Shared>) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.try_clone()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (done, finished) = tokio::sync::oneshot::channel();
    let shared = shared.clone();
    std::thread::Builder::new().name(format!("omni-http-{index}")).spawn(move || {
        crate::serve::upstream::set_http_thread(index);
        MAIN_RUNTIME.with(|m| *m.borrow_mut() = Some(shared.main.clone()));
        runtime.block_on(async {
            match TcpListener::from_std(listener) {
                Ok(listener) => accept_loop(listener, &shared).await,
                Err(e) => tracing::error!("HTTP thread {index} cannot listen ({e}); the other threads serve"),
            }
            // Connections, streams and tunnels of this thread run only
            // while it is in `block_on`: stay until all are done.
            shared.finished.cancelled().await;
        });
        runtime.shutdown_background();
        let _ = done.send(());
    })?;
    Ok(finished)
}

/// Steers the stop and the drain (and serves on this runtime too when
/// `listener` is given, the fallback when threads could not be started),
/// then awaits every task of every thread.
async fn serve_here(shared: Arc<Shared>, listener: Option<TcpListener>, drain_timeout: Duration) {
    let accepting = async {
        match listener {
            Some(l) => accept_loop(l, &shared).await,
            None => shared.drained.cancelled().await,
        }
    };
    let steer = async {
        shared.stop.cancelled().await;
        // The drain. `/health` already answers 503 (the board says stopping).
        shared.open.close();
        let drained = tokio::select! {
            _ = shared.open.wait() => true,
            _ = tokio::time::sleep(drain_timeout) => false,
        };
        if !drained {
            tracing::warn!("in-flight requests still running after {} s; closing them", drain_timeout.as_secs());
        }
        shared.drained.cancel();
    };
    tokio::join!(accepting, steer);
    let surface = &shared.surface;
    shared.close_all.cancel();
    surface.streams.close();
    surface.streams.wait().await;
    surface.proxy.close_tunnels.cancel();
    surface.proxy.tunnels.close();
    shared.late.close();
    shared.open.wait().await;
    shared.late.wait().await;
    surface.proxy.tunnels.wait().await;
    shared.finished.cancel();
}

/// Serves one connection until it ends; at `stop` it finishes its
/// in-flight requests, at `close_all` it is cut off.
macro_rules! until_stopped {
    ($conn:expr, $stop:expr, $close_all:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = $stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = $close_all.cancelled() => {}
                }
            }
        }
    }};
}

/// One thread's share: accepts until the stop, then answers newcomers with
/// 503 until the drain is over; closes its descriptor of the listener.
async fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    let Shared { surface, slots, open, late, stop, drained, close_all, http1, .. } = &**shared;
    loop {
        let Some((stream, peer, permit)) = (tokio::select! {
            accepted = accept(&listener, slots) => accepted,
            _ = stop.cancelled() => break,
        }) else {
            continue;
        };
        let (stop, close_all) = (stop.clone(), close_all.clone());
        match &surface.https {
            None => {
                let conn = http1.serve_connection(TokioIo::new(stream), service(surface, peer, false, None)).with_upgrades();
                open.spawn(async move {
                    until_stopped!(conn, stop, close_all);
                    drop(permit);
                });
            }
            Some(https) => {
                let (shared, https) = (shared.clone(), https.clone());
                open.spawn(async move {
                    // Boxed: the handshake's state goes with it instead of
                    // staying in the connection's task.
                    if let Some(tls) = Box::pin(handshake(&https, stream, peer, shared.handshake_timeout, &close_all)).await {
                        serve_tls(&shared, &https, tls, peer, &stop, &close_all).await;
                    }
                    drop(permit);
                });
            }
        }
    }

    let mut http1_closing = http1.clone();
    http1_closing.keep_alive(false);
    let mut tls_http_closing = shared.tls_http.clone();
    tls_http_closing.http1().keep_alive(false);
    let answer_late = async {
        loop {
            let Some((stream, peer, permit)) = accept(&listener, slots).await else { continue };
            let (shared, close_all) = (shared.clone(), close_all.clone());
            let (http1_closing, tls_http_closing) = (http1_closing.clone(), tls_http_closing.clone());
            late.spawn(async move {
                let answered = async {
                    match &shared.surface.https {
                        None => {
                            let _ = http1_closing.serve_connection(TokioIo::new(stream), service(&shared.surface, peer, true, None)).await;
                        }
                        Some(https) => {
                            if let Some(tls) = handshake(https, stream, peer, shared.handshake_timeout, &close_all).await {
                                let _ = tls_http_closing.serve_connection(TokioIo::new(tls), service(&shared.surface, peer, true, None)).await;
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = answered => {}
                    _ = close_all.cancelled() => {}
                }
                drop(permit);
            });
        }
    };
    tokio::select! {
        _ = answer_late => unreachable!("answering during the drain only ends with the drain"),
        _ = drained.cancelled() => {}
    }
}

/// Serves one TLS connection (HTTP/2 or HTTP/1.1, as ALPN chose) like
/// [`until_stopped`], and also ends it once it is idle: no request in
/// flight (its response body included, so a quiet event stream counts as
/// busy) and no byte moved either way for `OMNI_HEADER_TIMEOUT_S`. HTTP/2
/// has no idle limit of its own, and an idle connection would hold one of
/// `OMNI_MAX_CONNECTIONS` for ever. The end is graceful (HTTP/2's GOAWAY
/// and PING); a client that does not even answer that for another idle
/// period (a dead peer) is cut off.
///
/// The protocol's connection is built for the protocol ALPN named, in a
/// box of its own size: hyper-util's auto builder (which reads the first
/// bytes to tell the two apart) holds either in the same place, so every
/// HTTP/1.1 connection's task was as large as an HTTP/2 one's. A client
/// that named no protocol still gets the auto builder.
///
/// And it is built once the client has sent something, as the auto builder
/// did: a client that connects ahead of time (browsers do) costs its TLS
/// state and its task's, but no HTTP buffers, until then. An HTTP/1.1
/// connection is also taken apart again whenever it is quiet, its TLS
/// stream kept ([`park`]).
async fn serve_tls(shared: &Shared, https: &Https, tls: Box<crate::tls::stream::TlsStream>, peer: SocketAddr, stop: &CancellationToken, close_all: &CancellationToken) {
    let idle_limit = shared.handshake_timeout;
    let alpn = tls.alpn_protocol().map(<[u8]>::to_vec);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = boxed(service(&shared.surface, peer, false, Some(in_flight.clone())));
    if alpn.as_deref() == Some(b"http/1.1") {
        // Everything the connection keeps for its life is allocated here,
        // before its first request: not among a burst's short-lived
        // allocations, whose pages it would keep from going back.
        let io = Watched { io: tls, activity: Activity::new() };
        let upgrades = park::UpgradeSlot::default();
        let limits = park::Limits { idle_limit, peer, stop, close_all, in_flight: &in_flight, parks: &https.parks };
        let service = park::AskingUpgrades { service, upgrades: upgrades.clone() };
        return Box::pin(park::serve(&shared.http1, io, service, upgrades, limits)).await;
    }
    // Nothing decrypted waits in the TLS stream (else the socket may stay quiet): wait for bytes.
    if !tls.has_unread() {
        tokio::select! {
            ready = tls.tcp().readable() => if ready.is_err() {
                return;
            },
            _ = stop.cancelled() => return,
            _ = close_all.cancelled() => return,
            _ = tokio::time::sleep(idle_limit) => return,
        }
    }
    let io = Watched { io: tls, activity: Activity::new() };
    let activity = io.activity.clone();
    let idle = || in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0 && activity.quiet() >= idle_limit;
    let ends = Ends { idle: &idle, idle_limit, peer, stop, close_all };
    match alpn.as_deref() {
        Some(b"h2") => ends.serve(Box::pin(shared.tls_http2.serve_connection(TokioIo::new(io), service)), |c| c.graceful_shutdown()).await,
        _ => ends.serve(Box::pin(shared.tls_http.serve_connection_with_upgrades(TokioIo::new(io), service)), |c| c.graceful_shutdown()).await,
    }
}

/// What ends a TLS connection ([`serve_tls`]): the stop, the cut-off,
/// and being idle.
struct Ends<'a, I: Fn() -> bool> {
    idle: &'a I,
    idle_limit: Duration,
    peer: SocketAddr,
    stop: &'a CancellationToken,
    close_all: &'a CancellationToken,
}

impl<I: Fn() -> bool> Ends<'_, I> {
    /// Serves `conn` until it ends, one of the ends comes, or it is idle
    /// (then `graceful` begins its end).
    async fn serve<C: std::future::Future>(&self, mut conn: std::pin::Pin<Box<C>>, graceful: impl Fn(std::pin::Pin<&mut C>)) {
        let Ends { idle, idle_limit, peer, stop, close_all } = self;
        let mut check = tokio::time::interval((*idle_limit / 4).max(Duration::from_millis(100)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => {
                    graceful(conn.as_mut());
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = close_all.cancelled() => {}
                    }
                    return;
                }
                _ = check.tick() => if idle() {
                    break;
                }
            }
        }
        graceful(conn.as_mut());
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = close_all.cancelled() => return,
                _ = check.tick() => if idle() {
                    tracing::debug!("closing the idle connection of {peer}: it did not answer the graceful end");
                    return;
                }
            }
        }
    }
}

/// One request of a connection in flight, until its response body is
/// done or dropped (for [`serve_tls`]'s idle limit).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A response body that holds its request's [`InFlight`] until dropped.
struct Counted {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// When a connection's bytes last moved either way, and how many writes it
/// made (shared by [`Watched`] and whoever watches it).
pub struct Activity {
    started: std::time::Instant,
    /// Milliseconds from `started` to the last byte read or written.
    last_ms: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity { started: std::time::Instant::now(), last_ms: Default::default(), writes: Default::default() })
    }

    /// How long no byte has moved.
    pub fn quiet(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed)))
    }

    /// Writes that wrote something, so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.touch();
        self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A connection's stream that notes its [`Activity`].
pub struct Watched<T> {
    pub io: T,
    pub activity: Arc<Activity>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The TLS handshake of a new client, within `timeout`; `None` (logged at
/// debug: scanners and clients that distrust the certificate do this all
/// day) when it fails, times out, or the gateway is closing.
async fn handshake(https: &Https, stream: TcpStream, peer: SocketAddr, timeout: Duration, close_all: &CancellationToken) -> Option<Box<crate::tls::stream::TlsStream>> {
    tokio::select! {
        done = tokio::time::timeout(timeout, crate::tls::stream::accept(stream, https.config.clone())) => match done {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!("TLS handshake with {peer} failed: {e}");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake with {peer} did not finish within {} s", timeout.as_secs());
                None
            }
        },
        _ = close_all.cancelled() => None,
    }
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

/// One request's handling, boxed: hyper's HTTP/1.1 connection keeps a box
/// the size of its service's future from its first request to its end, so
/// a future held inline (the proxy's, about 6.7 KiB) would stay allocated
/// for every idle keep-alive connection. Boxed per request, it is freed
/// with the response, and the connection keeps a pointer. Only TLS
/// connections ([`boxed`]), whose idle memory is counted: on the plain port
/// the allocation per request cost 7.6% more CPU per proxied request.
type Handling = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// `service` with each request's handling boxed ([`Handling`]).
fn boxed<S>(service: S) -> impl hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future = Handling> + Send + Clone + Unpin
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send + 'static> + Send + Sync + Clone + Unpin + 'static,
{
    hyper::service::service_fn(move |req: Request<Incoming>| Box::pin(service.call(req)) as Handling)
}

/// The request handler of one connection; `draining` for those accepted after a stop began.
fn service(surface: &Arc<Surface>, peer: SocketAddr, draining: bool, in_flight: Option<Arc<std::sync::atomic::AtomicUsize>>) -> impl hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send> + Send + Clone + Unpin {
    let surface = surface.clone();
    let mut peer = crate::serve::proxy::Peer::new(peer);
    peer.https = surface.https.is_some();
    let peer = Arc::new(peer);
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let (surface, peer) = (surface.clone(), peer.clone());
        let counted = in_flight.clone().map(InFlight::enter);
        async move {
            let Some(https) = &surface.https else {
                return Ok::<_, Infallible>(route(&surface, &peer, req, draining).await);
            };
            let hsts = https.hsts_for(request_host(&req));
            let mut resp = route(&surface, &peer, over_h2(req), draining).await;
            if let Some(hsts) = hsts {
                resp.headers_mut().insert(hyper::header::STRICT_TRANSPORT_SECURITY, hsts);
            }
            Ok(match counted {
                Some(in_flight) => resp.map(|body| Counted { body, _in_flight: in_flight }.boxed()),
                None => resp,
            })
        }
    })
}

/// The host a request names: its `Host` header (HTTP/1.1), else the
/// authority of its target (HTTP/2's `:authority`).
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// An HTTP/2 request body of unknown length (no `content-length`, more
/// DATA frames to come) is what HTTP/1.1 calls chunked: say so, so the
/// proxy streams it to the worker instead of taking it for no body.
fn over_h2(mut req: Request<Incoming>) -> Request<Incoming> {
    use hyper::body::Body as _;
    if req.version() == hyper::Version::HTTP_2 && !req.headers().contains_key(hyper::header::CONTENT_LENGTH) && !req.body().is_end_stream() {
        req.headers_mut().insert(hyper::header::TRANSFER_ENCODING, hyper::header::HeaderValue::from_static("chunked"));
    }
    req
}

/// Gateway-owned paths are answered here; everything else goes to the worker.
async fn route(surface: &Arc<Surface>, conn: &crate::serve::proxy::Peer, mut req: Request<Incoming>, draining: bool) -> Response<Body> {
    let peer = conn.addr;
    let is_read = matches!(*req.method(), Method::GET | Method::HEAD);
    let client = crate::serve::proxy::client_addr(req.headers(), peer.ip(), &surface.proxy.limits.trusted_proxies);
    if req.uri().path().starts_with("/gateway/") {
        // The worker's credentials check (`gateway_auth.rs`) reads the session
        // cookie named for the scheme (`__Host-omni_session` over HTTPS): say
        // which, as the proxy does, whatever the client claimed.
        let proto = conn.proto(req.headers(), &surface.proxy.limits.trusted_proxies);
        req.headers_mut().insert(hyper::header::HeaderName::from_static("x-forwarded-proto"), hyper::header::HeaderValue::from_static(proto));
    }
    match req.uri().path() {
        "/health" if is_read => health(surface).await,
        "/gateway/status" if is_read => {
            let mut doc = surface.board.to_json();
            doc["tls"] = surface.https.as_ref().map_or_else(|| serde_json::json!({ "enabled": false }), |h| h.status_json());
            if let Some(db) = &surface.database {
                // As in `health`: the check's connection lives on the main runtime.
                let checking = db.clone();
                if let Ok((view, _)) = spawn_on_main(async move { checking.status_json().await }).await {
                    doc["database"] = view;
                }
            }
            json(StatusCode::OK, &doc)
        }
        "/metrics" if is_read => Response::builder()
            .header(hyper::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(full(match &surface.https {
                None => surface.proxy.metrics.render(&surface.board),
                Some(https) => surface.proxy.metrics.render(&surface.board) + &https.metrics(),
            }))
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
        // Its connection outlives this request: checked on the main runtime.
        let checking = db.clone();
        let (view, problem) = spawn_on_main(async move { checking.status_json().await }).await.unwrap_or_else(|e| {
            let problem = format!("the check failed: {e}");
            (serde_json::json!({ "kind": "external", "url": db.display_url, "state": "unavailable", "detail": problem }), Some(problem))
        });
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
