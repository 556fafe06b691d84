//! Chaos soak (`make soak`, issue 7): writers upsert sequence-numbered
//! preferences through a real gateway, running with its **default**
//! settings, while a chaos loop `kill -9`s PostgreSQL or the API worker at
//! random; at the end every acknowledged write must be readable through the
//! API.
//!
//! * A write is *acknowledged* only when the gateway answered 200. Anything
//!   else (an error status, a reset connection) may or may not have landed,
//!   and proves nothing either way.
//! * Each writer has its own session and cycles through its own keys, so
//!   most writes are updates; the value is the write's sequence number. At the
//!   end a key must hold at least the highest acknowledged sequence number
//!   written to it; every acknowledged write above what it holds is *lost*.
//! * Chaos: every 0.5–2 s, SIGKILL to the pid `/gateway/status` shows for a
//!   randomly chosen component (PostgreSQL's postmaster or the worker) that
//!   has one (starting or ready); a round where neither has one (both in
//!   backoff) kills nothing. With the default `OMNI_STABLE_AFTER_S` (30 s)
//!   this is a crash loop, and the supervisor answers it with restart delays
//!   growing to the cap (`OMNI_RESTART_BACKOFF_MAX_MS`, 30 s): the soak
//!   proves that it never gives up and that the stack comes back.
//! * Recovery of a kill: from the kill until `/gateway/status` shows that
//!   component ready again under a new pid. *Back after chaos*: from the end
//!   of the chaos until `/health` answers 200; it must be within the cap plus
//!   5 s.
//!
//! Runs the gateway from the same `target/<profile>` as this binary, in a
//! temporary directory, persistent mode (fsync on), free ports; everything is
//! stopped and removed at the end, also on Ctrl-C. Prints the figures, appends
//! a row to RELIABILITY.md, and exits 1 on a lost write, a kill that never
//! recovered, or a stack not back within the cap plus 5 s.
//!
//! Settings: `SOAK_SECONDS` (default 60), `SOAK_WRITERS` (default 4),
//! `SOAK_REPORT` (default: RELIABILITY.md of this repository; empty: none).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use omni_tests::{bin_path, free_port, pg_bin_dir, target_profile_dir, wait_until, ChildGuard, Request, TempDir};
use serde_json::{json, Value};

/// The gateway's default restart-delay cap (`OMNI_RESTART_BACKOFF_MAX_MS`).
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// After the chaos, the stack must answer `/health` 200 within this: one
/// capped delay, plus the time to start.
const BACK_AFTER_CHAOS_LIMIT: Duration = Duration::from_secs(BACKOFF_CAP.as_secs() + 5);
/// Keys per writer: small enough that most writes are updates of an existing row.
const KEYS_PER_WRITER: u64 = 16;

/// Set by SIGINT/SIGTERM: finish early, still clean up and report.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
        Err(_) => default,
    }
}

/// xorshift64*: enough randomness for chaos timing, no extra dependency.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Rng {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng((t ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }
}

/// One writer's record: per key, every acknowledged sequence number.
#[derive(Default)]
struct Acks {
    by_key: BTreeMap<String, Vec<u64>>,
    attempts: u64,
    acknowledged: u64,
}

struct Recovery {
    component: &'static str,
    took: Duration,
}

struct Gateway {
    child: ChildGuard,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Gateway {
    fn start() -> Gateway {
        let dir = TempDir::new("soak");
        let port = free_port();
        let log = dir.path().join("gateway.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(bin_path("omni-gateway"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("OMNI_PORT", port.to_string())
            .env("PGSERVE_PORT", "0")
            .env("PGSERVE_BIN_DIR", pg_bin_dir())
            .env("LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        // SAFETY: prctl is async-signal-safe. If the soak itself dies, the gateway stops too.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = ChildGuard::spawn(&mut command);
        let started = Instant::now();
        wait_until(Duration::from_secs(120), "the gateway to become healthy", || {
            if let Some(status) = child.try_status() {
                panic!("omni-gateway exited with {status}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            (Request::get("/health").try_send(port).ok()?.status == 200).then_some(())
        });
        println!("gateway ready in {:.1} s on port {port} ({})", started.elapsed().as_secs_f64(), dir.path().display());
        Gateway { child, port, log, _dir: dir }
    }

    /// `(pid, state)` of `name`, from `/gateway/status`; `None` while it has no process.
    fn component(&self, name: &str) -> Option<(i32, String)> {
        component_at(self.port, name)
    }

    fn healthy(&self) -> bool {
        Request::get("/health").try_send(self.port).is_ok_and(|r| r.status == 200)
    }
}

fn component_at(port: u16, name: &str) -> Option<(i32, String)> {
    let r = Request::get("/gateway/status").try_send(port).ok()?;
    let status: Value = (r.status == 200).then(|| r.json())?;
    let c = status["components"].as_array()?.iter().find(|c| c["name"] == name)?.clone();
    Some((c["pid"].as_i64()? as i32, c["state"].as_str()?.to_owned()))
}

fn writer(port: u16, index: usize, stop: Arc<AtomicBool>) -> (String, Acks) {
    let session = uuid::Uuid::new_v4().to_string();
    let mut acks = Acks::default();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let key = format!("w{index}-k{}", seq % KEYS_PER_WRITER);
        acks.attempts += 1;
        let request = Request::new("POST", "/api/v1/preferences").session(&session).json(&json!({"key": key, "value": seq.to_string()}));
        match request.try_send(port) {
            Ok(r) if r.status == 200 => {
                assert_eq!(r.json(), json!({"key": key, "value": seq.to_string()}), "a 200 must echo what was stored");
                acks.acknowledged += 1;
                acks.by_key.entry(key).or_default().push(seq);
            }
            // Not acknowledged; the gateway's own bounded wait already paced us.
            Ok(_) => {}
            // Connection refused/reset: only possible if the gateway itself is in trouble; do not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    (session, acks)
}

fn chaos(gw: &Gateway, stop: &AtomicBool, recoveries: &'static Mutex<Vec<Recovery>>, kills: &AtomicU64) -> Vec<std::thread::JoinHandle<()>> {
    let mut rng = Rng::seeded(std::process::id() as u64);
    let mut monitors = Vec::new();
    let port = gw.port;
    while !stop.load(Ordering::Relaxed) {
        let pause = Duration::from_secs_f64(rng.between(0.5, 2.0));
        let until = Instant::now() + pause;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let first: &'static str = if rng.next().is_multiple_of(2) { "postgres" } else { "api" };
        let second = if first == "postgres" { "api" } else { "postgres" };
        // A component in backoff has no process to kill; try the other one.
        let victim = [first, second].into_iter().find_map(|name| match gw.component(name) {
            Some((pid, state)) if state == "ready" || state == "starting" => Some((name, pid)),
            _ => None,
        });
        let Some((target, pid)) = victim else { continue };
        // SAFETY: SIGKILL to a pid the gateway reports as its child right now.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let killed_at = Instant::now();
        kills.fetch_add(1, Ordering::Relaxed);
        monitors.push(std::thread::spawn(move || {
            loop {
                if let Some((new_pid, state)) = component_at(port, target) {
                    if state == "ready" && new_pid != pid {
                        recoveries.lock().unwrap().push(Recovery { component: target, took: killed_at.elapsed() });
                        return;
                    }
                }
                if killed_at.elapsed() > Duration::from_secs(300) {
                    // Never recovered: the verdict counts kills against recoveries.
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    monitors
}

fn main() -> ExitCode {
    let seconds = env_number("SOAK_SECONDS", 60);
    let writers = env_number("SOAK_WRITERS", 4) as usize;
    assert!(seconds > 0 && writers > 0, "SOAK_SECONDS and SOAK_WRITERS must be at least 1");
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let profile = target_profile_dir().file_name().unwrap().to_string_lossy().into_owned();
    println!("soak: {seconds} s, {writers} writers, kill -9 of postgres or api every 0.5–2 s ({profile} build)");

    let gw = Gateway::start();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..writers)
        .map(|i| {
            let stop = stop.clone();
            let port = gw.port;
            std::thread::spawn(move || writer(port, i, stop))
        })
        .collect();
    // Leaked on purpose: monitor threads borrow it for the rest of the run.
    let recoveries: &'static Mutex<Vec<Recovery>> = Box::leak(Box::new(Mutex::new(Vec::new())));
    let kills = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let monitors = std::thread::scope(|scope| {
        let chaos_stop = Arc::new(AtomicBool::new(false));
        let chaos_handle = {
            let chaos_stop = chaos_stop.clone();
            let kills = kills.clone();
            let gw = &gw;
            scope.spawn(move || chaos(gw, &chaos_stop, recoveries, &kills))
        };
        while started.elapsed() < Duration::from_secs(seconds) && !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        chaos_stop.store(true, Ordering::SeqCst);
        chaos_handle.join().unwrap()
    });
    // From the end of the chaos until the whole stack answers again.
    let chaos_ended = Instant::now();
    while !gw.healthy() && chaos_ended.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let back_after_chaos = chaos_ended.elapsed();
    for m in monitors {
        m.join().unwrap();
    }
    // Every kill has recovered; the writers stop now.
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(String, Acks)> = handles.into_iter().map(|h| h.join().expect("writer thread")).collect();
    let ran_for = started.elapsed();

    // Read back through the API, once everything is ready again.
    wait_until(Duration::from_secs(60), "the gateway to be healthy for the read-back", || {
        (Request::get("/health").try_send(gw.port).ok()?.status == 200).then_some(())
    });
    let mut lost = 0u64;
    let mut lost_examples = Vec::new();
    for (session, acks) in &results {
        let r = Request::get("/api/v1/preferences").session(session).send_to(gw.port);
        assert_eq!(r.status, 200, "reading back {session}: {}", r.text());
        let stored: BTreeMap<String, u64> = r
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["key"].as_str().unwrap().to_owned(), p["value"].as_str().unwrap().parse().unwrap()))
            .collect();
        for (key, seqs) in &acks.by_key {
            let have = stored.get(key).copied().unwrap_or(0);
            let missing = seqs.iter().filter(|s| **s > have).count() as u64;
            if missing > 0 {
                lost += missing;
                lost_examples.push(format!("{session} {key}: holds {have}, acknowledged up to {}", seqs.iter().max().unwrap()));
            }
        }
    }

    let attempts: u64 = results.iter().map(|(_, a)| a.attempts).sum();
    let acknowledged: u64 = results.iter().map(|(_, a)| a.acknowledged).sum();
    let availability = if attempts == 0 { 0.0 } else { acknowledged as f64 * 100.0 / attempts as f64 };
    let recs = recoveries.lock().unwrap();
    let mut times: Vec<Duration> = recs.iter().map(|r| r.took).collect();
    times.sort();
    let slowest = times.last().copied().unwrap_or_default();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let count = |c: &str| recs.iter().filter(|r| r.component == c).count();
    let slowest_of = |c: &str| recs.iter().filter(|r| r.component == c).map(|r| r.took).max().unwrap_or_default();
    let kills = kills.load(Ordering::Relaxed);
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);

    println!();
    println!("ran for                {:.0} s{}", ran_for.as_secs_f64(), if interrupted { " (interrupted)" } else { "" });
    println!("write attempts         {attempts}");
    println!("acknowledged writes    {acknowledged}");
    println!("lost writes            {lost}");
    println!("availability           {availability:.2} % of attempts answered 200");
    println!("kills (kill -9)        {kills}: postgres {}, api {}", count("postgres"), count("api"));
    println!("recoveries             {}", recs.len());
    println!("slowest recovery       {:.2} s (postgres {:.2} s, api {:.2} s)", slowest.as_secs_f64(), slowest_of("postgres").as_secs_f64(), slowest_of("api").as_secs_f64());
    println!("median recovery        {:.2} s", median.as_secs_f64());
    println!("back after chaos       {:.2} s (limit {} s: the backoff cap + 5 s)", back_after_chaos.as_secs_f64(), BACK_AFTER_CHAOS_LIMIT.as_secs());
    for e in lost_examples.iter().take(10) {
        println!("LOST: {e}");
    }

    let mut problems = Vec::new();
    if lost > 0 {
        problems.push(format!("{lost} acknowledged writes lost"));
    }
    if back_after_chaos > BACK_AFTER_CHAOS_LIMIT {
        problems.push(format!("/health answered 200 only {:.2} s after the chaos, over {} s", back_after_chaos.as_secs_f64(), BACK_AFTER_CHAOS_LIMIT.as_secs()));
    }
    if recs.len() as u64 != kills {
        problems.push(format!("{kills} kills but {} recoveries", recs.len()));
    }
    if kills == 0 || acknowledged == 0 {
        problems.push("no chaos or no acknowledged writes: the run proves nothing (run longer)".into());
    }
    // Stop the gateway gracefully; a clean exit is part of the result.
    let mut gw = gw;
    // SAFETY: signalling the gateway we started.
    unsafe { libc::kill(gw.child.pid() as i32, libc::SIGTERM) };
    let exit = gw.child.wait_exit(Duration::from_secs(90));
    if !exit.success() {
        problems.push(format!("the gateway exited with {exit} at stop"));
    }
    let verdict = if problems.is_empty() { "pass".to_owned() } else { format!("FAIL: {}", problems.join("; ")) };

    let row = format!(
        "| {} | {:.0} | {writers} | {attempts} | {acknowledged} | {lost} | {availability:.2} % | {kills} ({} pg, {} api) | {} | {:.2} s | {:.2} s | {:.2} s | {profile} | {verdict} |",
        now_utc(),
        ran_for.as_secs_f64(),
        count("postgres"),
        count("api"),
        recs.len(),
        slowest.as_secs_f64(),
        median.as_secs_f64(),
        back_after_chaos.as_secs_f64(),
    );
    append_report(&row);

    if !problems.is_empty() {
        // The temporary directory goes away; keep the gateway's log for the post-mortem.
        let kept = target_profile_dir().parent().unwrap().join("soak-gateway.log");
        if std::fs::copy(&gw.log, &kept).is_ok() {
            println!("gateway log kept at {}", kept.display());
        }
    }
    println!("{verdict}");
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown date".into())
}

const REPORT_HEADER: &str = "# Reliability

Figures from the chaos soak (`make soak`, `tests/src/bin/soak.rs`), with the
gateway's default settings: writers upsert sequence-numbered preferences
through the gateway while PostgreSQL's postmaster or the API worker is
`kill -9`ed every 0.5–2 s at random. A write counts as acknowledged only on a
200. Lost writes are acknowledged writes missing at the end (must be 0);
availability is the share of write attempts answered 200; a recovery runs from
a kill until `/gateway/status` shows the component ready under a new pid;
*back after chaos* runs from the end of the chaos until `/health` answers 200
(must be within the 30 s backoff cap + 5 s). Persistent mode, `fsync` on.
Each run appends a row.

| date | seconds | writers | attempts | acknowledged | lost | availability | kills | recoveries | slowest recovery | median recovery | back after chaos | build | result |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
";

fn append_report(row: &str) {
    let path = match std::env::var("SOAK_REPORT") {
        Ok(p) if p.is_empty() => return,
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("RELIABILITY.md"),
    };
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    if text.is_empty() {
        text.push_str(REPORT_HEADER);
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(row);
    text.push('\n');
    match std::fs::File::create(&path).and_then(|mut f| f.write_all(text.as_bytes())) {
        Ok(()) => println!("appended to {}", path.display()),
        Err(e) => println!("could not append to {}: {e}", path.display()),
    }
}
