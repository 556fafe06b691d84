//! `omni-gateway doctor` (issue 7): on a healthy machine it exits 0; whatever
//! would stop a start (a taken port, a missing binary directory, a cluster of
//! another major version, a PostgreSQL already running on the data directory)
//! makes it exit non-zero with a row that names the problem and the fix;
//! next to a running gateway it describes that gateway and exits 0.
//! Every test runs the real binary against real directories and sockets.

use crate::gateway;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use gateway::{workdir, GatewayBuilder};
use omni_tests::{bin_path, free_port, pg_bin_dir};

/// What one doctor run printed, and how it ended.
struct Doctor {
    success: bool,
    stdout: String,
}

impl Doctor {
    /// The table row of `check`: its status and its detail.
    fn row(&self, check: &str) -> (String, String) {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(check) && l[check.len()..].starts_with("  "))
            .unwrap_or_else(|| panic!("no row {check:?} in:\n{}", self.stdout));
        let mut rest = line[check.len()..].trim_start().splitn(2, ' ');
        let status = rest.next().unwrap_or("").to_owned();
        (status, rest.next().unwrap_or("").trim().to_owned())
    }

    fn assert_row(&self, check: &str, status: &str, detail_has: &[&str]) {
        let (got, detail) = self.row(check);
        assert_eq!(got, status, "row {check:?}:\n{}", self.stdout);
        for needle in detail_has {
            assert!(detail.contains(needle), "row {check:?} should mention {needle:?}:\n{}", self.stdout);
        }
    }
}

/// Runs `omni-gateway doctor` in `cwd` with the test defaults overridden by `env`.
fn doctor(cwd: &Path, env: &[(&str, String)]) -> Doctor {
    doctor_with_args(cwd, env, &[])
}

fn doctor_with_args(cwd: &Path, env: &[(&str, String)], args: &[&str]) -> Doctor {
    let mut command = Command::new(bin_path("omni-gateway"));
    command
        .arg("doctor")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OMNI_PORT", free_port().to_string())
        .env("PGSERVE_PORT", free_port().to_string())
        .env("PGSERVE_BIN_DIR", pg_bin_dir())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null());
    let out = command.output().expect("run omni-gateway doctor");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.starts_with("check"), "doctor must print its table on stdout; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    Doctor { success: out.status.success(), stdout }
}

fn with_ui(cwd: &Path) {
    std::fs::create_dir_all(cwd.join("ui-dist")).unwrap();
    std::fs::write(cwd.join("ui-dist/index.html"), "<!doctype html>").unwrap();
}

#[test]
fn a_healthy_machine_passes_every_check_and_exits_zero() {
    let dir = workdir();
    with_ui(dir.path());
    let d = doctor(dir.path(), &[]);
    assert!(d.success, "doctor must exit 0 on a healthy machine:\n{}", d.stdout);
    assert!(!d.stdout.contains("FAIL"), "{}", d.stdout);
    assert_row_binaries(&d);
    d.assert_row("data directory", "ok", &[&dir.path().join("data/postgres").display().to_string(), "new cluster will be created"]);
    d.assert_row("OMNI_PORT", "ok", &["is free"]);
    d.assert_row("PGSERVE_PORT", "ok", &["is free"]);
    d.assert_row("API worker binary", "ok", &["omni-api"]);
    d.assert_row("free disk (data)", "ok", &["free at"]);
    assert!(d.stdout.contains("everything omni-gateway needs to start is in place"), "{}", d.stdout);
}

fn assert_row_binaries(d: &Doctor) {
    let version = String::from_utf8_lossy(&Command::new(pg_bin_dir().join("postgres")).arg("--version").output().unwrap().stdout).trim().to_owned();
    d.assert_row("PostgreSQL binaries", "ok", &[&version, &pg_bin_dir().display().to_string()]);
}

#[test]
fn a_taken_gateway_port_fails_naming_the_port_and_the_variable() {
    let dir = workdir();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let d = doctor(dir.path(), &[("OMNI_PORT", port.to_string())]);
    assert!(!d.success, "a taken OMNI_PORT must fail:\n{}", d.stdout);
    d.assert_row("OMNI_PORT", "FAIL", &[&port.to_string(), "already in use", "Set OMNI_PORT to a free port"]);
    assert!(d.stdout.contains("would stop omni-gateway from starting"), "{}", d.stdout);
}

#[test]
fn flags_after_the_subcommand_apply_to_the_checks() {
    let dir = workdir();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let d = doctor_with_args(dir.path(), &[], &["--port", &port, "--data-dir", "elsewhere/pg"]);
    assert!(!d.success, "{}", d.stdout);
    d.assert_row("OMNI_PORT", "FAIL", &[&port]);
    d.assert_row("data directory", "ok", &[&dir.path().join("elsewhere/pg").display().to_string(), "PGSERVE_DATA_DIR from command line"]);
}

#[test]
fn a_taken_postgres_port_fails_naming_pgserve_port() {
    let dir = workdir();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let d = doctor(dir.path(), &[("PGSERVE_PORT", port.to_string())]);
    assert!(!d.success, "{}", d.stdout);
    d.assert_row("PGSERVE_PORT", "FAIL", &[&port.to_string(), "Set PGSERVE_PORT to a free port (or 0"]);
}

#[test]
fn a_missing_binary_directory_fails_with_what_to_point_it_at() {
    let dir = workdir();
    let d = doctor(dir.path(), &[("PGSERVE_BIN_DIR", "/nonexistent/postgresql/bin".into())]);
    assert!(!d.success, "{}", d.stdout);
    d.assert_row("PostgreSQL binaries", "FAIL", &["PGSERVE_BIN_DIR=/nonexistent/postgresql/bin", "Point PGSERVE_BIN_DIR at the directory"]);
}

#[test]
fn a_cluster_of_another_major_version_fails_with_upgrade_instructions() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    assert!(gw.terminate().success(), "{}", gw.log());
    let data = dir.path().join("data/postgres");

    let healthy = doctor(dir.path(), &[]);
    assert!(healthy.success, "a cleanly stopped cluster of the right version must pass:\n{}", healthy.stdout);
    healthy.assert_row("data directory", "ok", &["holds a cluster", "mode 700"]);
    healthy.assert_row("cluster version", "ok", &["same major version"]);
    healthy.assert_row("postmaster.pid", "ok", &["none"]);

    std::fs::write(data.join("PG_VERSION"), "11\n").unwrap();
    let d = doctor(dir.path(), &[]);
    assert!(!d.success, "{}", d.stdout);
    d.assert_row("cluster version", "FAIL", &["created by PostgreSQL 11", "pg_upgrade", "PGSERVE_BIN_DIR to PostgreSQL 11 binaries"]);
}

#[test]
fn next_to_a_running_gateway_doctor_reports_it_healthy_and_exits_zero() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).start();
    let d = doctor(dir.path(), &[("OMNI_PORT", gw.port.to_string()), ("PGSERVE_PORT", gw.pg_port.to_string())]);
    assert!(d.success, "the ports and the pid file are the running gateway's own, not problems:\n{}", d.stdout);
    let pid = gw.pid_of("postgres").expect("postgres pid");
    let who = format!("the running gateway (pid {})", gw.child.pid());
    d.assert_row("OMNI_PORT", "ok", &[&gw.port.to_string(), "in use by", &who]);
    d.assert_row("running gateway", "ok", &["200", "postgres ready", "api ready"]);
    d.assert_row("PGSERVE_PORT", "ok", &[&gw.pg_port.to_string(), &format!("PostgreSQL (pid {pid})"), &who]);
    d.assert_row("postmaster.pid", "ok", &[&format!("PostgreSQL (pid {pid})"), &who]);
    assert!(d.stdout.contains(&format!("{who} is running and healthy")), "{}", d.stdout);
}

#[test]
fn a_postgres_running_on_the_data_directory_without_its_gateway_on_omni_port_fails() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).start();
    // Another OMNI_PORT: the PostgreSQL on this directory belongs to no gateway doctor can see.
    let d = doctor(dir.path(), &[("PGSERVE_PORT", gw.pg_port.to_string())]);
    assert!(!d.success, "a second start on a live cluster would fail, so doctor must too:\n{}", d.stdout);
    let pid = gw.pid_of("postgres").expect("postgres pid");
    d.assert_row("postmaster.pid", "FAIL", &[&format!("pid {pid}"), "already running", "Stop that server"]);
    d.assert_row("PGSERVE_PORT", "FAIL", &[&gw.pg_port.to_string()]);
}

#[test]
fn a_dead_postmaster_pid_file_is_reported_as_stale_not_fatal() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    let data = gw.data_dir();
    let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
    assert!(gw.terminate().success());
    // What a crash leaves behind: the file of a postmaster that is gone.
    let gone = {
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    };
    let rest: String = pid_file.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(data.join("postmaster.pid"), format!("{gone}\n{rest}")).unwrap();
    let d = doctor(dir.path(), &[]);
    assert!(d.success, "{}", d.stdout);
    d.assert_row("postmaster.pid", "ok", &["stale", &format!("pid {gone}")]);
}

#[test]
fn with_database_url_it_checks_the_external_server_with_a_real_query() {
    let mut pg = omni_tests::TempPostgres::start_new();
    let dir = workdir();
    let up = doctor(dir.path(), &[("DATABASE_URL", pg.url())]);
    assert!(up.success, "{}", up.stdout);
    up.assert_row("DATABASE_URL reachable", "ok", &["SELECT 1 answered"]);
    assert!(!up.stdout.contains("PGSERVE_PORT"), "no embedded cluster, so no embedded checks:\n{}", up.stdout);

    pg.stop();
    let down = doctor(dir.path(), &[("DATABASE_URL", pg.url())]);
    assert!(!down.success, "{}", down.stdout);
    down.assert_row("DATABASE_URL reachable", "FAIL", &[&format!("127.0.0.1:{}", pg.port()), "check that it runs"]);
}

#[test]
fn memory_mode_checks_the_tmpfs_instead_of_a_data_directory() {
    let dir = workdir();
    let d = doctor(dir.path(), &[("PGSERVE_MEMORY_MODE", "true".into())]);
    assert!(d.success, "{}", d.stdout);
    d.assert_row("tmpfs (memory mode)", "ok", &["/dev/shm writable", "free"]);
    assert!(!d.stdout.contains("\ndata directory "), "memory mode has no data directory to check:\n{}", d.stdout);
}

#[test]
fn as_root_a_missing_postgres_account_fails_with_the_command_that_creates_it() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: only root switches to PGSERVE_USER; run the tests as root to cover this");
        return;
    }
    let dir = workdir();
    let d = doctor(dir.path(), &[("PGSERVE_USER", "omni-no-such-user".into())]);
    assert!(!d.success, "{}", d.stdout);
    d.assert_row("PostgreSQL account", "FAIL", &["PGSERVE_USER=omni-no-such-user does not exist", "useradd --system"]);
}

#[test]
fn as_root_a_missing_worker_account_fails_naming_omni_api_user() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: only root switches to OMNI_API_USER; run the tests as root to cover this");
        return;
    }
    let dir = workdir();
    let d = doctor(dir.path(), &[("OMNI_API_USER", "omni-no-such-worker".into())]);
    assert!(!d.success, "{}", d.stdout);
    d.assert_row("API worker account", "FAIL", &["OMNI_API_USER=omni-no-such-worker does not exist", "useradd --system"]);
    let ok = doctor(dir.path(), &[]);
    ok.assert_row("API worker account", "ok", &["will run as postgres"]);
}
