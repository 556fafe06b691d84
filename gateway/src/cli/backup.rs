//! `omni-gateway backup create|list|restore <name>|delete <name>`: backups
//! for operators with a shell (and `base`, `verify`, `drill` for the WAL
//! archive, `reencrypt` for the off-site repository's key rotation).
//!
//! It runs the worker's own backup code (`omni_contract::backups`, linked into this
//! binary), not a copy and not an HTTP call, so there is no API key to find
//! and the rules are the same: same directory, same names, same lock (an
//! `flock` shared with a running worker, so a CLI restore and an API create
//! never overlap), same retention. The database is the one the gateway's
//! configuration names: `DATABASE_URL`, or the embedded cluster, which must be
//! running (its port is read from `postmaster.pid`, its password from the file
//! next to the data directory).
//!
//! Run as root, it works as the API worker's account (`OMNI_API_USER`): it
//! reads what only root may (the cluster's password) first, then switches
//! for good, so the backups and the lock file it leaves are the worker's to
//! list, restore and delete, as if the API had made them.


use anyhow::{bail, Context, Result};
use clap::Subcommand;
use omni_contract::backups::{Backups, Identity};

use crate::config::{Config, Database};
use crate::pg::{binaries, cluster, pidfile};
use crate::process::privilege;

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Take a backup now (into OMNI_BACKUP_DIR)
    Create,
    /// List backups, newest first
    List,
    /// Restore a backup; the current database is first saved as a safety backup
    Restore {
        /// omni_backup_YYYYMMDD_HHMMSS.sql
        name: String,
        /// The private key (age-keygen's key.txt, or the passphrase file) a backup kept encrypted (OMNI_ENCRYPT_LOCAL) is decrypted with; default OMNI_DECRYPT_IDENTITY_FILE
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
    },
    /// Delete a backup
    Delete {
        /// omni_backup_YYYYMMDD_HHMMSS.sql
        name: String,
    },
    /// Take a base backup for point-in-time recovery now (pg_basebackup, compressed, then checked against its manifest) into OMNI_WAL_DIR/base
    Base,
    /// Restore drill: restore the newest base backup and its WAL into a temporary cluster, check it, remove it; exit 1 if it fails
    Verify,
    /// Restore drill on chosen base backups: `--all` drills every one kept in OMNI_WAL_DIR/base, `--backup ID` one; exit 1 if any fails
    Drill {
        /// Every kept base backup, oldest first
        #[arg(long, required_unless_present = "backup", conflicts_with = "backup")]
        all: bool,
        /// One base backup, by its id (as `restore --window` and GET /api/v1/backup/window name it)
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
    },
    /// Key rotation: rewrite the off-site repository's objects to the current OMNI_ENCRYPT_* recipients, reading them with the old key; old objects are deleted once their copies are confirmed, when OMNI_REPOSITORY_DELETE allows. Run with the gateway stopped
    Reencrypt {
        /// The OLD age identity file (`age-keygen`'s key.txt, or the old passphrase file) that opens the objects to rewrite
        #[arg(long, value_name = "FILE")]
        identity: std::path::PathBuf,
    },
}

/// Runs one backup command, printing what it did on stdout.
pub async fn run(config: &Config, command: BackupCommand) -> Result<()> {
    // Point-in-time recovery: PostgreSQL's tools, run as PostgreSQL's account.
    if matches!(command, BackupCommand::Base | BackupCommand::Verify) {
        return crate::cli::archive::run(config, matches!(command, BackupCommand::Verify)).await;
    }
    if let BackupCommand::Drill { all, backup } = &command {
        return crate::cli::archive::drill(config, *all, backup.as_deref()).await;
    }
    // As the gateway: it takes the cluster's lock and writes the plain
    // copies the gateway's retention reads.
    if let BackupCommand::Reencrypt { identity } = &command {
        crate::repository::reencrypt::run(config, identity, &|line| println!("{line}")).await?;
        return Ok(());
    }
    let needs_database = matches!(command, BackupCommand::Create | BackupCommand::Restore { .. });
    let database = if needs_database { Some(database(config)?) } else { None };
    // The identity is read before the switch: it is often root's alone.
    let identity = match &command {
        BackupCommand::Restore { identity: Some(path), .. } => Identity::Loaded(std::sync::Arc::new(crate::repository::crypt::Keys::load(path, "--identity")?)),
        BackupCommand::Restore { identity: None, .. } => match crate::repository::config::identity_file(config) {
            // Unreadable here: read again (and its error given) if a restore needs it.
            Some(path) => crate::repository::crypt::Keys::load(&path, "OMNI_DECRYPT_IDENTITY_FILE").map_or(Identity::File(path), |keys| Identity::Loaded(std::sync::Arc::new(keys))),
            None => Identity::None,
        },
        _ => Identity::None,
    };
    let account = privilege::worker_account(&config.api_user)?;
    privilege::prepare_backup_dir(&config.backup_dir, &account)?;
    privilege::become_account(&account)?;
    match command {
        BackupCommand::List => {
            let backups = service(config, None, identity).list()?;
            if backups.is_empty() {
                println!("no backups in {}", config.backup_dir.display());
            }
            for b in backups {
                println!("{}  {:>14} bytes  {}{}", b.filename, b.size_bytes, b.created_at, if b.encrypted { "  encrypted (.age)" } else { "" });
            }
        }
        BackupCommand::Create => {
            let created = service(config, database, identity).create().await?;
            println!("{}  {} bytes  {}", created.backup_file, created.size_bytes, config.backup_dir.display());
        }
        BackupCommand::Restore { name, .. } => {
            let restored = service(config, database, identity).restore(&name).await?;
            println!("restored {}; the database as it was before is saved as {}", restored.restored, restored.safety_backup);
        }
        BackupCommand::Delete { name } => {
            service(config, None, identity).delete(&name)?;
            println!("deleted {name}");
        }
        BackupCommand::Base | BackupCommand::Verify | BackupCommand::Drill { .. } | BackupCommand::Reencrypt { .. } => unreachable!("handled before the account switch"),
    }
    Ok(())
}

/// The backups as the worker sees them: same directory, retention, off-site
/// confirmation and, with `OMNI_ENCRYPT_LOCAL`, sealing (also for `import-sqlite`'s safety backup).
pub(crate) fn service(config: &Config, database: Option<(String, Option<std::path::PathBuf>)>, identity: Identity) -> Backups {
    let (url, bin_dir) = database.unwrap_or_default();
    Backups::new(config.backup_dir.clone(), bin_dir, url, config.backup_keep)
        .uploaded_to(crate::repository::config::shown_url(config))
        .sealed(crate::repository::config::logical_encryption(config), identity)
}

/// The database URL and the directory of `pg_dump`/`psql` (also used by `import-sqlite`).
pub(crate) fn database(config: &Config) -> Result<(String, Option<std::path::PathBuf>)> {
    match &config.database {
        Database::External { url } => Ok((url.clone(), binaries::find(None).ok().map(|b| b.dir))),
        Database::Embedded(embedded) => {
            if embedded.memory_mode {
                bail!(
                    "PGSERVE_MEMORY_MODE is on: that cluster exists only inside the running gateway; \
                     use the API instead (POST /api/v1/backup/create with your x-api-key)"
                );
            }
            let data_dir = &embedded.data_dir.value;
            let port = pidfile::running_port(data_dir)?;
            let password_file = cluster::password_file(data_dir);
            let password = cluster::read_password(data_dir)?
                .with_context(|| format!("reading the cluster password from {}: it is missing", password_file.display()))?;
            let bins = binaries::find(embedded.bin_dir.as_deref())?;
            let url = format!("postgres://{}:{}@127.0.0.1:{port}/{}", cluster::SUPERUSER, password.trim(), cluster::APP_DATABASE);
            Ok((url, Some(bins.dir)))
        }
    }
}

