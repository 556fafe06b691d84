//! Supervision never gives up, and stops promptly (SPEC §4, "Gateway core,
//! second pass"): a crash loop is answered with capped backoff, never with a
//! child left down; `failed` is only for what no retry can fix, and SIGHUP
//! retries it; a stop is acted on at once, also during a reload; `/health`
//! turns 503 as soon as a stop begins.
//!
//! Most tests use `fake-worker` (tests/src/bin), which can refuse to start,
//! never become ready, or record its starts and requests in a file, with an
//! external `DATABASE_URL` so no cluster is started for them. The chaos test
//! runs the real stack through the soak binary, with default settings.

use crate::gateway;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gateway::{alive, workdir, Gateway, GatewayBuilder};
use omni_tests::{bin_path, isolated_command, wait_until, ChildGuard, Request, TempPostgres};
use serde_json::Value;

/// The default `OMNI_RESTART_BACKOFF_MAX_MS`.
const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// A gateway whose worker is `fake-worker`, with an external PostgreSQL
/// (cheap to start) instead of the embedded cluster. The returned server must
/// outlive the gateway: `/health` checks it.
fn fake_stack(dir: &Path) -> (GatewayBuilder, TempPostgres) {
    let pg = TempPostgres::start_new();
    let builder = GatewayBuilder::new(dir).env("OMNI_API_BIN", bin_path("fake-worker").display().to_string()).env("DATABASE_URL", pg.url());
    (builder, pg)
}

/// `name`'s entry in `/gateway/status`, or `None` while the gateway does not answer.
fn try_component(port: u16, name: &str) -> Option<Value> {
    let r = Request::get("/gateway/status").try_send(port).ok()?;
    (r.status == 200).then(|| r.json()["components"].as_array()?.iter().find(|c| c["name"] == name).cloned()).flatten()
}

fn signal(gw: &Gateway, sig: libc::c_int) {
    // SAFETY: signalling the gateway process this test started.
    unsafe { libc::kill(gw.child.pid() as i32, sig) };
}

/// A `FAKE_EVENTS` file the worker can append to: run as root, the gateway
/// starts it as the unprivileged worker account, which cannot create files
/// in the test's directory.
fn events_file(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("events.log");
    std::fs::write(&path, "").expect("creating the events file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("opening the events file to the worker");
    path
}

/// `(event, pid, unix ms)` lines fake-worker wrote to its `FAKE_EVENTS` file.
fn events(path: &Path) -> Vec<(String, i32, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Seconds since midnight UTC of a JSON log line's `timestamp` (RFC 3339).
fn log_seconds(line: &Value) -> f64 {
    let ts = line["timestamp"].as_str().expect("a timestamp on every log line");
    let time = ts.split_once('T').expect("RFC 3339").1.trim_end_matches('Z');
    let mut parts = time.split(':').map(|p| p.parse::<f64>().expect("numeric time"));
    let (h, m, s) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    h * 3600.0 + m * 60.0 + s
}

#[test]
fn a_child_failing_at_start_20_times_is_retried_no_faster_than_the_cap_and_ready_soon_after_the_cause_goes() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let required = dir.path().join("worker-may-start");
    let events_file = events_file(dir.path());
    let cap = Duration::from_millis(400);
    let gw = stack
        .env("FAKE_REQUIRE_FILE", required.display().to_string())
        .env("FAKE_EVENTS", events_file.display().to_string())
        .env("OMNI_RESTART_BACKOFF_MS", "100")
        .env("OMNI_RESTART_BACKOFF_MAX_MS", cap.as_millis().to_string())
        .env("LOG_FORMAT", "json")
        .spawn();
    let mut gw = gw;
    let c = wait_until(Duration::from_secs(60), "20 failed starts of the worker", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway must keep running while its worker fails, but exited with {status}:\n{}", gw.log());
        }
        try_component(gw.port, "api").filter(|c| c["attempts"].as_u64() >= Some(20))
    });
    // Still being retried, visibly.
    assert!(c["state"] == "backoff" || c["state"] == "starting", "{c}");
    assert_eq!(c["crash_looping"], true, "6 quick failures in a row flag a crash loop: {c}");
    assert_eq!(c["last_exit"], "exit status 1", "{c}");
    let health = gw.get("/health");
    assert_eq!(health.status, 503);
    assert!(health.json()["detail"].as_str().unwrap().contains("api is"), "{}", health.text());
    let metrics = gw.get("/metrics").text();
    assert!(metrics.contains("omni_child_crash_looping{component=\"api\"} 1"), "{metrics}");
    let backoff = gw.wait_component("api", "the worker to be in backoff", Duration::from_secs(5), |c| c["state"] == "backoff");
    let next = backoff["next_retry_s"].as_f64().expect("a backoff says when the next retry is");
    assert!(next <= cap.as_secs_f64(), "the next retry is never further away than the cap: {backoff}");
    let more = c["attempts"].as_u64().unwrap() + 2;
    gw.wait_component("api", "two more attempts", Duration::from_secs(10), |c| c["attempts"].as_u64() >= Some(more));
    assert!(gw.log().contains("crash loop: 6 failures in a row"), "the crash loop is logged as an error");

    // The cause goes away: ready within one capped delay plus 1 s.
    std::fs::write(&required, "").unwrap();
    let fixed = Instant::now();
    gw.wait_component("api", "the worker to be ready once it can start", cap + Duration::from_secs(5), |c| c["state"] == "ready");
    let took = fixed.elapsed();
    eprintln!("ready {} ms after the cause went away (cap {} ms)", took.as_millis(), cap.as_millis());
    assert!(took <= cap + Duration::from_secs(1), "ready {took:?} after the cause went away");
    assert_eq!(gw.get("/health").status, 200);

    // Spacing of the attempts, from the supervisor's own transitions: once
    // the delay has reached the cap, never less than the cap less jitter.
    let log = gw.log();
    let starts: Vec<(u64, f64)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["component"] == "api" && l["message"].as_str().is_some_and(|m| m.starts_with("backoff → starting")))
        .map(|l| {
            let attempt = l["message"].as_str().unwrap().rsplit(' ').next().unwrap().parse().expect("`attempt N` in the message");
            (attempt, log_seconds(&l))
        })
        .collect();
    assert!(starts.len() >= 20, "{} restarts logged:\n{log}", starts.len());
    let min_gap = cap.mul_f64(0.8).as_secs_f64();
    let mut gaps = Vec::new();
    for pair in starts.windows(2) {
        let ((_, before), (attempt, at)) = (pair[0], pair[1]);
        // Attempt n waits backoff(n − 1) = 100 ms × 2^(n−2): the cap (400 ms) from attempt 4 on.
        if attempt >= 4 {
            let gap = at - before;
            assert!(gap >= min_gap - 0.001, "attempt {attempt} came {gap:.3} s after the one before, under 0.8 × the cap");
            assert!(gap <= cap.as_secs_f64() + 1.0, "attempt {attempt} came {gap:.3} s after the one before, far over the cap");
            gaps.push(gap);
        }
    }
    gaps.sort_by(f64::total_cmp);
    eprintln!(
        "{} attempts at the cap: spacing min {:.0} ms, median {:.0} ms, max {:.0} ms",
        gaps.len(),
        gaps[0] * 1000.0,
        gaps[gaps.len() / 2] * 1000.0,
        gaps[gaps.len() - 1] * 1000.0
    );
    let started = events(&events_file).iter().filter(|(e, _, _)| e == "start").count();
    assert!(started >= 22, "fake-worker recorded {started} starts");
}

#[test]
fn sigterm_during_a_reload_whose_new_worker_never_gets_ready_exits_at_once() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let hang = dir.path().join("next-worker-never-ready");
    let events_file = events_file(dir.path());
    let mut gw = stack.env("FAKE_NEVER_READY_IF_FILE", hang.display().to_string()).env("FAKE_EVENTS", events_file.display().to_string()).start();
    let serving = gw.pid_of("api").unwrap();
    std::fs::write(&hang, "").unwrap();
    signal(&gw, libc::SIGHUP);
    let c = gw.wait_component("api", "the reload to be under way", Duration::from_secs(10), |c| c["reloading"] == true);
    assert_eq!(c["state"], "ready", "the old worker serves during a reload: {c}");
    assert_eq!(c["pid"], serving, "{c}");
    let candidate = wait_until(Duration::from_secs(10), "the new worker to have started", || {
        events(&events_file).iter().find(|(e, pid, _)| e == "start" && *pid != serving).map(|(_, pid, _)| *pid)
    });
    assert!(alive(candidate));
    assert_eq!(gw.get("/health").status, 200, "a reload does not take the service down");

    let stop = Instant::now();
    let status = gw.terminate();
    let took = stop.elapsed();
    eprintln!("exited {} ms after SIGTERM, mid-reload", took.as_millis());
    assert!(status.success(), "{status}\n{}", gw.log());
    // The new worker's start timeout is 60 s; the stop must not wait for it.
    assert!(took < Duration::from_secs(5), "the gateway took {took:?} to stop during a reload");
    assert!(!alive(serving) && !alive(candidate), "both workers stop with the gateway");
    assert!(gw.log().contains("stopping the reload's new instance too"), "{}", gw.log());
}

#[test]
fn health_turns_503_as_soon_as_sigterm_arrives_while_in_flight_requests_drain() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let events_file = events_file(dir.path());
    let mut gw = stack.env("FAKE_EVENTS", events_file.display().to_string()).start();
    let port = gw.port;
    let slow = std::thread::spawn(move || Request::get("/slow?ms=3000").port(port).send());
    wait_until(Duration::from_secs(10), "the slow request to reach the worker", || events(&events_file).iter().any(|(e, _, _)| e == "slow").then_some(()));
    assert_eq!(gw.get("/health").status, 200);

    signal(&gw, libc::SIGTERM);
    let sent = Instant::now();
    let health = wait_until(Duration::from_secs(2), "/health to answer 503 after SIGTERM", || {
        Request::get("/health").try_send(port).ok().filter(|r| r.status == 503)
    });
    let took = sent.elapsed();
    assert!(!slow.is_finished(), "the in-flight request is still being drained when /health says 503");
    eprintln!("/health answered 503 {} ms after SIGTERM, with a request in flight", took.as_millis());
    let doc = health.json();
    assert_eq!(doc["gateway"]["state"], "stopping", "{doc}");
    assert!(doc["detail"].as_str().unwrap().contains("the gateway is stopping"), "{doc}");
    assert_eq!(doc["components"][0]["state"], "ready", "the worker is still up for the drain: {doc}");
    // A new client gets a clear answer rather than a request the drain would wait for.
    let late = Request::get("/echo").port(port).send();
    assert_eq!(late.status, 503);
    assert_eq!(late.json()["code"], "gateway_stopping");

    let answer = slow.join().unwrap();
    assert_eq!((answer.status, answer.text()), (200, "slow done".to_owned()), "the in-flight request completes");
    let status = gw.child.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", gw.log());
}

#[test]
fn a_second_sigterm_while_draining_stops_at_once_and_leaves_no_child() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let events_file = events_file(dir.path());
    // Long enough that only a hurried stop can end within the test's wait.
    let mut gw = stack.env("FAKE_EVENTS", events_file.display().to_string()).env("OMNI_DRAIN_TIMEOUT_S", "300").start();
    let port = gw.port;
    let worker = gw.pid_of("api").expect("the worker's pid");
    let _slow = std::thread::spawn(move || Request::get("/slow?ms=200000").port(port).try_send(port));
    wait_until(Duration::from_secs(10), "the slow request to reach the worker", || events(&events_file).iter().any(|(e, _, _)| e == "slow").then_some(()));

    signal(&gw, libc::SIGTERM);
    wait_until(Duration::from_secs(10), "the drain to begin", || gw.log().contains("stopping serving HTTP").then_some(()));
    assert!(gw.child.try_status().is_none(), "the first SIGTERM drains the request in flight:\n{}", gw.log());
    signal(&gw, libc::SIGTERM);
    // Without the hurry this takes the 200 s the request in flight needs.
    let status = gw.child.wait_exit(Duration::from_secs(40));
    let log = gw.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("received again while stopping: hurrying"), "{log}");
    assert!(!alive(worker), "the worker is stopped, not left behind:\n{log}");
}

#[test]
fn a_missing_worker_binary_is_failed_until_sighup_retries_it() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let bin = dir.path().join("worker-bin");
    let away = dir.path().join("worker-bin.away");
    std::fs::copy(bin_path("fake-worker"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let gw = stack.env("OMNI_API_BIN", bin.display().to_string()).start();
    std::fs::rename(&bin, &away).unwrap();
    // SAFETY: SIGKILL to the worker the gateway reports.
    unsafe { libc::kill(gw.pid_of("api").unwrap(), libc::SIGKILL) };
    let c = gw.wait_component("api", "the worker to be failed", Duration::from_secs(10), |c| c["state"] == "failed");
    let detail = c["detail"].as_str().unwrap();
    assert!(detail.contains("could not start") && detail.contains("SIGHUP"), "{c}");
    assert!(c["pid"].is_null(), "{c}");
    assert_eq!(gw.get("/health").status, 503);
    // Nothing retries a failed child by itself: watch it for a while.
    let restarts = c["restarts"].clone();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let again = gw.component("api");
        assert_eq!((&again["state"], &again["restarts"]), (&c["state"], &restarts), "a failed child stays failed until SIGHUP");
    }

    std::fs::rename(&away, &bin).unwrap();
    signal(&gw, libc::SIGHUP);
    let sent = Instant::now();
    gw.wait_component("api", "the worker to be ready after SIGHUP", Duration::from_secs(10), |c| c["state"] == "ready");
    eprintln!("ready {} ms after SIGHUP", sent.elapsed().as_millis());
    assert!(sent.elapsed() < Duration::from_secs(3), "SIGHUP retries a failed child at once");
    assert_eq!(gw.get("/health").status, 200);
}

#[test]
fn the_watchdog_is_pinged_while_supervision_makes_progress() {
    use std::os::unix::net::UnixDatagram;
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _gw = stack.env("NOTIFY_SOCKET", sock_path.display().to_string()).env("WATCHDOG_USEC", "400000").start();
    let mut buf = [0u8; 4096];
    let mut pings = 0;
    while pings < 5 {
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
}

#[test]
fn chaos_with_default_settings_recovers_within_the_backoff_cap_and_loses_no_write() {
    let dir = workdir();
    let log = dir.path().join("soak.log");
    let env = [("SOAK_SECONDS", "60"), ("SOAK_REPORT", "")].into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    let mut command: Command = isolated_command(&bin_path("soak"), dir.path(), &env, &log);
    let mut soak = ChildGuard::spawn(&mut command);
    let status = soak.wait_exit(Duration::from_secs(600));
    let out = std::fs::read_to_string(&log).unwrap();
    eprintln!("{out}");
    assert!(status.success(), "the soak failed ({status}):\n{out}");
    let figure = |label: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"));
        line[label.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    assert_eq!(figure("lost writes"), 0.0);
    let back = figure("back after chaos");
    assert!(back <= (DEFAULT_BACKOFF_CAP + Duration::from_secs(5)).as_secs_f64(), "/health was 200 again {back} s after the chaos");
    assert!(figure("acknowledged writes") > 0.0);
}

/// A `PGSERVE_BIN_DIR` whose `postgres` starts only once `gate` exists
/// (everything else is the real binaries), so a test can hold PostgreSQL's
/// start as long as it likes.
fn gated_postgres(dir: &Path, gate: &Path) -> std::path::PathBuf {
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in --version|-V) ;; *) while [ ! -e '{}' ]; do sleep 0.02; done ;; esac\nexec '{}' \"$@\"\n",
        gate.display(),
        omni_tests::pg_bin_dir().join("postgres").display()
    );
    gateway::bin_dir_with(dir, "gated-bin", "postgres", &script)
}

/// The pid in the gateway's "started API worker (pid N)" line, once logged.
fn started_worker_pid(gw: &Gateway) -> Option<i32> {
    let log = gw.log();
    let (_, rest) = log.split_once("started API worker (pid ")?;
    rest.split(')').next()?.parse().ok()
}

/// The worker's process starts while PostgreSQL is still starting and waits
/// for it (no connection attempt, so no `FATAL: the database system is
/// starting up`); that same process then serves. A gateway stopped while
/// PostgreSQL still starts exits cleanly and leaves no worker behind.
#[test]
fn the_worker_starts_beside_postgresql_and_a_stop_before_postgresql_is_up_leaves_no_worker() {
    let dir = workdir();
    let gate = dir.path().join("postgres-may-start");
    let bin = gated_postgres(dir.path(), &gate);

    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", bin.display().to_string()).spawn();
    let early = wait_until(Duration::from_secs(60), "the worker to start while PostgreSQL is held", || started_worker_pid(&gw));
    assert!(alive(early));
    assert!(!gw.log().contains("PostgreSQL accepts connections"), "{}", gw.log());
    let api = wait_until(Duration::from_secs(10), "/gateway/status to answer", || try_component(gw.port, "api"));
    assert_ne!(api["state"], "ready", "{api}");
    std::fs::write(&gate, b"").unwrap();
    gw.wait_healthy();
    let api = gw.component("api");
    assert_eq!((api["pid"].as_i64(), api["restarts"].as_i64()), (Some(early as i64), Some(0)), "the early worker serves: {api}");
    assert!(gw.terminate().success());
    assert!(!gw.log().contains("FATAL"), "{}", gw.log());

    std::fs::remove_file(&gate).unwrap();
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", bin.display().to_string()).spawn();
    let early = wait_until(Duration::from_secs(60), "the worker to start while PostgreSQL is held", || started_worker_pid(&gw));
    assert!(gw.terminate().success(), "{}", gw.log());
    wait_until(Duration::from_secs(10), "the early worker to be gone", || (!alive(early)).then_some(()));
}

/// A SIGHUP while the worker starts (a long migration, say) is queued, as
/// systemd queues a reload: the starting worker is not stopped, and once it
/// is ready it is reloaded exactly once; no restart is counted.
#[test]
fn sighup_while_the_worker_starts_is_one_reload_once_it_is_ready_not_a_restart() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let go = dir.path().join("worker-may-be-ready");
    let events_file = events_file(dir.path());
    let mut gw = stack.env("FAKE_READY_WHEN_FILE", go.display().to_string()).env("FAKE_EVENTS", events_file.display().to_string()).spawn();
    let first = wait_until(Duration::from_secs(60), "the worker to be starting", || {
        try_component(gw.port, "api").filter(|c| c["state"] == "starting").and_then(|c| c["pid"].as_i64())
    });
    signal(&gw, libc::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload to be queued", || gw.log().contains("reload asked while starting: queued").then_some(()));
    let c = gw.component("api");
    assert_eq!((c["state"].as_str(), c["pid"].as_i64(), c["restarts"].as_i64()), (Some("starting"), Some(first), Some(0)), "the starting worker goes on starting: {c}");
    assert!(alive(first as i32));

    std::fs::write(&go, "").unwrap();
    let c = gw.wait_component("api", "the reload's new worker to serve", Duration::from_secs(30), |c| {
        c["state"] == "ready" && c["reloading"] == false && c["pid"].as_i64().is_some_and(|p| p != first)
    });
    assert_eq!(c["restarts"], 0, "a reload is not a restart: {c}");
    wait_until(Duration::from_secs(10), "the first worker to be gone once drained", || (!alive(first as i32)).then_some(()));
    let starts: Vec<i32> = events(&events_file).into_iter().filter(|(e, _, _)| e == "start").map(|(_, pid, _)| pid).collect();
    assert_eq!(starts.len(), 2, "the first worker and exactly one reload: {starts:?}");
    assert_eq!(gw.log().matches("reload: starting a new instance").count(), 1, "{}", gw.log());
    assert_eq!(gw.get("/health").status, 200);
    assert!(gw.terminate().success(), "{}", gw.log());
}
