//! Least privilege (SPEC §4): run as root, the gateway runs the API worker
//! as an unprivileged account (`OMNI_API_USER`, by default `PGSERVE_USER`),
//! and everything the worker writes still works: backups and restores through
//! the API, backups made by the root CLI, onboarding's settings file.
//!
//! These tests need root; as another user there is nothing to drop and they
//! say so and return.

use crate::gateway;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{account_ids, is_root, Request, TempPostgres, TEST_API_KEY};
use serde_json::json;

fn skip_unless_root() -> bool {
    if !is_root() {
        eprintln!("SKIPPED: only a gateway run as root switches accounts; run the tests as root to cover this");
    }
    !is_root()
}

/// Real, effective, saved and filesystem uids of a process, from /proc.
fn uids(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().skip(1).map(|u| u.parse().unwrap()).collect()
}

fn api(gw: &Gateway, method: &str, path: &str) -> omni_tests::Response {
    Request::new(method, path).port(gw.port).api_key().send()
}

/// `omni-gateway <args>` run as root in `cwd`, its stdout and stderr together.
fn cli(cwd: &Path, args: &[&str]) -> (bool, String) {
    let (ok, out, err) = gateway::cli(cwd, args);
    (ok, format!("{out}{err}"))
}

#[test]
fn as_root_the_worker_runs_unprivileged_and_backups_restores_and_the_cli_still_work() {
    if skip_unless_root() {
        return;
    }
    let postgres = account_ids("postgres").0;
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let worker = gw.pid_of("api").expect("worker pid");
    assert!(uids(worker).iter().all(|u| *u == postgres), "omni-api must run as postgres (uid {postgres}), not root: {:?}", uids(worker));
    assert!(gw.log().contains("the API worker will run as user postgres"), "{}", gw.log());

    // A backup and a restore through the API.
    let session = uuid::Uuid::new_v4().to_string();
    let set = |value: &str| {
        let r = Request::new("POST", "/api/v1/preferences").port(gw.port).session(&session).json(&json!({"key": "theme", "value": value})).send();
        assert_eq!(r.status, 200, "{}", r.text());
    };
    set("dark");
    let created = api(&gw, "POST", "/api/v1/backup/create");
    assert_eq!(created.status, 200, "{}", created.text());
    let name = created.json()["backup_file"].as_str().unwrap().to_owned();
    let backups = dir.path().join("data/backups");
    let file = std::fs::metadata(backups.join(&name)).unwrap();
    assert_eq!(file.uid(), postgres, "a backup made by the worker is the worker's");
    let folder = std::fs::metadata(&backups).unwrap();
    assert_eq!((folder.uid(), folder.permissions().mode() & 0o777), (postgres, 0o700), "the backup directory is the worker's, private");
    set("light");
    let restored = api(&gw, "POST", &format!("/api/v1/backup/restore/{name}"));
    assert_eq!(restored.status, 200, "{}", restored.text());
    let theme = Request::get("/api/v1/preferences/theme").port(gw.port).session(&session).send().json();
    assert_eq!(theme["value"], "dark");

    // The root CLI leaves a backup the worker can list and delete.
    let (ok, out) = cli(dir.path(), &["backup", "create"]);
    assert!(ok, "{out}");
    let cli_name = out.split_whitespace().next().unwrap().to_owned();
    assert_eq!(std::fs::metadata(backups.join(&cli_name)).unwrap().uid(), postgres, "the CLI works as the worker's account");
    let listed = api(&gw, "GET", "/api/v1/backup/list").json();
    assert!(listed["backups"].as_array().unwrap().iter().any(|b| b["filename"] == cli_name.as_str()), "{listed}");
    let deleted = api(&gw, "DELETE", &format!("/api/v1/backup/{cli_name}"));
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert!(!backups.join(&cli_name).exists());
    // And another API backup after the CLI took the lock file first.
    assert_eq!(api(&gw, "POST", "/api/v1/backup/create").status, 200);

    // The cluster's secret stays root's.
    let password = std::fs::metadata(dir.path().join("data/postgres.password")).unwrap();
    assert_eq!((password.uid(), password.permissions().mode() & 0o777), (0, 0o600));
}

#[test]
fn as_root_onboarding_settings_are_saved_by_the_unprivileged_worker() {
    if skip_unless_root() {
        return;
    }
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let body = json!({"data_dir": "./data/elsewhere", "memory_mode": false, "replication_enabled": false});
    let r = Request::new("POST", "/api/v1/setup/initialize").port(gw.port).api_key().json(&body).send();
    assert_eq!(r.status, 200, "{}", r.text());
    let file = std::fs::metadata(dir.path().join("data/omni-settings.json")).unwrap();
    assert_eq!((file.uid(), file.permissions().mode() & 0o777), (account_ids("postgres").0, 0o600));
    // The worker could add its file, but not remove root's beside it.
    let data = std::fs::metadata(dir.path().join("data")).unwrap();
    assert_eq!(data.permissions().mode() & 0o1000, 0o1000, "sticky, so the password file stays root's");
}

#[test]
fn as_root_with_database_url_the_worker_still_runs_unprivileged() {
    if skip_unless_root() {
        return;
    }
    let pg = TempPostgres::start_new();
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("DATABASE_URL", pg.url()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let worker = gw.pid_of("api").expect("worker pid");
    let postgres = account_ids("postgres").0;
    assert!(uids(worker).iter().all(|u| *u == postgres), "{:?}", uids(worker));
    let created = api(&gw, "POST", "/api/v1/backup/create");
    assert_eq!(created.status, 200, "{}", created.text());
}

#[test]
fn omni_api_user_chooses_the_workers_account_and_a_missing_one_stops_the_start() {
    if skip_unless_root() {
        return;
    }
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_USER", "nobody").env("OMNI_API_KEY", TEST_API_KEY).start();
    let nobody = account_ids("nobody").0;
    assert!(uids(gw.pid_of("api").unwrap()).iter().all(|u| *u == nobody));
    // PostgreSQL keeps its own account.
    assert!(uids(gw.pid_of("postgres").unwrap()).iter().all(|u| *u == account_ids("postgres").0));
    assert_eq!(api(&gw, "POST", "/api/v1/backup/create").status, 200);
    drop(gw);

    let other = workdir();
    let (status, log) = GatewayBuilder::new(other.path()).env("OMNI_API_USER", "omni-no-such-user").run_to_exit();
    assert!(!status.success());
    assert!(log.contains("OMNI_API_USER=omni-no-such-user does not exist") && log.contains("useradd"), "{log}");
}

/// Socket inodes of `pid`'s open descriptors.
fn socket_inodes(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect()
}

#[test]
fn the_worker_listens_only_where_the_gateway_can_reach_it() {
    if skip_unless_root() {
        return;
    }
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    let worker = gw.pid_of("api").expect("worker pid");
    let inodes = socket_inodes(worker);
    // No TCP socket of the worker listens (state 0A), on IPv4 or IPv6: no
    // local account reaches it around the gateway and its client-address header.
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let listening: Vec<String> = std::fs::read_to_string(table)
            .unwrap()
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(3) == Some("0A") && l.split_whitespace().nth(9).is_some_and(|i| inodes.iter().any(|w| w == i)))
            .map(str::to_owned)
            .collect();
        assert!(listening.is_empty(), "the worker listens on TCP ({table}): {listening:?}");
    }
    // It listens on a Unix socket, in a directory only the gateway's account opens.
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap();
    let socket = unix
        .lines()
        .skip(1)
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8 && f[3] == "00010000" && inodes.iter().any(|i| i == f[6])
        })
        .and_then(|l| l.split_whitespace().nth(7))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no listening Unix socket of the worker in /proc/net/unix"));
    let parent = socket.parent().unwrap().to_owned();
    let meta = std::fs::metadata(&parent).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o700, 0), "{} must be private to the gateway's account", parent.display());
    let curl = |as_user: Option<u32>| {
        let mut command = std::process::Command::new("curl");
        command.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"]).arg(&socket).arg("http://localhost/api/v1/health");
        if let Some(uid) = as_user {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
        }
        let out = command.output().unwrap();
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_eq!(curl(None).0, "200", "the gateway's account reaches the worker there");
    let (code, error) = curl(Some(account_ids("postgres").0));
    assert_eq!(code, "000", "another account must not connect: {error}");
    assert!(error.contains("Permission denied") || error.contains("Couldn't connect"), "{error}");
    gw.terminate();
    assert!(!parent.exists(), "{} must go when the gateway stops", parent.display());
}
