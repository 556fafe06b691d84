//! Hostile and malformed requests: each gets a 4xx JSON error with `detail`
//! and `code`, never a 5xx or a plain-text body, and none changes the database.

use omni_tests::{Request, TempPostgres, Worker};
use serde_json::json;

/// Everything the API can change, as text, for before/after comparison.
fn snapshot(pg: &TempPostgres) -> Vec<String> {
    let mut client = pg.client();
    let mut rows = Vec::new();
    for query in [
        "SELECT session_id::text || '|' || key || '|' || value || '|' || updated_at::text FROM omni_user_preferences ORDER BY 1",
        "SELECT key || '|' || value::text || '|' || updated_at::text FROM omni_settings ORDER BY 1",
        "SELECT version::text || '|' || checksum FROM omni_schema_migrations ORDER BY 1",
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'",
    ] {
        rows.extend(client.query(query, &[]).unwrap().iter().map(|r| r.get::<_, Option<String>>(0).unwrap_or_default()));
    }
    rows
}

#[test]
fn hostile_requests_get_4xx_json_and_change_nothing() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = uuid::Uuid::new_v4().to_string();
    let seeded = worker.request("POST", "/api/v1/preferences").session(&session).json(&json!({"key": "theme", "value": "dark"})).send();
    assert_eq!(seeded.status, 200);
    let before = snapshot(&pg);

    let prefs = || Request::new("POST", "/api/v1/preferences").session(&session);
    let long_key = "k".repeat(10 * 1024);
    let deep_nesting = "[".repeat(100_000);
    let cases: Vec<(&str, Request, u16)> = vec![
        ("broken JSON", prefs().raw_body("application/json", r#"{"key": "a", "value":"#), 400),
        ("empty JSON body", prefs().raw_body("application/json", ""), 400),
        ("key of the wrong type", prefs().json(&json!({"key": 1, "value": "x"})), 400),
        ("value of the wrong type", prefs().json(&json!({"key": "a", "value": {"nested": true}})), 400),
        ("missing value", prefs().json(&json!({"key": "a"})), 400),
        ("array instead of object", prefs().json(&json!([])), 400),
        // serde fills a struct from an array of its fields in order.
        ("array of the fields in order", prefs().json(&json!(["theme", "light"])), 400),
        ("string instead of object", prefs().json(&json!("theme")), 400),
        ("unknown field", prefs().json(&json!({"key": "a", "value": "b", "session_id": session})), 400),
        ("deeply nested JSON", prefs().raw_body("application/json", deep_nesting), 400),
        ("10 MB body", prefs().raw_body("application/json", vec![b' '; 10 * 1024 * 1024]), 413),
        ("10 KB key in body", prefs().json(&json!({"key": long_key, "value": "x"})), 400),
        ("10 KB key in path", Request::get(&format!("/api/v1/preferences/{long_key}")).session(&session), 400),
        ("SQL in key", prefs().json(&json!({"key": "'; DROP TABLE omni_user_preferences;--", "value": "x"})), 400),
        ("control characters in key", prefs().json(&json!({"key": "a\u{7}\r\nb", "value": "x"})), 400),
        ("encoded CRLF in path key", Request::get("/api/v1/preferences/a%0d%0ab").session(&session), 400),
        ("NUL in value", prefs().json(&json!({"key": "a", "value": "x\u{0}y"})), 400),
        ("invalid UTF-8 in body", prefs().raw_body("application/json", b"{\"key\":\"\xff\xfe\",\"value\":\"x\"}".to_vec()), 400),
        ("invalid UTF-8 in path (encoded)", Request::get("/api/v1/preferences/%ff%fe").session(&session), 400),
        ("text/plain body", prefs().raw_body("text/plain", r#"{"key":"a","value":"b"}"#), 415),
        ("non-UUID session id", Request::get("/api/v1/preferences").session("../../etc/passwd"), 400),
        ("missing session id", Request::get("/api/v1/preferences"), 400),
        ("dot-dot through the API", Request::get("/api/v1/preferences/../setup/api-key").session(&session), 404),
        ("encoded dot-dot in key", Request::new("DELETE", "/api/v1/preferences/..%2f..%2ftheme").session(&session), 400),
        ("dot-dot to the filesystem", Request::get("/../../../../etc/passwd"), 400),
        ("encoded dot-dot to the filesystem", Request::get("/%2e%2e/%2e%2e/%2e%2e/etc/passwd"), 400),
        ("backslash dot-dot", Request::get("/..%5c..%5cetc%5cpasswd"), 400),
        ("NUL in a UI path", Request::get("/index.html%00.png"), 400),
        ("unknown API path", Request::get("/api/v2/preferences"), 404),
        ("wrong method on preferences", Request::new("PUT", "/api/v1/preferences").session(&session), 405),
        ("wrong method on health", Request::new("DELETE", "/api/v1/health"), 405),
        ("wrong method on the UI", Request::new("POST", "/index.html"), 405),
        ("missing API key", Request::new("POST", "/api/v1/setup/complete"), 401),
        ("wrong API key", Request::new("POST", "/api/v1/setup/complete").header("x-api-key", "sk-omni-guess"), 401),
        ("empty API key", Request::new("POST", "/api/v1/setup/initialize").header("x-api-key", "").json(&json!({"data_dir": "/x"})), 401),
        ("API key with a suffix", Request::new("POST", "/api/v1/setup/complete").header("x-api-key", format!("{}x", omni_tests::TEST_API_KEY)), 401),
        ("512 KB username at sign-in", Request::new("POST", "/api/v1/auth/login").json(&json!({"username": "u".repeat(512 * 1024), "password": "x"})), 400),
        ("65-character username at sign-in", Request::new("POST", "/api/v1/auth/login").json(&json!({"username": "u".repeat(65), "password": "x"})), 400),
        ("forged client address header, wrong key", Request::new("POST", "/api/v1/setup/complete").header("x-omni-client-addr", "not an address").header("x-api-key", "guess"), 401),
    ];
    assert!(cases.len() >= 20);

    for (name, request, expected) in cases {
        let response = request.send_to(worker.port);
        assert_eq!(response.status, expected, "{name}: {}", response.text());
        assert_eq!(response.header("content-type"), Some("application/json"), "{name}");
        let body = response.json();
        let detail = body["detail"].as_str().unwrap_or_else(|| panic!("{name}: no detail in {body}"));
        assert!(!detail.is_empty() && body["code"].as_str().is_some_and(|c| !c.is_empty()), "{name}: {body}");
        assert!(!detail.contains("panicked") && !detail.contains("backtrace"), "{name}: {detail}");
    }

    // Raw non-ASCII bytes in the request line never reach the application:
    // the HTTP parser refuses them with a bare 400, before routing.
    for target in [b"/api/v1/preferences/\xff\xfe".as_slice(), b"/\xc0\xae\xc0\xae/etc/passwd".as_slice()] {
        let response = Request::new("GET", target).session(&session).send_to(worker.port);
        assert_eq!(response.status, 400, "{:?}", String::from_utf8_lossy(target));
        assert!(!response.text().contains("passwd") && !response.text().contains("root:"), "{}", response.text());
    }

    assert_eq!(snapshot(&pg), before, "hostile requests changed the database");
    assert!(worker.request("GET", "/api/v1/health").send().status == 200, "the worker is still healthy");
}

#[test]
fn sql_looking_keys_and_values_are_stored_verbatim() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = uuid::Uuid::new_v4().to_string();
    let key = "x--DROP.TABLE:omni_user_preferences--";
    let value = "'); DROP TABLE omni_user_preferences; -- \u{1b}[31m\t\"quoted\" \\ 🦀";
    let stored = worker.request("POST", "/api/v1/preferences").session(&session).json(&json!({"key": key, "value": value})).send();
    assert_eq!(stored.json(), json!({"key": key, "value": value}));
    let read = worker.request("GET", &format!("/api/v1/preferences/{key}")).session(&session).send();
    assert_eq!(read.json(), json!({"key": key, "value": value}));
    let row = pg.client().query_one("SELECT key, value FROM omni_user_preferences", &[]).unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), (key.to_owned(), value.to_owned()));
}
