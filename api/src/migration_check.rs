//! `GET /migration/status`: is there a database from the old SQLite-based
//! product that the operator should migrate?
//!
//! The candidate paths (SPEC §6) are relative to the directory Omni runs in
//! (`OMNI_DATA_ROOT`, default the working directory); the answer names the
//! absolute path found so the operator knows exactly which file is meant.
//! It also shows the last import's report (kept in `omni_settings` by the
//! import's own transaction) and the progress of one that is running
//! ([`crate::import_routes`]).

use std::path::Path;

use axum::{extract::State, Json};
use serde::Serialize;
use utoipa::ToSchema;

use omni_contract::import::{ImportReport, Progress};

use crate::{
    errors::{ApiError, ErrorBody},
    import_routes,
    routes::AppState,
};

#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationStatus {
    sqlite_found: bool,
    /// Absolute path of the SQLite database found, if any.
    sqlite_path: Option<String>,
    migration_recommended: bool,
    warning_message: Option<String>,
    /// The report of the last import committed into this database, if any.
    last_import: Option<ImportReport>,
    /// Where an import running in this worker is, if one is.
    running_import: Option<Progress>,
}

pub fn check(root: &Path) -> MigrationStatus {
    let found = omni_contract::sqlite::find(root);
    MigrationStatus {
        sqlite_found: found.is_some(),
        warning_message: found.as_ref().map(|path| {
            format!(
                "An SQLite database from an earlier version was found at {}. Omni now stores everything in PostgreSQL; \
                 migrate its data before relying on this installation.",
                path.display()
            )
        }),
        migration_recommended: found.is_some(),
        sqlite_path: found.map(|path| path.display().to_string()),
        last_import: None,
        running_import: None,
    }
}

/// Look for an old SQLite database that should be migrated.
#[utoipa::path(get, path = "/api/v1/migration/status", tag = "migration", security(("api_key" = [])), responses(
    (status = 200, description = "Result of the check", body = MigrationStatus),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    (status = 503, description = "The database is not reachable", body = ErrorBody),
))]
pub async fn status(State(state): State<AppState>) -> Result<Json<MigrationStatus>, ApiError> {
    // Four stat calls: cheap enough to run inline on the reactor.
    let mut status = check(&state.settings.data_root);
    let client = state.db.client().await?;
    status.last_import = omni_contract::import::last_report(&client).await?;
    status.running_import = import_routes::running();
    // Once the file found has been imported, the warning has done its job.
    let found = status.sqlite_path.as_ref().and_then(|p| std::fs::canonicalize(p).ok()).map(|p| p.display().to_string());
    if status.last_import.as_ref().is_some_and(|r| Some(&r.source) == found.as_ref()) {
        status.migration_recommended = false;
    }
    Ok(Json(status))
}
