//! Who may do what: every route of the served OpenAPI document, called as
//! anonymous, as a `user`, as an `admin` and with the API key, checked
//! against [`TABLE`], which is the specification (README "Who may do what").
//! A route in the document but not in the table fails the test, and so
//! does a table row the document lacks.
//!
//! Bodies pass validation where cheap, so an allowed caller's answer shows
//! authorization passed; destructive routes aim at things that do not exist
//! (a backup or account named `nobody`), and sign-out runs last, each time
//! with a session opened for it.

use std::collections::BTreeSet;

use omni_tests::{pg_bin_dir, Request, Response, TempPostgres, Worker, WorkerBuilder, TEST_API_KEY};
use serde_json::{json, Value};

use crate::gateway;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Access {
    /// Anyone, signed in or not.
    Public,
    /// Any principal: the API key, or a session of either role.
    SignedIn,
    /// The API key or an admin account; a `user` gets 403.
    Admin,
    /// Setup: once set up (as here: OMNI_API_KEY is configured), the same as Admin.
    Setup,
}
use Access::*;

const TABLE: &[(&str, &str, Access)] = &[
    ("GET", "/api/v1/health", Public),
    ("GET", "/api/v1/openapi.json", Public),
    ("GET", "/api/v1/preferences", Public),
    ("POST", "/api/v1/preferences", Public),
    ("GET", "/api/v1/preferences/{key}", Public),
    ("DELETE", "/api/v1/preferences/{key}", Public),
    ("GET", "/api/v1/setup/status", Public),
    ("POST", "/api/v1/auth/login", Public),
    ("POST", "/api/v1/auth/logout", Public),
    ("GET", "/api/v1/auth/session", Public),
    ("GET", "/api/v1/auth/me", SignedIn),
    ("POST", "/api/v1/auth/logout-all", SignedIn),
    ("GET", "/api/v1/migration/status", SignedIn),
    ("GET", "/api/v1/setup/api-key", Setup),
    ("POST", "/api/v1/setup/admin", Setup),
    ("POST", "/api/v1/setup/initialize", Setup),
    ("POST", "/api/v1/setup/complete", Setup),
    ("POST", "/api/v1/migration/import", Admin),
    ("POST", "/api/v1/backup/create", Admin),
    ("GET", "/api/v1/backup/list", Admin),
    ("GET", "/api/v1/backup/download/{filename}", Admin),
    ("POST", "/api/v1/backup/restore/{filename}", Admin),
    ("DELETE", "/api/v1/backup/{filename}", Admin),
    ("GET", "/api/v1/backup/window", Admin),
    ("POST", "/api/v1/backup/base", Admin),
    ("POST", "/api/v1/backup/restore-to", Admin),
    ("POST", "/api/v1/backup/repository/test", Admin),
    ("GET", "/api/v1/accounts", Admin),
    ("POST", "/api/v1/accounts", Admin),
    ("PATCH", "/api/v1/accounts/{username}", Admin),
    ("DELETE", "/api/v1/accounts/{username}", Admin),
    ("GET", "/api/v1/auth/check", Admin),
];

const USER: (&str, &str) = ("bob", "bob's password");
const ADMIN: (&str, &str) = ("alice", "alice's password");

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Anonymous,
    User,
    AdminAccount,
    ApiKey,
}

fn login(worker: &Worker, (username, password): (&str, &str)) -> String {
    let response = worker.request("POST", "/api/v1/auth/login").json(&json!({"username": username, "password": password})).send();
    assert_eq!(response.status, 200, "{}", response.text());
    response.header("set-cookie").unwrap().split(';').next().unwrap().to_owned()
}

/// A body that passes validation, for the routes that take one.
fn body_for(method: &str, path: &str, who: Who) -> Option<Value> {
    Some(match (method, path) {
        ("POST", "/api/v1/preferences") => json!({"key": "theme", "value": "dark"}),
        ("POST", "/api/v1/auth/login") => json!({"username": USER.0, "password": USER.1}),
        ("POST", "/api/v1/setup/admin") => json!({"username": "mallory", "password": "long enough"}),
        ("POST", "/api/v1/setup/initialize") => json!({"data_dir": "./data/postgres"}),
        ("POST", "/api/v1/accounts") => json!({"username": format!("made-by-{who:?}").to_lowercase(), "password": "long enough", "role": "user"}),
        ("PATCH", "/api/v1/accounts/{username}") => json!({"disabled": false}),
        ("POST", "/api/v1/backup/restore-to") => json!({"target_time": "2000-01-01T00:00:00Z"}),
        ("POST", "/api/v1/migration/import") => json!({"path": "nobody.db", "dry_run": true}),
        _ => return None,
    })
}

/// Whether an answer says "you may not": a 401 for missing credentials, or
/// a 403 from the role or setup checks (other 403s, such as "setup is
/// complete", come from the handler: authorization passed).
fn denied(response: &Response) -> Option<String> {
    let code = serde_json::from_slice::<Value>(&response.body).ok().and_then(|b| b["code"].as_str().map(str::to_owned)).unwrap_or_default();
    let refused = match response.status {
        401 => true,
        403 => ["admin_required", "setup_token_required", "invalid_setup_token", "client_header_required", "host_not_allowed"].contains(&code.as_str()),
        _ => false,
    };
    refused.then(|| format!("{} {code}", response.status))
}

#[test]
fn every_route_answers_each_principal_as_the_table_says() {
    let pg = TempPostgres::start_new();
    let worker = WorkerBuilder::new(&pg.url()).env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string()).start();
    for (name, password, role) in [(USER.0, USER.1, "user"), (ADMIN.0, ADMIN.1, "admin")] {
        let made = worker.request("POST", "/api/v1/accounts").api_key().json(&json!({"username": name, "password": password, "role": role})).send();
        assert_eq!(made.status, 201, "{}", made.text());
    }

    let document = worker.request("GET", "/api/v1/openapi.json").send().json();
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let table: BTreeSet<(String, String)> = TABLE.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(table.len(), TABLE.len(), "a route is twice in the table");
    let missing: Vec<_> = documented.difference(&table).collect();
    assert!(missing.is_empty(), "routes in the OpenAPI document but not in the role table (add them with their access): {missing:?}");
    let stale: Vec<_> = table.difference(&documented).collect();
    assert!(stale.is_empty(), "routes in the role table but not in the document: {stale:?}");

    // Sign-out last: it ends the session it is sent with.
    let mut order: Vec<&(&str, &str, Access)> = TABLE.iter().collect();
    order.sort_by_key(|(_, path, _)| path.contains("logout"));
    let (user_cookie, admin_cookie) = (login(&worker, USER), login(&worker, ADMIN));
    let mut checked = 0;
    for &&(method, path, access) in &order {
        let operation = &document["paths"][path][method.to_lowercase()];
        if access != Public {
            assert!(operation["responses"]["401"].is_object(), "{method} {path} does not document its 401");
        }
        if matches!(access, Admin | Setup) {
            assert!(operation["responses"]["403"].is_object(), "{method} {path} does not document its 403");
            assert!(operation["responses"]["403"]["description"].as_str().unwrap().contains("admin"), "{method} {path}: {}", operation["responses"]["403"]);
        }
        let concrete = path.replace("{key}", "theme").replace("{filename}", "omni_backup_nobody.sql").replace("{username}", "nobody");
        for who in [Who::Anonymous, Who::User, Who::AdminAccount, Who::ApiKey] {
            let mut request = Request::new(method, &concrete).port(worker.port).header("x-session-id", uuid::Uuid::new_v4().to_string());
            let signing_out = path.contains("logout");
            request = match who {
                Who::Anonymous => request,
                Who::ApiKey => request.header("x-api-key", TEST_API_KEY),
                Who::User | Who::AdminAccount => {
                    let account = if who == Who::User { USER } else { ADMIN };
                    let cookie = if signing_out { login(&worker, account) } else if who == Who::User { user_cookie.clone() } else { admin_cookie.clone() };
                    request.header("cookie", cookie).header("x-omni-client", "ui")
                }
            };
            if let Some(body) = body_for(method, path, who) {
                request = request.json(&body);
            }
            let response = request.send();
            let refusal = denied(&response);
            let may = match (access, who) {
                (Public, _) => true,
                (_, Who::Anonymous) => false,
                (SignedIn, _) => true,
                (Admin | Setup, Who::User) => false,
                (Admin | Setup, _) => true,
            };
            if may {
                assert!(refusal.is_none(), "{who:?} may {method} {path}, but got {}: {}", response.status, response.text());
                assert!(response.status < 500 || response.status == 503, "{who:?} {method} {path}: {} {}", response.status, response.text());
            } else {
                let expected = if who == Who::Anonymous { "401 not_signed_in" } else { "403 admin_required" };
                assert_eq!(refusal.as_deref(), Some(expected), "{who:?} must not {method} {path}: {}", response.text());
            }
            checked += 1;
        }
    }
    assert_eq!(checked, TABLE.len() * 4);
    // The allowed calls did what they say; the refused ones did nothing.
    let made: Vec<String> = pg.client().query("SELECT username FROM omni_accounts WHERE username LIKE 'made-by-%' ORDER BY 1", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(made, ["made-by-adminaccount", "made-by-apikey"]);
    let backups = worker.request("GET", "/api/v1/backup/list").api_key().send().json();
    assert_eq!(backups["backups"].as_array().map(Vec::len).or(backups.as_array().map(Vec::len)), Some(2), "one backup each by the admin and the key: {backups}");
}

/// The gateway's logs and metrics history ask the worker's credentials
/// check: a `user` gets 403 there, an admin 204.
#[test]
fn the_credentials_check_for_gateway_logs_is_admin_only() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    for (name, password, role) in [(USER.0, USER.1, "user"), (ADMIN.0, ADMIN.1, "admin")] {
        assert_eq!(worker.request("POST", "/api/v1/accounts").api_key().json(&json!({"username": name, "password": password, "role": role})).send().status, 201);
    }
    let check = |cookie: &str| worker.request("GET", "/api/v1/auth/check").header("cookie", cookie).send().status;
    assert_eq!(check(&login(&worker, USER)), 403);
    assert_eq!(check(&login(&worker, ADMIN)), 204);
    assert_eq!(worker.request("GET", "/api/v1/auth/check").api_key().send().status, 204);
    assert_eq!(worker.request("GET", "/api/v1/auth/check").send().status, 401);
}

/// Through a real gateway: its logs and metrics history are an admin's; a
/// `user` gets the worker's 403, with its reason.
#[test]
fn a_user_cannot_read_the_gateway_logs_or_metrics_history() {
    let dir = gateway::workdir();
    let gw = gateway::GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let api = |method: &str, path: &str| Request::new(method, path).port(gw.port);
    for (name, password, role) in [(USER.0, USER.1, "user"), (ADMIN.0, ADMIN.1, "admin")] {
        let made = api("POST", "/api/v1/accounts").api_key().json(&json!({"username": name, "password": password, "role": role})).send();
        assert_eq!(made.status, 201, "{}", made.text());
    }
    let login = |(username, password): (&str, &str)| {
        let response = api("POST", "/api/v1/auth/login").json(&json!({"username": username, "password": password})).send();
        assert_eq!(response.status, 200, "{}", response.text());
        response.header("set-cookie").unwrap().split(';').next().unwrap().to_owned()
    };
    let (user, admin) = (login(USER), login(ADMIN));
    for path in ["/gateway/logs", "/gateway/metrics/history"] {
        let refused = api("GET", path).header("cookie", &user).send();
        assert_eq!((refused.status, refused.json()["code"].as_str()), (403, Some("admin_required")), "{path}: {}", refused.text());
        assert_eq!(api("GET", path).header("cookie", &admin).send().status, 200, "{path} for an admin");
        assert_eq!(api("GET", path).api_key().send().status, 200, "{path} with the key");
        assert_eq!(api("GET", path).send().status, 401, "{path} anonymous");
    }
}
