//! Base backups: `pg_basebackup` into `base/.<id>.partial/` (tar format,
//! compressed with lz4 — gzip where the tools were built without it — with
//! its manifest and the WAL it needs), checked against the manifest
//! ([`tarball`]), then renamed to `base/<id>/` with `base/<id>.json` beside
//! it. Only a verified backup gets a name; a failed one leaves nothing behind.
//! Plain-format backups of earlier versions are still listed, checked (with
//! `pg_verifybackup`) and restored.
//!
//! Retention keeps every backup that ended inside `OMNI_PITR_WINDOW`, plus
//! the newest one that ended before it (the window's start replays from
//! there), and never the last one; WAL segments older than the oldest kept
//! backup's start are deleted with it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tracing::Level;

use super::{archive, tarball};
use crate::process::child::{self, ChildSpec, Output};
use crate::config::WalConfig;
use crate::pg::binaries::Binaries;
use super::Server;
use crate::process::privilege::Account;

/// What `base/<id>.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseBackup {
    pub id: String,
    pub started_at: DateTime<Utc>,
    /// A restore can reach any time from here on (the backup is consistent
    /// only once its end has been replayed).
    pub finished_at: DateTime<Utc>,
    pub bytes: u64,
    /// The WAL file it starts in (its manifest's first WAL range, or the
    /// `START WAL LOCATION` of a plain backup's `backup_label`): WAL before it is not
    /// needed to restore it.
    pub start_segment: String,
    /// The timeline it was taken on (records from before this field: the
    /// one in `start_segment`'s name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Its WAL range, from the manifest: the restore needs WAL from
    /// `start_lsn`, and the copy is consistent once `end_lsn` is replayed
    /// (records from before these fields: read from the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// The cluster's system identifier (`pg_control_system()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
}

impl BaseBackup {
    pub fn dir(&self, wal_dir: &Path) -> PathBuf {
        archive::base_dir(wal_dir).join(&self.id)
    }

    /// The timeline it was taken on.
    pub fn timeline(&self) -> u32 {
        self.timeline.or_else(|| archive::name_timeline(&self.start_segment)).unwrap_or(1)
    }

    /// Where its WAL starts.
    pub fn start(&self) -> u64 {
        self.start_lsn.as_deref().and_then(archive::parse_lsn).or_else(|| archive::segment_lsn(&self.start_segment)).unwrap_or(0)
    }

    /// Where it is consistent (its start when no end is known).
    pub fn end(&self) -> u64 {
        self.end_lsn.as_deref().and_then(archive::parse_lsn).unwrap_or_else(|| self.start())
    }

    /// Whether a restore onto `lineage` can start from it: taken on one of
    /// its timelines, and consistent before the lineage left that timeline.
    pub fn serves(&self, lineage: &archive::Lineage) -> bool {
        lineage.holds(self.timeline(), self.start(), self.end())
    }
}

/// Takes a base backup of the running cluster and verifies it.
pub async fn take(server: &Server, wal: &WalConfig) -> Result<BaseBackup> {
    archive::prepare(&wal.dir, &server.account)?;
    let started_at = Utc::now();
    let clock = Instant::now();
    let id = started_at.format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let base = archive::base_dir(&wal.dir);
    let partial = base.join(format!(".{id}.partial"));
    tracing::info!("base backup {id}: copying the cluster into {}", partial.display());
    let result = async {
        let gzip = GZIP_ONLY.load(Ordering::Relaxed);
        if let Err(e) = copy(server, &partial, gzip).await {
            if gzip {
                return Err(e);
            }
            // PostgreSQL before 16 says only once the copy runs that its build
            // has no lz4 (and before 15 there is no `--compress=client-lz4`).
            tracing::warn!("base backup {id}: pg_basebackup with lz4 compression failed ({e:#}); trying again with gzip");
            let _ = std::fs::remove_dir_all(&partial);
            copy(server, &partial, true).await?;
            GZIP_ONLY.store(true, Ordering::Relaxed);
        }
        tracing::info!("base backup {id}: copied in {} ms; checking it against its manifest", clock.elapsed().as_millis());
        verify(&server.binaries, &server.account, &partial).await?;
        let start_segment = start_segment(&partial)?;
        let (timeline, start_lsn, end_lsn) = wal_range(&partial);
        let system_identifier = system_identifier(server).await;
        let bytes = tree_size(&partial);
        // OMNI_ENCRYPT_LOCAL: checked plain, kept sealed (sealed.rs).
        if let Some(encryption) = super::sealed::encryption() {
            let (at, owner, sealing) = (partial.clone(), server.account.clone(), clock.elapsed());
            let files = tokio::task::spawn_blocking(move || super::sealed::seal_tree(encryption, &at, &owner)).await.context("sealing the base backup stopped")??;
            tracing::info!("base backup {id}: {files} files encrypted ({} ms)", (clock.elapsed() - sealing).as_millis());
        }
        let backup = BaseBackup { id: id.clone(), started_at, finished_at: Utc::now(), bytes, start_segment, timeline, start_lsn, end_lsn, system_identifier };
        let dir = backup.dir(&wal.dir);
        std::fs::rename(&partial, &dir).with_context(|| format!("could not rename {} to {}", partial.display(), dir.display()))?;
        write_record(&wal.dir, &backup)?;
        Ok(backup)
    }
    .await;
    match &result {
        Ok(b) => {
            tracing::info!("base backup {id}: verified and kept ({} MB, {} ms in all)", b.bytes / 1_000_000, clock.elapsed().as_millis());
            KEPT.notify_one();
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(&partial);
        }
    }
    result
}

/// Woken each time a base backup is verified and kept (one permit kept when
/// nobody waits, so a round under way runs again at once after): what copies backups
/// elsewhere (the off-site shipper) starts on it at once instead of at its
/// next round.
pub static KEPT: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Set once `pg_basebackup` failed with lz4 and succeeded with gzip.
static GZIP_ONLY: AtomicBool = AtomicBool::new(false);

/// Runs `pg_basebackup` into `partial`: tar format, compressed, a manifest
/// with CRC-32C checksums, the WAL it needs streamed beside it.
async fn copy(server: &Server, partial: &Path, gzip: bool) -> Result<()> {
    let mut spec = super::tool(server, "pg_basebackup")
        .arg("-D")
        .arg(partial)
        .arg("--format=tar")
        .arg(if gzip { "--gzip" } else { "--compress=client-lz4" })
        .arg("--wal-method=stream")
        .arg("--checkpoint=fast")
        .arg("--manifest-checksums=CRC32C");
    spec.output = Output::Text { routine: Level::INFO };
    let mut child = child::spawn(spec).await.context("could not run pg_basebackup")?;
    // Dropped unfinished (the gateway stops): the copy is stopped too, and
    // pg_basebackup removes what it wrote.
    let running = KillOnDrop(child.id());
    let status = child.wait().await.context("waiting for pg_basebackup")?;
    running.finished();
    if !status.success() {
        bail!("pg_basebackup failed ({status}); its error is in the log above");
    }
    Ok(())
}

/// Sends SIGTERM to a tool's process group unless it finished.
struct KillOnDrop(Option<u32>);

impl KillOnDrop {
    fn finished(mut self) {
        if let Some(pid) = self.0.take() {
            child::forget(pid);
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            tracing::info!("stopping the base backup in progress (pid {pid})");
            // The process group of a child we started and have not reaped.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            child::forget(pid);
        }
    }
}

/// Every file against the manifest's checksums, and the backup's own WAL
/// parsed from start to end: by [`tarball`] and `pg_waldump` for a tar
/// backup, by `pg_verifybackup` for a plain one.
pub async fn verify(binaries: &Binaries, account: &Account, dir: &Path) -> Result<()> {
    if tarball::is_tar(dir) {
        return verify_tar(binaries, account, dir).await;
    }
    let mut spec = ChildSpec::new("pg_verifybackup", binaries.tool("pg_verifybackup")).arg("--quiet").arg(dir);
    spec.output = Output::Text { routine: Level::WARN };
    spec.run_as = account.run_as();
    spec.env.extend(account.login_env());
    let status = child::run(spec).await.context("could not run pg_verifybackup")?;
    if !status.success() {
        bail!("pg_verifybackup found {} damaged ({status}); what it found is in the log above", dir.display());
    }
    Ok(())
}

async fn verify_tar(binaries: &Binaries, account: &Account, dir: &Path) -> Result<()> {
    let clock = Instant::now();
    let at = dir.to_path_buf();
    let (manifest, bytes) = tokio::task::spawn_blocking(move || {
        let manifest = tarball::read_manifest(&at)?;
        let bytes = tarball::check_files(&at, &manifest)?;
        anyhow::Ok((manifest, bytes))
    })
    .await
    .context("the check of the base backup's files stopped")??;
    tracing::info!("{}: {} MB of files match the manifest ({} ms); parsing the WAL it needs", dir.display(), bytes / 1_000_000, clock.elapsed().as_millis());
    // Beside the backup, on the archive's disk (never /tmp, often a small
    // tmpfs); named like a partial backup, so a kill's leftover is removed
    // by `remove_partials` at the next start.
    let scratch = dir.parent().unwrap_or(Path::new(".")).join(format!(".verify-wal-{}-{:x}.partial", std::process::id(), rand::random::<u32>()));
    let result = async {
        let (from, to, owner) = (dir.to_path_buf(), scratch.clone(), account.clone());
        tokio::task::spawn_blocking(move || tarball::unpack(&from, "pg_wal", &to, &owner)).await.context("unpacking the backup's WAL stopped")??;
        for range in &manifest.wal_ranges {
            let mut spec = ChildSpec::new("pg_waldump", binaries.tool("pg_waldump"))
                .arg("--quiet")
                .arg(format!("--path={}", scratch.display()))
                .arg(format!("--timeline={}", range.timeline))
                .arg(format!("--start={}", range.start))
                .arg(format!("--end={}", range.end));
            spec.output = Output::Text { routine: Level::WARN };
            spec.run_as = account.run_as();
            spec.env.extend(account.login_env());
            let status = child::run(spec).await.context("could not run pg_waldump")?;
            if !status.success() {
                bail!("the WAL of {} from {} to {} does not parse ({status}); what pg_waldump found is in the log above", dir.display(), range.start, range.end);
            }
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Removes `base/.<id>.partial/` directories a killed gateway left behind.
/// Called before the first backup of a run, when none can be in progress.
pub fn remove_partials(wal_dir: &Path) {
    for entry in std::fs::read_dir(archive::base_dir(wal_dir)).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".partial") {
            tracing::info!("removing an unfinished base backup of an earlier run: {}", entry.path().display());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn record_path(wal_dir: &Path, id: &str) -> PathBuf {
    archive::base_dir(wal_dir).join(format!("{id}.json"))
}

fn write_record(wal_dir: &Path, backup: &BaseBackup) -> Result<()> {
    let path = record_path(wal_dir, &backup.id);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(backup)?).with_context(|| format!("could not write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("could not write {}", path.display()))
}

/// Verified base backups, oldest first.
pub fn list(wal_dir: &Path) -> Vec<BaseBackup> {
    let mut backups: Vec<BaseBackup> = std::fs::read_dir(archive::base_dir(wal_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| serde_json::from_slice::<BaseBackup>(&std::fs::read(e.path()).ok()?).ok())
        .filter(|b| b.dir(wal_dir).is_dir())
        .map(|mut b| {
            // A record from before the timeline fields: its manifest has them.
            if b.end_lsn.is_none() && tarball::is_tar(&b.dir(wal_dir)) {
                let (timeline, start, end) = wal_range(&b.dir(wal_dir));
                (b.timeline, b.start_lsn, b.end_lsn) = (b.timeline.or(timeline), b.start_lsn.or(start), end);
            }
            b
        })
        .collect();
    backups.sort_by_key(|b| b.finished_at);
    backups
}

/// The timeline and WAL range of a tar backup, from its manifest.
fn wal_range(dir: &Path) -> (Option<u32>, Option<String>, Option<String>) {
    let Ok(manifest) = tarball::read_manifest(dir) else { return (None, None, None) };
    let (first, last) = (manifest.wal_ranges.first(), manifest.wal_ranges.last());
    (first.map(|r| r.timeline), first.map(|r| r.start.clone()), last.map(|r| r.end.clone()))
}

/// The running cluster's system identifier, or `None` if it cannot be asked.
async fn system_identifier(server: &Server) -> Option<String> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(server.port).user(crate::pg::cluster::SUPERUSER).password(&server.password).dbname("postgres").connect_timeout(std::time::Duration::from_secs(5));
    let client = crate::pg::connect(&config).await.ok()?;
    client.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.ok().map(|r| r.get(0))
}

/// The WAL file the backup starts in: from the manifest's first WAL range
/// (a tar backup), or on `backup_label`'s `START WAL LOCATION` line.
fn start_segment(dir: &Path) -> Result<String> {
    if tarball::is_tar(dir) {
        let manifest = tarball::read_manifest(dir)?;
        let first = manifest.wal_ranges.first().with_context(|| format!("{}/backup_manifest names no WAL", dir.display()))?;
        return tarball::segment_name(first.timeline, &first.start).with_context(|| format!("{}/backup_manifest: no WAL position in {}", dir.display(), first.start));
    }
    let label = std::fs::read_to_string(dir.join("backup_label")).with_context(|| format!("reading {}/backup_label", dir.display()))?;
    label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION:"))
        .and_then(|l| l.split("(file ").nth(1))
        .map(|f| f.trim_end_matches(')').trim().to_string())
        .with_context(|| format!("{}/backup_label names no start WAL file", dir.display()))
}

fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for entry in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Which backups retention keeps: every one that ended within `window` of
/// `now`; for each timeline in `alive` (those that still served after the
/// window's start), the newest one that ended before the window and restores
/// onto that timeline (the window's start replays from there); and in any
/// case the newest.
pub fn keep<'a>(backups: &'a [BaseBackup], alive: &[archive::Lineage], now: DateTime<Utc>, window: std::time::Duration) -> Vec<&'a BaseBackup> {
    let cutoff = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let before: Vec<&BaseBackup> = alive.iter().filter_map(|l| backups.iter().rev().find(|b| b.finished_at < cutoff && b.serves(l))).collect();
    let newest = backups.last();
    backups
        .iter()
        .filter(|b| b.finished_at >= cutoff || before.contains(b) || Some(*b) == newest)
        .collect()
}

/// Whether retention keeps a segment: some kept base backup restores onto a
/// timeline whose history holds the segment at or after the backup's
/// start. WAL of an abandoned timeline that no kept backup leads into goes.
pub fn segment_needed(seg: &archive::Segment, kept: &[&BaseBackup], lineages: &[archive::Lineage]) -> bool {
    let Some(start) = archive::segment_lsn(&seg.name) else { return true };
    lineages.iter().filter(|l| l.needs_segment(seg)).any(|l| kept.iter().any(|b| b.serves(l) && start + archive::SEGMENT_BYTES > b.start()))
}

/// Deletes base backups and WAL segments the window no longer needs,
/// timeline by timeline (the `.history` files say which WAL each
/// timeline replays).
pub fn apply_retention(wal: &WalConfig) -> Result<()> {
    let backups = list(&wal.dir);
    let timelines = archive::timelines(&wal.dir);
    let lineages: Vec<archive::Lineage> = timelines.iter().map(|t| archive::lineage(&wal.dir, *t)).collect();
    let cutoff = Utc::now() - chrono::Duration::from_std(wal.window).unwrap_or(chrono::Duration::MAX);
    // A timeline serves until the next one begins (the next restore).
    let alive: Vec<archive::Lineage> = lineages
        .iter()
        .filter(|l| timelines.iter().find(|t| **t > l.timeline).and_then(|next| archive::began_at(&wal.dir, *next)).is_none_or(|end| end >= cutoff))
        .cloned()
        .collect();
    let kept = keep(&backups, &alive, Utc::now(), wal.window);
    if kept.is_empty() {
        return Ok(());
    }
    let mut waiting = 0;
    for b in backups.iter().filter(|b| !kept.contains(b)) {
        if !archive::may_delete(&b.dir(&wal.dir)) {
            waiting += 1;
            continue;
        }
        tracing::info!("retention: deleting base backup {} (ended {}, before OMNI_PITR_WINDOW needs it)", b.id, b.finished_at.to_rfc3339_opts(SecondsFormat::Secs, true));
        std::fs::remove_dir_all(b.dir(&wal.dir)).with_context(|| format!("deleting {}", b.dir(&wal.dir).display()))?;
        std::fs::remove_file(record_path(&wal.dir, &b.id))?;
    }
    // The newest timeline's own WAL stays while no kept backup leads into it yet.
    let newest = lineages.last().expect("timeline 1 at least");
    let newest_served = kept.iter().any(|b| b.serves(newest));
    let mut removed = 0;
    for dir in archive::stream_dirs(&wal.dir) {
        for seg in archive::segments(&dir) {
            let own_newest = archive::name_timeline(&seg.name) == Some(newest.timeline);
            if segment_needed(&seg, &kept, &lineages) || (own_newest && !newest_served) {
                continue;
            }
            if !archive::may_delete(&seg.path) {
                waiting += 1;
                continue;
            }
            std::fs::remove_file(&seg.path).with_context(|| format!("deleting {}", seg.path.display()))?;
            removed += 1;
        }
    }
    if waiting > 0 {
        tracing::info!("retention: kept {waiting} base backups or WAL segments the window no longer needs until their upload to OMNI_REPOSITORY_URL is confirmed");
    }
    if removed > 0 {
        tracing::info!("retention: deleted {removed} WAL segments no kept base backup needs (older than its start, or of a timeline none of them leads into)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(day: u32) -> BaseBackup {
        let at: DateTime<Utc> = format!("2026-11-{day:02}T00:00:00Z").parse().unwrap();
        BaseBackup {
            id: format!("{day}"),
            started_at: at,
            finished_at: at,
            bytes: 0,
            start_segment: format!("00000001{:016X}", day),
            timeline: None,
            start_lsn: None,
            end_lsn: None,
            system_identifier: None,
        }
    }

    #[test]
    fn retention_keeps_what_the_window_start_replays_from() {
        let backups: Vec<_> = (1..=10).map(backup).collect();
        let now: DateTime<Utc> = "2026-11-10T12:00:00Z".parse().unwrap();
        let ids: Vec<_> = keep(&backups, &[archive::lineage(Path::new("/nonexistent"), 1)], now, std::time::Duration::from_secs(3 * 86_400)).iter().map(|b| b.id.clone()).collect();
        // The window starts on the 7th at noon: the backup of the 7th (midnight) covers it.
        assert_eq!(ids, ["7", "8", "9", "10"]);
    }

    /// A backup on `timeline` whose WAL is segment `seg`.
    fn on(id: &str, timeline: u32, seg: u64, hours_ago: i64) -> BaseBackup {
        let at = Utc::now() - chrono::Duration::hours(hours_ago);
        let lsn = format!("0/{:X}", seg * archive::SEGMENT_BYTES + 0x28);
        BaseBackup {
            id: id.into(),
            started_at: at,
            finished_at: at,
            bytes: 0,
            start_segment: format!("{timeline:08X}{:016X}", seg),
            timeline: Some(timeline),
            start_lsn: Some(lsn.clone()),
            end_lsn: Some(lsn),
            system_identifier: None,
        }
    }

    #[test]
    fn retention_after_a_fork_keeps_a_backup_for_each_timeline_and_the_wal_each_needs() {
        // Timeline 2 branched off 1 inside segment 4; timeline 1 went on to segment 9.
        let (tl1, tl2) = (archive::Lineage::parse(1, ""), archive::Lineage::parse(2, "1\t0/4000100\tbefore"));
        let backups = vec![on("b1", 1, 2, 5), on("b2", 1, 8, 4), on("b3", 2, 5, 0)];
        let kept = keep(&backups, &[tl1.clone(), tl2.clone()], Utc::now(), std::time::Duration::from_secs(3600));
        let ids: Vec<&str> = kept.iter().map(|b| b.id.as_str()).collect();
        // b2 for the end of timeline 1, b1 for timeline 2 before its own backup b3.
        assert_eq!(ids, ["b1", "b2", "b3"]);
        let lineages = [tl1, tl2];
        let seg = |name: &str| archive::Segment::parse(Path::new(name)).unwrap();
        for needed in ["000000010000000000000002", "000000010000000000000004", "000000010000000000000009", "000000020000000000000004", "000000020000000000000006"] {
            assert!(segment_needed(&seg(needed), &kept, &lineages), "{needed}");
        }
        assert!(!segment_needed(&seg("000000010000000000000001"), &kept, &lineages), "before every kept backup");
        // Once timeline 1's backups are gone, its abandoned end goes too.
        let only = [&backups[2]];
        assert!(!segment_needed(&seg("000000010000000000000009"), &only, &lineages), "abandoned, no kept backup leads into it");
        assert!(!segment_needed(&seg("000000010000000000000004"), &only, &lineages), "before b3's start");
        assert!(segment_needed(&seg("000000020000000000000005"), &only, &lineages));
    }

    #[test]
    fn retention_never_deletes_the_newest_backup() {
        let backups: Vec<_> = (1..=2).map(backup).collect();
        let now: DateTime<Utc> = "2026-12-30T00:00:00Z".parse().unwrap();
        let ids: Vec<_> = keep(&backups, &[archive::lineage(Path::new("/nonexistent"), 1)], now, std::time::Duration::from_secs(86_400)).iter().map(|b| b.id.clone()).collect();
        assert_eq!(ids, ["2"]);
    }
}
