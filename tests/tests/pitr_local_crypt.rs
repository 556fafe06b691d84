//! `OMNI_ENCRYPT_LOCAL=true`, end to end with the real gateway, PostgreSQL
//! and Debian's `age`: without `OMNI_ENCRYPT_*` the start is refused naming
//! them, nothing created; with it every file of a base backup and every
//! completed WAL segment in `data/wal` is an age file (`age -d | lz4 -d`
//! gives a whole segment back), and the off-site repository gets those
//! files as they are; a point-in-time restore without the
//! identity is refused naming `OMNI_DECRYPT_IDENTITY_FILE`, `--identity` and
//! the key it needs, the data directory untouched; with `--identity` it
//! brings back exactly the rows written before the target. The online
//! restore and `backup verify` are refused without the key (the service
//! serving on as it was) and work with `OMNI_DECRYPT_IDENTITY_FILE`. The
//! logical backups are kept encrypted too (no dump in plain text anywhere
//! under the data root; `age -d` gives a dump that loads), listed, counted
//! by retention and uploaded as they are, and restored through the API only
//! with `OMNI_DECRYPT_IDENTITY_FILE` (409 `identity_needed` without it,
//! nothing changed); with `OMNI_WAL_DIR=off`, they alone.

use crate::gateway;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use gateway::{age_decrypt, cli, cli_env, files_under, generation, keygen, oldest_base_backup, post_slow, wait_archived, wait_for_base_backup, workdir, write_a_note_t_write_b, GatewayBuilder};
use omni_tests::{wait_until, Request, TEST_API_KEY};

const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";


fn is_age(path: &Path) -> bool {
    let mut head = vec![0u8; AGE_MAGIC.len()];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == AGE_MAGIC
}

/// (completed plain segments, sealed segments) of `stream/`.
fn segments(stream: &Path) -> (Vec<String>, Vec<String>) {
    let names: Vec<String> = std::fs::read_dir(stream).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let hex = |n: &str| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit());
    let plain = names.iter().filter(|n| hex(n)).cloned().collect();
    let sealed = names.iter().filter_map(|n| n.strip_suffix(".lz4.age")).filter(|n| hex(n)).map(str::to_owned).collect();
    (plain, sealed)
}

/// Each file of a directory tree with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    files_under(dir).into_iter().filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, (m.len(), m.modified().unwrap())))).collect()
}


#[test]
fn pitr_local_crypt_without_keys_to_encrypt_to_the_start_is_refused_naming_them() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path()).env("OMNI_ENCRYPT_LOCAL", "true").run_to_exit();
    assert!(!status.success(), "a start with OMNI_ENCRYPT_LOCAL=true and nothing to encrypt to: {log}");
    for named in ["OMNI_ENCRYPT_LOCAL", "OMNI_ENCRYPT_RECIPIENTS", "OMNI_ENCRYPT_RECIPIENTS_FILE", "OMNI_ENCRYPT_PASSPHRASE_FILE"] {
        assert!(log.contains(named), "the error names {named}: {log}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was created before the refusal");
}

#[test]
fn pitr_local_crypt_keeps_the_archive_encrypted_and_restores_only_with_the_identity() {
    let keys = workdir();
    let (key, public) = keygen(keys.path(), "key.txt");
    let dir = workdir();
    let bucket = keys.path().join("bucket");
    let start = || {
        GatewayBuilder::new(dir.path())
            .env("OMNI_ENCRYPT_LOCAL", "true")
            .env("OMNI_ENCRYPT_RECIPIENTS", public.clone())
            .env("OMNI_BACKUP_DRILL_INTERVAL", "1d")
            .env("OMNI_REPOSITORY_URL", format!("file://{}", bucket.display()))
            .start()
    };
    let mut gw = start();
    wait_for_base_backup(&gw);
    let t = write_a_note_t_write_b(&gw);
    // Completed segments after T: the restore replays through them.
    let mut db = gw.db();
    for from in [1000, 2000] {
        db.batch_execute(&format!("INSERT INTO pitr_rows SELECT g, 'C' FROM generate_series({from}, {from} + 100) g")).unwrap();
        db.query_one("SELECT pg_switch_wal()", &[]).unwrap();
    }
    db.batch_execute("INSERT INTO pitr_rows VALUES (3000, 'C')").unwrap();
    wait_archived(&mut db);
    drop(db);
    let wal = dir.path().join("data/wal");
    let stream = wal.join("stream");
    wait_until(Duration::from_secs(30), "every completed segment to be encrypted", || {
        let (plain, sealed) = segments(&stream);
        (plain.is_empty() && sealed.len() >= 3).then_some(())
    });
    // Off-site: the local sealed files are the objects (a base backup's byte
    // for byte: it is sealed before it gets its name); nothing sealed twice.
    let gen = generation(&gw);
    let id = oldest_base_backup(dir.path());
    let remote = bucket.join(&gen);
    // The repository keeps the segments from the base backup's first on: its
    // retention deletes older ones (OMNI_REPOSITORY_WINDOW), which the local
    // archive may still hold.
    let base: serde_json::Value = serde_json::from_slice(&std::fs::read(wal.join(format!("base/{id}.json"))).unwrap()).unwrap();
    let first = base["start_segment"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let newest = loop {
        let (_, sealed) = segments(&stream);
        let needed: Vec<&String> = sealed.iter().filter(|s| **s >= first).collect();
        if remote.join(format!("base/{id}/manifest.json")).is_file() && !needed.is_empty() && needed.iter().all(|s| remote.join(format!("wal/{s}.lz4")).is_file()) {
            break needed.into_iter().max().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "the base backup and the sealed segments {needed:?} (from {first} on) are not in the repository: {:?}\n{}", files_under(&bucket), gw.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    for file in ["base.tar.lz4", "pg_wal.tar", "backup_manifest"] {
        let object = std::fs::read(remote.join(format!("base/{id}/{file}"))).unwrap();
        assert!(object == std::fs::read(wal.join(format!("base/{id}/{file}.age"))).unwrap(), "the object {file} is not the local {file}.age as it is");
    }
    let manifest = Command::new("age").arg("-d").arg("-i").arg(&key).arg(remote.join(format!("base/{id}/manifest.json"))).output().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).unwrap();
    assert!(manifest["recipients"].to_string().contains(&public), "the manifest names the recipients: {manifest}");
    assert!(!manifest["files"].to_string().contains(".age"), "the objects keep the off-site names: {manifest}");
    assert!(age_decrypt(&key, &remote.join(format!("wal/{newest}.lz4")), true) == age_decrypt(&key, &stream.join(format!("{newest}.lz4.age")), true), "the object of {newest} holds the segment");
    assert!(files_under(&bucket).iter().all(|f| is_age(f)), "every object is an age file, decryptable once");

    let out = cli(dir.path(), &["doctor"]).1;
    assert!(out.contains("local copies") && out.contains("OMNI_ENCRYPT_LOCAL"), "doctor says the local copies are encrypted:\n{out}");
    assert!(gw.terminate().success(), "{}", gw.log());
    assert!(gw.log().contains("OMNI_ENCRYPT_LOCAL: base backups and completed WAL segments"), "the start says it: {}", gw.log());

    // Every file of every base backup, every completed segment: age files.
    let base_files: Vec<PathBuf> = files_under(&wal.join("base")).into_iter().filter(|p| p.extension().is_none_or(|e| e != "json")).collect();
    assert!(base_files.len() >= 3, "base.tar.lz4, pg_wal.tar and backup_manifest: {base_files:?}");
    for file in &base_files {
        assert!(file.to_string_lossy().ends_with(".age") && is_age(file), "{} is not an age file", file.display());
    }
    let (plain, sealed) = segments(&stream);
    assert!(plain.is_empty(), "completed segments left plain: {plain:?}");
    for name in &sealed {
        assert!(is_age(&stream.join(format!("{name}.lz4.age"))), "{name}.lz4.age is not an age file");
    }
    let whole = age_decrypt(&key, &stream.join(format!("{}.lz4.age", sealed[0])), true);
    assert_eq!(whole.len(), 16 * 1024 * 1024, "age -d | lz4 -d gives the whole segment back");
    for file in files_under(&stream) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with(".partial") || name.ends_with(".history") || is_age(&file), "{name} in stream/ is neither encrypted nor the segment being written");
    }

    // Without the identity: refused before anything moves, naming what it needs.
    let data = gw.data_dir();
    let before = snapshot(&data);
    let (ok, out, err) = cli(dir.path(), &["restore", "--to", &t]);
    assert!(!ok, "a restore without the identity:\n{out}\n{err}");
    for named in ["OMNI_DECRYPT_IDENTITY_FILE", "--identity", &public[..9], &public[public.len() - 8..]] {
        assert!(err.contains(named), "the refusal names {named}: {err}");
    }
    assert_eq!(snapshot(&data), before, "the data directory was touched");
    let aside: Vec<String> = std::fs::read_dir(data.parent().unwrap()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains("before-restore") || n.contains("restoring")).collect();
    assert!(aside.is_empty(), "nothing was moved aside or staged: {aside:?}");

    // With it: the rows written before T, none after. Run from a binary in a
    // directory only root opens (as under /root): PostgreSQL's account, which
    // runs the restore_command, cannot run it there, so the recovery runs a copy.
    let private = dir.path().join("root-only");
    std::fs::DirBuilder::new().mode(0o700).create(&private).unwrap();
    let binary = private.join("omni-gateway");
    std::fs::copy(omni_tests::bin_path("omni-gateway"), &binary).unwrap();
    let out = Command::new(&binary)
        .args(["restore", "--to", &t, "--identity", &key.display().to_string()])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", omni_tests::pg_bin_dir())
        .env("LOG_LEVEL", "info")
        .output()
        .unwrap();
    let (ok, out, err) = (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(ok, "omni-gateway restore --identity failed:\n{out}\n{err}");
    if omni_tests::is_root() {
        assert!(err.contains("runs a copy of it"), "the recovery ran a copy of the gateway PostgreSQL's account can run:\n{err}");
    }
    let gw = start();
    let mut db = gw.db();
    let mut count = |phase: &str| db.query_one("SELECT count(*) FROM pitr_rows WHERE phase = $1", &[&phase]).unwrap().get::<_, i64>(0);
    assert_eq!(count("A"), 50, "every write before {t} is back\n{}", gw.log());
    assert_eq!(count("B") + count("C"), 0, "no write after {t} is back");
    // The restored cluster's new timeline is kept encrypted too.
    db.query_one("SELECT pg_switch_wal()", &[]).unwrap();
    db.batch_execute("INSERT INTO pitr_rows VALUES (4000, 'D')").unwrap();
    wait_archived(&mut db);
    wait_until(Duration::from_secs(30), "the new timeline's completed segments to be encrypted", || {
        let (plain, sealed) = segments(&stream);
        (plain.is_empty() && sealed.iter().any(|s| s.starts_with("00000002"))).then_some(())
    });
}

#[test]
fn pitr_local_crypt_the_online_restore_and_the_drill_need_the_identity_and_work_with_it() {
    let keys = workdir();
    let (key, public) = keygen(keys.path(), "key.txt");
    let dir = workdir();
    let start = |identity: Option<&Path>| {
        let mut builder = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_ENCRYPT_LOCAL", "true").env("OMNI_ENCRYPT_RECIPIENTS", public.clone());
        match identity {
            Some(key) => builder = builder.env("OMNI_DECRYPT_IDENTITY_FILE", key.display().to_string()),
            // The scheduled drill, which cannot read the archive here.
            None => builder = builder.env("OMNI_BACKUP_DRILL_INTERVAL", "2s"),
        }
        builder.start()
    };
    let mut gw = start(None);
    wait_for_base_backup(&gw);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)").unwrap();
    db.query_one("SELECT pg_switch_wal()", &[]).unwrap();
    db.batch_execute("INSERT INTO kept VALUES (43)").unwrap();
    wait_archived(&mut db);
    let stream = dir.path().join("data/wal/stream");
    wait_until(Duration::from_secs(30), "a completed segment to be encrypted", || (segments(&stream).0.is_empty() && !segments(&stream).1.is_empty()).then_some(()));
    let window = Request::new("GET", "/api/v1/backup/window").api_key().send_to(gw.port);
    assert_eq!(window.json()["encrypted_locally"], true, "{}", window.text());
    let storage = gw.get("/gateway/status").json()["storage"].clone();
    assert_eq!(storage["wal_encrypted_locally"], true, "{storage}");

    // The server holds no private key: an online restore is refused before anything stops.
    let (status, answer) = post_slow(gw.port, "/api/v1/backup/restore-to", &serde_json::json!({"target_time": "latest"}));
    assert_eq!(status, 409, "{answer}\n{}", gw.log());
    let detail = answer["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("OMNI_DECRYPT_IDENTITY_FILE") && detail.contains(&public[..9]) && detail.contains("nothing was changed"), "{answer}");
    assert_eq!(gw.get("/health").status, 200, "{}", gw.log());
    let rows: i64 = gw.db().query_one("SELECT count(*) FROM kept", &[]).unwrap().get(0);
    assert_eq!(rows, 2, "the data serves as it was");

    wait_until(Duration::from_secs(30), "the scheduled drill to say why it is skipped", || gw.log().contains("restore drill skipped").then_some(()));
    let log = gw.log();
    let said = log.lines().find(|l| l.contains("restore drill skipped")).unwrap();
    assert!(said.contains("OMNI_DECRYPT_IDENTITY_FILE") && said.contains(&public[..9]), "{said}");
    assert!(!log.contains("RESTORE DRILL FAILED") && !dir.path().join("data/wal/drill.json").exists(), "a skipped drill is no failed one: {log}");

    // The drill by hand: refused without the key, passes with it.
    let env = |identity: Option<&Path>| {
        let mut env = vec![("OMNI_ENCRYPT_LOCAL", "true".to_string()), ("OMNI_ENCRYPT_RECIPIENTS", public.clone())];
        env.extend(identity.map(|k| ("OMNI_DECRYPT_IDENTITY_FILE", k.display().to_string())));
        env
    };
    let (ok, out, err) = cli_env(dir.path(), &["backup", "verify"], &env(None));
    assert!(!ok && err.contains("OMNI_DECRYPT_IDENTITY_FILE"), "a drill without the key:\n{out}\n{err}");
    let (ok, out, err) = cli_env(dir.path(), &["backup", "verify"], &env(Some(&key)));
    assert!(ok && out.contains("restore drill passed"), "a drill with the key:\n{out}\n{err}");
    assert!(gw.terminate().success(), "{}", gw.log());

    // With OMNI_DECRYPT_IDENTITY_FILE the online restore runs and brings everything back.
    let gw = start(Some(&key));
    let (status, answer) = post_slow(gw.port, "/api/v1/backup/restore-to", &serde_json::json!({"target_time": "latest"}));
    assert_eq!(status, 200, "{answer}\n{}", gw.log());
    let rows: i64 = gw.db().query_one("SELECT count(*) FROM kept", &[]).unwrap().get(0);
    assert_eq!(rows, 2, "every row is back after the restore to latest\n{}", gw.log());
}

/// A logical backup's files in the backup directory (plain and sealed alike).
fn backup_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("data/backups")).into_iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("omni_backup_"))).collect()
}

/// `POST /api/v1/backup/restore/{name}`, asked again while another backup
/// operation holds the directory (the shipper's retention after an upload).
fn restore_logical(port: u16, name: &str) -> (u16, serde_json::Value) {
    wait_until(Duration::from_secs(30), "the backup directory to be free for a restore", || {
        let (status, answer) = post_slow(port, &format!("/api/v1/backup/restore/{name}"), &serde_json::json!({}));
        (answer["code"] != "backup_busy").then_some((status, answer))
    })
}

fn backups_listed(port: u16) -> Vec<serde_json::Value> {
    let list = Request::new("GET", "/api/v1/backup/list").api_key().send_to(port);
    assert_eq!(list.status, 200, "{}", list.text());
    list.json()["backups"].as_array().unwrap().clone()
}

/// Without a WAL archive (`OMNI_WAL_DIR=off`) there is only the logical
/// backups to encrypt: the start is not refused, says so, and a backup is
/// an age file that Debian's `age` opens into the dump.
#[test]
fn pitr_local_crypt_with_the_wal_archive_off_keeps_the_logical_backups_encrypted() {
    let keys = workdir();
    let (key, public) = keygen(keys.path(), "key.txt");
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_WAL_DIR", "off")
        .env("OMNI_ENCRYPT_LOCAL", "true")
        .env("OMNI_ENCRYPT_RECIPIENTS", public)
        .start();
    assert!(gw.log().contains("OMNI_ENCRYPT_LOCAL: the logical backups of") && gw.log().contains("there is no WAL archive"), "{}", gw.log());
    let created = Request::new("POST", "/api/v1/backup/create").api_key().send_to(gw.port);
    assert_eq!(created.status, 200, "{}\n{}", created.text(), gw.log());
    let name = created.json()["backup_file"].as_str().unwrap().to_owned();
    let local = dir.path().join(format!("data/backups/{name}.age"));
    assert!(is_age(&local), "{} is not an age file: {:?}", local.display(), backup_files(dir.path()));
    assert!(!dir.path().join(format!("data/backups/{name}")).exists(), "a plain copy is left beside it");
    assert!(age_decrypt(&key, &local, false).starts_with(b"--\n-- PostgreSQL database dump"), "age -d gives the dump");
    let listed = backups_listed(gw.port);
    assert!(listed.iter().any(|b| b["filename"] == name.as_str() && b["encrypted"] == true), "{listed:?}");
}

#[test]
fn pitr_local_crypt_logical_backups_are_kept_encrypted_and_restored_only_with_the_identity() {
    use sha2::Digest;
    let keys = workdir();
    let (key, public) = keygen(keys.path(), "key.txt");
    let dir = workdir();
    let bucket = keys.path().join("bucket");
    let start = |identity: Option<&Path>| {
        let mut builder = GatewayBuilder::new(dir.path())
            .env("OMNI_API_KEY", TEST_API_KEY)
            .env("OMNI_ENCRYPT_LOCAL", "true")
            .env("OMNI_ENCRYPT_RECIPIENTS", public.clone())
            .env("OMNI_BACKUP_KEEP", "2")
            .env("OMNI_REPOSITORY_URL", format!("file://{}", bucket.display()));
        if let Some(key) = identity {
            builder = builder.env("OMNI_DECRYPT_IDENTITY_FILE", key.display().to_string());
        }
        builder.start()
    };
    const CANARY: &str = "canary-row-5e1f7a-plain-text";
    let mut gw = start(None);
    gw.db().batch_execute(&format!("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('{CANARY}')")).unwrap();
    let mut names = Vec::new();
    for _ in 0..3 {
        let created = Request::new("POST", "/api/v1/backup/create").api_key().send_to(gw.port);
        assert_eq!(created.status, 200, "{}\n{}", created.text(), gw.log());
        names.push(created.json()["backup_file"].as_str().unwrap().to_owned());
    }
    let newest = names.last().unwrap().clone();

    // Nothing plain on disk: every backup file is an age file; no file under
    // the data root holds a dump's text or the row (PostgreSQL's own files aside).
    let local = dir.path().join(format!("data/backups/{newest}.age"));
    assert!(is_age(&local), "{} is not an age file: {:?}", local.display(), backup_files(dir.path()));
    assert!(!dir.path().join(format!("data/backups/{newest}")).exists(), "a plain copy is left beside it");
    // (The WAL being written and PostgreSQL's own files hold the row, not a dump.)
    let postgres = gw.data_dir();
    for file in files_under(dir.path()).into_iter().filter(|p| !p.starts_with(&postgres)) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(b"PostgreSQL database dump"), "{} holds a dump in plain text", file.display());
        assert!(!file.starts_with(dir.path().join("data/backups")) || !has(CANARY.as_bytes()), "{} holds the row in plain text", file.display());
    }
    // Debian's age opens it with the key: the dump made, whose sha256 is the one recorded, and it loads.
    let dump = age_decrypt(&key, &local, false);
    assert!(dump.starts_with(b"--\n-- PostgreSQL database dump") && String::from_utf8_lossy(&dump).contains(CANARY), "age -d gives the dump");
    let recorded = std::fs::read_to_string(dir.path().join(format!("data/backups/{newest}.sha256"))).unwrap();
    let digest: String = sha2::Sha256::digest(&dump).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(recorded, format!("{digest}  {newest}\n"), "the .sha256 is the decrypted dump's, as sha256sum -c reads it");
    gw.db().batch_execute("CREATE DATABASE loadcheck").unwrap();
    let plain = keys.path().join("dump.sql");
    std::fs::write(&plain, &dump).unwrap();
    let password = std::fs::read_to_string(dir.path().join("data/postgres.password")).unwrap();
    let loaded = Command::new(omni_tests::pg_bin_dir().join("psql"))
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-h", "127.0.0.1", "-p", &gw.pg_port.to_string(), "-U", "postgres", "-d", "loadcheck", "-f"])
        .arg(&plain)
        .env("PGPASSWORD", password.trim())
        .output()
        .unwrap();
    assert!(loaded.status.success(), "the decrypted dump loads: {}", String::from_utf8_lossy(&loaded.stderr));

    // Listed as the same backups, encrypted; the download is the age file, said so.
    let listed = backups_listed(gw.port);
    let entry = listed.iter().find(|b| b["filename"] == newest.as_str()).unwrap_or_else(|| panic!("{newest} is not listed: {listed:?}"));
    assert_eq!(entry["encrypted"], true, "{entry}");
    assert_eq!(entry["size_bytes"], std::fs::metadata(&local).unwrap().len(), "{entry}");
    let download = Request::new("GET", format!("/api/v1/backup/download/{newest}")).api_key().send_to(gw.port);
    assert_eq!(download.status, 200, "{}", download.text());
    assert_eq!(download.header("x-omni-backup-encrypted"), Some("age"));
    assert!(download.header("content-disposition").is_some_and(|d| d.contains(&format!("{newest}.age"))), "{:?}", download.header("content-disposition"));
    assert!(download.body == std::fs::read(&local).unwrap(), "the download is the sealed file as it is");

    // Off-site: the object is the local file as it is; once confirmed,
    // OMNI_BACKUP_KEEP=2 lets the oldest go.
    wait_until(Duration::from_secs(60), "the oldest backup to be uploaded, then deleted by retention", || {
        (!dir.path().join(format!("data/backups/{}.age", names[0])).exists()).then_some(())
    });
    let remote = bucket.join(format!("logical/{newest}"));
    wait_until(Duration::from_secs(30), "the newest backup's object, the local file as it is", || (std::fs::read(&remote).ok()? == std::fs::read(&local).unwrap()).then_some(()));
    let sidecar = bucket.join(format!("logical/{newest}.sha256"));
    wait_until(Duration::from_secs(30), "the newest backup's .sha256 object", || sidecar.is_file().then_some(()));
    assert!(is_age(&sidecar), "its .sha256 is encrypted off-site, as every object");
    let listed = backups_listed(gw.port);
    let kept: Vec<&str> = listed.iter().map(|b| b["filename"].as_str().unwrap()).collect();
    assert_eq!(kept, vec![names[2].as_str(), names[1].as_str()], "retention counts the encrypted backups: {listed:?}");
    assert!(listed.iter().all(|b| b["encrypted"] == true && b["kind"] == "backup"), "{listed:?}");

    // Without the identity: refused before anything is touched, naming what it needs.
    gw.db().batch_execute("INSERT INTO secrets VALUES ('written after the backup')").unwrap();
    let (status, answer) = restore_logical(gw.port, &newest);
    assert_eq!(status, 409, "{answer}\n{}", gw.log());
    assert_eq!(answer["code"], "identity_needed", "{answer}");
    let detail = answer["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("OMNI_DECRYPT_IDENTITY_FILE") && detail.contains(&public[..9]) && detail.contains(&public[public.len() - 8..]), "{answer}");
    let rows: i64 = gw.db().query_one("SELECT count(*) FROM secrets", &[]).unwrap().get(0);
    assert_eq!(rows, 2, "the database is unchanged");
    assert_eq!(backups_listed(gw.port).len(), 2, "no safety backup was taken");
    assert!(gw.terminate().success(), "{}", gw.log());

    // With OMNI_DECRYPT_IDENTITY_FILE: restored, after a safety backup (encrypted too).
    let gw = start(Some(&key));
    let (status, answer) = restore_logical(gw.port, &newest);
    assert_eq!(status, 200, "{answer}\n{}", gw.log());
    let rows: Vec<String> = gw.db().query("SELECT v FROM secrets", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, vec![CANARY.to_owned()], "the backup's rows, none written after it");
    let safety = answer["safety_backup"].as_str().unwrap().to_owned();
    let listed = backups_listed(gw.port);
    let entry = listed.iter().find(|b| b["filename"] == safety.as_str()).unwrap_or_else(|| panic!("{safety} is not listed: {listed:?}"));
    assert!(entry["kind"] == "safety" && entry["encrypted"] == true, "{entry}");
    let undo = age_decrypt(&key, &dir.path().join(format!("data/backups/{safety}.age")), false);
    assert!(String::from_utf8_lossy(&undo).contains("written after the backup"), "the safety backup holds the database as it was before");

    // The CLI: refused without the key, naming the variable; with --identity, restored.
    let env = vec![("OMNI_ENCRYPT_LOCAL", "true".to_string()), ("OMNI_ENCRYPT_RECIPIENTS", public.clone()), ("OMNI_BACKUP_KEEP", "2".to_string())];
    // (Asked again while the shipper's retention holds the directory.)
    let cli_free = |args: &[&str]| wait_until(Duration::from_secs(30), "the backup directory to be free", || {
        let (ok, out, err) = cli_env(dir.path(), args, &env);
        (!err.contains("another backup operation is running")).then_some((ok, out, err))
    });
    let (ok, out, err) = cli_free(&["backup", "restore", &names[1]]);
    assert!(!ok && err.contains("OMNI_DECRYPT_IDENTITY_FILE") && err.contains(&public[..9]), "a CLI restore without the key:\n{out}\n{err}");
    let (ok, out, err) = cli_free(&["backup", "restore", &names[1], "--identity", &key.display().to_string()]);
    assert!(ok && out.contains(&format!("restored {}", names[1])), "a CLI restore with --identity:\n{out}\n{err}");
    let (ok, out, _) = cli_env(dir.path(), &["backup", "list"], &env);
    assert!(ok && out.contains(&names[1]) && out.contains("encrypted"), "{out}");
}
