//! Accounts: who may sign in, with which role (issue 15).
//!
//! Passwords are hashed with Argon2id (the `argon2` crate, RFC 9106) into a
//! PHC string that carries its own salt and parameters, so parameters can be
//! raised later without invalidating stored hashes. The parameters are
//! OWASP's first recommendation: 19 MiB of memory, 2 passes, 1 lane; about
//! 25–40 ms per hash on this project's 2-core machine. Hashing runs on the
//! blocking pool so it never stalls the request threads.
//!
//! Admins manage accounts (`GET/POST /api/v1/accounts`,
//! `PATCH/DELETE /api/v1/accounts/{username}`); the last enabled admin can be
//! neither deleted, disabled nor demoted. Disabling an account, resetting its
//! password or deleting it ends its sessions at once.

use std::sync::LazyLock;

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Algorithm, Argon2, Params, Version,
};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    Extension, Json,
};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    auth::Principal,
    errors::{ApiError, ApiJson, ErrorBody},
    routes::AppState,
};

/// A username: 1–64 characters of `a-z 0-9 _ . -`, starting with a letter or digit.
pub const USERNAME_PATTERN: &str = "^[a-z0-9][a-z0-9_.-]{0,63}$";
pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 1024;

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("constant Argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Compared against when no account has the given name, so an unknown
/// username takes as long to refuse as a wrong password.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash_now("not a password of any account"));

fn hash_now(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    argon2().hash_password(password.as_bytes(), &salt).expect("Argon2id hashing with valid parameters succeeds").to_string()
}

pub async fn hash(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_now(&password)).await.map_err(|e| ApiError::internal("hashing a password", e))
}

/// Verifies `password` against `stored`, or against a dummy hash when there
/// is no stored one (the answer is then always false).
pub async fn verify(password: String, stored: Option<String>) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| DUMMY_HASH.clone());
        let ok = PasswordHash::new(&stored).is_ok_and(|parsed| argon2().verify_password(password.as_bytes(), &parsed).is_ok());
        ok && known
    })
    .await
    .map_err(|e| ApiError::internal("verifying a password", e))
}

pub fn validate_username(username: &str) -> Result<(), ApiError> {
    static RE: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(USERNAME_PATTERN).expect("valid pattern"));
    if RE.is_match(username) {
        Ok(())
    } else {
        Err(ApiError::bad_request("invalid_username", "a username is 1–64 characters of a-z 0-9 _ . -, starting with a letter or digit"))
    }
}

pub fn validate_password(password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if (PASSWORD_MIN_CHARS..=PASSWORD_MAX_CHARS).contains(&n) && !password.contains('\0') {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_password",
            format!("a password is {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters, without NUL"),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    pub fn parse(text: &str) -> Role {
        if text == "admin" {
            Role::Admin
        } else {
            Role::User
        }
    }
}

/// An account as the API shows it (never its password hash).
#[derive(Serialize, ToSchema)]
pub struct Account {
    #[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$", min_length = 1, max_length = 64)]
    username: String,
    role: Role,
    disabled: bool,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339; null until the first sign-in.
    last_login_at: Option<String>,
}

const ACCOUNT_COLUMNS: &str = "username, role, disabled,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
    to_char(last_login_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

fn account_from(row: &tokio_postgres::Row) -> Account {
    Account {
        username: row.get(0),
        role: Role::parse(row.get(1)),
        disabled: row.get(2),
        created_at: row.get(3),
        last_login_at: row.get(4),
    }
}

/// A new account.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    #[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$", min_length = 1, max_length = 64)]
    pub username: String,
    /// 8–1024 characters, without NUL.
    #[schema(min_length = 8, max_length = 1024, pattern = "^[^\\x00]*$")]
    pub password: String,
    #[serde(default = "default_role")]
    pub role: Role,
}

fn default_role() -> Role {
    Role::User
}

/// A change to an account; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
    /// A new password (8–1024 characters); ends the account's sessions.
    #[schema(min_length = 8, max_length = 1024, pattern = "^[^\\x00]*$")]
    password: Option<String>,
    role: Option<Role>,
    /// True ends the account's sessions at once and refuses its sign-ins.
    disabled: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    success: bool,
}



fn not_found(username: &str) -> ApiError {
    ApiError::not_found("account_not_found", format!("there is no account {username:?}"))
}

/// Serializes changes that could remove the last admin.
async fn lock_accounts(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), ApiError> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('omni_accounts'))", &[]).await?;
    Ok(())
}

async fn other_enabled_admins(tx: &impl GenericClient, username: &str) -> Result<i64, ApiError> {
    let row = tx
        .query_one("SELECT count(*) FROM omni_accounts WHERE role = 'admin' AND NOT disabled AND username <> $1", &[&username])
        .await?;
    Ok(row.get(0))
}

fn last_admin() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "last_admin", "this is the last enabled admin; make another account admin first")
}

/// Inserts an account; 409 when the name is taken.
pub async fn insert(client: &impl GenericClient, account: &NewAccount) -> Result<(), ApiError> {
    validate_username(&account.username)?;
    validate_password(&account.password)?;
    let hash = hash(account.password.clone()).await?;
    let inserted = client
        .execute(
            "INSERT INTO omni_accounts (username, password_hash, role) VALUES ($1, $2, $3) ON CONFLICT (username) DO NOTHING",
            &[&account.username, &hash, &account.role.as_str()],
        )
        .await?;
    if inserted == 0 {
        return Err(ApiError::new(StatusCode::CONFLICT, "account_exists", format!("an account {:?} exists already", account.username)));
    }
    tracing::info!(username = %account.username, role = account.role.as_str(), "account created");
    Ok(())
}

async fn fetch(client: &impl GenericClient, username: &str) -> Result<Account, ApiError> {
    let row = client
        .query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM omni_accounts WHERE username = $1"), &[&username])
        .await?
        .ok_or_else(|| not_found(username))?;
    Ok(account_from(&row))
}

/// Every account, ordered by username (admins only).
#[utoipa::path(get, path = "/api/v1/accounts", tag = "accounts", security(("api_key" = [])), responses(
    (status = 200, description = "The accounts", body = Vec<Account>),
    (status = 401, description = "Not signed in", body = ErrorBody),
    (status = 403, description = "Not an admin", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn list(State(state): State<AppState>, Extension(_principal): Extension<Principal>) -> Result<Json<Vec<Account>>, ApiError> {
    let client = state.db.client().await?;
    let rows = client.query(&format!("SELECT {ACCOUNT_COLUMNS} FROM omni_accounts ORDER BY username"), &[]).await?;
    Ok(Json(rows.iter().map(account_from).collect()))
}

/// Create an account (admins only).
#[utoipa::path(post, path = "/api/v1/accounts", tag = "accounts", security(("api_key" = [])), request_body = NewAccount, responses(
    (status = 201, description = "Created", body = Account),
    (status = 400, description = "Bad username, password, role or body", body = ErrorBody),
    (status = 401, description = "Not signed in", body = ErrorBody),
    (status = 403, description = "Not an admin", body = ErrorBody),
    (status = 409, description = "The username is taken", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn create(
    State(state): State<AppState>,
    Extension(_principal): Extension<Principal>,
    ApiJson(account): ApiJson<NewAccount>,
) -> Result<(StatusCode, Json<Account>), ApiError> {
    let client = state.db.client().await?;
    insert(&client, &account).await?;
    Ok((StatusCode::CREATED, Json(fetch(&client, &account.username).await?)))
}

/// Change an account's password, role or disabled flag (admins only).
#[utoipa::path(patch, path = "/api/v1/accounts/{username}", tag = "accounts", security(("api_key" = [])),
    params(("username" = String, Path, pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$", min_length = 1, max_length = 64)),
    request_body = AccountChange,
    responses(
        (status = 200, description = "The changed account", body = Account),
        (status = 400, description = "Bad username, password, role or body", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The change would leave no enabled admin", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn update(
    State(state): State<AppState>,
    Extension(_principal): Extension<Principal>,
    Path(username): Path<String>,
    ApiJson(change): ApiJson<AccountChange>,
) -> Result<Json<Account>, ApiError> {
    validate_username(&username)?;
    if let Some(password) = &change.password {
        validate_password(password)?;
    }
    let hash = match change.password.clone() {
        Some(password) => Some(hash(password).await?),
        None => None,
    };
    let mut client = state.db.client().await?;
    let tx = client.transaction().await?;
    lock_accounts(&tx).await?;
    let current = fetch(&tx, &username).await?;
    let removes_admin = current.role == Role::Admin
        && !current.disabled
        && (change.disabled == Some(true) || change.role == Some(Role::User));
    if removes_admin && other_enabled_admins(&tx, &username).await? == 0 {
        return Err(last_admin());
    }
    tx.execute(
        "UPDATE omni_accounts SET password_hash = coalesce($2, password_hash), role = coalesce($3, role),
             disabled = coalesce($4, disabled) WHERE username = $1",
        &[&username, &hash, &change.role.map(Role::as_str), &change.disabled],
    )
    .await?;
    if hash.is_some() || change.disabled == Some(true) {
        tx.execute(
            "DELETE FROM omni_auth_sessions WHERE account_id = (SELECT id FROM omni_accounts WHERE username = $1)",
            &[&username],
        )
        .await?;
    }
    let changed = fetch(&tx, &username).await?;
    tx.commit().await?;
    tracing::info!(%username, role = changed.role.as_str(), disabled = changed.disabled, password_reset = hash.is_some(), "account changed");
    Ok(Json(changed))
}

/// Delete an account and its sessions and preferences (admins only).
#[utoipa::path(delete, path = "/api/v1/accounts/{username}", tag = "accounts", security(("api_key" = [])),
    params(("username" = String, Path, pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$", min_length = 1, max_length = 64)),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Bad username", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The last enabled admin", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(_principal): Extension<Principal>,
    Path(username): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    validate_username(&username)?;
    let mut client = state.db.client().await?;
    let tx = client.transaction().await?;
    lock_accounts(&tx).await?;
    let current = fetch(&tx, &username).await?;
    if current.role == Role::Admin && !current.disabled && other_enabled_admins(&tx, &username).await? == 0 {
        return Err(last_admin());
    }
    tx.execute("DELETE FROM omni_accounts WHERE username = $1", &[&username]).await?;
    tx.commit().await?;
    tracing::info!(%username, "account deleted");
    Ok(Json(Deleted { success: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_and_passwords_follow_the_documented_rules() {
        for good in ["admin", "a", "ops.team-1_x", &"a".repeat(64)] {
            assert!(validate_username(good).is_ok(), "{good}");
        }
        for bad in ["", "Admin", "-a", "a b", "é", &"a".repeat(65)] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("1234567").is_err());
        assert!(validate_password(&"p".repeat(1025)).is_err());
        assert!(validate_password("abcdefgh\0").is_err());
    }

    #[test]
    fn a_hash_verifies_only_its_password() {
        let stored = hash_now("correct horse");
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(verify("correct horse".into(), Some(stored.clone()))).unwrap());
        assert!(!rt.block_on(verify("wrong horse".into(), Some(stored))).unwrap());
        assert!(!rt.block_on(verify("not a password of any account".into(), None)).unwrap());
    }
}
