//! The sign-in limiter against a real worker and a real PostgreSQL, over
//! real HTTP: parallel guesses are counted, a success never washes an
//! address, a correct API key always works, and an overlong username is
//! refused before anything else.
//!
//! These tests speak to the worker directly and set `X-Omni-Client-Addr`
//! themselves, as the gateway does, to act as clients at several addresses
//! (tests/tests/ops_load_balancer.rs does the same through nginx and the
//! gateway from real distinct source addresses).

use omni_tests::{wait_until, Request, Response, TempPostgres, Worker, TEST_API_KEY};
use serde_json::json;
use std::time::Duration;

const ADMIN: (&str, &str) = ("admin", "correct horse battery");

fn me_with_key_from(worker: &Worker, address: &str, key: &str) -> Response {
    worker.request("GET", "/api/v1/auth/me").header("x-omni-client-addr", address).header("x-api-key", key).send()
}

/// Sends `attempt(i)` (every 20 ms) until the answer is a 429 whose
/// `Retry-After` is at least `seconds`: each failure past the free ones
/// doubles the block, and a refused attempt adds nothing, so this waits
/// out short blocks. Returns how many 401s came before the first 429.
fn failures_until_blocked(seconds: u64, mut attempt: impl FnMut(usize) -> Response) -> usize {
    let (mut wrong, mut refused, mut i) = (0, false, 0);
    wait_until(Duration::from_secs(60), &format!("a block of {seconds} s"), || {
        i += 1;
        let r = attempt(i);
        match r.status {
            401 if !refused => wrong += 1,
            401 => {}
            429 => {
                refused = true;
                let retry = r.header("retry-after").and_then(|v| v.parse::<u64>().ok()).expect("a 429 has Retry-After");
                if retry >= seconds {
                    return Some(());
                }
            }
            other => panic!("attempt {i}: {other} {}", r.text()),
        }
        None
    });
    wrong
}

fn worker_with_admin() -> (TempPostgres, Worker) {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    // The worker has OMNI_API_KEY, so it counts as set up: the operator makes accounts with the key.
    let created = worker
        .request("POST", "/api/v1/accounts")
        .header("x-api-key", TEST_API_KEY)
        .json(&json!({"username": ADMIN.0, "password": ADMIN.1, "role": "admin"}))
        .send();
    assert_eq!(created.status, 201, "{}", created.text());
    (pg, worker)
}

#[test]
fn a_parallel_burst_counts_every_guess_and_a_correct_api_key_is_never_refused() {
    let (_pg, worker) = worker_with_admin();
    let attacker = "203.0.113.50";
    let burst = 40;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(burst));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..burst)
            .map(|i| {
                let (worker, barrier) = (&worker, barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    worker.login_from(attacker, ADMIN.0, &format!("guess {i}")).status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wrong = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(wrong + refused, burst, "only 401 and 429: {statuses:?}");
    // 10 free failures, the 11th is checked and blocks (for 1 s, then 2 s
    // after a 12th, should the burst still be arriving then): every other
    // guess of the burst is refused without a look at its password.
    assert!(wrong <= 12, "{wrong} of {burst} parallel guesses were checked: {statuses:?}");

    // The address is blocked (for 8 s or more now) for passwords...
    failures_until_blocked(8, |i| worker.login_from(attacker, ADMIN.0, &format!("more {i}")));
    assert_eq!(worker.login_from(attacker, ADMIN.0, ADMIN.1).status, 429);
    // ...a wrong key is still just wrong on a protected route...
    let wrong_key = me_with_key_from(&worker, attacker, "not-the-key");
    assert_eq!(wrong_key.status, 401, "{}", wrong_key.text());
    // ...but the correct API key works from it, as a header and as a sign-in.
    for _ in 0..20 {
        let me = me_with_key_from(&worker, attacker, TEST_API_KEY);
        assert_eq!(me.status, 200, "{}", me.text());
    }
    let key_login = worker.request("POST", "/api/v1/auth/login").header("x-omni-client-addr", attacker).json(&json!({"api_key": TEST_API_KEY})).send();
    assert_eq!(key_login.status, 200, "{}", key_login.text());
    // And the admin, from elsewhere, signs in at once.
    assert_eq!(worker.login_from("198.51.100.20", ADMIN.0, ADMIN.1).status, 200);
}

#[test]
fn a_success_never_clears_the_failures_of_its_address() {
    let (_pg, worker) = worker_with_admin();
    let made = worker.request("POST", "/api/v1/accounts").api_key().json(&json!({"username": "mallory", "password": "mallory's own password", "role": "user"})).send();
    assert_eq!(made.status, 201, "{}", made.text());
    let address = "203.0.113.60";
    for i in 0..10 {
        assert_eq!(worker.login_from(address, ADMIN.0, &format!("guess {i}")).status, 401, "guess {i}");
        // A valid low-privilege sign-in between guesses refunds only itself.
        assert_eq!(worker.login_from(address, "mallory", "mallory's own password").status, 200, "after guess {i}");
    }
    // The 10 failures all stand: the 11th is checked and blocks.
    let wrong = failures_until_blocked(4, |i| worker.login_from(address, ADMIN.0, &format!("guess {}", 10 + i)));
    assert!(wrong <= 2, "{wrong} more failures before a block: the successes washed the address");
    let blocked = worker.login_from(address, "mallory", "mallory's own password");
    assert_eq!(blocked.status, 429, "the address is blocked for everyone at it: {}", blocked.text());
    // IPv6 addresses of one /64 share their count.
    let wrong = failures_until_blocked(4, |i| worker.login_from(&format!("2001:db8:5:6::{:x}", i), "nobody", "wrong"));
    assert!((11..=13).contains(&wrong), "{wrong} failures from one /64 before a block");
    assert_eq!(worker.login_from("2001:db8:5:6:ffff::1", ADMIN.0, ADMIN.1).status, 429);
    assert_eq!(worker.login_from("2001:db8:5:7::1", ADMIN.0, ADMIN.1).status, 200, "the next /64 is another client");
}

#[test]
fn an_overlong_username_is_refused_before_anything_and_never_logged() {
    let (_pg, worker) = worker_with_admin();
    let long = "x".repeat(100_000);
    for name in [long.as_str(), &"y".repeat(65)] {
        let r = worker.login_from("203.0.113.70", name, "whatever");
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["code"], "invalid_username");
    }
    // Refused names cost no limiter budget: the address still has all of it.
    for i in 0..10 {
        assert_eq!(worker.login_from("203.0.113.70", "nobody\nforged line", &format!("{i}")).status, 401);
    }
    let log = wait_until(Duration::from_secs(10), "the failed sign-ins in the worker's log", || {
        let log = worker.log();
        (log.matches("failed sign-in").count() >= 10).then_some(log)
    });
    assert!(!log.contains(&"x".repeat(65)) && !log.contains(&"y".repeat(65)), "an overlong name reached the log");
    assert!(!log.contains("nobody\nforged line"), "a raw newline from a username reached the log");
    // The OpenAPI document states the bounds and the 429.
    let doc = Request::get("/api/v1/openapi.json").send_to(worker.port).json();
    let login = &doc["paths"]["/api/v1/auth/login"]["post"]["responses"];
    assert!(login["400"].is_object() && login["429"].is_object(), "{login}");
}
