//! The replication relay (SPEC §8, issue 11): the embedded cluster's changes,
//! decoded from a logical replication slot, applied to an external
//! PostgreSQL over an ordinary connection. The target needs no route back
//! to this machine and no superuser.
//!
//! * [`pgoutput`] decodes the slot's messages; [`apply`] turns them into SQL;
//! * [`source`] prepares the embedded database (publication, DDL capture,
//!   slot) and makes the initial copy;
//! * [`relay`] is one run for one database: copy if needed, then stream,
//!   exactly once (its module docs say why nothing is missed or doubled);
//! * this module supervises the runs: an in-process task, so not a
//!   [`crate::supervise::Policy`] (which forks a child), but the same
//!   decisions — [`crate::supervise::decide`] picks the retry delay, a
//!   failing relay is retried forever and shows `backoff` with the reason.
//! * [`crate::status::relay`] is what `/gateway/status` and `/metrics` show.
//!
//! **Turning it off.** A logical slot stops PostgreSQL from starting
//! without `wal_level=logical` (it FATALs on the slot). So a start without
//! `PGSERVE_REPLICATION_URL`, and a major upgrade, first remove the relay's
//! slots from the stopped cluster ([`crate::pg::slots::drop_slots_offline`]), the way
//! PostgreSQL drops a slot itself; once PostgreSQL serves, a start without
//! the URL also drops the relay's publication, DDL capture and schema
//! ([`remove_leftovers`]). Turned on again, the relay finds no slot and
//! copies anew.
//!
//! Layer: above `pitr`, `pg`, `supervise`, `status`, `process` and
//! `config`; it parses its own settings (`config.rs`).

pub mod apply;
pub mod config;
pub mod ddl;
pub mod pgoutput;
pub mod relay;
pub mod source;
pub mod tls;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use crate::supervise::shutdown::Stage;

use crate::config::RestartPolicy;
use crate::pg::cluster::{Cluster, APP_DATABASE};
use crate::status::{Board, State};
use crate::supervise::{decide, Decision, Outcome};
pub use config::ReplicationConfig;
use relay::DbRelay;
use crate::status::relay::{DbView, RelayView};

/// The relay's retries are cheap (two connections): never wait longer than
/// this for a target that came back.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// A full copy dumps the whole database: one that fails again (a target
/// that refuses the schema, a full disk) is retried after a minute, then
/// after twice as long each time, up to [`COPY_RETRY_MAX`].
const COPY_RETRY_FIRST: Duration = Duration::from_secs(60);
const COPY_RETRY_MAX: Duration = Duration::from_secs(30 * 60);

/// The wait before the next run after `copy_failures` failed copies in a
/// row; `None`: the ordinary retry delay (the first failure may be passing).
fn copy_retry_delay(copy_failures: u32) -> Option<Duration> {
    (copy_failures >= 2).then(|| COPY_RETRY_FIRST.saturating_mul(1 << (copy_failures - 2).min(10)).min(COPY_RETRY_MAX))
}

/// The relay's logical slots are named `omni_relay_<database>` (`relay.rs`);
/// the cluster drops them offline when the relay is off ([`crate::pg::slots`]).
pub use crate::pg::slots::RELAY_SLOT_PREFIX as SLOT_PREFIX;
/// The DDL capture's event trigger (`source.rs`).
/// The relay's event triggers (DDL capture, drops, rewrites: source.rs) are all named so.
const EVENT_TRIGGERS: &str = "omni\\_relay\\_%";

/// With `PGSERVE_REPLICATION_URL` unset, what an earlier run's relay left in
/// the embedded databases (publication `omni_relay`, the DDL capture's event
/// trigger, the schema `omni_relay`) is dropped once PostgreSQL serves: the
/// publication would make updates of a table without a key fail, the
/// capture would write a message for every DDL. Each database is cleaned in
/// one transaction; one that cannot be is logged and left as it was.
pub async fn remove_leftovers(cluster: Arc<Cluster>) {
    let listed = async {
        let client = crate::pg::connect(&cluster.pg_config(APP_DATABASE)).await?;
        let rows = client.query("SELECT datname::text FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY datname", &[]).await?;
        anyhow::Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
    };
    let databases = match listed.await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("PGSERVE_REPLICATION_URL is not set, but the databases could not be listed to drop what the replication relay left ({e:#})");
            return;
        }
    };
    for db in databases {
        let cleaned = async {
            let client = crate::pg::connect(&cluster.pg_config(&db)).await?;
            let found: bool = client
                .query_one(
                    &format!(
                        "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = '{p}') OR EXISTS (SELECT FROM pg_event_trigger WHERE evtname LIKE '{t}')
                             OR EXISTS (SELECT FROM pg_namespace WHERE nspname = 'omni_relay')
                             OR EXISTS (SELECT FROM pg_replication_slots WHERE slot_name LIKE 'omni\\_relay\\_%' AND database = current_database() AND NOT active)",
                        p = source::PUBLICATION,
                        t = EVENT_TRIGGERS
                    ),
                    &[],
                )
                .await?
                .get(0);
            if !found {
                return anyhow::Ok(false);
            }
            client
                .batch_execute(&format!(
                    "SET client_min_messages = warning;
                     BEGIN;
                     SET LOCAL omni_relay.internal = 'on';
                     DO $omni$ DECLARE t name; BEGIN
                       FOR t IN SELECT evtname FROM pg_event_trigger WHERE evtname LIKE '{t}' LOOP
                         EXECUTE format('DROP EVENT TRIGGER %I', t);
                       END LOOP;
                     END $omni$;
                     DROP PUBLICATION IF EXISTS {p};
                     DROP SCHEMA IF EXISTS omni_relay CASCADE;
                     COMMIT;
                     SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                      WHERE slot_name LIKE 'omni\\_relay\\_%' AND database = current_database() AND NOT active",
                    p = source::PUBLICATION,
                    t = EVENT_TRIGGERS
                ))
                .await?;
            anyhow::Ok(true)
        };
        match cleaned.await {
            Ok(false) => {}
            Ok(true) => tracing::info!(
                database = %db,
                "PGSERVE_REPLICATION_URL is not set: dropped the replication relay's publication {}, its DDL capture and its schema omni_relay in {db}",
                source::PUBLICATION
            ),
            Err(e) => tracing::warn!(database = %db, "PGSERVE_REPLICATION_URL is not set, but what the replication relay left in {db} could not be dropped ({e:#}): drop the publication {}, the event triggers omni_relay_* and the schema omni_relay there by hand", source::PUBLICATION),
        }
    }
}

/// Starts the relay on `stage`: one supervised run per replicated
/// database, shown together on the board as `replication`. The stage's
/// stop ends it (an apply in flight is abandoned; the target rolls it back,
/// and the slot still has it).
pub fn spawn(config: &ReplicationConfig, cluster: &Arc<Cluster>, restart: RestartPolicy, board: &Board, stage: &Stage) -> Result<()> {
    ReplicationConfig::parse_url(&config.url).map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_URL")?;
    config.check_databases().map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_DATABASES")?;
    let view = Arc::new(Mutex::new(RelayView::new(config.display_target())));
    board.set_replication(view.clone());
    let restart = RestartPolicy { backoff_max: restart.backoff_max.min(MAX_RETRY_DELAY), ..restart };
    let tls = Arc::new(config.tls().map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_URL")?);
    let (config, cluster, runs, token) = (config.clone(), cluster.clone(), stage.clone(), stage.token());
    stage.spawn(async move {
        let Some(databases) = databases_to_replicate(&config, &cluster, &view, &token).await else { return };
        tracing::info!("replicating {databases:?} to {}", config.display_target());
        let mut handles = Vec::new();
        for (index, db) in databases.iter().enumerate() {
            let mut target = ReplicationConfig::parse_url(&config.url).expect("checked above");
            let target_db = config.target_database(db);
            view.lock().unwrap_or_else(|e| e.into_inner()).dbs.push(DbView::new(db.clone(), target_db.clone().unwrap_or_default()));
            let relay = DbRelay {
                source_db: db.clone(),
                source: cluster.pg_config(db),
                create_from: (db != APP_DATABASE).then(|| target.clone()),
                target: target.dbname(target_db.as_deref().unwrap_or(db)).clone(),
                tls: tls.clone(),
                bin_dir: cluster.binaries.dir.clone(),
                account: cluster.account.clone(),
                view: view.clone(),
                index,
                max_wal_bytes: i64::try_from(config.max_wal_mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX),
                dropped_over_cap: Default::default(),
            };
            match target_db {
                Ok(_) => handles.push(runs.spawn(supervise(relay, restart, token.clone()))),
                // Only a `*` list reaches this (a named one is checked at
                // start): that database is shown as not replicable, the others go on.
                Err(why) => transition(&relay, State::Failed, Some(why)),
            }
        }
        for h in handles {
            let _ = h.await;
        }
    });
    Ok(())
}

/// The databases to replicate: the named ones, or with `*` every database
/// of the embedded cluster that accepts connections and is not a template
/// (listed once, at this start: a database created later joins at the next
/// start or SIGHUP-free restart of the gateway). `None` when stopped first.
async fn databases_to_replicate(config: &ReplicationConfig, cluster: &Cluster, view: &Mutex<RelayView>, stop: &CancellationToken) -> Option<Vec<String>> {
    if !config.wants_every_database() {
        return Some(config.named_databases());
    }
    loop {
        let listed = async {
            let client = crate::pg::connect(&cluster.pg_config(APP_DATABASE)).await?;
            let rows = client.query("SELECT datname::text FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY datname", &[]).await?;
            anyhow::Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
        };
        match listed.await {
            Ok(all) => {
                let mut out = config.named_databases();
                out.extend(all.into_iter().filter(|d| !out.contains(d)).collect::<Vec<_>>());
                view.lock().unwrap_or_else(|e| e.into_inner()).detail = None;
                return Some(out);
            }
            Err(e) => {
                view.lock().unwrap_or_else(|e| e.into_inner()).detail = Some(format!("listing the embedded databases for PGSERVE_REPLICATION_DATABASES=*: {e:#}"));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// Runs one database's relay until `stop`, retrying failed runs with backoff.
async fn supervise(relay: DbRelay, restart: RestartPolicy, stop: CancellationToken) {
    let mut failures = 0;
    let mut copy_failures = 0;
    let mut first = true;
    loop {
        transition(&relay, State::Starting, (failures > 0).then(|| format!("attempt {}", failures + 1)));
        if !first {
            relay.set(|v| v.restarts += 1);
        }
        first = false;
        let ready_at: Mutex<Option<Instant>> = Mutex::new(None);
        let result = tokio::select! {
            r = relay.run(&stop, || {
                *ready_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                transition(&relay, State::Ready, None);
            }) => r,
            _ = stop.cancelled() => Ok(()),
        };
        if stop.is_cancelled() {
            transition(&relay, State::Stopped, None);
            return;
        }
        let why = match result {
            Ok(()) => "the relay ended without being asked".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let ready_for = ready_at.lock().unwrap_or_else(|e| e.into_inner()).map(|t| t.elapsed());
        // The run sets "copying …" while it copies and clears it once streaming.
        let copying = relay.view.lock().unwrap_or_else(|e| e.into_inner()).dbs[relay.index].detail.as_deref().is_some_and(|d| d.starts_with("copying "));
        copy_failures = if copying { copy_failures + 1 } else if ready_for.is_some() { 0 } else { copy_failures };
        let jitter: f64 = rand::thread_rng().gen();
        let Decision::Retry { attempt, delay, .. } = decide(&restart, failures, Outcome::Failed { ready_for }, jitter) else {
            unreachable!("only Permanent outcomes give up")
        };
        failures = attempt;
        let (delay, detail) = match copy_retry_delay(copy_failures).filter(|_| copying) {
            Some(long) => (
                long,
                format!("the full copy failed {copy_failures} times in a row; the next copy in {} min, last: {why}", long.as_secs().div_ceil(60)),
            ),
            None => (delay, format!("attempt {attempt}, next in {:.1} s, last: {why}", delay.as_secs_f64())),
        };
        relay.set(|v| {
            v.attempts = attempt;
            v.next_retry = Some(Instant::now() + delay);
        });
        transition(&relay, State::Backoff, Some(detail));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => {
                transition(&relay, State::Stopped, None);
                return;
            }
        }
    }
}

/// Moves one database's relay state, logging the change as the board does for children.
fn transition(relay: &DbRelay, state: State, detail: Option<String>) {
    let db = relay.source_db.clone();
    relay.set(|v| {
        if v.state != state {
            match (&detail, state) {
                (Some(d), State::Backoff | State::Failed) => tracing::warn!(component = "replication", database = %db, "{} → {state}: {d}", v.state),
                (Some(d), _) => tracing::info!(component = "replication", database = %db, "{} → {state}: {d}", v.state),
                (None, _) => tracing::info!(component = "replication", database = %db, "{} → {state}", v.state),
            }
        }
        if state != State::Backoff {
            v.next_retry = None;
        }
        if state == State::Ready {
            v.attempts = 0;
        }
        v.state = state;
        v.detail = detail;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_url_must_name_user_and_database_and_is_shown_without_password() {
        assert!(ReplicationConfig::parse_url("mysql://x").is_err());
        assert!(ReplicationConfig::parse_url("postgres://u:p@h:5433").is_err(), "no database");
        let c = ReplicationConfig { url: "postgres://u:secret@db.example:5433/copy".into(), databases: vec![], max_wal_mb: 1024 };
        assert_eq!(c.display_target(), "db.example:5433/copy");
    }

    #[test]
    fn a_copy_that_keeps_failing_waits_minutes_doubling_up_to_half_an_hour() {
        assert_eq!(copy_retry_delay(1), None, "a first failure is retried as any other");
        assert_eq!(copy_retry_delay(2), Some(Duration::from_secs(60)));
        assert_eq!(copy_retry_delay(3), Some(Duration::from_secs(120)));
        assert_eq!(copy_retry_delay(6), Some(Duration::from_secs(960)));
        assert_eq!(copy_retry_delay(7), Some(COPY_RETRY_MAX));
        assert_eq!(copy_retry_delay(u32::MAX), Some(COPY_RETRY_MAX));
    }

    #[test]
    fn other_databases_go_into_their_namesakes_and_never_into_the_app_databases_target() {
        let c = |dbs: &[&str]| ReplicationConfig { url: "postgres://u@h/copy".into(), databases: dbs.iter().map(|d| d.to_string()).collect(), max_wal_mb: 1 };
        assert_eq!(c(&[]).named_databases(), ["omni"]);
        assert_eq!(c(&["extra", "omni", "extra", "*"]).named_databases(), ["omni", "extra"]);
        assert!(c(&["extra", "*"]).wants_every_database());
        assert_eq!(c(&[]).target_database("omni").unwrap(), "copy");
        assert_eq!(c(&[]).target_database("extra").unwrap(), "extra");
        let clash = c(&["copy"]).check_databases().unwrap_err();
        assert!(clash.contains("PGSERVE_REPLICATION_URL") && clash.contains("copy"), "{clash}");
        assert!(c(&[&"x".repeat(64)]).check_databases().is_err());
        assert!(c(&["*", "extra"]).check_databases().is_ok());
    }
}
