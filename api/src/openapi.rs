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

/// Every operation that takes a JSON body also answers 415 (not sent as
/// `application/json`) and 413 (over the body limit) before its handler runs;
/// stated here once for all of them.
pub fn document_body_rejections(document: &mut serde_json::Value) {
    let error_body = serde_json::json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } });
    let Some(paths) = document["paths"].as_object_mut() else { return };
    for operation in paths.values_mut().filter_map(|p| p.as_object_mut()).flat_map(|p| p.values_mut()) {
        if operation.get("requestBody").is_none() {
            continue;
        }
        let responses = &mut operation["responses"];
        responses["413"] = serde_json::json!({ "description": format!("The body is larger than {} bytes", crate::routes::BODY_LIMIT), "content": error_body });
        responses["415"] = serde_json::json!({ "description": "The body was not sent as Content-Type: application/json", "content": error_body });
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta", responses(
    (status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json"),
))]
pub async fn document(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.openapi.get().cloned().unwrap_or_default())
}
