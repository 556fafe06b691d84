//! Server-side encryption in the off-site repository passes through to the
//! store: the `object_store` crate reads the standard `AWS_SSE_*` variables
//! (`AWS_SERVER_SIDE_ENCRYPTION`, `AWS_SSE_KMS_KEY_ID`,
//! `AWS_SSE_CUSTOMER_KEY_BASE64`) and the gateway builds its S3 client from
//! them. Shown with SSE-C, a key of the customer's that the store uses and
//! forgets, against SeaweedFS (tests/src/stores.rs), which implements it:
//! every object the gateway wrote refuses a read without the key, the key
//! appears in no log line, status or error, a restore from the bucket
//! without it fails and with it brings every row back. A key set without
//! `AWS_SERVER_SIDE_ENCRYPTION=sse-c`, which the S3 client would silently
//! not send, is refused naming both variables.

use crate::gateway;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use gateway::{cli_env, wait_archived, wait_for_base_backup, wait_for_repository as wait_for, workdir, GatewayBuilder};
use omni_tests::stores::{Kind, S3Identity, StoreServer, BUCKET};
use omni_tests::TEST_API_KEY;

const PREFIX: &str = "sse";

/// A random 256-bit key, base64, as S3 wants SSE-C keys.
fn customer_key() -> String {
    let out = Command::new("openssl").args(["rand", "-base64", "32"]).output().expect("openssl is installed");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn offsite_server_side_encryption_with_a_customer_key_reaches_the_store_and_a_restore_needs_the_key() {
    let store = StoreServer::start_new(Kind::Seaweed);
    let key = customer_key();
    let url = store.url(PREFIX);
    let mut env: Vec<(&str, String)> = store.env().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();

    let dir = workdir();
    let mut builder = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_REPOSITORY_URL", url.clone())
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("AWS_SERVER_SIDE_ENCRYPTION", "sse-c")
        .env("AWS_SSE_CUSTOMER_KEY_BASE64", key.clone());
    for (k, v) in &env {
        builder = builder.env(k, v.clone());
    }
    let gw = builder.start();
    wait_for_base_backup(&gw);
    let listed = || store.list(&format!("{PREFIX}/"));
    let manifest = wait_for(&gw, Duration::from_secs(120), "a base backup's manifest in the store", || listed().into_iter().find(|n| n.ends_with("/manifest.json")));
    let wal = format!("{}/wal/", manifest.split("/base/").next().unwrap());

    let mut db = gw.db();
    db.batch_execute("CREATE TABLE sse_rows (id int); INSERT INTO sse_rows SELECT generate_series(1, 500)").unwrap();
    let segment: String = db.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]).unwrap().get(0);
    db.batch_execute("SELECT pg_switch_wal()").unwrap();
    wait_archived(&mut db);
    wait_for(&gw, Duration::from_secs(60), &format!("{segment}, which holds the rows, whole in the store"), || store.holds_wal(&wal, &segment, u64::MAX).then_some(()));
    let status = gw.get("/gateway/status");
    assert_eq!(status.json()["repository"]["state"], "ok", "{}", status.text());

    // The store holds every object under the customer's key: a read without it is refused.
    let names: BTreeSet<String> = listed().into_iter().collect();
    assert!(names.len() >= 4, "a base backup, its manifest and WAL: {names:?}");
    for name in &names {
        let plain = store.signed_s3(S3Identity::Admin, "GET", &format!("/{BUCKET}/{name}"), "", b"");
        assert_eq!(plain.status, 400, "{name} was read without the customer key: {}", plain.text());
        assert!(plain.text().contains("customer key"), "{name}: {}", plain.text());
    }

    // The key is a secret: in no log line, no status.
    assert!(!gw.log().contains(&key), "the SSE-C key is in the log");
    assert!(!status.text().contains(&key), "the SSE-C key is in the status");
    drop(db);
    drop(gw);

    // A new machine: without the key the store refuses the reads, with it every row is back.
    let fresh = workdir();
    let (ok, out, err) = cli_env(fresh.path(), &["restore", "--from", &url, "--to", "latest"], &env);
    assert!(!ok, "a restore without the SSE-C key:\n{out}\n{err}");
    assert!(err.contains("customer key"), "the store's reason is passed on: {err}");
    // The key alone would not be sent (the S3 client wants the kind too): refused, not ignored.
    env.push(("AWS_SSE_CUSTOMER_KEY_BASE64", key.clone()));
    let (ok, out, err) = cli_env(fresh.path(), &["restore", "--from", &url, "--to", "latest"], &env);
    assert!(!ok, "a restore with the key and no AWS_SERVER_SIDE_ENCRYPTION:\n{out}\n{err}");
    assert!(err.contains("AWS_SERVER_SIDE_ENCRYPTION=sse-c") && !err.contains(&key), "{err}");
    env.push(("AWS_SERVER_SIDE_ENCRYPTION", "sse-c".to_owned()));
    let new = workdir();
    let (ok, out, err) = cli_env(new.path(), &["restore", "--from", &url, "--to", "latest"], &env);
    assert!(ok, "restore --from with the SSE-C key:\n{out}\n{err}\n{}", store.log());
    assert!(!out.contains(&key) && !err.contains(&key), "the SSE-C key is in the restore's output");
    let gw = GatewayBuilder::new(new.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let count: i64 = gw.db().query_one("SELECT count(*) FROM sse_rows", &[]).unwrap().get(0);
    assert_eq!(count, 500, "the restored cluster serves every row");
}
