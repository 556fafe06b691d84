//! Who may read the gateway's protected endpoints (`/gateway/logs*`,
//! `/gateway/metrics/history`).
//!
//! The gateway does not hold the API key (the worker keeps it in its
//! database), so it asks the worker: the request's credential headers, and
//! only those (`x-api-key`, `cookie`), are sent to `GET /api/v1/auth/check`
//! on the current upstream with the client address the gateway believes
//! (`x-omni-client-addr`, as the proxy sends it) and the scheme
//! (`x-forwarded-proto`, set by `route`: over HTTPS the session cookie is
//! `__Host-omni_session`), so the worker's limits
//! count a wrong key against its sender, not against the gateway. The
//! worker's answer is passed on as it is: 204 lets the request through,
//! 401, 403 and 429 (with `Retry-After`) go to the client unchanged, and
//! anything else is a 503. Whatever protects the worker's API protects
//! these endpoints, unchanged.
//!
//! A yes is remembered for [`REMEMBER`], keyed by a hash of the credentials
//! (never the credentials themselves), so a page that polls or reconnects
//! does not cost the worker a check each time, and a stream survives a
//! worker restart it is watching. A no is never remembered.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::header::{HeaderName, COOKIE};
use hyper::{HeaderMap, Request, Response, StatusCode};

use crate::serve::{error, full, Body};
use crate::serve::upstream::Upstreams;

/// How long a positive answer is trusted.
pub const REMEMBER: Duration = Duration::from_secs(10);
/// How long to wait for the worker to answer (or for a worker to exist).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Most remembered answers; the memory is cleared when full.
const MAX_REMEMBERED: usize = 1024;
const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const CHECK_PATH: &str = "/api/v1/auth/check";

pub struct GatewayAuth {
    upstreams: Upstreams,
    /// Hash of the credentials → when the worker last said yes.
    passed: Mutex<HashMap<u64, Instant>>,
    /// Keyed per process, so hashes cannot be precomputed.
    hasher: RandomState,
}

impl GatewayAuth {
    pub fn new(upstreams: Upstreams) -> GatewayAuth {
        GatewayAuth { upstreams, passed: Mutex::new(HashMap::new()), hasher: RandomState::new() }
    }

    /// `Ok` when the request's credentials pass the worker's check; otherwise
    /// the response to send (the worker's 401, or 503 when no worker can tell).
    pub async fn check(&self, headers: &HeaderMap, client: std::net::IpAddr) -> Result<(), Response<Body>> {
        let credentials: Vec<(HeaderName, hyper::header::HeaderValue)> = [API_KEY, COOKIE, FORWARDED_PROTO]
            .into_iter()
            .flat_map(|name| headers.get_all(&name).iter().map(move |v| (name.clone(), v.clone())).collect::<Vec<_>>())
            .collect();
        let key = self.hasher.hash_one(credentials.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect::<Vec<_>>());
        if self.remembered(key) {
            return Ok(());
        }
        let Some(upstream) = self.upstreams.wait_for(None, ASK_TIMEOUT).await else {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "worker_unavailable", "the API worker, which checks credentials, is not running; retry in a few seconds"));
        };
        let mut request = Request::get(CHECK_PATH).header(hyper::header::HOST, upstream.host.clone()).header(crate::serve::proxy::CLIENT_ADDR, client.to_string());
        for (name, value) in &credentials {
            request = request.header(name, value);
        }
        let request = request.body(full("")).expect("a GET with copied headers is valid");
        let answer = match tokio::time::timeout(ASK_TIMEOUT, upstream.client().request(request)).await {
            Ok(Ok(answer)) => answer,
            _ => return Err(error(StatusCode::SERVICE_UNAVAILABLE, "worker_unavailable", "the API worker did not answer the credentials check; retry in a few seconds")),
        };
        match answer.status() {
            StatusCode::NO_CONTENT => {
                self.remember(key);
                Ok(())
            }
            status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS) => {
                // The worker's own answer, so the reason reads the same everywhere.
                let mut response = Response::builder().status(status).header(hyper::header::CACHE_CONTROL, "no-store");
                for name in [hyper::header::CONTENT_TYPE, hyper::header::RETRY_AFTER] {
                    if let Some(value) = answer.headers().get(&name) {
                        response = response.header(name, value.clone());
                    }
                }
                let body = answer.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                Err(response.body(full(body)).expect("copied parts are valid"))
            }
            other => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_check_failed",
                &format!("the API worker answered {other} to the credentials check (is it an older version without {CHECK_PATH}?); retry in a few seconds"),
            )),
        }
    }

    fn remembered(&self, key: u64) -> bool {
        let passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
        passed.get(&key).is_some_and(|at| at.elapsed() < REMEMBER)
    }

    fn remember(&self, key: u64) {
        let mut passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
        if passed.len() >= MAX_REMEMBERED {
            passed.retain(|_, at| at.elapsed() < REMEMBER);
            if passed.len() >= MAX_REMEMBERED {
                passed.clear();
            }
        }
        passed.insert(key, Instant::now());
    }
}
