//! The relay's settings, `PGSERVE_REPLICATION_*`, parsed by the relay from
//! the configuration's layers (the configuration itself knows nothing of
//! the relay).

use super::tls;
use crate::pg::cluster::APP_DATABASE;
use crate::config::{Config, ConfigError, Database};

/// `PGSERVE_REPLICATION_*`, parsed.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// The target server and the database `omni` replicates into (secret: never logged).
    pub url: String,
    /// `PGSERVE_REPLICATION_DATABASES` as written; empty = `omni` alone.
    pub databases: Vec<String>,
    /// `PGSERVE_REPLICATION_MAX_WAL_MB`: the most WAL the relay's slot may hold.
    pub max_wal_mb: u64,
}

impl ReplicationConfig {
    /// Checks the URL: `postgres://` and readable by the client library.
    pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("expected a URL starting with postgres:// or postgresql://".into());
        }
        let (url, tls) = tls::split_url(url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        tls::configure(&mut config, &tls);
        if config.get_dbname().is_none() {
            return Err("the URL must name the database omni replicates into (postgres://user:password@host:5432/DATABASE)".into());
        }
        if config.get_user().is_none() {
            return Err("the URL must name a user (postgres://USER:password@host:5432/database)".into());
        }
        Ok(config)
    }

    /// The URL's TLS settings (`sslmode`, `sslrootcert`).
    pub fn tls(&self) -> Result<tls::TargetTls, String> {
        tls::split_url(&self.url).map(|(_, t)| t)
    }

    /// `host:port/database`, what the status shows of the target.
    pub fn display_target(&self) -> String {
        match Self::parse_url(&self.url) {
            Ok(c) => {
                let host = match c.get_hosts().first() {
                    Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                    Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                    None => "localhost".into(),
                };
                format!("{host}:{}/{}", c.get_ports().first().copied().unwrap_or(5432), c.get_dbname().unwrap_or(""))
            }
            Err(_) => omni_contract::redact::url_password(&self.url),
        }
    }

    /// `*` in `PGSERVE_REPLICATION_DATABASES`: every database of the
    /// embedded cluster that is not a template (resolved at each start).
    pub fn wants_every_database(&self) -> bool {
        self.databases.iter().any(|d| d == "*")
    }

    /// The embedded databases to replicate when they are named: the app
    /// database always, then the list in its order, without repeats.
    pub fn named_databases(&self) -> Vec<String> {
        let mut out = vec![APP_DATABASE.to_string()];
        for d in &self.databases {
            if d != "*" && !out.contains(d) {
                out.push(d.clone());
            }
        }
        out
    }

    /// Where the embedded database `db` goes on the target server: the app
    /// database into the URL's database, every other into the database of
    /// the same name. `Err` when that would share a target database with
    /// the app database (two databases' tables in one would collide).
    pub fn target_database(&self, db: &str) -> Result<String, String> {
        let url_db = Self::parse_url(&self.url)?.get_dbname().unwrap_or_default().to_string();
        if db == APP_DATABASE {
            return Ok(url_db);
        }
        if db == url_db {
            return Err(format!(
                "the embedded database {db} would be replicated into {db} on the target, which PGSERVE_REPLICATION_URL already gives to the app database {APP_DATABASE}: point the URL at another database, or leave {db} out of PGSERVE_REPLICATION_DATABASES"
            ));
        }
        Ok(db.to_string())
    }

    /// Checks the list as written (the `doctor` and start-up check).
    pub fn check_databases(&self) -> Result<(), String> {
        for d in &self.databases {
            if d == "*" {
                continue;
            }
            if d.len() > 63 || d.contains('\0') {
                return Err(format!("{d:?} is not a PostgreSQL database name (at most 63 bytes)"));
            }
            self.target_database(d)?;
        }
        Ok(())
    }
}

impl ReplicationConfig {
    /// `PGSERVE_REPLICATION_*`: refused beside `DATABASE_URL` (the external
    /// server's own replication is the tool there), checked otherwise.
    pub fn parse(config: &Config) -> Result<Option<ReplicationConfig>, ConfigError> {
        let p = config.parser();
        let database = &config.database;
        let max_wal_mb: u64 = p.number("PGSERVE_REPLICATION_MAX_WAL_MB", "a whole number of megabytes")?;
        if max_wal_mb == 0 {
            return Err(p.invalid("PGSERVE_REPLICATION_MAX_WAL_MB", "must be at least 1"));
        }
        let Some(url) = p.string("PGSERVE_REPLICATION_URL") else { return Ok(None) };
        if matches!(database, Database::External { .. }) {
            return Err(ConfigError::Invalid {
                var: "PGSERVE_REPLICATION_URL",
                value: omni_contract::redact::url_password(&url),
                origin: p.raw("PGSERVE_REPLICATION_URL").1,
                problem: "replication relays the embedded PostgreSQL; with DATABASE_URL set there is none. Use the external server's own replication, and unset PGSERVE_REPLICATION_URL".into(),
            });
        }
        if let Err(problem) = ReplicationConfig::parse_url(&url) {
            return Err(ConfigError::Invalid {
                var: "PGSERVE_REPLICATION_URL",
                value: omni_contract::redact::url_password(&url),
                origin: p.raw("PGSERVE_REPLICATION_URL").1,
                problem,
            });
        }
        let databases = p
            .string("PGSERVE_REPLICATION_DATABASES")
            .map(|s| s.split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect())
            .unwrap_or_default();
        let config = ReplicationConfig { url, databases, max_wal_mb };
        if let Err(problem) = config.check_databases() {
            return Err(p.invalid("PGSERVE_REPLICATION_DATABASES", problem));
        }
        Ok(Some(config))
    }
}
