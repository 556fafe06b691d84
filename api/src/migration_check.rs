//! `GET /migration/status`: is there a database from the old SQLite-based
//! product that the operator should migrate?
//!
//! The candidate paths (SPEC §6) are relative to the directory Omni runs in
//! (`OMNI_DATA_ROOT`, default the working directory); the answer names the
//! absolute path found so the operator knows exactly which file is meant.

use std::path::Path;

use axum::{extract::State, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{errors::ErrorBody, routes::AppState};


#[derive(Debug, Serialize, ToSchema)]
pub struct MigrationStatus {
    sqlite_found: bool,
    /// Absolute path of the SQLite database found, if any.
    sqlite_path: Option<String>,
    migration_recommended: bool,
    warning_message: Option<String>,
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
    }
}

/// Look for an old SQLite database that should be migrated.
#[utoipa::path(get, path = "/api/v1/migration/status", tag = "migration", security(("api_key" = [])), responses(
    (status = 200, description = "Result of the check", body = MigrationStatus),
    (status = 401, description = "Missing or wrong API key", body = ErrorBody),
))]
pub async fn status(State(state): State<AppState>) -> Json<MigrationStatus> {
    // Four stat calls: cheap enough to run inline on the reactor.
    Json(check(&state.settings.data_root))
}
