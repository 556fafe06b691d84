//! The off-site repository as users see it, against real object stores
//! (tests/src/stores.rs): the off-site window of `GET /api/v1/backup/window`
//! read from the bucket, `OMNI_REPOSITORY_DELETE=false` with retention
//! due, and a store killed in the middle of a base backup's multipart
//! upload. What the store holds is read through its own API (object_store,
//! as a second client), never through the gateway.

use crate::gateway;

use std::time::Duration;

use gateway::{generation, two_base_backups_a_second_apart, wait_for_base_backup, wait_for_repository as wait_for, workdir, Gateway, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::{wait_until, Request, TEST_API_KEY};


fn builder(dir: &std::path::Path, store: &StoreServer, prefix: &str) -> GatewayBuilder {
    let mut b = GatewayBuilder::new(dir).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_REPOSITORY_URL", store.url(prefix)).env("OMNI_REPOSITORY_WAL_INTERVAL", "1s");
    for (k, v) in store.env() {
        b = b.env(k, v.clone());
    }
    b
}

fn window(gw: &Gateway) -> serde_json::Value {
    let answer = Request::new("GET", "/api/v1/backup/window").api_key().send_to(gw.port);
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

/// A time of the window: RFC 3339 in UTC with milliseconds, so that text order is time order.
fn time(v: &serde_json::Value) -> String {
    let t = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    assert!(t.len() == 24 && t.ends_with('Z'), "{t}");
    t.to_owned()
}

#[test]
fn offsite_window_is_read_from_the_bucket_beside_the_local_one() {
    let mut store = StoreServer::start_new(Kind::Rclone);
    let dir = workdir();
    let gw = builder(dir.path(), &store, "window").start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);

    // The base backup and the WAL after it reach the bucket: the window is theirs.
    let w = wait_for(&gw, Duration::from_secs(90), "an off-site window with a latest time", || {
        let w = window(&gw);
        w["offsite"]["latest"].is_string().then_some(w)
    });
    let offsite = &w["offsite"];
    assert_eq!(offsite["repository"], store.url("window"), "{w}");
    assert_eq!(offsite["generation"], gen, "{w}");
    assert_eq!(offsite["error"], serde_json::Value::Null, "{w}");
    assert_eq!(offsite["base_backups"], 1, "{w}");
    assert!(offsite["wal_objects"].as_u64().unwrap() >= 1, "{w}");
    let local_base = &w["base_backups"][0];
    assert_eq!(time(&offsite["earliest"]), time(&local_base["finished_at"]), "off-site starts where its one base backup ended: {w}");
    assert_eq!(w["earliest"], offsite["earliest"], "the local window is still there, beside it: {w}");
    let first_latest = time(&offsite["latest"]);
    assert!(first_latest >= time(&offsite["earliest"]), "{w}");

    // New writes: the off-site latest moves with the WAL that reaches the bucket.
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE window_rows (id int); INSERT INTO window_rows SELECT generate_series(1, 100)").unwrap();
    wait_for(&gw, Duration::from_secs(30), "the off-site latest to move past the first", || {
        let w = window(&gw);
        (time(&w["offsite"]["latest"]) > first_latest).then_some(w)
    });

    // The store down: the window still answers, the off-site part says why it is unknown.
    store.stop();
    let down = wait_for(&gw, Duration::from_secs(60), "the off-site window to say the bucket cannot be read", || {
        let w = window(&gw);
        w["offsite"]["error"].is_string().then_some(w)
    });
    assert!(down["offsite"]["error"].as_str().unwrap().contains("could not be listed"), "{down}");
    assert_eq!(down["offsite"]["earliest"], serde_json::Value::Null, "{down}");
    assert!(down["earliest"].is_string(), "the local window is unaffected: {down}");
    for (name, value) in store.env() {
        if name.contains("SECRET") {
            assert!(!down.to_string().contains(value.as_str()), "{name}'s value in {down}");
        }
    }
}

/// Every object under `prefix` of the store, read by a second client of
/// its own (the store code with the store's credentials in this test's
/// environment: nextest runs each test in a process of its own), by name
/// with its size.
fn listing(store: &StoreServer, prefix: &str) -> std::collections::BTreeMap<String, u64> {
    let (repo, rt) = client(store, prefix);
    rt.block_on(repo.list("")).unwrap().into_iter().map(|o| (format!("{prefix}/{}", o.path), o.size)).collect()
}

/// A client of the store of its own, at `prefix`.
fn client(store: &StoreServer, prefix: &str) -> (omni_gateway::repository::store::Repository, tokio::runtime::Runtime) {
    for (k, v) in store.env() {
        std::env::set_var(k, v);
    }
    let repo = omni_gateway::repository::store::Repository::open(&store.url(prefix)).unwrap();
    (repo, tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

#[test]
fn offsite_delete_false_keeps_every_object_with_retention_due_and_says_so() {
    let store = StoreServer::start_new(Kind::Rclone);
    let dir = workdir();
    let gw = builder(dir.path(), &store, "keep")
        // Both windows as short as can be: retention is due at every base backup.
        .env("OMNI_PITR_WINDOW", "1s")
        .env("OMNI_REPOSITORY_WINDOW", "1s")
        .env("OMNI_REPOSITORY_DELETE", "false")
        .start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let first = window(&gw)["base_backups"][0]["id"].as_str().unwrap().to_owned();
    let first_manifest = format!("keep/{gen}/base/{first}/manifest.json");
    wait_for(&gw, Duration::from_secs(60), "the first base backup in the store", || listing(&store, "keep").contains_key(&first_manifest).then_some(()));

    // WAL shipped in chunks, then whole: with deletion on, the chunks would go.
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE keep_rows (id int); INSERT INTO keep_rows SELECT generate_series(1, 1000)").unwrap();
    let segment: String = db.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]).unwrap().get(0);
    let chunks = format!("keep/{gen}/wal/{segment}.chunks/");
    wait_for(&gw, Duration::from_secs(30), "a chunk of the segment being written", || listing(&store, "keep").keys().any(|k| k.starts_with(&chunks)).then_some(()));
    db.batch_execute("SELECT pg_switch_wal()").unwrap();
    let whole = format!("keep/{gen}/wal/{segment}.lz4");
    wait_for(&gw, Duration::from_secs(30), "the whole segment", || listing(&store, "keep").contains_key(&whole).then_some(()));

    // Two more base backups: the first one and the WAL before the second are past both windows.
    let third = two_base_backups_a_second_apart(&gw);
    let third_manifest = format!("keep/{gen}/base/{third}/manifest.json");
    wait_for(&gw, Duration::from_secs(60), "the third base backup in the store", || listing(&store, "keep").contains_key(&third_manifest).then_some(()));
    let before = listing(&store, "keep");

    // Retention in the repository ran after the third upload: it says what
    // it would delete and that deletion is off, and deletes nothing.
    let retention = wait_for(&gw, Duration::from_secs(60), "the status to count what the window no longer needs", || {
        let r = gw.get("/gateway/status").json()["repository"]["retention"].clone();
        (r["kept_past_window"].as_u64().unwrap_or(0) >= 2).then_some(r)
    });
    assert_eq!(retention["delete"], false, "{retention}");
    assert!(retention["summary"].as_str().unwrap().contains("deletion is off (OMNI_REPOSITORY_DELETE=false)"), "{retention}");
    assert_eq!(retention["deleted_objects"], 0, "{retention}");
    assert!(gw.log().contains("OMNI_REPOSITORY_DELETE=false deletes nothing"), "the log says it too");

    // Local retention still works: the first base backup and its WAL went here.
    wait_until(Duration::from_secs(30), "local retention to delete the first base backup", || (!dir.path().join("data/wal/base").join(&first).exists()).then_some(()));
    assert!(!dir.path().join("data/wal/stream").join(&segment).exists(), "the local archive deleted {segment}");

    // Nothing left the store: every object listed before is there, the same size.
    db.batch_execute("INSERT INTO keep_rows SELECT generate_series(1, 100); SELECT pg_switch_wal()").unwrap();
    wait_for(&gw, Duration::from_secs(30), "nothing queued", || (gw.get("/gateway/status").json()["repository"]["queue_depth"] == 0).then_some(()));
    let after = listing(&store, "keep");
    for (name, size) in &before {
        assert_eq!(after.get(name), Some(size), "{name} left the store under OMNI_REPOSITORY_DELETE=false");
    }
    assert!(after.contains_key(&first_manifest) && after.keys().any(|k| k.starts_with(&chunks)), "the first base backup and the chunks of a whole segment stay");
}

#[test]
fn offsite_a_store_that_ignores_conditional_writes_is_found_out_and_nothing_is_overwritten() {
    // rclone's S3 server accepts If-None-Match and ignores it.
    let store = StoreServer::start_new(Kind::Rclone);
    let dir = workdir();
    let gw = builder(dir.path(), &store, "look").start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let status = wait_for(&gw, Duration::from_secs(60), "the status to say whether the store honours conditional writes", || {
        let r = gw.get("/gateway/status").json()["repository"].clone();
        r["conditional_writes"].is_boolean().then_some(r)
    });
    assert_eq!(status["conditional_writes"], false, "{status}");
    assert!(gw.log().contains("ignores or refuses conditional writes"), "the log says what the product does about it");
    assert!(!listing(&store, "look").keys().any(|k| k.contains("/probe/conditional-")), "the probe object is deleted");

    // Another installation's object where this one's segment goes once it
    // is whole: looked up first, found, never overwritten; uploads stop and say why.
    let mut db = gw.db();
    // A write first: right after a WAL switch (the base backup's) the WAL
    // position is at a segment's boundary, where pg_walfile_name names the
    // segment before it, complete and uploaded already.
    db.batch_execute("CREATE TABLE planted_before (id int)").unwrap();
    let segment: String = db.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]).unwrap().get(0);
    let planted = format!("{gen}/wal/{segment}.lz4");
    let (repo, rt) = client(&store, "look");
    rt.block_on(repo.put_once(&planted, bytes::Bytes::from_static(b"not this cluster's WAL"))).unwrap();
    db.batch_execute("CREATE TABLE look_rows (id int); INSERT INTO look_rows VALUES (1); SELECT pg_switch_wal()").unwrap();
    let stopped = wait_for(&gw, Duration::from_secs(60), "the repository entry to say uploads stopped", || {
        let r = gw.get("/gateway/status").json()["repository"].clone();
        (r["state"] == "stopped").then_some(r)
    });
    let error = stopped["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("{segment}.lz4")) && error.contains("other content"), "the error names the object: {stopped}");
    assert_eq!(rt.block_on(repo.get(&planted)).unwrap(), bytes::Bytes::from_static(b"not this cluster's WAL"), "never overwritten");
}

/// The `.sql` backups in `dir`, sorted (their sidecars aside).
fn sql_backups(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("omni_backup_") && n.ends_with(".sql")).collect();
    names.sort();
    names
}

#[test]
fn offsite_logical_backups_past_keep_stay_until_their_upload_is_confirmed() {
    let mut store = StoreServer::start_new(Kind::Rclone);
    let dir = workdir();
    let gw = builder(dir.path(), &store, "keep1")
        .env("OMNI_BACKUP_KEEP", "1")
        // Logical backups only: nothing else waits in the queue.
        .env("OMNI_WAL_DIR", "off")
        .start();
    wait_for(&gw, Duration::from_secs(60), "the shipper's first round", || (gw.get("/gateway/status").json()["repository"]["state"] == "ok").then_some(()));

    // The store down: three backups, OMNI_BACKUP_KEEP=1, none of them uploaded.
    store.stop();
    let backups = dir.path().join("data/backups");
    let made: Vec<String> = (0..3)
        .map(|_| {
            let created = Request::new("POST", "/api/v1/backup/create").api_key().send_to(gw.port);
            assert_eq!(created.status, 200, "{}", created.text());
            created.json()["backup_file"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(sql_backups(&backups), made, "retention deleted a backup whose upload was not confirmed");
    for name in &made {
        assert!(backups.join(format!("{name}.sha256")).is_file(), "{name}.sha256");
    }
    let said = "because their upload to the off-site repository";
    wait_for(&gw, Duration::from_secs(10), "the log to say why retention keeps them", || gw.log().lines().any(|l| l.contains("retention: kept 2 backups past OMNI_BACKUP_KEEP=1") && l.contains(said)).then_some(()));
    let waiting = wait_for(&gw, Duration::from_secs(60), "the status to count three logical backups waiting for upload", || {
        let r = gw.get("/gateway/status").json()["repository"].clone();
        (r["queue_logical_backups"] == 3 && r["state"] == "retrying").then_some(r)
    });
    assert!(waiting["last_error"].is_string(), "{waiting}");
    assert_eq!(sql_backups(&backups), made, "still all three");

    // The store back: all three uploaded, then retention keeps the newest only.
    store.start();
    let logical = "keep1/logical/";
    wait_for(&gw, Duration::from_secs(90), "the three logical backups in the store", || {
        let there = store.list(logical);
        made.iter().all(|n| there.contains(&format!("{logical}{n}")) && there.contains(&format!("{logical}{n}.sha256"))).then_some(())
    });
    wait_for(&gw, Duration::from_secs(30), "retention to bring the local backups down to OMNI_BACKUP_KEEP=1", || (sql_backups(&backups) == made[2..]).then_some(()));
    let mut left: Vec<String> = std::fs::read_dir(&backups).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
    left.sort();
    let newest = &made[2];
    assert_eq!(left, vec![newest.clone(), format!("{newest}.sha256"), format!("{newest}.uploaded")], "the deleted backups' sidecars went with them");
    assert_eq!(std::fs::read_to_string(backups.join(format!("{newest}.uploaded"))).unwrap().trim(), store.url("keep1"), "the mark names the repository");
    let ok = wait_for(&gw, Duration::from_secs(30), "nothing waiting", || {
        let r = gw.get("/gateway/status").json()["repository"].clone();
        (r["queue_logical_backups"] == 0 && r["state"] == "ok").then_some(r)
    });
    assert_eq!(ok["queue_depth"], 0, "{ok}");
    assert_eq!(store.list(logical).len(), 6, "the store keeps all three: retention here is local");
}
