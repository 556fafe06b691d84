//! The worker as a process: PostgreSQL restarts under it, concurrent starts,
//! refused migrations, configuration errors, the inherited socket, shutdown.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use omni_tests::{wait_until, TempPostgres, Worker, WorkerBuilder};
use serde_json::json;

#[test]
fn answers_503_while_postgres_restarts_then_recovers_in_the_same_process() {
    let mut pg = TempPostgres::start_new();
    let mut worker = Worker::start(&pg);
    let pid = worker.child.pid();
    let session = uuid::Uuid::new_v4().to_string();
    let put = |worker: &Worker, value: &str| {
        worker.request("POST", "/api/v1/preferences").session(&session).json(&json!({"key": "theme", "value": value})).send()
    };
    assert_eq!(put(&worker, "dark").status, 200);

    pg.stop();
    for (path, expected) in [
        ("/api/v1/health", json!({"status": "degraded", "database": "unavailable"})),
        ("/api/v1/preferences", json!({"code": "database_unavailable", "detail": "the database is not reachable right now; retry shortly"})),
    ] {
        let started = Instant::now();
        let response = worker.request("GET", path).session(&session).send();
        assert!(started.elapsed() < Duration::from_secs(3), "{path} took {:?}; must fail fast", started.elapsed());
        // `leader` (several gateways, issue 16) is checked where it matters: ops_load_balancer.rs.
        let mut body = response.json();
        body.as_object_mut().map(|o| o.remove("leader"));
        assert_eq!((response.status, body), (503, expected), "{path}");
    }
    assert_eq!(put(&worker, "light").json()["code"], "database_unavailable");

    pg.start();
    wait_until(Duration::from_secs(15), "health to recover", || {
        (worker.request("GET", "/api/v1/health").send().status == 200).then_some(())
    });
    assert_eq!(put(&worker, "light").status, 200);
    let value = worker.request("GET", "/api/v1/preferences/theme").session(&session).send().json();
    assert_eq!(value["value"], "light");
    assert!(worker.child.try_status().is_none(), "the worker kept running");
    assert_eq!(worker.child.pid(), pid);
}

#[test]
fn two_workers_starting_together_apply_each_migration_once() {
    let pg = TempPostgres::start_new();
    // No OMNI_API_KEY: they also race to generate the key, and must agree.
    let mut first = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").spawn();
    let mut second = WorkerBuilder::new(&pg.url()).without_env("OMNI_API_KEY").spawn();
    first.wait_healthy();
    second.wait_healthy();

    let rows = pg.client().query("SELECT version, name FROM omni_schema_migrations ORDER BY version", &[]).unwrap();
    let applied: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // Every file of migrations/, once each, in order.
    let mut files: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let expected: Vec<(i32, String)> = files.iter().map(|f| (f[..4].parse().unwrap(), f.clone())).collect();
    assert!(expected.len() >= 3, "{expected:?}");
    assert_eq!(applied, expected);
    // The key is kept as a digest: only the worker that generated it can show
    // it, once; the other must accept it all the same.
    let key = |w: &Worker| w.request("GET", "/api/v1/setup/api-key").send().json()["api_key"].as_str().map(str::to_owned);
    let shown: Vec<String> = [key(&first), key(&second)].into_iter().flatten().collect();
    assert_eq!(shown.len(), 1, "exactly one worker generated (and shows) the key: {shown:?}");
    for w in [&first, &second] {
        let me = w.request("GET", "/api/v1/auth/me").header("x-api-key", &shown[0]).send();
        assert_eq!(me.status, 200, "both workers accept the one key: {}", me.text());
    }
    let applied_by = [first.log(), second.log()].iter().filter(|log| log.contains("applied migrations")).count();
    assert_eq!(applied_by, 1, "exactly one worker applied the migrations");
}

#[test]
fn refuses_to_start_when_an_applied_migration_changed() {
    let pg = TempPostgres::start_new();
    drop(Worker::start(&pg));
    pg.client().execute("UPDATE omni_schema_migrations SET checksum = 'edited' WHERE version = 1", &[]).unwrap();

    let mut worker = WorkerBuilder::new(&pg.url()).spawn();
    let status = worker.child.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = worker.log();
    assert!(log.contains("migration 0001_initial.sql was changed after it was applied"), "{log}");
}

#[test]
fn bad_configuration_stops_with_the_variable_named() {
    let pg = TempPostgres::start_new();
    for (variable, value) in [("DATABASE_URL", ""), ("OMNI_API_LISTEN", "nowhere"), ("LOG_FORMAT", "xml"), ("OMNI_API_LISTEN_FD", "9")] {
        let mut worker = WorkerBuilder::new(&pg.url()).env(variable, value).spawn();
        let status = worker.child.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{variable}={value:?} must stop the worker");
        assert!(worker.log().contains(variable), "{variable}: {}", worker.log());
    }
}

#[test]
fn serves_on_a_socket_inherited_from_the_gateway() {
    let pg = TempPostgres::start_new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let worker = WorkerBuilder::new(&pg.url()).inherit_listener(listener).start();
    assert_eq!(worker.port, port);
    let mut health = worker.request("GET", "/api/v1/health").send().json();
    assert!(health["leader"].is_boolean(), "{health}");
    health.as_object_mut().map(|o| o.remove("leader"));
    assert_eq!(health, json!({"status": "ok", "database": "ok"}));
}

#[test]
fn exits_zero_on_sigterm() {
    let pg = TempPostgres::start_new();
    let mut worker = Worker::start(&pg);
    worker.child.signal_group(libc::SIGTERM);
    let status = worker.child.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(worker.log().contains("shutting down"), "{}", worker.log());
}

/// A stop while the leader lease's renewal waits on the database: the
/// worker lets it be answered and ends its session before it exits, so
/// PostgreSQL never writes an answer to a client that is gone (which it
/// logs as a lost or reset client connection).
#[test]
fn a_stop_during_a_lease_renewal_waits_for_its_answer_and_ends_the_session() {
    let pg = TempPostgres::start_new();
    let mut worker = Worker::start(&pg);
    let mut admin = pg.client();
    wait_until(Duration::from_secs(30), "the worker to lead", || {
        admin.query_one("SELECT count(*) FROM omni_leader_lease WHERE expires_at > now()", &[]).unwrap().get::<_, i64>(0).eq(&1).then_some(())
    });
    // The next renewal waits behind this lock.
    let mut holder = pg.client();
    let mut lock = holder.transaction().unwrap();
    lock.batch_execute("LOCK TABLE omni_leader_lease IN EXCLUSIVE MODE").unwrap();
    wait_until(Duration::from_secs(10), "a renewal to wait on the lock", || {
        let waiting: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'omni-leader' AND wait_event_type = 'Lock'", &[])
            .unwrap()
            .get(0);
        (waiting == 1).then_some(())
    });
    worker.child.signal_group(libc::SIGTERM);
    wait_until(Duration::from_secs(10), "the worker to begin its stop", || worker.log().contains("shutting down").then_some(()));
    assert!(worker.child.try_status().is_none(), "the worker waits for the renewal's answer before it exits:\n{}", worker.log());
    lock.commit().unwrap();
    let status = worker.child.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", worker.log());
    wait_until(Duration::from_secs(10), "the leader's session to be gone", || {
        admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'omni-leader'", &[]).unwrap().get::<_, i64>(0).eq(&0).then_some(())
    });
    let log = pg.log();
    for lost in ["could not send data to client", "connection to client lost", "could not receive data from client", "unexpected EOF on client connection"] {
        assert!(!log.contains(lost), "PostgreSQL logged {lost:?}:\n{log}");
    }
}
