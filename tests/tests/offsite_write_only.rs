//! The off-site repository with write-only credentials (the ransomware-
//! resistant mode), against SeaweedFS (tests/src/stores.rs): an identity
//! with Read, Write and List on the bucket and a bucket policy denying it
//! s3:DeleteObject. The test proves first that the identity can put and
//! cannot delete (a signed DELETE gets 403, the object stays); then a
//! gateway with `OMNI_REPOSITORY_DELETE=false`, encryption on and windows of
//! one second ships base backups and WAL with it, retention counts what it
//! would delete and deletes nothing, and no DELETE ever reaches the store
//! (SeaweedFS logs each DeleteObjectHandler it runs; the listing never
//! loses a name). Last, an object planted under the name of the segment
//! being written (junk, through the store's API): the shipper refuses to
//! overwrite it, the status names it and says uploads stopped, the junk is
//! still there and the local segment is kept.

use crate::gateway;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gateway::{generation, oldest_base_backup, take_base_backup, two_base_backups_a_second_apart, wait_archived, wait_for_base_backup, wait_for_repository as wait_for, workdir, Gateway, GatewayBuilder};
use omni_tests::stores::{S3Identity, StoreServer, BUCKET};
use omni_tests::{wait_until, TEST_API_KEY};

const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
const PREFIX: &str = "wonly";

/// A new age key pair by Debian's `age-keygen`: the public key.
fn recipient(dir: &Path) -> String {
    let key = dir.join("key.txt");
    let out = Command::new("age-keygen").arg("-o").arg(&key).output().expect("age-keygen (Debian's age package) is installed");
    assert!(out.status.success(), "age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let public = Command::new("age-keygen").arg("-y").arg(&key).output().unwrap();
    String::from_utf8(public.stdout).unwrap().trim().to_owned()
}

fn repository(gw: &Gateway) -> serde_json::Value {
    gw.get("/gateway/status").json()["repository"].clone()
}

/// The lines of the store's log that say it ran a delete.
fn deletes_run(store: &StoreServer) -> Vec<String> {
    store.log().lines().filter(|l| l.contains("DeleteObjectHandler") || l.contains("DeleteMultipleObjectsHandler")).map(str::to_owned).collect()
}

/// What the writer reads at `name` (the whole name in the bucket).
fn object(store: &StoreServer, name: &str) -> Vec<u8> {
    let got = store.signed_s3(S3Identity::Writer, "GET", &format!("/{BUCKET}/{name}"), "", b"");
    assert_eq!(got.status, 200, "GET {name}: {}", got.text());
    got.body
}

/// Names seen so far must all still be listed: the store never loses one.
fn never_fewer(store: &StoreServer, seen: &mut BTreeSet<String>, when: &str) {
    let now: BTreeSet<String> = store.list(&format!("{PREFIX}/")).into_iter().collect();
    let gone: Vec<&String> = seen.difference(&now).collect();
    assert!(gone.is_empty(), "{when}: objects left the store under write-only credentials: {gone:?}");
    *seen = now;
}

#[test]
fn offsite_write_only_credentials_run_without_deleting_and_an_overwrite_is_refused_keeping_local_wal() {
    let store = StoreServer::start_seaweed_write_only();

    // The credential the gateway gets can put and read, and cannot delete.
    let proof = format!("/{BUCKET}/proof/object");
    let put = store.signed_s3(S3Identity::Writer, "PUT", &proof, "", b"written by the write-only identity");
    assert_eq!(put.status, 200, "the writer puts: {}\n{}", put.text(), store.log());
    let refused = store.signed_s3(S3Identity::Writer, "DELETE", &proof, "", b"");
    assert_eq!(refused.status, 403, "the writer's DELETE is refused: {}", refused.text());
    assert!(refused.text().contains("AccessDenied"), "{}", refused.text());
    assert_eq!(object(&store, "proof/object"), b"written by the write-only identity", "the object stays");
    // The refusal is the policy's: the admin identity deletes the same object.
    let admin = store.signed_s3(S3Identity::Admin, "DELETE", &proof, "", b"");
    assert_eq!(admin.status, 204, "the admin deletes: {}", admin.text());
    let deletes_before = deletes_run(&store).len();
    assert_eq!(deletes_before, 1, "the store logs the delete it ran, and only that one: {:?}", deletes_run(&store));

    // A gateway with those credentials, nothing deleted, encrypted, windows of 1 s.
    let keys = workdir();
    let public = recipient(keys.path());
    let dir = workdir();
    let mut builder = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_REPOSITORY_URL", store.url(PREFIX))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_REPOSITORY_DELETE", "false")
        .env("OMNI_PITR_WINDOW", "1s")
        .env("OMNI_REPOSITORY_WINDOW", "1s")
        .env("OMNI_ENCRYPT_RECIPIENTS", public.clone());
    for (k, v) in store.env() {
        builder = builder.env(k, v.clone());
    }
    let gw = builder.start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let manifest = |id: &str| format!("{PREFIX}/{gen}/base/{id}/manifest.json");
    let first = oldest_base_backup(dir.path());
    wait_for(&gw, Duration::from_secs(120), "the first base backup in the store", || store.list(&format!("{PREFIX}/")).contains(&manifest(&first)).then_some(()));
    let status = wait_for(&gw, Duration::from_secs(60), "the probe's answer on conditional writes", || {
        let r = repository(&gw);
        r["conditional_writes"].is_boolean().then_some(r)
    });
    assert_eq!(status["conditional_writes"], true, "SeaweedFS honours If-None-Match for the write-only identity too: {status}");
    let mut seen = BTreeSet::new();
    never_fewer(&store, &mut seen, "after the first base backup");

    // WAL in chunks, then whole (with deletion on, the chunks would go).
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE wonly_rows (id int); INSERT INTO wonly_rows SELECT generate_series(1, 1000)").unwrap();
    let segment: String = db.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]).unwrap().get(0);
    let wal = format!("{PREFIX}/{gen}/wal/");
    let chunks = format!("{wal}{segment}.chunks/");
    wait_for(&gw, Duration::from_secs(30), "a chunk of the segment being written", || store.list(&chunks).first().cloned());
    db.batch_execute("SELECT pg_switch_wal()").unwrap();
    wait_archived(&mut db);
    wait_for(&gw, Duration::from_secs(30), &format!("{segment} whole in the store"), || store.holds_wal(&wal, &segment, u64::MAX).then_some(()));
    never_fewer(&store, &mut seen, "after a whole segment");

    // Two more base backups: the first and the WAL before the second are past both windows.
    let third = two_base_backups_a_second_apart(&gw);
    wait_for(&gw, Duration::from_secs(120), "the third base backup in the store", || store.list(&format!("{PREFIX}/")).contains(&manifest(&third)).then_some(()));
    let retention = wait_for(&gw, Duration::from_secs(60), "the status to count what the window no longer needs", || {
        let r = repository(&gw)["retention"].clone();
        (r["kept_past_window"].as_u64().unwrap_or(0) >= 2).then_some(r)
    });
    assert_eq!(retention["delete"], false, "{retention}");
    assert_eq!(retention["deleted_objects"], 0, "{retention}");
    assert!(retention["summary"].as_str().unwrap_or_default().contains("deletion is off (OMNI_REPOSITORY_DELETE=false)"), "{retention}");
    let status = repository(&gw);
    assert_eq!(status["state"], "ok", "no failure with write-only credentials: {status}");
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    assert!(!gw.log().contains("AccessDenied"), "the gateway never asked for what the credentials refuse:\n{}", gw.log());
    never_fewer(&store, &mut seen, "after retention ran");
    assert!(seen.contains(&manifest(&first)) && seen.iter().any(|n| n.starts_with(&chunks)), "the first base backup and the chunks of a whole segment stay");
    assert_eq!(deletes_run(&store).len(), deletes_before, "a DELETE reached the store: {:?}", deletes_run(&store));

    // Everything the gateway wrote is an age file.
    let plain: Vec<&String> = seen.iter().filter(|n| !object(&store, n).starts_with(AGE_MAGIC)).collect();
    assert!(plain.is_empty(), "objects that are not age files: {plain:?}");

    // An object already there under the name the current segment takes
    // once it is whole, with other content: never overwritten, uploads stop.
    // A row first: right after a WAL switch (the base backup's) the WAL
    // position is at a segment's boundary, where pg_walfile_name names the
    // segment before it, complete and uploaded already.
    db.batch_execute("INSERT INTO wonly_rows VALUES (0)").unwrap();
    let current: String = db.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]).unwrap().get(0);
    let planted = format!("{wal}{current}.lz4");
    let junk = b"not this cluster's WAL: planted before the segment was complete".to_vec();
    let put = store.signed_s3(S3Identity::Writer, "PUT", &format!("/{BUCKET}/{planted}"), "", &junk);
    assert_eq!(put.status, 200, "planting {planted}: {}", put.text());
    db.batch_execute("INSERT INTO wonly_rows SELECT generate_series(1001, 1100); SELECT pg_switch_wal()").unwrap();
    wait_archived(&mut db);
    let stopped = wait_for(&gw, Duration::from_secs(60), "the repository entry to say uploads stopped", || {
        let r = repository(&gw);
        (r["state"] == "stopped").then_some(r)
    });
    let error = stopped["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("{current}.lz4")) && error.contains("other content") && error.contains("not overwritten"), "the error names the object and what was done: {stopped}");
    assert!(gw.log().contains(&format!("{current}.lz4")), "the log names it too");
    assert_eq!(object(&store, &planted), junk, "the planted object was overwritten");
    let local = dir.path().join("data/wal/stream").join(&current);
    assert!(local.is_file(), "the local segment {current} is kept while its upload is refused");
    // A base backup after the stop runs local retention: the unconfirmed segment stays.
    let fourth = take_base_backup(&gw);
    wait_until(Duration::from_secs(60), "the fourth base backup locally", || dir.path().join(format!("data/wal/base/{fourth}.json")).is_file().then_some(()));
    assert!(local.is_file(), "local retention deleted {current}, whose upload was refused");
    assert!(!store.list(&format!("{PREFIX}/")).contains(&manifest(&fourth)), "an upload went on after the conflict");
    never_fewer(&store, &mut seen, "after the conflict");
    assert_eq!(deletes_run(&store).len(), deletes_before, "a DELETE reached the store: {:?}", deletes_run(&store));
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "a stopped repository does not fail /health: {}", health.text());
}
