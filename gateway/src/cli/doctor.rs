//! `omni-gateway doctor`: everything a start would trip over, checked
//! beforehand and printed as one table; and `omni-gateway healthcheck`, the
//! probe a container runtime runs against a gateway that is already up.
//!
//! Doctor changes nothing: it runs the same checks the start runs (binary
//! discovery, cluster version, pid file, ports, reachability for the
//! unprivileged account; the functions themselves, not copies) but only
//! reports. Each row is `ok`, `warn` (works, but look at it) or `FAIL` (a
//! start would stop here), and every non-ok row says what to do. The exit
//! status is non-zero when any row is `FAIL`.
//!
//! Next to a running gateway (`docker exec omni omni-gateway doctor`) the
//! port, the PostgreSQL port and the pid file are taken by that gateway, not
//! by a stranger. Doctor recognises it — `OMNI_PORT` answers
//! `/gateway/status` like an omni-gateway, and the pid file names the
//! PostgreSQL that gateway reports as its child — and describes it with ok
//! rows ("in use by the running gateway (pid N)") instead of reporting what a
//! second start would trip over.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{Config, Database, EmbeddedConfig, Origin};
use crate::pg::binaries::{self, Binaries};
use crate::pg::cluster;
use crate::pg::pidfile::{self, Verdict};
use crate::process::privilege::{self, Account};
use crate::{serve, worker};

/// Free space below this stops PostgreSQL soon after start (WAL segments are 16 MiB).
const DISK_FAIL_BYTES: u64 = 128 * 1024 * 1024;
/// Free space below this works today but not for long.
const DISK_WARN_BYTES: u64 = 1024 * 1024 * 1024;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but deserves a look.
    Warn,
    /// A start would fail on this.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found and, unless `Ok`, how to fix it.
    pub detail: String,
}

/// All rows, in the order a start meets them.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    /// The gateway found serving on `OMNI_PORT`, if any.
    pub running: Option<RunningGateway>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check { name: name.into(), status, detail: detail.into() });
    }

    fn add_result(&mut self, name: impl Into<String>, result: Result<String>) {
        match result {
            Ok(detail) => self.add(name, Status::Ok, detail),
            Err(e) => self.add(name, Status::Fail, format!("{e:#}")),
        }
    }

    /// True when something would stop a start.
    pub fn has_failures(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The table, plus a one-line verdict.
    pub fn render(&self) -> String {
        let name_w = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(5).max("check".len());
        let mut out = format!("{:<name_w$}  {:<6}  {}\n", "check", "status", "detail / fix");
        out.push_str(&format!("{}  {}  {}\n", "-".repeat(name_w), "-".repeat(6), "-".repeat(12)));
        for c in &self.checks {
            out.push_str(&format!("{:<name_w$}  {:<6}  {}\n", c.name, c.status.to_string(), c.detail));
        }
        let fails = self.checks.iter().filter(|c| c.status == Status::Fail).count();
        let warns = self.checks.iter().filter(|c| c.status == Status::Warn).count();
        out.push('\n');
        out.push_str(&if fails > 0 {
            format!("{fails} problem(s) would stop omni-gateway from starting; fix the FAIL rows above and run `omni-gateway doctor` again.\n")
        } else if let Some(running) = &self.running {
            if running.healthy {
                format!("{} is running and healthy; the rows above describe it.\n", running.who())
            } else {
                format!("{} is running but not healthy; see the warn rows above.\n", running.who())
            }
        } else if warns > 0 {
            format!("omni-gateway can start; {warns} warning(s) above are worth a look.\n")
        } else {
            "everything omni-gateway needs to start is in place.\n".to_string()
        });
        out
    }
}

/// The report when the configuration itself does not parse: one FAIL row
/// naming the variable, since nothing else can be checked without it.
pub fn configuration_failed(error: &str) -> Report {
    let mut report = Report::default();
    report.add("configuration", Status::Fail, error.to_string());
    report
}

/// Runs every check for `config`. Never changes anything on disk.
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    report.add("working directory", Status::Ok, format!("{} (relative paths are resolved against it)", config.cwd.display()));

    let addr = SocketAddr::new(config.host, config.port);
    match serve::bind(addr).await {
        Ok(_listener) => report.add("OMNI_PORT", Status::Ok, format!("{addr} is free")),
        Err(e) => match RunningGateway::find(probe_addr(config)).await {
            Some(running) => {
                report.add("OMNI_PORT", Status::Ok, format!("{addr} is in use by {}", running.who()));
                let states = running.components.iter().map(|(name, state, _)| format!("{name} {state}")).collect::<Vec<_>>().join(", ");
                if running.healthy {
                    report.add("running gateway", Status::Ok, format!("/health answers 200 ({states})"));
                } else {
                    report.add(
                        "running gateway",
                        Status::Warn,
                        format!("/health does not answer 200 ({states}). GET /gateway/status shows each component's last exit; its log says why"),
                    );
                }
                report.running = Some(running);
            }
            None => report.add("OMNI_PORT", Status::Fail, format!("{e:#}")),
        },
    }
    let worker_bin = worker::locate_binary(config.api_bin.as_deref());
    match privilege::worker_account(&config.api_user) {
        Ok(a) if a.switch => {
            let reachable = worker_bin.as_ref().ok().map(|bin| privilege::check_executable(bin, &a));
            match reachable {
                Some(Err(e)) => report.add("API worker account", Status::Fail, format!("{e:#}")),
                _ => report.add("API worker account", Status::Ok, format!("the gateway runs as root; the API worker will run as {} (uid {})", a.name, a.uid)),
            }
        }
        Ok(a) => report.add("API worker account", Status::Ok, format!("the API worker runs as the current user, {} (uid {})", a.name, a.uid)),
        Err(e) => report.add("API worker account", Status::Fail, format!("{e:#}")),
    }
    report.add_result("API worker binary", worker_bin.map(|p| p.display().to_string()));
    match &config.ui_dir {
        None => report.add("UI files", Status::Ok, "built into omni-api"),
        Some(dir) if dir.join("index.html").is_file() => report.add("UI files", Status::Ok, dir.display().to_string()),
        Some(dir) => report.add(
            "UI files",
            Status::Warn,
            format!("{} has no index.html: the browser UI will be missing. Set OMNI_UI_DIR to the ui-dist directory, or leave it unset for the UI built into omni-api", dir.display()),
        ),
    }

    match &config.database {
        Database::Embedded(embedded) => check_embedded(&mut report, embedded).await,
        Database::External { url } => check_external(&mut report, url).await,
    }

    disk_check(&mut report, "free disk (backups)", &config.backup_dir);
    // The start makes OMNI_BACKUP_DIR for the worker's account (every mode, memory mode too).
    report.add_result("backup directory", (|| {
        let worker = crate::process::privilege::worker_account(&config.api_user)?;
        if config.backup_dir.is_dir() {
            crate::process::privilege::check_reachable(&config.backup_dir, &worker).context("OMNI_BACKUP_DIR")?;
            Ok(format!("{} (used by user {})", config.backup_dir.display(), worker.name))
        } else {
            Ok(format!("{} does not exist yet; the start creates it for user {}", config.backup_dir.display(), worker.name))
        }
    })());
    check_sqlite(&mut report, config);
    // A malformed OMNI_REPOSITORY_URL never gets here: the configuration row names it.
    match crate::repository::config::RepositoryConfig::parse(config) {
        Ok(r) => match &r.location {
            None => report.add("off-site repository", Status::Ok, "off (OMNI_REPOSITORY_URL is empty): every copy of the data stays on this machine"),
            Some(l) => report.add(
                "off-site repository",
                Status::Ok,
                format!("{} (credentials from the environment; WAL shipped every {} ms; not contacted by doctor)", l.display(), r.wal_interval.as_millis()),
            ),
        },
        Err(e) => report.add("off-site repository", Status::Fail, e.to_string()),
    }
    if config.wal.enabled && config.wal.encrypt_local {
        // A missing OMNI_ENCRYPT_* never gets here either: the configuration row names it.
        let to = crate::repository::config::encryption(config).ok().and_then(|e| e.sealer().ok()).map_or_else(|| "age".into(), |s| s.describe());
        let key = match crate::repository::config::identity_file(config) {
            Some(p) => format!("OMNI_DECRYPT_IDENTITY_FILE={} opens them here", p.display()),
            None => "restores need OMNI_DECRYPT_IDENTITY_FILE or restore --identity FILE (not set here: the scheduled drill is skipped)".into(),
        };
        report.add("local copies", Status::Ok, format!("encrypted ({to}, OMNI_ENCRYPT_LOCAL): base backups and completed WAL segments in {}, logical backups in {}; {key}; the WAL segment being written stays plain", config.wal.dir.display(), config.backup_dir.display()));
    } else if config.wal.enabled {
        report.add("local copies", Status::Ok, format!("not encrypted (OMNI_ENCRYPT_LOCAL=false): anyone who reads {} reads the backups", config.wal.dir.display()));
    }
    let token_file = crate::app::setup_token_file(config);
    match std::fs::read_to_string(&token_file) {
        Ok(token) if config.api_key.is_none() => report.add(
            "setup token",
            Status::Ok,
            format!("setup token: {} (from {}; opens setup until it completes: …/setup#token=…)", token.trim(), token_file.display()),
        ),
        _ => {}
    }
    report
}

async fn check_embedded(report: &mut Report, embedded: &EmbeddedConfig) {
    let explicit = embedded.bin_dir.clone();
    let bins = tokio::task::spawn_blocking(move || binaries::find(explicit.as_deref())).await.expect("binary discovery does not panic");
    let bins = match bins {
        Ok(b) => {
            report.add("PostgreSQL binaries", Status::Ok, format!("{} in {} (found by {})", b.version, b.dir.display(), b.found_by));
            Some(b)
        }
        Err(e) => {
            report.add("PostgreSQL binaries", Status::Fail, e.to_string());
            None
        }
    };
    for tool in ["pg_dump", "psql"] {
        if let Some(b) = &bins {
            if !b.tool(tool).is_file() {
                report.add(
                    tool,
                    Status::Warn,
                    format!("{} is missing: backups and restores will fail. Install the PostgreSQL client package of the same version", b.tool(tool).display()),
                );
            }
        }
    }

    let account = match privilege::postgres_account(&embedded.run_as) {
        Ok(a) => {
            let how = if a.switch { "the gateway runs as root; PostgreSQL will run as" } else { "PostgreSQL runs as the current user," };
            report.add("PostgreSQL account", Status::Ok, format!("{how} {} (uid {})", a.name, a.uid));
            Some(a)
        }
        Err(e) => {
            report.add("PostgreSQL account", Status::Fail, format!("{e:#}"));
            None
        }
    };

    if embedded.port.value == 0 {
        report.add("PGSERVE_PORT", Status::Ok, "0: a free port is picked at each start");
    } else {
        let port = embedded.port.value;
        let theirs = report.running.as_ref().and_then(|r| r.postgres_pid().filter(|pid| postgres_port(*pid) == Some(port)).map(|pid| (pid, r.who())));
        match (cluster::check_port_free(port), theirs) {
            (Ok(()), _) => report.add("PGSERVE_PORT", Status::Ok, format!("127.0.0.1:{port} is free")),
            (Err(_), Some((pid, who))) => report.add("PGSERVE_PORT", Status::Ok, format!("127.0.0.1:{port} is in use by PostgreSQL (pid {pid}) of {who}")),
            (Err(e), None) => report.add("PGSERVE_PORT", Status::Fail, format!("{e:#}")),
        }
    }

    if embedded.memory_mode {
        check_tmpfs(report);
    } else {
        check_data_dir(report, embedded, bins.as_ref(), account.as_ref());
        disk_check(report, "free disk (data)", &embedded.data_dir.value);
    }
}

/// The persistent cluster: where it is, whose it is, which version, and whether a PostgreSQL already runs on it.
fn check_data_dir(report: &mut Report, embedded: &EmbeddedConfig, bins: Option<&Binaries>, account: Option<&Account>) {
    let dir = &embedded.data_dir.value;
    let origin = match embedded.data_dir.origin {
        Origin::Default => "default; set PGSERVE_DATA_DIR to change".to_string(),
        o => format!("PGSERVE_DATA_DIR from {o}"),
    };
    // Who owns the cluster now (pg/lock.rs): a shared look, given back at once.
    let lock_file = crate::pg::lock::lock_file(dir);
    match crate::pg::lock::probe(dir) {
        Ok(crate::pg::lock::Holder::Nobody) => report.add("cluster lock", Status::Ok, format!("free: no gateway or maintenance command works on this cluster now ({})", lock_file.display())),
        Ok(holder) => report.add("cluster lock", Status::Ok, format!("{} holds the cluster ({}); a second gateway or a restore/upgrade would be refused", holder.describe(), lock_file.display())),
        Err(e) => report.add("cluster lock", Status::Fail, format!("{e:#}")),
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        if embedded.require_existing {
            report.add(
                "data directory",
                Status::Fail,
                format!("{} does not exist and PGSERVE_REQUIRE_EXISTING is set. Point PGSERVE_DATA_DIR at the existing cluster, or unset PGSERVE_REQUIRE_EXISTING to create a new one", dir.display()),
            );
        } else {
            report.add("data directory", Status::Ok, format!("{} ({origin}) does not exist yet: a new cluster will be created there", dir.display()));
        }
        if let Some(a) = account {
            report.add_result("reachable by PostgreSQL", privilege::check_reachable(dir, a).map(|()| format!("user {} can traverse every parent of {}", a.name, dir.display())));
        }
        return;
    };
    if !meta.is_dir() {
        report.add("data directory", Status::Fail, format!("{} is not a directory. Point PGSERVE_DATA_DIR at a directory", dir.display()));
        return;
    }
    let owner = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(meta.uid())).ok().flatten().map(|u| u.name).unwrap_or_else(|| meta.uid().to_string());
    let mode = meta.permissions().mode() & 0o7777;
    let has_cluster = dir.join("PG_VERSION").is_file();
    let what = if has_cluster { "holds a cluster" } else { "holds no cluster yet" };
    report.add("data directory", Status::Ok, format!("{} ({origin}), {what}, owner {owner}, mode {mode:o}", dir.display()));

    if let Some(a) = account {
        if meta.uid() != a.uid && !a.switch {
            report.add(
                "data directory owner",
                Status::Fail,
                format!("{} belongs to {owner}, but PostgreSQL would run as {}. Run the gateway as {owner}, or `chown -R {} {}`", dir.display(), a.name, a.name, dir.display()),
            );
        } else if meta.uid() != a.uid {
            report.add("data directory owner", Status::Warn, format!("{} belongs to {owner}; the gateway gives it to {} at start", dir.display(), a.name));
        }
        report.add_result("reachable by PostgreSQL", privilege::check_reachable(dir, a).map(|()| format!("user {} can traverse every parent of {}", a.name, dir.display())));
    }
    if cluster::creating_marker(dir).exists() {
        report.add(
            "cluster",
            Status::Warn,
            format!(
                "{} exists: a start stopped while it was creating this cluster (before it was on disk, so it holds no data); the next start removes it and creates it again",
                cluster::creating_marker(dir).display()
            ),
        );
        return;
    }
    if has_cluster && mode & 0o077 != 0 {
        report.add("data directory mode", Status::Warn, format!("mode {mode:o} is wider than 700; the gateway tightens it to 700 at start"));
    }

    if !has_cluster {
        if embedded.require_existing {
            report.add(
                "cluster",
                Status::Fail,
                format!("PGSERVE_REQUIRE_EXISTING is set and {} holds no cluster (no PG_VERSION). Point PGSERVE_DATA_DIR at the existing cluster", dir.display()),
            );
        } else if std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
            report.add(
                "cluster",
                Status::Fail,
                format!("{} is not empty but holds no cluster (no PG_VERSION); the gateway refuses to touch it. Point PGSERVE_DATA_DIR at an empty or missing directory, or at an existing cluster", dir.display()),
            );
        }
        return;
    }

    if let Some(b) = bins {
        let older = crate::pg::upgrade::cluster_major(dir).is_some_and(|m| m < b.major);
        match account {
            // The start would upgrade it (pg/upgrade.rs): what it would do, or why it could not.
            Some(a) if older && embedded.auto_upgrade => report.add_result(
                "cluster version",
                crate::pg::upgrade::plan_read_only(embedded, dir, b, a).and_then(|p| {
                    if p.free < p.needed {
                        anyhow::bail!("PostgreSQL {} cluster to upgrade to {}, but only {} MB are free and a full copy needs about {} MB (less if the filesystem can clone files). Free some space", p.from, b.major, p.free >> 20, p.needed >> 20);
                    }
                    Ok(format!("PostgreSQL {} cluster: the start upgrades it to {} (old binaries {}; `omni-gateway upgrade --check` tries it)", p.from, b.major, p.old.dir.display()))
                }),
            ),
            _ => report.add_result("cluster version", cluster::check_version(dir, b).map(|()| format!("PostgreSQL {} cluster, same major version as the binaries", b.major))),
        }
    }
    if let Ok(Some(record)) = crate::pg::upgrade::load(dir) {
        report.add("last upgrade", Status::Ok, record.summary());
    }
    let pw = cluster::password_file(dir);
    if pw.is_file() {
        report.add("password file", Status::Ok, pw.display().to_string());
    } else {
        report.add(
            "password file",
            Status::Fail,
            format!("{} is missing, so the gateway cannot log in to the cluster. Restore it, or reset the password (`ALTER USER postgres PASSWORD '…'`) and write it there with mode 0600", pw.display()),
        );
    }
    let running = report.running.as_ref().and_then(|r| r.postgres_pid().map(|pid| (pid, r.who())));
    check_pid_file(report, dir, running);
}

/// The start's own judgement ([`pidfile::inspect`]); a live file is fine
/// when it names the PostgreSQL of the gateway running here.
fn check_pid_file(report: &mut Report, dir: &Path, running: Option<(i32, String)>) {
    let Some(inspection) = pidfile::inspect(dir) else {
        report.add("postmaster.pid", Status::Ok, "none: no PostgreSQL runs on this directory");
        return;
    };
    let pid = inspection.pid();
    match (&inspection.verdict, running) {
        (Verdict::Stale(reason), _) => report.add("postmaster.pid", Status::Ok, format!("stale ({reason}); the gateway removes it at start")),
        (_, Some((theirs, who))) if pid == Some(theirs) => {
            report.add("postmaster.pid", Status::Ok, format!("in use by PostgreSQL (pid {theirs}) of {who}"))
        }
        (Verdict::Live(reason), _) => report.add("postmaster.pid", Status::Fail, format!("{reason} ({}). {}", dir.display(), pidfile::advice(&inspection))),
        (Verdict::CannotTell(reason), _) => report.add(
            "postmaster.pid",
            Status::Fail,
            format!("may belong to a running PostgreSQL: {reason}. {}", pidfile::advice(&inspection)),
        ),
    }
}

/// A gateway answering on `OMNI_PORT`, as `/gateway/status` describes it.
#[derive(Debug, Clone)]
pub struct RunningGateway {
    /// The gateway's own pid: the parent of its children, when they are
    /// visible from here (not when it runs in another PID namespace).
    pub pid: Option<i32>,
    /// `/health` answered 200.
    pub healthy: bool,
    /// Name, state and pid of each component.
    pub components: Vec<(String, String, Option<i32>)>,
}

impl RunningGateway {
    /// Asks `addr` whether it is an omni-gateway: only one answers
    /// `/gateway/status` with a `components` list.
    async fn find(addr: SocketAddr) -> Option<RunningGateway> {
        let timeout = Duration::from_secs(3);
        let status = omni_contract::probe::get(addr, "/gateway/status", timeout).await.ok().filter(|a| a.status == 200)?;
        let json: serde_json::Value = serde_json::from_slice(&status.body).ok()?;
        let components: Vec<(String, String, Option<i32>)> = json["components"]
            .as_array()?
            .iter()
            .map(|c| {
                let pid = c["pid"].as_i64().and_then(|p| i32::try_from(p).ok());
                (c["name"].as_str().unwrap_or("?").to_string(), c["state"].as_str().unwrap_or("?").to_string(), pid)
            })
            .collect();
        let healthy = omni_contract::probe::get(addr, "/health", timeout).await.is_ok_and(|a| a.status == 200);
        let pid = components.iter().filter_map(|(_, _, pid)| *pid).find_map(parent_pid);
        Some(RunningGateway { pid, healthy, components })
    }

    fn postgres_pid(&self) -> Option<i32> {
        self.components.iter().find(|(name, _, _)| name == "postgres").and_then(|(_, _, pid)| *pid)
    }

    /// "the running gateway (pid N)", for rows and the verdict.
    pub fn who(&self) -> String {
        match self.pid {
            Some(pid) => format!("the running gateway (pid {pid})"),
            None => "a running gateway (its pid is not visible from here)".to_string(),
        }
    }
}

/// Field 4 of `/proc/<pid>/stat` (readable without ptrace rights).
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.get(stat.rfind(')')? + 1..)?.split_whitespace().nth(1)?.parse().ok()
}

/// The `-p` a postmaster was started with, from its command line.
fn postgres_port(pid: i32) -> Option<u16> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    args.windows(2).find(|w| w[0] == "-p").and_then(|w| w[1].parse().ok())
}

/// Where to reach the gateway of `config`: loopback when it listens on every interface.
fn probe_addr(config: &Config) -> SocketAddr {
    let ip = match config.host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, config.port)
}

/// Memory mode wants a writable tmpfs with room for a cluster.
fn check_tmpfs(report: &mut Report) {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        report.add(
            "tmpfs (memory mode)",
            Status::Warn,
            format!("/dev/shm is missing: the throw-away cluster goes to {} (disk, slower). Mount a tmpfs at /dev/shm (Docker: --shm-size=256m)", std::env::temp_dir().display()),
        );
        return;
    }
    let probe = shm.join(format!(".omni-doctor-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"probe") {
        report.add("tmpfs (memory mode)", Status::Fail, format!("/dev/shm is not writable ({e}). Make it writable (mode 1777) or unset PGSERVE_MEMORY_MODE"));
        return;
    }
    let _ = std::fs::remove_file(&probe);
    match free_bytes(shm) {
        Ok(free) if free < DISK_FAIL_BYTES => report.add(
            "tmpfs (memory mode)",
            Status::Fail,
            format!("/dev/shm has only {} free; a cluster needs at least {}. Enlarge it (Docker: --shm-size=256m) or unset PGSERVE_MEMORY_MODE", human(free), human(DISK_FAIL_BYTES)),
        ),
        Ok(free) => report.add("tmpfs (memory mode)", Status::Ok, format!("/dev/shm writable, {} free", human(free))),
        Err(e) => report.add("tmpfs (memory mode)", Status::Warn, format!("could not read free space of /dev/shm: {e:#}")),
    }
}

/// Free space where `path` is, or would be once created.
fn disk_check(report: &mut Report, name: &str, path: &Path) {
    let existing = nearest_existing(path);
    match free_bytes(&existing) {
        Ok(free) if free < DISK_FAIL_BYTES => report.add(
            name,
            Status::Fail,
            format!("only {} free at {}; PostgreSQL needs room for WAL. Free space there, or point the directory elsewhere", human(free), existing.display()),
        ),
        Ok(free) if free < DISK_WARN_BYTES => {
            report.add(name, Status::Warn, format!("{} free at {}; the database and backups will fill it soon", human(free), existing.display()))
        }
        Ok(free) => report.add(name, Status::Ok, format!("{} free at {}", human(free), existing.display())),
        Err(e) => report.add(name, Status::Warn, format!("could not read free space at {}: {e:#}", existing.display())),
    }
}

fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/")).to_path_buf()
}

fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn human(bytes: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    if bytes as f64 >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{} MiB", bytes / (1024 * 1024))
    }
}

/// `DATABASE_URL`: the server must answer a real query, as the worker's will.
async fn check_external(report: &mut Report, url: &str) {
    report.add("database", Status::Ok, format!("external PostgreSQL of DATABASE_URL ({}); no embedded cluster", omni_contract::redact::url_password(url)));
    let db = crate::pg::external::ExternalDatabase::new(url);
    match db {
        Ok(db) => report.add_result("DATABASE_URL reachable", db.check().await.map(|()| "SELECT 1 answered".to_string())),
        Err(e) => report.add("DATABASE_URL reachable", Status::Fail, format!("{e:#}")),
    }
    let bins = tokio::task::spawn_blocking(|| binaries::find(None)).await.expect("binary discovery does not panic");
    match bins {
        Ok(b) if b.tool("pg_dump").is_file() => report.add("pg_dump (backups)", Status::Ok, format!("{} in {}", b.version, b.dir.display())),
        _ => report.add(
            "pg_dump (backups)",
            Status::Warn,
            "no PostgreSQL client tools found: backups of the external database will fail. Install the PostgreSQL client package (same major version as the server or newer)",
        ),
    }
}

fn check_sqlite(report: &mut Report, config: &Config) {
    let found: Vec<String> = omni_contract::sqlite::find_all(&config.cwd).iter().map(|p| p.display().to_string()).collect();
    if found.is_empty() {
        report.add("old SQLite database", Status::Ok, "none found");
    } else {
        report.add(
            "old SQLite database",
            Status::Warn,
            format!("{}: Omni now stores everything in PostgreSQL and will not read it. Migrate its data (see GET /api/v1/migration/status)", found.join(", ")),
        );
    }
}

/// `omni-gateway healthcheck`: `GET /health` on the configured port; `Ok`
/// only on a 200. For container `HEALTHCHECK`s, so no curl is needed in the image.
pub async fn healthcheck(config: &Config) -> Result<()> {
    let addr = probe_addr(config);
    let answer = omni_contract::probe::get(addr, "/health", Duration::from_secs(5))
        .await
        .with_context(|| format!("GET http://{addr}/health failed: is omni-gateway running with OMNI_PORT={}?", config.port))?;
    if answer.status != 200 {
        bail!("GET http://{addr}/health answered {}: {}", answer.status, answer.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_failure_fails_the_report_and_the_verdict_says_so() {
        let mut r = Report::default();
        r.add("a", Status::Ok, "fine");
        r.add("b", Status::Warn, "look");
        assert!(!r.has_failures());
        assert!(r.render().contains("can start"));
        r.add("c", Status::Fail, "broken; do X");
        assert!(r.has_failures());
        let table = r.render();
        assert!(table.contains("c      FAIL    broken; do X"), "{table}");
        assert!(table.contains("would stop omni-gateway from starting"), "{table}");
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human(512 * 1024 * 1024), "512 MiB");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
