//! Uploads that resume after the store was killed in their middle, against
//! real S3 servers (tests/src/stores.rs): SIGKILL, as a crash of the store
//! or a network that drops, while a base backup's multipart upload has
//! parts in the store and WAL is being shipped; then the store starts
//! again on its data. Nothing half-written is ever taken for complete (the
//! big file is in the store only whole, with the size and SHA-256 its
//! manifest names, and the manifest comes only after it), nothing is lost
//! (every completed segment is there, whole, with the local bytes; the
//! writes made while the store was down reach it), nothing is there twice
//! (one object per file of the backup, one per segment), and the
//! repository status goes `retrying`, then `ok`. What the store holds is
//! read through its own API, never through the gateway.

use crate::gateway;

use std::collections::BTreeMap;
use std::time::Duration;

use gateway::{generation, oldest_base_backup, repository_status, wait_for_base_backup, wait_for_repository as wait_for, workdir, GatewayBuilder};
use omni_gateway::repository::store::{sha256_hex, Repository};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::TEST_API_KEY;

const PREFIX: &str = "resume";

fn builder(dir: &std::path::Path, store: &StoreServer) -> GatewayBuilder {
    let mut b = GatewayBuilder::new(dir).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_REPOSITORY_URL", store.url(PREFIX)).env("OMNI_REPOSITORY_WAL_INTERVAL", "1s");
    for (k, v) in store.env() {
        b = b.env(k, v.clone());
    }
    b
}

/// A second client of the store (the store code, with the store's
/// credentials in this test's environment: nextest runs each test in a
/// process of its own), at the gateway's prefix.
fn client(store: &StoreServer) -> (Repository, tokio::runtime::Runtime) {
    for (k, v) in store.env() {
        std::env::set_var(k, v);
    }
    let repo = Repository::open(&store.url(PREFIX)).unwrap();
    (repo, tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

/// Rows of random bytes, stored as they are (no TOAST compression, and lz4
/// cannot shrink them either): the next base backup's `base.tar.lz4` is
/// about `mb` MB, well past one request (a multipart upload of many
/// parts), and the WAL of the insert is several whole segments to ship.
fn fill_with_incompressible_rows(db: &mut postgres::Client, mb: u32) {
    db.batch_execute(&format!(
        "CREATE TABLE resume_fill (b bytea);
         ALTER TABLE resume_fill ALTER COLUMN b SET STORAGE EXTERNAL;
         INSERT INTO resume_fill
           SELECT (SELECT decode(string_agg(md5(random()::text || g::text), ''), 'hex') FROM generate_series(1, 512) AS g WHERE i > 0)
           FROM generate_series(1, {}) AS i;",
        mb * 128
    ))
    .unwrap();
}

/// The base backup `id` in the store: exactly its files and its manifest,
/// each whole, with the manifest's size and SHA-256, which are those of the
/// local files in `local`; its manifest's files.
fn backup_whole_in_store(store: &StoreServer, repo: &Repository, rt: &tokio::runtime::Runtime, gen: &str, id: &str, local: &std::path::Path) -> Vec<serde_json::Value> {
    let base = format!("{PREFIX}/{gen}/base/");
    let manifest_name = format!("{base}{id}/manifest.json");
    let manifest: serde_json::Value = serde_json::from_slice(&rt.block_on(repo.get_plain(&format!("{gen}/base/{id}/manifest.json"))).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap().clone();
    let mut expected: Vec<String> = files.iter().map(|f| format!("{base}{id}/{}", f["name"].as_str().unwrap())).collect();
    expected.push(manifest_name);
    expected.sort();
    assert_eq!(store.list(&format!("{base}{id}/")), expected, "the backup's objects, each once, nothing else");
    for f in &files {
        let name = f["name"].as_str().unwrap();
        let stored = rt.block_on(repo.get(&format!("{gen}/base/{id}/{name}"))).unwrap();
        assert_eq!(stored.len() as u64, f["size"].as_u64().unwrap(), "{name}: the manifest's size");
        assert_eq!(sha256_hex(&stored), f["sha256"].as_str().unwrap(), "{name}: the manifest's SHA-256 is of the stored bytes");
        let mine = std::fs::read(local.join(name)).unwrap();
        assert!(stored == mine, "{name}: the store holds the local file's bytes");
    }
    files
}

fn killed_in_the_middle_of_a_multipart_upload_then_resumed(kind: Kind) {
    let mut store = StoreServer::start_new(kind);
    let dir = workdir();
    let gw = builder(dir.path(), &store).start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let base = format!("{PREFIX}/{gen}/base/");
    wait_for(&gw, Duration::from_secs(90), "the first base backup's manifest in the store", || store.list(&base).iter().any(|n| n.ends_with("/manifest.json")).then_some(()));

    let mut db = gw.db();
    fill_with_incompressible_rows(&mut db, 96);
    db.batch_execute("CREATE TABLE resume_rows (id int PRIMARY KEY)").unwrap();

    // A base backup (the POST answers once it is kept locally, and its
    // upload starts then); the store is killed as soon as it holds parts of it.
    let taking = {
        let port = gw.port;
        std::thread::spawn(move || {
            let taken = omni_tests::Request::new("POST", "/api/v1/backup/base").api_key().send_to(port);
            assert_eq!(taken.status, 200, "{}", taken.text());
            taken.json()["id"].as_str().unwrap().to_owned()
        })
    };
    let (upload, parts) = wait_for(&gw, Duration::from_secs(180), "a part of the new base backup's base.tar.lz4 in the store", || {
        store.multipart_uploads("/base.tar.lz4").into_iter().find(|(key, parts)| key.starts_with(&base) && *parts > 0)
    });
    store.stop();
    let id = taking.join().expect("the base backup was taken");
    assert!(upload.ends_with(&format!("/base/{id}/base.tar.lz4")), "the upload in progress is the new backup's: {upload}");

    // The upload was cut in its middle: it failed (the gateway says so), and
    // the status says uploads are retried; the service goes on.
    wait_for(&gw, Duration::from_secs(120), "the gateway to report the cut upload of base.tar.lz4", || {
        gw.log().lines().any(|l| l.contains("upload failed") && l.contains(&format!("base/{id}/base.tar.lz4"))).then_some(())
    });
    let retrying = wait_for(&gw, Duration::from_secs(60), "the repository status to say uploads are retried", || {
        let r = repository_status(&gw);
        (r["state"] == "retrying").then_some(r)
    });
    assert!(retrying["last_error"].is_string(), "{retrying}");
    eprintln!("{}: killed with {parts} part(s) of {upload} in the store", kind.name());

    // Writes while the store is down, one segment ended: their WAL waits.
    for i in 0..200 {
        db.execute("INSERT INTO resume_rows VALUES ($1)", &[&i]).unwrap();
    }
    let row = db.query_one("SELECT file_name, file_offset::bigint FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).unwrap();
    let (down_segment, down_offset): (String, u64) = (row.get(0), row.get::<_, i64>(1) as u64);
    db.batch_execute("SELECT pg_switch_wal()").unwrap();
    for i in 200..400 {
        db.execute("INSERT INTO resume_rows VALUES ($1)", &[&i]).unwrap();
    }
    let row = db.query_one("SELECT file_name, file_offset::bigint FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).unwrap();
    let (last_segment, last_offset): (String, u64) = (row.get(0), row.get::<_, i64>(1) as u64);

    // Back on its data: the upload starts over and completes, the WAL follows.
    store.start();
    let manifest_name = format!("{base}{id}/manifest.json");
    wait_for(&gw, Duration::from_secs(180), &format!("{manifest_name} in the store"), || store.list(&base).contains(&manifest_name).then_some(()));
    let wal = format!("{PREFIX}/{gen}/wal/");
    wait_for(&gw, Duration::from_secs(60), "the WAL of the writes made while the store was down", || {
        (store.holds_wal(&wal, &down_segment, down_offset) && store.holds_wal(&wal, &last_segment, last_offset)).then_some(())
    });
    let ok = wait_for(&gw, Duration::from_secs(60), "the repository status to be ok again", || {
        let r = repository_status(&gw);
        (r["state"] == "ok").then_some(r)
    });
    assert!(ok["failures"].as_u64().unwrap() >= 1, "the failed tries are counted: {ok}");

    // The base backup: exactly its files and its manifest, each whole, with
    // the manifest's size and SHA-256, which are the local file's.
    let (repo, rt) = client(&store);
    let files = backup_whole_in_store(&store, &repo, &rt, &gen, &id, &dir.path().join("data/wal/base").join(&id));
    assert!(files.iter().any(|f| f["name"] == "base.tar.lz4" && f["size"].as_u64().unwrap() > 64 << 20), "base.tar.lz4 went in many parts: {files:?}");
    if kind.honours_conditional_put() {
        assert!(!gw.log().contains("already exists with other content"), "nothing was written twice over another upload");
    }

    // The WAL: every segment completed since the first base backup, up to
    // the last writes', is in the store once, whole, with the local bytes;
    // no other name for it.
    let mut segments: BTreeMap<String, usize> = BTreeMap::new();
    for name in store.list(&wal) {
        let rest = name.strip_prefix(&wal).unwrap();
        let segment = rest.split(['.', '/']).next().unwrap().to_owned();
        assert!(segment.len() == 24 || rest.ends_with(".history"), "an object of wal/ that is no segment, chunk or history: {name}");
        if rest.ends_with(".lz4") && !rest.contains('/') {
            *segments.entry(segment).or_default() += 1;
        }
    }
    let stream = dir.path().join("data/wal/stream");
    let mut local_segments: Vec<String> = std::fs::read_dir(&stream).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())).collect();
    local_segments.sort();
    assert!(local_segments.len() >= 6, "the fill and the switch completed segments: {local_segments:?}");
    // Those completed before the last writes' segment: any later one may
    // have ended a moment ago (a checkpoint's switch) and be on its way.
    for segment in local_segments.iter().filter(|s| s.as_str() < last_segment.as_str()) {
        assert_eq!(segments.get(segment), Some(&1), "{segment}: once in the store, whole ({segments:?})");
        let stored = rt.block_on(repo.get(&format!("{gen}/wal/{segment}.lz4"))).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(&stored[..]), &mut bytes).unwrap_or_else(|e| panic!("{segment}.lz4 is not a whole lz4 frame: {e}"));
        assert!(bytes == std::fs::read(stream.join(segment)).unwrap(), "{segment}: the store holds the local segment's bytes");
    }
    drop(gw);
    store.stop();
}

#[test]
fn offsite_resume_seaweedfs_killed_mid_multipart_upload_nothing_lost_or_half_written() {
    killed_in_the_middle_of_a_multipart_upload_then_resumed(Kind::Seaweed);
}

#[test]
fn offsite_resume_rclone_killed_mid_multipart_upload_nothing_lost_or_half_written() {
    killed_in_the_middle_of_a_multipart_upload_then_resumed(Kind::Rclone);
}

/// The store's disk fills during the uploads (rclone's bucket on a tmpfs
/// too small for the first base backup): the uploads fail and are retried,
/// the status says so, the service goes on, no manifest is written for a
/// backup whose files did not all arrive and nothing is taken for complete
/// that is not; once there is room, the same base backup arrives whole and
/// the WAL written meanwhile follows.
#[test]
fn offsite_resume_a_full_bucket_stops_nothing_and_uploads_resume_once_there_is_room() {
    let store = StoreServer::start_new(Kind::Rclone);
    let disk = omni_tests::Tmpfs::mount(&store.rclone_object_file(""), "2m");
    let dir = workdir();
    let gw = builder(dir.path(), &store).start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let base = format!("{PREFIX}/{gen}/base/");
    let local_base = dir.path().join("data/wal/base");
    let id = oldest_base_backup(dir.path());

    // Full: the base backup's upload fails, is reported and retried.
    wait_for(&gw, Duration::from_secs(120), "the gateway to report a failed upload of the base backup", || {
        gw.log().lines().any(|l| l.contains("upload failed") && l.contains(&format!("base/{id}/"))).then_some(())
    });
    let retrying = wait_for(&gw, Duration::from_secs(60), "the repository status to say uploads are retried", || {
        let r = repository_status(&gw);
        (r["state"] == "retrying" && r["last_error"].is_string()).then_some(r)
    });
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "a full store does not take the service down: {}", health.text());
    assert!(!store.list(&base).iter().any(|n| n.ends_with("/manifest.json")), "no manifest for a backup whose files did not all arrive: {:?}", store.list(&base));
    assert!(local_base.join(&id).is_dir(), "the base backup is kept locally while its upload fails");
    eprintln!("full store: {}", retrying["last_error"]);

    // Writes go on meanwhile; their WAL waits.
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE full_rows (id int PRIMARY KEY); INSERT INTO full_rows SELECT generate_series(1, 500)").unwrap();
    let row = db.query_one("SELECT file_name, file_offset::bigint FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).unwrap();
    let (segment, offset): (String, u64) = (row.get(0), row.get::<_, i64>(1) as u64);

    // Room again: the same base backup arrives whole, then the WAL.
    disk.resize("512m");
    let manifest_name = format!("{base}{id}/manifest.json");
    wait_for(&gw, Duration::from_secs(180), &format!("{manifest_name} in the store"), || store.list(&base).contains(&manifest_name).then_some(()));
    let wal = format!("{PREFIX}/{gen}/wal/");
    wait_for(&gw, Duration::from_secs(60), "the WAL of the writes made while the store was full", || store.holds_wal(&wal, &segment, offset).then_some(()));
    let ok = wait_for(&gw, Duration::from_secs(60), "the repository status to be ok again", || {
        let r = repository_status(&gw);
        (r["state"] == "ok").then_some(r)
    });
    assert!(ok["failures"].as_u64().unwrap() >= 1, "the failed tries are counted: {ok}");
    let (repo, rt) = client(&store);
    backup_whole_in_store(&store, &repo, &rt, &gen, &id, &local_base.join(&id));
    // Every whole segment in the store is a whole lz4 frame.
    for name in store.list(&wal).iter().filter(|n| n.ends_with(".lz4") && !n.contains(".chunks/")) {
        let stored = rt.block_on(repo.get(name.strip_prefix(&format!("{PREFIX}/")).unwrap())).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(&stored[..]), &mut bytes).unwrap_or_else(|e| panic!("{name} is not a whole lz4 frame: {e}"));
        assert_eq!(bytes.len(), 16 << 20, "{name}: a whole segment");
    }
    drop(gw);
    drop(disk);
}
