//! `DATABASE_URL` (SPEC §8, issue 7): the gateway runs no PostgreSQL of its
//! own, supervises only the worker, and `/health` answers for the external
//! server with a real query. The external server here is a second,
//! independent PostgreSQL started by the test.

use crate::gateway;

use std::time::Duration;

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{wait_until, Request, TempPostgres};
use serde_json::json;

fn external_gateway(pg: &TempPostgres, dir: &std::path::Path) -> Gateway {
    GatewayBuilder::new(dir).env("DATABASE_URL", pg.url()).start()
}

fn put(gw: &Gateway, session: &str, key: &str, value: &str) -> omni_tests::Response {
    Request::new("POST", "/api/v1/preferences").port(gw.port).session(session).json(&json!({"key": key, "value": value})).send()
}

fn pref(gw: &Gateway, method: &str, path: &str, session: &str) -> omni_tests::Response {
    Request::new(method, path).port(gw.port).session(session).send()
}

#[test]
fn preferences_work_against_an_external_database_with_no_embedded_cluster() {
    let pg = TempPostgres::start_new();
    let dir = workdir();
    let gw = external_gateway(&pg, dir.path());

    let status = gw.get("/gateway/status").json();
    let names: Vec<&str> = status["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["api"], "with DATABASE_URL only the worker is supervised: {status}");
    assert!(!dir.path().join("data/postgres").exists(), "no embedded cluster may be created with DATABASE_URL");

    let (a, b) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let stored = put(&gw, &a, "theme", "dark");
    assert_eq!((stored.status, stored.json()), (200, json!({"key": "theme", "value": "dark"})), "{}", gw.log());
    assert_eq!(put(&gw, &a, "theme", "light").json(), json!({"key": "theme", "value": "light"}));
    put(&gw, &a, "lang", "pt");

    let one = pref(&gw, "GET", "/api/v1/preferences/theme", &a);
    assert_eq!((one.status, one.json()), (200, json!({"key": "theme", "value": "light"})));
    let all = pref(&gw, "GET", "/api/v1/preferences", &a);
    assert_eq!(all.json(), json!([{"key": "lang", "value": "pt"}, {"key": "theme", "value": "light"}]));

    // Another session sees, lists and deletes nothing of the first one's.
    assert_eq!(pref(&gw, "GET", "/api/v1/preferences/theme", &b).status, 404);
    assert_eq!(pref(&gw, "GET", "/api/v1/preferences", &b).json(), json!([]));
    assert_eq!(pref(&gw, "DELETE", "/api/v1/preferences/theme", &b).status, 404);

    let deleted = pref(&gw, "DELETE", "/api/v1/preferences/theme", &a);
    assert_eq!((deleted.status, deleted.json()), (200, json!({"success": true})));
    assert_eq!(pref(&gw, "GET", "/api/v1/preferences/theme", &a).status, 404);

    // The rows are in the external server, not anywhere else.
    let rows = pg.client().query("SELECT key, value FROM omni_user_preferences WHERE session_id::text = $1", &[&a]).unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [("lang".to_owned(), "pt".to_owned())]);
}

#[test]
fn health_follows_the_external_database_down_and_back_up() {
    let mut pg = TempPostgres::start_new();
    let dir = workdir();
    let gw = external_gateway(&pg, dir.path());

    let up = gw.get("/health");
    assert_eq!(up.status, 200, "{}", up.text());
    let db = &up.json()["database"];
    assert_eq!(db["kind"], "external", "{db}");
    assert_eq!(db["state"], "ready", "{db}");
    assert!(db["url"].as_str().unwrap().contains(&format!("127.0.0.1:{}", pg.port())), "{db}");

    pg.stop();
    let down = wait_until(Duration::from_secs(10), "/health to answer 503 once the external database is gone", || {
        let r = gw.get("/health");
        (r.status == 503).then_some(r)
    });
    let doc = down.json();
    assert_eq!(doc["database"]["state"], "unavailable", "{doc}");
    assert!(doc["detail"].as_str().unwrap().contains("does not answer SELECT 1"), "{doc}");

    pg.start();
    let back = wait_until(Duration::from_secs(60), "/health to answer 200 once the external database is back", || {
        let r = gw.get("/health");
        (r.status == 200).then_some(r)
    });
    assert_eq!(back.json()["database"]["state"], "ready");
    let session = uuid::Uuid::new_v4().to_string();
    assert_eq!(put(&gw, &session, "after", "outage").status, 200, "{}", gw.log());
}
