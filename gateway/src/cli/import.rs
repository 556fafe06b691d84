//! `omni-gateway import-sqlite [PATH] [--dry-run]`: the old product's SQLite
//! database into the running gateway's PostgreSQL, for operators with a shell.
//!
//! Like `omni-gateway backup`, it runs the worker's own code
//! (`omni_contract::import`, linked into this binary) against the database the
//! gateway's configuration names, so the rules are the API's: read-only on
//! the file, a safety backup first, one transaction, one import at a time
//! (the lock is in PostgreSQL, shared with the worker). Without PATH it takes
//! the file the start-up warning named. The report goes to stdout as JSON,
//! and as a table to stderr; the exit status is 1 when nothing was imported
//! because of an error.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use clap::Args;
use omni_contract::{
    backups::Identity,
    import::{self, Progress},
};

use crate::config::Config;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The SQLite file (default: the one found in the usual places, as the start-up warning says)
    path: Option<PathBuf>,
    /// Do everything, then roll back: report what an import would do
    #[arg(long)]
    dry_run: bool,
}

/// Runs one import, printing the report.
pub async fn run(config: &Config, args: ImportArgs) -> Result<()> {
    let path = match &args.path {
        Some(path) => omni_contract::paths::absolute(&config.cwd, path),
        None => omni_contract::sqlite::find(&config.cwd).ok_or(import::ImportError::NothingDetected)?,
    };
    // The file first: a file that cannot be imported is reported as such,
    // whether or not the gateway runs.
    let checked = path.clone();
    tokio::task::spawn_blocking(move || import::check(&checked)).await.context("checking the file")??;
    let (url, bin_dir) = crate::cli::backup::database(config)?;
    let backups = crate::cli::backup::service(config, Some((url.clone(), bin_dir)), Identity::None);
    eprintln!("{} {}", if args.dry_run { "dry run of the import of" } else { "importing" }, path.display());
    let last_table = std::sync::Mutex::new(String::new());
    let progress = move |p: &Progress| {
        let mut last = last_table.lock().expect("the progress printer does not panic");
        if *last != p.table {
            eprintln!("  [{}/{}] {} ({} rows)", p.table_number, p.tables_total, p.table, p.table_rows);
            *last = p.table.clone();
        }
    };
    let options = import::Options { dry_run: args.dry_run, backups: Some(backups), progress: Some(Arc::new(progress)), label: None };
    let report = import::run(&path, &url, options).await?;
    eprint!("{}", report.render());
    println!("{}", serde_json::to_string_pretty(&report).context("writing the report")?);
    Ok(())
}
