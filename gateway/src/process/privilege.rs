//! Running children as unprivileged accounts when the gateway is root.
//!
//! PostgreSQL refuses to run as root, and nothing that parses HTTP should:
//! Docker images and CI jobs usually start the gateway as root. The gateway
//! then runs `initdb` and `postgres` as `PGSERVE_USER` (making the data
//! directory theirs) and the API worker as `OMNI_API_USER` (PostgreSQL's
//! account unless set), and gives the worker what it writes: the backup
//! directory and the onboarding settings file. When the gateway is not root
//! there is nothing to drop: every child runs as the same user.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Uid, User};

/// An account children run as.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its home directory: `HOME` for children (tools look for dot files there).
    pub home: PathBuf,
    /// True when the gateway is root and must switch to this account for children.
    pub switch: bool,
}

impl Account {
    /// The uid/gid to hand to [`crate::process::child::ChildSpec::run_as`].
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.switch.then_some((self.uid, self.gid))
    }

    /// `HOME`, `USER` and `LOGNAME` of the account, when switching to it (so
    /// `psql` does not look for root's dot files and fail to read them).
    pub fn login_env(&self) -> Vec<(OsString, OsString)> {
        if !self.switch {
            return Vec::new();
        }
        vec![("HOME".into(), self.home.clone().into()), ("USER".into(), self.name.clone().into()), ("LOGNAME".into(), self.name.clone().into())]
    }

    /// Can this account do `bits` (`0o4` read, `0o2` write, `0o1` search or
    /// execute) on a file with `meta`? Only its primary group counts, so the
    /// answer errs towards "no".
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.permissions().mode();
        let granted = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid {
            mode >> 3
        } else {
            mode
        };
        granted & bits == bits
    }
}

/// The account PostgreSQL runs as: `PGSERVE_USER` when root, the current user otherwise.
pub fn postgres_account(configured: &str) -> Result<Account> {
    unprivileged_account(configured, "PGSERVE_USER", "PostgreSQL refuses to run as root")
}

/// The account the API worker runs as: `OMNI_API_USER` (whose default is
/// `PGSERVE_USER`) when root, the current user otherwise.
pub fn worker_account(configured: &str) -> Result<Account> {
    unprivileged_account(configured, "OMNI_API_USER", "the API worker parses HTTP and must not run as root")
}

fn unprivileged_account(configured: &str, variable: &str, why: &str) -> Result<Account> {
    let euid = Uid::effective();
    if !euid.is_root() {
        let user = User::from_uid(euid).ok().flatten();
        let name = user.as_ref().map(|u| u.name.clone()).unwrap_or_else(|| euid.to_string());
        let home = user.map(|u| u.dir).unwrap_or_default();
        return Ok(Account { name, uid: euid.as_raw(), gid: Gid::effective().as_raw(), home, switch: false });
    }
    let user = User::from_name(configured)
        .with_context(|| format!("could not look up user {configured:?}"))?
        .with_context(|| {
            format!(
                "the gateway runs as root and {why}, but the account {variable}={configured} does not exist. \
                 Create it (`useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin {configured}`) or set {variable} to an existing unprivileged account"
            )
        })?;
    if user.uid.is_root() {
        bail!("{variable}={configured} is root (uid 0), and {why}. Choose an unprivileged account");
    }
    Ok(Account { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir, switch: true })
}

/// Makes `dir` and everything in it owned by `account` (only when switching).
pub fn chown_tree(dir: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).with_context(|| format!("reading {}", p.display()))?;
        give(&p, &meta, account)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Whether every one of `paths` (that exists) belongs to `account`, user and group.
pub fn owns_all(paths: &[&Path], account: &Account) -> bool {
    paths.iter().all(|p| std::fs::symlink_metadata(p).map(|m| m.uid() == account.uid && m.gid() == account.gid).unwrap_or(true))
}

fn give(path: &Path, meta: &std::fs::Metadata, account: &Account) -> Result<()> {
    if meta.uid() != account.uid || meta.gid() != account.gid {
        std::os::unix::fs::lchown(path, Some(account.uid), Some(account.gid))
            .with_context(|| format!("could not give {} to user {}", path.display(), account.name))?;
    }
    Ok(())
}

/// Checks that `account` can reach `dir`: every ancestor must be searchable
/// by it. A root-only home directory is the usual culprit, and PostgreSQL's
/// own message for it ("could not change directory") does not say which.
pub fn check_reachable(dir: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else { continue };
        if !account.may(&meta, 0o1) {
            bail!(
                "user {} cannot reach {}: {} has mode {:o}. \
                 Use a path outside it, or allow traversal with `chmod o+x {}`",
                account.name,
                dir.display(),
                ancestor.display(),
                meta.permissions().mode() & 0o7777,
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// The backup directory, made the worker account's (only when switching):
/// created if missing (mode 0700), and the directory and the backup files in
/// it given to the account, so the worker (and the CLI, which switches to
/// the same account) can write, list and delete them whoever made them
/// first. Nothing else in the directory is touched, and nothing below it.
pub fn prepare_backup_dir(dir: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    if !dir.is_dir() {
        // Parents get the usual mode (others may need to pass through them,
        // PostgreSQL to reach a data directory beside it); the directory itself 0700.
        let create = || -> std::io::Result<()> {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::DirBuilder::new().mode(0o700).create(dir)
        };
        create().with_context(|| format!("could not create the backup directory {} (OMNI_BACKUP_DIR)", dir.display()))?;
    }
    check_reachable(dir, account).context("OMNI_BACKUP_DIR")?;
    let meta = std::fs::symlink_metadata(dir)?;
    give(dir, &meta, account)?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let ours = name.to_str().is_some_and(|n| n.starts_with("omni_backup_") || n.starts_with(".omni_backup"));
        let meta = entry.metadata()?;
        if ours && meta.is_file() {
            give(&entry.path(), &meta, account)?;
        }
    }
    Ok(())
}

/// Lets the worker account replace the onboarding settings file (only when
/// switching). The worker writes a temporary file beside it and renames it
/// into place, which needs write access to the directory: a directory the
/// account cannot write gets the account's group with write access and the
/// sticky bit, so the account can add and replace its own files there but
/// not remove or rename anyone else's (the cluster password next to the data
/// directory stays root's). It can still *add* files there, and by default
/// that directory also holds the data directory's siblings, so the gateway
/// trusts none it finds there unless it is its own (`cluster::check_trusted`:
/// opened `O_NOFOLLOW`, owner root or the gateway, no group/other write) and
/// writes them only through new `O_EXCL` files renamed into place.
pub fn prepare_settings_file(file: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    let Some(dir) = file.parent() else { return Ok(()) };
    std::fs::create_dir_all(dir).with_context(|| format!("could not create {} for OMNI_SETTINGS_FILE", dir.display()))?;
    check_reachable(dir, account).context("OMNI_SETTINGS_FILE")?;
    let meta = std::fs::metadata(dir)?;
    if !account.may(&meta, 0o3) {
        let mode = meta.permissions().mode() & 0o7777;
        let new_mode = mode | 0o1070;
        std::os::unix::fs::chown(dir, None, Some(account.gid)).with_context(|| format!("could not give group {} to {}", account.name, dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(new_mode)).with_context(|| format!("could not set mode {new_mode:o} on {}", dir.display()))?;
        tracing::info!(
            "{}: group {} may now add files (mode {mode:o} → {new_mode:o}, sticky), so the API worker can save onboarding settings to {}",
            dir.display(),
            account.name,
            file.display()
        );
    }
    if let Ok(meta) = std::fs::symlink_metadata(file) {
        if meta.is_file() {
            give(file, &meta, account)?;
        }
    }
    Ok(())
}

/// The file in each directory [`private_temp_dir`] makes that names its
/// maker: `<PID namespace> <pid>` (`pid:[4026531836] 1234`).
pub const MAKER_FILE: &str = ".maker";

/// A new short private directory (mode 0700) in the temporary directory,
/// `<prefix>-<pid>-<random>`, given to `owner` when set (this process's
/// account otherwise): for Unix sockets, whose paths are limited to ~100
/// bytes, so they cannot live under an arbitrarily deep data directory.
/// Its [`MAKER_FILE`] names this process. What killed processes left under
/// the same prefix goes first ([`remove_left_temp_dirs`]).
pub fn private_temp_dir(prefix: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    use rand::distributions::{Alphanumeric, DistString};
    let tmp = std::env::temp_dir();
    remove_left_temp_dirs(&tmp, prefix, owner.map_or_else(|| nix::unistd::geteuid().as_raw(), |(uid, _)| uid));
    let dir = tmp.join(format!("{prefix}-{}-{}", std::process::id(), Alphanumeric.sample_string(&mut rand::thread_rng(), 6)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("could not create the private directory {}", dir.display()))?;
    if let Some(namespace) = pid_namespace() {
        // Without it the directory is never removed by another start: nothing worse.
        let _ = std::fs::write(dir.join(MAKER_FILE), format!("{namespace} {}\n", std::process::id()));
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).with_context(|| format!("could not give {} to uid {uid}", dir.display()))?;
    }
    Ok(dir)
}

/// This process's PID namespace, as /proc names it (`pid:[4026531836]`).
fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid").ok().map(|link| link.to_string_lossy().into_owned())
}

/// Removes the directories [`private_temp_dir`] made for `prefix` that a
/// process ended without its cleanup (`kill -9`, the OOM killer, a power
/// cut with a persistent `/tmp`) left in `tmp`. Only those owned by
/// `owner` whose [`MAKER_FILE`] names a process of this PID namespace that
/// is gone, and where no socket has a listener (an orphaned PostgreSQL of
/// such a gateway still listens in its directory). A process of another
/// namespace sharing this `/tmp` (a container, `unshare --pid`) cannot be
/// seen from here: its directories are never touched, even while its
/// PostgreSQL restarts and no socket listens. A directory without the file
/// (made by an older version) stays; so does one whose pid was taken again,
/// until that process ends.
fn remove_left_temp_dirs(tmp: &Path, prefix: &str, owner: u32) {
    let Some(namespace) = pid_namespace() else { return };
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| temp_dir_pid(name, prefix)) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.uid() != owner {
            continue;
        }
        let made_here = std::fs::read_to_string(path.join(MAKER_FILE)).is_ok_and(|maker| maker.trim() == format!("{namespace} {pid}"));
        if !made_here || has_listening_socket(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::debug!("removed {}, left by process {pid}, which is gone", path.display()),
            Err(e) => tracing::debug!("could not remove {} (left by process {pid}): {e}", path.display()),
        }
    }
}

/// The pid in a name `<prefix>-<pid>-<6 letters or digits>`.
fn temp_dir_pid(name: &str, prefix: &str) -> Option<u32> {
    let (pid, random) = name.strip_prefix(prefix)?.strip_prefix('-')?.split_once('-')?;
    if random.len() != 6 || !random.bytes().all(|b| b.is_ascii_alphanumeric()) || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a Unix socket in `dir` has a listener, or `dir` cannot be read
/// (then it is not known to be dead). The connection is attempted without
/// blocking: a listener whose queue is full is alive too.
fn has_listening_socket(dir: &Path) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return true };
    entries.flatten().any(|entry| {
        if !entry.file_type().is_ok_and(|t| t.is_socket()) {
            return false;
        }
        let Ok(addr) = UnixAddr::new(&entry.path()) else { return true };
        let Ok(fd) = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None) else { return true };
        !matches!(connect(fd.as_raw_fd(), &addr), Err(Errno::ECONNREFUSED | Errno::ENOENT))
    })
}

/// Checks that `account` can run `program` (only when switching), since
/// `exec` would only say "permission denied".
pub fn check_executable(program: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    check_reachable(program, account)?;
    let meta = std::fs::metadata(program).with_context(|| format!("reading {}", program.display()))?;
    if !account.may(&meta, 0o5) {
        bail!(
            "user {} cannot run {} (mode {:o}); allow it with `chmod o+rx {}`, or set OMNI_API_USER to an account that can",
            account.name,
            program.display(),
            meta.permissions().mode() & 0o7777,
            program.display()
        );
    }
    Ok(())
}

/// Warns when `account` cannot read the UI files (only when switching): the
/// worker would answer 404 for every page, but the API still works.
pub fn warn_unless_readable(dir: &Path, account: &Account, variable: &str) {
    if !account.switch || !dir.exists() {
        return;
    }
    let readable = check_reachable(dir, account).is_ok() && std::fs::metadata(dir).is_ok_and(|m| account.may(&m, 0o5));
    if !readable {
        tracing::warn!(
            "{variable}={}: the API worker runs as user {} and cannot read it; allow it with `chmod -R o+rX {}`",
            dir.display(),
            account.name,
            dir.display()
        );
    }
}

/// Switches this process to `account` for good (the backup CLI, run as root,
/// so the files it leaves are the worker's). glibc applies the change to
/// every thread of the process.
pub fn become_account(account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    let gid = Gid::from_raw(account.gid);
    nix::unistd::setgroups(&[gid]).context("dropping supplementary groups")?;
    nix::unistd::setgid(gid).with_context(|| format!("switching to the group of {}", account.name))?;
    nix::unistd::setuid(Uid::from_raw(account.uid)).with_context(|| format!("switching to user {}", account.name))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn only_directories_of_gone_processes_of_this_namespace_with_no_live_socket_are_removed() {
        let tmp = std::env::temp_dir().join(format!("omni-privilege-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let dead = dead_pid();
        let namespace = pid_namespace().unwrap();
        // A directory as private_temp_dir makes it: its maker named inside.
        let dir = |name: String| {
            let path = tmp.join(&name);
            std::fs::create_dir(&path).unwrap();
            let pid = name.split('-').nth(2).unwrap_or("0");
            std::fs::write(path.join(MAKER_FILE), format!("{namespace} {pid}\n")).unwrap();
            path
        };
        // Gone, its socket dead (bound, then closed): removed.
        let stale = dir(format!("omni-x-{dead}-abc123"));
        drop(std::os::unix::net::UnixListener::bind(stale.join("s.sock")).unwrap());
        // Gone, empty: removed.
        let empty = dir(format!("omni-x-{dead}-def456"));
        // Gone, but a socket in it still listens (an orphaned server): kept.
        let listening = dir(format!("omni-x-{dead}-ghi789"));
        let _listener = std::os::unix::net::UnixListener::bind(listening.join("s.sock")).unwrap();
        // Alive (this process; pid 1): kept.
        let mine = dir(format!("omni-x-{}-jkl012", std::process::id()));
        let init = dir("omni-x-1-mno345".to_string());
        // Not a name it makes (another prefix, a shorter suffix): kept.
        let other = dir(format!("omni-xy-{dead}-pqr678"));
        let short = dir(format!("omni-x-{dead}-stu"));
        // Made by a process of another PID namespace (its pid means nothing here), or by an older version: kept.
        let other_namespace = dir(format!("omni-x-{dead}-nsp123"));
        std::fs::write(other_namespace.join(MAKER_FILE), format!("pid:[1] {dead}\n")).unwrap();
        let unnamed = dir(format!("omni-x-{dead}-old456"));
        std::fs::remove_file(unnamed.join(MAKER_FILE)).unwrap();
        // A link with the name, to a directory: neither it nor its target goes.
        let target = dir("target".to_string());
        std::fs::write(target.join("keep"), "").unwrap();
        let link = tmp.join(format!("omni-x-{dead}-vwx901"));
        std::os::unix::fs::symlink(&target, &link).unwrap();

        remove_left_temp_dirs(&tmp, "omni-x", me);
        assert!(!stale.exists() && !empty.exists(), "the gone process's directories are left");
        for kept in [&listening, &mine, &init, &other, &short, &other_namespace, &unnamed, &link, &target.join("keep")] {
            assert!(kept.symlink_metadata().is_ok(), "{} was removed", kept.display());
        }
        // Another owner's directories are not this one's to remove.
        let foreign = dir(format!("omni-x-{dead}-yza234"));
        remove_left_temp_dirs(&tmp, "omni-x", me + 1);
        assert!(foreign.exists(), "a directory of another owner was removed");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
