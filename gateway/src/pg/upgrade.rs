//! Major upgrades in place: a cluster of an older PostgreSQL major than the
//! binaries is upgraded with `pg_upgrade` at start (`PGSERVE_AUTO_UPGRADE`)
//! or by `omni-gateway upgrade`, and any failure puts the old cluster back.
//!
//! The procedure, with `<data>` the data directory (SPEC §9, issue 13):
//! 1. checks that change nothing: the older major's binaries, `pg_upgrade`
//!    among the new ones, no `<data>.pg<old>` in the way, enough free disk
//!    (a full copy, unless the filesystem can clone);
//! 2. the state file `<data>.upgrade.json` is written (step `preparing`);
//! 3. the old cluster's encoding, locale, locale provider and data-checksum
//!    setting are read (`postgres --single`, which also finishes a crash
//!    recovery, so `pg_upgrade` finds it shut down cleanly);
//! 4. the new cluster is initialised beside it, in `<data>.upgrade-pg<new>`,
//!    with those settings, the same superuser and the same password;
//! 5. (step `upgrading`) `pg_upgrade --clone` or `--copy`, never `--link`:
//!    the old cluster is only read, so it stays startable whatever happens.
//!    `pg_upgrade` runs all of its `--check` consistency checks first and
//!    stops before copying anything when one fails, so a separate
//!    `--check` run (a second start of both servers, about 1 s) is left to
//!    `omni-gateway upgrade --check`;
//! 6. (step `swapping`) `<data>` becomes `<data>.pg<old>` and the new cluster
//!    takes `<data>`; (step `done`) the state file stays as the record shown
//!    by `/gateway/status`, until `omni-gateway upgrade --cleanup`.
//!
//! A failure before `done`, or a crash found at the next start before
//! `swapping`, is rolled back: servers `pg_upgrade` left running are stopped,
//! the new cluster (and only it) is deleted, the old one is where it was. A
//! crash during `swapping` is finished instead (`pg_upgrade` had succeeded),
//! since each rename is idempotent. Nothing here ever deletes the user's data:
//! the only directory removed is the one this module created and initialised.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::Level;

use super::binaries::{self, Binaries};
use super::cluster::{self, sibling, sync_dir, SUPERUSER};
use super::pidfile;
use crate::process::child::{self, ChildSpec, Output};
use crate::config::EmbeddedConfig;
use crate::process::privilege::{self, Account};
use crate::supervise::sd_notify::Notifier;
use crate::supervise::shutdown;
use tokio_util::sync::CancellationToken;

/// Free space kept on top of what the copy needs: the new cluster's WAL,
/// `pg_upgrade`'s schema dump and logs.
const SPARE_BYTES: u64 = 128 << 20;
/// How much longer systemd is asked to wait, sent again at half of it.
const EXTEND_BY: Duration = Duration::from_secs(90);

/// Where an upgrade stands; written to the state file before each step begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Reading the old cluster's settings, initialising the new one (and, for `upgrade --check`, `pg_upgrade --check`).
    Preparing,
    /// `pg_upgrade` is copying (or cloning) the data.
    Upgrading,
    /// `pg_upgrade` succeeded; the directories are being renamed.
    Swapping,
    /// Finished: the record of what happened.
    Done,
}

/// How `pg_upgrade` transfers the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Copy-on-write file clones (btrfs, XFS): fast, little extra space.
    Clone,
    /// A full copy of every file.
    Copy,
}

impl Method {
    fn flag(self) -> &'static str {
        match self {
            Method::Clone => "--clone",
            Method::Copy => "--copy",
        }
    }
}

/// The state file `<data>.upgrade.json`: what an interrupted upgrade needs to
/// be finished or undone, and afterwards what `/gateway/status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub from: u32,
    pub to: u32,
    pub step: Step,
    pub method: Method,
    pub data_dir: PathBuf,
    /// The new cluster while it is built.
    pub staging: PathBuf,
    /// Where the old cluster is kept afterwards.
    pub old_copy: PathBuf,
    pub old_bin_dir: PathBuf,
    pub new_bin_dir: PathBuf,
    /// Ports `pg_upgrade` runs the two servers on: a server found on one of
    /// them after a crash is one `pg_upgrade` started, and is stopped.
    pub old_port: u16,
    pub new_port: u16,
    /// Unix seconds.
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Whether `vacuumdb --analyze-in-stages` has rebuilt the statistics.
    #[serde(default)]
    pub analyzed: bool,
    /// Whether `upgrade --cleanup` deleted the old copy.
    #[serde(default)]
    pub old_copy_removed: bool,
    /// The old cluster's own settings carried into the new one (`upgrade_settings.rs`).
    #[serde(default)]
    pub settings_carried: Vec<String>,
    /// Its settings left out, each with why.
    #[serde(default)]
    pub settings_skipped: Vec<String>,
}

impl Record {
    /// One line for people: "upgraded from 15 to 17 on …, old copy kept at …".
    pub fn summary(&self) -> String {
        match self.step {
            Step::Done => {
                let when = self.finished_at.map(format_utc).unwrap_or_else(|| "?".into());
                let copy = if self.old_copy_removed { "old copy deleted".to_string() } else { format!("old copy kept at {}", self.old_copy.display()) };
                format!("upgraded from PostgreSQL {} to {} on {when}, {copy}", self.from, self.to)
            }
            step => format!("upgrade from PostgreSQL {} to {} interrupted at step {step:?}; it is finished or undone at the next start", self.from, self.to),
        }
    }
}

impl Record {
    /// The `upgrade` entry of `/gateway/status`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "from": self.from,
            "to": self.to,
            "step": self.step,
            "method": self.method,
            "finished_at": self.finished_at.map(format_utc),
            "old_copy": if self.old_copy_removed { None } else { Some(&self.old_copy) },
            "settings_carried": self.settings_carried,
            "settings_skipped": self.settings_skipped,
            "summary": self.summary(),
        })
    }
}

/// `<data>.upgrade.json`.
pub fn state_file(data_dir: &Path) -> PathBuf {
    sibling(data_dir, ".upgrade.json")
}

/// The record of the last upgrade of `data_dir`, if there is one. The file
/// must be the gateway's own (`cluster::check_trusted`: no link, no other
/// owner, writable by nobody else), and the directories it names must be
/// the ones an upgrade of `data_dir` uses (`data_dir` itself,
/// `<data_dir>.upgrade-pg<to>`, `<data_dir>.pg<from>`): they are renamed and
/// deleted on its word, so anything else is refused before anything is touched.
pub fn load(data_dir: &Path) -> Result<Option<Record>> {
    cluster::read_state_file(&state_file(data_dir), data_dir, "an upgrade", |record: &Record| {
        vec![
            ("data_dir", record.data_dir.clone(), data_dir.to_path_buf()),
            ("staging", record.staging.clone(), sibling(data_dir, &format!(".upgrade-pg{}", record.to))),
            ("old_copy", record.old_copy.clone(), sibling(data_dir, &format!(".pg{}", record.from))),
        ]
    })
}

/// Written to a new temporary file (`O_EXCL`, `O_NOFOLLOW`), flushed,
/// renamed over the state file (a link there is replaced, never followed)
/// and the directory flushed: after a power loss the file holds this step or
/// the one before, whole.
fn save(record: &Record) -> Result<()> {
    let path = state_file(&record.data_dir);
    let temp = cluster::temp_beside(&path);
    let write = || -> std::io::Result<()> {
        let mut f = cluster::create_private(&temp)?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(record)?)?;
        f.sync_all()?;
        std::fs::rename(&temp, &path)?;
        sync_dir(&path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
    .with_context(|| format!("could not write the upgrade state file {}", path.display()))
}

/// The major version in `<dir>/PG_VERSION`; `None` when there is no cluster.
pub fn cluster_major(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("PG_VERSION")).ok()?.trim().split('.').next()?.parse().ok()
}

/// The start's hook: an upgrade left unfinished by a crash (a state file not
/// at `done`) is finished or rolled back.
pub async fn recover(data_dir: &Path) -> Result<()> {
    let Some(record) = load(data_dir)? else { return Ok(()) };
    match record.step {
        Step::Done => Ok(()),
        Step::Swapping => {
            tracing::warn!("an upgrade from PostgreSQL {} to {} was interrupted after pg_upgrade succeeded; finishing it", record.from, record.to);
            finish(record)?;
            Ok(())
        }
        Step::Preparing | Step::Upgrading => {
            tracing::warn!(
                "an upgrade from PostgreSQL {} to {} was interrupted (step {:?}, started {}); rolling it back",
                record.from,
                record.to,
                record.step,
                format_utc(record.started_at)
            );
            roll_back(&record).await
        }
    }
}

/// The start's hook for an existing cluster: one of an older major is upgraded
/// when `PGSERVE_AUTO_UPGRADE` allows; everything else is left to
/// `cluster::check_version` (same major: fine; newer, or upgrades off: refused).
pub async fn before_start(cfg: &EmbeddedConfig, data_dir: &Path, binaries: &Binaries, account: &Account, stop: &CancellationToken) -> Result<()> {
    let Some(old) = cluster_major(data_dir) else { return Ok(()) };
    if old >= binaries.major || !cfg.auto_upgrade {
        return Ok(());
    }
    let plan = plan(cfg, data_dir, binaries, account)?;
    run(&plan, account, stop).await.map(|_| ())
}

/// What an upgrade will do, found by checks that change nothing.
#[derive(Debug)]
pub struct Plan {
    pub from: u32,
    pub old: Binaries,
    pub new: Binaries,
    pub data_dir: PathBuf,
    pub staging: PathBuf,
    pub old_copy: PathBuf,
    pub method: Method,
    /// Bytes the new cluster needs on the data directory's filesystem.
    pub needed: u64,
    /// Bytes free there.
    pub free: u64,
}

/// The refusal of an older cluster without an upgrade, with how to get one.
fn refusal(data_dir: &Path, new: &Binaries, why: &str) -> anyhow::Error {
    let base = cluster::check_version(data_dir, new).err().map(|e| e.to_string()).unwrap_or_default();
    anyhow::anyhow!("{base}. The automatic upgrade (PGSERVE_AUTO_UPGRADE) cannot run: {why}")
}

/// Every check that can be made without changing anything (but for two
/// scratch files beside the data directory that tell whether it can clone).
pub fn plan(cfg: &EmbeddedConfig, data_dir: &Path, new: &Binaries, account: &Account) -> Result<Plan> {
    plan_with(cfg, data_dir, new, account, true)
}

/// [`plan`] for `doctor`, which writes nothing: the method is taken to be a
/// full copy, the most space the upgrade can need.
pub fn plan_read_only(cfg: &EmbeddedConfig, data_dir: &Path, new: &Binaries, account: &Account) -> Result<Plan> {
    plan_with(cfg, data_dir, new, account, false)
}

fn plan_with(cfg: &EmbeddedConfig, data_dir: &Path, new: &Binaries, account: &Account, probe_clone: bool) -> Result<Plan> {
    let from = cluster_major(data_dir).with_context(|| format!("{} holds no PostgreSQL cluster (no readable PG_VERSION)", data_dir.display()))?;
    if from >= new.major {
        bail!("the cluster at {} is PostgreSQL {from} and the binaries in {} are PostgreSQL {}: there is nothing to upgrade", data_dir.display(), new.dir.display(), new.major);
    }
    // doctor (`probe_clone` false) writes nothing, so it downloads nothing either.
    let old = binaries::find_major(from, cfg.old_bin_dir.as_deref(), probe_clone).map_err(|why| {
        refusal(data_dir, new, &format!("{why}. Install PostgreSQL {from} (for example `apt-get install postgresql-{from}` on Debian/Ubuntu, `dnf install postgresql{from}-server` on Fedora/RHEL) or set PGSERVE_OLD_BIN_DIR to its bin directory"))
    })?;
    for tool in ["postgres", "pg_ctl", "pg_controldata"] {
        if !old.tool(tool).is_file() {
            return Err(refusal(data_dir, new, &format!("{} lacks {tool}; point PGSERVE_OLD_BIN_DIR at a complete PostgreSQL {from} installation", old.dir.display())));
        }
    }
    for tool in ["pg_upgrade", "pg_dump", "pg_dumpall", "pg_restore", "psql", "vacuumdb", "pg_resetwal", "pg_ctl", "pg_controldata"] {
        if !new.tool(tool).is_file() {
            return Err(refusal(
                data_dir,
                new,
                &format!("{} lacks {tool}; install PostgreSQL {}'s complete tool set (on Debian/Ubuntu `apt-get install postgresql-{}`)", new.dir.display(), new.major, new.major),
            ));
        }
    }
    privilege::check_executable(&old.postgres(), account).context("PGSERVE_OLD_BIN_DIR")?;
    privilege::check_executable(&new.tool("pg_upgrade"), account).context("PGSERVE_BIN_DIR")?;
    let staging = sibling(data_dir, &format!(".upgrade-pg{}", new.major));
    let old_copy = sibling(data_dir, &format!(".pg{from}"));
    for (path, what) in [(&staging, "an earlier upgrade's new cluster"), (&old_copy, "the kept copy of an earlier upgrade")] {
        if path.exists() {
            bail!(
                "cannot upgrade {}: {} already exists (it looks like {what}). Nothing was changed. Move it away, or delete it if it is not needed \
                 (`omni-gateway upgrade --cleanup` deletes a kept copy the gateway recorded), then start again",
                data_dir.display(),
                path.display()
            );
        }
    }
    let parent = data_dir.parent().context("the data directory has no parent directory")?;
    let (dir_dev, parent_dev) = (std::fs::metadata(data_dir)?.dev(), std::fs::metadata(parent)?.dev());
    if dir_dev != parent_dev {
        bail!(
            "cannot upgrade {} in place: it is a mount point, and the upgrade builds the new cluster beside it in {} and swaps the two by renaming. \
             Nothing was changed. Mount the directory above it instead (and set PGSERVE_DATA_DIR below it), or set PGSERVE_AUTO_UPGRADE=false and upgrade by hand",
            data_dir.display(),
            parent.display()
        );
    }
    let method = if probe_clone && can_clone(parent) { Method::Clone } else { Method::Copy };
    let size = dir_size(data_dir, true).with_context(|| format!("measuring {}", data_dir.display()))?;
    let needed = SPARE_BYTES + if method == Method::Copy { size } else { 0 };
    let stat = nix::sys::statvfs::statvfs(parent).with_context(|| format!("reading the free space of {}", parent.display()))?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    Ok(Plan { from, old, new: new.clone(), data_dir: data_dir.to_path_buf(), staging, old_copy, method, needed, free })
}

impl Plan {
    /// Fails when the filesystem lacks the room the upgrade needs.
    fn check_space(&self) -> Result<()> {
        if self.free < self.needed {
            bail!(
                "not enough free disk space to upgrade {}: the new cluster needs about {} MB ({}), {} MB are free on that filesystem. \
                 Nothing was changed. Free some space (or move the data directory to a larger disk) and start again",
                self.data_dir.display(),
                self.needed >> 20,
                if self.method == Method::Copy { "a full copy, the filesystem cannot clone files" } else { "files are cloned" },
                self.free >> 20
            );
        }
        Ok(())
    }

    /// What `upgrade --check` prints.
    pub fn describe(&self) -> String {
        format!(
            "cluster:       {} (PostgreSQL {})\n\
             old binaries:  {} ({}, found by {})\n\
             new binaries:  {} ({})\n\
             method:        pg_upgrade {} (never --link: the old cluster stays startable)\n\
             disk:          needs about {} MB, {} MB free\n\
             afterwards:    the old cluster is kept at {}\n",
            self.data_dir.display(),
            self.from,
            self.old.dir.display(),
            self.old.version,
            self.old.found_by,
            self.new.dir.display(),
            self.new.version,
            self.method.flag(),
            self.needed >> 20,
            self.free >> 20,
            self.old_copy.display()
        )
    }
}

/// Runs the upgrade; on any failure the old cluster is put back and the
/// error says what happened.
/// Once `stop` is cancelled it stops at the next safe point: before the
/// next step, or by stopping `initdb`/`pg_upgrade` (the old cluster is only
/// read until the swap, so the rollback puts it back as it was); the swap
/// itself, quick and undone by nothing, is finished.
pub async fn run(plan: &Plan, account: &Account, stop: &CancellationToken) -> Result<Record> {
    upgrade_or_check(plan, account, false, stop).await
}

/// `upgrade --check`: everything up to and including `pg_upgrade --check`,
/// then the new cluster is removed again; the old one is only read.
pub async fn check(plan: &Plan, account: &Account, stop: &CancellationToken) -> Result<()> {
    upgrade_or_check(plan, account, true, stop).await.map(|_| ())
}

async fn upgrade_or_check(plan: &Plan, account: &Account, check_only: bool, stop: &CancellationToken) -> Result<Record> {
    plan.check_space()?;
    pidfile::clear_stale(&plan.data_dir)?;
    // The replication relay's logical slots: PostgreSQL refuses to start on
    // them without wal_level=logical, pg_upgrade does not carry them below
    // 17 and from 17 on demands them caught up (they are behind whenever the
    // target is). So an upgrade drops them first and the relay copies anew
    // afterwards, as it must below 17 anyway. A check changes nothing: it
    // runs the old cluster (and the new one, which pg_upgrade checks from
    // 17 on) with wal_level=logical instead.
    if !check_only {
        super::slots::drop_slots_offline(&plan.data_dir, "upgrading PostgreSQL")?;
    }
    let logical = !super::slots::slots_offline(&plan.data_dir)?.is_empty();
    let started = Instant::now();
    let what = if check_only { "checking whether" } else { "upgrading" };
    tracing::info!(
        "{what} the PostgreSQL {} cluster at {} {} to PostgreSQL {} (old binaries {} found by {}; pg_upgrade {}; {} MB free)",
        plan.from,
        plan.data_dir.display(),
        if check_only { "can be upgraded" } else { "in place" },
        plan.new.major,
        plan.old.dir.display(),
        plan.old.found_by,
        plan.method.flag(),
        plan.free >> 20
    );
    let mut record = Record {
        from: plan.from,
        to: plan.new.major,
        step: Step::Preparing,
        method: plan.method,
        data_dir: plan.data_dir.clone(),
        staging: plan.staging.clone(),
        old_copy: plan.old_copy.clone(),
        old_bin_dir: plan.old.dir.clone(),
        new_bin_dir: plan.new.dir.clone(),
        old_port: free_port()?,
        new_port: free_port()?,
        started_at: unix_now(),
        finished_at: None,
        analyzed: false,
        old_copy_removed: false,
        settings_carried: Vec::new(),
        settings_skipped: Vec::new(),
    };
    save(&record)?;
    let notifier = Notifier::from_env();
    let keep_alive = notifier.enabled().then(|| {
        tokio::spawn(async move {
            loop {
                notifier.extend_timeout(EXTEND_BY);
                tokio::time::sleep(EXTEND_BY / 2).await;
            }
        })
    });
    let work = WorkDir::new(account)?;
    let outcome = steps(plan, account, &mut record, &work, check_only, logical, stop).await;
    if let Some(task) = keep_alive {
        task.abort();
    }
    match outcome {
        Ok(()) if check_only => {
            roll_back(&record).await?;
            tracing::info!("upgrade check passed in {} s; nothing was changed", started.elapsed().as_secs());
            Ok(record)
        }
        Ok(()) => {
            tracing::info!(
                "upgrade done in {} s: {}. Statistics are rebuilt in the background (vacuumdb --analyze-in-stages); delete the old copy with `omni-gateway upgrade --cleanup` once satisfied",
                started.elapsed().as_secs(),
                record.summary()
            );
            Ok(record)
        }
        Err(e) if shutdown::is_stopped(&e) => {
            let step = record.step;
            tracing::warn!("stopping the upgrade as asked (step {step:?}): rolling it back");
            match roll_back(&record).await {
                Ok(()) => Err(e.context(format!(
                    "the {} from PostgreSQL {} to {} was stopped at step {step:?} and rolled back: the PostgreSQL {} cluster at {} is as it was. \
                     The next start with these binaries upgrades it again",
                    if check_only { "upgrade check" } else { "upgrade" },
                    record.from,
                    record.to,
                    record.from,
                    record.data_dir.display(),
                ))),
                Err(undo) => Err(e.context(format!(
                    "the upgrade from PostgreSQL {} to {} was stopped at step {step:?} and could not be rolled back ({undo:#}). Nothing was deleted: \
                     the next start finishes the rollback from the state file {}",
                    record.from,
                    record.to,
                    state_file(&record.data_dir).display()
                ))),
            }
        }
        Err(e) => {
            let step = record.step;
            tracing::error!("the upgrade failed at step {step:?}: {e:#}; rolling back");
            match roll_back(&record).await {
                Ok(()) => Err(e.context(format!(
                    "the {} from PostgreSQL {} to {} failed (step {step:?}) and was rolled back: the PostgreSQL {} cluster at {} is as it was. \
                     Fix the cause and start again, or set PGSERVE_BIN_DIR to PostgreSQL {} binaries to run it as it is",
                    if check_only { "upgrade check" } else { "upgrade" },
                    record.from,
                    record.to,
                    record.from,
                    record.data_dir.display(),
                    record.from
                ))),
                Err(undo) => Err(e.context(format!(
                    "the upgrade from PostgreSQL {} to {} failed (step {step:?}) and could not be rolled back ({undo:#}). Nothing was deleted: \
                     the old cluster is at {} or {}; the state file {} says where the upgrade stopped",
                    record.from,
                    record.to,
                    record.data_dir.display(),
                    record.old_copy.display(),
                    state_file(&record.data_dir).display()
                ))),
            }
        }
    }
}

async fn steps(plan: &Plan, account: &Account, record: &mut Record, work: &WorkDir, check_only: bool, logical: bool, stop: &CancellationToken) -> Result<()> {
    let total = if check_only { 3 } else { 4 };
    tracing::info!("upgrade step 1/{total}: reading the old cluster's encoding, locale and data-checksum setting");
    if account.switch && !privilege::owns_all(&[&plan.data_dir, &plan.data_dir.join("global"), &plan.data_dir.join("base")], account) {
        privilege::chown_tree(&plan.data_dir, account)?;
    }
    let settings = read_settings(&plan.old, &plan.data_dir, account, work, logical, stop).await?;
    shutdown::check(stop, "upgrade step 2 (initdb of the new cluster)")?;
    tracing::info!(
        "upgrade step 2/{total}: initialising the new PostgreSQL {} cluster at {} (encoding {}, locale {}/{}, provider {}, data checksums {})",
        plan.new.major,
        plan.staging.display(),
        settings.encoding,
        settings.collate,
        settings.ctype,
        settings.provider,
        if settings.checksums { "on" } else { "off" }
    );
    let password = cluster::read_password(&plan.data_dir)?
        .with_context(|| format!("the superuser's password file {} is missing", cluster::password_file(&plan.data_dir).display()))?;
    std::fs::DirBuilder::new().mode(0o700).create(&plan.staging).with_context(|| format!("could not create {}", plan.staging.display()))?;
    privilege::chown_tree(&plan.staging, account)?;
    initdb(&plan.new, &plan.staging, &settings, &password, account, work, stop).await?;
    let carried = super::upgrade_settings::carry(&plan.data_dir, &plan.staging, &plan.new, plan.from)?;
    if !carried.settings.is_empty() {
        tracing::info!("carried the old cluster's own settings into the new one: {}", carried.settings.join(", "));
    }
    for skipped in &carried.skipped {
        tracing::warn!("not carried into PostgreSQL {}: {skipped}", plan.new.major);
    }
    record.settings_carried = carried.settings;
    record.settings_skipped = carried.skipped;
    if !check_only {
        save(record)?;
    }
    shutdown::check(stop, "upgrade step 3 (pg_upgrade)")?;
    if check_only {
        tracing::info!("upgrade step 3/{total}: pg_upgrade --check");
        return pg_upgrade(plan, record, &password, account, work, true, logical, stop).await;
    }
    record.step = Step::Upgrading;
    save(record)?;
    tracing::info!("upgrade step 3/{total}: pg_upgrade {} (its consistency checks first, then the copy; its progress follows)", plan.method.flag());
    pg_upgrade(plan, record, &password, account, work, false, logical, stop).await?;
    record.step = Step::Swapping;
    save(record)?;
    tracing::info!("upgrade step 4/{total}: the new cluster takes {}, the old one moves to {}", plan.data_dir.display(), plan.old_copy.display());
    *record = finish(record.clone())?;
    Ok(())
}

/// The swap, safe to repeat after a crash at any point of it: the old
/// cluster moves aside, the new one takes its place, then `done`.
fn finish(mut record: Record) -> Result<Record> {
    let data = &record.data_dir;
    if cluster_major(data) == Some(record.from) {
        std::fs::rename(data, &record.old_copy).with_context(|| format!("could not move {} to {}", data.display(), record.old_copy.display()))?;
    }
    if !data.exists() {
        std::fs::rename(&record.staging, data).with_context(|| format!("could not move {} to {}", record.staging.display(), data.display()))?;
    }
    sync_dir(data).with_context(|| format!("flushing the directory of {}", data.display()))?;
    if cluster_major(data) != Some(record.to) || cluster_major(&record.old_copy) != Some(record.from) {
        bail!("after the swap {} should hold PostgreSQL {} and {} PostgreSQL {}; they do not", data.display(), record.to, record.old_copy.display(), record.from);
    }
    // The old copy keeps its credential beside it, so it can be started as it is.
    if let Ok(Some(password)) = cluster::read_password(data) {
        let _ = cluster::write_secret(&cluster::password_file(&record.old_copy), &password);
    }
    record.step = Step::Done;
    record.finished_at = Some(unix_now());
    save(&record)?;
    Ok(record)
}

/// Puts the old cluster back as it was: stops servers `pg_upgrade` left
/// running, undoes a partial swap, deletes the new cluster (only it), and
/// removes the state file. Refuses, deleting nothing, when the directories
/// are not what the record says.
async fn roll_back(record: &Record) -> Result<()> {
    let data = &record.data_dir;
    stop_orphaned_upgrade_processes(&[data, &record.staging, &record.old_copy]).await?;
    for dir in [data, &record.staging, &record.old_copy] {
        stop_leftover_server(dir, &[record.old_port, record.new_port]).await?;
    }
    if cluster_major(data) == Some(record.to) && !record.staging.exists() {
        std::fs::rename(data, &record.staging).with_context(|| format!("could not move the new cluster {} back to {}", data.display(), record.staging.display()))?;
    }
    if !data.exists() && cluster_major(&record.old_copy) == Some(record.from) {
        std::fs::rename(&record.old_copy, data).with_context(|| format!("could not move the old cluster {} back to {}", record.old_copy.display(), data.display()))?;
    }
    if cluster_major(data) != Some(record.from) {
        bail!("{} does not hold the PostgreSQL {} cluster the upgrade started from; nothing was deleted", data.display(), record.from);
    }
    if record.staging.exists() {
        std::fs::remove_dir_all(&record.staging).with_context(|| format!("could not delete the unfinished new cluster {}", record.staging.display()))?;
    }
    let _ = std::fs::remove_file(cluster::password_file(&record.old_copy));
    // A postmaster.pid left by a server pg_upgrade ran is stale now; the start removes it.
    std::fs::remove_file(state_file(data)).with_context(|| format!("could not remove {}", state_file(data).display()))?;
    sync_dir(data)?;
    tracing::info!("rolled back: the PostgreSQL {} cluster at {} is as it was", record.from, data.display());
    Ok(())
}

/// Stops what an interrupted `pg_upgrade` left working on `dirs`: itself,
/// `pg_ctl`, the shell `pg_ctl` starts a server through (none of them is
/// the gateway's child once it was killed), and servers in binary-upgrade
/// mode (`-b`). Killed in that order of discovery until none is left, since
/// an orphaned `pg_ctl` may still be starting a server after the gateway
/// restarted, one whose `postmaster.pid` does not exist yet. A server not in
/// binary-upgrade mode is never touched here (the pid-file check judges it).
async fn stop_orphaned_upgrade_processes(dirs: &[&Path]) -> Result<()> {
    let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut asked = std::collections::HashMap::<i32, Instant>::new();
    loop {
        let found = upgrade_processes(&names);
        if found.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes of the interrupted upgrade do not stop (pids {found:?}); stop them by hand and start again");
        }
        for (pid, server) in found {
            let target = nix::unistd::Pid::from_raw(pid);
            if !server {
                tracing::warn!("stopping process {pid} of the interrupted upgrade (pg_upgrade, pg_ctl or its shell)");
                let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
            } else {
                let since = *asked.entry(pid).or_insert_with(|| {
                    tracing::warn!("stopping the PostgreSQL (pid {pid}) pg_upgrade left running (binary-upgrade mode)");
                    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGINT);
                    Instant::now()
                });
                if since.elapsed() > Duration::from_secs(30) {
                    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGQUIT);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Live processes whose command line names one of `dirs` and that belong to
/// an upgrade: `(pid, is a binary-upgrade server)`.
fn upgrade_processes(dirs: &[String]) -> Vec<(i32, bool)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && process_alive(*pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if !args.iter().any(|a| dirs.iter().any(|d| a.contains(d.as_str()))) {
                return None;
            }
            let program = Path::new(args.first()?).file_name()?.to_string_lossy().into_owned();
            let text = args.join(" ");
            match program.as_str() {
                "pg_upgrade" | "pg_ctl" => Some((pid, false)),
                "sh" | "bash" | "dash" if text.contains("pg_ctl") || text.contains("postgres") => Some((pid, false)),
                "postgres" | "postmaster" if args.iter().any(|a| a == "-b") || text.contains(" -b ") => Some((pid, true)),
                _ => None,
            }
        })
        .collect()
}

/// Stops a server that `pg_upgrade` started and could not stop (the gateway
/// was killed): only one whose `postmaster.pid` names one of `ports`, the
/// ports recorded for this upgrade. Anything else live there is refused.
async fn stop_leftover_server(dir: &Path, ports: &[u16]) -> Result<()> {
    let Some(inspection) = pidfile::inspect(dir) else { return Ok(()) };
    if !inspection.verdict.treated_as_live() {
        return Ok(());
    }
    let (Some(pid), Some(port)) = (inspection.pid(), inspection.facts.file.port) else {
        bail!("{}: {}. {}", inspection.path.display(), inspection.verdict.reason(), pidfile::advice(&inspection));
    };
    if !ports.contains(&port) {
        bail!("{}: a PostgreSQL (pid {pid}) runs on port {port}, not one the upgrade used. {}", inspection.path.display(), pidfile::advice(&inspection));
    }
    tracing::warn!("stopping the PostgreSQL (pid {pid}) pg_upgrade left running on {} (port {port})", dir.display());
    let pid = nix::unistd::Pid::from_raw(pid);
    for (signal, wait) in [(nix::sys::signal::Signal::SIGINT, 60), (nix::sys::signal::Signal::SIGQUIT, 10), (nix::sys::signal::Signal::SIGKILL, 10)] {
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(wait);
        while Instant::now() < deadline {
            if !process_alive(pid.as_raw()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    bail!("the PostgreSQL (pid {pid}) on {} does not stop; stop it by hand and start again", dir.display())
}

/// True while `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !Path::new("/proc/self").exists(),
    }
}

/// What the new cluster must share with the old one.
#[derive(Debug, PartialEq, Eq)]
struct Settings {
    encoding: String,
    collate: String,
    ctype: String,
    /// `c` (libc) or `i` (ICU), as `pg_database.datlocprovider` says.
    provider: String,
    icu_locale: String,
    checksums: bool,
}

impl Settings {
    /// `UTF8|C|C|c||on` as written by the query in [`read_settings`].
    fn parse(line: &str) -> Option<Settings> {
        let f: Vec<&str> = line.trim_end_matches(['\n', '\r']).split('|').collect();
        let [encoding, collate, ctype, provider, icu_locale, checksums] = f.as_slice() else { return None };
        Some(Settings {
            encoding: encoding.to_string(),
            collate: collate.to_string(),
            ctype: ctype.to_string(),
            provider: provider.to_string(),
            icu_locale: icu_locale.to_string(),
            checksums: *checksums == "on",
        })
    }

    /// `initdb` arguments that reproduce these settings.
    fn initdb_args(&self) -> Vec<String> {
        let mut args = vec![format!("--encoding={}", self.encoding), format!("--lc-collate={}", self.collate), format!("--lc-ctype={}", self.ctype)];
        if self.provider == "i" {
            args.push("--locale-provider=icu".into());
            args.push(format!("--icu-locale={}", self.icu_locale));
        }
        if self.checksums {
            args.push("--data-checksums".into());
        }
        args
    }
}

/// Reads the settings with the old binaries in single-user mode: no port, no
/// connection, and a cluster left by a crash is recovered and shut down
/// cleanly, which `pg_upgrade` requires. The answer comes back through a
/// file `COPY` writes into the private work directory. `logical`: the
/// cluster holds logical slots (an `upgrade --check` leaves the relay's in
/// place), on which PostgreSQL starts only with `wal_level=logical`.
async fn read_settings(old: &Binaries, data_dir: &Path, account: &Account, work: &WorkDir, logical: bool, stop: &CancellationToken) -> Result<Settings> {
    let out = work.path.join("settings.txt");
    let locale = match old.major {
        ..=14 => "'c', ''",
        15 | 16 => "datlocprovider::text, coalesce(daticulocale, '')",
        _ => "datlocprovider::text, coalesce(datlocale, '')",
    };
    let sql = format!(
        "COPY (SELECT concat_ws('|', pg_encoding_to_char(encoding), datcollate, datctype, {locale}, current_setting('data_checksums')) \
         FROM pg_database WHERE datname = 'template0') TO '{}';\n",
        out.display()
    );
    let sql_path = work.path.join("settings.sql");
    std::fs::write(&sql_path, sql)?;
    let mut spec = ChildSpec::new("postgres --single", old.postgres())
        .arg("--single")
        .arg("-D")
        .arg(data_dir)
        .arg("-c")
        .arg("log_line_prefix=[%p] ")
        .arg("-c")
        .arg("log_checkpoints=off");
    if logical {
        spec = spec.arg("-c").arg("wal_level=logical");
    }
    let mut spec = spec.arg("template1");
    spec.output = Output::Postgres { routine: Level::DEBUG };
    spec.run_as = account.run_as();
    spec.cwd = Some(work.path.clone());
    spec.env_remove = vec!["PGDATA".into()];
    spec.stdin = Some(std::fs::File::open(&sql_path)?);
    let status = shutdown::run_unless_stopped(spec, stop).await.context("could not run postgres --single on the old cluster")?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    if !status.success() || text.is_empty() {
        bail!("reading the old cluster's settings with {} --single failed ({status}); its output is in the log above", old.postgres().display());
    }
    Settings::parse(&text).with_context(|| format!("unexpected answer {text:?} when reading the old cluster's settings"))
}

/// `initdb` of the new cluster with the old one's settings, the same
/// superuser and password (`pg_upgrade` requires the same install user).
async fn initdb(new: &Binaries, dir: &Path, settings: &Settings, password: &str, account: &Account, work: &WorkDir, stop: &CancellationToken) -> Result<()> {
    let pw = work.path.join("pw");
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&pw).and_then(|mut f| std::io::Write::write_all(&mut f, password.as_bytes()))?;
    work.give(&pw)?;
    let mut spec = ChildSpec::new("initdb", new.initdb())
        .arg("-D")
        .arg(dir)
        .arg("--username")
        .arg(SUPERUSER)
        .arg("--auth=scram-sha-256")
        .arg(format!("--pwfile={}", pw.display()))
        // pg_upgrade flushes the whole new cluster when it is done.
        .arg("--no-sync");
    spec.args.extend(settings.initdb_args().into_iter().map(Into::into));
    spec.output = Output::Text { routine: Level::DEBUG };
    spec.run_as = account.run_as();
    spec.cwd = Some(work.path.clone());
    spec.env_remove = vec!["PGDATA".into()];
    let status = shutdown::run_unless_stopped(spec, stop).await;
    let _ = std::fs::remove_file(&pw);
    if !status.context("could not run initdb")?.success() {
        bail!("initdb of the new cluster failed; its error is in the log above");
    }
    Ok(())
}

/// `pg_upgrade` (`--check` only, or the real thing), run in the private work
/// directory, which also holds the servers' sockets; its progress lines are
/// logged as they come.
#[allow(clippy::too_many_arguments)]
async fn pg_upgrade(plan: &Plan, record: &Record, password: &str, account: &Account, work: &WorkDir, check: bool, logical: bool, stop: &CancellationToken) -> Result<()> {
    let mut spec = ChildSpec::new("pg_upgrade", plan.new.tool("pg_upgrade"))
        .arg("--old-bindir")
        .arg(&plan.old.dir)
        .arg("--new-bindir")
        .arg(&plan.new.dir)
        .arg("--old-datadir")
        .arg(&plan.data_dir)
        .arg("--new-datadir")
        .arg(&plan.staging)
        .arg("--old-port")
        .arg(record.old_port.to_string())
        .arg("--new-port")
        .arg(record.new_port.to_string())
        .arg("--socketdir")
        .arg(&work.path)
        .arg("--username")
        .arg(SUPERUSER)
        .arg(plan.method.flag())
        // For both servers' scram authentication; libpq reads it, and it is never on a command line.
        .env("PGPASSWORD", password);
    if check {
        spec = spec.arg("--check");
    }
    if logical {
        spec = spec.arg("--old-options=-c wal_level=logical").arg("--new-options=-c wal_level=logical");
    }
    spec.output = Output::Text { routine: Level::INFO };
    spec.run_as = account.run_as();
    spec.cwd = Some(work.path.clone());
    spec.env.extend(account.login_env());
    spec.env_remove = ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"].iter().map(Into::into).collect();
    let status = shutdown::run_unless_stopped(spec, stop).await.context("could not run pg_upgrade")?;
    if !status.success() {
        // Its detailed logs, and the lists of what it refused (such as
        // `tables_using_reg.txt`), live in the new cluster the rollback
        // deletes: they are moved beside the data directory first.
        let logs = plan.staging.join("pg_upgrade_output.d");
        let kept = sibling(&plan.data_dir, ".upgrade-logs");
        let _ = std::fs::remove_dir_all(&kept);
        let where_ = match logs.exists().then(|| std::fs::rename(&logs, &kept)) {
            Some(Ok(())) => format!("; its detailed logs and any list of what it refused are kept in {}", kept.display()),
            _ => String::new(),
        };
        bail!("pg_upgrade{} failed ({status}); its report is in the log above{where_}", if check { " --check" } else { "" });
    }
    Ok(())
}

/// Rebuilds the planner statistics after an upgrade (`pg_upgrade` does not
/// carry them): `vacuumdb --all --analyze-in-stages` against the running
/// cluster, once; the state file remembers that it ran. Stops (and kills
/// vacuumdb) when `stop` is cancelled.
pub async fn analyze_in_background(cluster: std::sync::Arc<cluster::Cluster>, ready: impl std::future::Future<Output = ()>, stop: tokio_util::sync::CancellationToken) {
    let Ok(Some(mut record)) = load(&cluster.data_dir) else { return };
    if record.step != Step::Done || record.analyzed || record.to != cluster.binaries.major {
        return;
    }
    tokio::select! {
        () = ready => {}
        () = stop.cancelled() => return,
    }
    tracing::info!("rebuilding planner statistics after the upgrade (vacuumdb --analyze-in-stages); queries may be slower until it is done");
    let started = Instant::now();
    let mut spec = ChildSpec::new("vacuumdb", cluster.binaries.tool("vacuumdb"))
        .arg("--all")
        .arg("--analyze-in-stages")
        .arg("--host=127.0.0.1")
        .arg(format!("--port={}", cluster.port))
        .arg(format!("--username={SUPERUSER}"))
        .env("PGPASSWORD", &cluster.password);
    spec.output = Output::Text { routine: Level::DEBUG };
    spec.run_as = cluster.account.run_as();
    spec.env.extend(cluster.account.login_env());
    let mut child = match child::spawn(spec).await {
        Ok(c) => c,
        Err(e) => return tracing::warn!("could not run vacuumdb to rebuild statistics after the upgrade: {e}; run `vacuumdb --all --analyze-in-stages` by hand"),
    };
    let pid = child.id();
    let status = tokio::select! {
        s = child.wait() => s,
        () = stop.cancelled() => {
            if let Some(pid) = pid {
                child::signal_group(pid, nix::sys::signal::Signal::SIGTERM);
            }
            let _ = child.wait().await;
            if let Some(pid) = pid { child::forget(pid); }
            return tracing::info!("statistics rebuild interrupted by the stop; it runs again at the next start");
        }
    };
    if let Some(pid) = pid {
        child::forget(pid);
    }
    match status {
        Ok(s) if s.success() => {
            record.analyzed = true;
            if let Err(e) = save(&record) {
                tracing::warn!("{e:#}");
            }
            tracing::info!("planner statistics rebuilt in {} s", started.elapsed().as_secs());
        }
        Ok(s) => tracing::warn!("vacuumdb --analyze-in-stages failed ({s}); it runs again at the next start"),
        Err(e) => tracing::warn!("vacuumdb: {e}"),
    }
}

/// `upgrade --cleanup`: deletes the old copy an upgrade kept, after checking
/// that it is the cluster the record names and that the upgraded cluster is in place.
pub fn cleanup(data_dir: &Path) -> Result<String> {
    let Some(mut record) = load(data_dir)? else {
        bail!("no upgrade is recorded for {} ({} does not exist): there is no old copy to delete", data_dir.display(), state_file(data_dir).display());
    };
    if record.step != Step::Done {
        bail!("the upgrade of {} is unfinished (step {:?}); start the gateway once, which finishes or undoes it, then clean up", data_dir.display(), record.step);
    }
    if record.old_copy_removed || !record.old_copy.exists() {
        return Ok(format!("nothing to delete: the old copy {} is already gone", record.old_copy.display()));
    }
    if cluster_major(data_dir) != Some(record.to) || cluster_major(&record.old_copy) != Some(record.from) {
        bail!(
            "refusing to delete {}: it should hold the PostgreSQL {} cluster and {} the upgraded PostgreSQL {} one, and they do not",
            record.old_copy.display(),
            record.from,
            data_dir.display(),
            record.to
        );
    }
    if let Some(inspection) = pidfile::inspect(&record.old_copy).filter(|i| i.verdict.treated_as_live()) {
        bail!("refusing to delete {}: a PostgreSQL runs on it ({}). Stop it first", record.old_copy.display(), inspection.verdict.reason());
    }
    let size = dir_size(&record.old_copy, false).unwrap_or(0);
    std::fs::remove_dir_all(&record.old_copy).with_context(|| format!("could not delete {}", record.old_copy.display()))?;
    let _ = std::fs::remove_file(cluster::password_file(&record.old_copy));
    record.old_copy_removed = true;
    save(&record)?;
    Ok(format!("deleted the PostgreSQL {} cluster kept at {} ({} MB freed)", record.from, record.old_copy.display(), size >> 20))
}

/// A private directory for one upgrade (sockets, the settings answer, the
/// password for initdb, `pg_upgrade`'s working directory), owned by the
/// PostgreSQL account and removed when dropped.
struct WorkDir {
    path: PathBuf,
    owner: Option<(u32, u32)>,
}

impl WorkDir {
    fn new(account: &Account) -> Result<WorkDir> {
        // Short: the servers' socket paths must fit in ~100 bytes.
        let path = std::env::temp_dir().join(format!("omni-upgrade-{}-{}", std::process::id(), unix_now() % 100_000));
        std::fs::DirBuilder::new().mode(0o700).create(&path).with_context(|| format!("could not create {}", path.display()))?;
        let dir = WorkDir { path, owner: account.run_as() };
        dir.give(&dir.path)?;
        privilege::check_reachable(&dir.path, account)?;
        Ok(dir)
    }

    fn give(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| format!("could not give {} to the PostgreSQL account", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether files can be cloned (copy-on-write) in `dir`: what `pg_upgrade
/// --clone` needs, tried with the same ioctl on two scratch files.
fn can_clone(dir: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // New names, created O_EXCL|O_NOFOLLOW: the directory is shared with
        // the worker's account, and nothing it planted may be followed.
        let a = cluster::temp_beside(&dir.join(".omni-clone-probe-a"));
        let b = cluster::temp_beside(&dir.join(".omni-clone-probe-b"));
        let result = (|| -> std::io::Result<bool> {
            std::io::Write::write_all(&mut cluster::create_private(&a)?, &[0u8; 4096])?;
            let source = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&a)?;
            let target = cluster::create_private(&b)?;
            // SAFETY: FICLONE with two descriptors we own and keep open for the call.
            Ok(unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) } == 0)
        })();
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        result.unwrap_or(false)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        false
    }
}

/// Bytes of the files under `dir` (without `pg_wal`'s, which `pg_upgrade`
/// does not copy, when `skip_wal`).
fn dir_size(dir: &Path, skip_wal: bool) -> std::io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                if !(skip_wal && d == dir && entry.file_name() == "pg_wal") {
                    stack.push(entry.path());
                }
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).context("could not find a free port for pg_upgrade")?.local_addr()?.port())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `2026-11-25 16:10 UTC`.
fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_sit_beside_the_data_directory() {
        assert_eq!(state_file(Path::new("/srv/data/postgres")), PathBuf::from("/srv/data/postgres.upgrade.json"));
        assert_eq!(sibling(Path::new("/srv/data/postgres"), ".pg15"), PathBuf::from("/srv/data/postgres.pg15"));
    }

    #[test]
    fn settings_become_matching_initdb_arguments() {
        let s = Settings::parse("UTF8|C|C|c||on\n").unwrap();
        assert_eq!(s.initdb_args(), ["--encoding=UTF8", "--lc-collate=C", "--lc-ctype=C", "--data-checksums"]);
        let s = Settings::parse("LATIN1|de_DE|de_DE|i|de-DE|off").unwrap();
        assert_eq!(s.initdb_args(), ["--encoding=LATIN1", "--lc-collate=de_DE", "--lc-ctype=de_DE", "--locale-provider=icu", "--icu-locale=de-DE"]);
        assert!(Settings::parse("UTF8|C").is_none());
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(1_795_615_800), "2026-11-25 14:10 UTC");
    }
}
