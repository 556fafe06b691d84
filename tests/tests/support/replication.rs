//! What the replication tests share: a target database on a second
//! PostgreSQL, sessions that print values alike on both sides, and waiting
//! until the target holds exactly the source's tables and rows.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use omni_tests::TempPostgres;

use crate::gateway::Gateway;

/// Fixed output settings, so both sides print the same value the same way
/// whatever the server's or the database's defaults.
const SESSION: &str = "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = 'UTC'; SET extra_float_digits = 1";

/// A database `name` on `target`, and the URL the gateway is given for it.
pub fn target_database(target: &TempPostgres, name: &str) -> String {
    target.client().batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    format!("postgres://postgres@127.0.0.1:{}/{name}", target.port())
}

/// The embedded cluster's app database, as its superuser.
pub fn embedded_url(gw: &Gateway) -> String {
    let password = std::fs::read_to_string(gw.cwd.join("data/postgres.password")).unwrap();
    format!("postgres://postgres:{}@127.0.0.1:{}/omni", password.trim(), gw.pg_port)
}

pub fn connect(url: &str) -> postgres::Client {
    try_connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

fn try_connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    c.batch_execute(SESSION)?;
    Ok(c)
}

/// Every user table of a database and its full content, rows sorted.
pub fn contents(client: &mut postgres::Client) -> BTreeMap<String, String> {
    try_contents(client).unwrap()
}

/// [`contents`], or the error of a read that met a table renamed or
/// dropped between the listing and its own query: a target that the relay
/// is changing at that moment.
pub fn try_contents(client: &mut postgres::Client) -> Result<BTreeMap<String, String>, postgres::Error> {
    let tables = client.query(
        "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
         WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema', 'omni_relay')
           AND table_name <> 'omni_relay_progress'",
        &[],
    )?;
    tables
        .iter()
        .map(|r| {
            let t: String = r.get(0);
            let rows: String = client.query_one(&format!("SELECT coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '') FROM {t} x"), &[])?.get(0);
            Ok((t, rows))
        })
        .collect()
}

/// Waits until the target holds exactly the app database's tables and rows.
pub fn wait_identical(gw: &Gateway, target_url: &str, timeout: Duration) -> BTreeMap<String, String> {
    wait_identical_db(gw, "omni", target_url, timeout)
}

/// Waits until the target holds exactly the tables and rows of the embedded database `db`.
pub fn wait_identical_db(gw: &Gateway, db: &str, target_url: &str, timeout: Duration) -> BTreeMap<String, String> {
    let mut source = connect(&embedded_url(gw).replace("/omni", &format!("/{db}")));
    let deadline = Instant::now() + timeout;
    loop {
        let want = contents(&mut source);
        // The target is read while the relay writes it: a table it renames
        // between the listing and the read is "not identical yet".
        let got = try_connect(target_url).ok().and_then(|mut c| try_contents(&mut c).ok());
        if got.as_ref() == Some(&want) {
            return want;
        }
        if Instant::now() > deadline {
            let got = got.unwrap_or_default();
            let diff: Vec<String> = want
                .iter()
                .filter(|(t, rows)| got.get(*t) != Some(rows))
                .map(|(t, rows)| format!("{t}: source has {} rows, target {:?}", rows.lines().count(), got.get(t).map(|r| r.lines().count())))
                .chain(got.keys().filter(|t| !want.contains_key(*t)).map(|t| format!("{t}: only on the target")))
                .collect();
            panic!("target not identical after {timeout:?}: {diff:#?}\nstatus: {}\ngateway log:\n{}", gw.component("replication"), gw.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
