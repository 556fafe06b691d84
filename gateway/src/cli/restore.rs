//! `omni-gateway restore --to <time|latest>`: point-in-time recovery from
//! the WAL archive, for an operator with a shell, with the gateway stopped
//! (the case of a lost or damaged data directory). `--window` prints what can
//! be reached, timeline by timeline; `--timeline N` restores onto a given
//! timeline; `--discard-previous` deletes the data directories earlier
//! restores moved aside. `--from <url>` first downloads a base backup and
//! its WAL from an off-site repository into `OMNI_WAL_DIR`
//! (repository/fetch.rs): a new machine with the binary and the
//! repository's credentials only.

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::config::{Config, Database};
use crate::pg::binaries;
use crate::process::privilege;
use crate::pitr::restore::{self, Restore, Target};

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// `latest`, or an RFC 3339 time such as 2026-11-25T16:00:00Z
    #[arg(long, value_name = "TIME|latest", required_unless_present_any = ["window", "discard_previous"])]
    pub to: Option<Target>,
    /// The timeline to replay (`--window` lists them): by default the one that
    /// served at the target time, or the newest for `latest`
    #[arg(long, value_name = "N", requires = "to", value_parser = clap::value_parser!(u32).range(1..))]
    pub timeline: Option<u32>,
    /// Print the recoverable window and exit
    #[arg(long, conflicts_with_all = ["to", "discard_previous"])]
    pub window: bool,
    /// Delete the data directories that earlier restores moved aside
    #[arg(long, conflicts_with = "to")]
    pub discard_previous: bool,
    /// Download the base backup and WAL from this off-site repository
    /// (s3://bucket/prefix, gs://..., az://..., file:///...; credentials from
    /// the environment: AWS_*, GOOGLE_*, AZURE_*) into OMNI_WAL_DIR first
    #[arg(long, value_name = "URL", requires = "to", conflicts_with_all = ["window", "discard_previous"])]
    pub from: Option<String>,
    /// The age identity file (`age-keygen`'s key.txt, or the passphrase
    /// file) that decrypts an encrypted repository (--from) or an archive
    /// kept encrypted (OMNI_ENCRYPT_LOCAL); default OMNI_DECRYPT_IDENTITY_FILE
    #[arg(long, value_name = "FILE", requires = "to")]
    pub identity: Option<std::path::PathBuf>,
}

pub async fn run(config: &Config, args: RestoreArgs) -> Result<()> {
    let embedded = match &config.database {
        Database::Embedded(e) if !e.memory_mode => e,
        Database::Embedded(_) => bail!("PGSERVE_MEMORY_MODE is on: a throw-away cluster has no WAL archive to restore from"),
        Database::External { .. } => bail!("DATABASE_URL names an external PostgreSQL: restore it with its own tools; this restores the embedded cluster"),
    };
    if !config.wal.enabled {
        bail!("OMNI_WAL_DIR=off: there is no WAL archive to restore from; to restore from an existing one, set OMNI_WAL_DIR to its directory");
    }
    let data_dir = &embedded.data_dir.value;
    // Not beside a running gateway or another command (pg/lock.rs); `--window` only reads the archive.
    let _lock = if args.window { None } else { Some(crate::pg::lock::acquire(data_dir, "restore")?) };
    if args.window {
        let w = restore::window(&config.wal.dir);
        println!("recoverable window: {w} (OMNI_WAL_DIR={})", config.wal.dir.display());
        let windows = restore::windows(&config.wal.dir);
        if windows.len() > 1 {
            println!("timelines (a time restores onto the one that served then; --timeline N picks another):");
            for t in windows.iter().rev() {
                let began = crate::pitr::archive::began_at(&config.wal.dir, t.timeline).map_or("the start".to_string(), |b| b.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                let w = restore::Window { timeline: 1, ..*t };
                println!("  timeline {}: serving from {began}; window {w}", t.timeline);
            }
        }
        crate::pitr::generation::describe(&config.wal.dir).iter().for_each(|line| println!("{line}"));
        return Ok(());
    }
    if args.discard_previous {
        let previous = restore::previous_dirs(data_dir);
        if previous.is_empty() {
            println!("no data directory from before a restore next to {}", data_dir.display());
        }
        for dir in previous {
            std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))?;
            println!("deleted {}", dir.display());
        }
        return Ok(());
    }
    let target = args.to.expect("clap requires --to here");
    // OMNI_ENCRYPT_LOCAL: the local archive opens with the same identity.
    crate::repository::config::local_crypt(config, args.identity.as_deref())?;
    if args.from.is_some() {
        crate::repository::fetch::set_keys(config, args.identity.as_deref())?;
    }
    restore_to(config, embedded, target, args.timeline, args.from.as_deref()).await
}

/// The restore itself, with the cluster's lock already held (by the
/// command, or by the gateway for `OMNI_RESTORE_IF_EMPTY`).
async fn restore_to(config: &Config, embedded: &crate::config::EmbeddedConfig, target: Target, timeline: Option<u32>, from: Option<&str>) -> Result<()> {
    let data_dir = &embedded.data_dir.value;
    let mut from_repository = false;
    if let Some(url) = from {
        match fetch_from(url, config, embedded, target).await? {
            Some(done) => {
                println!("the restore from {} to {} that was cut off once its cluster was recovered is finished: {} is the restored cluster", done.url, done.target, data_dir.display());
                println!("start the gateway (`omni-gateway`) to serve the restored data");
                return Ok(());
            }
            None => from_repository = true,
        }
    }
    let restored = restore_local(config, embedded, target, timeline).await;
    if from_repository {
        crate::repository::fetch::finish(data_dir)?;
    }
    restored
}

/// The restore from the local archive (`OMNI_WAL_DIR`), where `--from` downloaded to.
async fn restore_local(config: &Config, embedded: &crate::config::EmbeddedConfig, target: Target, timeline: Option<u32>) -> Result<()> {
    let data_dir = &embedded.data_dir.value;
    let (mut bins, mut wal, mut older) = (binaries::find(embedded.bin_dir.as_deref())?, config.wal.clone(), None);
    // A time before a major upgrade: the earlier archive generation, with its major's binaries.
    if let Some((old_wal, old_bins, generation)) = crate::pitr::generation::for_restore(&config.wal, target, embedded.old_bin_dir.as_deref())? {
        println!("{target} is in the archive of the earlier {} ({}): restoring it with the PostgreSQL {} binaries in {}", generation.identity, generation.dir.display(), old_bins.major, old_bins.dir.display());
        (bins, wal, older) = (old_bins, old_wal, Some(generation.identity.major));
    }
    let account = privilege::postgres_account(&embedded.run_as)?;
    // Everything else comes from the archive: the password is the one beside
    // the data directory, or a new one when that disk was lost with it.
    let password = restore::restore_password(data_dir)?;
    if let Err(e) = restore::target_timeline(&wal.dir, target, timeline) {
        bail!("{e} (omni-gateway restore --window shows each timeline's window)");
    }
    let progress = crate::repository::fetch::progress_lines(|line| println!("restore: {line}"));
    let restored = Restore { data_dir, wal: &wal, binaries: &bins, account: &account, password: &password, progress: Some(&progress) }.run_on(target, timeline).await?;
    println!(
        "restored base backup {} and the WAL of timeline {} up to {} into {} in {:.1} s",
        restored.base_backup,
        restored.timeline,
        restored.target,
        data_dir.display(),
        restored.took.as_secs_f64()
    );
    if let Some(previous) = restored.previous {
        println!("the data directory as it was is kept at {}; `omni-gateway restore --discard-previous` deletes it", previous.display());
    }
    println!("start the gateway (`omni-gateway`) to serve the restored data");
    if let Some(major) = older {
        println!(
            "the data directory now holds a PostgreSQL {major} cluster: start the gateway with PGSERVE_BIN_DIR set to PostgreSQL {major} binaries to serve it as it is; \
             with newer binaries and PGSERVE_AUTO_UPGRADE on, the start upgrades it again (after `omni-gateway upgrade --cleanup` if the copy an earlier upgrade kept is still there)"
        );
    }
    Ok(())
}

/// `--from`: the repository's base backup and WAL into `OMNI_WAL_DIR`
/// (repository/fetch.rs: every refusal before anything is written, then the
/// download), given to PostgreSQL's account like the archive the gateway
/// writes. `Some`: the same restore, cut off once recovered, was finished instead.
async fn fetch_from(url: &str, config: &Config, embedded: &crate::config::EmbeddedConfig, target: Target) -> Result<Option<crate::repository::fetch::Interrupted>> {
    use crate::repository::fetch::{self, Begun};
    let repo = crate::repository::store::Repository::open(url)?;
    let shown = repo.display();
    let say = |line: String| println!("restore --from {shown}: {line}");
    let fetched = match fetch::begin(config, embedded, &repo, target, &say).await? {
        Begun::Finished(done) => return Ok(Some(done)),
        Begun::Downloaded(fetched) => fetched,
    };
    println!(
        "restore --from {}: base backup {} of the {} and {} WAL segments{} are in {}",
        repo.display(),
        fetched.base_backup,
        fetched.identity,
        fetched.segments,
        fetched.partial.as_ref().map_or(String::new(), |p| format!(" (and {p}.partial from its shipped chunks)")),
        config.wal.dir.display()
    );
    Ok(None)
}
