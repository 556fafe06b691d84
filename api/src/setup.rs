//! Onboarding (SPEC §6): storage settings, completing setup, the first key.
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
    errors::{ApiError, ApiJson, ErrorBody},
    routes::AppState,
    settings,
};

/// Storage settings, as the onboarding form sends them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Directory of the embedded PostgreSQL cluster.
    #[schema(min_length = 1, example = "./data/postgres")]
    pub data_dir: String,
    /// Run the cluster in memory (data is lost at exit).
    #[serde(default)]
    pub memory_mode: bool,
    /// External PostgreSQL to use instead of the embedded one (`postgres://`
    /// URL); the `DATABASE_URL` environment variable still wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(default)]
    pub replication_enabled: bool,
    /// `postgres://` URL of the server to replicate to; required when replication is enabled.
    #[serde(default)]
    pub replication_url: Option<String>,
    /// Comma-separated database names to replicate; `*` is a wildcard.
    #[serde(default)]
    pub replication_databases: Option<String>,
    #[serde(default)]
    pub redis_enabled: bool,
    /// `redis://` or `rediss://` URL; required when Redis is enabled.
    #[serde(default)]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub redis_prefix_key: Option<String>,
    /// Cache entry lifetime in seconds.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub redis_ttl: Option<i64>,
    #[serde(default)]
    pub redis_save_instances: Option<bool>,
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
    /// True until `POST /setup/complete` has been called.
    requires_setup: bool,
    /// True once storage settings were saved by `POST /setup/initialize`.
    storage_configured: bool,
    /// The saved storage settings, if any (secrets in URLs are masked).
    storage: Option<StorageSettings>,
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

fn has_control_characters(text: &str) -> bool {
    text.chars().any(char::is_control)
}

fn validate_postgres_url(field: &str, url: Option<&str>) -> Result<(), ApiError> {
    let url = url.map(str::trim).filter(|u| !u.is_empty()).ok_or_else(|| invalid(format!("{field} is required when enabled")))?;
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !is_url || has_control_characters(url) || url.parse::<tokio_postgres::Config>().is_err() {
        return Err(invalid(format!("{field} must be a postgres:// or postgresql:// URL")));
    }
    Ok(())
}

impl StorageSettings {
    fn validate(&self) -> Result<(), ApiError> {
        let data_dir = self.data_dir.trim();
        if data_dir.is_empty() || data_dir.len() > 4096 || has_control_characters(data_dir) {
            return Err(invalid("data_dir must be a non-empty path of at most 4096 characters"));
        }
        if self.database_url.as_deref().is_some_and(|url| !url.trim().is_empty()) {
            validate_postgres_url("database_url", self.database_url.as_deref())?;
        }
        if self.replication_enabled {
            validate_postgres_url("replication_url", self.replication_url.as_deref())?;
        }
        if let Some(databases) = self.replication_databases.as_deref().filter(|d| !d.trim().is_empty()) {
            let valid_name =
                |name: &str| !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-*".contains(&b));
            if !databases.split(',').map(str::trim).all(valid_name) {
                return Err(invalid("replication_databases is a comma-separated list of database names (letters, digits, _ - and * wildcards)"));
            }
        }
        if self.redis_enabled {
            let url = self.redis_url.as_deref().map(str::trim).unwrap_or("");
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) || url.len() <= "rediss://".len() || has_control_characters(url) {
                return Err(invalid("redis_url must be a redis:// or rediss:// URL when Redis is enabled"));
            }
        }
        if let Some(prefix) = &self.redis_prefix_key {
            if prefix.len() > 256 || has_control_characters(prefix) {
                return Err(invalid("redis_prefix_key is at most 256 characters without control characters"));
            }
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

/// Whether onboarding still has to be done.
#[utoipa::path(get, path = "/api/v1/setup/status", tag = "setup", responses(
    (status = 200, description = "Setup state", body = SetupStatus),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn status(State(state): State<AppState>) -> Result<Json<SetupStatus>, ApiError> {
    let client = state.db.client().await?;
    let setup = load(&client).await?;
    Ok(Json(SetupStatus {
        requires_setup: !setup.completed,
        storage_configured: setup.storage.is_some(),
        storage: setup.storage.as_ref().map(StorageSettings::masked),
    }))
}

/// Validate and save the storage settings; they apply at the gateway's next start.
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

/// Mark onboarding as done; the API key is no longer shown afterwards.
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

/// The API key, readable without a key until setup is complete.
#[utoipa::path(get, path = "/api/v1/setup/api-key", tag = "setup", responses(
    (status = 200, description = "The API key", body = ApiKeyResponse),
    (status = 403, description = "Setup is complete; the key is no longer shown", body = ErrorBody),
    (status = 503, description = "Database unavailable", body = ErrorBody),
))]
pub async fn api_key(State(state): State<AppState>) -> Result<Json<ApiKeyResponse>, ApiError> {
    let client = state.db.client().await?;
    if load(&client).await?.completed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "setup_complete",
            "setup is complete, so the API key is no longer shown; find it in the log of the first start or set OMNI_API_KEY",
        ));
    }
    Ok(Json(ApiKeyResponse { api_key: state.api_key.expose().to_owned() }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
