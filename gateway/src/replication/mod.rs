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
pub mod pgoutput;
pub mod relay;
pub mod source;
pub mod status;

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
use status::RelayView;

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
    /// `PGSERVE_REPLICATION_MAX_WAL_MB`: `max_slot_wal_keep_size`.
    pub max_wal_mb: u64,
}

impl ReplicationConfig {
    /// Checks the URL: `postgres://` and readable by the client library.
    pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("expected a URL starting with postgres:// or postgresql://".into());
        }
        let config: tokio_postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if config.get_dbname().is_none() {
            return Err("the URL must name the database omni replicates into (postgres://user:password@host:5432/DATABASE)".into());
        }
        if config.get_user().is_none() {
            return Err("the URL must name a user (postgres://USER:password@host:5432/database)".into());
        }
        Ok(config)
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

    /// Embedded databases to replicate. Only the app database for now:
    /// `PGSERVE_REPLICATION_DATABASES` beyond `omni` is reported, not acted on.
    pub fn replicated_databases(&self) -> Vec<String> {
        vec![APP_DATABASE.to_string()]
    }
}

/// Server settings the embedded cluster needs for the relay.
pub fn server_settings(max_wal_mb: u64) -> [String; 2] {
    ["wal_level=logical".to_string(), format!("max_slot_wal_keep_size={max_wal_mb}MB")]
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

/// Starts the relay for the app database; the board shows it as `replication`.
pub fn spawn(config: &ReplicationConfig, cluster: &Arc<Cluster>, restart: RestartPolicy, board: &Board, tasks: &TaskTracker) -> Result<Running> {
    let target = ReplicationConfig::parse_url(&config.url).map_err(anyhow::Error::msg).context("PGSERVE_REPLICATION_URL")?;
    let databases = config.replicated_databases();
    let extra: Vec<&String> = config.databases.iter().filter(|d| d.as_str() != APP_DATABASE).collect();
    if !extra.is_empty() {
        tracing::warn!(
            "PGSERVE_REPLICATION_DATABASES names {extra:?}: this version replicates the app database {APP_DATABASE} only; the others are not sent"
        );
    }
    let view = Arc::new(Mutex::new(RelayView::new(config.display_target(), databases.clone())));
    board.set_replication(view.clone());
    let relay = DbRelay {
        source_db: APP_DATABASE.to_string(),
        source: cluster.pg_config(APP_DATABASE),
        target,
        bin_dir: cluster.binaries.dir.clone(),
        view,
    };
    tracing::info!("replicating {databases:?} to {}", config.display_target());
    let stop = CancellationToken::new();
    let restart = RestartPolicy { backoff_max: restart.backoff_max.min(MAX_RETRY_DELAY), ..restart };
    let task = tasks.spawn(supervise(relay, restart, stop.clone()));
    Ok(Running { stop, task })
}

/// Runs the relay until `stop`, retrying failed runs with backoff.
async fn supervise(relay: DbRelay, restart: RestartPolicy, stop: CancellationToken) {
    let mut failures = 0;
    let mut first = true;
    loop {
        transition(&relay.view, State::Starting, (failures > 0).then(|| format!("attempt {}", failures + 1)));
        if !first {
            relay.view.lock().unwrap_or_else(|e| e.into_inner()).restarts += 1;
        }
        first = false;
        let ready_at: Mutex<Option<Instant>> = Mutex::new(None);
        let result = tokio::select! {
            r = relay.run(&stop, || {
                *ready_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                transition(&relay.view, State::Ready, None);
            }) => r,
            _ = stop.cancelled() => Ok(()),
        };
        if stop.is_cancelled() {
            transition(&relay.view, State::Stopped, None);
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
        {
            let mut v = relay.view.lock().unwrap_or_else(|e| e.into_inner());
            v.attempts = attempt;
            v.next_retry = Some(Instant::now() + delay);
        }
        transition(&relay.view, State::Backoff, Some(format!("attempt {attempt}, next in {:.1} s, last: {why}", delay.as_secs_f64())));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => {
                transition(&relay.view, State::Stopped, None);
                return;
            }
        }
    }
}

/// Moves the relay's state, logging the change as the board does for children.
fn transition(view: &Mutex<RelayView>, state: State, detail: Option<String>) {
    let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
    if v.state != state {
        match (&detail, state) {
            (Some(d), State::Backoff) => tracing::warn!(component = "replication", "{} → {state}: {d}", v.state),
            (Some(d), _) => tracing::info!(component = "replication", "{} → {state}: {d}", v.state),
            (None, _) => tracing::info!(component = "replication", "{} → {state}", v.state),
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
        assert_eq!(server_settings(64), ["wal_level=logical".to_string(), "max_slot_wal_keep_size=64MB".to_string()]);
    }
}
