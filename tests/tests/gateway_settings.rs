//! The gateway and the worker agree on every setting the worker reads: a
//! value the worker would reject stops the gateway before it starts anything
//! (exit 2, naming the variable, no PostgreSQL, no data directory), and
//! `omni-gateway doctor` reports it as a FAIL row (exit 1). Before the shared
//! contract, `OMNI_API_KEY=short` passed the gateway and the worker then
//! exited 2 at every start.

use crate::gateway;

use std::process::Command;

use gateway::{workdir, GatewayBuilder};
use omni_tests::{bin_path, free_port, pg_bin_dir};

/// Every value the worker validates that an operator can set on the gateway.
const REJECTED: &[(&str, &str)] = &[
    ("OMNI_API_KEY", "short"),
    ("OMNI_API_KEY", "a key with spaces in it, long enough"),
    ("LOG_LEVEL", "x=[["),
    ("LOG_FORMAT", "xml"),
    ("OMNI_API_DB_POOL_SIZE", "0"),
    ("OMNI_API_DB_POOL_SIZE", "1001"),
    ("OMNI_BACKUP_KEEP", "many"),
    ("OMNI_BACKUP_INTERVAL", "often"),
    ("DATABASE_URL", "postgres://db:not-a-port/omni"),
];

#[test]
fn a_value_the_worker_would_reject_stops_the_gateway_before_postgres() {
    for (var, value) in REJECTED {
        let dir = workdir();
        let (status, log) = GatewayBuilder::new(dir.path()).env(var, *value).run_to_exit();
        assert_eq!(status.code(), Some(2), "{var}={value:?} should exit 2:\n{log}");
        assert!(log.contains(var), "{var}={value:?}: the message names the variable:\n{log}");
        assert!(!log.contains("starting PostgreSQL") && !log.contains("initializing"), "{var}: nothing was started:\n{log}");
        assert!(!dir.path().join("data/postgres").exists(), "{var}: no data directory was created");
    }
}

#[test]
fn doctor_reports_a_value_the_worker_would_reject() {
    for (var, value) in REJECTED {
        let dir = workdir();
        let output = Command::new(bin_path("omni-gateway"))
            .arg("doctor")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("OMNI_PORT", free_port().to_string())
            .env("PGSERVE_PORT", free_port().to_string())
            .env("PGSERVE_BIN_DIR", pg_bin_dir())
            .env(var, value)
            .current_dir(dir.path())
            .output()
            .expect("running omni-gateway doctor");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(1), "{var}={value:?}:\n{stdout}");
        let row = stdout.lines().find(|l| l.starts_with("configuration")).unwrap_or_else(|| panic!("{var}: no configuration row:\n{stdout}"));
        assert!(row.contains("FAIL") && row.contains(var), "{var}: {row}");
    }
}

#[test]
fn a_valid_key_and_filter_start_the_whole_stack() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", "sk-omni-test-0123456789abcdef")
        .env("LOG_LEVEL", "info,omni_api=debug")
        .env("OMNI_API_DB_POOL_SIZE", "2")
        .start();
    let r = omni_tests::Request::get("/api/v1/migration/status").header("x-api-key", "sk-omni-test-0123456789abcdef").port(gw.port).send();
    assert_eq!(r.status, 200, "the worker runs with the key the gateway checked: {}", r.text());
    gw.child.terminate(std::time::Duration::from_secs(30));
}
