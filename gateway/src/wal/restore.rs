//! Restore to a point in time: the newest base backup that ended before the
//! target, plus WAL from the archive up to the target, in place of the data
//! directory.
//!
//! Steps, each logged: refuse while PostgreSQL runs on the data directory →
//! pick the base backup → move the data directory aside
//! (`<data_dir>.before-restore-<stamp>`, kept: `omni-gateway restore
//! --discard-previous` deletes it) → copy the base backup in → start
//! `postgres` on a private port with `recovery.signal`, the archive's
//! `restore_command`, the target and `recovery_target_action=promote` → wait
//! for the promotion, reporting the replay position → check the app database
//! answers → stop it cleanly → start a fresh stream directory (the cluster
//! continues on a new timeline). Any failure on the way deletes the copy and
//! puts the previous directory back.
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
use tracing::Level;

use super::archive::SEGMENT_BYTES;
use super::{archive, base, tarball};
use crate::child::{self, ChildSpec, Output};
use crate::config::WalConfig;
use crate::postgres::binaries::Binaries;
use crate::postgres::cluster::{self, APP_DATABASE, SUPERUSER};
use crate::postgres::pidfile;
use crate::privilege::Account;

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

/// The span a restore can reach.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// The end of the oldest verified base backup.
    pub earliest: Option<DateTime<Utc>>,
    /// The last write into the archive.
    pub latest: Option<DateTime<Utc>>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |t: Option<DateTime<Utc>>| t.map_or("none".to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
        write!(f, "from {} to {}", show(self.earliest), show(self.latest))
    }
}

pub fn window(wal_dir: &Path) -> Window {
    let earliest = base::list(wal_dir).first().map(|b| b.finished_at);
    let latest = archive::newest_write(wal_dir).map(DateTime::<Utc>::from);
    Window { earliest, latest: earliest.and(latest) }
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub base_backup: String,
    pub target: Target,
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
    /// The superuser password (`<data_dir>.password`): the base backup has the same one.
    pub password: &'a str,
    /// Told each step and how far the restore got (0–100), for
    /// `/gateway/status` when the gateway restores while it runs.
    pub progress: Option<&'a (dyn Fn(&str, u8) + Sync)>,
}

impl Restore<'_> {
    pub async fn run(&self, target: Target) -> Result<Restored> {
        let started = Instant::now();
        if self.data_dir.join("PG_VERSION").exists() {
            pidfile::clear_stale(self.data_dir)
                .context("PostgreSQL still runs on this data directory: stop the gateway first (or restore through POST /api/v1/backup/restore-to)")?;
        }
        let backup = self.pick_base(target)?;
        self.report("reading commit times in the WAL archive", 10);
        let stop_at = match target {
            Target::Latest => None,
            Target::Time(t) if commit_after(self.wal, self.binaries, t).await? => Some(t),
            Target::Time(t) => {
                tracing::info!("nothing was committed after {} in the archive: replaying all of it", Target::Time(t));
                None
            }
        };
        let stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        self.report("moving the data directory aside", 20);
        let previous = self.move_aside(&stamp)?;
        tracing::info!("restoring base backup {} into {}", backup.id, self.data_dir.display());
        let result = self.recover(&backup, stop_at).await;
        if let Err(e) = result {
            tracing::error!("restore failed: {e:#}; putting the previous data directory back");
            if let Err(undo) = self.undo(previous.as_deref()) {
                return Err(e.context(format!("and putting the previous data directory back failed too: {undo:#}")));
            }
            return Err(e.context("the previous data directory is back in place, unchanged"));
        }
        archive::retire_stream(&self.wal.dir, &stamp, self.account)?;
        Ok(Restored { base_backup: backup.id, target, previous, took: started.elapsed() })
    }

    fn report(&self, step: &str, percent: u8) {
        if let Some(progress) = self.progress {
            progress(step, percent);
        }
    }

    fn pick_base(&self, target: Target) -> Result<base::BaseBackup> {
        let backups = base::list(&self.wal.dir);
        let window = window(&self.wal.dir);
        let chosen = match target {
            Target::Latest => backups.last(),
            Target::Time(t) if t > Utc::now() => None,
            Target::Time(t) => backups.iter().rev().find(|b| b.finished_at <= t),
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

    /// Moves the data directory (if any) to `<data_dir>.before-restore-<stamp>`.
    fn move_aside(&self, stamp: &str) -> Result<Option<PathBuf>> {
        if !self.data_dir.exists() {
            return Ok(None);
        }
        let aside = previous_dir(self.data_dir, stamp);
        std::fs::rename(self.data_dir, &aside).with_context(|| format!("could not move {} aside to {}", self.data_dir.display(), aside.display()))?;
        tracing::info!("moved the current data directory aside to {}", aside.display());
        Ok(Some(aside))
    }

    fn undo(&self, previous: Option<&Path>) -> Result<()> {
        if self.data_dir.exists() {
            std::fs::remove_dir_all(self.data_dir).with_context(|| format!("deleting the half-restored {}", self.data_dir.display()))?;
        }
        if let Some(previous) = previous {
            std::fs::rename(previous, self.data_dir).with_context(|| format!("moving {} back to {}", previous.display(), self.data_dir.display()))?;
        }
        Ok(())
    }

    /// Copies `backup` into the (absent) data directory and recovers it;
    /// returns how many app tables the recovered cluster has.
    async fn recover(&self, backup: &base::BaseBackup, stop_at: Option<DateTime<Utc>>) -> Result<i64> {
        let copied = Instant::now();
        let (from, to, owner) = (backup.dir(&self.wal.dir), self.data_dir.to_path_buf(), self.account.run_as());
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
        std::fs::set_permissions(self.data_dir, std::fs::Permissions::from_mode(0o700))?;
        let signal = self.data_dir.join("recovery.signal");
        std::fs::write(&signal, b"").with_context(|| format!("writing {}", signal.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&signal, Some(uid), Some(gid))?;
        }
        tracing::info!("base backup in place in {} ms; replaying WAL up to {}", copied.elapsed().as_millis(), stop_at.map_or(Target::Latest, Target::Time));

        let port = cluster::pick_free_port()?;
        let socket_dir = cluster::make_socket_dir(self.account)?;
        let mut spec = ChildSpec::new("postgres", self.binaries.postgres())
            .arg("-D")
            .arg(self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&socket_dir)
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg("log_line_prefix=[%p] ")
            .arg("-c")
            .arg(format!("restore_command={}", archive::restore_command(&self.wal.dir)))
            .arg("-c")
            .arg("recovery_target_action=promote")
            .arg("-c")
            .arg("recovery_target_timeline=latest")
            .arg("-c")
            .arg("synchronous_standby_names=");
        if let Some(t) = stop_at {
            spec = spec.arg("-c").arg(format!("recovery_target_time={}", t.format("%Y-%m-%d %H:%M:%S%.6f+00")));
        }
        spec.output = Output::Postgres { routine: Level::INFO };
        spec.run_as = self.account.run_as();
        spec.death_signal = nix::sys::signal::Signal::SIGQUIT;
        spec.env_remove = ["PGDATA", "PGPORT", "PGHOST"].iter().map(Into::into).collect();
        let mut child = child::spawn(spec).await.context("could not start postgres for the restore")?;
        let pid = child.id();
        let span = (segment_lsn(&backup.start_segment), newest_segment_end(&self.wal.dir));
        let outcome = self.until_promoted(&mut child, port, span).await;
        stop(&mut child, pid, outcome.is_ok()).await;
        let _ = std::fs::remove_dir_all(&socket_dir);
        outcome
    }

    /// `span`: the replay's first and (at most) last WAL position, for the percentage.
    async fn until_promoted(&self, child: &mut tokio::process::Child, port: u16, span: (Option<u64>, Option<u64>)) -> Result<i64> {
        let config = |db: &str| {
            let mut c = tokio_postgres::Config::new();
            c.host("127.0.0.1").port(port).user(SUPERUSER).password(self.password).dbname(db).connect_timeout(Duration::from_secs(2));
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
            if let Ok(client) = crate::postgres::connect(&config("postgres")).await {
                if let Ok(row) = client.query_one("SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn()::text, '')", &[]).await {
                    let (recovering, lsn): (bool, String) = (row.get(0), row.get(1));
                    if !recovering {
                        break;
                    }
                    if let (Some(from), Some(to), Some(at)) = (span.0, span.1, parse_lsn(&lsn)) {
                        let done = (at.saturating_sub(from) as f64 / to.saturating_sub(from).max(1) as f64).clamp(0.0, 1.0);
                        self.report(&format!("replaying WAL (at {lsn})"), 40 + (done * 50.0) as u8);
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
        let client = crate::postgres::connect(&config(APP_DATABASE)).await.context("the restored cluster does not open the app database")?;
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
/// cluster on a free port, its app database opened and its tables counted,
/// and the copy removed. The result is recorded in `drill.json` either way.
pub async fn drill(wal: &WalConfig, binaries: &Binaries, account: &Account, password: &str) -> Drill {
    let started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("omni-drill-{}", std::process::id()));
    let backup = base::list(&wal.dir).pop();
    let outcome = async {
        let backup = backup.clone().with_context(|| format!("no verified base backup in {} to drill", archive::base_dir(&wal.dir).display()))?;
        tracing::info!("restore drill: checking base backup {} against its manifest", backup.id);
        base::verify(binaries, account, &backup.dir(&wal.dir)).await?;
        std::fs::DirBuilder::new().mode(0o700).create(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        if let Some((uid, gid)) = account.run_as() {
            std::os::unix::fs::chown(&scratch, Some(uid), Some(gid))?;
        }
        let data_dir = scratch.join("data");
        tracing::info!("restore drill: restoring {} and its WAL into {}", backup.id, data_dir.display());
        let restore = Restore { data_dir: &data_dir, wal, binaries, account, password, progress: None };
        let tables = restore.recover(&backup, None).await?;
        if tables == 0 {
            bail!("the restored app database has no tables");
        }
        Ok(tables)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
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

/// Stops the recovery `postgres`: a clean shutdown after a success (a
/// checkpoint, so the next start needs no recovery), immediate otherwise.
async fn stop(child: &mut tokio::process::Child, pid: Option<u32>, clean: bool) {
    if let Some(pid) = pid {
        let signal = if clean { libc::SIGINT } else { libc::SIGQUIT };
        // SAFETY: signalling the child we started and have not reaped.
        unsafe { libc::kill(pid as i32, signal) };
        if tokio::time::timeout(Duration::from_secs(60), child.wait()).await.is_err() {
            // SAFETY: as above, its whole process group.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            let _ = child.wait().await;
        }
        child::forget(pid);
    }
}

/// The WAL position where a segment (`TTTTTTTTXXXXXXXXYYYYYYYY`) begins.
fn segment_lsn(name: &str) -> Option<u64> {
    let (log, seg) = (u64::from_str_radix(name.get(8..16)?, 16).ok()?, u64::from_str_radix(name.get(16..24)?, 16).ok()?);
    Some((log << 32) + seg * SEGMENT_BYTES)
}

/// Where the archive's newest segment ends.
fn newest_segment_end(wal_dir: &Path) -> Option<u64> {
    archive::stream_dirs(wal_dir).iter().flat_map(|d| archive::segments(d)).filter_map(|s| segment_lsn(&s.name)).max().map(|l| l + SEGMENT_BYTES)
}

/// `0/3000060` → its byte position.
pub(super) fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) + u64::from_str_radix(low, 16).ok()?)
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

/// Whether the archive holds a commit (or abort) after `t`: then a recovery
/// to `t` reaches its target. Reads the newest segment that has any commit
/// record, with `pg_waldump` (a `.partial` one through a copy under its full name).
pub async fn commit_after(wal: &WalConfig, binaries: &Binaries, t: DateTime<Utc>) -> Result<bool> {
    let mut segments: Vec<archive::Segment> = archive::stream_dirs(&wal.dir).iter().flat_map(|d| archive::segments(d)).collect();
    segments.sort_by(|a, b| (b.position(), &b.name[..8]).cmp(&(a.position(), &a.name[..8])));
    let scratch = std::env::temp_dir().join(format!("omni-waldump-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = async {
        for seg in segments {
            let file = if seg.partial {
                let copy = scratch.join(&seg.name);
                std::fs::copy(&seg.path, &copy).with_context(|| format!("copying {}", seg.path.display()))?;
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
            let newest = commit_times(&std::fs::read_to_string(&out_path)?).into_iter().max();
            if seg.partial {
                let _ = std::fs::remove_file(&file);
            }
            if let Some(newest) = newest {
                return Ok(newest > t);
            }
        }
        Ok(false)
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Commit and abort times in `pg_waldump` output printed with `TZ=UTC`:
/// `… desc: COMMIT 2026-11-25 16:12:01.234567 UTC; …`.
fn commit_times(text: &str) -> Vec<DateTime<Utc>> {
    text.lines()
        .filter_map(|line| {
            let desc = line.split("desc: ").nth(1)?;
            let rest = desc.strip_prefix("COMMIT ").or_else(|| desc.strip_prefix("ABORT "))?;
            let stamp: String = rest.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            chrono::NaiveDateTime::parse_from_str(&stamp, "%Y-%m-%d %H:%M:%S%.f").ok().map(|n| n.and_utc())
        })
        .collect()
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
        assert_eq!(times[1].to_rfc3339_opts(SecondsFormat::Micros, true), "2026-11-25T16:12:02.000001Z");
    }

    #[test]
    fn wal_positions_of_segments_and_lsns_agree() {
        assert_eq!(segment_lsn("000000010000000000000003"), parse_lsn("0/3000000"));
        assert_eq!(segment_lsn("000000020000000100000000"), parse_lsn("1/0"));
    }

    #[test]
    fn the_previous_directory_sits_next_to_the_data_directory() {
        assert_eq!(previous_dir(Path::new("/srv/data/postgres"), "20261125T160000Z"), PathBuf::from("/srv/data/postgres.before-restore-20261125T160000Z"));
    }
}
