//! Preferences API (SPEC §6): shapes, per-session isolation, limits, and
//! concurrent upserts, against a real worker and a real PostgreSQL.

use std::time::Duration;

use omni_tests::{wait_until, Request, TempPostgres, Worker};
use serde_json::json;

fn new_session() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn put(worker: &Worker, session: &str, key: &str, value: &str) -> omni_tests::Response {
    worker.request("POST", "/api/v1/preferences").session(session).json(&json!({"key": key, "value": value})).send()
}

#[test]
fn preferences_round_trip_in_the_documented_shapes() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = new_session();

    let stored = put(&worker, &session, "theme", "dark");
    assert_eq!(stored.status, 200, "{}", stored.text());
    assert_eq!(stored.json(), json!({"key": "theme", "value": "dark"}));

    let replaced = put(&worker, &session, "theme", "light");
    assert_eq!(replaced.json(), json!({"key": "theme", "value": "light"}));
    put(&worker, &session, "api.key:v1", "abc");

    let one = worker.request("GET", "/api/v1/preferences/theme").session(&session).send();
    assert_eq!((one.status, one.json()), (200, json!({"key": "theme", "value": "light"})));

    let all = worker.request("GET", "/api/v1/preferences").session(&session).send();
    assert_eq!(
        (all.status, all.json()),
        (200, json!([{"key": "api.key:v1", "value": "abc"}, {"key": "theme", "value": "light"}]))
    );

    let deleted = worker.request("DELETE", "/api/v1/preferences/theme").session(&session).send();
    assert_eq!((deleted.status, deleted.json()), (200, json!({"success": true})));

    let gone = worker.request("GET", "/api/v1/preferences/theme").session(&session).send();
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["code"], "preference_not_found");
    let deleted_again = worker.request("DELETE", "/api/v1/preferences/theme").session(&session).send();
    assert_eq!(deleted_again.status, 404);

    let empty = worker.request("GET", "/api/v1/preferences").session(&new_session()).send();
    assert_eq!((empty.status, empty.json()), (200, json!([])));
}

#[test]
fn one_session_can_neither_read_list_nor_delete_another_sessions_keys() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let (a, b) = (new_session(), new_session());
    assert_eq!(put(&worker, &a, "secret", "from-a").status, 200);

    assert_eq!(worker.request("GET", "/api/v1/preferences/secret").session(&b).send().status, 404);
    assert_eq!(worker.request("GET", "/api/v1/preferences").session(&b).send().json(), json!([]));
    assert_eq!(worker.request("DELETE", "/api/v1/preferences/secret").session(&b).send().status, 404);

    // B writing the same key creates B's own row and leaves A's alone.
    assert_eq!(put(&worker, &b, "secret", "from-b").status, 200);
    let a_value = worker.request("GET", "/api/v1/preferences/secret").session(&a).send().json();
    assert_eq!(a_value, json!({"key": "secret", "value": "from-a"}));
    let rows: i64 = pg.client().query_one("SELECT count(*) FROM omni_user_preferences", &[]).unwrap().get(0);
    assert_eq!(rows, 2);
}

#[test]
fn session_id_must_be_a_uuid() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    for (session, code) in [(None, "missing_session_id"), (Some("not-a-uuid"), "invalid_session_id"), (Some(""), "invalid_session_id"), (Some("1' OR '1'='1"), "invalid_session_id")] {
        let mut request = worker.request("GET", "/api/v1/preferences");
        if let Some(session) = session {
            request = request.session(session);
        }
        let response = request.send();
        assert_eq!(response.status, 400, "{session:?}");
        assert_eq!(response.json()["code"], code, "{session:?}");
    }
}

#[test]
fn keys_and_values_are_limited() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = new_session();

    let longest_key = "k".repeat(100);
    assert_eq!(put(&worker, &session, &longest_key, "v").status, 200);
    let largest_value = "v".repeat(64 * 1024);
    assert_eq!(put(&worker, &session, "big", &largest_value).status, 200);
    assert_eq!(worker.request("GET", "/api/v1/preferences/big").session(&session).send().json()["value"], largest_value);

    for (key, value, code) in [
        ("k".repeat(101), "v".to_owned(), "invalid_key"),
        (String::new(), "v".to_owned(), "invalid_key"),
        ("has space".to_owned(), "v".to_owned(), "invalid_key"),
        ("slash/key".to_owned(), "v".to_owned(), "invalid_key"),
        ("ok".to_owned(), "v".repeat(64 * 1024 + 1), "value_too_long"),
        ("ok".to_owned(), "nul\0byte".to_owned(), "invalid_value"),
    ] {
        let response = put(&worker, &session, &key, &value);
        assert_eq!(response.status, 400, "key {key:?}");
        assert_eq!(response.json()["code"], code, "key {key:?}");
    }
    let count: i64 = pg.client().query_one("SELECT count(*) FROM omni_user_preferences", &[]).unwrap().get(0);
    assert_eq!(count, 2, "only the two valid preferences are stored");
}

#[test]
fn fifty_concurrent_upserts_of_one_key_leave_one_row() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = new_session();
    let port = worker.port;

    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let session = session.clone();
                scope.spawn(move || {
                    Request::new("POST", "/api/v1/preferences")
                        .port(port)
                        .session(&session)
                        .json(&json!({"key": "race", "value": format!("writer-{i}")}))
                        .send()
                        .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let rows = pg
        .client()
        .query("SELECT value FROM omni_user_preferences WHERE session_id = $1::text::uuid AND key = 'race'", &[&session])
        .unwrap();
    assert_eq!(rows.len(), 1);
    let value: String = rows[0].get(0);
    assert!(value.starts_with("writer-"), "{value}");
}

fn anonymous_rows(pg: &TempPostgres) -> i64 {
    pg.client().query_one("SELECT count(*) FROM omni_user_preferences WHERE session_id IS NOT NULL", &[]).unwrap().get(0)
}

#[test]
fn a_session_keeps_at_most_100_keys_and_the_101st_is_refused_with_413() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = new_session();
    for i in 0..100 {
        let stored = put(&worker, &session, &format!("k{i}"), "v");
        assert_eq!(stored.status, 200, "key {i}: {}", stored.text());
    }
    let refused = put(&worker, &session, "one-too-many", "v");
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.json()["code"], "too_many_preferences");
    let detail = refused.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("100") && detail.contains("nothing was stored") && detail.contains("Delete one"), "{detail}");
    let missing = worker.request("GET", "/api/v1/preferences/one-too-many").session(&session).send();
    assert_eq!(missing.status, 404, "nothing stored beyond the limit");
    assert_eq!(anonymous_rows(&pg), 100);

    // Overwriting within the limit works; a delete makes room; others are unaffected.
    assert_eq!(put(&worker, &session, "k0", "changed").status, 200);
    assert_eq!(put(&worker, &new_session(), "theme", "dark").status, 200);
    assert_eq!(worker.request("DELETE", "/api/v1/preferences/k1").session(&session).send().status, 200);
    assert_eq!(put(&worker, &session, "one-too-many", "v").status, 200);
    assert_eq!(put(&worker, &session, "and-another", "v").status, 413);
}

#[test]
fn anonymous_preferences_in_all_are_bounded_in_rows_and_bytes() {
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let mut client = pg.client();

    // 100 000 rows in all (written directly: the limit is on the total, whoever wrote them).
    client
        .batch_execute(
            "INSERT INTO omni_user_preferences (session_id, key, value)
             SELECT gen_random_uuid(), 'k', 'v' FROM generate_series(1, 99999)",
        )
        .unwrap();
    assert_eq!(put(&worker, &new_session(), "theme", "dark").status, 200, "the 100 000th row fits");
    let refused = put(&worker, &new_session(), "theme", "dark");
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.json()["code"], "preference_storage_full");
    let detail = refused.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("100000 rows") && detail.contains("64 MiB") && detail.contains("nothing was stored"), "{detail}");
    assert_eq!(anonymous_rows(&pg), 100_000);

    // 64 MiB of keys and values in all.
    client.batch_execute("DELETE FROM omni_user_preferences").unwrap();
    client
        .batch_execute(
            "INSERT INTO omni_user_preferences (session_id, key, value)
             SELECT gen_random_uuid(), 'big', repeat('x', 1024 * 1024 - 3) FROM generate_series(1, 63)",
        )
        .unwrap();
    let session = new_session();
    let nearly_a_mib = "y".repeat(65536);
    let mut stored = 0;
    let refused = loop {
        let response = put(&worker, &session, &format!("k{stored}"), &nearly_a_mib);
        if response.status != 200 {
            break response;
        }
        stored += 1;
        assert!(stored <= 16, "64 MiB should be reached after at most 16 more values of 64 KiB");
    };
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.json()["code"], "preference_storage_full");
    let bytes: i64 = client
        .query_one("SELECT sum(octet_length(key) + octet_length(value))::bigint FROM omni_user_preferences WHERE session_id IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert!(bytes <= 64 * 1024 * 1024, "{bytes} bytes stored");
    // Overwriting a key with a shorter value still works when full.
    assert_eq!(put(&worker, &session, "k0", "short").status, 200);
}

/// Anonymous writers that may grow storage queue on one advisory lock, held
/// through their commit; an overwrite that grows nothing must not queue
/// behind them (it would wait for every other writer's WAL flush).
#[test]
fn an_overwrite_that_grows_nothing_does_not_wait_for_the_anonymous_writers_lock() {
    const ANONYMOUS_LOCK_KEY: i64 = 0x6f6d_6e69_616e_6f6e;
    let pg = TempPostgres::start_new();
    let worker = std::sync::Arc::new(Worker::start(&pg));
    let session = new_session();
    assert_eq!(put(&worker, &session, "theme", "light").status, 200);

    // Another writer holds the lock, inside its transaction.
    let mut holder = pg.client();
    let mut tx = holder.transaction().unwrap();
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ANONYMOUS_LOCK_KEY]).unwrap();

    let started = std::time::Instant::now();
    let same_size = std::thread::spawn({
        let (worker, session) = (worker.clone(), session.clone());
        move || put(&worker, &session, "theme", "dark!").status
    });
    wait_until(Duration::from_secs(5), "the same-size overwrite to answer while the lock is held", || same_size.is_finished().then_some(()));
    assert_eq!(same_size.join().unwrap(), 200, "answered in {:?}", started.elapsed());

    // A longer value may grow anonymous storage: it waits for the lock.
    let longer = std::thread::spawn({
        let (worker, session) = (worker.clone(), session.clone());
        move || put(&worker, &session, "theme", "a longer value").status
    });
    let mut watcher = pg.client();
    wait_until(Duration::from_secs(5), "the longer overwrite to wait on the advisory lock", || {
        let waiting: i64 = watcher.query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted", &[]).unwrap().get(0);
        (waiting == 1).then_some(())
    });
    assert!(!longer.is_finished(), "the longer overwrite answered while the lock was held");
    tx.commit().unwrap();
    assert_eq!(longer.join().unwrap(), 200);
    let value = worker.request("GET", "/api/v1/preferences/theme").session(&session).send().json();
    assert_eq!(value["value"], "a longer value");
}

/// Concurrent overwrites of existing keys are written together: they take
/// far fewer transactions (each a WAL flush) than requests, every request
/// is answered 200 after its write, and each key ends with a value one of
/// its writers sent.
#[test]
fn concurrent_overwrites_share_transactions_and_each_is_stored() {
    const WRITERS: usize = 32;
    const WRITES: usize = 30;
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let session = new_session();
    for k in 0..20 {
        assert_eq!(put(&worker, &session, &format!("k{k}"), "value-000-00").status, 200);
    }
    let mut client = pg.client();
    let xid = |client: &mut postgres::Client| -> i64 { client.query_one("SELECT txid_current()", &[]).unwrap().get(0) };
    let before = xid(&mut client);
    let port = worker.port;
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let session = session.clone();
                scope.spawn(move || {
                    (0..WRITES)
                        .filter_map(|i| {
                            let response = Request::new("POST", "/api/v1/preferences")
                                .port(port)
                                .session(&session)
                                .json(&json!({"key": format!("k{}", (w + i) % 20), "value": format!("value-{w:03}-{i:02}")}))
                                .send();
                            (response.status != 200 || response.json()["value"] != format!("value-{w:03}-{i:02}"))
                                .then(|| format!("{} {}", response.status, response.text()))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{failures:?}");
    let transactions = xid(&mut client) - before - 1;
    let requests = (WRITERS * WRITES) as i64;
    assert!(transactions * 2 <= requests, "{requests} overwrites took {transactions} transactions");
    let rows = client
        .query("SELECT key, value FROM omni_user_preferences WHERE session_id = $1::text::uuid", &[&session])
        .unwrap();
    assert_eq!(rows.len(), 20);
    for row in rows {
        let (key, value): (String, String) = (row.get(0), row.get(1));
        let k: usize = key[1..].parse().unwrap();
        let (w, i): (usize, usize) = (value[6..9].parse().unwrap(), value[10..12].parse().unwrap());
        assert_eq!((w + i) % 20, k, "{key} holds {value}, which was written to another key");
    }
    eprintln!("{requests} concurrent overwrites took {transactions} transactions");
}

/// Concurrent reads (which the worker answers together) each get their own
/// key's value, or 404 for a key their session does not have.
#[test]
fn concurrent_reads_each_get_their_own_keys_value_or_404() {
    const READERS: usize = 32;
    const READS: usize = 30;
    let pg = TempPostgres::start_new();
    let worker = Worker::start(&pg);
    let sessions: Vec<String> = (0..4).map(|_| new_session()).collect();
    for (s, session) in sessions.iter().enumerate() {
        for k in 0..10 {
            assert_eq!(put(&worker, session, &format!("k{k}"), &format!("s{s}-k{k}")).status, 200);
        }
    }
    let port = worker.port;
    let wrong: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..READERS)
            .map(|r| {
                let sessions = &sessions;
                scope.spawn(move || {
                    (0..READS)
                        .filter_map(|i| {
                            let (s, k) = ((r + i) % 4, (r * 7 + i) % 12);
                            let response = Request::new("GET", &format!("/api/v1/preferences/k{k}")).port(port).session(&sessions[s]).send();
                            let right = match k {
                                0..=9 => response.status == 200 && response.json()["value"] == format!("s{s}-k{k}"),
                                _ => response.status == 404 && response.json()["code"] == "preference_not_found",
                            };
                            (!right).then(|| format!("session {s} k{k}: {} {}", response.status, response.text()))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(wrong.is_empty(), "{wrong:?}");
}
