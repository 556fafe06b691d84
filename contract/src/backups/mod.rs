//! Backups (SPEC §6): `pg_dump` files in one directory, and restoring them.
//!
//! This module is the one code path for every way a backup is made or used:
//! the worker's HTTP API (`omni-api`'s `backup_routes`), the schedule
//! ([`schedule`]) and the operator CLI (`omni-gateway backup …`); both binaries
//! link this crate. Its invariants:
//!
//! * a client-given name is checked by [`name::is_valid`] before any file is
//!   touched, and a directory entry is used only if it is a regular file, not a
//!   symlink, opened with `O_NOFOLLOW`;
//! * one operation (create, restore, delete) at a time per directory, across
//!   processes: an `flock` on `.omni_backup.lock`, tried without waiting, so
//!   a second caller gets [`BackupError::Busy`] at once;
//! * a backup is written to `.omni_backup_….sql.partial`, fsynced, and given its
//!   name with a hard link, which fails rather than replace an existing file;
//!   a failed, cancelled or killed dump leaves only a hidden partial file,
//!   never listed and removed at the next start;
//! * a restore runs in one transaction with `ON_ERROR_STOP`, after checking
//!   that the file is a complete dump and taking a safety backup, so a failed
//!   restore leaves the database as it was and a successful one can be undone;
//! * a restore brings the schema forward in that same transaction: Omni's
//!   tables (`omni_*`) the dump does not hold are dropped first, and after
//!   the dump every migration it lacks is applied ([`migrate_forward`]), so a
//!   backup taken before an upgrade restores into a schema this worker (and
//!   its next start) can use; a backup made by a newer version, or by one
//!   whose migrations differ, is refused and rolled back;
//! * a safety backup (the one a restore or an import takes first) is marked
//!   with an empty `<name>.safety` file and listed with `kind: "safety"`;
//!   retention keeps the newest `OMNI_BACKUP_KEEP` ordinary backups and,
//!   separately, the newest `OMNI_BACKUP_KEEP` safety backups, so failed
//!   restores or imports never push scheduled backups out;
//! * with an off-site repository (the gateway's `OMNI_REPOSITORY_URL`, handed
//!   to the worker as `OMNI_BACKUP_REPOSITORY`), retention deletes no backup
//!   whose upload there is not confirmed: the gateway's shipper confirms one
//!   with `<name>.uploaded` beside it ([`mark_uploaded`], naming the
//!   repository), and runs retention again ([`Backups::prune`]) once it has,
//!   so what was kept waiting goes then. One rule, [`Backups::may_delete`],
//!   for every process that deletes;
//! * one restore (or import) at a time across every worker on the database:
//!   [`crate::leader::exclusive`], a session advisory lock, tried without
//!   waiting; a finished restore is announced on it, so every worker resets
//!   its connection pool;
//! * passwords reach `pg_dump`/`psql` through `PGPASSWORD`, never argv;
//! * every backup gets its sha256 recorded when made (`<name>.sha256`, the
//!   format of `sha256sum`), and a restore or download first checks it: a
//!   file that changed since is refused ([`BackupError::Changed`]). A backup
//!   without one (made before checksums were recorded, or named just before a
//!   crash) is trusted only if it is a complete dump: its sha256 is then
//!   recorded, with a warning, at the worker's start or when it is first
//!   opened; an incomplete one is refused ([`BackupError::Incomplete`]).
//! * a backup holds nothing of the gateway's replication relay (its
//!   publication, its schema `omni_relay`, its DDL capture's event trigger:
//!   [`RelayFilter`]), and a restore writes a mark first in its transaction
//!   ([`RECOPY_MARK`]): a relay decoding that transaction skips it and copies
//!   the restored database to its target anew, instead of replaying a dump
//!   statement by statement.
//! * with `OMNI_ENCRYPT_LOCAL` (the gateway hands the worker its
//!   `OMNI_ENCRYPT_*` recipients: public keys, nothing secret), a backup is
//!   sealed with age ([`crate::crypt`]) on its way from pg_dump to the disk:
//!   its partial file and its named file (`<name>.age`) hold only the
//!   encrypted dump, never a plain byte, and its `<name>.sha256` is the
//!   dump's, taken as it passed. It is the same backup by name (listed with
//!   `encrypted`, counted by retention, uploaded as it is); a download gives
//!   the encrypted file; a restore decrypts with `OMNI_DECRYPT_IDENTITY_FILE`
//!   and without it is refused before anything is touched
//!   ([`BackupError::IdentityNeeded`]), as is one whose key it is not.

pub mod name;
pub mod schedule;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Seek, SeekFrom},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{io::AsyncReadExt, process::Command};

use crate::crypt::{self, CryptError, EncryptSettings, Encryption, Keys, Sealer};
use crate::worker_settings::WorkerSettings;

/// A sealed backup's file: `<name>` + this.
pub const SEALED_SUFFIX: &str = ".age";

/// Name of the lock file that serializes operations, in the backup directory.
const LOCK_FILE: &str = ".omni_backup.lock";
/// pg_dump writes this line at the very end of a complete plain-format dump.
const COMPLETE_MARKER: &[u8] = b"-- PostgreSQL database dump complete";
/// How much of a failing tool's stderr is kept for the error message.
const STDERR_TAIL: usize = 4096;
/// How long a restore waits for a lock held by someone else before it rolls
/// back and tries again, instead of queueing behind (and in front of) the
/// worker's own requests.
const RESTORE_LOCK_TIMEOUT: &str = "10s";
const RESTORE_ATTEMPTS: usize = 3;
/// Run first in a restore's transaction: Omni's tables go, so those the dump
/// lacks (made by a later migration) do not survive beside its older schema.
/// The dump's own `DROP … IF EXISTS` then find nothing to drop; other tables
/// in the database are left as they are.
///
/// It first takes the migrations' advisory lock (`migrations.rs`' key, "omni"),
/// so a worker starting meanwhile waits and then finds the schema complete.
const DROP_OMNI_TABLES: &str = r"DO $omni$
DECLARE t regclass;
BEGIN
  PERFORM pg_advisory_xact_lock(1869442665);
  FOR t IN SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname LIKE 'omni\_%'
  LOOP
    EXECUTE format('DROP TABLE IF EXISTS %s CASCADE', t);
  END LOOP;
END
$omni$";

/// Written first in a restore's transaction: `omni_recopy` is the prefix the
/// gateway's relay (`gateway/src/relay/source.rs`, `RECOPY_PREFIX`)
/// reads as "skip this transaction, copy anew after it". Where the role may
/// not write logical messages (an external database), nothing is written:
/// no relay of this gateway reads that database.
const RECOPY_MARK: &str = r"DO $omni$
BEGIN
  PERFORM pg_logical_emit_message(true, 'omni_recopy', 'a logical backup is restored');
EXCEPTION WHEN insufficient_privilege THEN NULL;
END
$omni$";

/// The relay's event triggers (`gateway/src/relay/source.rs`: DDL
/// capture, drops, rewrites) are all named with this prefix.
const RELAY_EVENT_TRIGGER: &str = "omni_relay_";

/// Leaves the relay's event trigger out of a plain dump, line by line as
/// pg_dump writes it (its publication and schema are left out by pg_dump's
/// own switches; event triggers have none). A restored trigger would name a
/// function the dump does not hold, and dropping it in the restore would
/// stop the capture. Rows (`COPY … FROM stdin` up to `\.`) pass untouched.
#[derive(Default)]
struct RelayFilter {
    in_copy: bool,
    /// 1: the line closing the trigger's header comes; 2: its statements.
    skipping: u8,
}

impl RelayFilter {
    fn keep(&mut self, line: &[u8]) -> bool {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        if self.in_copy {
            self.in_copy = text != b"\\.";
            return true;
        }
        match self.skipping {
            1 => {
                self.skipping = 2;
                return false;
            }
            2 if !text.starts_with(b"--") => return false,
            _ => self.skipping = 0,
        }
        if text.starts_with(format!("DROP EVENT TRIGGER IF EXISTS {RELAY_EVENT_TRIGGER}").as_bytes()) {
            return false;
        }
        if text.starts_with(format!("-- Name: {RELAY_EVENT_TRIGGER}").as_bytes()) && text.windows(22).any(|w| w == b"; Type: EVENT TRIGGER;") {
            self.skipping = 1;
            return false;
        }
        self.in_copy = text.starts_with(b"COPY ") && text.ends_with(b" FROM stdin;");
        true
    }
}

/// What can go wrong, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("a backup file name looks like omni_backup_YYYYMMDD_HHMMSS.sql (pattern {})", name::PATTERN)]
    InvalidName,
    #[error("there is no backup called {0}; GET /api/v1/backup/list shows the ones there are")]
    NotFound(String),
    #[error("another backup operation is running; retry when it has finished")]
    Busy,
    #[error("a backup called {0} already exists and is never overwritten; retry in a second")]
    Exists(String),
    #[error("no space left on the backup disk ({0}): no backup was written and the database is untouched; free some space (delete old backups) and retry")]
    DiskFull(String),
    #[error("{0} is not a complete pg_dump backup (it may be truncated); nothing was restored and the database is unchanged")]
    Incomplete(String),
    #[error("{0} changed since it was made: its sha256 differs from the one recorded then ({0}.sha256). It was not used; restore another backup, or recover the file from a copy")]
    Changed(String),
    #[error("pg_dump failed, no backup was written: {0}")]
    DumpFailed(String),
    #[error("the restore failed and was rolled back; the database is unchanged: {0}")]
    RestoreFailed(String),
    #[error("{0}; no backup was written (OMNI_ENCRYPT_LOCAL: backups are written encrypted or not at all)")]
    Encryption(String),
    #[error("{name} is encrypted (OMNI_ENCRYPT_LOCAL) and cannot be read here: {reason}; nothing was restored and the database is unchanged")]
    IdentityNeeded { name: String, reason: String },
    #[error("cannot run {tool}: {source}; set PGSERVE_BIN_DIR to the directory holding pg_dump and psql")]
    ToolMissing { tool: String, source: io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl BackupError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> BackupError {
        let context = context.into();
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                BackupError::DiskFull(context)
            } else {
                BackupError::Io { context, source }
            }
        }
    }
}

pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// One backup file.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupInfo {
    /// `omni_backup_YYYYMMDD_HHMMSS.sql`
    #[cfg_attr(feature = "openapi", schema(pattern = r"^omni_backup_[0-9]{8}_[0-9]{6}\.sql$"))]
    pub filename: String,
    pub size_bytes: u64,
    /// When the backup was taken (UTC, RFC 3339), from its name.
    pub created_at: String,
    /// `backup` (made on request or by the schedule) or `safety` (taken by a
    /// restore or an import just before it changed the database). Each kind
    /// has its own retention of `OMNI_BACKUP_KEEP` files.
    pub kind: Kind,
    /// Kept encrypted with age (`OMNI_ENCRYPT_LOCAL`; the file is
    /// `<filename>.age`, `size_bytes` its size): a restore needs
    /// `OMNI_DECRYPT_IDENTITY_FILE`, a download gives the encrypted file.
    pub encrypted: bool,
}

/// Why a backup was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// On request (API, CLI) or by the schedule.
    Backup,
    /// By a restore or an import, of the database just before it.
    Safety,
}

/// A backup just written.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Created {
    pub backup_file: String,
    pub size_bytes: u64,
    /// When it was taken (UTC, RFC 3339).
    pub timestamp: String,
}

/// A restore that succeeded.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Restored {
    pub success: bool,
    /// The backup now in the database.
    pub restored: String,
    /// The backup of the database as it was just before, to undo this restore.
    pub safety_backup: String,
    pub message: String,
}

/// The backup service of one directory and one database.
#[derive(Debug, Clone)]
pub struct Backups {
    /// `OMNI_BACKUP_DIR`, created on first use.
    dir: PathBuf,
    /// Where `pg_dump` and `psql` are (`PGSERVE_BIN_DIR`); `PATH` when unset.
    bin_dir: Option<PathBuf>,
    /// The database to dump and restore (`DATABASE_URL`).
    database_url: String,
    /// Newest backups kept after each create; 0 keeps all (`OMNI_BACKUP_KEEP`).
    keep: usize,
    /// The off-site repository (its URL as shown) that must confirm a
    /// backup's upload before retention deletes it; `None`: no off-site copy.
    upload_to: Option<String>,
    /// `OMNI_ENCRYPT_LOCAL`: new backups are sealed to these recipients
    /// (read again for each backup); `None`: written plain.
    seal: Option<EncryptSettings>,
    /// What a restore of a sealed backup decrypts with.
    identity: Identity,
}

/// The private key restores of sealed backups decrypt with.
#[derive(Debug, Clone, Default)]
pub enum Identity {
    /// None here: a sealed backup is refused ([`BackupError::IdentityNeeded`]).
    #[default]
    None,
    /// `OMNI_DECRYPT_IDENTITY_FILE`, read when a restore needs it.
    File(PathBuf),
    /// Read already (the CLI reads it before it leaves root's account).
    Loaded(Arc<Keys>),
}

/// Held for the duration of one operation; dropping it releases the `flock`.
struct OperationLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// A partial file removed on drop unless it was given its name: a dump that
/// fails, or whose task is cancelled, leaves nothing behind.
struct Partial(Option<PathBuf>);

impl Partial {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("a partial file is named until it is dropped or kept")
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The keys the gateway handed this worker (`OMNI_DECRYPT_IDENTITY_FD`:
/// `OMNI_DECRYPT_IDENTITY_FILE` opened by the gateway, which its account
/// may not open), read once at start.
static HANDED_OVER: std::sync::OnceLock<Arc<Keys>> = std::sync::OnceLock::new();

/// Sets the keys restores of sealed backups decrypt with in this process,
/// when the worker's settings name an identity file ([`Backups::from_settings`]).
pub fn hand_over_identity(keys: Keys) {
    let _ = HANDED_OVER.set(Arc::new(keys));
}

impl Backups {
    pub fn new(dir: PathBuf, bin_dir: Option<PathBuf>, database_url: String, keep: usize) -> Backups {
        Backups { dir, bin_dir, database_url, keep, upload_to: None, seal: None, identity: Identity::None }
    }

    /// The same service, sealing new backups to `seal` (`OMNI_ENCRYPT_LOCAL`;
    /// `None`: plain) and restoring sealed ones with `identity`.
    pub fn sealed(mut self, seal: Option<EncryptSettings>, identity: Identity) -> Backups {
        self.seal = seal;
        self.identity = identity;
        self
    }

    /// The same service, whose retention keeps every backup whose upload to
    /// `repository` (its URL as shown) is not confirmed; `None`: no off-site copy.
    pub fn uploaded_to(mut self, repository: Option<String>) -> Backups {
        self.upload_to = repository;
        self
    }

    /// The worker's backup service, as its settings describe it.
    pub fn from_settings(settings: &WorkerSettings) -> Backups {
        Backups::new(settings.backup_dir.clone(), settings.pg_bin_dir.clone(), settings.database_url.clone(), settings.backup_keep)
            .uploaded_to(settings.backup_repository.clone())
            .sealed(settings.backup_encrypt.clone(), match (HANDED_OVER.get(), &settings.decrypt_identity_file) {
                (Some(keys), Some(_)) => Identity::Loaded(keys.clone()),
                (None, Some(path)) => Identity::File(path.clone()),
                (_, None) => Identity::None,
            })
    }

    /// The backup directory, created (mode 0700) if missing, canonical.
    fn dir(&self) -> Result<PathBuf> {
        if !self.dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(BackupError::io(format!("creating the backup directory {}", self.dir.display())))?;
        }
        fs::canonicalize(&self.dir).map_err(BackupError::io(format!("resolving the backup directory {}", self.dir.display())))
    }

    fn lock(&self, dir: &Path) -> Result<OperationLock> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .map_err(BackupError::io(format!("opening the lock file {}", path.display())))?;
        // A new open file description per call, so two operations in one
        // process exclude each other too.
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(locked) => Ok(OperationLock(locked)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(BackupError::Busy),
            Err((_, errno)) => Err(BackupError::io(format!("locking {}", path.display()))(io::Error::from(errno))),
        }
    }

    /// Removes partial files left by a dump that was killed, when no
    /// operation is running (a partial file of a running one is in use).
    pub fn remove_stale_partials(&self) -> Result<usize> {
        // No directory, no partials: do not create it just to look (memory
        // mode must leave nothing on disk).
        if !self.dir.is_dir() {
            return Ok(0);
        }
        let dir = self.dir()?;
        let _lock = self.lock(&dir)?;
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(BackupError::io(format!("reading {}", dir.display())))?.flatten() {
            let file_name = entry.file_name();
            let Some(text) = file_name.to_str() else { continue };
            if text.starts_with(".omni_backup_") && text.ends_with(".partial") && fs::remove_file(entry.path()).is_ok() {
                tracing::info!(file = text, "removed the partial file of an interrupted backup");
                removed += 1;
            }
        }
        // A crash between naming a backup and recording its sha256 leaves a
        // backup without one: judged now, while nothing else runs.
        for backup in list_in(&dir)? {
            if checksum_path(&dir, &backup.filename).exists() {
                continue;
            }
            // A sealed backup's sha256 is recorded before it is named; one
            // without (copied in by hand) is judged when a restore decrypts it.
            let Ok((file, size, false)) = open_existing(&dir, &backup.filename) else { continue };
            match check_complete(&file, size, &backup.filename) {
                Ok(()) => record_late_checksum(&dir, &backup.filename),
                Err(_) => tracing::warn!(
                    file = %backup.filename,
                    "this backup has no recorded sha256 and is not a complete dump: it will be refused for restore and download; delete it"
                ),
            }
        }
        Ok(removed)
    }

    /// Every backup, newest first.
    pub fn list(&self) -> Result<Vec<BackupInfo>> {
        let dir = self.dir()?;
        list_in(&dir)
    }

    /// When the newest backup was taken, from its name.
    pub fn newest_time(&self) -> Result<Option<SystemTime>> {
        Ok(self.list()?.iter().find_map(|b| name::time_of(&b.filename)))
    }

    /// Opens a backup for reading (a download): the file, its size, and
    /// whether it is sealed (`OMNI_ENCRYPT_LOCAL`: the file is then the
    /// encrypted `<name>.age`, which age authenticates when it is
    /// decrypted; without the key only its header can be checked here).
    pub fn open(&self, name: &str) -> Result<(File, u64, bool)> {
        if !name::is_valid(name) {
            return Err(BackupError::InvalidName);
        }
        let dir = self.dir()?;
        let (file, size, sealed) = open_existing(&dir, name)?;
        if sealed {
            if !crypt::is_sealed(&head_of(&file)) {
                return Err(BackupError::Changed(name.to_owned()));
            }
        } else if !check_checksum(&dir, name, &file)? {
            check_complete(&file, size, name)?;
            record_late_checksum(&dir, name);
        }
        Ok((file, size, sealed))
    }

    /// Takes a backup now.
    pub async fn create(&self) -> Result<Created> {
        let dir = self.dir()?;
        let _lock = self.lock(&dir)?;
        self.create_locked(&dir, Kind::Backup, None).await
    }

    /// Takes a safety backup now (an import's, before it writes): kept apart
    /// from the user's backups by retention.
    pub async fn create_safety(&self) -> Result<Created> {
        let dir = self.dir()?;
        let _lock = self.lock(&dir)?;
        self.create_locked(&dir, Kind::Safety, None).await
    }

    /// Deletes a backup.
    pub fn delete(&self, name: &str) -> Result<()> {
        if !name::is_valid(name) {
            return Err(BackupError::InvalidName);
        }
        let dir = self.dir()?;
        let _lock = self.lock(&dir)?;
        let (file, _, _) = open_existing(&dir, name)?;
        drop(file);
        remove_backup(&dir, name).map_err(BackupError::io(format!("deleting {name}")))?;
        remove_sidecars(&dir, name);
        sync_dir(&dir)?;
        tracing::info!(file = name, "deleted backup");
        Ok(())
    }

    /// Restores a backup over the current database, after a safety backup.
    pub async fn restore(&self, name: &str) -> Result<Restored> {
        if !name::is_valid(name) {
            return Err(BackupError::InvalidName);
        }
        let dir = self.dir()?;
        let _lock = self.lock(&dir)?;
        let (mut file, size, sealed) = open_existing(&dir, name)?;
        // A sealed backup: the key opens it, and the whole dump decrypted
        // is the one recorded, before anything is touched.
        let keys = if sealed {
            let keys = self.keys_for(name, &file)?;
            check_sealed(&dir, name, &file, &keys)?;
            Some(keys)
        } else {
            let checked = check_checksum(&dir, name, &file)?;
            check_complete(&file, size, name)?;
            if !checked {
                record_late_checksum(&dir, name);
            }
            None
        };
        // Other gateways' workers share the database, not this directory's lock.
        let cluster = crate::leader::exclusive(&self.database_url)
            .await
            .map_err(|e| BackupError::io("taking the database's restore lock (is PostgreSQL reachable?)")(io::Error::other(e)))?
            .ok_or(BackupError::Busy)?;
        let safety = self.create_locked(&dir, Kind::Safety, Some(name)).await?;
        let migrate = write_migrate_forward(&dir)?;
        tracing::info!(file = name, safety_backup = %safety.backup_file, "restoring");
        let mut attempt = 1;
        loop {
            file.seek(SeekFrom::Start(0)).map_err(BackupError::io(format!("reading {name}")))?;
            let input = file.try_clone().map_err(BackupError::io(format!("reading {name}")))?;
            let input = match &keys {
                Some(keys) => Input::Sealed(input, keys.clone(), name.to_owned()),
                None => Input::Plain(input),
            };
            match self.run_psql(input, migrate.path()).await {
                Ok(()) => break,
                Err(BackupError::RestoreFailed(message)) if attempt < RESTORE_ATTEMPTS && is_lock_conflict(&message) => {
                    tracing::warn!(attempt, %message, "restore rolled back on a lock conflict; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error),
            }
        }
        tracing::info!(file = name, "restored");
        cluster.announce_restored(name).await;
        cluster.release().await;
        Ok(Restored {
            success: true,
            restored: name.to_owned(),
            message: format!("restored {name}; the database as it was before is saved as {}", safety.backup_file),
            safety_backup: safety.backup_file,
        })
    }

    /// The keys that open the sealed backup `name` (`file`), checked on its
    /// header: none here, an unreadable identity file or another key is
    /// [`BackupError::IdentityNeeded`], naming the keys it needs.
    fn keys_for(&self, name: &str, file: &File) -> Result<Arc<Keys>> {
        let head = head_of(file);
        let needed: Vec<String> = crypt::header_recipients(&head).iter().map(|k| crypt::short(k)).collect();
        let needed = if needed.is_empty() { "keys it does not name".to_owned() } else { needed.join(", ") };
        let refused = |reason: String| BackupError::IdentityNeeded { name: name.to_owned(), reason };
        let keys = match &self.identity {
            Identity::None => {
                return Err(refused(format!(
                    "it is encrypted to {needed}; set OMNI_DECRYPT_IDENTITY_FILE to the file of its private key (age-keygen's key.txt) and restart the gateway, \
                     or restore it with omni-gateway backup restore --identity FILE"
                )))
            }
            Identity::File(path) => Arc::new(Keys::load(path, "OMNI_DECRYPT_IDENTITY_FILE").map_err(|e| refused(e.to_string()))?),
            Identity::Loaded(keys) => keys.clone(),
        };
        let opened = keys.open(head.as_slice(), name).map(drop);
        match opened {
            Ok(()) => Ok(keys),
            Err(CryptError::Damaged { .. }) => Err(BackupError::Changed(name.to_owned())),
            Err(e) => Err(refused(e.to_string())),
        }
    }

    /// The sealer for a new backup: `None` when backups are written plain;
    /// a setting that cannot be used is an error, never a plain backup.
    fn sealer(&self) -> Result<Option<Sealer>> {
        let Some(settings) = &self.seal else { return Ok(None) };
        let sealer = Encryption::from_settings(settings).and_then(|e| e.sealer()).map_err(|e| BackupError::Encryption(e.to_string()))?;
        if sealer.is_plain() {
            return Err(BackupError::Encryption(
                "OMNI_ENCRYPT_LOCAL is on and none of OMNI_ENCRYPT_RECIPIENTS, OMNI_ENCRYPT_RECIPIENTS_FILE, OMNI_ENCRYPT_PASSPHRASE_FILE is set".into(),
            ));
        }
        Ok(Some(sealer))
    }

    /// A backup while the operation lock is held; `protect` is a file that
    /// retention must not delete (the one about to be restored).
    async fn create_locked(&self, dir: &Path, kind: Kind, protect: Option<&str>) -> Result<Created> {
        // Before pg_dump starts: a recipients file gone bad stops here.
        let sealer = self.sealer()?;
        let sealed = sealer.is_some();
        // The final name is taken when the dump is complete (see below); the
        // partial file is named after the start time meanwhile.
        let partial_path = dir.join(format!(".{}.partial", name::for_time(SystemTime::now())));
        // We hold the lock, so a partial file of this name is a leftover.
        let _ = fs::remove_file(&partial_path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&partial_path)
            .map_err(BackupError::io(format!("creating {}", partial_path.display())))?;
        let mut partial = Partial(Some(partial_path.clone()));
        let sync_handle = file.try_clone().map_err(BackupError::io("duplicating the backup file handle"))?;

        // pg_dump's output goes into the file through the relay filter, a
        // line at a time: constant memory whatever the size of the database.
        let mut command = self.command("pg_dump")?;
        command.args(["--clean", "--if-exists", "--format=plain", "--no-password", "--no-publications", "--exclude-schema=omni_relay"]);
        let started = std::time::Instant::now();
        let (status, stderr, digest) = run_dump(command, file, sealer).await?;
        if !status.success() {
            if stderr.contains("No space left on device") {
                return Err(BackupError::DiskFull(format!("pg_dump writing into {}", dir.display())));
            }
            return Err(BackupError::DumpFailed(describe_failure(status, &stderr)));
        }
        tokio::task::spawn_blocking(move || sync_handle.sync_all())
            .await
            .map_err(|e| BackupError::io("syncing the backup file")(io::Error::other(e)))?
            .map_err(BackupError::io(format!("syncing the backup file in {}", dir.display())))?;
        // Named by completion time: a backup started in the same second as
        // an existing one (a restore's safety backup right after a create)
        // rarely has to wait for the next second.
        let (name, time) = free_name(dir).await?;
        let final_path = if sealed { sealed_path(dir, &name) } else { dir.join(&name) };
        // The kind is marked before the name exists, so a crash can leave a
        // stray marker (harmless, removed with its backup's name) but never
        // a safety backup counted as one of the user's.
        if kind == Kind::Safety {
            mark_safety(dir, &name)?;
        }
        // A sealed backup's sha256 (the dump's, taken as it passed) too:
        // without the key it could not be judged later.
        if let Some(digest) = &digest {
            if let Err(e) = write_checksum(dir, &name, digest) {
                remove_sidecars(dir, &name);
                return Err(e);
            }
        }
        // link(2) fails with EEXIST instead of replacing: never overwrite.
        match fs::hard_link(&partial_path, &final_path) {
            Ok(()) => {}
            Err(e) => {
                remove_sidecars(dir, &name);
                return Err(if e.kind() == io::ErrorKind::AlreadyExists {
                    BackupError::Exists(name)
                } else {
                    BackupError::io(format!("naming the backup {name}"))(e)
                });
            }
        }
        partial.0 = None;
        let _ = fs::remove_file(&partial_path);
        if let Err(e) = if sealed { Ok(()) } else { record_checksum(dir, &name) } {
            // A backup whose checksum could not be recorded is not kept.
            let _ = fs::remove_file(&final_path);
            remove_sidecars(dir, &name);
            return Err(e);
        }
        sync_dir(dir)?;
        let size_bytes = fs::symlink_metadata(&final_path).map(|m| m.len()).unwrap_or(0);
        tracing::info!(file = %name, ?kind, size_bytes, encrypted = sealed, elapsed_ms = started.elapsed().as_millis() as u64, "backup written");
        self.apply_retention(dir, protect);
        Ok(Created { backup_file: name, size_bytes, timestamp: name::rfc3339(time) })
    }

    /// Retention alone, outside a create: the gateway's shipper runs it once
    /// it confirmed uploads that retention kept waiting. [`BackupError::Busy`]
    /// while another operation runs (whose create applies retention itself).
    /// It never creates the lock file: its caller may run as another account
    /// than the worker's (the gateway as root), whose file it would then be;
    /// without one no backup was ever made here.
    pub fn prune(&self) -> Result<()> {
        if self.keep == 0 || !self.dir.join(LOCK_FILE).is_file() {
            return Ok(());
        }
        let dir = self.dir()?;
        let _lock = self.lock(&dir)?;
        self.apply_retention(&dir, None);
        Ok(())
    }

    /// Whether retention may delete the backup `name` of `dir`: always
    /// without an off-site repository; with one, only once its upload there
    /// is confirmed (`<name>.uploaded` naming that repository).
    pub fn may_delete(&self, dir: &Path, name: &str) -> bool {
        self.upload_to.as_deref().is_none_or(|repository| is_uploaded(dir, name, repository))
    }

    /// Keeps the newest `keep` backups of each kind: a restore's or an
    /// import's safety backups never push the user's own backups out. Older
    /// ones whose upload is not confirmed stay too ([`Backups::may_delete`]),
    /// said once per run; a later run deletes them once it is.
    fn apply_retention(&self, dir: &Path, protect: Option<&str>) {
        if self.keep == 0 {
            return;
        }
        let Ok(backups) = list_in(dir) else { return };
        let mut waiting = 0;
        for kind in [Kind::Backup, Kind::Safety] {
            let old = backups.iter().filter(|b| b.kind == kind).skip(self.keep).filter(|b| Some(b.filename.as_str()) != protect);
            for old in old {
                if !self.may_delete(dir, &old.filename) {
                    waiting += 1;
                    continue;
                }
                match remove_backup(dir, &old.filename) {
                    Ok(()) => {
                        remove_sidecars(dir, &old.filename);
                        tracing::info!(file = %old.filename, ?kind, keep = self.keep, "retention: deleted an old backup");
                    }
                    Err(error) => tracing::warn!(file = %old.filename, %error, "retention: could not delete an old backup"),
                }
            }
        }
        if let (true, Some(repository)) = (waiting > 0, &self.upload_to) {
            tracing::info!(
                kept = waiting,
                keep = self.keep,
                "retention: kept {waiting} backups past OMNI_BACKUP_KEEP={} because their upload to the off-site repository {repository} is not confirmed yet; they are deleted once it is",
                self.keep
            );
        }
        let _ = sync_dir(dir);
    }

    /// Replays a dump (`input`) and then the `migrate` script, in one transaction.
    async fn run_psql(&self, input: Input, migrate: &Path) -> Result<()> {
        let mut command = self.command("psql")?;
        command
            .args(["--no-psqlrc", "--quiet", "--no-password", "--single-transaction", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", RECOPY_MARK, "-c", DROP_OMNI_TABLES, "-f", "-", "-f"])
            .arg(migrate)
            .env("PGOPTIONS", format!("-c lock_timeout={RESTORE_LOCK_TIMEOUT} -c client_min_messages=warning"))
            .stdout(Stdio::null());
        let (status, stderr) = match input {
            Input::Plain(file) => {
                command.stdin(Stdio::from(file));
                run(command, "psql").await?
            }
            Input::Sealed(file, keys, name) => run_fed(command, file, &keys, &name).await?,
        };
        if status.success() {
            Ok(())
        } else {
            Err(BackupError::RestoreFailed(describe_failure(status, &stderr)))
        }
    }

    /// `pg_dump`/`psql` with the connection in `PG*` variables. Killed when
    /// dropped (a backup abandoned), and by the kernel when this process
    /// dies, even by `kill -9` (see [`crate::children`]; spawned by [`start`]).
    fn command(&self, tool: &str) -> Result<Command> {
        let program = match &self.bin_dir {
            Some(dir) => dir.join(tool),
            None => PathBuf::from(tool),
        };
        let mut command = Command::new(program);
        command.stdin(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        crate::children::die_with_parent(&mut command, libc::SIGKILL);
        for variable in ["PGSERVICE", "PGSERVICEFILE", "PGPASSFILE", "PGOPTIONS", "PGHOSTADDR"] {
            command.env_remove(variable);
        }
        command.envs(connection_env(&self.database_url)?);
        Ok(command)
    }
}

/// The psql script run after a dump, in the restore's transaction: refuses a
/// dump whose recorded migrations this build does not have (or has changed),
/// then applies, in order, each of [`migrations::MIGRATIONS`] the dump lacks
/// and records it, exactly as the worker's start would
/// ([`migrations::apply`]). After it the schema is this build's, so the
/// running workers and their next start find nothing to do.
///
/// [`migrations::MIGRATIONS`]: crate::migrations::MIGRATIONS
/// [`migrations::apply`]: crate::migrations::apply
pub fn migrate_forward() -> String {
    use crate::migrations::{checksum, MIGRATIONS};
    let known: Vec<String> = MIGRATIONS.iter().map(|m| format!("({}, '{}')", m.version, checksum(m.sql))).collect();
    // The dump changed the session (search_path = '', …): back to the
    // connection's defaults, which the worker's migrations run with.
    let mut script = String::from(
        "RESET ALL;
CREATE TABLE IF NOT EXISTS omni_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
",
    );
    script.push_str(&format!(
        "DO $omni$
DECLARE unknown text;
BEGIN
  SELECT string_agg(name, ', ' ORDER BY version) INTO unknown FROM omni_schema_migrations
  WHERE (version, checksum) NOT IN (VALUES {});
  IF unknown IS NOT NULL THEN
    RAISE EXCEPTION 'this backup was made by an omni-api with migrations this one does not have (%): restore it with that version, or restore another backup', unknown;
  END IF;
END
$omni$;
",
        known.join(", ")
    ));
    for m in MIGRATIONS {
        script.push_str(&format!(
            "SELECT NOT EXISTS (SELECT FROM omni_schema_migrations WHERE version = {version}) AS omni_pending \\gset
\\if :omni_pending
{sql}
;
INSERT INTO omni_schema_migrations (version, name, checksum) VALUES ({version}, '{name}', '{checksum}');
\\endif
",
            version = m.version,
            sql = m.sql,
            name = m.name,
            checksum = checksum(m.sql),
        ));
    }
    script
}

/// [`migrate_forward`] in a hidden file of the backup directory (psql reads
/// it with `-f`), removed on drop.
fn write_migrate_forward(dir: &Path) -> Result<Partial> {
    let path = dir.join(".omni_restore_migrate.sql");
    let _ = fs::remove_file(&path);
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o600).open(&path)?;
        io::Write::write_all(&mut file, migrate_forward().as_bytes())
    };
    write().map_err(BackupError::io(format!("writing {}", path.display())))?;
    Ok(Partial(Some(path)))
}

/// What a dump being sealed goes through on its way to the file: its
/// sha256, taken of the plain bytes, and age's writer, whose output
/// collects in `out` until it is written to the file.
struct Sealing {
    hasher: sha2::Sha256,
    writer: crypt::Sealed<Collected>,
    out: Collected,
}

/// What age's writer wrote, taken from it after each write.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<u8>>>);

impl Collected {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl io::Write for Collected {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sealing {
    /// `plain` hashed and encrypted: the bytes to write to the file.
    fn seal(&mut self, plain: &[u8]) -> io::Result<Vec<u8>> {
        use sha2::Digest;
        self.hasher.update(plain);
        io::Write::write_all(&mut self.writer, plain)?;
        Ok(self.out.take())
    }

    /// The last encrypted bytes, and the plain dump's sha256 (hex).
    fn finish(self) -> io::Result<(Vec<u8>, String)> {
        use sha2::Digest;
        self.writer.finish()?;
        Ok((self.out.take(), self.hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()))
    }
}

/// Runs `pg_dump`, its output written into `file` through [`RelayFilter`]
/// (and, with `sealer`, encrypted on its way: no plain byte reaches the
/// disk); returns its status, the tail of its stderr and, when sealed, the
/// sha256 of the plain dump.
async fn run_dump(mut command: Command, file: File, sealer: Option<Sealer>) -> Result<(std::process::ExitStatus, String, Option<String>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sealing = match sealer {
        Some(sealer) => {
            let out = Collected::default();
            let writer = sealer.wrap(out.clone()).map_err(|e| BackupError::Encryption(format!("starting the encryption ({e})")))?;
            Some(Sealing { hasher: <sha2::Sha256 as sha2::Digest>::new(), writer, out })
        }
        None => None,
    };
    command.stdout(Stdio::piped());
    let mut child = start(command, "pg_dump").await?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let copy = async move {
        // What pg_dump wrote is filtered a whole line at a time and reaches
        // the file as each read from the pipe is done: a dump that stalls
        // (or is killed) leaves all its complete lines in the partial file.
        let mut stdout = stdout;
        let mut file = tokio::fs::File::from_std(file);
        let mut filter = RelayFilter::default();
        let mut chunk = vec![0u8; 1 << 16];
        let (mut pending, mut out) = (Vec::new(), Vec::with_capacity(1 << 16));
        loop {
            let n = stdout.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(at) = pending[start..].iter().position(|&b| b == b'\n') {
                let line = &pending[start..start + at + 1];
                if filter.keep(line) {
                    out.extend_from_slice(line);
                }
                start += at + 1;
            }
            pending.drain(..start);
            match &mut sealing {
                Some(sealing) => file.write_all(&sealing.seal(&out)?).await?,
                None => file.write_all(&out).await?,
            }
            out.clear();
        }
        // A last line without its newline.
        if !pending.is_empty() && filter.keep(&pending) {
            match &mut sealing {
                Some(sealing) => file.write_all(&sealing.seal(&pending)?).await?,
                None => file.write_all(&pending).await?,
            }
        }
        let digest = match sealing {
            Some(sealing) => {
                let (last, digest) = sealing.finish()?;
                file.write_all(&last).await?;
                Some(digest)
            }
            None => None,
        };
        file.flush().await?;
        Ok::<_, io::Error>(digest)
    };
    let (waited, copied) = tokio::join!(wait(child, "pg_dump"), copy);
    let (status, stderr) = waited?;
    match copied {
        Ok(digest) => Ok((status, stderr, digest)),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(BackupError::DiskFull("writing pg_dump's output".into())),
        Err(e) if status.success() => Err(BackupError::io("writing pg_dump's output")(e)),
        Err(_) => Ok((status, stderr, None)),
    }
}

/// What a restore feeds psql: a plain dump, or a sealed one decrypted on
/// its way (`name` for messages).
enum Input {
    Plain(File),
    Sealed(File, Arc<Keys>, String),
}

/// Runs psql with the sealed dump `file` decrypted into its stdin. Should
/// the decryption fail half-way (the file changed since it was checked),
/// psql is killed before its stdin ends: it never reaches the end of its
/// script, so the transaction is rolled back, never committed half-restored.
async fn run_fed(mut command: Command, file: File, keys: &Keys, name: &str) -> Result<(std::process::ExitStatus, String)> {
    use std::io::Read;
    use tokio::io::AsyncWriteExt;
    command.stdin(Stdio::piped());
    let mut child = start(command, "psql").await?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let feed = async {
        let fed = async {
            let mut plain = keys.open(file, name).map_err(io::Error::other)?;
            let mut buffer = vec![0u8; 1 << 16];
            loop {
                let n = plain.read(&mut buffer)?;
                if n == 0 {
                    return Ok::<_, io::Error>(());
                }
                stdin.write_all(&buffer[..n]).await?;
            }
        }
        .await;
        if fed.is_err() {
            let _ = child.start_kill();
        }
        drop(stdin);
        fed
    };
    let (fed, tail) = tokio::join!(feed, stderr_tail(stderr));
    let status = child.wait().await.map_err(BackupError::io("waiting for psql"))?;
    let text = String::from_utf8_lossy(&tail[tail.len().saturating_sub(STDERR_TAIL)..]).trim().to_owned();
    match fed {
        // psql stopping early (an error in the dump) closes its stdin: its status says why.
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(BackupError::RestoreFailed(format!("{name} could not be decrypted ({e})"))),
        _ => Ok((status, text)),
    }
}

/// Runs a prepared command, returning its status and the tail of its stderr.
async fn run(command: Command, tool: &str) -> Result<(std::process::ExitStatus, String)> {
    let child = start(command, tool).await?;
    wait(child, tool).await
}

/// Forks a tool from the process's lasting thread, so its parent-death
/// signal fires when this process dies, not when the thread that asked ends.
async fn start(command: Command, tool: &str) -> Result<tokio::process::Child> {
    crate::children::spawn(command).await.map_err(|source| BackupError::ToolMissing { tool: tool.to_owned(), source })
}

/// What a tool writes to stderr until it closes it, its tail kept.
async fn stderr_tail(mut stderr: tokio::process::ChildStderr) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stderr.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buffer[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
    }
    tail
}

/// Waits for a spawned tool, collecting the tail of its stderr.
async fn wait(mut child: tokio::process::Child, tool: &str) -> Result<(std::process::ExitStatus, String)> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (status, tail) = tokio::join!(child.wait(), stderr_tail(stderr));
    let status = status.map_err(BackupError::io(format!("waiting for {tool}")))?;
    let text = String::from_utf8_lossy(&tail[tail.len().saturating_sub(STDERR_TAIL)..]).trim().to_owned();
    Ok((status, text))
}

fn describe_failure(status: std::process::ExitStatus, stderr: &str) -> String {
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error") || l.contains("ERROR") || l.contains("FATAL")).collect();
    let message = errors.first().copied().unwrap_or(last);
    if message.is_empty() {
        format!("exited with {status}")
    } else {
        format!("{message} ({status})")
    }
}

fn is_lock_conflict(message: &str) -> bool {
    message.contains("lock timeout") || message.contains("deadlock detected")
}

/// `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE` from a URL.
fn connection_env(url: &str) -> Result<Vec<(&'static str, OsString)>> {
    use std::os::unix::ffi::OsStringExt;
    use tokio_postgres::config::{Host, SslMode};
    let config: tokio_postgres::Config = url.parse().map_err(|e| BackupError::Io {
        context: "DATABASE_URL is not a valid PostgreSQL URL".into(),
        source: io::Error::other(e),
    })?;
    let mut env: Vec<(&'static str, OsString)> = vec![("PGAPPNAME", "omni-backup".into()), ("PGCONNECT_TIMEOUT", "10".into())];
    // Every host and port of a multi-host URL (libpq's comma lists), and
    // its target_session_attrs, so pg_dump and psql reach the primary too.
    let hosts: Vec<OsString> = config.get_hosts().iter().map(|h| match h {
        Host::Tcp(host) => OsString::from(host),
        Host::Unix(path) => path.clone().into_os_string(),
    }).collect();
    if !hosts.is_empty() {
        env.push(("PGHOST", hosts.join(std::ffi::OsStr::new(","))));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        env.push(("PGPORT", ports.join(",").into()));
    }
    if config.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::ReadWrite {
        env.push(("PGTARGETSESSIONATTRS", "read-write".into()));
    }
    if let Some(user) = config.get_user() {
        env.push(("PGUSER", user.into()));
    }
    if let Some(db) = config.get_dbname() {
        env.push(("PGDATABASE", db.into()));
    }
    if let Some(password) = config.get_password() {
        env.push(("PGPASSWORD", OsString::from_vec(password.to_vec())));
    }
    let mode = match config.get_ssl_mode() {
        SslMode::Disable => "disable",
        SslMode::Require => "require",
        _ => "prefer",
    };
    env.push(("PGSSLMODE", mode.into()));
    Ok(env)
}

/// Backups in `dir`, newest first: regular files with a valid name only,
/// plain or sealed (`<name>.age`: the same backup, `encrypted`; should
/// both be there, the plain one, which is the one opened).
fn list_in(dir: &Path) -> Result<Vec<BackupInfo>> {
    let mut backups: BTreeMap<String, BackupInfo> = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(BackupError::io(format!("reading {}", dir.display())))?.flatten() {
        let Ok(file_name) = entry.file_name().into_string() else { continue };
        let (backup, encrypted) = match file_name.strip_suffix(SEALED_SUFFIX) {
            Some(backup) => (backup.to_owned(), true),
            None => (file_name, false),
        };
        if !name::is_valid(&backup) || (encrypted && backups.contains_key(&backup)) {
            continue;
        }
        let Ok(metadata) = fs::symlink_metadata(entry.path()) else { continue };
        if !metadata.file_type().is_file() {
            continue;
        }
        let created = name::time_of(&backup).or_else(|| metadata.modified().ok()).unwrap_or(SystemTime::UNIX_EPOCH);
        let kind = if fs::symlink_metadata(safety_path(dir, &backup)).is_ok_and(|m| m.file_type().is_file()) { Kind::Safety } else { Kind::Backup };
        backups.insert(backup.clone(), BackupInfo { created_at: name::rfc3339(created), size_bytes: metadata.len(), filename: backup, kind, encrypted });
    }
    // Fixed-width timestamps: name order is time order.
    Ok(backups.into_values().rev().collect())
}

/// `<name>.age` beside the plain name: the backup sealed.
fn sealed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{SEALED_SUFFIX}"))
}

/// A backup's file, the plain one else the sealed one, if it is a regular file.
fn backup_file(dir: &Path, name: &str) -> io::Result<Option<(PathBuf, fs::Metadata, bool)>> {
    for (path, sealed) in [(dir.join(name), false), (sealed_path(dir, name), true)] {
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => return Ok(Some((path, m, sealed))),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Deletes a backup's file, plain and sealed alike.
fn remove_backup(dir: &Path, name: &str) -> io::Result<()> {
    let plain = fs::remove_file(dir.join(name));
    let sealed = fs::remove_file(sealed_path(dir, name));
    match (plain, sealed) {
        (Ok(()), _) | (_, Ok(())) => Ok(()),
        (Err(e), Err(_)) => Err(e),
    }
}

/// The first bytes of a file (an age header fits), from its start.
fn head_of(file: &File) -> Vec<u8> {
    let mut head = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut head, 0).unwrap_or(0);
    head.truncate(n);
    head
}

/// A sealed backup decrypted whole with `keys`: its sha256 is the one
/// recorded and it is a complete dump, or it is refused
/// ([`BackupError::Changed`]: age's authentication or the sha256 failed;
/// [`BackupError::Incomplete`]). Without a recorded sha256, a complete one
/// gets it now, as a plain backup would.
fn check_sealed(dir: &Path, name: &str, file: &File, keys: &Keys) -> Result<()> {
    use sha2::Digest;
    use std::io::Read;
    let mut input = file.try_clone().map_err(BackupError::io(format!("reading {name}")))?;
    input.seek(SeekFrom::Start(0)).map_err(BackupError::io(format!("reading {name}")))?;
    let changed = || BackupError::Changed(name.to_owned());
    let mut plain = keys.open(input, name).map_err(|_| changed())?;
    let (mut hasher, mut head, mut tail) = (sha2::Sha256::new(), Vec::new(), Vec::new());
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = plain.read(&mut buffer).map_err(|e| {
            tracing::error!(file = name, error = %e, "an encrypted backup does not decrypt whole: refused");
            changed()
        })?;
        if n == 0 {
            break;
        }
        let bytes = &buffer[..n];
        hasher.update(bytes);
        if head.len() < 64 {
            head.extend_from_slice(&bytes[..bytes.len().min(64 - head.len())]);
        }
        tail.extend_from_slice(bytes);
        tail.drain(..tail.len().saturating_sub(512));
    }
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    match recorded_checksum(dir, name)? {
        Some(recorded) if recorded != actual => {
            tracing::error!(file = name, recorded = %recorded, actual = %actual, "backup changed since it was made: refused");
            Err(changed())
        }
        Some(_) => is_complete(&head, &tail).then_some(()).ok_or_else(|| BackupError::Incomplete(name.to_owned())),
        None => {
            if !is_complete(&head, &tail) {
                return Err(BackupError::Incomplete(name.to_owned()));
            }
            match write_checksum(dir, name, &actual).and_then(|()| sync_dir(dir)) {
                Ok(()) => tracing::warn!(file = name, "this encrypted backup had no recorded sha256; it decrypts to a complete dump, so its sha256 was recorded now"),
                Err(error) => tracing::warn!(file = name, %error, "this encrypted backup has no recorded sha256 and it could not be recorded now"),
            }
            Ok(())
        }
    }
}

/// Opens the backup `name` of `dir` for reading if it is a regular file
/// (not a symlink): `dir/name`, else its sealed `dir/name.age`. Returns the
/// file, its size and whether it is the sealed one.
fn open_existing(dir: &Path, name: &str) -> Result<(File, u64, bool)> {
    if !name::is_valid(name) {
        return Err(BackupError::InvalidName);
    }
    let not_found = || BackupError::NotFound(name.to_owned());
    let (path, sealed) = match backup_file(dir, name) {
        Ok(Some((path, _, sealed))) => (path, sealed),
        Ok(None) => return Err(not_found()),
        Err(e) => return Err(BackupError::io(format!("reading {name}"))(e)),
    };
    // O_NOFOLLOW: an entry swapped for a symlink since the check is refused.
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) {
            not_found()
        } else {
            BackupError::io(format!("opening {name}"))(e)
        }
    })?;
    let metadata = file.metadata().map_err(BackupError::io(format!("reading {name}")))?;
    if !metadata.file_type().is_file() {
        return Err(not_found());
    }
    Ok((file, metadata.len(), sealed))
}

/// Whether a dump's first bytes and last 512 are those of a complete one.
fn is_complete(head: &[u8], tail: &[u8]) -> bool {
    head.starts_with(b"--\n-- PostgreSQL database dump") && tail.windows(COMPLETE_MARKER.len()).any(|w| w == COMPLETE_MARKER)
}

/// A dump ends with pg_dump's completion comment; a truncated one does not.
fn check_complete(file: &File, size: u64, name: &str) -> Result<()> {
    let mut head = [0u8; 64];
    let head_len = file.read_at(&mut head, 0).unwrap_or(0);
    let tail_len = size.min(512);
    let mut tail = vec![0u8; tail_len as usize];
    let complete = file.read_exact_at(&mut tail, size - tail_len).is_ok() && is_complete(&head[..head_len], &tail);
    if complete {
        Ok(())
    } else {
        Err(BackupError::Incomplete(name.to_owned()))
    }
}

/// The name for a backup taken now; if a backup of this second exists, the
/// next second's (waiting for it), so names never collide.
async fn free_name(dir: &Path) -> Result<(String, SystemTime)> {
    for _ in 0..3 {
        let now = SystemTime::now();
        let name = name::for_time(now);
        if fs::symlink_metadata(dir.join(&name)).is_err() && fs::symlink_metadata(sealed_path(dir, &name)).is_err() {
            return Ok((name, now));
        }
        let into_second = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        tokio::time::sleep(Duration::from_nanos(1_000_000_000 - u64::from(into_second)) + Duration::from_millis(5)).await;
    }
    Err(BackupError::Exists(name::for_time(SystemTime::now())))
}

/// `<name>.sha256` beside the backup.
fn checksum_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sha256"))
}

/// The sha256 of `file`, read from its start, as lowercase hex.
fn sha256_of(mut file: &File) -> io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `<name>.sha256` (temporary file, fsync, rename) for the backup just named.
fn record_checksum(dir: &Path, name: &str) -> Result<()> {
    let (file, _, _) = open_existing(dir, name)?;
    let digest = sha256_of(&file).map_err(BackupError::io(format!("reading {name} for its sha256")))?;
    write_checksum(dir, name, &digest)
}

/// Writes `<name>.sha256` saying `digest`, in the format of `sha256sum`
/// (for a sealed backup, the decrypted dump's: `age -d … > <name>`, then
/// `sha256sum -c <name>.sha256`).
fn write_checksum(dir: &Path, name: &str, digest: &str) -> Result<()> {
    write_sidecar(dir, &checksum_path(dir, name), &format!("{digest}  {name}\n"), None).map_err(BackupError::io(format!("recording the sha256 of {name}")))
}

/// The sha256 recorded in `<name>.sha256`, lowercase hex; `None` when there is none.
fn recorded_checksum(dir: &Path, name: &str) -> Result<Option<String>> {
    match fs::read_to_string(checksum_path(dir, name)) {
        Ok(text) => Ok(Some(text.split_whitespace().next().unwrap_or_default().to_ascii_lowercase())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackupError::io(format!("reading {name}.sha256"))(e)),
    }
}

/// Writes the file `path` beside a backup in `dir` whole or not at all:
/// through `.<file>.partial` (which `remove_stale_partials` clears after a
/// crash), flushed, then renamed; `owner`: given to that uid and gid.
fn write_sidecar(dir: &Path, path: &Path, text: &str, owner: Option<(u32, u32)>) -> io::Result<()> {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file}.partial"));
    let write = || -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o600).open(&tmp)?;
        io::Write::write_all(&mut f, text.as_bytes())?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Refuses a backup whose content no longer matches its recorded sha256.
/// `Ok(false)`: no sha256 was recorded, so the file could not be checked (the
/// caller then requires a complete dump, see the module documentation).
fn check_checksum(dir: &Path, name: &str, file: &File) -> Result<bool> {
    let Some(recorded) = recorded_checksum(dir, name)? else { return Ok(false) };
    let actual = sha256_of(file).map_err(BackupError::io(format!("reading {name} for its sha256")))?;
    if actual != recorded {
        tracing::error!(file = name, recorded = %recorded, actual = %actual, "backup changed since it was made: refused");
        return Err(BackupError::Changed(name.to_owned()));
    }
    Ok(true)
}

/// Records the sha256 of a complete backup that had none, saying so: from
/// now on a change is detected, but nothing proves the file is as it was made.
fn record_late_checksum(dir: &Path, name: &str) {
    match record_checksum(dir, name).and_then(|()| sync_dir(dir)) {
        Ok(()) => tracing::warn!(
            file = name,
            "this backup had no recorded sha256 (made before checksums were, or named just before a crash); \
             it is a complete dump, so its sha256 was recorded now: later changes are detected, earlier ones cannot be"
        ),
        Err(error) => tracing::warn!(file = name, %error, "this backup has no recorded sha256 and it could not be recorded now"),
    }
}

/// `<name>.safety` beside a safety backup.
fn safety_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.safety"))
}

/// Marks `name` as a safety backup (an empty file, fsynced with the directory later).
fn mark_safety(dir: &Path, name: &str) -> Result<()> {
    let path = safety_path(dir, name);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)
        .map(drop)
        .map_err(BackupError::io(format!("marking {name} as a safety backup")))
}

/// `<name>.uploaded` beside a backup: the off-site repository that confirmed its upload.
fn uploaded_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.uploaded"))
}

/// Whether `<name>.uploaded` names `repository` (a mark of another
/// repository, from before `OMNI_REPOSITORY_URL` changed, does not count).
fn is_uploaded(dir: &Path, name: &str, repository: &str) -> bool {
    let Ok(file) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(uploaded_path(dir, name)) else { return false };
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(file, 4096), &mut text).is_ok() && text.trim_end() == repository
}

/// Records that the backup `name` of `dir` is confirmed in the off-site
/// `repository` (its URL as shown): `<name>.uploaded`, written to a
/// temporary file and renamed, owned like the backup (the gateway's shipper
/// writes it as root; the worker's retention removes it with the backup).
/// `Ok(false)`: already recorded, or `name` is no backup of this directory.
pub fn mark_uploaded(dir: &Path, name: &str, repository: &str) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    if !name::is_valid(name) || is_uploaded(dir, name, repository) {
        return Ok(false);
    }
    let Some((_, backup, _)) = backup_file(dir, name)? else { return Ok(false) };
    write_sidecar(dir, &uploaded_path(dir, name), &format!("{repository}\n"), Some((backup.uid(), backup.gid())))?;
    // Deleted meanwhile (by retention or by hand): its mark goes with it.
    if backup_file(dir, name)?.is_none() {
        let _ = fs::remove_file(uploaded_path(dir, name));
        return Ok(false);
    }
    Ok(true)
}

/// Removes what lies beside a backup: its sha256, its kind marker and its
/// off-site confirmation.
fn remove_sidecars(dir: &Path, name: &str) {
    let _ = fs::remove_file(checksum_path(dir, name));
    let _ = fs::remove_file(safety_path(dir, name));
    let _ = fs::remove_file(uploaded_path(dir, name));
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(BackupError::io(format!("syncing {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with `n` backups (oldest first, each with its `.sha256`) and the lock file.
    fn directory_with_backups(n: usize) -> (PathBuf, Vec<String>) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("omni-backups-test-{}-{id}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LOCK_FILE), b"").unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("omni_backup_20261205_10000{i}.sql")).collect();
        for name in &names {
            fs::write(dir.join(name), b"-- dump\n").unwrap();
            fs::write(checksum_path(&dir, name), format!("x  {name}\n")).unwrap();
        }
        (dir, names)
    }

    #[test]
    fn retention_keeps_what_the_repository_has_not_confirmed_and_deletes_it_once_it_has() {
        let (dir, names) = directory_with_backups(3);
        let repo = "s3://bucket/omni";
        let backups = Backups::new(dir.clone(), None, String::new(), 1).uploaded_to(Some(repo.into()));
        backups.prune().unwrap();
        assert!(names.iter().all(|n| dir.join(n).is_file()), "nothing confirmed: all kept");

        // Confirmed in another repository (OMNI_REPOSITORY_URL changed): still kept.
        assert!(mark_uploaded(&dir, &names[0], "s3://old-bucket").unwrap());
        backups.prune().unwrap();
        assert!(dir.join(&names[0]).is_file(), "a mark of another repository does not count");

        assert!(mark_uploaded(&dir, &names[0], repo).unwrap());
        assert!(!mark_uploaded(&dir, &names[0], repo).unwrap(), "marked once");
        assert!(!mark_uploaded(&dir, "../etc/passwd", repo).unwrap(), "only a backup's name");
        assert!(!mark_uploaded(&dir, "omni_backup_20261205_100009.sql", repo).unwrap(), "only a backup that is there");
        assert!(!uploaded_path(&dir, "omni_backup_20261205_100009.sql").exists());
        backups.prune().unwrap();
        assert!(!dir.join(&names[0]).exists(), "confirmed: deleted by the next retention");
        assert!(!checksum_path(&dir, &names[0]).exists() && !uploaded_path(&dir, &names[0]).exists(), "its sidecars go with it");
        assert!(dir.join(&names[1]).is_file() && dir.join(&names[2]).is_file());

        // Both confirmed: only the newest stays.
        mark_uploaded(&dir, &names[1], repo).unwrap();
        mark_uploaded(&dir, &names[2], repo).unwrap();
        backups.prune().unwrap();
        let mut left: Vec<String> = fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
        left.sort();
        assert_eq!(left, vec![names[2].clone(), format!("{}.sha256", names[2]), format!("{}.uploaded", names[2])]);

        // Without a repository the rule is OMNI_BACKUP_KEEP alone.
        let plain = Backups::new(dir.clone(), None, String::new(), 1);
        assert!(plain.may_delete(&dir, "omni_backup_20261205_100009.sql"));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A complete dump as pg_dump writes one.
    const DUMP: &str = "--\n-- PostgreSQL database dump\n--\n\nCREATE TABLE t (v text);\n\n--\n-- PostgreSQL database dump complete\n--\n";

    #[tokio::test]
    async fn sealed_backups_are_the_same_backups_and_open_only_with_their_key() {
        use sha2::Digest;
        let (dir, names) = directory_with_backups(0);
        let identity = age::x25519::Identity::generate();
        let settings = EncryptSettings { recipients: Some(identity.to_public().to_string()), ..Default::default() };
        let sealer = Encryption::from_settings(&settings).unwrap().sealer().unwrap();
        assert!(names.is_empty());
        let names: Vec<String> = (0..3).map(|i| format!("omni_backup_20261205_10000{i}.sql")).collect();
        let digest: String = sha2::Sha256::digest(DUMP.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        for name in &names {
            fs::write(sealed_path(&dir, name), sealer.seal(DUMP.as_bytes(), name).unwrap()).unwrap();
            write_checksum(&dir, name, &digest).unwrap();
        }
        let repo = "file:///bucket";
        let backups = Backups::new(dir.clone(), None, "postgres://nobody@127.0.0.1:1/none".into(), 2).uploaded_to(Some(repo.into()));
        let listed = backups.list().unwrap();
        assert_eq!(listed.iter().map(|b| b.filename.as_str()).collect::<Vec<_>>(), vec![names[2].as_str(), names[1].as_str(), names[0].as_str()]);
        assert!(listed.iter().all(|b| b.encrypted && b.kind == Kind::Backup && b.size_bytes > DUMP.len() as u64));
        let (_, _, sealed) = backups.open(&names[2]).unwrap();
        assert!(sealed, "a download gives the sealed file");

        // Confirmed off-site, then deleted by retention, sidecars and all.
        backups.prune().unwrap();
        assert!(sealed_path(&dir, &names[0]).is_file(), "kept until its upload is confirmed");
        assert!(mark_uploaded(&dir, &names[0], repo).unwrap());
        backups.prune().unwrap();
        assert!(!sealed_path(&dir, &names[0]).exists() && !checksum_path(&dir, &names[0]).exists() && !uploaded_path(&dir, &names[0]).exists());

        // Without the identity, or with another key: refused naming the variable and the key.
        for (with, keys) in [("no identity", Identity::None), ("another key", Identity::Loaded(Arc::new(keys_file(&dir, &age::x25519::Identity::generate()))))] {
            let err = backups.clone().sealed(None, keys).restore(&names[2]).await.unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, BackupError::IdentityNeeded { .. }), "{with}: {text}");
            assert!(text.contains(&crypt::short(&identity.to_public().to_string())) && text.contains("unchanged"), "{with}: {text}");
        }
        let err = backups.clone().sealed(None, Identity::File(dir.join("absent.txt"))).restore(&names[2]).await.unwrap_err().to_string();
        assert!(err.contains("OMNI_DECRYPT_IDENTITY_FILE") && err.contains("absent.txt"), "{err}");
        let err = backups.restore(&names[2]).await.unwrap_err().to_string();
        assert!(err.contains("OMNI_DECRYPT_IDENTITY_FILE"), "{err}");

        // With it: the whole dump is checked against its sha256 first.
        let keys = keys_file(&dir, &identity);
        let (file, _, _) = open_existing(&dir, &names[2]).unwrap();
        check_sealed(&dir, &names[2], &file, &keys).unwrap();
        write_checksum(&dir, &names[2], &"0".repeat(64)).unwrap();
        assert!(matches!(check_sealed(&dir, &names[2], &file, &keys), Err(BackupError::Changed(_))));
        // A byte changed in the encrypted data: age's authentication refuses it.
        write_checksum(&dir, &names[1], &digest).unwrap();
        let mut bytes = fs::read(sealed_path(&dir, &names[1])).unwrap();
        let last = bytes.len() - 20;
        bytes[last] ^= 1;
        fs::write(sealed_path(&dir, &names[1]), bytes).unwrap();
        let (file, _, _) = open_existing(&dir, &names[1]).unwrap();
        assert!(matches!(check_sealed(&dir, &names[1], &file, &keys), Err(BackupError::Changed(_))));
        // No recorded sha256: a complete dump gets it now.
        fs::write(sealed_path(&dir, &names[1]), sealer.seal(DUMP.as_bytes(), "x").unwrap()).unwrap();
        fs::remove_file(checksum_path(&dir, &names[1])).unwrap();
        let (file, _, _) = open_existing(&dir, &names[1]).unwrap();
        check_sealed(&dir, &names[1], &file, &keys).unwrap();
        assert_eq!(fs::read_to_string(checksum_path(&dir, &names[1])).unwrap(), format!("{digest}  {}\n", names[1]));

        // A backup is refused, never written plain, when the recipients cannot be read.
        let bad = Backups::new(dir.clone(), None, String::new(), 2).sealed(Some(EncryptSettings { recipients_file: Some(dir.join("gone.txt")), ..Default::default() }), Identity::None);
        let err = bad.create().await.unwrap_err().to_string();
        assert!(err.contains("OMNI_ENCRYPT_RECIPIENTS_FILE") && err.contains("no backup was written"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    fn keys_file(dir: &Path, identity: &age::x25519::Identity) -> Keys {
        use age::secrecy::ExposeSecret;
        let path = dir.join(format!("key-{}.txt", &identity.to_public().to_string()[4..12]));
        fs::write(&path, format!("{}\n", identity.to_string().expose_secret())).unwrap();
        Keys::load(&path, "OMNI_DECRYPT_IDENTITY_FILE").unwrap()
    }

    #[test]
    fn prune_never_creates_the_lock_file() {
        let (dir, names) = directory_with_backups(2);
        fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        Backups::new(dir.clone(), None, String::new(), 1).prune().unwrap();
        assert!(!dir.join(LOCK_FILE).exists() && dir.join(&names[0]).is_file());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_relays_event_triggers_are_left_out_and_rows_pass_untouched() {
        let dump = "DROP EVENT TRIGGER IF EXISTS omni_relay_note_drop;
DROP EVENT TRIGGER IF EXISTS omni_relay_capture_ddl;
DROP TABLE IF EXISTS public.items;
--
-- Name: items; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.items (id integer, v text);

COPY public.items (id, v) FROM stdin;
1\t-- Name: omni_relay_capture_ddl; Type: EVENT TRIGGER;
2\tDROP EVENT TRIGGER IF EXISTS omni_relay_capture_ddl;
\\.


--
-- Name: omni_relay_capture_ddl; Type: EVENT TRIGGER; Schema: -; Owner: postgres
--

CREATE EVENT TRIGGER omni_relay_capture_ddl ON ddl_command_end
   EXECUTE FUNCTION omni_relay.capture_ddl();


ALTER EVENT TRIGGER omni_relay_capture_ddl OWNER TO postgres;

--
-- Name: omni_relay_note_drop; Type: EVENT TRIGGER; Schema: -; Owner: postgres
--

CREATE EVENT TRIGGER omni_relay_note_drop ON sql_drop
   EXECUTE FUNCTION omni_relay.note_drop();


ALTER EVENT TRIGGER omni_relay_note_drop OWNER TO postgres;

--
-- Name: mine; Type: EVENT TRIGGER; Schema: -; Owner: postgres
--

CREATE EVENT TRIGGER mine ON ddl_command_end
   EXECUTE FUNCTION public.mine();

--
-- PostgreSQL database dump complete
--
";
        let mut filter = RelayFilter::default();
        let kept: String = dump.split_inclusive('\n').filter(|l| filter.keep(l.as_bytes())).collect();
        assert!(!kept.contains("CREATE EVENT TRIGGER omni_relay") && !kept.contains("ALTER EVENT TRIGGER omni_relay"), "{kept}");
        assert!(!kept.starts_with("DROP EVENT TRIGGER"), "{kept}");
        assert!(kept.contains("1\t-- Name: omni_relay_capture_ddl; Type: EVENT TRIGGER;\n2\tDROP EVENT TRIGGER IF EXISTS omni_relay_capture_ddl;\n\\.\n"), "rows are data, never filtered: {kept}");
        assert!(kept.contains("CREATE EVENT TRIGGER mine ON ddl_command_end\n   EXECUTE FUNCTION public.mine();"), "{kept}");
        assert!(kept.ends_with("--\n-- PostgreSQL database dump complete\n--\n"), "{kept}");
    }
}
