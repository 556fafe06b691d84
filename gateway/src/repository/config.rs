//! The repository's settings, `OMNI_REPOSITORY_*`, parsed by the repository
//! from the configuration's layers (the configuration itself knows nothing
//! of it). A bad value stops the start (exit 2) naming the variable, and
//! `doctor` shows the same message.

use std::time::Duration;

use super::store::{Location, URL_VAR};
use crate::config::{Config, ConfigError};

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
        Ok(RepositoryConfig { location, wal_interval, queue_max_bytes: queue_max_mb * 1024 * 1024, window, delete })
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
