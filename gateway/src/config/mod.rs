//! Configuration: every setting the gateway reads, where it came from, and
//! what it means.
//!
//! Precedence, lowest first: built-in default < settings saved by onboarding
//! (`OMNI_SETTINGS_FILE`) < `.env` in the working directory < process
//! environment < command-line flag. Each value remembers its origin so the
//! startup log and error messages can say *why* a value is what it is: an
//! operator who gets an unexpected data directory must be able to see which
//! layer chose it.
//!
//! Parsing is strict: a port that is not a number or a boolean that is not
//! one of the usual spellings stops the program with a message that names the
//! variable. Relative paths are made absolute against the working directory
//! once, here, so nothing later depends on the working directory again.
//!
//! Layer: the bottom one; imports nothing of the crate. A feature's own
//! settings are parsed by that feature from [`Config::layers`] (the relay's
//! in `relay/config.rs`), so this module names no feature.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use omni_contract::logging::LogFormat;
use omni_contract::worker_settings::{check, WorkerSettings};
use omni_contract::paths;

/// One configurable variable: its name, default, and the line of help that
/// `.env.example` and `--help` show.
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable the gateway understands, in the order `.env.example` lists
/// them. Keeping them in one table is what keeps `.env.example`, `--help` and
/// the parser from drifting apart (a unit test checks `.env.example`).
pub const VARS: &[Var] = &[
    Var { name: "OMNI_HOST", default: "127.0.0.1", help: "address the gateway listens on (0.0.0.0 in containers)" },
    Var { name: "OMNI_PORT", default: "8882", help: "port the gateway listens on (browser UI and /api)" },
    Var { name: "OMNI_API_KEY", default: "", help: "key for protected endpoints; generated on first start when empty" },
    Var { name: "OMNI_UI_DIR", default: "", help: "directory of browser UI files read at each request (development); default: the UI built into omni-api" },
    Var { name: "OMNI_API_BIN", default: "", help: "path of the omni-api worker binary; default: next to omni-gateway" },
    Var { name: "OMNI_DATA_DIR", default: "./data", help: "where the gateway keeps its data: postgres/ (the cluster), backups/, wal/ and omni-settings.json, unless their own variables put them elsewhere; none may lie inside another" },
    Var { name: "OMNI_SETTINGS_FILE", default: "", help: "storage settings saved by onboarding, read at the next start; default: OMNI_DATA_DIR/omni-settings.json" },
    Var { name: "PGSERVE_PORT", default: "5432", help: "embedded PostgreSQL TCP port, bound to 127.0.0.1 only; 0 picks a free one" },
    Var { name: "PGSERVE_DATA_DIR", default: "", help: "persistent PostgreSQL cluster directory; default: OMNI_DATA_DIR/postgres" },
    Var { name: "PGSERVE_MEMORY_MODE", default: "false", help: "throw-away cluster in RAM (tmpfs), deleted at exit" },
    Var { name: "PGSERVE_REQUIRE_EXISTING", default: "false", help: "refuse to create a new cluster: fail if the data dir holds none" },
    Var { name: "PGSERVE_BIN_DIR", default: "", help: "directory holding postgres, initdb, pg_dump, psql; found automatically when empty" },
    Var { name: "PGSERVE_USER", default: "postgres", help: "unprivileged account PostgreSQL runs as when the gateway runs as root" },
    Var { name: "OMNI_API_USER", default: "", help: "unprivileged account the API worker runs as when the gateway runs as root; default: PGSERVE_USER" },
    Var { name: "PGSERVE_REPLICATION_URL", default: "", help: "external PostgreSQL to replicate to (logical replication)" },
    Var { name: "PGSERVE_REPLICATION_DATABASES", default: "", help: "comma-separated database names to replicate, * wildcard" },
    Var { name: "DATABASE_URL", default: "", help: "use this external PostgreSQL instead of the embedded one" },
    Var { name: "OMNI_BACKUP_DIR", default: "", help: "directory for backup files; default: OMNI_DATA_DIR/backups" },
    Var { name: "OMNI_BACKUP_INTERVAL", default: "", help: "scheduled backups, e.g. 6h or 1d; empty = off" },
    Var { name: "OMNI_BACKUP_KEEP", default: "7", help: "how many backups scheduled retention keeps" },
    Var { name: "OMNI_RESTART_BACKOFF_MS", default: "100", help: "first restart delay of a crashed child; doubles per consecutive crash" },
    Var { name: "OMNI_RESTART_BACKOFF_MAX_MS", default: "30000", help: "longest restart delay (at most 1 hour); a failing child is retried forever, at least this often" },
    Var { name: "OMNI_CRASH_LOOP_LIMIT", default: "6", help: "consecutive quick crashes after which a child is flagged crash-looping (error in the log, /metrics gauge); retries go on" },
    Var { name: "OMNI_STABLE_AFTER_S", default: "30", help: "a child ready this long is stable: its crash counter and restart delay start over" },
    Var { name: "OMNI_STOP_TIMEOUT_S", default: "20", help: "how long a child may take to stop before it is killed" },
    Var { name: "OMNI_UPSTREAM_WAIT_MS", default: "10000", help: "how long a request waits for a restarting worker before 503" },
    Var { name: "OMNI_UPSTREAM_TIMEOUT_S", default: "300", help: "longest wait for the worker's response headers before 504" },
    Var { name: "OMNI_HEADER_TIMEOUT_S", default: "15", help: "a client must send its request headers within this time (also the keep-alive idle limit)" },
    Var { name: "OMNI_MAX_CONNECTIONS", default: "4096", help: "open client connections the gateway accepts at once" },
    Var { name: "OMNI_HTTP_THREADS", default: "", help: "threads serving HTTP, each accepting on the port and owning its connections and its pool to the worker (1 to 256); empty = one per available core" },
    Var { name: "OMNI_DRAIN_TIMEOUT_S", default: "15", help: "at stop or reload, how long in-flight requests may take to finish" },
    Var { name: "OMNI_TRUSTED_PROXIES", default: "", help: "comma-separated addresses or CIDRs (e.g. 127.0.0.1/32,10.0.0.0/8) of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed; empty = none, every client is its TCP peer" },
    Var { name: "OMNI_PUBLIC_URL", default: "", help: "the address users type (e.g. https://omni.example.com): its host is allowed, beside IP addresses and localhost, on setup and sign-in (the DNS-rebinding check)" },
    Var { name: "OMNI_DEV", default: "false", help: "development mode: restart the worker when its binary changes (make dev)" },
    Var { name: "OMNI_API_DB_POOL_SIZE", default: "8", help: "most PostgreSQL connections the API worker opens (1 to 1000)" },
    Var { name: "LOG_LEVEL", default: "info", help: "trace, debug, info, warn or error (or a tracing filter)" },
    Var { name: "LOG_FORMAT", default: "pretty", help: "pretty for people, json for machines" },
    // Major upgrades (pg/upgrade.rs).
    Var { name: "PGSERVE_AUTO_UPGRADE", default: "true", help: "upgrade a cluster of an older PostgreSQL major in place at start (pg_upgrade, old copy kept); false refuses to start instead" },
    Var { name: "PGSERVE_OLD_BIN_DIR", default: "", help: "binaries of the cluster's older PostgreSQL major, for the upgrade; found automatically when empty" },
    // Replication relay (issue 11).
    Var { name: "PGSERVE_REPLICATION_MAX_WAL_MB", default: "1024", help: "cap on WAL kept for the replication slot; past it the relay drops the slot and a full re-copy runs" },
    // Point-in-time recovery (wal/): streamed WAL and base backups.
    Var { name: "OMNI_WAL_DIR", default: "", help: "streamed WAL and base backups for point-in-time recovery (persistent mode); default: OMNI_DATA_DIR/wal; put it on another disk in production; `off` turns point-in-time recovery off" },
    Var { name: "OMNI_WAL_SYNC", default: "false", help: "commits wait until the WAL streamer has flushed them (no loss, slower commits; commits stall while the streamer is down)" },
    Var { name: "OMNI_PITR_WINDOW", default: "7d", help: "how far back a point-in-time restore can go; base backups and WAL older than needed are deleted" },
    Var { name: "OMNI_BACKUP_DRILL_INTERVAL", default: "7d", help: "how often the newest base backup and its WAL are restored into a temporary cluster to prove they work (omni-gateway backup verify on demand); with OMNI_REPOSITORY_URL, the repository's newest one too, downloaded and checked against its manifest" },
    // Off-site repository, upload side (repository/): what the WAL archive and OMNI_BACKUP_DIR hold, copied to an object store.
    Var { name: "OMNI_REPOSITORY_URL", default: "", help: "off-site copy of base backups, WAL and logical backups: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///abs/path; credentials from AWS_*, GOOGLE_*, AZURE_*; empty = off" },
    Var { name: "OMNI_REPOSITORY_WAL_INTERVAL", default: "1s", help: "how often new WAL is shipped to the repository (the off-site recovery point), e.g. 1s, 500ms, 1m" },
    Var { name: "OMNI_REPOSITORY_QUEUE_MAX_MB", default: "1024", help: "past this much not yet uploaded, the status says so loudly (the service keeps running; nothing local is deleted before its upload)" },
    Var { name: "OMNI_REPOSITORY_WINDOW", default: "", help: "how far back the repository keeps base backups and the WAL they need; default: OMNI_PITR_WINDOW" },
    Var { name: "OMNI_REPOSITORY_DELETE", default: "true", help: "false: nothing is ever deleted from the repository (write-only credentials, bucket lifecycle rules)" },
    // Restore from the off-site repository (repository/fetch.rs, cli/restore.rs).
    Var { name: "OMNI_RESTORE_IF_EMPTY", default: "false", help: "true: a start that finds an empty or missing data directory and base backups in OMNI_REPOSITORY_URL restores latest from there instead of creating an empty cluster (never when the data directory holds anything)" },
    // HTTPS at the gateway (tls/).
    Var { name: "OMNI_ENCRYPT_RECIPIENTS", default: "", help: "age X25519 public keys (age1..., from age-keygen), comma-separated: every object that leaves the machine is encrypted to them; set at most one of the three OMNI_ENCRYPT_* variables (README \"Encrypted off-site backups\")" },
    Var { name: "OMNI_ENCRYPT_RECIPIENTS_FILE", default: "", help: "a file of age public keys, one a line (# comments); read again for each object, so a rotated key applies to new objects" },
    Var { name: "OMNI_ENCRYPT_PASSPHRASE_FILE", default: "", help: "a file whose first line is a long random passphrase (age scrypt), for the simple case" },
    Var { name: "OMNI_ENCRYPT_LOCAL", default: "false", help: "true: the backups on this machine (OMNI_WAL_DIR's base backups and completed WAL segments, OMNI_BACKUP_DIR's logical backups as <name>.sql.age) are encrypted too, to the OMNI_ENCRYPT_* recipients (one of them must be set); restores then need OMNI_DECRYPT_IDENTITY_FILE or restore --identity FILE (backup restore --identity FILE); the WAL segment being written stays plain" },
    Var { name: "OMNI_DECRYPT_IDENTITY_FILE", default: "", help: "the private key (age-keygen's key.txt, or the passphrase file) restores and the off-site drill decrypt with (without it, the drill of an encrypted repository checks the manifest only); restore --identity FILE overrides it" },
    Var { name: "OMNI_BACKUP_HEARTBEAT_URL", default: "", help: "a monitor's URL (healthchecks.io, Uptime Kuma push): requested after each confirmed base or logical backup upload and while WAL uploads are healthy; <url>/fail with the reason when uploads fail" },
    Var { name: "OMNI_BACKUP_HEARTBEAT_INTERVAL", default: "1h", help: "at least this often while WAL uploads are healthy" },
    Var { name: "OMNI_TLS_CERT", default: "", help: "PEM certificate file, chain included: with OMNI_TLS_KEY, OMNI_PORT speaks HTTPS (HTTP/2 and HTTP/1.1); replaced files are served to new connections without a restart; empty = plain HTTP" },
    Var { name: "OMNI_TLS_KEY", default: "", help: "PEM private key of OMNI_TLS_CERT; must not be readable by every account (chmod 600)" },
    Var { name: "OMNI_HTTP_PORT", default: "", help: "with HTTPS on: the plain-HTTP port that redirects every request to https (308); default 80 (needs root or CAP_NET_BIND_SERVICE); off = none" },
    Var { name: "OMNI_HSTS_MAX_AGE", default: "31536000", help: "with HTTPS on: Strict-Transport-Security max-age in seconds (never sent to localhost or loopback addresses); 0 = no HSTS" },
    Var { name: "OMNI_TLS_DOMAINS", default: "", help: "comma-separated domain names: OMNI_PORT speaks HTTPS with a certificate obtained by ACME (HTTP-01 on OMNI_HTTP_PORT) and stored under OMNI_DATA_DIR/tls (in the database, shared, with an external DATABASE_URL); a self-signed one is served until it arrives; not with OMNI_TLS_CERT" },
    Var { name: "OMNI_ACME_DIRECTORY", default: "https://acme-v02.api.letsencrypt.org/directory", help: "with OMNI_TLS_DOMAINS: the ACME directory URL of the certificate authority (default Let's Encrypt production)" },
    Var { name: "OMNI_ACME_EMAIL", default: "", help: "with OMNI_TLS_DOMAINS: the contact address of the ACME account (expiry notices); empty = none" },
    Var { name: "OMNI_ACME_CA_FILE", default: "", help: "with OMNI_TLS_DOMAINS: a PEM CA certificate to trust for the ACME directory's HTTPS (test and private CAs) instead of the system's; empty = the system's" },
    Var { name: "OMNI_ACME_CHALLENGE", default: "http-01", help: "with OMNI_TLS_DOMAINS: http-01 (answered on OMNI_HTTP_PORT, by any gateway of a shared database) or tls-alpn-01 (answered on OMNI_PORT with ALPN acme-tls/1, by the gateway that orders; OMNI_HTTP_PORT may be off)" },
    Var { name: "OMNI_TLS_SECRET_FILE", default: "", help: "with OMNI_TLS_DOMAINS and an external DATABASE_URL (required then): a file of at least 32 random bytes, the same on every gateway, sealing the private keys the gateways share in that database; one gateway orders, all serve the certificate" },
];

/// Which layer supplied a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    SettingsFile,
    DotEnv,
    Environment,
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Default => "default",
            Origin::SettingsFile => "settings file",
            Origin::DotEnv => ".env",
            Origin::Environment => "environment",
            Origin::Flag => "command line",
        })
    }
}

/// A configuration mistake, worded for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} (from {origin}): {problem}")]
    Invalid { var: &'static str, value: String, origin: Origin, problem: String },
    #[error("could not read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {problem}")]
    DotEnv { path: PathBuf, line: usize, problem: String },
    #[error("unknown setting {0:?}: see .env.example for the list")]
    UnknownFlag(String),
}

/// The raw layers, before parsing. Built once at start.
#[derive(Default, Debug, Clone)]
pub struct Layers {
    pub settings_file: BTreeMap<String, String>,
    pub dotenv: BTreeMap<String, String>,
    pub environment: BTreeMap<String, String>,
    pub flags: BTreeMap<String, String>,
}

impl Layers {
    /// Reads the process environment and `.env` (if present) from `cwd`.
    pub fn from_process(cwd: &Path, flags: BTreeMap<String, String>) -> Result<Self, ConfigError> {
        for key in flags.keys() {
            if !VARS.iter().any(|v| v.name == key) {
                return Err(ConfigError::UnknownFlag(key.clone()));
            }
        }
        let environment = VARS
            .iter()
            .filter_map(|v| std::env::var(v.name).ok().map(|val| (v.name.to_string(), val)))
            .collect();
        let dotenv = read_dotenv(&cwd.join(".env"))?;
        Ok(Layers { settings_file: BTreeMap::new(), dotenv, environment, flags })
    }

    /// The effective raw value of `name` and which layer supplied it.
    pub fn lookup(&self, name: &'static str) -> (String, Origin) {
        let layers = [
            (&self.flags, Origin::Flag),
            (&self.environment, Origin::Environment),
            (&self.dotenv, Origin::DotEnv),
            (&self.settings_file, Origin::SettingsFile),
        ];
        for (map, origin) in layers {
            if let Some(v) = map.get(name) {
                return (v.clone(), origin);
            }
        }
        let default = VARS.iter().find(|v| v.name == name).map(|v| v.default).unwrap_or_else(|| panic!("{name} is not in config::VARS"));
        (default.to_string(), Origin::Default)
    }
}

/// Reads a `.env` file with `dotenvy` (the syntax docker compose and most
/// tools share: `KEY=value`, `#` comments, `export`, single quotes taken as
/// written, double quotes with escapes, `${VAR}` expanded). Unknown keys are
/// kept (they may be meant for the worker) but only known ones are ever
/// looked up. The process environment is left alone: it is a layer above.
fn read_dotenv(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let entries = match dotenvy::from_path_iter(path) {
        Ok(entries) => entries,
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(dotenvy::Error::Io(source)) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
        Err(e) => return Err(ConfigError::DotEnv { path: path.to_path_buf(), line: 0, problem: e.to_string() }),
    };
    let mut out = BTreeMap::new();
    for entry in entries {
        match entry {
            Ok((key, value)) => {
                out.insert(key, value);
            }
            Err(dotenvy::Error::Io(source)) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
            Err(dotenvy::Error::LineParse(text, at)) => {
                // dotenvy names the text, not the line: find its number for the operator.
                let file = std::fs::read_to_string(path).unwrap_or_default();
                let line = file.lines().position(|l| l.trim_end() == text.trim_end()).map_or(0, |i| i + 1);
                return Err(ConfigError::DotEnv {
                    path: path.to_path_buf(),
                    line,
                    problem: format!("cannot read {text:?} at character {}: expected KEY=value", at + 1),
                });
            }
            Err(e) => return Err(ConfigError::DotEnv { path: path.to_path_buf(), line: 0, problem: e.to_string() }),
        }
    }
    Ok(out)
}

/// A parsed value together with where it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: Origin,
}

/// Where PostgreSQL comes from.
#[derive(Debug, Clone)]
pub enum Database {
    /// A cluster this gateway runs as its child.
    Embedded(EmbeddedConfig),
    /// An external server (`DATABASE_URL`): the gateway supervises only the worker.
    External { url: String },
}

/// Settings of the embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Absolute path of the persistent cluster; unused in memory mode.
    pub data_dir: Sourced<PathBuf>,
    /// 0 asks for a free port.
    pub port: Sourced<u16>,
    pub memory_mode: bool,
    pub require_existing: bool,
    pub bin_dir: Option<PathBuf>,
    /// Account to run PostgreSQL as when the gateway is root.
    pub run_as: String,
    /// Upgrade a cluster of an older major at start instead of refusing it.
    pub auto_upgrade: bool,
    /// `PGSERVE_OLD_BIN_DIR`: where the older major's binaries are, for the upgrade.
    pub old_bin_dir: Option<PathBuf>,
}

/// The longest `OMNI_RESTART_BACKOFF_MAX_MS` may be.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(3600);

/// How the supervisor treats crashing children: retried forever, with
/// these delays (see `supervise::decide`).
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles with each failure in a row.
    pub backoff_initial: Duration,
    /// The cap on that delay: a failing child is retried at least this often.
    pub backoff_max: Duration,
    /// Quick failures in a row that flag a child as crash-looping (retries go on).
    pub crash_loop_limit: u32,
    /// A run ready this long is stable: the failure count starts over.
    pub stable_after: Duration,
    pub stop_timeout: Duration,
}

/// `OMNI_TRUSTED_PROXIES`: the TCP peers whose `X-Forwarded-For` and
/// `X-Forwarded-Proto` the gateway believes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(std::sync::Arc<[(IpAddr, u8)]>);

impl TrustedProxies {
    /// `10.0.0.0/8, 127.0.0.1, ::1/128`: a bare address is one host.
    pub fn parse(text: &str) -> Result<TrustedProxies, String> {
        let mut nets = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (addr, bits) = item.split_once('/').map_or((item, None), |(a, b)| (a, Some(b)));
            let addr: IpAddr = addr.trim().parse().map_err(|_| format!("{item:?} is not an IP address or CIDR (such as 10.0.0.0/8 or 127.0.0.1)"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => b.trim().parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| format!("{item:?}: the prefix length must be a number from 0 to {max}"))?,
            };
            nets.push((addr, bits));
        }
        Ok(TrustedProxies(nets.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|(net, bits)| match (net.to_canonical(), ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => prefix_matches(u128::from(u32::from(n)) << 96, u128::from(u32::from(i)) << 96, *bits),
            (IpAddr::V6(n), IpAddr::V6(i)) => prefix_matches(u128::from(n), u128::from(i), *bits),
            _ => false,
        })
    }
}

fn prefix_matches(net: u128, ip: u128, bits: u8) -> bool {
    bits == 0 || (net ^ ip) >> (128 - u32::from(bits)) == 0
}

/// Proxy and HTTP server limits.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub upstream_wait: Duration,
    pub upstream_timeout: Duration,
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// `OMNI_HTTP_THREADS`: how many threads serve HTTP (`serve::serve`).
    pub threads: usize,
    pub drain_timeout: Duration,
    /// Whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// `OMNI_PUBLIC_URL`: the address users type; the worker's Host check
    /// allows its host on setup and sign-in.
    pub public_url: Option<String>,
}

/// Everything the gateway needs, parsed and absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub api_key: Option<String>,
    pub ui_dir: Option<PathBuf>,
    pub api_bin: Option<PathBuf>,
    pub settings_file: PathBuf,
    pub database: Database,
    pub backup_dir: PathBuf,
    pub backup_interval: Option<Duration>,
    pub backup_keep: usize,
    /// `OMNI_API_DB_POOL_SIZE`, handed to the worker.
    pub pool_size: usize,
    /// `OMNI_API_USER`, else `PGSERVE_USER`: the worker's account when the gateway is root.
    pub api_user: String,
    pub restart: RestartPolicy,
    pub http: HttpLimits,
    pub dev: bool,
    /// `PGSERVE_REPLICATION_URL`: the relay's target when set (`relay::config` parses the relay's settings).
    pub replication_url: Option<String>,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Working directory at start; every relative path was resolved against it.
    pub cwd: PathBuf,
    /// The layers the values came from: a feature parses its own settings
    /// from them ([`Config::parser`]; the relay's: `relay::config`).
    pub layers: Layers,
    /// `OMNI_WAL_DIR`, `OMNI_WAL_SYNC`, `OMNI_PITR_WINDOW`: point-in-time recovery.
    pub wal: WalConfig,
}

/// Point-in-time recovery settings (see `wal/`).
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// False with `OMNI_WAL_DIR=off`: no streamer, no base backups, no
    /// point-in-time restore (the `.sql` backups remain).
    pub enabled: bool,
    /// Where `pg_receivewal` writes segments and base backups go (`base/`).
    pub dir: PathBuf,
    /// Synchronous replication to the streamer: no acknowledged commit is lost.
    pub sync: bool,
    /// How far back a restore can go; retention keeps what this needs.
    pub window: Duration,
    /// Between two scheduled restore drills.
    pub drill_every: Duration,
    /// `OMNI_ENCRYPT_LOCAL`: base backups and completed segments are kept
    /// encrypted (`pitr/sealed.rs`; the encryption is `OMNI_ENCRYPT_*`'s).
    pub encrypt_local: bool,
}

/// Reads variables from the layers with the shared rules: trimmed values,
/// errors naming the variable, its value and where it came from.
pub struct Parser<'a> {
    layers: &'a Layers,
    cwd: &'a Path,
}

impl Parser<'_> {
    pub fn raw(&self, var: &'static str) -> (String, Origin) {
        self.layers.lookup(var)
    }

    pub fn invalid(&self, var: &'static str, problem: impl Into<String>) -> ConfigError {
        let (value, origin) = self.raw(var);
        ConfigError::Invalid { var, value, origin, problem: problem.into() }
    }

    pub fn string(&self, var: &'static str) -> Option<String> {
        let (v, _) = self.raw(var);
        (!v.trim().is_empty()).then(|| v.trim().to_string())
    }

    pub fn bool(&self, var: &'static str) -> Result<bool, ConfigError> {
        match self.raw(var).0.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(self.invalid(var, "expected true or false (also accepted: 1/0, yes/no, on/off)")),
        }
    }

    pub fn number<T: std::str::FromStr>(&self, var: &'static str, what: &str) -> Result<T, ConfigError> {
        self.raw(var).0.trim().parse().map_err(|_| self.invalid(var, format!("expected {what}")))
    }

    pub fn port(&self, var: &'static str, allow_zero: bool) -> Result<Sourced<u16>, ConfigError> {
        let (_, origin) = self.raw(var);
        let value: u16 = self.number(var, "a port number from 1 to 65535")?;
        if value == 0 && !allow_zero {
            return Err(self.invalid(var, "port 0 is not allowed here; expected 1 to 65535"));
        }
        Ok(Sourced { value, origin })
    }

    /// A value the worker also reads, checked by the worker's own rule.
    pub fn shared<T>(&self, var: &'static str, rule: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        rule(self.raw(var).0.trim()).map_err(|problem| self.invalid(var, problem))
    }

    pub fn path(&self, var: &'static str) -> Sourced<PathBuf> {
        let (raw, origin) = self.raw(var);
        Sourced { value: absolute(self.cwd, Path::new(raw.trim())), origin }
    }

    /// A directory or file under `OMNI_DATA_DIR` (`leaf`) unless `var` names one.
    pub fn under_data_root(&self, var: &'static str, leaf: &str) -> Sourced<PathBuf> {
        match self.string(var) {
            Some(_) => self.path(var),
            None => Sourced { value: self.path("OMNI_DATA_DIR").value.join(leaf), origin: Origin::Default },
        }
    }

    pub fn optional_path(&self, var: &'static str) -> Option<PathBuf> {
        self.string(var).map(|s| absolute(self.cwd, Path::new(&s)))
    }

    pub fn millis(&self, var: &'static str) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.number(var, "a whole number of milliseconds")?))
    }

    pub fn seconds(&self, var: &'static str) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.number(var, "a whole number of seconds")?))
    }
}

/// `DATABASE_URL`, or the embedded cluster's `PGSERVE_*`.
fn parse_database(p: &Parser<'_>) -> Result<Database, ConfigError> {
    Ok(match p.string("DATABASE_URL") {
        Some(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(p.invalid("DATABASE_URL", "expected a URL starting with postgres:// or postgresql://"));
            }
            Database::External { url }
        }
        None => Database::Embedded(EmbeddedConfig {
            data_dir: p.under_data_root("PGSERVE_DATA_DIR", "postgres"),
            port: p.port("PGSERVE_PORT", true)?,
            memory_mode: p.bool("PGSERVE_MEMORY_MODE")?,
            require_existing: p.bool("PGSERVE_REQUIRE_EXISTING")?,
            bin_dir: p.optional_path("PGSERVE_BIN_DIR"),
            run_as: p.string("PGSERVE_USER").unwrap_or_else(|| "postgres".into()),
            auto_upgrade: p.bool("PGSERVE_AUTO_UPGRADE")?,
            old_bin_dir: p.optional_path("PGSERVE_OLD_BIN_DIR"),
        }),
    })
}

/// How children are restarted: the delays, the crash-loop flag, the stop timeout.
fn parse_restart(p: &Parser<'_>) -> Result<RestartPolicy, ConfigError> {
    let restart = RestartPolicy {
        backoff_initial: p.millis("OMNI_RESTART_BACKOFF_MS")?,
        backoff_max: p.millis("OMNI_RESTART_BACKOFF_MAX_MS")?,
        crash_loop_limit: p.number("OMNI_CRASH_LOOP_LIMIT", "a whole number of crashes")?,
        stable_after: p.seconds("OMNI_STABLE_AFTER_S")?,
        stop_timeout: p.seconds("OMNI_STOP_TIMEOUT_S")?,
    };
    if restart.crash_loop_limit == 0 {
        return Err(p.invalid("OMNI_CRASH_LOOP_LIMIT", "must be at least 1"));
    }
    // A zero delay would restart a crashing child in a busy loop.
    if restart.backoff_initial.is_zero() {
        return Err(p.invalid("OMNI_RESTART_BACKOFF_MS", "must be at least 1 ms"));
    }
    if restart.backoff_max < restart.backoff_initial {
        return Err(p.invalid("OMNI_RESTART_BACKOFF_MAX_MS", "must be at least OMNI_RESTART_BACKOFF_MS"));
    }
    // The cap is the only limit on retries; a cap of days would be a
    // child left down by a setting.
    if restart.backoff_max > MAX_RESTART_DELAY {
        return Err(p.invalid("OMNI_RESTART_BACKOFF_MAX_MS", "must be at most 3600000 (1 hour): a failing child is always retried"));
    }
    Ok(restart)
}

/// The listener's and the proxy's limits, and whom it believes.
/// Most threads `OMNI_HTTP_THREADS` may ask for.
const MAX_HTTP_THREADS: usize = 256;

fn parse_http(p: &Parser<'_>) -> Result<HttpLimits, ConfigError> {
    let http = HttpLimits {
        upstream_wait: p.millis("OMNI_UPSTREAM_WAIT_MS")?,
        upstream_timeout: p.seconds("OMNI_UPSTREAM_TIMEOUT_S")?,
        header_timeout: p.seconds("OMNI_HEADER_TIMEOUT_S")?,
        max_connections: p.number("OMNI_MAX_CONNECTIONS", "a whole number of connections")?,
        threads: match p.raw("OMNI_HTTP_THREADS").0.trim() {
            "" => std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_HTTP_THREADS),
            n => n.parse().ok().filter(|n| (1..=MAX_HTTP_THREADS).contains(n)).ok_or_else(|| {
                p.invalid("OMNI_HTTP_THREADS", format!("expected a whole number of threads from 1 to {MAX_HTTP_THREADS}, or nothing for one per available core"))
            })?,
        },
        drain_timeout: p.seconds("OMNI_DRAIN_TIMEOUT_S")?,
        trusted_proxies: TrustedProxies::parse(&p.raw("OMNI_TRUSTED_PROXIES").0).map_err(|problem| p.invalid("OMNI_TRUSTED_PROXIES", problem))?,
        public_url: match p.raw("OMNI_PUBLIC_URL").0.trim() {
            "" => None,
            url => Some(check::public_url(url).map_err(|problem| p.invalid("OMNI_PUBLIC_URL", problem))?),
        },
    };
    if http.header_timeout.is_zero() {
        return Err(p.invalid("OMNI_HEADER_TIMEOUT_S", "must be at least 1 second"));
    }
    if http.max_connections == 0 {
        return Err(p.invalid("OMNI_MAX_CONNECTIONS", "must be at least 1"));
    }
    Ok(http)
}

/// `OMNI_WAL_*`, `OMNI_PITR_WINDOW`, `OMNI_BACKUP_DRILL_INTERVAL`.
fn parse_wal(p: &Parser<'_>) -> Result<WalConfig, ConfigError> {
    let wal = WalConfig {
        enabled: !p.raw("OMNI_WAL_DIR").0.trim().eq_ignore_ascii_case("off"),
        dir: p.under_data_root("OMNI_WAL_DIR", "wal").value,
        sync: p.bool("OMNI_WAL_SYNC")?,
        window: omni_contract::interval::parse(&p.raw("OMNI_PITR_WINDOW").0)
            .ok_or_else(|| p.invalid("OMNI_PITR_WINDOW", "expected a duration such as 7d, 36h or 90m"))?,
        drill_every: omni_contract::interval::parse(&p.raw("OMNI_BACKUP_DRILL_INTERVAL").0)
            .ok_or_else(|| p.invalid("OMNI_BACKUP_DRILL_INTERVAL", "expected a duration such as 7d, 1d or 12h"))?,
        encrypt_local: p.bool("OMNI_ENCRYPT_LOCAL")?,
    };
    if wal.sync && !wal.enabled {
        return Err(p.invalid("OMNI_WAL_SYNC", "commits cannot wait for a WAL streamer that OMNI_WAL_DIR=off turns off"));
    }
    Ok(wal)
}

/// The places the gateway writes must not lie inside one another: a backup
/// directory inside the cluster's directory makes a "non-empty directory
/// that holds no cluster" on the first start, a WAL archive inside the
/// backups would be listed as backups, and so on. Refused before anything
/// is created, naming both variables.
fn check_apart(config: &Config, p: &Parser<'_>) -> Result<(), ConfigError> {
    let mut dirs: Vec<(&'static str, &Path, &str)> = Vec::new();
    if let Database::Embedded(e) = &config.database {
        if !e.memory_mode {
            dirs.push(("PGSERVE_DATA_DIR", &e.data_dir.value, "the PostgreSQL cluster's directory, which must hold the cluster alone"));
        }
    }
    dirs.push(("OMNI_BACKUP_DIR", &config.backup_dir, "the backup directory"));
    if config.wal.enabled {
        dirs.push(("OMNI_WAL_DIR", &config.wal.dir, "the WAL archive"));
    }
    let root = p.path("OMNI_DATA_DIR").value;
    // How a path was chosen, when it is OMNI_DATA_DIR's doing.
    let default_note = |var: &'static str| match p.string(var) {
        Some(_) => String::new(),
        None => format!(" ({var}'s default, under OMNI_DATA_DIR={})", root.display()),
    };
    let settings = ("OMNI_SETTINGS_FILE", config.settings_file.as_path(), "the settings file");
    let candidates = dirs.iter().flat_map(|inner| dirs.iter().map(move |outer| (*inner, *outer)));
    // The settings file may sit beside backups, never in the cluster or the archive.
    let settings_pairs = dirs.iter().filter(|d| d.0 != "OMNI_BACKUP_DIR").map(|outer| (settings, *outer));
    for ((inner_var, inner, _), (outer_var, outer, what)) in candidates.chain(settings_pairs) {
        if inner_var == outer_var || !lies_within(inner, outer) {
            continue;
        }
        let (_, origin) = p.raw(inner_var);
        let place = if inner == outer { "is the same place as" } else { "lies inside" };
        return Err(ConfigError::Invalid {
            var: inner_var,
            value: inner.display().to_string(),
            origin,
            problem: format!(
                "{place} {outer_var}={}{}, {what}{}. Give each its own place: set OMNI_DATA_DIR alone to move them all together, or set {inner_var} or {outer_var} elsewhere",
                outer.display(),
                default_note(outer_var),
                match p.string(inner_var) {
                    Some(_) => String::new(),
                    None => format!("; {inner_var} is its default, under OMNI_DATA_DIR={}", root.display()),
                },
            ),
        });
    }
    Ok(())
}

/// Whether `inner` is `outer` or below it, as written and (for what exists) through symbolic links.
fn lies_within(inner: &Path, outer: &Path) -> bool {
    if inner.starts_with(outer) {
        return true;
    }
    // The nearest existing ancestor of `inner`, resolved, with the rest put back.
    let resolve = |path: &Path| -> Option<PathBuf> {
        let mut existing = path;
        let mut rest = Vec::new();
        loop {
            if let Ok(real) = existing.canonicalize() {
                return Some(rest.iter().rev().fold(real, |acc: PathBuf, part: &&std::ffi::OsStr| acc.join(part)));
            }
            rest.push(existing.file_name()?);
            existing = existing.parent()?;
        }
    };
    match (resolve(inner), resolve(outer)) {
        (Some(i), Some(o)) => i.starts_with(o),
        _ => false,
    }
}

/// Joins `p` onto `cwd` when relative and normalises it (the shared rule).
pub fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    paths::absolute(cwd, p)
}

impl Config {
    /// The variables, read with the shared rules, for a feature's own settings.
    pub fn parser(&self) -> Parser<'_> {
        Parser { layers: &self.layers, cwd: &self.cwd }
    }

    /// Parses all layers. `settings_file` contents are loaded here too, since
    /// where that file lives is itself configurable.
    pub fn parse(mut layers: Layers, cwd: &Path) -> Result<Config, ConfigError> {
        let settings_path = Parser { layers: &layers, cwd }.under_data_root("OMNI_SETTINGS_FILE", "omni-settings.json").value;
        layers.settings_file = read_settings_file(&settings_path)?;
        let p = Parser { layers: &layers, cwd };

        let host: IpAddr = p.number("OMNI_HOST", "an IP address such as 127.0.0.1 or 0.0.0.0")?;
        let port = p.port("OMNI_PORT", false)?.value;
        let database = parse_database(&p)?;
        let backup_interval = match p.string("OMNI_BACKUP_INTERVAL") {
            None => None,
            // The worker's rule: the gateway passes the value on, and both must agree.
            Some(_) => Some(p.shared("OMNI_BACKUP_INTERVAL", check::backup_interval)?),
        };
        let log_format = p.shared("LOG_FORMAT", check::log_format)?;
        let log_level = p.string("LOG_LEVEL").unwrap_or_else(|| "info".into());
        p.shared("LOG_LEVEL", check::log_level)?;
        let api_key = p.string("OMNI_API_KEY");
        if api_key.is_some() {
            p.shared("OMNI_API_KEY", check::api_key)?;
        }
        let restart = parse_restart(&p)?;
        let http = parse_http(&p)?;
        let config = Config {
            host,
            port,
            api_key,
            ui_dir: p.optional_path("OMNI_UI_DIR"),
            api_bin: p.optional_path("OMNI_API_BIN"),
            settings_file: settings_path,
            database,
            backup_dir: p.under_data_root("OMNI_BACKUP_DIR", "backups").value,
            backup_interval,
            backup_keep: p.shared("OMNI_BACKUP_KEEP", check::backup_keep)?,
            pool_size: p.shared("OMNI_API_DB_POOL_SIZE", check::pool_size)?,
            api_user: p.string("OMNI_API_USER").or_else(|| p.string("PGSERVE_USER")).unwrap_or_else(|| "postgres".into()),
            restart,
            http,
            dev: p.bool("OMNI_DEV")?,
            replication_url: p.string("PGSERVE_REPLICATION_URL"),
            log_level,
            log_format,
            cwd: cwd.to_path_buf(),
            layers: layers.clone(),
            wal: parse_wal(&p)?,
        };
        config.check_worker_settings(&layers)?;
        check_apart(&config, &p)?;
        Ok(config)
    }
}

impl Config {
    /// What the worker is told, for `database_url`. The listening socket,
    /// readiness descriptor and binary directory are the start's to fill in.
    pub fn worker_settings(&self, database_url: &str) -> WorkerSettings {
        let gateway_ip = match self.host {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        let mut s = WorkerSettings::new(database_url, &self.cwd);
        s.api_key = self.api_key.clone();
        s.ui_dir = self.ui_dir.clone();
        s.backup_dir = self.backup_dir.clone();
        s.backup_keep = self.backup_keep;
        s.backup_interval = self.backup_interval;
        s.settings_file = Some(self.settings_file.clone());
        s.data_root = self.cwd.clone();
        s.gateway_url = Some(format!("http://{}", std::net::SocketAddr::new(gateway_ip, self.port)));
        s.pool_size = self.pool_size;
        s.log_level = self.log_level.clone();
        s.log_format = self.log_format;
        s
    }

    /// Checks what the worker will be given with the worker's own validator,
    /// before anything starts: a value it would reject stops the gateway
    /// here, naming the variable, instead of the worker exiting at every start.
    fn check_worker_settings(&self, layers: &Layers) -> Result<(), ConfigError> {
        let url = match &self.database {
            Database::External { url } => url.clone(),
            Database::Embedded(_) => "postgres://postgres@127.0.0.1:5432/omni".to_string(),
        };
        self.worker_settings(&url).validate().map_err(|e| {
            let (value, origin) = if VARS.iter().any(|v| v.name == e.variable) { layers.lookup(e.variable) } else { (String::new(), Origin::Default) };
            ConfigError::Invalid { var: e.variable, value, origin, problem: e.message }
        })
    }
}

/// Onboarding (`POST /api/v1/setup/initialize` on the worker) saves the
/// storage settings as JSON in the worker's own field names; this maps them
/// onto the gateway's variables. Replication only counts when enabled.
/// Unknown fields (Redis settings, which the gateway does not use) are ignored.
fn read_settings_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ConfigError::Read { path: path.to_path_buf(), source }),
    };
    let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).map_err(|e| ConfigError::DotEnv {
        path: path.to_path_buf(),
        line: e.line(),
        problem: format!("not the JSON object onboarding writes ({e}); fix or delete the file"),
    })?;
    let text_of = |key: &str| -> Option<String> {
        match doc.get(key)? {
            serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let mut out = BTreeMap::new();
    let mut put = |var: &str, value: Option<String>| {
        if let Some(v) = value {
            out.insert(var.to_string(), v);
        }
    };
    put("PGSERVE_DATA_DIR", text_of("data_dir"));
    put("PGSERVE_MEMORY_MODE", text_of("memory_mode"));
    put("DATABASE_URL", text_of("database_url"));
    if doc.get("replication_enabled").and_then(|v| v.as_bool()) == Some(true) {
        put("PGSERVE_REPLICATION_URL", text_of("replication_url"));
        put("PGSERVE_REPLICATION_DATABASES", text_of("replication_databases"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(env: &[(&str, &str)]) -> Layers {
        Layers {
            environment: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn parse(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(layers(env), Path::new("/srv/omni"))
    }

    #[test]
    fn a_multi_host_database_url_is_taken_as_it_is() {
        // libpq's multi-host form, as for a Patroni cluster (README, "When one machine is not enough").
        let url = "postgresql://omni:secret@10.0.0.11:5432,10.0.0.12:5432,10.0.0.13:5432/omni?target_session_attrs=read-write";
        let c = parse(&[("DATABASE_URL", url)]).unwrap();
        let Database::External { url: taken } = &c.database else { panic!("external with DATABASE_URL") };
        assert_eq!(taken, url);
        assert_eq!(c.worker_settings(taken).database_url, url, "the worker gets the same string");
        let err = parse(&[("DATABASE_URL", "postgresql://10.0.0.11:5432,10.0.0.12:x/omni")]).unwrap_err().to_string();
        assert!(err.starts_with("DATABASE_URL"), "{err}");
    }

    #[test]
    fn defaults_resolve_relative_paths_against_the_working_directory() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 8882);
        let Database::Embedded(e) = c.database else { panic!("embedded by default") };
        assert_eq!(e.data_dir.value, PathBuf::from("/srv/omni/data/postgres"));
        assert_eq!(e.data_dir.origin, Origin::Default);
        assert_eq!(e.port.value, 5432);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("OMNI_PORT", "http"),
            ("PGSERVE_PORT", "70000"),
            ("PGSERVE_MEMORY_MODE", "maybe"),
            ("OMNI_HOST", "localhost:1"),
            ("LOG_FORMAT", "xml"),
            ("OMNI_BACKUP_INTERVAL", "often"),
            ("DATABASE_URL", "mysql://x"),
            ("DATABASE_URL", "postgres://h:port/x"),
            ("OMNI_API_KEY", "short"),
            ("OMNI_API_KEY", "a key with spaces in it"),
            ("LOG_LEVEL", "x=[["),
            ("OMNI_API_DB_POOL_SIZE", "0"),
            ("OMNI_BACKUP_KEEP", "-1"),
            ("OMNI_RESTART_BACKOFF_MS", "0"),
            ("OMNI_RESTART_BACKOFF_MAX_MS", "50"),
            ("OMNI_RESTART_BACKOFF_MAX_MS", "86400000"),
            ("OMNI_CRASH_LOOP_LIMIT", "0"),
        ] {
            let err = parse(&[(var, value)]).unwrap_err().to_string();
            assert!(err.starts_with(var), "{var}: {err}");
        }
    }

    #[test]
    fn flag_beats_environment_beats_dotenv_beats_settings_file() {
        let mut l = layers(&[("OMNI_PORT", "2")]);
        l.flags.insert("OMNI_PORT".into(), "1".into());
        l.dotenv.insert("OMNI_PORT".into(), "3".into());
        l.settings_file.insert("OMNI_PORT".into(), "4".into());
        assert_eq!(l.lookup("OMNI_PORT"), ("1".into(), Origin::Flag));
        l.flags.clear();
        assert_eq!(l.lookup("OMNI_PORT"), ("2".into(), Origin::Environment));
        l.environment.clear();
        assert_eq!(l.lookup("OMNI_PORT"), ("3".into(), Origin::DotEnv));
        l.dotenv.clear();
        assert_eq!(l.lookup("OMNI_PORT"), ("4".into(), Origin::SettingsFile));
    }

    #[test]
    fn dotenv_understands_quotes_comments_and_export() {
        let dir = std::env::temp_dir().join(format!("omni-dotenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(".env");
        std::fs::write(&f, "# comment\nexport OMNI_PORT=9000 # inline\nPGSERVE_DATA_DIR=\"/a b\"\n\nLOG_LEVEL='debug'\n").unwrap();
        let m = read_dotenv(&f).unwrap();
        assert_eq!(m["OMNI_PORT"], "9000");
        assert_eq!(m["PGSERVE_DATA_DIR"], "/a b");
        assert_eq!(m["LOG_LEVEL"], "debug");
        std::fs::write(&f, "OMNI_HOST=127.0.0.1\nNOEQUALS\n").unwrap();
        let error = read_dotenv(&f).unwrap_err().to_string();
        assert!(error.contains("line 2") && error.contains("NOEQUALS"), "{error}");
        // Single quotes are taken as written; double quotes and bare values expand ${VAR}.
        std::fs::write(&f, "OMNI_API_KEY='a$b'\nOMNI_HOST=0.0.0.0\nOMNI_PUBLIC_URL=\"http://${OMNI_HOST}:1\"\n").unwrap();
        let m = read_dotenv(&f).unwrap();
        assert_eq!(m["OMNI_API_KEY"], "a$b");
        assert_eq!(m["OMNI_PUBLIC_URL"], "http://0.0.0.0:1");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn onboarding_settings_map_to_variables_below_the_environment() {
        let dir = std::env::temp_dir().join(format!("omni-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("omni-settings.json");
        std::fs::write(
            &file,
            r#"{"data_dir": "./data/elsewhere", "memory_mode": true, "replication_enabled": false,
                "replication_url": "postgres://r@h/db", "redis_enabled": true, "redis_url": "redis://x"}"#,
        )
        .unwrap();
        let mut l = layers(&[("OMNI_SETTINGS_FILE", file.to_str().unwrap())]);
        let c = Config::parse(l.clone(), Path::new("/srv/omni")).unwrap();
        let Database::Embedded(e) = c.database else { panic!("embedded") };
        assert_eq!(e.data_dir.value, PathBuf::from("/srv/omni/data/elsewhere"));
        assert_eq!(e.data_dir.origin, Origin::SettingsFile);
        assert!(e.memory_mode);
        // Replication was not enabled, so its URL is not taken.
        let l2 = Config::parse(l.clone(), Path::new("/srv/omni")).unwrap();
        assert!(matches!(l2.database, Database::Embedded(_)));
        // The environment still wins.
        l.environment.insert("PGSERVE_MEMORY_MODE".into(), "false".into());
        let Database::Embedded(e) = Config::parse(l, Path::new("/srv/omni")).unwrap().database else { panic!() };
        assert!(!e.memory_mode);
        std::fs::write(&file, "not json").unwrap();
        let err = Config::parse(layers(&[("OMNI_SETTINGS_FILE", file.to_str().unwrap())]), Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("omni-settings.json") && err.contains("fix or delete"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn trusted_proxies_parse_and_match_by_prefix() {
        let t = parse(&[("OMNI_TRUSTED_PROXIES", " 10.0.0.0/8, 127.0.0.1 ,2001:db8::/32")]).unwrap().http.trusted_proxies;
        for yes in ["10.200.3.4", "127.0.0.1", "::ffff:127.0.0.1", "2001:db8:ff::1"] {
            assert!(t.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "127.0.0.2", "2001:db9::1", "::1"] {
            assert!(!t.contains(no.parse().unwrap()), "{no}");
        }
        assert!(parse(&[]).unwrap().http.trusted_proxies.is_empty());
        assert!(TrustedProxies::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
        for bad in ["nginx", "10.0.0.0/33", "::1/129", "10.0.0.0/x"] {
            let err = parse(&[("OMNI_TRUSTED_PROXIES", bad)]).unwrap_err().to_string();
            assert!(err.starts_with("OMNI_TRUSTED_PROXIES=") && err.contains("CIDR") || err.contains("prefix length"), "{err}");
        }
    }

    #[test]
    fn every_default_place_derives_from_the_data_root() {
        let c = parse(&[("OMNI_DATA_DIR", "/var/lib/omni")]).unwrap();
        let Database::Embedded(e) = &c.database else { panic!() };
        assert_eq!(e.data_dir.value, Path::new("/var/lib/omni/postgres"));
        assert_eq!(c.backup_dir, Path::new("/var/lib/omni/backups"));
        assert_eq!(c.wal.dir, Path::new("/var/lib/omni/wal"));
        assert_eq!(c.settings_file, Path::new("/var/lib/omni/omni-settings.json"));
        // Unset, the root is ./data: the places of every earlier version.
        let c = parse(&[]).unwrap();
        assert_eq!(c.backup_dir, Path::new("/srv/omni/data/backups"));
        // Its own variable wins; an empty one is the default.
        let c = parse(&[("OMNI_BACKUP_DIR", "/backups"), ("OMNI_WAL_DIR", "")]).unwrap();
        assert_eq!(c.backup_dir, Path::new("/backups"));
        assert_eq!(c.wal.dir, Path::new("/srv/omni/data/wal"));
    }

    #[test]
    fn places_inside_one_another_are_refused_naming_both_variables() {
        // The natural first try: the cluster at ./data, where the backups' default lies.
        let err = parse(&[("PGSERVE_DATA_DIR", "./data")]).unwrap_err().to_string();
        assert!(err.starts_with("OMNI_BACKUP_DIR=\"/srv/omni/data/backups\""), "{err}");
        assert!(err.contains("lies inside PGSERVE_DATA_DIR=/srv/omni/data") && err.contains("OMNI_DATA_DIR"), "{err}");
        for (env, inner, outer) in [
            (vec![("OMNI_WAL_DIR", "/srv/b/wal"), ("OMNI_BACKUP_DIR", "/srv/b")], "OMNI_WAL_DIR", "OMNI_BACKUP_DIR"),
            (vec![("OMNI_BACKUP_DIR", "/srv/x"), ("OMNI_WAL_DIR", "/srv/x/")], "OMNI_BACKUP_DIR", "OMNI_WAL_DIR"),
            (vec![("PGSERVE_DATA_DIR", "/srv/pg"), ("OMNI_WAL_DIR", "/srv/pg/wal")], "OMNI_WAL_DIR", "PGSERVE_DATA_DIR"),
            (vec![("OMNI_WAL_DIR", "/srv/w"), ("PGSERVE_DATA_DIR", "/srv/w/pg")], "PGSERVE_DATA_DIR", "OMNI_WAL_DIR"),
            (vec![("PGSERVE_DATA_DIR", "/srv/pg"), ("OMNI_SETTINGS_FILE", "/srv/pg/s.json")], "OMNI_SETTINGS_FILE", "PGSERVE_DATA_DIR"),
        ] {
            let err = parse(&env).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{inner}=")) && err.contains(&format!(" {outer}=")), "{env:?}: {err}");
        }
        // Apart, or a place that is not used, is fine.
        parse(&[("PGSERVE_DATA_DIR", "/srv/pg"), ("OMNI_BACKUP_DIR", "/srv/pg-backups"), ("OMNI_WAL_DIR", "/mnt/wal")]).unwrap();
        parse(&[("PGSERVE_DATA_DIR", "./data"), ("PGSERVE_MEMORY_MODE", "true"), ("OMNI_WAL_DIR", "/mnt/wal")]).unwrap();
        parse(&[("OMNI_WAL_DIR", "off"), ("OMNI_BACKUP_DIR", "/srv/omni/data/wal/b")]).unwrap();
        parse(&[("OMNI_SETTINGS_FILE", "/srv/omni/data/backups/s.json")]).unwrap();
    }

    #[test]
    fn a_place_reached_through_a_symbolic_link_is_inside_too() {
        let dir = std::env::temp_dir().join(format!("omni-apart-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("cluster")).unwrap();
        std::os::unix::fs::symlink(dir.join("cluster"), dir.join("link")).unwrap();
        let cluster = dir.join("cluster");
        let backups = dir.join("link/backups");
        let err = parse(&[("PGSERVE_DATA_DIR", cluster.to_str().unwrap()), ("OMNI_BACKUP_DIR", backups.to_str().unwrap())]).unwrap_err();
        assert!(err.to_string().contains("PGSERVE_DATA_DIR="), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn public_url_is_a_setting_like_any_other_and_must_be_an_http_url() {
        assert_eq!(parse(&[]).unwrap().http.public_url, None);
        let url = parse(&[("OMNI_PUBLIC_URL", "https://omni.example.com/")]).unwrap().http.public_url;
        assert_eq!(url.as_deref(), Some("https://omni.example.com"));
        let err = parse(&[("OMNI_PUBLIC_URL", "omni.example.com")]).unwrap_err().to_string();
        assert!(err.starts_with("OMNI_PUBLIC_URL=") && err.contains("https://"), "{err}");
    }

    #[test]
    fn http_threads_default_to_the_cores_and_refuse_zero_or_words() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parse(&[]).unwrap().http.threads, cores);
        assert_eq!(parse(&[("OMNI_HTTP_THREADS", " 3 ")]).unwrap().http.threads, 3);
        for bad in ["0", "257", "two", "-1"] {
            let err = parse(&[("OMNI_HTTP_THREADS", bad)]).unwrap_err().to_string();
            assert!(err.starts_with("OMNI_HTTP_THREADS=") && err.contains("1 to 256"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_example_lists_every_variable_with_its_default() {
        let text = include_str!("../../../.env.example");
        for v in VARS {
            let line = format!("{}={}", v.name, v.default);
            assert!(text.lines().any(|l| l.trim_start_matches("# ").trim() == line), ".env.example lacks `{line}`");
        }
    }
}
