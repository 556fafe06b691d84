//! Point-in-time recovery across a major upgrade and across an archive that
//! does not match the server: a PostgreSQL 15 gateway streams WAL into
//! `./data/wal`, is upgraded to 17 at start, and the archive of the old
//! cluster moves whole to `data/wal/generations/` (never overwritten by the
//! new cluster's segments of the same names); a restore to a time after the
//! upgrade comes from the new archive (17), one to a time before it from the
//! old generation with the PostgreSQL 15 binaries. A `stream/` the server
//! cannot continue (its WAL removed while no slot kept it, or the archive
//! of another cluster) is set aside and streaming comes back with a new
//! base backup.

use crate::gateway;

use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway::{cli_env, wait_archived, wait_for_base_backup, workdir, Gateway, GatewayBuilder};
use omni_tests::{pg17_bin_dir, wait_until};

const PG15: &str = "/usr/lib/postgresql/15/bin";

fn pg17() -> String {
    pg17_bin_dir().display().to_string()
}

/// The server's clock now, as RFC 3339 (commit times are stamped with it).
fn server_now(db: &mut postgres::Client) -> String {
    db.query_one(r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#, &[]).unwrap().get(0)
}

/// Inserts `n` rows of `phase` into `phases`, one commit each.
fn write(db: &mut postgres::Client, phase: &str, n: usize) {
    for _ in 0..n {
        db.execute("INSERT INTO phases (phase) VALUES ($1)", &[&phase]).unwrap();
    }
}

/// Rows of `phase` in `phases`.
fn count(gw: &Gateway, phase: &str) -> i64 {
    gw.db().query_one("SELECT count(*) FROM phases WHERE phase = $1", &[&phase]).unwrap_or_else(|e| panic!("{e}\n{}", gw.log())).get(0)
}

/// The newest segment file of a stream directory.
fn newest_segment(stream: &Path) -> PathBuf {
    let mut names: Vec<PathBuf> = std::fs::read_dir(stream)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().len() >= 24 && !p.file_name().unwrap().to_string_lossy().contains("history"))
        .collect();
    names.sort_by_key(|p| p.file_name().unwrap().to_string_lossy()[8..24].to_string());
    names.pop().unwrap_or_else(|| panic!("no segment in {}", stream.display()))
}

/// The generation directories of an archive.
fn generations(wal: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(wal.join("generations")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs
}

fn identity(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("identity.json")).unwrap_or_else(|e| panic!("{}/identity.json: {e}", dir.display()))).unwrap()
}

/// Verified base backups recorded in `wal/base`.
fn base_backups(wal: &Path) -> usize {
    std::fs::read_dir(wal.join("base")).into_iter().flatten().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count()
}

fn major(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("PG_VERSION")).ok()?.trim().parse().ok()
}

/// `omni-gateway restore --to <to>` with the gateway's binaries in `bin`.
fn restore(cwd: &Path, bin: &str, to: &str) -> String {
    let (ok, stdout, stderr) = cli_env(cwd, &["restore", "--to", to], &[("PGSERVE_BIN_DIR", bin.to_string())]);
    assert!(ok, "omni-gateway restore --to {to} failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn pitr_across_a_major_upgrade_restores_after_it_with_17_and_before_it_with_15() {
    let dir = workdir();
    let (wal, data) = (dir.path().join("data/wal"), dir.path().join("data/postgres"));

    // PostgreSQL 15: a base backup, then rows on both sides of T1.
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", PG15).start();
    wait_for_base_backup(&gw);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE phases (id serial PRIMARY KEY, phase text NOT NULL)").unwrap();
    write(&mut db, "15-before-t1", 30);
    let t1 = server_now(&mut db);
    write(&mut db, "15-after-t1", 30);
    wait_archived(&mut db);
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());
    let old_identity = identity(&wal);
    assert_eq!(old_identity["major"], 15, "{old_identity}");
    let last = newest_segment(&wal.join("stream"));
    let last_bytes = std::fs::read(&last).unwrap();

    // PostgreSQL 17: the start upgrades the cluster; the old archive moves to generations/.
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", pg17()).start();
    assert_eq!(major(&data), Some(17), "{}", gw.log());
    wait_for_base_backup(&gw);
    let log = gw.log();
    assert!(log.contains("upgrade done") && log.contains("held the archive of another cluster"), "{log}");
    let mut db = gw.db();
    write(&mut db, "17-before-t2", 30);
    let t2 = server_now(&mut db);
    write(&mut db, "17-after-t2", 30);
    wait_archived(&mut db);
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());

    let generations = generations(&wal);
    assert_eq!(generations.len(), 1, "{generations:?}");
    let old = &generations[0];
    let name = old.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with(&format!("-pg15-{}", old_identity["system_identifier"].as_str().unwrap())), "{name}");
    assert_eq!(identity(old), old_identity, "the generation keeps the old cluster's identity");
    let new_identity = identity(&wal);
    assert_eq!(new_identity["major"], 17, "{new_identity}");
    assert_ne!(new_identity["system_identifier"], old_identity["system_identifier"]);
    // The old cluster's last segment is intact, byte for byte, in its generation.
    let kept = old.join("stream").join(last.file_name().unwrap());
    assert!(std::fs::read(&kept).unwrap() == last_bytes, "{} changed after the upgrade", kept.display());
    assert!(base_backups(old) >= 1 && base_backups(&wal) >= 1, "each generation has its own base backups");
    let (_, window, _) = cli_env(dir.path(), &["restore", "--window"], &[("PGSERVE_BIN_DIR", pg17())]);
    assert!(window.contains("earlier generation") && window.contains("PostgreSQL 15 cluster"), "{window}");

    // A time after the upgrade: the new archive, PostgreSQL 17.
    restore(dir.path(), &pg17(), &t2);
    assert_eq!(major(&data), Some(17));
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", pg17()).start();
    assert_eq!((count(&gw, "15-before-t1"), count(&gw, "15-after-t1")), (30, 30), "the upgraded rows are there");
    assert_eq!((count(&gw, "17-before-t2"), count(&gw, "17-after-t2")), (30, 0), "up to {t2} and no further");
    assert!(gw.terminate().success(), "{}", gw.log());

    // A time before the upgrade: the old generation, with the PostgreSQL 15 binaries.
    let out = restore(dir.path(), &pg17(), &t1);
    assert!(out.contains("archive of the earlier PostgreSQL 15 cluster") && out.contains(PG15), "{out}");
    assert!(out.contains("now holds a PostgreSQL 15 cluster"), "says what happens next: {out}");
    assert_eq!(major(&data), Some(15), "the old major is restored");
    // The newer binaries would upgrade it again; the copy the first upgrade kept is in the way, and the refusal says so.
    let (status, log) = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", pg17()).run_to_exit();
    assert!(!status.success() && log.contains(".pg15 already exists") && log.contains("upgrade --cleanup"), "{log}");
    assert_eq!(major(&data), Some(15), "the refusal changed nothing");
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", PG15).start();
    assert_eq!((count(&gw, "15-before-t1"), count(&gw, "15-after-t1")), (30, 0), "up to {t1} and no further\n{}", gw.log());
    assert_eq!(count(&gw, "17-before-t2"), 0);
    assert!(gw.terminate().success(), "{}", gw.log());
}

/// Whether the server still has the WAL segment at `position` (16 hex digits).
fn server_has(db: &mut postgres::Client, position: &str) -> bool {
    db.query_one("SELECT count(*) > 0 FROM pg_ls_waldir() WHERE substr(name, 9, 16) = $1", &[&position]).unwrap().get(0)
}

#[test]
fn pitr_a_stream_whose_wal_the_server_removed_is_set_aside_and_streaming_resumes_with_a_base_backup() {
    let dir = workdir();
    let wal = dir.path().join("data/wal");
    let mut gw = GatewayBuilder::new(dir.path()).start();
    wait_for_base_backup(&gw);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE phases (id serial PRIMARY KEY, phase text NOT NULL)").unwrap();
    write(&mut db, "streamed", 10);
    wait_archived(&mut db);
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());
    let newest = newest_segment(&wal.join("stream"));
    let position = newest.file_name().unwrap().to_string_lossy()[8..24].to_string();

    // Streaming off: the slot is dropped, and the server recycles the WAL the stream would resume from.
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_WAL_DIR", "off").start();
    wait_until(Duration::from_secs(30), "the leftover slot to be dropped", || gw.log().contains("dropped the replication slot").then_some(()));
    let mut db = gw.db();
    wait_until(Duration::from_secs(60), "the server to remove the stream's WAL", || {
        write(&mut db, "not streamed", 10);
        db.batch_execute("SELECT pg_switch_wal(); CHECKPOINT;").unwrap();
        (!server_has(&mut db, &position)).then_some(())
    });
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());

    // Streaming on again: the stream is set aside, a base backup taken, the streamer serves.
    let gw = GatewayBuilder::new(dir.path()).start();
    wait_until(Duration::from_secs(120), "a new base backup", || (base_backups(&wal) >= 2).then_some(()));
    wait_until(Duration::from_secs(60), "the wal component to be ready", || (gw.component("wal")["state"] == "ready").then_some(()));
    let log = gw.log();
    assert!(log.contains("cannot continue from this server") && log.contains("has already been removed") && log.contains("gap"), "{log}");
    let retired: Vec<PathBuf> = std::fs::read_dir(&wal).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("stream-")).collect();
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert!(retired[0].join(newest.file_name().unwrap()).exists(), "the old stream stays readable in {}", retired[0].display());
    let mut db = gw.db();
    write(&mut db, "streamed again", 10);
    wait_archived(&mut db);
    assert_eq!(count(&gw, "streamed again"), 10);
}

#[test]
fn pitr_an_archive_of_another_cluster_moves_to_a_generation_and_the_new_cluster_streams_its_own() {
    let first = workdir();
    let wal = first.path().join("data/wal");
    let mut gw = GatewayBuilder::new(first.path()).start();
    wait_for_base_backup(&gw);
    assert!(gw.terminate().success(), "{}", gw.log());
    let first_identity = identity(&wal);
    let last = newest_segment(&wal.join("stream"));
    let last_bytes = std::fs::read(&last).unwrap();

    // A new cluster (its own data directory) given the same OMNI_WAL_DIR.
    let second = workdir();
    let gw = GatewayBuilder::new(second.path()).env("OMNI_WAL_DIR", wal.display().to_string()).start();
    wait_until(Duration::from_secs(120), "the new cluster's base backup", || (base_backups(&wal) == 1).then_some(()));
    wait_until(Duration::from_secs(60), "the wal component to be ready", || (gw.component("wal")["state"] == "ready").then_some(()));
    assert!(gw.log().contains("held the archive of another cluster"), "{}", gw.log());
    let generations = generations(&wal);
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert_eq!(identity(&generations[0]), first_identity);
    assert_ne!(identity(&wal)["system_identifier"], first_identity["system_identifier"]);
    let kept = generations[0].join("stream").join(last.file_name().unwrap());
    assert!(std::fs::read(&kept).unwrap() == last_bytes, "the first cluster's last segment is intact in {}", kept.display());
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE phases (id serial PRIMARY KEY, phase text NOT NULL)").unwrap();
    write(&mut db, "second", 5);
    wait_archived(&mut db);
}
