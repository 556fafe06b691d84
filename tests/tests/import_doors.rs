//! The importer's other doors and its worst days: the file uploaded through
//! the gateway, `omni-gateway import-sqlite` against a running gateway, and
//! `kill -9` of the worker or of PostgreSQL in the middle of an import,
//! which must leave no row of it behind.

use crate::gateway;
use crate::fixture;

use fixture::TABLES;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

use gateway::{cli, workdir, GatewayBuilder};
use omni_tests::{bin_path, pg_bin_dir, wait_until, Request, TempDir, TempPostgres, Worker, WorkerBuilder, TEST_API_KEY};
use serde_json::{json, Value};

fn rows(db: &mut postgres::Client) -> i64 {
    TABLES.iter().map(|t| db.query_one(&format!("SELECT count(*) FROM {t}"), &[]).unwrap().get::<_, i64>(0)).sum()
}

/// A worker whose data root is `root` (which outlives it).
fn worker_on(pg: &TempPostgres, root: &Path) -> Worker {
    WorkerBuilder::new(&pg.url())
        .env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string())
        .env("OMNI_DATA_ROOT", root.display().to_string())
        .env("OMNI_BACKUP_DIR", root.join("data/backups").display().to_string())
        .start()
}

/// Starts an import in the background and waits until it is copying trace payloads.
fn import_until_payloads(worker: &Worker) -> std::thread::JoinHandle<()> {
    let request = worker.request("POST", "/api/v1/migration/import").api_key().json(&json!({}));
    let port = worker.port;
    let in_flight = std::thread::spawn(move || {
        let _ = request.try_send(port);
    });
    wait_until(Duration::from_secs(120), "the import to reach omni_trace_payloads", || {
        let status = worker.request("GET", "/api/v1/migration/status").api_key().try_send(port).ok()?.json();
        (status["running_import"]["table"] == "omni_trace_payloads" && status["running_import"]["rows_done"].as_u64()? > 0).then_some(())
    });
    in_flight
}

/// Waits until no session holds the import's lock (the killed import's backend is gone).
fn wait_import_gone(db: &mut postgres::Client) {
    wait_until(Duration::from_secs(30), "the killed import's session to end", || {
        // Taken and released by this one statement when free.
        let free: bool = db.query_one("SELECT pg_try_advisory_xact_lock(x'6f6d6e69696d70'::bigint)", &[]).ok()?.get(0);
        free.then_some(())
    });
}

const TRACES: u64 = 120_000;

#[test]
fn kill_9_of_the_worker_mid_import_leaves_no_row_and_a_rerun_completes_and_a_second_import_waits_its_turn() {
    let pg = TempPostgres::start_new();
    let root = TempDir::new("import-root");
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    fixture::large(&root.path().join("data/automagik-omni.db"), TRACES, 400);

    fixture::old_era(&root.path().join("data/small.db"));
    let mut worker = worker_on(&pg, root.path());
    let in_flight = import_until_payloads(&worker);
    // One import at a time: a second (of a small file, checked in no time) is
    // refused at once, and leaves the first's progress alone.
    let second = worker.request("POST", "/api/v1/migration/import").api_key().json(&json!({"path": "data/small.db", "dry_run": true})).send();
    assert_eq!((second.status, second.json()["code"].clone()), (409, json!("import_busy")), "{}", second.text());
    let status = worker.request("GET", "/api/v1/migration/status").api_key().send().json();
    assert_eq!(status["running_import"]["table"], "omni_trace_payloads", "{status}");
    worker.child.kill9();
    let _ = in_flight.join();
    let mut db = pg.client();
    wait_import_gone(&mut db);
    assert_eq!(rows(&mut db), 0, "no row of the killed import is there");

    let worker = worker_on(&pg, root.path());
    let report = worker.request("POST", "/api/v1/migration/import").api_key().json(&json!({})).send();
    assert_eq!(report.status, 200, "{}", report.text());
    assert_eq!(report.json()["imported"], 2 * TRACES + 1);
    assert_eq!(rows(&mut db), (2 * TRACES + 1) as i64);
}

#[test]
fn kill_9_of_postgresql_mid_import_leaves_no_row_and_a_rerun_completes() {
    let mut pg = TempPostgres::start_new();
    let root = TempDir::new("import-root");
    std::fs::create_dir_all(root.path().join("data")).unwrap();
    fixture::large(&root.path().join("data/automagik-omni.db"), TRACES, 400);

    let worker = worker_on(&pg, root.path());
    let in_flight = import_until_payloads(&worker);
    pg.kill9();
    let _ = in_flight.join();
    pg.start();
    let mut db = pg.client();
    assert_eq!(rows(&mut db), 0, "crash recovery leaves no row of the interrupted import");

    let report = wait_until(Duration::from_secs(60), "the worker to import again after the restart", || {
        let r = worker.request("POST", "/api/v1/migration/import").api_key().json(&json!({})).try_send(worker.port).ok()?;
        (r.status != 503).then_some(r)
    });
    assert_eq!(report.status, 200, "{}", report.text());
    assert_eq!(report.json()["imported"], 2 * TRACES + 1);
    assert_eq!(rows(&mut db), (2 * TRACES + 1) as i64);
}

#[test]
fn a_50_mb_upload_through_the_gateway_imports_with_the_api_key_only_and_within_the_limit() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let file = dir.path().join("upload.db");
    fixture::large(&file, 45_000, 1000);
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 50_000_000, "{} bytes", bytes.len());
    let upload = |request: Request| request.raw_body("application/octet-stream", bytes.clone()).send_to(gw.port);

    let refused = upload(Request::new("POST", "/api/v1/migration/import"));
    assert_eq!(refused.status, 401, "the API key is required");
    assert_eq!(gw.db().query_one("SELECT count(*) FROM omni_message_traces", &[]).unwrap().get::<_, i64>(0), 0);

    let dry = upload(Request::new("POST", "/api/v1/migration/import?dry_run=true").api_key());
    assert_eq!(dry.status, 200, "{}", dry.text());
    assert_eq!((dry.json()["dry_run"].clone(), dry.json()["imported"].clone()), (json!(true), json!(90_001)));
    assert_eq!(gw.db().query_one("SELECT count(*) FROM omni_message_traces", &[]).unwrap().get::<_, i64>(0), 0);

    let report = upload(Request::new("POST", "/api/v1/migration/import").api_key());
    assert_eq!(report.status, 200, "{}", report.text());
    let report = report.json();
    assert_eq!(report["imported"], 90_001, "{report}");
    assert_eq!(gw.db().query_one("SELECT count(*) FROM omni_trace_payloads", &[]).unwrap().get::<_, i64>(0), 45_000);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data/backups"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".omni_import_"))
        .collect();
    assert!(leftovers.is_empty(), "the uploaded file is removed after the import");

    // Over the limit (1 GiB): refused from the declared length, before a byte is stored.
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "POST /api/v1/migration/import HTTP/1.1\r\nhost: x\r\nx-api-key: {TEST_API_KEY}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\nSQLite format 3\0",
        (1u64 << 30) + 1
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // Not a database, as an upload: 422, nothing written.
    let junk = Request::new("POST", "/api/v1/migration/import").api_key().raw_body("application/octet-stream", b"hello".to_vec()).send_to(gw.port);
    assert_eq!((junk.status, junk.json()["code"].clone()), (422, json!("not_sqlite")));
}

#[test]
fn cli_imports_the_detected_file_into_a_running_gateway() {
    let dir = workdir();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let file = dir.path().join("data/automagik-omni.db");
    fixture::old_era(&file);
    let hash = fixture::sha256(&file);
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();

    let (ok, out, err) = cli(dir.path(), &["import-sqlite", "--dry-run"]);
    assert!(ok, "{out}{err}");
    let dry: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((dry["dry_run"].clone(), dry["imported"].clone()), (json!(true), json!(11)));
    assert!(err.contains("omni_trace_payloads"), "the table goes to stderr: {err}");
    assert_eq!(gw.db().query_one("SELECT count(*) FROM omni_users", &[]).unwrap().get::<_, i64>(0), 0);

    let (ok, out, err) = cli(dir.path(), &["import-sqlite"]);
    assert!(ok, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["imported"], 11);
    assert!(report["safety_backup"].as_str().unwrap().starts_with("omni_backup_"));
    assert_eq!(gw.db().query_one("SELECT count(*) FROM omni_users", &[]).unwrap().get::<_, i64>(0), 1);
    // The API shows what the CLI did.
    let status = Request::get("/api/v1/migration/status").port(gw.port).api_key().send().json();
    assert_eq!(status["last_import"]["imported"], 11);

    let (ok, out, _) = cli(dir.path(), &["import-sqlite", "data/automagik-omni.db"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["already_present"], 11);
    assert_eq!(fixture::sha256(&file), hash);

    std::fs::write(dir.path().join("empty.db"), b"").unwrap();
    let (ok, _, err) = cli(dir.path(), &["import-sqlite", "empty.db"]);
    assert!(!ok && err.contains("is empty") && err.contains("nothing was written"), "{err}");
    let (ok, _, err) = cli(dir.path(), &["import-sqlite", "missing.db"]);
    assert!(!ok && err.contains("there is no file"), "{err}");

    gw.terminate();
    let (ok, _, err) = cli(dir.path(), &["import-sqlite"]);
    assert!(!ok && err.contains("the gateway is not running"), "{err}");
}

#[test]
fn cli_refuses_a_file_it_cannot_read_before_touching_the_database() {
    // Unreadability needs an account that permissions apply to: root reads everything.
    let dir = workdir();
    let file = dir.path().join("locked.db");
    fixture::old_era(&file);
    let mut command = Command::new(bin_path("omni-gateway"));
    command.args(["import-sqlite", file.to_str().unwrap()]).current_dir(dir.path()).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::{fs::PermissionsExt, process::CommandExt};
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        command.uid(65534).gid(65534);
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = command.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot read") && err.contains("nothing was written"), "{err}");
}

/// The worker answers 401 before reading a byte of the body; the connection
/// must still carry that answer to the client, every time, not a reset that
/// the gateway can only turn into 502.
#[test]
fn an_upload_refused_before_its_body_is_read_gets_its_answer_through_the_gateway_every_time() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let body = vec![0u8; 16 << 20];
    let statuses: Vec<u16> = (0..20)
        .map(|_| Request::new("POST", "/api/v1/migration/import").raw_body("application/octet-stream", body.clone()).send_to(gw.port).status)
        .collect();
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    // Over the upload limit by its declared length: not drained, answered, closed.
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "POST /api/v1/migration/import HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\nSQLite", 1u64 << 40).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 401"), "{}", String::from_utf8_lossy(&answer));
}
