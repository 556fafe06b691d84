//! `OMNI_HTTP_THREADS`: the port is served by that many threads, each with
//! its own event loop, connections and pool to the worker; a bad count
//! stops the start naming the variable.

use crate::gateway;

use gateway::{workdir, GatewayBuilder};
use omni_tests::{bin_path, Request, TempPostgres};

/// The names of the gateway's threads that serve HTTP, sorted.
fn http_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with("omni-http-"))
        .collect();
    names.sort();
    names
}

#[test]
fn http_threads_serve_the_port_as_configured() {
    let dir = workdir();
    let pg = TempPostgres::start_new();
    let gw = GatewayBuilder::new(dir.path())
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("DATABASE_URL", pg.url())
        .env("OMNI_HTTP_THREADS", "3")
        .start();
    assert_eq!(http_threads(gw.child.pid()), ["omni-http-0", "omni-http-1", "omni-http-2"], "{}", gw.log());
    // Slow requests at once, each on its own connection: every one is
    // answered, whichever thread accepted it.
    let port = gw.port;
    let clients: Vec<_> = (0..12).map(|_| std::thread::spawn(move || Request::get("/slow?ms=300").try_send(port))).collect();
    for client in clients {
        let answer = client.join().unwrap().expect("a slow request is answered");
        assert_eq!((answer.status, answer.text()), (200, "slow done".to_string()));
    }
    // The gateway's own endpoints and /health answer on these threads too
    // (/health asks the external PostgreSQL, on the main runtime).
    assert_eq!(gw.get("/health").status, 200, "{}", gw.log());
    let metrics = gw.get("/metrics").text();
    assert!(metrics.contains("omni_proxy_requests_total{class=\"2xx\"} 12"), "{metrics}");
}

#[test]
fn http_threads_refuses_a_count_it_cannot_use() {
    let dir = workdir();
    for bad in ["0", "257", "many"] {
        let (status, log) = GatewayBuilder::new(dir.path()).env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none").env("OMNI_HTTP_THREADS", bad).run_to_exit();
        assert_eq!(status.code(), Some(2), "{bad}: {log}");
        assert!(log.contains(&format!("OMNI_HTTP_THREADS=\"{bad}\"")) && log.contains("1 to 256"), "{bad}: the message names the variable and the range: {log}");
    }
}
