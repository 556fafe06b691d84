//! Accounts, browser sessions and brute-force limits (issue 15), against a
//! real worker and a real PostgreSQL.
//!
//! The worker takes the client address from `X-Omni-Client-Addr`, which
//! the gateway always writes; these tests speak to the worker directly and
//! write that header themselves to act as clients at two different
//! addresses.

use std::time::{Duration, Instant};

use omni_tests::{Request, Response, TempPostgres, Worker, WorkerBuilder, TEST_API_KEY};
use serde_json::json;

const ADMIN: (&str, &str) = ("admin", "correct horse battery");

/// `omni_session=…` from a response's Set-Cookie.
fn cookie_of(response: &Response) -> String {
    let set = response.header("set-cookie").unwrap_or_else(|| panic!("no Set-Cookie in {response:?}"));
    set.split(';').next().unwrap().trim().to_owned()
}

fn login(worker: &Worker, username: &str, password: &str) -> String {
    let response = worker.login_from("10.9.9.9", username, password);
    assert_eq!(response.status, 200, "{}", response.text());
    cookie_of(&response)
}

/// A request with the session cookie, as the UI sends it.
fn ui(worker: &Worker, method: &str, path: &str, cookie: &str) -> Request {
    worker.request(method, path).header("cookie", cookie).header("x-omni-client", "ui")
}

/// The admin account, made with the API key (an install with `OMNI_API_KEY`
/// counts as set up, so it has no setup routes), signed in.
fn create_admin(worker: &Worker) -> String {
    let created = worker.request("POST", "/api/v1/accounts").api_key().json(&json!({"username": ADMIN.0, "password": ADMIN.1, "role": "admin"})).send();
    assert_eq!(created.status, 201, "{}", created.text());
    login(worker, ADMIN.0, ADMIN.1)
}

#[test]
fn the_first_admin_signs_in_with_a_strict_http_only_cookie_and_cookie_changes_need_the_client_header() {
    let pg = TempPostgres::start_new();
    // A fresh install (no OMNI_API_KEY), set up from this machine (loopback).
    let worker = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").start();
    let generated = worker.request("GET", "/api/v1/setup/api-key").send().json()["api_key"].as_str().unwrap().to_owned();

    let status = worker.request("GET", "/api/v1/setup/status").send().json();
    assert_eq!(status["admin_created"], false);
    let bad = worker.request("POST", "/api/v1/setup/admin").json(&json!({"username": "Bad Name", "password": "long enough"})).send();
    assert_eq!((bad.status, bad.json()["code"].as_str()), (400, Some("invalid_username")));
    let short = worker.request("POST", "/api/v1/setup/admin").json(&json!({"username": "admin", "password": "short"})).send();
    assert_eq!((short.status, short.json()["code"].as_str()), (400, Some("invalid_password")));

    let created = worker.request("POST", "/api/v1/setup/admin").json(&json!({"username": ADMIN.0, "password": ADMIN.1})).send();
    assert_eq!(created.status, 201, "{}", created.text());
    let set_cookie = created.header("set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.split("; ").any(|a| a == attribute), "{attribute} missing from {set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "no Secure over plain HTTP: {set_cookie}");
    let cookie = cookie_of(&created);
    // Creating the first admin completed setup: the route is an admin's now, and closed.
    assert_eq!(worker.request("GET", "/api/v1/setup/status").send().json()["requires_setup"], false);
    let again = worker.request("POST", "/api/v1/setup/admin").json(&json!({"username": "other", "password": "long enough"})).send();
    assert_eq!((again.status, again.json()["code"].as_str()), (401, Some("not_signed_in")));
    let again = ui(&worker, "POST", "/api/v1/setup/admin", &cookie).json(&json!({"username": "other", "password": "long enough"})).send();
    assert_eq!((again.status, again.json()["code"].as_str()), (403, Some("setup_complete")));

    // A name no account can have (PostgreSQL text holds no NUL) is an unknown account, not a 500.
    let nul = worker.request("POST", "/api/v1/auth/login").json(&json!({"username": "t\u{0}`", "password": "long enough"})).send();
    assert_eq!(nul.status, 401, "{}", nul.text());

    let me = worker.request("GET", "/api/v1/auth/me").header("cookie", &cookie).send();
    assert_eq!((me.status, me.json()), (200, json!({"username": "admin", "role": "admin"})));
    assert_eq!(worker.request("GET", "/api/v1/auth/me").send().status, 401);
    let key_me = worker.request("GET", "/api/v1/auth/me").header("x-api-key", &generated).send();
    assert_eq!(key_me.json(), json!({"username": null, "role": "admin"}));

    // A state change with the cookie alone (as a cross-site form would send it): 403, nothing created.
    let forged = worker
        .request("POST", "/api/v1/accounts")
        .header("cookie", &cookie)
        .json(&json!({"username": "mallory", "password": "long enough", "role": "admin"}))
        .send();
    assert_eq!((forged.status, forged.json()["code"].as_str()), (403, Some("client_header_required")));
    let forged_pref = worker.request("POST", "/api/v1/preferences").header("cookie", &cookie).json(&json!({"key": "theme", "value": "x"})).send();
    assert_eq!(forged_pref.status, 403);
    let accounts = ui(&worker, "GET", "/api/v1/accounts", &cookie).send().json();
    assert_eq!(accounts.as_array().unwrap().len(), 1, "{accounts}");
    let made = ui(&worker, "POST", "/api/v1/accounts", &cookie).json(&json!({"username": "bob", "password": "bob's password", "role": "user"})).send();
    assert_eq!(made.status, 201, "{}", made.text());
    let taken = ui(&worker, "POST", "/api/v1/accounts", &cookie).json(&json!({"username": "bob", "password": "bob's password"})).send();
    assert_eq!(taken.status, 409);

    // Over HTTPS (as the proxy in front says), the cookie is Secure.
    let secure = worker
        .request("POST", "/api/v1/auth/login")
        .header("x-forwarded-proto", "https")
        .json(&json!({"username": "ADMIN", "password": ADMIN.1}))
        .send();
    assert_eq!(secure.status, 200, "{}", secure.text());
    assert!(secure.header("set-cookie").unwrap().ends_with("; Secure"));

    // A script may open a session with the API key; a wrong one is refused.
    let by_key = worker.request("POST", "/api/v1/auth/login").json(&json!({"api_key": generated})).send();
    assert_eq!((by_key.status, by_key.json()), (200, json!({"username": null, "role": "admin"})));
    let key_cookie = cookie_of(&by_key);
    assert_eq!(worker.request("GET", "/api/v1/migration/status").header("cookie", &key_cookie).send().status, 200);
    let wrong_key = worker.request("POST", "/api/v1/auth/login").json(&json!({"api_key": "sk-omni-wrong"})).send();
    assert_eq!(wrong_key.status, 401);

    // Sign-out ends this session only; the cookie is cleared.
    let out = ui(&worker, "POST", "/api/v1/auth/logout", &cookie).send();
    assert_eq!(out.status, 200);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(worker.request("GET", "/api/v1/auth/me").header("cookie", &cookie).send().status, 401);
    assert_eq!(worker.request("GET", "/api/v1/auth/me").header("cookie", &key_cookie).send().status, 200);

    // The session table holds digests, never the token.
    let mut db = pg.client();
    let token = key_cookie.split_once('=').unwrap().1.to_owned();
    let leaked: i64 = db
        .query_one("SELECT count(*) FROM omni_auth_sessions WHERE encode(token_digest, 'escape') LIKE '%' || $1 || '%'", &[&token])
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);

    // The document states the new constraints.
    let doc = worker.request("GET", "/api/v1/openapi.json").send().json();
    assert_eq!(doc["components"]["securitySchemes"]["session_cookie"]["in"], "cookie");
    assert_eq!(doc["components"]["schemas"]["NewAccount"]["properties"]["username"]["pattern"], "^[a-z0-9][a-z0-9_.-]{0,63}$");
    assert_eq!(doc["components"]["schemas"]["NewAccount"]["properties"]["password"]["minLength"], 8);
    assert!(doc["paths"]["/api/v1/auth/login"]["post"]["responses"]["429"].is_object());
    assert!(doc["paths"]["/api/v1/accounts/{username}"]["delete"]["responses"]["409"].is_object());
    assert!(doc["paths"]["/api/v1/backup/create"]["post"]["responses"]["403"].is_object());
}

#[test]
fn fifty_wrong_passwords_from_one_address_are_refused_while_another_address_signs_in_at_once() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    create_admin(&worker);

    let attacker = "203.0.113.7";
    let mut statuses = Vec::new();
    let mut last = None;
    for i in 0..50 {
        let response = worker.login_from(attacker, ADMIN.0, &format!("guess {i}"));
        statuses.push(response.status);
        last = Some(response);
    }
    let last = last.unwrap();
    assert_eq!(last.status, 429, "the 50th wrong password: {statuses:?}");
    let retry: u64 = last.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 1, "{retry}");
    assert_eq!(last.json()["code"], "too_many_attempts");
    assert!(statuses[..5].iter().all(|s| *s == 401), "the first failures are plain 401s: {statuses:?}");
    // Even the right password waits at the blocked address.
    assert_eq!(worker.login_from(attacker, ADMIN.0, ADMIN.1).status, 429);

    // The admin, elsewhere, signs in at once.
    let started = Instant::now();
    let admin = worker.login_from("198.51.100.20", ADMIN.0, ADMIN.1);
    assert_eq!(admin.status, 200, "{}", admin.text());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());

    // Wrong API keys are limited the same way, per address.
    let mut last_key = 0;
    for _ in 0..20 {
        last_key = worker.request("GET", "/api/v1/migration/status").header("x-omni-client-addr", "203.0.113.99").header("x-api-key", "wrong").send().status;
    }
    assert_eq!(last_key, 401, "a wrong key is answered for what it is; it counts against its address");
    assert_eq!(worker.request("GET", "/api/v1/migration/status").header("x-omni-client-addr", "198.51.100.21").api_key().send().status, 200);
    // The correct key is never throttled, even from the blocked address.
    assert_eq!(worker.request("GET", "/api/v1/migration/status").header("x-omni-client-addr", "203.0.113.99").api_key().send().status, 200);
}

#[test]
fn accounts_are_isolated_a_disabled_account_stops_at_once_and_the_last_admin_stays() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let admin = create_admin(&worker);
    for name in ["alice", "bob"] {
        let made = ui(&worker, "POST", "/api/v1/accounts", &admin).json(&json!({"username": name, "password": format!("{name} password")})).send();
        assert_eq!(made.status, 201, "{}", made.text());
        assert_eq!(made.json()["role"], "user");
    }

    // An anonymous tab's theme carries over at sign-in (alice has none yet).
    let tab = uuid::Uuid::new_v4().to_string();
    worker.request("POST", "/api/v1/preferences").session(&tab).json(&json!({"key": "theme", "value": "dark"})).send();
    let signed_in = worker
        .request("POST", "/api/v1/auth/login")
        .session(&tab)
        .json(&json!({"username": "alice", "password": "alice password"}))
        .send();
    assert_eq!(signed_in.status, 200);
    let alice = cookie_of(&signed_in);
    let alice_prefs = ui(&worker, "GET", "/api/v1/preferences", &alice).send();
    assert_eq!(alice_prefs.json(), json!([{"key": "theme", "value": "dark"}]));
    // …and another device of alice sees it, without any session id.
    let alice_2 = login(&worker, "alice", "alice password");
    assert_eq!(ui(&worker, "GET", "/api/v1/preferences/theme", &alice_2).send().json()["value"], "dark");

    // Bob cannot read or change alice's preferences, and is no admin.
    let bob = login(&worker, "bob", "bob password");
    assert_eq!(ui(&worker, "POST", "/api/v1/preferences", &alice).json(&json!({"key": "lang", "value": "fr"})).send().status, 200);
    assert_eq!(ui(&worker, "GET", "/api/v1/preferences", &bob).send().json(), json!([]));
    assert_eq!(ui(&worker, "GET", "/api/v1/preferences/lang", &bob).send().status, 404);
    assert_eq!(ui(&worker, "DELETE", "/api/v1/preferences/lang", &bob).send().status, 404);
    assert_eq!(ui(&worker, "GET", "/api/v1/preferences/lang", &alice).send().json()["value"], "fr");
    assert_eq!(ui(&worker, "GET", "/api/v1/accounts", &bob).send().status, 403);
    assert_eq!(ui(&worker, "PATCH", "/api/v1/accounts/alice", &bob).json(&json!({"disabled": true})).send().status, 403);

    // Disabling alice ends both her sessions at once; she cannot sign in again.
    let disabled = ui(&worker, "PATCH", "/api/v1/accounts/alice", &admin).json(&json!({"disabled": true})).send();
    assert_eq!((disabled.status, disabled.json()["disabled"].as_bool()), (200, Some(true)));
    for cookie in [&alice, &alice_2] {
        assert_eq!(worker.request("GET", "/api/v1/auth/me").header("cookie", cookie).send().status, 401);
    }
    let refused = worker.login_from("10.1.1.1", "alice", "alice password");
    assert_eq!((refused.status, refused.json()["code"].as_str()), (403, Some("account_disabled")));

    // Sign out everywhere ends every session of bob.
    let bob_2 = login(&worker, "bob", "bob password");
    assert_eq!(ui(&worker, "POST", "/api/v1/auth/logout-all", &bob).send().status, 200);
    for cookie in [&bob, &bob_2] {
        assert_eq!(worker.request("GET", "/api/v1/auth/me").header("cookie", cookie).send().status, 401);
    }

    // The last enabled admin can be neither deleted, disabled nor demoted.
    for (method, body) in [("DELETE", None), ("PATCH", Some(json!({"disabled": true}))), ("PATCH", Some(json!({"role": "user"})))] {
        let mut request = ui(&worker, method, "/api/v1/accounts/admin", &admin);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send();
        assert_eq!((response.status, response.json()["code"].as_str()), (409, Some("last_admin")), "{method} {body:?}");
    }
    assert_eq!(ui(&worker, "PATCH", "/api/v1/accounts/bob", &admin).json(&json!({"role": "admin"})).send().status, 200);
    assert_eq!(ui(&worker, "DELETE", "/api/v1/accounts/admin", &admin).send().status, 200);
    assert_eq!(worker.request("GET", "/api/v1/auth/me").header("cookie", &admin).send().status, 401);
    assert_eq!(worker.request("DELETE", "/api/v1/accounts/nobody").api_key().send().status, 404);

    // A password reset ends the account's sessions; the new password works.
    let bob_3 = login(&worker, "bob", "bob password");
    assert_eq!(worker.request("PATCH", "/api/v1/accounts/bob").api_key().json(&json!({"password": "a new password"})).send().status, 200);
    assert_eq!(worker.request("GET", "/api/v1/auth/me").header("cookie", &bob_3).send().status, 401);
    login(&worker, "bob", "a new password");

    // No password or key anywhere in the preferences; only Argon2id hashes in accounts.
    let mut db = pg.client();
    let hashes: Vec<String> = db.query("SELECT password_hash FROM omni_accounts", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(hashes.iter().all(|h| h.starts_with("$argon2id$")), "{hashes:?}");
    let leaked: i64 = db
        .query_one(
            "SELECT count(*) FROM omni_user_preferences WHERE value LIKE '%password%' OR value = $1",
            &[&TEST_API_KEY],
        )
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
}

#[test]
fn an_old_installation_keeps_its_session_preferences_and_loses_stored_api_keys() {
    let pg = TempPostgres::start_new();
    // The schema as the previous release left it: migrations 1 and 2 only.
    let mut db = pg.client();
    db.batch_execute(
        "CREATE TABLE omni_schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
             checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .unwrap();
    for migration in omni_contract::migrations::MIGRATIONS.iter().filter(|m| m.version < 3) {
        db.batch_execute(migration.sql).unwrap();
        db.execute(
            "INSERT INTO omni_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &omni_contract::migrations::checksum(migration.sql)],
        )
        .unwrap();
    }
    let session = uuid::Uuid::new_v4();
    for (key, value) in [("theme", "dark"), ("api_key", "sk-omni-stored-by-an-old-ui"), ("lang", "de")] {
        db.execute(
            "INSERT INTO omni_user_preferences (session_id, key, value) VALUES ($1::text::uuid, $2, $3)",
            &[&session.to_string(), &key, &value],
        )
        .unwrap();
    }

    let worker = WorkerBuilder::new(&pg.url()).start();
    let prefs = worker.request("GET", "/api/v1/preferences").session(&session.to_string()).send();
    assert_eq!(prefs.json(), json!([{"key": "lang", "value": "de"}, {"key": "theme", "value": "dark"}]));
    let keys: i64 = db.query_one("SELECT count(*) FROM omni_user_preferences WHERE key = 'api_key'", &[]).unwrap().get(0);
    assert_eq!(keys, 0);
    // The old client's writes still work the old way.
    let stored = worker.request("POST", "/api/v1/preferences").session(&session.to_string()).json(&json!({"key": "theme", "value": "light"})).send();
    assert_eq!(stored.status, 200);
}

/// A session opened with the API key lasts as long as that key: a start
/// with another key ends it; a start with the same key keeps it.
#[test]
fn a_session_opened_with_the_api_key_ends_when_the_key_changes() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let opened = worker.request("POST", "/api/v1/auth/login").json(&json!({"api_key": TEST_API_KEY})).send();
    assert_eq!(opened.status, 200, "{}", opened.text());
    let key_cookie = cookie_of(&opened);
    let account_cookie = create_admin(&worker);
    drop(worker);

    let same = Worker::start(&pg);
    assert_eq!(same.request("GET", "/api/v1/auth/me").header("cookie", &key_cookie).send().status, 200, "same key: the session lives on");
    drop(same);

    let other_key = "another-test-api-key-9876543210";
    let rotated = WorkerBuilder::new(&pg.url()).env("OMNI_API_KEY", other_key).start();
    let me = rotated.request("GET", "/api/v1/auth/me").header("cookie", &key_cookie).send();
    assert_eq!(me.status, 401, "the old key's session must end: {}", me.text());
    assert!(rotated.log().contains("the sessions opened with the earlier key have ended"), "{}", rotated.log());
    assert_eq!(rotated.request("GET", "/api/v1/auth/me").header("cookie", &account_cookie).send().status, 200, "account sessions stay");
    assert_eq!(rotated.request("GET", "/api/v1/auth/me").api_key().send().status, 401, "the old key opens nothing");
    assert_eq!(rotated.request("GET", "/api/v1/auth/me").header("x-api-key", other_key).send().status, 200);
}
