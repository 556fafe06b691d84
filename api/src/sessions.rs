//! Browser sign-in sessions (issue 15): `POST /api/v1/auth/login`,
//! `/logout`, `/logout-all`, `GET /api/v1/auth/me`, `GET /api/v1/auth/session`.
//!
//! A session is a row in `omni_auth_sessions`; the browser holds a random
//! 256-bit token in a cookie (`HttpOnly; SameSite=Strict; Path=/`): over
//! HTTPS, as `X-Forwarded-Proto` says, `__Host-omni_session` with `Secure`;
//! over plain HTTP `omni_session`. Only the cookie of the request's scheme is
//! read, and a request sending it twice has no session. The row holds only
//! the token's SHA-256. A
//! session ends after [`IDLE`] without use or [`ABSOLUTE`] after sign-in,
//! whichever comes first, at sign-out, at "sign out everywhere", and at once
//! when its account is disabled, deleted or given a new password: every
//! request reads the row and the account's disabled flag.
//!
//! Failed sign-ins count towards the limits of [`crate::rate_limit`].

use std::{net::SocketAddr, time::Duration};

use axum::{
    extract::{ConnectInfo, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    accounts::{self, Role},
    auth::{self, Principal},
    errors::{ApiError, ApiJson, ErrorBody},
    preferences, rate_limit,
    routes::AppState,
};

/// The session cookie over plain HTTP.
pub const COOKIE: &str = "omni_session";
/// The session cookie over TLS (see [`cookie_name`]).
pub const SECURE_COOKIE: &str = "__Host-omni_session";
/// A session unused for this long has ended.
pub const IDLE: Duration = Duration::from_secs(3 * 24 * 3600);
/// A session ends this long after sign-in, however much it is used.
pub const ABSOLUTE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A valid session of the current request.
pub struct Session {
    pub id: Uuid,
    pub principal: Principal,
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The session token from the `Cookie` header(s): the cookie of this
/// request's scheme ([`cookie_name`]), and only if exactly one was sent. A
/// second cookie of that name is one planted by a sibling origin (cookie
/// tossing): rather than guess which is ours, the request has no session.
fn token(headers: &HeaderMap) -> Option<&str> {
    let name = cookie_name(headers);
    let mut found = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .map(|(_, value)| value.trim());
    let token = found.next()?;
    if found.next().is_some() {
        tracing::warn!(cookie = name, "several session cookies sent: treated as none");
        return None;
    }
    Some(token).filter(|v| !v.is_empty())
}

/// The request's session, if its cookie names one that is still valid. The
/// lookup refreshes `last_seen_at` (at most once a minute per session).
pub async fn current(state: &AppState, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let Some(token) = token(headers) else { return Ok(None) };
    let client = state.db.client().await?;
    let idle = IDLE.as_secs_f64();
    let row = client
        .query_opt(
            "SELECT s.id, s.account_id, a.username, a.role, coalesce(a.disabled, false),
                    s.last_seen_at < now() - interval '1 minute'
             FROM omni_auth_sessions s LEFT JOIN omni_accounts a ON a.id = s.account_id
             WHERE s.token_digest = $1 AND s.expires_at > now()
               AND s.last_seen_at > now() - make_interval(secs => $2)",
            &[&digest(token), &idle],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let (id, account_id, disabled, stale): (Uuid, Option<i64>, bool, bool) = (row.get(0), row.get(1), row.get(4), row.get(5));
    if disabled {
        return Ok(None);
    }
    if stale {
        client.execute("UPDATE omni_auth_sessions SET last_seen_at = now() WHERE id = $1", &[&id]).await?;
    }
    let principal = match account_id {
        None => Principal::ApiKey,
        Some(account_id) => Principal::Account { id: account_id, username: row.get(2), role: Role::parse(row.get(3)) },
    };
    Ok(Some(Session { id, principal }))
}

/// Whether the request came over TLS, as the gateway's normalised
/// `X-Forwarded-Proto` says.
fn secure(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}

/// The session cookie's name for this request's scheme: over TLS
/// [`SECURE_COOKIE`] (a `__Host-` cookie is `Secure`, host-only and `Path=/`
/// by rule, so no other port's or subdomain's plain-HTTP page can set or
/// overwrite it); over plain HTTP [`COOKIE`], which cannot be `Secure`.
fn cookie_name(headers: &HeaderMap) -> &'static str {
    if secure(headers) {
        SECURE_COOKIE
    } else {
        COOKIE
    }
}

fn cookie(headers: &HeaderMap, value: &str, max_age: u64) -> HeaderValue {
    let name = cookie_name(headers);
    let secure = if secure(headers) { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{name}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"))
        .expect("the cookie is plain ASCII")
}

/// Deletes the sessions that can never be used again: past their absolute
/// expiry or idle for longer than [`IDLE`]. [`current`] already refuses them;
/// this keeps the table from growing with every sign-in ever made. Returns
/// how many rows went.
pub async fn purge_expired(client: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM omni_auth_sessions
             WHERE expires_at <= now() OR last_seen_at <= now() - make_interval(secs => $1)",
            &[&IDLE.as_secs_f64()],
        )
        .await
}

/// How often the worker purges ended sessions (and once at start).
pub const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Purges ended sessions (and stale anonymous preferences,
/// [`preferences::purge_stale_anonymous`]) now and every [`PURGE_EVERY`], for
/// the life of the worker. Every worker on a database may run it: the delete is idempotent.
pub fn spawn_purge(db: crate::db::Db) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PURGE_EVERY);
        loop {
            every.tick().await;
            let client = match db.client().await {
                Ok(client) => client,
                Err(error) => {
                    tracing::warn!(error = %error.detail, "could not purge ended sign-in sessions; retrying in an hour");
                    continue;
                }
            };
            match purge_expired(&client).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "purged ended sign-in sessions"),
                Err(error) => tracing::warn!(%error, "could not purge ended sign-in sessions; retrying in an hour"),
            }
            match preferences::purge_stale_anonymous(&client).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "purged anonymous preferences unwritten for 90 days"),
                Err(error) => tracing::warn!(%error, "could not purge stale anonymous preferences; retrying in an hour"),
            }
        }
    });
}

/// Opens a session for `account_id` (None: the API key) and returns the
/// `Set-Cookie` value.
pub async fn open(state: &AppState, headers: &HeaderMap, account_id: Option<i64>) -> Result<HeaderValue, ApiError> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let client = state.db.client().await?;
    client
        .execute(
            "INSERT INTO omni_auth_sessions (id, token_digest, account_id, expires_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
            &[&Uuid::new_v4(), &digest(&token), &account_id, &ABSOLUTE.as_secs_f64()],
        )
        .await?;
    Ok(cookie(headers, &token, ABSOLUTE.as_secs()))
}

/// Sign in with a username and password.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordLogin {
    /// Compared in lower case.
    #[schema(min_length = 1, max_length = 64)]
    username: String,
    #[schema(min_length = 1, max_length = 1024)]
    password: String,
}

/// Sign in with the API key (for scripts that want a session).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyLogin {
    #[schema(min_length = 1, max_length = 1024)]
    api_key: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Login {
    Password(PasswordLogin),
    ApiKey(ApiKeyLogin),
}

/// Who is signed in.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// The account's name; null for the API key.
    username: Option<String>,
    role: Role,
}

impl Me {
    fn of(principal: &Principal) -> Me {
        match principal {
            Principal::ApiKey => Me { username: None, role: Role::Admin },
            Principal::Account { username, role, .. } => Me { username: Some(username.clone()), role: *role },
        }
    }
}

/// The longest username a sign-in accepts (the schema's `max_length`).
const USERNAME_MAX_CHARS: usize = 64;

/// Password hashes computed at once, at most: each takes a core and 19 MiB
/// for tens of milliseconds, so more in parallel would only starve every
/// other request of CPU and memory. Sign-ins beyond it wait their turn.
fn hash_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// [`accounts::verify`] with at most [`hash_slots`] hashes running.
async fn verify_bounded(password: String, stored: Option<String>) -> Result<bool, ApiError> {
    let _slot = hash_slots().acquire().await.expect("the semaphore is never closed");
    accounts::verify(password, stored).await
}

fn invalid_credentials() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "the username or password is wrong")
}

/// Sign in: opens a session and sets its cookie.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = Login,
    params(("x-session-id" = Option<Uuid>, Header, description = "The anonymous session whose theme carries over to the account (when it has none)")),
    responses(
        (status = 200, description = "Signed in; the session cookie is set", body = Me,
            headers(("set-cookie" = String, description = "omni_session=…; HttpOnly; SameSite=Strict; Path=/; Max-Age=2592000 [; Secure]"))),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 401, description = "Wrong username, password or API key", body = ErrorBody),
        (status = 403, description = "The account is disabled", body = ErrorBody),
        (status = 429, description = "Too many failed attempts from this address or for this account; see Retry-After", body = ErrorBody,
            headers(("retry-after" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn login(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ApiJson(login): ApiJson<Login>,
) -> Result<Response, ApiError> {
    let address = rate_limit::client_address(&headers, peer.map(|p| p.0 .0));
    let (account_id, me) = match login {
        Login::ApiKey(ApiKeyLogin { api_key }) => match auth::check_api_key(&state, &address, api_key.as_bytes()) {
            Err(blocked) => return Ok(blocked),
            Ok(false) => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key is wrong")),
            Ok(true) => (None, Me::of(&Principal::ApiKey)),
        },
        Login::Password(PasswordLogin { username, password }) => {
            // The length first: an overlong name is never a limiter key, a
            // query parameter or a log line.
            if !(1..=USERNAME_MAX_CHARS).contains(&username.chars().count()) {
                return Err(ApiError::bad_request("invalid_username", "the username is 1 to 64 characters; check what was typed"));
            }
            let username = username.trim().to_lowercase();
            let limited = format!("account:{username}");
            // Counted as a failure now, before any await, and refunded if
            // right: parallel guesses cannot all pass a check made before
            // any of them failed.
            if let Err(blocked) = state.limiter.attempt(&address, Some(&limited)) {
                return Ok(auth::too_many_attempts(blocked));
            }
            // PostgreSQL text cannot hold a NUL, so no account has one: such a
            // name is an unknown account (401 after the same hash work), not
            // a query error.
            let checked = async {
                let row = if username.contains('\0') {
                    None
                } else {
                    // The connection goes back to the pool before the hash
                    // work, so a flood of sign-ins cannot hold the pool.
                    let client = state.db.client().await?;
                    client.query_opt("SELECT id, password_hash, role, disabled FROM omni_accounts WHERE username = $1", &[&username]).await?
                };
                let stored = row.as_ref().map(|r| r.get::<_, String>(1));
                Ok::<_, ApiError>((verify_bounded(password, stored).await?, row))
            };
            let (verified, row) = match checked.await {
                Ok(checked) => checked,
                Err(error) => {
                    // Not a failed guess: the database could not tell.
                    state.limiter.refund(&address, Some(&limited));
                    return Err(error);
                }
            };
            if !verified {
                tracing::warn!(%address, username = ?username, "failed sign-in");
                return Err(invalid_credentials());
            }
            state.limiter.succeeded(&address, Some(&limited));
            let row = row.expect("a verified password has an account");
            if row.get::<_, bool>(3) {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "account_disabled", "this account is disabled; ask an admin"));
            }
            let id: i64 = row.get(0);
            let client = state.db.client().await?;
            client.execute("UPDATE omni_accounts SET last_login_at = now() WHERE id = $1", &[&id]).await?;
            if let Some(session) = preferences::session_header(&headers) {
                preferences::carry_theme_over(&client, session, id).await?;
            }
            tracing::info!(%username, "signed in");
            (Some(id), Me { username: Some(username), role: Role::parse(row.get(2)) })
        }
    };
    let set_cookie = open(&state, &headers, account_id).await?;
    let mut response = Json(me).into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie);
    Ok(response)
}

/// A response that tells the browser to drop the cookie.
fn signed_out(headers: &HeaderMap) -> Response {
    let mut response = Json(serde_json::json!({ "success": true })).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie(headers, "", 0));
    response
}

#[derive(Serialize, ToSchema)]
pub struct SignedOut {
    success: bool,
}

/// Sign out: ends this session (if any) and clears the cookie.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", responses(
    (status = 200, description = "Signed out; the cookie is cleared", body = SignedOut),
    (status = 403, description = "Sent with the session cookie but without X-Omni-Client: ui", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(token) = token(&headers) {
        auth::require_client_header(&axum::http::Method::POST, &headers)?;
        let client = state.db.client().await?;
        client.execute("DELETE FROM omni_auth_sessions WHERE token_digest = $1", &[&digest(token)]).await?;
    }
    Ok(signed_out(&headers))
}

/// Sign out everywhere: ends every session of the signed-in account (for
/// the API key: every session opened with the key).
#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "auth", security(("api_key" = [])), responses(
    (status = 200, description = "Every session of the account has ended; the cookie is cleared", body = SignedOut),
    (status = 401, description = "Not signed in", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn logout_all(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let client = state.db.client().await?;
    let ended = match &principal {
        Principal::ApiKey => client.execute("DELETE FROM omni_auth_sessions WHERE account_id IS NULL", &[]).await?,
        Principal::Account { id, .. } => client.execute("DELETE FROM omni_auth_sessions WHERE account_id = $1", &[id]).await?,
    };
    tracing::info!(ended, "signed out everywhere");
    Ok(signed_out(&headers))
}

/// Who this request is signed in as.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", security(("api_key" = [])), responses(
    (status = 200, description = "The signed-in account (username null for the API key)", body = Me),
    (status = 401, description = "Not signed in", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn me(Extension(principal): Extension<Principal>) -> Json<Me> {
    Json(Me::of(&principal))
}

/// Whether this request is signed in, and as whom.
#[derive(Serialize, ToSchema)]
pub struct SessionState {
    signed_in: bool,
    /// Who is signed in; null when signed out.
    account: Option<Me>,
}

/// Whether this request is signed in: what the UI asks on its first page
/// load, when it cannot know (the session cookie is HttpOnly). Unlike
/// `GET /api/v1/auth/me`, "not signed in" is an answer here (200), not an
/// error; a wrong `x-api-key` is still 401.
#[utoipa::path(get, path = "/api/v1/auth/session", tag = "auth", security((), ("api_key" = [])), responses(
    (status = 200, description = "Signed in (with the account) or not", body = SessionState),
    (status = 401, description = "An x-api-key header that does not match the API key", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn session(State(state): State<AppState>, request: axum::extract::Request) -> Response {
    match auth::authenticate(&state, request.headers(), request.method(), auth::peer(&request)).await {
        Err(response) => response,
        Ok(principal) => Json(SessionState { signed_in: principal.is_some(), account: principal.as_ref().map(Me::of) }).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_is_secure_only_over_https() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "a=1; omni_session=tok; b=2".parse().unwrap());
        assert_eq!(token(&headers), Some("tok"));
        let plain = cookie(&headers, "x", 5);
        assert_eq!(plain, "omni_session=x; HttpOnly; SameSite=Strict; Path=/; Max-Age=5");
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(cookie(&headers, "x", 5), "__Host-omni_session=x; HttpOnly; SameSite=Strict; Path=/; Max-Age=5; Secure");
        // Over TLS only the __Host- cookie counts.
        assert_eq!(token(&headers), None);
        headers.insert(header::COOKIE, "omni_session=plain; __Host-omni_session=tls".parse().unwrap());
        assert_eq!(token(&headers), Some("tls"));
    }

    #[test]
    fn two_cookies_of_the_name_are_no_session() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "omni_session=a; omni_session=b".parse().unwrap());
        assert_eq!(token(&headers), None);
        headers.insert(header::COOKIE, "omni_session=a".parse().unwrap());
        headers.append(header::COOKIE, "omni_session=a".parse().unwrap());
        assert_eq!(token(&headers), None, "even the same value twice");
        headers.insert(header::COOKIE, "xomni_session=a; omni_session=b".parse().unwrap());
        assert_eq!(token(&headers), Some("b"));
    }
}
