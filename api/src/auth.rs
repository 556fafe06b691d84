//! The API key: where it comes from and how requests prove they have it.
//!
//! An operator-given `OMNI_API_KEY` wins. Otherwise the first worker to start
//! generates `sk-omni-` + 32 random bytes (URL-safe base64) and stores it in
//! the database, so it survives restarts and every worker uses the same one;
//! only the worker that generated it logs it. Comparison is constant-time over
//! SHA-256 digests, so neither content nor length leaks through timing.

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{db::Client, errors::ApiError, routes::AppState, settings};

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

/// Middleware for protected routes: 401 unless `x-api-key` is the key.
pub async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    match request.headers().get(HEADER) {
        None => Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "this endpoint needs the API key in the x-api-key header",
        )),
        Some(given) if state.api_key().matches(given.as_bytes()) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "invalid_api_key", "the x-api-key header does not match the API key")),
    }
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
