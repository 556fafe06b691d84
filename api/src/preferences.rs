//! Preferences (SPEC §6): of the signed-in account, or of an anonymous
//! browser session.
//!
//! A request whose session cookie belongs to an account reads and writes
//! that account's preferences (every tab, every device; a write also needs
//! `X-Omni-Client: ui`, as every cookie-authenticated change does). Any
//! other request is scoped by its `x-session-id` UUID, as before accounts
//! existed: the sign-in page's theme, and existing clients. Every query is
//! scoped by exactly one owner, so one session or account can never see or
//! change another's keys. The upsert is a single `INSERT … ON CONFLICT`, so
//! concurrent writers of one key neither fail nor duplicate it.
//!
//! Anyone may write anonymous preferences (any UUID is an owner), so storage
//! is bounded: at most [`MAX_KEYS_PER_OWNER`] keys per session id or account,
//! and anonymous preferences in all at most [`MAX_ANONYMOUS_ROWS`] rows and
//! [`MAX_ANONYMOUS_BYTES`] of keys and values. A write beyond a limit is
//! answered 413 naming it, and stores nothing; overwriting a key within the
//! limits and deleting keys always work. A write that adds a key, or makes
//! anonymous storage larger, runs its checks and the write in one
//! transaction under an advisory lock (one per account, one for all
//! anonymous owners), so concurrent writers cannot together pass a limit;
//! an overwrite that grows nothing a limit counts is one lock-free `UPDATE`.
//! Anonymous preferences not written for [`ANONYMOUS_TTL`] are purged with
//! the ended sign-in sessions ([`purge_stale_anonymous`]).

use axum::{
    extract::{FromRequestParts, Path, State},
    http::{request::Parts, StatusCode},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{self, Principal},
    errors::{ApiError, ApiJson, ErrorBody},
    routes::AppState,
    sessions,
};

pub const SESSION_HEADER: &str = "x-session-id";
const MAX_KEY_CHARS: usize = 100;
/// Characters, as JSON Schema's `maxLength` counts them (at most 256 KiB of UTF-8).
pub const MAX_VALUE_CHARS: usize = 64 * 1024;
/// Keys one session id or one account may keep.
pub const MAX_KEYS_PER_OWNER: i64 = 100;
/// Anonymous preference rows, all session ids together.
pub const MAX_ANONYMOUS_ROWS: i64 = 100_000;
/// Bytes (UTF-8) of anonymous keys and values, all session ids together.
pub const MAX_ANONYMOUS_BYTES: i64 = 64 * 1024 * 1024;
/// Anonymous preferences unwritten for this long are purged.
pub const ANONYMOUS_TTL: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);
/// Advisory lock keys ("omni" + "pref"/"anon"): writes of one account, and
/// of all anonymous owners, are serialized so the limits hold exactly.
const ACCOUNT_LOCK_CLASS: i32 = 0x7072_6566;
const ANONYMOUS_LOCK_KEY: i64 = 0x6f6d_6e69_616e_6f6e;

/// The caller's session, from the `x-session-id` header.
pub struct SessionId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for SessionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(SESSION_HEADER).ok_or_else(|| {
            ApiError::bad_request("missing_session_id", "send the browser session id as a UUID in the x-session-id header")
        })?;
        header
            .to_str()
            .ok()
            .and_then(|text| Uuid::try_parse(text.trim()).ok())
            .map(SessionId)
            .ok_or_else(|| ApiError::bad_request("invalid_session_id", "the x-session-id header must be a UUID"))
    }
}

/// Whose preferences a request addresses.
#[derive(Clone, Copy)]
pub enum Owner {
    Account(i64),
    Session(Uuid),
}

/// The `x-session-id` header, when it is a UUID.
pub fn session_header(headers: &axum::http::HeaderMap) -> Option<Uuid> {
    headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()).and_then(|t| Uuid::try_parse(t.trim()).ok())
}

impl FromRequestParts<AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(session) = sessions::current(state, &parts.headers).await? {
            if let Principal::Account { id, .. } = session.principal {
                auth::require_client_header(&parts.method, &parts.headers)?;
                return Ok(Owner::Account(id));
            }
        }
        let SessionId(session) = SessionId::from_request_parts(parts, state).await?;
        Ok(Owner::Session(session))
    }
}

impl Owner {
    /// The `WHERE` condition selecting this owner's rows, with `$1` its id.
    fn column(self) -> &'static str {
        match self {
            Owner::Account(_) => "account_id",
            Owner::Session(_) => "session_id",
        }
    }

    pub(crate) fn session(self) -> Option<Uuid> {
        match self {
            Owner::Session(id) => Some(id),
            Owner::Account(_) => None,
        }
    }

    pub(crate) fn account(self) -> Option<i64> {
        match self {
            Owner::Account(id) => Some(id),
            Owner::Session(_) => None,
        }
    }

    fn id(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Owner::Account(id) => id,
            Owner::Session(id) => id,
        }
    }
}

/// At sign-in: the anonymous session's theme becomes the account's, unless
/// the account has one already.
pub async fn carry_theme_over(client: &impl deadpool_postgres::GenericClient, session: Uuid, account: i64) -> Result<(), ApiError> {
    client
        .execute(
            "INSERT INTO omni_user_preferences (account_id, key, value)
             SELECT $2, key, value FROM omni_user_preferences WHERE session_id = $1 AND key = 'theme'
             ON CONFLICT (account_id, key) DO NOTHING",
            &[&session, &account],
        )
        .await?;
    Ok(())
}

#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only describes the header in the OpenAPI document.
struct SessionHeader {
    /// The browser session's UUID; preferences are isolated per session.
    /// A request carrying an account's session cookie may leave it out: it
    /// then addresses that account's preferences. (OpenAPI cannot say "one
    /// of a header or a cookie", so the document states the stricter rule
    /// every cookie-less client must follow.)
    #[param(rename = "x-session-id")]
    x_session_id: Uuid,
}

/// One preference.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Preference {
    /// 1–100 characters of `A-Z a-z 0-9 _ . : -`.
    #[schema(min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9_.:-]{1,100}$")]
    pub key: String,
    /// Any string of at most 65 536 characters, without NUL.
    #[schema(max_length = 65536, pattern = "^[^\\x00]*$")]
    pub value: String,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    success: bool,
}

fn validate_key(key: &str) -> Result<(), ApiError> {
    let valid = !key.is_empty()
        && key.len() <= MAX_KEY_CHARS
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request("invalid_key", "a preference key is 1–100 characters of A-Z a-z 0-9 _ . : -"))
    }
}

fn validate_value(value: &str) -> Result<(), ApiError> {
    if value.chars().count() > MAX_VALUE_CHARS {
        return Err(ApiError::bad_request("value_too_long", format!("a preference value is at most {MAX_VALUE_CHARS} characters")));
    }
    // PostgreSQL text cannot hold NUL; refuse it here instead of failing in the database.
    if value.contains('\0') {
        return Err(ApiError::bad_request("invalid_value", "a preference value cannot contain NUL characters"));
    }
    Ok(())
}

/// Create or replace a preference of this session.
///
/// Limits: at most 100 keys per session id or account; anonymous
/// (x-session-id) preferences in all at most 100 000 rows and 64 MiB of keys
/// and values. A write past a limit is answered 413 and stores nothing;
/// overwriting an existing key within the limits always works.
#[utoipa::path(post, path = "/api/v1/preferences", tag = "preferences", params(SessionHeader),
    request_body = Preference,
    responses(
        (status = 200, description = "Stored", body = Preference),
        (status = 400, description = "Bad session id, key, value or body", body = ErrorBody),
        (status = 403, description = "Sent with an account's session cookie but without X-Omni-Client: ui", body = ErrorBody),
        (status = 413, description = "A limit is reached and nothing was stored: `too_many_preferences` (this session id or account \
            already has 100 keys: delete one or overwrite an existing key), `preference_storage_full` (anonymous preferences \
            in all hold 100 000 rows or 64 MiB), or a body over 1 MiB", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn upsert(
    State(state): State<AppState>,
    owner: Owner,
    ApiJson(preference): ApiJson<Preference>,
) -> Result<Json<Preference>, ApiError> {
    validate_key(&preference.key)?;
    validate_value(&preference.value)?;
    // Under load, overwrites of existing keys share one statement and one
    // commit (`preference_batches`); what that does not store comes here.
    if state.batches.overwrite(owner, &preference.key, &preference.value).await {
        return Ok(Json(preference));
    }
    let mut client = state.db.client().await?;
    // Overwriting an existing key without growing what a limit counts needs
    // no lock: one statement, committed on its own, so concurrent writers
    // share PostgreSQL's WAL flushes instead of queueing behind the lock
    // through each other's commits. An account's keys count only their
    // number; anonymous ones also their bytes, so there the new value must
    // be no longer than the one it replaces (checked on the row's latest
    // version: UPDATE re-reads a row another writer just changed).
    let overwrite = client
        .prepare_cached(match owner {
            Owner::Account(_) => {
                "UPDATE omni_user_preferences SET value = $3, updated_at = now() WHERE account_id = $1 AND key = $2 RETURNING key, value"
            }
            Owner::Session(_) => {
                "UPDATE omni_user_preferences SET value = $3, updated_at = now()
                 WHERE session_id = $1 AND key = $2 AND octet_length(value) >= octet_length($3) RETURNING key, value"
            }
        })
        .await?;
    if let Some(row) = client.query_opt(&overwrite, &[owner.id(), &preference.key, &preference.value]).await? {
        return Ok(Json(Preference { key: row.get(0), value: row.get(1) }));
    }
    // A new key, or a longer anonymous value: checked against the limits
    // and written under the owner's lock.
    let tx = client.transaction().await?;
    match owner {
        Owner::Account(id) => tx.execute("SELECT pg_advisory_xact_lock($1, hashint8($2))", &[&ACCOUNT_LOCK_CLASS, &id]).await?,
        Owner::Session(_) => tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ANONYMOUS_LOCK_KEY]).await?,
    };
    let column = owner.column();
    let usage = tx
        .prepare_cached(&format!(
            "SELECT count(*), (SELECT octet_length(key) + octet_length(value) FROM omni_user_preferences WHERE {column} = $1 AND key = $2)
             FROM omni_user_preferences WHERE {column} = $1"
        ))
        .await?;
    let row = tx.query_one(&usage, &[owner.id(), &preference.key]).await?;
    let (keys, replaced): (i64, Option<i32>) = (row.get(0), row.get(1));
    let added = i64::try_from(preference.key.len() + preference.value.len()).unwrap_or(i64::MAX);
    if replaced.is_none() && keys >= MAX_KEYS_PER_OWNER {
        return Err(too_many(owner));
    }
    if let Owner::Session(_) = owner {
        let row = tx
            .query_one(
                "SELECT count(*), coalesce(sum(octet_length(key) + octet_length(value)), 0)::bigint
                 FROM omni_user_preferences WHERE session_id IS NOT NULL",
                &[],
            )
            .await?;
        let (rows, bytes): (i64, i64) = (row.get(0), row.get(1));
        let rows_after = rows + i64::from(replaced.is_none());
        let bytes_after = bytes - i64::from(replaced.unwrap_or(0)) + added;
        if rows_after > MAX_ANONYMOUS_ROWS || bytes_after > MAX_ANONYMOUS_BYTES {
            tracing::warn!(rows, bytes, "anonymous preferences are full; a write was refused");
            return Err(storage_full());
        }
    }
    let statement = tx
        .prepare_cached(&format!(
            "INSERT INTO omni_user_preferences ({column}, key, value) VALUES ($1, $2, $3)
             ON CONFLICT ({column}, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
             RETURNING key, value"
        ))
        .await?;
    let row = tx.query_one(&statement, &[owner.id(), &preference.key, &preference.value]).await?;
    tx.commit().await?;
    Ok(Json(Preference { key: row.get(0), value: row.get(1) }))
}

fn too_many(owner: Owner) -> ApiError {
    let who = match owner {
        Owner::Account(_) => "this account",
        Owner::Session(_) => "this session id",
    };
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_preferences",
        format!(
            "{who} already has {MAX_KEYS_PER_OWNER} preferences, the most one session id or account may keep; nothing was stored. \
             Delete one (DELETE /api/v1/preferences/{{key}}) or overwrite an existing key"
        ),
    )
}

fn storage_full() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "preference_storage_full",
        format!(
            "anonymous preferences (x-session-id) in all have reached their limit of {MAX_ANONYMOUS_ROWS} rows or {} MiB; \
             nothing was stored. Sign in to keep preferences with your account, or retry after unused ones expire ({} days unwritten)",
            MAX_ANONYMOUS_BYTES / (1024 * 1024),
            ANONYMOUS_TTL.as_secs() / 86_400
        ),
    )
}

/// Deletes anonymous preferences not written for [`ANONYMOUS_TTL`]; returns how many.
pub async fn purge_stale_anonymous(client: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM omni_user_preferences WHERE session_id IS NOT NULL AND updated_at < now() - make_interval(secs => $1)",
            &[&ANONYMOUS_TTL.as_secs_f64()],
        )
        .await
}

/// All preferences of this session, ordered by key.
#[utoipa::path(get, path = "/api/v1/preferences", tag = "preferences", params(SessionHeader), responses(
    (status = 200, description = "This session's preferences", body = Vec<Preference>),
    (status = 400, description = "Bad session id", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn list(State(state): State<AppState>, owner: Owner) -> Result<Json<Vec<Preference>>, ApiError> {
    let client = state.db.client().await?;
    let statement = client
        .prepare_cached(&format!("SELECT key, value FROM omni_user_preferences WHERE {} = $1 ORDER BY key", owner.column()))
        .await?;
    let rows = client.query(&statement, &[owner.id()]).await?;
    Ok(Json(rows.iter().map(|row| Preference { key: row.get(0), value: row.get(1) }).collect()))
}

/// One preference of this session.
#[utoipa::path(get, path = "/api/v1/preferences/{key}", tag = "preferences",
    params(SessionHeader, ("key" = String, Path, description = "Preference key: 1–100 characters of A-Z a-z 0-9 _ . : -", min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9_.:-]{1,100}$")),
    responses(
        (status = 200, description = "The preference", body = Preference),
        (status = 400, description = "Bad session id or key", body = ErrorBody),
        (status = 404, description = "This session has no such key", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn get(
    State(state): State<AppState>,
    owner: Owner,
    Path(key): Path<String>,
) -> Result<Json<Preference>, ApiError> {
    validate_key(&key)?;
    // Under load, reads share one statement (`preference_batches`).
    match state.batches.read(owner, &key).await {
        Some(Some(value)) => return Ok(Json(Preference { key, value })),
        Some(None) => return Err(not_found(&key)),
        None => {}
    }
    let client = state.db.client().await?;
    let statement = client
        .prepare_cached(&format!("SELECT key, value FROM omni_user_preferences WHERE {} = $1 AND key = $2", owner.column()))
        .await?;
    let row = client.query_opt(&statement, &[owner.id(), &key]).await?.ok_or_else(|| not_found(&key))?;
    Ok(Json(Preference { key: row.get(0), value: row.get(1) }))
}

/// Delete one preference of this session.
#[utoipa::path(delete, path = "/api/v1/preferences/{key}", tag = "preferences",
    params(SessionHeader, ("key" = String, Path, description = "Preference key: 1–100 characters of A-Z a-z 0-9 _ . : -", min_length = 1, max_length = 100, pattern = "^[A-Za-z0-9_.:-]{1,100}$")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Bad session id or key", body = ErrorBody),
        (status = 403, description = "Sent with an account's session cookie but without X-Omni-Client: ui", body = ErrorBody),
        (status = 404, description = "This session has no such key", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn delete(
    State(state): State<AppState>,
    owner: Owner,
    Path(key): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    validate_key(&key)?;
    let client = state.db.client().await?;
    let statement = client
        .prepare_cached(&format!("DELETE FROM omni_user_preferences WHERE {} = $1 AND key = $2", owner.column()))
        .await?;
    match client.execute(&statement, &[owner.id(), &key]).await? {
        0 => Err(not_found(&key)),
        _ => Ok(Json(Deleted { success: true })),
    }
}

fn not_found(key: &str) -> ApiError {
    ApiError::not_found("preference_not_found", format!("this session has no preference {key:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_limited_to_the_documented_alphabet_and_length() {
        for good in ["theme", "ui.theme:dark-mode_2", &"k".repeat(100)] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a/b", "'; DROP TABLE x;--", "é", "a\0b", &"k".repeat(101)] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_limited_to_64_kib_without_nul() {
        assert!(validate_value(&"é".repeat(MAX_VALUE_CHARS)).is_ok());
        assert!(validate_value(&"v".repeat(MAX_VALUE_CHARS + 1)).is_err());
        assert!(validate_value("a\0b").is_err());
        assert!(validate_value("tab\tnewline\n\u{1b}[31m").is_ok());
    }
}
