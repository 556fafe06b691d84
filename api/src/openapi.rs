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
            "setup_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                crate::roles::SETUP_TOKEN_HEADER,
                "The one-time setup token the gateway logs at start (`setup token: …`) and `omni-gateway doctor` shows. Accepted by the setup routes only while the install is not set up.",
            ))),
        );
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
        // `{}` among them: credentials are optional (a public answer that says who you are).
        let optional = operation["security"].as_array().is_some_and(|s| s.iter().any(|r| r.as_object().is_some_and(|o| o.is_empty())));
        operation["security"] = if optional {
            serde_json::json!([{}, { "api_key": [] }, { "session_cookie": [] }])
        } else {
            serde_json::json!([{ "api_key": [] }, { "session_cookie": [] }])
        };
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

/// Every operation that answers 503 because the database is away
/// (`database_unavailable`: no host of `DATABASE_URL` accepts writes, as
/// while an HA cluster fails over to a new primary) carries `Retry-After`
/// (db.rs): stated here once for all of them. The operations are those whose
/// 503 already names the database.
pub fn document_failing_over(document: &mut serde_json::Value) {
    let Some(paths) = document["paths"].as_object_mut() else { return };
    for operation in paths.values_mut().filter_map(|p| p.as_object_mut()).flat_map(|p| p.values_mut()) {
        let Some(unavailable) = operation["responses"].get_mut("503") else { continue };
        let error_body = unavailable["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorBody";
        let before = unavailable["description"].as_str().unwrap_or_default().to_owned();
        if !error_body || !before.to_lowercase().contains("database") {
            continue;
        }
        unavailable["description"] = format!(
            "{before}. No database host accepts writes (unreachable, or failing over to a new primary): code `database_unavailable`, \
             nothing was written; retry after the seconds in Retry-After"
        )
        .into();
        unavailable["headers"]["retry-after"] = serde_json::json!({ "description": "Seconds to wait before retrying", "schema": { "type": "integer", "minimum": 1 } });
    }
}

/// States who may call what (routes.rs, roles.rs): admin-only operations
/// answer 403 to a signed-in `user`; the setup operations also accept the
/// setup token while the install is not set up, and answer 403 without it;
/// setup and sign-in answer 403 to a request for a foreign host name.
pub fn document_roles(document: &mut serde_json::Value, guarded: &crate::routes::Guarded) {
    let error_body = serde_json::json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } });
    let mut add_403 = |path: &str, method: &str, reason: &str| {
        let responses = &mut document["paths"][path][method]["responses"];
        let before = responses.get("403").and_then(|r| r["description"].as_str()).map(str::to_owned);
        let description = match before {
            Some(before) if !before.contains(reason) => format!("{before}; or: {reason}"),
            Some(before) => before,
            None => reason.to_owned(),
        };
        responses["403"] = serde_json::json!({ "description": description, "content": error_body });
    };
    for (path, method) in &guarded.admin {
        add_403(path, method, "Only an admin may do this (code admin_required): the API key, or an account with the admin role");
    }
    for (path, method) in &guarded.setup {
        add_403(path, method, "While the install is not set up: the setup token is missing (setup_token_required) or wrong (invalid_setup_token); once set up: only an admin may do this (admin_required)");
    }
    for (path, method) in &guarded.host_checked {
        add_403(path, method, "The request names a host (Host, X-Forwarded-Host or Origin) that is not an IP address, localhost or the host of OMNI_PUBLIC_URL (host_not_allowed)");
    }
    for (path, method) in &guarded.setup {
        let operation = &mut document["paths"][path][method];
        operation["security"] = serde_json::json!([{ "api_key": [] }, { "session_cookie": [] }, { "setup_token": [] }]);
        operation["x-omni-access"] = "setup".into();
    }
    for (path, method) in &guarded.admin {
        document["paths"][path][method]["x-omni-access"] = "admin".into();
    }
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta", responses(
    (status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json"),
))]
pub async fn document(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.openapi.get().cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::document_failing_over;
    use serde_json::json;

    #[test]
    fn a_503_naming_the_database_carries_retry_after_and_no_other_does() {
        let error_body = json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } });
        let mut document = json!({ "paths": {
            "/api/v1/preferences": { "post": { "responses": {
                "200": { "description": "Saved" },
                "503": { "description": "Database unavailable", "content": error_body },
            } } },
            "/api/v1/pitr/status": { "get": { "responses": {
                "503": { "description": "The gateway is still starting", "content": error_body },
            } } },
            "/health": { "get": { "responses": {
                "503": { "description": "The database is failing over", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Health" } } } },
            } } },
        } });
        document_failing_over(&mut document);
        let post = &document["paths"]["/api/v1/preferences"]["post"]["responses"]["503"];
        assert_eq!(post["headers"]["retry-after"]["schema"]["minimum"], 1);
        assert!(post["description"].as_str().unwrap().contains("failing over"), "{post}");
        assert!(document["paths"]["/api/v1/pitr/status"]["get"]["responses"]["503"].get("headers").is_none());
        assert!(document["paths"]["/health"]["get"]["responses"]["503"].get("headers").is_none());
    }
}
