//! Point-in-time recovery over HTTP, with the real gateway running:
//! `GET /api/v1/backup/window`, `POST /api/v1/backup/base` and
//! `POST /api/v1/backup/restore-to` (the worker asks the gateway on its
//! internal endpoints; the gateway stops PostgreSQL and the streamer, restores,
//! starts them again and answers once the service is back).

use crate::gateway;

use std::path::Path;
use std::time::Duration;

use gateway::{cli, post_slow, wait_for_base_backup, write_a_note_t_write_b, workdir, Gateway, GatewayBuilder};
use omni_tests::{wait_until, Request, TempPostgres, WorkerBuilder, TEST_API_KEY};

fn start(dir: &Path) -> Gateway {
    GatewayBuilder::new(dir).env("OMNI_API_KEY", TEST_API_KEY).start()
}

fn api(gw: &Gateway, method: &str, path: &str) -> omni_tests::Response {
    Request::new(method, path).api_key().send_to(gw.port)
}

#[test]
fn pitr_api_restore_to_a_time_while_the_gateway_runs() {
    let dir = workdir();
    let gw = start(dir.path());
    wait_for_base_backup(&gw);

    // The window over HTTP is the CLI's `restore --window`.
    let before = api(&gw, "GET", "/api/v1/backup/window");
    assert_eq!(before.status, 200, "{}", before.text());
    let (ok, out, err) = cli(dir.path(), &["restore", "--window"]);
    let after = api(&gw, "GET", "/api/v1/backup/window").json();
    let before = before.json();
    assert!(ok, "{out}{err}");
    let earliest = before["earliest"].as_str().expect("an earliest time").to_string();
    assert!(out.contains(&format!("from {earliest} to ")), "CLI: {out}\nAPI: {before}");
    let cli_latest = out.split(" to ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
    let (l0, l1) = (before["latest"].as_str().unwrap(), after["latest"].as_str().unwrap());
    assert!(l0 <= cli_latest.as_str() && cli_latest.as_str() <= l1, "the CLI's latest {cli_latest} lies between the API's {l0} and {l1}");
    assert_eq!(before["base_backups"][0]["verified"], true, "{before}");

    // A base backup on demand, verified, listed.
    let taken = api(&gw, "POST", "/api/v1/backup/base");
    assert_eq!(taken.status, 200, "{}\n{}", taken.text(), gw.log());
    let taken = taken.json();
    assert_eq!(taken["verified"], true);
    let listed = api(&gw, "GET", "/api/v1/backup/window").json();
    assert_eq!(listed["base_backups"][0]["id"], taken["id"], "newest first: {listed}");
    assert_eq!(listed["base_backups"].as_array().unwrap().len(), 2, "{listed}");

    // Bad requests lose nothing and say why.
    let outside = Request::new("POST", "/api/v1/backup/restore-to").api_key().json(&serde_json::json!({"target_time": "2001-01-01T00:00:00Z"})).send_to(gw.port);
    assert_eq!(outside.status, 400, "{}", outside.text());
    let detail = outside.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("outside the recoverable window") && detail.contains(&earliest), "the message gives the window: {detail}");
    let nonsense = Request::new("POST", "/api/v1/backup/restore-to").api_key().json(&serde_json::json!({"target_time": "yesterday"})).send_to(gw.port);
    assert_eq!((nonsense.status, nonsense.json()["code"].as_str().unwrap()), (400, "invalid_target_time"));
    let keyless = Request::new("POST", "/api/v1/backup/restore-to").json(&serde_json::json!({"target_time": "latest"})).send_to(gw.port);
    assert_eq!(keyless.status, 401);
    let internal = Request::new("POST", "/gateway/internal/pitr/restore-to").json(&serde_json::json!({"target_time": "latest"})).send_to(gw.port);
    assert_eq!(internal.status, 401, "the gateway's internal endpoints refuse a caller without the worker's secret");
    let forged = Request::new("GET", "/gateway/internal/pitr/window").header("x-omni-gateway-token", "a".repeat(48)).send_to(gw.port);
    assert_eq!(forged.status, 401);

    // Writes A, the time T, writes B.
    let t = write_a_note_t_write_b(&gw);
    let worker_pid = gw.pid_of("api");

    let port = gw.port;
    let target = t.clone();
    let restore = std::thread::spawn(move || post_slow(port, "/api/v1/backup/restore-to", &serde_json::json!({"target_time": target})));
    // Progress while it runs, and a second restore refused meanwhile.
    let mut steps = Vec::new();
    let mut refused_second = None;
    while !restore.is_finished() {
        // A monitor asking the worker's health meanwhile: its checks fail
        // while PostgreSQL is down, which must not hold back the first
        // request after the restore says it serves.
        let _ = Request::get("/api/v1/health").try_send(port);
        if let Ok(status) = Request::get("/gateway/status").try_send(port) {
            let r = status.json()["restore"].clone();
            if r["state"] == "running" {
                let step = format!("{} ({}%)", r["step"].as_str().unwrap_or(""), r["percent"]);
                if steps.last() != Some(&step) {
                    steps.push(step);
                }
                if refused_second.is_none() {
                    // The same target: were it not refused, the outcome would be the same.
                    let second = Request::new("POST", "/api/v1/backup/restore-to").api_key().json(&serde_json::json!({"target_time": t})).try_send(port);
                    refused_second = second.ok().map(|s| (s.status, s.text()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, answer) = restore.join().unwrap();
    println!("restore progress seen in /gateway/status: {steps:#?}\nanswer: {answer}");
    assert_eq!(status, 200, "{answer}\n{}", gw.log());
    assert_eq!(answer["serving"], true);
    assert!(answer["previous_data_dir"].as_str().unwrap().contains("before-restore"), "{answer}");
    assert!(steps.iter().any(|s| s.starts_with("replaying WAL") || s.starts_with("unpacking base backup")), "the status showed the restore's progress: {steps:?}");
    let (second_status, second_text) = refused_second.expect("a second restore was tried while the first ran");
    assert_eq!(second_status, 409, "{second_text}");
    assert!(second_text.contains("pitr_busy"), "{second_text}");

    // A present, B absent, the service back, the same worker process.
    assert_eq!(gw.get("/health").status, 200, "{}", gw.log());
    let mut db = gw.db();
    let mut count = |phase: &str| db.query_one("SELECT count(*) FROM pitr_rows WHERE phase = $1", &[&phase]).unwrap().get::<_, i64>(0);
    assert_eq!(count("A"), 50, "every write before {t} is back");
    assert_eq!(count("B"), 0, "no write after {t} is back");
    let prefs = Request::new("GET", "/api/v1/preferences").session("6f1c2a4e-8b7d-4c3a-9e5f-0a1b2c3d4e5f").send_to(port);
    assert_eq!(prefs.status, 200, "the API serves from the restored database: {}", prefs.text());
    assert_eq!(gw.pid_of("api"), worker_pid, "the worker stayed up through the restore");
    let status = gw.get("/gateway/status").json();
    assert_eq!(status["restore"]["state"], "done", "{status}");
    assert_eq!(status["restore"]["percent"], 100);
    // Streaming starts again on the new timeline, with a base backup of its own.
    wait_until(Duration::from_secs(120), "streaming to resume after the restore", || (gw.component("wal")["state"] == "ready").then_some(()));
    assert!(gw.log().contains("point-in-time restore to"), "the log tells the steps");
}

#[test]
fn pitr_api_a_restore_that_fails_midway_leaves_the_previous_data_serving() {
    let dir = workdir();
    let gw = start(dir.path());
    wait_for_base_backup(&gw);
    gw.db().batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)").unwrap();

    // The base backup's control file is damaged: PostgreSQL refuses to start on the copy.
    let base = dir.path().join("data/wal/base");
    let backup = std::fs::read_dir(&base).unwrap().flatten().find(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.')).unwrap().path();
    omni_tests::damage_in_archive(&backup.join("base.tar.lz4"), |name, _| name == "global/pg_control", 20);

    let (status, answer) = post_slow(gw.port, "/api/v1/backup/restore-to", &serde_json::json!({"target_time": "latest"}));
    assert_eq!(status, 500, "{answer}\n{}", gw.log());
    assert_eq!(answer["code"], "restore_failed");
    let detail = answer["detail"].as_str().unwrap();
    assert!(detail.contains("previous data directory is back") && detail.contains("serves the previous data again"), "{detail}");
    assert_eq!(gw.get("/health").status, 200, "{}", gw.log());
    let v: i32 = gw.db().query_one("SELECT v FROM kept", &[]).unwrap().get(0);
    assert_eq!(v, 42, "the data directory as it was serves again");
    assert_eq!(gw.get("/gateway/status").json()["restore"]["state"], "failed");
}

#[test]
fn pitr_api_without_a_wal_archive_answers_409_and_without_a_gateway_404() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("PGSERVE_MEMORY_MODE", "true").start();
    for (method, path) in [("GET", "/api/v1/backup/window"), ("POST", "/api/v1/backup/base")] {
        let r = api(&gw, method, path);
        assert_eq!((r.status, r.json()["code"].as_str().unwrap().to_string()), (409, "pitr_unavailable".to_string()), "{path}: {}", r.text());
        assert!(r.json()["detail"].as_str().unwrap().contains("PGSERVE_MEMORY_MODE"));
    }
    drop(gw);

    let pg = TempPostgres::start_new();
    let worker = WorkerBuilder::new(&pg.url()).start();
    let r = worker.request("GET", "/api/v1/backup/window").api_key().send();
    assert_eq!((r.status, r.json()["code"].as_str().unwrap().to_string()), (404, "no_gateway".to_string()), "{}", r.text());
}

/// `OMNI_WAL_DIR=off` (here from `.env`, as a user would write it): no
/// streamer, the slot an earlier run's streamer left is dropped (it would keep
/// WAL for nobody), the endpoints and commands say why there is nothing to
/// do, and `OMNI_WAL_SYNC=true` beside it is refused at start.
#[test]
fn pitr_off_runs_no_streamer_drops_the_leftover_slot_and_says_why() {
    let dir = workdir();
    let mut gw = start(dir.path());
    wait_for_base_backup(&gw);
    assert!(gw.terminate().success());

    std::fs::write(dir.path().join(".env"), "OMNI_WAL_DIR=off\n").unwrap();
    let gw = start(dir.path());
    let components = gw.get("/gateway/status").json()["components"].clone();
    assert!(components.as_array().unwrap().iter().all(|c| c["name"] != "wal"), "{components}");
    let mut db = gw.db();
    wait_until(Duration::from_secs(30), "the leftover slot omni_wal to be dropped", || {
        let n: i64 = db.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'omni_wal'", &[]).unwrap().get(0);
        (n == 0).then_some(())
    });
    // The log line follows the drop; the gateway writes it a moment later.
    wait_until(Duration::from_secs(10), "the drop of omni_wal to be logged", || gw.log().contains("dropped the replication slot omni_wal").then_some(()));
    for (method, path) in [("GET", "/api/v1/backup/window"), ("POST", "/api/v1/backup/base")] {
        let r = api(&gw, method, path);
        assert_eq!(r.status, 409, "{path}: {}", r.text());
        assert!(r.json()["detail"].as_str().unwrap().contains("OMNI_WAL_DIR=off"), "{}", r.text());
    }
    let (ok, _, err) = cli(dir.path(), &["backup", "base"]);
    assert!(!ok && err.contains("OMNI_WAL_DIR=off"), "{err}");
    drop(gw);
    let (ok, _, err) = cli(dir.path(), &["restore", "--to", "latest"]);
    assert!(!ok && err.contains("OMNI_WAL_DIR=off"), "{err}");

    let (status, log) = GatewayBuilder::new(dir.path()).env("OMNI_WAL_SYNC", "true").run_to_exit();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("OMNI_WAL_SYNC") && log.contains("OMNI_WAL_DIR=off"), "{log}");
}
