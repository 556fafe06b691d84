//! Schema changes through the replication relay: each DDL command is
//! replayed as itself, whatever query string carried it, and values the
//! source computed while changing a schema reach the target as the
//! source's. Every case ends with the source and the target equal: tables,
//! columns (type, default, nullability), indexes, constraints and every
//! row; then one more write must arrive (the relay did not wedge).

use crate::gateway;

use std::collections::BTreeMap;
use std::time::Duration;

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{wait_until, TempPostgres};

/// A database `name` on `target`, and the URL the gateway is given for it.
fn target_database(target: &TempPostgres, name: &str) -> String {
    target.client().batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    format!("postgres://postgres@127.0.0.1:{}/{name}", target.port())
}

fn connect(url: &str) -> Option<postgres::Client> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).ok()?;
    c.batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1; SET DateStyle = 'ISO'").ok()?;
    Some(c)
}

fn embedded_url(gw: &Gateway) -> String {
    let password = std::fs::read_to_string(gw.cwd.join("data/postgres.password")).unwrap();
    format!("postgres://postgres:{}@127.0.0.1:{}/omni", password.trim(), gw.pg_port)
}

const USER_SCHEMAS: &str = "NOT IN ('pg_catalog', 'information_schema', 'omni_relay', 'pg_toast')";

/// What must be equal on both sides: per table its columns, then its rows
/// (sorted), plus every index and constraint (but those of the app's own
/// `omni_*` tables, which the initial copy's pg_dump spells its own way).
fn snapshot(c: &mut postgres::Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let columns = c
        .query(
            &format!(
                "SELECT format('%I.%I', table_schema, table_name),
                        string_agg(format('%s %s default=%s nullable=%s', column_name, data_type, coalesce(column_default, '-'), is_nullable), '; ' ORDER BY ordinal_position)
                 FROM information_schema.columns
                 WHERE table_schema {USER_SCHEMAS} AND table_name <> 'omni_relay_progress'
                   AND (table_schema, table_name) IN (SELECT table_schema, table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE')
                 GROUP BY 1"
            ),
            &[],
        )
        .unwrap();
    for r in columns {
        let table: String = r.get(0);
        let rows: String =
            c.query_one(&format!("SELECT coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '') FROM {table} x"), &[]).unwrap().get(0);
        out.insert(format!("{table} columns"), r.get(1));
        out.insert(format!("{table} rows"), rows);
    }
    let indexes: String = c
        .query_one(
            &format!("SELECT coalesce(string_agg(indexdef, E'\\n' ORDER BY indexdef), '') FROM pg_indexes WHERE schemaname {USER_SCHEMAS} AND tablename NOT LIKE 'omni\\_%'"),
            &[],
        )
        .unwrap()
        .get(0);
    out.insert("indexes".into(), indexes);
    let constraints: String = c
        .query_one(
            &format!(
                "SELECT coalesce(string_agg(def, E'\\n' ORDER BY def), '') FROM (
                     SELECT format('%s %s %s', conrelid::regclass, conname, pg_get_constraintdef(con.oid)) AS def
                     FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
                     WHERE n.nspname {USER_SCHEMAS} AND con.conrelid <> 0 AND con.conrelid::regclass::text NOT LIKE 'omni\\_%') defs"
            ),
            &[],
        )
        .unwrap()
        .get(0);
    out.insert("constraints".into(), constraints);
    out
}

/// The last comparison, shown when the wait gives up.
struct Diff<'a> {
    gw: &'a Gateway,
    last: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
}

impl Drop for Diff<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some((want, got)) = &self.last {
            for (k, v) in want {
                if got.get(k) != Some(v) {
                    eprintln!("differs: {k}\n  source: {v:?}\n  target: {:?}", got.get(k));
                }
            }
            for k in got.keys().filter(|k| !want.contains_key(*k)) {
                eprintln!("only on the target: {k}");
            }
        }
        // Every peek logs a decoding session: the rest of the log is what tells.
        let log = self.gw.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("logical decoding") && !l.contains("DETAIL:") && !l.contains("STATEMENT:")).collect();
        eprintln!("replication status: {}\ngateway log (decoding sessions left out):\n{}", self.gw.component("replication"), lines[lines.len().saturating_sub(150)..].join("\n"));
    }
}

/// Waits until source and target are equal, then writes one more row and
/// waits for it: the relay is still streaming. Returns the source's snapshot.
fn wait_equal(gw: &Gateway, target_url: &str) -> BTreeMap<String, String> {
    let mut source = connect(&embedded_url(gw)).unwrap();
    let mut diff = Diff { gw, last: None };
    let compare = |diff: &mut Diff, source: &mut postgres::Client| {
        let want = snapshot(source);
        let got = connect(target_url).map(|mut c| snapshot(&mut c)).unwrap_or_default();
        let equal = want == got;
        diff.last = Some((want.clone(), got));
        equal.then_some(want)
    };
    let want = wait_until(Duration::from_secs(60), "the target to equal the source", || compare(&mut diff, &mut source));
    source.batch_execute("CREATE TABLE IF NOT EXISTS still_streaming (n serial PRIMARY KEY); INSERT INTO still_streaming DEFAULT VALUES").unwrap();
    wait_until(Duration::from_secs(60), "a write after the schema change to arrive", || compare(&mut diff, &mut source));
    want
}

fn replicating_gateway(dir: &std::path::Path, target_url: &str) -> Gateway {
    let gw = GatewayBuilder::new(dir).env("PGSERVE_REPLICATION_URL", target_url).start();
    gw.wait_component("replication", "the relay to stream", Duration::from_secs(60), |c| c["state"] == "ready");
    gw
}

fn rows(snapshot: &BTreeMap<String, String>, table: &str) -> Vec<String> {
    snapshot[&format!("public.{table} rows")].lines().map(str::to_string).collect()
}

#[test]
fn a_trailing_comment_and_begin_commit_in_one_string_replay_each_command_once() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE log (n int, what text); INSERT INTO log VALUES (1, 'first')").unwrap();
    wait_equal(&gw, &target_url);

    db.batch_execute("ALTER TABLE log ADD COLUMN note text -- why: the support team asked").unwrap();
    db.batch_execute("INSERT INTO log VALUES (2, 'after the comment', 'n')").unwrap();
    wait_equal(&gw, &target_url);

    // A migration file sent as one string: its own transaction control, DDL
    // and DML mixed. The rows are decoded like any others: replaying the
    // string would insert them twice into this table without a key.
    db.batch_execute(
        "BEGIN;
         ALTER TABLE log ADD COLUMN level int DEFAULT 3; /* a comment; with a semicolon */
         INSERT INTO log VALUES (3, 'in the migration', 'm', 1);
         CREATE TABLE audit (id int PRIMARY KEY, entry text DEFAULT 'it''s; fine');
         INSERT INTO audit (id) VALUES (1);
         COMMIT;
         ALTER TABLE audit ADD COLUMN at_level int; -- second transaction of the string
         INSERT INTO log VALUES (4, 'after the commit', NULL, 2);",
    )
    .unwrap();
    let state = wait_equal(&gw, &target_url);
    assert_eq!(rows(&state, "log").len(), 4, "each row once: {:?}", rows(&state, "log"));
    assert!(state["public.audit columns"].contains("at_level"), "{}", state["public.audit columns"]);
}

#[test]
fn values_computed_by_defaults_reach_the_target_as_the_sources() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    let mut db = gw.db();
    db.batch_execute(
        "CREATE TABLE keyed (id int PRIMARY KEY, v text); INSERT INTO keyed SELECT i, 'k' || i FROM generate_series(1, 300) i;
         CREATE TABLE keyless (v text); INSERT INTO keyless SELECT 'n' || i FROM generate_series(1, 300) i;",
    )
    .unwrap();
    wait_equal(&gw, &target_url);
    for table in ["keyed", "keyless"] {
        // now() is stable: stored once as the new column's value for every
        // existing row, without a rewrite; gen_random_uuid() and a serial
        // rewrite the table. None of it is decoded.
        db.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN created_at timestamptz DEFAULT now()")).unwrap();
        db.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN token uuid DEFAULT gen_random_uuid() NOT NULL")).unwrap();
        db.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN seq serial, ADD COLUMN r float8 DEFAULT random()")).unwrap();
        db.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN zero int DEFAULT 0")).unwrap();
    }
    let state = wait_equal(&gw, &target_url);
    for table in ["keyed", "keyless"] {
        let rows = rows(&state, table);
        assert_eq!(rows.len(), 300, "{table}");
        let is_uuid = |f: &&str| f.len() == 36 && f.matches('-').count() == 4;
        let tokens: std::collections::HashSet<&str> = rows.iter().filter_map(|r| r.split(',').find(is_uuid)).collect();
        assert_eq!(tokens.len(), 300, "{table}: every row has its own source uuid");
    }
}

#[test]
fn create_and_drop_index_concurrently_replay_inside_the_relays_transaction() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, sku text, price int); INSERT INTO items SELECT i, 's' || i, i FROM generate_series(1, 500) i")
        .unwrap();
    db.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY items_sku ON items (sku) -- for lookups").unwrap();
    db.batch_execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS items_price ON items (price) WHERE price > 10").unwrap();
    db.batch_execute("INSERT INTO items VALUES (501, 's501', 501)").unwrap();
    let state = wait_equal(&gw, &target_url);
    assert!(state["indexes"].contains("CREATE UNIQUE INDEX items_sku"), "{}", state["indexes"]);
    db.batch_execute("DROP INDEX CONCURRENTLY items_price").unwrap();
    let state = wait_equal(&gw, &target_url);
    assert!(!state["indexes"].contains("items_price"), "{}", state["indexes"]);
}

#[test]
fn ddl_inside_a_do_block_or_a_function_replays_the_command_not_the_call() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    let mut db = gw.db();
    // The DO block runs on the source only: its INSERT reaches the target
    // as decoded rows, once (the table has no key to absorb a second run).
    db.batch_execute(
        "DO $migrate$
         BEGIN
             CREATE TABLE events (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text NOT NULL DEFAULT 'x' CHECK (kind <> ''));
             CREATE TABLE raw (payload text);
             INSERT INTO raw SELECT 'p' || i FROM generate_series(1, 20) i;
             EXECUTE format('ALTER TABLE %I ADD COLUMN %I int DEFAULT 1', 'raw', 'weight');
             EXECUTE 'CREATE INDEX ON events (kind)';
             INSERT INTO events (kind) VALUES ('a'), ('b');
         END
         $migrate$",
    )
    .unwrap();
    let state = wait_equal(&gw, &target_url);
    assert_eq!(rows(&state, "raw").len(), 20, "{:?}", rows(&state, "raw"));
    // A table made by an SQL function: its text is not in the context, the
    // catalogs rebuild it.
    db.batch_execute(
        "CREATE FUNCTION make_archive() RETURNS void LANGUAGE sql AS $$ CREATE TABLE archive (id bigserial PRIMARY KEY, body text UNIQUE, at date DEFAULT current_date) $$;
         SELECT make_archive();
         INSERT INTO archive (body) VALUES ('one'), ('two');",
    )
    .unwrap();
    wait_equal(&gw, &target_url);
    // Temporary tables stay on the source.
    db.batch_execute("CREATE TEMP TABLE scratch AS SELECT * FROM raw; CREATE INDEX ON scratch (payload); DROP TABLE scratch").unwrap();
    db.batch_execute("CREATE TEMP TABLE kept_open AS SELECT 1 AS one").unwrap();
    let state = wait_equal(&gw, &target_url);
    assert!(!state.keys().any(|k| k.contains("scratch") || k.contains("kept_open")), "{:?}", state.keys());
}

#[test]
fn a_command_that_cannot_be_replayed_is_named_in_the_status() {
    let target = TempPostgres::start_new();
    let target_url = target_database(&target, "replica");
    let dir = workdir();
    let gw = replicating_gateway(dir.path(), &target_url);
    let mut db = gw.db();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").unwrap();
    db.batch_execute("CREATE FUNCTION widen() RETURNS void LANGUAGE sql AS $$ ALTER TABLE t ADD COLUMN wide text $$; SELECT widen()").unwrap();
    let status = gw.wait_component("replication", "the relay to stop on the command", Duration::from_secs(60), |c| c["state"] == "backoff");
    let detail = status.to_string();
    assert!(detail.contains("ALTER TABLE (public.t)") && detail.contains("by hand"), "{status}");
}
