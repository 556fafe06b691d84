//! Drills of the off-site copy: after each scheduled restore drill of the
//! local archive (`pitr::spawn_drills`, `OMNI_BACKUP_DRILL_INTERVAL`), the
//! repository's newest base backup and the WAL after it are downloaded into
//! scratch space beside the data directory
//! (`<data_dir>.drill-offsite-<pid>-<random>`: the data root's disk, never
//! `/tmp`; removed after, also when a stop abandons the drill), every
//! object checked against its manifest's SHA-256 on the way
//! ([`fetch::download`], the download a real restore does), decrypted with
//! `OMNI_DECRYPT_IDENTITY_FILE`, then restored into a scratch cluster and
//! checked as the local drill checks its own archive
//! ([`restore::drill_archive`]). A backup that only the local disk holds
//! intact is found here, before the day the local disk is lost.
//!
//! An encrypted repository without `OMNI_DECRYPT_IDENTITY_FILE` (the usual
//! server: it holds the public keys only) is checked as far as that allows:
//! every stored object of the base backup against its manifest (read from
//! the plain copy kept beside `repository.json`), and the result says
//! `manifest_only` and why — nothing was decrypted or restored.
//!
//! The result goes to `OMNI_WAL_DIR/drill-offsite.json`, `last_verified`
//! in `/gateway/status` (a failure degrades `/health`, never fails it),
//! `omni_repository_drill_*` in `/metrics`, the log (an error naming the
//! damaged object) and the Backups page.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use chrono::Utc;

use super::config::RepositoryConfig;
use super::crypt::{CryptError, Keys};
use super::store::{Crypt, Location, Repository, RepositoryError};
use super::{fetch, layout, ship};
use crate::config::{Config, WalConfig};
use crate::pg::binaries::Binaries;
use crate::pg::cluster::Cluster;
use crate::pitr::restore::{self, Scratch, Target};
use crate::pitr::{archive, base, AfterDrill};
use crate::process::privilege::{self, Account};
use crate::status::repository::{set_last_verified, Verified};

/// The record of the last off-site drill, in `OMNI_WAL_DIR`.
pub const RECORD: &str = "drill-offsite.json";

/// The variable whose key decrypts what the drill downloads.
const IDENTITY_VAR: &str = "OMNI_DECRYPT_IDENTITY_FILE";

/// The last off-site drill's record, if any.
pub fn last(wal_dir: &Path) -> Option<Verified> {
    serde_json::from_slice(&std::fs::read(wal_dir.join(RECORD)).ok()?).ok()
}

/// The off-site drill to run after each local one, when a repository is
/// configured (`None` otherwise). The last recorded result is shown at
/// once, so a restart does not hide a failed drill until the next one.
pub fn after_local_drills(config: &Config, cluster: &Cluster) -> Option<AfterDrill> {
    // Checked before the start (a bad value stops it): nothing to say here.
    let settings = RepositoryConfig::parse(config).ok()?;
    let location = settings.location.clone()?;
    if let Some(verified) = last(&config.wal.dir) {
        set_last_verified(verified);
    }
    let drill = Arc::new(OffsiteDrill {
        location,
        settings,
        wal: config.wal.clone(),
        binaries: cluster.binaries.clone(),
        account: cluster.account.clone(),
        data_dir: cluster.data_dir.clone(),
    });
    Some(Box::new(move || {
        let drill = drill.clone();
        Box::pin(async move {
            drill.run().await;
        })
    }))
}

/// What a drill of the repository needs.
struct OffsiteDrill {
    location: Location,
    /// The encryption and `OMNI_DECRYPT_IDENTITY_FILE`.
    settings: RepositoryConfig,
    /// The local archive: where the record goes and the plain copies of
    /// encrypted manifests are.
    wal: WalConfig,
    binaries: Binaries,
    account: Account,
    /// Scratch space goes beside it.
    data_dir: PathBuf,
}

/// What a drill got to, failed or not.
#[derive(Default)]
struct Progress {
    generation: String,
    base_backup: Option<String>,
    manifest_only: bool,
    objects: u64,
    bytes: u64,
    app_tables: Option<i64>,
    summary: String,
}

impl OffsiteDrill {
    /// One drill, recorded (file, status, log) whatever its result.
    async fn run(&self) -> Verified {
        let started = Instant::now();
        let repo_name = self.location.display();
        tracing::info!("off-site drill: reading {repo_name}");
        // Removed when the drill ends, and when a stop abandons it.
        let scratch = Scratch::new(&self.data_dir, "drill-offsite");
        let mut progress = Progress::default();
        let outcome = self.check(scratch.path(), &mut progress).await;
        drop(scratch);
        let at = Utc::now();
        let earlier = last(&self.wal.dir).and_then(|v| v.last_success);
        let verified = Verified {
            at,
            ok: outcome.is_ok(),
            base_backup: progress.base_backup,
            manifest_only: progress.manifest_only,
            damaged_object: outcome.as_ref().err().and_then(|e| damaged_object(e, &progress.generation)),
            error: outcome.as_ref().err().map(|e| format!("{e:#}")),
            summary: progress.summary,
            app_tables: progress.app_tables,
            objects: progress.objects,
            bytes: progress.bytes,
            took_ms: started.elapsed().as_millis() as u64,
            last_success: if outcome.is_ok() { Some(at) } else { earlier },
        };
        match (&verified.error, &verified.damaged_object) {
            (None, _) => tracing::info!("off-site drill passed in {} ms: {}", verified.took_ms, verified.summary),
            (Some(why), Some(object)) => tracing::error!(
                "OFF-SITE DRILL FAILED: the object {object} in {repo_name} is damaged ({why}). A restore from the repository would fail: \
                 take a new base backup (POST /api/v1/backup/base) so that a sound one reaches it, and look at the store"
            ),
            (Some(why), None) => tracing::error!("OFF-SITE DRILL FAILED: {why}. A restore from {repo_name} may fail; the error says what to look at"),
        }
        let path = self.wal.dir.join(RECORD);
        if let Err(e) = serde_json::to_vec_pretty(&verified).map_err(std::io::Error::other).and_then(|j| super::store::write_atomically(&path, &j)) {
            tracing::warn!("could not record the off-site drill in {}: {e}", path.display());
        }
        set_last_verified(verified.clone());
        verified
    }

    /// The checks, in `scratch` (absent yet): plan `latest`, then the full
    /// drill or, without the key for an encrypted repository, the manifest's.
    async fn check(&self, scratch: &Path, progress: &mut Progress) -> Result<()> {
        let keys = match &self.settings.identity_file {
            Some(path) => Some(Keys::load(path, IDENTITY_VAR)?),
            None => None,
        };
        let has_keys = keys.is_some();
        let crypt = Crypt { encryption: self.settings.encryption.clone(), keys, plain_copies: Some(self.wal.dir.join(ship::PLAIN_COPIES)), scratch: None };
        let repo = Repository::open_location(self.location.clone())?.with_crypt(crypt);
        let say = |line: String| tracing::debug!("off-site drill: {line}");
        let plan = fetch::plan(&repo, Target::Latest, self.binaries.major, &say).await?;
        progress.generation = plan.generation.clone();
        progress.base_backup = Some(plan.base_backup().to_owned());
        restore::make_scratch(scratch, &self.account)?;
        if !has_keys && !plan.manifest.recipients.is_empty() {
            progress.manifest_only = true;
            return manifest_only(&repo, &plan, scratch, progress).await;
        }

        let wal_dir = scratch.join("wal");
        archive::prepare(&wal_dir, &self.account)?;
        // The cluster is restored into `<scratch>/data`: the download's test
        // hook (`downloading-base`, `downloading-wal`) holds there.
        let fetched = fetch::download(&repo, &plan, &wal_dir, Some(&scratch.join("data")), &say).await?;
        privilege::chown_tree(&wal_dir, &self.account)?;
        (progress.objects, progress.bytes) = (fetched.objects as u64, fetched.bytes);
        let backup = base::list(&wal_dir).pop().with_context(|| format!("the download of base backup {} from {} left no base backup in {}", fetched.base_backup, repo.display(), wal_dir.display()))?;
        let wal = WalConfig { dir: wal_dir, ..self.wal.clone() };
        let tables = restore::drill_archive(&wal, &self.binaries, &self.account, scratch, &backup).await.with_context(|| {
            format!("base backup {} downloaded from {} matches its manifest but does not restore", backup.id, repo.display())
        })?;
        progress.app_tables = Some(tables);
        progress.summary = format!(
            "base backup {} of {} and {} WAL segments downloaded ({} objects, {} bytes), each as its manifest says{}, restored into a scratch cluster: {tables} app tables",
            backup.id,
            repo.display(),
            fetched.segments,
            fetched.objects,
            fetched.bytes,
            if has_keys { ", decrypted" } else { "" }
        );
        Ok(())
    }
}

/// The check without the key: each stored object of the base backup
/// against the SHA-256 its manifest gives (of the stored, encrypted bytes).
async fn manifest_only(repo: &Repository, plan: &fetch::Plan, scratch: &Path, progress: &mut Progress) -> Result<()> {
    let (gen, manifest) = (&plan.generation, &plan.manifest);
    let id = &manifest.backup.id;
    let local = scratch.join("object");
    for file in &manifest.files {
        let object = layout::base_file(gen, id, &file.name);
        // The download checks the stored bytes against the manifest first,
        // and only then wants a key to decrypt them: "no key" means the
        // object is whole as stored. The file is removed either way.
        match repo.get_to_file_verified(&object, &local, &file.sha256).await {
            Ok(_) | Err(RepositoryError::Crypt(CryptError::NoKey { .. })) => {}
            Err(e) => return Err(e).with_context(|| format!("base backup {id}: the object {object} does not match the SHA-256 in its manifest or could not be read")),
        }
        let _ = std::fs::remove_file(&local);
        progress.objects += 1;
        progress.bytes += file.size;
    }
    progress.summary = format!(
        "manifest only: the {} objects of base backup {id} in {} are as its manifest says; nothing was decrypted or restored, because {IDENTITY_VAR} is not set \
         (the server holds the public keys only). The WAL is not checked: without the key it carries no checksum to compare. \
         For a full drill, set {IDENTITY_VAR} where the private key may be kept",
        progress.objects,
        repo.display()
    );
    Ok(())
}

/// The object (path in the repository) a failure is about: one whose
/// bytes are not those of its manifest, that is missing, or that does not
/// decrypt or decompress.
fn damaged_object(e: &anyhow::Error, gen: &str) -> Option<String> {
    for cause in e.chain() {
        match cause.downcast_ref::<RepositoryError>() {
            Some(RepositoryError::Checksum { path, .. } | RepositoryError::NotFound { path, .. }) => return Some(path.clone()),
            Some(RepositoryError::Crypt(CryptError::Damaged { what, .. })) => return Some(what.clone()),
            _ => {}
        }
        if let Some(CryptError::Damaged { what, .. }) = cause.downcast_ref::<CryptError>() {
            return Some(what.clone());
        }
    }
    // A WAL segment whose lz4 frame does not check: `fetch` names the segment.
    let text = format!("{e:#}");
    let segment = text.split("the WAL segment ").nth(1)?.split(' ').next()?;
    (!gen.is_empty() && text.contains(&format!("{segment} is damaged"))).then(|| layout::wal_segment(gen, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_damaged_object_is_named_from_the_error() {
        let checksum = RepositoryError::Checksum { location: "file:///r".into(), path: "g/base/B/base.tar.lz4".into(), expected: "aa".into(), actual: "bb".into() };
        let e = anyhow::Error::new(checksum).context("base backup B: the object g/base/B/base.tar.lz4 does not match");
        assert_eq!(damaged_object(&e, "g").as_deref(), Some("g/base/B/base.tar.lz4"));
        let lz4 = anyhow::anyhow!("frame checksum mismatch").context("file:///r: the WAL segment 000000010000000000000003 is damaged (its lz4 frame does not check)");
        assert_eq!(damaged_object(&lz4, "g"), Some(layout::wal_segment("g", "000000010000000000000003")));
        assert_eq!(damaged_object(&anyhow::anyhow!("could not list file:///r"), "g"), None);
    }
}
