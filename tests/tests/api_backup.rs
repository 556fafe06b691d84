//! Backups through the worker's API (SPEC §6), against a real PostgreSQL:
//! round trip, failed and killed dumps, refused restores, retention, the
//! schedule, and the API key.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use omni_tests::{pg_bin_dir, wait_until, Request, TempPostgres, Worker, WorkerBuilder};
use serde_json::json;

/// A worker with backups in `<workdir>/data/backups` (the default, relative).
fn worker_with(pg: &TempPostgres, configure: impl FnOnce(WorkerBuilder) -> WorkerBuilder) -> (Worker, PathBuf) {
    let builder = WorkerBuilder::new(&pg.url()).env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string());
    let dir = builder.workdir().join("data/backups");
    let worker = configure(builder).start();
    (worker, dir)
}

fn seed_big_table(pg: &TempPostgres, rows: i64) {
    pg.client()
        .batch_execute(&format!(
            "CREATE TABLE big (id bigint PRIMARY KEY, label text NOT NULL, amount numeric(12,2), at timestamptz, payload jsonb);
             INSERT INTO big SELECT g, 'row ' || g || E' \\t tab, quote '' and \\\\ backslash', g * 1.25,
                    '2024-01-01'::timestamptz + g * interval '1 minute', jsonb_build_object('n', g, 'even', g % 2 = 0)
             FROM generate_series(1, {rows}) g;"
        ))
        .unwrap();
}

/// Everything that must survive a round trip, as text.
fn snapshot(pg: &TempPostgres) -> Vec<String> {
    let mut client = pg.client();
    let mut out = Vec::new();
    for query in [
        "SELECT count(*)::text || ' ' || coalesce(md5(string_agg(b::text, E'\\n' ORDER BY id)), '') FROM big b",
        "SELECT coalesce(string_agg(session_id::text || '|' || key || '|' || value || '|' || created_at::text || '|' || updated_at::text, E'\\n' ORDER BY session_id, key), '') FROM omni_user_preferences",
        "SELECT coalesce(string_agg(key || '|' || value::text, E'\\n' ORDER BY key), '') FROM omni_settings",
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'",
    ] {
        out.push(client.query_one(query, &[]).unwrap().get::<_, Option<String>>(0).unwrap_or_default());
    }
    out
}

fn create(worker: &Worker) -> String {
    let response = worker.request("POST", "/api/v1/backup/create").api_key().send();
    assert_eq!(response.status, 200, "{}\n{}", response.text(), worker.log());
    let body = response.json();
    assert!(body["size_bytes"].as_u64().unwrap() > 0);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    body["backup_file"].as_str().unwrap().to_owned()
}

fn listed(worker: &Worker) -> Vec<String> {
    let response = worker.request("GET", "/api/v1/backup/list").api_key().send();
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["backups"].as_array().unwrap().iter().map(|b| b["filename"].as_str().unwrap().to_owned()).collect()
}

/// Names of all entries in `dir`, hidden ones included.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

fn backup_name_at(secs_ago: u64) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - secs_ago;
    // Same format as the worker: UTC, to the second.
    let out = std::process::Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+omni_backup_%Y%m%d_%H%M%S.sql"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn round_trip_restores_every_row_and_names_the_safety_backup() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b);
    seed_big_table(&pg, 100_000);
    let sessions = [uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string()];
    for (i, session) in sessions.iter().enumerate() {
        for key in ["theme", "language", "layout.sidebar"] {
            let value = format!("{key} of {i}: ünïcode ✓ 'quoted' \"double\"");
            let r = worker.request("POST", "/api/v1/preferences").session(session).json(&json!({"key": key, "value": value})).send();
            assert_eq!(r.status, 200);
        }
    }
    let before = snapshot(&pg);
    let backup = create(&worker);
    assert_eq!(listed(&worker), vec![backup.clone()]);
    let on_disk = fs::metadata(dir.join(&backup)).unwrap();
    assert_eq!(on_disk.len(), fs::read(dir.join(&backup)).unwrap().len() as u64);

    // Change everything: rows deleted and updated, preferences changed, added and removed, a table added.
    pg.client()
        .batch_execute(
            "DELETE FROM big WHERE id % 3 = 0; UPDATE big SET label = 'changed' WHERE id % 7 = 0;
             INSERT INTO big VALUES (1000001, 'new', 1, now(), '{}'); CREATE TABLE intruder (x int);",
        )
        .unwrap();
    let r = worker.request("POST", "/api/v1/preferences").session(&sessions[0]).json(&json!({"key": "theme", "value": "changed"})).send();
    assert_eq!(r.status, 200);
    assert_eq!(worker.request("DELETE", "/api/v1/preferences/language").session(&sessions[1]).send().status, 200);
    let changed = snapshot(&pg);
    assert_ne!(changed, before);

    let response = worker.request("POST", &format!("/api/v1/backup/restore/{backup}")).api_key().send();
    assert_eq!(response.status, 200, "{}\n{}", response.text(), worker.log());
    let body = response.json();
    let safety = body["safety_backup"].as_str().unwrap().to_owned();
    assert_ne!(safety, backup);
    assert_eq!(body["restored"], backup.as_str());

    let after = snapshot(&pg);
    // The intruder table is not in the backup; --clean drops only what the backup has.
    assert_eq!(after[..3], before[..3], "every row identical after restore");
    assert_eq!(listed(&worker), vec![safety.clone(), backup.clone()]);

    // The safety backup undoes the restore.
    let undo = worker.request("POST", &format!("/api/v1/backup/restore/{safety}")).api_key().send();
    assert_eq!(undo.status, 200, "{}", undo.text());
    assert_eq!(snapshot(&pg)[..3], changed[..3]);

    // The worker keeps serving from its pool after restores replaced its tables.
    let r = worker.request("GET", "/api/v1/preferences/theme").session(&sessions[0]).send();
    assert_eq!((r.status, r.json()["value"].clone()), (200, json!("changed")));

    // Download: the exact file, with length and attachment headers.
    let download = worker.request("GET", &format!("/api/v1/backup/download/{backup}")).api_key().send();
    assert_eq!(download.status, 200);
    assert_eq!(download.body, fs::read(dir.join(&backup)).unwrap());
    assert_eq!(download.header("content-length"), Some(on_disk.len().to_string().as_str()));
    assert_eq!(download.header("content-disposition"), Some(format!("attachment; filename=\"{backup}\"").as_str()));

    // Delete.
    let deleted = worker.request("DELETE", &format!("/api/v1/backup/{backup}")).api_key().send();
    assert_eq!((deleted.status, deleted.json()), (200, json!({"success": true})));
    assert!(!dir.join(&backup).exists());
    assert_eq!(worker.request("DELETE", &format!("/api/v1/backup/{backup}")).api_key().send().status, 404);
    assert_eq!(worker.request("POST", &format!("/api/v1/backup/restore/{backup}")).api_key().send().status, 404);
}

#[test]
fn without_or_with_a_wrong_api_key_nothing_is_done() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b);
    let existing = create(&worker);
    let before_files = entries(&dir);
    let before_db = snapshot_small(&pg);
    for key in [None, Some("wrong-key-0123456789"), Some("")] {
        for (method, path) in [
            ("POST", "/api/v1/backup/create".to_owned()),
            ("GET", "/api/v1/backup/list".to_owned()),
            ("GET", format!("/api/v1/backup/download/{existing}")),
            ("POST", format!("/api/v1/backup/restore/{existing}")),
            ("DELETE", format!("/api/v1/backup/{existing}")),
        ] {
            let mut request = Request::new(method, &path).port(worker.port);
            if let Some(key) = key {
                request = request.header("x-api-key", key);
            }
            let response = request.send();
            assert_eq!(response.status, 401, "{method} {path} with key {key:?}: {}", response.text());
            assert!(response.json()["code"].is_string());
            assert!(!response.text().contains("PostgreSQL database dump"));
        }
    }
    assert_eq!(entries(&dir), before_files);
    assert_eq!(snapshot_small(&pg), before_db);
}

fn snapshot_small(pg: &TempPostgres) -> Vec<String> {
    let mut client = pg.client();
    client
        .query("SELECT key || '|' || value::text FROM omni_settings ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .chain(std::iter::once(client.query_one("SELECT count(*)::text FROM omni_user_preferences", &[]).unwrap().get(0)))
        .collect()
}

#[test]
fn concurrent_creates_never_lose_or_overwrite_a_file() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b.env("OMNI_BACKUP_KEEP", "0"));
    seed_big_table(&pg, 20_000);
    let port = worker.port;
    let mut made = Vec::new();
    for _round in 0..4 {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || Request::new("POST", "/api/v1/backup/create").api_key().send_to(port)))
            .collect();
        for response in threads.into_iter().map(|t| t.join().unwrap()) {
            match response.status {
                200 => {
                    let body = response.json();
                    made.push((body["backup_file"].as_str().unwrap().to_owned(), body["size_bytes"].as_u64().unwrap()));
                }
                409 => assert_eq!(response.json()["code"], "backup_busy"),
                other => panic!("unexpected {other}: {}", response.text()),
            }
        }
    }
    // Back to back, within one second: the second waits for a new name.
    made.push((create(&worker), 0));
    made.push((create(&worker), 0));
    let mut names: Vec<&String> = made.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), made.len(), "every successful create has a name of its own: {made:?}");
    for (name, size) in &made {
        let on_disk = fs::metadata(dir.join(name)).unwrap_or_else(|_| panic!("{name} was lost"));
        if *size > 0 {
            assert_eq!(on_disk.len(), *size, "{name} changed after it was reported");
        }
    }
    assert_eq!(listed(&worker).len(), made.len());
    assert!(entries(&dir).iter().all(|e| !e.ends_with(".partial")));
}

/// A `PGSERVE_BIN_DIR` whose pg_dump writes part of a real dump and then
/// hangs until killed, and whose psql is the real one.
fn dying_pg_dump_dir(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let real = pg_bin_dir();
    let script = format!("#!/bin/sh\n\"{}/pg_dump\" \"$@\" | head -c 300000\nexec sleep 600\n", real.display());
    fs::write(bin.join("pg_dump"), script).unwrap();
    std::os::unix::fs::symlink(real.join("psql"), bin.join("psql")).unwrap();
    std::process::Command::new("chmod").arg("+x").arg(bin.join("pg_dump")).status().unwrap();
    bin
}

#[test]
fn a_dump_killed_midway_leaves_nothing_listed() {
    let pg = TempPostgres::start_new();
    seed_big_table(&pg, 50_000);
    let scratch = omni_tests::TempDir::new("dying-dump");
    let bin = dying_pg_dump_dir(scratch.path());
    let (worker, dir) = worker_with(&pg, |b| b.env("PGSERVE_BIN_DIR", bin.display().to_string()));
    let port = worker.port;
    let request = std::thread::spawn(move || Request::new("POST", "/api/v1/backup/create").api_key().send_to(port));
    // pg_dump's output reaches the file a whole line at a time: all but the
    // last, cut, line of the 300 000 bytes.
    let partial = wait_until(Duration::from_secs(30), "a partial dump of nearly 300 000 bytes", || {
        fs::read_dir(&dir).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.to_string_lossy().ends_with(".partial") && fs::metadata(p).is_ok_and(|m| m.len() >= 290_000)
        })
    });
    // While the dump runs: not listed, and a second operation is refused.
    assert!(listed(&worker).is_empty());
    assert_eq!(worker.request("POST", "/api/v1/backup/create").api_key().send().status, 409);
    // Kill the dump: the worker's only child process.
    let worker_pid = worker.child.pid().to_string();
    let sleeper = wait_until(Duration::from_secs(5), "the hanging pg_dump", || {
        fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).find(|pid| {
            fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.lines().any(|l| l.strip_prefix("PPid:").is_some_and(|p| p.trim() == worker_pid)))
        })
    });
    unsafe { libc::kill(sleeper, libc::SIGKILL) };
    let response = request.join().unwrap();
    assert!(response.status >= 500, "{}: {}", response.status, response.text());
    assert!(response.json()["detail"].as_str().unwrap().contains("no backup was written"));
    assert!(listed(&worker).is_empty());
    assert!(!partial.exists(), "the partial file is removed");
    assert_eq!(entries(&dir), vec![".omni_backup.lock"]);
    // The worker and the database keep working.
    assert_eq!(worker.request("GET", "/api/v1/health").send().status, 200);
}

#[test]
fn partial_files_left_by_a_killed_worker_are_never_listed_and_removed_at_start() {
    let pg = TempPostgres::start_new();
    let builder = WorkerBuilder::new(&pg.url()).env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string());
    let dir = builder.workdir().join("data/backups");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(".omni_backup_20240101_000000.sql.partial"), "--\n-- PostgreSQL database dump\n").unwrap();
    let worker = builder.start();
    assert!(listed(&worker).is_empty());
    assert_eq!(entries(&dir), vec![".omni_backup.lock"]);
}

#[test]
fn truncated_or_corrupted_backups_are_refused_and_the_database_is_unchanged() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b.env("OMNI_BACKUP_KEEP", "0"));
    seed_big_table(&pg, 20_000);
    let good = create(&worker);
    let dump = fs::read_to_string(dir.join(&good)).unwrap();
    pg.client().batch_execute("DELETE FROM big WHERE id > 10000; CREATE TABLE after_backup (x int)").unwrap();
    let before = snapshot(&pg);

    let copy_at = dump.find("COPY public.big").unwrap();
    let data_line = copy_at + dump[copy_at..].find('\n').unwrap() + 1;
    let cases = [
        ("truncated in the middle", dump[..dump.len() / 2].to_owned(), "backup_incomplete"),
        ("truncated before the end marker", dump[..dump.len() - 200].to_owned(), "backup_incomplete"),
        ("empty", String::new(), "backup_incomplete"),
        ("garbage row in COPY data", format!("{}not a number\tgarbage\n{}", &dump[..data_line], &dump[data_line..]), "restore_failed"),
        ("broken statement", dump.replacen("ALTER TABLE", "ALTER TABEL", 1), "restore_failed"),
        ("not a dump at all", "DROP TABLE big;\n-- PostgreSQL database dump complete\n".to_owned(), "backup_incomplete"),
    ];
    for (i, (what, content, code)) in cases.iter().enumerate() {
        let name = format!("omni_backup_2000010{}_000000.sql", i + 1);
        fs::write(dir.join(&name), content).unwrap();
        let response = worker.request("POST", &format!("/api/v1/backup/restore/{name}")).api_key().send();
        assert_eq!(response.status, 422, "{what}: {}", response.text());
        assert_eq!(response.json()["code"], *code, "{what}");
        assert!(response.json()["detail"].as_str().unwrap().contains("unchanged"), "{what}");
        assert_eq!(snapshot(&pg), before, "{what}: the database is unchanged");
    }
    assert_eq!(worker.request("GET", "/api/v1/health").send().status, 200);
}

#[test]
fn retention_keeps_exactly_the_newest_n() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b.env("OMNI_BACKUP_KEEP", "3"));
    fs::create_dir_all(&dir).unwrap();
    let old: Vec<String> = (1..=5).map(|d| format!("omni_backup_2020010{d}_120000.sql")).collect();
    for name in &old {
        fs::write(dir.join(name), "old").unwrap();
    }
    fs::write(dir.join("notes.txt"), "not a backup: never touched").unwrap();
    let first = create(&worker);
    let second = create(&worker);
    assert_eq!(listed(&worker), vec![second.clone(), first.clone(), old[4].clone()]);
    // A restore's safety backup has its own count; the restored file is kept.
    let restored = worker.request("POST", &format!("/api/v1/backup/restore/{first}")).api_key().send();
    assert_eq!(restored.status, 200, "{}", restored.text());
    let safety = restored.json()["safety_backup"].as_str().unwrap().to_owned();
    assert_eq!(listed(&worker), vec![safety, second, first, old[4].clone()]);
    assert!(dir.join("notes.txt").exists());
}

#[test]
fn safety_backups_never_push_the_users_backups_out_of_retention() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b.env("OMNI_BACKUP_KEEP", "2"));
    let first = create(&worker);
    let second = create(&worker);
    let mut safeties = Vec::new();
    for _ in 0..3 {
        let restored = worker.request("POST", &format!("/api/v1/backup/restore/{first}")).api_key().send();
        assert_eq!(restored.status, 200, "{}", restored.text());
        safeties.push(restored.json()["safety_backup"].as_str().unwrap().to_owned());
    }
    // The user's two backups are still there; of the safety backups, the newest two.
    assert_eq!(listed(&worker), vec![safeties[2].clone(), safeties[1].clone(), second.clone(), first.clone()]);
    assert!(!dir.join(&safeties[0]).exists() && !dir.join(format!("{}.safety", safeties[0])).exists());
    let list = worker.request("GET", "/api/v1/backup/list").api_key().send().json();
    let kinds: Vec<(&str, &str)> =
        list["backups"].as_array().unwrap().iter().map(|b| (b["filename"].as_str().unwrap(), b["kind"].as_str().unwrap())).collect();
    assert_eq!(
        kinds,
        vec![(safeties[2].as_str(), "safety"), (safeties[1].as_str(), "safety"), (second.as_str(), "backup"), (first.as_str(), "backup")]
    );
    // A new backup of the user's pushes out the user's oldest, not a safety backup.
    let third = create(&worker);
    assert_eq!(listed(&worker), vec![third, safeties[2].clone(), safeties[1].clone(), second]);
    // Safety backups download and restore like any other.
    let download = worker.request("GET", &format!("/api/v1/backup/download/{}", safeties[2])).api_key().send();
    assert_eq!(download.status, 200, "{}", download.text());
}

#[test]
fn a_backup_taken_before_a_schema_migration_restores_forward_and_the_worker_keeps_serving() {
    use omni_contract::migrations::{checksum, MIGRATIONS};
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b);
    let session = uuid::Uuid::new_v4().to_string();

    // A database as a worker with only migrations 0001 and 0002 left it, with
    // a preference in it, backed up with the product's own backup code.
    pg.client().batch_execute("CREATE DATABASE before_accounts").unwrap();
    let old_url = format!("{}/before_accounts", pg.url().rsplit_once('/').unwrap().0);
    let mut old = postgres::Client::connect(&old_url, postgres::NoTls).unwrap();
    old.batch_execute(
        "CREATE TABLE omni_schema_migrations (version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                                              applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .unwrap();
    for m in MIGRATIONS.iter().filter(|m| m.version <= 2) {
        old.batch_execute(m.sql).unwrap();
        old.execute("INSERT INTO omni_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)", &[&m.version, &m.name, &checksum(m.sql)])
            .unwrap();
    }
    old.execute(
        "INSERT INTO omni_user_preferences (session_id, key, value) VALUES ($1::text::uuid, 'theme', 'from before accounts')",
        &[&session],
    )
    .unwrap();
    drop(old);
    let backups = omni_contract::backups::Backups::new(dir.clone(), Some(pg_bin_dir()), old_url, 0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let older = runtime.block_on(backups.create()).unwrap().backup_file;

    // The running worker has the full schema, an account and a preference.
    let account = worker.request("POST", "/api/v1/accounts").api_key().json(&json!({"username": "later", "password": "a long password", "role": "user"})).send();
    assert_eq!(account.status, 201, "{}", account.text());

    let restored = worker.request("POST", &format!("/api/v1/backup/restore/{older}")).api_key().send();
    assert_eq!(restored.status, 200, "{}\n{}", restored.text(), worker.log());

    let versions: Vec<i32> =
        pg.client().query("SELECT version FROM omni_schema_migrations ORDER BY version", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>(), "the restored schema is migrated forward");
    let check = |worker: &Worker| {
        let theme = worker.request("GET", "/api/v1/preferences/theme").session(&session).send();
        assert_eq!((theme.status, theme.json()["value"].clone()), (200, json!("from before accounts")), "{}", theme.text());
        let stored = worker.request("POST", "/api/v1/preferences").session(&session).json(&json!({"key": "lang", "value": "en"})).send();
        assert_eq!(stored.status, 200, "{}", stored.text());
        let accounts = worker.request("GET", "/api/v1/accounts").api_key().send();
        assert_eq!(accounts.status, 200, "{}\n{}", accounts.text(), worker.log());
        assert_eq!(accounts.json(), json!([]), "the database is as it was then: no accounts yet");
    };
    check(&worker);
    let created = worker.request("POST", "/api/v1/accounts").api_key().json(&json!({"username": "again", "password": "a long password", "role": "user"})).send();
    assert_eq!(created.status, 201, "{}", created.text());
    pg.client().batch_execute("DELETE FROM omni_accounts").unwrap();

    // The next start finds nothing to migrate and serves.
    drop(worker);
    let (restarted, _) = worker_with(&pg, |b| b);
    assert!(restarted.log().contains("database schema is up to date"), "{}", restarted.log());
    check(&restarted);
}

#[test]
fn a_backup_from_a_newer_schema_is_refused_and_nothing_changes() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b);
    seed_big_table(&pg, 10);
    let backup = create(&worker);
    // The same dump, as a later version with a migration 9999 would have made it.
    let text = fs::read_to_string(dir.join(&backup)).unwrap();
    let marker = "-- PostgreSQL database dump complete";
    let newer = text.replace(marker, &format!("INSERT INTO public.omni_schema_migrations (version, name, checksum) VALUES (9999, '9999_future.sql', 'x');\n{marker}"));
    let newer_name = "omni_backup_20300101_000000.sql";
    fs::write(dir.join(newer_name), newer).unwrap();
    let before = snapshot(&pg);
    let refused = worker.request("POST", &format!("/api/v1/backup/restore/{newer_name}")).api_key().send();
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert!(refused.json()["detail"].as_str().unwrap().contains("9999_future.sql"), "{}", refused.text());
    assert_eq!(snapshot(&pg), before, "rolled back");
}

/// A crash between naming a backup and recording its sha256 leaves a backup
/// without one: trusted (and its sha256 recorded) only if it is a complete dump.
#[test]
fn a_backup_without_its_sha256_is_used_only_when_complete() {
    let pg = TempPostgres::start_new();
    let (worker, dir) = worker_with(&pg, |b| b);
    let complete = create(&worker);
    fs::remove_file(dir.join(format!("{complete}.sha256"))).unwrap();
    let truncated = "omni_backup_20200101_000000.sql";
    let text = fs::read(dir.join(&complete)).unwrap();
    fs::write(dir.join(truncated), &text[..text.len() / 2]).unwrap();

    for path in [format!("/api/v1/backup/download/{truncated}"), format!("/api/v1/backup/restore/{truncated}")] {
        let method = if path.contains("restore") { "POST" } else { "GET" };
        let refused = worker.request(method, &path).api_key().send();
        assert_eq!((refused.status, refused.json()["code"].as_str()), (422, Some("backup_incomplete")), "{path}: {}", refused.text());
    }
    assert!(!dir.join(format!("{truncated}.sha256")).exists());

    let download = worker.request("GET", &format!("/api/v1/backup/download/{complete}")).api_key().send();
    assert_eq!(download.status, 200, "{}", download.text());
    let recorded = fs::read_to_string(dir.join(format!("{complete}.sha256"))).unwrap();
    assert!(recorded.ends_with(&format!("  {complete}\n")), "{recorded}");
    assert!(worker.log().contains("its sha256 was recorded now"), "{}", worker.log());
    // From now on a change is detected.
    fs::write(dir.join(&complete), [&text[..], b"-- appended\n"].concat()).unwrap();
    let changed = worker.request("POST", &format!("/api/v1/backup/restore/{complete}")).api_key().send();
    assert_eq!((changed.status, changed.json()["code"].as_str()), (422, Some("backup_changed")), "{}", changed.text());
}

#[test]
fn the_schedule_counts_from_the_newest_backup_across_restarts() {
    let pg = TempPostgres::start_new();
    // A backup 30 minutes old and an hourly schedule: nothing is due at start.
    let recent = backup_name_at(30 * 60);
    let backups = omni_tests::TempDir::new("scheduled-backups");
    let dir = backups.path().to_path_buf();
    fs::write(dir.join(&recent), "recent").unwrap();
    let (worker, _) =
        worker_with(&pg, |b| b.env("OMNI_BACKUP_DIR", dir.display().to_string()).env("OMNI_BACKUP_INTERVAL", "3600s"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(listed(&worker), vec![recent.clone()], "a restart does not fire a backup that is not due");
    drop(worker);

    // Overdue (2 hours old): one backup at start, then none until the next interval.
    fs::rename(dir.join(&recent), dir.join(backup_name_at(2 * 3600))).unwrap();
    let worker2 = WorkerBuilder::new(&pg.url())
        .env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string())
        .env("OMNI_BACKUP_DIR", dir.display().to_string())
        .env("OMNI_BACKUP_INTERVAL", "3600s")
        .start();
    wait_until(Duration::from_secs(30), "the overdue backup", || (listed(&worker2).len() == 2).then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(listed(&worker2).len(), 2);
    drop(worker2);

    // A short interval keeps making backups, and retention trims them.
    let worker3 = WorkerBuilder::new(&pg.url())
        .env("PGSERVE_BIN_DIR", pg_bin_dir().display().to_string())
        .env("OMNI_BACKUP_DIR", dir.display().to_string())
        .env("OMNI_BACKUP_INTERVAL", "1s")
        .env("OMNI_BACKUP_KEEP", "2")
        .start();
    let first = listed(&worker3)[0].clone();
    wait_until(Duration::from_secs(30), "two more scheduled backups", || {
        let now = listed(&worker3);
        (now.len() == 2 && !now.contains(&first)).then_some(())
    });
}

#[test]
fn a_full_disk_is_reported_and_the_database_keeps_working() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let pg = TempPostgres::start_new();
    seed_big_table(&pg, 50_000);
    let scratch = omni_tests::TempDir::new("full-disk");
    let mount = scratch.path().join("small");
    fs::create_dir_all(&mount).unwrap();
    let ok = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k"]).arg("tmpfs").arg(&mount).status().unwrap();
    if !ok.success() {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let (worker, _) = worker_with(&pg, |b| b.env("OMNI_BACKUP_DIR", mount.display().to_string()));
    let response = worker.request("POST", "/api/v1/backup/create").api_key().send();
    assert_eq!(response.status, 507, "{}", response.text());
    assert_eq!(response.json()["code"], "backup_disk_full");
    assert!(listed(&worker).is_empty());
    assert!(entries(&mount).iter().all(|e| !e.ends_with(".partial")));
    let session = uuid::Uuid::new_v4().to_string();
    let r = worker.request("POST", "/api/v1/preferences").session(&session).json(&json!({"key": "k", "value": "v"})).send();
    assert_eq!(r.status, 200, "the database keeps working");
}
