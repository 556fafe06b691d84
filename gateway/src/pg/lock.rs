//! One owner per cluster: an exclusive `flock(2)` on `<data_dir>.lock`.
//!
//! A running gateway holds it from the first moment of its start (before an
//! interrupted upgrade is recovered, before `initdb`, before the pid-file
//! judgement) until it exits; `omni-gateway restore` and `upgrade` take it
//! for as long as they run (`backup base|create|restore` and `import-sqlite`
//! are clients of the running gateway's PostgreSQL and take none). Whoever
//! comes second refuses at once, naming the holder: after locking, the holder writes `<pid> <what>`
//! into the file, and that is what the refusal quotes. So two gateways (two
//! containers on one volume: `flock` works across PID and IPC namespaces on
//! one kernel's filesystem, NFS excepted), or a gateway and a maintenance
//! command, never act on one cluster at once. `omni-gateway doctor` only
//! looks: a shared, non-blocking attempt it gives back at once, to say who
//! holds the cluster. Work that runs *inside* a gateway (the online
//! point-in-time restore, on-demand base backups) is covered by the lock the
//! gateway already holds and never takes it again.
//!
//! The descriptor is opened `O_CLOEXEC`, so no child (PostgreSQL, the
//! worker, `pg_basebackup`, …) inherits it: the lock lives exactly as long as
//! the process that took it. When a gateway is killed, the kernel releases the
//! lock while its PostgreSQL may still be shutting down (it gets SIGQUIT from
//! the parent-death signal). That window is PostgreSQL's own interlock to
//! cover: its `postmaster.pid` names a live postmaster, which the next
//! holder's pid-file judgement (`pidfile.rs`) treats as live and never
//! removes. The pid-file judgement thus stays as a second line behind the lock.
//!
//! The file sits beside the data directory, in a directory the API worker's
//! group may add files to (`privilege::prepare_settings_file`), so it is
//! opened with `O_NOFOLLOW` and trusted only when it is a regular file with
//! one link, owned by root or the gateway's own account, and not writable by
//! group or others (`cluster::check_trusted`); anything else is refused,
//! naming the file.
//!
//! Memory mode needs no lock (each gateway has its own throw-away cluster,
//! named by its pid), and neither does an external `DATABASE_URL` (no data
//! directory here to own).

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::cluster::{self, sibling};

/// How long a gateway waits for `doctor`'s momentary shared probe to end
/// before it calls the cluster taken.
const PROBE_PATIENCE: Duration = Duration::from_millis(500);

/// `<data_dir>.lock`.
pub fn lock_file(data_dir: &Path) -> PathBuf {
    sibling(data_dir, ".lock")
}

/// The exclusive lock on a cluster, released when dropped (or when the
/// process ends, however it ends).
#[derive(Debug)]
pub struct ClusterLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl ClusterLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds a cluster, as the lock file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody: no gateway or maintenance command works on it now.
    Nobody,
    /// Someone: the pid and what it is, as it wrote them (`None` when it has
    /// not written them yet, in its first instant).
    Held { pid: Option<u32>, what: String },
}

impl Holder {
    /// "a gateway (pid 1234)", "omni-gateway restore (pid 1234)", for messages.
    pub fn describe(&self) -> String {
        match self {
            Holder::Nobody => "nobody".into(),
            Holder::Held { pid: Some(pid), what } if what == "run" => format!("a gateway (pid {pid})"),
            Holder::Held { pid: Some(pid), what } => format!("omni-gateway {what} (pid {pid})"),
            Holder::Held { pid: None, what: _ } => "a process that is just starting (its pid is not written yet)".into(),
        }
    }
}

/// Takes the exclusive lock on the cluster at `data_dir` for `what` (`run`,
/// `restore`, `upgrade`), or refuses at once, naming who holds it.
pub fn acquire(data_dir: &Path, what: &str) -> Result<ClusterLock> {
    let path = lock_file(data_dir);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| open_error(&path, e))?;
    cluster::check_trusted(&file, &path)?;
    let deadline = Instant::now() + PROBE_PATIENCE;
    let mut file = file;
    let file = loop {
        file = match try_flock(file, FlockArg::LockExclusiveNonblock)? {
            Ok(locked) => break locked,
            Err(file) => file,
        };
        // Only shared holders (doctor looking, for an instant)? Wait them out.
        let only_probes;
        (file, only_probes) = match try_flock(file, FlockArg::LockSharedNonblock)? {
            Ok(shared) => (unlock(shared)?, true),
            Err(file) => (file, false),
        };
        if !only_probes || Instant::now() > deadline {
            let holder = read_holder(&mut file);
            bail!(
                "the cluster at {} is in use: {} holds its lock {}. Two processes must never work on one cluster at once, so nothing was done. \
                 Stop that one first (or wait for it to finish), or point PGSERVE_DATA_DIR at another directory; in another container the pid is that container's",
                data_dir.display(),
                holder.describe(),
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let line = format!("{} {what}\n", std::process::id());
    file.set_len(0).and_then(|()| file.write_all_at(line.as_bytes(), 0)).with_context(|| format!("could not write the holder's pid into {}", path.display()))?;
    tracing::debug!("holding {} ({what})", path.display());
    Ok(ClusterLock { _file: file, path })
}

/// Who holds the cluster at `data_dir`, without holding it (`doctor`): a
/// shared, non-blocking attempt given back at once. Never creates the file.
pub fn probe(data_dir: &Path) -> Result<Holder> {
    let path = lock_file(data_dir);
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path) {
        Ok(f) => f,
        // No gateway ever ran here (each one leaves the file behind).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Holder::Nobody),
        Err(e) => return Err(open_error(&path, e)),
    };
    cluster::check_trusted(&file, &path)?;
    match try_flock(file, FlockArg::LockSharedNonblock)? {
        Ok(shared) => {
            unlock(shared)?;
            Ok(Holder::Nobody)
        }
        Err(mut file) => Ok(read_holder(&mut file)),
    }
}

/// A non-blocking `flock`: the locked file when taken, the file back when
/// someone else holds it.
fn try_flock(mut file: File, arg: FlockArg) -> Result<std::result::Result<Flock<File>, File>> {
    loop {
        match Flock::lock(file, arg) {
            Ok(locked) => return Ok(Ok(locked)),
            Err((back, Errno::EWOULDBLOCK)) => return Ok(Err(back)),
            Err((back, Errno::EINTR)) => file = back,
            Err((_, e)) => return Err(e).context("flock on the cluster's lock file failed (the filesystem may not support locks; NFS does not)"),
        }
    }
}

fn unlock(locked: Flock<File>) -> Result<File> {
    locked.unlock().map_err(|(_, e)| e).context("unlocking the cluster's lock file")
}

fn read_holder(file: &mut File) -> Holder {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.take(256).read_to_string(&mut text));
    parse_holder(&text)
}

fn parse_holder(text: &str) -> Holder {
    let mut words = text.trim().splitn(2, ' ');
    let pid = words.next().and_then(|w| w.parse().ok());
    let what = words.next().unwrap_or("").trim();
    Holder::Held { pid, what: if what.is_empty() { "run".into() } else { what.into() } }
}

fn open_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => anyhow::anyhow!(
            "{} is a symbolic link; the gateway follows no link it did not make beside the data directory, so nothing was done. \
             Something that can write {} (the database superuser, or the API worker's account) may have planted it: inspect it, remove it (`rm {}`) and start again",
            path.display(),
            path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
            path.display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => anyhow::anyhow!(
            "could not open the cluster's lock file {}: permission denied. Run this as the account that runs the gateway (or root), \
             or, when no gateway runs, remove the file (`rm {}`) so this account makes its own",
            path.display(),
            path.display()
        ),
        _ => anyhow::Error::new(e).context(format!("could not open the cluster's lock file {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_beside_the_cluster() {
        assert_eq!(lock_file(Path::new("/srv/data/postgres")), PathBuf::from("/srv/data/postgres.lock"));
    }

    #[test]
    fn the_holder_line_names_pid_and_command() {
        assert_eq!(parse_holder("42 restore\n"), Holder::Held { pid: Some(42), what: "restore".into() });
        assert_eq!(parse_holder("7 backup base\n"), Holder::Held { pid: Some(7), what: "backup base".into() });
        assert_eq!(parse_holder(""), Holder::Held { pid: None, what: "run".into() });
        assert_eq!(Holder::Held { pid: Some(9), what: "run".into() }.describe(), "a gateway (pid 9)");
        assert_eq!(Holder::Held { pid: Some(9), what: "restore".into() }.describe(), "omni-gateway restore (pid 9)");
    }

    #[test]
    fn a_second_lock_is_refused_at_once_naming_the_first() {
        let dir = std::env::temp_dir().join(format!("omni-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("postgres");
        let first = acquire(&data, "run").unwrap();
        let started = Instant::now();
        let err = acquire(&data, "restore").unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2), "refused at once");
        assert!(err.contains(&format!("a gateway (pid {})", std::process::id())), "{err}");
        assert_eq!(probe(&data).unwrap(), Holder::Held { pid: Some(std::process::id()), what: "run".into() });
        let flags = nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&*first._file), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(flags & libc::FD_CLOEXEC != 0, "no child may inherit the lock");
        drop(first);
        assert_eq!(probe(&data).unwrap(), Holder::Nobody);
        let again = acquire(&data, "upgrade").unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_planted_link_or_a_writable_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("omni-lock-test-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("postgres");
        let target = dir.join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, lock_file(&data)).unwrap();
        let err = acquire(&data, "run").unwrap_err().to_string();
        assert!(err.contains("symbolic link") && err.contains("postgres.lock"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        std::fs::remove_file(lock_file(&data)).unwrap();
        std::fs::write(lock_file(&data), "").unwrap();
        std::fs::set_permissions(lock_file(&data), std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        let err = format!("{:#}", acquire(&data, "run").unwrap_err());
        assert!(err.contains("postgres.lock") && err.contains("writable"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
