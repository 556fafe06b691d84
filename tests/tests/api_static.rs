//! The UI directory: content types, ETags, the SPA fallback, and no way out
//! of the directory.

use omni_tests::{Request, TempPostgres, TempDir, WorkerBuilder};

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
