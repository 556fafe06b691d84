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
//!   [`crate::supervisor::Policy`] (which forks a child), but the same
//!   decisions — [`crate::supervisor::decide`] picks the retry delay, a
//!   failing relay is retried forever and shows `backoff` with the reason.
//! * [`status`] is what `/gateway/status` and `/metrics` show.

pub mod apply;
pub mod ddl;
pub mod pgoutput;
pub mod relay;
pub mod source;
pub mod status;
pub mod tls;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RestartPolicy;
use crate::postgres::cluster::{Cluster, APP_DATABASE};
use crate::status::{Board, State};
use crate::supervisor::{decide, Decision, Outcome};
use relay::DbRelay;
use status::{DbView, RelayView};

/// The relay's retries are cheap (two connections): never wait longer than
/// this for a target that came back.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// `PGSERVE_REPLICATION_*`, parsed.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// The target server and the database `omni` replicates into (secret: never logged).
    pub url: String,
    /// `PGSERVE_REPLICATION_DATABASES` as written; empty = `omni` alone.
    pub databases: Vec<String>,
    /// `PGSERVE_REPLICATION_MAX_WAL_MB`: the most WAL the relay's slot may hold.
    pub max_wal_mb: u64,
}

impl ReplicationConfig {
    /// Checks the URL: `postgres://` and readable by the client library.
    pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("expected a URL starting with postgres:// or postgresql://".into());
        }
        let (url, tls) = tls::split_url(url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        tls::configure(&mut config, &tls);
        if config.get_dbname().is_none() {
            return Err("the URL must name the database omni replicates into (postgres://user:password@host:5432/DATABASE)".into());
        }
        if config.get_user().is_none() {
            return Err("the URL must name a user (postgres://USER:password@host:5432/database)".into());
        }
        Ok(config)
    }

    /// The URL's TLS settings (`sslmode`, `sslrootcert`).
    pub fn tls(&self) -> Result<tls::TargetTls, String> {
        tls::split_url(&self.url).map(|(_, t)| t)
    }

    /// `host:port/database`, what the status shows of the target.
    pub fn display_target(&self) -> String {
        match Self::parse_url(&self.url) {
            Ok(c) => {
                let host = match c.get_hosts().first() {
                    Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                    Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                    None => "localhost".into(),
                };
                format!("{host}:{}/{}", c.get_ports().first().copied().unwrap_or(5432), c.get_dbname().unwrap_or(""))
            }
            Err(_) => omni_contract::redact::url_password(&self.url),
        }
    }

    /// `*` in `PGSERVE_REPLICATION_DATABASES`: every database of the
    /// embedded cluster that is not a template (resolved at each start).
    pub fn wants_every_database(&self) -> bool {
        self.databases.iter().any(|d| d == "*")
    }

    /// The embedded databases to replicate when they are named: the app
    /// database always, then the list in its order, without repeats.
    pub fn named_databases(&self) -> Vec<String> {
        let mut out = vec![APP_DATABASE.to_string()];
        for d in &self.databases {
            if d != "*" && !out.contains(d) {
                out.push(d.clone());
            }
        }
        out
    }

    /// Where the embedded database `db` goes on the target server: the app
    /// database into the URL's database, every other into the database of
    /// the same name. `Err` when that would share a target database with
    /// the app database (two databases' tables in one would collide).
    pub fn target_database(&self, db: &str) -> Result<String, String> {
        let url_db = Self::parse_url(&self.url)?.get_dbname().unwrap_or_default().to_string();
        if db == APP_DATABASE {
            return Ok(url_db);
        }
        if db == url_db {
            return Err(format!(
                "the embedded database {db} would be replicated into {db} on the target, which PGSERVE_REPLICATION_URL already gives to the app database {APP_DATABASE}: point the URL at another database, or leave {db} out of PGSERVE_REPLICATION_DATABASES"
            ));
        }
        Ok(db.to_string())
    }

    /// Checks the list as written (the `doctor` and start-up check).
    pub fn check_databases(&self) -> Result<(), String> {
        for d in &self.databases {
            if d == "*" {
                continue;
            }
            if d.len() > 63 || d.contains('\0') {
                return Err(format!("{d:?} is not a PostgreSQL database name (at most 63 bytes)"));
            }
            self.target_database(d)?;
        }
        Ok(())
    }
}

/// Server settings the embedded cluster needs for the relay. The relay keeps
/// its own cap (`relay.rs`); PostgreSQL's, one for every slot, is never set
/// below the WAL streamer's, so a small relay cap cannot cut point-in-time
/// recovery's stream.
pub fn server_settings(max_wal_mb: u64) -> [String; 2] {
    ["wal_level=logical".to_string(), format!("max_slot_wal_keep_size={}MB", max_wal_mb.max(crate::wal::MAX_SLOT_WAL_KEEP_MB))]
}

/// The running relay, for the stop.
pub struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the relay (an apply in flight is abandoned; the target rolls it
    /// back, and the slot still has it) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the relay: one supervised run per replicated database, shown
/// together on the board as `replication`.
pub fn spawn(config: &ReplicationConfig, cluster: &Arc<Cluster>, restart: RestartPolicy, board: &Board, tasks: &TaskTracker) -> Result<Running> {
    ReplicationConfig::parse_url(&config.url).map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_URL")?;
    config.check_databases().map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_DATABASES")?;
    let view = Arc::new(Mutex::new(RelayView::new(config.display_target())));
    board.set_replication(view.clone());
    let stop = CancellationToken::new();
    let restart = RestartPolicy { backoff_max: restart.backoff_max.min(MAX_RETRY_DELAY), ..restart };
    let tls = Arc::new(config.tls().map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_URL")?);
    let (config, cluster, runs, token) = (config.clone(), cluster.clone(), tasks.clone(), stop.clone());
    let task = tasks.spawn(async move {
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
    Ok(Running { stop, task })
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
            let client = crate::postgres::connect(&cluster.pg_config(APP_DATABASE)).await?;
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
        let jitter: f64 = rand::thread_rng().gen();
        let Decision::Retry { attempt, delay, .. } = decide(&restart, failures, Outcome::Failed { ready_for }, jitter) else {
            unreachable!("only Permanent outcomes give up")
        };
        failures = attempt;
        relay.set(|v| {
            v.attempts = attempt;
            v.next_retry = Some(Instant::now() + delay);
        });
        transition(&relay, State::Backoff, Some(format!("attempt {attempt}, next in {:.1} s, last: {why}", delay.as_secs_f64())));
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
        assert_eq!(server_settings(64), ["wal_level=logical".to_string(), "max_slot_wal_keep_size=1024MB".to_string()]);
        assert_eq!(server_settings(4096), ["wal_level=logical".to_string(), "max_slot_wal_keep_size=4096MB".to_string()]);
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
