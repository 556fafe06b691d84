//! `omni-gateway upgrade [--check] [--cleanup]`: the major upgrade of the
//! embedded cluster on demand, its dry run, and deleting the old copy it kept.
//!
//! The upgrade is the start's own (`pg::upgrade`), run without starting
//! anything afterwards; it refuses while a PostgreSQL runs on the data
//! directory (stop the gateway first). `--check` goes as far as `pg_upgrade
//! --check` on a new cluster it then deletes, and changes nothing else.
//! `--cleanup` may run beside a running gateway: the old copy is not in use.

use anyhow::{bail, Result};
use clap::Args;

use crate::config::{Config, Database};
use crate::pg::{binaries, upgrade};
use crate::process::privilege;

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// Only report what the upgrade would do and whether it can (runs pg_upgrade --check; changes nothing)
    #[arg(long, conflicts_with = "cleanup")]
    check: bool,
    /// Delete the old cluster a finished upgrade kept beside the data directory (<data_dir>.pg<old>)
    #[arg(long)]
    cleanup: bool,
}

/// Runs the command; the outcome line goes to stdout, progress to the log (stderr).
pub async fn run(config: &Config, args: UpgradeArgs) -> Result<()> {
    let Database::Embedded(embedded) = &config.database else {
        bail!("DATABASE_URL is set: the gateway uses an external PostgreSQL, which it does not upgrade");
    };
    if embedded.memory_mode {
        bail!("PGSERVE_MEMORY_MODE is on: a throw-away cluster is created by the current binaries at every start and never needs an upgrade");
    }
    let data_dir = &embedded.data_dir.value;
    if args.cleanup {
        println!("{}", upgrade::cleanup(data_dir)?);
        return Ok(());
    }
    // Not beside a running gateway or another command (pg/lock.rs).
    let _lock = crate::pg::lock::acquire(data_dir, "upgrade")?;
    let account = privilege::postgres_account(&embedded.run_as)?;
    upgrade::recover(data_dir).await?;
    let explicit = embedded.bin_dir.clone();
    let new = tokio::task::spawn_blocking(move || binaries::find(explicit.as_deref())).await??;
    let Some(major) = upgrade::cluster_major(data_dir) else {
        bail!("{} holds no PostgreSQL cluster (no PG_VERSION file); set PGSERVE_DATA_DIR to the cluster to upgrade", data_dir.display());
    };
    if major == new.major {
        let record = upgrade::load(data_dir)?.map(|r| format!(" (last upgrade: {})", r.summary())).unwrap_or_default();
        println!("the cluster at {} is PostgreSQL {major}, the binaries' major: nothing to upgrade{record}", data_dir.display());
        return Ok(());
    }
    let plan = upgrade::plan(embedded, data_dir, &new, &account)?;
    print!("{}", plan.describe());
    let stop = crate::supervise::shutdown::stop_on_signals(if args.check { "checking the upgrade" } else { "upgrading PostgreSQL" })?;
    if args.check {
        upgrade::check(&plan, &account, &stop).await?;
        println!("upgrade check passed: `omni-gateway upgrade` (or a start with PGSERVE_AUTO_UPGRADE=true) would upgrade PostgreSQL {major} to {}", new.major);
    } else {
        let record = upgrade::run(&plan, &account, &stop).await?;
        println!("{}", record.summary());
    }
    Ok(())
}
