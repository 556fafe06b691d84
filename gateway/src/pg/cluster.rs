//! The embedded cluster: its directory, credentials, and the checks that run
//! before `postgres` may start on it.
//!
//! Safety rules this module keeps (SPEC §3):
//! * a persistent data directory is never deleted, whatever state it is in;
//! * a new cluster is created only in a missing or empty directory, and never
//!   with `PGSERVE_REQUIRE_EXISTING`;
//! * a `postmaster.pid` of a live PostgreSQL on this directory is never
//!   touched: the start is refused. A stale one (dead pid, or a pid reused by
//!   an unrelated process) is removed;
//! * a cluster of an older major is upgraded in place (`upgrade.rs`) or, with
//!   `PGSERVE_AUTO_UPGRADE=false`, refused with upgrade instructions; a newer one is refused;
//! * the superuser password is random, kept in a 0600 file next to the cluster;
//! * everything here runs under the cluster's lock (`lock.rs`), taken by the
//!   caller; the files next to the cluster are read only when they are the
//!   gateway's own ([`check_trusted`]) and written through new temporary files.
//!
//! Memory mode lives in tmpfs and is copied from a cached pristine template
//! cluster, which is what makes it faster than running `initdb`.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::distributions::{Alphanumeric, DistString};
use tracing::Level;
use tokio_util::sync::CancellationToken;

use super::binaries::Binaries;
use super::pidfile;
use crate::process::child::{self, ChildSpec, Output};
use crate::config::{EmbeddedConfig, Origin};
use crate::process::privilege::{self, Account};
use crate::supervise::shutdown;

/// The database the API worker uses.
pub const APP_DATABASE: &str = "omni";
/// The superuser initdb creates.
pub const SUPERUSER: &str = "postgres";
/// What PostgreSQL puts before each log line; `process/child.rs` reads the severity after it.
const LOG_LINE_PREFIX: &str = "[%p] ";
/// Prefix of memory-mode cluster directories in tmpfs; the gateway's pid follows.
const MEMORY_PREFIX: &str = "omni-gateway-mem-";

/// A cluster ready to be started (and restarted) by the supervisor.
#[derive(Debug)]
pub struct Cluster {
    pub binaries: Binaries,
    pub data_dir: PathBuf,
    pub port: u16,
    pub password: String,
    /// Private directory for the Unix socket (short path, mode 0700).
    pub socket_dir: PathBuf,
    pub account: Account,
    pub memory_mode: bool,
    /// A new persistent cluster is written by `initdb --no-sync` and flushed
    /// by `initdb --sync-only` running beside the first start; this is that
    /// flush, awaited before PostgreSQL is first reported ready.
    pub durable: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<()>>>>,
    /// Whether the app database exists: from the start for an existing
    /// cluster or a copy of the memory-mode template, once created for a new
    /// one. The worker may connect as soon as it is true and PostgreSQL
    /// accepts connections.
    pub app_database: tokio::sync::watch::Sender<bool>,
    /// `PGSERVE_REPLICATION_MAX_WAL_MB` when the replication relay runs:
    /// `wal_level=logical` and the slot's WAL cap are added to the server's settings.
    pub replication_wal_mb: Option<u64>,
    /// More `-c name=value` server settings, added by features that need
    /// them (the WAL streamer: `pitr::server_settings`).
    pub extra_settings: Vec<String>,
}

impl Cluster {
    /// Connection URL for `database` over loopback TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}", self.password, self.port)
    }

    /// tokio-postgres connection settings for health checks.
    pub fn pg_config(&self, database: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname(database)
            .application_name("omni-gateway")
            .connect_timeout(std::time::Duration::from_secs(2));
        c
    }

    /// How to run `postgres` on this cluster; called for every (re)start.
    pub fn postgres_spec(&self) -> ChildSpec {
        let mut spec = ChildSpec::new("postgres", self.binaries.postgres())
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.socket_dir)
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg("unix_socket_permissions=0700")
            // The gateway's log line carries the time and the level; PostgreSQL's
            // prefix keeps only the process id, which tells backends apart.
            .arg("-c")
            .arg(format!("log_line_prefix={LOG_LINE_PREFIX}"));
        spec.output = Output::Postgres { routine: Level::INFO };
        if self.memory_mode {
            // The cluster is thrown away at exit; durability buys nothing.
            for setting in ["fsync=off", "synchronous_commit=off", "full_page_writes=off"] {
                spec = spec.arg("-c").arg(setting);
            }
        } else if cfg!(target_os = "linux") && self.binaries.major >= 14 {
            // After a crash, PostgreSQL first flushes the whole data directory.
            // The default opens and fsyncs each of its ~1000 files (over a
            // second on a busy disk, most of a restart after kill -9); syncfs
            // flushes the same data in one call. Same durability (Linux 5.8+
            // also reports write errors from syncfs, as it does for fsync).
            spec = spec.arg("-c").arg("recovery_init_sync_method=syncfs");
        }
        for setting in &self.extra_settings {
            spec = spec.arg("-c").arg(setting);
        }
        if let Some(mb) = self.replication_wal_mb {
            for setting in super::slots::logical_settings(mb) {
                spec = spec.arg("-c").arg(setting);
            }
        }
        spec.run_as = self.account.run_as();
        // Immediate shutdown of the whole cluster if the gateway vanishes.
        spec.death_signal = nix::sys::signal::Signal::SIGQUIT;
        spec.env_remove = ["PGDATA", "PGPORT", "PGHOST"].iter().map(Into::into).collect();
        spec
    }

    /// Checks that must pass before every start of `postgres`.
    pub fn preflight(&self) -> Result<()> {
        pidfile::clear_stale(&self.data_dir)?;
        check_port_free(self.port)
    }

    /// Removes what exists only for this run: the socket directory, and in
    /// memory mode the whole cluster.
    pub fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.socket_dir);
        if self.memory_mode {
            if let Err(e) = std::fs::remove_dir_all(&self.data_dir) {
                tracing::warn!("could not remove memory-mode cluster {}: {e}", self.data_dir.display());
            }
            let _ = std::fs::remove_file(password_file(&self.data_dir));
        }
    }
}

/// `<data_dir>.password`, next to the cluster rather than inside it, so a
/// copy of the data directory does not carry the credential.
pub fn password_file(data_dir: &Path) -> PathBuf {
    sibling(data_dir, ".password")
}

/// `<data_dir><suffix>` in the same directory: where the files that belong
/// to a cluster but not inside it live (password, upgrade state, kept copies).
pub fn sibling(data_dir: &Path, suffix: &str) -> PathBuf {
    let mut name = data_dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    data_dir.with_file_name(name)
}

/// Flushes the directory holding `path`, so a file created, renamed or
/// removed there stays so after a power loss.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("/"),
    };
    std::fs::File::open(parent)?.sync_all()
}

/// `<data_dir>.creating`, next to the cluster from before `initdb` until the
/// new cluster is on disk. Found by a start, it means an earlier start
/// stopped midway (kill -9, power loss, a container stopped during its first
/// second): what it left holds nothing of the user's (the stack serves only
/// once the cluster is on disk) and no start could use it (no password file,
/// a half-written cluster), so it is removed and made again.
pub fn creating_marker(data_dir: &Path) -> PathBuf {
    sibling(data_dir, ".creating")
}

/// Removes what an interrupted creation left (see [`creating_marker`]).
/// The caller holds the cluster's lock (`lock.rs`), so no other gateway can
/// be creating it now: the marker alone says the creation was interrupted.
/// A marker the gateway did not write (a link, another owner, writable by
/// others) is refused, and nothing is removed.
fn recover_interrupted_creation(dir: &Path) -> Result<()> {
    let marker = creating_marker(dir);
    if read_trusted(&marker)?.is_none() {
        return Ok(());
    }
    if dir.exists() {
        pidfile::clear_stale(dir)?;
    }
    tracing::warn!(
        "a start stopped while it was creating the cluster at {} (it was not on disk yet, and held no data): removing what it wrote and creating it again",
        dir.display()
    );
    if let Ok(entries) = std::fs::read_dir(dir) {
        // The directory itself stays: it may be a mount point.
        for entry in entries {
            let path = entry?.path();
            let removed = if path.is_dir() && !path.is_symlink() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("could not remove {}", path.display()))?;
        }
    }
    remove_durably(&password_file(dir))?;
    remove_durably(&marker)
}

/// Checks that `file`, opened from `path` with `O_NOFOLLOW`, is one the
/// gateway may act on: a regular file with a single link, owned by root or
/// by the gateway's own account, and writable by nobody else. The files
/// beside the data directory (state files, markers, the password file, the
/// lock file) sit where the API worker's account may add files
/// (`privilege::prepare_settings_file`), and PostgreSQL's superuser can
/// write files as that account (`COPY … TO`): one planted there must not
/// steer what the gateway, often root, removes or renames.
pub fn check_trusted(file: &std::fs::File, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().with_context(|| format!("reading {}", path.display()))?;
    let euid = nix::unistd::Uid::effective().as_raw();
    let problem = if !meta.is_file() {
        Some("is not a regular file".to_string())
    } else if meta.uid() != euid && meta.uid() != 0 {
        Some(format!("belongs to uid {}, not to root or to the gateway's account (uid {euid})", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!("is writable by group or others (mode {:o})", meta.mode() & 0o7777))
    } else if meta.nlink() != 1 {
        Some(format!("has {} hard links", meta.nlink()))
    } else {
        None
    };
    if let Some(problem) = problem {
        bail!(
            "{} {problem}; the gateway acts only on files beside the data directory that it wrote itself, so nothing was done.              Something that can write {} (the database superuser, or the API worker's account) may have planted it: inspect it, then remove it (`rm {}`) and start again",
            path.display(),
            path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
            path.display()
        );
    }
    Ok(())
}

/// Reads a file beside the data directory the gateway wrote itself: `None`
/// when missing; refused (see [`check_trusted`]) when it is a symbolic link
/// or anyone else's.
pub fn read_trusted(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let mut file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link; the gateway follows no link beside the data directory that it did not make, so nothing was done.              Something that can write {} (the database superuser, or the API worker's account) may have planted it: inspect it, remove it (`rm {}`) and start again",
            path.display(),
            path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    check_trusted(&file, path)?;
    let mut text = String::new();
    file.read_to_string(&mut text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text))
}

/// A state file beside the data directory (`<data_dir>.upgrade.json`,
/// `<data_dir>.restore.json`): read only when it is the gateway's own
/// ([`read_trusted`]), parsed, and trusted only when every directory it
/// names is the one `what` (an upgrade, a restore) of `data_dir` would use
/// (`paths`: field, found, wanted). A start renames and deletes those
/// directories on its word, so anything else is refused before anything is
/// touched.
pub fn read_state_file<T: serde::de::DeserializeOwned>(
    path: &Path,
    data_dir: &Path,
    what: &str,
    paths: impl FnOnce(&T) -> Vec<(&'static str, PathBuf, PathBuf)>,
) -> Result<Option<T>> {
    let Some(text) = read_trusted(path)? else { return Ok(None) };
    let state: T = serde_json::from_str(&text).with_context(|| {
        format!("{} is not a valid state file of {what}; it records {what} of {}: inspect it, and remove it only once the data directory is known to be right", path.display(), data_dir.display())
    })?;
    for (field, found, wanted) in paths(&state) {
        if found != wanted {
            bail!(
                "{} names {field} {}, but {what} of {} uses {}; the file was not written for this cluster, so nothing was done. \
                 Inspect it: if PGSERVE_DATA_DIR changed since, set it back; otherwise remove the file (`rm {}`) and start again",
                path.display(),
                found.display(),
                data_dir.display(),
                wanted.display(),
                path.display()
            );
        }
    }
    Ok(Some(state))
}

/// The cluster's superuser password, from its file (see [`password_file`]),
/// refused when the file is not the gateway's own (see [`check_trusted`]).
pub fn read_password(data_dir: &Path) -> Result<Option<String>> {
    Ok(read_trusted(&password_file(data_dir))?.map(|text| text.trim().to_string()))
}

/// Creates `path` anew (`O_EXCL`, `O_NOFOLLOW`, mode 0600): never an
/// existing file, never through a link.
pub(crate) fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// A name for a temporary file beside `path`, unique to this write.
pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".tmp-{}-{}", std::process::id(), Alphanumeric.sample_string(&mut rand::thread_rng(), 8)));
    path.with_file_name(name)
}

/// Removes `path` (gone already is fine) and makes the removal durable.
fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("could not remove {}", path.display())),
        _ => {}
    }
    sync_dir(path).with_context(|| format!("could not flush the directory of {}", path.display()))
}

/// Brings a cluster to the point where `postgres` can start: finds or creates
/// it, checks version, ownership and pid file, and picks the port.
/// What the features above ask of the cluster they run on.
pub struct Needs {
    /// Finishes or undoes what a feature left half-done on the data
    /// directory (a point-in-time restore's journal: `pitr/restore.rs`),
    /// before the cluster is looked at. The caller holds the data directory's
    /// lock. It stops at its next step once `stop` is cancelled.
    pub resume: fn(&Path, &Account, &CancellationToken) -> Result<()>,
    /// `PGSERVE_REPLICATION_MAX_WAL_MB` when the relay runs: the cluster then
    /// needs `wal_level=logical` (the relay keeps this cap on its slot itself).
    /// `None`: the relay's slots are removed before PostgreSQL starts ([`super::slots`]).
    pub logical_wal_mb: Option<u64>,
    /// Cancelled when a stop is asked during the preparation: a major
    /// upgrade, a restore's resume or a first initdb then ends at its next
    /// safe step with [`Stopped`](crate::supervise::shutdown::Stopped),
    /// leaving what the next start finishes or undoes.
    pub stop: CancellationToken,
}

pub async fn prepare(cfg: &EmbeddedConfig, binaries: Binaries, needs: Needs) -> Result<Cluster> {
    let account = privilege::postgres_account(&cfg.run_as)?;
    if account.switch {
        tracing::info!("running as root: PostgreSQL will run as user {} (uid {})", account.name, account.uid);
    }
    let port = match cfg.port.value {
        0 => pick_free_port()?,
        p => p,
    };
    let socket_dir = make_socket_dir(&account)?;
    let (data_dir, password, needs_sync) = if cfg.memory_mode {
        let (dir, pw) = prepare_memory(&binaries, &account).await?;
        (dir, pw, false)
    } else {
        prepare_persistent(cfg, &binaries, &account, &needs).await?
    };
    let durable = needs_sync.then(|| {
        let (binaries, dir, account) = (binaries.clone(), data_dir.clone(), account.clone());
        tokio::spawn(async move {
            sync_cluster(&binaries, &dir, &account).await?;
            // On disk: a start that stops from now on leaves a usable cluster.
            remove_durably(&creating_marker(&dir))
        })
    });
    let cluster = Cluster {
        binaries,
        data_dir,
        port,
        password,
        socket_dir,
        account,
        memory_mode: cfg.memory_mode,
        durable: tokio::sync::Mutex::new(durable),
        // Only a cluster initialised by this start lacks it.
        app_database: tokio::sync::watch::Sender::new(!needs_sync),
        replication_wal_mb: needs.logical_wal_mb,
        extra_settings: Vec::new(),
    };
    if let Err(e) = check_port_free(port) {
        cluster.cleanup();
        return Err(e);
    }
    Ok(cluster)
}

/// Returns the directory, the password, and whether the files still need flushing to disk.
async fn prepare_persistent(cfg: &EmbeddedConfig, binaries: &Binaries, account: &Account, needs: &Needs) -> Result<(PathBuf, String, bool)> {
    let dir = &cfg.data_dir.value;
    let origin = match cfg.data_dir.origin {
        Origin::Default => "default; set PGSERVE_DATA_DIR to change".to_string(),
        o => format!("PGSERVE_DATA_DIR from {o}"),
    };
    tracing::info!("data directory: {} ({origin})", dir.display());
    // An upgrade interrupted by a crash is finished or undone first: the
    // data directory may be missing for the instant between two renames.
    super::upgrade::recover(dir).await?;
    // So is a point-in-time restore (pitr/restore.rs, its journal).
    shutdown::check(&needs.stop, "resuming an interrupted point-in-time restore")?;
    (needs.resume)(dir, account, &needs.stop)?;
    recover_interrupted_creation(dir)?;
    let has_cluster = dir.join("PG_VERSION").is_file();
    let pw_file = password_file(dir);
    if has_cluster {
        // An older major is upgraded here (PGSERVE_AUTO_UPGRADE); anything
        // else that does not match is refused by check_version below.
        super::upgrade::before_start(cfg, dir, binaries, account, &needs.stop).await?;
        check_version(dir, binaries)?;
        pidfile::clear_stale(dir)?;
        // A relay slot left by a run with PGSERVE_REPLICATION_URL would stop
        // PostgreSQL from starting without wal_level=logical (relay/mod.rs).
        if needs.logical_wal_mb.is_none() {
            super::slots::drop_slots_offline(dir, "PGSERVE_REPLICATION_URL is not set")?;
        }
        privilege::check_reachable(dir, account).context("PGSERVE_DATA_DIR")?;
        // Walking a cluster's thousand files costs milliseconds on every
        // start; it is needed when the cluster came from elsewhere (a copy
        // made as root, a volume from an image with another account), which
        // shows on its top-level files. A lone stray file deeper down is
        // reported by PostgreSQL itself, naming the file.
        if account.switch && !privilege::owns_all(&[dir, &dir.join("PG_VERSION"), &dir.join("global"), &dir.join("global/pg_control"), &dir.join("base"), &dir.join("pg_wal")], account) {
            tracing::info!("giving {} to user {}", dir.display(), account.name);
            privilege::chown_tree(dir, account)?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("could not set mode 0700 on {}", dir.display()))?;
        let password = read_password(dir)?.with_context(|| {
            format!(
                "the cluster at {} exists but its password file {} is missing. Restore the file, \
                 or reset the password (`ALTER USER postgres PASSWORD '…'`) and write it there with mode 0600",
                dir.display(),
                pw_file.display()
            )
        })?;
        return Ok((dir.clone(), password, false));
    }
    if cfg.require_existing {
        bail!(
            "PGSERVE_REQUIRE_EXISTING is set and {} holds no PostgreSQL cluster (no PG_VERSION file). \
             Point PGSERVE_DATA_DIR at the existing cluster (the working directory is {}), or unset PGSERVE_REQUIRE_EXISTING to create a new one",
            dir.display(),
            std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default()
        );
    }
    if dir.exists() && std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_some() {
        bail!(
            "{} is not empty but holds no PostgreSQL cluster (no PG_VERSION file); refusing to touch it. \
             Point PGSERVE_DATA_DIR at an empty or missing directory, or at an existing cluster",
            dir.display()
        );
    }
    shutdown::check(&needs.stop, "initdb of a new cluster")?;
    let started = Instant::now();
    tracing::info!("initializing a new PostgreSQL {} cluster at {}", binaries.major, dir.display());
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
    }
    // Until the new cluster is on disk, a stop (kill -9, power loss) leaves
    // something no start could use; the marker tells the next start so.
    let marker = creating_marker(dir);
    write_secret(&marker, &std::process::id().to_string())?;
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(dir).with_context(|| format!("could not create {}", dir.display()))?;
    privilege::check_reachable(dir, account).context("PGSERVE_DATA_DIR")?;
    privilege::chown_tree(dir, account)?;
    let password = random_password();
    run_initdb(binaries, dir, &password, account, true, &[]).await?;
    write_secret(&pw_file, &password)?;
    tracing::info!("cluster initialized in {} ms (flushing it to disk while PostgreSQL starts)", started.elapsed().as_millis());
    Ok((dir.clone(), password, true))
}

async fn prepare_memory(binaries: &Binaries, account: &Account) -> Result<(PathBuf, String)> {
    let base = tmpfs_base();
    remove_memory_leftovers(&base);
    let dir = base.join(format!("{MEMORY_PREFIX}{}", std::process::id()));
    let (template, password) = ensure_template(binaries, account).await?;
    let started = Instant::now();
    copy_tree(&template, &dir, account.run_as()).with_context(|| format!("could not copy the template cluster into {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    write_secret(&password_file(&dir), &password)?;
    tracing::info!("memory mode: throw-away cluster at {} (copied from template in {} ms)", dir.display(), started.elapsed().as_millis());
    Ok((dir, password))
}

/// Where memory-mode clusters live: tmpfs where Linux has one.
fn tmpfs_base() -> PathBuf {
    #[cfg(target_os = "linux")]
    {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            return shm.to_path_buf();
        }
    }
    std::env::temp_dir()
}

/// Deletes memory-mode clusters whose gateway is gone (a crash or `kill -9`
/// leaves them behind). Only directories with our prefix and a dead or foreign
/// owner pid are touched.
fn remove_memory_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(MEMORY_PREFIX).and_then(|rest| rest.trim_end_matches(".password").parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == std::process::id() || is_omni_gateway(pid) {
            continue;
        }
        tracing::info!("removing memory-mode leftovers of an earlier run: {}", entry.path().display());
        let path = entry.path();
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}

fn is_omni_gateway(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("omni-gateway"))
        .unwrap_or(false)
}

/// A pristine cluster (with the app database) cached per PostgreSQL build, so
/// memory mode copies instead of running `initdb` every time. Layout:
/// `<cache>/template-<version>/{cluster/, password}`, built elsewhere and
/// published by one atomic rename, so concurrent gateways never see half of one.
async fn ensure_template(binaries: &Binaries, account: &Account) -> Result<(PathBuf, String)> {
    let cache = super::binaries::cache_dir();
    let number = binaries.version.split_whitespace().find(|w| w.starts_with(|c: char| c.is_ascii_digit())).unwrap_or("unknown");
    let key: String = number.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '.').collect();
    // The suffixes tell templates built before clusters got data checksums
    // and small WAL segments apart, so those are not reused.
    // The schema's fingerprint too: a build with other migrations bakes its own.
    let template = cache.join(format!("template-pg{key}-checksums-wal1-schema-{}", omni_contract::migrations::fingerprint()));
    if let Ok(password) = std::fs::read_to_string(template.join("password")) {
        if template.join("cluster/PG_VERSION").is_file() {
            return Ok((template.join("cluster"), password.trim().to_string()));
        }
    }
    tracing::info!("memory mode: building a template cluster once at {} (later starts copy it)", template.display());
    // 0711: PostgreSQL (another user when the gateway is root) must traverse it.
    std::fs::DirBuilder::new().mode(0o711).recursive(true).create(&cache).with_context(|| format!("could not create cache dir {}", cache.display()))?;
    let work = cache.join(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::DirBuilder::new().mode(0o711).create(&work)?;
    let cluster = work.join("cluster");
    std::fs::DirBuilder::new().mode(0o700).create(&cluster)?;
    privilege::check_reachable(&cluster, account)?;
    privilege::chown_tree(&cluster, account)?;
    let password = random_password();
    // 1 MB WAL segments instead of 16: the segment initdb preallocates is
    // copied at every memory-mode start, and a throw-away cluster never
    // archives WAL, where the segment size would matter.
    run_initdb(binaries, &cluster, &password, account, true, &["--wal-segsize=1"]).await?;
    create_app_database_offline(binaries, &cluster, account).await?;
    apply_migrations_offline(binaries, &cluster, &password, account).await?;
    write_secret(&work.join("password"), &password)?;
    if std::fs::rename(&work, &template).is_err() {
        // Another gateway published first; use its template.
        let _ = std::fs::remove_dir_all(&work);
        let password = std::fs::read_to_string(template.join("password")).context("reading the template cluster's password")?;
        return Ok((template.join("cluster"), password.trim().to_string()));
    }
    Ok((template.join("cluster"), password))
}


/// Applies the schema (`omni_contract::migrations`, the worker's own code and
/// files) to the template, so every memory-mode start copies a cluster whose
/// schema is in place and the worker's start finds nothing to do. Runs a
/// postmaster that listens on a Unix socket in a private directory only: no
/// TCP port is taken, nothing else can reach it.
async fn apply_migrations_offline(binaries: &Binaries, dir: &Path, password: &str, account: &Account) -> Result<()> {
    let socket_dir = std::env::temp_dir().join(format!("omni-template-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&socket_dir);
    std::fs::DirBuilder::new().mode(0o700).create(&socket_dir).with_context(|| format!("creating {}", socket_dir.display()))?;
    privilege::chown_tree(&socket_dir, account)?;
    let mut spec = ChildSpec::new("postgres (template)", binaries.postgres())
        .arg("-D")
        .arg(dir)
        .arg("-k")
        .arg(&socket_dir)
        .arg("-c")
        .arg("listen_addresses=")
        .arg("-c")
        .arg("fsync=off")
        .arg("-c")
        .arg(format!("log_line_prefix={LOG_LINE_PREFIX}"));
    spec.output = Output::Postgres { routine: Level::DEBUG };
    spec.run_as = account.run_as();
    let mut server = child::spawn(spec).await.context("could not start postgres on the template")?;
    let pid = server.id().context("the template's postgres has no pid")?;
    let applied = async {
        let pid_file = dir.join("postmaster.pid");
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while super::postmaster_status(&pid_file, pid) != super::PostmasterStatus::Accepting {
            if let Some(status) = server.try_wait()? {
                bail!("postgres exited ({status}) while starting on the template; its output is in the log above");
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections on the template within 60 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut config = tokio_postgres::Config::new();
        config.host_path(&socket_dir).user(SUPERUSER).password(password).dbname(APP_DATABASE).application_name("omni-gateway template");
        let mut client = super::connect(&config).await.context("connecting to the template")?;
        let applied = omni_contract::migrations::apply(&mut client).await?;
        tracing::info!(?applied, "memory mode: schema applied to the template");
        Ok(())
    }
    .await;
    child::signal_group(pid, nix::sys::signal::Signal::SIGINT);
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), server.wait()).await;
    if !matches!(stopped, Ok(Ok(status)) if status.success()) {
        child::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = server.wait().await;
        child::forget(pid);
        let _ = std::fs::remove_dir_all(&socket_dir);
        applied?;
        bail!("postgres on the template did not stop cleanly; the template is not used");
    }
    child::forget(pid);
    let _ = std::fs::remove_dir_all(&socket_dir);
    applied
}

/// Creates the app database in a template by running `postgres --single`,
/// which needs no port and no connection; the statement comes on stdin.
async fn create_app_database_offline(binaries: &Binaries, dir: &Path, account: &Account) -> Result<()> {
    let sql_path = dir.with_file_name(format!(".create-db-{}.sql", std::process::id()));
    std::fs::write(&sql_path, format!("CREATE DATABASE {APP_DATABASE};\n")).with_context(|| format!("writing {}", sql_path.display()))?;
    let sql = std::fs::File::open(&sql_path);
    let _ = std::fs::remove_file(&sql_path);
    let mut spec = ChildSpec::new("postgres --single", binaries.postgres())
        .arg("--single")
        .arg("-D")
        .arg(dir)
        .arg("-c")
        .arg(format!("log_line_prefix={LOG_LINE_PREFIX}"))
        .arg("postgres");
    // Its banner and prompts are chatter; errors still stand out.
    spec.output = Output::Postgres { routine: Level::DEBUG };
    spec.run_as = account.run_as();
    spec.stdin = Some(sql.context("reading back the CREATE DATABASE statement")?);
    let status = child::run(spec).await.context("could not run postgres --single")?;
    if !status.success() {
        bail!("creating the app database in the template failed ({status}); the output of postgres --single is in the log above");
    }
    Ok(())
}

/// Runs `initdb`: UTF-8, scram passwords for every connection, superuser
/// `postgres`, data checksums on (so corruption on disk is reported, not
/// read back as data; the cost is a checksum per page read from or written to disk).
async fn run_initdb(binaries: &Binaries, dir: &Path, password: &str, account: &Account, no_sync: bool, extra: &[&str]) -> Result<()> {
    // initdb reads the password from a file it can open as the target user.
    // A new name each time, created with O_EXCL|O_NOFOLLOW and handed over
    // by descriptor: nothing planted beside the data directory is followed.
    let pw_tmp = temp_beside(&dir.with_file_name(".initdb-pw"));
    {
        let mut f = create_private(&pw_tmp).with_context(|| format!("could not create {}", pw_tmp.display()))?;
        f.write_all(password.as_bytes()).with_context(|| format!("could not write {}", pw_tmp.display()))?;
        if account.switch {
            std::os::unix::fs::fchown(&f, Some(account.uid), Some(account.gid)).with_context(|| format!("could not give {} to user {}", pw_tmp.display(), account.name))?;
        }
    }
    let mut spec = ChildSpec::new("initdb", binaries.initdb())
        .arg("-D")
        .arg(dir)
        .arg("--username")
        .arg(SUPERUSER)
        .arg("--encoding=UTF8")
        .arg("--locale=C")
        .arg("--auth=scram-sha-256")
        .arg("--data-checksums")
        .arg(format!("--pwfile={}", pw_tmp.display()));
    // Its progress report is for debugging; the caller logs one line with the outcome.
    spec.output = Output::Text { routine: Level::DEBUG };
    if no_sync {
        spec = spec.arg("--no-sync");
    }
    spec.args.extend(extra.iter().map(Into::into));
    spec.run_as = account.run_as();
    spec.env_remove = vec!["PGDATA".into()];
    let status = child::run(spec).await;
    let _ = std::fs::remove_file(&pw_tmp);
    let status = status.context("could not run initdb")?;
    if !status.success() {
        bail!("initdb failed ({status}); its error is in the log above (LOG_LEVEL=debug shows all of its output). The directory {} was left as it is for inspection; the next start removes it and tries again", dir.display());
    }
    Ok(())
}

/// Flushes a cluster written with `initdb --no-sync` to disk: one
/// `syncfs(2)` of its filesystem, what PostgreSQL itself does with
/// `recovery_init_sync_method=syncfs` (and `initdb --sync-method=syncfs`
/// from 16 on), rather than an fsync of each of its thousand files. A new
/// cluster has no tablespace and its `pg_wal` inside: one filesystem holds
/// it all. Where `syncfs` is missing or fails, `initdb --sync-only` does it
/// file by file. (Linux before 5.8 does not report a failed write-back
/// through `syncfs`; PostgreSQL documents the same of its option.)
async fn sync_cluster(binaries: &Binaries, dir: &Path, account: &Account) -> Result<()> {
    let started = Instant::now();
    #[cfg(target_os = "linux")]
    {
        let target = dir.to_path_buf();
        let synced = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::fd::AsRawFd;
            let handle = std::fs::File::open(&target)?;
            nix::unistd::syncfs(handle.as_raw_fd()).map_err(std::io::Error::from)
        })
        .await
        .context("the syncfs task failed")?;
        match synced {
            Ok(()) => {
                tracing::info!("new cluster flushed to disk in {} ms (syncfs)", started.elapsed().as_millis());
                return Ok(());
            }
            Err(e) => tracing::debug!("syncfs on {} failed ({e}); flushing file by file with initdb --sync-only", dir.display()),
        }
    }
    let mut spec = ChildSpec::new("initdb --sync-only", binaries.initdb()).arg("--sync-only").arg("-D").arg(dir);
    spec.output = Output::Text { routine: Level::DEBUG };
    spec.run_as = account.run_as();
    spec.env_remove = vec!["PGDATA".into()];
    let status = child::run(spec).await.context("could not run initdb --sync-only")?;
    if !status.success() {
        bail!("flushing the new cluster to disk failed (initdb --sync-only); see its output above");
    }
    tracing::info!("new cluster flushed to disk in {} ms", started.elapsed().as_millis());
    Ok(())
}

/// Compares the cluster's `PG_VERSION` with the binaries' major version.
pub fn check_version(dir: &Path, binaries: &Binaries) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("PG_VERSION")).with_context(|| format!("reading {}/PG_VERSION", dir.display()))?;
    let cluster_major: u32 = text.trim().split('.').next().unwrap_or("").parse().with_context(|| format!("{}/PG_VERSION holds {:?}, not a version", dir.display(), text.trim()))?;
    if cluster_major > binaries.major {
        bail!(
            "the cluster at {dir} was created by PostgreSQL {cluster_major}, newer than the binaries in {bin} (PostgreSQL {major}); nothing was changed. \
             A cluster cannot be downgraded: install PostgreSQL {cluster_major} (for example `apt-get install postgresql-{cluster_major}`) and set PGSERVE_BIN_DIR to its bin directory",
            dir = dir.display(),
            bin = binaries.dir.display(),
            major = binaries.major,
        );
    }
    if cluster_major != binaries.major {
        bail!(
            "the cluster at {dir} was created by PostgreSQL {cluster_major}, but the binaries in {bin} are PostgreSQL {major}; nothing was changed. \
             Either set PGSERVE_BIN_DIR to PostgreSQL {cluster_major} binaries, or upgrade the cluster: \
             back it up (`pg_dumpall` with the old binaries), or run `pg_upgrade --old-bindir <PostgreSQL {cluster_major} bin> --new-bindir {bin} --old-datadir {dir} --new-datadir <new dir>` and point PGSERVE_DATA_DIR at the new directory",
            dir = dir.display(),
            bin = binaries.dir.display(),
            major = binaries.major,
        );
    }
    Ok(())
}

/// Fails with a message naming `PGSERVE_PORT` when the port is taken.
pub fn check_port_free(port: u16) -> Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "port {port} on 127.0.0.1 is already in use, so the embedded PostgreSQL cannot listen there. \
             Set PGSERVE_PORT to a free port (or 0 to pick one automatically), or stop whatever listens on {port}"
        ),
        Err(e) => Err(e).with_context(|| format!("could not check PGSERVE_PORT={port}")),
    }
}

/// `PGSERVE_PORT=0`: a port free now that no `bind(0)` can take before
/// PostgreSQL binds it (the worker's socket is bound to port 0 next).
pub(crate) fn pick_free_port() -> Result<u16> {
    omni_contract::ports::free_loopback_port().context("could not find a free port for PGSERVE_PORT=0")
}

/// A private directory for PostgreSQL's Unix socket, given to its account.
pub(crate) fn make_socket_dir(account: &Account) -> Result<PathBuf> {
    privilege::private_temp_dir("omni-pg", account.run_as())
}

pub(crate) fn random_password() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

/// Writes `secret` to `path` with mode 0600 (created that way, never
/// widened): into a new temporary file beside it (`O_EXCL`, `O_NOFOLLOW`),
/// flushed, then renamed over `path`. A link planted at `path` is replaced,
/// never followed.
pub(crate) fn write_secret(path: &Path, secret: &str) -> Result<()> {
    let temp = temp_beside(path);
    let write = || -> std::io::Result<()> {
        let mut f = create_private(&temp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, path)?;
        sync_dir(path)
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })
        .with_context(|| format!("could not write {}", path.display()))
}

/// Copies a template cluster, keeping modes and giving every copy to
/// `owner`: directories first, then the files on a few threads (the copy is
/// most of a memory-mode start, and it is a thousand files of kernel work
/// that parallelises well). The template holds only files and directories.
pub(crate) fn copy_tree(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let give = |path: &Path| match owner {
        Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
        None => Ok(()),
    };
    let mut dirs = vec![(from.to_path_buf(), to.to_path_buf())];
    let mut files = Vec::new();
    let mut i = 0;
    while i < dirs.len() {
        let (source, target) = dirs[i].clone();
        std::fs::create_dir(&target)?;
        for entry in std::fs::read_dir(&source)? {
            let entry = entry?;
            let ty = entry.file_type()?;
            if ty.is_dir() {
                dirs.push((entry.path(), target.join(entry.file_name())));
            } else if ty.is_file() {
                files.push((entry.path(), target.join(entry.file_name())));
            }
        }
        i += 1;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    while let Some((source, target)) = files.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        std::fs::copy(source, target)?;
                        give(target)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(std::io::Error::other("a copying thread panicked"))))
    })?;
    // Modes last: a 0700 directory copied first would still take files (we
    // may be root), but this keeps the order obvious.
    for (source, target) in dirs.iter().rev() {
        std::fs::set_permissions(target, std::fs::metadata(source)?.permissions())?;
        give(target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_sits_next_to_the_cluster() {
        assert_eq!(password_file(Path::new("/srv/data/postgres")), PathBuf::from("/srv/data/postgres.password"));
    }

    #[test]
    fn a_taken_port_is_reported_with_the_variable_name() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let err = check_port_free(l.local_addr().unwrap().port()).unwrap_err().to_string();
        assert!(err.contains("PGSERVE_PORT"), "{err}");
    }
}
