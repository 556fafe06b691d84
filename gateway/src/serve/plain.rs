//! The plain-HTTP port beside HTTPS (`OMNI_HTTP_PORT`): every request is
//! redirected with `308 Permanent Redirect` to the same host on the HTTPS
//! port, path and query kept (308, unlike 301, keeps the method and body).
//! `/.well-known/acme-challenge/…` is the one path not redirected: it is
//! where a certificate authority checks HTTP-01 challenges, answered from
//! the pending ones of the ACME client (`OMNI_TLS_DOMAINS`): this gateway's
//! own, and with an external database those of every gateway on it (the
//! authority's check may reach any of them behind a load balancer).
//!
//! Few requests come here (a browser follows the redirect once, then HSTS
//! keeps it on HTTPS), so it runs on the main runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::serve::{error, full, Body};
use crate::tls::acme::Challenges;

/// Where ACME's HTTP-01 challenges are asked.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Binds `OMNI_HTTP_PORT`, naming the variable on failure.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot listen on {addr} for OMNI_HTTP_PORT (the plain-HTTP port that redirects to HTTPS): ports below 1024 need root or CAP_NET_BIND_SERVICE. Run as root, grant the capability (setcap cap_net_bind_service=+ep omni-gateway), set OMNI_HTTP_PORT to a port above 1023 (and forward port 80 to it), or set OMNI_HTTP_PORT=off"
        ),
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr} for OMNI_HTTP_PORT: the port is already in use. Stop what listens on {}, set OMNI_HTTP_PORT to a free port, or set OMNI_HTTP_PORT=off",
            addr.port()
        ),
        _ => anyhow::anyhow!("cannot listen on {addr} for OMNI_HTTP_PORT ({e}); check OMNI_HOST and OMNI_HTTP_PORT"),
    })
}

/// Serves the plain port until `stop`; then lets each connection finish
/// its request (for up to `drain`) and returns.
pub async fn serve(listener: TcpListener, https_port: u16, challenges: Option<Challenges>, header_timeout: Duration, drain: Duration, stop: CancellationToken) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(16 * 1024).keep_alive(true);
    let open = TaskTracker::new();
    let https_port = Arc::new(https_port);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accept on OMNI_HTTP_PORT failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let port = https_port.clone();
        let challenges = challenges.clone();
        let conn = http1.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let port = *port;
                let challenges = challenges.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, port, challenges.as_ref()).await) }
            }),
        );
        let stop = stop.clone();
        open.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    open.close();
    let _ = tokio::time::timeout(drain, open.wait()).await;
}

/// The answer to one request on the plain port.
async fn answer(req: &Request<Incoming>, https_port: u16, challenges: Option<&Challenges>) -> Response<Body> {
    if let Some(token) = req.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX) {
        return match challenges {
            Some(challenges) => match challenges.answer(token).await {
                Some(key_authorization) => Response::builder()
                    .status(StatusCode::OK)
                    .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
                    .header(hyper::header::CACHE_CONTROL, "no-store")
                    .body(full(key_authorization))
                    .expect("static headers"),
                None => error(StatusCode::NOT_FOUND, "no_acme_challenge", "no ACME challenge is pending for this token: no gateway asked for it, or it was already answered"),
            },
            None => error(
                StatusCode::NOT_FOUND,
                "no_acme_challenge",
                "no ACME challenge is pending for this token: this gateway's certificate comes from OMNI_TLS_CERT and OMNI_TLS_KEY",
            ),
        };
    }
    match redirect_target(req, https_port) {
        Some(location) => Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(hyper::header::LOCATION, location)
            .header(hyper::header::CACHE_CONTROL, "no-store")
            .body(full(""))
            .expect("the location was checked as a URI"),
        None => error(
            StatusCode::BAD_REQUEST,
            "bad_host",
            "this port only redirects to HTTPS, and the request names no valid Host to redirect to; use https://<host>/ directly",
        ),
    }
}

/// `https://<host>[:<https_port>]<path>?<query>` for the host the request
/// names (its port dropped), or `None` without a usable host.
fn redirect_target<B>(req: &Request<B>, https_port: u16) -> Option<String> {
    let named = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    let authority: hyper::http::uri::Authority = named.trim().parse().ok()?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return None;
    }
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{}{port}{path}", authority.host());
    location.parse::<hyper::Uri>().ok().map(|_| location)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: Option<&str>, uri: &str, port: u16) -> Option<String> {
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        redirect_target(&req.body(()).unwrap(), port)
    }

    #[test]
    fn the_redirect_keeps_host_path_and_query_and_names_the_https_port() {
        assert_eq!(target(Some("omni.example:80"), "/a/b?x=1&y=%20", 443).as_deref(), Some("https://omni.example/a/b?x=1&y=%20"));
        assert_eq!(target(Some("omni.example"), "/", 8443).as_deref(), Some("https://omni.example:8443/"));
        assert_eq!(target(Some("[::1]:8080"), "/x", 8443).as_deref(), Some("https://[::1]:8443/x"));
        assert_eq!(target(None, "http://from-target.example/p?q", 443).as_deref(), Some("https://from-target.example/p?q"));
        assert_eq!(target(None, "/p", 443), None);
        assert_eq!(target(Some("user@evil.example"), "/", 443), None);
        assert_eq!(target(Some("bad host"), "/", 443), None);
    }
}
