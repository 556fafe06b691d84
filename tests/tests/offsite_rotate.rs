//! Key rotation in an encrypted off-site repository, end to end against
//! `rclone serve s3` (objects kept as plain files the test reads with
//! Debian's `age -d`): backups under key A, the recipients switched to B
//! (new objects are for B, old ones stay for A, a restore with A alone is
//! refused naming B), then `backup reencrypt --identity A` (refused while
//! the gateway runs, with a key that opens nothing, without encryption)
//! gives every object a copy B opens, keeping the old ones with
//! `OMNI_REPOSITORY_DELETE=false` and deleting them otherwise (a run cut
//! off is finished by the next); the gateway started again reads the new
//! manifests (from the plain copies the rotation left it); a restore with
//! B alone brings back every row, from the mixed repository (to a time
//! before the second base backup: the copies of A's backup and WAL, B's
//! own WAL) and from the rotated one. And the public-cloud warning: a
//! repository on a public cloud without encryption is warned about once,
//! in the log and in the status the Backups page shows; with encryption or
//! an endpoint of its own, not at all.

use crate::gateway;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gateway::{cli_env, keygen, oldest_base_backup, take_base_backup, wait_archived, wait_for_base_backup, wait_for_repository as wait_for, workdir, write_a_note_t_write_b, Gateway, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::TEST_API_KEY;


/// Whether `age -d -i key` opens `file`.
fn opens(key: &Path, file: &Path) -> bool {
    Command::new("age").arg("-d").arg("-i").arg(key).arg("-o").arg("/dev/null").arg(file).output().unwrap().status.success()
}

/// `age1abcdefg…wxyz` as the gateway shortens a key in its messages: both ends.
fn named(text: &str, key: &str) -> bool {
    text.contains(&key[..9]) && text.contains(&key[key.len() - 8..])
}

fn repository(gw: &Gateway) -> serde_json::Value {
    gw.get("/gateway/status").json()["repository"].clone()
}

/// The objects of the layout under `prefix/` (what the gateway ships and
/// a rotation rewrites), by name in the bucket.
fn objects(store: &StoreServer, prefix: &str) -> Vec<String> {
    store.list(&format!("{prefix}/")).into_iter().filter(|n| n.contains("/wal/") || n.contains("/base/") || n.contains("/logical/")).collect()
}

/// The name of the re-encrypted copy of `name` for the keys tag `tag`
/// (README, "Rotating the key"): a base backup's directory takes the tag,
/// any other object its name.
fn copy_of(name: &str, tag: &str) -> String {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.iter().position(|p| *p == "base") {
        Some(at) if parts.len() == at + 3 => {
            let mut parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
            parts[at + 1] = format!("{}.k-{tag}", parts[at + 1]);
            parts.join("/")
        }
        _ => format!("{name}.k-{tag}"),
    }
}

/// Deletes the object `name` through the S3 API (rclone as a client), as
/// a cut-off run leaves the bucket: removing its file behind `rclone
/// serve s3` would leave the server's listing cache stale.
fn delete_object(store: &StoreServer, name: &str) {
    let env = store.env();
    let remote = format!(":s3,provider=Other,env_auth=true,endpoint='{}':{}/{name}", env["AWS_ENDPOINT_URL"], omni_tests::stores::BUCKET);
    let out = Command::new(omni_tests::stores::tool("rclone")).args(["deletefile", &remote]).envs(env.iter()).output().unwrap();
    assert!(out.status.success(), "rclone deletefile {name}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!store.list(name).contains(&name.to_string()), "{name} is still listed");
}

#[test]
fn offsite_rotate_reencrypt_gives_every_object_a_copy_for_the_new_key_and_restores_with_it_alone() {
    let store = StoreServer::start_new(Kind::Rclone);
    let keys = workdir();
    let (key_a, public_a) = keygen(keys.path(), "a.txt");
    let (key_b, public_b) = keygen(keys.path(), "b.txt");
    let (key_c, _) = keygen(keys.path(), "c.txt");
    let recipients = keys.path().join("recipients.txt");
    std::fs::write(&recipients, format!("{public_a}\n")).unwrap();
    let url = store.url("rot");
    let mut env: Vec<(&str, String)> = store.env().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    env.extend([("OMNI_REPOSITORY_URL", url.clone()), ("OMNI_ENCRYPT_RECIPIENTS_FILE", recipients.display().to_string())]);
    let source = workdir();
    let builder = || {
        let mut b = GatewayBuilder::new(source.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_REPOSITORY_WAL_INTERVAL", "1s");
        for (k, v) in &env {
            b = b.env(k, v.clone());
        }
        b
    };

    // Under key A: a base backup, rows, a whole segment.
    let mut gw = builder().start();
    wait_for_base_backup(&gw);
    let first = oldest_base_backup(source.path());
    let manifest = wait_for(&gw, Duration::from_secs(180), &format!("base/{first}/manifest.json in the store"), || {
        store.list("rot/").into_iter().find(|n| n.ends_with(&format!("/base/{first}/manifest.json")))
    });
    let gen = manifest.split('/').nth(1).unwrap().to_owned();
    let wal = format!("rot/{gen}/wal/");
    write_a_note_t_write_b(&gw);
    let mut db = gw.db();
    let seg_a: String = db.query_one("SELECT file_name FROM pg_walfile_name_offset(pg_switch_wal())", &[]).unwrap().get(0);
    wait_archived(&mut db);
    wait_for(&gw, Duration::from_secs(60), &format!("{seg_a} whole in the store"), || store.holds_wal(&wal, &seg_a, u64::MAX).then_some(()));
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());

    // Switched to key B (restart): new objects are for B, the old stay for A.
    std::fs::write(&recipients, format!("# rotated\n{public_b}\n")).unwrap();
    let mut gw = builder().start();
    let mut db = gw.db();
    for i in 100..150 {
        db.execute("INSERT INTO pitr_rows VALUES ($1, 'B')", &[&i]).unwrap();
    }
    let seg_b: String = db.query_one("SELECT file_name FROM pg_walfile_name_offset(pg_switch_wal())", &[]).unwrap().get(0);
    wait_archived(&mut db);
    wait_for(&gw, Duration::from_secs(60), &format!("{seg_b} whole in the store"), || store.holds_wal(&wal, &seg_b, u64::MAX).then_some(()));
    // T, before the second base backup: a restore to T starts from the first
    // (A's) and replays WAL of both keys.
    let t: String = db.query_one(r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#, &[]).unwrap().get(0);
    let second = take_base_backup(&gw);
    wait_for(&gw, Duration::from_secs(180), &format!("base/{second}/manifest.json in the store"), || {
        store.list("rot/").into_iter().find(|n| n.ends_with(&format!("/base/{second}/manifest.json")))
    });
    for (segment, key, other) in [(&seg_a, &key_a, &key_b), (&seg_b, &key_b, &key_a)] {
        let file = store.rclone_object_file(&format!("{wal}{segment}.lz4"));
        assert!(opens(key, &file) && !opens(other, &file), "{segment} opens with {} alone", key.display());
    }
    assert!(opens(&key_b, &store.rclone_object_file(&format!("rot/{gen}/base/{second}/base.tar.lz4"))), "the new base backup is for B");

    // The rotation is refused while the gateway runs.
    let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key_a.display().to_string()], &env);
    assert!(!ok, "reencrypt beside a running gateway:\n{out}\n{err}");
    assert!(err.contains("stop the gateway first") && err.contains("a gateway (pid"), "{err}");
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());

    // A restore with A alone is refused, naming B (the new base backup needs it).
    let fresh = workdir();
    let (ok, out, err) = cli_env(fresh.path(), &["restore", "--from", &url, "--to", "latest", "--identity", &key_a.display().to_string()], &env);
    assert!(!ok, "a restore with the old key alone:\n{out}\n{err}");
    assert!(named(&err, &public_b), "the refusal names the new key: {err}");

    // Refused: a key that opens nothing (nothing written), no encryption configured.
    let before = store.list("rot/");
    let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key_c.display().to_string()], &env);
    assert!(!ok, "reencrypt with a key that opens nothing:\n{out}\n{err}");
    assert!(err.contains("opens none") && named(&err, &public_a), "{err}");
    assert_eq!(store.list("rot/"), before, "a refused rotation wrote or deleted something");
    let plain_env: Vec<(&str, String)> = env.iter().filter(|(k, _)| *k != "OMNI_ENCRYPT_RECIPIENTS_FILE").cloned().collect();
    let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key_a.display().to_string()], &plain_env);
    assert!(!ok && err.contains("no encryption is configured"), "{out}\n{err}");
    assert_eq!(store.list("rot/"), before);

    // OMNI_REPOSITORY_DELETE=false: every object A opens gets a copy B opens; the old stay.
    let old_for_a: Vec<String> = objects(&store, "rot").into_iter().filter(|n| opens(&key_a, &store.rclone_object_file(n))).collect();
    assert!(old_for_a.iter().any(|n| n.ends_with(&format!("{seg_a}.lz4"))) && old_for_a.iter().any(|n| n.ends_with(&format!("/base/{first}/manifest.json"))), "{old_for_a:?}");
    let mut keep_env = env.clone();
    keep_env.push(("OMNI_REPOSITORY_DELETE", "false".into()));
    let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key_a.display().to_string()], &keep_env);
    assert!(ok, "reencrypt with OMNI_REPOSITORY_DELETE=false:\n{out}\n{err}");
    let total = out.split("re-encrypting 1/").nth(1).and_then(|t| t.split(' ').next()).unwrap_or_else(|| panic!("a first progress line: {out}"));
    assert!(out.contains(&format!("re-encrypting {total}/{total} objects")), "a last progress line: {out}");
    assert!(out.contains(&format!("re-encrypted {} objects", old_for_a.len())), "every object A opens is re-encrypted: {out}");
    assert!(out.contains("OMNI_REPOSITORY_DELETE=false") && out.contains("stay"), "{out}");
    let tag = out.split("keys tag k-").nth(1).map(|t| t[..8].to_owned()).unwrap_or_else(|| panic!("the keys tag is said: {out}"));
    let after: BTreeSet<String> = objects(&store, "rot").into_iter().collect();
    for old in &old_for_a {
        assert!(after.contains(old), "{old} was deleted with OMNI_REPOSITORY_DELETE=false");
        let copy = copy_of(old, &tag);
        assert!(after.contains(&copy), "no copy {copy} of {old}: {after:?}");
        let file = store.rclone_object_file(&copy);
        assert!(opens(&key_b, &file) && !opens(&key_a, &file), "the copy {copy} is not for B alone");
    }
    let plain_copy = source.path().join(format!("data/wal/repository-plain/{gen}/base/{first}.k-{tag}/manifest.json"));
    let copied: serde_json::Value = serde_json::from_slice(&std::fs::read(&plain_copy).unwrap_or_else(|e| panic!("{}: {e}", plain_copy.display()))).unwrap();
    assert_eq!(copied["backup"]["id"], format!("{first}.k-{tag}"));
    assert_eq!(copied["recipients"], serde_json::json!([public_b]), "the new manifest names the recipients its files were sealed to");

    // Mixed (old objects and their copies side by side): B alone restores
    // every row to T, from the copy of the first base backup and the copies of A's WAL.
    let mixed = workdir();
    let (ok, out, err) = cli_env(mixed.path(), &["restore", "--from", &url, "--to", &t, "--identity", &key_b.display().to_string()], &env);
    assert!(ok, "restore --from a mixed repository with B:\n{out}\n{err}");
    let mut restored = GatewayBuilder::new(mixed.path()).start();
    let rows: BTreeSet<i32> = restored.db().query("SELECT id FROM pitr_rows", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, (0..150).collect::<BTreeSet<i32>>(), "a restore to T with B from the mixed repository");
    assert!(out.contains(&format!("base backup {first}.k-{tag}")), "the copy of the first base backup was taken: {out}");
    assert!(restored.terminate().success(), "{}", restored.log());

    // A run cut off as it can be: one copy not written yet, and a base
    // backup whose old manifest went but not its files.
    let seg_copy = copy_of(&format!("{wal}{seg_a}.lz4"), &tag);
    delete_object(&store, &seg_copy);
    delete_object(&store, &format!("rot/{gen}/base/{first}/manifest.json"));

    // Again with deletion: the job is finished, the old objects go; every
    // object of the repository opens with B and none with A.
    let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key_a.display().to_string()], &env);
    assert!(ok, "reencrypt:\n{out}\n{err}");
    assert!(out.contains(&format!("deleted {} old objects", old_for_a.len() - 1)), "{out}");
    assert!(objects(&store, "rot").contains(&seg_copy), "the missing copy {seg_copy} was written");
    let now = objects(&store, "rot");
    for old in &old_for_a {
        assert!(!now.contains(old), "{old} is still there");
    }
    for name in &now {
        let file = store.rclone_object_file(name);
        assert!(opens(&key_b, &file) && !opens(&key_a, &file), "{name} is not for B alone");
    }
    // A third run finds nothing to do (it reads the objects written for B
    // under their first names: only a header tells whom an object is for).
    let (ok, out, err) = cli_env(source.path(), &["backup", "reencrypt", "--identity", &key_a.display().to_string()], &env);
    assert!(ok && out.contains("re-encrypted 0 objects") && out.contains("deleted 0 old objects"), "{out}\n{err}");
    assert_eq!(objects(&store, "rot"), now, "a run with nothing to do changed the repository");

    // The gateway, started again, reads the new manifests from the plain
    // copies the rotation left it (it holds public keys only).
    let mut gw = builder().start();
    let retention = wait_for(&gw, Duration::from_secs(60), "a retention round", || {
        let r = repository(&gw)["retention"].clone();
        r["last_run_unix"].is_number().then_some(r)
    });
    assert_eq!(retention["unreadable"], 0, "retention could not read a manifest after the rotation: {retention}");
    assert!(gw.terminate().success(), "{}", gw.log());

    // With A alone a restore is refused; with B alone it brings back every row.
    let (ok, out, err) = cli_env(fresh.path(), &["restore", "--from", &url, "--to", "latest", "--identity", &key_a.display().to_string()], &env);
    assert!(!ok && named(&err, &public_b), "{out}\n{err}");
    let new = workdir();
    let (ok, out, err) = cli_env(new.path(), &["restore", "--from", &url, "--to", "latest", "--identity", &key_b.display().to_string()], &env);
    assert!(ok, "restore --from with B:\n{out}\n{err}\n{}", store.log());
    let gw = GatewayBuilder::new(new.path()).start();
    let rows: BTreeSet<i32> = gw.db().query("SELECT id FROM pitr_rows", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, (0..150).collect::<BTreeSet<i32>>(), "the restored cluster serves every row, those written under A and under B");
}

/// The warning's words (ship.rs).
const PUBLIC_CLOUD: &str = "is a public cloud's store and nothing is encrypted";

#[test]
fn offsite_rotate_public_cloud_without_encryption_is_warned_once_and_not_otherwise() {
    let keys = workdir();
    let (_, public) = keygen(keys.path(), "key.txt");
    // No AWS_ENDPOINT_URL: Amazon S3 itself, out of reach here, so every round fails.
    let cloud = |dir: &Path| {
        GatewayBuilder::new(dir)
            .env("OMNI_REPOSITORY_URL", "s3://omni-rotate-test-bucket/x")
            .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
            .env("AWS_ACCESS_KEY_ID", "AKIAOMNITESTNOTAKEY")
            .env("AWS_SECRET_ACCESS_KEY", "not-a-secret")
            .env("AWS_REGION", "us-east-1")
    };
    let plain = workdir();
    let mut gw = cloud(plain.path()).start();
    wait_for(&gw, Duration::from_secs(120), "three failed upload rounds", || (repository(&gw)["failures"].as_u64()? >= 3).then_some(()));
    let said = gw.log().lines().filter(|l| l.contains(PUBLIC_CLOUD)).count();
    assert_eq!(said, 1, "the warning is logged once across the retries:\n{}", gw.log());
    let status = repository(&gw);
    let warnings = status["warnings"].as_array().cloned().unwrap_or_default();
    assert_eq!(warnings.len(), 1, "{status}");
    let warning = warnings[0].as_str().unwrap();
    assert!(warning.contains(PUBLIC_CLOUD) && warning.contains("s3://omni-rotate-test-bucket/x") && warning.contains("OMNI_ENCRYPT_RECIPIENTS"), "{warning}");
    assert_eq!(gw.get("/health").status, 200, "the service keeps running");
    assert!(gw.terminate().success(), "{}", gw.log());

    // Encrypted: no warning.
    let sealed = workdir();
    let mut gw = cloud(sealed.path()).env("OMNI_ENCRYPT_RECIPIENTS", public.clone()).start();
    wait_for(&gw, Duration::from_secs(120), "a failed upload round", || (repository(&gw)["failures"].as_u64()? >= 1).then_some(()));
    assert_eq!(repository(&gw)["warnings"], serde_json::json!([]));
    assert!(!gw.log().contains(PUBLIC_CLOUD), "{}", gw.log());
    assert!(gw.terminate().success(), "{}", gw.log());

    // An endpoint of its own (a local S3): no warning, though nothing is encrypted.
    let store = StoreServer::start_new(Kind::Rclone);
    let local = workdir();
    let mut builder = GatewayBuilder::new(local.path()).env("OMNI_REPOSITORY_URL", store.url("own")).env("OMNI_REPOSITORY_WAL_INTERVAL", "1s");
    for (k, v) in store.env() {
        builder = builder.env(k, v.clone());
    }
    let mut gw = builder.start();
    wait_for(&gw, Duration::from_secs(120), "an upload", || (repository(&gw)["uploaded_objects"].as_u64()? >= 1).then_some(()));
    assert_eq!(repository(&gw)["warnings"], serde_json::json!([]));
    assert!(!gw.log().contains(PUBLIC_CLOUD), "{}", gw.log());
    assert!(gw.terminate().success(), "{}", gw.log());
}
