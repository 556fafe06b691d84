//! Restore from the repository alone: download a base backup and the WAL
//! it needs from the bucket into the local archive layout (`OMNI_WAL_DIR`,
//! see `pitr`), for `pitr::restore` to replay as it replays a local archive.
//!
//! - The base backup: among the generations whose major the binaries
//!   serve, the newest backup with a manifest (one without is not complete
//!   and is never used) that ended before the target (`latest`: the
//!   newest). Every file is checked against the manifest's SHA-256 before
//!   it is kept.
//! - The WAL: every history file, every whole segment from the backup's
//!   first one on (`wal/<segment>.lz4`, checked by its lz4 frame checksum),
//!   then, for the segments after the last whole one, their chunks
//!   concatenated from byte 0 while contiguous, padded with zeros to the
//!   segment size and written as `<segment>.partial`, as the streamer
//!   leaves its newest segment.
//!
//! Files are written under a temporary name and renamed, so a download cut
//! short leaves nothing that looks complete. Progress goes through `say`.
//!
//! An encrypted repository (age, `repository/crypt.rs`) is read with the
//! identity of `--identity FILE` or `OMNI_DECRYPT_IDENTITY_FILE`
//! ([`set_keys`]): each object's stored bytes are checked first, then
//! decrypted. The manifests are read (so decrypted) before anything is
//! written: a missing or wrong identity stops the restore there, naming the
//! public keys the repository's objects are encrypted to.
//!
//! After a key rotation (`backup reencrypt`, see `layout.rs`) an object can
//! have copies sealed to other keys (`<name>.k-<tag>`, a base backup
//! `<id>.k-<tag>`). The restore takes, of each object, a copy the identity
//! opens (the keys of the last one that opened tried first), so old-only,
//! new-only and mixed repositories restore alike. A base backup none of
//! whose copies opens stops the restore naming the keys it needs: a restore
//! never falls back silently to an older backup it can read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use bytes::Bytes;

use super::crypt::CryptError;
use super::layout::{self, BaseManifest, Object};
use super::store::{Repository, RepositoryError};
use crate::config::{Config, Database, EmbeddedConfig};
use crate::pg::cluster::sibling;
use crate::pitr::generation::Identity;
use crate::pitr::restore::{self, Restore, Target};
use crate::process::privilege;

/// The identity restores decrypt with: `identity` (`restore --identity`),
/// else `OMNI_DECRYPT_IDENTITY_FILE`; with neither, an encrypted object is
/// refused naming the keys it needs. A file that cannot be read or holds
/// no valid key stops here, naming where it came from.
pub fn set_keys(config: &Config, identity: Option<&Path>) -> Result<()> {
    let (path, variable) = match identity {
        Some(p) => (Some(p.to_path_buf()), "--identity"),
        None => (super::config::identity_file(config), "OMNI_DECRYPT_IDENTITY_FILE"),
    };
    let keys = match path {
        Some(p) => Some(super::crypt::Keys::load(&p, variable)?),
        None => None,
    };
    super::store::set_crypt(super::store::Crypt { keys, ..Default::default() });
    Ok(())
}

/// A segment's size when no whole segment tells it (PostgreSQL's default).
const DEFAULT_SEGMENT_BYTES: usize = 16 * 1024 * 1024;

/// What [`fetch`] brought down.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub generation: String,
    pub identity: Identity,
    pub base_backup: String,
    pub objects: usize,
    pub bytes: u64,
    pub segments: usize,
    /// The segment assembled from chunks, if any.
    pub partial: Option<String>,
}

/// One generation's content, from a listing.
#[derive(Default, Debug)]
struct Generation {
    manifests: Vec<String>,
    segments: BTreeMap<String, u64>,
    /// segment → (from, to) chunks.
    chunks: BTreeMap<String, Vec<(u64, u64)>>,
    histories: Vec<String>,
    /// Object name (as the shipper writes it) → the names of its copies
    /// there (itself, re-encrypted ones), for WAL and history files.
    copies: BTreeMap<String, Vec<String>>,
}

/// Whether the repository holds at least one complete base backup (any
/// generation): what `OMNI_RESTORE_IF_EMPTY` asks before restoring.
pub async fn holds_backups(repo: &Repository) -> Result<bool> {
    let listed = repo.list("").await?;
    Ok(listed.iter().any(|o| matches!(layout::parse(&o.path), Some(Object::BaseManifest { .. }))))
}

/// What a restore from the repository will take, found by reading the
/// repository alone ([`plan`]): nothing local is written before it is known.
#[derive(Debug)]
pub struct Plan {
    pub(crate) generation: String,
    identity: Identity,
    pub(crate) manifest: BaseManifest,
    content: Generation,
    /// When the newest WAL object of the generation was written (the store's clock).
    pub wal_end: Option<DateTime<Utc>>,
}

impl Plan {
    pub fn base_backup(&self) -> &str {
        &self.manifest.backup.id
    }
}

/// Reads the repository and picks what a restore to `target` downloads,
/// refusing (before anything local is written) a repository without a
/// complete base backup, a target before its oldest base backup or after
/// its newest WAL, and a repository it cannot list (wrong credentials, no
/// bucket: the store's answer, never a secret). `major` is the binaries'
/// major (a generation of another major cannot be restored with them).
pub async fn plan(repo: &Repository, target: Target, major: u32, say: &(dyn Fn(String) + Sync)) -> Result<Plan> {
    say(format!("listing {}", repo.display()));
    let listed = repo.list("").await.with_context(|| {
        format!(
            "could not list {}: check the URL's bucket (container) and the credentials of the environment (AWS_*, GOOGLE_*, AZURE_*); nothing was written",
            repo.display()
        )
    })?;
    let mut generations: BTreeMap<String, Generation> = BTreeMap::new();
    for object in &listed {
        let parsed = layout::parse(&object.path);
        if let Some(Object::Segment { gen, .. } | Object::Chunk { gen, .. } | Object::History { gen, .. }) = &parsed {
            let copies = generations.entry(gen.clone()).or_default().copies.entry(layout::canonical(&object.path).0).or_default();
            let first = copies.is_empty();
            copies.push(object.path.clone());
            if !first {
                continue;
            }
        }
        match parsed {
            Some(Object::BaseManifest { gen, id }) => generations.entry(gen.clone()).or_default().manifests.push(layout::base_manifest(&gen, &id)),
            Some(Object::Segment { gen, segment }) => {
                generations.entry(gen).or_default().segments.insert(segment, object.size);
            }
            Some(Object::Chunk { gen, segment, from, to }) => generations.entry(gen).or_default().chunks.entry(segment).or_default().push((from, to)),
            Some(Object::History { gen, file }) => generations.entry(gen).or_default().histories.push(file),
            _ => {}
        }
    }
    if generations.values().all(|g| g.manifests.is_empty()) {
        bail!(
            "{} holds no complete base backup of any installation ({} objects; a base backup counts once its manifest.json is there): nothing to restore from. \
             Check the URL's prefix: it is the OMNI_REPOSITORY_URL the lost installation shipped to",
            repo.display(),
            listed.len()
        );
    }

    // The newest suitable base backup of a generation the binaries serve.
    let mut best: Option<(String, BaseManifest)> = None;
    let mut oldest: Option<DateTime<Utc>> = None;
    let mut other_majors = Vec::new();
    // Base backups (by the name of the original) one copy of which opened,
    // and the refusals of those that did not open.
    let mut opened = std::collections::BTreeSet::new();
    let mut refused: Vec<(String, CryptError)> = Vec::new();
    for (gen, content) in &generations {
        let Some((_, gen_major)) = layout::parse_generation(gen) else { continue };
        if gen_major != major {
            if !content.manifests.is_empty() {
                other_majors.push(gen_major);
            }
            continue;
        }
        for path in &content.manifests {
            let original = layout::canonical(path).0;
            let bytes = match repo.get_plain(path).await {
                Ok(bytes) => bytes,
                // Another copy of the same backup may open (a rotation): judged below.
                Err(RepositoryError::Crypt(e @ (CryptError::WrongKey { .. } | CryptError::NoKey { .. }))) => {
                    refused.push((original, e));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            opened.insert(original);
            let manifest: BaseManifest = serde_json::from_slice(&bytes).with_context(|| format!("{}: {path} is not a base backup manifest", repo.display()))?;
            let ended = manifest.backup.finished_at;
            oldest = Some(oldest.map_or(ended, |o| o.min(ended)));
            let fits = match target {
                Target::Latest => true,
                Target::Time(t) => manifest.backup.finished_at <= t,
            };
            if fits && best.as_ref().is_none_or(|(_, b)| b.backup.finished_at < manifest.backup.finished_at) {
                best = Some((gen.clone(), manifest));
            }
        }
    }
    if let Some((_, e)) = refused.into_iter().find(|(original, _)| !opened.contains(original)) {
        return Err(RepositoryError::Crypt(e).into());
    }
    let Some((gen, manifest)) = best else {
        if let Some(oldest) = oldest {
            bail!(
                "{}: {} is before its oldest base backup, which ended at {}; a restore starts from a base backup, so pick a time after it, or `latest`",
                repo.display(),
                describe(target),
                oldest.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
        }
        bail!(
            "{} holds base backups of PostgreSQL {:?} only, and these binaries are PostgreSQL {major}: set PGSERVE_BIN_DIR to binaries of that major",
            repo.display(),
            other_majors
        );
    };
    let wal_end = repo.newest_write(&format!("{gen}/wal/")).await.with_context(|| format!("could not list the WAL of {gen} in {}", repo.display()))?;
    if let Target::Time(t) = target {
        // The WAL written up to t is in the repository only if WAL was shipped after t.
        let end = wal_end.unwrap_or(manifest.backup.finished_at);
        // A store that reports whole seconds: the write was up to a second later.
        let end = if end.timestamp_subsec_nanos() == 0 { end + chrono::TimeDelta::seconds(1) } else { end };
        if t > end {
            bail!(
                "{}: {} is after its newest WAL, written at {}: the repository cannot tell what happened between the two. \
                 Pick a time up to {}, or `latest` (everything the repository holds)",
                repo.display(),
                describe(target),
                end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
        }
    }
    let (sysid, gen_major) = layout::parse_generation(&gen).expect("a generation listed above");
    let identity = Identity { system_identifier: sysid, major: gen_major };
    let content = generations.remove(&gen).expect("a generation listed above");
    Ok(Plan { generation: gen, identity, manifest, content, wal_end })
}

/// Downloads into `wal_dir` what a restore to `target` needs ([`plan`], then [`download`]).
pub async fn fetch(repo: &Repository, wal_dir: &Path, target: Target, major: u32, say: &(dyn Fn(String) + Sync)) -> Result<Fetched> {
    let plan = plan(repo, target, major, say).await?;
    download(repo, &plan, wal_dir, None, say).await
}

/// Downloads what `plan` picked into `wal_dir`, the local archive layout.
/// `data_dir`: the data directory restored into, for the test hook
/// [`crate::pitr::restore::TEST_HOLD_VAR`] (`downloading-base`,
/// `downloading-wal`: held after the first file of each step).
pub async fn download(repo: &Repository, plan: &Plan, wal_dir: &Path, data_dir: Option<&Path>, say: &(dyn Fn(String) + Sync)) -> Result<Fetched> {
    let (gen, identity, manifest, content) = (&plan.generation, &plan.identity, &plan.manifest, &plan.content);
    let mut prefer = None;
    refuse_other_archive(wal_dir, identity)?;
    let backup = &manifest.backup;
    let total: u64 = manifest.files.iter().map(|f| f.size).sum();
    say(format!(
        "base backup {} of {gen} (ended {}): {} files, {total} bytes",
        backup.id,
        backup.finished_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        manifest.files.len()
    ));

    // The base backup, into base/.<id>.fetching, renamed once whole.
    let base_root = crate::pitr::archive::base_dir(wal_dir);
    let final_dir = backup.dir(wal_dir);
    let (mut objects, mut bytes) = (0usize, 0u64);
    if final_dir.is_dir() && base_root.join(format!("{}.json", backup.id)).is_file() {
        say(format!("base backup {} is already in {}", backup.id, final_dir.display()));
    } else {
        let partial = base_root.join(format!(".{}.fetching", backup.id));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let downloaded = async {
            for (n, file) in manifest.files.iter().enumerate() {
                if file.name.contains('/') || file.name.starts_with('.') {
                    bail!("{}: the manifest of {} names {:?}, not a file of a base backup", repo.display(), backup.id, file.name);
                }
                let object = layout::base_file(gen, &backup.id, &file.name);
                say(format!("downloading base backup: file {}/{} ({}, {} bytes), {bytes}/{total} bytes so far", n + 1, manifest.files.len(), file.name, file.size));
                // Streamed to disk and checked on the way (never whole in memory).
                let written = repo.get_to_file_verified(&object, &partial.join(&file.name), &file.sha256).await.with_context(|| {
                    format!("base backup {}: the object {object} does not match the SHA-256 in its manifest or could not be read; nothing was restored", backup.id)
                })?;
                objects += 1;
                bytes += written;
                say(format!("base backup: {}/{} files, {bytes}/{total} bytes ({} verified)", n + 1, manifest.files.len(), file.name));
                if n == 0 {
                    test_hold("downloading-base", data_dir).await;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = downloaded {
            // Nothing half-downloaded stays behind.
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&partial, &final_dir).with_context(|| format!("renaming {} to {}", partial.display(), final_dir.display()))?;
        write_atomically(&base_root.join(format!("{}.json", backup.id)), &serde_json::to_vec_pretty(backup)?)?;
    }

    // WAL: history files, whole segments from the backup's first on, then chunks.
    let stream = crate::pitr::archive::stream_dir(wal_dir);
    std::fs::create_dir_all(&stream).with_context(|| format!("creating {}", stream.display()))?;
    for history in &content.histories {
        let data = get_copy(repo, &content.copies, &layout::wal_history(gen, history), &mut prefer).await?;
        write_atomically(&stream.join(history), &data)?;
        objects += 1;
        bytes += data.len() as u64;
    }
    let first = backup.start_segment.clone();
    let wanted: Vec<&String> = content.segments.keys().filter(|s| s[8..] >= first[8..] || s[..8] > first[..8]).collect();
    let wal_total: u64 = wanted.iter().map(|s| content.segments[*s]).sum();
    say(format!("downloading WAL: {} segments, {wal_total} bytes (lz4), then the chunks of the newest", wanted.len()));
    let (mut segments, mut wal_bytes, mut segment_bytes) = (0usize, 0u64, None);
    let mut said = std::time::Instant::now();
    for segment in &wanted {
        let local = stream.join(segment.as_str());
        let stored = get_copy(repo, &content.copies, &layout::wal_segment(gen, segment), &mut prefer).await?;
        let data = layout::decode_segment(&stored).with_context(|| format!("{}: the WAL segment {segment} is damaged (its lz4 frame does not check)", repo.display()))?;
        segment_bytes.get_or_insert(data.len());
        write_atomically(&local, &data)?;
        let _ = std::fs::remove_file(stream.join(format!("{segment}.partial")));
        segments += 1;
        wal_bytes += stored.len() as u64;
        objects += 1;
        if segments == 1 || segments % 16 == 0 || segments == wanted.len() || said.elapsed() >= PROGRESS_EVERY {
            say(format!("WAL: {segments}/{} segments, {wal_bytes}/{wal_total} bytes", wanted.len()));
            said = std::time::Instant::now();
        }
        if segments == 1 {
            test_hold("downloading-wal", data_dir).await;
        }
    }
    bytes += wal_bytes;

    // The segments being written when the last chunks were shipped: newer
    // than the last whole one, on a timeline at least the backup's.
    let last_whole = wanted.last().map(|s| s.to_string()).unwrap_or_default();
    let mut partial = None;
    for (segment, chunks) in &content.chunks {
        if content.segments.contains_key(segment) || segment.as_str() <= last_whole.as_str() || segment[8..] < first[8..] {
            continue;
        }
        let mut chunks = chunks.clone();
        chunks.sort();
        let mut data = Vec::new();
        let mut completed = None;
        for (from, to) in chunks {
            if from != data.len() as u64 {
                // A gap: what follows cannot be replayed.
                break;
            }
            let bytes_of = match get_copy(repo, &content.copies, &layout::wal_chunk(gen, segment, from, to), &mut prefer).await {
                Ok(bytes) => bytes,
                // The repository is still being written: the segment was
                // completed after it was listed, and its chunks were
                // replaced by the whole segment.
                Err(RepositoryError::NotFound { .. }) => match repo.get_plain(&layout::wal_segment(gen, segment)).await {
                    Ok(stored) => {
                        completed = Some(stored);
                        break;
                    }
                    Err(RepositoryError::NotFound { .. }) => bail!("{}: the chunk {from:08X}-{to:08X} of {segment} is gone and the whole segment is not there either; run the restore again", repo.display()),
                    Err(e) => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            };
            if bytes_of.len() as u64 != to - from {
                bail!("{}: the chunk {from:08X}-{to:08X} of {segment} holds {} bytes, not {}", repo.display(), bytes_of.len(), to - from);
            }
            data.extend_from_slice(&bytes_of);
            objects += 1;
        }
        if let Some(stored) = completed {
            let whole = layout::decode_segment(&stored).with_context(|| format!("{}: the WAL segment {segment} is damaged (its lz4 frame does not check)", repo.display()))?;
            write_atomically(&stream.join(segment.as_str()), &whole)?;
            objects += 1;
            bytes += stored.len() as u64;
            say(format!("WAL: {segment} was completed while the restore read the repository: taken whole"));
            continue;
        }
        if data.is_empty() {
            continue;
        }
        let shipped = data.len();
        data.resize(segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES).max(shipped), 0);
        write_atomically(&stream.join(format!("{segment}.partial")), &data)?;
        bytes += shipped as u64;
        say(format!("WAL: {segment} from its chunks, {shipped} bytes, as {segment}.partial"));
        partial = Some(segment.clone());
    }
    crate::pitr::generation::record(wal_dir, identity)?;
    say(format!("downloaded {objects} objects, {bytes} bytes into {}", wal_dir.display()));
    Ok(Fetched { generation: gen.clone(), identity: *identity, base_backup: backup.id.clone(), objects, bytes, segments, partial })
}

/// The content of the object `name` from one of its `copies` (see the
/// module's text) the identity opens, those of the keys tag `prefer` (the
/// last that opened) first. When none opens: a refusal naming the keys
/// needed rather than a copy found gone.
async fn get_copy(repo: &Repository, copies: &BTreeMap<String, Vec<String>>, name: &str, prefer: &mut Option<Option<String>>) -> Result<Bytes, RepositoryError> {
    let mut paths: Vec<&str> = copies.get(name).map(|c| c.iter().map(String::as_str).collect()).unwrap_or_else(|| vec![name]);
    if let Some(tag) = prefer.as_ref() {
        paths.sort_by_key(|p| layout::canonical(p).1 != *tag);
    }
    let mut refusal: Option<RepositoryError> = None;
    for path in paths {
        match repo.get_plain(path).await {
            Ok(bytes) => {
                *prefer = Some(layout::canonical(path).1);
                return Ok(bytes);
            }
            Err(e @ RepositoryError::Crypt(CryptError::WrongKey { .. } | CryptError::NoKey { .. })) => {
                if !matches!(refusal, Some(RepositoryError::Crypt(_))) {
                    refusal = Some(e);
                }
            }
            Err(e @ RepositoryError::NotFound { .. }) => {
                refusal.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(refusal.expect("an object has at least one name"))
}

/// How often a long download says how far it got, at least.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The test hook of `pitr::restore` ([`crate::pitr::restore::TEST_HOLD_VAR`])
/// for the download's steps: writes `<data_dir>.restore.held` and waits
/// forever, so a test can kill the restore exactly there. Unset in any real use.
async fn test_hold(step: &str, data_dir: Option<&Path>) {
    let Some(data_dir) = data_dir else { return };
    if std::env::var(crate::pitr::restore::TEST_HOLD_VAR).ok().as_deref() != Some(step) {
        return;
    }
    tracing::warn!("{}={step}: the restore holds here (a test kills it)", crate::pitr::restore::TEST_HOLD_VAR);
    let _ = std::fs::write(sibling(data_dir, ".restore.held"), step);
    std::future::pending::<()>().await;
}

/// `<data_dir>.restore-from.json`: written (whole, flushed) before a
/// restore from the repository downloads anything, removed once the
/// restored cluster is the data directory (or the restore failed cleanly).
/// Found at a start or by the next `restore --from`, it says a restore was
/// cut off (kill -9, power loss) while the data directory was still empty:
/// the start refuses to create an empty cluster in its place, and says to
/// run the restore again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interrupted {
    pub url: String,
    pub target: String,
    /// What it was doing: `downloading`, `recovering`.
    pub step: String,
    pub started: DateTime<Utc>,
}

/// The file of [`Interrupted`].
pub fn interrupted_file(data_dir: &Path) -> PathBuf {
    sibling(data_dir, ".restore-from.json")
}

impl Interrupted {
    pub fn load(data_dir: &Path) -> Result<Option<Interrupted>> {
        let path = interrupted_file(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| format!("{} is not the record of a restore from a repository; move it away", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, data_dir: &Path) -> Result<()> {
        let path = interrupted_file(data_dir);
        crate::pg::cluster::write_secret(&path, &serde_json::to_string_pretty(self)?).with_context(|| format!("could not write {}", path.display()))
    }

    fn remove(data_dir: &Path) -> Result<()> {
        let path = interrupted_file(data_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("could not remove {}", path.display())),
            _ => crate::pg::cluster::sync_dir(&path).with_context(|| format!("could not flush the directory of {}", path.display())),
        }
    }

    /// How to finish it: the command to run again.
    pub fn advice(&self) -> String {
        format!("run `omni-gateway restore --from {} --to {}` again", self.url, self.target)
    }
}

/// Whether the data directory holds anything (a missing one holds nothing).
fn holds_anything(data_dir: &Path) -> Result<bool> {
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", data_dir.display())),
    }
}

/// Where [`begin`] left a restore from the repository.
pub enum Begun {
    /// An earlier run of the same restore was cut off after its cluster
    /// was recovered, and is now finished: nothing more to do.
    Finished(Interrupted),
    /// The base backup and WAL are in the archive: restore from it, then [`finish`].
    Downloaded(Fetched),
}

/// The first half of a restore from the repository into `data_dir`, with
/// the cluster's lock held: an interrupted restore is finished or undone
/// (its journal), then every refusal comes before anything is written (the
/// data directory must hold nothing; [`plan`]), then the [`Interrupted`]
/// record, then the download into `config.wal.dir`. On an error after the
/// record, it is removed again (nothing half-done stays).
pub async fn begin(config: &Config, embedded: &EmbeddedConfig, repo: &Repository, target: Target, say: &(dyn Fn(String) + Sync)) -> Result<Begun> {
    let data_dir = &embedded.data_dir.value;
    let bins = crate::pg::binaries::find(embedded.bin_dir.as_deref())?;
    let account = privilege::postgres_account(&embedded.run_as)?;
    // A restore cut off before: its journal finishes or undoes it.
    restore::resume(data_dir, &account, true, &CancellationToken::new())?;
    let _ = std::fs::remove_file(sibling(data_dir, ".restore.held"));
    let earlier = Interrupted::load(data_dir)?;
    if let Some(earlier) = &earlier {
        if data_dir.join("PG_VERSION").exists() {
            // Only a restore's swap puts a cluster where the record found none.
            if earlier.url == repo.display() && earlier.target == target.to_string() {
                Interrupted::remove(data_dir)?;
                return Ok(Begun::Finished(earlier.clone()));
            }
            Interrupted::remove(data_dir)?;
        } else {
            say(format!("an earlier restore from {} to {} was cut off while {}: starting again", earlier.url, earlier.target, earlier.step));
        }
    }
    if holds_anything(data_dir)? {
        bail!(
            "{} is not empty: a restore from the repository only fills an empty data directory (a new machine), so nothing was changed. \
             Move that directory away first if it is to be replaced, or restore from this machine's own archive with `omni-gateway restore --to <time|latest>`",
            data_dir.display()
        );
    }
    let plan = plan(repo, target, bins.major, say).await?;
    let record = Interrupted { url: repo.display(), target: target.to_string(), step: "downloading".into(), started: Utc::now() };
    if let Some(parent) = data_dir.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    record.save(data_dir)?;
    let downloaded = async {
        crate::pitr::archive::prepare(&config.wal.dir, &account)?;
        let fetched = download(repo, &plan, &config.wal.dir, Some(data_dir), say).await?;
        if account.switch {
            privilege::chown_tree(&config.wal.dir, &account)?;
        }
        Interrupted { step: "recovering".into(), ..record.clone() }.save(data_dir)?;
        Ok::<_, anyhow::Error>(fetched)
    }
    .await;
    match downloaded {
        Ok(fetched) => Ok(Begun::Downloaded(fetched)),
        Err(e) => {
            Interrupted::remove(data_dir)?;
            Err(e)
        }
    }
}

/// The end of a restore from the repository: its record goes once the
/// restored cluster is in place, or once a failure left nothing half-done
/// (no restore journal: the data directory as it was).
pub fn finish(data_dir: &Path) -> Result<()> {
    if restore::Journal::load(data_dir)?.is_none() {
        Interrupted::remove(data_dir)?;
    }
    Ok(())
}

fn describe(target: Target) -> String {
    match target {
        Target::Latest => "latest".into(),
        Target::Time(t) => DateTime::<Utc>::to_rfc3339_opts(&t, chrono::SecondsFormat::Secs, true),
    }
}

/// A local archive of another cluster is never mixed with this one.
fn refuse_other_archive(wal_dir: &Path, identity: &Identity) -> Result<()> {
    if let Some(local) = Identity::of_archive(wal_dir)? {
        if local != *identity {
            bail!(
                "OMNI_WAL_DIR={} holds the archive of the {local}, the repository's backup is of the {identity}: point OMNI_WAL_DIR at an empty directory for the restore",
                wal_dir.display()
            );
        }
    }
    Ok(())
}

/// Writes through a temporary name and renames: never a half file under the real name.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_file_name(format!(".{}.fetching", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// The variable of [`restore_if_empty`].
pub const RESTORE_IF_EMPTY: &str = "OMNI_RESTORE_IF_EMPTY";

/// `OMNI_RESTORE_IF_EMPTY=true`: a start that finds no data directory (or
/// an empty one) and an off-site repository holding base backups restores
/// `latest` from it instead of creating an empty cluster (a container on a
/// new host). Never when the data directory holds anything. Returns whether
/// it restored. Called by the gateway before it prepares the cluster, with
/// the cluster's lock held.
pub async fn restore_if_empty(config: &Config) -> Result<bool> {
    let Database::Embedded(embedded) = &config.database else { return Ok(false) };
    if embedded.memory_mode {
        return Ok(false);
    }
    let data_dir = &embedded.data_dir.value;
    let wanted = config.parser().bool(RESTORE_IF_EMPTY)?;
    // A restore from the repository cut off before its cluster was in place:
    // never an empty cluster instead.
    if let Some(earlier) = Interrupted::load(data_dir)? {
        let account = privilege::postgres_account(&embedded.run_as)?;
        restore::resume(data_dir, &account, true, &CancellationToken::new())?;
        if data_dir.join("PG_VERSION").exists() {
            Interrupted::remove(data_dir)?;
            tracing::warn!("the restore from {} to {} into {} was cut off once its cluster was recovered: it is finished", earlier.url, earlier.target, data_dir.display());
            return Ok(true);
        }
        let again = wanted && super::config::RepositoryConfig::parse(config)?.location.is_some_and(|l| l.display() == earlier.url);
        if !again {
            bail!(
                "a restore from {} to {} into {} was cut off while {} (it began {}): there is nothing to serve yet, and a start never creates an empty cluster in its place. \
                 To finish it, {}; to start a new, empty cluster instead, delete {}",
                earlier.url,
                earlier.target,
                data_dir.display(),
                earlier.step,
                earlier.started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                earlier.advice(),
                interrupted_file(data_dir).display()
            );
        }
        tracing::warn!("{RESTORE_IF_EMPTY}: the restore from {} into {} was cut off while {}: restoring again", earlier.url, data_dir.display(), earlier.step);
    }
    if !wanted || holds_anything(data_dir)? {
        return Ok(false);
    }
    let Some(location) = super::config::RepositoryConfig::parse(config)?.location else {
        bail!("{RESTORE_IF_EMPTY}=true needs OMNI_REPOSITORY_URL: the repository to restore from");
    };
    if !config.wal.enabled {
        bail!("{RESTORE_IF_EMPTY}=true needs the WAL archive (OMNI_WAL_DIR is off): the restore downloads into it");
    }
    set_keys(config, None)?;
    let repo = Repository::open_location(location)?;
    if !holds_backups(&repo).await? {
        tracing::info!("{RESTORE_IF_EMPTY}: {} is empty and {} holds no base backup: creating a new cluster", data_dir.display(), repo.display());
        return Ok(false);
    }
    tracing::info!("{RESTORE_IF_EMPTY}: {} is empty and {} holds base backups: restoring latest from it", data_dir.display(), repo.display());
    let say = |line: String| tracing::info!("{RESTORE_IF_EMPTY}: {line}");
    let fetched = match begin(config, embedded, &repo, Target::Latest, &say).await? {
        Begun::Finished(_) => return Ok(true),
        Begun::Downloaded(fetched) => fetched,
    };
    let bins = crate::pg::binaries::find(embedded.bin_dir.as_deref())?;
    let account = privilege::postgres_account(&embedded.run_as)?;
    let password = restore::restore_password(data_dir)?;
    let progress = progress_lines(say);
    let restored = Restore { data_dir, wal: &config.wal, binaries: &bins, account: &account, password: &password, progress: Some(&progress) }.run_on(Target::Latest, None).await;
    finish(data_dir)?;
    let restored = restored?;
    tracing::info!(
        "{RESTORE_IF_EMPTY}: restored base backup {} and the WAL of timeline {} from {} into {} in {:.1} s",
        fetched.base_backup,
        restored.timeline,
        repo.display(),
        data_dir.display(),
        restored.took.as_secs_f64()
    );
    Ok(true)
}

/// A restore's progress callback ([`Restore::progress`]) that says each
/// step, and how far the restore got, once per change of percentage.
pub fn progress_lines(say: impl Fn(String) + Sync) -> impl Fn(&str, u8) + Sync {
    let last = std::sync::Mutex::new(None::<u8>);
    move |step: &str, percent: u8| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if *last != Some(percent) {
            *last = Some(percent);
            say(format!("{step}: {percent}% of the restore"));
        }
    }
}
