//! The embedded PostgreSQL: finding binaries, preparing the cluster, and the
//! supervision policy that runs `postgres` as a direct child.
//!
//! Readiness is PostgreSQL's own word first, then a real query: the postmaster
//! writes `ready` into line 8 of `postmaster.pid` once it accepts connections
//! (what `pg_ctl -w` reads), and only then does the check connect and run
//! `SELECT 1`. Connecting earlier would be refused with `FATAL: the database
//! system is starting up`, one log line per attempt.
//!
//! The worker need not wait for that check: when the app database already
//! exists, it may start as soon as PostgreSQL accepts connections
//! ([`worker_may_start`]), so its connection and migration check run beside
//! the gateway's own; on a new cluster, as soon as the app database is
//! created, while the new files are still being flushed to disk. Each first connection after a start costs a backend
//! and its catalog caches, milliseconds that would otherwise add up.
//!
//! Layer: the embedded cluster, above `supervise`, `status`, `process` and
//! `config`. It never imports a feature (`pitr`, `relay`): what a feature
//! needs of the cluster is handed in ([`cluster::Needs`], [`slots`]).

pub mod binaries;
pub mod external;
pub mod cluster;
pub mod lock;
pub mod pidfile;
pub mod slots;
pub mod upgrade;
pub mod upgrade_settings;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tokio::process::Child;

use crate::process::child;
use crate::config::RestartPolicy;
use crate::status::{Board, State};
use crate::supervise::{CheckTiming, Policy, StopSignals};
use cluster::{Cluster, APP_DATABASE};

/// Supervision policy for `postgres`: health is a real `SELECT 1` over TCP,
/// stop is a fast shutdown (SIGINT) escalating to immediate (SIGQUIT).
pub struct PostgresPolicy {
    pub cluster: Arc<Cluster>,
    pub restart: RestartPolicy,
    /// Kept open between checks; dropped on any error and reconnected.
    client: Option<tokio_postgres::Client>,
    /// The postmaster of the current run, to tell its `postmaster.pid` from a stale one.
    pid: Option<u32>,
    /// Held by a point-in-time restore (`pitr::online`): a start waits for it.
    hold: Option<crate::supervise::gate::StartGate>,
    /// No check has run since this run's start (see `check`).
    first_check: bool,
}

impl PostgresPolicy {
    pub fn new(cluster: Arc<Cluster>, restart: RestartPolicy) -> Self {
        PostgresPolicy { cluster, restart, client: None, pid: None, hold: None, first_check: false }
    }

    /// Starts wait while a point-in-time restore holds `hold`.
    pub fn with_hold(mut self, hold: crate::supervise::gate::StartGate) -> Self {
        self.hold = Some(hold);
        self
    }

    /// Waits until the postmaster of this run says `ready` in its pid file.
    /// The file is re-read every millisecond: a read costs microseconds, and
    /// the wait ends within a millisecond of PostgreSQL being ready. The
    /// supervisor bounds the wait (its check timeout) and notices an exit.
    async fn wait_accepting(&self) {
        // PostgreSQL before 10 writes no status line; connecting is all there is.
        let Some(pid) = self.pid.filter(|_| self.cluster.binaries.major >= 10) else { return };
        let pid_file = self.cluster.data_dir.join("postmaster.pid");
        while postmaster_status(&pid_file, pid) != PostmasterStatus::Accepting {
            tokio::time::sleep(PID_FILE_POLL).await;
        }
    }
}

/// Returns when the worker may be started: once the app database exists
/// (from the start, or once the first start created it) and PostgreSQL
/// accepts connections, which is before the gateway's own check and, for a
/// new cluster, before its flush to disk has finished.
pub async fn worker_may_start(cluster: &Cluster, board: &Board) {
    if cluster.binaries.major < 10 {
        return until_ready(board).await;
    }
    let pid_file = cluster.data_dir.join("postmaster.pid");
    let mut app_database = cluster.app_database.subscribe();
    let accepting = async {
        if app_database.wait_for(|exists| *exists).await.is_err() {
            return std::future::pending().await;
        }
        loop {
            // Only the pid file of the run the supervisor started counts.
            let pid = board.snapshot().get("postgres").and_then(|c| c.pid);
            if pid.is_some_and(|pid| postmaster_status(&pid_file, pid) == PostmasterStatus::Accepting) {
                return;
            }
            tokio::time::sleep(PID_FILE_POLL).await;
        }
    };
    tokio::select! {
        () = until_ready(board) => {}
        () = accepting => {}
    }
}

/// Until PostgreSQL is `ready`. It is retried until it is, so this only
/// ends by being ready (the caller also listens for a stop).
async fn until_ready(board: &Board) {
    let mut rx = board.subscribe();
    while board.state("postgres") != Some(State::Ready) {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// After the postmaster was killed, its server processes notice and exit
/// by themselves, most at once; a walsender sending a base backup (the WAL
/// streamer's first one runs right after a start) only once its current file
/// is out. Until they are gone a new postmaster is refused; waiting up to
/// this long for them turns a failed start and a backoff into one start.
/// What is left after it is ended by the start's check of the pid file
/// (`pidfile::clear_stale`): a backend that was asking for a checkpoint
/// when the postmaster died (`pg_basebackup --checkpoint=fast` starting)
/// would retry its signal for a minute (PostgreSQL's `RequestCheckpoint`).
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

async fn wait_for_orphaned_backends(data_dir: &Path) {
    use pidfile::{Existence, Shmem};
    let deadline = std::time::Instant::now() + ORPHAN_GRACE;
    let mut logged = false;
    while std::time::Instant::now() < deadline {
        let orphans = pidfile::inspect(data_dir).is_some_and(|i| matches!(i.facts.shmem, Shmem::Attached(_)) && i.facts.existence != Existence::Running);
        if !orphans {
            return;
        }
        if !logged {
            tracing::info!("the previous postmaster is gone but some of its server processes are still exiting; waiting up to {} s for them", ORPHAN_GRACE.as_secs());
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Between two reads of `postmaster.pid` while PostgreSQL starts.
const PID_FILE_POLL: Duration = Duration::from_millis(1);

/// What `postmaster.pid` says about the postmaster `pid`.
#[derive(Debug, PartialEq, Eq)]
pub enum PostmasterStatus {
    /// `ready` (or `standby`): connections are accepted.
    Accepting,
    /// `starting`, `stopping`, no status line yet, or no file.
    NotYet,
    /// The file belongs to another process (a stale file not yet replaced).
    Other,
}

/// Reads line 1 (pid) and line 8 (status) of `postmaster.pid`, as `pg_ctl` does.
pub fn postmaster_status(pid_file: &Path, pid: u32) -> PostmasterStatus {
    let Ok(text) = std::fs::read_to_string(pid_file) else { return PostmasterStatus::NotYet };
    parse_postmaster_status(&text, pid)
}

fn parse_postmaster_status(text: &str, pid: u32) -> PostmasterStatus {
    let mut lines = text.lines();
    if lines.next().and_then(|l| l.trim().parse::<u32>().ok()) != Some(pid) {
        return PostmasterStatus::Other;
    }
    match lines.nth(6).map(str::trim) {
        Some("ready" | "standby") => PostmasterStatus::Accepting,
        _ => PostmasterStatus::NotYet,
    }
}

/// Creates the app database when it is missing. A cluster in recovery
/// (a point-in-time restore still replaying) cannot create it; it is
/// created by the first check after the promotion.
async fn ensure_app_database(client: &tokio_postgres::Client) -> Result<()> {
    // One unprepared round trip; the name is our constant.
    let rows = client
        .simple_query(&format!("SELECT pg_is_in_recovery()::text FROM (SELECT 1) one WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '{APP_DATABASE}')"))
        .await?;
    let in_recovery = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0) == Some("true")),
        _ => None,
    });
    match in_recovery {
        None => Ok(()),
        Some(true) => {
            tracing::warn!("the cluster has no database {APP_DATABASE} and is still in recovery: it is created once recovery ends");
            Ok(())
        }
        Some(false) => {
            tracing::info!("creating database {APP_DATABASE}");
            // Under OMNI_WAL_SYNC a commit waits for the WAL streamer, which
            // starts only once PostgreSQL is ready: this one must not.
            client.simple_query("SET synchronous_commit = local").await?;
            client.simple_query(&format!("CREATE DATABASE {APP_DATABASE}")).await.context("creating the app database")?;
            Ok(())
        }
    }
}

/// Opens a connection and drives it in the background.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Policy for PostgresPolicy {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn gate(&self) -> Option<crate::supervise::gate::StartGate> {
        self.hold.clone()
    }

    async fn start(&mut self) -> Result<Child> {
        self.client = None;
        if let Some(hold) = &self.hold {
            hold.wait("PostgreSQL").await;
        }
        // A cluster of another major, or binaries that are gone, stay so until
        // someone acts: `failed`, not retried (SIGHUP retries). A taken port or
        // a live pid file may clear up by themselves: backoff.
        cluster::check_version(&self.cluster.data_dir, &self.cluster.binaries).map_err(crate::supervise::permanent)?;
        wait_for_orphaned_backends(&self.cluster.data_dir).await;
        self.cluster.preflight()?;
        tracing::info!("starting PostgreSQL {} on 127.0.0.1:{}", self.cluster.binaries.major, self.cluster.port);
        let child = child::spawn(self.cluster.postgres_spec()).await.map_err(|e| {
            let unfixable = matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied);
            let e = anyhow::Error::new(e).context("could not start postgres");
            if unfixable { crate::supervise::permanent(e) } else { e }
        })?;
        self.pid = child.id();
        self.first_check = true;
        Ok(child)
    }

    async fn check(&mut self) -> Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.wait_accepting().await;
            // The first check of a run whose app database exists: the pid
            // file's `ready` is PostgreSQL's own word (what `pg_ctl -w` waits
            // for), and the worker is connecting right now. The gateway's
            // own connection, a second new backend competing for the same
            // cores, waits for the next (liveness) check.
            if std::mem::take(&mut self.first_check) && self.cluster.binaries.major >= 10 && *self.cluster.app_database.borrow() {
                return Ok(());
            }
            let client = connect(&self.cluster.pg_config("postgres")).await?;
            // Every new connection confirms the app database, not only a new
            // cluster's first: a first start that stopped between initdb and
            // CREATE DATABASE (its port taken, a Ctrl-C), or a database
            // dropped by hand, would otherwise leave the worker waiting for
            // it forever.
            ensure_app_database(&client).await?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        if let Err(e) = client.simple_query("SELECT 1").await {
            self.client = None;
            return Err(e.into());
        }
        Ok(())
    }

    async fn on_ready(&mut self) -> Result<()> {
        if self.client.is_none() {
            // Ready by the pid file (`check`): the cluster is not new, so
            // there is nothing to flush; the next (liveness) check connects
            // and confirms the app database.
            return Ok(());
        }
        // The check that connected made sure the app database exists.
        // The worker may start now, while a new cluster is still being flushed.
        self.cluster.app_database.send_replace(true);
        // A brand-new cluster counts as ready only once it is on disk.
        if let Some(flush) = self.cluster.durable.lock().await.take() {
            flush.await.context("the flush of the new cluster did not finish")??;
        }
        Ok(())
    }

    fn stop_signals(&self) -> StopSignals {
        StopSignals { first: Signal::SIGINT, second: Some(Signal::SIGQUIT), grace: self.restart.stop_timeout }
    }

    fn timing(&self) -> CheckTiming {
        CheckTiming {
            // A check waits on the pid file itself; this only spaces out
            // retries after a failed connection.
            ready_poll: Duration::from_millis(5),
            // Crash recovery of a large cluster can take minutes; while the
            // process lives and recovers, it is not restarted.
            start_timeout: Duration::from_secs(600),
            live_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(3),
            failures_before_restart: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postmaster_pid_status_is_read_as_pg_ctl_reads_it() {
        let file = |status: &str| format!("4242\n/srv/data\n1767225600\n5432\n/tmp\n127.0.0.1\n  5432001    98304\n{status}\n");
        assert_eq!(parse_postmaster_status(&file("ready   "), 4242), PostmasterStatus::Accepting);
        assert_eq!(parse_postmaster_status(&file("standby "), 4242), PostmasterStatus::Accepting);
        assert_eq!(parse_postmaster_status(&file("starting"), 4242), PostmasterStatus::NotYet);
        assert_eq!(parse_postmaster_status(&file("stopping"), 4242), PostmasterStatus::NotYet);
        assert_eq!(parse_postmaster_status("4242\n/srv/data\n", 4242), PostmasterStatus::NotYet);
        assert_eq!(parse_postmaster_status(&file("ready   "), 1), PostmasterStatus::Other);
    }
}
