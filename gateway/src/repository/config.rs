//! The repository's settings, `OMNI_REPOSITORY_*`, parsed by the repository
//! from the configuration's layers (the configuration itself knows nothing
//! of it). A bad value stops the start (exit 2) naming the variable, and
//! `doctor` shows the same message.
//!
//! Encryption (`OMNI_ENCRYPT_RECIPIENTS`, `OMNI_ENCRYPT_RECIPIENTS_FILE`,
//! `OMNI_ENCRYPT_PASSPHRASE_FILE`), the restore's key
//! (`OMNI_DECRYPT_IDENTITY_FILE`) and the heartbeat
//! (`OMNI_BACKUP_HEARTBEAT_URL`, `OMNI_BACKUP_HEARTBEAT_INTERVAL`) are read
//! here too, from the environment, then `.env`, then the settings file
//! ([`setting`]); a relative path is taken from the working directory.

use std::path::PathBuf;
use std::time::Duration;

use super::store::{Location, URL_VAR};
use super::crypt::{EncryptSettings, Encryption};
use crate::config::{Config, ConfigError, Origin};

/// `OMNI_REPOSITORY_*`, parsed.
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// Where the repository is; `None`: no off-site copy.
    pub location: Option<Location>,
    /// `OMNI_REPOSITORY_WAL_INTERVAL`: between two shipping rounds.
    pub wal_interval: Duration,
    /// `OMNI_REPOSITORY_QUEUE_MAX_MB`, in bytes: past it the status warns loudly.
    pub queue_max_bytes: u64,
    /// `OMNI_REPOSITORY_WINDOW` (else `OMNI_PITR_WINDOW`): what retention in
    /// the repository keeps.
    pub window: Duration,
    /// `OMNI_REPOSITORY_DELETE`: false deletes nothing there, ever.
    pub delete: bool,
    /// `OMNI_ENCRYPT_*`: what every object is encrypted to (`Off`: plain).
    pub encryption: Encryption,
    /// `OMNI_DECRYPT_IDENTITY_FILE`: the private key restores decrypt with.
    pub identity_file: Option<PathBuf>,
    /// `OMNI_BACKUP_HEARTBEAT_URL` (its secret part is never shown).
    pub heartbeat_url: Option<String>,
    /// `OMNI_BACKUP_HEARTBEAT_INTERVAL` (default 1h).
    pub heartbeat_interval: Duration,
}

/// A setting of the repository's own, from the configuration's layers
/// (`--set`, the environment, `.env`, the settings file, then its default in
/// `config::VARS`); `None` when empty.
pub fn setting(config: &Config, var: &'static str) -> Option<(String, Origin)> {
    let (value, origin) = config.layers.lookup(var);
    (!value.trim().is_empty()).then(|| (value.trim().to_string(), origin))
}

fn invalid(config: &Config, var: &'static str, problem: impl Into<String>) -> ConfigError {
    let (value, origin) = setting(config, var).unwrap_or((String::new(), Origin::Default));
    ConfigError::Invalid { var, value, origin, problem: problem.into() }
}

fn path_setting(config: &Config, var: &'static str) -> Option<PathBuf> {
    setting(config, var).map(|(v, _)| config.cwd.join(v))
}

/// `OMNI_ENCRYPT_*` as set (paths resolved, nothing read).
pub fn encrypt_settings(config: &Config) -> EncryptSettings {
    EncryptSettings {
        recipients: setting(config, "OMNI_ENCRYPT_RECIPIENTS").map(|(v, _)| v),
        recipients_file: path_setting(config, "OMNI_ENCRYPT_RECIPIENTS_FILE"),
        passphrase_file: path_setting(config, "OMNI_ENCRYPT_PASSPHRASE_FILE"),
    }
}

/// With `OMNI_ENCRYPT_LOCAL=true`, what the logical backups are sealed to
/// (the worker's `backup_encrypt`, the backup CLI's); `None`: plain.
pub fn logical_encryption(config: &Config) -> Option<EncryptSettings> {
    config.wal.encrypt_local.then(|| encrypt_settings(config))
}

/// The encryption settings alone (also for `restore`, which needs no repository settings).
pub fn encryption(config: &Config) -> Result<Encryption, ConfigError> {
    let settings = encrypt_settings(config);
    Encryption::from_settings(&settings).map_err(|e| {
        let text = e.to_string();
        let var = ["OMNI_ENCRYPT_RECIPIENTS_FILE", "OMNI_ENCRYPT_PASSPHRASE_FILE", "OMNI_ENCRYPT_RECIPIENTS"].into_iter().find(|v| text.contains(v)).unwrap_or("OMNI_ENCRYPT_RECIPIENTS");
        invalid(config, var, text)
    })
}

/// `OMNI_ENCRYPT_LOCAL=true` needs something to encrypt to: refused
/// before anything starts when no `OMNI_ENCRYPT_*` is set.
pub fn check_local_encryption(config: &Config) -> Result<(), ConfigError> {
    if config.wal.encrypt_local && !encryption(config)?.is_on() {
        let (value, origin) = config.layers.lookup("OMNI_ENCRYPT_LOCAL");
        return Err(ConfigError::Invalid {
            var: "OMNI_ENCRYPT_LOCAL",
            value,
            origin,
            problem: "it encrypts the local copies to the off-site backups' keys, and none is set: set OMNI_ENCRYPT_RECIPIENTS (age public keys), OMNI_ENCRYPT_RECIPIENTS_FILE or OMNI_ENCRYPT_PASSPHRASE_FILE, or set OMNI_ENCRYPT_LOCAL=false".into(),
        });
    }
    Ok(())
}

/// This process's side of `OMNI_ENCRYPT_LOCAL` (`pitr/sealed.rs`): the
/// archive is sealed to `OMNI_ENCRYPT_*` when it is on, and opened with
/// `identity` (`--identity`), else `OMNI_DECRYPT_IDENTITY_FILE`, when one
/// is given. An identity file that cannot be read is an error naming it.
pub fn local_crypt(config: &Config, identity: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (path, variable) = match identity {
        Some(p) => (Some(p.to_path_buf()), "--identity"),
        None => (identity_file(config), "OMNI_DECRYPT_IDENTITY_FILE"),
    };
    if let Some(path) = path {
        crate::pitr::sealed::set_keys(Some(super::crypt::Keys::load(&path, variable)?));
    }
    if config.wal.encrypt_local {
        let encryption = encryption(config)?;
        let to = encryption.sealer().map(|s| s.describe()).unwrap_or_else(|e| e.to_string());
        if config.wal.enabled {
            tracing::info!("OMNI_ENCRYPT_LOCAL: base backups and completed WAL segments in {} and the logical backups of {} are kept encrypted ({to}); restores need OMNI_DECRYPT_IDENTITY_FILE or --identity", config.wal.dir.display(), config.backup_dir.display());
        } else {
            tracing::info!("OMNI_ENCRYPT_LOCAL: the logical backups of {} are kept encrypted ({to}; there is no WAL archive, OMNI_WAL_DIR=off); restores need OMNI_DECRYPT_IDENTITY_FILE or --identity", config.backup_dir.display());
        }
        crate::pitr::sealed::set_encryption(encryption);
    }
    Ok(())
}

/// `OMNI_DECRYPT_IDENTITY_FILE`, when set.
pub fn identity_file(config: &Config) -> Option<PathBuf> {
    path_setting(config, "OMNI_DECRYPT_IDENTITY_FILE")
}

/// The repository's URL as shown (`OMNI_REPOSITORY_URL`, parsed), when one
/// is set and valid: the one logical backups are confirmed in
/// (`<name>.uploaded`) before their retention deletes them, in the worker
/// (`OMNI_BACKUP_REPOSITORY`), the backup CLI and the shipper alike.
pub fn shown_url(config: &Config) -> Option<String> {
    let (url, _) = setting(config, URL_VAR)?;
    Location::parse(&url).ok().map(|l| l.display())
}

/// Whether `location` is a public cloud's store: s3://, gs:// or az://
/// without an endpoint of its own (`AWS_ENDPOINT_URL`, an emulator).
pub fn is_public_cloud(location: &Location) -> bool {
    let set = |v: &str| std::env::var(v).is_ok_and(|x| !x.trim().is_empty());
    match location.scheme {
        super::store::Scheme::S3 => !set("AWS_ENDPOINT_URL") && !set("AWS_ENDPOINT"),
        super::store::Scheme::Gcs => !set("GOOGLE_BASE_URL") && !set("STORAGE_EMULATOR_HOST"),
        super::store::Scheme::Azure => !std::env::var("AZURE_STORAGE_USE_EMULATOR").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) && !set("AZURE_STORAGE_ENDPOINT") && !set("AZURITE_BLOB_STORAGE_URL"),
        super::store::Scheme::File => false,
    }
}

impl RepositoryConfig {
    pub fn parse(config: &Config) -> Result<RepositoryConfig, ConfigError> {
        let p = config.parser();
        let location = match p.string(URL_VAR) {
            None => None,
            Some(url) => Some(Location::parse(&url).map_err(|problem| p.invalid(URL_VAR, problem))?),
        };
        let (interval, _) = p.raw("OMNI_REPOSITORY_WAL_INTERVAL");
        let wal_interval = parse_interval(&interval).ok_or_else(|| p.invalid("OMNI_REPOSITORY_WAL_INTERVAL", "expected a duration from 100ms to 1h, such as 1s, 500ms or 1m"))?;
        let queue_max_mb: u64 = p.number("OMNI_REPOSITORY_QUEUE_MAX_MB", "a whole number of megabytes")?;
        if queue_max_mb == 0 {
            return Err(p.invalid("OMNI_REPOSITORY_QUEUE_MAX_MB", "must be at least 1"));
        }
        let window = match p.string("OMNI_REPOSITORY_WINDOW") {
            None => config.wal.window,
            Some(w) => omni_contract::interval::parse(&w).ok_or_else(|| p.invalid("OMNI_REPOSITORY_WINDOW", "expected a duration such as 30d, 7d or 36h"))?,
        };
        let delete = match p.raw("OMNI_REPOSITORY_DELETE").0.trim() {
            "" => true,
            _ => p.bool("OMNI_REPOSITORY_DELETE")?,
        };
        // The cloud stores' settings of the environment (AWS_*, GOOGLE_*,
        // AZURE_*) are read now too: a bad one stops the start, not the first upload.
        if let Some(l) = location.as_ref().filter(|l| l.scheme != super::store::Scheme::File) {
            super::store::Repository::open_location(l.clone()).map_err(|e| p.invalid(URL_VAR, e.to_string().trim_start_matches(&format!("{URL_VAR}: ")).to_string()))?;
        }
        let encryption = encryption(config)?;
        let heartbeat_interval = match setting(config, "OMNI_BACKUP_HEARTBEAT_INTERVAL") {
            None => Duration::from_secs(3600),
            Some((v, _)) => omni_contract::interval::parse(&v)
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| invalid(config, "OMNI_BACKUP_HEARTBEAT_INTERVAL", "expected a duration of at least 1s, such as 1h, 30m or 10s"))?,
        };
        let heartbeat_url = setting(config, "OMNI_BACKUP_HEARTBEAT_URL").map(|(v, _)| v);
        if let Some(url) = &heartbeat_url {
            super::heartbeat::Heartbeat::new(url, heartbeat_interval).map_err(|problem| {
                // The value holds the monitor's secret: it is not repeated.
                ConfigError::Invalid { var: "OMNI_BACKUP_HEARTBEAT_URL", value: super::heartbeat::shown(url), origin: Origin::Environment, problem }
            })?;
        }
        Ok(RepositoryConfig {
            location,
            wal_interval,
            queue_max_bytes: queue_max_mb * 1024 * 1024,
            window,
            delete,
            encryption,
            identity_file: identity_file(config),
            heartbeat_url,
            heartbeat_interval,
        })
    }
}

/// `500ms`, `1s`, `1m` (and the `interval` forms): from 100 ms to 1 h.
pub fn parse_interval(text: &str) -> Option<Duration> {
    let text = text.trim();
    let d = match text.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.parse().ok()?),
        None => omni_contract::interval::parse(text)?,
    };
    (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_from_100ms_to_an_hour() {
        assert_eq!(parse_interval("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_interval("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_interval("1m"), Some(Duration::from_secs(60)));
        for bad in ["", "0s", "50ms", "2h", "fast", "1.5s"] {
            assert_eq!(parse_interval(bad), None, "{bad}");
        }
    }
}
