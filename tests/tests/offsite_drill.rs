//! Drills of the off-site copy (issue 28): after each scheduled restore
//! drill, the gateway downloads the repository's newest base backup and
//! its WAL into scratch space beside the data directory, checks every
//! object against its manifest, restores it into a scratch cluster and runs
//! the local drill's checks; the result is in `drill-offsite.json`,
//! `repository.last_verified` of `/gateway/status` and `/metrics`. A damaged
//! object (its bytes flipped in the store itself: the `file://` directory,
//! rclone's files on disk) is named in the status and the log, the service
//! stays up (`/health` 200, `degraded`). An encrypted repository without
//! `OMNI_DECRYPT_IDENTITY_FILE` is checked against its manifest only, and
//! the result says so; with it, decrypted and restored.

use crate::gateway;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gateway::{generation, oldest_base_backup, wait_for_base_backup, wait_for_repository as wait_for, workdir, Gateway, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::TempDir;

/// The off-site drill's record, once there is one.
fn record(gw: &Gateway) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(gw.cwd.join("data/wal/drill-offsite.json")).ok()?).ok()
}

fn last_verified(gw: &Gateway) -> serde_json::Value {
    gw.get("/gateway/status").json()["repository"]["last_verified"].clone()
}

/// Inverts 64 bytes in the middle of `file`, in place.
fn flip_bytes(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    assert!(bytes.len() > 128, "{} is too small to damage in its middle", file.display());
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b = !*b;
    }
    std::fs::write(file, bytes).unwrap();
}

/// Scratch directories of off-site drills left beside the data directory.
fn leftover_scratch(gw: &Gateway) -> Vec<PathBuf> {
    let data = gw.data_dir();
    let prefix = format!("{}.drill-offsite-", data.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(data.parent().unwrap()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).map(|e| e.path()).collect()
}

/// A metric's value in `/metrics`.
fn metric(gw: &Gateway, name: &str) -> Option<f64> {
    gw.get("/metrics").text().lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
}

#[test]
fn offsite_drill_restores_the_repository_copy_and_names_a_damaged_object() {
    let dir = workdir();
    let other_disk = TempDir::new("offsite");
    let store = other_disk.path().join("repo");
    let mut gw = GatewayBuilder::new(dir.path())
        .env("OMNI_REPOSITORY_URL", format!("file://{}", store.display()))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_BACKUP_DRILL_INTERVAL", "3s")
        .start();
    wait_for_base_backup(&gw);
    gw.db().batch_execute("CREATE TABLE drilled (id int); INSERT INTO drilled SELECT generate_series(1, 100)").unwrap();
    let (gen, id) = (generation(&gw), oldest_base_backup(&gw.cwd));

    // Healthy: a drill restores the repository's copy (the first ones may
    // run before the base backup's manifest is there, and fail saying so).
    let passed = wait_for(&gw, Duration::from_secs(240), "an off-site drill that passed", || record(&gw).filter(|r| r["ok"] == true));
    assert_eq!(passed["base_backup"], id, "{passed}");
    assert_eq!(passed["manifest_only"], false, "{passed}");
    assert!(passed["app_tables"].as_i64().unwrap() > 0, "{passed}");
    assert!(passed["objects"].as_u64().unwrap() >= 2, "the base backup's files and WAL were downloaded: {passed}");
    assert_eq!(passed["damaged_object"], serde_json::Value::Null, "{passed}");
    let local: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("data/wal/drill.json")).unwrap()).unwrap();
    eprintln!("offsite drill: {} objects, {} bytes, {} ms (the local drill before it: {} ms)", passed["objects"], passed["bytes"], passed["took_ms"], local["took_ms"]);
    let status = wait_for(&gw, Duration::from_secs(10), "the status to show the drill", || Some(last_verified(&gw)).filter(|v| v["ok"] == true));
    assert_eq!(status["base_backup"], id, "{status}");
    assert!(status["last_success"].is_string(), "{status}");
    assert_eq!(metric(&gw, "omni_repository_drill_ok"), Some(1.0));
    assert_eq!(metric(&gw, "omni_repository_drill_manifest_only"), Some(0.0));
    let success_at = metric(&gw, "omni_repository_drill_last_success_timestamp_seconds").expect("the time of the last good off-site drill is in /metrics");
    assert!(gw.log().contains("off-site drill passed"), "the drill says what it did in the log");

    // Damaged in the store: the drill fails naming the object, its
    // expected and actual SHA-256; the service stays up.
    let file = "base.tar.lz4";
    let object = format!("{gen}/base/{id}/{file}");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(store.join(&gen).join("base").join(&id).join("manifest.json")).unwrap()).unwrap();
    let expected = manifest["files"].as_array().unwrap().iter().find(|f| f["name"] == file).unwrap_or_else(|| panic!("{file} in {manifest}"))["sha256"].as_str().unwrap().to_owned();
    flip_bytes(&store.join(&object));
    let failed = wait_for(&gw, Duration::from_secs(240), "an off-site drill that failed", || Some(last_verified(&gw)).filter(|v| v["ok"] == false));
    assert_eq!(failed["damaged_object"], object, "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains(&object) && error.contains(&expected), "the error names the object and the SHA-256 its manifest gives: {error}");
    assert_eq!(record(&gw).unwrap()["damaged_object"], object, "drill-offsite.json says the same");
    let log = gw.log();
    assert!(log.lines().any(|l| l.contains("OFF-SITE DRILL FAILED") && l.contains(&object)), "the log names the object:\n{log}");
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "a damaged off-site copy does not fail /health: {}", health.text());
    assert!(health.json()["degraded"].to_string().contains(&object), "{}", health.text());
    assert_eq!(metric(&gw, "omni_repository_drill_ok"), Some(0.0));
    let still = metric(&gw, "omni_repository_drill_last_success_timestamp_seconds");
    assert!(still.is_some_and(|t| t >= success_at), "the last good drill stays in /metrics after a failed one: {still:?}, before {success_at}");
    let rows: i64 = gw.db().query_one("SELECT count(*) FROM drilled", &[]).unwrap().get(0);
    assert_eq!(rows, 100, "the service still serves");
    // Drills run back to back at this interval: the stop cuts one short, which leaves nothing behind.
    assert!(gw.terminate().success(), "{}", gw.log());
    assert_eq!(leftover_scratch(&gw), Vec::<PathBuf>::new(), "a drill leaves no scratch space, one cut short by the stop neither");
}

/// A new age key pair by Debian's `age-keygen`: the public key (the private
/// one stays in `dir`, never given to the gateway).
fn public_key(dir: &Path) -> String {
    let key = dir.join("key.txt");
    let out = Command::new("age-keygen").arg("-o").arg(&key).output().expect("age-keygen (Debian's age package) is installed");
    assert!(out.status.success(), "age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let public = Command::new("age-keygen").arg("-y").arg(&key).output().unwrap();
    String::from_utf8(public.stdout).unwrap().trim().to_owned()
}

#[test]
fn offsite_drill_without_the_key_checks_an_encrypted_repository_against_its_manifest_only() {
    let store = StoreServer::start_new(Kind::Rclone);
    let keys = workdir();
    let dir = workdir();
    let mut builder = GatewayBuilder::new(dir.path())
        .env("OMNI_REPOSITORY_URL", store.url("sealed"))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_BACKUP_DRILL_INTERVAL", "3s")
        .env("OMNI_ENCRYPT_RECIPIENTS", public_key(keys.path()));
    for (k, v) in store.env() {
        builder = builder.env(k, v.clone());
    }
    let mut gw = builder.start();
    wait_for_base_backup(&gw);
    let (gen, id) = (generation(&gw), oldest_base_backup(&gw.cwd));

    let checked = wait_for(&gw, Duration::from_secs(240), "an off-site drill that passed", || Some(last_verified(&gw)).filter(|v| v["ok"] == true));
    assert_eq!(checked["manifest_only"], true, "{checked}");
    assert_eq!(checked["base_backup"], id, "{checked}");
    assert_eq!(checked["app_tables"], serde_json::Value::Null, "nothing was restored: {checked}");
    let summary = checked["summary"].as_str().unwrap();
    assert!(summary.contains("manifest only") && summary.contains("OMNI_DECRYPT_IDENTITY_FILE") && summary.contains("nothing was decrypted or restored"), "the result says why it stopped at the manifest: {summary}");
    let plain_manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(format!("data/wal/repository-plain/{gen}/base/{id}/manifest.json"))).unwrap()).unwrap();
    assert_eq!(checked["objects"].as_u64(), Some(plain_manifest["files"].as_array().unwrap().len() as u64), "every file of the manifest was checked: {checked}");
    assert_eq!(metric(&gw, "omni_repository_drill_manifest_only"), Some(1.0));

    // One of its objects damaged on rclone's disk: the manifest check names it.
    let object = format!("{gen}/base/{id}/base.tar.lz4");
    flip_bytes(&store.rclone_object_file(&format!("sealed/{object}")));
    let failed = wait_for(&gw, Duration::from_secs(240), "an off-site drill that failed", || Some(last_verified(&gw)).filter(|v| v["ok"] == false));
    assert_eq!((failed["damaged_object"].as_str(), failed["manifest_only"].as_bool()), (Some(object.as_str()), Some(true)), "{failed}");
    assert!(gw.log().lines().any(|l| l.contains("OFF-SITE DRILL FAILED") && l.contains(&object)), "the log names the object");
    assert_eq!(gw.get("/health").status, 200);
    assert!(gw.terminate().success(), "{}", gw.log());
    assert_eq!(leftover_scratch(&gw), Vec::<PathBuf>::new(), "a drill leaves no scratch space, one cut short by the stop neither");
}

#[test]
fn offsite_drill_with_the_key_decrypts_and_restores_an_encrypted_repository() {
    let store = StoreServer::start_new(Kind::Rclone);
    let keys = workdir();
    let public = public_key(keys.path());
    let dir = workdir();
    let mut builder = GatewayBuilder::new(dir.path())
        .env("OMNI_REPOSITORY_URL", store.url("keyed"))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_BACKUP_DRILL_INTERVAL", "3s")
        .env("OMNI_ENCRYPT_RECIPIENTS", public)
        .env("OMNI_DECRYPT_IDENTITY_FILE", keys.path().join("key.txt").display().to_string());
    for (k, v) in store.env() {
        builder = builder.env(k, v.clone());
    }
    let mut gw = builder.start();
    wait_for_base_backup(&gw);
    let id = oldest_base_backup(&gw.cwd);

    let passed = wait_for(&gw, Duration::from_secs(240), "an off-site drill that passed", || Some(last_verified(&gw)).filter(|v| v["ok"] == true));
    assert_eq!((passed["manifest_only"].as_bool(), passed["base_backup"].as_str()), (Some(false), Some(id.as_str())), "{passed}");
    assert!(passed["app_tables"].as_i64().is_some_and(|n| n > 0), "restored: {passed}");
    assert!(passed["summary"].as_str().unwrap().contains("decrypted"), "{passed}");
    assert_eq!(metric(&gw, "omni_repository_drill_manifest_only"), Some(0.0));
    assert!(gw.terminate().success(), "{}", gw.log());
    assert_eq!(leftover_scratch(&gw), Vec::<PathBuf>::new());
}

/// A drill of the repository cut short by the gateway's stop in the middle
/// of its download (held there by the test hook) leaves no scratch space.
#[test]
fn offsite_drill_cut_short_by_the_stop_leaves_no_scratch_space() {
    let dir = workdir();
    let other_disk = TempDir::new("offsite");
    let store = other_disk.path().join("repo");
    let mut gw = GatewayBuilder::new(dir.path())
        .env("OMNI_REPOSITORY_URL", format!("file://{}", store.display()))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_BACKUP_DRILL_INTERVAL", "3s")
        .env("OMNI_TEST_HOLD_RESTORE_STEP", "downloading-base")
        .start();
    wait_for_base_backup(&gw);
    let held = wait_for(&gw, Duration::from_secs(240), "an off-site drill held in its download", || leftover_scratch(&gw).into_iter().find(|d| d.join("data.restore.held").exists()));
    assert!(held.join("wal/base").is_dir(), "the download was under way in {}", held.display());
    assert!(gw.terminate().success(), "{}", gw.log());
    assert_eq!(leftover_scratch(&gw), Vec::<PathBuf>::new(), "the held drill's scratch space outlived the stop:\n{}", gw.log());
}
