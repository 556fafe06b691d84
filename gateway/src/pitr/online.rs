//! Point-in-time recovery while the gateway runs: what
//! `POST /api/v1/backup/restore-to`, `POST /api/v1/backup/base` and
//! `GET /api/v1/backup/window` reach through the worker (the worker calls
//! the gateway's internal endpoints, `internal.rs`).
//!
//! A restore to a time: PostgreSQL, then the WAL streamer, are stopped
//! through their own supervisors (a restart whose start waits on
//! [`StartGate`]); PostgreSQL first, so that everything it acknowledged reaches
//! the archive before the streamer ends (see `run_restore`), the
//! data directory is restored with [`restore::Restore`] (moved aside, put
//! back on any failure), then the hold is released, the supervisors start
//! both again, and the answer waits until PostgreSQL and the worker serve.
//! The worker is not stopped: its pool answers 503 while PostgreSQL is down
//! and reconnects once it is back (same process), so the request that asked
//! for the restore is held open by it and answered at the end, and no other
//! request reaches the database meanwhile. Progress goes to the log and to
//! `/gateway/status` (`restore`: step, percent). One restore or on-demand
//! base backup at a time: a second one gets 409.
//!
//! Runs detached from the HTTP request: a client that hangs up does not
//! cut a restore off half way (the data directory must never be left aside).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use super::restore::{self, Restore, Target};
use super::{base, Server};
use crate::config::WalConfig;
use crate::pg::cluster::Cluster;
use crate::pg::pidfile;
use crate::status::{Board, State};
use crate::supervise::gate::StartGate;
use crate::supervise::shutdown::Stage;
use crate::supervise::Command;

/// Longest the proxy waits for `POST /api/v1/backup/restore-to`: a restore
/// may replay WAL for up to an hour, plus stopping and starting.
pub const RESTORE_ANSWER_LIMIT: Duration = Duration::from_secs(3600 + 600);
/// How long PostgreSQL and the worker may take to serve again after a restore.
const BACK_LIMIT: Duration = Duration::from_secs(180);

/// The proxy's timeout for a request to `path`: the restore endpoint
/// answers only once the restored cluster serves.
pub fn upstream_timeout(path: &str, usual: Duration) -> Duration {
    if path == "/api/v1/backup/restore-to" { usual.max(RESTORE_ANSWER_LIMIT) } else { usual }
}

/// Why a request was refused, as the HTTP answer says it.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
}

fn refuse(status: u16, code: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal { status, code, detail: detail.into() }
}

pub struct Online {
    cluster: Arc<Cluster>,
    wal: WalConfig,
    board: Board,
    hold: StartGate,
    /// Held by a restore or an on-demand base backup.
    busy: Arc<Mutex<()>>,
    /// The base-backup task's lock: no base backup runs during a restore.
    base_busy: Arc<Mutex<()>>,
    /// Where restores and on-demand base backups run (the stop waits for them).
    jobs: Stage,
    postgres: mpsc::Sender<Command>,
    /// Set once the streamer's supervisor runs (it may start later than PostgreSQL's).
    streamer: OnceLock<mpsc::Sender<Command>>,
    stop_timeout: Duration,
}

impl Online {
    pub fn new(cluster: Arc<Cluster>, wal: WalConfig, board: Board, hold: StartGate, base: &super::BaseBackups, postgres: mpsc::Sender<Command>, stop_timeout: Duration) -> Online {
        Online { cluster, wal, board, hold, busy: Arc::default(), base_busy: base.lock(), jobs: base.stage().clone(), postgres, streamer: OnceLock::new(), stop_timeout }
    }

    /// Runs `job` on the shutdown stage of point-in-time recovery: a stop
    /// waits for it within the stage's grace, and abandons it only when
    /// hurried or once every stage has stopped (a restore's journal then
    /// finishes or undoes it at the next start).
    async fn on_stage<T: Send + 'static>(&self, failed: &'static str, job: impl std::future::Future<Output = Result<T, Refusal>> + Send + 'static) -> Result<T, Refusal> {
        let hurry = self.jobs.hurried();
        let handle = self.jobs.spawn(async move {
            tokio::select! {
                out = job => out,
                () = hurry.cancelled() => Err(refuse(503, "stopping", "the gateway stopped before this finished; a restore under way is finished or undone at the next start")),
            }
        });
        handle.await.unwrap_or_else(|e| Err(refuse(500, failed, format!("the task failed: {e}"))))
    }

    pub fn set_streamer(&self, commands: mpsc::Sender<Command>) {
        let _ = self.streamer.set(commands);
    }

    /// The WAL archive's directory (`OMNI_WAL_DIR`).
    pub fn wal_dir(&self) -> &std::path::Path {
        &self.wal.dir
    }

    /// `{"earliest", "latest", "base_backups", "streaming", "last_drill"}`;
    /// `earliest`/`latest` are those of `omni-gateway restore --window`.
    pub fn window(&self) -> Value {
        let w = restore::window(&self.wal.dir);
        let show = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
        let backups: Vec<Value> = base::list(&self.wal.dir)
            .iter()
            .rev()
            .map(|b| {
                json!({
                    "id": b.id,
                    "started_at": b.started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                    "finished_at": b.finished_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                    "bytes": b.bytes,
                    // Only a backup that passed its check is ever named (base.rs).
                    "verified": true,
                })
            })
            .collect();
        let drill = restore::last_drill(&self.wal.dir).map(|d| json!({ "at": d.at.to_rfc3339_opts(SecondsFormat::Millis, true), "ok": d.ok, "detail": d.detail }));
        let timelines: Vec<Value> = restore::windows(&self.wal.dir)
            .iter()
            .rev()
            .map(|t| json!({ "timeline": t.timeline, "began_at": show(super::archive::began_at(&self.wal.dir, t.timeline)), "earliest": show(t.earliest), "latest": show(t.latest) }))
            .collect();
        json!({
            "earliest": show(w.earliest),
            "latest": show(w.latest),
            "timeline": w.timeline,
            "timelines": timelines,
            "streaming": self.board.state("wal") == Some(State::Ready),
            "base_backups": backups,
            "last_drill": drill,
            // OMNI_ENCRYPT_LOCAL: base backups and completed segments are kept encrypted.
            "encrypted_locally": super::sealed::encryption().is_some(),
        })
    }

    /// A base backup now, verified; answers when it is kept.
    pub async fn base_backup(self: &Arc<Self>) -> Result<Value, Refusal> {
        let Ok(busy) = self.busy.clone().try_lock_owned() else {
            return Err(refuse(409, "pitr_busy", "a point-in-time restore or another base backup is running; try again once it is done"));
        };
        // A scheduled base backup finishing (or its retention) is waited for, not refused.
        let base_busy = self.base_busy.clone().lock_owned().await;
        if self.board.state("postgres") != Some(State::Ready) {
            return Err(refuse(503, "database_unavailable", "PostgreSQL is not serving right now, so no base backup can be taken; retry shortly"));
        }
        let this = self.clone();
        let b = self
            .on_stage("base_backup_failed", async move {
                let _held = (busy, base_busy);
                let backup = base::take(&Server::of(&this.cluster), &this.wal).await.map_err(|e| refuse(500, "base_backup_failed", format!("the base backup failed: {e:#}")))?;
                if let Err(e) = base::apply_retention(&this.wal) {
                    tracing::error!("WAL retention failed: {e:#}");
                }
                Ok(backup)
            })
            .await?;
        Ok(json!({
            "id": b.id,
            "started_at": b.started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "finished_at": b.finished_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "bytes": b.bytes,
            "verified": true,
        }))
    }

    /// Restores to `target` on `timeline` (`None`: the one that served at
    /// the target time, or the newest for `latest`); answers once PostgreSQL
    /// and the worker serve again.
    pub async fn restore_to(self: &Arc<Self>, target: Target, timeline: Option<u32>) -> Result<Value, Refusal> {
        let Ok(busy) = self.busy.clone().try_lock_owned() else {
            return Err(refuse(409, "pitr_busy", "a point-in-time restore or a base backup is already running; wait for it (GET /gateway/status shows its progress)"));
        };
        let timeline = match restore::target_timeline(&self.wal.dir, target, timeline) {
            Ok(t) => t,
            Err(e) => return Err(refuse(422, "unknown_timeline", e.to_string())),
        };
        let window = restore::window_on(&self.wal.dir, timeline);
        let Some(earliest) = window.earliest else {
            if restore::window(&self.wal.dir).earliest.is_some() {
                return Err(refuse(400, "outside_window", format!("no verified base backup restores onto timeline {timeline}; pick another timeline or time (GET /api/v1/backup/window lists each timeline's window)")));
            }
            return Err(refuse(409, "no_base_backup", "there is no verified base backup yet, so there is nothing to restore from; take one (POST /api/v1/backup/base)"));
        };
        // OMNI_ENCRYPT_LOCAL without the identity: refused before anything stops.
        if let Some(newest) = base::list(&self.wal.dir).pop() {
            if let Err(e) = super::sealed::check_restorable(&self.wal.dir, &newest.dir(&self.wal.dir)) {
                return Err(refuse(409, "identity_needed", format!("the WAL archive is encrypted (OMNI_ENCRYPT_LOCAL) and cannot be read here: {e}; nothing was changed")));
            }
        }
        if let Target::Time(t) = target {
            // While the streamer is connected the newest timeline's archive is current up to now.
            let streaming = self.board.state("wal") == Some(State::Ready) && timeline == super::archive::newest_timeline(&self.wal.dir);
            let upper = if streaming { Some(Utc::now()) } else { window.latest };
            if t < earliest || upper.is_some_and(|u| t > u) {
                let upper_text = upper.map_or("none".into(), |u| u.to_rfc3339_opts(SecondsFormat::Millis, true));
                return Err(refuse(
                    400,
                    "outside_window",
                    format!(
                        "{target} is outside the recoverable window of timeline {timeline}: from {} to {upper_text}{}; pick a time inside it, or \"latest\"",
                        earliest.to_rfc3339_opts(SecondsFormat::Millis, true),
                        if streaming { " (now: WAL streams continuously)" } else { "" }
                    ),
                ));
            }
        }
        let this = self.clone();
        self.on_stage("restore_failed", async move {
            let _busy = busy;
            this.run_restore(target, Some(timeline)).await
        })
        .await
    }

    fn progress(&self, target: Target, started_at: DateTime<Utc>, state: &str, step: &str, percent: u8, detail: Option<&str>) {
        tracing::info!("point-in-time restore to {target}: {step} ({percent}%)");
        self.board.set_restore(json!({
            "state": state,
            "target": target.to_string(),
            "started_at": started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "step": step,
            "percent": percent,
            "detail": detail,
        }));
    }

    async fn run_restore(&self, target: Target, timeline: Option<u32>) -> Result<Value, Refusal> {
        let started_at = Utc::now();
        let clock = Instant::now();
        let report = |step: &str, percent: u8| self.progress(target, started_at, "running", step, percent, None);
        report("waiting for a base backup in progress", 1);
        let _no_base_backup = self.base_busy.clone().lock_owned().await;
        // PostgreSQL first: its fast shutdown has the walsender ship
        // everything up to the shutdown checkpoint to the streamer (which
        // flushes each chunk before it confirms it) before PostgreSQL exits;
        // the streamer then ends by itself. Stopping the streamer first would
        // leave whatever PostgreSQL committed meanwhile out of the archive,
        // and out of a restore to `latest`.
        report("stopping PostgreSQL (the WAL streamer receives everything up to its shutdown)", 3);
        let hold = self.hold.hold().await;
        let _ = self.postgres.send(Command::Restart).await;
        let data_dir = self.cluster.data_dir.clone();
        let stopped = self.until(|b| b.state("postgres") != Some(State::Ready) && pidfile::clear_stale(&data_dir).is_ok(), self.stop_timeout + Duration::from_secs(30)).await;
        if !stopped {
            drop(hold);
            let why = "PostgreSQL did not stop in time; nothing was changed";
            self.progress(target, started_at, "failed", "stopping PostgreSQL", 100, Some(why));
            return Err(refuse(500, "restore_failed", why));
        }
        report("waiting for the WAL streamer to flush and end", 5);
        if let Some(streamer) = self.streamer.get() {
            if !self.until(|b| b.state("wal") != Some(State::Ready), Duration::from_secs(15)).await {
                tracing::warn!("the WAL streamer did not end by itself within 15 s of PostgreSQL's stop; stopping it");
                let _ = streamer.send(Command::Restart).await;
                self.until(|b| b.state("wal") != Some(State::Ready), self.stop_timeout + Duration::from_secs(10)).await;
            }
        }
        let progress = |step: &str, percent: u8| report(step, percent);
        let restore = Restore {
            data_dir: &self.cluster.data_dir,
            wal: &self.wal,
            binaries: &self.cluster.binaries,
            account: &self.cluster.account,
            password: &self.cluster.password,
            progress: Some(&progress),
        };
        let outcome = restore.run_on(target, timeline).await;
        report(if outcome.is_ok() { "starting PostgreSQL on the restored data" } else { "starting PostgreSQL on the previous data" }, 92);
        drop(hold);
        let back = self.until(|b| b.state("postgres") == Some(State::Ready), BACK_LIMIT).await;
        report("waiting for the API worker to serve", 96);
        let serving = back && self.until(|b| b.state("api") == Some(State::Ready), BACK_LIMIT).await;
        match outcome {
            Ok(restored) => {
                let summary = json!({
                    "target": restored.target.to_string(),
                    "base_backup": restored.base_backup,
                    "timeline": restored.timeline,
                    "previous_data_dir": restored.previous.as_ref().map(|p| p.display().to_string()),
                    "took_ms": clock.elapsed().as_millis() as u64,
                    "serving": serving,
                });
                if serving {
                    self.progress(target, started_at, "done", "restored; serving again", 100, None);
                    Ok(summary)
                } else {
                    let why = format!("restored, but PostgreSQL or the worker did not serve again within {} s; see /gateway/status and the log", BACK_LIMIT.as_secs());
                    self.progress(target, started_at, "failed", "starting after the restore", 100, Some(&why));
                    Err(refuse(500, "restore_failed", why))
                }
            }
            Err(e) => {
                let why = format!("{e:#}{}", if serving { "; PostgreSQL serves the previous data again" } else { "" });
                self.progress(target, started_at, "failed", "restore failed", 100, Some(&why));
                let status = if format!("{e:#}").contains("outside the recoverable window") { 400 } else { 500 };
                Err(refuse(status, if status == 400 { "outside_window" } else { "restore_failed" }, why))
            }
        }
    }

    /// Waits until `ready` holds for the board, for at most `within`.
    async fn until(&self, ready: impl Fn(&Board) -> bool, within: Duration) -> bool {
        let mut rx = self.board.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if ready(&self.board) {
                return true;
            }
            // Also polled: the pid file is not on the board.
            let _ = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)), rx.changed()).await;
            if tokio::time::Instant::now() >= deadline {
                return ready(&self.board);
            }
        }
    }
}
