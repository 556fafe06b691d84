//! The OpenAPI document, generated from the handlers' annotations.
//!
//! Routes are registered through `utoipa_axum`, which adds a handler to the
//! router and its description to the document in the same call, so the
//! document cannot list a route the router lacks or miss one it has.

use axum::{extract::State, Json};
use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, SecurityScheme},
    Modify, OpenApi,
};

use crate::routes::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Omni API", description = "The Omni API worker: preferences, setup, migration check."),
    modifiers(&ApiKeyScheme),
    tags(
        (name = "health"), (name = "preferences"), (name = "setup"), (name = "migration"), (name = "meta"),
    )
)]
pub struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(crate::auth::HEADER))));
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta", responses(
    (status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json"),
))]
pub async fn document(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.openapi.get().cloned().unwrap_or_default())
}
