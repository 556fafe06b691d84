//! Setup, migration check, API key and OpenAPI document (SPEC §6).

use std::collections::BTreeSet;

use omni_tests::{NetNs, TempPostgres, Worker, WorkerBuilder, TEST_API_KEY};
use serde_json::json;

use crate::gateway;

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
    let builder = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY");
    let settings_file = builder.workdir().join("state/settings.json");
    let worker = builder.env("OMNI_SETTINGS_FILE", settings_file.display().to_string()).start();

    let status = worker.request("GET", "/api/v1/setup/status").send();
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["requires_setup"], true);
    assert_eq!(status.json()["storage_configured"], false);

    // From this machine (loopback), the operator needs no token.
    let key = worker.request("GET", "/api/v1/setup/api-key").send();
    assert_eq!(key.status, 200, "{}", key.text());
    let key = key.json()["api_key"].as_str().unwrap().to_owned();
    assert!(worker.log().contains(&key));

    let initialized = worker.request("POST", "/api/v1/setup/initialize").json(&storage()).send();
    assert_eq!(initialized.status, 200, "{}", initialized.text());
    let body = initialized.json();
    assert_eq!((body["success"].clone(), body["restart_required"].clone()), (json!(true), json!(true)));
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));

    // The gateway reads this file before PostgreSQL runs.
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings_file).unwrap()).unwrap();
    assert_eq!(written, storage());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&settings_file).unwrap().permissions().mode() & 0o777, 0o600);

    let again = worker.request("POST", "/api/v1/setup/initialize").header("x-api-key", &key).json(&storage()).send();
    assert_eq!(again.json()["restart_required"], false, "same settings need no restart");

    let status = worker.request("GET", "/api/v1/setup/status").send().json();
    assert_eq!(status["storage_configured"], true);
    assert_eq!(status["storage"]["replication_url"], "postgres://rep:***@db.example:5432/omni", "passwords are masked");

    let completed = worker.request("POST", "/api/v1/setup/complete").send();
    assert_eq!(completed.status, 200);
    assert_eq!(completed.json()["success"], true);
    assert_eq!(worker.request("GET", "/api/v1/setup/status").send().json()["requires_setup"], false);

    // Set up: the setup routes are an admin's, from loopback too.
    assert_eq!(worker.request("POST", "/api/v1/setup/initialize").json(&storage()).send().status, 401);
    assert_eq!(worker.request("POST", "/api/v1/setup/complete").send().status, 401);
    let hidden = worker.request("GET", "/api/v1/setup/api-key").header("x-api-key", &key).send();
    assert_eq!(hidden.status, 403);
    assert_eq!(hidden.json()["code"], "setup_complete");
}

/// An operator-given `OMNI_API_KEY` counts as set up: no endpoint shows the
/// key, and nothing of setup is open to anyone but an admin.
#[test]
fn a_configured_api_key_is_never_shown_and_counts_as_set_up() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let status = worker.request("GET", "/api/v1/setup/status").send().json();
    assert_eq!(status["requires_setup"], false, "{status}");
    assert!(!worker.log().contains("setup token:"), "no setup token is offered: {}", worker.log());
    for request in [
        worker.request("GET", "/api/v1/setup/api-key"),
        worker.request("GET", "/api/v1/setup/api-key").api_key(),
        worker.request("GET", "/api/v1/setup/api-key").header("x-omni-setup-token", "x".repeat(43)),
        worker.request("POST", "/api/v1/setup/admin").json(&json!({"username": "eve", "password": "long enough"})),
        worker.request("POST", "/api/v1/setup/admin").api_key().json(&json!({"username": "eve", "password": "long enough"})),
        worker.request("POST", "/api/v1/setup/initialize").json(&storage()),
    ] {
        let response = request.send();
        assert!([401, 403].contains(&response.status), "{}", response.text());
        assert!(!response.text().contains(TEST_API_KEY), "the configured key leaked: {}", response.text());
    }
    let shown = worker.request("GET", "/api/v1/setup/api-key").api_key().send();
    assert_eq!((shown.status, shown.json()["code"].as_str()), (403, Some("api_key_configured")));
    let accounts: i64 = pg.client().query_one("SELECT count(*) FROM omni_accounts", &[]).unwrap().get(0);
    assert_eq!(accounts, 0);
    // Nothing stores the configured key; the row of key sessions holds an Argon2id hash.
    let stored: Vec<String> = pg.client().query("SELECT value::text FROM omni_settings", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(stored.iter().all(|v| !v.contains(TEST_API_KEY)), "{stored:?}");
}

/// Setup and sign-in refuse a browser that names a foreign host (DNS
/// rebinding against a loopback bind); IP addresses, localhost and the host
/// of OMNI_PUBLIC_URL pass.
#[test]
fn setup_and_sign_in_refuse_a_foreign_host_name() {
    let pg = TempPostgres::start_new();
    let worker = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").env("OMNI_PUBLIC_URL", "https://omni.example.com").start();
    for (header, value) in [("host", "rebind.attacker.example"), ("origin", "http://rebind.attacker.example:8882"), ("x-forwarded-host", "attacker.example")] {
        for (method, path) in [("GET", "/api/v1/setup/api-key"), ("POST", "/api/v1/auth/login"), ("POST", "/api/v1/setup/admin")] {
            let response = worker.request(method, path).header(header, value).json(&json!({"username": "admin", "password": "long enough"})).send();
            assert_eq!((response.status, response.json()["code"].as_str()), (403, Some("host_not_allowed")), "{header}: {value} {method} {path}");
            assert!(response.json()["detail"].as_str().unwrap().contains("OMNI_PUBLIC_URL"));
        }
    }
    for host in ["localhost:8882", "omni.example.com", "127.0.0.1:1"] {
        let response = worker.request("GET", "/api/v1/setup/api-key").header("host", host).send();
        assert_eq!(response.status, 200, "{host}: {}", response.text());
    }
    let accounts: i64 = pg.client().query_one("SELECT count(*) FROM omni_accounts", &[]).unwrap().get(0);
    assert_eq!(accounts, 0, "no refused request created anything");
    // Public routes other than setup and sign-in are not concerned.
    assert_eq!(worker.request("GET", "/api/v1/setup/status").header("host", "rebind.attacker.example").send().status, 200);
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
fn generated_api_key_is_stored_as_its_digest_and_logged_once() {
    let pg = TempPostgres::start_new();
    let first = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start();
    let key = first.request("GET", "/api/v1/setup/api-key").send().json()["api_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sk-omni-") && key.len() == "sk-omni-".len() + 43, "{key}");
    assert!(first.log().contains(&key), "the first start prints the key");
    let migration = first.request("GET", "/api/v1/migration/status").header("x-api-key", &key).send();
    assert_eq!(migration.status, 200);
    drop(first);

    // Only the digest is stored, so a backup or a replica of the table opens nothing.
    let stored: String = pg.client().query_one("SELECT value::text FROM omni_settings WHERE key = 'api_key'", &[]).unwrap().get(0);
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(stored, json!({"sha256": digest}));
    let anywhere: i64 = pg.client().query_one("SELECT count(*) FROM omni_settings WHERE value::text LIKE '%' || $1 || '%'", &[&key]).unwrap().get(0);
    assert_eq!(anywhere, 0);

    let second = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start();
    let again = second.request("GET", "/api/v1/setup/api-key").send();
    assert_eq!((again.status, again.json()["code"].as_str()), (404, Some("api_key_not_shown")), "a later start cannot show it");
    assert!(!again.text().contains(&key));
    assert!(!second.log().contains(&key), "later starts do not print it again");
    assert_eq!(second.request("GET", "/api/v1/migration/status").header("x-api-key", &key).send().status, 200, "the key still opens the API");
}

/// Migration 0004 turns the plaintext key of earlier versions into its digest.
#[test]
fn an_earlier_plaintext_key_becomes_its_digest_and_keeps_working() {
    let pg = TempPostgres::start_new();
    drop(WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start());
    let old_key = "sk-omni-from-an-earlier-version-0123456789";
    let mut db = pg.client();
    db.execute("UPDATE omni_settings SET value = to_jsonb($1::text) WHERE key = 'api_key'", &[&old_key]).unwrap();
    db.execute("DELETE FROM omni_schema_migrations WHERE version = 4", &[]).unwrap();
    let worker = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start();
    assert!(worker.log().contains("0004_api_key_digest.sql"), "{}", worker.log());
    let stored: String = db.query_one("SELECT value::text FROM omni_settings WHERE key = 'api_key'", &[]).unwrap().get(0);
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert!(stored["sha256"].as_str().is_some_and(|d| d.len() == 64), "{stored}");
    assert_eq!(worker.request("GET", "/api/v1/migration/status").header("x-api-key", old_key).send().status, 200);
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
        "GET /api/v1/auth/session",
        "GET /api/v1/accounts",
        "POST /api/v1/accounts",
        "PATCH /api/v1/accounts/{username}",
        "DELETE /api/v1/accounts/{username}",
        "GET /api/v1/auth/check",
        "GET /api/v1/backup/window",
        "POST /api/v1/backup/base",
        "POST /api/v1/backup/repository/test",
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

/// A fresh install listening on every address, reached from another
/// address (a network namespace of its own): nothing that creates a
/// credential or moves the data works without the setup token the gateway
/// logged; with it, setup completes, and then the token opens nothing.
#[test]
fn a_fresh_install_on_another_address_needs_the_setup_token() {
    let dir = gateway::workdir();
    let ns = NetNs::new();
    let gw = gateway::GatewayBuilder::new(dir.path()).env("OMNI_HOST", "0.0.0.0").without_env("OMNI_API_KEY").start();
    let token = omni_tests::wait_until(std::time::Duration::from_secs(30), "the worker to log the setup token", || {
        let log = gw.log();
        let at = log.find("setup token: ")?;
        let token: String = log[at + "setup token: ".len()..].chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        (token.len() >= 32).then_some(token)
    });
    assert!(gw.log().contains(&format!("/setup#token={token}")), "the log prints the link");
    let file = dir.path().join("data/postgres.setup-token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), token);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let (_, doctor, _) = gateway::cli(dir.path(), &["doctor", "--port", &gw.port.to_string()]);
    assert!(doctor.contains(&format!("setup token: {token}")), "doctor shows the token:\n{doctor}");

    let port = gw.port;
    let call = |method: &str, path: &str, headers: &[&str], body: Option<serde_json::Value>| {
        let mut args: Vec<String> = vec!["-X".into(), method.into()];
        for h in headers {
            args.push("-H".into());
            args.push((*h).into());
        }
        if let Some(body) = body {
            args.extend(["-H".into(), "content-type: application/json".into(), "--data".into(), body.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, body) = ns.curl(port, path, &args);
        (status, serde_json::from_str::<serde_json::Value>(&body).unwrap_or(json!(body)))
    };
    let admin = json!({"username": "eve", "password": "long enough"});
    let moved = json!({"data_dir": "./data/elsewhere", "replication_enabled": true, "replication_url": "postgres://x:y@evil.example:5432/db", "replication_databases": "*"});
    let (status, body) = call("GET", "/api/v1/setup/status", &[], None);
    assert_eq!((status, body["requires_setup"].clone()), (200, json!(true)), "{body}");

    // Without the token (and a forged X-Forwarded-For does not make it loopback).
    for headers in [&[][..], &["x-forwarded-for: 127.0.0.1"][..]] {
        for (method, path, body) in [
            ("GET", "/api/v1/setup/api-key", None),
            ("POST", "/api/v1/setup/admin", Some(admin.clone())),
            ("POST", "/api/v1/setup/initialize", Some(moved.clone())),
            ("POST", "/api/v1/setup/complete", None),
        ] {
            let (status, answer) = call(method, path, headers, body);
            assert_eq!((status, answer["code"].as_str()), (403, Some("setup_token_required")), "{method} {path} {headers:?}: {answer}");
            assert!(answer["detail"].as_str().unwrap().contains("setup token"), "{answer}");
            assert!(!answer.to_string().contains("sk-omni-"), "{answer}");
        }
    }
    let (status, answer) = call("GET", "/api/v1/setup/api-key", &["x-omni-setup-token: wrongwrongwrongwrongwrongwrongwrong12"], None);
    assert_eq!((status, answer["code"].as_str()), (403, Some("invalid_setup_token")), "{answer}");
    let mut db = gw.db();
    let accounts: i64 = db.query_one("SELECT count(*) FROM omni_accounts", &[]).unwrap().get(0);
    let setup: i64 = db.query_one("SELECT count(*) FROM omni_settings WHERE key = 'setup'", &[]).unwrap().get(0);
    assert_eq!((accounts, setup), (0, 0), "nothing was created or stored");
    assert!(!dir.path().join("data/omni-settings.json").exists() || !std::fs::read_to_string(dir.path().join("data/omni-settings.json")).unwrap().contains("evil"));

    // With the token: the operator sets it up.
    let with_token = format!("x-omni-setup-token: {token}");
    let (status, answer) = call("GET", "/api/v1/setup/api-key", &[&with_token], None);
    assert_eq!(status, 200, "{answer}");
    assert!(answer["api_key"].as_str().unwrap().starts_with("sk-omni-"));
    let (status, answer) = call("POST", "/api/v1/setup/initialize", &[&with_token], Some(json!({"data_dir": "./data/postgres"})));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = call("POST", "/api/v1/setup/admin", &[&with_token, "x-omni-client: ui"], Some(json!({"username": "admin", "password": "correct horse battery"})));
    assert_eq!((status, answer.clone()), (201, json!({"username": "admin", "role": "admin"})), "{answer}");
    let (_, body) = call("GET", "/api/v1/setup/status", &[], None);
    assert_eq!(body["requires_setup"], false, "creating the admin completed setup");

    // The token is spent.
    for (method, path, body) in [
        ("GET", "/api/v1/setup/api-key", None),
        ("POST", "/api/v1/setup/admin", Some(admin.clone())),
        ("POST", "/api/v1/setup/initialize", Some(moved.clone())),
    ] {
        let (status, answer) = call(method, path, &[&with_token], body);
        assert_eq!((status, answer["code"].as_str()), (401, Some("not_signed_in")), "{method} {path}: {answer}");
    }
    let accounts: Vec<String> = db.query("SELECT username FROM omni_accounts", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(accounts, ["admin"]);
}
