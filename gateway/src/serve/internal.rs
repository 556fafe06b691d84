//! `/gateway/internal/…`: what only the worker may ask of the gateway, over
//! loopback, with the secret the gateway made at start and handed it in its
//! environment (`OMNI_GATEWAY_TOKEN`, header `x-omni-gateway-token`,
//! compared in constant time). Without it: 401, nothing else said. From a
//! peer that is not on loopback: 403 before the token is even looked at
//! (`serve/mod.rs`). The token is registered with the log ring as a secret, so
//! no stored log line shows it.
//!
//! - `GET  /gateway/internal/pitr/window`      the recoverable window and base backups
//! - `POST /gateway/internal/pitr/base`        a verified base backup now
//! - `POST /gateway/internal/pitr/restore-to`  `{"target_time": "<RFC 3339>" | "latest", "timeline": N?}`
//! - `POST /gateway/internal/repository/test`  the off-site repository's probe ([`crate::repository::probe`])
//!
//! The public faces are the worker's `/api/v1/backup/{window,base,restore-to,repository/test}`
//! (API key, OpenAPI); this module only checks the secret and hands the
//! work to [`crate::pitr::online`].

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rand::{distributions::Alphanumeric, Rng};
use subtle::ConstantTimeEq;

use crate::serve::{error, json, Body};
use crate::pitr::online::Online;
use crate::pitr::restore::Target;

pub const TOKEN_HEADER: &str = "x-omni-gateway-token";
/// Largest body accepted (`{"target_time": …}`).
const BODY_LIMIT: usize = 4096;

pub struct Internal {
    /// Made at every start; the worker gets it in `OMNI_GATEWAY_TOKEN`.
    pub token: String,
    /// Set once the embedded cluster and its WAL archive run.
    pub online: OnceLock<Arc<Online>>,
    /// Why there is no point-in-time recovery in this deployment, if so.
    unavailable: Option<&'static str>,
    /// The off-site repository's settings, when `OMNI_REPOSITORY_URL` is set.
    repository: Option<crate::repository::config::RepositoryConfig>,
    /// The last off-site window read from the bucket, and when.
    offsite: tokio::sync::Mutex<Option<(Instant, serde_json::Value)>>,
}

impl Internal {
    pub fn new(unavailable: Option<&'static str>, repository: Option<crate::repository::config::RepositoryConfig>) -> Internal {
        let token: String = rand::thread_rng().sample_iter(&Alphanumeric).take(48).map(char::from).collect();
        crate::serve::logring::installed().add_secret(&token);
        Internal { token, online: OnceLock::new(), unavailable, repository: repository.filter(|r| r.location.is_some()), offsite: tokio::sync::Mutex::new(None) }
    }
}

pub async fn handle(internal: &Internal, req: Request<Incoming>) -> Response<Body> {
    let given = req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !bool::from(given.ct_eq(internal.token.as_bytes())) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "this endpoint is for the gateway's own worker");
    }
    if req.uri().path() == "/gateway/internal/repository/test" {
        return repository_test(internal, req.method()).await;
    }
    let route = (req.method().clone(), req.uri().path().trim_start_matches("/gateway/internal/pitr/").to_string());
    if !matches!(route.1.as_str(), "window" | "base" | "restore-to") || !req.uri().path().starts_with("/gateway/internal/pitr/") {
        return error(StatusCode::NOT_FOUND, "not_found", "no such internal endpoint");
    }
    if let Some(why) = internal.unavailable {
        return error(StatusCode::CONFLICT, "pitr_unavailable", why);
    }
    let Some(online) = internal.online.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "starting", "point-in-time recovery is not running yet (the gateway is starting); retry shortly");
    };
    let answer = match (route.0, route.1.as_str()) {
        (Method::GET, "window") => {
            let mut window = online.window();
            window["offsite"] = offsite_window(internal, online.wal_dir()).await;
            Ok(window)
        }
        (Method::POST, "base") => online.base_backup().await,
        (Method::POST, "restore-to") => {
            let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the body is larger than 4 KiB"),
            };
            let doc = serde_json::from_slice::<serde_json::Value>(&body).ok();
            let target = doc
                .as_ref()
                .and_then(|v| v.get("target_time").and_then(|t| t.as_str()).map(str::to_string))
                .ok_or_else(|| "send {\"target_time\": \"<RFC 3339 time>\" | \"latest\"}".to_string())
                .and_then(|t| t.parse::<Target>());
            let timeline = match doc.as_ref().and_then(|v| v.get("timeline")).filter(|t| !t.is_null()) {
                None => None,
                Some(t) => match t.as_u64().and_then(|t| u32::try_from(t).ok()).filter(|t| *t >= 1) {
                    Some(t) => Some(t),
                    None => return error(StatusCode::BAD_REQUEST, "invalid_timeline", "`timeline` is a timeline number (1 or more) from GET /api/v1/backup/window, or absent"),
                },
            };
            match target {
                Ok(target) => online.restore_to(target, timeline).await,
                Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_target_time", &why),
            }
        }
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET window, POST base or restore-to"),
    };
    match answer {
        Ok(doc) => json(StatusCode::OK, &doc),
        Err(r) => error(StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), r.code, &r.detail),
    }
}

/// How long an off-site window read from the bucket is shown before it is read again.
const OFFSITE_WINDOW_FRESH: Duration = Duration::from_secs(2);
/// The longest a listing of the bucket may take for the window.
const OFFSITE_WINDOW_LIMIT: Duration = Duration::from_secs(15);

/// The `offsite` member of the window: `null` without a repository; else
/// what a restore from the bucket alone can reach (`earliest`, `latest`),
/// read from the bucket (at most every [`OFFSITE_WINDOW_FRESH`]), or the
/// reason it could not be read (`error`, the other members null).
async fn offsite_window(internal: &Internal, wal_dir: &Path) -> serde_json::Value {
    use chrono::SecondsFormat;
    let Some(location) = internal.repository.as_ref().and_then(|r| r.location.clone()) else { return serde_json::Value::Null };
    let mut cached = internal.offsite.lock().await;
    if let Some((_, value)) = cached.as_ref().filter(|(at, _)| at.elapsed() < OFFSITE_WINDOW_FRESH) {
        return value.clone();
    }
    let url = location.display();
    let gen = crate::pitr::generation::Identity::of_archive(wal_dir).ok().flatten().map(|i| crate::repository::layout::generation(i.system_identifier, i.major));
    let show = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
    let read = async {
        let repo = crate::repository::store::Repository::open_location(location).map_err(|e| e.to_string())?;
        match &gen {
            Some(gen) => crate::repository::retention::window(&repo, gen).await.map_err(|e| e.to_string()),
            None => Ok(Default::default()),
        }
    };
    let value = match tokio::time::timeout(OFFSITE_WINDOW_LIMIT, read).await {
        Ok(Ok(w)) => serde_json::json!({
            "repository": url, "generation": gen, "earliest": show(w.earliest), "latest": show(w.latest),
            "base_backups": w.base_backups, "wal_objects": w.wal_objects, "error": null,
        }),
        Ok(Err(e)) => serde_json::json!({ "repository": url, "generation": gen, "earliest": null, "latest": null, "base_backups": null, "wal_objects": null, "error": format!("the repository could not be listed: {e}") }),
        Err(_) => serde_json::json!({
            "repository": url, "generation": gen, "earliest": null, "latest": null, "base_backups": null, "wal_objects": null,
            "error": format!("listing the repository took more than {} s; see GET /gateway/status (repository) and try again", OFFSITE_WINDOW_LIMIT.as_secs()),
        }),
    };
    *cached = Some((Instant::now(), value.clone()));
    value
}

/// The probe of the off-site repository: 200 with the report whether or not
/// a step failed (the report says which and why); 409 when none is set.
async fn repository_test(internal: &Internal, method: &Method) -> Response<Body> {
    if method != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST");
    }
    let Some(settings) = &internal.repository else {
        return error(StatusCode::CONFLICT, "repository_unconfigured", "no off-site repository is set: set OMNI_REPOSITORY_URL (s3://, gs://, az:// or file://) and restart the gateway");
    };
    let location = settings.location.clone().expect("kept only with a location");
    let report = match crate::repository::store::Repository::open_location(location) {
        Ok(repo) => crate::repository::probe::run(&repo, settings.delete).await,
        Err(e) => {
            let text = e.to_string();
            let reason = crate::repository::probe::classify(&text);
            let report = serde_json::json!({
                "ok": false, "repository": settings.location.as_ref().map(|l| l.display()), "object": null,
                "failed_step": "open", "reason": reason, "summary": format!("The repository could not be opened: {text}"), "steps": [],
            });
            return json(StatusCode::OK, &report);
        }
    };
    json(StatusCode::OK, &serde_json::to_value(report).expect("a report serializes"))
}
