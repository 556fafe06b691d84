//! The browser surface: the UI directory (content types, ETags, the SPA
//! fallback, no way out of the directory), the security headers of every
//! answer, and the session cookie per scheme.

use std::time::Duration;

use omni_tests::{wait_until, Request, TempPostgres, TempDir, Worker, WorkerBuilder, TEST_API_KEY};
use serde_json::json;

fn ui_worker(pg: &TempPostgres) -> (omni_tests::Worker, TempDir) {
    // A secret next to the UI directory, which no request may reach.
    let outside = TempDir::new("outside");
    std::fs::write(outside.path().join("secret.txt"), "top secret").unwrap();

    let builder = WorkerBuilder::new(&pg.url());
    let ui = builder.workdir().join("ui");
    std::fs::write(ui.join("index.html"), "<!doctype html><title>Omni UI</title>").unwrap();
    std::fs::create_dir_all(ui.join("assets")).unwrap();
    std::fs::write(ui.join("assets/app.js"), "console.log('omni');").unwrap();
    std::fs::write(ui.join("assets/app.css"), "body{}").unwrap();
    std::fs::write(ui.join("logo.svg"), "<svg/>").unwrap();
    std::fs::write(ui.join("data.bin"), [0u8, 1, 2]).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), ui.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink(outside.path(), ui.join("escape-dir")).unwrap();
    std::fs::write(builder.workdir().join("worker-secret.txt"), "top secret").unwrap();
    (builder.start(), outside)
}

#[test]
fn serves_files_with_their_content_types() {
    let pg = TempPostgres::start_new();
    let (worker, _outside) = ui_worker(&pg);
    for (path, content_type, body) in [
        ("/", "text/html; charset=utf-8", "<!doctype html><title>Omni UI</title>"),
        ("/index.html", "text/html; charset=utf-8", "<!doctype html><title>Omni UI</title>"),
        ("/assets/app.js", "text/javascript; charset=utf-8", "console.log('omni');"),
        ("/assets/app.css", "text/css; charset=utf-8", "body{}"),
        ("/logo.svg", "image/svg+xml; charset=utf-8", "<svg/>"),
    ] {
        let response = worker.request("GET", path).send();
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("content-type"), Some(content_type), "{path}");
        assert_eq!(response.text(), body, "{path}");
    }
    let binary = worker.request("GET", "/data.bin").send();
    assert_eq!((binary.header("content-type"), binary.body.as_slice()), (Some("application/octet-stream"), [0u8, 1, 2].as_slice()));
    let head = worker.request("HEAD", "/assets/app.js").send();
    assert_eq!((head.status, head.body.len()), (200, 0));
}

#[test]
fn answers_304_when_the_etag_matches() {
    let pg = TempPostgres::start_new();
    let (worker, _outside) = ui_worker(&pg);
    let first = worker.request("GET", "/assets/app.js").send();
    let etag = first.header("etag").expect("an ETag").to_owned();
    assert_eq!(first.header("cache-control"), Some("no-cache"));

    let again = worker.request("GET", "/assets/app.js").header("if-none-match", &etag).send();
    assert_eq!((again.status, again.body.len()), (304, 0));
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let in_list = worker.request("GET", "/assets/app.js").header("if-none-match", format!("\"other\", W/{etag}")).send();
    assert_eq!(in_list.status, 304);
    let stale = worker.request("GET", "/assets/app.js").header("if-none-match", "\"stale\"").send();
    assert_eq!((stale.status, stale.text()), (200, "console.log('omni');".to_owned()));
    let other_file = worker.request("GET", "/assets/app.css").send();
    assert_ne!(other_file.header("etag"), Some(etag.as_str()));
}

#[test]
fn unknown_ui_paths_get_index_html_but_unknown_api_paths_get_json_404() {
    let pg = TempPostgres::start_new();
    let (worker, _outside) = ui_worker(&pg);
    for path in ["/settings", "/backups/list", "/deep/link/with.dots?x=1", "/assets"] {
        let response = worker.request("GET", path).send();
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("content-type"), Some("text/html; charset=utf-8"), "{path}");
        assert!(response.text().contains("Omni UI"), "{path}");
    }
    for path in ["/api", "/api/", "/api/v1", "/api/v1/nope", "/api/v1/preferences/a/b"] {
        let response = worker.request("GET", path).session(&uuid::Uuid::new_v4().to_string()).send();
        assert_eq!(response.status, 404, "{path}");
        assert_eq!(response.json()["code"], "not_found", "{path}");
    }
}

#[test]
fn never_serves_a_file_outside_the_ui_directory() {
    let pg = TempPostgres::start_new();
    let (worker, _outside) = ui_worker(&pg);
    for path in [
        "/../worker-secret.txt",
        "/assets/../../worker-secret.txt",
        "/%2e%2e/worker-secret.txt",
        "/%2E%2E%2Fworker-secret.txt",
        "/assets/%2e%2e%2f%2e%2e%2fworker-secret.txt",
        "/..%5cworker-secret.txt",
        "/%252e%252e/worker-secret.txt",
        "/escape.txt",
        "/escape-dir/secret.txt",
        "//etc/passwd",
        "/etc/passwd%00",
        "/./index.html",
    ] {
        let response = Request::get(path).send_to(worker.port);
        let text = response.text();
        assert!(!text.contains("top secret") && !text.contains("root:"), "{path} leaked: {text}");
        assert!(
            [400, 404].contains(&response.status) || text.contains("Omni UI"),
            "{path}: {} {text}",
            response.status
        );
        if response.status != 200 {
            assert!(response.json()["code"].is_string(), "{path}");
        }
    }
}

#[test]
fn every_ui_answer_carries_the_security_headers_and_api_answers_nosniff() {
    let pg = TempPostgres::start_new();
    let (worker, _outside) = ui_worker(&pg);
    let etag = worker.request("GET", "/assets/app.js").send().header("etag").unwrap().to_owned();
    let ui_answers = [
        ("/", worker.request("GET", "/").send(), 200),
        ("/index.html", worker.request("GET", "/index.html").send(), 200),
        ("/assets/app.js", worker.request("GET", "/assets/app.js").send(), 200),
        ("/accounts (SPA route)", worker.request("GET", "/accounts").send(), 200),
        ("HEAD /logo.svg", worker.request("HEAD", "/logo.svg").send(), 200),
        ("304", worker.request("GET", "/assets/app.js").header("if-none-match", &etag).send(), 304),
        ("traversal", worker.request("GET", "/a/%2e%2e/%2e%2e/etc/passwd").send(), 400),
        ("POST to the UI", worker.request("POST", "/index.html").send(), 405),
    ];
    for (what, response, status) in ui_answers {
        assert_eq!(response.status, status, "{what}: {}", response.text());
        let csp = response.header("content-security-policy").unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"));
        for directive in ["default-src 'self'", "script-src 'self'", "style-src 'self'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"] {
            assert!(csp.split(';').any(|d| d.trim() == directive), "{what}: CSP {csp:?} lacks {directive:?}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{what}: {csp}");
        assert_eq!(response.header("x-frame-options"), Some("DENY"), "{what}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{what}");
        assert_eq!(response.header("referrer-policy"), Some("no-referrer"), "{what}");
    }
    for (path, status) in [("/api/v1/health", 200), ("/api/v1/openapi.json", 200), ("/api/v1/no-such-thing", 404), ("/api/v1/backup/list", 401)] {
        let response = worker.request("GET", path).send();
        assert_eq!(response.status, status, "{path}: {}", response.text());
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(response.header("content-type"), Some("application/json"), "{path}");
    }
}

/// The policy allows no inline script or style, so the shipped UI must have
/// none: no `<script>` without `src`, no `style` attribute or `<style>`, no
/// `on…=` handler in markup, and no `style` set as an attribute from script.
#[test]
fn the_shipped_ui_has_no_inline_script_or_style() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui-dist");
    let mut files = vec![root.join("index.html")];
    let mut dirs = vec![root.join("js")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "js" || e == "html") {
                files.push(path);
            }
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.display();
        assert!(!text.contains("<style") && !text.contains(" style=\"") && !text.contains("setAttribute('style'"), "{name}: inline style");
        assert!(!text.contains("javascript:") && !text.contains("eval("), "{name}: script from a string");
        for (at, _) in text.match_indices('<') {
            let Some(tag) = text[at..].split_once('>').map(|(tag, _)| tag) else { continue };
            if !tag[1..].starts_with(|c: char| c.is_ascii_alphabetic()) {
                continue;
            }
            let handler = tag.split_whitespace().skip(1).any(|a| a.starts_with("on") && a.contains('='));
            assert!(!handler, "{name}: inline event handler in {tag}>");
            if tag.starts_with("<script") {
                assert!(tag.contains(" src="), "{name}: inline script {tag}>");
            }
        }
    }
    let index = std::fs::read_to_string(root.join("index.html")).unwrap();
    let boot = index.find(r#"<script src="/js/boot.js"></script>"#).expect("index.html loads js/boot.js");
    assert!(boot < index.find("stylesheet").unwrap(), "the theme is applied before the stylesheet paints");
}

/// Signs in with the API key; `https` says the request came over TLS (the
/// gateway's `X-Forwarded-Proto`). Returns the whole `Set-Cookie` value.
fn sign_in(worker: &Worker, https: bool) -> String {
    let mut request = worker.request("POST", "/api/v1/auth/login").json(&json!({ "api_key": TEST_API_KEY }));
    if https {
        request = request.header("x-forwarded-proto", "https");
    }
    let response = request.send();
    assert_eq!(response.status, 200, "{}", response.text());
    response.header("set-cookie").expect("a Set-Cookie").to_owned()
}

fn me(worker: &Worker, cookie: &str, https: bool) -> u16 {
    let mut request = worker.request("GET", "/api/v1/auth/me").header("cookie", cookie);
    if https {
        request = request.header("x-forwarded-proto", "https");
    }
    request.send().status
}

#[test]
fn the_session_cookie_is_host_prefixed_and_secure_over_tls_and_plain_over_http() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);

    let tls = sign_in(&worker, true);
    assert!(tls.starts_with("__Host-omni_session="), "{tls}");
    let attributes: Vec<&str> = tls.split(';').map(str::trim).skip(1).collect();
    for wanted in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
        assert!(attributes.contains(&wanted), "{tls} lacks {wanted}");
    }
    assert!(!attributes.iter().any(|a| a.to_ascii_lowercase().starts_with("domain")), "a __Host- cookie has no Domain: {tls}");
    let tls_pair = tls.split(';').next().unwrap().to_owned();
    assert_eq!(me(&worker, &tls_pair, true), 200);
    // A __Host- cookie arriving over plain HTTP is not the plain scheme's cookie.
    assert_eq!(me(&worker, &tls_pair, false), 401);

    let plain = sign_in(&worker, false);
    assert!(plain.starts_with("omni_session="), "{plain}");
    assert!(!plain.split(';').any(|a| a.trim() == "Secure"), "a plain-HTTP cookie cannot be Secure: {plain}");
    let plain_pair = plain.split(';').next().unwrap().to_owned();
    assert_eq!(me(&worker, &plain_pair, false), 200);
    assert_eq!(me(&worker, &plain_pair, true), 401, "over TLS only the __Host- cookie counts");

    let signed_out = worker.request("POST", "/api/v1/auth/logout").header("x-forwarded-proto", "https").send();
    assert!(signed_out.header("set-cookie").unwrap().starts_with("__Host-omni_session=; "), "{signed_out:?}");
}

#[test]
fn two_session_cookies_of_one_name_are_no_session() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let ours = sign_in(&worker, false).split(';').next().unwrap().to_owned();
    let planted = sign_in(&worker, false).split(';').next().unwrap().to_owned();
    assert_eq!(me(&worker, &ours, false), 200);
    assert_eq!(me(&worker, &planted, false), 200);
    // A sibling origin tossed its own valid cookie in front of ours: neither is taken.
    assert_eq!(me(&worker, &format!("{planted}; {ours}"), false), 401);
    assert_eq!(me(&worker, &format!("{ours}; {ours}"), false), 401);
    let split = worker.request("GET", "/api/v1/auth/me").header("cookie", &planted).header("cookie", &ours).send();
    assert_eq!(split.status, 401, "two Cookie headers count too");
    let tls_ours = sign_in(&worker, true).split(';').next().unwrap().to_owned();
    let tls_planted = sign_in(&worker, true).split(';').next().unwrap().to_owned();
    assert_eq!(me(&worker, &format!("{tls_planted}; {tls_ours}"), true), 401);
    assert_eq!(me(&worker, &format!("{planted}; {tls_ours}"), true), 200, "the other scheme's cookie is not a second one");
}

#[test]
fn ended_sessions_are_purged_when_the_worker_starts() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let live = sign_in(&worker, false).split(';').next().unwrap().to_owned();
    drop(worker);
    let mut client = pg.client();
    client
        .batch_execute(
            "INSERT INTO omni_auth_sessions (id, token_digest, expires_at, last_seen_at)
             VALUES (gen_random_uuid(), '\\x01', now() - interval '1 second', now()),
                    (gen_random_uuid(), '\\x02', now() + interval '1 day', now() - interval '4 days')",
        )
        .unwrap();
    let count = |client: &mut postgres::Client| client.query_one("SELECT count(*) FROM omni_auth_sessions", &[]).unwrap().get::<_, i64>(0);
    assert_eq!(count(&mut client), 3);

    let worker = Worker::start(&pg);
    // The worker logs the purge after its DELETE committed: wait for the
    // line, not only for the rows to go.
    wait_until(Duration::from_secs(30), "the ended sessions to be purged", || worker.log().contains("purged ended sign-in sessions").then_some(()));
    assert_eq!(count(&mut client), 1, "only the live session is left");
    assert_eq!(me(&worker, &live, false), 200, "the live session stays");
}

/// What the UI asks at its first page load: "not signed in" is a 200 there
/// (a 401 is a console error in every browser), signed in names the account.
#[test]
fn the_session_state_answers_signed_out_without_an_error_status() {
    let pg = TempPostgres::start_new();
    let worker = WorkerBuilder::new(&pg.url()).start();
    let anonymous = worker.request("GET", "/api/v1/auth/session").send();
    assert_eq!((anonymous.status, anonymous.json()), (200, json!({"signed_in": false, "account": null})));
    let ended = worker.request("GET", "/api/v1/auth/session").header("cookie", "omni_session=no-such-session").send();
    assert_eq!((ended.status, ended.json()), (200, json!({"signed_in": false, "account": null})));

    let cookie = sign_in(&worker, false);
    let cookie = cookie.split(';').next().unwrap();
    let signed_in = worker.request("GET", "/api/v1/auth/session").header("cookie", cookie).send();
    assert_eq!((signed_in.status, signed_in.json()), (200, json!({"signed_in": true, "account": {"username": null, "role": "admin"}})));
    let key = worker.request("GET", "/api/v1/auth/session").api_key().send();
    assert_eq!(key.json()["signed_in"], true);
    let wrong = worker.request("GET", "/api/v1/auth/session").header("x-api-key", "sk-omni-wrong").send();
    assert_eq!((wrong.status, wrong.json()["code"].as_str()), (401, Some("invalid_api_key")));
}
