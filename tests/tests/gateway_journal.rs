//! Under systemd, journald stamps each line it receives; the gateway leaves
//! its own time out when `JOURNAL_STREAM` names its stderr, and keeps it
//! otherwise (a file, a terminal, a pipe, or a child that inherited the
//! variable with stderr elsewhere).

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use omni_tests::{bin_path, free_port, pg_bin_dir, ChildGuard, TempDir};

/// Runs the gateway against a port that is taken (it logs one error line
/// through its logger and exits) with stderr into `log`, and `JOURNAL_STREAM`
/// from `journal(log's device, log's inode)`.
fn first_log_line(journal: impl Fn(u64, u64) -> String) -> String {
    let dir = TempDir::new("journal");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let mut command = Command::new(bin_path("omni-gateway"));
    command
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", pg_bin_dir())
        .env("PGSERVE_PORT", free_port().to_string())
        .env("OMNI_PORT", taken.local_addr().unwrap().port().to_string())
        .env("JOURNAL_STREAM", journal(meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(file);
    let mut gateway = ChildGuard::spawn(&mut command);
    let status = gateway.wait_exit(Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success() && text.contains("already in use"), "{text}");
    text.lines().find(|l| l.contains("already in use")).unwrap().to_owned()
}

/// An RFC 3339 time as tracing writes it starts the line: `2026-12-04T23:…`.
fn starts_with_a_time(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

#[test]
fn the_journal_gets_lines_without_the_gateways_own_time() {
    let line = first_log_line(|dev, ino| format!("{dev}:{ino}"));
    assert!(!starts_with_a_time(&line), "journald adds the time; the line must not carry it: {line}");
    assert!(line.trim_start().starts_with("ERROR"), "the level still leads: {line}");
}

#[test]
fn anything_else_keeps_the_time() {
    let line = first_log_line(|dev, ino| format!("{dev}:{}", ino + 1));
    assert!(starts_with_a_time(&line), "a stream that is not the journal keeps the time: {line}");
}
