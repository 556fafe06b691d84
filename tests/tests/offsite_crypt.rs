//! Encrypted off-site backups, end to end against `rclone serve s3` (real
//! S3 over HTTP, objects kept as plain files, which the test reads
//! directly): with `OMNI_ENCRYPT_RECIPIENTS_FILE` every object in the
//! bucket is an age file; Debian's `age -d` (then `lz4 -d` for a WAL
//! segment) gives back the local base backup file and segment byte for
//! byte; the recipients file made unreadable stops uploads without a plain
//! byte reaching the bucket, the status and the heartbeat's `/fail` say
//! why, and once it is back everything is uploaded, nothing skipped; a
//! restore with the wrong identity or none is refused naming the key it
//! needs, with the right one it serves every row.

use crate::gateway;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::{age_decrypt, cli_env, keygen, oldest_base_backup, wait_archived, wait_for_base_backup, wait_for_repository as wait_for, workdir, write_a_note_t_write_b, Gateway, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer};

const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// A heartbeat monitor: a real HTTP server on a free port recording each
/// request's method, path and body; answers 200. Stopped when dropped.
struct Monitor {
    url: String,
    port: u16,
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Monitor {
    fn start() -> Monitor {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split(' ');
                let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK");
                seen2.lock().unwrap().push((method, path, String::from_utf8_lossy(&body).into_owned()));
            }
        });
        Monitor { url: format!("http://127.0.0.1:{port}/ping/5bf7c6a0-check-uuid"), port, seen, stop }
    }

    fn requests(&self) -> Vec<(String, String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}



/// `age1abcdefg…wxyz` as the gateway shortens a key in its messages: both ends.
fn named(text: &str, key: &str) -> bool {
    text.contains(&key[..9]) && text.contains(&key[key.len() - 8..])
}

/// Every object under `prefix/`, and whether each is an age file.
fn scan(store: &StoreServer, prefix: &str) -> Vec<(String, bool)> {
    store
        .list(&format!("{prefix}/"))
        .into_iter()
        .map(|name| {
            let mut head = vec![0u8; AGE_MAGIC.len()];
            let sealed = std::fs::File::open(store.rclone_object_file(&name)).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == AGE_MAGIC;
            (name, sealed)
        })
        .collect()
}

fn all_sealed(store: &StoreServer, prefix: &str, when: &str) -> usize {
    let objects = scan(store, prefix);
    let plain: Vec<&String> = objects.iter().filter(|(_, s)| !s).map(|(n, _)| n).collect();
    assert!(plain.is_empty(), "{when}: objects in the bucket that are not age files: {plain:?}");
    objects.len()
}

fn repository(gw: &Gateway) -> serde_json::Value {
    gw.get("/gateway/status").json()["repository"].clone()
}

/// The completed segments of the local stream directory.
fn local_segments(cwd: &Path) -> BTreeSet<String> {
    std::fs::read_dir(cwd.join("data/wal/stream")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())).collect()
}

#[test]
fn offsite_crypt_every_object_is_age_decryptable_by_the_cli_fails_closed_and_restores_only_with_the_key() {
    let store = StoreServer::start_new(Kind::Rclone);
    let keys = workdir();
    let (key, public) = keygen(keys.path(), "key.txt");
    let (wrong_key, wrong_public) = keygen(keys.path(), "wrong.txt");
    let recipients = keys.path().join("recipients.txt");
    std::fs::write(&recipients, format!("# the backup key (its private half is not on the server)\n{public}\n")).unwrap();
    let monitor = Monitor::start();

    let source = workdir();
    let mut builder = GatewayBuilder::new(source.path())
        .env("OMNI_REPOSITORY_URL", store.url("crypt"))
        .env("OMNI_REPOSITORY_WAL_INTERVAL", "1s")
        .env("OMNI_ENCRYPT_RECIPIENTS_FILE", recipients.display().to_string())
        .env("OMNI_BACKUP_HEARTBEAT_URL", monitor.url.clone());
    for (k, v) in store.env() {
        builder = builder.env(k, v.clone());
    }
    let mut gw = builder.start();
    wait_for_base_backup(&gw);
    let id = oldest_base_backup(source.path());
    let manifest = wait_for(&gw, Duration::from_secs(180), &format!("the store to list base/{id}/manifest.json"), || {
        store.list("crypt/").into_iter().find(|n| n.ends_with(&format!("/base/{id}/manifest.json")))
    });
    let gen = manifest.split('/').nth(1).unwrap().to_owned();
    let status = repository(&gw);
    assert!(named(status["encryption"].as_str().unwrap_or_default(), &public), "the status says what objects are encrypted to: {status}");

    // The heartbeat: a success ping once the base backup is confirmed.
    wait_for(&gw, Duration::from_secs(30), "the monitor to hear of the base backup", || {
        monitor.requests().iter().any(|(m, p, b)| m == "POST" && p == "/ping/5bf7c6a0-check-uuid" && b.contains(&format!("base backup {id}"))).then_some(())
    });

    // Rows, a completed segment, WAL after it in chunks.
    write_a_note_t_write_b(&gw);
    let mut db = gw.db();
    let whole: String = db.query_one("SELECT file_name FROM pg_walfile_name_offset(pg_switch_wal())", &[]).unwrap().get(0);
    db.batch_execute("CREATE TABLE after_the_switch (id int); INSERT INTO after_the_switch VALUES (1)").unwrap();
    wait_archived(&mut db);
    let wal = format!("crypt/{gen}/wal/");
    wait_for(&gw, Duration::from_secs(60), &format!("{whole} whole in the store"), || store.holds_wal(&wal, &whole, u64::MAX).then_some(()));

    // Every object is an age file; the manifest itself too (the server reads its local plain copy).
    let count = all_sealed(&store, "crypt", "after the first uploads");
    assert!(count >= 5, "{count} objects");
    assert!(source.path().join(format!("data/wal/repository-plain/{gen}/base/{id}/manifest.json")).is_file(), "the plain copy of the manifest is kept beside repository.json");

    // Debian's age CLI, then lz4, gives back the local files byte for byte.
    let base = store.rclone_object_file(&format!("crypt/{gen}/base/{id}/base.tar.lz4"));
    assert!(age_decrypt(&key, &base, false) == std::fs::read(source.path().join(format!("data/wal/base/{id}/base.tar.lz4"))).unwrap(), "age -d of base.tar.lz4 is not the local file");
    let segment = store.rclone_object_file(&format!("{wal}{whole}.lz4"));
    assert!(age_decrypt(&key, &segment, true) == std::fs::read(source.path().join(format!("data/wal/stream/{whole}"))).unwrap(), "age -d | lz4 -d of {whole} is not the local segment");
    let out = Command::new("age").arg("-d").arg("-i").arg(&wrong_key).arg(&segment).output().unwrap();
    assert!(!out.status.success(), "another key opens the segment");

    // The recipients file unreadable: uploads stop, nothing plain arrives,
    // the status, /health and the monitor's /fail say why.
    let away = keys.path().join("recipients.txt.away");
    std::fs::rename(&recipients, &away).unwrap();
    for i in 100..150 {
        db.execute("INSERT INTO pitr_rows VALUES ($1, 'C')", &[&i]).unwrap();
    }
    let stopped: String = db.query_one("SELECT file_name FROM pg_walfile_name_offset(pg_switch_wal())", &[]).unwrap().get(0);
    wait_archived(&mut db);
    let status = wait_for(&gw, Duration::from_secs(60), "the repository to say uploads fail", || {
        let r = repository(&gw);
        (r["state"] == "retrying" && r["last_error"].as_str().is_some_and(|e| e.contains("OMNI_ENCRYPT_RECIPIENTS_FILE"))).then_some(r)
    });
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("recipients.txt") && error.contains("nothing is uploaded"), "{status}");
    let fail = wait_for(&gw, Duration::from_secs(30), "the monitor to hear /fail", || {
        monitor.requests().into_iter().find(|(m, p, _)| m == "POST" && p == "/ping/5bf7c6a0-check-uuid/fail")
    });
    assert!(fail.2.contains("OMNI_ENCRYPT_RECIPIENTS_FILE"), "the /fail body says why: {fail:?}");
    let health = gw.get("/health");
    assert_eq!(health.status, 200, "a failing repository does not fail /health: {}", health.text());
    assert!(health.json()["degraded"].to_string().contains("OMNI_ENCRYPT_RECIPIENTS_FILE"), "{}", health.text());
    let metrics = gw.get("/metrics").text();
    assert!(metrics.contains("omni_repository_state{state=\"retrying\"} 1") && metrics.contains("omni_repository_encrypted 1"), "{metrics}");
    let during = scan(&store, "crypt");
    assert!(during.iter().all(|(_, sealed)| *sealed), "nothing plain reached the bucket: {during:?}");
    assert!(!store.holds_wal(&wal, &stopped, u64::MAX), "{stopped} was uploaded while the recipients could not be read");
    // Rounds keep failing (the monitor hears /fail once per interval, not per retry).
    let failures = repository(&gw)["failures"].as_u64().unwrap();
    wait_for(&gw, Duration::from_secs(30), "more failed rounds", || (repository(&gw)["failures"].as_u64().unwrap() > failures).then_some(()));
    assert_eq!(scan(&store, "crypt"), during, "objects arrived while uploads were stopped");
    assert_eq!(monitor.requests().iter().filter(|(_, p, _)| p.ends_with("/fail")).count(), 1, "one /fail per interval: {:?}", monitor.requests());

    // Fixed: uploads resume, every completed segment is there, nothing skipped, all sealed.
    std::fs::rename(&away, &recipients).unwrap();
    wait_for(&gw, Duration::from_secs(90), &format!("{stopped} in the store"), || store.holds_wal(&wal, &stopped, u64::MAX).then_some(()));
    wait_for(&gw, Duration::from_secs(30), "the repository to be ok", || (repository(&gw)["state"] == "ok").then_some(()));
    let stored: BTreeSet<String> = store.list(&wal).into_iter().filter_map(|n| n.strip_prefix(&wal)?.strip_suffix(".lz4").map(str::to_owned)).collect();
    let local = local_segments(source.path());
    let missing: Vec<&String> = local.iter().filter(|s| s.as_str() >= whole.as_str() && !stored.contains(*s)).collect();
    assert!(missing.is_empty(), "segments skipped: {missing:?}");
    all_sealed(&store, "crypt", "after the recovery");
    wait_for(&gw, Duration::from_secs(30), "the monitor to hear the recovery", || {
        let seen = monitor.requests();
        let last_fail = seen.iter().rposition(|(_, p, _)| p.ends_with("/fail"))?;
        seen[last_fail..].iter().any(|(_, p, _)| p == "/ping/5bf7c6a0-check-uuid").then_some(())
    });
    drop(db);
    assert!(gw.terminate().success(), "{}", gw.log());
    all_sealed(&store, "crypt", "after the stop");

    // Restores: without an identity or with the wrong one, refused naming the
    // key needed, nothing written; with the right one, every row.
    let url = store.url("crypt");
    let env: Vec<(&str, String)> = store.env().iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let fresh = workdir();
    let (ok, out, err) = cli_env(fresh.path(), &["restore", "--from", &url, "--to", "latest"], &env);
    assert!(!ok, "a restore without the key:\n{out}\n{err}");
    assert!(err.contains("OMNI_DECRYPT_IDENTITY_FILE") && named(&err, &public), "{err}");
    let (ok, out, err) = cli_env(fresh.path(), &["restore", "--from", &url, "--to", "latest", "--identity", &wrong_key.display().to_string()], &env);
    assert!(!ok, "a restore with the wrong key:\n{out}\n{err}");
    assert!(named(&err, &public) && named(&err, &wrong_public), "the error names the key needed and the one given: {err}");
    let inside: Vec<_> = std::fs::read_dir(fresh.path().join("data/postgres")).into_iter().flatten().flatten().collect();
    assert!(inside.is_empty() && !fresh.path().join("data/wal/base").exists(), "a refused restore wrote something");

    let new = workdir();
    let (ok, out, err) = cli_env(new.path(), &["restore", "--from", &url, "--to", "latest", "--identity", &key.display().to_string()], &env);
    assert!(ok, "restore --from with the key:\n{out}\n{err}\n{}", store.log());
    let gw = GatewayBuilder::new(new.path()).start();
    let rows: BTreeSet<i32> = gw.db().query("SELECT id FROM pitr_rows", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, (0..150).collect::<BTreeSet<i32>>(), "the restored cluster serves every row, those written while uploads were stopped too");
}
