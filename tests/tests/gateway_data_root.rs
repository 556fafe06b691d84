//! One data root: every place the gateway writes derives from
//! `OMNI_DATA_DIR` (default `./data`: `postgres/`, `backups/`, `wal/`,
//! `omni-settings.json`), and a configuration that puts one of them inside
//! another stops the start at once, naming both variables, before anything
//! is created. The natural first try, `PGSERVE_DATA_DIR=./data`, used to
//! fail on the first start: the backups' default `./data/backups` landed
//! inside the cluster's directory, which the start then refused as "a
//! non-empty directory that holds no cluster" it had filled itself.

use crate::gateway;

use gateway::{cli_env, workdir, GatewayBuilder};

#[test]
fn a_cluster_directory_holding_the_backups_default_stops_the_start_naming_both() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path()).env("PGSERVE_DATA_DIR", "./data").run_to_exit();
    assert_eq!(status.code(), Some(2), "a configuration error exits 2: {log}");
    assert!(log.contains("OMNI_BACKUP_DIR") && log.contains("PGSERVE_DATA_DIR=") && log.contains("OMNI_DATA_DIR"), "{log}");
    assert!(!dir.path().join("data").exists(), "nothing is created before the refusal");

    // doctor says the same, as a FAIL row.
    let (ok, out, err) = cli_env(dir.path(), &["doctor"], &[("PGSERVE_DATA_DIR", "./data".into())]);
    assert!(!ok, "doctor must fail: {out}{err}");
    assert!(out.contains("FAIL") && out.contains("OMNI_BACKUP_DIR") && out.contains("PGSERVE_DATA_DIR"), "{out}{err}");
}

#[test]
fn the_archive_inside_the_backups_is_refused_too() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path())
        .env("OMNI_BACKUP_DIR", "./keep")
        .env("OMNI_WAL_DIR", "./keep/wal")
        .run_to_exit();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("OMNI_WAL_DIR=") && log.contains("OMNI_BACKUP_DIR="), "{log}");
    assert!(!dir.path().join("keep").exists() && !dir.path().join("data").exists(), "nothing is created before the refusal");
}

#[test]
fn one_variable_moves_everything_the_gateway_keeps() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_DATA_DIR", "./store").start();
    let store = dir.path().join("store");
    assert!(store.join("postgres/PG_VERSION").is_file(), "the cluster is under OMNI_DATA_DIR");
    assert!(store.join("wal").is_dir(), "the WAL archive is under OMNI_DATA_DIR");
    let log = gw.log();
    assert!(log.contains(&store.join("postgres").display().to_string()), "the start names the cluster's place: {log}");
    // A backup taken by the command line, with the same setting, lands under it too.
    let (ok, out, err) = cli_env(dir.path(), &["backup", "create"], &[("OMNI_DATA_DIR", "./store".into())]);
    assert!(ok, "{out}{err}");
    let created = out.split_whitespace().next().expect("the backup's name").to_owned();
    assert!(store.join("backups").join(&created).is_file(), "the backup {created} is under OMNI_DATA_DIR/backups");
    assert!(!dir.path().join("data").exists(), "nothing is left at the old default");
    gw.terminate();
}
