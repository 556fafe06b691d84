//! What the gateway hands the worker: one typed value, one validator.
//!
//! The gateway builds a [`WorkerSettings`] from its own configuration and
//! writes it into the worker's environment with [`WorkerSettings::to_env`];
//! the worker reads it back with [`WorkerSettings::from_env`]. Both sides
//! use the same names ([`vars`]) and the same checks ([`check`]), so a value
//! the worker would reject is rejected by the gateway (and `doctor`) before
//! anything starts, naming the variable. The worker also runs on its own
//! (tests, `DATABASE_URL` deployments): then the operator sets the same
//! variables by hand.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::logging::LogFormat;
use crate::{interval, paths};

/// The environment variables of the boundary.
pub mod vars {
    pub const DATABASE_URL: &str = "DATABASE_URL";
    pub const LISTEN: &str = "OMNI_API_LISTEN";
    pub const LISTEN_FD: &str = "OMNI_API_LISTEN_FD";
    pub const READY_FD: &str = "OMNI_API_READY_FD";
    pub const START_FD: &str = "OMNI_API_START_FD";
    pub const API_KEY: &str = "OMNI_API_KEY";
    pub const UI_DIR: &str = "OMNI_UI_DIR";
    pub const BACKUP_DIR: &str = "OMNI_BACKUP_DIR";
    pub const PG_BIN_DIR: &str = "PGSERVE_BIN_DIR";
    pub const BACKUP_KEEP: &str = "OMNI_BACKUP_KEEP";
    pub const BACKUP_INTERVAL: &str = "OMNI_BACKUP_INTERVAL";
    pub const BACKUP_REPOSITORY: &str = "OMNI_BACKUP_REPOSITORY";
    pub const SETTINGS_FILE: &str = "OMNI_SETTINGS_FILE";
    pub const DATA_ROOT: &str = "OMNI_DATA_ROOT";
    pub const GATEWAY_URL: &str = "OMNI_GATEWAY_URL";
    pub const GATEWAY_TOKEN: &str = "OMNI_GATEWAY_TOKEN";
    pub const SETUP_TOKEN: &str = "OMNI_SETUP_TOKEN";
    pub const PUBLIC_URL: &str = "OMNI_PUBLIC_URL";
    pub const POOL_SIZE: &str = "OMNI_API_DB_POOL_SIZE";
    pub const LOG_LEVEL: &str = "LOG_LEVEL";
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    pub const ENCRYPT_LOCAL: &str = "OMNI_ENCRYPT_LOCAL";
    pub const ENCRYPT_RECIPIENTS: &str = "OMNI_ENCRYPT_RECIPIENTS";
    pub const ENCRYPT_RECIPIENTS_FILE: &str = "OMNI_ENCRYPT_RECIPIENTS_FILE";
    pub const ENCRYPT_PASSPHRASE_FILE: &str = "OMNI_ENCRYPT_PASSPHRASE_FILE";
    pub const DECRYPT_IDENTITY_FILE: &str = "OMNI_DECRYPT_IDENTITY_FILE";
    pub const DECRYPT_IDENTITY_FD: &str = "OMNI_DECRYPT_IDENTITY_FD";

    /// Every variable the worker reads. The gateway removes these from what
    /// it passes on, then writes its own values, so a stray one in the
    /// gateway's environment never reaches the worker unchecked.
    pub const ALL: [&str; 27] = [
        DATABASE_URL, LISTEN, LISTEN_FD, READY_FD, START_FD, API_KEY, UI_DIR, BACKUP_DIR, PG_BIN_DIR, BACKUP_KEEP, BACKUP_INTERVAL,
        BACKUP_REPOSITORY, SETTINGS_FILE, DATA_ROOT, GATEWAY_URL, POOL_SIZE, LOG_LEVEL, LOG_FORMAT, GATEWAY_TOKEN, SETUP_TOKEN, PUBLIC_URL,
        ENCRYPT_LOCAL, ENCRYPT_RECIPIENTS, ENCRYPT_RECIPIENTS_FILE, ENCRYPT_PASSPHRASE_FILE, DECRYPT_IDENTITY_FILE, DECRYPT_IDENTITY_FD,
    ];
}

/// Connections to PostgreSQL. More than a few per core only adds contention:
/// requests wait briefly for a connection instead of PostgreSQL switching
/// between many busy backends.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// Newest backups kept after each create when `OMNI_BACKUP_KEEP` is unset.
pub const DEFAULT_BACKUP_KEEP: usize = 7;
/// Where a worker started by hand listens.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8883";

/// Where the worker takes its listening socket from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Bind this address itself (`OMNI_API_LISTEN`).
    Bind(std::net::SocketAddr),
    /// Use a socket the gateway already bound and put into listening state
    /// (`OMNI_API_LISTEN_FD`): the gateway picks the port, so there is no
    /// window in which another process could take it.
    InheritedFd(RawFd),
}

/// Everything the worker is told at start.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// The PostgreSQL the worker owns the schema of (`DATABASE_URL`).
    pub database_url: String,
    pub listen: Listen,
    /// Where to announce readiness (`OMNI_API_READY_FD`): the worker writes a
    /// newline there once it serves, and closes it. Set by the gateway, so it
    /// need not poll; absent when the worker runs on its own.
    pub ready_fd: Option<RawFd>,
    /// A pipe to wait on before connecting to the database
    /// (`OMNI_API_START_FD`): a newline there means "the database accepts
    /// connections now", the pipe closing without one means "give up" (the
    /// worker exits 0). The gateway starts the worker while PostgreSQL is
    /// still starting, so the worker's own start overlaps PostgreSQL's;
    /// absent, the worker connects at once.
    pub start_fd: Option<RawFd>,
    /// A fixed key from the operator (`OMNI_API_KEY`); when absent the worker
    /// generates one on first start and keeps it in the database.
    pub api_key: Option<String>,
    /// Directory of the UI files served for every non-API path
    /// (`OMNI_UI_DIR`, read from disk at each request: development); `None`
    /// serves the UI built into omni-api.
    pub ui_dir: Option<PathBuf>,
    /// Where backups go (`OMNI_BACKUP_DIR`).
    pub backup_dir: PathBuf,
    /// Directory holding `pg_dump`/`psql` (`PGSERVE_BIN_DIR`); `PATH` when unset.
    pub pg_bin_dir: Option<PathBuf>,
    /// Newest backups kept after each create, 0 = all (`OMNI_BACKUP_KEEP`).
    pub backup_keep: usize,
    /// How often to take a backup (`OMNI_BACKUP_INTERVAL`); off when unset.
    pub backup_interval: Option<Duration>,
    /// The off-site repository the gateway uploads every backup to, its URL
    /// as shown (`OMNI_BACKUP_REPOSITORY`, from the gateway's
    /// `OMNI_REPOSITORY_URL`): retention keeps a backup until its upload
    /// there is confirmed. Unset: no off-site copy.
    pub backup_repository: Option<String>,
    /// `OMNI_ENCRYPT_LOCAL=true`: backups are sealed with age to the
    /// recipients of `OMNI_ENCRYPT_RECIPIENTS`, `OMNI_ENCRYPT_RECIPIENTS_FILE`
    /// or `OMNI_ENCRYPT_PASSPHRASE_FILE` (public keys: nothing here can
    /// decrypt them). `None`: written plain.
    pub backup_encrypt: Option<crate::crypt::EncryptSettings>,
    /// `OMNI_DECRYPT_IDENTITY_FILE`: the private key a restore of a sealed
    /// backup decrypts with (read when one is restored, by this account).
    pub decrypt_identity_file: Option<PathBuf>,
    /// That file, opened by the gateway (`OMNI_DECRYPT_IDENTITY_FD`): a
    /// private key is often root's alone, and the worker runs as
    /// `OMNI_API_USER`. Read once at start.
    pub decrypt_identity_fd: Option<RawFd>,
    /// When set, `POST /setup/initialize` also writes the storage settings
    /// here, because the gateway needs them before PostgreSQL is running.
    pub settings_file: Option<PathBuf>,
    /// Directory the SPEC §6 SQLite paths are relative to (`OMNI_DATA_ROOT`,
    /// default: the working directory).
    pub data_root: PathBuf,
    /// The gateway that supervises this worker (`OMNI_GATEWAY_URL`, e.g.
    /// `http://127.0.0.1:8882`); the event stream relays its component states.
    pub gateway_url: Option<String>,
    /// The secret of the gateway's internal endpoints (`OMNI_GATEWAY_TOKEN`,
    /// `/gateway/internal/…`: base backups and restores of the embedded
    /// cluster, asked for through the worker's API). Made anew at every
    /// gateway start and handed over in the environment only; never logged.
    pub gateway_token: Option<String>,
    /// The one-time setup token (`OMNI_SETUP_TOKEN`): while the install is
    /// not set up, the setup routes that create credentials or change
    /// storage need it (or a request from loopback). The gateway makes one
    /// at every start and writes it beside the data directory; a worker
    /// started without it makes its own. Logged by the worker while setup
    /// is open.
    pub setup_token: Option<String>,
    /// The address users type (`OMNI_PUBLIC_URL`, e.g.
    /// `https://omni.example.com`): its host is accepted by the Host check of
    /// setup and sign-in, besides IP addresses and `localhost`.
    pub public_url: Option<String>,
    /// Most connections the pool opens (`OMNI_API_DB_POOL_SIZE`).
    pub pool_size: usize,
    /// `LOG_LEVEL`: a level or a tracing filter.
    pub log_level: String,
    pub log_format: LogFormat,
}

/// A value the worker cannot run with, naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct SettingError {
    pub variable: &'static str,
    pub message: String,
}

fn invalid(variable: &'static str, message: impl Into<String>) -> SettingError {
    SettingError { variable, message: message.into() }
}

/// The checks of single values, shared by the worker's reader and the
/// gateway's configuration parser. Each returns the parsed value or a
/// message saying what is expected (the caller names the variable).
pub mod check {
    use super::*;

    pub fn database_url(url: &str) -> Result<(), String> {
        url.parse::<tokio_postgres::Config>().map(|_| ()).map_err(|e| format!("not a valid PostgreSQL URL: {e}"))
    }

    pub fn api_key(key: &str) -> Result<(), String> {
        if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be at least 16 printable ASCII characters without spaces".into());
        }
        Ok(())
    }

    pub fn log_level(level: &str) -> Result<(), String> {
        crate::logging::filter(level).map(|_| ()).map_err(|_| {
            format!("{level:?} is not one of error, warn, info, debug, trace (or a tracing filter such as info,omni_api=debug)")
        })
    }

    pub fn log_format(text: &str) -> Result<LogFormat, String> {
        LogFormat::parse(text).ok_or_else(|| format!("{text:?} is neither \"pretty\" nor \"json\""))
    }

    pub fn pool_size(text: &str) -> Result<usize, String> {
        text.trim().parse().ok().filter(|n| (1..=1000).contains(n)).ok_or_else(|| format!("{text:?} is not a number of connections between 1 and 1000"))
    }

    pub fn backup_keep(text: &str) -> Result<usize, String> {
        text.trim().parse().map_err(|_| format!("{text:?} is not a whole number of backups (0 keeps all)"))
    }

    pub fn backup_interval(text: &str) -> Result<Duration, String> {
        interval::parse(text).ok_or_else(|| format!("{text:?} is not a duration such as 30m, 6h, 1d or 3600s"))
    }

    pub fn gateway_url(url: &str) -> Result<String, String> {
        if url.starts_with("http://") && url.len() > "http://".len() {
            Ok(url.trim_end_matches('/').to_owned())
        } else {
            Err(format!("{url:?} is not an http:// URL such as http://127.0.0.1:8882"))
        }
    }

    pub fn gateway_token(token: &str) -> Result<(), String> {
        if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("must be at least 32 letters and digits (the gateway makes one at every start)".into());
        }
        Ok(())
    }

    pub fn setup_token(token: &str) -> Result<(), String> {
        if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("must be at least 32 letters and digits (the gateway makes one at every start)".into());
        }
        Ok(())
    }

    pub fn public_url(url: &str) -> Result<String, String> {
        let host = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).and_then(|rest| rest.split(['/', '?', '#']).next());
        match host {
            Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(url.trim_end_matches('/').to_owned()),
            _ => Err(format!("{url:?} is not an http:// or https:// URL such as https://omni.example.com")),
        }
    }

    pub fn flag(text: &str) -> Result<bool, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("{text:?} is neither true nor false")),
        }
    }

    /// `OMNI_ENCRYPT_LOCAL=true` needs exactly one of the three ways to encrypt.
    pub fn encrypt_settings(settings: &crate::crypt::EncryptSettings) -> Result<(), String> {
        let set = [settings.recipients.is_some(), settings.recipients_file.is_some(), settings.passphrase_file.is_some()].iter().filter(|s| **s).count();
        match set {
            1 => Ok(()),
            0 => Err("true needs OMNI_ENCRYPT_RECIPIENTS, OMNI_ENCRYPT_RECIPIENTS_FILE or OMNI_ENCRYPT_PASSPHRASE_FILE: what backups are encrypted to".into()),
            _ => Err("set only one of OMNI_ENCRYPT_RECIPIENTS, OMNI_ENCRYPT_RECIPIENTS_FILE and OMNI_ENCRYPT_PASSPHRASE_FILE".into()),
        }
    }

    pub fn fd(text: &str) -> Result<RawFd, String> {
        text.trim().parse::<RawFd>().ok().filter(|fd| *fd >= 0).ok_or_else(|| format!("{text:?} is not a file descriptor number"))
    }
}

impl WorkerSettings {
    /// Settings with every default, for `database_url`, resolved against `base`.
    pub fn new(database_url: impl Into<String>, base: &Path) -> WorkerSettings {
        WorkerSettings {
            database_url: database_url.into(),
            listen: Listen::Bind(DEFAULT_LISTEN.parse().expect("a valid default address")),
            ready_fd: None,
            start_fd: None,
            api_key: None,
            ui_dir: None,
            backup_dir: paths::absolute(base, Path::new("./data/backups")),
            pg_bin_dir: None,
            backup_keep: DEFAULT_BACKUP_KEEP,
            backup_interval: None,
            backup_repository: None,
            backup_encrypt: None,
            decrypt_identity_file: None,
            decrypt_identity_fd: None,
            settings_file: None,
            data_root: base.to_path_buf(),
            gateway_url: None,
            gateway_token: None,
            setup_token: None,
            public_url: None,
            pool_size: DEFAULT_POOL_SIZE,
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
        }
    }

    /// Reads the process environment (relative paths against the working directory).
    pub fn from_env() -> Result<WorkerSettings, SettingError> {
        let cwd = std::env::current_dir().map_err(|e| invalid(vars::DATA_ROOT, format!("cannot read the working directory: {e}")))?;
        WorkerSettings::from_lookup(|name| std::env::var(name).ok(), &cwd)
    }

    /// Reads the settings through `lookup`; an empty value counts as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>, cwd: &Path) -> Result<WorkerSettings, SettingError> {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let path = |name: &str| get(name).map(|p| paths::absolute(cwd, Path::new(&p)));
        let checked = |name: &'static str, f: &dyn Fn(&str) -> Result<(), String>| -> Result<Option<String>, SettingError> {
            match get(name) {
                Some(v) => f(&v).map(|()| Some(v)).map_err(|m| invalid(name, m)),
                None => Ok(None),
            }
        };

        let database_url = checked(vars::DATABASE_URL, &check::database_url)?
            .ok_or_else(|| invalid(vars::DATABASE_URL, "not set; give the PostgreSQL URL, e.g. postgres://user@127.0.0.1:5432/omni"))?;
        let mut s = WorkerSettings::new(database_url, cwd);
        s.listen = match get(vars::LISTEN_FD) {
            Some(fd) => Listen::InheritedFd(check::fd(&fd).map_err(|m| invalid(vars::LISTEN_FD, m))?),
            None => {
                let addr = get(vars::LISTEN).unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
                Listen::Bind(addr.parse().map_err(|_| invalid(vars::LISTEN, format!("{addr:?} is not host:port, e.g. {DEFAULT_LISTEN}")))?)
            }
        };
        s.ready_fd = get(vars::READY_FD).map(|fd| check::fd(&fd).map_err(|m| invalid(vars::READY_FD, m))).transpose()?;
        s.start_fd = get(vars::START_FD).map(|fd| check::fd(&fd).map_err(|m| invalid(vars::START_FD, m))).transpose()?;
        s.api_key = checked(vars::API_KEY, &check::api_key)?;
        if let Some(level) = checked(vars::LOG_LEVEL, &check::log_level)? {
            s.log_level = level;
        }
        if let Some(format) = get(vars::LOG_FORMAT) {
            s.log_format = check::log_format(&format).map_err(|m| invalid(vars::LOG_FORMAT, m))?;
        }
        if let Some(size) = get(vars::POOL_SIZE) {
            s.pool_size = check::pool_size(&size).map_err(|m| invalid(vars::POOL_SIZE, m))?;
        }
        if let Some(keep) = get(vars::BACKUP_KEEP) {
            s.backup_keep = check::backup_keep(&keep).map_err(|m| invalid(vars::BACKUP_KEEP, m))?;
        }
        s.backup_interval = get(vars::BACKUP_INTERVAL).map(|t| check::backup_interval(&t).map_err(|m| invalid(vars::BACKUP_INTERVAL, m))).transpose()?;
        s.backup_repository = get(vars::BACKUP_REPOSITORY).map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
        s.gateway_url = get(vars::GATEWAY_URL).map(|u| check::gateway_url(&u).map_err(|m| invalid(vars::GATEWAY_URL, m))).transpose()?;
        s.gateway_token = checked(vars::GATEWAY_TOKEN, &check::gateway_token)?;
        s.setup_token = checked(vars::SETUP_TOKEN, &check::setup_token)?;
        s.public_url = get(vars::PUBLIC_URL).map(|u| check::public_url(&u).map_err(|m| invalid(vars::PUBLIC_URL, m))).transpose()?;
        s.ui_dir = path(vars::UI_DIR);
        if let Some(dir) = path(vars::BACKUP_DIR) {
            s.backup_dir = dir;
        }
        if let Some(dir) = path(vars::DATA_ROOT) {
            s.data_root = dir;
        }
        s.pg_bin_dir = path(vars::PG_BIN_DIR);
        s.settings_file = path(vars::SETTINGS_FILE);
        if get(vars::ENCRYPT_LOCAL).map(|v| check::flag(&v).map_err(|m| invalid(vars::ENCRYPT_LOCAL, m))).transpose()?.unwrap_or(false) {
            let settings = crate::crypt::EncryptSettings {
                recipients: get(vars::ENCRYPT_RECIPIENTS),
                recipients_file: path(vars::ENCRYPT_RECIPIENTS_FILE),
                passphrase_file: path(vars::ENCRYPT_PASSPHRASE_FILE),
            };
            check::encrypt_settings(&settings).map_err(|m| invalid(vars::ENCRYPT_LOCAL, m))?;
            s.backup_encrypt = Some(settings);
        }
        s.decrypt_identity_file = path(vars::DECRYPT_IDENTITY_FILE);
        s.decrypt_identity_fd = get(vars::DECRYPT_IDENTITY_FD).map(|fd| check::fd(&fd).map_err(|m| invalid(vars::DECRYPT_IDENTITY_FD, m))).transpose()?;
        Ok(s)
    }

    /// The environment that [`from_lookup`](Self::from_lookup) reads back as
    /// these same settings. Paths must already be absolute.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![(vars::DATABASE_URL, self.database_url.clone())];
        match &self.listen {
            Listen::Bind(addr) => env.push((vars::LISTEN, addr.to_string())),
            Listen::InheritedFd(fd) => env.push((vars::LISTEN_FD, fd.to_string())),
        }
        if let Some(fd) = self.ready_fd {
            env.push((vars::READY_FD, fd.to_string()));
        }
        if let Some(fd) = self.start_fd {
            env.push((vars::START_FD, fd.to_string()));
        }
        if let Some(key) = &self.api_key {
            env.push((vars::API_KEY, key.clone()));
        }
        let path = |p: &Path| p.to_string_lossy().into_owned();
        if let Some(dir) = &self.ui_dir {
            env.push((vars::UI_DIR, path(dir)));
        }
        env.push((vars::BACKUP_DIR, path(&self.backup_dir)));
        if let Some(dir) = &self.pg_bin_dir {
            env.push((vars::PG_BIN_DIR, path(dir)));
        }
        env.push((vars::BACKUP_KEEP, self.backup_keep.to_string()));
        if let Some(every) = self.backup_interval {
            env.push((vars::BACKUP_INTERVAL, interval::format(every)));
        }
        if let Some(repository) = &self.backup_repository {
            env.push((vars::BACKUP_REPOSITORY, repository.clone()));
        }
        if let Some(encrypt) = &self.backup_encrypt {
            env.push((vars::ENCRYPT_LOCAL, "true".to_owned()));
            if let Some(keys) = &encrypt.recipients {
                env.push((vars::ENCRYPT_RECIPIENTS, keys.clone()));
            }
            if let Some(file) = &encrypt.recipients_file {
                env.push((vars::ENCRYPT_RECIPIENTS_FILE, path(file)));
            }
            if let Some(file) = &encrypt.passphrase_file {
                env.push((vars::ENCRYPT_PASSPHRASE_FILE, path(file)));
            }
        }
        if let Some(file) = &self.decrypt_identity_file {
            env.push((vars::DECRYPT_IDENTITY_FILE, path(file)));
        }
        if let Some(fd) = self.decrypt_identity_fd {
            env.push((vars::DECRYPT_IDENTITY_FD, fd.to_string()));
        }
        if let Some(file) = &self.settings_file {
            env.push((vars::SETTINGS_FILE, path(file)));
        }
        env.push((vars::DATA_ROOT, path(&self.data_root)));
        if let Some(url) = &self.gateway_url {
            env.push((vars::GATEWAY_URL, url.clone()));
        }
        if let Some(token) = &self.gateway_token {
            env.push((vars::GATEWAY_TOKEN, token.clone()));
        }
        if let Some(token) = &self.setup_token {
            env.push((vars::SETUP_TOKEN, token.clone()));
        }
        if let Some(url) = &self.public_url {
            env.push((vars::PUBLIC_URL, url.clone()));
        }
        env.push((vars::POOL_SIZE, self.pool_size.to_string()));
        env.push((vars::LOG_LEVEL, self.log_level.clone()));
        env.push((vars::LOG_FORMAT, self.log_format.as_str().to_owned()));
        env
    }

    /// Checks the settings exactly as the worker will: the gateway calls this
    /// before it starts anything.
    pub fn validate(&self) -> Result<(), SettingError> {
        let env = self.to_env();
        WorkerSettings::from_lookup(|name| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone()), Path::new("/")).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<WorkerSettings, SettingError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        WorkerSettings::from_lookup(|name| map.get(name).cloned(), Path::new("/srv/omni"))
    }

    const URL: (&str, &str) = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres");

    #[test]
    fn requires_database_url() {
        assert_eq!(read(&[]).unwrap_err().variable, "DATABASE_URL");
    }

    #[test]
    fn names_the_variable_of_a_bad_value() {
        for (variable, value) in [
            ("DATABASE_URL", "postgres://h:port/x"),
            ("OMNI_API_LISTEN", "localhost"),
            ("OMNI_API_LISTEN_FD", "three"),
            ("OMNI_API_READY_FD", "-1"),
            ("OMNI_API_START_FD", "x"),
            ("OMNI_API_KEY", "short"),
            ("OMNI_API_KEY", "sixteen chars with spaces"),
            ("LOG_FORMAT", "xml"),
            ("LOG_LEVEL", "loud=[["),
            ("OMNI_API_DB_POOL_SIZE", "0"),
            ("OMNI_BACKUP_KEEP", "many"),
            ("OMNI_BACKUP_INTERVAL", "often"),
            ("OMNI_GATEWAY_URL", "https://x"),
            ("OMNI_GATEWAY_TOKEN", "short"),
            ("OMNI_SETUP_TOKEN", "short"),
            ("OMNI_PUBLIC_URL", "omni.example.com"),
            ("OMNI_ENCRYPT_LOCAL", "maybe"),
            // Nothing to encrypt to.
            ("OMNI_ENCRYPT_LOCAL", "true"),
        ] {
            let mut vars = vec![(variable, value)];
            if variable != "DATABASE_URL" {
                vars.push(URL);
            }
            let err = read(&vars).unwrap_err();
            assert_eq!(err.variable, variable, "{err}");
        }
    }

    #[test]
    fn defaults_are_absolute() {
        let s = read(&[URL]).unwrap();
        assert_eq!(s.ui_dir, None, "the UI built into omni-api");
        assert_eq!(s.backup_dir, PathBuf::from("/srv/omni/data/backups"));
        assert!(matches!(s.listen, Listen::Bind(addr) if addr.port() == 8883));
        assert_eq!(s.log_format, LogFormat::Pretty);
        assert_eq!((s.pool_size, s.backup_keep), (DEFAULT_POOL_SIZE, DEFAULT_BACKUP_KEEP));
    }

    #[test]
    fn what_the_gateway_writes_the_worker_reads_back_unchanged() {
        let mut s = WorkerSettings::new("postgres://postgres:pw@127.0.0.1:5432/omni", Path::new("/srv/omni"));
        s.listen = Listen::InheritedFd(3);
        s.ready_fd = Some(4);
        s.start_fd = Some(5);
        s.api_key = Some("sk-omni-0123456789abcdef".into());
        s.pg_bin_dir = Some("/usr/lib/postgresql/15/bin".into());
        s.ui_dir = Some("/srv/omni/ui-dist".into());
        s.backup_keep = 0;
        s.backup_interval = Some(Duration::from_secs(6 * 3600));
        s.backup_repository = Some("s3://bucket/omni".into());
        s.backup_encrypt = Some(crate::crypt::EncryptSettings { recipients_file: Some("/etc/omni/recipients.txt".into()), ..Default::default() });
        s.decrypt_identity_file = Some("/root/key.txt".into());
        s.decrypt_identity_fd = Some(6);
        s.settings_file = Some("/srv/omni/data/omni-settings.json".into());
        s.gateway_url = Some("http://127.0.0.1:8882".into());
        s.gateway_token = Some("0123456789abcdef0123456789abcdef".into());
        s.setup_token = Some("abcdef0123456789abcdef0123456789".into());
        s.public_url = Some("https://omni.example.com".into());
        s.pool_size = 3;
        s.log_level = "debug,hyper=info".into();
        s.log_format = LogFormat::Json;
        let env = s.to_env();
        let back = WorkerSettings::from_lookup(|n| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()), Path::new("/elsewhere")).unwrap();
        assert_eq!(back, s);
        assert!(env.iter().all(|(k, _)| vars::ALL.contains(k)), "every written variable is a known one");
        s.validate().unwrap();
    }

    #[test]
    fn validate_rejects_what_the_worker_would() {
        let mut s = WorkerSettings::new("postgres://u@h/db", Path::new("/"));
        s.api_key = Some("short".into());
        assert_eq!(s.validate().unwrap_err().variable, "OMNI_API_KEY");
        s.api_key = None;
        s.log_level = "x=[[".into();
        assert_eq!(s.validate().unwrap_err().variable, "LOG_LEVEL");
    }
}
