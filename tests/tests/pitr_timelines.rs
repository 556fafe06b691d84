//! Point-in-time recovery across timelines: every restore starts a new
//! timeline, and a later restore must replay the history that served at its
//! target time (or the one asked for), never the newest one blindly;
//! retention keeps the WAL each kept base backup needs on its own timeline.
//! Real gateway, real PostgreSQL, real restores (over HTTP and the CLI).

use crate::gateway;

use std::path::Path;
use std::time::Duration;

use gateway::{cli, post_slow, wait_archived, wait_for_base_backup, workdir, Gateway, GatewayBuilder};
use omni_tests::{wait_until, Request, TEST_API_KEY};

fn start(dir: &Path) -> Gateway {
    GatewayBuilder::new(dir).env("OMNI_API_KEY", TEST_API_KEY).start()
}

/// The server's clock now (commit times are stamped with it), RFC 3339.
fn now(db: &mut postgres::Client) -> String {
    db.query_one(r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#, &[]).unwrap().get(0)
}

/// 50 rows of `phase`, archived by the streamer before this returns.
fn write(db: &mut postgres::Client, phase: &str) {
    for i in 0..50 {
        db.execute("INSERT INTO tl_rows (phase, n) VALUES ($1, $2)", &[&phase, &i]).unwrap();
    }
    wait_archived(db);
}

fn count(gw: &Gateway, phase: &str) -> i64 {
    gw.db().query_one("SELECT count(*) FROM tl_rows WHERE phase = $1", &[&phase]).unwrap().get(0)
}

fn restore_online(gw: &Gateway, body: serde_json::Value) -> serde_json::Value {
    let (status, answer) = post_slow(gw.port, "/api/v1/backup/restore-to", &body);
    assert_eq!(status, 200, "restore {body}: {answer}\n{}", gw.log());
    assert_eq!(answer["serving"], true, "{answer}");
    answer
}

fn restore_cli(dir: &Path, args: &[&str]) -> String {
    let (ok, out, err) = cli(dir, args);
    assert!(ok, "omni-gateway {args:?} failed:\n{out}\n{err}");
    out
}

/// The `base/<id>.json` records, oldest first.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut all: Vec<serde_json::Value> = std::fs::read_dir(dir.join("data/wal/base"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    all.sort_by(|a, b| a["finished_at"].as_str().cmp(&b["finished_at"].as_str()));
    all
}

/// Waits for a verified base backup taken on `timeline` (the streamer asks
/// for one when a restore started a new timeline).
fn wait_for_base_backup_on(dir: &Path, timeline: u64) {
    wait_until(Duration::from_secs(180), &format!("a base backup on timeline {timeline}"), || records(dir).iter().any(|r| r["timeline"] == timeline).then_some(()));
}

#[test]
fn pitr_a_second_restore_replays_the_timeline_that_served_at_its_target() {
    let dir = workdir();
    let mut gw = start(dir.path());
    wait_for_base_backup(&gw);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE tl_rows (id serial PRIMARY KEY, phase text NOT NULL, n int NOT NULL)").unwrap();
    wait_archived(&mut db);
    let before_a = now(&mut db);
    write(&mut db, "A");
    let after_a = now(&mut db);
    // Some commit after `after_a` on timeline 1, so a restore to it reaches its target.
    db.batch_execute("CREATE TABLE tl_marker (v int); INSERT INTO tl_marker VALUES (1)").unwrap();
    wait_archived(&mut db);
    drop(db);

    // Restore to before A, online: timeline 2.
    let first = restore_online(&gw, serde_json::json!({"target_time": before_a}));
    assert_eq!(first["timeline"], 1, "a time before any restore replays timeline 1: {first}");
    assert_eq!(count(&gw, "A"), 0, "A came after {before_a}");
    // B, right after the restore (before timeline 2 has a base backup of its own).
    let mut db = gw.db();
    write(&mut db, "B");
    drop(db);
    let window = Request::new("GET", "/api/v1/backup/window").api_key().send_to(gw.port).json();
    assert_eq!(window["timeline"], 2, "{window}");
    let timelines: Vec<u64> = window["timelines"].as_array().unwrap().iter().map(|t| t["timeline"].as_u64().unwrap()).collect();
    assert_eq!(timelines, [2, 1], "{window}");
    assert!(window["timelines"][0]["began_at"].as_str().is_some(), "{window}");
    wait_for_base_backup_on(dir.path(), 2);
    assert!(gw.terminate().success(), "{}", gw.log());

    // The CLI names each timeline's window.
    let out = restore_cli(dir.path(), &["restore", "--window"]);
    assert!(out.contains("on timeline 2") && out.contains("timeline 1: serving from the start"), "{out}");
    // A time between A and the first restore: timeline 1 served then.
    let out = restore_cli(dir.path(), &["restore", "--to", &after_a]);
    assert!(out.contains("WAL of timeline 1"), "{out}");
    let gw = start(dir.path());
    assert_eq!(count(&gw, "A"), 50, "every write of A (timeline 1, before {after_a}) is back\n{}", gw.log());
    assert_eq!(count(&gw, "B"), 0, "B (timeline 2) was never on timeline 1's history");

    // An unknown timeline is refused and changes nothing.
    let (status, answer) = post_slow(gw.port, "/api/v1/backup/restore-to", &serde_json::json!({"target_time": "latest", "timeline": 99}));
    assert_eq!((status, answer["code"].as_str()), (422, Some("unknown_timeline")), "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("timelines 1, 2, 3"), "{answer}");
    let (status, answer) = post_slow(gw.port, "/api/v1/backup/restore-to", &serde_json::json!({"target_time": "latest", "timeline": 0}));
    assert_eq!((status, answer["code"].as_str()), (400, Some("invalid_timeline")), "{answer}");
    assert_eq!(count(&gw, "A"), 50);

    // `latest` on timeline 2: B back, A gone again.
    let third = restore_online(&gw, serde_json::json!({"target_time": "latest", "timeline": 2}));
    assert_eq!(third["timeline"], 2, "{third}");
    assert_eq!(count(&gw, "B"), 50, "every write of B (timeline 2) is back\n{}", gw.log());
    assert_eq!(count(&gw, "A"), 0, "A is not on timeline 2's history");

    // Every kept base backup restores, on the newest timeline it leads into
    // (timeline 4's own, which the streamer asks for, included).
    wait_for_base_backup_on(dir.path(), 4);
    let kept = records(dir.path()).len();
    let (ok, out, err) = cli(dir.path(), &["backup", "drill", "--all"]);
    assert!(ok, "{out}\n{err}");
    assert!(kept >= 2, "backups of timelines 1 and 2 at least: {kept}");
    assert_eq!(out.matches("restore drill passed").count(), kept, "{out}");
}

/// Moves a base backup's recorded end into the past, as if it were that old.
fn age(gw: &Gateway, dir: &Path, id: &str, hours: i32) {
    let path = dir.join(format!("data/wal/base/{id}.json"));
    let mut record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let q = r#"SELECT to_char((clock_timestamp() - make_interval(hours => $1)) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#;
    let old: String = gw.db().query_one(q, &[&hours]).unwrap().get(0);
    record["finished_at"] = old.clone().into();
    record["started_at"] = old.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
}

#[test]
fn pitr_retention_after_a_fork_keeps_the_wal_every_kept_base_backup_needs() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_PITR_WINDOW", "1h").start();
    wait_for_base_backup(&gw);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE tl_rows (id serial PRIMARY KEY, phase text NOT NULL, n int NOT NULL)").unwrap();
    write(&mut db, "A");
    let fork = now(&mut db);
    // Timeline 1 runs on well past the fork, then gets a second base backup there.
    write(&mut db, "B");
    for _ in 0..4 {
        db.batch_execute("SELECT pg_switch_wal(); INSERT INTO tl_rows (phase, n) VALUES ('B', -1)").unwrap();
    }
    wait_archived(&mut db);
    drop(db);
    let taken = Request::new("POST", "/api/v1/backup/base").api_key().send_to(gw.port);
    assert_eq!(taken.status, 200, "{}", taken.text());

    // Back to the fork: timeline 2 starts at a lower WAL position than that backup.
    restore_online(&gw, serde_json::json!({"target_time": fork}));
    let mut db = gw.db();
    write(&mut db, "C");
    drop(db);
    wait_for_base_backup_on(dir.path(), 2);
    let mut db = gw.db();
    write(&mut db, "D");
    drop(db);

    // Both timeline-1 backups are older than the window: retention keeps,
    // for each timeline that served inside it, the newest one before it.
    let before = records(dir.path());
    assert!(before.len() >= 3, "two base backups on timeline 1, one on timeline 2: {before:#?}");
    for (record, hours) in before.iter().take(2).zip([3, 2]) {
        assert_eq!(record["timeline"], 1, "{record}");
        age(&gw, dir.path(), record["id"].as_str().unwrap(), hours);
    }
    let taken = Request::new("POST", "/api/v1/backup/base").api_key().send_to(gw.port);
    assert_eq!(taken.status, 200, "a base backup, then retention: {}", taken.text());
    let kept = records(dir.path());
    println!("kept after retention: {:?}", kept.iter().map(|r| (r["id"].as_str().unwrap().to_string(), r["timeline"].clone())).collect::<Vec<_>>());

    // Every kept backup restores with the WAL after it ...
    let (ok, out, err) = cli(dir.path(), &["backup", "drill", "--all"]);
    assert!(ok, "{out}\n{err}\n{}", gw.log());
    assert_eq!(out.matches("restore drill passed").count(), kept.len(), "{out}");
    // ... and timeline 2's latest point holds everything written on it.
    let answer = restore_online(&gw, serde_json::json!({"target_time": "latest"}));
    assert_eq!(answer["timeline"], 2, "{answer}");
    for (phase, n) in [("A", 50), ("B", 0), ("C", 50), ("D", 50)] {
        assert_eq!(count(&gw, phase), n, "phase {phase} after the restore to latest\n{}", gw.log());
    }
}
