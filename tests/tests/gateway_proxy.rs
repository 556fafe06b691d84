//! The gateway hides worker crashes and reloads from clients and proxies as a
//! careful reverse proxy should (issue 4, SPEC §4–§5).
//!
//! Tests that need the real worker run the whole stack (embedded PostgreSQL
//! included). Tests of proxy mechanics use `fake-worker` (tests/src/bin),
//! which can stream arbitrarily large bodies and speak a raw upgrade, with an
//! external `DATABASE_URL` so no cluster is started for them.

use crate::gateway;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::{alive, postgres_pids_on, workdir, Gateway, GatewayBuilder};
use omni_tests::{bin_path, wait_until, Request, TempPostgres, TEST_API_KEY};

/// A gateway whose worker is `fake-worker`, with an external PostgreSQL
/// (the kit's, cheap to start) instead of the embedded cluster. The returned
/// server must outlive the gateway: `/health` checks it.
fn fake_stack(dir: &std::path::Path) -> (GatewayBuilder, TempPostgres) {
    let pg = TempPostgres::start_new();
    let builder = GatewayBuilder::new(dir).env("OMNI_API_BIN", bin_path("fake-worker").display().to_string()).env("DATABASE_URL", pg.url());
    (builder, pg)
}

/// The full stack with a known API key.
fn real_stack(dir: &std::path::Path) -> GatewayBuilder {
    GatewayBuilder::new(dir).env("OMNI_API_KEY", TEST_API_KEY)
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

/// Runs `f` on `threads` threads until `stop`; returns (ok, failed, first failures).
fn load(threads: usize, stop: Arc<AtomicBool>, f: impl Fn(usize) -> Result<(), String> + Send + Sync + 'static) -> std::thread::JoinHandle<(u64, u64, Vec<String>)> {
    let f = Arc::new(f);
    std::thread::spawn(move || {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (f, stop, ok, failed, errors) = (f.clone(), stop.clone(), ok.clone(), failed.clone(), errors.clone());
                std::thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match f(t * 1_000_000 + i) {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let mut errs = errors.lock().unwrap();
                                if errs.len() < 5 {
                                    errs.push(e);
                                }
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        i += 1;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let errs = errors.lock().unwrap().clone();
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), errs)
    })
}

fn expect_status(r: std::io::Result<omni_tests::Response>, want: u16) -> Result<(), String> {
    match r {
        Ok(r) if r.status == want => Ok(()),
        Ok(r) => Err(format!("status {}: {}", r.status, r.text())),
        Err(e) => Err(format!("transport error: {e}")),
    }
}

#[test]
fn kill9_of_the_worker_under_get_load_fails_no_request() {
    let dir = workdir();
    let gw = real_stack(dir.path()).start();
    let port = gw.port;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(6, stop.clone(), move |_| expect_status(Request::get("/api/v1/health").try_send(port), 200));
    let before = wait_until(Duration::from_secs(10), "some load to be served", || {
        let s = gw.get("/metrics").text();
        let served: u64 = s.lines().find(|l| l.starts_with("omni_proxy_requests_total{class=\"2xx\"}"))?.split(' ').nth(1)?.parse().ok()?;
        (served > 50).then_some(served)
    });
    let old = gw.pid_of("api").unwrap();
    let killed_at = Instant::now();
    unsafe { libc::kill(old, libc::SIGKILL) };
    // Issue 4: the worker is back and serving within 1 s (typically ~130 ms).
    gw.wait_component("api", "a new worker to be ready within 1 s of the kill", Duration::from_secs(1), |c| {
        c["state"] == "ready" && c["pid"].as_i64().is_some_and(|p| p as i32 != old)
    });
    let recovered = killed_at.elapsed();
    // Keep the load on the new worker for a while too.
    wait_until(Duration::from_secs(10), "load on the new worker", || {
        let s = gw.get("/metrics").text();
        let served: u64 = s.lines().find(|l| l.starts_with("omni_proxy_requests_total{class=\"2xx\"}"))?.split(' ').nth(1)?.parse().ok()?;
        (served > before + 100).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, errors) = loader.join().unwrap();
    eprintln!("{ok} requests served, {failed} failed; new worker ready {} ms after kill -9", recovered.as_millis());
    assert_eq!(failed, 0, "no request may fail while the worker restarts: {errors:?}");
    assert_eq!(gw.component("api")["restarts"], 1);
}

#[test]
fn sighup_under_mixed_get_and_post_load_fails_no_request() {
    let dir = workdir();
    let gw = real_stack(dir.path()).start();
    let port = gw.port;
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(6, stop.clone(), move |i| {
        let session = format!("00000000-0000-4000-8000-{:012}", i % 1000);
        if i % 2 == 0 {
            expect_status(Request::get("/api/v1/health").try_send(port), 200)
        } else {
            let r = Request::new("POST", "/api/v1/preferences").session(&session).json(&serde_json::json!({"key": "k", "value": format!("v{i}")})).try_send(port);
            expect_status(r, 200)
        }
    });
    for round in 0..3 {
        let old = gw.pid_of("api").unwrap();
        unsafe { libc::kill(gw.child.pid() as i32, libc::SIGHUP) };
        gw.wait_component("api", &format!("reload {round}: a new worker serving"), Duration::from_secs(20), |c| {
            c["state"] == "ready" && c["pid"].as_i64().is_some_and(|p| p as i32 != old)
        });
        wait_until(Duration::from_secs(20), "the old worker to drain and exit", || (!alive(old)).then_some(()));
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, errors) = loader.join().unwrap();
    eprintln!("{ok} requests served across 3 reloads, {failed} failed");
    assert!(ok > 0);
    assert_eq!(failed, 0, "reloads must not fail requests: {errors:?}");
    assert_eq!(gw.component("api")["restarts"], 0, "a reload is not a crash");
}

#[test]
fn kill9_of_the_gateway_takes_the_worker_and_postgres_along() {
    let dir = workdir();
    let mut gw = real_stack(dir.path()).start();
    let api = gw.pid_of("api").unwrap();
    let pg = gw.pid_of("postgres").unwrap();
    let data = gw.data_dir();
    unsafe { libc::kill(gw.child.pid() as i32, libc::SIGKILL) };
    gw.child.wait_exit(Duration::from_secs(5));
    wait_until(Duration::from_secs(2), "worker and postgres gone within 2 s", || {
        (!alive(api) && !alive(pg) && postgres_pids_on(&data).is_empty()).then_some(())
    });
}

/// Sends a request with a body of `size` bytes streamed from a small buffer.
fn upload(port: u16, size: u64) -> serde_json::Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n").unwrap();
    let chunk = vec![b'u'; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("bad upload answer: {resp}"))
}

/// Downloads `size` bytes, counting them without keeping them.
fn download(port: u16, size: u64) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /download?bytes={size} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut head_done = false;
    let mut head = Vec::new();
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if head_done {
            total += n as u64;
        } else {
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
                total += (head.len() - end - 4) as u64;
                head_done = true;
            }
        }
    }
    total
}

#[test]
fn streams_200mb_each_way_while_the_gateway_stays_under_50mb() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let gw = stack.start();
    const SIZE: u64 = 200 * 1024 * 1024;
    assert_eq!(upload(gw.port, SIZE)["bytes"], SIZE);
    assert_eq!(download(gw.port, SIZE), SIZE);
    let peak_kib = vm_kib(gw.child.pid(), "VmHWM:");
    eprintln!("gateway peak resident memory: {} KiB", peak_kib);
    assert!(peak_kib < 50 * 1024, "gateway peak RSS {peak_kib} KiB must stay under 50 MiB");
}

#[test]
fn hop_by_hop_headers_are_removed_and_forwarding_headers_set() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let gw = stack.start();
    let r = Request::get("/echo")
        .port(gw.port)
        .header("keep-alive", "timeout=5")
        .header("x-private-hop", "secret")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .header("connection", "x-private-hop")
        .send();
    assert_eq!(r.status, 200);
    let echo = r.json();
    let h = &echo["headers"];
    for gone in ["keep-alive", "x-private-hop", "te"] {
        assert!(h.get(gone).is_none(), "{gone} must not reach the worker: {echo}");
    }
    assert_eq!(h["x-end-to-end"], "kept");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], format!("127.0.0.1:{}", gw.port));
    // The client address the worker believes, whatever the client wrote.
    assert_eq!(h["x-omni-client-addr"], "127.0.0.1");
    let spoofed = Request::get("/echo").port(gw.port).header("x-omni-client-addr", "203.0.113.8").send().json();
    assert_eq!(spoofed["headers"]["x-omni-client-addr"], "127.0.0.1");
    // Without OMNI_TRUSTED_PROXIES no client may claim https (ops_load_balancer.rs: with it).
    for sent in ["https", "HTTPS, http", "gopher"] {
        let echo = Request::get("/echo").port(gw.port).header("x-forwarded-proto", sent).send().json();
        assert_eq!(echo["headers"]["x-forwarded-proto"], "http", "{sent}");
    }
}

#[test]
fn protocol_upgrades_pass_through() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let gw = stack.start();
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /upgrade HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed during the 101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in ["hello", "through the gateway"] {
        s.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }
}

#[test]
fn without_a_ready_worker_requests_wait_then_get_503_json() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let mut gw = stack.env("FAKE_UNHEALTHY", "1").env("OMNI_UPSTREAM_WAIT_MS", "300").spawn();
    wait_until(Duration::from_secs(20), "the gateway to listen", || Request::get("/health").try_send(gw.port).ok());
    let started = Instant::now();
    let r = Request::get("/api/v1/anything").port(gw.port).send();
    assert!(started.elapsed() >= Duration::from_millis(300), "the request must wait for a worker first");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "worker_unavailable");
    assert!(r.json()["detail"].as_str().unwrap().contains("not available"));
    let h = gw.get("/health");
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["components"][0]["state"], "starting");
    assert!(gw.terminate().success());
}

#[test]
fn a_worker_slower_than_the_upstream_timeout_gets_504_json() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let gw = stack.env("OMNI_UPSTREAM_TIMEOUT_S", "1").start();
    let r = Request::get("/slow?ms=5000").port(gw.port).send();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["code"], "upstream_timeout");
    assert_eq!(Request::get("/slow?ms=10").port(gw.port).send().status, 200);
}

#[test]
fn a_client_trickling_its_headers_is_dropped_while_others_are_served() {
    let dir = workdir();
    let (stack, _pg) = fake_stack(dir.path());
    let gw = stack.env("OMNI_HEADER_TIMEOUT_S", "2").start();
    // The gateway's clock starts when it accepts the connection: this one
    // starts before the connection is made, so it never runs behind it.
    let started = Instant::now();
    let mut slow = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let request = b"GET /echo HTTP/1.1\r\nhost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut sent = 0;
    let mut closed = false;
    let mut others_served = 0;
    while sent < request.len() {
        if slow.write_all(&request[sent..sent + 1]).is_err() {
            closed = true;
            break;
        }
        sent += 1;
        // Other clients are served meanwhile.
        assert_eq!(Request::get("/echo").port(gw.port).send().status, 200);
        others_served += 1;
        let mut b = [0u8; 1];
        match slow.read(&mut b) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let took = started.elapsed();
    eprintln!("slow client dropped after {} ms and {sent} of {} bytes; {others_served} other requests served", took.as_millis(), request.len());
    assert!(closed, "the trickling client must be disconnected before finishing its headers");
    assert!(sent < request.len());
    assert!(took >= Duration::from_secs(2), "not before the header timeout");
    assert!(took < Duration::from_secs(10), "soon after the header timeout");
}

#[test]
fn notify_socket_gets_ready_when_usable_and_stopping_at_stop() {
    use std::os::unix::net::UnixDatagram;
    let dir = workdir();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut gw = real_stack(dir.path()).env("NOTIFY_SOCKET", sock_path.display().to_string()).spawn();
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    loop {
        let n = sock.recv(&mut buf).expect("a notification before the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.lines().any(|l| l == "READY=1") {
            break;
        }
    }
    // READY=1 means usable: both the gateway and the worker answer now.
    assert_eq!(gw.get("/health").status, 200, "READY=1 came before /health was 200; seen {seen:?}");
    assert_eq!(gw.get("/api/v1/health").status, 200);
    assert!(seen.iter().any(|m| m.starts_with("STATUS=")), "{seen:?}");
    // Children never see the gateway's notify socket.
    let api = gw.pid_of("api").unwrap();
    let environ = std::fs::read(format!("/proc/{api}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"), "the worker must not inherit NOTIFY_SOCKET");
    assert!(gw.terminate().success());
    let mut stopping = false;
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 expected at stop");
}

#[test]
fn as_pid_1_it_reaps_orphans_and_stops_cleanly_on_sigterm() {
    let dir = workdir();
    let marker = format!("omni-orphan-{}", uuid::Uuid::new_v4().simple());
    let wrapper = dir.path().join("worker-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# Leave an orphan: the subshell exits at once, its child lives on.\n( sh -c 'sleep 1; true' {marker} & )\nexec {}\n",
            bin_path("fake-worker").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = omni_tests::free_port();
    let pg = TempPostgres::start_new();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(bin_path("omni-gateway"))
        .current_dir(dir.path())
        .env("OMNI_PORT", port.to_string())
        .env("OMNI_API_BIN", &wrapper)
        .env("DATABASE_URL", pg.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("pid1.log")).unwrap());
    let mut unshare = omni_tests::ChildGuard::spawn(&mut cmd);
    wait_until(Duration::from_secs(30), "the gateway (PID 1) to be healthy", || {
        (Request::get("/health").try_send(port).ok()?.status == 200).then_some(())
    });
    let gateway_pid: i32 = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.pid())).unwrap().trim().parse().unwrap();
    let ns = std::fs::read_to_string(format!("/proc/{gateway_pid}/status")).unwrap();
    assert!(ns.lines().any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")), "gateway must be PID 1 in its namespace: {ns}");
    let orphan = wait_until(Duration::from_secs(10), "the orphan to appear", || find_process(&marker));
    wait_until(Duration::from_secs(10), "the orphan to exit and be reaped (no zombie left)", || {
        (!std::path::Path::new(&format!("/proc/{orphan}")).exists()).then_some(())
    });
    unsafe { libc::kill(gateway_pid, libc::SIGTERM) };
    let status = unshare.wait_exit(Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("pid1.log")).unwrap_or_default();
    assert!(status.success(), "SIGTERM to PID 1 must stop cleanly, got {status}:\n{log}");
    assert!(log.contains("running as PID 1"), "{log}");
}

fn find_process(marker: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(marker).then_some(pid)
    })
}

#[test]
fn gateway_endpoints_report_components_and_metrics() {
    let dir = workdir();
    let gw: Gateway = real_stack(dir.path()).start();
    // The WAL streamer does not hold back readiness (it is auxiliary); it follows within moments.
    gw.wait_component("wal", "the WAL streamer to be ready", std::time::Duration::from_secs(30), |c| c["state"] == "ready");
    let status = gw.get("/gateway/status").json();
    let names: Vec<_> = status["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["postgres", "api", "wal"]);
    for c in status["components"].as_array().unwrap() {
        assert_eq!(c["state"], "ready");
        assert!(c["pid"].as_i64().unwrap() > 0);
        assert!(c["uptime_s"].as_f64().is_some());
        assert_eq!(c["restarts"], 0, "{status:#}\n{}", gw.log());
    }
    assert_eq!(gw.get("/api/v1/health").status, 200);
    let metrics = gw.get("/metrics").text();
    assert!(metrics.contains("omni_proxy_requests_total{class=\"2xx\"} 1"), "{metrics}");
    assert!(metrics.contains("omni_child_state{component=\"api\",state=\"ready\"} 1"), "{metrics}");
    assert!(metrics.contains("omni_proxy_request_duration_seconds_count 1"), "{metrics}");
    let r = Request::new("POST", "/health").port(gw.port).send();
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["code"], "method_not_allowed");
}
