//! Point-in-time recovery (issue 14), behind the API key:
//! `GET /api/v1/backup/window`, `POST /api/v1/backup/base`,
//! `POST /api/v1/backup/restore-to`, and the off-site repository's probe
//! `POST /api/v1/backup/repository/test`.
//!
//! The WAL archive and the cluster belong to the gateway, so these handlers
//! only check their input and ask the gateway on loopback
//! (`OMNI_GATEWAY_URL` + `/gateway/internal/pitr/…`, with the per-start
//! secret `OMNI_GATEWAY_TOKEN`), relaying its answer. A restore answers once
//! the restored cluster serves again: this worker stays up through it (its
//! pool answers 503 while PostgreSQL is down and reconnects after), holding
//! the request open; the gateway's proxy allows it that long. Progress is in
//! `GET /gateway/status` (`restore`) meanwhile.

use std::sync::OnceLock;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    errors::{ApiError, ApiJson, ErrorBody},
    routes::AppState,
};

/// What `target_time` must look like.
pub const TARGET_PATTERN: &str = r"^(latest|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2}))$";
/// Reading the window is quick.
const QUICK: Duration = Duration::from_secs(30);
/// Four small requests to the store, each with the store client's own timeouts and retries.
const PROBE_LIMIT: Duration = Duration::from_secs(120);
/// A base backup copies the whole cluster.
const BASE_BACKUP_LIMIT: Duration = Duration::from_secs(6 * 3600);
/// A restore replays up to an hour of WAL, then stops and starts.
const RESTORE_LIMIT: Duration = Duration::from_secs(3600 + 600);

#[derive(Deserialize, ToSchema)]
pub struct RestoreTo {
    /// `latest` (everything archived), or an RFC 3339 time inside the
    /// recoverable window (`GET /api/v1/backup/window`).
    #[schema(pattern = r"^(latest|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2}))$", example = "2026-11-25T16:00:00Z")]
    target_time: String,
    /// The timeline to replay (`timelines` of `GET /api/v1/backup/window`).
    /// Absent or null: the timeline that served at `target_time` (each
    /// restore starts a new one), or the newest for `latest`. One the
    /// archive does not know: 422 (`unknown_timeline`).
    #[serde(default, deserialize_with = "crate::setup::json_integer")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 4294967295_u64, example = 2)]
    timeline: Option<i64>,
}

/// A verified base backup (`pg_basebackup`, compressed, checked against its manifest).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct BaseBackup {
    id: String,
    #[schema(format = DateTime)]
    started_at: String,
    /// A restore can reach any time from here on.
    #[schema(format = DateTime)]
    finished_at: String,
    bytes: u64,
    /// Always true: only a backup that passed its check is kept.
    verified: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Drill {
    #[schema(format = DateTime)]
    at: String,
    ok: bool,
    detail: Option<String>,
}

/// What a restore can reach on one timeline.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TimelineWindow {
    timeline: u32,
    /// When it began to serve (the end of the restore that made it); null for timeline 1.
    #[schema(format = DateTime)]
    began_at: Option<String>,
    /// The end of the oldest base backup that restores onto it.
    #[schema(format = DateTime)]
    earliest: Option<String>,
    /// The last write of its WAL into the archive.
    #[schema(format = DateTime)]
    latest: Option<String>,
}

/// What a restore from the off-site repository alone can reach
/// (`omni-gateway restore --from`), read from the bucket.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct OffsiteWindow {
    /// `OMNI_REPOSITORY_URL` as safe to show (it never holds credentials).
    repository: String,
    /// The generation read (`<system identifier>-pg<major>`); null before the archive has one.
    generation: Option<String>,
    /// The end of the oldest base backup there with its manifest; null before the first.
    #[schema(format = DateTime)]
    earliest: Option<String>,
    /// When the newest WAL there (a whole segment or a chunk of the one being
    /// written) was stored; null without a complete base backup or while the
    /// WAL after it has not arrived.
    #[schema(format = DateTime)]
    latest: Option<String>,
    /// Base backups there with their manifest; null when the bucket could not be read.
    #[schema(minimum = 0)]
    base_backups: Option<u64>,
    /// WAL objects there (whole segments and chunks); null when the bucket could not be read.
    #[schema(minimum = 0)]
    wal_objects: Option<u64>,
    /// Why the bucket could not be read (then the times are null); null when it was.
    error: Option<String>,
}

/// What a restore can reach.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Window {
    /// The end of the oldest verified base backup; null before the first one.
    #[schema(format = DateTime)]
    earliest: Option<String>,
    /// The last write into the WAL archive; null before the first base backup.
    #[schema(format = DateTime)]
    latest: Option<String>,
    /// The timeline `earliest`/`latest` are of: the newest, the one the cluster continues on.
    #[serde(default)]
    timeline: u32,
    /// Every timeline in the archive, newest first: a restore to a time
    /// replays the one that served then, unless `timeline` says otherwise.
    #[serde(default)]
    timelines: Vec<TimelineWindow>,
    /// Whether WAL streams now (then any time up to now can be reached).
    streaming: bool,
    /// Newest first.
    base_backups: Vec<BaseBackup>,
    /// The last restore drill.
    last_drill: Option<Drill>,
    /// The off-site window (`OMNI_REPOSITORY_URL`), beside the local one
    /// above; null without an off-site repository.
    #[serde(default)]
    offsite: Option<OffsiteWindow>,
    /// `OMNI_ENCRYPT_LOCAL`: the local archive's base backups and completed
    /// WAL segments are kept encrypted (restores need the private key).
    #[serde(default)]
    encrypted_locally: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct RestoredTo {
    /// `latest` or the time restored to.
    target: String,
    /// The base backup the restore started from.
    base_backup: String,
    /// The timeline replayed; the restored cluster continues on a new one.
    #[serde(default)]
    timeline: Option<u32>,
    /// The data directory as it was, kept aside
    /// (`omni-gateway restore --discard-previous` deletes it).
    previous_data_dir: Option<String>,
    took_ms: u64,
    serving: bool,
}

/// One step of the repository probe.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ProbeStep {
    /// `open`, `write`, `read`, `list` or `delete`.
    step: String,
    ok: bool,
    ms: u64,
    /// What the store answered, credentials and signatures removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// The off-site repository's probe: one object written, read back, listed and deleted.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RepositoryTest {
    /// Every step passed.
    ok: bool,
    /// `OMNI_REPOSITORY_URL` as safe to show (it never holds credentials).
    repository: Option<String>,
    /// The probe object's name under the repository's prefix.
    object: Option<String>,
    /// The step that failed, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed_step: Option<String>,
    /// The likely reason: `wrong_credentials`, `permission_denied`, `no_bucket`, `clock_skew`, `tls`, `unreachable`, `conflict` or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// One sentence: what failed and what to check.
    summary: String,
    steps: Vec<ProbeStep>,
}

fn target_pattern() -> &'static regex::Regex {
    static PATTERN: OnceLock<regex::Regex> = OnceLock::new();
    PATTERN.get_or_init(|| regex::Regex::new(TARGET_PATTERN).expect("a valid pattern"))
}

/// Asks the gateway; its JSON errors are passed on as they are.
async fn gateway<T: serde::de::DeserializeOwned>(state: &AppState, method: axum::http::Method, what: &str, body: Option<serde_json::Value>, limit: Duration) -> Result<T, ApiError> {
    let (Some(url), Some(token)) = (&state.settings.gateway_url, &state.settings.gateway_token) else {
        return Err(ApiError::not_found(
            "no_gateway",
            "this worker runs without a gateway (OMNI_GATEWAY_URL/OMNI_GATEWAY_TOKEN unset), and point-in-time recovery is the gateway's: run omni-gateway",
        ));
    };
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().map_err(|e| ApiError::internal("OMNI_GATEWAY_URL is not host:port", e))?;
    let path = if what.starts_with("repository/") { format!("/gateway/internal/{what}") } else { format!("/gateway/internal/pitr/{what}") };
    let body = body.map(|b| axum::body::Bytes::from(b.to_string()));
    let answer = omni_contract::probe::send(addr, method, &path, &[("x-omni-gateway-token", token)], body, limit)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "gateway_unreachable", format!("the gateway did not answer: {e}")))?;
    if answer.status == 200 {
        return serde_json::from_slice(&answer.body).map_err(|e| ApiError::internal("the gateway's answer was not understood", e));
    }
    let error: omni_contract::error_body::ErrorBody = serde_json::from_slice(&answer.body).map_err(|e| ApiError::internal("the gateway's error was not understood", e))?;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    Err(ApiError::new(status, leak_code(&error.code), error.detail))
}

/// The gateway's error codes, as the `&'static str` an [`ApiError`] carries.
fn leak_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "pitr_unavailable", "pitr_busy", "no_base_backup", "outside_window", "invalid_target_time", "restore_failed", "base_backup_failed", "database_unavailable", "starting", "unauthorized", "payload_too_large", "unknown_timeline", "invalid_timeline", "stopping", "repository_unconfigured",
    ];
    KNOWN.iter().find(|k| **k == code).copied().unwrap_or("gateway_error")
}

/// The recoverable window, the base backups with their verification, the last drill.
#[utoipa::path(get, path = "/api/v1/backup/window", tag = "backups", security(("api_key" = [])), responses(
    (status = 200, description = "The window: `earliest`/`latest` are those of `omni-gateway restore --window` (the local archive); `offsite` is what the off-site repository alone restores (null without one)", body = Window),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    (status = 404, description = "The worker runs without a gateway (`no_gateway`)", body = ErrorBody),
    (status = 409, description = "No WAL archive here: `DATABASE_URL` or memory mode (`pitr_unavailable`)", body = ErrorBody),
    (status = 502, description = "The gateway did not answer", body = ErrorBody),
    (status = 503, description = "The gateway is still starting", body = ErrorBody),
))]
pub async fn window(State(state): State<AppState>) -> Result<Json<Window>, ApiError> {
    gateway(&state, axum::http::Method::GET, "window", None, QUICK).await.map(Json)
}

/// Take a base backup now; answers once it is copied and verified.
#[utoipa::path(post, path = "/api/v1/backup/base", tag = "backups", security(("api_key" = [])), responses(
    (status = 200, description = "Taken and checked against its manifest", body = BaseBackup),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    (status = 404, description = "The worker runs without a gateway (`no_gateway`)", body = ErrorBody),
    (status = 409, description = "No WAL archive here (`pitr_unavailable`), or a restore or another base backup is running (`pitr_busy`)", body = ErrorBody),
    (status = 500, description = "pg_basebackup or the check failed; nothing was kept", body = ErrorBody),
    (status = 502, description = "The gateway did not answer", body = ErrorBody),
    (status = 503, description = "PostgreSQL is not serving (`database_unavailable`), the gateway is still starting (`starting`), or it stopped before the backup was kept (`stopping`)", body = ErrorBody),
))]
pub async fn base(State(state): State<AppState>) -> Result<Json<BaseBackup>, ApiError> {
    gateway(&state, axum::http::Method::POST, "base", None, BASE_BACKUP_LIMIT).await.map(Json)
}

/// Restore the database to a point in time; answers once it serves again.
///
/// The gateway stops the WAL streamer and PostgreSQL, moves the data
/// directory aside, restores the newest base backup before the target,
/// replays WAL up to it and starts again; any failure puts the previous data
/// directory back. Progress: `GET /gateway/status` → `restore`.
#[utoipa::path(post, path = "/api/v1/backup/restore-to", tag = "backups", security(("api_key" = [])),
    request_body = RestoreTo,
    responses(
        (status = 200, description = "Restored and serving again", body = RestoredTo),
        (status = 400, description = "Bad body, `target_time` not `latest` or an RFC 3339 time (`invalid_target_time`), `timeline` not a number of 1 or more (`invalid_timeline`), or outside the recoverable window (`outside_window`, the message gives the window)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "The worker runs without a gateway (`no_gateway`)", body = ErrorBody),
        (status = 409, description = "No WAL archive here (`pitr_unavailable`), no base backup yet (`no_base_backup`), a restore or base backup is already running (`pitr_busy`), or the archive is encrypted (`OMNI_ENCRYPT_LOCAL`) and `OMNI_DECRYPT_IDENTITY_FILE` does not open it (`identity_needed`; nothing was changed)", body = ErrorBody),
        (status = 422, description = "`timeline` names a timeline the WAL archive does not know (`unknown_timeline`; the message lists the known ones)", body = ErrorBody),
        (status = 500, description = "The restore failed; the previous data directory is back and serving (`restore_failed`)", body = ErrorBody),
        (status = 502, description = "The gateway did not answer", body = ErrorBody),
        (status = 503, description = "The gateway is still starting (`starting`), or stopped before the restore finished (`stopping`: the next start finishes or undoes it)", body = ErrorBody),
))]
pub async fn restore_to(State(state): State<AppState>, ApiJson(body): ApiJson<RestoreTo>) -> Result<Json<RestoredTo>, ApiError> {
    let target = body.target_time.trim();
    if !target_pattern().is_match(target) {
        return Err(ApiError::bad_request("invalid_target_time", format!("{target:?} is neither \"latest\" nor an RFC 3339 time such as 2026-11-25T16:00:00Z")));
    }
    if body.timeline.is_some_and(|t| t < 1 || t > i64::from(u32::MAX)) {
        return Err(ApiError::bad_request("invalid_timeline", "`timeline` is a timeline number, 1 or more (GET /api/v1/backup/window lists them), or absent"));
    }
    let body = serde_json::json!({ "target_time": target, "timeline": body.timeline });
    let restored: RestoredTo = gateway(&state, axum::http::Method::POST, "restore-to", Some(body), RESTORE_LIMIT).await?;
    // PostgreSQL serves the restored data: nothing planned or dialed before
    // it may answer the caller's next request (the leadership session would
    // reset the pool too, but only once it has reconnected).
    state.db.reset();
    Ok(Json(restored))
}

/// Test the off-site repository (`OMNI_REPOSITORY_URL`): write, read back,
/// list and delete one probe object (delete skipped under
/// `OMNI_REPOSITORY_DELETE=false`). A failing step is a 200 whose `ok` is
/// false, naming the step and the likely reason.
#[utoipa::path(post, path = "/api/v1/backup/repository/test", tag = "backups", security(("api_key" = [])), responses(
    (status = 200, description = "The probe ran: `ok`, each step's time, and for a failure the step and the likely reason", body = RepositoryTest),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    (status = 404, description = "The worker runs without a gateway (`no_gateway`)", body = ErrorBody),
    (status = 409, description = "No off-site repository is set (`repository_unconfigured`)", body = ErrorBody),
    (status = 502, description = "The gateway did not answer", body = ErrorBody),
))]
pub async fn repository_test(State(state): State<AppState>) -> Result<Json<RepositoryTest>, ApiError> {
    gateway(&state, axum::http::Method::POST, "repository/test", None, PROBE_LIMIT).await.map(Json)
}
