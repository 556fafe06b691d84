//! Restores you can bet on, with the real gateway, real PostgreSQL and
//! real kills: a restore from the WAL archive alone after the data
//! directory's disk (the directory and every file beside it) is lost; a
//! restore killed (`kill -9`) at each of its steps, after which a start
//! serves either the data as it was or the restored data, checked row by
//! row, never an empty cluster; and an online restore to `latest` under
//! write load that loses no acknowledged write.

use crate::gateway;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use gateway::{cli, postgres_pids_on, try_post_slow, wait_for_base_backup, workdir, write_a_note_t_write_b, Gateway, GatewayBuilder};
use omni_tests::{bin_path, pg_bin_dir, wait_until, ChildGuard, TEST_API_KEY};

/// The ids of `pitr_rows` the gateway's cluster holds.
fn rows(gw: &Gateway) -> BTreeSet<i32> {
    gw.db().query("SELECT id FROM pitr_rows", &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// What `write_a_note_t_write_b` wrote: A (ids 0..50) and B (50..100).
fn a_and_b() -> BTreeSet<i32> {
    (0..100).collect()
}

/// Only A: a restore to T.
fn only_a() -> BTreeSet<i32> {
    (0..50).collect()
}

/// Every file or directory beside `data/postgres` that belongs to it (`postgres*`).
fn siblings_of_the_data_dir(cwd: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(cwd.join("data")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("postgres")).collect();
    names.sort();
    names
}

#[test]
fn pitr_recovery_the_archive_alone_restores_after_the_data_disk_is_lost() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    write_a_note_t_write_b(&gw);
    assert!(gw.terminate().success(), "{}", gw.log());

    // The disk of the data directory is gone: the directory and everything beside it.
    let lost = siblings_of_the_data_dir(dir.path());
    assert!(lost.contains(&"postgres.password".to_string()), "{lost:?}");
    lose_the_data_disk(dir.path());

    let (ok, out, err) = cli(dir.path(), &["restore", "--to", "latest"]);
    assert!(ok, "a restore needs nothing but OMNI_WAL_DIR:\n{out}\n{err}");
    let password = std::fs::read_to_string(dir.path().join("data/postgres.password")).expect("the restore writes a new password file");
    assert_eq!(password.trim().len(), 32);

    let gw = GatewayBuilder::new(dir.path()).start();
    assert_eq!(rows(&gw), a_and_b(), "every row is back\n{}", gw.log());
    // The worker serves the restored cluster with the new password.
    let api = gw.component("api");
    assert_eq!(api["state"], "ready", "{api}");
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "{}", health.text());
}

/// `omni-gateway restore --to <to>` in `cwd`, held at `step` by the test hook.
fn restore_held_at(cwd: &Path, to: &str, step: &str) -> ChildGuard {
    let log = std::fs::File::create(cwd.join(format!("restore-{step}.log"))).unwrap();
    let mut command = std::process::Command::new(bin_path("omni-gateway"));
    command
        .args(["restore", "--to", to])
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", pg_bin_dir())
        .env("LOG_LEVEL", "info")
        .env("OMNI_TEST_HOLD_RESTORE_STEP", step)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    ChildGuard::spawn(&mut command)
}

/// Waits until a restore holds at `step` (it wrote `data/postgres.restore.held`).
fn wait_held(cwd: &Path, step: &str) {
    let held = cwd.join("data/postgres.restore.held");
    wait_until(Duration::from_secs(180), &format!("the restore to hold at {step}"), || (std::fs::read_to_string(&held).ok()? == step).then_some(()));
}

/// After the kill, a start serves `expected`; nothing of the restore is left behind.
fn start_and_check(cwd: &Path, step: &str, expected: &BTreeSet<i32>) {
    let gw = GatewayBuilder::new(cwd).start();
    let got = rows(&gw);
    assert_eq!(&got, expected, "killed at {step}: the start serves {} rows, expected {}\n{}", got.len(), expected.len(), gw.log());
    let left: Vec<String> = siblings_of_the_data_dir(cwd).into_iter().filter(|n| n.contains(".restoring-") || n.contains(".restore.")).collect();
    assert!(left.is_empty(), "killed at {step}: left behind {left:?}");
}

/// Kills `omni-gateway restore` held at `step`; the next start serves the old
/// data (A and B) or the restored one (A only), as `restored` says.
fn kill_the_cli_restore_at(step: &str, restored: bool) {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    let t = write_a_note_t_write_b(&gw);
    assert!(gw.terminate().success(), "{}", gw.log());
    drop(gw);

    let mut restore = restore_held_at(dir.path(), &t, step);
    wait_held(dir.path(), step);
    restore.kill9();
    let data_dir = dir.path().join("data/postgres");
    wait_until(Duration::from_secs(30), "the restore's postgres to be gone", || {
        let staging: Vec<_> = siblings_of_the_data_dir(dir.path()).into_iter().filter(|n| n.contains(".restoring-")).map(|n| dir.path().join("data").join(n)).collect();
        staging.iter().all(|s| postgres_pids_on(s).is_empty()).then_some(())
    });
    assert!(postgres_pids_on(&data_dir).is_empty());
    let expected = if restored { only_a() } else { a_and_b() };
    start_and_check(dir.path(), step, &expected);
}

#[test]
fn pitr_recovery_killed_once_the_base_backup_is_unpacked_keeps_the_old_data() {
    kill_the_cli_restore_at("copied", false);
}

#[test]
fn pitr_recovery_killed_with_the_recovered_server_running_keeps_the_old_data() {
    kill_the_cli_restore_at("promoted", false);
}

#[test]
fn pitr_recovery_killed_once_recovered_finishes_the_restore() {
    kill_the_cli_restore_at("recovered", true);
}

#[test]
fn pitr_recovery_killed_between_the_two_renames_finishes_the_restore() {
    kill_the_cli_restore_at("swapping", true);
}

#[test]
fn pitr_recovery_killed_before_the_stream_is_retired_finishes_the_restore() {
    kill_the_cli_restore_at("swapped", true);
}

/// The gateway itself, restoring online (`POST /api/v1/backup/restore-to`),
/// is killed at `step`; the next start serves the old or the restored data.
fn kill_the_online_restore_at(step: &str, restored: bool) {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_TEST_HOLD_RESTORE_STEP", step).start();
    wait_for_base_backup(&gw);
    let t = write_a_note_t_write_b(&gw);
    let port = gw.port;
    let asked = std::thread::spawn(move || try_post_slow(port, "/api/v1/backup/restore-to", &serde_json::json!({ "target_time": t })));
    wait_held(dir.path(), step);
    let data_dir = gw.data_dir();
    gw.child.kill9();
    let _ = asked.join();
    wait_until(Duration::from_secs(30), "every postgres of the killed gateway to be gone", || {
        let staging: Vec<_> = siblings_of_the_data_dir(dir.path()).into_iter().filter(|n| n.contains(".restoring-")).map(|n| dir.path().join("data").join(n)).collect();
        (postgres_pids_on(&data_dir).is_empty() && staging.iter().all(|s| postgres_pids_on(s).is_empty())).then_some(())
    });
    drop(gw);
    let expected = if restored { only_a() } else { a_and_b() };
    start_and_check(dir.path(), step, &expected);
}

#[test]
fn pitr_recovery_gateway_killed_during_an_online_recovery_keeps_the_old_data() {
    kill_the_online_restore_at("promoted", false);
}

#[test]
fn pitr_recovery_gateway_killed_between_the_two_renames_of_an_online_restore_finishes_it() {
    kill_the_online_restore_at("swapping", true);
}

/// Every data-directory file beside `data/postgres` deleted: its disk is gone.
fn lose_the_data_disk(cwd: &Path) {
    for name in siblings_of_the_data_dir(cwd) {
        let path = cwd.join("data").join(name);
        if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }.unwrap();
    }
}

/// A clean stop while clients still write: every write PostgreSQL
/// acknowledged before it stopped is in the archive (the streamer stops
/// after PostgreSQL, so it receives the last commits and the shutdown
/// checkpoint), and the archive alone brings each of them back.
#[test]
fn pitr_recovery_a_clean_stop_under_write_load_leaves_every_acknowledged_write_in_the_archive() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    let writer = write_load(&gw);
    assert!(gw.terminate().success(), "{}", gw.log());
    let acked = writer.join().unwrap();
    let log = gw.log();

    lose_the_data_disk(dir.path());
    let (ok, out, err) = cli(dir.path(), &["restore", "--to", "latest"]);
    assert!(ok, "{out}\n{err}");
    let gw = GatewayBuilder::new(dir.path()).start();
    let present: BTreeSet<i32> = gw.db().query("SELECT id FROM pitr_load", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let lost: Vec<i32> = acked.iter().copied().filter(|id| !present.contains(id)).collect();
    println!("a clean stop under load: {} writes acknowledged, {} restored from the archive alone, {} lost", acked.len(), present.len(), lost.len());
    assert!(acked.len() > 1000, "the load ran");
    assert!(lost.is_empty(), "{} writes acknowledged before the stop are not in the archive: {lost:?}\n{log}", lost.len());
}

/// A writer committing one row of `pitr_load` at a time until its
/// connection fails, once it has written 1,000; joined, it gives the
/// acknowledged ids.
fn write_load(gw: &Gateway) -> std::thread::JoinHandle<Vec<i32>> {
    gw.db().batch_execute("CREATE TABLE pitr_load (id int PRIMARY KEY)").unwrap();
    let writer = {
        let db = gw.db();
        std::thread::spawn(move || write_until_refused(db))
    };
    let mut db = gw.db();
    wait_until(Duration::from_secs(60), "some write load", || (db.query_one("SELECT count(*) FROM pitr_load", &[]).unwrap().get::<_, i64>(0) > 1000).then_some(()));
    writer
}

/// Writes one row per commit until the connection fails; returns the
/// acknowledged ids.
fn write_until_refused(mut db: postgres::Client) -> Vec<i32> {
    let mut acked = Vec::new();
    for i in 0.. {
        match db.execute("INSERT INTO pitr_load VALUES ($1)", &[&i]) {
            Ok(_) => acked.push(i),
            Err(_) => break,
        }
    }
    acked
}

fn online_latest_restore_under_load(sync: bool) {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_WAL_SYNC", sync.to_string()).start();
    wait_for_base_backup(&gw);
    let writer = write_load(&gw);
    let asked_at = Instant::now();
    let (status, answer) = try_post_slow(gw.port, "/api/v1/backup/restore-to", &serde_json::json!({ "target_time": "latest" })).unwrap();
    assert_eq!(status, 200, "{answer}\n{}", gw.log());
    let acked = writer.join().unwrap();
    let present: BTreeSet<i32> = gw.db().query("SELECT id FROM pitr_load", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let lost: Vec<i32> = acked.iter().copied().filter(|id| !present.contains(id)).collect();
    // Ids are written in order: how far from the last acknowledged write each lost one was.
    let last = acked.last().copied().unwrap_or(0);
    let behind: Vec<i32> = lost.iter().map(|id| last - id).collect();
    println!(
        "online restore to latest, OMNI_WAL_SYNC={sync}: {} writes acknowledged, {} restored, {} acknowledged writes lost (writes before the last acknowledged one: {:?}); restore took {:.1} s",
        acked.len(),
        present.len(),
        lost.len(),
        behind,
        asked_at.elapsed().as_secs_f64()
    );
    assert!(acked.len() > 1000, "the load ran");
    assert!(lost.is_empty(), "OMNI_WAL_SYNC={sync}: {} acknowledged writes are missing after a restore to latest: {lost:?}\n{}", lost.len(), gw.log());
}

#[test]
fn pitr_recovery_online_latest_restore_under_load_loses_no_acknowledged_write_with_wal_sync() {
    online_latest_restore_under_load(true);
}

#[test]
fn pitr_recovery_online_latest_restore_under_load_loses_no_acknowledged_write_without_wal_sync() {
    online_latest_restore_under_load(false);
}
