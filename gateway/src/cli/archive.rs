//! `omni-gateway backup base` and `omni-gateway backup verify`: a base backup
//! of the running cluster now, and the restore drill on demand.

use anyhow::{bail, Context, Result};

use crate::pitr::{base, restore, Server};
use crate::config::{Config, Database, EmbeddedConfig};
use crate::pg::{binaries, cluster};
use crate::process::privilege;

fn embedded(config: &Config) -> Result<&EmbeddedConfig> {
    if !config.wal.enabled {
        bail!("OMNI_WAL_DIR=off: point-in-time recovery is turned off (no WAL archive, no base backups); set OMNI_WAL_DIR to a directory to turn it on");
    }
    match &config.database {
        Database::Embedded(e) if !e.memory_mode => Ok(e),
        Database::Embedded(_) => bail!("PGSERVE_MEMORY_MODE is on: a throw-away cluster has no WAL archive"),
        Database::External { .. } => bail!("DATABASE_URL names an external PostgreSQL: point-in-time recovery covers the embedded cluster only"),
    }
}

/// `verify`: the drill; otherwise a base backup.
pub async fn run(config: &Config, verify: bool) -> Result<()> {
    let embedded = embedded(config)?;
    let data_dir = &embedded.data_dir.value;
    let bins = binaries::find(embedded.bin_dir.as_deref())?;
    let account = privilege::postgres_account(&embedded.run_as)?;
    crate::repository::config::local_crypt(config, None)?;
    if verify {
        let drill = restore::drill(&config.wal, &bins, &account, data_dir).await;
        if !drill.ok {
            bail!("restore drill FAILED: {}", drill.detail.unwrap_or_default());
        }
        println!(
            "restore drill passed: base backup {} and its WAL restored into a temporary cluster ({} app tables) in {:.1} s; removed again",
            drill.base_backup.unwrap_or_default(),
            drill.app_tables.unwrap_or(0),
            drill.took_ms as f64 / 1000.0
        );
        return Ok(());
    }
    // No cluster lock (pg/lock.rs): this is a client of the running
    // gateway's PostgreSQL, as `backup create` is, and the gateway holds the
    // lock for as long as that server runs. pg_basebackup beside the
    // gateway's own base backups is safe (each has its own slot and files).
    let port = crate::pg::pidfile::running_port(data_dir)?;
    let password_file = cluster::password_file(data_dir);
    let password = cluster::read_password(data_dir)?.with_context(|| format!("reading the cluster password from {}: it is missing", password_file.display()))?;
    let server = Server { binaries: bins, port, password, account };
    let backup = base::take(&server, &config.wal).await?;
    // Nothing the off-site shipper has not uploaded yet is deleted.
    crate::repository::ship::guard_retention_from_record(config);
    base::apply_retention(&config.wal)?;
    println!("{}  {} bytes  verified  {}", backup.id, backup.bytes, backup.dir(&config.wal.dir).display());
    Ok(())
}

/// `omni-gateway backup drill --all | --backup ID`: the restore drill on
/// each chosen base backup, each replaying the WAL after it on the newest
/// timeline it restores onto.
pub async fn drill(config: &Config, all: bool, id: Option<&str>) -> Result<()> {
    let embedded = embedded(config)?;
    let bins = binaries::find(embedded.bin_dir.as_deref())?;
    let account = privilege::postgres_account(&embedded.run_as)?;
    crate::repository::config::local_crypt(config, None)?;
    let backups = base::list(&config.wal.dir);
    let chosen: Vec<base::BaseBackup> = match id {
        Some(id) => vec![backups.iter().find(|b| b.id == id).cloned().with_context(|| {
            let ids: Vec<&str> = backups.iter().map(|b| b.id.as_str()).collect();
            format!("no verified base backup {id:?} in {} (there are: {})", crate::pitr::archive::base_dir(&config.wal.dir).display(), if ids.is_empty() { "none".to_string() } else { ids.join(", ") })
        })?],
        None if all && backups.is_empty() => bail!("no verified base backup in {} to drill", crate::pitr::archive::base_dir(&config.wal.dir).display()),
        None => backups,
    };
    let mut failed = Vec::new();
    for backup in chosen {
        let id = backup.id.clone();
        let drill = restore::drill_backup(&config.wal, &bins, &account, &embedded.data_dir.value, Some(backup)).await;
        match drill.detail {
            None => println!("restore drill passed: base backup {id} ({} app tables) in {:.1} s", drill.app_tables.unwrap_or(0), drill.took_ms as f64 / 1000.0),
            Some(why) => {
                eprintln!("restore drill FAILED on base backup {id}: {why}");
                failed.push(id);
            }
        }
    }
    if !failed.is_empty() {
        bail!("restore drill FAILED on {} base backup(s): {}", failed.len(), failed.join(", "));
    }
    Ok(())
}
