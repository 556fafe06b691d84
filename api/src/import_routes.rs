//! `POST /api/v1/migration/import`: the old SQLite database into Omni's
//! tables, through the one importer ([`omni_contract::import`]).
//!
//! Two ways to name the file, told apart by `Content-Type`:
//!
//! * `application/json` `{"path", "dry_run"}`: a file on this machine, under
//!   the data root (`OMNI_DATA_ROOT`) only. The path is canonicalized (so `..`
//!   and symlinks are resolved first) and must still be under the root, then
//!   the file is opened with `O_NOFOLLOW`: no door to reading arbitrary files.
//!   Without `path`, the file the migration check found;
//! * `application/octet-stream`: the file itself as the body (`?dry_run=true`
//!   for a dry run), streamed to a hidden temporary file in the backup
//!   directory (which the worker can write, whatever account it runs as),
//!   at most [`UPLOAD_LIMIT`] bytes (413 beyond), removed afterwards.
//!
//! The import runs in a task of its own, so a client that hangs up does not
//! cancel (and roll back) the work it asked for; its progress is kept here
//! for `GET /migration/status`.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use axum::{
    extract::{FromRequest, Query, Request, State},
    http::{header, StatusCode},
    Json,
};
use futures_util::StreamExt;
use omni_contract::import::{self, ImportError, ImportReport, Progress};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};

use crate::{
    errors::{ApiError, ApiJson, ErrorBody},
    routes::AppState,
    setup::rules,
};

/// Largest SQLite file accepted as a request body (1 GiB).
pub const UPLOAD_LIMIT: u64 = 1024 * 1024 * 1024;
/// Prefix of the temporary file an upload is streamed into.
const UPLOAD_PREFIX: &str = ".omni_import_";
/// An upload file older than this was left by a killed worker.
const STALE_UPLOAD: Duration = Duration::from_secs(3600);

/// Where the running import is, if one runs in this worker, with the number
/// of the request it belongs to: a second request, refused as busy, must not
/// clear the first one's progress.
static RUNNING: Mutex<Option<(u64, Progress)>> = Mutex::new(None);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The running import's progress, for `GET /migration/status`.
pub fn running() -> Option<Progress> {
    RUNNING.lock().ok().and_then(|p| p.as_ref().map(|(_, progress)| progress.clone()))
}

/// Import a file on this machine.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The SQLite file, absolute or relative to the data root, and under it;
    /// omitted or null: the file `GET /migration/status` found.
    #[schema(min_length = 1, max_length = 4096, example = "data/automagik-omni.db")]
    path: Option<String>,
    /// Do everything, then roll back: the report says what an import would do.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// A dry run (with either body); `true` or `false`.
    #[serde(default)]
    dry_run: Option<bool>,
}

impl From<ImportError> for ApiError {
    fn from(error: ImportError) -> ApiError {
        let detail = error.to_string();
        let unprocessable = |code| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail.clone());
        match error {
            ImportError::NotFound(_) => ApiError::not_found("sqlite_not_found", detail),
            ImportError::NotAFile(_) => ApiError::not_found("sqlite_not_a_file", detail),
            ImportError::NothingDetected => ApiError::not_found("sqlite_not_detected", detail),
            ImportError::Empty(_) => unprocessable("sqlite_empty"),
            ImportError::NotSqlite(_) => unprocessable("not_sqlite"),
            ImportError::Corrupt { .. } => unprocessable("sqlite_corrupt"),
            ImportError::HotJournal(_) => unprocessable("sqlite_hot_journal"),
            ImportError::Unreadable { .. } => unprocessable("sqlite_unreadable"),
            ImportError::NoOmniTables(_) => unprocessable("no_omni_tables"),
            ImportError::Busy => ApiError::new(StatusCode::CONFLICT, "import_busy", detail),
            ImportError::SchemaMissing => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "schema_missing", detail),
            ImportError::Backup(backup) => ApiError::from(backup),
            ImportError::Database(db) if db.is_closed() || db.as_db_error().is_none() => {
                tracing::warn!(error = %db, "import: lost the database connection; rolled back");
                ApiError::database_unavailable()
            }
            ImportError::Database(_) | ImportError::Internal(_) => ApiError::internal("the import failed and was rolled back", detail),
        }
    }
}

/// Import the old product's SQLite database (dry run: report only).
///
/// Read-only on the file; one transaction, after a safety backup; rows
/// whose key is present are counted, never written twice.
#[utoipa::path(post, path = "/api/v1/migration/import", tag = "migration", security(("api_key" = [])),
    params(ImportQuery),
    request_body(content(
        (ImportRequest = "application/json"),
        (String = "application/octet-stream"),
    ), description = "A file on this machine as JSON, or the SQLite file itself"),
    responses(
        (status = 200, description = "Imported (or dry run): the report per table", body = ImportReport),
        (status = 400, description = "Malformed JSON, a path with control characters, or dry_run not true/false", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such file under the data root, or none detected", body = ErrorBody),
        (status = 409, description = "Another import or backup operation is running", body = ErrorBody),
        (status = 422, description = "Empty, not SQLite, damaged, unreadable, or without Omni's tables; nothing written", body = ErrorBody),
        (status = 503, description = "The database is not reachable (or lacks its schema); nothing written", body = ErrorBody),
        (status = 507, description = "No space left for the upload or the safety backup", body = ErrorBody),
))]
pub async fn import(State(state): State<AppState>, Query(query): Query<ImportQuery>, request: Request) -> Result<Json<ImportReport>, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let (path, dry_run, upload): (PathBuf, bool, Option<Upload>) = match content_type.as_str() {
        "application/json" => {
            let ApiJson(body) = ApiJson::<ImportRequest>::from_request(request, &state).await?;
            if let Some(path) = &body.path {
                if path.chars().count() > rules::PATH_MAX_CHARS || !rules::is_match(rules::PATH, path) {
                    return Err(ApiError::bad_request("invalid_path", "path must be 1 to 4096 characters, not only spaces, without control characters"));
                }
            }
            let root = state.settings.data_root.clone();
            let given = body.path.clone();
            let path = tokio::task::spawn_blocking(move || resolve(&root, given.as_deref()))
                .await
                .map_err(|e| ApiError::internal("resolving the path failed", e))??;
            (path, body.dry_run || query.dry_run == Some(true), None)
        }
        "application/octet-stream" => {
            let upload = receive(&state.settings.backup_dir, request).await?;
            (upload.0.clone(), query.dry_run == Some(true), Some(upload))
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send {\"path\", \"dry_run\"} as application/json, or the SQLite file itself as application/octet-stream",
            ))
        }
    };

    let settings = Arc::clone(&state.settings);
    let request = REQUESTS.fetch_add(1, Ordering::Relaxed);
    let options = import::Options {
        dry_run,
        backups: Some(omni_contract::backups::Backups::from_settings(&settings)),
        progress: Some(Arc::new(move |progress: &Progress| {
            if let Ok(mut running) = RUNNING.lock() {
                *running = Some((request, progress.clone()));
            }
        })),
        label: upload.as_ref().map(|u| format!("the uploaded file ({} bytes)", u.1)),
    };
    let work = tokio::spawn(async move {
        let result = import::run(&path, &settings.database_url, options).await;
        if let Ok(mut running) = RUNNING.lock() {
            if running.as_ref().is_some_and(|(owner, _)| *owner == request) {
                *running = None;
            }
        }
        // The upload's temporary file goes once the import is over.
        drop(upload);
        result
    });
    let report = work.await.map_err(|e| ApiError::internal("the import task failed", e))??;
    Ok(Json(report))
}

/// The SQLite file `given` names (or the detected one), canonical, under `root`.
fn resolve(root: &Path, given: Option<&str>) -> Result<PathBuf, ApiError> {
    let not_found = |shown: &str| {
        ApiError::not_found(
            "sqlite_not_found",
            format!("there is no file {shown} under the data directory {}; only files there can be imported by path", root.display()),
        )
    };
    let candidate = match given {
        None => omni_contract::sqlite::find(root).ok_or_else(|| ApiError::from(ImportError::NothingDetected))?,
        Some(given) => omni_contract::paths::absolute(root, Path::new(given)),
    };
    let shown = candidate.display().to_string();
    let root = std::fs::canonicalize(root).map_err(|e| ApiError::internal("the data root cannot be resolved", e))?;
    let canonical = std::fs::canonicalize(&candidate).map_err(|_| not_found(&shown))?;
    if !canonical.starts_with(&root) || !std::fs::metadata(&canonical).is_ok_and(|m| m.is_file()) {
        return Err(not_found(&shown));
    }
    Ok(canonical)
}

/// The temporary file an upload went into (and its size), removed on drop.
struct Upload(PathBuf, u64);

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streams the request body into a new temporary file in `dir`.
async fn receive(dir: &Path, request: Request) -> Result<Upload, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the SQLite file is larger than {UPLOAD_LIMIT} bytes, the upload limit; import it by path instead (copy it under the data directory)"),
        )
    };
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > UPLOAD_LIMIT) {
        return Err(too_large());
    }
    let io_error = |context: &str| {
        let context = context.to_owned();
        move |e: std::io::Error| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "upload_disk_full", format!("no space left for the upload in {context}; nothing was imported"))
            } else {
                ApiError::internal(&format!("storing the upload in {context} failed"), e)
            }
        }
    };
    let shown = dir.display().to_string();
    let owned = dir.to_path_buf();
    tokio::task::spawn_blocking(move || prepare_upload_dir(&owned))
        .await
        .map_err(|e| ApiError::internal("preparing the upload directory failed", e))?
        .map_err(io_error(&shown))?;
    let path = dir.join(format!("{UPLOAD_PREFIX}{}.sqlite.upload", uuid::Uuid::new_v4().simple()));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)
        .await
        .map_err(io_error(&shown))?;
    let mut upload = Upload(path, 0);
    let mut body = request.into_body().into_data_stream();
    let mut size: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("upload_interrupted", format!("the upload was interrupted: {e}")))?;
        size += chunk.len() as u64;
        if size > UPLOAD_LIMIT {
            return Err(too_large());
        }
        file.write_all(&chunk).await.map_err(io_error(&shown))?;
    }
    file.flush().await.map_err(io_error(&shown))?;
    upload.1 = size;
    tracing::info!(bytes = size, "import: upload received");
    Ok(upload)
}

/// Creates the directory (0700) if missing, and removes uploads a killed worker left.
fn prepare_upload_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let stale = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| SystemTime::now().duration_since(t).ok()).is_some_and(|age| age > STALE_UPLOAD);
        if name.to_string_lossy().starts_with(UPLOAD_PREFIX) && stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// States in the OpenAPI document what the generated description cannot:
/// the upload is binary with its own size limit, and either body is accepted.
pub fn document(document: &mut serde_json::Value) {
    let operation = &mut document["paths"]["/api/v1/migration/import"]["post"];
    let body = &mut operation["requestBody"]["content"];
    body["application/octet-stream"]["schema"] = serde_json::json!({ "type": "string", "format": "binary" });
    body["application/json"]["schema"] = serde_json::json!({ "$ref": "#/components/schemas/ImportRequest" });
    let responses = &mut operation["responses"];
    responses["413"]["description"] =
        format!("The JSON body is larger than {} bytes, or the uploaded file larger than {UPLOAD_LIMIT} bytes", crate::routes::BODY_LIMIT).into();
    responses["415"]["description"] = "The body was sent neither as application/json nor as application/octet-stream".into();
    let schema = &mut document["components"]["schemas"]["ImportRequest"]["properties"]["path"];
    schema["pattern"] = rules::PATH.into();
}
