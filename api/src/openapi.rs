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
        (name = "health"), (name = "preferences"), (name = "auth"), (name = "accounts"), (name = "setup"), (name = "migration"), (name = "meta"),
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
        openapi.components.get_or_insert_with(Default::default).add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::sessions::COOKIE,
                "The session cookie set by POST /api/v1/auth/login (HttpOnly; SameSite=Strict). A request that changes state with it must also send X-Omni-Client: ui, or it is refused with 403.",
            ))),
        );
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

/// Every protected operation (those that name the `api_key` scheme) also
/// accepts the session cookie, and answers 403 to a cookie-authenticated
/// state change without `X-Omni-Client: ui` and 429 while failed API-key
/// checks from the address are being limited; stated here once for all.
pub fn document_sessions(document: &mut serde_json::Value) {
    let error_body = serde_json::json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } });
    let Some(paths) = document["paths"].as_object_mut() else { return };
    for (method, operation) in paths.values_mut().filter_map(|p| p.as_object_mut()).flat_map(|p| p.iter_mut()) {
        let protected = operation["security"].as_array().is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
        if !protected {
            continue;
        }
        operation["security"] = serde_json::json!([{ "api_key": [] }, { "session_cookie": [] }]);
        let responses = &mut operation["responses"];
        if responses.get("401").is_none() {
            responses["401"] = serde_json::json!({ "description": "Neither a valid x-api-key nor a valid session cookie", "content": error_body });
        }
        if method != "get" && responses.get("403").is_none() {
            responses["403"] = serde_json::json!({ "description": "Sent with the session cookie but without X-Omni-Client: ui", "content": error_body });
        }
        responses["429"] = serde_json::json!({
            "description": "Too many failed API-key checks from this address; see Retry-After",
            "headers": { "retry-after": { "description": "Seconds to wait", "schema": { "type": "integer" } } },
            "content": error_body,
        });
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta", responses(
    (status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json"),
))]
pub async fn document(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.openapi.get().cloned().unwrap_or_default())
}
