//! `GET /api/v1/auth/check`: "would these credentials open a protected
//! route?", for the gateway, which does not hold the API key but protects
//! its own endpoints (`/gateway/logs*`, `/gateway/metrics/history`) with it.
//!
//! The route sits on the protected router, so whatever middleware protects
//! the API answers for it: 204 here means the request passed it, and its
//! own 401 is what a failing request gets.

use axum::http::StatusCode;

#[allow(unused_imports)]
use crate::errors::ErrorBody;

/// 204 when the request's credentials pass the protected routes' check.
#[utoipa::path(get, path = "/api/v1/auth/check", tag = "meta", security(("api_key" = [])), responses(
    (status = 204, description = "The credentials open protected routes"),
    (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
))]
pub async fn check() -> StatusCode {
    StatusCode::NO_CONTENT
}
