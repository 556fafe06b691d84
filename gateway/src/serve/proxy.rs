//! Reverse proxy to the API worker, as a fixed pipeline of small phases:
//!
//! 1. [`prepare_body`]: decide whether the request could be sent twice
//!    (no body, or a small one read into memory); large bodies stream.
//! 2. [`upstream_headers`]: rewrite the head once, in place: hop-by-hop
//!    headers out, `X-Forwarded-*` and [`CLIENT_ADDR`] in, upgrades kept;
//!    [`upstream_request`] then gives each attempt its target (origin
//!    form) and the worker's `Host`, made once per worker (no formatting
//!    or parsing per request).
//! 3. pick the upstream ([`Upstreams::wait_for`]), waiting a bounded time
//!    while the worker restarts.
//! 4. send, retrying on another generation only when it is safe: nothing
//!    reached the worker (connect error), or the method is idempotent and
//!    the body replayable.
//! 5. [`client_response`]: hop-by-hop headers out, body streamed back; for a
//!    `101 Switching Protocols`, splice the two upgraded connections.
//! 6. record metrics.
//!
//! Failures answer with the SPEC §5 JSON error shape: 503 when no worker came
//! up in time, 502 when the worker failed the request, 504 on timeout.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{HttpLimits, TrustedProxies};
use crate::serve::{error, Body};
use crate::serve::metrics::Metrics;
use crate::serve::upstream::{Upstream, Upstreams};

/// Bodies up to this size are read into memory so the request can be retried.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
/// The one header the worker reads the client's address from
/// (api/src/rate_limit.rs): always set here to [`client_addr`], whatever
/// the client sent under that name.
pub const CLIENT_ADDR: HeaderName = HeaderName::from_static("x-omni-client-addr");

/// The client address the gateway believes. Its TCP peer, unless that peer
/// is one of `OMNI_TRUSTED_PROXIES`: then `X-Forwarded-For` is read from
/// the right (each proxy appends the peer it saw), skipping trusted
/// proxies, and the first address that is not one is the client. Anything
/// left of it is whatever the client wrote and proves nothing. An entry
/// that is not an address stops the walk at the last proxy that was trusted.
pub fn client_addr(headers: &HeaderMap, peer: IpAddr, trusted: &TrustedProxies) -> IpAddr {
    let mut believed = peer.to_canonical();
    if !trusted.contains(believed) {
        return believed;
    }
    let entries: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).collect();
    for entry in entries.into_iter().rev() {
        let Some(ip) = entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip())) else {
            return believed;
        };
        believed = ip.to_canonical();
        if !trusted.contains(believed) {
            return believed;
        }
    }
    believed
}

/// `https` when a trusted proxy says the client used it (its own
/// `X-Forwarded-Proto`, the last value), otherwise the gateway's own
/// scheme, `http`: a client cannot claim https for itself.
pub fn client_proto(headers: &HeaderMap, peer: IpAddr, trusted: &TrustedProxies) -> &'static str {
    if !trusted.contains(peer.to_canonical()) {
        return "http";
    }
    let said = headers.get_all("x-forwarded-proto").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).next_back();
    match said {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        _ => "http",
    }
}

const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"];

pub struct Proxy {
    pub upstreams: Upstreams,
    pub limits: HttpLimits,
    pub metrics: std::sync::Arc<Metrics>,
    /// Upgraded connections (WebSockets) spliced to the worker; they outlive
    /// their HTTP exchange, so the HTTP server closes and awaits them at stop.
    pub tunnels: TaskTracker,
    pub close_tunnels: CancellationToken,
}

/// The request body as the retry logic sees it.
enum ReqBody {
    /// Known completely: may be sent again.
    Replayable(Bytes),
    /// Streamed through: can be sent once.
    Stream(Option<Incoming>),
}

impl ReqBody {
    fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Replayable(b) if b.is_empty() => Some(Empty::new().map_err(|never| match never {}).boxed()),
            ReqBody::Replayable(b) => Some(Full::new(b.clone()).map_err(|never| match never {}).boxed()),
            ReqBody::Stream(s) => s.take().map(|b| b.boxed()),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Replayable(_))
    }
}

/// A connection's client as the headers to the worker name it: formatted
/// once per connection, not per request.
pub struct Peer {
    pub addr: SocketAddr,
    /// The TCP peer's address, appended to `X-Forwarded-For`.
    ip: HeaderValue,
    /// Its canonical form: [`CLIENT_ADDR`] when no trusted proxy speaks for it.
    canonical: HeaderValue,
    /// The connection is TLS the gateway terminated (`OMNI_TLS_CERT`):
    /// `X-Forwarded-Proto: https`, whatever the headers say.
    pub https: bool,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let value = |ip: IpAddr| HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value");
        Peer { addr, ip: value(addr.ip()), canonical: value(addr.ip().to_canonical()), https: false }
    }

    /// The scheme the client used, as `X-Forwarded-Proto` tells the worker:
    /// `https` on TLS the gateway terminated, else [`client_proto`].
    pub fn proto(&self, headers: &HeaderMap, trusted: &TrustedProxies) -> &'static str {
        if self.https {
            "https"
        } else {
            client_proto(headers, self.addr.ip(), trusted)
        }
    }
}

impl Proxy {
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let started = Instant::now();
        let response = self.forward(req, peer).await;
        self.metrics.observe_request(response.status(), started.elapsed());
        response
    }

    async fn forward(&self, mut req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        let client_upgrade = wants_upgrade(req.headers()).then(|| client_switch(&mut req));
        let (mut req, body) = req.into_parts();
        let mut body = match prepare_body(&req.headers, body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let idempotent = is_idempotent(&req.method);
        // The head the worker receives, made once: a retry sends a copy.
        let headers = upstream_headers(&mut req, client_upgrade.is_some(), peer, &self.limits.trusted_proxies);
        let deadline = Instant::now() + self.limits.upstream_wait;
        let mut failed_generation = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Some(upstream) = self.upstreams.wait_for(failed_generation, remaining).await else {
                self.metrics.upstream_error("unavailable");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "worker_unavailable",
                    &format!("the API worker is not available (waited {} ms); see /gateway/status", self.limits.upstream_wait.as_millis()),
                );
            };
            let Some(out_body) = body.take() else {
                self.metrics.upstream_error("closed");
                return error(StatusCode::BAD_GATEWAY, "upstream_error", "the API worker closed the connection before answering");
            };
            let out = upstream_request(&req, &headers, out_body, &upstream);
            let timeout = crate::pitr::online::upstream_timeout(req.uri.path(), self.limits.upstream_timeout);
            match tokio::time::timeout(timeout, upstream.client().request(out)).await {
                Ok(Ok(resp)) => return client_response(resp, client_upgrade, &self.tunnels, &self.close_tunnels),
                Ok(Err(e)) => {
                    let nothing_sent = e.is_connect();
                    // A worker replaced by a reload closes its idle connections
                    // while draining; a request that raced that close was not
                    // processed, so sending it to the new worker is safe. (Not
                    // so after a crash: the request may have been committed.)
                    let retired = upstream.replaced.load(std::sync::atomic::Ordering::Relaxed);
                    let retry = body.replayable() && (nothing_sent || idempotent || retired) && Instant::now() < deadline;
                    tracing::debug!("upstream {} failed ({e:?}); retry: {retry}", upstream.addr.display());
                    if retry {
                        failed_generation = Some(upstream.generation);
                        continue;
                    }
                    self.metrics.upstream_error(if nothing_sent { "connect" } else { "closed" });
                    return error(StatusCode::BAD_GATEWAY, "upstream_error", "the API worker failed while answering this request; it may have restarted, try again");
                }
                Err(_) => {
                    self.metrics.upstream_error("timeout");
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        &format!("the API worker did not answer within {} s", timeout.as_secs()),
                    );
                }
            }
        }
    }
}

/// Phase 1: small or empty bodies become replayable.
async fn prepare_body(headers: &HeaderMap, body: Incoming) -> Result<ReqBody, Response<Body>> {
    let chunked = headers.get(header::TRANSFER_ENCODING).is_some();
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match (chunked, length) {
        (false, None) | (false, Some(0)) => Ok(ReqBody::Replayable(Bytes::new())),
        (false, Some(n)) if n <= REPLAYABLE_BODY => match body.collect().await {
            Ok(collected) => Ok(ReqBody::Replayable(collected.to_bytes())),
            Err(_) => Err(error(StatusCode::BAD_REQUEST, "incomplete_body", "the request body ended before its Content-Length")),
        },
        _ => Ok(ReqBody::Stream(Some(body))),
    }
}

/// Phase 2a: the worker's request head, from the client's (taken apart):
/// hop-by-hop headers out, upgrades kept, `X-Forwarded-*` and
/// [`CLIENT_ADDR`] in. `Host` is set per attempt, to the upstream's address.
fn upstream_headers(req: &mut hyper::http::request::Parts, upgrade: bool, peer: &Peer, trusted: &TrustedProxies) -> HeaderMap {
    let client = client_addr(&req.headers, peer.addr.ip(), trusted);
    let client = if client == peer.addr.ip().to_canonical() {
        peer.canonical.clone()
    } else {
        HeaderValue::from_str(&client.to_string()).expect("an IP address is a valid header value")
    };
    let proto = peer.proto(&req.headers, trusted);
    let upgrade = if upgrade { req.headers.get(header::UPGRADE).cloned() } else { None };
    let host = req.headers.get(header::HOST).cloned().or_else(|| req.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    // For logs only: what came in, with the peer appended. The worker's
    // limits read CLIENT_ADDR instead.
    let xff = match req.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", peer.addr.ip())).ok(),
        None => Some(peer.ip.clone()),
    };
    let mut headers = std::mem::take(&mut req.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if let Some(v) = xff {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    headers.insert(CLIENT_ADDR, client);
    // HTTPS the gateway terminated says `https`. Behind a TLS-terminating proxy
    // listed in OMNI_TRUSTED_PROXIES, its `https` is kept, so the worker
    // marks its session cookie `Secure`; anything else becomes `http`.
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    headers
}

/// Phase 2b: the request one attempt sends to `upstream`: the target in
/// origin form (`/path?query`), the worker's `Host`.
fn upstream_request(req: &hyper::http::request::Parts, headers: &HeaderMap, body: Body, upstream: &Upstream) -> Request<Body> {
    let target = req.uri.path_and_query().cloned().unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let mut out = Request::new(body);
    *out.method_mut() = req.method.clone();
    *out.uri_mut() = Uri::from(target);
    *out.version_mut() = hyper::Version::HTTP_11;
    let mut headers = headers.clone();
    headers.insert(header::HOST, upstream.host.clone());
    *out.headers_mut() = headers;
    out
}

/// Removes, in place, the hop-by-hop headers and those the `Connection`
/// header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: look before removing anything.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(&name.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

pub fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// A client's stream after a protocol switch.
pub trait Switched: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Switched for T {}

/// The way a client's switched stream is handed over, once.
pub type SwitchedTo = tokio::sync::oneshot::Sender<Box<dyn Switched>>;
type SwitchedFrom = tokio::sync::oneshot::Receiver<Box<dyn Switched>>;

/// Where a request that asks for a protocol switch gets its client's stream
/// once the `101` is written, from a connection that does the switch itself
/// (`park.rs`) instead of hyper's upgrades: in the request's extensions.
/// (Extensions must be `Clone`: the receiver is taken once.)
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<SwitchedFrom>>>);

impl ClientUpgrade {
    pub fn new(switched: SwitchedFrom) -> ClientUpgrade {
        ClientUpgrade(Arc::new(Mutex::new(Some(switched))))
    }

    /// The client's stream, once switched; `None` if taken already.
    fn take(&self) -> Option<SwitchedFrom> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The client's stream once the `101` is written to it.
type ClientSwitch = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Box<dyn Switched>, String>> + Send>>;

/// Where a request that asks for a protocol switch gets its client's
/// stream: from hyper's upgrades, or from the connection that serves it
/// without them (`park.rs`, HTTP/1.1 over TLS).
fn client_switch(req: &mut Request<Incoming>) -> ClientSwitch {
    match req.extensions_mut().remove::<ClientUpgrade>().and_then(|asked| asked.take()) {
        Some(switched) => Box::pin(async move { switched.await.map_err(|_| "the client's connection ended before the switch".to_owned()) }),
        None => {
            let upgrade = hyper::upgrade::on(req);
            Box::pin(async move { upgrade.await.map(|u| Box::new(TokioIo::new(u)) as Box<dyn Switched>).map_err(|e| e.to_string()) })
        }
    }
}

/// Phase 5: the response the client receives.
fn client_response(mut resp: Response<crate::serve::upstream::Pooled>, client_upgrade: Option<ClientSwitch>, tunnels: &TaskTracker, close_tunnels: &CancellationToken) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let close = close_tunnels.clone();
            tunnels.spawn(async move {
                let splice = async {
                    match tokio::try_join!(client_upgrade, async { upstream_upgrade.await.map_err(|e| e.to_string()) }) {
                        Ok((mut client, upstream)) => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut TokioIo::new(upstream)).await;
                        }
                        Err(e) => tracing::debug!("upgrade failed: {e}"),
                    }
                };
                tokio::select! {
                    _ = splice => {}
                    _ = close.cancelled() => {}
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed());
        }
    }
    let (mut parts, body) = resp.into_parts();
    parts.version = hyper::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_addresses_count_only_from_a_trusted_proxy() {
        let nginx: IpAddr = "10.0.0.5".parse().unwrap();
        let trusted = TrustedProxies::parse("10.0.0.0/24").unwrap();
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9"), ("x-forwarded-proto", "https")]);
        // Without the setting the header is ignored, whoever the peer is.
        assert_eq!(client_addr(&h, nginx, &TrustedProxies::default()), nginx);
        assert_eq!(client_proto(&h, nginx, &TrustedProxies::default()), "http");
        // From the proxy: the rightmost entry that is not a proxy itself.
        assert_eq!(client_addr(&h, nginx, &trusted), "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(client_proto(&h, nginx, &trusted), "https");
        let chained = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9"), ("x-forwarded-for", "10.0.0.7")]);
        assert_eq!(client_addr(&chained, nginx, &trusted), "203.0.113.9".parse::<IpAddr>().unwrap());
        // A client elsewhere writing the header gains nothing.
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(client_addr(&h, stranger, &trusted), stranger);
        assert_eq!(client_proto(&h, stranger, &trusted), "http");
        // Garbage stops the walk at the last trusted hop; no header: the proxy.
        assert_eq!(client_addr(&headers(&[("x-forwarded-for", "unknown, 10.0.0.8")]), nginx, &trusted), "10.0.0.8".parse::<IpAddr>().unwrap());
        assert_eq!(client_addr(&HeaderMap::new(), nginx, &trusted), nginx);
        assert_eq!(client_addr(&headers(&[("x-forwarded-for", "[2001:db8::1]:443")]), nginx, &trusted), "2001:db8::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_scheme_is_https_on_terminated_tls_whatever_the_client_says() {
        let trusted = TrustedProxies::parse("10.0.0.0/24").unwrap();
        let mut peer = Peer::new("198.51.100.1:50000".parse().unwrap());
        let claims_https = headers(&[("x-forwarded-proto", "https")]);
        let claims_http = headers(&[("x-forwarded-proto", "http")]);
        assert_eq!(peer.proto(&claims_https, &trusted), "http", "a client cannot claim https for itself");
        peer.https = true;
        assert_eq!(peer.proto(&claims_http, &trusted), "https");
        assert_eq!(peer.proto(&HeaderMap::new(), &TrustedProxies::default()), "https");
        let proxy = Peer::new("10.0.0.5:50000".parse().unwrap());
        assert_eq!(proxy.proto(&claims_https, &trusted), "https", "a trusted proxy's https is kept");
    }
}
