//! What an operator reads (issue "Gateway core, second pass"): the gateway's
//! log written to a file has one timestamp and one level per line, children's
//! lines included, no terminal colour codes, and no `FATAL` on a clean start;
//! the worker's readiness comes from its announcement, not from polling.

use crate::gateway;
use crate::source;

use std::time::Duration;

use gateway::{workdir, GatewayBuilder};
use omni_tests::{bin_path, Request, TempPostgres, TEST_API_KEY};

/// `2026-01-31T12:34:56.123456Z` at the start of `text`, if there is one.
fn leading_timestamp(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:dd";
    if b.len() < shape.len() || !shape.iter().zip(b).all(|(s, c)| if *s == b'd' { c.is_ascii_digit() } else { s == c }) {
        return None;
    }
    let end = text.find(' ')?;
    text[..end].ends_with('Z').then(|| &text[..end])
}

/// Also a date the way PostgreSQL's default prefix writes it: `2026-01-31 12:34:56`.
fn starts_with_a_date(text: &str) -> bool {
    let b = text.trim_start().as_bytes();
    b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-'
}

const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];

/// Checks every line of a log written to a file; returns the messages.
fn assert_readable(log: &str) -> Vec<String> {
    assert!(!log.contains('\x1b'), "a log written to a file must have no terminal escape codes:\n{log}");
    let mut messages = Vec::new();
    for line in log.lines() {
        let stamp = leading_timestamp(line).unwrap_or_else(|| panic!("a line without its own timestamp: {line:?}\n\nin:\n{log}"));
        let rest = line[stamp.len()..].trim_start();
        let level = LEVELS.iter().find(|l| rest.starts_with(*l)).unwrap_or_else(|| panic!("no level after the timestamp: {line:?}"));
        let message = rest[level.len()..].trim_start();
        // A child's own prefix must not survive inside ours.
        assert!(!starts_with_a_date(message), "a second timestamp in {line:?}");
        assert!(!LEVELS.iter().any(|l| message.starts_with(&format!("{l} "))), "a second level in {line:?}");
        assert!(!message.contains(" UTC ["), "PostgreSQL's own prefix in {line:?}");
        messages.push(message.to_owned());
    }
    messages
}

#[test]
fn a_log_file_has_one_timestamp_and_level_per_line_and_no_fatal_on_fresh_and_warm_starts() {
    let dir = workdir();
    for start in ["fresh cluster", "warm restart"] {
        let mut gw = GatewayBuilder::new(dir.path()).fresh_cluster().start();
        let session = uuid::Uuid::new_v4().to_string();
        let r = Request::new("POST", "/api/v1/preferences").port(gw.port).session(&session).json(&serde_json::json!({"key": "k", "value": "v"})).send();
        assert_eq!(r.status, 200, "{start}");
        assert!(gw.terminate().success());
        let log = gw.log();
        let messages = assert_readable(&log);
        assert!(!log.contains("FATAL"), "{start}: a clean start and stop must log no FATAL line:\n{log}");
        // Children's lines are there, at their own level, tagged with the child.
        assert!(log.lines().any(|l| l.contains(" INFO ") && l.contains("database system is ready to accept connections") && l.contains("child=\"postgres\"")), "{log}");
        assert!(log.lines().any(|l| l.contains(" INFO ") && l.contains("starting omni-api") && l.contains("child=\"api\"")), "{log}");
        if start == "fresh cluster" {
            // initdb's progress report is debug chatter; one line says what happened.
            assert!(!log.contains("creating subdirectories"), "initdb's chatter belongs at debug level:\n{log}");
            assert_eq!(messages.iter().filter(|m| m.starts_with("cluster initialized in")).count(), 1, "{log}");
        }
    }
}

#[test]
fn the_workers_readiness_is_its_announcement() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    assert!(gw.terminate().success());
    let log = gw.log();
    assert!(log.contains("API worker announced it is ready"), "{log}");
    assert!(log.contains("readiness announced to the gateway"), "the worker's side of it:\n{log}");
}

#[test]
fn no_health_request_reaches_a_worker_before_it_announces_itself() {
    let dir = workdir();
    let pg = TempPostgres::start_new();
    // A stand-in worker that announces 400 ms after its start and counts the
    // GET /api/v1/health requests that come before.
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("DATABASE_URL", pg.url())
        .env("FAKE_READY_DELAY_MS", "400")
        .start();
    assert!(gw.log().contains("API worker announced it is ready"), "{}", gw.log());
    let hits = Request::get("/health-hits-before-ready").port(gw.port).send().text();
    assert_eq!(hits, "0", "the gateway polled the worker before it said it was ready");
}

#[test]
fn a_worker_started_by_hand_logs_to_a_file_without_colour_and_says_how_to_tell_it_is_ready() {
    let pg = TempPostgres::start_new();
    let mut worker = omni_tests::WorkerBuilder::new(&pg.url()).env("LOG_FORMAT", "pretty").start();
    worker.child.terminate(std::time::Duration::from_secs(10));
    let log = worker.log();
    assert!(!log.contains('\x1b'), "{log}");
    assert!(log.contains("ready when GET /api/v1/health answers 200"), "without OMNI_API_READY_FD nothing is announced:\n{log}");
    assert_readable(&log);
}

/// `LOG_LEVEL=debug` (what `make dev` sets) shows the statements the
/// gateway and the worker send, never their parameters: the API key, a
/// preference's value.
#[test]
fn debug_logs_show_no_statement_parameters() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("LOG_LEVEL", "debug").start();
    let secret = "value-that-must-not-be-logged-7f3a";
    let put = Request::new("POST", "/api/v1/preferences").session("0b7c2f7e-3d2a-4b8e-9c61-5a0f5d1e2c3b").json(&serde_json::json!({ "key": "theme", "value": secret })).send_to(gw.port);
    assert!(put.status < 300, "{}", put.text());
    let log = gw.log();
    assert!(log.contains("DEBUG"), "debug lines are written: {log}");
    assert!(!log.contains(TEST_API_KEY), "the API key is in the log:\n{log}");
    assert!(!log.contains(secret), "a preference value is in the log:\n{log}");
}

/// A stop logs the children's last words before the gateway's own last line.
#[test]
fn a_stop_logs_postgresqls_last_line_before_the_gateways_last() {
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).start();
    assert!(gw.terminate().success());
    let log = gw.log();
    let shut = log.find("database system is shut down").unwrap_or_else(|| panic!("PostgreSQL's last line is missing:\n{log}"));
    let last = log.trim_end().lines().last().unwrap_or_default();
    assert!(last.ends_with("stopped") && !last.contains("child="), "the gateway's own line comes last: {last}");
    assert!(shut < log.len() - last.len(), "{log}");
}

/// A non-loopback IPv4 address of this machine, if it has one.
fn non_loopback_ipv4() -> Option<std::net::Ipv4Addr> {
    let mut found = None;
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut at = list;
        while !at.is_null() {
            let addr = (*at).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let v4 = &*(addr as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                if !ip.is_loopback() {
                    found = Some(ip);
                }
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

/// The gateway's own surface against strangers: a wrong key on the
/// protected log endpoints is counted against its sender (the worker's 429
/// comes back as 429, never as a 503 that hits everyone), live streams are
/// capped per client address, and `/gateway/internal/*` answers only on
/// loopback. Clients are told apart by real source addresses (127.0.0.x).
#[test]
fn a_stranger_blocks_only_itself_holds_few_streams_and_cannot_reach_the_internal_endpoints() {
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("OMNI_HOST", "0.0.0.0").start();
    let port = gw.port;

    // Wrong keys from one client: each a 401, each counted against that
    // client (the gateway tells the worker who asks), so its sign-ins are
    // blocked next...
    for i in 0..10 {
        let (status, _, body) = source::send_from("127.0.0.2", port, "GET", "/gateway/logs", &[("x-api-key", "wrong")], None);
        assert_eq!(status, 401, "wrong key {i}: {body}");
    }
    let wrong_password = serde_json::json!({"username": "nobody", "password": "wrong"});
    // The 11th failure is checked and blocks (1 s, doubling; a short block
    // may run out on a busy machine, so a few more may be checked).
    let mut checked = 0;
    let (headers, body) = omni_tests::wait_until(Duration::from_secs(60), "a blocked sign-in", || {
        let (status, headers, body) = source::send_from("127.0.0.2", port, "POST", "/api/v1/auth/login", &[], Some(&wrong_password));
        match status {
            401 => {
                checked += 1;
                None
            }
            429 => Some((headers, body)),
            other => panic!("{other}: {body}"),
        }
    });
    assert!(checked <= 3, "{checked} sign-ins checked after 10 wrong keys: the keys were not counted against their sender");
    assert!(headers.iter().any(|(n, _)| n == "retry-after"), "429 without Retry-After: {body}");
    // ...and nobody else's: another client's sign-in is merely wrong, and the
    // right key works from both.
    assert_eq!(source::send_from("127.0.0.3", port, "POST", "/api/v1/auth/login", &[], Some(&wrong_password)).0, 401);
    for from in ["127.0.0.3", "127.0.0.2"] {
        let (status, _, body) = source::send_from(from, port, "GET", "/gateway/logs?limit=1", &[("x-api-key", TEST_API_KEY)], None);
        assert_eq!(status, 200, "{from}: {body}");
    }

    // Live streams: at most 8 per client address, logs and status together.
    let mut held = Vec::new();
    for i in 0..8 {
        let path = if i % 2 == 0 { "/gateway/events" } else { "/gateway/logs/stream" };
        let (status, stream) = source::open_stream_from("127.0.0.4", port, path, &[("x-api-key", TEST_API_KEY)]);
        assert_eq!(status, 200, "stream {i} ({path})");
        held.push(stream);
    }
    let (status, _) = source::open_stream_from("127.0.0.4", port, "/gateway/events", &[]);
    assert_eq!(status, 429, "a 9th stream from the same address");
    let (status, _other) = source::open_stream_from("127.0.0.5", port, "/gateway/events", &[]);
    assert_eq!(status, 200, "another address has its own streams");
    // A closed stream gives its slot back.
    held.pop();
    let _again = omni_tests::wait_until(Duration::from_secs(30), "a freed stream slot", || {
        let (status, stream) = source::open_stream_from("127.0.0.4", port, "/gateway/events", &[]);
        (status == 200).then_some(stream)
    });

    // The internal endpoints: 403 from a non-loopback peer, the token check on loopback.
    let (status, _, _) = source::send_from("127.0.0.2", port, "GET", "/gateway/internal/pitr/window", &[], None);
    assert_eq!(status, 401, "loopback without the token");
    let ip = non_loopback_ipv4().expect("this machine has a non-loopback IPv4 address to test the internal endpoints from");
    let (status, _, body) = source::send_from_to(&ip.to_string(), &ip.to_string(), port, "GET", "/gateway/internal/pitr/window", &[], None);
    assert_eq!(status, 403, "{body}");
    // The public endpoints answer on that address as usual.
    assert_eq!(source::send_from_to(&ip.to_string(), &ip.to_string(), port, "GET", "/gateway/status", &[], None).0, 200);
}
