//! The gateway brings PostgreSQL up from nothing and keeps it up (issue 2,
//! SPEC §3–§4). Every test runs the real `omni-gateway` binary with a real
//! PostgreSQL in its own temporary directory, on free ports.

use crate::gateway;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gateway::{alive, postgres_pids_on, workdir, GatewayBuilder};
use omni_tests::{pg_bin_dir, wait_until, ChildGuard};

fn cluster_state(data_dir: &Path) -> String {
    let out = Command::new(pg_bin_dir().join("pg_controldata")).arg(data_dir).env("LC_ALL", "C").output().expect("pg_controldata");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.strip_prefix("Database cluster state:")).map(|s| s.trim().to_owned()).unwrap_or(text)
}

/// Creates a cluster in `cwd` with one gateway run, then stops it.
fn make_cluster(cwd: &Path) {
    let mut gw = GatewayBuilder::new(cwd).start();
    assert!(gw.terminate().success());
}

#[test]
fn fresh_data_dir_becomes_ready_and_keeps_rows_across_a_clean_restart() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).fresh_cluster().start();
    let log = gw.log();
    assert!(log.contains("initializing a new PostgreSQL") && log.contains(&dir.path().join("data/postgres").display().to_string()), "{log}");
    gw.db().batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before restart')").unwrap();

    let status = gw.terminate();
    assert!(status.success(), "SIGTERM must stop with exit 0, got {status}:\n{}", gw.log());
    assert_eq!(cluster_state(&gw.data_dir()), "shut down", "a SIGTERM stop must leave a cleanly shut down cluster");
    assert!(postgres_pids_on(&gw.data_dir()).is_empty());

    let gw2 = GatewayBuilder::new(dir.path()).start();
    let v: String = gw2.db().query_one("SELECT v FROM kept", &[]).unwrap().get(0);
    assert_eq!(v, "before restart");
    let log2 = gw2.log();
    assert!(!log2.contains("initializing a new"), "an existing cluster must be reused:\n{log2}");
    assert!(!log2.contains("not properly shut down") && !log2.contains("automatic recovery"), "no crash recovery after a clean stop:\n{log2}");
}

#[test]
fn a_new_cluster_has_data_checksums_on() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).fresh_cluster().start();
    let on: String = gw.db().query_one("SHOW data_checksums", &[]).unwrap().get(0);
    assert_eq!(on, "on");
}

#[test]
fn data_dir_belongs_to_the_postgres_account_with_private_modes() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).fresh_cluster().start();
    let data = std::fs::metadata(gw.data_dir()).unwrap();
    assert_eq!(data.permissions().mode() & 0o777, 0o700);
    let pw = std::fs::metadata(dir.path().join("data/postgres.password")).unwrap();
    assert_eq!(pw.permissions().mode() & 0o777, 0o600);
    let expected_uid = if nix_is_root() { postgres_uid() } else { unsafe { libc::geteuid() } };
    assert_eq!(data.uid(), expected_uid, "data dir must be owned by the account PostgreSQL runs as");
    // The postmaster itself runs as that account, never as root.
    let pid = gw.pid_of("postgres").expect("postgres pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == expected_uid.to_string()), "{uid_line}");
}

fn nix_is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn postgres_uid() -> u32 {
    let out = Command::new("id").args(["-u", "postgres"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn memory_mode_leaves_no_files_after_stop() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_MEMORY_MODE", "true").start();
    let mem_dir = Path::new("/dev/shm").join(format!("omni-gateway-mem-{}", gw.child.pid()));
    assert!(mem_dir.join("PG_VERSION").is_file(), "memory cluster expected at {}", mem_dir.display());
    gw.db_memory().batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").unwrap();
    assert!(gw.terminate().success());
    assert!(!mem_dir.exists(), "{} must be deleted at stop", mem_dir.display());
    // Only OMNI_BACKUP_DIR is made at start (empty: the worker's backups go
    // there), so the backup endpoints work, and the setup token is written
    // where the operator (and doctor) reads it; no cluster, no state file.
    let left: Vec<String> = std::fs::read_dir(dir.path().join("data"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|name| name == "backups" || name == "postgres.setup-token"), "memory mode must leave no data directory or state files: {left:?}");
    let backups: Vec<String> = std::fs::read_dir(dir.path().join("data/backups"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".sql")).collect())
        .unwrap_or_default();
    assert!(backups.is_empty(), "no backup was made: {backups:?}");
}

/// The template a memory-mode start copies already holds the schema: the
/// worker applies no migration at start, and Omni's tables are there.
#[test]
fn memory_mode_starts_with_the_schema_in_place() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_MEMORY_MODE", "true").start();
    let tables: i64 = gw.db_memory().query_one("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'omni\\_%'", &[]).unwrap().get(0);
    assert!(tables >= 10, "{tables} omni_ tables");
    let log = gw.log();
    assert!(log.contains("database schema is up to date") && !log.contains("applied migrations"), "{log}");
    // A second start copies the same template: no migration either.
    assert!(gw.terminate().success());
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_MEMORY_MODE", "true").start();
    let log = gw.log();
    assert!(log.contains("database schema is up to date") && !log.contains("applied migrations"), "{log}");
}

trait MemoryDb {
    fn db_memory(&self) -> postgres::Client;
}

impl MemoryDb for gateway::Gateway {
    fn db_memory(&self) -> postgres::Client {
        let pw = std::fs::read_to_string(format!("/dev/shm/omni-gateway-mem-{}.password", self.child.pid())).unwrap();
        let url = format!("postgres://postgres:{}@127.0.0.1:{}/omni", pw.trim(), self.pg_port);
        postgres::Client::connect(&url, postgres::NoTls).unwrap()
    }
}

#[test]
fn memory_mode_cleans_leftovers_of_a_killed_run() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_MEMORY_MODE", "true").start();
    let mem_dir = Path::new("/dev/shm").join(format!("omni-gateway-mem-{}", gw.child.pid()));
    gw.child.kill9();
    assert!(mem_dir.exists(), "a killed gateway cannot clean up after itself");
    let _gw2 = GatewayBuilder::new(dir.path()).env("PGSERVE_MEMORY_MODE", "true").start();
    assert!(!mem_dir.exists(), "the next start must remove {}", mem_dir.display());
}

#[test]
fn restarts_postgres_after_kill9_with_data_intact() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).start();
    gw.db().batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)").unwrap();
    let old = gw.pid_of("postgres").unwrap();
    unsafe { libc::kill(old, libc::SIGKILL) };
    let c = gw.wait_component("postgres", "postgres to be ready again under a new pid", Duration::from_secs(20), |c| {
        c["state"] == "ready" && c["pid"].as_i64().is_some_and(|p| p as i32 != old)
    });
    assert_eq!(c["restarts"], 1, "{c}");
    assert_eq!(c["last_exit"], "killed by SIGKILL", "{c}");
    let v: i32 = gw.db().query_one("SELECT v FROM kept", &[]).unwrap().get(0);
    assert_eq!(v, 42);
}

#[test]
fn a_postgres_that_keeps_failing_is_retried_at_the_capped_rate_flagged_crash_looping_and_back_once_fixed() {
    let dir = workdir();
    make_cluster(dir.path());
    // A setting PostgreSQL rejects at every start.
    let conf = dir.path().join("data/postgres/postgresql.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}\nshared_buffers = 'not a size'\n")).unwrap();

    let cap = Duration::from_millis(200);
    let mut gw = GatewayBuilder::new(dir.path())
        .env("OMNI_RESTART_BACKOFF_MS", "50")
        .env("OMNI_RESTART_BACKOFF_MAX_MS", cap.as_millis().to_string())
        .env("OMNI_CRASH_LOOP_LIMIT", "3")
        .spawn();
    let status_of_postgres = |port: u16| {
        let r = omni_tests::Request::get("/gateway/status").try_send(port).ok()?;
        Some(r.json()["components"][0].clone())
    };
    let c = wait_until(Duration::from_secs(30), "postgres to be flagged crash-looping", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway must keep running to show the failure, but exited with {status}:\n{}", gw.log());
        }
        status_of_postgres(gw.port).filter(|c| c["crash_looping"] == true)
    });
    assert!(c["attempts"].as_u64().unwrap() >= 3, "{c}");
    assert!(c["last_exit"].as_str().unwrap().contains("exit status"), "{c}");
    assert!(c["state"] == "backoff" || c["state"] == "starting", "never given up: {c}");
    let health = gw.get("/health");
    assert_eq!(health.status, 503);
    assert!(gw.get("/metrics").text().contains("omni_child_crash_looping{component=\"postgres\"} 1"));
    // Retried for ever, but never in a busy loop: five more starts span at
    // least four whole delays at the cap, less jitter.
    let before = c["restarts"].as_u64().unwrap();
    let watched = Instant::now();
    gw.wait_component("postgres", "five more starts", Duration::from_secs(30), |c| c["restarts"].as_u64().unwrap() >= before + 5);
    assert!(watched.elapsed() >= cap.mul_f64(0.8 * 4.0), "five starts in {:?}: faster than the cap allows", watched.elapsed());

    // The cause goes away: PostgreSQL is back within one delay and its start.
    std::fs::write(&conf, good).unwrap();
    let c = gw.wait_component("postgres", "postgres to be ready once its settings are fixed", Duration::from_secs(20), |c| c["state"] == "ready");
    assert_eq!(c["crash_looping"], true, "the flag stays until the run is stable: {c}");
    assert!(gw.terminate().success());
}

#[test]
fn kill9_of_the_gateway_takes_postgres_with_it_and_the_next_start_succeeds() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    let pg = gw.pid_of("postgres").unwrap();
    let data_dir = gw.data_dir();
    // SIGKILL to the gateway process only (not its group): nothing can run in it.
    unsafe { libc::kill(gw.child.pid() as i32, libc::SIGKILL) };
    gw.child.wait_exit(Duration::from_secs(5));
    let start = Instant::now();
    wait_until(Duration::from_secs(2), "every postgres of the data dir to be gone within 2 s", || {
        (!alive(pg) && postgres_pids_on(&data_dir).is_empty()).then_some(())
    });
    eprintln!("postgres gone {} ms after the gateway's kill -9", start.elapsed().as_millis());
    let gw2 = GatewayBuilder::new(dir.path()).start();
    gw2.db().query_one("SELECT 1", &[]).unwrap();
}

/// A `PGSERVE_BIN_DIR` whose `initdb` runs the real one to its end, then
/// creates `done` and waits as long as its parent (the gateway) lives: a
/// test can kill the gateway right after `initdb`, before the gateway wrote
/// the password file and flushed the cluster.
fn held_initdb(dir: &Path, done: &Path) -> std::path::PathBuf {
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in --version|-V|--sync-only) exec '{real}' \"$@\" ;; esac\n'{real}' \"$@\" || exit $?\n: > '{done}'\nwhile [ -d /proc/$PPID ]; do sleep 0.02; done\n",
        real = pg_bin_dir().join("initdb").display(),
        done = done.display()
    );
    gateway::bin_dir_with(dir, "held-bin", "initdb", &script)
}

/// A first start killed right after `initdb` (no password file yet, the
/// cluster not flushed) is no dead end: the next start says so, removes
/// what it left and creates the cluster again.
#[test]
fn a_first_start_killed_while_creating_the_cluster_is_started_over_by_the_next_start() {
    let dir = workdir();
    // initdb runs as the postgres account, which writes `done`.
    let signals = dir.path().join("signals");
    std::fs::create_dir(&signals).unwrap();
    std::fs::set_permissions(&signals, std::fs::Permissions::from_mode(0o777)).unwrap();
    let done = signals.join("initdb-done");
    let bin = held_initdb(dir.path(), &done);
    let mut first = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", bin.display().to_string()).spawn();
    wait_until(Duration::from_secs(60), "initdb to finish", || done.exists().then_some(()));
    unsafe { libc::kill(first.child.pid() as i32, libc::SIGKILL) };
    first.child.wait_exit(Duration::from_secs(5));
    let data = dir.path().join("data/postgres");
    assert!(data.join("PG_VERSION").is_file() && !dir.path().join("data/postgres.password").exists());
    assert!(dir.path().join("data/postgres.creating").exists());
    let doctor = std::process::Command::new(omni_tests::bin_path("omni-gateway")).arg("doctor").current_dir(dir.path()).env("PGSERVE_BIN_DIR", pg_bin_dir()).output().unwrap();
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(said.contains("creates it again"), "{said}");

    let gw = GatewayBuilder::new(dir.path()).start();
    let log = gw.log();
    assert!(log.contains("creating it again") && log.contains("initializing a new PostgreSQL"), "{log}");
    gw.db().query_one("SELECT 1", &[]).unwrap();
    assert_eq!(gw.get("/api/v1/health").status, 200, "{log}");
    assert!(!dir.path().join("data/postgres.creating").exists(), "the marker goes once the new cluster is on disk");
}

#[test]
fn stale_pid_file_with_a_dead_pid_does_not_block_the_start() {
    let dir = workdir();
    make_cluster(dir.path());
    let mut dead = ChildGuard::spawn(&mut Command::new("true"));
    dead.wait_exit(Duration::from_secs(5));
    let pid_file = dir.path().join("data/postgres/postmaster.pid");
    std::fs::write(&pid_file, format!("{}\n{}\n", dead.pid(), dir.path().join("data/postgres").display())).unwrap();
    let gw = GatewayBuilder::new(dir.path()).start();
    assert!(gw.log().contains("stale"), "{}", gw.log());
}

#[test]
fn pid_file_naming_a_live_unrelated_process_is_removed_and_that_process_left_alone() {
    let dir = workdir();
    make_cluster(dir.path());
    let mut bystander = ChildGuard::spawn(Command::new("sleep").arg("600"));
    let pid_file = dir.path().join("data/postgres/postmaster.pid");
    std::fs::write(&pid_file, format!("{}\n{}\n", bystander.pid(), dir.path().join("data/postgres").display())).unwrap();
    let gw = GatewayBuilder::new(dir.path()).start();
    gw.db().query_one("SELECT 1", &[]).unwrap();
    assert!(bystander.try_status().is_none(), "the unrelated process must still be running");
}

#[test]
fn a_second_gateway_on_a_live_data_dir_refuses_and_leaves_the_first_alone() {
    let dir = workdir();
    let mut first = GatewayBuilder::new(dir.path()).start();
    let (status, log) = GatewayBuilder::new(dir.path()).run_to_exit();
    assert!(!status.success());
    // The cluster's lock refuses it first (gateway_lock.rs); the pid-file judgement stays behind it.
    assert!(log.contains(&format!("a gateway (pid {}) holds its lock", first.child.pid())), "{log}");
    first.wait_healthy();
    first.db().query_one("SELECT 1", &[]).unwrap();
}

#[test]
fn a_cluster_of_another_major_version_is_refused_and_left_untouched() {
    let dir = workdir();
    make_cluster(dir.path());
    let data = dir.path().join("data/postgres");
    std::fs::write(data.join("PG_VERSION"), "11\n").unwrap();
    let before = tree_fingerprint(&data);
    let (status, log) = GatewayBuilder::new(dir.path()).run_to_exit();
    assert!(!status.success());
    assert!(log.contains("PostgreSQL 11") && log.contains("pg_upgrade"), "{log}");
    assert_eq!(tree_fingerprint(&data), before, "no file of the cluster may change");
}

/// Path, size and modification time of every file below `dir`.
fn tree_fingerprint(dir: &Path) -> Vec<(String, u64, i64, i64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path().display().to_string(), m.len(), m.mtime(), m.mtime_nsec()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_taken_postgres_port_is_reported_naming_pgserve_port() {
    let dir = workdir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (status, log) = GatewayBuilder::new(dir.path()).env("PGSERVE_PORT", port.to_string()).run_to_exit();
    assert!(!status.success());
    assert!(log.contains("PGSERVE_PORT") && log.contains(&port.to_string()), "{log}");

    // The refused start had initialised the cluster but never ran it: the
    // next start creates the app database rather than leave the worker
    // waiting for it.
    drop(taken);
    assert!(dir.path().join("data/postgres/PG_VERSION").is_file());
    let gw = GatewayBuilder::new(dir.path()).start();
    assert!(gw.log().contains("creating database omni"), "{}", gw.log());
    gw.db().query_one("SELECT 1", &[]).unwrap();
    assert_eq!(gw.get("/api/v1/health").status, 200, "{}", gw.log());
}

#[test]
fn require_existing_refuses_to_create_a_cluster() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path()).env("PGSERVE_REQUIRE_EXISTING", "true").run_to_exit();
    assert!(!status.success());
    assert!(log.contains("PGSERVE_REQUIRE_EXISTING"), "{log}");
    assert!(!dir.path().join("data/postgres/PG_VERSION").exists());
}

#[test]
fn a_non_empty_directory_without_a_cluster_is_never_touched() {
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("precious.txt"), "user data").unwrap();
    let (status, log) = GatewayBuilder::new(dir.path()).run_to_exit();
    assert!(!status.success());
    assert!(log.contains("refusing to touch it"), "{log}");
    assert_eq!(std::fs::read_to_string(data.join("precious.txt")).unwrap(), "user data");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
}

#[test]
fn invalid_configuration_stops_with_a_message_naming_the_variable() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path()).env("PGSERVE_MEMORY_MODE", "sometimes").run_to_exit();
    assert_eq!(status.code(), Some(2));
    assert!(log.contains("PGSERVE_MEMORY_MODE"), "{log}");
    std::fs::write(dir.path().join(".env"), "OMNI_PORT=not-a-port\n").unwrap();
    let (status, log) = GatewayBuilder::new(dir.path()).without_env("OMNI_PORT").run_to_exit();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("OMNI_PORT"), "{log}");
}

/// The kit's second major (PostgreSQL 17 from PyPI) runs as the tests run
/// PostgreSQL: the upgrade and replication tests stand on it.
#[test]
fn the_kits_postgresql_17_starts_and_answers() {
    let pg = omni_tests::TempPostgres::start_new_with(&omni_tests::pg17_bin_dir());
    let version: i32 = pg.client().query_one("SELECT current_setting('server_version_num')::int", &[]).unwrap().get(0);
    assert!((170000..180000).contains(&version), "{version}");
}
