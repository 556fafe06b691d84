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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};

use super::layout::{self, BaseManifest, Object};
use super::store::Repository;
use crate::config::{Config, Database};
use crate::pitr::generation::Identity;
use crate::pitr::restore::{self, Restore, Target};
use crate::process::privilege;

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
}

/// Whether the repository holds at least one complete base backup (any
/// generation): what `OMNI_RESTORE_IF_EMPTY` asks before restoring.
pub async fn holds_backups(repo: &Repository) -> Result<bool> {
    let listed = repo.list("").await?;
    Ok(listed.iter().any(|o| matches!(layout::parse(&o.path), Some(Object::BaseManifest { .. }))))
}

/// Downloads into `wal_dir` what a restore to `target` needs; `major` is
/// the binaries' major (a generation of another major cannot be restored with them).
pub async fn fetch(repo: &Repository, wal_dir: &Path, target: Target, major: u32, say: &(dyn Fn(String) + Sync)) -> Result<Fetched> {
    say(format!("listing {}", repo.display()));
    let listed = repo.list("").await?;
    let mut generations: BTreeMap<String, Generation> = BTreeMap::new();
    for object in &listed {
        match layout::parse(&object.path) {
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
        bail!("{} holds no complete base backup ({} objects; a base backup counts once its manifest.json is there): nothing to restore from", repo.display(), listed.len());
    }

    // The newest suitable base backup of a generation the binaries serve.
    let mut best: Option<(String, BaseManifest)> = None;
    let mut other_majors = Vec::new();
    for (gen, content) in &generations {
        let Some((_, gen_major)) = layout::parse_generation(gen) else { continue };
        if gen_major != major {
            if !content.manifests.is_empty() {
                other_majors.push(gen_major);
            }
            continue;
        }
        for path in &content.manifests {
            let manifest: BaseManifest = serde_json::from_slice(&repo.get(path).await?).with_context(|| format!("{}: {path} is not a base backup manifest", repo.display()))?;
            let fits = match target {
                Target::Latest => true,
                Target::Time(t) => manifest.backup.finished_at <= t,
            };
            if fits && best.as_ref().is_none_or(|(_, b)| b.backup.finished_at < manifest.backup.finished_at) {
                best = Some((gen.clone(), manifest));
            }
        }
    }
    let Some((gen, manifest)) = best else {
        if !other_majors.is_empty() {
            bail!(
                "{} holds base backups of PostgreSQL {:?} only, and these binaries are PostgreSQL {major}: set PGSERVE_BIN_DIR to binaries of that major",
                repo.display(),
                other_majors
            );
        }
        bail!("{} holds no base backup that ended before {}: pick a later time, or `latest`", repo.display(), describe(target));
    };
    let (sysid, gen_major) = layout::parse_generation(&gen).expect("a generation listed above");
    let identity = Identity { system_identifier: sysid, major: gen_major };
    refuse_other_archive(wal_dir, &identity)?;
    let content = &generations[&gen];
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
        for (n, file) in manifest.files.iter().enumerate() {
            if file.name.contains('/') || file.name.starts_with('.') {
                bail!("{}: the manifest of {} names {:?}, not a file of a base backup", repo.display(), backup.id, file.name);
            }
            let object = layout::base_file(&gen, &backup.id, &file.name);
            // Streamed to disk and checked on the way (never whole in memory).
            let written = repo.get_to_file_verified(&object, &partial.join(&file.name), &file.sha256).await?;
            objects += 1;
            bytes += written;
            say(format!("base backup: {}/{} files, {bytes}/{total} bytes ({} verified)", n + 1, manifest.files.len(), file.name));
        }
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&partial, &final_dir).with_context(|| format!("renaming {} to {}", partial.display(), final_dir.display()))?;
        write_atomically(&base_root.join(format!("{}.json", backup.id)), &serde_json::to_vec_pretty(backup)?)?;
    }

    // WAL: history files, whole segments from the backup's first on, then chunks.
    let stream = crate::pitr::archive::stream_dir(wal_dir);
    std::fs::create_dir_all(&stream).with_context(|| format!("creating {}", stream.display()))?;
    for history in &content.histories {
        let data = repo.get(&layout::wal_history(&gen, history)).await?;
        write_atomically(&stream.join(history), &data)?;
        objects += 1;
        bytes += data.len() as u64;
    }
    let first = backup.start_segment.clone();
    let wanted: Vec<&String> = content.segments.keys().filter(|s| s[8..] >= first[8..] || s[..8] > first[..8]).collect();
    let wal_total: u64 = wanted.iter().map(|s| content.segments[*s]).sum();
    let (mut segments, mut wal_bytes, mut segment_bytes) = (0usize, 0u64, None);
    for segment in &wanted {
        let local = stream.join(segment.as_str());
        let stored = repo.get(&layout::wal_segment(&gen, segment)).await?;
        let data = layout::decode_segment(&stored).with_context(|| format!("{}: the WAL segment {segment} is damaged (its lz4 frame does not check)", repo.display()))?;
        segment_bytes.get_or_insert(data.len());
        write_atomically(&local, &data)?;
        let _ = std::fs::remove_file(stream.join(format!("{segment}.partial")));
        segments += 1;
        wal_bytes += stored.len() as u64;
        objects += 1;
        if segments % 16 == 0 || segments == wanted.len() {
            say(format!("WAL: {segments}/{} segments, {wal_bytes}/{wal_total} bytes", wanted.len()));
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
        for (from, to) in chunks {
            if from != data.len() as u64 {
                // A gap: what follows cannot be replayed.
                break;
            }
            let bytes_of = repo.get(&layout::wal_chunk(&gen, segment, from, to)).await?;
            if bytes_of.len() as u64 != to - from {
                bail!("{}: the chunk {from:08X}-{to:08X} of {segment} holds {} bytes, not {}", repo.display(), bytes_of.len(), to - from);
            }
            data.extend_from_slice(&bytes_of);
            objects += 1;
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
    crate::pitr::generation::record(wal_dir, &identity)?;
    say(format!("downloaded {objects} objects, {bytes} bytes into {}", wal_dir.display()));
    Ok(Fetched { generation: gen, identity, base_backup: backup.id.clone(), objects, bytes, segments, partial })
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
    if !config.parser().bool(RESTORE_IF_EMPTY)? {
        return Ok(false);
    }
    let Database::Embedded(embedded) = &config.database else { return Ok(false) };
    if embedded.memory_mode {
        return Ok(false);
    }
    let data_dir = &embedded.data_dir.value;
    let empty = match std::fs::read_dir(data_dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).with_context(|| format!("reading {}", data_dir.display())),
    };
    if !empty {
        return Ok(false);
    }
    let Some(location) = super::config::RepositoryConfig::parse(config)?.location else {
        bail!("{RESTORE_IF_EMPTY}=true needs OMNI_REPOSITORY_URL: the repository to restore from");
    };
    if !config.wal.enabled {
        bail!("{RESTORE_IF_EMPTY}=true needs the WAL archive (OMNI_WAL_DIR is off): the restore downloads into it");
    }
    let repo = Repository::open_location(location)?;
    if !holds_backups(&repo).await? {
        tracing::info!("{RESTORE_IF_EMPTY}: {} is empty and {} holds no base backup: creating a new cluster", data_dir.display(), repo.display());
        return Ok(false);
    }
    tracing::info!("{RESTORE_IF_EMPTY}: {} is empty and {} holds base backups: restoring latest from it", data_dir.display(), repo.display());
    let bins = crate::pg::binaries::find(embedded.bin_dir.as_deref())?;
    let account = privilege::postgres_account(&embedded.run_as)?;
    crate::pitr::archive::prepare(&config.wal.dir, &account)?;
    let say = |line: String| tracing::info!("{RESTORE_IF_EMPTY}: {line}");
    let fetched = fetch(&repo, &config.wal.dir, Target::Latest, bins.major, &say).await?;
    privilege::chown_tree(&config.wal.dir, &account)?;
    let password = restore::restore_password(data_dir)?;
    let restored = Restore { data_dir, wal: &config.wal, binaries: &bins, account: &account, password: &password, progress: None }.run_on(Target::Latest, None).await?;
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
