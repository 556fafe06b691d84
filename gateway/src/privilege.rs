//! Running PostgreSQL as an unprivileged account when the gateway is root.
//!
//! PostgreSQL refuses to run as root, and Docker images and CI jobs usually
//! start the gateway as root. Rather than failing, the gateway runs `initdb`
//! and `postgres` as `PGSERVE_USER` and makes the data directory theirs. When
//! the gateway is not root there is nothing to drop: PostgreSQL runs as the
//! same user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Uid, User};

/// The account PostgreSQL runs as.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// True when the gateway is root and must switch to this account for children.
    pub switch: bool,
}

impl Account {
    /// The uid/gid to hand to [`crate::child::ChildSpec::run_as`].
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.switch.then_some((self.uid, self.gid))
    }
}

/// Resolves the account: `PGSERVE_USER` when root, the current user otherwise.
pub fn postgres_account(configured: &str) -> Result<Account> {
    let euid = Uid::effective();
    if !euid.is_root() {
        let name = User::from_uid(euid).ok().flatten().map(|u| u.name).unwrap_or_else(|| euid.to_string());
        return Ok(Account { name, uid: euid.as_raw(), gid: Gid::effective().as_raw(), switch: false });
    }
    let user = User::from_name(configured)
        .with_context(|| format!("could not look up user {configured:?}"))?
        .with_context(|| {
            format!(
                "the gateway runs as root and PostgreSQL refuses to, but the account PGSERVE_USER={configured} does not exist. \
                 Create it (`useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin {configured}`) or set PGSERVE_USER to an existing unprivileged account"
            )
        })?;
    if user.uid.is_root() {
        bail!("PGSERVE_USER={configured} is root (uid 0); PostgreSQL refuses to run as root. Choose an unprivileged account");
    }
    Ok(Account { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), switch: true })
}

/// Makes `dir` and everything in it owned by `account` (only when switching).
pub fn chown_tree(dir: &Path, account: &Account) -> Result<()> {
    if !account.switch {
        return Ok(());
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).with_context(|| format!("reading {}", p.display()))?;
        if meta.uid() != account.uid || meta.gid() != account.gid {
            std::os::unix::fs::lchown(&p, Some(account.uid), Some(account.gid))
                .with_context(|| format!("could not give {} to user {}", p.display(), account.name))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                stack.push(entry?.path());
            }
        }
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
        let mode = meta.permissions().mode();
        let searchable = if meta.uid() == account.uid {
            mode & 0o100 != 0
        } else if meta.gid() == account.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            bail!(
                "PostgreSQL runs as user {} and cannot reach {}: {} has mode {:o}. \
                 Set PGSERVE_DATA_DIR to a directory outside it, or allow traversal with `chmod o+x {}`",
                account.name,
                dir.display(),
                ancestor.display(),
                mode & 0o7777,
                ancestor.display()
            );
        }
    }
    Ok(())
}
