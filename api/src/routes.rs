//! The router: which path goes to which handler, behind which checks.
//!
//! Public routes (health, preferences, setup status, the API key before setup
//! completes, the first admin account, sign-in and sign-out, the OpenAPI
//! document) and protected routes (API key or session cookie required, see
//! [`auth::require_auth`])
//! are separate sub-routers, so protection is decided here, in one place,
//! not in each handler. Backups (issue 5) join the protected router. Around
//! everything: a body limit and the JSON error shape for whatever axum
//! rejects on its own.

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
    health, import_routes, lingering, migration_check, openapi, preferences, rate_limit, sessions, setup, static_files,
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
}

/// The routes with their OpenAPI description. Protection is a route layer on
/// the protected sub-router, which needs the state to check the key.
fn api_routes(state: &AppState) -> OpenApiRouter<AppState> {
    let public = OpenApiRouter::new()
        .routes(routes!(health::health))
        .routes(routes!(openapi::document))
        .routes(routes!(preferences::list, preferences::upsert))
        .routes(routes!(preferences::get, preferences::delete))
        .routes(routes!(setup::status))
        .routes(routes!(setup::api_key))
        .routes(routes!(setup::admin))
        .routes(routes!(sessions::login))
        .routes(routes!(sessions::logout));
    let protected = OpenApiRouter::new()
        .routes(routes!(setup::initialize))
        .routes(routes!(setup::complete))
        .routes(routes!(migration_check::status))
        .routes(routes!(import_routes::import))
        .routes(routes!(backup_routes::create))
        .routes(routes!(backup_routes::list))
        .routes(routes!(backup_routes::download))
        .routes(routes!(backup_routes::restore))
        .routes(routes!(backup_routes::delete))
        .routes(routes!(sessions::me))
        .routes(routes!(sessions::logout_all))
        .routes(routes!(accounts::list, accounts::create))
        .routes(routes!(accounts::update, accounts::delete))
        .routes(routes!(auth_check::check))
        .routes(routes!(pitr_routes::window))
        .routes(routes!(pitr_routes::base))
        .routes(routes!(pitr_routes::restore_to))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_auth));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi()).merge(public).merge(protected)
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
        db,
        api_key: api_key.clone(),
        settings: Arc::new(config),
        openapi: Arc::new(OnceLock::new()),
        limiter: Arc::new(rate_limit::Limiter::default()),
    };
    let (router, document) = api_routes(&state).split_for_parts();
    let mut document = serde_json::to_value(&document).expect("the OpenAPI document serializes");
    setup::rules::document(&mut document["components"]["schemas"]["StorageSettings"]);
    openapi::document_body_rejections(&mut document);
    import_routes::document(&mut document);
    openapi::document_sessions(&mut document);
    state.openapi.set(document).expect("the router is built once per state");
    let router = router
        .fallback(static_files::fallback)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(errors::json_error_bodies))
        .layer(middleware::from_fn(lingering::drain_unread_body))
        .with_state(state);
    (router, api_key)
}
