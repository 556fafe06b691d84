//! Restore to a point in time: the newest base backup that ended before the
//! target, plus WAL from the archive up to the target, in place of the data
//! directory.
//!
//! Steps, each logged, each preceded by a flushed journal
//! (`<data_dir>.restore.json`, [`Journal`]): refuse while PostgreSQL runs on
//! the data directory → pick the base backup → unpack it into
//! `<data_dir>.restoring-<stamp>` beside the data directory (which is not
//! touched yet) → start `postgres` there with `recovery.signal`, the
//! archive's `restore_command`, the target and
//! `recovery_target_action=promote`, reachable only on a private Unix socket
//! that a temporary `pg_hba.conf` trusts (so no password is needed: the
//! archive alone restores) → wait for the promotion, reporting the replay
//! position → set the superuser's password ([`restore_password`]) and check
//! the app database answers → stop it cleanly → move the data directory aside
//! (`<data_dir>.before-restore-<stamp>`, kept: `omni-gateway restore
//! --discard-previous` deletes it) and the restored cluster in → start a
//! fresh stream directory (the cluster continues on a new timeline). A
//! failure before the swap deletes the copy; the data directory was never
//! touched. A crash anywhere is finished or undone by the next start
//! ([`resume`]).
//!
//! Since PostgreSQL 13 a recovery whose target time is never reached fails.
//! A time after the archive's last commit means "everything": that case is
//! found first ([`commit_after`], reading commit times with `pg_waldump`) and
//! recovered to the end of the archive.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use tokio_util::sync::CancellationToken;
use tracing::Level;

use super::archive::SEGMENT_BYTES;
use super::{archive, base, tarball};
use crate::process::child::{self, ChildSpec, Output};
use crate::config::WalConfig;
use crate::pg::binaries::Binaries;
use crate::pg::cluster::{self, APP_DATABASE, SUPERUSER};
use crate::pg::pidfile;
use crate::process::privilege::Account;

/// Longest a restore may replay WAL before it is given up (and undone).
const REPLAY_LIMIT: Duration = Duration::from_secs(3600);
/// How often the replay position is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where to stop replaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Everything in the archive, the newest `.partial` segment included.
    Latest,
    Time(DateTime<Utc>),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        if s.trim().eq_ignore_ascii_case("latest") {
            return Ok(Target::Latest);
        }
        DateTime::parse_from_rfc3339(s.trim())
            .map(|t| Target::Time(t.with_timezone(&Utc)))
            .map_err(|e| format!("{s:?} is neither `latest` nor an RFC 3339 time such as 2026-11-25T16:00:00Z ({e})"))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Latest => f.write_str("latest"),
            Target::Time(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        }
    }
}

/// The span a restore can reach on one timeline.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// The timeline it is the window of (`recovery_target_timeline`).
    pub timeline: u32,
    /// The end of the oldest verified base backup.
    pub earliest: Option<DateTime<Utc>>,
    /// The last write into the archive.
    pub latest: Option<DateTime<Utc>>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |t: Option<DateTime<Utc>>| t.map_or("none".to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
        write!(f, "from {} to {}", show(self.earliest), show(self.latest))?;
        if self.timeline > 1 {
            write!(f, " on timeline {}", self.timeline)?;
        }
        Ok(())
    }
}

/// The window of the newest timeline: the one the cluster continues on.
pub fn window(wal_dir: &Path) -> Window {
    window_on(wal_dir, archive::newest_timeline(wal_dir))
}

/// The window of `timeline`: from the end of the oldest base backup that
/// restores onto it (one of its own, or an ancestor's taken before it
/// branched off) to the last write of its WAL (the newest timeline: the
/// newest write into the archive).
pub fn window_on(wal_dir: &Path, timeline: u32) -> Window {
    let lineage = archive::lineage(wal_dir, timeline);
    let earliest = base::list(wal_dir).into_iter().find(|b| b.serves(&lineage)).map(|b| b.finished_at);
    let latest = if timeline == archive::newest_timeline(wal_dir) {
        archive::newest_write(wal_dir)
    } else {
        archive::newest_write_on(wal_dir, timeline)
    };
    let latest = latest.map(DateTime::<Utc>::from).or_else(|| archive::began_at(wal_dir, timeline));
    Window { timeline, earliest, latest: earliest.and(latest) }
}

/// Every timeline's window, oldest timeline first.
pub fn windows(wal_dir: &Path) -> Vec<Window> {
    archive::timelines(wal_dir).into_iter().map(|t| window_on(wal_dir, t)).collect()
}

/// The timeline a restore replays: `asked` (it must be in the archive),
/// else for `latest` the newest one, else the one that served at the
/// target time (a timeline serves from the end of the restore that made it
/// until the next restore).
pub fn target_timeline(wal_dir: &Path, target: Target, asked: Option<u32>) -> Result<u32, UnknownTimeline> {
    let known = archive::timelines(wal_dir);
    match (asked, target) {
        (Some(n), _) if known.contains(&n) => Ok(n),
        (Some(n), _) => Err(UnknownTimeline { asked: n, known }),
        (None, Target::Latest) => Ok(*known.last().unwrap_or(&1)),
        (None, Target::Time(t)) => Ok(archive::serving_at(wal_dir, t)),
    }
}

/// A timeline the archive has no history of.
#[derive(Debug, Clone)]
pub struct UnknownTimeline {
    pub asked: u32,
    pub known: Vec<u32>,
}

impl std::fmt::Display for UnknownTimeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known: Vec<String> = self.known.iter().map(u32::to_string).collect();
        write!(f, "timeline {} is not in the WAL archive (it knows timelines {}); pick one of those, or leave the timeline out", self.asked, known.join(", "))
    }
}

impl std::error::Error for UnknownTimeline {}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub base_backup: String,
    pub target: Target,
    /// The timeline replayed (`recovery_target_timeline`).
    pub timeline: u32,
    /// The data directory as it was, moved aside; `None` when there was none.
    pub previous: Option<PathBuf>,
    pub took: Duration,
}

/// The cluster to restore and the tools to do it with.
pub struct Restore<'a> {
    pub data_dir: &'a Path,
    pub wal: &'a WalConfig,
    pub binaries: &'a Binaries,
    pub account: &'a Account,
    /// The superuser password the restored cluster gets (set after its
    /// promotion; the recovery itself needs none): [`restore_password`].
    pub password: &'a str,
    /// Told each step and how far the restore got (0–100), for
    /// `/gateway/status` when the gateway restores while it runs.
    pub progress: Option<&'a (dyn Fn(&str, u8) + Sync)>,
}

impl Restore<'_> {
    /// Restores to `target` on the timeline [`target_timeline`] picks.
    pub async fn run(&self, target: Target) -> Result<Restored> {
        self.run_on(target, None).await
    }

    /// Restores to `target` on `timeline` (`None`: [`target_timeline`]).
    pub async fn run_on(&self, target: Target, timeline: Option<u32>) -> Result<Restored> {
        let started = Instant::now();
        // An earlier restore stopped midway (kill -9, power loss) is finished or undone first.
        // Not stopped midway: a restore is asked for and waited on as a whole.
        resume(self.data_dir, self.account, true, &CancellationToken::new())?;
        if self.data_dir.join("PG_VERSION").exists() {
            pidfile::clear_stale(self.data_dir)
                .context("PostgreSQL still runs on this data directory: stop the gateway first (or restore through POST /api/v1/backup/restore-to)")?;
        }
        let timeline = target_timeline(&self.wal.dir, target, timeline)?;
        let lineage = archive::lineage(&self.wal.dir, timeline);
        let backup = self.pick_base(target, &lineage)?;
        // OMNI_ENCRYPT_LOCAL: without the identity, nothing is touched.
        super::sealed::check_restorable(&self.wal.dir, &backup.dir(&self.wal.dir)).with_context(|| format!("base backup {} and the WAL after it are encrypted (OMNI_ENCRYPT_LOCAL): nothing was changed", backup.id))?;
        self.report("reading commit times in the WAL archive", 10);
        let stop_at = match target {
            Target::Latest => None,
            Target::Time(t) if commit_after_on(self.wal, self.binaries, self.data_dir, t, &lineage).await? => Some(t),
            Target::Time(t) => {
                tracing::info!("nothing was committed after {} on timeline {timeline} in the archive: replaying all of it", Target::Time(t));
                None
            }
        };
        // A restore unpacks only a backup that still matches its manifest:
        // bit rot in an older backup is found here, before anything moves.
        self.report(&format!("checking base backup {} against its manifest", backup.id), 15);
        base::verify(self.binaries, self.account, &backup.dir(&self.wal.dir))
            .await
            .with_context(|| {
                format!(
                    "base backup {} is damaged, so nothing was changed: the previous data directory is back in service as it was (it was never moved). \
                     Pick a time a newer base backup covers, or take a new one",
                    backup.id
                )
            })?;
        // Milliseconds: two restores within a second get different names.
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
        let mut journal = Journal {
            data_dir: self.data_dir.to_path_buf(),
            wal_dir: self.wal.dir.clone(),
            stamp: stamp.clone(),
            base_backup: backup.id.clone(),
            target: target.to_string(),
            staging: staging_dir(self.data_dir, &stamp),
            previous: previous_dir(self.data_dir, &stamp),
            step: Step::Recovering,
            timeline: None,
            last_segment: None,
        };
        journal.save()?;
        tracing::info!("restoring base backup {} into {} on timeline {timeline} (it replaces {} once recovered)", backup.id, journal.staging.display(), self.data_dir.display());
        let result = async {
            self.recover(&backup, stop_at, timeline, &journal.staging, Some(self.password)).await?;
            end_of_wal(self.binaries, &journal.staging).await
        }
        .await;
        let (new_timeline, last_segment) = match result {
            Ok(end) => end,
            Err(e) => {
            tracing::error!("restore failed: {e:#}; removing the half-restored copy, the data directory stays as it was");
            if journal.staging.exists() {
                if let Err(undo) = std::fs::remove_dir_all(&journal.staging) {
                    return Err(e.context(format!("the data directory was not touched, but deleting the half-restored copy {} failed: {undo:#}", journal.staging.display())));
                }
            }
            journal.remove()?;
            return Err(e.context("nothing was changed: the previous data directory is back in service as it was (it was never moved)"));
            }
        };
        tracing::info!("the restored cluster continues on timeline {new_timeline}; its WAL since the fork goes into the archive with it");
        journal.timeline = Some(new_timeline);
        journal.last_segment = Some(last_segment);
        journal.step = Step::Recovered;
        journal.save()?;
        test_hold("recovered", self.data_dir).await;
        self.report("putting the restored cluster in place", 90);
        journal.swap_aside()?;
        test_hold("swapping", self.data_dir).await;
        journal.swap_in()?;
        journal.step = Step::Swapped;
        journal.save()?;
        test_hold("swapped", self.data_dir).await;
        journal.retire_stream(self.account)?;
        journal.remove()?;
        let previous = journal.previous.exists().then(|| journal.previous.clone());
        Ok(Restored { base_backup: backup.id, target, timeline, previous, took: started.elapsed() })
    }

    fn report(&self, step: &str, percent: u8) {
        if let Some(progress) = self.progress {
            progress(step, percent);
        }
    }

    /// The newest base backup that restores onto `lineage` (taken on one of
    /// its timelines, consistent before it branched off) and ended by the target.
    fn pick_base(&self, target: Target, lineage: &archive::Lineage) -> Result<base::BaseBackup> {
        let backups = base::list(&self.wal.dir);
        let window = window_on(&self.wal.dir, lineage.timeline);
        let chosen = match target {
            Target::Latest => backups.iter().rev().find(|b| b.serves(lineage)),
            Target::Time(t) if t > Utc::now() => None,
            Target::Time(t) => backups.iter().rev().find(|b| b.finished_at <= t && b.serves(lineage)),
        };
        match chosen {
            Some(b) => Ok(b.clone()),
            None if backups.is_empty() => bail!(
                "no verified base backup in {}: point-in-time recovery starts with the first one, taken when WAL streaming first runs (OMNI_WAL_DIR)",
                archive::base_dir(&self.wal.dir).display()
            ),
            None => bail!("{target} is outside the recoverable window ({window}); pick a time inside it, or `latest`"),
        }
    }

    /// Copies `backup` into the (absent) directory `dir` and recovers it
    /// there; returns how many app tables the recovered cluster has.
    ///
    /// The recovery `postgres` listens only on a private Unix socket (a 0700
    /// directory of PostgreSQL's account) and trusts connections there
    /// through a temporary `pg_hba.conf` given on its command line: a
    /// restore needs no password, so the archive alone restores. With
    /// `set_password`, the superuser gets that password once promoted.
    async fn recover(&self, backup: &base::BaseBackup, stop_at: Option<DateTime<Utc>>, timeline: u32, dir: &Path, set_password: Option<&str>) -> Result<i64> {
        let copied = Instant::now();
        let (from, to, owner) = (backup.dir(&self.wal.dir), dir.to_path_buf(), self.account.run_as());
        if tarball::is_tar(&from) {
            self.report(&format!("unpacking base backup {}", backup.id), 25);
            let account = self.account.clone();
            tokio::task::spawn_blocking(move || {
                tarball::unpack(&from, "base", &to, &account)?;
                tarball::unpack(&from, "pg_wal", &to.join("pg_wal"), &account)
            })
            .await?
            .context("unpacking the base backup")?;
        } else {
            self.report(&format!("copying base backup {}", backup.id), 25);
            tokio::task::spawn_blocking(move || cluster::copy_tree(&from, &to, owner)).await?.context("copying the base backup")?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let signal = dir.join("recovery.signal");
        std::fs::write(&signal, b"").with_context(|| format!("writing {}", signal.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&signal, Some(uid), Some(gid))?;
        }
        tracing::info!("base backup in place in {} ms; replaying WAL of timeline {timeline} up to {}", copied.elapsed().as_millis(), stop_at.map_or(Target::Latest, Target::Time));
        test_hold("copied", self.data_dir).await;

        let port = cluster::pick_free_port()?;
        let socket_dir = cluster::make_socket_dir(self.account)?;
        // Removed however the recovery ends, a cancellation included.
        let socket_guard = RemovedOnDrop(socket_dir.clone());
        let hba = socket_dir.join("pg_hba.conf");
        let outcome = async {
            // Only this socket directory: nobody but PostgreSQL's account (and root) can reach it.
            cluster::write_secret(&hba, "local all all trust\n")?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&hba, Some(uid), Some(gid))?;
            }
            // Sealed segments (OMNI_ENCRYPT_LOCAL) are read by `omni-gateway restore-wal`.
            let sealed = !super::sealed::sealed_files(&self.wal.dir, None).is_empty() || super::sealed::encryption().is_some();
            let restore_command = if sealed {
                let mut gateway = std::env::current_exe().context("finding the gateway's own binary for the restore_command (the WAL archive is encrypted)")?;
                if crate::process::privilege::check_executable(&gateway, self.account).is_err() {
                    // A binary PostgreSQL's account cannot run (under /root, say): a copy it can, removed with the directory.
                    let copy = socket_dir.join("omni-gateway");
                    std::fs::copy(&gateway, &copy).with_context(|| format!("copying {} for the restore_command", gateway.display()))?;
                    if let Some((uid, gid)) = owner {
                        std::os::unix::fs::chown(&copy, Some(uid), Some(gid))?;
                    }
                    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o500))?;
                    tracing::info!("user {} cannot run {}: the recovery's restore_command runs a copy of it", self.account.name, gateway.display());
                    gateway = copy;
                }
                let identity = super::sealed::identity_for_recovery(&socket_dir, self.account)?;
                archive::restore_command(&self.wal.dir, Some((gateway.as_path(), identity.as_str())))
            } else {
                archive::restore_command(&self.wal.dir, None)
            };
            let mut spec = ChildSpec::new("postgres", self.binaries.postgres())
                .arg("-D")
                .arg(dir)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(&socket_dir)
                .arg("-c")
                .arg("listen_addresses=")
                .arg("-c")
                .arg("unix_socket_permissions=0700")
                .arg("-c")
                .arg(format!("hba_file={}", hba.display()))
                .arg("-c")
                .arg("log_line_prefix=[%p] ")
                .arg("-c")
                .arg(format!("restore_command={restore_command}"))
                .arg("-c")
                .arg("recovery_target_action=promote")
                .arg("-c")
                .arg(format!("recovery_target_timeline={timeline}"))
                .arg("-c")
                .arg("synchronous_standby_names=");
            if let Some(t) = stop_at {
                spec = spec.arg("-c").arg(format!("recovery_target_time={}", t.format("%Y-%m-%d %H:%M:%S%.6f+00")));
            }
            if cfg!(target_os = "linux") && self.binaries.major >= 14 {
                // A base backup starts like a crashed cluster: everything is
                // flushed first. One syncfs instead of an fsync per file (as
                // the gateway's own start does, cluster.rs): the same
                // durability, seconds less downtime for an online restore.
                spec = spec.arg("-c").arg("recovery_init_sync_method=syncfs");
            }
            spec.output = Output::Postgres { routine: Level::INFO };
            spec.run_as = self.account.run_as();
            spec.death_signal = nix::sys::signal::Signal::SIGQUIT;
            spec.env_remove = ["PGDATA", "PGPORT", "PGHOST"].iter().map(Into::into).collect();
            let mut postmaster = Postmaster::new(child::spawn(spec).await.context("could not start postgres for the restore")?);
            let span = (segment_lsn(&backup.start_segment), newest_segment_end(&self.wal.dir));
            let outcome = self.until_promoted(postmaster.child(), &socket_dir, port, span, set_password).await;
            if outcome.is_ok() {
                test_hold("promoted", self.data_dir).await;
            }
            postmaster.stop(outcome.is_ok()).await;
            outcome
        }
        .await;
        drop(socket_guard);
        outcome
    }

    /// `span`: the replay's first and (at most) last WAL position, for the percentage.
    async fn until_promoted(&self, child: &mut tokio::process::Child, socket_dir: &Path, port: u16, span: (Option<u64>, Option<u64>), set_password: Option<&str>) -> Result<i64> {
        let config = |db: &str| {
            let mut c = tokio_postgres::Config::new();
            c.host_path(socket_dir).port(port).user(SUPERUSER).dbname(db).application_name("omni-gateway restore").connect_timeout(Duration::from_secs(2));
            c
        };
        let started = Instant::now();
        let mut reported = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("PostgreSQL stopped during recovery ({status}); its log above says why (a missing WAL segment, a damaged file)");
            }
            if started.elapsed() > REPLAY_LIMIT {
                bail!("recovery did not finish within {} minutes", REPLAY_LIMIT.as_secs() / 60);
            }
            if let Ok(client) = crate::pg::connect(&config("postgres")).await {
                if let Ok(row) = client.query_one("SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn()::text, '')", &[]).await {
                    let (recovering, lsn): (bool, String) = (row.get(0), row.get(1));
                    if !recovering {
                        break;
                    }
                    if let (Some(from), Some(to), Some(at)) = (span.0, span.1, parse_lsn(&lsn)) {
                        let done = (at.saturating_sub(from) as f64 / to.saturating_sub(from).max(1) as f64).clamp(0.0, 1.0);
                        self.report(&format!("replaying WAL (at {lsn})"), 40 + (done * 45.0) as u8);
                    }
                    if reported.elapsed() >= PROGRESS_EVERY {
                        tracing::info!("replaying WAL: at {lsn} after {} s", started.elapsed().as_secs());
                        reported = Instant::now();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!("recovery finished and promoted in {} ms; checking the app database", started.elapsed().as_millis());
        if let Some(password) = set_password {
            let client = crate::pg::connect(&config("postgres")).await.context("connecting to the restored cluster to set the superuser's password")?;
            // The password is the gateway's own (32 alphanumerics), never user text; quoted all the same.
            client
                .batch_execute(&format!("SET synchronous_commit = local; ALTER ROLE {SUPERUSER} PASSWORD '{}'", password.replace('\'', "''")))
                .await
                .context("setting the superuser's password in the restored cluster")?;
        }
        let client = crate::pg::connect(&config(APP_DATABASE)).await.context("the restored cluster does not open the app database")?;
        let row = client.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[]).await.context("the restored app database does not answer")?;
        Ok(row.get(0))
    }
}

/// What `drill.json` in `OMNI_WAL_DIR` records about the last restore drill.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Drill {
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub base_backup: Option<String>,
    /// Tables of the app database in the restored copy.
    pub app_tables: Option<i64>,
    pub took_ms: u64,
    /// Why it failed.
    pub detail: Option<String>,
}

/// The last drill's record, if any.
pub fn last_drill(wal_dir: &Path) -> Option<Drill> {
    serde_json::from_slice(&std::fs::read(wal_dir.join("drill.json")).ok()?).ok()
}

/// The restore drill: the newest base backup is checked against its
/// manifest ([`base::verify`]), restored with all the WAL after it into a temporary
/// cluster beside the data directory `data_dir` (never in `/tmp`, often a
/// small tmpfs), its app database opened and its tables counted,
/// and the copy removed. The result is recorded in `drill.json` either way.
pub async fn drill(wal: &WalConfig, binaries: &Binaries, account: &Account, data_dir: &Path) -> Drill {
    drill_backup(wal, binaries, account, data_dir, base::list(&wal.dir).pop()).await
}

/// The restore drill on one base backup (`None`: there is none), replaying
/// the WAL after it on the newest timeline it restores onto.
pub async fn drill_backup(wal: &WalConfig, binaries: &Binaries, account: &Account, data_dir: &Path, backup: Option<base::BaseBackup>) -> Drill {
    let started = Instant::now();
    // Removed when the drill ends, and when it is cancelled (a stop): a
    // drill leaves neither a copy nor (see [`Postmaster`]) a process behind.
    let scratch_guard = Scratch::new(data_dir, "drill");
    let scratch = scratch_guard.path().to_path_buf();
    let outcome = async {
        let backup = backup.clone().with_context(|| format!("no verified base backup in {} to drill", archive::base_dir(&wal.dir).display()))?;
        make_scratch(&scratch, account)?;
        drill_archive(wal, binaries, account, &scratch, &backup).await
    }
    .await;
    drop(scratch_guard);
    let result = Drill {
        at: Utc::now(),
        ok: outcome.is_ok(),
        base_backup: backup.map(|b| b.id),
        app_tables: outcome.as_ref().ok().copied(),
        took_ms: started.elapsed().as_millis() as u64,
        detail: outcome.as_ref().err().map(|e| format!("{e:#}")),
    };
    match &result.detail {
        None => tracing::info!("restore drill passed: base backup {} restored with its WAL, {} app tables, in {} ms", result.base_backup.as_deref().unwrap_or("?"), result.app_tables.unwrap_or(0), result.took_ms),
        Some(why) => tracing::error!("RESTORE DRILL FAILED: {why}. The newest backup may not restore: take a new base backup and look at the disk of OMNI_WAL_DIR"),
    }
    let path = wal.dir.join("drill.json");
    if let Err(e) = serde_json::to_vec_pretty(&result).map_err(std::io::Error::other).and_then(|j| std::fs::write(&path, j)) {
        tracing::warn!("could not record the drill result in {}: {e}", path.display());
    }
    result
}

/// Creates the (absent) scratch directory of a drill: 0700, PostgreSQL's
/// account's (the recovery `postgres` works in it).
pub(crate) fn make_scratch(scratch: &Path, account: &Account) -> Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    if let Some((uid, gid)) = account.run_as() {
        std::os::unix::fs::chown(scratch, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The checks of a drill, on the archive `wal.dir` (this machine's own, or
/// one downloaded from the repository into scratch space): `backup` (one of
/// that archive's) is checked against its manifest ([`base::verify`]),
/// restored with all the WAL after it, on the newest timeline it restores
/// onto, into `<scratch>/data` (`scratch`: an existing drill directory,
/// [`make_scratch`]), and its app database opened; returns how many app
/// tables it has (none is a failure: the app's schema did not come back).
pub(crate) async fn drill_archive(wal: &WalConfig, binaries: &Binaries, account: &Account, scratch: &Path, backup: &base::BaseBackup) -> Result<i64> {
    let timeline = archive::timelines(&wal.dir).into_iter().rev().find(|t| backup.serves(&archive::lineage(&wal.dir, *t))).unwrap_or(backup.timeline());
    super::sealed::check_restorable(&wal.dir, &backup.dir(&wal.dir)).with_context(|| format!("base backup {} and the WAL after it are encrypted (OMNI_ENCRYPT_LOCAL)", backup.id))?;
    tracing::info!("restore drill: checking base backup {} against its manifest", backup.id);
    base::verify(binaries, account, &backup.dir(&wal.dir)).await?;
    let data_dir = scratch.join("data");
    tracing::info!("restore drill: restoring {} and its WAL into {}", backup.id, data_dir.display());
    let restore = Restore { data_dir: &data_dir, wal, binaries, account, password: "", progress: None };
    let tables = restore.recover(backup, None, timeline, &data_dir, None).await?;
    if tables == 0 {
        bail!("the restored app database has no tables");
    }
    Ok(tables)
}

/// The recovery `postgres`. Stopped by [`Postmaster::stop`]; dropped without
/// it (the drill or restore cancelled at a stop), its whole process group is
/// killed and waited out, so the copy it worked in can be removed.
struct Postmaster {
    child: tokio::process::Child,
    pid: Option<u32>,
}

impl Postmaster {
    fn new(child: tokio::process::Child) -> Self {
        let pid = child.id();
        Postmaster { child, pid }
    }

    fn child(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }

    /// A clean shutdown after a success (a checkpoint, so the next start
    /// needs no recovery), immediate otherwise.
    async fn stop(&mut self, clean: bool) {
        let Some(pid) = self.pid else { return };
        use nix::sys::signal::{kill, killpg, Signal};
        let signal = if clean { Signal::SIGINT } else { Signal::SIGQUIT };
        // The child we started and have not reaped.
        let target = nix::unistd::Pid::from_raw(pid as i32);
        let _ = kill(target, signal);
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await.is_err() {
            // As above, its whole process group.
            let _ = killpg(target, Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        child::forget(pid);
        self.pid = None;
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        // Not reaped (nobody waited for it to the end): the group is still its.
        child::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        tracing::info!(pid, "the restore's recovery postgres was abandoned (a stop); killed it");
        // Until every process of the group is dead, so nothing writes in the
        // copy while it is removed. SIGKILL cannot be ignored: this is short.
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_has_live_members(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        child::forget(pid);
    }
}

/// Whether a process of the group `pgid` is alive (zombies are not).
fn group_has_live_members(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).any(|pid| {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
        // After the command name: state, ppid, pgrp.
        let mut fields = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default().split_whitespace();
        let (state, pgrp) = (fields.next(), fields.nth(1));
        state.is_some_and(|s| s != "Z") && pgrp.and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
    })
}

/// A directory removed, with everything in it, when dropped.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("could not remove {}: {e}; delete it by hand", self.0.display()),
        }
    }
}

/// Scratch directories of this process that are in use (the sweep of
/// [`Scratch::new`] leaves them alone).
static SCRATCH_IN_USE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Scratch space beside the data directory (its disk, not `/tmp`),
/// `<data_dir>.<what>-<pid>-<random>` (not yet created): two drills never
/// share one, and a name left by an earlier life of the same pid (a
/// container restarted) is never in the way. Removed when dropped. Those a
/// killed process left behind are swept on the next use: another pid that
/// no longer runs, or ours but not in use.
pub(crate) struct Scratch(RemovedOnDrop);

impl Scratch {
    pub(crate) fn new(data_dir: &Path, what: &str) -> Scratch {
        let me = std::process::id();
        let mut in_use = SCRATCH_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("{}.{what}-", data_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let parent = data_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(&prefix).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
            let path = entry.path();
            let left = if pid == me { !in_use.contains(&path) } else { !process_exists(pid) };
            if left {
                tracing::info!("removing {}, left by an earlier process", path.display());
                drop(RemovedOnDrop(path));
            }
        }
        let path = cluster::sibling(data_dir, &format!(".{what}-{me}-{:08x}", rand::random::<u32>()));
        in_use.push(path.clone());
        Scratch(RemovedOnDrop(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0 .0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        SCRATCH_IN_USE.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != &self.0 .0);
    }
}

/// Whether a process `pid` exists (signal 0: nothing is sent).
fn process_exists(pid: u32) -> bool {
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None), Err(nix::errno::Errno::ESRCH))
}

use archive::{parse_lsn, segment_lsn};

/// Where the archive's newest segment ends.
fn newest_segment_end(wal_dir: &Path) -> Option<u64> {
    archive::stream_dirs(wal_dir).iter().flat_map(|d| archive::segments(d)).filter_map(|s| segment_lsn(&s.name)).max().map(|l| l + SEGMENT_BYTES)
}


/// `<data_dir>.before-restore-<stamp>`.
pub fn previous_dir(data_dir: &Path, stamp: &str) -> PathBuf {
    cluster::sibling(data_dir, &format!(".before-restore-{stamp}"))
}

/// Data directories earlier restores moved aside.
pub fn previous_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}.before-restore-", data_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let parent = data_dir.parent().unwrap_or(Path::new("/"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// The superuser password a restore gives the restored cluster: the one in
/// `<data_dir>.password` when it is there (the gateway and the data
/// directory as it was keep working with it); otherwise (the disk of the
/// data directory was lost with it) a new random one, written there first,
/// as a new cluster's is (0600, flushed).
pub fn restore_password(data_dir: &Path) -> Result<String> {
    let file = cluster::password_file(data_dir);
    // Read only when it is the gateway's own file (never through a link
    // planted beside the data directory: cluster::read_trusted).
    match cluster::read_password(data_dir)? {
        Some(password) if !password.is_empty() => Ok(password),
        _ => {
            if let Some(parent) = data_dir.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
            }
            let password = cluster::random_password();
            cluster::write_secret(&file, &password)?;
            cluster::sync_dir(&file).with_context(|| format!("could not flush the directory of {}", file.display()))?;
            tracing::info!("{} is missing: the restored cluster's superuser gets a new password, written there", file.display());
            Ok(password)
        }
    }
}

/// `<data_dir>.restoring-<stamp>`: where a restore unpacks and recovers the
/// base backup; it becomes the data directory only once promoted and
/// stopped cleanly.
pub fn staging_dir(data_dir: &Path, stamp: &str) -> PathBuf {
    cluster::sibling(data_dir, &format!(".restoring-{stamp}"))
}

/// `<data_dir>.restore.json`: the restore journal.
pub fn journal_file(data_dir: &Path) -> PathBuf {
    cluster::sibling(data_dir, ".restore.json")
}

/// Where a restore is. Written (whole, flushed) before each step, so a
/// start after a crash at any point finds what to finish or undo:
/// * `recovering`: the base backup is being unpacked or recovered in
///   `staging`; the data directory is untouched. Undone: `staging` is deleted.
/// * `recovered`: `staging` holds the promoted, cleanly stopped cluster.
///   Finished: the data directory goes to `previous`, `staging` takes its
///   place (each rename checked first, so it is done once).
/// * `swapped`: the restored cluster is the data directory; the WAL
///   stream directory is retired (once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Recovering,
    Recovered,
    Swapped,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Journal {
    pub data_dir: PathBuf,
    pub wal_dir: PathBuf,
    pub stamp: String,
    pub base_backup: String,
    pub target: String,
    pub staging: PathBuf,
    /// Where the data directory as it was goes (if there is one).
    pub previous: PathBuf,
    pub step: Step,
    /// Once recovered: the restored cluster's new timeline and the segment
    /// its WAL ends in ([`archive::seed_stream`]).
    #[serde(default)]
    pub timeline: Option<u32>,
    #[serde(default)]
    pub last_segment: Option<String>,
}

impl Journal {
    /// Read only when it is the gateway's own file (`cluster::read_trusted`:
    /// no link, owned by the gateway, not writable by others), and trusted
    /// only when every path in it is the one this data directory's restore
    /// would use: the journal names directories that a start renames and
    /// deletes, so it must never point anywhere else.
    pub fn load(data_dir: &Path) -> Result<Option<Journal>> {
        cluster::read_state_file(&journal_file(data_dir), data_dir, "a restore", |journal: &Journal| {
            // The stamp builds the names below: a path separator in it would
            // let the journal name a directory elsewhere.
            let stamp_ok = !journal.stamp.is_empty() && journal.stamp.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            let stamp = if stamp_ok { journal.stamp.as_str() } else { "<a stamp of letters, digits, - _ .>" };
            vec![
                ("data_dir", journal.data_dir.clone(), data_dir.to_path_buf()),
                ("staging", journal.staging.clone(), staging_dir(data_dir, stamp)),
                ("previous", journal.previous.clone(), previous_dir(data_dir, stamp)),
            ]
        })
    }

    /// Written to a temporary file (0600, flushed), renamed over the
    /// journal, the directory flushed: after a power loss the journal holds
    /// this step or the one before, whole.
    fn save(&self) -> Result<()> {
        let path = journal_file(&self.data_dir);
        cluster::write_secret(&path, &serde_json::to_string_pretty(self)?).with_context(|| format!("could not write the restore journal {}", path.display()))
    }

    fn remove(&self) -> Result<()> {
        let path = journal_file(&self.data_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("could not remove {}", path.display())),
            _ => {}
        }
        cluster::sync_dir(&path).with_context(|| format!("could not flush the directory of {}", path.display()))
    }

    /// The data directory (if any) to `previous`, then `staging` to the data
    /// directory ([`Journal::swap_in`]). Each rename is done only when still
    /// to do, so a swap cut off between the two is finished by running it again.
    fn swap_aside(&self) -> Result<()> {
        if self.staging.exists() && self.data_dir.exists() {
            std::fs::rename(&self.data_dir, &self.previous).with_context(|| format!("could not move {} aside to {}", self.data_dir.display(), self.previous.display()))?;
            cluster::sync_dir(&self.previous)?;
            tracing::info!("moved the data directory as it was aside to {}", self.previous.display());
        }
        Ok(())
    }

    fn swap_in(&self) -> Result<()> {
        if !self.staging.exists() {
            if self.data_dir.join("PG_VERSION").exists() {
                return Ok(());
            }
            bail!(
                "the restored cluster {} is missing and {} holds no cluster; the data directory as it was is at {} (if it existed)",
                self.staging.display(),
                self.data_dir.display(),
                self.previous.display()
            );
        }
        if self.data_dir.exists() {
            bail!("{} and the restored cluster {} both exist; move one of them away, then start again", self.data_dir.display(), self.staging.display());
        }
        std::fs::rename(&self.staging, &self.data_dir).with_context(|| format!("could not move the restored cluster {} to {}", self.staging.display(), self.data_dir.display()))?;
        cluster::sync_dir(&self.data_dir)?;
        tracing::info!("the restored cluster is now {}", self.data_dir.display());
        Ok(())
    }

    /// Moves `stream/` to `stream-<stamp>` once (see [`archive::retire_stream`]),
    /// then puts the restored cluster's new timeline into the archive: its
    /// `.history` file and WAL since the fork ([`archive::seed_stream`]),
    /// and the moment it begins to serve ([`archive::record_timeline_start`]).
    /// Each part is done only when still to do.
    fn retire_stream(&self, account: &Account) -> Result<()> {
        if self.wal_dir.join(format!("stream-{}", self.stamp)).exists() {
            archive::prepare(&self.wal_dir, account)?;
        } else {
            archive::retire_stream(&self.wal_dir, &self.stamp, account)?;
        }
        if let (Some(timeline), Some(last)) = (self.timeline, &self.last_segment) {
            let copied = archive::seed_stream(&self.wal_dir, &self.data_dir.join("pg_wal"), timeline, last, account)
                .with_context(|| format!("could not put timeline {timeline}'s WAL into the archive {}", self.wal_dir.display()))?;
            archive::record_timeline_start(&self.wal_dir, timeline, Utc::now(), account)?;
            tracing::info!("timeline {timeline}: its history and {copied} WAL files since the fork are in the archive; it serves from now on");
        }
        Ok(())
    }
}

/// Finishes or undoes a restore that a crash (kill -9, power loss) stopped
/// midway, from its journal: runs at every start before the data directory
/// is looked at (a missing one would otherwise be initialised afresh) and
/// before `omni-gateway restore`. Ends with the data directory as it was or
/// the restored one; never a bare base backup.
///
/// A restore cut off before its cluster was recovered, with no data
/// directory before it (a restore onto an empty machine), leaves nothing to
/// serve: the start refuses (`for_restore` false) rather than create an
/// empty cluster, and says to run the restore again.
///
/// `stop` is checked between the journal's steps (before the undo, before
/// the swap, before the stream is retired) and while waiting for a recovery
/// PostgreSQL to go: once cancelled, the resume ends at the next step
/// boundary with an error that says where, the journal on disk naming that
/// step, so the next start resumes from exactly there. The two renames of
/// the swap are one step (the journal finishes a swap cut between them).
/// No child runs inside these steps: the recovery PostgreSQL belongs to the
/// restore itself ([`Restore::run`]), which kills it if abandoned, leaving
/// the journal at `recovering`, which this undoes.
pub fn resume(data_dir: &Path, account: &Account, for_restore: bool, stop: &CancellationToken) -> Result<()> {
    let Some(journal) = Journal::load(data_dir)? else { return Ok(()) };
    let _ = std::fs::remove_file(held_file(data_dir));
    let boundary = |journal: &Journal, next: &str| -> Result<()> {
        if stop.is_cancelled() {
            let stopped = crate::supervise::shutdown::Stopped { during: format!("finishing an interrupted restore, before {next}") };
            return Err(anyhow::Error::new(stopped).context(format!(
                "asked to stop while finishing an interrupted restore of base backup {} into {}: stopped before {next}. \
                 Nothing is half-done: the restore journal {} is at step `{}`, and the next start resumes from there",
                journal.base_backup,
                data_dir.display(),
                journal_file(data_dir).display(),
                serde_json::to_value(journal.step).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            )));
        }
        Ok(())
    };
    match journal.step {
        Step::Recovering => {
            boundary(&journal, "removing the half-restored copy")?;
            tracing::warn!(
                "a restore of base backup {} (target {}) into {} stopped before its cluster was recovered: removing the half-restored copy {}",
                journal.base_backup,
                journal.target,
                data_dir.display(),
                journal.staging.display()
            );
            if journal.staging.exists() {
                wait_for_postgres_gone(&journal.staging, stop).map_err(|e| match boundary(&journal, "removing the half-restored copy") {
                    Err(stopped) => stopped,
                    Ok(()) => e,
                })?;
                std::fs::remove_dir_all(&journal.staging).with_context(|| format!("could not remove the half-restored copy {}", journal.staging.display()))?;
            }
            if !data_dir.join("PG_VERSION").exists() && !for_restore {
                bail!(
                    "a restore into {} (base backup {}, target {}) stopped before its cluster was recovered, and there was no cluster before it: \
                     nothing to serve. Run `omni-gateway restore --to {}` again (the journal {} keeps the gateway from creating an empty cluster meanwhile)",
                    data_dir.display(),
                    journal.base_backup,
                    journal.target,
                    journal.target,
                    journal_file(data_dir).display()
                );
            }
            journal.remove()?;
            if data_dir.join("PG_VERSION").exists() {
                tracing::warn!("restore undone: {} is the data directory as it was", data_dir.display());
            }
            Ok(())
        }
        Step::Recovered | Step::Swapped => {
            tracing::warn!("a restore of base backup {} (target {}) into {} stopped after its cluster was recovered: finishing it", journal.base_backup, journal.target, data_dir.display());
            let mut journal = journal;
            if journal.step == Step::Recovered {
                boundary(&journal, "putting the restored cluster in place")?;
                journal.swap_aside()?;
                journal.swap_in()?;
                journal.step = Step::Swapped;
                journal.save()?;
            }
            boundary(&journal, "retiring the WAL stream directory of the cluster as it was")?;
            journal.retire_stream(account)?;
            journal.remove()?;
            tracing::warn!("restore finished: {} is the restored cluster; the data directory as it was is at {}", data_dir.display(), journal.previous.display());
            Ok(())
        }
    }
}

/// Waits (up to 30 s) until no PostgreSQL runs on `dir`: the recovery
/// server of a restore whose gateway was killed gets SIGQUIT and is gone a
/// moment later. Gives up at once when `stop` is cancelled.
fn wait_for_postgres_gone(dir: &Path, stop: &CancellationToken) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pidfile::clear_stale(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline || stop.is_cancelled() => return Err(e.context(format!("PostgreSQL still runs on the half-restored copy {}", dir.display()))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `OMNI_TEST_HOLD_RESTORE_STEP`, for tests only: names a step (`copied`,
/// `promoted`, `recovered`, `swapping`, `swapped`) at which a restore writes
/// `<data_dir>.restore.held` (holding the step's name) and waits forever,
/// so a test can kill it exactly there. Unset in any real use.
pub const TEST_HOLD_VAR: &str = "OMNI_TEST_HOLD_RESTORE_STEP";

fn held_file(data_dir: &Path) -> PathBuf {
    cluster::sibling(data_dir, ".restore.held")
}

async fn test_hold(step: &str, data_dir: &Path) {
    if std::env::var(TEST_HOLD_VAR).ok().as_deref() != Some(step) {
        return;
    }
    tracing::warn!("{TEST_HOLD_VAR}={step}: the restore holds here (a test kills it)");
    let _ = std::fs::write(held_file(data_dir), step);
    std::future::pending::<()>().await;
}

/// Whether the archive holds a commit (or abort) after `t`: then a recovery
/// to `t` reaches its target. Reads the newest segment that has any commit
/// record, with `pg_waldump` (a `.partial` one through a copy under its full name).
pub async fn commit_after(wal: &WalConfig, binaries: &Binaries, data_dir: &Path, t: DateTime<Utc>) -> Result<bool> {
    let lineage = archive::lineage(&wal.dir, archive::newest_timeline(&wal.dir));
    commit_after_on(wal, binaries, data_dir, t, &lineage).await
}

/// [`commit_after`] on the history of one timeline: only its segments, and
/// in each only the records before the lineage left that segment's
/// timeline (an abandoned timeline's later commits are not on it).
pub async fn commit_after_on(wal: &WalConfig, binaries: &Binaries, data_dir: &Path, t: DateTime<Utc>, lineage: &archive::Lineage) -> Result<bool> {
    let mut segments: Vec<archive::Segment> = archive::stream_dirs(&wal.dir).iter().flat_map(|d| archive::segments(d)).filter(|s| lineage.needs_segment(s)).collect();
    segments.sort_by(|a, b| (b.position(), &b.name[..8]).cmp(&(a.position(), &a.name[..8])));
    let scratch_guard = Scratch::new(data_dir, "waldump");
    let scratch = scratch_guard.path().to_path_buf();
    std::fs::create_dir_all(&scratch)?;
    let result = async {
        for seg in segments {
            let file = if seg.partial {
                let copy = scratch.join(&seg.name);
                std::fs::copy(&seg.path, &copy).with_context(|| format!("copying {}", seg.path.display()))?;
                copy
            } else if seg.sealed {
                let copy = scratch.join(&seg.name);
                let (from, to) = (seg.path.clone(), copy.clone());
                tokio::task::spawn_blocking(move || super::sealed::open_segment(&from).and_then(|b| std::fs::write(&to, b).with_context(|| format!("writing {}", to.display()))))
                    .await
                    .context("decrypting a WAL segment stopped")??;
                copy
            } else {
                seg.path.clone()
            };
            let out_path = scratch.join("out.txt");
            let out = std::fs::File::create(&out_path)?;
            let mut spec = ChildSpec::new("pg_waldump", binaries.tool("pg_waldump")).arg("--rmgr=Transaction").arg(&file).env("TZ", "UTC");
            spec.output = Output::Text { routine: Level::DEBUG };
            spec.stdout = Some(out);
            // It ends with an error at the zero-filled end of a segment still
            // being written; the records before it are what counts.
            child::run(spec).await.context("could not run pg_waldump")?;
            let until = archive::name_timeline(&seg.name).and_then(|tl| lineage.leaves(tl)).unwrap_or(u64::MAX);
            let newest = commit_times(&std::fs::read_to_string(&out_path)?).into_iter().filter(|(lsn, _)| *lsn < until).map(|(_, at)| at).max();
            if seg.partial || seg.sealed {
                let _ = std::fs::remove_file(&file);
            }
            if let Some(newest) = newest {
                return Ok(newest > t);
            }
        }
        Ok(false)
    }
    .await;
    drop(scratch_guard);
    result
}

/// Commit and abort records (position, time) in `pg_waldump` output
/// printed with `TZ=UTC`: `… lsn: 0/0174D6E8, … desc: COMMIT 2026-11-25 16:12:01.234567 UTC; …`.
fn commit_times(text: &str) -> Vec<(u64, DateTime<Utc>)> {
    text.lines()
        .filter_map(|line| {
            let lsn = line.split("lsn: ").nth(1)?.split(',').next().and_then(archive::parse_lsn)?;
            let desc = line.split("desc: ").nth(1)?;
            let rest = desc.strip_prefix("COMMIT ").or_else(|| desc.strip_prefix("ABORT "))?;
            let stamp: String = rest.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            chrono::NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%d %H:%M:%S%.f").ok().map(|n| (lsn, n.and_utc()))
        })
        .collect()
}

/// The restored (promoted, cleanly stopped) cluster in `dir`: its timeline
/// and the WAL segment of its shutdown checkpoint, where its WAL ends
/// (`pg_controldata`).
async fn end_of_wal(binaries: &Binaries, dir: &Path) -> Result<(u32, String)> {
    // Through the gateway's own child handling (it reaps every child).
    let out_path = cluster::sibling(dir, ".controldata.txt");
    let out = std::fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut spec = ChildSpec::new("pg_controldata", binaries.tool("pg_controldata")).arg("-D").arg(dir).env("LC_ALL", "C");
    spec.output = Output::Text { routine: Level::DEBUG };
    spec.stdout = Some(out);
    spec.env_remove = ["PGDATA"].iter().map(Into::into).collect();
    let status = child::run(spec).await.context("could not run pg_controldata");
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let status = status?;
    if !status.success() {
        bail!("pg_controldata could not read the restored cluster {} ({status}); its error is in the log above", dir.display());
    }
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string());
    let timeline: u32 = field("Latest checkpoint's TimeLineID:").and_then(|v| v.parse().ok()).context("pg_controldata names no checkpoint timeline")?;
    let location = field("Latest checkpoint location:").context("pg_controldata names no checkpoint location")?;
    let segment = tarball::segment_name(timeline, &location).with_context(|| format!("pg_controldata: no WAL position in {location}"))?;
    Ok((timeline, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_latest_or_rfc3339() {
        assert_eq!("latest".parse::<Target>(), Ok(Target::Latest));
        let t: Target = "2026-11-25T17:00:00+01:00".parse().unwrap();
        assert_eq!(t.to_string(), "2026-11-25T16:00:00.000000Z");
        assert!("yesterday".parse::<Target>().unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn commit_times_are_read_from_pg_waldump_lines() {
        let out = "rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/0174D6E8, prev 0/0174D6B0, desc: COMMIT 2026-11-25 16:12:01.234567 UTC\n\
                   rmgr: Transaction len (rec/tot):     34/    34, tx:        736, lsn: 0/0174D710, prev 0/0174D6E8, desc: ABORT 2026-11-25 16:12:02.000001 UTC\n\
                   pg_waldump: error: error in WAL record at 0/174D710: invalid record length";
        let times = commit_times(out);
        assert_eq!(times.len(), 2);
        assert_eq!(times[1].0, parse_lsn("0/0174D710").unwrap());
        assert_eq!(times[1].1.to_rfc3339_opts(SecondsFormat::Micros, true), "2026-11-25T16:12:02.000001Z");
    }

    #[test]
    fn wal_positions_of_segments_and_lsns_agree() {
        assert_eq!(segment_lsn("000000010000000000000003"), parse_lsn("0/3000000"));
        assert_eq!(segment_lsn("000000020000000100000000"), parse_lsn("1/0"));
    }

    fn me() -> Account {
        Account { name: "me".into(), uid: 0, gid: 0, home: PathBuf::from("/"), switch: false }
    }

    /// A fake cluster directory holding `marker`.
    fn cluster_dir(dir: &Path, marker: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("PG_VERSION"), "15").unwrap();
        std::fs::write(dir.join("marker"), marker).unwrap();
    }

    fn journal(root: &Path, step: Step) -> Journal {
        let data_dir = root.join("postgres");
        let wal_dir = root.join("wal");
        std::fs::create_dir_all(wal_dir.join("stream")).unwrap();
        Journal {
            staging: staging_dir(&data_dir, "S"),
            previous: previous_dir(&data_dir, "S"),
            data_dir,
            wal_dir,
            stamp: "S".into(),
            base_backup: "B".into(),
            target: "latest".into(),
            step,
            timeline: None,
            last_segment: None,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("omni-restore-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A drill's scratch copy has a name no earlier life of the same pid
    /// can block, is removed when dropped (a cancelled drill), and copies
    /// left by killed processes are swept while those in use are kept.
    #[test]
    fn scratch_copies_are_removed_on_drop_and_leftovers_of_dead_processes_are_swept() {
        let root = scratch("sweep");
        let data_dir = root.join("postgres");
        let me = std::process::id();
        // A pid that cannot exist (above pid_max) and one of ours not in use.
        let dead = root.join("postgres.drill-4294967");
        let ours_left = root.join(format!("postgres.drill-{me}"));
        let alive_other = root.join("postgres.drill-1-0000abcd");
        for d in [&dead, &ours_left, &alive_other] {
            std::fs::create_dir_all(d.join("data")).unwrap();
        }
        let first = Scratch::new(&data_dir, "drill");
        assert!(!dead.exists() && !ours_left.exists(), "leftovers of dead processes are swept");
        assert!(alive_other.exists(), "pid 1 runs: its copy is not ours to remove");
        std::fs::create_dir(first.path()).unwrap();
        let name = first.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("postgres.drill-{me}-")) && name.len() > format!("postgres.drill-{me}-").len(), "{name}");
        // A second drill of the same process keeps the first one's copy.
        let second = Scratch::new(&data_dir, "drill");
        assert!(first.path().exists());
        assert_ne!(first.path(), second.path());
        std::fs::write(first.path().join("file"), "x").unwrap();
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists(), "dropped (a drill that ended or was cancelled), its copy is removed");
        drop(second);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_interrupted_recovery_is_undone_and_the_old_cluster_stays() {
        let root = scratch("undo");
        let j = journal(&root, Step::Recovering);
        cluster_dir(&j.data_dir, "old");
        cluster_dir(&j.staging, "new");
        j.save().unwrap();
        resume(&j.data_dir, &me(), false, &CancellationToken::new()).unwrap();
        assert_eq!(std::fs::read_to_string(j.data_dir.join("marker")).unwrap(), "old");
        assert!(!j.staging.exists() && !journal_file(&j.data_dir).exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_interrupted_recovery_with_no_cluster_before_it_keeps_the_start_from_making_an_empty_one() {
        let root = scratch("empty");
        let j = journal(&root, Step::Recovering);
        cluster_dir(&j.staging, "new");
        j.save().unwrap();
        let e = resume(&j.data_dir, &me(), false, &CancellationToken::new()).unwrap_err();
        assert!(format!("{e:#}").contains("omni-gateway restore --to latest"), "{e:#}");
        assert!(journal_file(&j.data_dir).exists(), "the journal stays until a restore runs again");
        resume(&j.data_dir, &me(), true, &CancellationToken::new()).unwrap();
        assert!(!journal_file(&j.data_dir).exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_swap_cut_off_anywhere_is_finished_once() {
        for aside in [false, true] {
            let root = scratch(&format!("swap-{aside}"));
            let j = journal(&root, Step::Recovered);
            cluster_dir(&j.data_dir, "old");
            cluster_dir(&j.staging, "new");
            if aside {
                // Killed between the two renames: the data directory is missing.
                std::fs::rename(&j.data_dir, &j.previous).unwrap();
            }
            j.save().unwrap();
            resume(&j.data_dir, &me(), false, &CancellationToken::new()).unwrap();
            assert_eq!(std::fs::read_to_string(j.data_dir.join("marker")).unwrap(), "new");
            assert_eq!(std::fs::read_to_string(j.previous.join("marker")).unwrap(), "old");
            assert!(j.wal_dir.join("stream-S").is_dir() && j.wal_dir.join("stream").is_dir(), "the stream is retired");
            assert!(!journal_file(&j.data_dir).exists());
            // Nothing left to do: a second start changes nothing.
            resume(&j.data_dir, &me(), false, &CancellationToken::new()).unwrap();
            assert_eq!(std::fs::read_to_string(j.data_dir.join("marker")).unwrap(), "new");
            let _ = std::fs::remove_dir_all(&root);
        }
    }

    /// A stop asked for while a start finishes a restore ends it at the next
    /// step boundary, saying where; the journal names that step and the
    /// next start resumes from it, once.
    #[test]
    fn a_stop_during_a_resume_ends_it_at_the_next_step_and_the_next_start_resumes_from_there() {
        let stopped = CancellationToken::new();
        stopped.cancel();
        for step in [Step::Recovering, Step::Recovered, Step::Swapped] {
            let root = scratch(&format!("stop-{step:?}"));
            let j = journal(&root, step);
            if step == Step::Swapped {
                cluster_dir(&j.data_dir, "new");
                cluster_dir(&j.previous, "old");
            } else {
                cluster_dir(&j.data_dir, "old");
                cluster_dir(&j.staging, "new");
            }
            j.save().unwrap();
            let e = format!("{:#}", resume(&j.data_dir, &me(), false, &stopped).unwrap_err());
            let name = serde_json::to_value(step).unwrap().as_str().unwrap().to_owned();
            assert!(e.contains("stopped before") && e.contains(&format!("at step `{name}`")) && e.contains("the next start resumes from there"), "{e}");
            assert_eq!(Journal::load(&j.data_dir).unwrap().expect("the journal stays").step, step, "the journal still names the step not done");
            let marker = |d: &Path| std::fs::read_to_string(d.join("marker")).ok();
            match step {
                Step::Recovering | Step::Recovered => {
                    assert_eq!((marker(&j.data_dir).as_deref(), marker(&j.staging).as_deref()), (Some("old"), Some("new")), "nothing was moved or removed");
                }
                Step::Swapped => assert!(!j.wal_dir.join("stream-S").exists(), "the stream is not retired yet"),
            }
            // The next start resumes from there and finishes.
            resume(&j.data_dir, &me(), false, &CancellationToken::new()).unwrap();
            assert!(!journal_file(&j.data_dir).exists());
            let expected = if step == Step::Recovering { "old" } else { "new" };
            assert_eq!(marker(&j.data_dir).as_deref(), Some(expected));
            let _ = std::fs::remove_dir_all(&root);
        }
    }

    #[test]
    fn the_previous_directory_sits_next_to_the_data_directory() {
        assert_eq!(previous_dir(Path::new("/srv/data/postgres"), "20261125T160000Z"), PathBuf::from("/srv/data/postgres.before-restore-20261125T160000Z"));
    }
}
