//! Seeing inside the supervisor (issue 17): the gateway's log ring, its live
//! stream, the metrics history and the status stream, through the gateway's
//! real port.
//!
//! * The protected endpoints answer what the worker's own check answers.
//! * `kill -9` of the worker shows on the open log stream within a second,
//!   and on the open status stream, which (unlike the old relay through the
//!   worker) stays open across the restart.
//! * Known secrets (the API key, the password inside `DATABASE_URL`) never
//!   appear in `/gateway/logs`, even when a child prints them.
//! * A flood of child output keeps the ring within its bounds (memory
//!   measured), and a stream client that stops reading neither slows the
//!   proxy nor grows the gateway; once it reads again it is told what it missed.

use crate::gateway;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gateway::{workdir, GatewayBuilder};
use omni_tests::{bin_path, wait_until, Request, TempPostgres, TEST_API_KEY};

/// A password only this test uses, inside `DATABASE_URL` (the kit's server
/// trusts local connections, so any password is accepted).
const DB_PASSWORD: &str = "Db-Secret-4711-pw";

/// A server-sent events client reading raw bytes from the gateway.
struct Sse {
    stream: TcpStream,
    seen: String,
}

impl Sse {
    fn open(port: u16, path: &str, key: Option<&str>) -> Sse {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let key = key.map(|k| format!("x-api-key: {k}\r\n")).unwrap_or_default();
        write!(stream, "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n{key}\r\n").unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut sse = Sse { stream, seen: String::new() };
        sse.wait_for(Duration::from_secs(10), "the stream's response head", |s| s.contains("\r\n\r\n"));
        assert!(sse.seen.starts_with("HTTP/1.1 200"), "{}", sse.seen);
        assert!(sse.seen.to_ascii_lowercase().contains("content-type: text/event-stream"), "{}", sse.seen);
        sse
    }

    /// Reads until `pred` holds for everything read so far.
    fn wait_for(&mut self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        while !pred(&self.seen) {
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; read so far:\n{}", tail(&self.seen));
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("the stream closed while waiting for {what}:\n{}", tail(&self.seen)),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading the stream: {e}"),
            }
        }
    }

    /// The `data:` JSON of every `event: name` read so far.
    fn events(&self, name: &str) -> Vec<serde_json::Value> {
        let marker = format!("event: {name}\ndata: ");
        self.seen.match_indices(&marker).filter_map(|(at, _)| {
            let data = &self.seen[at + marker.len()..];
            serde_json::from_str(&data[..data.find('\n')?]).ok()
        }).collect()
    }
}

fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(4000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn logs(port: u16, query: &str) -> serde_json::Value {
    let r = Request::get(&format!("/gateway/logs{query}")).api_key().port(port).send();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

#[test]
fn protected_endpoints_ask_the_worker_and_streams_show_a_kill9_live() {
    let dir = workdir();
    let pg = TempPostgres::start_new();
    let url = format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:{}/postgres", pg.port());
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).env("DATABASE_URL", &url).start();

    // The worker's own check decides: no key, a wrong key, the key.
    let none = gw.get("/gateway/logs");
    assert_eq!(none.status, 401, "{}", none.text());
    assert!(none.json()["code"].is_string(), "the worker's JSON error: {}", none.text());
    let wrong = Request::get("/gateway/logs").header("x-api-key", "sk-omni-wrong").port(gw.port).send();
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert_eq!(gw.get("/gateway/metrics/history").status, 401);
    assert_eq!(Request::get("/api/v1/auth/check").api_key().port(gw.port).send().status, 204);
    let all = logs(gw.port, "");
    let lines = all["lines"].as_array().unwrap();
    assert!(lines.iter().any(|l| l["component"] == "gateway" && l["message"].as_str().unwrap().starts_with("listening on")), "{all:#}");
    assert!(lines.iter().any(|l| l["component"] == "api"), "the worker's lines are in the ring too: {all:#}");
    // Bad parameters are refused with the JSON error shape.
    for bad in ["?level=loud", "?since=yesterday", "?limit=0", "?colour=red"] {
        let r = Request::get(&format!("/gateway/logs{bad}")).api_key().port(gw.port).send();
        assert_eq!(r.status, 422, "{bad}: {}", r.text());
        assert!(r.json()["detail"].is_string());
    }
    let history = Request::get("/gateway/metrics/history").api_key().port(gw.port).send();
    assert_eq!(history.status, 200);
    assert_eq!(history.json()["interval_s"], 5);

    // Streams open before the kill: the worker's lines and the statuses.
    let mut log_stream = Sse::open(gw.port, "/gateway/logs/stream?component=api", Some(TEST_API_KEY));
    let mut status_stream = Sse::open(gw.port, "/gateway/events", None);
    status_stream.wait_for(Duration::from_secs(10), "the first status document", |s| s.contains("event: status"));
    let first = &status_stream.events("status")[0];
    let api = first["components"].as_array().unwrap().iter().find(|c| c["name"] == "api").unwrap().clone();
    assert_eq!((api["state"].as_str(), api["restarts"].as_u64()), (Some("ready"), Some(0)));

    let killed_at = Instant::now();
    unsafe { libc::kill(api["pid"].as_i64().unwrap() as i32, libc::SIGKILL) };
    log_stream.wait_for(Duration::from_secs(1), "the exit line within 1 s of the kill", |s| s.contains("exited unexpectedly"));
    let exit_after = killed_at.elapsed();
    log_stream.wait_for(Duration::from_secs(30), "the restart lines", |s| s.contains("started API worker") && s.contains("\"starting → ready"));
    eprintln!("exit line on the stream {} ms after kill -9; restart lines {} ms after", exit_after.as_millis(), killed_at.elapsed().as_millis());
    let streamed = log_stream.events("line");
    assert!(streamed.iter().all(|l| l["component"] == "api"), "the stream's filter holds: {streamed:#?}");
    let exit = streamed.iter().find(|l| l["message"].as_str().unwrap().contains("exited unexpectedly")).unwrap();
    assert_eq!(exit["level"], "warn");
    assert!(exit["message"].as_str().unwrap().contains("SIGKILL"), "{exit}");

    // The status stream did not close with the worker: it reports the restart.
    status_stream.wait_for(Duration::from_secs(30), "the restart on the open status stream", |s| s.contains("\"restarts\":1") && s.contains("killed by SIGKILL"));
    // The history has the restart at its own time, not at the next sample.
    let history = Request::get("/gateway/metrics/history").api_key().port(gw.port).send().json();
    let restart = history["restarts"].as_array().unwrap().iter().find(|r| r["component"] == "api").cloned().unwrap_or_else(|| panic!("{history:#}"));
    assert_eq!(restart["last_exit"], "killed by SIGKILL");

    // The password of DATABASE_URL and the key never reached the ring.
    let text = logs(gw.port, "?limit=10000").to_string();
    assert!(!text.contains(DB_PASSWORD) && !text.contains(TEST_API_KEY), "a secret in /gateway/logs: {text}");

    // Open streams end when the stop begins: they do not hold up the drain.
    let stopping = Instant::now();
    assert!(gw.terminate().success());
    assert!(stopping.elapsed() < Duration::from_secs(10), "the stop took {:?} with two streams open", stopping.elapsed());
    let mut rest = Vec::new();
    let _ = status_stream.stream.set_read_timeout(Some(Duration::from_secs(5)));
    assert!(status_stream.stream.read_to_end(&mut rest).is_ok(), "the status stream was closed cleanly");
    drop(pg);
}

#[test]
fn secrets_a_child_prints_are_redacted_and_filters_select_exactly() {
    let dir = workdir();
    let pg = TempPostgres::start_new();
    let url = format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:{}/postgres", pg.port());
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("DATABASE_URL", &url)
        .env("FAKE_SECRET_NOTE", format!("key {TEST_API_KEY} url {url} generated sk-omni-Zx9_generated-key"))
        .start();
    // The fake worker prints its whole environment: the URL, the key, a generated key.
    assert_eq!(gw.get("/say-env").status, 200);
    let page = wait_until(Duration::from_secs(10), "the printed environment in the ring", || {
        let page = logs(gw.port, "?q=FAKE_SECRET_NOTE");
        (!page["lines"].as_array()?.is_empty()).then_some(page)
    });
    let note = page["lines"][0]["message"].as_str().unwrap().to_owned();
    assert!(note.contains(&format!("postgres://postgres:***@127.0.0.1:{}/postgres", pg.port())), "{note}");
    let everything = logs(gw.port, "?limit=10000").to_string();
    for secret in [DB_PASSWORD, TEST_API_KEY, "Zx9_generated-key"] {
        assert!(!everything.contains(secret), "{secret} is in /gateway/logs:\n{everything}");
    }
    assert!(gw.log().contains(DB_PASSWORD) || gw.log().contains("FAKE_SECRET_NOTE"), "the test printed what it checks");

    // Filters: exactly the lines that match, compared with an unfiltered read.
    let all: Vec<serde_json::Value> = logs(gw.port, "?limit=10000")["lines"].as_array().unwrap().clone();
    let rank = |l: &str| ["error", "warn", "info", "debug", "trace"].iter().position(|x| *x == l).unwrap();
    let pick = |query: &str| -> Vec<u64> { logs(gw.port, &format!("{query}&limit=10000"))["lines"].as_array().unwrap().iter().map(|l| l["seq"].as_u64().unwrap()).collect() };
    let last = all.last().unwrap()["seq"].as_u64().unwrap();
    let upto = |seqs: Vec<u64>| seqs.into_iter().filter(|s| *s <= last).collect::<Vec<_>>();
    let expect = |f: &dyn Fn(&serde_json::Value) -> bool| all.iter().filter(|l| f(l)).map(|l| l["seq"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(upto(pick("?component=api")), expect(&|l| l["component"] == "api"));
    assert_eq!(upto(pick("?level=warn")), expect(&|l| rank(l["level"].as_str().unwrap()) <= 1));
    assert_eq!(upto(pick("?q=Listening")), expect(&|l| l["message"].as_str().unwrap().to_lowercase().contains("listening") || l["component"].as_str().unwrap().contains("listening")));
    assert_eq!(upto(pick("?component=gateway&level=info&q=ready")), expect(&|l| l["component"] == "gateway" && rank(l["level"].as_str().unwrap()) <= 2 && l["message"].as_str().unwrap().to_lowercase().contains("ready")));
    let mid = all[all.len() / 2]["seq"].as_u64().unwrap();
    assert_eq!(upto(pick(&format!("?since={mid}"))), expect(&|l| l["seq"].as_u64().unwrap() > mid));
    drop(pg);
}

#[test]
fn a_flood_of_child_output_stays_within_bounds_and_a_stalled_reader_slows_nothing() {
    let dir = workdir();
    let pg = TempPostgres::start_new();
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("DATABASE_URL", pg.url())
        .start();
    let pid = gw.child.pid();
    let port = gw.port;
    let time_requests = move || {
        let started = Instant::now();
        for _ in 0..200 {
            assert_eq!(Request::get("/api/v1/health").port(port).send().status, 200);
        }
        started.elapsed()
    };
    let alone = time_requests();

    // A stream client that reads nothing after the head: its socket buffers fill.
    let mut stalled = Sse::open(gw.port, "/gateway/logs/stream", Some(TEST_API_KEY));
    let before = rss_kib(pid);
    // 40,000 lines of 1,000 characters: eight times the ring's byte bound.
    let flood = std::thread::spawn(move || Request::get("/flood?lines=40000&len=1000").port(port).send().status);
    // Proxied requests while the flood passes through the ring and the stalled stream.
    let with_stalled = time_requests();
    assert_eq!(flood.join().unwrap(), 200);
    wait_until(Duration::from_secs(120), "the flood's last line in the ring", || {
        logs(gw.port, "?q=flood+39999+&limit=1")["lines"].as_array().is_some_and(|l| !l.is_empty()).then_some(())
    });
    let after = rss_kib(pid);
    let page = logs(gw.port, "?limit=10000");
    let lines = page["lines"].as_array().unwrap();
    let bytes: usize = lines.iter().map(|l| l["message"].as_str().unwrap().len()).sum();
    eprintln!(
        "gateway RSS {before} KiB before the flood, {after} KiB after; ring {} lines, {} KiB of messages, {} evicted; 200 proxied requests: {} ms alone, {} ms with a stalled stream during the flood",
        lines.len(), bytes / 1024, page["evicted"], alone.as_millis(), with_stalled.as_millis()
    );
    assert!(lines.len() <= 10_000, "{} lines", lines.len());
    assert!(bytes <= 5 * 1024 * 1024, "{bytes} bytes");
    assert!(bytes > 4 * 1024 * 1024, "the byte bound, not the line bound, is what holds here: {bytes} bytes");
    assert!(page["evicted"].as_u64().unwrap() >= 30_000, "{}", page["evicted"]);
    // The ring's 5 MB plus allocator slack; a ring that kept 30 MB of flood would not pass.
    assert!(after.saturating_sub(before) < 24 * 1024, "RSS grew from {before} to {after} KiB");
    // Generous: the machine is shared. A proxy waiting on the stalled reader would not finish at all.
    assert!(with_stalled < alone * 5 + Duration::from_secs(2), "{alone:?} alone, {with_stalled:?} with a stalled stream");

    // Reading again, the client is told how many lines it missed.
    stalled.wait_for(Duration::from_secs(20), "an event: skipped", |s| s.contains("event: skipped"));
    let skipped: u64 = stalled.events("skipped").iter().map(|e| e["skipped"].as_u64().unwrap()).sum();
    assert!(skipped > 0);
    drop(pg);
}

#[test]
fn the_replication_urls_and_the_clusters_passwords_never_reach_the_ring() {
    let dir = workdir();
    // Nothing listens there: the relay keeps failing, and says where it tried.
    let target_port = omni_tests::free_port();
    let password = "Repl-Secret-9911-pw";
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("PGSERVE_REPLICATION_URL", format!("postgres://rep_user:{password}@127.0.0.1:{target_port}/omni_copy"))
        .start();
    let port = target_port.to_string();
    let page = wait_until(Duration::from_secs(30), "a line about the replication target", || {
        let page = logs(gw.port, &format!("?q={port}&limit=10000"));
        (!page["lines"].as_array()?.is_empty()).then_some(page)
    });
    eprintln!("the target as logged: {}", page["lines"][0]["message"]);
    let cluster_password = std::fs::read_to_string(dir.path().join("data/postgres.password")).unwrap();
    let everything = logs(gw.port, "?limit=10000").to_string();
    for secret in [password, cluster_password.trim(), TEST_API_KEY] {
        assert!(!everything.contains(secret), "{secret} is in /gateway/logs:\n{everything}");
    }
}
