//! The relay under big transactions, foreign session settings and a target
//! that goes back in time: the real gateway replicates its embedded cluster
//! into a second PostgreSQL the test starts, and every check compares the
//! tables' contents (or count and checksum for the big one).

use crate::gateway;
use crate::kit;

use std::process::Command;
use std::time::{Duration, Instant};

use kit::{connect, embedded_url, target_database, wait_identical};
use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{pg_bin_dir, wait_until, TempPostgres};

fn replicating_gateway(builder: GatewayBuilder, target_url: &str) -> Gateway {
    let gw = builder.env("PGSERVE_REPLICATION_URL", target_url).start();
    gw.wait_component("replication", "the relay to stream", Duration::from_secs(60), |c| c["state"] == "ready");
    gw
}

/// A line of `/proc/<pid>/status` in kB (`VmHWM`, `VmSize`…).
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(&format!("{field}:")))?.split_whitespace().nth(1)?.parse().ok()
}

/// Caps the address space of the running process `pid` alone (its
/// children started already, PostgreSQL among them, keep their own).
fn limit_address_space(pid: u32, bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: prlimit on a process this test started, with a valid struct.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_AS, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit RLIMIT_AS on the gateway: {}", std::io::Error::last_os_error());
}

/// Count and checksum of a table, the same query on both sides.
fn fingerprint(client: &mut postgres::Client, table: &str) -> Result<(i64, String), postgres::Error> {
    let row = client.query_one(&format!("SELECT count(*), coalesce(md5(string_agg(md5(x::text), '' ORDER BY id)), '') FROM {table} x"), &[])?;
    Ok((row.get(0), row.get(1)))
}

const MEMORY_LIMIT: u64 = 512 << 20;

/// Rows of ~1.17 KB in the big transaction: `OMNI_TEST_BIG_TXN_ROWS`, by
/// default 500,000 (a 585 MB table, more than the gateway's whole limit:
/// holding it whole even once is impossible) so that `make test` stays
/// quick; `make test-big` runs it with 2,000,000 (a 2.3 GB table, about
/// 12 minutes and 20 GB of disk on 2 cores).
fn big_rows() -> i64 {
    std::env::var("OMNI_TEST_BIG_TXN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000)
}

/// A single-transaction import bigger than the gateway's memory (a table
/// created and filled in one `psql --single-transaction`, as an import or a
/// `.sql` restore does; 2 GB with `make test-big`) while the gateway may use
/// no more than 512 MB: the relay streams it in bounded memory, the gateway
/// survives, the target ends equal.
#[test]
fn a_transaction_bigger_than_memory_streams_under_a_512_mb_limit() {
    let rows = big_rows();
    let started = Instant::now();
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    // A big transaction holds WAL until it is applied: the cap is above it.
    // One malloc arena per thread would reserve more address space than the limit for nothing.
    let builder = GatewayBuilder::new(dir.path()).env("PGSERVE_REPLICATION_MAX_WAL_MB", "16384").env("MALLOC_ARENA_MAX", "2");
    let mut gw = replicating_gateway(builder, &target_url);
    let pid = gw.child.pid();
    let before = proc_status_kb(pid, "VmSize").unwrap_or(0);
    assert!(before * 1024 < MEMORY_LIMIT, "the gateway maps {before} kB before the import: the 512 MB limit cannot be tested");
    limit_address_space(pid, MEMORY_LIMIT);

    // 2,000,000 rows of 1 KB of distinct hex text each (under the TOAST
    // threshold: stored, logged and decoded as is, nothing compressed).
    let password = std::fs::read_to_string(gw.cwd.join("data/postgres.password")).unwrap();
    let import = Instant::now();
    let out = Command::new(pg_bin_dir().join("psql"))
        .args(["-h", "127.0.0.1", "-p", &gw.pg_port.to_string(), "-U", "postgres", "-d", "omni", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"])
        .args(["-c", "CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL)"])
        .args([
            "-c",
            &format!("INSERT INTO big SELECT i, repeat(md5(i::text) || md5((i * 7)::text) || md5((i * 13)::text) || md5((i * 31)::text), 8) FROM generate_series(1, {rows}) i"),
        ])
        .env("PGPASSWORD", password.trim())
        .output()
        .expect("run psql");
    assert!(out.status.success(), "the import failed: {}", String::from_utf8_lossy(&out.stderr));
    let import_took = import.elapsed();
    let mut source = connect(&embedded_url(&gw));
    let size: i64 = source.query_one("SELECT pg_table_size('big')", &[]).unwrap().get(0);
    assert!(size as u64 > MEMORY_LIMIT, "the import is {size} bytes, not more than the gateway's limit of {MEMORY_LIMIT}");
    let want = fingerprint(&mut source, "big").unwrap_or_else(|e| panic!("reading the source table: {e}\n{}", gw.log()));
    assert_eq!(want.0, rows);

    let mut target_client = connect(&target_url);
    wait_until(Duration::from_secs(900), "the relay to apply the big transaction", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway died ({status}) under the 512 MB limit:\n{}", gw.log());
        }
        let applied: bool = target_client
            .query_one("SELECT to_regclass('public.big') IS NOT NULL AND EXISTS (SELECT 1 FROM public.big WHERE id = $1)", &[&rows])
            .map(|r| r.get(0))
            .unwrap_or(false);
        applied.then_some(())
    });
    let got = fingerprint(&mut target_client, "big").unwrap_or_else(|e| panic!("reading the target table: {e}\n{}", gw.log()));
    assert_eq!(got, want, "count and checksum of the table on the target");
    let log = gw.log();
    assert!(log.contains("applying it in chunks"), "the transaction was not streamed in chunks:\n{log}");
    assert_eq!(log.matches("full copy to the replication target").count(), 1, "only the first copy, no re-copy:\n{log}");
    let peak = proc_status_kb(pid, "VmHWM").unwrap_or(0);
    eprintln!(
        "big transaction ({rows} rows, {size} bytes of table): import {:.1} s, whole test {:.1} s, gateway peak RSS (VmHWM) {} MB under an address-space limit of {} MB",
        import_took.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        peak / 1024,
        MEMORY_LIMIT >> 20
    );
    assert!(gw.child.try_status().is_none(), "the gateway is still running");
}

/// Rows of a table without a key are found on the target whatever the
/// date, time zone and float settings of the writing session and of the
/// target database: the relay pins its own on both sides.
#[test]
fn keyless_rows_are_matched_under_foreign_date_time_and_float_settings() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    // The target database's defaults differ from the source's.
    target
        .client()
        .batch_execute(
            "ALTER DATABASE replica SET DateStyle = 'SQL, MDY'; ALTER DATABASE replica SET TimeZone = 'America/New_York';
             ALTER DATABASE replica SET extra_float_digits = 0; ALTER DATABASE replica SET IntervalStyle = 'sql_standard'",
        )
        .unwrap();
    let dir = workdir();
    let gw = replicating_gateway(GatewayBuilder::new(dir.path()), &target_url);
    let mut app = postgres::Client::connect(&embedded_url(&gw), postgres::NoTls).unwrap();
    app.batch_execute("SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kolkata'").unwrap();
    app.batch_execute("CREATE TABLE readings (at timestamptz, day date, value float8, span interval, note text)").unwrap();
    app.batch_execute(
        "INSERT INTO readings VALUES
           ('04/03/2024 10:15:00', '04/03/2024', 1.0 / 3, '1 day 02:03:04', 'a'),
           ('04/03/2024 10:15:00', '04/03/2024', 1.0 / 3, '1 day 02:03:04', 'a'),
           ('31/12/2023 23:59:59.123456', '31/12/2023', 0.1 + 0.2, '-3 hours', 'b'),
           ('01/01/2024 00:00:00', '01/01/2024', 'NaN', NULL, 'c'),
           (NULL, '29/02/2024', 1e300, '2 mons', 'd')",
    )
    .unwrap();
    wait_identical(&gw, &target_url, Duration::from_secs(60));

    app.batch_execute(
        "UPDATE readings SET note = 'a2' WHERE ctid = (SELECT ctid FROM readings WHERE note = 'a' LIMIT 1);
         UPDATE readings SET value = value * 2, note = 'b2' WHERE note = 'b';
         DELETE FROM readings WHERE note = 'c';
         UPDATE readings SET at = '15/06/2024 08:00:00' WHERE note = 'd';",
    )
    .unwrap();
    let rows = wait_identical(&gw, &target_url, Duration::from_secs(60));
    let readings = &rows["public.readings"];
    assert!(readings.contains(",a2)") && readings.contains(",a)") && readings.contains(",b2)") && !readings.contains(",c)"), "{readings}");

    // The target lost a row the source still has: the source's delete of
    // it is an error that names the table, not a silent no-op.
    connect(&target_url).batch_execute("DELETE FROM readings WHERE note = 'd'").unwrap();
    app.batch_execute("DELETE FROM readings WHERE note = 'd'").unwrap();
    wait_until(Duration::from_secs(60), "the relay to report the missing row", || {
        gw.log().contains(r#"the delete of a row of "public"."readings" (no primary key: matched on every column) found no such row on the replication target"#).then_some(())
    });
}

/// `ALTER TYPE … ADD VALUE` and a row using the new value, in two source
/// transactions that reach the relay in one peek: the DDL's transaction is
/// applied alone (a new enum value cannot be used in the transaction that
/// added it), so the row arrives.
#[test]
fn a_transaction_carrying_ddl_is_never_grouped_with_the_next() {
    let mut target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(GatewayBuilder::new(dir.path()), &target_url);
    let mut app = gw.db();
    app.batch_execute("CREATE TYPE mood AS ENUM ('sad'); CREATE TABLE feelings (id int PRIMARY KEY, m mood)").unwrap();
    wait_identical(&gw, &target_url, Duration::from_secs(60));
    // The target is down while both commit: the relay meets them together.
    target.stop();
    app.batch_execute("ALTER TYPE mood ADD VALUE 'happy'").unwrap();
    app.batch_execute("INSERT INTO feelings VALUES (1, 'happy'), (2, 'sad')").unwrap();
    target.start();
    let rows = wait_identical(&gw, &target_url, Duration::from_secs(90));
    assert!(rows["public.feelings"].contains("(1,happy)"), "{rows:?}");
}

/// The target restored to an older state (its progress row and a table as
/// they were before some changes): the relay notices that the target is
/// behind what the slot confirmed and copies anew; source and target end equal.
#[test]
fn a_target_that_went_back_in_time_is_copied_again() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(GatewayBuilder::new(dir.path()), &target_url);
    let mut app = gw.db();
    app.batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 100) i").unwrap();
    wait_identical(&gw, &target_url, Duration::from_secs(60));
    // "Back up" the target.
    let mut tgt = connect(&target_url);
    let saved_items: String = tgt.query_one("SELECT json_agg(i)::text FROM items i", &[]).unwrap().get(0);
    let saved_progress: String = tgt.query_one("SELECT row_to_json(p)::text FROM omni_relay_progress p WHERE source_database = 'omni'", &[]).unwrap().get(0);

    app.batch_execute("INSERT INTO items SELECT i, 'w' || i FROM generate_series(101, 200) i; UPDATE items SET v = 'changed' WHERE id <= 10").unwrap();
    wait_identical(&gw, &target_url, Duration::from_secs(60));
    // "Restore" it: the rows and the progress of then.
    let restore = format!(
        "BEGIN;
         TRUNCATE items; INSERT INTO items SELECT * FROM json_populate_recordset(NULL::items, '{saved_items}');
         DELETE FROM omni_relay_progress WHERE source_database = 'omni';
         INSERT INTO omni_relay_progress SELECT * FROM json_populate_record(NULL::omni_relay_progress, '{saved_progress}');
         COMMIT"
    );
    tgt.batch_execute(&restore).unwrap();
    app.batch_execute("INSERT INTO items VALUES (201, 'after the restore')").unwrap();
    let rows = wait_identical(&gw, &target_url, Duration::from_secs(120));
    assert_eq!(rows["public.items"].lines().count(), 201);
    assert!(gw.log().contains("the target went back in time"), "{}", gw.log());
}
