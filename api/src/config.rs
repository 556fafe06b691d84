//! Worker configuration, read once from the environment at start.
//!
//! The gateway starts the worker and passes everything as environment
//! variables; a bad value stops the worker with a message naming the variable,
//! so an operator never gets a worker running with a half-understood setting.
//! Relative paths are resolved against the working directory here, once, and
//! logged as absolute paths.

use std::{
    net::SocketAddr,
    os::fd::RawFd,
    path::{Path, PathBuf},
};

/// Connections to PostgreSQL. More than a few per core only adds contention:
/// requests wait briefly for a connection instead of PostgreSQL switching
/// between many busy backends.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// Where the worker takes its listening socket from.
#[derive(Debug, Clone)]
pub enum Listen {
    /// Bind this address ourselves (`OMNI_API_LISTEN`).
    Bind(SocketAddr),
    /// Use a socket the gateway already bound and put into listening state
    /// (`OMNI_API_LISTEN_FD`): the gateway picks the port, so there is no
    /// window in which another process could take it.
    InheritedFd(RawFd),
}

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The PostgreSQL the worker owns the schema of (`DATABASE_URL`).
    pub database_url: String,
    pub listen: Listen,
    /// A fixed key from the operator (`OMNI_API_KEY`); when absent the worker
    /// generates one on first start and keeps it in the database.
    pub api_key: Option<String>,
    /// Directory of the UI files served for every non-API path (`OMNI_UI_DIR`).
    pub ui_dir: PathBuf,
    /// Where backups go (`OMNI_BACKUP_DIR`); used by the backup API (issue 5).
    pub backup_dir: PathBuf,
    /// Directory holding `pg_dump`/`psql` (`PGSERVE_BIN_DIR`), for backups.
    pub pg_bin_dir: Option<PathBuf>,
    /// Newest backups kept after each create, 0 = all (`OMNI_BACKUP_KEEP`).
    pub backup_keep: usize,
    /// How often to take a backup (`OMNI_BACKUP_INTERVAL`); off when unset.
    pub backup_interval: Option<std::time::Duration>,
    /// When set, `POST /setup/initialize` also writes the storage settings
    /// here, because the gateway needs them before PostgreSQL is running.
    pub settings_file: Option<PathBuf>,
    /// Directory the SPEC §6 SQLite paths are relative to (`OMNI_DATA_ROOT`,
    /// default: the working directory).
    pub data_root: PathBuf,
    /// The gateway that supervises this worker (`OMNI_GATEWAY_URL`, e.g.
    /// `http://127.0.0.1:8882`); the event stream relays its component states.
    pub gateway_url: Option<String>,
    /// Most connections the pool opens (`OMNI_API_DB_POOL_SIZE`).
    pub pool_size: usize,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// A configuration error, always naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

fn invalid(variable: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { variable, message: message.into() }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests can pass a map.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let cwd = std::env::current_dir()
            .map_err(|e| invalid("OMNI_DATA_ROOT", format!("cannot read the working directory: {e}")))?;
        let path = |name: &'static str, default: &str| absolute(&cwd, get(name).as_deref().unwrap_or(default));

        let database_url = get("DATABASE_URL").ok_or_else(|| {
            invalid("DATABASE_URL", "not set; give the PostgreSQL URL, e.g. postgres://user@127.0.0.1:5432/omni")
        })?;
        database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid("DATABASE_URL", format!("not a valid PostgreSQL URL: {e}")))?;

        let listen = match get("OMNI_API_LISTEN_FD") {
            Some(fd) => Listen::InheritedFd(
                fd.parse::<RawFd>()
                    .ok()
                    .filter(|fd| *fd >= 0)
                    .ok_or_else(|| invalid("OMNI_API_LISTEN_FD", format!("{fd:?} is not a file descriptor number")))?,
            ),
            None => {
                let addr = get("OMNI_API_LISTEN").unwrap_or_else(|| "127.0.0.1:8883".to_owned());
                Listen::Bind(addr.parse().map_err(|_| {
                    invalid("OMNI_API_LISTEN", format!("{addr:?} is not host:port, e.g. 127.0.0.1:8883"))
                })?)
            }
        };

        let api_key = get("OMNI_API_KEY");
        if let Some(key) = &api_key {
            if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid("OMNI_API_KEY", "must be at least 16 printable ASCII characters without spaces"));
            }
        }

        let log_level = get("LOG_LEVEL").unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(invalid("LOG_LEVEL", format!("{log_level:?} is not one of error, warn, info, debug, trace")));
        }
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid("LOG_FORMAT", format!("{other:?} is neither \"pretty\" nor \"json\""))),
        };

        let pool_size = match get("OMNI_API_DB_POOL_SIZE") {
            None => DEFAULT_POOL_SIZE,
            Some(text) => text.parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| {
                invalid("OMNI_API_DB_POOL_SIZE", format!("{text:?} is not a number of connections between 1 and 1000"))
            })?,
        };

        let backup_keep = match get("OMNI_BACKUP_KEEP") {
            None => 7,
            Some(text) => text
                .parse()
                .map_err(|_| invalid("OMNI_BACKUP_KEEP", format!("{text:?} is not a whole number of backups (0 keeps all)")))?,
        };
        let backup_interval = match get("OMNI_BACKUP_INTERVAL") {
            None => None,
            Some(text) => Some(crate::backups::schedule::parse_interval(&text).ok_or_else(|| {
                invalid("OMNI_BACKUP_INTERVAL", format!("{text:?} is not a duration such as 30m, 6h, 1d or 3600s"))
            })?),
        };

        Ok(Config {
            database_url,
            listen,
            api_key,
            ui_dir: path("OMNI_UI_DIR", "./ui-dist"),
            backup_dir: path("OMNI_BACKUP_DIR", "./data/backups"),
            pg_bin_dir: get("PGSERVE_BIN_DIR").map(|dir| absolute(&cwd, &dir)),
            backup_keep,
            backup_interval,
            settings_file: get("OMNI_SETTINGS_FILE").map(|file| absolute(&cwd, &file)),
            data_root: path("OMNI_DATA_ROOT", "."),
            gateway_url: match get("OMNI_GATEWAY_URL") {
                None => None,
                Some(url) if url.starts_with("http://") && url.len() > "http://".len() => Some(url.trim_end_matches('/').to_owned()),
                Some(url) => return Err(invalid("OMNI_GATEWAY_URL", format!("{url:?} is not an http:// URL such as http://127.0.0.1:8882"))),
            },
            pool_size,
            log_level,
            log_format,
        })
    }
}

/// Resolves `path` against `base` and removes `.` components, so logs show
/// exactly which directory is meant.
fn absolute(base: &Path, path: &str) -> PathBuf {
    base.join(path).components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    const URL: (&str, &str) = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres");

    #[test]
    fn requires_database_url() {
        assert_eq!(config(&[]).unwrap_err().variable, "DATABASE_URL");
    }

    #[test]
    fn names_the_variable_of_a_bad_value() {
        for (variable, value) in [
            ("OMNI_API_LISTEN", "localhost"),
            ("OMNI_API_LISTEN_FD", "three"),
            ("OMNI_API_KEY", "short"),
            ("LOG_FORMAT", "xml"),
            ("LOG_LEVEL", "loud=[["),
            ("OMNI_API_DB_POOL_SIZE", "0"),
            ("OMNI_BACKUP_KEEP", "many"),
            ("OMNI_BACKUP_INTERVAL", "often"),
        ] {
            let err = config(&[URL, (variable, value)]).unwrap_err();
            assert_eq!(err.variable, variable, "{err}");
        }
    }

    #[test]
    fn defaults_are_absolute() {
        let config = config(&[URL]).unwrap();
        assert!(config.ui_dir.is_absolute() && config.ui_dir.ends_with("ui-dist"));
        assert!(matches!(config.listen, Listen::Bind(addr) if addr.port() == 8883));
        assert_eq!(config.log_format, LogFormat::Pretty);
    }
}
