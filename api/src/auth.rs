//! The API key, and how a request to a protected route proves who it is:
//! the key in `x-api-key`, or the session cookie of a signed-in browser
//! ([`require_auth`]). Failed key checks count towards the brute-force
//! limits of [`crate::rate_limit`].
//!
//! An operator-given `OMNI_API_KEY` wins. Otherwise the first worker to start
//! generates `sk-omni-` + 32 random bytes (URL-safe base64) and stores it in
//! the database, so it survives restarts and every worker uses the same one;
//! only the worker that generated it logs it. Comparison is constant-time over
//! SHA-256 digests, so neither content nor length leaks through timing.

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{accounts::Role, db::Client, errors::ApiError, rate_limit, routes::AppState, sessions, settings};

pub const HEADER: &str = "x-api-key";

/// The key this worker accepts.
#[derive(Clone)]
pub struct ApiKey {
    key: String,
    /// Digest compared against each request's digest.
    digest: [u8; 32],
}

impl ApiKey {
    pub fn new(key: String) -> ApiKey {
        let digest = Sha256::digest(key.as_bytes()).into();
        ApiKey { key, digest }
    }

    pub fn expose(&self) -> &str {
        &self.key
    }

    pub fn matches(&self, candidate: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate).into();
        self.digest.ct_eq(&digest).into()
    }
}

pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("sk-omni-{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Resolves the key at start: the configured one, or the stored one, or a new
/// one stored now.
pub async fn resolve(client: &Client, configured: Option<&str>) -> anyhow::Result<ApiKey> {
    if let Some(key) = configured {
        tracing::info!("using the API key from OMNI_API_KEY");
        return Ok(ApiKey::new(key.to_owned()));
    }
    let (key, generated) = settings::put_if_absent(client, settings::API_KEY, &generate())
        .await
        .map_err(|e| anyhow::anyhow!("storing the generated API key: {}", e.detail))?;
    if generated {
        // Printed once, on the start that created it; GET /api/v1/setup/api-key
        // returns it until setup is complete.
        tracing::info!(api_key = %key, "generated an API key; send it as the x-api-key header");
    } else {
        tracing::info!("using the API key stored in the database");
    }
    Ok(ApiKey::new(key))
}

/// Who a request acts as, once authenticated. Handlers behind the protected
/// router read it from the request extensions.
#[derive(Clone, Debug)]
pub enum Principal {
    /// The API key (header or a session opened with it): full rights.
    ApiKey,
    Account { id: i64, username: String, role: Role },
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::ApiKey | Principal::Account { role: Role::Admin, .. })
    }
}

/// The header a state-changing request authenticated by the session cookie
/// must carry (`X-Omni-Client: ui`). A cross-site form or image cannot set a
/// header, so this is the CSRF defence, on top of `SameSite=Strict`.
pub const CLIENT_HEADER: &str = "x-omni-client";

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// 403 for a cookie-authenticated state change without `X-Omni-Client: ui`.
pub fn require_client_header(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if changes_state(method) && headers.get(CLIENT_HEADER).is_none_or(|v| v.as_bytes() != b"ui") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "client_header_required",
            "a request that changes state with the session cookie must send the header X-Omni-Client: ui",
        ));
    }
    Ok(())
}

pub fn too_many_attempts(blocked: rate_limit::Blocked) -> Response {
    let seconds = blocked.0.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        format!("too many failed attempts from this address or for this account; retry in {seconds} s"),
    )
    .into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Checks an `x-api-key` value: `Ok(true)` when it matches, `Ok(false)`
/// when not (counted against the address), `Err` with a 429 when the key is
/// wrong and the address is blocked (sent by the sign-in; protected routes
/// answer a wrong key 401 either way). A correct key is never
/// throttled: it has 256 bits, and a limit on it would only let strangers
/// lock automation out (see [`crate::rate_limit`]).
pub fn check_api_key(state: &AppState, address: &str, given: &[u8]) -> Result<bool, Response> {
    if state.api_key().matches(given) {
        return Ok(true);
    }
    state.limiter.attempt(address, None).map_err(too_many_attempts)?;
    tracing::warn!(%address, "a request sent a wrong API key");
    Ok(false)
}

/// The worker's TCP peer, when the server records it.
pub fn peer<B>(request: &axum::http::Request<B>) -> Option<SocketAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// Middleware for protected routes: the request proves who it is with
/// `x-api-key` or with the session cookie (which, for a state change, also
/// needs `X-Omni-Client: ui`); otherwise 401. The [`Principal`] goes into
/// the request extensions.
pub async fn require_auth(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let principal = if let Some(given) = request.headers().get(HEADER) {
        let address = rate_limit::client_address(request.headers(), peer(&request));
        match check_api_key(&state, &address, given.as_bytes()) {
            // A wrong key is 401 even from a blocked address (where it still
            // counts): a 429 would tell a key guesser nothing a 401 does not.
            Err(_) | Ok(false) => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the x-api-key header does not match the API key")
                    .into_response()
            }
            Ok(true) => Principal::ApiKey,
        }
    } else {
        match sessions::current(&state, request.headers()).await {
            Err(error) => return error.into_response(),
            Ok(Some(session)) => {
                if let Err(error) = require_client_header(request.method(), request.headers()) {
                    return error.into_response();
                }
                session.principal
            }
            Ok(None) => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "not_signed_in",
                    "sign in (POST /api/v1/auth/login) or send the API key in the x-api-key header",
                )
                .into_response()
            }
        }
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = generate();
        let body = key.strip_prefix("sk-omni-").unwrap();
        assert_eq!(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body).unwrap().len(), 32);
        assert_ne!(generate(), key);
    }

    #[test]
    fn matches_only_the_exact_key() {
        let key = ApiKey::new("sk-omni-abc".into());
        assert!(key.matches(b"sk-omni-abc"));
        assert!(!key.matches(b"sk-omni-ab"));
        assert!(!key.matches(b"sk-omni-abcd"));
        assert!(!key.matches(b""));
    }
}
