//! Worker-wide settings kept in the `omni_settings` table (key → JSON).
//!
//! The database is the one place every worker of a deployment can agree on,
//! so the generated API key's digest and the setup state live here rather than in a
//! file next to one worker.

use serde::{de::DeserializeOwned, Serialize};
use deadpool_postgres::GenericClient;

use crate::errors::ApiError;

/// The generated API key, as `{"sha256": "<hex digest>"}` (never the key).
pub const API_KEY: &str = "api_key";
/// An Argon2id hash of the digest of the key that the stored key sessions
/// were opened with (auth.rs: they end when the key changes).
pub const API_KEY_SESSIONS: &str = "api_key_sessions";
/// Setup state and the storage settings given to `POST /setup/initialize`.
pub const SETUP: &str = "setup";

pub async fn get<T: DeserializeOwned>(client: &impl GenericClient, key: &str) -> Result<Option<T>, ApiError> {
    let row = client.query_opt("SELECT value FROM omni_settings WHERE key = $1", &[&key]).await?;
    match row {
        None => Ok(None),
        Some(row) => serde_json::from_value(row.get(0))
            .map(Some)
            .map_err(|e| ApiError::internal(&format!("setting {key:?} in omni_settings is unreadable"), e)),
    }
}

pub async fn put<T: Serialize>(client: &impl GenericClient, key: &str, value: &T) -> Result<(), ApiError> {
    let value = serde_json::to_value(value).map_err(|e| ApiError::internal("encoding a setting", e))?;
    client
        .execute(
            "INSERT INTO omni_settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            &[&key, &value],
        )
        .await?;
    Ok(())
}

/// Stores `value` unless the key exists; returns the stored value and whether
/// it was ours. Two workers racing on first start agree on one value.
pub async fn put_if_absent<T: Serialize + DeserializeOwned>(
    client: &impl GenericClient,
    key: &str,
    value: &T,
) -> Result<(T, bool), ApiError> {
    let json = serde_json::to_value(value).map_err(|e| ApiError::internal("encoding a setting", e))?;
    // One statement (every worker start runs this for the API key): the new
    // row, or the one already there.
    let row = client
        .query_opt(
            "WITH inserted AS (
                 INSERT INTO omni_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING value
             )
             SELECT value, true FROM inserted
             UNION ALL
             SELECT value, false FROM omni_settings WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM inserted)",
            &[&key, &json],
        )
        .await?;
    let (stored, ours) = match row {
        Some(row) => (row.get::<_, serde_json::Value>(0), row.get::<_, bool>(1)),
        // Another worker inserted it after this statement's snapshot was
        // taken: a new statement sees it.
        None => return Ok((get(client, key).await?.ok_or_else(|| ApiError::internal("reading back a setting", key))?, false)),
    };
    let stored = serde_json::from_value(stored).map_err(|e| ApiError::internal(&format!("setting {key:?} in omni_settings is unreadable"), e))?;
    Ok((stored, ours))
}
