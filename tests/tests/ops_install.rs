//! The install is the two binaries: `omni-gateway` and `omni-api` put alone
//! into an empty directory (no `ui-dist/`, no repository around them) and
//! started from there without `OMNI_UI_DIR` serve the browser UI built into
//! omni-api, byte for byte the files of `ui-dist/`, with `index.html` for
//! the paths the UI routes itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use omni_tests::{bin_path, free_port, isolated_command, pg_bin_dir, wait_until, ChildGuard, Request, TempDir};

fn ui_file(rel: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui-dist").join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The binaries of this build placed in `dir` (hard links when the file
/// system allows, copies otherwise: either way a file at a new path).
fn install(dir: &Path) -> PathBuf {
    for name in ["omni-gateway", "omni-api"] {
        let from = bin_path(name);
        let to = dir.join(name);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
        }
    }
    dir.join("omni-gateway")
}

#[test]
fn the_two_binaries_alone_in_an_empty_directory_serve_the_ui() {
    let install_dir = TempDir::new("install");
    let logs = TempDir::new("install-log");
    let gateway = install(install_dir.path());
    let entries: Vec<_> = std::fs::read_dir(install_dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 2, "nothing but the two binaries: {entries:?}");

    let port = free_port();
    let env: BTreeMap<String, String> = [
        ("OMNI_PORT", port.to_string()),
        ("PGSERVE_PORT", "0".to_owned()),
        ("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let log_file = logs.path().join("gateway.log");
    let mut child = ChildGuard::spawn(&mut isolated_command(&gateway, install_dir.path(), &env, &log_file));
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    wait_until(Duration::from_secs(90), "/health to answer 200", || {
        if let Some(status) = child.try_status() {
            panic!("the gateway exited with {status}:\n{}", log());
        }
        Request::get("/health").try_send(port).is_ok_and(|r| r.status == 200).then_some(())
    });

    // The worker was told no UI directory: it serves the one built in.
    let status = Request::get("/gateway/status").send_to(port).json();
    let worker = status["components"].as_array().unwrap().iter().find(|c| c["name"] == "api").expect("an api component").clone();
    let pid = worker["pid"].as_i64().expect("the worker's pid");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!environ.split(|b| *b == 0).any(|v| v.starts_with(b"OMNI_UI_DIR=")), "OMNI_UI_DIR is forwarded only when set");

    for (path, file, content_type) in [
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/js/app.js", "js/app.js", "text/javascript; charset=utf-8"),
        ("/styles.css", "styles.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "favicon.svg", "image/svg+xml; charset=utf-8"),
        ("/backups", "index.html", "text/html; charset=utf-8"),
        ("/no/such/page.js", "index.html", "text/html; charset=utf-8"),
    ] {
        let response = Request::get(path).send_to(port);
        assert_eq!(response.status, 200, "{path}: {}\n{}", response.text(), log());
        assert_eq!(response.header("content-type"), Some(content_type), "{path}");
        assert!(response.body == ui_file(file), "{path} must be ui-dist/{file}, got {:?}", response.text().chars().take(200).collect::<String>());
        assert_eq!(response.header("cache-control"), Some("no-cache"), "{path}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{path}");
        let etag = response.header("etag").unwrap_or_else(|| panic!("{path}: an ETag"));
        let again = Request::get(path).header("if-none-match", etag).send_to(port);
        assert_eq!((again.status, again.body.len()), (304, 0), "{path}: the same ETag revalidates");
    }
    assert_ne!(
        Request::get("/js/app.js").send_to(port).header("etag"),
        Request::get("/styles.css").send_to(port).header("etag"),
        "each file has its own ETag"
    );
    assert_eq!(Request::get("/%2e%2e/etc/passwd").send_to(port).status, 400, "paths are checked as from a directory");

    // SAFETY: signalling the gateway process we started.
    unsafe { libc::kill(child.pid() as i32, libc::SIGTERM) };
    let exit = child.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "a stop exits 0: {exit}\n{}", log());
}
