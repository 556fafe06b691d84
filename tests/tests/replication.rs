//! The replication relay (issue 11, SPEC §8): the real gateway replicates
//! its embedded cluster into a second PostgreSQL cluster the test starts on
//! another port (and one of another major version). Every check compares
//! table contents, row by row, never counts alone.

use crate::gateway;
use crate::kit;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kit::{connect, embedded_url, target_database, wait_identical, wait_identical_db};
use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{pg17_bin_dir, wait_until, Request, TempPostgres, TEST_API_KEY};
use serde_json::json;

fn replicating_gateway(dir: &std::path::Path, target_url: &str) -> Gateway {
    let gw = GatewayBuilder::new(dir).env("PGSERVE_REPLICATION_URL", target_url).start();
    gw.wait_component("replication", "the relay to stream", Duration::from_secs(60), |c| c["state"] == "ready");
    gw
}

fn put_preference(gw: &Gateway, session: &str, key: &str, value: &str) {
    let r = Request::new("POST", "/api/v1/preferences").port(gw.port).session(session).json(&json!({"key": key, "value": value})).send();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Writes rows as fast as one connection can into a table with a key and
/// one without, counting acknowledged commits, until stopped.
struct WriteLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteLoad {
    fn start(url: String) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut n: i64 = 0;
            let mut client: Option<postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = postgres::Client::connect(&url, postgres::NoTls).ok();
                    if client.is_none() {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
                let c = client.as_mut().unwrap();
                let sql = format!(
                    "BEGIN; INSERT INTO load_keyed (n, v) VALUES ({n}, 'v{n}') ON CONFLICT (n) DO NOTHING; \
                     INSERT INTO load_log (n) SELECT {n} WHERE NOT EXISTS (SELECT 1 FROM load_log WHERE n = {n}); \
                     UPDATE load_keyed SET v = v || '+' WHERE n = {n} - 5; DELETE FROM load_keyed WHERE n = {n} - 50 AND n % 7 = 0; COMMIT"
                );
                match c.batch_execute(&sql) {
                    Ok(()) => {
                        n += 1;
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => client = None,
                }
            }
        });
        WriteLoad { stop, acked, thread: Some(thread) }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn wait_for(&self, more: u64) {
        let start = self.acked();
        wait_until(Duration::from_secs(60), "the write load to make progress", || (self.acked() >= start + more).then_some(()));
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.acked()
    }
}

impl Drop for WriteLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn create_load_tables(gw: &Gateway) {
    gw.db()
        .batch_execute("CREATE TABLE IF NOT EXISTS load_keyed (n bigint PRIMARY KEY, v text); CREATE TABLE IF NOT EXISTS load_log (n bigint, at timestamptz DEFAULT now())")
        .unwrap();
}

/// `load_log` has no key: a transaction applied twice would show as a
/// duplicate row, one lost as a gap.
fn assert_no_gap_no_duplicate(tables: &BTreeMap<String, String>, acked: u64) {
    let log = &tables["public.load_log"];
    let mut ns: Vec<i64> = log.lines().map(|l| l.trim_start_matches('(').split(',').next().unwrap().parse().unwrap()).collect();
    ns.sort_unstable();
    let len = ns.len() as u64;
    ns.dedup();
    assert_eq!(ns.len() as u64, len, "a row of load_log arrived twice");
    assert!(len >= acked, "{len} rows on the target, {acked} commits acknowledged");
    assert!(ns.iter().enumerate().all(|(i, n)| *n == i as i64), "load_log has a gap");
}

#[test]
fn existing_rows_and_streamed_changes_with_schema_changes_arrive_identical() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    // Data from before replication was switched on.
    {
        let mut gw = GatewayBuilder::new(dir.path()).start();
        gw.db()
            .batch_execute(
                "CREATE TABLE existing (id serial PRIMARY KEY, note text, tags text[], doc jsonb, at timestamptz DEFAULT now());
                 INSERT INTO existing (note, tags, doc) SELECT 'row ' || i || ' it''s \"quoted\"', ARRAY['a', 'b,c'], jsonb_build_object('i', i) FROM generate_series(1, 500) i;
                 CREATE TABLE no_key (a int, b text); INSERT INTO no_key VALUES (1, 'x'), (1, 'x'), (2, NULL);",
            )
            .unwrap();
        put_preference(&gw, "11111111-1111-4111-8111-111111111111", "theme", "dark");
        assert!(gw.terminate().success());
    }
    let gw = replicating_gateway(dir.path(), &target_url);
    wait_identical(&gw, &target_url, Duration::from_secs(30));

    // Streaming: preferences through the API, and schema changes in order with their rows.
    let session = "22222222-2222-4222-8222-222222222222";
    for i in 0..50 {
        put_preference(&gw, session, &format!("k{i}"), &format!("value {i}"));
    }
    let mut db = gw.db();
    db.batch_execute(
        "CREATE TABLE later (id bigserial PRIMARY KEY, v text);
         INSERT INTO later (v) SELECT 'v' || i FROM generate_series(1, 100) i;",
    )
    .unwrap();
    db.batch_execute("ALTER TABLE later ADD COLUMN extra int DEFAULT 7").unwrap();
    db.batch_execute("UPDATE later SET extra = id * 2 WHERE id % 3 = 0").unwrap();
    db.batch_execute("ALTER TABLE later RENAME COLUMN v TO label").unwrap();
    db.batch_execute("UPDATE later SET label = label || '!' WHERE id < 10").unwrap();
    db.batch_execute("ALTER TABLE existing DROP COLUMN tags").unwrap();
    db.batch_execute("UPDATE existing SET note = 'changed' WHERE id <= 20; DELETE FROM existing WHERE id > 490").unwrap();
    db.batch_execute("UPDATE no_key SET b = 'y' WHERE a = 2; DELETE FROM no_key WHERE ctid = (SELECT min(ctid) FROM no_key WHERE a = 1)").unwrap();
    db.batch_execute("CREATE TABLE doomed (id int PRIMARY KEY); INSERT INTO doomed VALUES (1), (2)").unwrap();
    db.batch_execute("CREATE TABLE emptied (id int PRIMARY KEY); INSERT INTO emptied SELECT generate_series(1, 10)").unwrap();
    db.batch_execute("ALTER TABLE later RENAME TO renamed_later").unwrap();
    db.batch_execute("DROP TABLE doomed").unwrap();
    db.batch_execute("TRUNCATE emptied").unwrap();
    db.batch_execute("INSERT INTO emptied VALUES (42)").unwrap();
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(2) + Duration::from_secs(10));
    assert!(tables.contains_key("public.renamed_later") && !tables.contains_key("public.later") && !tables.contains_key("public.doomed"), "{:?}", tables.keys());
    assert_eq!(tables["public.emptied"], "(42)");
    assert!(tables["public.omni_user_preferences"].contains("value 49"));

    // Sequences end at least as far as the source's (carried every 2 s).
    let mut t = connect(&target_url);
    wait_until(Duration::from_secs(10), "the target's sequence to pass the source's rows", || {
        let last: i64 = t.query_one("SELECT last_value FROM later_id_seq", &[]).unwrap().get(0);
        (last >= 100).then_some(())
    });

    let status = gw.component("replication");
    assert_eq!(status["state"], "ready");
    assert!(status["target"].as_str().unwrap().ends_with("/replica"), "{status}");
    assert!(status["applied_transactions"].as_u64().unwrap() >= 60, "{status}");
    let metrics = gw.get("/metrics").text();
    assert!(metrics.contains("omni_replication_applied_transactions_total") && metrics.contains("omni_replication_lag_bytes"), "{metrics}");
}

/// Starts a replicating gateway and a write load, lets `crash` happen
/// mid-stream (it returns the gateway to check afterwards), then checks
/// that the target ends identical, with every acknowledged write once.
fn survives(target: &mut TempPostgres, crash: impl FnOnce(Gateway, &mut TempPostgres, &str, &WriteLoad) -> Gateway) {
    let target_url = target_database(target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    create_load_tables(&gw);
    let load = WriteLoad::start(embedded_url(&gw));
    load.wait_for(300);
    let gw = crash(gw, target, &target_url, &load);
    let acked = load.finish();
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(60));
    assert_no_gap_no_duplicate(&tables, acked);
    assert!(acked >= 300, "{acked}");
}

#[test]
fn kill_9_of_the_gateway_mid_stream_then_a_restart_loses_and_doubles_nothing() {
    let mut target = TempPostgres::start_new();
    survives(&mut target, |mut gw, _, target_url, load| {
        gw.child.kill9();
        let _ = gw.child.wait_exit(Duration::from_secs(10));
        // Its PostgreSQL dies with it (parent-death signal); the restart waits for that.
        wait_until(Duration::from_secs(30), "the old cluster's processes to exit", || gateway::postgres_pids_on(&gw.data_dir()).is_empty().then_some(()));
        let restarted = replicating_gateway(&gw.cwd, target_url);
        drop(gw);
        // The load reconnects to the restarted cluster, on its new port.
        let more = WriteLoad::start(embedded_url(&restarted));
        more.wait_for(0);
        drop(more);
        let _ = load;
        restarted
    });
}

#[test]
fn kill_9_of_the_embedded_postgres_mid_stream_loses_and_doubles_nothing() {
    let mut target = TempPostgres::start_new();
    survives(&mut target, |gw, _, _, load| {
        let pid = gw.pid_of("postgres").expect("postgres pid");
        // SAFETY: signalling the embedded postmaster of the gateway we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        gw.wait_component("postgres", "PostgreSQL to be restarted", Duration::from_secs(60), |c| c["state"] == "ready" && c["pid"] != pid);
        gw.wait_component("replication", "the relay to stream again", Duration::from_secs(60), |c| c["state"] == "ready");
        load.wait_for(200);
        gw
    });
}

#[test]
fn target_killed_and_down_for_30_s_under_writes_shows_backoff_and_catches_up() {
    let mut target = TempPostgres::start_new();
    survives(&mut target, |gw, target, _, load| {
        target.kill9();
        let backoff = gw.wait_component("replication", "the relay to show backoff", Duration::from_secs(30), |c| c["state"] == "backoff");
        assert!(backoff["detail"].as_str().is_some_and(|d| d.contains("target")), "the reason is shown: {backoff}");
        assert!(!backoff.to_string().contains("postgres@"), "no credentials in the status: {backoff}");
        std::thread::sleep(Duration::from_secs(30));
        // Replication is not on the request path: /health stays 200 meanwhile.
        assert_eq!(gw.get("/health").status, 200);
        let held = gw.component("replication")["lag_bytes"].as_u64().unwrap();
        assert!(held > 0, "WAL is held for the target while it is down");
        load.wait_for(100);
        target.start();
        gw.wait_component("replication", "the relay to stream again", Duration::from_secs(30), |c| c["state"] == "ready");
        gw
    });
}

/// `PGSERVE_REPLICATION_DATABASES` adds databases of the embedded cluster,
/// each into its namesake on the target server, created by the relay when
/// its role may. Until then the status says what is missing, the app
/// database streams regardless.
#[test]
fn another_database_goes_into_its_namesake_created_once_the_role_may() {
    let target = TempPostgres::start_new();
    let mut admin = target.client();
    admin.batch_execute("CREATE ROLE rep LOGIN").unwrap();
    admin.batch_execute("CREATE DATABASE copy OWNER rep").unwrap();
    let copy_url = format!("postgres://rep@127.0.0.1:{}/copy", target.port());
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &copy_url).env("PGSERVE_REPLICATION_DATABASES", "omni,extra").start();
    put_preference(&gw, "44444444-4444-4444-8444-444444444444", "theme", "dark");
    wait_identical(&gw, &copy_url, Duration::from_secs(30));
    // The rows arrive before the copy is recorded on the target; streaming starts after.
    gw.wait_component("replication", "the app database to stream", Duration::from_secs(30), |c| c["per_database"][0]["state"] == "ready");
    let waiting = |what: &str, needle: &'static str| {
        gw.wait_component("replication", what, Duration::from_secs(30), move |c| {
            c["per_database"][1]["state"] == "backoff" && c["per_database"][1]["detail"].as_str().is_some_and(|d| d.contains(needle))
        })
    };
    // The embedded cluster has no database `extra` yet.
    let status = waiting("extra to wait for its embedded database", "connecting to the embedded database extra");
    assert_eq!(status["per_database"][0]["state"], "ready", "the app database streams meanwhile: {status}");
    assert_eq!(status["state"], "backoff", "the component shows the database holding it back: {status}");
    assert!(status["detail"].as_str().unwrap().starts_with("extra: "), "{status}");

    gw.db().batch_execute("CREATE DATABASE extra").unwrap();
    let extra_url = embedded_url(&gw).replace("/omni", "/extra");
    connect(&extra_url)
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 300) i")
        .unwrap();
    // The target server has no `extra` and `rep` may not create databases: the status says what to do.
    let status = waiting("extra to wait for a database on the target", "CREATEDB");
    assert!(!status.to_string().contains("rep@"), "no credentials in the status: {status}");

    target.client().batch_execute("ALTER ROLE rep CREATEDB").unwrap();
    let target_extra = format!("postgres://rep@127.0.0.1:{}/extra", target.port());
    let tables = wait_identical_db(&gw, "extra", &target_extra, Duration::from_secs(30));
    assert_eq!(tables["public.notes"].lines().count(), 300);
    connect(&extra_url).batch_execute("UPDATE notes SET body = 'changed' WHERE id <= 10; CREATE TABLE later (k text PRIMARY KEY); INSERT INTO later VALUES ('a')").unwrap();
    let tables = wait_identical_db(&gw, "extra", &target_extra, Duration::from_secs(10));
    assert!(tables.contains_key("public.later"), "{:?}", tables.keys());
    let owner: String = connect(&target_extra).query_one("SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'extra'", &[]).unwrap().get(0);
    assert_eq!(owner, "rep", "the relay created the database with its own role");
    let status = gw.wait_component("replication", "both databases to stream", Duration::from_secs(10), |c| c["state"] == "ready");
    assert_eq!(status["databases"], json!(["omni", "extra"]));
    assert_eq!(status["per_database"][1]["target_database"], "extra");
    // The app database still streams into the URL's database, untouched by the other.
    put_preference(&gw, "44444444-4444-4444-8444-444444444444", "lang", "de");
    let app = wait_identical(&gw, &copy_url, Duration::from_secs(10));
    assert!(!app.contains_key("public.notes"), "extra's tables stay out of the app database's target");
}

/// `*`: every database of the embedded cluster that is not a template,
/// listed at the start.
#[test]
fn a_star_replicates_every_database_but_the_templates() {
    let target = TempPostgres::start_new();
    let copy_url = target_database(&target, "copy");
    let dir = workdir();
    {
        let mut gw = GatewayBuilder::new(dir.path()).start();
        gw.db().batch_execute("CREATE DATABASE second").unwrap();
        connect(&embedded_url(&gw).replace("/omni", "/second"))
            .batch_execute("CREATE TABLE s (id int PRIMARY KEY, v text); INSERT INTO s SELECT i, md5(i::text) FROM generate_series(1, 100) i")
            .unwrap();
        assert!(gw.terminate().success());
    }
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &copy_url).env("PGSERVE_REPLICATION_DATABASES", "*").start();
    let status = gw.wait_component("replication", "every database to stream", Duration::from_secs(60), |c| c["state"] == "ready");
    assert_eq!(status["databases"], json!(["omni", "postgres", "second"]), "templates are left out: {status}");
    let second_url = format!("postgres://postgres@127.0.0.1:{}/second", target.port());
    let tables = wait_identical_db(&gw, "second", &second_url, Duration::from_secs(10));
    assert_eq!(tables["public.s"].lines().count(), 100);
    wait_identical(&gw, &copy_url, Duration::from_secs(10));
}

/// A list that would send a second database into the URL's own database is
/// refused before anything starts, naming the variable.
#[test]
fn a_database_list_colliding_with_the_urls_database_is_refused_at_start() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path())
        .env("PGSERVE_REPLICATION_URL", "postgres://rep:secret@127.0.0.1:9/copy")
        .env("PGSERVE_REPLICATION_DATABASES", "omni,copy")
        .run_to_exit();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("PGSERVE_REPLICATION_DATABASES") && log.contains("copy"), "{log}");
    assert!(!log.contains("secret"), "{log}");
}

#[test]
fn replicates_into_postgres_17() {
    let target = TempPostgres::start_new_with(&pg17_bin_dir());
    let target_url = target_database(&target, "replica17");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    put_preference(&gw, "33333333-3333-4333-8333-333333333333", "lang", "fr");
    let mut db = gw.db();
    // One statement per query string, as applications send them (see README
    // for query strings that mix DDL with other commands).
    for sql in [
        "CREATE TABLE t17 (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v numeric, at timestamptz DEFAULT now())",
        "INSERT INTO t17 (v) SELECT i / 3.0 FROM generate_series(1, 200) i",
        "ALTER TABLE t17 ADD COLUMN w text",
        "UPDATE t17 SET w = 'w' || id WHERE id % 2 = 0",
        "DELETE FROM t17 WHERE id > 190",
        "CREATE TABLE made_as AS SELECT id, v * 2 AS doubled FROM t17 WHERE id <= 10",
        "UPDATE made_as SET doubled = 0 WHERE id = 1",
        "SELECT id INTO selected_into FROM t17 WHERE id > 185",
    ] {
        db.batch_execute(sql).unwrap();
    }
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert!(tables["public.t17"].lines().count() == 190, "{}", tables["public.t17"].lines().count());
    assert_eq!(tables["public.made_as"].lines().count(), 10, "CREATE TABLE AS arrives with its rows, once");
    assert_eq!(tables["public.selected_into"].lines().count(), 5, "SELECT INTO arrives with its rows, once");
    let version: String = connect(&target_url).query_one("SHOW server_version", &[]).unwrap().get(0);
    assert!(version.starts_with("17"), "{version}");
}

#[test]
fn onboarding_enable_replication_then_a_restart_replicates() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "onboarded");
    let dir = workdir();
    let mut gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    assert!(gw.get("/gateway/status").json()["components"].as_array().unwrap().iter().all(|c| c["name"] != "replication"));
    let body = json!({
        "data_dir": dir.path().join("data/postgres").display().to_string(),
        "memory_mode": false,
        "replication_enabled": true,
        "replication_url": target_url,
        "replication_databases": "omni",
    });
    let r = Request::new("POST", "/api/v1/setup/initialize").port(gw.port).api_key().json(&body).send();
    assert_eq!(r.status, 200, "{}", r.text());
    put_preference(&gw, "44444444-4444-4444-8444-444444444444", "before", "restart");
    assert!(gw.terminate().success());

    let gw = GatewayBuilder::new(dir.path()).env("OMNI_API_KEY", TEST_API_KEY).start();
    gw.wait_component("replication", "the relay configured by onboarding to stream", Duration::from_secs(60), |c| c["state"] == "ready");
    put_preference(&gw, "44444444-4444-4444-8444-444444444444", "after", "restart");
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    let prefs = &tables["public.omni_user_preferences"];
    assert!(prefs.contains("before") && prefs.contains("after"), "{prefs}");
}

#[test]
fn replication_beside_database_url_is_refused_with_a_message() {
    let dir = workdir();
    let (status, log) = GatewayBuilder::new(dir.path())
        .env("DATABASE_URL", "postgres://omni:pw@127.0.0.1:1/omni")
        .env("PGSERVE_REPLICATION_URL", "postgres://rep:secret@db.example:5432/omni")
        .run_to_exit();
    assert!(!status.success());
    assert!(log.contains("PGSERVE_REPLICATION_URL") && log.contains("DATABASE_URL"), "{log}");
    assert!(!log.contains("secret"), "the password is never shown: {log}");
}

/// Past `PGSERVE_REPLICATION_MAX_WAL_MB` while the target is down, the relay
/// drops its slot and says so; once the target is back a full copy runs by
/// itself. A copy that fails (here: a view on the target blocks
/// `pg_restore --clean`) is retried as a copy, never followed by streaming
/// from the slot it made, which would skip what the target missed. The small
/// cap is the relay's alone: the point-in-time recovery stream is not cut.
#[test]
fn an_invalidated_slot_is_reported_and_a_full_copy_runs_by_itself() {
    let mut target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).env("PGSERVE_REPLICATION_MAX_WAL_MB", "1").start();
    gw.wait_component("replication", "the relay to stream", Duration::from_secs(60), |c| c["state"] == "ready");
    gw.wait_component("wal", "the WAL streamer", Duration::from_secs(60), |c| c["state"] == "ready");
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE big (id serial PRIMARY KEY, pad text)").unwrap();
    wait_identical(&gw, &target_url, Duration::from_secs(30));
    connect(&target_url).batch_execute("CREATE VIEW holds_big AS SELECT * FROM public.big").unwrap();

    target.stop();
    // Past the 1 MB cap: a switch starts a new segment, so the slot holds
    // 16 MB. The relay checks at each retry (≤ 5 s apart). One switch is
    // enough; another comes only once the slot holds less than the cap again
    // (the relay confirmed what it could), and never while the WAL streamer's
    // slot is behind: switching at the poll rate made segments faster than
    // pg_receivewal fsyncs them on a slow disk, until PostgreSQL's 1 GB cap
    // invalidated the point-in-time recovery slot too.
    wait_until(Duration::from_secs(120), "the relay to drop its slot", || {
        let row = db
            .query_one(
                "SELECT (SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'omni_relay_omni'),
                        (SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'omni_wal')",
                &[],
            )
            .unwrap();
        let (relay_held, streamer_behind): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
        let Some(relay_held) = relay_held else { return Some(()) };
        if relay_held < (1 << 20) && streamer_behind.unwrap_or(0) < (64 << 20) {
            db.batch_execute("INSERT INTO big (pad) SELECT repeat('x', 1000) FROM generate_series(1, 100); SELECT pg_switch_wal()").unwrap();
        }
        None
    });
    db.batch_execute("INSERT INTO big (pad) VALUES ('while the target was away')").unwrap();
    target.start();
    // The copy fails on the view, and keeps failing as a copy.
    let failing = gw.wait_component("replication", "the copy to fail on the view, twice", Duration::from_secs(60), |c| {
        c["state"] == "backoff"
            && c["per_database"][0]["attempts"].as_u64().is_some_and(|a| a >= 2)
            && c["detail"].as_str().is_some_and(|d| d.contains("pg_restore") && d.contains("holds_big"))
    });
    assert_ne!(failing["per_database"][0]["state"], "ready", "{failing}");
    connect(&target_url).batch_execute("DROP VIEW holds_big").unwrap();
    let c = gw.wait_component("replication", "a full copy after the invalidation", Duration::from_secs(90), |c| {
        c["state"] == "ready" && c["last_copy"].as_str().is_some_and(|s| s.contains("invalidated"))
    });
    assert!(c["last_copy"].as_str().unwrap().contains("PGSERVE_REPLICATION_MAX_WAL_MB"), "{c}");
    db.batch_execute("INSERT INTO big (pad) VALUES ('after the re-copy')").unwrap();
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert!(tables["public.big"].contains("while the target was away") && tables["public.big"].contains("after the re-copy"));
    let log = gw.log();
    assert!(log.contains("more than PGSERVE_REPLICATION_MAX_WAL_MB=1 allows"), "the drop is said in the log");
    assert!(!log.contains("omni_wal lost WAL"), "the point-in-time recovery stream kept its WAL:\n{log}");
    let cap: String = db.query_one("SHOW max_slot_wal_keep_size", &[]).unwrap().get(0);
    assert_eq!(cap, "1GB", "PostgreSQL's cap, shared by every slot, stays the streamer's");
}

/// `sslmode`/`sslrootcert` in `PGSERVE_REPLICATION_URL` mean what they mean
/// to libpq: with `verify-full` a certificate from another CA is refused
/// (shown as `backoff`), the right CA replicates — the relay's connections
/// and the initial copy's `pg_restore` alike, since the target rejects every
/// unencrypted connection of the relay's role.
#[test]
fn tls_to_the_target_with_verify_full_refuses_a_strangers_certificate_and_encrypts_everything() {
    let mut target = TempPostgres::start_new();
    let ca = target.with_tls_required_for("rep");
    let other_ca = omni_tests::make_test_ca(ca.parent().unwrap(), "stranger");
    let mut admin = target.client();
    admin.batch_execute("CREATE ROLE rep LOGIN").unwrap();
    admin.batch_execute("CREATE DATABASE copy OWNER rep").unwrap();
    let url = |ca: &std::path::Path| format!("postgres://rep@127.0.0.1:{}/copy?sslmode=verify-full&sslrootcert={}", target.port(), ca.display());
    // The test's own view of the target, as the superuser (not bound to TLS).
    let check_url = format!("postgres://postgres@127.0.0.1:{}/copy", target.port());

    let dir = workdir();
    {
        let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", url(&other_ca)).start();
        put_preference(&gw, "55555555-5555-4555-8555-555555555555", "theme", "dark");
        let refused = gw.wait_component("replication", "a certificate from another CA to be refused", Duration::from_secs(30), |c| {
            c["state"] == "backoff" && c["detail"].as_str().is_some_and(|d| d.to_lowercase().contains("certificate"))
        });
        assert!(!refused.to_string().contains("rep@"), "{refused}");
        assert_eq!(gw.get("/health").status, 200, "replication is not on the request path");
        assert!(gw.terminate().success());
    }
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", url(&ca)).start();
    put_preference(&gw, "55555555-5555-4555-8555-555555555555", "lang", "pt");
    let tables = wait_identical(&gw, &check_url, Duration::from_secs(30));
    assert!(tables["public.omni_user_preferences"].contains("pt"), "{tables:?}");
    let encrypted: i64 = connect(&check_url)
        .query_one("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'rep' AND s.ssl", &[])
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the relay's connection to the target is encrypted");
}
