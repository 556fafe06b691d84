//! The one error shape every API response uses: `{"detail", "code"}`.
//!
//! Handlers return [`ApiError`]; axum's own rejections (bad JSON, oversized
//! bodies, unmatched methods) are plain text by default, so [`ApiJson`] maps
//! body rejections and [`json_error_bodies`] rewrites whatever else slips
//! through, so a client never has to parse anything but JSON. A 500 never
//! carries internals: the cause goes to the log, the client gets a pointer there.

use axum::{
    extract::{rejection::JsonRejection, FromRequest, Request},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
/// The JSON body of every error response; the gateway's own errors use it too.
pub use omni_contract::error_body::ErrorBody;

/// An error a handler answers with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Seconds for a `Retry-After` header (a 503 while the database is away).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError { status, code, detail: detail.into(), retry_after: None }
    }

    /// The same error, answered with `Retry-After: <seconds>`.
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn database_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is not reachable right now; retry shortly",
        )
        .retry_after(1)
    }

    /// No server accepts writes yet, but one answers as a standby: the
    /// database's HA engine is promoting one. Same code as any database
    /// outage (clients need not tell them apart), a detail that says why.
    pub fn database_failing_over(retry_after: u64) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is failing over to a new primary; retry after the time in Retry-After",
        )
        .retry_after(retry_after)
    }

    /// Every pooled connection is in use and none came free in time.
    pub fn database_busy() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "every database connection of this worker is busy; retry shortly (or raise OMNI_API_DB_POOL_SIZE)",
        )
        .retry_after(1)
    }

    /// An unexpected failure: logged with its cause, reported without it.
    pub fn internal(context: &str, cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("{context}; the worker log has the details"),
        )
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(error: deadpool_postgres::PoolError) -> ApiError {
        tracing::warn!(%error, "no database connection");
        ApiError::database_unavailable()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(error: tokio_postgres::Error) -> ApiError {
        // A connection that died between checkout and query is the database
        // going away, not a bug: answer 503 like a failed checkout. So is a
        // server shutting down (57P01-57P03: a switchover stops the old
        // primary) or one that became read-only (25006: demoted to a
        // standby behind a proxy that kept the connection).
        let going_away = error.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("57P") || c.starts_with("08") || c == "25006"
        });
        if error.is_closed() || error.as_db_error().is_none() || going_away {
            tracing::warn!(%error, "database connection lost during a request");
            ApiError::database_unavailable()
        } else {
            ApiError::internal("database query failed", error)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = error_response(self.status, self.code, self.detail);
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub fn error_response(status: StatusCode, code: &str, detail: String) -> Response {
    (status, Json(ErrorBody::new(code, detail))).into_response()
}

/// `Json<T>` with rejections in the API's error shape: every malformed body
/// (syntax, wrong types, missing fields, invalid UTF-8) is a 400, unlike
/// axum's 422 for type errors, and an oversized one a 413. The body must be
/// a JSON object: serde would also fill a struct from an array of its fields
/// in order (`[null, null]`), which no schema of ours allows.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Content type, size and syntax first, as axum checks them.
        let Json(raw) = Json::<Box<RawValue>>::from_request(req, state).await.map_err(json_rejection)?;
        if !raw.get().starts_with('{') {
            return Err(ApiError::bad_request("invalid_body", "the body must be a JSON object"));
        }
        let Json(value) = Json::<T>::from_bytes(raw.get().as_bytes()).map_err(json_rejection)?;
        Ok(ApiJson(value))
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(_) => ApiError::bad_request("invalid_json", rejection.body_text()),
        JsonRejection::JsonDataError(_) => ApiError::bad_request("invalid_body", rejection.body_text()),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => payload_too_large(),
        other => ApiError::bad_request("invalid_body", other.body_text()),
    }
}

pub fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than {} bytes", crate::routes::BODY_LIMIT),
    )
}

/// Middleware: any error response that is not JSON yet (an axum rejection of
/// a path or header, a 405 from the router) is rewritten into the API shape,
/// keeping its status and using its text as the detail. Every answer also
/// gets `X-Content-Type-Options: nosniff`.
pub async fn json_error_bodies(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    // Every answer, JSON or not: a browser never guesses another type.
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let detail = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "client_error",
        _ => "internal_error",
    };
    let mut rewritten = error_response(status, code, detail);
    // Keep headers such as `Allow` on a 405.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name.clone(), value.clone());
        }
    }
    rewritten.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    rewritten
}
