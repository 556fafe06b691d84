//! Setup, migration check, API key and OpenAPI document (SPEC §6).

use std::collections::BTreeSet;

use omni_tests::{TempPostgres, Worker, WorkerBuilder, TEST_API_KEY};
use serde_json::json;

fn storage() -> serde_json::Value {
    json!({
        "data_dir": "./data/postgres", "memory_mode": false,
        "replication_enabled": true, "replication_url": "postgres://rep:secret@db.example:5432/omni",
        "replication_databases": "omni,app_*",
        "redis_enabled": true, "redis_url": "redis://127.0.0.1:6379/0", "redis_prefix_key": "omni",
        "redis_ttl": 3600, "redis_save_instances": true
    })
}

#[test]
fn setup_flows_from_status_to_initialize_to_complete() {
    let pg = TempPostgres::start_new();
    let builder = WorkerBuilder::new(&pg.url());
    let settings_file = builder.workdir().join("state/settings.json");
    let worker = builder.env("OMNI_SETTINGS_FILE", settings_file.display().to_string()).start();

    let status = worker.request("GET", "/api/v1/setup/status").send();
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["requires_setup"], true);
    assert_eq!(status.json()["storage_configured"], false);

    let key = worker.request("GET", "/api/v1/setup/api-key").send();
    assert_eq!((key.status, key.json()), (200, json!({"api_key": TEST_API_KEY})));

    let unauthorized = worker.request("POST", "/api/v1/setup/initialize").json(&storage()).send();
    assert_eq!(unauthorized.status, 401);

    let initialized = worker.request("POST", "/api/v1/setup/initialize").api_key().json(&storage()).send();
    assert_eq!(initialized.status, 200, "{}", initialized.text());
    let body = initialized.json();
    assert_eq!((body["success"].clone(), body["restart_required"].clone()), (json!(true), json!(true)));
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));

    // The gateway reads this file before PostgreSQL runs.
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings_file).unwrap()).unwrap();
    assert_eq!(written, storage());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&settings_file).unwrap().permissions().mode() & 0o777, 0o600);

    let again = worker.request("POST", "/api/v1/setup/initialize").api_key().json(&storage()).send();
    assert_eq!(again.json()["restart_required"], false, "same settings need no restart");

    let status = worker.request("GET", "/api/v1/setup/status").send().json();
    assert_eq!(status["storage_configured"], true);
    assert_eq!(status["storage"]["replication_url"], "postgres://rep:***@db.example:5432/omni", "passwords are masked");

    assert_eq!(worker.request("POST", "/api/v1/setup/complete").send().status, 401);
    let completed = worker.request("POST", "/api/v1/setup/complete").api_key().send();
    assert_eq!(completed.status, 200);
    assert_eq!(completed.json()["success"], true);
    assert_eq!(worker.request("GET", "/api/v1/setup/status").send().json()["requires_setup"], false);

    let hidden = worker.request("GET", "/api/v1/setup/api-key").send();
    assert_eq!(hidden.status, 403);
    assert_eq!(hidden.json()["code"], "setup_complete");
}

#[test]
fn initialize_validates_every_field() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let with = |field: &str, value: serde_json::Value| {
        let mut body = storage();
        body[field] = value;
        body
    };
    let mut missing_data_dir = storage();
    missing_data_dir.as_object_mut().unwrap().remove("data_dir");
    for body in [
        with("data_dir", json!("")),
        with("data_dir", json!(42)),
        with("replication_url", json!("not a url")),
        with("replication_url", json!("http://db.example/omni")),
        with("replication_url", json!(null)),
        with("replication_databases", json!("a;drop")),
        with("redis_url", json!("localhost:6379")),
        with("redis_ttl", json!(-1)),
        with("redis_ttl", json!("soon")),
        with("memory_mode", json!("yes")),
        with("db_type", json!("sqlite")),
        with("database_url", json!("sqlite:///omni.db")),
        missing_data_dir,
    ] {
        let response = worker.request("POST", "/api/v1/setup/initialize").api_key().json(&body).send();
        assert_eq!(response.status, 400, "{body} → {}", response.text());
        let error = response.json();
        assert!(error["detail"].is_string() && error["code"].is_string(), "{error}");
    }
    let saved: i64 = pg.client().query_one("SELECT count(*) FROM omni_settings WHERE key = 'setup'", &[]).unwrap().get(0);
    assert_eq!(saved, 0, "nothing invalid was stored");


    // An external database URL is accepted, stored and shown masked.
    let external = with("database_url", json!("postgresql://omni:pw@db.example:5432/omni"));
    let response = worker.request("POST", "/api/v1/setup/initialize").api_key().json(&external).send();
    assert_eq!(response.status, 200, "{}", response.text());
    let status = worker.request("GET", "/api/v1/setup/status").send().json();
    assert_eq!(status["storage"]["database_url"], "postgresql://omni:***@db.example:5432/omni");

    // Disabled features need no URLs.
    let minimal = json!({"data_dir": "/var/lib/omni"});
    let response = worker.request("POST", "/api/v1/setup/initialize").api_key().json(&minimal).send();
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn generated_api_key_is_stable_across_restarts_and_logged_once() {
    let pg = TempPostgres::start_new();
    let first = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start();
    let key = first.request("GET", "/api/v1/setup/api-key").send().json()["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-omni-") && key.len() == "sk-omni-".len() + 43, "{key}");
    assert!(first.log().contains(&key), "the first start prints the key");
    let migration = first.request("GET", "/api/v1/migration/status").header("x-api-key", &key).send();
    assert_eq!(migration.status, 200);
    drop(first);

    let second = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start();
    let again = second.request("GET", "/api/v1/setup/api-key").send().json()["api_key"].clone();
    assert_eq!(again, json!(key));
    assert!(!second.log().contains(&key), "later starts do not print it again");
}

#[test]
fn migration_status_reports_an_old_sqlite_database() {
    let pg = TempPostgres::start_new();
    let clean = Worker::start(&pg);
    let none = clean.request("GET", "/api/v1/migration/status").api_key().send();
    assert_eq!(
        (none.status, none.json()),
        (200, json!({"sqlite_found": false, "sqlite_path": null, "migration_recommended": false, "warning_message": null, "last_import": null, "running_import": null}))
    );
    assert_eq!(clean.request("GET", "/api/v1/migration/status").send().status, 401);

    let builder = WorkerBuilder::new(&pg.url());
    std::fs::create_dir_all(builder.workdir().join("data")).unwrap();
    let old = builder.workdir().join("data/automagik-omni.db");
    std::fs::write(&old, b"SQLite format 3\0").unwrap();
    let worker = builder.start();
    let found = worker.request("GET", "/api/v1/migration/status").api_key().send().json();
    assert_eq!(found["sqlite_found"], true);
    assert_eq!(found["migration_recommended"], true);
    assert_eq!(found["sqlite_path"], json!(old.canonicalize().unwrap().display().to_string()));
    assert!(found["warning_message"].as_str().unwrap().contains("automagik-omni.db"));
    assert!(worker.log().contains("SQLite"), "the worker warns at start too");
}

#[test]
fn openapi_document_lists_every_route_the_router_has() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let document = worker.request("GET", "/api/v1/openapi.json").send();
    assert_eq!(document.status, 200);
    let document = document.json();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));

    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys().filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str())) {
            documented.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: BTreeSet<String> = [
        "GET /api/v1/health",
        "GET /api/v1/openapi.json",
        "GET /api/v1/preferences",
        "POST /api/v1/preferences",
        "GET /api/v1/preferences/{key}",
        "DELETE /api/v1/preferences/{key}",
        "GET /api/v1/setup/status",
        "POST /api/v1/setup/initialize",
        "POST /api/v1/setup/complete",
        "GET /api/v1/setup/api-key",
        "GET /api/v1/migration/status",
        "POST /api/v1/migration/import",
        "POST /api/v1/backup/create",
        "GET /api/v1/backup/list",
        "GET /api/v1/backup/download/{filename}",
        "POST /api/v1/backup/restore/{filename}",
        "DELETE /api/v1/backup/{filename}",
        "POST /api/v1/setup/admin",
        "POST /api/v1/auth/login",
        "POST /api/v1/auth/logout",
        "POST /api/v1/auth/logout-all",
        "GET /api/v1/auth/me",
        "GET /api/v1/accounts",
        "POST /api/v1/accounts",
        "PATCH /api/v1/accounts/{username}",
        "DELETE /api/v1/accounts/{username}",
        "GET /api/v1/auth/check",
        "GET /api/v1/backup/window",
        "POST /api/v1/backup/base",
        "POST /api/v1/backup/restore-to",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(documented, expected);

    // Every documented route is served, and no other method is at those paths.
    for route in &documented {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{key}", "theme");
        let response = worker
            .request(method, &path)
            .api_key()
            .session(&uuid::Uuid::new_v4().to_string())
            .json(&json!({"key": "theme", "value": "dark", "data_dir": "/tmp/x"}))
            .send();
        assert!(response.status != 405 && !(response.status == 404 && response.json()["code"] == "not_found"), "{route} → {}", response.status);
        for other in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if !documented.contains(&format!("{other} {}", route.split_once(' ').unwrap().1)) {
                let response = worker.request(other, &path).api_key().send();
                assert_eq!(response.status, 405, "{other} {path} is not documented, so it must not be routed");
            }
        }
    }
}
