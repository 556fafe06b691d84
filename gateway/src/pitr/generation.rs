//! Archive generations: `OMNI_WAL_DIR` holds the WAL and base backups of one
//! cluster, named by its identity (system identifier + PostgreSQL major,
//! `identity.json`, fsynced). A cluster of another identity — after a major
//! upgrade (`pg_upgrade` makes a new system identifier), a data directory
//! replaced from elsewhere, a new `initdb` on an old archive — never writes
//! into it: the whole archive moves first into
//! `generations/<UTC stamp>-pg<major>-<sysid>/` (the same layout inside, with
//! its own `identity.json`), and the new cluster starts an empty archive and
//! its first base backup. An old generation stays restorable with its own
//! major's binaries ([`for_restore`]) until retention passes it ([`apply_retention`]).
//!
//! The move is resumable: `generations/<name>/MOVING` is written (and
//! flushed) before the first entry moves and removed after the last, so a
//! start that finds it finishes the same move instead of splitting the
//! archive in two.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::archive;
use super::restore::{self, Target};
use crate::config::WalConfig;
use crate::pg::binaries::{self, Binaries};
use crate::process::privilege::Account;

/// The archive root's (and each generation's) identity file.
pub const IDENTITY_FILE: &str = "identity.json";
/// Where earlier generations live, inside `OMNI_WAL_DIR`.
pub const GENERATIONS_DIR: &str = "generations";
/// Present in a generation while the archive is being moved into it.
const MOVING: &str = "MOVING";

/// Which cluster an archive belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `pg_control`'s system identifier (as text: it does not fit a JSON double).
    #[serde(with = "as_text")]
    pub system_identifier: u64,
    /// The PostgreSQL major of the cluster.
    pub major: u32,
}

mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgreSQL {} cluster {}", self.major, self.system_identifier)
    }
}

impl Identity {
    /// The identity of the cluster in `data_dir`, read from its files
    /// (`PG_VERSION`, and the system identifier that opens `global/pg_control`),
    /// so it is known before the cluster starts.
    pub fn of_cluster(data_dir: &Path) -> Result<Identity> {
        let major = crate::pg::upgrade::cluster_major(data_dir).with_context(|| format!("{} holds no PostgreSQL cluster (no readable PG_VERSION)", data_dir.display()))?;
        let control = data_dir.join("global/pg_control");
        let bytes = std::fs::read(&control).with_context(|| format!("reading {}", control.display()))?;
        let first: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).with_context(|| format!("{} is too short", control.display()))?;
        Ok(Identity { system_identifier: u64::from_ne_bytes(first), major })
    }

    /// The identity recorded in the archive (or generation) at `dir`.
    pub fn of_archive(dir: &Path) -> Result<Option<Identity>> {
        let path = dir.join(IDENTITY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| format!("{} is not an archive identity; move it away", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// `pg<major>-<sysid>`, the tail of a generation's directory name.
    fn label(&self) -> String {
        format!("pg{}-{}", self.major, self.system_identifier)
    }
}

/// Writes `identity.json` in `dir` through `cluster::write_secret` (a new
/// temporary file, flushed, renamed, the directory flushed).
pub fn record(dir: &Path, identity: &Identity) -> Result<()> {
    crate::pg::cluster::write_secret(&dir.join(IDENTITY_FILE), &serde_json::to_string_pretty(identity)?)
}

/// Whether the archive root holds WAL, base backups or drill records.
fn has_content(wal_dir: &Path) -> bool {
    let wal = archive::stream_dirs(wal_dir).iter().any(|d| !archive::segments(d).is_empty());
    let bases = std::fs::read_dir(archive::base_dir(wal_dir)).into_iter().flatten().flatten().next().is_some();
    wal || bases || wal_dir.join("drill.json").exists()
}

/// Makes the archive at `wal_dir` the one of the cluster in `data_dir`:
/// an archive of another identity (or, written before identities were
/// recorded, one that ended before this cluster's major upgrade) moves to
/// `generations/` first. Returns where it went. Called before anything
/// streams into the archive or reads it for this cluster.
pub fn reconcile(wal_dir: &Path, data_dir: &Path, account: &Account) -> Result<Option<PathBuf>> {
    archive::prepare(wal_dir, account)?;
    let cluster = Identity::of_cluster(data_dir)?;
    // A move cut off by a crash was started because the archive was not this
    // cluster's: it is finished, and the archive root becomes this cluster's.
    if let Some(moved) = finish_interrupted_moves(wal_dir)? {
        archive::prepare(wal_dir, account)?;
        record(wal_dir, &cluster)?;
        return Ok(Some(moved));
    }
    let archived = match Identity::of_archive(wal_dir)? {
        Some(a) if a == cluster => return Ok(None),
        Some(a) => Some(a),
        None if !has_content(wal_dir) => None,
        None => match upgraded_from(wal_dir, data_dir) {
            Some(old) => Some(old),
            None => {
                tracing::info!("OMNI_WAL_DIR {} records no cluster identity yet: it is the archive of this {cluster}", wal_dir.display());
                record(wal_dir, &cluster)?;
                return Ok(None);
            }
        },
    };
    let Some(old) = archived else {
        record(wal_dir, &cluster)?;
        return Ok(None);
    };
    let moved = move_to_generation(wal_dir, &old, account)?;
    record(wal_dir, &cluster)?;
    tracing::warn!(
        "OMNI_WAL_DIR {} held the archive of another cluster ({old}; this one is {cluster}: a major upgrade, a replaced data directory or a new cluster): \
         it moved whole to {} (restorable to its own times with PostgreSQL {} binaries until retention passes it); this cluster starts a new archive and takes a base backup now",
        wal_dir.display(),
        moved.display(),
        old.major
    );
    Ok(Some(moved))
}

/// For an archive written before identities were recorded: the identity of
/// the cluster this data directory was upgraded from, when the archive's
/// last write came before that upgrade finished.
fn upgraded_from(wal_dir: &Path, data_dir: &Path) -> Option<Identity> {
    let record = crate::pg::upgrade::load(data_dir).ok()??;
    if record.step != crate::pg::upgrade::Step::Done {
        return None;
    }
    let finished = std::time::UNIX_EPOCH + std::time::Duration::from_secs(record.finished_at?);
    let newest = archive::newest_write(wal_dir).into_iter().chain(super::base::list(wal_dir).last().map(|b| b.finished_at.into())).max()?;
    if newest > finished {
        return None;
    }
    // The kept old copy names its system identifier; once deleted it is unknown (0).
    let sysid = Identity::of_cluster(&record.old_copy).map(|i| i.system_identifier).unwrap_or(0);
    Some(Identity { system_identifier: sysid, major: record.from })
}

fn make_dir(dir: &Path, account: &Account) -> Result<()> {
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(dir).with_context(|| format!("could not create {}", dir.display()))?;
    if account.switch {
        std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid)).with_context(|| format!("could not give {} to user {}", dir.display(), account.name))?;
    }
    Ok(())
}

/// Moves everything of the archive root but `generations/` into a new
/// generation named after `identity`.
fn move_to_generation(wal_dir: &Path, identity: &Identity, account: &Account) -> Result<PathBuf> {
    let generations = wal_dir.join(GENERATIONS_DIR);
    make_dir(&generations, account)?;
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let to = generations.join(format!("{stamp}-{}", identity.label()));
    make_dir(&to, account)?;
    let marker = to.join(MOVING);
    std::fs::File::create(&marker).and_then(|f| f.sync_all()).with_context(|| format!("could not write {}", marker.display()))?;
    std::fs::File::open(&generations).and_then(|d| d.sync_all())?;
    move_entries(wal_dir, &to)?;
    record(&to, identity)?;
    std::fs::remove_file(&marker).with_context(|| format!("could not remove {}", marker.display()))?;
    std::fs::File::open(&to).and_then(|d| d.sync_all())?;
    archive::prepare(wal_dir, account)?;
    Ok(to)
}

/// Renames every entry of `wal_dir` except `generations/` into `to`, then
/// flushes both directories.
fn move_entries(wal_dir: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(wal_dir).with_context(|| format!("reading {}", wal_dir.display()))?.flatten() {
        let name = entry.file_name();
        if name == GENERATIONS_DIR || name == IDENTITY_FILE {
            continue;
        }
        let target = to.join(&name);
        std::fs::rename(entry.path(), &target).with_context(|| format!("could not move {} to {}", entry.path().display(), target.display()))?;
    }
    std::fs::File::open(to).and_then(|d| d.sync_all())?;
    std::fs::File::open(wal_dir).and_then(|d| d.sync_all())?;
    Ok(())
}

/// A move cut off by a crash is finished into the same generation; returns it.
fn finish_interrupted_moves(wal_dir: &Path) -> Result<Option<PathBuf>> {
    let mut finished = None;
    for generation in list_dirs(wal_dir).into_iter().filter(|g| g.join(MOVING).exists()) {
        let identity = parse_label(&generation).context("a generation being moved has no identity in its name")?;
        tracing::warn!("moving the archive into {} was cut off; finishing it", generation.display());
        move_entries(wal_dir, &generation)?;
        record(&generation, &identity)?;
        std::fs::remove_file(generation.join(MOVING))?;
        finished = Some(generation);
    }
    Ok(finished)
}

fn parse_label(dir: &Path) -> Option<Identity> {
    let name = dir.file_name()?.to_str()?;
    let mut parts = name.rsplitn(3, '-');
    let sysid = parts.next()?.parse().ok()?;
    let major = parts.next()?.strip_prefix("pg")?.parse().ok()?;
    Some(Identity { system_identifier: sysid, major })
}

fn list_dirs(wal_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(wal_dir.join(GENERATIONS_DIR)).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs
}

/// An earlier generation of the archive.
#[derive(Debug, Clone)]
pub struct Generation {
    pub dir: PathBuf,
    pub identity: Identity,
    pub window: restore::Window,
}

/// Finished generations, oldest first.
pub fn list(wal_dir: &Path) -> Vec<Generation> {
    list_dirs(wal_dir)
        .into_iter()
        .filter(|d| !d.join(MOVING).exists())
        .filter_map(|dir| {
            let identity = Identity::of_archive(&dir).ok().flatten().or_else(|| parse_label(&dir))?;
            let window = restore::window(&dir);
            Some(Generation { dir, identity, window })
        })
        .collect()
}

/// One line per generation, for `restore --window`.
pub fn describe(wal_dir: &Path) -> Vec<String> {
    list(wal_dir).iter().map(|g| format!("earlier generation {} ({}): {}", g.dir.display(), g.identity, g.window)).collect()
}

/// The generation a restore to `target` reads, when it is not the current
/// archive: a time before the current archive's first base backup, inside
/// (or after the end of) an earlier generation's window. `None`: the
/// current archive. With one, the archive settings pointing at it and that
/// generation's major's binaries (found the way an upgrade finds the old
/// major's: `PGSERVE_OLD_BIN_DIR`, that major's usual directories), or an
/// error naming what to install.
pub fn for_restore(wal: &WalConfig, target: Target, old_bin_dir: Option<&Path>) -> Result<Option<(WalConfig, Binaries, Generation)>> {
    let Target::Time(t) = target else { return Ok(None) };
    if restore::window(&wal.dir).earliest.is_some_and(|earliest| earliest <= t) {
        return Ok(None);
    }
    let Some(generation) = pick(&list(&wal.dir), t) else { return Ok(None) };
    let major = generation.identity.major;
    let bins = binaries::find_major(major, old_bin_dir, false).map_err(|why| {
        anyhow::anyhow!(
            "{} is in the archive of an earlier PostgreSQL {major} cluster ({}), which only PostgreSQL {major} binaries restore: {why}. \
             Install PostgreSQL {major} (for example `apt-get install postgresql-{major}` on Debian/Ubuntu, `dnf install postgresql{major}-server` on Fedora/RHEL) \
             or set PGSERVE_OLD_BIN_DIR to its bin directory. Nothing was changed",
            target,
            generation.dir.display()
        )
    })?;
    if bins.major != major {
        bail!("the binaries found for PostgreSQL {major} in {} are PostgreSQL {}", bins.dir.display(), bins.major);
    }
    let mut old = wal.clone();
    old.dir = generation.dir.clone();
    Ok(Some((old, bins, generation)))
}

/// The newest generation whose first base backup ended at or before `t`.
fn pick(generations: &[Generation], t: DateTime<Utc>) -> Option<Generation> {
    generations.iter().rev().find(|g| g.window.earliest.is_some_and(|e| e <= t)).cloned()
}

/// The newest write into a generation: its newest segment, base backup or identity file.
fn newest_write(dir: &Path) -> Option<DateTime<Utc>> {
    let segment = archive::newest_write(dir).map(DateTime::<Utc>::from);
    let base = super::base::list(dir).last().map(|b| b.finished_at);
    let identity = std::fs::metadata(dir.join(IDENTITY_FILE)).and_then(|m| m.modified()).ok().map(DateTime::<Utc>::from);
    segment.into_iter().chain(base).max().or(identity)
}

/// Deletes the generations whose newest write is older than the archive's
/// retention window (`OMNI_PITR_WINDOW`): no restore inside the window needs them.
pub fn apply_retention(wal: &WalConfig) -> Result<()> {
    let cutoff = Utc::now() - chrono::Duration::from_std(wal.window).unwrap_or(chrono::Duration::MAX);
    for generation in list(&wal.dir) {
        let Some(newest) = newest_write(&generation.dir) else { continue };
        if newest < cutoff {
            tracing::info!(
                "retention: deleting the archive generation {} ({}; its newest write {} is older than OMNI_PITR_WINDOW)",
                generation.dir.display(),
                generation.identity,
                newest.to_rfc3339_opts(SecondsFormat::Secs, true)
            );
            std::fs::remove_dir_all(&generation.dir).with_context(|| format!("deleting {}", generation.dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Account {
        Account { name: "me".into(), uid: 0, gid: 0, home: PathBuf::from("/"), switch: false }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("omni-generation-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cluster(dir: &Path, major: u32, sysid: u64) {
        std::fs::create_dir_all(dir.join("global")).unwrap();
        std::fs::write(dir.join("PG_VERSION"), format!("{major}\n")).unwrap();
        let mut control = sysid.to_ne_bytes().to_vec();
        control.extend([0u8; 100]);
        std::fs::write(dir.join("global/pg_control"), control).unwrap();
    }

    #[test]
    fn identities_are_read_from_the_cluster_files_and_kept_as_text() {
        let root = scratch("identity");
        cluster(&root.join("data"), 15, 7_400_000_000_000_000_123);
        let id = Identity::of_cluster(&root.join("data")).unwrap();
        assert_eq!(id, Identity { system_identifier: 7_400_000_000_000_000_123, major: 15 });
        record(&root, &id).unwrap();
        let text = std::fs::read_to_string(root.join(IDENTITY_FILE)).unwrap();
        assert!(text.contains("\"7400000000000000123\""), "{text}");
        assert_eq!(Identity::of_archive(&root).unwrap(), Some(id));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_archive_of_another_cluster_moves_whole_and_an_interrupted_move_is_finished() {
        let root = scratch("move");
        let (wal, data) = (root.join("wal"), root.join("data"));
        cluster(&data, 15, 1);
        let account = me();
        assert_eq!(reconcile(&wal, &data, &account).unwrap(), None, "a new archive takes the cluster's identity");
        std::fs::write(wal.join("stream/000000010000000000000003.partial"), b"old").unwrap();
        std::fs::create_dir_all(wal.join("stream-x")).unwrap();
        assert_eq!(reconcile(&wal, &data, &account).unwrap(), None, "same cluster: nothing moves");

        cluster(&data, 17, 2);
        let moved = reconcile(&wal, &data, &account).unwrap().expect("another cluster: the archive moves");
        assert!(moved.file_name().unwrap().to_str().unwrap().ends_with("-pg15-1"), "{}", moved.display());
        assert_eq!(std::fs::read(moved.join("stream/000000010000000000000003.partial")).unwrap(), b"old");
        assert!(moved.join("stream-x").is_dir() && !wal.join("stream-x").exists());
        assert_eq!(Identity::of_archive(&moved).unwrap(), Some(Identity { system_identifier: 1, major: 15 }));
        assert_eq!(Identity::of_archive(&wal).unwrap(), Some(Identity { system_identifier: 2, major: 17 }));
        assert!(archive::segments(&archive::stream_dir(&wal)).is_empty(), "the new archive starts empty");

        // A move cut off after its marker: the next reconcile finishes it into the same generation.
        let cut = wal.join(GENERATIONS_DIR).join("20260101T000000.000Z-pg17-2");
        std::fs::create_dir_all(&cut).unwrap();
        std::fs::write(cut.join(MOVING), b"").unwrap();
        std::fs::write(wal.join("stream/000000010000000000000009.partial"), b"new").unwrap();
        cluster(&data, 17, 3);
        let again = reconcile(&wal, &data, &account).unwrap().expect("moves again");
        assert_eq!(std::fs::read(cut.join("stream/000000010000000000000009.partial")).unwrap(), b"new", "finished into the cut-off generation");
        assert!(!cut.join(MOVING).exists());
        assert_eq!(again, cut);
        assert_eq!(list(&wal).len(), 2);
        assert_eq!(Identity::of_archive(&wal).unwrap(), Some(Identity { system_identifier: 3, major: 17 }));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn generation_names_give_back_their_identity() {
        assert_eq!(parse_label(Path::new("/w/generations/20261204T101010.123Z-pg15-7412345")), Some(Identity { system_identifier: 7_412_345, major: 15 }));
        assert_eq!(parse_label(Path::new("/w/generations/junk")), None);
    }
}
