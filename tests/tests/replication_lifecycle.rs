//! The replication relay over the cluster's life: turned off and on again,
//! across a major upgrade, and across a logical backup's restore. The real
//! gateway replicates into a second PostgreSQL the test starts; every check
//! compares table contents row by row, and PostgreSQL must serve throughout.

use crate::gateway;
use crate::kit;

use std::path::Path;
use std::time::Duration;

use kit::{target_database, wait_identical};
use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{bin_path, pg17_bin_dir, wait_until, Request, TempPostgres, TEST_API_KEY};

const PG15: &str = "/usr/lib/postgresql/15/bin";

/// Each statement as its own query string, as applications send them (see
/// the README on query strings that mix DDL with other commands).
fn execute(gw: &Gateway, statements: &[&str]) {
    let mut db = gw.db();
    for sql in statements {
        db.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

fn wait_streaming(gw: &Gateway) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let c = gw.component("replication");
        if c["state"] == "ready" {
            return c;
        }
        if std::time::Instant::now() > deadline {
            panic!("the relay does not stream after 90 s: {c}\ngateway log:\n{}", gw.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The relay's slots the running embedded cluster has.
fn relay_slots(gw: &Gateway) -> Vec<String> {
    gw.db()
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'omni\\_relay\\_%' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The relay's slot directories in a stopped cluster.
fn slot_dirs(data: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(data.join("pg_replslot"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("omni_relay_")).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// What the relay installs in the source database, by name.
fn relay_objects(gw: &Gateway) -> (bool, bool, bool) {
    let row = gw
        .db()
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = 'omni_relay'),
                    EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'omni_relay_capture_ddl'),
                    EXISTS (SELECT FROM pg_namespace WHERE nspname = 'omni_relay')",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn replication_on_off_on_drops_the_relays_slots_and_publication_then_copies_anew() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let data = dir.path().join("data/postgres");

    // On: rows replicated.
    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).start();
    wait_streaming(&gw);
    execute(&gw, &[
        "CREATE TABLE kept (id int PRIMARY KEY, v text)",
        "INSERT INTO kept SELECT i, 'v' || i FROM generate_series(1, 200) i",
        "CREATE TABLE loose (a int, b text)",
        "INSERT INTO loose VALUES (1, 'x'), (2, 'y')",
    ]);
    wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert_eq!(relay_slots(&gw), ["omni_relay_omni"]);
    assert!(gw.terminate().success(), "{}", gw.log());
    assert_eq!(slot_dirs(&data), ["omni_relay_omni"], "the relay's slot is on disk while the gateway is stopped");

    // Off: PostgreSQL serves, the slot and the relay's objects are gone, and the log says so.
    let mut gw = GatewayBuilder::new(dir.path()).start();
    let log = gw.log();
    assert!(log.contains("PGSERVE_REPLICATION_URL is not set: dropped the replication relay's slots omni_relay_omni"), "{log}");
    assert!(relay_slots(&gw).is_empty());
    wait_until(Duration::from_secs(30), "the relay's publication, event trigger and schema to be dropped", || (relay_objects(&gw) == (false, false, false)).then_some(()));
    assert!(gw.log().contains("dropped the replication relay's publication omni_relay"), "{}", gw.log());
    // Written while off: the next copy must carry it.
    execute(&gw, &[
        "INSERT INTO kept SELECT i, 'off ' || i FROM generate_series(201, 250) i",
        "DELETE FROM kept WHERE id <= 10",
        "UPDATE loose SET b = 'z' WHERE a = 2",
        "CREATE TABLE made_while_off (id int PRIMARY KEY)",
        "INSERT INTO made_while_off VALUES (1)",
    ]);
    let wal_level: String = gw.db().query_one("SHOW wal_level", &[]).unwrap().get(0);
    assert_ne!(wal_level, "logical", "without the relay PostgreSQL runs without logical decoding");
    assert!(gw.terminate().success(), "{}", gw.log());
    assert!(slot_dirs(&data).is_empty());

    // On again: a full copy, then streaming.
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).start();
    let status = wait_streaming(&gw);
    assert!(status["last_copy"].as_str().unwrap_or_default().contains("the replication slot is gone"), "{status}");
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert!(tables.contains_key("public.made_while_off") && tables["public.kept"].lines().count() == 240, "{:?}", tables.keys());
    execute(&gw, &[
        "INSERT INTO kept VALUES (1000, 'after')",
    ]);
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert!(tables["public.kept"].contains("after"));
    assert_eq!(relay_slots(&gw), ["omni_relay_omni"]);
}

#[test]
fn a_postgres_15_cluster_that_ran_the_relay_upgrades_to_17_and_the_relay_copies_anew() {
    // A target of the new major: a copy made by PostgreSQL 17's pg_dump
    // does not restore into an older server (`SET transaction_timeout`).
    let target = TempPostgres::start_new_with(&pg17_bin_dir());
    let target_url = target_database(&target, "replica_up");
    let dir = workdir();
    let data = dir.path().join("data/postgres");
    let pg17 = pg17_bin_dir().display().to_string();

    let mut gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", PG15).env("PGSERVE_REPLICATION_URL", &target_url).start();
    wait_streaming(&gw);
    execute(&gw, &[
        "CREATE TABLE before_upgrade (id int PRIMARY KEY, v text)",
        "INSERT INTO before_upgrade SELECT i, 'v' || i FROM generate_series(1, 300) i",
    ]);
    wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert!(gw.terminate().success(), "{}", gw.log());
    assert_eq!(slot_dirs(&data), ["omni_relay_omni"]);

    // `upgrade --check` changes nothing, the relay's slot included.
    let out = std::process::Command::new(bin_path("omni-gateway"))
        .args(["upgrade", "--check"])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PGSERVE_BIN_DIR", &pg17)
        .env("LOG_LEVEL", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("upgrade check passed"), "{stdout}\n{stderr}");
    assert_eq!(slot_dirs(&data), ["omni_relay_omni"], "--check changes nothing");

    // The start with PostgreSQL 17 upgrades, and the relay copies into the target again.
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_BIN_DIR", &pg17).env("PGSERVE_REPLICATION_URL", &target_url).start();
    let log = gw.log();
    assert!(log.contains("upgrade done"), "{log}");
    assert!(log.contains("upgrading PostgreSQL: dropped the replication relay's slots omni_relay_omni"), "{log}");
    assert_eq!(std::fs::read_to_string(data.join("PG_VERSION")).unwrap().trim(), "17");
    let status = wait_streaming(&gw);
    assert!(status["last_copy"].as_str().unwrap_or_default().contains("the replication slot is gone"), "{status}");
    execute(&gw, &[
        "UPDATE before_upgrade SET v = 'after' WHERE id <= 5",
        "INSERT INTO before_upgrade VALUES (301, 'new')",
    ]);
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert_eq!(tables["public.before_upgrade"].lines().count(), 301);
    assert!(tables["public.before_upgrade"].contains("(301,new)"));
}

fn api(gw: &Gateway, method: &str, path: &str) -> serde_json::Value {
    let r = Request::new(method, path).port(gw.port).api_key().send();
    assert_eq!(r.status, 200, "{method} {path}: {}\n{}", r.text(), gw.log());
    r.json()
}

#[test]
fn a_logical_backup_restored_while_the_relay_runs_is_copied_to_the_target_and_streaming_goes_on() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica_restore");
    let dir = workdir();
    let gw = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_URL", &target_url).env("OMNI_API_KEY", TEST_API_KEY).start();
    wait_streaming(&gw);
    execute(&gw, &[
        "CREATE TABLE items (id int PRIMARY KEY, v text)",
        "INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 300) i",
        "CREATE TABLE log_rows (n int, note text)",
        "INSERT INTO log_rows SELECT i, 'n' || i FROM generate_series(1, 50) i",
    ]);
    let at_backup = wait_identical(&gw, &target_url, Duration::from_secs(30));

    let created = api(&gw, "POST", "/api/v1/backup/create");
    let name = created["backup_file"].as_str().unwrap_or_else(|| panic!("{created}")).to_string();
    let text = std::fs::read_to_string(dir.path().join("data/backups").join(&name)).unwrap();
    assert!(text.contains("COPY public.items"), "the backup holds the rows");
    assert!(!text.contains("omni_relay"), "the backup holds nothing of the relay (publication, schema, event trigger):\n{}", text.lines().filter(|l| l.contains("omni_relay")).collect::<Vec<_>>().join("\n"));

    // Changed after the backup, replicated.
    execute(&gw, &[
        "DELETE FROM items WHERE id > 250",
        "UPDATE items SET v = 'changed' WHERE id <= 20",
        "INSERT INTO items VALUES (1000, 'late')",
        "DELETE FROM log_rows WHERE n <= 10",
        "INSERT INTO log_rows VALUES (99, 'late')",
        "CREATE TABLE after_backup (id int PRIMARY KEY)",
        "INSERT INTO after_backup VALUES (1)",
    ]);
    wait_identical(&gw, &target_url, Duration::from_secs(30));

    let restored = api(&gw, "POST", &format!("/api/v1/backup/restore/{name}"));
    assert_eq!(restored["success"], true, "{restored}");
    // The target equals the restored source row by row (a table the backup
    // does not hold is left as it is by the restore, on both sides alike).
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(60));
    for t in ["public.items", "public.log_rows"] {
        assert_eq!(tables[t], at_backup[t], "{t} is as it was at the backup");
    }
    let status = wait_streaming(&gw);
    assert!(status["last_copy"].as_str().unwrap_or_default().contains("a logical backup was restored"), "{status}");
    assert!(gw.log().contains("full copy to the replication target: a logical backup was restored"), "{}", gw.log());

    // No wedge: what follows streams.
    execute(&gw, &[
        "INSERT INTO items VALUES (2000, 'after restore')",
        "UPDATE log_rows SET note = 'u' WHERE n = 1",
    ]);
    let tables = wait_identical(&gw, &target_url, Duration::from_secs(30));
    assert!(tables["public.items"].contains("after restore"));
    assert_eq!(relay_objects(&gw), (true, true, true), "the relay's own objects are still in place");
    assert_eq!(gw.component("replication")["state"], "ready");
}
