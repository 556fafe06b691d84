//! `GET /api/v1/health`: liveness and readiness of the worker in one answer.
//!
//! The gateway gates traffic on it, so it checks the database with a real
//! query: a worker that cannot reach PostgreSQL is not ready. While no
//! server accepts writes but one answers as a standby, the database is
//! `failing_over` (an HA engine is promoting one): still a 503, and the
//! gateway keeps the worker, which is not what is broken.

use axum::{extract::State, http::StatusCode, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{db::DbState, routes::AppState};

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `degraded`.
    status: &'static str,
    /// `ok`, `failing_over` (no server accepts writes, one answers as a
    /// standby: a new primary is being promoted) or `unavailable`.
    database: &'static str,
    /// Whether this worker holds the leader lease, so runs the scheduled
    /// backups and their retention for every gateway on the database;
    /// absent while its leadership session is not started yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<bool>,
}

/// Worker and database health.
#[utoipa::path(get, path = "/api/v1/health", tag = "health", responses(
    (status = 200, description = "The worker and its database are ready", body = Health),
    (status = 503, description = "The database is not reachable (`unavailable`) or failing over to a new primary (`failing_over`)", body = Health),
))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let leader = state.db.is_leader();
    match state.db.state().await {
        DbState::Ok => (StatusCode::OK, Json(Health { status: "ok", database: "ok", leader })),
        other => (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "degraded", database: other.as_str(), leader })),
    }
}
