//! The backup endpoints (SPEC §6), all behind the API key (the protected
//! router in `routes`).
//!
//! Handlers are thin: check nothing themselves, call [`Backups`], map its
//! error to a status. Create, restore and delete run in a task of their own,
//! so a client that hangs up mid-restore does not cancel (and roll back) the
//! work it asked for; the lock and the partial-file guard go with the task.

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::ToSchema;

use omni_contract::backups::{BackupError, BackupInfo, Backups, Created, Restored};
use crate::{
    errors::{ApiError, ErrorBody},
    routes::AppState,
};

/// Read size when streaming a download: large enough for throughput, small
/// enough that memory stays flat whatever the file size.
const DOWNLOAD_CHUNK: usize = 256 * 1024;

#[derive(Serialize, ToSchema)]
pub struct BackupList {
    /// Newest first.
    backups: Vec<BackupInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    success: bool,
}

impl From<BackupError> for ApiError {
    fn from(error: BackupError) -> ApiError {
        let detail = error.to_string();
        match error {
            BackupError::InvalidName => ApiError::bad_request("invalid_backup_name", detail),
            BackupError::NotFound(_) => ApiError::not_found("backup_not_found", detail),
            BackupError::Busy => ApiError::new(StatusCode::CONFLICT, "backup_busy", detail),
            BackupError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "backup_exists", detail),
            BackupError::DiskFull(_) => {
                tracing::error!("{detail}");
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "backup_disk_full", detail)
            }
            BackupError::Incomplete(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "backup_incomplete", detail),
            BackupError::Changed(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "backup_changed", detail),
            BackupError::RestoreFailed(_) => {
                tracing::error!("{detail}");
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "restore_failed", detail)
            }
            BackupError::DumpFailed(_) => {
                tracing::error!("{detail}");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backup_failed", detail)
            }
            BackupError::Encryption(_) => {
                tracing::error!("{detail}");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backup_encryption_failed", detail)
            }
            BackupError::IdentityNeeded { .. } => ApiError::new(StatusCode::CONFLICT, "identity_needed", detail),
            BackupError::ToolMissing { .. } => ApiError::internal("pg_dump or psql cannot be run", detail),
            BackupError::Io { .. } => ApiError::internal("a backup file operation failed", detail),
        }
    }
}

fn service(state: &AppState) -> Backups {
    Backups::from_settings(&state.settings)
}

/// Runs `work` to completion even if the client goes away.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, BackupError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work).await.map_err(|e| ApiError::internal("the backup task failed", e))?.map_err(ApiError::from)
}

/// Take a backup of the database now.
#[utoipa::path(post, path = "/api/v1/backup/create", tag = "backups", security(("api_key" = [])), responses(
    (status = 200, description = "Backup written", body = Created),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    (status = 409, description = "Another backup operation is running", body = ErrorBody),
    (status = 503, description = "pg_dump failed (database unreachable?, `backup_failed`), or `OMNI_ENCRYPT_LOCAL` is on and the keys to encrypt to \
        cannot be read (`backup_encryption_failed`, naming the variable): backups are written encrypted or not at all", body = ErrorBody),
    (status = 507, description = "No space left for the backup", body = ErrorBody),
))]
pub async fn create(State(state): State<AppState>) -> Result<Json<Created>, ApiError> {
    let backups = service(&state);
    detached(async move { backups.create().await }).await.map(Json)
}

/// The backups there are, newest first.
#[utoipa::path(get, path = "/api/v1/backup/list", tag = "backups", security(("api_key" = [])), responses(
    (status = 200, description = "Backups, newest first", body = BackupList),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
))]
pub async fn list(State(state): State<AppState>) -> Result<Json<BackupList>, ApiError> {
    let backups = service(&state);
    let backups = tokio::task::spawn_blocking(move || backups.list())
        .await
        .map_err(|e| ApiError::internal("listing backups failed", e))??;
    Ok(Json(BackupList { backups }))
}

/// Download a backup file, streamed from disk.
///
/// A backup kept encrypted (`OMNI_ENCRYPT_LOCAL`, `encrypted: true` in the
/// list) is sent as it is on disk, an age file: `Content-Type:
/// application/octet-stream`, the file name `<filename>.age`, and the header
/// `X-Omni-Backup-Encrypted: age`. `age -d -i key.txt` gives the SQL file
/// (its sha256 is the one recorded when it was made).
#[utoipa::path(get, path = "/api/v1/backup/download/{filename}", tag = "backups", security(("api_key" = [])),
    params(("filename" = String, Path, description = "omni_backup_YYYYMMDD_HHMMSS.sql", pattern = r"^omni_backup_[0-9]{8}_[0-9]{6}\.sql$")),
    responses(
        (status = 200, description = "The SQL file (`application/sql`), or for an encrypted backup the age file (`application/octet-stream`, \
            named `<filename>.age`, header `X-Omni-Backup-Encrypted: age`)", content_type = "application/sql"),
        (status = 400, description = "Not a backup file name", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such backup", body = ErrorBody),
        (status = 422, description = "The file changed since it was made (its sha256 differs from the recorded one), or it has no recorded \
            sha256 and is not a complete dump; nothing is sent. (A complete dump without a recorded sha256 is sent, and its sha256 recorded now.)", body = ErrorBody),
))]
pub async fn download(State(state): State<AppState>, Path(filename): Path<String>) -> Result<Response, ApiError> {
    let backups = service(&state);
    let name = filename.clone();
    let (file, size, sealed) = tokio::task::spawn_blocking(move || backups.open(&name))
        .await
        .map_err(|e| ApiError::internal("opening the backup failed", e))??;
    let stream = tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), DOWNLOAD_CHUNK);
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(if sealed { "application/octet-stream" } else { "application/sql" }));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if sealed {
        headers.insert("x-omni-backup-encrypted", HeaderValue::from_static("age"));
    }
    // The name passed the pattern check, so it is safe inside the quotes.
    let suffix = if sealed { omni_contract::backups::SEALED_SUFFIX } else { "" };
    let disposition = format!("attachment; filename=\"{filename}{suffix}\"");
    headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).expect("an ASCII file name"));
    Ok(response)
}

/// Restore a backup; the current database is first saved as a safety backup.
///
/// A backup taken before a schema migration is brought forward in the same
/// transaction (Omni's tables it lacks are dropped, its missing migrations
/// applied), so the worker keeps serving. The safety backup is listed with
/// `kind: "safety"` and kept apart from `OMNI_BACKUP_KEEP`'s count of
/// ordinary backups.
///
/// A backup kept encrypted (`OMNI_ENCRYPT_LOCAL`) is decrypted with
/// `OMNI_DECRYPT_IDENTITY_FILE`; without it, or with a key it is not
/// encrypted to, it is refused with 409 `identity_needed` (naming the
/// variable and the keys it needs) before anything is touched.
#[utoipa::path(post, path = "/api/v1/backup/restore/{filename}", tag = "backups", security(("api_key" = [])),
    params(("filename" = String, Path, description = "omni_backup_YYYYMMDD_HHMMSS.sql", pattern = r"^omni_backup_[0-9]{8}_[0-9]{6}\.sql$")),
    responses(
        (status = 200, description = "Restored; `safety_backup` names the backup of the state before", body = Restored),
        (status = 400, description = "Not a backup file name", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such backup", body = ErrorBody),
        (status = 409, description = "Another backup operation is running (`backup_busy`), or the backup is encrypted (`OMNI_ENCRYPT_LOCAL`) and \
            `OMNI_DECRYPT_IDENTITY_FILE` is not set or does not open it (`identity_needed`, naming the variable and the keys it needs); \
            the database is unchanged", body = ErrorBody),
        (status = 422, description = "Incomplete, changed since it was made (sha256 mismatch), made by an omni-api with migrations this one \
            does not have, or failing backup; the database is unchanged", body = ErrorBody),
        (status = 503, description = "The safety backup could not be made: pg_dump failed (`backup_failed`), or its encryption's keys cannot be read \
            (`backup_encryption_failed`); the database is unchanged", body = ErrorBody),
        (status = 507, description = "No space left for the safety backup", body = ErrorBody),
))]
pub async fn restore(State(state): State<AppState>, Path(filename): Path<String>) -> Result<Json<Restored>, ApiError> {
    let backups = service(&state);
    detached(async move { backups.restore(&filename).await }).await.map(Json)
}

/// Delete a backup.
#[utoipa::path(delete, path = "/api/v1/backup/{filename}", tag = "backups", security(("api_key" = [])),
    params(("filename" = String, Path, description = "omni_backup_YYYYMMDD_HHMMSS.sql", pattern = r"^omni_backup_[0-9]{8}_[0-9]{6}\.sql$")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Not a backup file name", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such backup", body = ErrorBody),
        (status = 409, description = "Another backup operation is running", body = ErrorBody),
))]
pub async fn delete(State(state): State<AppState>, Path(filename): Path<String>) -> Result<Json<Deleted>, ApiError> {
    let backups = service(&state);
    detached(async move { tokio::task::spawn_blocking(move || backups.delete(&filename)).await.map_err(|e| BackupError::Io {
        context: "deleting a backup".into(),
        source: std::io::Error::other(e),
    })? })
    .await?;
    Ok(Json(Deleted { success: true }))
}
