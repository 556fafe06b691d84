//! Command line of `omni-gateway`. Flags are the highest configuration layer;
//! everything else comes from `.env` and the environment (see `config`).

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use omni_gateway::config::{Config, Layers, VARS};

#[derive(Parser, Debug)]
#[command(
    name = "omni-gateway",
    version,
    about = "Runs Omni: an embedded PostgreSQL and the API worker, supervised, behind one port.",
    after_help = after_help()
)]
struct Cli {
    /// Address to listen on [OMNI_HOST]
    #[arg(long, global = true)]
    host: Option<String>,
    /// Port to listen on [OMNI_PORT]
    #[arg(long, short, global = true)]
    port: Option<String>,
    /// PostgreSQL data directory [PGSERVE_DATA_DIR]
    #[arg(long, global = true)]
    data_dir: Option<String>,
    /// Embedded PostgreSQL port, 0 = any free one [PGSERVE_PORT]
    #[arg(long, global = true)]
    pg_port: Option<String>,
    /// Throw-away cluster in RAM [PGSERVE_MEMORY_MODE]
    #[arg(long, global = true)]
    memory: bool,
    /// Directory with postgres and initdb [PGSERVE_BIN_DIR]
    #[arg(long, global = true)]
    bin_dir: Option<String>,
    /// External PostgreSQL instead of the embedded one [DATABASE_URL]
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Any variable of .env.example, e.g. --set OMNI_BACKUP_KEEP=3 (repeatable)
    #[arg(long = "set", value_name = "VAR=VALUE", global = true)]
    set: Vec<String>,
    /// What to do; without one, `run`.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the gateway (the default)
    Run,
    /// Check everything a start needs and print a table; exit 1 if something would stop a start
    Doctor,
    /// GET /health of a running gateway on OMNI_PORT; exit 0 when it answers 200 (for container HEALTHCHECKs)
    Healthcheck,
    /// Backups of the database: create, list, restore <name>, delete <name>
    Backup {
        #[command(subcommand)]
        action: omni_gateway::cli::backup::BackupCommand,
    },
    /// Import the old SQLite database (default: the one found) into the running gateway's PostgreSQL
    ImportSqlite(omni_gateway::cli::import::ImportArgs),
    /// Upgrade the embedded cluster to the binaries' PostgreSQL major (the start does it too); --check, --cleanup
    Upgrade(omni_gateway::cli::upgrade::UpgradeArgs),
    /// Point-in-time recovery from OMNI_WAL_DIR, with the gateway stopped: --to <RFC 3339 time|latest>, --window, --discard-previous
    Restore(omni_gateway::cli::restore::RestoreArgs),
}

fn after_help() -> String {
    let mut s = String::from("Configuration variables (flag > environment > .env > onboarding settings > default):\n");
    for v in VARS {
        let default = if v.default.is_empty() { String::new() } else { format!(" [default: {}]", v.default) };
        s.push_str(&format!("  {:<30} {}{}\n", v.name, v.help, default));
    }
    s
}

impl Cli {
    fn flags(&self) -> Result<BTreeMap<String, String>, String> {
        let mut m = BTreeMap::new();
        let pairs = [
            ("OMNI_HOST", &self.host),
            ("OMNI_PORT", &self.port),
            ("PGSERVE_DATA_DIR", &self.data_dir),
            ("PGSERVE_PORT", &self.pg_port),
            ("PGSERVE_BIN_DIR", &self.bin_dir),
            ("DATABASE_URL", &self.database_url),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                m.insert(k.to_string(), v.clone());
            }
        }
        if self.memory {
            m.insert("PGSERVE_MEMORY_MODE".into(), "true".into());
        }
        for kv in &self.set {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("--set {kv:?}: expected VAR=VALUE"))?;
            m.insert(k.trim().to_string(), v.to_string());
        }
        Ok(m)
    }
}

fn main() -> ExitCode {
    // PostgreSQL's restore_command for an encrypted archive, run as its
    // account: no configuration, no logging setup (pitr/sealed.rs).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("restore-wal") {
        return ExitCode::from(omni_gateway::pitr::sealed::restore_wal_main(&args[2..]));
    }
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) if matches!(cli.command, Some(Command::Doctor)) => {
            print!("{}", omni_gateway::cli::doctor::configuration_failed(&e).render());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("omni-gateway: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let ring = omni_gateway::serve::logring::LogRing::new();
    for secret in config.api_key.iter() {
        ring.add_secret(secret);
    }
    let database_url = match &config.database {
        omni_gateway::config::Database::External { url } => Some(url.as_str()),
        omni_gateway::config::Database::Embedded(_) => None,
    };
    for url in [database_url, config.replication_url.as_deref()].into_iter().flatten() {
        ring.add_url_secret(url);
    }
    omni_gateway::serve::logring::install(ring.clone());
    omni_contract::logging::init_with(&config.log_level, config.log_format, Some(Box::new(ring.layer())));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("omni-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Doctor) => return runtime.block_on(doctor(&config)),
        Some(Command::Healthcheck) => return runtime.block_on(healthcheck(&config)),
        Some(Command::Backup { action }) => return runtime.block_on(backup(&config, action)),
        Some(Command::ImportSqlite(args)) => return runtime.block_on(import_sqlite(&config, args)),
        Some(Command::Upgrade(args)) => return runtime.block_on(upgrade(&config, args)),
        Some(Command::Restore(args)) => return runtime.block_on(restore(&config, args)),
        Some(Command::Run) | None => {}
    }
    match runtime.block_on(omni_gateway::app::run(config)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn doctor(config: &Config) -> ExitCode {
    let report = omni_gateway::cli::doctor::run(config).await;
    print!("{}", report.render());
    if report.has_failures() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A subcommand's outcome as the exit code, its error on stderr under its name.
fn exit_code(command: &str, outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("omni-gateway {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn healthcheck(config: &Config) -> ExitCode {
    exit_code("healthcheck", omni_gateway::cli::doctor::healthcheck(config).await)
}

async fn backup(config: &Config, action: omni_gateway::cli::backup::BackupCommand) -> ExitCode {
    exit_code("backup", omni_gateway::cli::backup::run(config, action).await)
}

async fn import_sqlite(config: &Config, args: omni_gateway::cli::import::ImportArgs) -> ExitCode {
    exit_code("import-sqlite", omni_gateway::cli::import::run(config, args).await)
}

async fn upgrade(config: &Config, args: omni_gateway::cli::upgrade::UpgradeArgs) -> ExitCode {
    exit_code("upgrade", omni_gateway::cli::upgrade::run(config, args).await)
}

async fn restore(config: &Config, args: omni_gateway::cli::restore::RestoreArgs) -> ExitCode {
    exit_code("restore", omni_gateway::cli::restore::run(config, args).await)
}

fn load(cli: &Cli) -> Result<Config, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
    let layers = Layers::from_process(&cwd, cli.flags()?).map_err(|e| e.to_string())?;
    let config = Config::parse(layers, &cwd).map_err(|e| e.to_string())?;
    omni_gateway::app::check_features(&config).map_err(|e| e.to_string())?;
    Ok(config)
}
