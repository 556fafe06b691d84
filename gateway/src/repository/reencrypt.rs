//! `omni-gateway backup reencrypt --identity OLD`: a key rotation carried to
//! the objects already in the repository.
//!
//! Changing `OMNI_ENCRYPT_*` applies to new objects only; the old ones stay
//! readable with the old identity. This rewrites every object of the
//! repository that is not sealed to the current recipients (read with
//! `--identity`, the old private key) into a copy sealed to them:
//!
//! * **Write-once names.** An object is never overwritten, so a copy takes
//!   a new name marked with the keys tag of its recipients
//!   (`layout::keys_tag`): `wal/<segment>.lz4.k-<tag>`, and a base backup
//!   becomes the backup `<id>.k-<tag>` (its files, then its manifest, last,
//!   naming the recipients they were sealed to). The tag is a function of
//!   the recipients, so a second run finds what the first wrote. Restores
//!   take, of each object, a copy their identity opens (`fetch.rs`):
//!   old-only, new-only and mixed repositories restore alike.
//! * **Nothing is deleted before its copy is confirmed**: each copy is read
//!   back, its SHA-256 compared with what was written and its header with
//!   the current recipients; a base backup's old objects go only once its
//!   new manifest is there (old manifest first, as retention does). With
//!   `OMNI_REPOSITORY_DELETE=false` nothing is deleted; the old objects stay
//!   for the bucket's lifecycle rules.
//! * **Resumable.** Killed at any point, a second run finishes the job: a
//!   copy already there is taken as the earlier upload (`put_object`'s
//!   write-once rule compares sealing), an old object whose copy is
//!   complete is only deleted, leftovers of a base backup whose copy is
//!   complete are deleted.
//! * **Not beside a running gateway**: it takes the cluster's lock
//!   (`pg/lock.rs`). The gateway's shipper and retention write and delete in
//!   the same prefixes; a copy of an object retention is deleting would be
//!   an orphan nothing deletes, and the server reads back the manifests it
//!   cannot decrypt from plain copies (`OMNI_WAL_DIR/repository-plain`),
//!   which this writes for the new manifests and history files.
//! * The server holds public keys only and cannot tell a copy's content; a
//!   copy is checked by the bytes written (SHA-256), its plaintext by age's
//!   authentication when the old object is opened, and a base file by its
//!   manifest's SHA-256 before it is re-sealed.
//!
//! Refused: no repository, no encryption configured now (nothing to
//! encrypt to), an identity that opens none of the objects to rewrite, a
//! rotation from one passphrase to another (an age header cannot tell two
//! passphrases apart: use public keys).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;

use super::config::RepositoryConfig;
use super::crypt::{self, CryptError, Keys};
use super::layout::{self, BaseManifest, ManifestFile, Object};
use super::store::{self, Listed, Repository, RepositoryError, Stored};
use crate::config::{Config, Database};

/// Objects up to this size are rewritten in memory; larger ones through a
/// file (a base backup's `base.tar.lz4` can be gigabytes).
const IN_MEMORY_MAX: u64 = 32 * 1024 * 1024;
/// How often a long run says how far it got, at least.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What a run did, for its last lines (and the tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Objects copied to the current recipients (a base backup's files and manifest count one each).
    pub rewritten: usize,
    pub rewritten_bytes: u64,
    /// Objects already sealed to the current recipients, or whose copy was already there.
    pub current: usize,
    /// Old objects deleted once their copy was confirmed.
    pub deleted: usize,
    /// Old objects kept (`OMNI_REPOSITORY_DELETE=false`).
    pub kept: usize,
    /// Objects the identity does not open: name and the keys they need.
    pub unopened: Vec<(String, Vec<String>)>,
}

/// One object to rewrite: where it is, how big.
struct Item {
    path: String,
    size: u64,
}

/// What the run knows and needs, shared by its steps.
struct Run<'a> {
    repo: Repository,
    keys: Keys,
    /// The current recipients, sorted: what every copy must be sealed to.
    current: Vec<String>,
    tag: String,
    delete: bool,
    /// Every object name listed at the start.
    listed: BTreeSet<String>,
    /// Where big objects are decrypted on their way (removed at the end).
    scratch: PathBuf,
    /// `OMNI_WAL_DIR/repository-plain`, and whose it is: the server's plain copies.
    plain_root: Option<PathBuf>,
    summary: Summary,
    progress: Progress<'a>,
}

struct Progress<'a> {
    say: &'a dyn Fn(String),
    total: usize,
    total_bytes: u64,
    done: usize,
    done_bytes: u64,
    said: Instant,
}

impl Progress<'_> {
    fn step(&mut self, bytes: u64) {
        self.done += 1;
        self.done_bytes += bytes;
        if self.done == 1 || self.done == self.total || self.said.elapsed() >= PROGRESS_EVERY || self.done.is_multiple_of(50) {
            (self.say)(format!("re-encrypting {}/{} objects, {} of {}", self.done, self.total, human(self.done_bytes), human(self.total_bytes)));
            self.said = Instant::now();
        }
    }
}

/// `1.2 GB`, `340 kB`: sizes for people.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.1} GB", b / 1e9),
    }
}

fn sorted(keys: &[String]) -> Vec<String> {
    let mut keys = keys.to_vec();
    keys.sort();
    keys.dedup();
    keys
}

/// Runs the rotation (see the module's text), saying how far it got
/// through `say`. An error when something could not be rewritten; what
/// was done stays done, and a second run goes on from there.
pub async fn run(config: &Config, identity: &Path, say: &dyn Fn(String)) -> Result<Summary> {
    let settings = RepositoryConfig::parse(config)?;
    let Some(location) = settings.location.clone() else {
        bail!("{} is not set: there is no off-site repository to re-encrypt", store::URL_VAR);
    };
    if !settings.encryption.is_on() {
        bail!(
            "no encryption is configured: set the new recipients first (OMNI_ENCRYPT_RECIPIENTS, OMNI_ENCRYPT_RECIPIENTS_FILE or OMNI_ENCRYPT_PASSPHRASE_FILE, as the gateway runs with them); \
             `backup reencrypt` rewrites the repository's objects to them"
        );
    }
    let keys = Keys::load(identity, "--identity")?;
    if matches!(settings.encryption, crypt::Encryption::Passphrase { .. }) && keys.public() == ["passphrase"] {
        bail!(
            "--identity {} is a passphrase and OMNI_ENCRYPT_PASSPHRASE_FILE is set: a rotation from one passphrase to another is not supported \
             (an object's header cannot tell two passphrases apart); encrypt to age public keys (OMNI_ENCRYPT_RECIPIENTS) instead",
            identity.display()
        );
    }
    // Not beside a running gateway (see the module's text).
    let _lock = match &config.database {
        Database::Embedded(e) if !e.memory_mode => Some(crate::pg::lock::acquire(&e.data_dir.value, "backup reencrypt").context(
            "stop the gateway first: `backup reencrypt` writes and deletes in the repository the gateway's shipper and retention work on, and the plain copies of its manifests; start it again afterwards",
        )?),
        _ => None,
    };
    let wal_dir = config.wal.enabled.then(|| config.wal.dir.clone());
    let plain_root = wal_dir.as_ref().map(|d| d.join(super::ship::PLAIN_COPIES));
    let scratch = wal_dir.as_ref().map_or_else(std::env::temp_dir, |d| d.join(super::ship::OUTBOX)).join(format!("reencrypt-{}", std::process::id()));
    store::set_crypt(store::Crypt {
        encryption: settings.encryption.clone(),
        keys: Some(Keys::load(identity, "--identity")?),
        plain_copies: plain_root.clone(),
        scratch: wal_dir.as_ref().map(|d| d.join(super::ship::OUTBOX)),
    });
    let repo = Repository::open_location(location)?;
    let current = sorted(&repo.sealer_recipients()?);
    let tag = layout::keys_tag(&current);
    say(format!(
        "re-encrypting {} to {} (keys tag k-{tag}), reading with {}",
        repo.display(),
        current.iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", "),
        keys.public().iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", ")
    ));
    let listed = repo.list("").await.with_context(|| format!("could not list {}: check the URL and the credentials of the environment; nothing was changed", repo.display()))?;
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut run = Run {
        repo,
        keys,
        current,
        tag,
        delete: settings.delete,
        listed: listed.iter().map(|o| o.path.clone()).collect(),
        scratch: scratch.clone(),
        plain_root,
        summary: Summary::default(),
        progress: Progress { say, total: 0, total_bytes: 0, done: 0, done_bytes: 0, said: Instant::now() },
    };
    let result = run.all(&listed).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    let s = run.summary;
    say(format!(
        "re-encrypted {} objects ({}) of {}; {} were already for the current recipients",
        s.rewritten,
        human(s.rewritten_bytes),
        run.repo.display(),
        s.current
    ));
    if run.delete {
        say(format!("deleted {} old objects once their copies were confirmed", s.deleted));
    } else if s.kept > 0 {
        say(format!(
            "OMNI_REPOSITORY_DELETE=false: the {} old objects stay (the bucket's lifecycle rules decide); restores take the copies their identity opens",
            s.kept
        ));
    }
    if !s.unopened.is_empty() {
        let mut needed: Vec<String> = s.unopened.iter().flat_map(|(_, k)| k.iter().map(|k| crypt::short(k))).collect();
        needed.sort();
        needed.dedup();
        let names: Vec<&str> = s.unopened.iter().take(5).map(|(p, _)| p.as_str()).collect();
        bail!(
            "{} objects do not open with --identity {} ({}) and stay as they are: {}{}; they are encrypted to {}: run again with an identity that opens them",
            s.unopened.len(),
            identity.display(),
            run.keys.public().iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", "),
            names.join(", "),
            if s.unopened.len() > names.len() { ", …" } else { "" },
            if needed.is_empty() { "keys they do not name".to_string() } else { needed.join(", ") }
        );
    }
    Ok(s)
}

impl Run<'_> {
    /// Every object of the listing: base backups first, then history files,
    /// WAL and logical backups.
    async fn all(&mut self, listed: &[Listed]) -> Result<()> {
        // Base backups: (gen, directory id) → its objects, and whether its manifest is there.
        let mut bases: BTreeMap<(String, String), (bool, Vec<&Listed>)> = BTreeMap::new();
        let mut others: Vec<Item> = Vec::new();
        for o in listed {
            match layout::parse(&o.path) {
                Some(Object::BaseManifest { gen, id }) => bases.entry((gen, id)).or_default().0 = true,
                Some(Object::BaseFile { gen, id, .. }) => bases.entry((gen, id)).or_default().1.push(o),
                Some(Object::Segment { .. } | Object::Chunk { .. } | Object::History { .. } | Object::Logical { .. }) => {
                    if layout::canonical(&o.path).1.as_deref() == Some(self.tag.as_str()) {
                        continue;
                    }
                    // Its copy is there and the original stays: nothing to read.
                    if !self.delete && self.listed.contains(&layout::rekeyed(&o.path, &self.tag)) {
                        self.summary.current += 1;
                        self.summary.kept += 1;
                        continue;
                    }
                    others.push(Item { path: o.path.clone(), size: o.size });
                }
                None => {}
            }
        }
        // History files first among the others: they are small, and open or not at once.
        others.sort_by_key(|i| (!matches!(layout::parse(&i.path), Some(Object::History { .. })), i.path.clone()));

        let mut todo: Vec<(String, String)> = Vec::new();
        for ((gen, id), (complete, files)) in &bases {
            let own = layout::canonical(&layout::base_manifest(gen, id)).1.as_deref() == Some(self.tag.as_str());
            if own {
                continue;
            }
            let copy_done = bases.get(&(gen.clone(), layout::rekeyed_id(id, &self.tag))).is_some_and(|(m, _)| *m);
            if copy_done {
                // Its copy is complete (a run before): the old objects only go.
                let mut old: Vec<String> = if *complete { vec![layout::base_manifest(gen, id)] } else { Vec::new() };
                old.extend(files.iter().map(|f| f.path.clone()));
                self.summary.current += 1;
                self.retire(&old).await?;
            } else if *complete {
                self.progress.total += files.len() + 1;
                self.progress.total_bytes += files.iter().map(|f| f.size).sum::<u64>();
                todo.push((gen.clone(), id.clone()));
            }
            // A base backup without manifest and without copy: being uploaded, or
            // a copy cut off (its original's rewrite redoes it); left alone.
        }
        self.progress.total += others.len();
        self.progress.total_bytes += others.iter().map(|i| i.size).sum::<u64>();
        if self.progress.total == 0 {
            (self.progress.say)(format!("nothing to re-encrypt: every object of {} is for the current recipients", self.repo.display()));
            return Ok(());
        }

        // The manifests first: an identity that opens none of them stops here, nothing written.
        let mut manifests = Vec::new();
        for (gen, id) in &todo {
            let path = layout::base_manifest(gen, id);
            let stored = self.repo.get(&path).await?;
            manifests.push(self.open(&path, stored)?);
        }
        let probed: Vec<&Opened> = manifests.iter().filter(|m| !matches!(m, Opened::Current)).collect();
        if !probed.is_empty() && probed.iter().all(|m| matches!(m, Opened::Refused(_))) {
            let needed: BTreeSet<String> = probed.iter().flat_map(|m| if let Opened::Refused(k) = m { k.iter().map(|k| crypt::short(k)).collect() } else { Vec::new() }).collect();
            bail!(
                "the identity given ({}) opens none of the {} base backup manifests to re-encrypt (they are encrypted to {}): nothing was written. \
                 --identity takes the OLD private key, the one the objects were encrypted to",
                self.keys.public().iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", "),
                probed.len(),
                needed.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        // Write-once on a store that ignores the condition (rclone's S3
        // server) too: every write looks for the object first, as the shipper's.
        if !self.repo.honours_conditional_writes(self.delete).await? {
            self.repo.look_first();
        }
        for ((gen, id), manifest) in todo.iter().zip(manifests) {
            self.base_backup(gen, id, manifest, &bases[&(gen.clone(), id.clone())].1).await?;
        }
        for item in &others {
            self.object(item).await?;
        }
        if self.summary.rewritten == 0 && !self.summary.unopened.is_empty() && self.summary.current == 0 {
            bail!(
                "the identity given ({}) opens none of the {} objects to re-encrypt: nothing was written. --identity takes the OLD private key, the one the objects were encrypted to",
                self.keys.public().iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", "),
                self.summary.unopened.len()
            );
        }
        Ok(())
    }

    /// An object's stored bytes judged: already for the current recipients,
    /// opened (its content), or refused (the keys it needs).
    fn open(&self, path: &str, stored: Bytes) -> Result<Opened> {
        if !crypt::is_sealed(&stored) {
            return Ok(Opened::Plain(stored));
        }
        if sorted(&crypt::header_recipients(&stored)) == self.current {
            return Ok(Opened::Current);
        }
        match self.keys.open_bytes(&stored, path) {
            Ok(plain) => Ok(Opened::Plain(Bytes::from(plain))),
            Err(CryptError::WrongKey { needed, .. } | CryptError::NoKey { needed, .. }) => Ok(Opened::Refused(needed)),
            Err(e) => Err(e.into()),
        }
    }

    /// A base backup: every file copied into `<id>.k-<tag>/` and confirmed,
    /// then its manifest, then the old objects retired.
    async fn base_backup(&mut self, gen: &str, id: &str, manifest: Opened, old_files: &[&Listed]) -> Result<()> {
        let manifest_path = layout::base_manifest(gen, id);
        let plain = match manifest {
            Opened::Current => {
                self.summary.current += 1;
                for f in old_files {
                    self.progress.step(f.size);
                }
                self.progress.step(0);
                return Ok(());
            }
            Opened::Refused(needed) => {
                self.summary.unopened.push((manifest_path, needed));
                for f in old_files {
                    self.progress.step(f.size);
                }
                self.progress.step(0);
                return Ok(());
            }
            Opened::Plain(plain) => plain,
        };
        let manifest: BaseManifest = serde_json::from_slice(&plain).with_context(|| format!("{}: {manifest_path} is not a base backup manifest", self.repo.display()))?;
        let new_id = layout::rekeyed_id(id, &self.tag);
        let mut files = Vec::new();
        let mut recipients = Vec::new();
        for file in &manifest.files {
            if file.name.contains('/') || file.name.starts_with('.') {
                bail!("{}: the manifest of {id} names {:?}, not a file of a base backup", self.repo.display(), file.name);
            }
            let (old, new) = (layout::base_file(gen, id, &file.name), layout::base_file(gen, &new_id, &file.name));
            let stored = if file.size <= IN_MEMORY_MAX {
                let plain = self.repo.get_plain_verified(&old, &file.sha256).await.with_context(|| format!("base backup {id}: {old} does not match its manifest; nothing of it was changed"))?;
                self.repo.put_object(&new, plain).await?
            } else {
                let local = self.scratch.join(&file.name);
                self.repo.get_to_file_verified(&old, &local, &file.sha256).await.with_context(|| format!("base backup {id}: {old} does not match its manifest; nothing of it was changed"))?;
                let stored = self.repo.put_file(&new, &local).await;
                let _ = std::fs::remove_file(&local);
                stored?
            };
            self.confirm(&new, &stored).await?;
            recipients = stored.recipients.clone();
            files.push(ManifestFile { name: file.name.clone(), size: stored.size, sha256: stored.sha256.clone() });
            self.summary.rewritten += 1;
            self.summary.rewritten_bytes += stored.size;
            self.progress.step(file.size);
        }
        if recipients.is_empty() {
            recipients = self.current.clone();
        }
        let backup = crate::pitr::base::BaseBackup { id: new_id.clone(), ..manifest.backup.clone() };
        let copy = BaseManifest { backup, files, recipients };
        let json = serde_json::to_vec_pretty(&copy)?;
        let new_manifest = layout::base_manifest(gen, &new_id);
        let stored = self.repo.put_object(&new_manifest, Bytes::from(json.clone())).await?;
        self.confirm(&new_manifest, &stored).await?;
        self.keep_plain_copy(&new_manifest, &json)?;
        self.summary.rewritten += 1;
        self.summary.rewritten_bytes += stored.size;
        self.progress.step(0);
        let mut old = vec![manifest_path];
        old.extend(old_files.iter().map(|f| f.path.clone()));
        self.retire(&old).await
    }

    /// A WAL segment, chunk, history file or logical backup: copied, confirmed, retired.
    async fn object(&mut self, item: &Item) -> Result<()> {
        let new = layout::rekeyed(&item.path, &self.tag);
        let (opened, local) = if item.size <= IN_MEMORY_MAX {
            let stored = match self.repo.get(&item.path).await {
                Ok(s) => s,
                // Gone since the listing (an earlier run's deletion): nothing to do.
                Err(RepositoryError::NotFound { .. }) => {
                    self.progress.step(item.size);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            (self.open(&item.path, stored)?, None)
        } else {
            let (sha256, head) = self.repo.sha256_of(&item.path, item.size).await?;
            if crypt::is_sealed(&head) && sorted(&crypt::header_recipients(&head)) == self.current {
                (Opened::Current, None)
            } else {
                let local = self.scratch.join("object");
                match self.repo.get_to_file_verified(&item.path, &local, &sha256).await {
                    Ok(_) => (Opened::Plain(Bytes::new()), Some(local)),
                    Err(RepositoryError::Crypt(CryptError::WrongKey { needed, .. } | CryptError::NoKey { needed, .. })) => (Opened::Refused(needed), None),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let plain = match opened {
            Opened::Current => {
                self.summary.current += 1;
                self.progress.step(item.size);
                return Ok(());
            }
            Opened::Refused(needed) => {
                self.summary.unopened.push((item.path.clone(), needed));
                self.progress.step(item.size);
                return Ok(());
            }
            Opened::Plain(plain) => plain,
        };
        let stored = match &local {
            Some(file) => {
                let stored = self.repo.put_file(&new, file).await;
                let _ = std::fs::remove_file(file);
                stored?
            }
            None => self.repo.put_object(&new, plain.clone()).await?,
        };
        self.confirm(&new, &stored).await?;
        if matches!(layout::parse(&new), Some(Object::History { .. })) {
            // Retention on the server reads the timelines' history from its plain copies.
            self.keep_plain_copy(&new, &plain)?;
        }
        self.summary.rewritten += 1;
        self.summary.rewritten_bytes += stored.size;
        self.progress.step(item.size);
        self.retire(std::slice::from_ref(&item.path)).await
    }

    /// The copy at `path` read back: its SHA-256 is what was written, its
    /// header names the current recipients. Until then the original stays.
    async fn confirm(&self, path: &str, stored: &Stored) -> Result<()> {
        let (sha256, head) = self.repo.sha256_of(path, stored.size).await?;
        if !sha256.eq_ignore_ascii_case(&stored.sha256) {
            bail!("{}: the copy {path}, read back, has the SHA-256 {sha256}, not {} as written: the original is kept; run `backup reencrypt` again", self.repo.display(), stored.sha256);
        }
        let sealed_to = sorted(&crypt::header_recipients(&head));
        if sealed_to != self.current {
            bail!(
                "{}: the copy {path} is encrypted to {}, not to the current recipients {}: the original is kept; was OMNI_ENCRYPT_* changed during the run? Run again",
                self.repo.display(),
                sealed_to.iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", "),
                self.current.iter().map(|k| crypt::short(k)).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(())
    }

    /// Deletes `old` (in order) when `OMNI_REPOSITORY_DELETE` allows; counts them kept otherwise.
    async fn retire(&mut self, old: &[String]) -> Result<()> {
        if !self.delete {
            self.summary.kept += old.len();
            return Ok(());
        }
        for path in old {
            self.repo.delete(path).await.with_context(|| format!("deleting {path}, whose copy is confirmed; run again to finish"))?;
            self.summary.deleted += 1;
        }
        Ok(())
    }

    /// The plain copy of a new manifest or history file, for the server
    /// (which cannot decrypt them), owned like the directory of plain copies.
    fn keep_plain_copy(&self, path: &str, plain: &[u8]) -> Result<()> {
        let Some(root) = &self.plain_root else { return Ok(()) };
        self.repo.keep_plain_copy(path, plain).with_context(|| format!("writing the plain copy of {path} under {}", root.display()))?;
        use std::os::unix::fs::MetadataExt;
        // OMNI_WAL_DIR's owner: the account the gateway's archive runs as.
        let Ok(owner) = std::fs::metadata(root.parent().unwrap_or(root)) else { return Ok(()) };
        let mut at = root.join(path);
        // The file and the directories made for it, up to the root, are the gateway's.
        while at.starts_with(root) {
            std::os::unix::fs::chown(&at, Some(owner.uid()), Some(owner.gid())).with_context(|| format!("giving {} to the gateway's account", at.display()))?;
            if !at.pop() {
                break;
            }
        }
        Ok(())
    }
}

/// An object's stored bytes, judged by [`Run::open`].
enum Opened {
    /// Sealed to the current recipients already.
    Current,
    /// Its content (for a big object read through a file: empty here).
    Plain(Bytes),
    /// The identity does not open it: the keys it needs.
    Refused(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1_200_000_000), "1.2 GB");
        assert_eq!(human(340_000), "340.0 kB");
        assert_eq!(human(12_345_678), "12.3 MB");
    }

    #[test]
    fn the_current_recipients_compare_in_any_order() {
        assert_eq!(sorted(&["b".into(), "a".into(), "b".into()]), vec!["a".to_string(), "b".to_string()]);
    }
}
