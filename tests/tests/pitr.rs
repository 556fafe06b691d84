//! Point-in-time recovery end to end: the real gateway streams WAL with
//! `pg_receivewal` into `./data/wal`, takes its first base backup, and
//! `omni-gateway restore --to <time|latest>` (gateway stopped) brings the
//! data back.

use crate::gateway;

use std::path::Path;
use std::time::{Duration, Instant};

use omni_tests::wait_until;
use gateway::{cli, wait_for_base_backup, write_a_note_t_write_b, workdir, GatewayBuilder};

fn restore(cwd: &Path, to: &str) -> String {
    let (ok, stdout, stderr) = cli(cwd, &["restore", "--to", to]);
    assert!(ok, "omni-gateway restore --to {to} failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn pitr_restore_to_a_time_keeps_what_came_before_and_drops_what_came_after() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    let metrics = gw.get("/metrics").text();
    for gauge in ["omni_wal_newest_archived_age_seconds", "omni_wal_newest_base_backup_age_seconds", "omni_child_state{component=\"wal\",state=\"ready\"} 1"] {
        assert!(metrics.contains(gauge), "/metrics lacks {gauge}:\n{metrics}");
    }
    let t = write_a_note_t_write_b(&gw);
    assert!(gw.terminate().success(), "{}", gw.log());

    let out = restore(dir.path(), &t);
    assert!(out.contains("before-restore"), "the old data directory is kept and named: {out}");

    let gw = GatewayBuilder::new(dir.path()).start();
    let mut db = gw.db();
    let mut count = |phase: &str| db.query_one("SELECT count(*) FROM pitr_rows WHERE phase = $1", &[&phase]).unwrap().get::<_, i64>(0);
    assert_eq!(count("A"), 50, "every write before {t} is back\n{}", gw.log());
    assert_eq!(count("B"), 0, "no write after {t} is back");
}

/// Writes one row per commit until `kill` says stop; returns each id with the
/// moment its commit was acknowledged.
fn write_load(mut db: postgres::Client, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<(i32, Instant)> {
    let mut acked = Vec::new();
    for i in 0.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        match db.execute("INSERT INTO pitr_load VALUES ($1)", &[&i]) {
            Ok(_) => acked.push((i, Instant::now())),
            Err(_) => break,
        }
    }
    acked
}

fn lose_everything_then_restore_latest(sync: bool) {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_WAL_SYNC", sync.to_string()).start();
    wait_for_base_backup(&gw);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE pitr_load (id int PRIMARY KEY)").unwrap();
    drop(db);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (db, stop) = (gw.db(), stop.clone());
        std::thread::spawn(move || write_load(db, stop))
    };
    // A few seconds of load, then everything dies at once.
    wait_until(Duration::from_secs(30), "two seconds of write load", || {
        std::thread::sleep(Duration::from_millis(100));
        (gw.db().query_one("SELECT count(*) FROM pitr_load", &[]).unwrap().get::<_, i64>(0) > 200).then_some(())
    });
    let data_dir = gw.data_dir();
    let killed_at = gateway::kill9_with_its_postgres(&mut gw);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.join().unwrap();
    gateway::wait_postgres_gone(&data_dir);
    std::fs::remove_dir_all(&data_dir).unwrap();

    restore(dir.path(), "latest");
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_WAL_SYNC", sync.to_string()).start();
    let present: std::collections::HashSet<i32> = gw.db().query("SELECT id FROM pitr_load", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    // Every acknowledged write is counted; for each lost one, how long
    // before the kill was sent its commit was acknowledged (0 when the
    // acknowledgement came while the kill was under way).
    let lost: Vec<Duration> = acked.iter().filter(|(id, _)| !present.contains(id)).map(|(_, at)| killed_at.saturating_duration_since(*at)).collect();
    let ms: Vec<u128> = lost.iter().map(|d| d.as_millis()).collect();
    println!(
        "OMNI_WAL_SYNC={sync}: {} writes acknowledged, {} restored, {} acknowledged writes lost; acknowledged this many ms before the kill: {}",
        acked.len(),
        present.len(),
        lost.len(),
        if ms.is_empty() { "-".to_string() } else { format!("min {} / median {} / max {}", ms[ms.len() - 1], ms[ms.len() / 2], ms[0]) }
    );
    assert!(!acked.is_empty() && present.len() > 200, "the load ran and came back");
    if sync {
        assert!(lost.is_empty(), "with OMNI_WAL_SYNC=true no acknowledged write is lost; {} were", lost.len());
    }
}

#[test]
fn pitr_restore_latest_after_losing_the_data_directory_reports_what_it_lost() {
    lose_everything_then_restore_latest(false);
}

#[test]
fn pitr_restore_latest_with_wal_sync_loses_nothing() {
    lose_everything_then_restore_latest(true);
}

/// The directory of the one base backup the first start took.
fn only_base_backup(cwd: &Path) -> std::path::PathBuf {
    let base = cwd.join("data/wal/base");
    let dirs: Vec<_> = std::fs::read_dir(&base).unwrap().flatten().filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.')).map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

#[test]
fn pitr_the_drill_passes_on_a_good_base_backup_and_fails_loudly_on_a_corrupted_one() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    assert!(gw.terminate().success());

    let (ok, out, err) = cli(dir.path(), &["backup", "verify"]);
    assert!(ok && out.contains("restore drill passed"), "{out}{err}");

    // A data file damaged inside the compressed archive, which itself stays
    // readable: only the manifest's checksums can tell.
    let backup = only_base_backup(dir.path());
    let damaged = omni_tests::damage_in_archive(&backup.join("base.tar.lz4"), |name, data| name.starts_with("base/") && data.len() > 8192, 100);
    let (ok, out, err) = cli(dir.path(), &["backup", "verify"]);
    assert!(!ok, "a corrupted backup must fail the drill: {out}");
    assert!(err.contains("restore drill FAILED") && err.contains(&format!("{damaged} in ")) && err.contains("does not match its manifest"), "{err}");
    let recorded: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("data/wal/drill.json")).unwrap()).unwrap();
    assert_eq!(recorded["ok"], false, "{recorded}");
}

#[test]
fn pitr_a_restore_that_fails_midway_puts_the_previous_data_directory_back() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    gw.db().batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)").unwrap();
    assert!(gw.terminate().success());

    // The backup's control file is damaged: PostgreSQL refuses to start on the copy.
    let backup = only_base_backup(dir.path());
    omni_tests::damage_in_archive(&backup.join("base.tar.lz4"), |name, _| name == "global/pg_control", 20);
    let (ok, out, err) = cli(dir.path(), &["restore", "--to", "latest"]);
    assert!(!ok, "{out}");
    assert!(err.contains("previous data directory is back"), "{err}");

    let gw = GatewayBuilder::new(dir.path()).start();
    let v: i32 = gw.db().query_one("SELECT v FROM kept", &[]).unwrap().get(0);
    assert_eq!(v, 42, "the data directory as it was serves again");
}

#[test]
fn pitr_a_scheduled_drill_restores_the_newest_base_backup_and_shows_in_metrics() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_BACKUP_DRILL_INTERVAL", "3s").start();
    wait_for_base_backup(&gw);
    let drill = dir.path().join("data/wal/drill.json");
    let recorded = wait_until(Duration::from_secs(120), "a scheduled drill to be recorded", || {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&drill).ok()?).ok()?;
        Some(json)
    });
    assert_eq!(recorded["ok"], true, "{recorded}\n{}", gw.log());
    assert!(recorded["app_tables"].as_i64().unwrap() > 0, "{recorded}");
    let metrics = gw.get("/metrics").text();
    assert!(metrics.contains("omni_wal_last_good_drill_age_seconds"), "{metrics}");
    assert!(gw.log().contains("restore drill passed"), "the drill says what it did in the log");
}
