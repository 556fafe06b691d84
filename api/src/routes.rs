//! The router: which path goes to which handler, behind which checks.
//!
//! Who may call what is decided here, in one place, not in each handler:
//! each route belongs to one sub-router, and each sub-router has its layers
//! (roles.rs):
//!
//! - `public`: health, preferences, setup status, sign-out, the OpenAPI document;
//! - `sign_in`: sign-in, behind the Host check;
//! - `setup`: the setup routes that create credentials or change where
//!   data goes, behind the Host check and [`roles::setup_gate`] (setup
//!   token, loopback or admin while not set up; admin afterwards);
//! - `signed_in`: any principal (API key, or a session of any role): its
//!   own account, the migration status;
//! - `admin`: everything that reads or replaces all data (backups, PITR,
//!   import, accounts, the gateway's credentials check for its logs and
//!   metrics history), behind [`auth::require_auth`] and [`roles::require_admin`].
//!
//! Around everything: a body limit and the JSON error shape for whatever
//! axum rejects on its own.

use std::sync::{Arc, OnceLock};

use axum::{extract::DefaultBodyLimit, middleware, Router};
use utoipa::OpenApi;
use omni_contract::worker_settings::WorkerSettings;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    accounts,
    auth::{self, ApiKey},
    auth_check,
    backup_routes,
    db::Db,
    pitr_routes,
    errors,
    health, import_routes, lingering, migration_check, openapi,
    preference_batches::Batches,
    preferences, rate_limit, roles, sessions, setup, static_files,
};

/// Largest request body accepted; preference values are at most 64 KiB.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    /// Set once, from the database, before the first request is served
    /// (the router is built while the worker waits for its database).
    pub api_key: Arc<OnceLock<ApiKey>>,
    pub settings: Arc<WorkerSettings>,
    /// Rendered once the router is built (the document is a product of
    /// building it); served by `GET /api/v1/openapi.json`.
    pub openapi: Arc<OnceLock<serde_json::Value>>,
    /// Failed sign-ins and API-key checks (issue 15).
    pub limiter: Arc<rate_limit::Limiter>,
    /// The one-time setup token: `OMNI_SETUP_TOKEN`, or made at start.
    pub setup_token: Arc<String>,
    /// Preference reads and overwrites of concurrent requests, done together.
    pub batches: Batches,
}

/// Which operations (path, method) each guarded sub-router holds, for the
/// OpenAPI document.
#[derive(Default)]
pub struct Guarded {
    pub admin: Vec<(String, String)>,
    pub setup: Vec<(String, String)>,
    pub host_checked: Vec<(String, String)>,
}

fn operations(router: &OpenApiRouter<AppState>) -> Vec<(String, String)> {
    let document = serde_json::to_value(router.get_openapi()).expect("the OpenAPI document serializes");
    let mut found = Vec::new();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
            found.push((path.clone(), method.clone()));
        }
    }
    found
}

/// The routes with their OpenAPI description, and which are guarded how.
fn api_routes(state: &AppState) -> (OpenApiRouter<AppState>, Guarded) {
    let public = OpenApiRouter::new()
        .routes(routes!(health::health))
        .routes(routes!(openapi::document))
        .routes(routes!(preferences::list, preferences::upsert))
        .routes(routes!(preferences::get, preferences::delete))
        .routes(routes!(setup::status))
        .routes(routes!(sessions::logout))
        .routes(routes!(sessions::session));
    let sign_in = OpenApiRouter::new()
        .routes(routes!(sessions::login))
        .route_layer(middleware::from_fn_with_state(state.clone(), roles::host_check));
    let setup = OpenApiRouter::new()
        .routes(routes!(setup::api_key))
        .routes(routes!(setup::admin))
        .routes(routes!(setup::initialize))
        .routes(routes!(setup::complete))
        .route_layer(middleware::from_fn_with_state(state.clone(), roles::setup_gate))
        .route_layer(middleware::from_fn_with_state(state.clone(), roles::host_check));
    let signed_in = OpenApiRouter::new()
        .routes(routes!(migration_check::status))
        .routes(routes!(sessions::me))
        .routes(routes!(sessions::logout_all))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_auth));
    let admin = OpenApiRouter::new()
        .routes(routes!(import_routes::import))
        .routes(routes!(backup_routes::create))
        .routes(routes!(backup_routes::list))
        .routes(routes!(backup_routes::download))
        .routes(routes!(backup_routes::restore))
        .routes(routes!(backup_routes::delete))
        .routes(routes!(accounts::list, accounts::create))
        .routes(routes!(accounts::update, accounts::delete))
        .routes(routes!(auth_check::check))
        .routes(routes!(pitr_routes::window))
        .routes(routes!(pitr_routes::base))
        .routes(routes!(pitr_routes::restore_to))
        .routes(routes!(pitr_routes::repository_test))
        .route_layer(middleware::from_fn(roles::require_admin))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_auth));
    let guarded = Guarded {
        admin: operations(&admin),
        setup: operations(&setup),
        host_checked: operations(&setup).into_iter().chain(operations(&sign_in)).collect(),
    };
    let router = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi()).merge(public).merge(sign_in).merge(setup).merge(signed_in).merge(admin);
    (router, guarded)
}

/// A setup token for a worker started without `OMNI_SETUP_TOKEN`.
pub fn make_setup_token() -> String {
    use rand::{distributions::Alphanumeric, Rng};
    rand::rngs::OsRng.sample_iter(&Alphanumeric).take(43).map(char::from).collect()
}

impl AppState {
    /// The API key; resolved before the listener serves.
    pub fn api_key(&self) -> &ApiKey {
        self.api_key.get().expect("the API key is resolved before the first request is served")
    }
}

/// The complete application, and where its API key goes once it is known.
pub fn app(db: Db, config: WorkerSettings) -> (Router, Arc<OnceLock<ApiKey>>) {
    let api_key = Arc::new(OnceLock::new());
    let state = AppState {
        batches: Batches::new(db.clone()),
        db,
        api_key: api_key.clone(),
        settings: Arc::new(config.clone()),
        openapi: Arc::new(OnceLock::new()),
        limiter: Arc::new(rate_limit::Limiter::default()),
        setup_token: Arc::new(config.setup_token.clone().unwrap_or_else(make_setup_token)),
    };
    let (routes, guarded) = api_routes(&state);
    let (router, document) = routes.split_for_parts();
    let mut document = serde_json::to_value(&document).expect("the OpenAPI document serializes");
    setup::rules::document(&mut document["components"]["schemas"]["StorageSettings"]);
    openapi::document_body_rejections(&mut document);
    import_routes::document(&mut document);
    openapi::document_sessions(&mut document);
    openapi::document_failing_over(&mut document);
    openapi::document_roles(&mut document, &guarded);
    state.openapi.set(document).expect("the router is built once per state");
    let router = router
        .fallback(static_files::fallback)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(errors::json_error_bodies))
        .layer(middleware::from_fn(lingering::drain_unread_body))
        .with_state(state);
    (router, api_key)
}
