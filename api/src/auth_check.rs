//! `GET /api/v1/auth/check`: "would these credentials open a protected
//! route?", for the gateway, which does not hold the API key but protects
//! its own endpoints (`/gateway/logs*`, `/gateway/metrics/history`) with it.
//!
//! The route sits on the admin router (gateway logs and metrics history are
//! admin-only), so whatever middleware protects the admin routes answers for
//! it: 204 here means the request passed it; a failing request gets its 401
//! (no or wrong credentials) or 403 (signed in, but not an admin).

use axum::http::StatusCode;

#[allow(unused_imports)]
use crate::errors::ErrorBody;

/// 204 when the request's credentials open the admin routes.
#[utoipa::path(get, path = "/api/v1/auth/check", tag = "meta", security(("api_key" = [])), responses(
    (status = 204, description = "The credentials open the admin routes"),
    (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
    (status = 403, description = "Signed in, but not as an admin", body = ErrorBody),
))]
pub async fn check() -> StatusCode {
    StatusCode::NO_CONTENT
}
