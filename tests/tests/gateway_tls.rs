//! HTTPS on the gateway's port (`OMNI_TLS_CERT`, `OMNI_TLS_KEY`): HTTP/2
//! and HTTP/1.1 by ALPN, `X-Forwarded-Proto: https` to the worker, HSTS
//! but not for localhost, the plain port (`OMNI_HTTP_PORT`) redirecting
//! with 308, bad files refused at start naming the variable, and a
//! certificate replaced under load with no failed request.
//!
//! Certificates come from a test CA made here with the `openssl` CLI;
//! clients are `curl` (nghttp2 for HTTP/2), `wrk` and `openssl s_client`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::gateway;

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{bin_path, free_port, make_test_ca, wait_until, ChildGuard, TempPostgres, TEST_API_KEY};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A certificate for localhost, 127.0.0.1 and omni.test signed by the CA
/// `ca` of `dir` (from [`make_test_ca`]), with this `serial`, valid
/// `days` (negative: already expired); `<name>.pem` and `<name>.key` (mode 600).
fn leaf(dir: &Path, name: &str, serial: u32, days: i32) -> (PathBuf, PathBuf) {
    let (key, csr, cert, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
    std::fs::write(dir.join(&ext), "subjectAltName=DNS:localhost,DNS:omni.test,IP:127.0.0.1\n").unwrap();
    openssl(dir, &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]);
    let (serial, days) = (serial.to_string(), days.to_string());
    openssl(dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", &serial, "-days", &days, "-extfile", &ext, "-out", &cert]);
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir.join(cert), dir.join(key))
}

/// `curl -sS` with `args`: (exit success, stdout, stderr).
fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").arg("-sS").args(args).output().expect("curl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

struct Tls {
    gw: Gateway,
    ca: PathBuf,
    /// Where the served pair is (replaced in place by the reload test).
    cert: PathBuf,
    key: PathBuf,
    http_port: u16,
    _pg: TempPostgres,
}

impl Tls {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.gw.port)
    }

    /// `curl --cacert <ca>` to `path` on the HTTPS port: (status, HTTP version, body).
    fn get(&self, version: &str, path: &str, extra: &[&str]) -> (u16, String, String) {
        let ca = self.ca.display().to_string();
        let url = self.url(path);
        let mut args = vec![version, "--cacert", &ca, "-o", "-", "-w", "\n%{http_code} %{http_version}"];
        args.extend_from_slice(extra);
        args.push(&url);
        let (ok, out, err) = curl(&args);
        assert!(ok, "curl {version} {url}: {err}\n{}", self.gw.log());
        let (body, tail) = out.rsplit_once('\n').unwrap();
        let (code, version) = tail.split_once(' ').unwrap();
        (code.parse().unwrap(), version.to_string(), body.to_string())
    }

    /// The serial number of the certificate a new TLS connection is given.
    fn served_serial(&self) -> String {
        let script = format!("openssl s_client -connect 127.0.0.1:{} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial", self.gw.port);
        let out = Command::new("sh").args(["-c", &script]).output().expect("sh");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// A gateway with HTTPS from a fresh test CA's certificate (serial 1), the
/// fake worker behind it on an external PostgreSQL, and a plain port.
fn start(dir: &Path, extra: &[(&str, &str)]) -> Tls {
    let ca = make_test_ca(dir, "ca");
    let (cert, key) = leaf(dir, "served", 1, 2);
    let pg = TempPostgres::start_new();
    let http_port = free_port();
    let mut builder = GatewayBuilder::new(dir)
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("DATABASE_URL", pg.url())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_TLS_CERT", cert.display().to_string())
        .env("OMNI_TLS_KEY", key.display().to_string())
        .env("OMNI_HTTP_PORT", http_port.to_string());
    for (name, value) in extra {
        builder = builder.env(name, *value);
    }
    let mut gw = builder.spawn();
    let (port, ca_arg) = (gw.port, ca.display().to_string());
    wait_until(Duration::from_secs(60), "/health 200 over HTTPS", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway exited ({status}): {}", gw.log());
        }
        let (ok, out, _) = curl(&["--cacert", &ca_arg, "-o", "/dev/null", "-w", "%{http_code}", &format!("https://localhost:{port}/health")]);
        (ok && out == "200").then_some(())
    });
    Tls { gw, ca, cert, key, http_port, _pg: pg }
}

#[test]
fn https_serves_http2_and_http1_redirects_the_plain_port_and_streams_over_h2() {
    let dir = workdir();
    let tls = start(dir.path(), &[]);

    // Both protocols by ALPN, to the gateway's own endpoints and to the worker.
    let (status, version, _) = tls.get("--http2", "/health", &[]);
    assert_eq!((status, version.as_str()), (200, "2"));
    let (status, version, body) = tls.get("--http1.1", "/echo", &[]);
    assert_eq!((status, version.as_str()), (200, "1.1"), "{body}");
    let (status, version, body) = tls.get("--http2", "/echo?q=1", &[]);
    assert_eq!((status, version.as_str()), (200, "2"), "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The worker speaks HTTP/1.1 and learns the client used HTTPS (its
    // session cookie is then `Secure`), whatever the client claims.
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https", "{echoed}");
    assert_eq!(echoed["path"], "/echo?q=1", "{echoed}");
    let (_, _, body) = tls.get("--http1.1", "/echo", &["-H", "X-Forwarded-Proto: http"]);
    assert!(body.contains(r#""x-forwarded-proto":"https""#), "{body}");

    // An upload of unknown length over HTTP/2 (no content-length: DATA
    // frames until END_STREAM) reaches the worker whole; a long download too.
    let upload = dir.path().join("upload.bin");
    std::fs::write(&upload, vec![7u8; 3 * 1024 * 1024 + 5]).unwrap();
    let mut upload_run = Command::new("curl")
        .args(["-sS", "--http2", "--cacert", &tls.ca.display().to_string(), "-T", "-", "-H", "content-type: application/octet-stream", &tls.url("/upload")])
        .stdin(std::fs::File::open(&upload).unwrap())
        .output()
        .unwrap();
    assert!(upload_run.status.success(), "{}", String::from_utf8_lossy(&upload_run.stderr));
    assert_eq!(String::from_utf8_lossy(&std::mem::take(&mut upload_run.stdout)), r#"{"bytes":3145733}"#);
    let (ok, out, err) = curl(&["--http2", "--cacert", &tls.ca.display().to_string(), "-o", "/dev/null", "-w", "%{size_download} %{http_version}", &tls.url("/download?bytes=50000000")]);
    assert!(ok, "{err}");
    assert_eq!(out, "50000000 2");

    // HSTS for a name, never for localhost or an address.
    let resolve = format!("omni.test:{}:127.0.0.1", tls.gw.port);
    let headers = |url: &str, extra: &[&str]| {
        let mut args = vec!["--http2", "--cacert", tls.ca.to_str().unwrap(), "-D", "-", "-o", "/dev/null"];
        args.extend_from_slice(extra);
        args.push(url);
        let (ok, out, err) = curl(&args);
        assert!(ok, "{err}");
        out.to_ascii_lowercase()
    };
    let named = headers(&format!("https://omni.test:{}/api/v1/health", tls.gw.port), &["--resolve", &resolve]);
    assert!(named.contains("strict-transport-security: max-age=31536000"), "{named}");
    let local = headers(&tls.url("/api/v1/health"), &[]);
    assert!(local.starts_with("http/2 200") && !local.contains("strict-transport-security"), "{local}");
    let by_ip = headers(&format!("https://127.0.0.1:{}/health", tls.gw.port), &[]);
    assert!(!by_ip.contains("strict-transport-security"), "{by_ip}");

    // The plain port: 308 to the same host on the HTTPS port, path and query kept.
    let plain = format!("http://127.0.0.1:{}/some/page?x=1&y=two", tls.http_port);
    let (ok, out, err) = curl(&["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", "Host: omni.test", "-X", "POST", &plain]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("308 https://omni.test:{}/some/page?x=1&y=two", tls.gw.port));
    let (_, out, _) = curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:{}/.well-known/acme-challenge/abc", tls.http_port)]);
    assert_eq!(out, "404", "the ACME challenge path is answered, not redirected");
    // Plain HTTP on the HTTPS port is not served.
    let (ok, _, _) = curl(&["-o", "/dev/null", "--max-time", "10", &format!("http://127.0.0.1:{}/health", tls.gw.port)]);
    assert!(!ok, "plain HTTP was answered on the HTTPS port");

    // An upgrade (what a WebSocket does) over TLS and HTTP/1.1: the 101,
    // then bytes both ways through the gateway to the worker's echo.
    let mut tunnel = ChildGuard::spawn(
        Command::new("openssl")
            .args(["s_client", "-quiet", "-alpn", "http/1.1", "-servername", "localhost", "-connect", &format!("127.0.0.1:{}", tls.gw.port)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut to_gateway = tunnel.child_mut().stdin.take().unwrap();
    let mut from_gateway = BufReader::new(tunnel.child_mut().stdout.take().unwrap()).lines();
    to_gateway.write_all(b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
    let status_line = from_gateway.next().expect("an answer to the upgrade").unwrap();
    assert!(status_line.starts_with("HTTP/1.1 101"), "{status_line}");
    for line in from_gateway.by_ref() {
        if line.unwrap().trim().is_empty() {
            break;
        }
    }
    to_gateway.write_all(b"ping through the tunnel\n").unwrap();
    assert_eq!(from_gateway.next().expect("the echo").unwrap(), "ping through the tunnel");
    tunnel.kill9();

    // The status shows the certificate; /metrics its expiry.
    let (_, _, status) = tls.get("--http2", "/gateway/status", &[]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!((status["tls"]["enabled"].as_bool(), status["tls"]["subject"].as_str()), (Some(true), Some("CN=served")), "{status}");
    let (_, _, metrics) = tls.get("--http1.1", "/metrics", &[]);
    let expiry: u64 = metrics.lines().find_map(|l| l.strip_prefix("omni_tls_certificate_expiry_seconds ")).expect("the expiry gauge").parse().unwrap();
    assert_eq!(Some(expiry), status["tls"]["not_after"].as_u64());

    // The live log stream over HTTP/2: its events arrive while it stays open.
    let mut stream = ChildGuard::spawn(
        Command::new("curl")
            .args(["-sS", "-N", "-v", "--http2", "--max-time", "60", "--cacert", tls.ca.to_str().unwrap(), "-H", &format!("x-api-key: {TEST_API_KEY}"), &tls.url("/gateway/logs/stream")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut lines = BufReader::new(stream.child_mut().stdout.take().unwrap()).lines();
    let mut read = Vec::new();
    // Subscribed once it says hello: lines logged from then on are streamed.
    for line in lines.by_ref() {
        read.push(line.expect("the stream's output"));
        if read.last().is_some_and(|l| l == "event: hello") {
            break;
        }
    }
    assert_eq!(read.last().map(String::as_str), Some("event: hello"), "the stream ended before its hello: {read:?}");
    // The worker logs 50 lines; the stream carries them as events.
    let (_, _, body) = tls.get("--http2", "/flood?lines=50&len=10", &[]);
    assert_eq!(body, r#"{"lines":50}"#);
    let mut seen = false;
    for line in lines.by_ref() {
        read.push(line.expect("the stream's output"));
        if read.last().is_some_and(|l| l.starts_with("data:") && l.contains("flood 49 ")) {
            seen = true;
            break;
        }
    }
    assert!(seen, "the stream ended before the worker's lines arrived: {read:?}\n{}", tls.gw.log());
    assert_eq!(stream.try_status(), None, "the stream is still open");
    stream.kill9();
    let mut verbose = String::new();
    stream.child_mut().stderr.take().unwrap().read_to_string(&mut verbose).unwrap();
    assert!(verbose.contains("using HTTP/2") || verbose.contains("HTTP/2 200"), "the stream was not HTTP/2: {verbose}");
}

#[test]
fn bad_certificate_files_stop_the_start_naming_the_variable() {
    let dir = workdir();
    let d = dir.path();
    make_test_ca(d, "ca");
    let (good_cert, good_key) = leaf(d, "good", 1, 2);
    let (expired_cert, expired_key) = leaf(d, "expired", 2, -1);
    let (_, other_key) = leaf(d, "other", 3, 2);
    let open_key = d.join("open.key");
    std::fs::copy(&good_key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<(&str, String)>, &[&str])> = vec![
        (vec![("OMNI_TLS_CERT", s(&expired_cert)), ("OMNI_TLS_KEY", s(&expired_key))], &["OMNI_TLS_CERT", "expired"]),
        (vec![("OMNI_TLS_CERT", s(&good_cert)), ("OMNI_TLS_KEY", s(&other_key))], &["OMNI_TLS_KEY", "does not match"]),
        (vec![("OMNI_TLS_CERT", s(&good_cert)), ("OMNI_TLS_KEY", s(&open_key))], &["OMNI_TLS_KEY", "every account", "chmod 600"]),
        (vec![("OMNI_TLS_CERT", s(&d.join("absent.pem"))), ("OMNI_TLS_KEY", s(&good_key))], &["OMNI_TLS_CERT", "absent.pem"]),
        (vec![("OMNI_TLS_CERT", s(&good_key)), ("OMNI_TLS_KEY", s(&good_key))], &["OMNI_TLS_CERT", "no CERTIFICATE"]),
        (vec![("OMNI_TLS_CERT", s(&good_cert))], &["OMNI_TLS_KEY", "needs both"]),
        (vec![("OMNI_TLS_CERT", s(&good_cert)), ("OMNI_TLS_KEY", s(&good_key)), ("OMNI_HTTP_PORT", taken_port.clone())], &["OMNI_HTTP_PORT", "already in use"]),
    ];
    for (env, expected) in cases {
        let mut builder = GatewayBuilder::new(d).env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none");
        for (name, value) in &env {
            builder = builder.env(name, value.clone());
        }
        let (status, log) = builder.run_to_exit();
        assert!(!status.success(), "{env:?} started: {log}");
        for word in expected {
            assert!(log.contains(word), "{env:?}: the message lacks {word:?}: {log}");
        }
    }
    drop(taken);
}

#[test]
fn a_certificate_replaced_under_load_fails_no_request_and_new_connections_get_it() {
    let dir = workdir();
    let tls = start(dir.path(), &[]);
    assert_eq!(tls.served_serial(), "serial=01");
    let (next_cert, next_key) = leaf(dir.path(), "next", 2, 2);

    // Load over HTTPS through the gateway to the worker: keep-alive
    // connections, and one where every request is a new TLS handshake.
    let wrk = |extra: &[&str]| {
        let mut args = vec!["-t1", "-c8", "-d8s", "--latency"];
        args.extend_from_slice(extra);
        let url = tls.url("/api/v1/health");
        let mut command = Command::new("wrk");
        command.args(&args).arg(url).stdout(Stdio::piped()).stderr(Stdio::piped());
        ChildGuard::spawn(&mut command)
    };
    let mut kept = wrk(&[]);
    let mut fresh = wrk(&["-H", "Connection: close"]);
    let metric = |name: &str| -> u64 {
        let (_, _, text) = tls.get("--http1.1", "/metrics", &[]);
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    };
    wait_until(Duration::from_secs(30), "requests under load", || (metric("omni_proxy_requests_total{class=\"2xx\"}") > 200).then_some(()));

    // Replaced the way certbot does it: new files renamed over the old ones.
    std::fs::rename(&next_key, &tls.key).unwrap();
    std::fs::rename(&next_cert, &tls.cert).unwrap();
    wait_until(Duration::from_secs(30), "a new connection to get the new certificate", || (tls.served_serial() == "serial=02").then_some(()));
    let reloaded_during_load = kept.try_status().is_none() && fresh.try_status().is_none();

    for (label, mut run) in [("keep-alive", kept), ("a handshake per request", fresh)] {
        let status = run.wait_exit(Duration::from_secs(60));
        let mut out = String::new();
        run.child_mut().stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(status.success(), "wrk ({label}): {out}");
        let requests: u64 = out.lines().find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok())).unwrap_or_else(|| panic!("wrk ({label}) printed no total: {out}"));
        assert!(requests > 50, "wrk ({label}): {out}");
        eprintln!("wrk over HTTPS, {label}, certificate replaced mid-run:\n{out}");
        assert!(!out.contains("Socket errors") && !out.contains("Non-2xx"), "wrk ({label}) saw failed requests across the certificate change: {out}\n{}", tls.gw.log());
    }
    assert!(reloaded_during_load, "the certificate changed after the load ended; the test proves nothing");
    let (_, _, status) = tls.get("--http2", "/gateway/status", &[]);
    assert!(status.contains(r#""subject":"CN=next""#), "{status}");
    assert!(tls.gw.log().contains("TLS certificate reloaded"), "{}", tls.gw.log());

    // A broken replacement is refused and the certificate stays.
    std::fs::write(&tls.cert, "not a certificate").unwrap();
    wait_until(Duration::from_secs(30), "the refusal in the status", || {
        let (_, _, status) = tls.get("--http2", "/gateway/status", &[]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["tls"]["last_reload_error"].as_str().filter(|e| e.contains("OMNI_TLS_CERT")).map(str::to_owned)
    });
    assert_eq!(tls.served_serial(), "serial=02");
    assert_eq!(tls.get("--http2", "/api/v1/health", &[]).0, 200);
}

#[test]
fn an_idle_tls_connection_is_closed_after_the_header_timeout() {
    let dir = workdir();
    let tls = start(dir.path(), &[("OMNI_HEADER_TIMEOUT_S", "1")]);
    // An HTTP/2 client that sends its preface and SETTINGS, then nothing.
    let opened = std::time::Instant::now();
    let mut client = ChildGuard::spawn(
        Command::new("openssl")
            .args(["s_client", "-quiet", "-alpn", "h2", "-servername", "localhost", "-connect", &format!("127.0.0.1:{}", tls.gw.port)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut to_gateway = client.child_mut().stdin.take().unwrap();
    to_gateway.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    to_gateway.flush().unwrap();
    // The gateway ends it (GOAWAY, then the close) once it has been idle
    // for OMNI_HEADER_TIMEOUT_S; the client still holds its side open.
    client.wait_exit(Duration::from_secs(20));
    let lasted = opened.elapsed();
    assert!(lasted >= Duration::from_millis(900), "closed after {lasted:?}, before the idle limit");
    drop(to_gateway);
    // A client that completes its handshake and sends nothing (the
    // gateway waits for its first bytes before building its HTTP
    // connection) is ended after the limit as well.
    let opened = std::time::Instant::now();
    let mut client = ChildGuard::spawn(
        Command::new("openssl")
            .args(["s_client", "-quiet", "-alpn", "http/1.1", "-servername", "localhost", "-connect", &format!("127.0.0.1:{}", tls.gw.port)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let to_gateway = client.child_mut().stdin.take().unwrap();
    client.wait_exit(Duration::from_secs(20));
    let lasted = opened.elapsed();
    assert!(lasted >= Duration::from_millis(900), "closed after {lasted:?}, before the idle limit");
    drop(to_gateway);
    // Busy connections are not idle: a request every half second for 3 s on one HTTP/2 connection.
    let url = tls.url("/slow?ms=500");
    let mut args = vec!["--http2", "--cacert", tls.ca.to_str().unwrap(), "-w", "%{http_code} %{num_connects}\n"];
    for _ in 0..6 {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let (ok, out, err) = curl(&args);
    assert!(ok, "{err}");
    assert_eq!(out, "200 1\n200 0\n200 0\n200 0\n200 0\n200 0\n", "one connection kept across the requests");
}

/// One HTTP/1.1 connection over TLS (`openssl s_client`), read response by response.
struct Http1Client {
    client: ChildGuard,
    to_gateway: std::process::ChildStdin,
    from_gateway: BufReader<std::process::ChildStdout>,
}

impl Http1Client {
    fn connect(port: u16) -> Http1Client {
        let mut client = ChildGuard::spawn(
            Command::new("openssl")
                .args(["s_client", "-quiet", "-alpn", "http/1.1", "-servername", "localhost", "-connect", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let to_gateway = client.child_mut().stdin.take().unwrap();
        let from_gateway = BufReader::new(client.child_mut().stdout.take().unwrap());
        Http1Client { client, to_gateway, from_gateway }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.to_gateway.write_all(bytes).unwrap();
        self.to_gateway.flush().unwrap();
    }

    /// The next response's status line and lower-cased head (its body, of
    /// `Content-Length`, read and dropped).
    fn response(&mut self) -> (String, String) {
        let mut status = String::new();
        self.from_gateway.read_line(&mut status).unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(self.from_gateway.read_line(&mut line).unwrap() > 0, "the connection closed inside a response head: {status}{head}");
            if line.trim().is_empty() {
                break;
            }
            head.push_str(&line.to_ascii_lowercase());
        }
        let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |n| n.trim().parse::<usize>().unwrap());
        let mut body = vec![0; length];
        self.from_gateway.read_exact(&mut body).unwrap();
        (status.trim().to_owned(), head)
    }
}

/// `/metrics`' value of `name` (a counter or gauge without labels).
fn metric(tls: &Tls, name: &str) -> u64 {
    let (_, _, text) = tls.get("--http1.1", "/metrics", &[]);
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in /metrics")).parse().unwrap()
}

/// An HTTP/1.1 connection over TLS quiet for a second gives its HTTP
/// buffers back (parked, `serve/park.rs`) and is served again on the next
/// request, on the same connection and without `Connection: close`: after
/// a park, with a request whose first half came before a park, and with a
/// protocol switch. A parked connection still ends at the idle limit.
#[test]
fn a_quiet_https_connection_is_parked_and_served_again_on_the_same_connection() {
    let dir = workdir();
    let tls = start(dir.path(), &[("OMNI_HEADER_TIMEOUT_S", "5")]);
    let parks = |tls: &Tls| metric(tls, "omni_https_parks_total");
    let request = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut client = Http1Client::connect(tls.gw.port);
    client.send(request);
    let (status, head) = client.response();
    assert!(status.starts_with("HTTP/1.1 200") && !head.contains("connection: close"), "{status}\n{head}");

    // Parked: counted, and shown as parked now (curl's own connections close at once).
    wait_until(Duration::from_secs(10), "the quiet connection to be parked", || (parks(&tls) >= 1).then_some(()));
    assert_eq!(metric(&tls, "omni_https_connections_parked"), 1);
    client.send(request);
    let (status, head) = client.response();
    assert!(status.starts_with("HTTP/1.1 200") && !head.contains("connection: close"), "after a park: {status}\n{head}");

    // Half a request, a park (the half kept), then the rest.
    let (first, rest) = request.split_at(20);
    client.send(first);
    wait_until(Duration::from_secs(10), "the connection to be parked with half a request read", || (parks(&tls) >= 2).then_some(()));
    client.send(rest);
    let (status, head) = client.response();
    assert!(status.starts_with("HTTP/1.1 200") && !head.contains("connection: close"), "a request across a park: {status}\n{head}");

    // A protocol switch after a park: the 101, then bytes both ways.
    wait_until(Duration::from_secs(10), "the connection to be parked again", || (parks(&tls) >= 3).then_some(()));
    client.send(b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n");
    let (status, _) = client.response();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    client.send(b"ping through the tunnel\n");
    let mut echo = String::new();
    client.from_gateway.read_line(&mut echo).unwrap();
    assert_eq!(echo, "ping through the tunnel\n");
    client.client.kill9();

    // A parked connection is still ended at the idle limit (5 s here).
    let mut idle = Http1Client::connect(tls.gw.port);
    idle.send(request);
    let (status, _) = idle.response();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let answered = std::time::Instant::now();
    let mut rest = Vec::new();
    idle.from_gateway.read_to_end(&mut rest).unwrap();
    let lasted = answered.elapsed();
    assert!(rest.is_empty(), "nothing but the close after the response: {:?}", String::from_utf8_lossy(&rest));
    assert!(lasted >= Duration::from_millis(4500) && lasted < Duration::from_secs(30), "closed {lasted:?} after the response, not at the 5 s idle limit");
    assert!(parks(&tls) >= 4, "the idle connection was parked before it was closed");
}
