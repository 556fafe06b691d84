//! Point-in-time recovery: continuous WAL, base backups, restore to a time.
//!
//! In persistent mode the gateway runs `pg_receivewal` as a third supervised
//! child ([`receiver::ReceiverPolicy`], the same supervision loop as
//! PostgreSQL and the worker). It streams through its own replication slot,
//! so nothing is missed across restarts, and flushes every chunk it receives
//! (`--synchronous`), so losing the data directory loses at most what had not
//! reached the streamer yet: milliseconds normally, nothing with
//! `OMNI_WAL_SYNC=true` (commits then wait for the streamer's flush).
//!
//! Layout of `OMNI_WAL_DIR`:
//!
//! ```text
//! stream/              the streamer's directory; its newest segment is `.partial`
//! stream-<UTC stamp>/  what an earlier stream/ held, moved aside by a restore
//!                      (the restored cluster starts a new timeline from there)
//! identity.json        the cluster this archive belongs to (system identifier + major)
//! generations/<stamp>-pg<major>-<sysid>/
//!                      the archive of an earlier cluster (before a major upgrade,
//!                      a replaced data directory), same layout inside (generation.rs)
//! base/<id>/           base backups (pg_basebackup: base.tar.lz4, pg_wal.tar,
//!                      backup_manifest; checked against the manifest, see
//!                      tarball.rs); base/<id>.json: when it began and ended
//! ```
//!
//! With `OMNI_ENCRYPT_LOCAL=true` ([`sealed`]) completed segments are
//! `stream/<segment>.lz4.age` and a base backup's files `<file>.age`.
//!
//! A restore ([`restore`]) copies the newest base backup that ended before
//! the target and replays WAL from every stream directory up to the target.
//!
//! Layer: above `pg` (the cluster it archives), `supervise`, `status`,
//! `process` and `config`; `serve` and `cli` call it, `pg` does not.

pub mod archive;
pub mod base;
// The age encryption, shared with the worker (logical backups): omni_contract::crypt.
pub use omni_contract::crypt;
pub mod generation;
pub mod online;
pub mod receiver;
pub mod restore;
pub mod sealed;
pub mod tarball;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use crate::supervise::shutdown::Stage;

use crate::process::child::ChildSpec;
use crate::config::WalConfig;
use crate::pg::cluster::{self, Cluster, APP_DATABASE};

/// The streamer's physical replication slot.
pub const SLOT: &str = "omni_wal";
/// The streamer's `application_name`, named by `synchronous_standby_names`.
pub const APPLICATION_NAME: &str = "omni_wal";
/// `pg_basebackup`'s `application_name`: never the streamer's.
pub const BASE_BACKUP_APPLICATION_NAME: &str = "omni_base_backup";
/// Most WAL the streamer's slot may hold back (shared with the relay's slots).
pub use crate::pg::slots::MAX_SLOT_WAL_KEEP_MB;

/// The server settings streaming needs, as `-c` values.
pub fn server_settings(wal: &WalConfig) -> Vec<String> {
    if !wal.enabled {
        // Bounds what a leftover slot keeps until it is dropped.
        return vec![format!("max_slot_wal_keep_size={MAX_SLOT_WAL_KEEP_MB}MB")];
    }
    let mut settings = vec![
        "wal_level=replica".to_string(),
        "max_wal_senders=10".to_string(),
        format!("max_slot_wal_keep_size={MAX_SLOT_WAL_KEEP_MB}MB"),
    ];
    if wal.sync {
        settings.push(format!("synchronous_standby_names={APPLICATION_NAME}"));
    }
    settings
}

/// With `OMNI_WAL_DIR=off`, the streamer slot an earlier run made would keep
/// WAL for nobody (up to `max_slot_wal_keep_size`): dropped once the stack
/// serves. An active one (a streamer of another process) is left alone.
pub async fn drop_leftover_slot(cluster: Arc<Cluster>) {
    let dropped = async {
        let client = crate::pg::connect(&cluster.pg_config(APP_DATABASE)).await?;
        let n = client.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", &[&SLOT]).await?;
        anyhow::Ok(n)
    }
    .await;
    match dropped {
        Ok(0) => {}
        Ok(_) => tracing::info!("OMNI_WAL_DIR=off: dropped the replication slot {SLOT} an earlier run's WAL streamer used (it kept WAL for nobody)"),
        Err(e) => tracing::warn!("OMNI_WAL_DIR=off: could not drop the leftover replication slot {SLOT} ({e:#}); PostgreSQL keeps at most {MAX_SLOT_WAL_KEEP_MB} MB of WAL for it"),
    }
}

/// What a client tool needs to reach the running cluster: the gateway's own
/// [`Cluster`], or one the CLI found through `postmaster.pid`.
#[derive(Debug, Clone)]
pub struct Server {
    pub binaries: crate::pg::binaries::Binaries,
    pub port: u16,
    pub password: String,
    /// PostgreSQL's account: the tools run as it, so what they write is its.
    pub account: crate::process::privilege::Account,
}

impl Server {
    pub fn of(cluster: &Cluster) -> Server {
        Server { binaries: cluster.binaries.clone(), port: cluster.port, password: cluster.password.clone(), account: cluster.account.clone() }
    }
}

/// A PostgreSQL client tool (`pg_receivewal`, `pg_basebackup`) connecting
/// to the running cluster as its superuser, run as PostgreSQL's account so
/// everything it writes belongs to that account.
pub(crate) fn tool(server: &Server, name: &str) -> ChildSpec {
    let mut spec = ChildSpec::new(name, server.binaries.tool(name))
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(server.port.to_string())
        .arg("-U")
        .arg(cluster::SUPERUSER)
        .arg("--no-password")
        // Only in the child's environment, never on its command line.
        .env("PGPASSWORD", &server.password)
        // Only the streamer is the synchronous standby: a `pg_basebackup`
        // under the same name could be picked in its place, and commits
        // would be acknowledged once the backup's WAL stream had them.
        .env("PGAPPNAME", if name == "pg_receivewal" { APPLICATION_NAME } else { BASE_BACKUP_APPLICATION_NAME });
    spec.env.extend(server.account.login_env());
    spec.run_as = server.account.run_as();
    spec.env_remove = ["PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"].iter().map(Into::into).collect();
    spec
}

/// The base-backup task, as the rest of the gateway sees it.
pub struct BaseBackups {
    /// Asks for a base backup now (the streamer, when its stream has none).
    pub ask: mpsc::Sender<()>,
    /// Held while a base backup is being taken.
    busy: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The shutdown stage of point-in-time recovery's jobs (this task, the
    /// drills, an online restore or base backup).
    stage: Stage,
}

impl BaseBackups {
    /// The lock held while a base backup is taken (an on-demand one, a
    /// restore: [`online`], take it too).
    pub fn lock(&self) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.busy.clone()
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }
}

/// Starts the base-backup task: the first backup once streaming runs on a
/// stream directory that has none, then one every `every` (the backup
/// schedule, `OMNI_BACKUP_INTERVAL`), each verified and followed by
/// retention. None is started once a stop is asked (`asked`); one in
/// progress when `stage` stops is let finish (so it is neither lost nor cut
/// off with errors in the log) within the stage's grace, after which
/// PostgreSQL's stop ends it; a hurried stop abandons it.
pub fn spawn_base_backups(cluster: &Cluster, wal: WalConfig, every: Option<std::time::Duration>, stage: &Stage, asked: CancellationToken) -> BaseBackups {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let busy = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let server = Server::of(cluster);
    let held = busy.clone();
    // Before anything streams into the archive or reads it for this
    // cluster: an archive of another cluster (a major upgrade, a replaced
    // data directory) moves to generations/. A failure here is retried by
    // the streamer's start, which refuses to stream until it is done.
    if let Err(e) = generation::reconcile(&wal.dir, &cluster.data_dir, &cluster.account) {
        tracing::error!("OMNI_WAL_DIR: could not check which cluster the archive belongs to: {e:#}");
    }
    let (stop, hurry) = (stage.token(), stage.hurried());
    stage.spawn(async move {
        base::remove_partials(&wal.dir);
        if let Err(e) = generation::apply_retention(&wal) {
            tracing::error!("retention of earlier archive generations failed: {e:#}");
        }
        let mut tick = every.map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
        loop {
            let scheduled = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = asked.cancelled() => return,
                wanted = rx.recv() => if wanted.is_none() { return },
                () = scheduled => {}
            }
            let _busy = held.lock().await;
            if asked.is_cancelled() {
                return;
            }
            let take = base::take(&server, &wal);
            tokio::pin!(take);
            let result = tokio::select! {
                result = &mut take => result,
                () = hurry.cancelled() => return,
                () = stop.cancelled() => {
                    tracing::info!("the gateway is stopping: letting the base backup in progress finish first");
                    tokio::select! {
                        result = &mut take => result,
                        () = hurry.cancelled() => return,
                    }
                }
            };
            match result {
                Ok(_) => {
                    if let Err(e) = base::apply_retention(&wal) {
                        tracing::error!("WAL retention failed: {e:#}");
                    }
                    if let Err(e) = generation::apply_retention(&wal) {
                        tracing::error!("retention of earlier archive generations failed: {e:#}");
                    }
                }
                Err(e) => tracing::error!("base backup failed: {e:#}. Point-in-time recovery needs one; the next try is at the next scheduled backup (OMNI_BACKUP_INTERVAL) or the next start of streaming"),
            }
        }
    });
    BaseBackups { ask: tx, busy, stage: stage.clone() }
}

/// With `OMNI_ENCRYPT_LOCAL` ([`sealed`]): every second, the completed WAL
/// segments of the archive are sealed (`<segment>.lz4.age`) and their plain
/// files removed. A failure (a recipients file gone unreadable, a full
/// disk) leaves them plain, is said in the log, and is tried again.
pub fn spawn_sealer(cluster: &Cluster, wal: WalConfig, stage: &Stage) {
    if sealed::encryption().is_none() {
        return;
    }
    let account = cluster.account.clone();
    // pg_receivewal before 15 resumes after the newest segment file it can read.
    let keep_newest = cluster.binaries.major < 15;
    let stop = stage.token();
    stage.spawn(async move {
        let mut failing: Option<String> = None;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (dir, owner) = (wal.dir.clone(), account.clone());
            let outcome = tokio::task::spawn_blocking(move || sealed::seal_segments(&dir, &owner, keep_newest)).await.map_err(anyhow::Error::new).and_then(|r| r);
            match outcome {
                Ok(_) => {
                    if failing.take().is_some() {
                        tracing::info!("OMNI_ENCRYPT_LOCAL: completed WAL segments are encrypted again");
                    }
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if failing.as_deref() != Some(text.as_str()) {
                        tracing::error!("OMNI_ENCRYPT_LOCAL: could not encrypt the completed WAL segments ({text}); they stay plain until this works, tried again every second");
                    }
                    failing = Some(text);
                }
            }
        }
    });
}

/// What runs after each scheduled restore drill, whatever its result: the
/// drill of the off-site copy (`repository::drill`, a layer above this
/// one). A stop abandons it as it abandons the drill.
pub type AfterDrill = Box<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Starts the scheduled restore drill: every `OMNI_BACKUP_DRILL_INTERVAL`
/// after the last one recorded (so restarts do not postpone it), the newest
/// base backup and its WAL are restored into a temporary cluster
/// ([`restore::drill`]); the result goes to `drill.json`, the log (an error
/// when it fails) and `/metrics`. Then `after`, when given.
/// A stop asked (`asked`) abandons a drill under way.
pub fn spawn_drills(cluster: &Cluster, wal: WalConfig, stage: &Stage, asked: CancellationToken, after: Option<AfterDrill>) {
    let server = Server::of(cluster);
    let data_dir = cluster.data_dir.clone();
    let stop = stage.token();
    stage.spawn(async move {
        loop {
            let last = restore::last_drill(&wal.dir).map(|d| d.at);
            let due = last.map_or(wal.drill_every, |at| {
                let next = at + chrono::Duration::from_std(wal.drill_every).unwrap_or(chrono::Duration::MAX);
                (next - chrono::Utc::now()).to_std().unwrap_or(std::time::Duration::ZERO)
            });
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(due.min(wal.drill_every)) => {}
            }
            if base::list(&wal.dir).is_empty() {
                tracing::info!("restore drill: no verified base backup yet; trying again in {} s", wal.drill_every.as_secs());
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wal.drill_every) => continue,
                }
            }
            // OMNI_ENCRYPT_LOCAL without OMNI_DECRYPT_IDENTITY_FILE: the server
            // cannot read its own archive; the off-site drill still runs after.
            let unreadable = base::list(&wal.dir).pop().and_then(|b| sealed::check_restorable(&wal.dir, &b.dir(&wal.dir)).err());
            let drills = async {
                match &unreadable {
                    Some(e) => tracing::warn!("restore drill skipped: {e}. Drill by hand where the key is: omni-gateway backup verify with OMNI_DECRYPT_IDENTITY_FILE"),
                    None => {
                        restore::drill(&wal, &server.binaries, &server.account, &data_dir).await;
                    }
                }
                if let Some(after) = &after {
                    after().await;
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = asked.cancelled() => return,
                () = drills => {}
            }
            // A skipped drill records nothing: wait a whole interval before the next try.
            if unreadable.is_some() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wal.drill_every) => {}
                }
            }
        }
    });
}
