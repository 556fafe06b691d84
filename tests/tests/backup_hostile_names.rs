//! Hostile backup names through the real gateway (embedded PostgreSQL, the
//! worker behind the proxy): every one is a 400 or 404 JSON error, and no file
//! outside the backup directory is read, written or deleted.

use crate::gateway;

use std::{fs, os::unix::fs::symlink, path::Path, time::SystemTime};

use omni_tests::{Request, TEST_API_KEY};
use gateway::{workdir, GatewayBuilder};

const DUMP_LIKE: &str = "--\n-- PostgreSQL database dump\n--\nCREATE TABLE pwned (x int);\n-- PostgreSQL database dump complete\n";

fn state_of(path: &Path) -> Option<(Vec<u8>, SystemTime)> {
    let meta = fs::symlink_metadata(path).ok()?;
    Some((fs::read(path).unwrap_or_default(), meta.modified().unwrap()))
}

#[test]
fn rejects_traversal_and_look_alikes_in_backup_names() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let backups = dir.path().join("data/backups");
    fs::create_dir_all(&backups).unwrap();

    // Sentinels outside the backup directory, each a file a traversal would reach.
    let outside = [
        dir.path().join("secret.sql"),
        dir.path().join("data/omni_backup_20200101_000000.sql"),
        dir.path().join("omni_backup_20200101_000000.sql"),
    ];
    for path in &outside {
        fs::write(path, DUMP_LIKE).unwrap();
    }
    // Inside: a valid name that is a symlink to a sentinel, and one that is a directory.
    symlink(&outside[0], backups.join("omni_backup_20200101_000001.sql")).unwrap();
    symlink("../../secret.sql", backups.join("omni_backup_20200101_000003.sql")).unwrap();
    fs::create_dir(backups.join("omni_backup_20200101_000002.sql")).unwrap();
    let watched: Vec<_> = outside.iter().cloned().chain([backups.join("omni_backup_20200101_000001.sql")]).collect();
    let before: Vec<_> = watched.iter().map(|p| state_of(p)).collect();
    let mut entries_before: Vec<_> = fs::read_dir(&backups).unwrap().flatten().map(|e| e.file_name()).collect();
    entries_before.sort();

    let long = "a".repeat(5000);
    let names: Vec<&str> = vec![
        "..%2f..%2fsecret.sql",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fsecret.sql",
        "%2e%2e%2fomni_backup_20200101_000000.sql",
        "%252e%252e%252fsecret.sql",
        "%252e%252e%252f%252e%252e%252fomni_backup_20200101_000000.sql",
        "..%5c..%5csecret.sql",
        "..%5comni_backup_20200101_000000.sql",
        "omni_backup_20200101_000000.sql%00",
        "omni_backup_20200101_000000.sql%00.txt",
        "%00",
        "%2fetc%2fpasswd",
        "%2ftmp%2fomni_backup_20200101_000000.sql",
        "omni_backup_20200101_000000.sql%0a",
        "omni_backup_20200101_000000.sql%0d%0a",
        "%0aomni_backup_20200101_000000.sql",
        "omni_backup_20200101_000000.sql%20",
        "%20omni_backup_20200101_000000.sql",
        "omni_backup_%EF%BC%92%EF%BC%90200101_000000.sql", // fullwidth digits
        "omni_backup_2020010%D9%A1_000000.sql",            // Arabic-Indic one
        "%D0%BEmni_backup_20200101_000000.sql",            // Cyrillic o
        "omni_backup_20200101_000000%E2%80%A4sql",         // one-dot leader
        "omni_backup_20200101_000000.sql%E2%80%8B",        // zero-width space
        "omni_backup_20200101_000000.SQL",
        "omni_backup_2020010_1000000.sql",
        ".omni_backup_20200101_000000.sql.partial",
        ".omni_backup.lock",
        "omni_backup_20200101_000000.sql%2f..%2f..%2fsecret.sql",
        "omni_backup_20200101_000000.sql%2f",
        "%2e",
        "%2e%2e",
        "~%2fsecret.sql",
        "%3brm%20-rf%20%2f",
        "%24(touch%20pwned).sql",
        "omni_backup_%2a.sql",
        "%ff%fe",
        &long,
        "omni_backup_20200101_000001.sql", // symlink to a sentinel
        "omni_backup_20200101_000003.sql", // relative symlink out of the directory
        "omni_backup_20200101_000002.sql", // a directory
        "omni_backup_20200101_000000.sql", // valid, absent here (present outside)
        "omni_backup_20200101_000000%2esql", // encoded dot: the same valid, absent name
    ];
    assert!(names.len() >= 30);

    let mut seen = 0;
    for name in &names {
        for (method, prefix) in [("GET", "/api/v1/backup/download/"), ("POST", "/api/v1/backup/restore/"), ("DELETE", "/api/v1/backup/")] {
            let target = format!("{prefix}{name}");
            let response = Request::new(method, &target).port(gw.port).api_key().send();
            assert!(
                response.status == 400 || response.status == 404,
                "{method} {target}: {} {}",
                response.status,
                response.text()
            );
            let body = response.json();
            assert!(body["code"].is_string() && body["detail"].is_string(), "{method} {target}: {body}");
            assert!(!response.text().contains("pwned"), "{method} {target} leaked a file");
            seen += 1;
        }
    }
    // Raw (unencoded) traversal and backslashes, as a careless client sends them.
    for target in ["/api/v1/backup/download/../../../secret.sql", "/api/v1/backup/download/..\\..\\secret.sql", "/api/v1/backup/download//etc/passwd"] {
        let response = Request::new("GET", target).port(gw.port).api_key().send();
        assert!(matches!(response.status, 400 | 404), "{target}: {} {}", response.status, response.text());
        assert!(!response.text().contains("pwned"));
    }
    eprintln!("{seen} hostile requests, all 400/404");

    let after: Vec<_> = watched.iter().map(|p| state_of(p)).collect();
    assert_eq!(before, after, "files outside the backup directory are untouched");
    let mut entries_after: Vec<_> = fs::read_dir(&backups).unwrap().flatten().map(|e| e.file_name()).filter(|n| n != ".omni_backup.lock").collect();
    entries_after.sort();
    entries_before.retain(|n| n != ".omni_backup.lock");
    assert_eq!(entries_before, entries_after, "nothing created or deleted in the backup directory (no safety backup either)");
    let pwned: i64 = gw.db().query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'pwned'", &[]).unwrap().get(0);
    assert_eq!(pwned, 0, "no sentinel was restored");
    assert!(fs::symlink_metadata(backups.join("omni_backup_20200101_000001.sql")).unwrap().file_type().is_symlink());
    assert!(gw.get("/api/v1/backup/list").status == 401);
    let list = Request::get("/api/v1/backup/list").port(gw.port).api_key().send();
    assert_eq!(list.json()["backups"], serde_json::json!([]), "symlinks and directories are never listed");
}
