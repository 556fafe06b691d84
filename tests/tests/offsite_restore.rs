//! `omni-gateway restore --from <url> --to <time|latest>` against a real
//! object store (`rclone serve s3`, tests/src/stores.rs): a point-in-time
//! restore on a new machine brings back the rows written before the time
//! and none after it; each refusal (a data directory that holds anything,
//! a time before the first base backup or after the last WAL, a repository
//! with no backups, wrong credentials, an object that does not match its
//! manifest) is a clear error, a non-zero exit, and nothing in the data
//! directory; and a restore killed (`kill -9`) at each step it logs
//! completes when run again, while a start in between never serves a
//! half-restored cluster.

use crate::gateway;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use gateway::{cli_env, oldest_base_backup, postgres_pids_on, wait_for_base_backup, workdir, write_a_note_t_write_b, Gateway, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer, S3_SECRET_KEY};
use omni_tests::{bin_path, pg_bin_dir, wait_until, ChildGuard};

/// The ids of `pitr_rows` a gateway serves.
fn rows(gw: &Gateway) -> BTreeSet<i32> {
    gw.db().query("SELECT id FROM pitr_rows", &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// A gateway shipping to `url` on `store`, with one base backup in the
/// store (its manifest listed), rows A (0..50) before the returned time T
/// and B (50..100) after it, and the WAL of all of them in the store, the
/// last segment whole (so a restore downloads whole segments and chunks).
/// Stopped cleanly before returning. Returns T and the generation's name.
fn source_with_a_t_b(store: &StoreServer, prefix: &str, cwd: &Path) -> (String, String) {
    let mut builder = GatewayBuilder::new(cwd).env("OMNI_REPOSITORY_URL", store.url(prefix)).env("OMNI_REPOSITORY_WAL_INTERVAL", "1s");
    for (k, v) in store.env() {
        builder = builder.env(k, v.clone());
    }
    let mut gw = builder.start();
    wait_for_base_backup(&gw);
    let id = oldest_base_backup(cwd);
    let manifest = wait_until(Duration::from_secs(180), &format!("the store to list base/{id}/manifest.json"), || {
        store.list(&format!("{prefix}/")).into_iter().find(|n| n.ends_with(&format!("/base/{id}/manifest.json")))
    });
    let gen = manifest.split('/').nth(1).unwrap().to_owned();
    let t = write_a_note_t_write_b(&gw);
    // B's segment completed: a whole segment, then WAL after it in chunks.
    let mut db = gw.db();
    let row = db.query_one("SELECT file_name FROM pg_walfile_name_offset(pg_switch_wal())", &[]).unwrap();
    let whole: String = row.get(0);
    db.batch_execute("CREATE TABLE after_the_switch (id int); INSERT INTO after_the_switch VALUES (1)").unwrap();
    let row = db.query_one("SELECT file_name, file_offset::bigint FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).unwrap();
    let (segment, offset): (String, i64) = (row.get(0), row.get(1));
    let wal = format!("{prefix}/{gen}/wal/");
    wait_until(Duration::from_secs(60), &format!("the store to hold {whole} whole and {segment} up to {offset:#X}"), || {
        (store.holds_wal(&wal, &whole, u64::MAX) && store.holds_wal(&wal, &segment, offset as u64)).then_some(())
    });
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());
    (t, gen)
}

/// The store's variables as `cli_env` takes them, with `secret` as the S3 secret key when given.
fn store_env<'a>(store: &'a StoreServer, secret: Option<&str>) -> Vec<(&'a str, String)> {
    let mut env: Vec<(&str, String)> = store.env().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    if let Some(secret) = secret {
        env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
        env.push(("AWS_SECRET_ACCESS_KEY", secret.to_owned()));
    }
    env
}

/// The data directory of `cwd` holds nothing, and nothing of a restore is beside it.
fn nothing_written(cwd: &Path, case: &str) {
    let data_dir = cwd.join("data/postgres");
    let inside: Vec<String> = std::fs::read_dir(&data_dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(inside.is_empty(), "{case}: the data directory holds {inside:?}");
    let beside: Vec<String> = std::fs::read_dir(cwd.join("data"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("postgres.") && n != "postgres.lock")
        .collect();
    assert!(beside.is_empty(), "{case}: a refused restore left {beside:?} beside the data directory");
}

/// `restore --from` that must be refused: its stderr.
fn refused(cwd: &Path, url: &str, to: &str, env: &[(&str, String)], case: &str) -> String {
    let started = Instant::now();
    let (ok, out, err) = cli_env(cwd, &["restore", "--from", url, "--to", to], env);
    assert!(!ok, "{case}: the restore succeeded:\n{out}\n{err}");
    println!("{case}: refused in {} ms: {}", started.elapsed().as_millis(), err.trim());
    nothing_written(cwd, case);
    err
}

/// Now, as RFC 3339 (the machine's clock: the one commit times are stamped with here).
fn now_rfc3339() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn offsite_restore_to_a_time_brings_back_what_was_before_it_and_refuses_what_it_cannot_do() {
    let store = StoreServer::start_new(Kind::Rclone);
    let source = workdir();
    let (t, gen) = source_with_a_t_b(&store, "pitr", source.path());
    let url = store.url("pitr");
    let env = store_env(&store, None);

    // A data directory that holds anything: untouched, nothing downloaded.
    let busy = workdir();
    std::fs::create_dir_all(busy.path().join("data/postgres")).unwrap();
    std::fs::write(busy.path().join("data/postgres/notes.txt"), "mine").unwrap();
    let (ok, out, err) = cli_env(busy.path(), &["restore", "--from", &url, "--to", &t], &env);
    assert!(!ok, "a restore into a data directory that holds a file:\n{out}\n{err}");
    assert!(err.contains("is not empty") && err.contains("data/postgres"), "{err}");
    assert_eq!(std::fs::read_to_string(busy.path().join("data/postgres/notes.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(busy.path().join("data/postgres")).unwrap().count(), 1, "nothing added to it");
    assert!(!busy.path().join("data/wal").exists(), "nothing downloaded");

    // Each refusal on a new machine: a clear error, nothing written.
    let fresh = workdir();
    let err = refused(fresh.path(), &url, "2001-01-01T00:00:00Z", &env, "a time before the first base backup");
    assert!(err.contains("before its oldest base backup") && err.contains("latest"), "{err}");
    let err = refused(fresh.path(), &store.url("nothing-here"), "latest", &env, "a URL with no backups");
    assert!(err.contains("holds no complete base backup of any installation"), "{err}");
    let wrong = "wrong-secret-key-9876543210abcdef";
    let err = refused(fresh.path(), &url, "latest", &store_env(&store, Some(wrong)), "wrong credentials");
    assert!(err.contains("could not list") && err.contains("credentials"), "{err}");
    assert!(!err.contains(wrong) && !err.contains(S3_SECRET_KEY), "no secret in the message: {err}");
    assert!(!fresh.path().join("data/wal").exists(), "nothing downloaded for a refusal");

    // The point-in-time restore: A is back, B is not.
    let new = workdir();
    let started = Instant::now();
    let (ok, out, err) = cli_env(new.path(), &["restore", "--from", &url, "--to", &t], &env);
    assert!(ok, "restore --from {url} --to {t}:\n{out}\n{err}\n{}", store.log());
    println!("restore --from --to T: {} ms", started.elapsed().as_millis());
    for progress in ["listing", "base backup: 1/", "bytes", "WAL: 1/", "segments", "% of the restore"] {
        assert!(out.contains(progress), "the restore says how far it got ({progress}):\n{out}");
    }
    assert!(!new.path().join("data/postgres.restore-from.json").exists(), "the record of a restore under way is gone once it is done");
    let gw = GatewayBuilder::new(new.path()).start();
    let got = rows(&gw);
    assert_eq!(got, (0..50).collect::<BTreeSet<i32>>(), "the rows written before {t}, none after: {} rows\n{out}", got.len());
    drop(gw);

    // A time after the last WAL the repository holds (it stopped before
    // the restore above): refused, not taken for "everything".
    let after = now_rfc3339();
    let err = refused(fresh.path(), &url, &after, &env, "a time after the last WAL");
    assert!(err.contains("after its newest WAL") && err.contains("latest"), "{err}");

    // An object whose bytes do not match the manifest: the restore names it.
    let manifest = store.list(&format!("pitr/{gen}/base/")).into_iter().find(|n| n.ends_with("/manifest.json")).unwrap();
    let object = manifest.replace("manifest.json", "base.tar.lz4");
    let file = store.rclone_object_file(&object);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    let tampered = workdir();
    let err = refused(tampered.path(), &url, "latest", &env, "an object that does not match its manifest");
    let relative = object.strip_prefix("pitr/").unwrap();
    assert!(err.contains(relative) && err.contains("SHA-256"), "the error names the object {relative}: {err}");
    let leftovers: Vec<String> = std::fs::read_dir(tampered.path().join("data/wal/base")).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(leftovers.is_empty(), "nothing half-downloaded stays: {leftovers:?}");
}

/// `omni-gateway restore --from <url> --to latest` in `cwd`, held at `step`
/// by the test hook, its output in `restore-<step>.log`.
fn restore_held_at(cwd: &Path, url: &str, env: &[(&str, String)], step: &str) -> ChildGuard {
    let log = std::fs::File::create(cwd.join(format!("restore-{step}.log"))).unwrap();
    let mut command = std::process::Command::new(bin_path("omni-gateway"));
    command
        .args(["restore", "--from", url, "--to", "latest"])
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", pg_bin_dir())
        .env("LOG_LEVEL", "info")
        .env("OMNI_TEST_HOLD_RESTORE_STEP", step)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    ChildGuard::spawn(&mut command)
}

/// Every `postgres.*` entry beside the data directory of `cwd`.
fn beside_the_data_dir(cwd: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cwd.join("data")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("postgres.")).collect();
    names.sort();
    names
}

#[test]
fn offsite_restore_killed_at_each_step_completes_when_run_again_and_nothing_half_restored_is_served() {
    let store = StoreServer::start_new(Kind::Rclone);
    let source = workdir();
    source_with_a_t_b(&store, "killed", source.path());
    let url = store.url("killed");
    let env = store_env(&store, None);
    let all: BTreeSet<i32> = (0..100).collect();

    // Each step the restore logs, with what its log says there; whether a
    // kill there leaves a recovered cluster (the rerun then only finishes it).
    let steps: [(&str, &str, bool); 7] = [
        ("downloading-base", "base backup: 1/", false),
        ("downloading-wal", "WAL: 1/", false),
        ("copied", "base backup in place", false),
        ("promoted", "recovery finished and promoted", false),
        ("recovered", "restored cluster continues on timeline", true),
        ("swapping", "moved the data directory as it was aside", true),
        ("swapped", "the restored cluster is now", true),
    ];
    for (step, logged, recovered) in steps {
        let dir = workdir();
        // A new volume: the data directory is there, empty.
        std::fs::create_dir_all(dir.path().join("data/postgres")).unwrap();
        let mut restore = restore_held_at(dir.path(), &url, &env, step);
        let held = dir.path().join("data/postgres.restore.held");
        wait_until(Duration::from_secs(180), &format!("the restore to hold at {step}"), || {
            if let Some(status) = restore.try_status() {
                panic!("the restore ended ({status}) before {step}:\n{}", std::fs::read_to_string(dir.path().join(format!("restore-{step}.log"))).unwrap_or_default());
            }
            (std::fs::read_to_string(&held).ok()? == step).then_some(())
        });
        restore.kill9();
        let log = std::fs::read_to_string(dir.path().join(format!("restore-{step}.log"))).unwrap();
        assert!(log.contains(logged), "killed at {step}: the log says what it was doing ({logged}):\n{log}");
        wait_until(Duration::from_secs(30), "the restore's postgres to be gone", || {
            beside_the_data_dir(dir.path()).iter().filter(|n| n.contains(".restoring-")).all(|n| postgres_pids_on(&dir.path().join("data").join(n)).is_empty()).then_some(())
        });
        let data_dir = dir.path().join("data/postgres");
        if !recovered {
            // Nothing recovered yet: the data directory holds no cluster, and
            // a start refuses rather than create an empty one in its place.
            assert!(!data_dir.join("PG_VERSION").exists(), "killed at {step}: a cluster in the data directory before its recovery");
            let (status, start_log) = GatewayBuilder::new(dir.path()).run_to_exit();
            assert!(!status.success(), "killed at {step}: a start served something:\n{start_log}");
            assert!(start_log.contains("was cut off") && start_log.contains("restore --from"), "killed at {step}: the start says to run the restore again:\n{start_log}");
            assert!(!data_dir.join("PG_VERSION").exists(), "killed at {step}: the refused start created a cluster");
        }

        // Run again: it completes (or finishes the recovered cluster).
        let (ok, out, err) = cli_env(dir.path(), &["restore", "--from", &url, "--to", "latest"], &env);
        assert!(ok, "killed at {step}, run again:\n{out}\n{err}");
        if recovered {
            assert!(out.contains("is finished"), "killed at {step}: the rerun finishes the recovered restore:\n{out}");
        }
        let left: Vec<String> = beside_the_data_dir(dir.path()).into_iter().filter(|n| n.contains(".restoring-") || n.contains(".restore")).collect();
        assert!(left.is_empty(), "killed at {step}: left behind {left:?}");
        let gw = GatewayBuilder::new(dir.path()).start();
        let got = rows(&gw);
        assert_eq!(got, all, "killed at {step}: the completed restore serves {} rows\n{}", got.len(), gw.log());
        println!("killed at {step}: run again, {} rows served", got.len());
    }
}
