//! Onboarding (SPEC §6): storage settings, the first admin account,
//! completing setup, the first key.
//!
//! Storage settings are stored in the database and, when the gateway asks for
//! it with `OMNI_SETTINGS_FILE`, also written to a file: the gateway needs
//! them before it starts PostgreSQL, when the database cannot be read yet.
//! They take effect at the gateway's next start. PostgreSQL is the only
//! storage, so there is no `db_type` anywhere.

use std::{io::Write, path::Path};

use axum::{extract::State, http::StatusCode, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    accounts,
    errors::{ApiError, ApiJson, ErrorBody},
    routes::AppState,
    settings,
};

/// What a field of the onboarding form may hold. The OpenAPI document states
/// these exact patterns ([`rules::document`]) and the handler checks them with
/// the same strings, so
/// what a client reads is what is enforced (the fuzzer's schema checks hold
/// us to it). They use only explicit character ranges, which JSON Schema's
/// (ECMA-262) and Rust's regex engines read alike.
pub mod rules {
    use std::sync::LazyLock;

    use regex::Regex;

    /// A path: no control characters (Unicode Cc), at least one character
    /// that is not a space.
    pub const PATH: &str = r"^[^\x00-\x1f\x7f-\x9f]*[^ \x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$";
    pub const PATH_MAX_CHARS: usize = 4096;
    /// Empty (none), or a `postgres://` URL that PostgreSQL's clients parse:
    /// `postgres[ql]://[user[:password]@]host[:port][/database][?sslmode=…]`,
    /// with anything outside the plain characters percent-encoded.
    pub const POSTGRES_URL: &str = concat!(
        r"^$|^postgres(ql)?://",
        r"(([A-Za-z0-9._~-]|%[2-7][0-9A-Fa-f])+(:([A-Za-z0-9._~!$&'()*+,;=-]|%[2-7][0-9A-Fa-f])*)?@)?",
        r"[A-Za-z0-9.-]+",
        r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?",
        r"(/([A-Za-z0-9._~-]|%[2-7][0-9A-Fa-f])*)?",
        r"(\?sslmode=(disable|prefer|require))?$",
    );
    /// Empty, or `redis://`/`rediss://` and at least one more character, no spaces or controls.
    pub const REDIS_URL: &str = r"^$|^rediss?://[^ \x00-\x1f\x7f-\x9f]+$";
    /// Empty, or database names (letters, digits, `_`, `-`, `*` wildcards; at most 63 each) separated by commas.
    pub const DATABASE_LIST: &str = r"^ *([A-Za-z0-9_*-]{1,63} *(, *[A-Za-z0-9_*-]{1,63} *)*)?$";
    /// Up to 256 characters without control characters.
    pub const PREFIX: &str = r"^[^\x00-\x1f\x7f-\x9f]{0,256}$";

    const ALL: [&str; 5] = [PATH, POSTGRES_URL, REDIS_URL, DATABASE_LIST, PREFIX];
    static COMPILED: LazyLock<Vec<Regex>> = LazyLock::new(|| ALL.iter().map(|p| Regex::new(p).expect("the rule patterns are valid")).collect());

    /// Whether `text` matches `pattern`, one of the rules above.
    pub fn is_match(pattern: &str, text: &str) -> bool {
        let i = ALL.iter().position(|p| *p == pattern).expect("a pattern of this module");
        COMPILED[i].is_match(text)
    }

    /// States the rules in the OpenAPI document: each field's pattern, and
    /// the fields that become required when their feature is enabled.
    pub fn document(schema: &mut serde_json::Value) {
        let properties = &mut schema["properties"];
        for (field, pattern) in [
            ("data_dir", PATH),
            ("database_url", POSTGRES_URL),
            ("replication_url", POSTGRES_URL),
            ("replication_databases", DATABASE_LIST),
            ("redis_url", REDIS_URL),
            ("redis_prefix_key", PREFIX),
        ] {
            properties[field]["pattern"] = pattern.into();
        }
        let required_when = |flag: &str, field: &str| {
            serde_json::json!({
                "if": { "properties": { flag: { "const": true } }, "required": [flag] },
                "then": { "properties": { field: { "type": "string", "minLength": 1 } }, "required": [field] },
            })
        };
        schema["allOf"] = serde_json::json!([required_when("replication_enabled", "replication_url"), required_when("redis_enabled", "redis_url")]);
    }
}

/// Storage settings, as the onboarding form sends them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory of the embedded PostgreSQL cluster: 1–4096 characters, no control characters.
    #[schema(min_length = 1, max_length = 4096, example = "./data/postgres")]
    pub data_dir: String,
    /// Run the cluster in memory (data is lost at exit).
    #[serde(default)]
    pub memory_mode: bool,
    /// External PostgreSQL to use instead of the embedded one (`postgres://`
    /// URL, empty for none); the `DATABASE_URL` environment variable still wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(default)]
    pub replication_enabled: bool,
    /// `postgres://` URL of the server to replicate to; required (non-empty) when replication is enabled.
    #[serde(default)]
    pub replication_url: Option<String>,
    /// Comma-separated database names to replicate; `*` is a wildcard.
    #[serde(default)]
    pub replication_databases: Option<String>,
    #[serde(default)]
    pub redis_enabled: bool,
    /// `redis://` or `rediss://` URL; required (non-empty) when Redis is enabled.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// At most 256 characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub redis_prefix_key: Option<String>,
    /// Cache entry lifetime in seconds.
    #[serde(default, deserialize_with = "json_integer")]
    #[schema(minimum = 0)]
    pub redis_ttl: Option<i64>,
    #[serde(default)]
    pub redis_save_instances: Option<bool>,
}

/// An optional integer as JSON Schema counts one: `691` and `691.0` alike
/// (serde's `i64` refuses the second, which the document calls an integer).
pub(crate) fn json_integer<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number"))),
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            data_dir: "./data/postgres".to_owned(),
            memory_mode: false,
            database_url: None,
            replication_enabled: false,
            replication_url: None,
            replication_databases: None,
            redis_enabled: false,
            redis_url: None,
            redis_prefix_key: None,
            redis_ttl: None,
            redis_save_instances: None,
        }
    }
}

/// What is stored under the `setup` setting.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SetupState {
    storage: Option<StorageSettings>,
    completed: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SetupStatus {
    /// True until setup completes (`POST /setup/admin` or `POST /setup/complete`);
    /// always false when the operator configured `OMNI_API_KEY`.
    requires_setup: bool,
    /// True once storage settings were saved by `POST /setup/initialize`.
    storage_configured: bool,
    /// The saved storage settings, if any (secrets in URLs are masked).
    storage: Option<StorageSettings>,
    /// True once an account exists (`POST /setup/admin` was called).
    admin_created: bool,
}

#[derive(Serialize, ToSchema)]
pub struct InitializeResult {
    success: bool,
    message: String,
    /// True when the settings differ from those in effect before, so the
    /// gateway must restart for them to apply.
    restart_required: bool,
}

#[derive(Serialize, ToSchema)]
pub struct CompleteResult {
    success: bool,
    message: String,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyResponse {
    api_key: String,
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_setup", detail)
}

fn validate_postgres_url(field: &str, url: Option<&str>, required: bool) -> Result<(), ApiError> {
    match url {
        None | Some("") if required => Err(invalid(format!("{field} is required when enabled"))),
        None | Some("") => Ok(()),
        // The pattern is built so that every URL it admits parses; the
        // parse stays as the last word of the client library.
        Some(url) if rules::is_match(rules::POSTGRES_URL, url) && url.parse::<tokio_postgres::Config>().is_ok() => Ok(()),
        Some(_) => Err(invalid(format!("{field} must be a postgres:// or postgresql:// URL (pattern {})", rules::POSTGRES_URL))),
    }
}

impl StorageSettings {
    fn validate(&self) -> Result<(), ApiError> {
        if self.data_dir.chars().count() > rules::PATH_MAX_CHARS || !rules::is_match(rules::PATH, &self.data_dir) {
            return Err(invalid("data_dir must be a path of 1 to 4096 characters, not only spaces, without control characters"));
        }
        validate_postgres_url("database_url", self.database_url.as_deref(), false)?;
        validate_postgres_url("replication_url", self.replication_url.as_deref(), self.replication_enabled)?;
        if self.replication_databases.as_deref().is_some_and(|d| !rules::is_match(rules::DATABASE_LIST, d)) {
            return Err(invalid("replication_databases is a comma-separated list of database names (letters, digits, _ - and * wildcards)"));
        }
        match self.redis_url.as_deref() {
            None | Some("") if self.redis_enabled => return Err(invalid("redis_url is required when Redis is enabled")),
            Some(url) if !rules::is_match(rules::REDIS_URL, url) => {
                return Err(invalid("redis_url must be a redis:// or rediss:// URL without spaces"));
            }
            _ => {}
        }
        if self.redis_prefix_key.as_deref().is_some_and(|p| !rules::is_match(rules::PREFIX, p)) {
            return Err(invalid("redis_prefix_key is at most 256 characters without control characters"));
        }
        if self.redis_ttl.is_some_and(|ttl| ttl < 0) {
            return Err(invalid("redis_ttl must be zero or a positive number of seconds"));
        }
        Ok(())
    }

/// A copy for display, with passwords in URLs replaced by `***`.
    fn masked(&self) -> StorageSettings {
        let mask = |url: &Option<String>| url.as_deref().map(omni_contract::redact::url_password);
        StorageSettings {
            database_url: mask(&self.database_url),
            replication_url: mask(&self.replication_url),
            redis_url: mask(&self.redis_url),
            ..self.clone()
        }
    }
}


async fn load(client: &impl deadpool_postgres::GenericClient) -> Result<SetupState, ApiError> {
    Ok(settings::get(client, settings::SETUP).await?.unwrap_or_default())
}

/// Serializes read-modify-write of the setup state, even before its row exists.
async fn lock_setup(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), ApiError> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('omni_setup'))", &[]).await?;
    Ok(())
}

/// Whether the install is still open for setup: no `OMNI_API_KEY` was
/// configured (that counts as set up) and setup has not completed.
pub async fn is_open(state: &AppState) -> Result<bool, ApiError> {
    if state.api_key().is_configured() {
        return Ok(false);
    }
    let client = state.db.client().await?;
    Ok(!load(&client).await?.completed)
}

/// Whether onboarding still has to be done.
#[utoipa::path(get, path = "/api/v1/setup/status", tag = "setup", responses(
    (status = 200, description = "Setup state", body = SetupStatus),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn status(State(state): State<AppState>) -> Result<Json<SetupStatus>, ApiError> {
    let client = state.db.client().await?;
    let setup = load(&client).await?;
    let admin_created: bool = client.query_one("SELECT EXISTS (SELECT 1 FROM omni_accounts)", &[]).await?.get(0);
    Ok(Json(SetupStatus {
        requires_setup: !setup.completed && !state.api_key().is_configured(),
        storage_configured: setup.storage.is_some(),
        storage: setup.storage.as_ref().map(StorageSettings::masked),
        admin_created,
    }))
}

/// Validate and save the storage settings; they apply at the gateway's next
/// start. Before setup completes: with the setup token, from loopback, or as
/// an admin; afterwards: admins only.
#[utoipa::path(post, path = "/api/v1/setup/initialize", tag = "setup", request_body = StorageSettings,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Saved", body = InitializeResult),
        (status = 400, description = "Invalid settings", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn initialize(
    State(state): State<AppState>,
    ApiJson(storage): ApiJson<StorageSettings>,
) -> Result<Json<InitializeResult>, ApiError> {
    storage.validate()?;
    let mut client = state.db.client().await?;
    let tx = client.transaction().await?;
    // Serialize concurrent initializations so the file and the row agree.
    lock_setup(&tx).await?;
    let mut setup: SetupState = settings::get(&tx, settings::SETUP).await?.unwrap_or_default();
    let restart_required = setup.storage.clone().unwrap_or_default() != storage;
    setup.storage = Some(storage.clone());
    settings::put(&tx, settings::SETUP, &setup).await?;
    if let Some(file) = &state.settings.settings_file {
        write_atomically(file, &storage)
            .map_err(|e| ApiError::internal(&format!("writing the settings file {}", file.display()), e))?;
    }
    tx.commit().await?;
    tracing::info!(restart_required, "storage settings saved");
    Ok(Json(InitializeResult {
        success: true,
        message: if restart_required {
            "Storage settings saved; restart Omni for them to take effect (environment variables still take precedence).".into()
        } else {
            "Storage settings saved; they match the current ones.".into()
        },
        restart_required,
    }))
}

/// Writes the settings so that a reader sees the old file or the new one,
/// never half of one: a temporary file in the same directory, flushed, then
/// renamed over the target. Mode 0600, since URLs may hold passwords.
fn write_atomically(path: &Path, storage: &StorageSettings) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
        file.write_all(&serde_json::to_vec_pretty(storage)?)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Mark onboarding as done without creating an account (creating the first
/// admin completes it too); the API key is no longer shown afterwards.
#[utoipa::path(post, path = "/api/v1/setup/complete", tag = "setup", security(("api_key" = [])), responses(
    (status = 200, description = "Setup is complete", body = CompleteResult),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn complete(State(state): State<AppState>) -> Result<Json<CompleteResult>, ApiError> {
    let mut client = state.db.client().await?;
    let tx = client.transaction().await?;
    lock_setup(&tx).await?;
    let mut setup: SetupState = settings::get(&tx, settings::SETUP).await?.unwrap_or_default();
    let already = setup.completed;
    setup.completed = true;
    settings::put(&tx, settings::SETUP, &setup).await?;
    tx.commit().await?;
    Ok(Json(CompleteResult {
        success: true,
        message: if already { "Setup was already complete." } else { "Setup complete." }.into(),
    }))
}

/// The generated API key, shown by the worker that generated it until setup
/// completes, to the operator (setup token or loopback). A configured
/// `OMNI_API_KEY` is never shown.
#[utoipa::path(get, path = "/api/v1/setup/api-key", tag = "setup", security(("api_key" = [])), responses(
    (status = 200, description = "The API key", body = ApiKeyResponse),
    (status = 403, description = "Setup is complete, the key is the operator's OMNI_API_KEY, or the setup token is missing or wrong", body = ErrorBody),
    (status = 404, description = "This worker did not generate the key in this run, so it cannot show it (only its digest is stored)", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn api_key(State(state): State<AppState>) -> Result<Json<ApiKeyResponse>, ApiError> {
    if state.api_key().is_configured() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "api_key_configured",
            "the API key is the one the operator configured in OMNI_API_KEY; it is never shown by the API",
        ));
    }
    let client = state.db.client().await?;
    if load(&client).await?.completed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "setup_complete",
            "setup is complete, so the API key is no longer shown; find it in the log of the first start or set OMNI_API_KEY",
        ));
    }
    match state.api_key().shown() {
        Some(key) => Ok(Json(ApiKeyResponse { api_key: key.to_owned() })),
        None => Err(ApiError::not_found(
            "api_key_not_shown",
            "only the digest of the API key is stored, so only the start that generated it can show it: find it in the log of the first start (\"generated an API key\"), or set OMNI_API_KEY",
        )),
    }
}

/// The first admin account, as onboarding creates it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminAccount {
    #[schema(pattern = "^[a-z0-9][a-z0-9_.-]{0,63}$", min_length = 1, max_length = 64)]
    username: String,
    /// 8–1024 characters, without NUL.
    #[schema(min_length = 8, max_length = 1024, pattern = "^[^\\x00]*$")]
    password: String,
}

/// Create the first admin account and sign this browser in with it; allowed
/// only while no account exists and setup is not complete, to the operator
/// (setup token or loopback). Completes setup in the same transaction, which
/// ends the setup token's use.
#[utoipa::path(post, path = "/api/v1/setup/admin", tag = "setup", request_body = AdminAccount, security(("api_key" = [])), responses(
    (status = 201, description = "The admin account exists; the session cookie is set", body = crate::sessions::Me,
        headers(("set-cookie" = String, description = "omni_session=…; HttpOnly; SameSite=Strict; Path=/; Max-Age=2592000 [; Secure]"))),
    (status = 400, description = "Bad username, password or body", body = ErrorBody),
    (status = 403, description = "Setup is complete", body = ErrorBody),
    (status = 409, description = "An account exists already", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn admin(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<AdminAccount>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let account = accounts::NewAccount { username: body.username, password: body.password, role: accounts::Role::Admin };
    accounts::validate_username(&account.username)?;
    accounts::validate_password(&account.password)?;
    let mut client = state.db.client().await?;
    let tx = client.transaction().await?;
    lock_setup(&tx).await?;
    if load(&tx).await?.completed || state.api_key().is_configured() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "setup_complete", "setup is complete; an admin creates accounts on the Accounts page"));
    }
    let exists: bool = tx.query_one("SELECT EXISTS (SELECT 1 FROM omni_accounts)", &[]).await?.get(0);
    if exists {
        return Err(ApiError::new(StatusCode::CONFLICT, "accounts_exist", "the admin account was created already; sign in with it"));
    }
    accounts::insert(&tx, &account).await?;
    let mut setup: SetupState = load(&tx).await?;
    setup.completed = true;
    settings::put(&tx, settings::SETUP, &setup).await?;
    let id: i64 = tx.query_one("SELECT id FROM omni_accounts WHERE username = $1", &[&account.username]).await?.get(0);
    if let Some(session) = crate::preferences::session_header(&headers) {
        crate::preferences::carry_theme_over(&tx, session, id).await?;
    }
    tx.commit().await?;
    tracing::info!(username = %account.username, "setup complete: the first admin account exists; the setup token no longer opens anything");
    let set_cookie = crate::sessions::open(&state, &headers, Some(id)).await?;
    let mut response =
        (StatusCode::CREATED, Json(serde_json::json!({ "username": account.username, "role": "admin" }))).into_response();
    response.headers_mut().insert(axum::http::header::SET_COOKIE, set_cookie);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random URLs assembled from every character the pattern admits in
    /// each part: each matches the pattern, and each must parse, so the
    /// documented pattern never admits a URL the handler then refuses.
    #[test]
    fn every_url_the_pattern_admits_parses() {
        use rand::{seq::SliceRandom, Rng};
        let mut rng = rand::thread_rng();
        let plain: Vec<char> = ('A'..='Z').chain('a'..='z').chain('0'..='9').chain("._~-".chars()).collect();
        let password_extra: Vec<char> = "!$&'()*+,;=".chars().collect();
        let part = |chars: &[char], extra: &[char], max: usize, rng: &mut rand::rngs::ThreadRng| -> String {
            let n = rng.gen_range(1..=max);
            (0..n)
                .map(|_| match rng.gen_range(0..10) {
                    0 => format!("%{}{:X}", rng.gen_range(2..=7), rng.gen_range(0..16)),
                    1 if !extra.is_empty() => extra.choose(rng).unwrap().to_string(),
                    _ => chars.choose(rng).unwrap().to_string(),
                })
                .collect()
        };
        let host_chars: Vec<char> = ('a'..='z').chain('0'..='9').chain(".-".chars()).collect();
        for _ in 0..5000 {
            let mut url = String::from(if rng.gen() { "postgres://" } else { "postgresql://" });
            if rng.gen() {
                url += &part(&plain, &[], 8, &mut rng);
                if rng.gen() {
                    url.push(':');
                    url += &part(&plain, &password_extra, 12, &mut rng);
                }
                url.push('@');
            }
            url += &part(&host_chars, &[], 10, &mut rng).replace('%', "");
            if rng.gen() {
                url += &format!(":{}", rng.gen_range(1..=65535u32));
            }
            if rng.gen() {
                url.push('/');
                url += &part(&plain, &[], 8, &mut rng);
            }
            if rng.gen() {
                url += ["?sslmode=disable", "?sslmode=prefer", "?sslmode=require"].choose(&mut rng).unwrap();
            }
            assert!(rules::is_match(rules::POSTGRES_URL, &url), "generated outside the pattern: {url}");
            assert!(url.parse::<tokio_postgres::Config>().is_ok(), "admitted by the pattern but does not parse: {url}");
        }
    }

    #[test]
    fn an_integral_float_is_an_integer() {
        let parse = |ttl: &str| serde_json::from_str::<StorageSettings>(&format!(r#"{{"data_dir": "x", "redis_ttl": {ttl}}}"#));
        assert_eq!(parse("691.0").unwrap().redis_ttl, Some(691));
        assert_eq!(parse("691").unwrap().redis_ttl, Some(691));
        assert_eq!(parse("null").unwrap().redis_ttl, None);
        assert!(parse("1.5").is_err());
        assert!(parse("\"3\"").is_err());
    }

    #[test]
    fn the_rules_refuse_what_they_should() {
        for url in ["mysql://x", "postgres://", "postgres://h:0/db", "postgres://h:65536", "postgres://h/db?foo=bar", " postgres://h/db", "postgres://h/%00"] {
            assert!(!rules::is_match(rules::POSTGRES_URL, url), "{url}");
        }
        for path in ["", " ", "   ", "a\nb", "a\u{85}b"] {
            assert!(!rules::is_match(rules::PATH, path), "{path:?}");
        }
        for path in ["./data/postgres", " x ", "/srv/ö m n i", "\u{2003}"] {
            assert!(rules::is_match(rules::PATH, path), "{path:?}");
        }
        assert!(rules::is_match(rules::DATABASE_LIST, "omni, app_*,x-y"));
        assert!(!rules::is_match(rules::DATABASE_LIST, "a;b"));
        assert!(rules::is_match(rules::REDIS_URL, "redis://x"));
        assert!(!rules::is_match(rules::REDIS_URL, "redis://"));
    }

    fn storage() -> StorageSettings {
        StorageSettings::default()
    }

    #[test]
    fn accepts_defaults_and_enabled_features_with_valid_urls() {
        assert!(storage().validate().is_ok());
        let full = StorageSettings {
            replication_enabled: true,
            replication_url: Some("postgres://u:p@db.example:5432/omni".into()),
            replication_databases: Some("omni, app_*".into()),
            redis_enabled: true,
            redis_url: Some("redis://localhost:6379/0".into()),
            redis_ttl: Some(0),
            ..storage()
        };
        assert!(full.validate().is_ok());
    }

    #[test]
    fn rejects_invalid_settings() {
        let cases = [
            StorageSettings { data_dir: " ".into(), ..storage() },
            StorageSettings { replication_enabled: true, ..storage() },
            StorageSettings { replication_enabled: true, replication_url: Some("http://x".into()), ..storage() },
            StorageSettings { replication_databases: Some("a;b".into()), ..storage() },
            StorageSettings { redis_enabled: true, redis_url: Some("localhost".into()), ..storage() },
            StorageSettings { redis_ttl: Some(-1), ..storage() },
            StorageSettings { database_url: Some("mysql://x".into()), ..storage() },
        ];
        for case in cases {
            assert!(case.validate().is_err(), "{case:?}");
        }
    }
}
