//! A stand-in for `omni-api` that the gateway supervises and proxies to in
//! proxy tests, where the real worker's features would get in the way:
//! arbitrarily large uploads and downloads, a raw protocol upgrade, and
//! echoing the request head the worker received.
//!
//! Speaks the worker's start-up contract: the listening socket arrives as the
//! fd in `OMNI_API_LISTEN_FD`; `GET /api/v1/health` answers 200 (503 when
//! `FAKE_UNHEALTHY` is set); readiness is announced on `OMNI_API_READY_FD`
//! (never when unhealthy or never ready), `FAKE_READY_DELAY_MS` after the start.
//! `GET /health-hits-before-ready` counts the health requests that came
//! before the announcement (the gateway should make none).
//!
//! Misbehaviour on demand, for supervision tests (each variable names a file):
//! `FAKE_REQUIRE_FILE`: exit 1 at start unless the file exists;
//! `FAKE_NEVER_READY_IF_FILE`: if the file exists at start, health answers
//! 503 for this instance's whole life; `FAKE_READY_WHEN_FILE`: if the file
//! does not exist at start, the instance holds its start (health 503, no
//! announcement) until it does; `FAKE_EVENTS`: append a line per start
//! (`start <pid> <unix ms>`) and per `/slow` request (`slow <pid> <unix ms>`).
//!
//! Routes: `POST /upload` → `{"bytes": N}` after reading the body;
//! `GET /download?bytes=N` → N bytes streamed in 64 KiB chunks;
//! `GET /echo` → the received method, path and headers as JSON;
//! `GET /slow?ms=N` → 200 after N ms; upgrade `echo` → 101, then echoes bytes.
//! For the gateway's log ring: `GET /api/v1/auth/check` → 204 for the kit's
//! `x-api-key`, 401 otherwise (the real worker's contract);
//! `GET /flood?lines=N&len=L` → N lines of L characters on stderr;
//! `GET /say-env` → every environment variable's value on stderr (whatever
//! the worker was handed must not reach the gateway's log ring unredacted).

use std::convert::Infallible;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Set at start from `FAKE_NEVER_READY_IF_FILE`.
static NEVER_READY: AtomicBool = AtomicBool::new(false);
/// Set at start from `FAKE_READY_WHEN_FILE`; cleared once the file exists.
static HELD: AtomicBool = AtomicBool::new(false);
/// Set once readiness was announced on `OMNI_API_READY_FD`.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);
/// `GET /api/v1/health` requests received before that.
static HITS_BEFORE_READY: AtomicU64 = AtomicU64::new(0);

/// Appends `what <pid> <unix ms>` to the `FAKE_EVENTS` file, if set.
fn record(what: &str) {
    let Some(path) = std::env::var_os("FAKE_EVENTS") else { return };
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let line = format!("{what} {} {ms}\n", std::process::id());
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open FAKE_EVENTS");
    file.write_all(line.as_bytes()).expect("write FAKE_EVENTS");
}

fn file_named_by(var: &str) -> Option<bool> {
    std::env::var_os(var).map(|p| std::path::Path::new(&p).exists())
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let unhealthy = std::env::var_os("FAKE_UNHEALTHY").is_some() || NEVER_READY.load(Ordering::Relaxed) || HELD.load(Ordering::SeqCst);
    if req.uri().path() == "/api/v1/health" && !ANNOUNCED.load(Ordering::SeqCst) {
        HITS_BEFORE_READY.fetch_add(1, Ordering::SeqCst);
    }
    let resp = match req.uri().path() {
        "/health-hits-before-ready" => Response::new(full(HITS_BEFORE_READY.load(Ordering::SeqCst).to_string())),
        "/api/v1/health" if unhealthy => Response::builder().status(503).body(full("{}")).unwrap(),
        "/api/v1/health" => Response::new(full(r#"{"status":"ok"}"#)),
        "/api/v1/auth/check" if req.headers().get("x-api-key").is_some_and(|k| k.as_bytes() == omni_tests::TEST_API_KEY.as_bytes()) => {
            Response::builder().status(StatusCode::NO_CONTENT).body(full("")).unwrap()
        }
        "/api/v1/auth/check" => Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("content-type", "application/json")
            .body(full(r#"{"detail":"this endpoint needs the API key in the x-api-key header","code":"missing_api_key"}"#))
            .unwrap(),
        "/flood" => {
            let (lines, len) = (query(&req, "lines").unwrap_or(1000), query(&req, "len").unwrap_or(100) as usize);
            let text = "f".repeat(len);
            let mut err = std::io::BufWriter::new(std::io::stderr().lock());
            for i in 0..lines {
                let _ = writeln!(err, "flood {i} {text}");
            }
            let _ = err.flush();
            Response::new(full(format!(r#"{{"lines":{lines}}}"#)))
        }
        "/say-env" => {
            for (name, value) in std::env::vars() {
                eprintln!("env {name}={value}");
            }
            Response::new(full("{}"))
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(format!(r#"{{"bytes":{n}}}"#)))
        }
        "/download" => {
            let total = query(&req, "bytes").unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let body = futures_like_stream(total, chunk);
            Response::builder().header("content-length", total).body(BodyExt::boxed(body)).unwrap()
        }
        "/echo" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_str().unwrap_or(""))))
                .collect();
            let doc = serde_json::json!({ "method": req.method().as_str(), "path": req.uri().to_string(), "headers": headers });
            Response::new(full(doc.to_string()))
        }
        "/slow" => {
            record("slow");
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(100))).await;
            Response::new(full("slow done"))
        }
        "/upgrade" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder().status(StatusCode::SWITCHING_PROTOCOLS).header("connection", "upgrade").header("upgrade", "echo").body(full("")).unwrap()
        }
        _ => Response::builder().status(404).body(full(r#"{"detail":"not found","code":"not_found"}"#)).unwrap(),
    };
    Ok(resp)
}

/// `total` bytes as `chunk`-sized frames, produced lazily by a task, so
/// the fake worker's memory stays flat whatever the size.
fn futures_like_stream(total: u64, chunk: Bytes) -> ChannelBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if tx.send(chunk.slice(..n)).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    ChannelBody(rx)
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn main() {
    record("start");
    if file_named_by("FAKE_REQUIRE_FILE") == Some(false) {
        eprintln!("fake-worker: FAKE_REQUIRE_FILE does not exist yet; exiting");
        std::process::exit(1);
    }
    NEVER_READY.store(file_named_by("FAKE_NEVER_READY_IF_FILE") == Some(true), Ordering::Relaxed);
    HELD.store(file_named_by("FAKE_READY_WHEN_FILE") == Some(false), Ordering::SeqCst);
    let fd: i32 = std::env::var("OMNI_API_LISTEN_FD").expect("OMNI_API_LISTEN_FD").parse().expect("fd number");
    // SAFETY: the gateway handed this listening socket (a Unix one) over as `fd`.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std_listener.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let ready_fd = std::env::var("OMNI_API_READY_FD").ok().and_then(|fd| fd.parse::<i32>().ok());
        let never_ready = std::env::var_os("FAKE_UNHEALTHY").is_some() || NEVER_READY.load(Ordering::Relaxed);
        if let (Some(fd), false) = (ready_fd, never_ready) {
            let delay = std::env::var("FAKE_READY_DELAY_MS").ok().and_then(|ms| ms.parse().ok()).unwrap_or(0);
            tokio::spawn(async move {
                while HELD.load(Ordering::SeqCst) {
                    if file_named_by("FAKE_READY_WHEN_FILE") == Some(true) {
                        HELD.store(false, Ordering::SeqCst);
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(delay)).await;
                ANNOUNCED.store(true, Ordering::SeqCst);
                // SAFETY: the gateway handed this pipe over as `fd`; dropping the file closes it.
                let _ = unsafe { std::fs::File::from_raw_fd(fd) }.write_all(b"\n");
            });
        }
        let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        loop {
            tokio::select! {
                Ok((stream, _)) = listener.accept() => {
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                            .with_upgrades()
                            .await;
                    });
                }
                _ = term.recv() => return,
            }
        }
    });
}
