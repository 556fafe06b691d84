//! Wiring: the order in which the gateway brings things up and takes them
//! down.
//!
//! Up: bind the port → find binaries → prepare the cluster → supervise
//! PostgreSQL → once it is ready, supervise the worker → ready (`READY=1`).
//! While running: SIGHUP retries at once a child in `backoff` or `failed`,
//! and reloads a running worker without dropping a request.
//! Down, on SIGTERM/SIGINT: the gateway turns `stopping` (`/health` answers
//! 503 from this moment) and says `STOPPING=1` → in-flight requests drain →
//! stop the worker → stop PostgreSQL (fast shutdown) → background tasks are
//! cancelled and awaited → remove what was only for this run. Every step
//! logs what it is doing.
//!
//! One shutdown mechanism ([`Shutdown`]): every task the gateway starts
//! runs on the tracker of one stage and stops when that stage's token is
//! cancelled; the stages stop in the order of [`stages`] (the HTTP drain,
//! the relay, point-in-time recovery's jobs and other database jobs, the
//! WAL streamer and the worker, PostgreSQL, then the background tasks), each
//! within its grace. A second SIGINT/SIGTERM while stopping hurries: no
//! grace is waited out any more. Nothing is left running when [`run`]
//! returns.
//!
//! Signals are answered from the first moment, the preparation of the
//! cluster included: there a first Ctrl-C only asks (a major upgrade thrown
//! away is an hour lost), a second one or a SIGTERM stops the preparation
//! at its next safe step ([`shutdown::AskOnce`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{Config, Database, EmbeddedConfig};
use crate::relay::ReplicationConfig;
use crate::supervise::gate::StartGate;
use crate::serve::{self, Surface};
use crate::serve::metrics::Metrics;
use crate::pg::{binaries, cluster, PostgresPolicy};
use crate::process::privilege::Account;
use crate::serve::proxy::Proxy;
use crate::supervise::sd_notify::{self, Notifier};
use crate::status::Board;
use crate::serve::upstream::Upstreams;
use crate::worker::{self, WorkerPolicy};
use crate::process::child;
use crate::supervise;
use crate::supervise::shutdown::{self, Shutdown};
use crate::worker::dev;

/// Once the children are down, how long the remaining tasks may take to
/// notice their cancellation before the gateway exits anyway.
const TASKS_GRACE: Duration = Duration::from_secs(10);
/// Without `OMNI_WAL_SYNC`, the WAL streamer starts once the stack serves,
/// or after this long if it does not serve by then.
const WAL_STREAMER_PATIENCE: Duration = Duration::from_secs(10);

/// At stop, how long a base backup (or a restore) in progress may take to
/// finish before the worker and PostgreSQL are stopped under it.
const JOBS_GRACE: Duration = Duration::from_secs(30);
/// At stop, how long the off-site shipper may take for its last WAL upload.
const REPOSITORY_GRACE: Duration = Duration::from_secs(15);
/// Added to a supervised child's own stop budget (its stop signals and
/// their escalation) as its stage's grace: a step under way is given 2 s.
const SUPERVISOR_SLACK: Duration = Duration::from_secs(5);

/// The shutdown stages in stop order: what depends on something stops
/// before it. Their graces are backstops: each stage bounds its own stop
/// (the HTTP drain its timeout, a supervisor its stop signals, which end
/// in SIGKILL).
///
/// The WAL streamer stops after PostgreSQL: a server that stops sends its
/// connected streamer every commit it acknowledged and its shutdown
/// checkpoint before it exits, so a clean stop leaves the archive complete
/// (stopped first, the streamer dropped the WAL still on its way, writes
/// included). Its exit when PostgreSQL is gone is the end of its run, not a
/// failure (`supervise`: nothing restarts once the stop is asked).
fn stages(config: &Config) -> Shutdown {
    let (drain, stop) = (config.http.drain_timeout, config.restart.stop_timeout);
    Shutdown::new(&[
        ("http", "serving HTTP: draining in-flight requests", drain + Duration::from_secs(2)),
        ("relay", "the replication relay", Duration::from_secs(10)),
        ("jobs", "database jobs (a base backup or restore in progress may finish)", JOBS_GRACE),
        ("api", "the API worker", drain + SUPERVISOR_SLACK),
        ("postgres", "PostgreSQL", stop + Duration::from_secs(5) + SUPERVISOR_SLACK),
        ("wal", "the WAL streamer", stop.min(Duration::from_secs(10)) + Duration::from_secs(5) + SUPERVISOR_SLACK),
        // After the streamer and PostgreSQL: it ships their last WAL (repository/ship.rs).
        ("repository", "the off-site repository's last uploads", REPOSITORY_GRACE),
        ("background", "background tasks", TASKS_GRACE),
    ])
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

enum Event {
    Stop(&'static str),
    Reload,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop("SIGTERM"),
            _ = self.int.recv() => Event::Stop("SIGINT"),
            _ = self.hup.recv() => Event::Reload,
        }
    }
}

/// What runs, and how it stops.
struct Running {
    board: Board,
    /// Every task, by stage; [`shutdown`] stops them in order.
    shutdown: Shutdown,
    /// The supervisors, for SIGHUP.
    handles: Vec<supervise::Handle>,
    cluster: Option<Arc<cluster::Cluster>>,
    notifier: Arc<Notifier>,
    /// The worker's channel to the gateway (`/gateway/internal/…`).
    internal: Arc<crate::serve::internal::Internal>,
}

impl Running {
    fn stage(&self, name: &str) -> &shutdown::Stage {
        self.shutdown.stage(name)
    }
}

/// Runs the gateway until a stop signal; returns the process exit code.
pub async fn run(config: Config) -> Result<i32> {
    let started = Instant::now();
    tracing::info!("omni-gateway {} starting in {}", env!("CARGO_PKG_VERSION"), config.cwd.display());
    // Signals first: a Ctrl-C during a slow initdb must still stop cleanly.
    let mut signals = Signals::install()?;
    let notifier = Arc::new(Notifier::from_env());
    // One owner per cluster (pg/lock.rs), taken before anything
    // touches it and held until `run` returns.
    let _cluster_lock = match &config.database {
        Database::Embedded(e) if !e.memory_mode => Some(crate::pg::lock::acquire(&e.data_dir.value, "run")?),
        _ => None,
    };
    warn_about_sqlite(&config);

    let addr = SocketAddr::new(config.host, config.port);
    // HTTPS: the certificate is checked before anything binds or starts.
    let https = crate::tls::settings::HttpsSettings::parse(&config)?;
    if https.is_none() {
        if let Some(port) = config.parser().string("OMNI_HTTP_PORT") {
            tracing::warn!("OMNI_HTTP_PORT={port} is ignored: the plain-HTTP redirect port exists only with HTTPS (OMNI_TLS_CERT and OMNI_TLS_KEY, or OMNI_TLS_DOMAINS); OMNI_PORT serves plain HTTP");
        }
    }
    let (tls, acme) = match https.as_ref().map(|s| &s.source) {
        Some(crate::tls::settings::Source::Files(files)) => {
            let (key, info) = crate::tls::load(files)?;
            tracing::info!(subject = %info.subject, chain = info.chain_length, "TLS certificate loaded from {}", files.cert.display());
            (Some(crate::tls::Live::new(key, info)), None)
        }
        // ACME: a stored or self-signed certificate at once, obtained in the background.
        Some(crate::tls::settings::Source::Acme(settings)) => {
            let (acme, live) = crate::tls::acme::Acme::start(settings.clone()).await?;
            (Some(live), Some(acme))
        }
        None => None.unzip(),
    };
    let listener = serve::bind(addr).await?;
    let plain = match https.as_ref().and_then(|s| s.http_port) {
        Some(port) => Some(serve::plain::bind(SocketAddr::new(config.host, port)).await?),
        None => None,
    };
    match &https {
        Some(s) => tracing::info!(
            "listening on https://{addr} (HTTP/2 and HTTP/1.1){}",
            s.http_port.map_or_else(|| "; no plain-HTTP port (OMNI_HTTP_PORT=off)".to_string(), |p| format!("; http://{}:{p} redirects to it", config.host))
        ),
        None => tracing::info!("listening on http://{addr}"),
    }
    // Replaced certificate files are served to new connections; the watch
    // lasts as long as the gateway runs.
    let _tls_watch = match (https.as_ref().map(|s| &s.source), &tls) {
        (Some(crate::tls::settings::Source::Files(files)), Some(live)) => Some(crate::tls::watch(files.clone(), live.clone())?),
        _ => None,
    };

    let worker_bin = worker::locate_binary(config.api_bin.as_deref())?;
    let worker_account = worker::prepare_account(&config, &worker_bin)?;
    let components: &[&'static str] = match &config.database {
        Database::Embedded(e) if !e.memory_mode && config.wal.enabled => &["postgres", "api", "wal"],
        Database::Embedded(_) => &["postgres", "api"],
        Database::External { .. } => &["api"],
    };
    let database = match &config.database {
        Database::External { url } => Some(Arc::new(crate::pg::external::ExternalDatabase::new(url)?)),
        Database::Embedded(_) => None,
    };
    let board = Board::new(components);
    // What onboarding's summary shows as the storage in effect (issue 17).
    board.set_storage(match &config.database {
        Database::Embedded(e) => serde_json::json!({
            "kind": if e.memory_mode { "memory" } else { "embedded" },
            "data_dir": e.data_dir.value.display().to_string(),
            "data_dir_origin": e.data_dir.origin.to_string(),
            "memory_mode": e.memory_mode,
            // OMNI_ENCRYPT_LOCAL: the WAL archive's base backups and completed segments are kept encrypted.
            "wal_encrypted_locally": !e.memory_mode && config.wal.enabled && config.wal.encrypt_local,
        }),
        Database::External { .. } => serde_json::json!({ "kind": "external" }),
    });
    let internal = Arc::new(crate::serve::internal::Internal::new(match &config.database {
        Database::Embedded(e) if !e.memory_mode && config.wal.enabled => None,
        Database::Embedded(e) if !e.memory_mode => Some("OMNI_WAL_DIR=off: point-in-time recovery is turned off, so there is no WAL archive, no base backups and no point-in-time restores (the .sql backups remain)"),
        Database::Embedded(_) => Some("PGSERVE_MEMORY_MODE is on: a throw-away cluster has no WAL archive, so there are no base backups or point-in-time restores"),
        Database::External { .. } => Some("DATABASE_URL names an external PostgreSQL: point-in-time recovery covers the embedded cluster only; use that server's own backup tools"),
    }, crate::repository::config::RepositoryConfig::parse(&config).ok()));
    let streams_wal = components.contains(&"wal");
    let shutdown = stages(&config);
    let (background, http) = (shutdown.stage("background").clone(), shutdown.stage("http").clone());
    sd_notify::spawn_reporter(notifier.clone(), board.clone(), background.tracker(), background.token());
    let upstreams = Upstreams::default();
    let metrics = Arc::new(Metrics::default().with_wal_dir(streams_wal.then(|| config.wal.dir.clone())));
    let history = crate::serve::metrics_history::History::default();
    history.spawn(metrics.clone(), board.clone(), background.tracker(), background.token());
    crate::serve::trim::spawn(metrics.clone(), background.tracker(), background.token());
    let surface = Arc::new(Surface {
        board: board.clone(),
        proxy: Proxy {
            upstreams: upstreams.clone(),
            limits: config.http.clone(),
            metrics,
            tunnels: tokio_util::task::TaskTracker::new(),
            close_tunnels: tokio_util::sync::CancellationToken::new(),
        },
        database,
        logs: crate::serve::logring::installed(),
        history,
        auth: crate::serve::gateway_auth::GatewayAuth::new(upstreams.clone()),
        streams: tokio_util::task::TaskTracker::new(),
        stop_streams: http.token(),
        internal: internal.clone(),
        stream_slots: Default::default(),
        https: https.clone().zip(tls.clone()).map(|(settings, live)| Arc::new(serve::Https::new(live, settings, acme.clone()))),
    });
    if let (Some(acme), Some(live)) = (&acme, &tls) {
        background.spawn(acme.clone().run(live.clone(), background.token()));
    }
    // A hurried stop does not wait for the drain any more.
    if let Some(plain) = plain {
        let redirecting = serve::plain::serve(plain, config.port, acme.as_ref().map(|a| a.challenges.clone()), config.http.header_timeout, config.http.drain_timeout, http.token());
        http.spawn(redirecting);
    }
    let (serving, hurried) = (serve::serve(listener, surface, http.token(), config.http.clone()), http.hurried());
    http.spawn(async move {
        tokio::select! {
            () = serving => {}
            () = hurried.cancelled() => tracing::info!("the stop is hurried: requests still in flight are cut off"),
        }
    });
    let mut running = Running { board, shutdown, handles: Vec::new(), cluster: None, notifier, internal };

    // From here on every way out goes through the same orderly stop.
    let outcome = supervise(&config, &mut running, &mut signals, (worker_bin, worker_account), upstreams, addr, started).await;
    let code = match &outcome {
        Ok(()) => 0,
        // A preparation stopped on request is a stop like any other.
        Err(e) if shutdown::is_stopped(e) => {
            tracing::warn!("{e:#}");
            0
        }
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    };
    stop(running, &mut signals).await;
    Ok(code)
}

/// Where the one-time setup token is kept: beside the data directory
/// (`<data_dir>.setup-token`), or beside the settings file with an
/// external database. Mode 0600; `omni-gateway doctor` reads it.
/// The settings each feature parses for itself from the configuration's
/// layers (today the relay's), checked with the rest before anything starts.
pub fn check_features(config: &Config) -> Result<(), crate::config::ConfigError> {
    crate::relay::ReplicationConfig::parse(config)?;
    crate::tls::settings::HttpsSettings::parse(config)?;
    crate::repository::config::RepositoryConfig::parse(config)?;
    crate::repository::config::check_local_encryption(config)
}

pub fn setup_token_file(config: &Config) -> PathBuf {
    match &config.database {
        Database::Embedded(e) => {
            let mut name = e.data_dir.value.file_name().unwrap_or_default().to_os_string();
            name.push(".setup-token");
            e.data_dir.value.with_file_name(name)
        }
        Database::External { .. } => config.settings_file.with_file_name("setup-token"),
    }
}

/// Makes this start's setup token and writes it to [`setup_token_file`]
/// (the worker logs it while the install is not set up, and accepts it
/// until setup completes). None with `OMNI_API_KEY`: such an install counts
/// as set up, and a token file from before is removed. The file is written
/// as a new temporary file (`O_EXCL | O_NOFOLLOW`, 0600) renamed over the
/// old one, so a link planted at its name is replaced, never followed.
fn prepare_setup_token(config: &Config) -> Option<String> {
    use rand::{distributions::Alphanumeric, Rng};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = setup_token_file(config);
    if config.api_key.is_some() {
        let _ = std::fs::remove_file(&path);
        return None;
    }
    let token: String = rand::rngs::OsRng.sample_iter(&Alphanumeric).take(43).map(char::from).collect();
    let temp = path.with_file_name(format!(".{}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let written = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&temp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temp);
        tracing::warn!("could not write the setup token to {}: {error}; it is still in this log while setup is open", path.display());
    }
    Some(token)
}

/// Starts the children in order and serves until a stop signal.
async fn supervise(
    config: &Config,
    running: &mut Running,
    signals: &mut Signals,
    (worker_bin, worker_account): (PathBuf, Account),
    upstreams: Upstreams,
    addr: SocketAddr,
    started: Instant,
) -> Result<()> {
    // Checked by `check_features` before the gateway started.
    let replication = crate::relay::ReplicationConfig::parse(config)?;
    let board = running.board.clone();
    let gateway_token = running.internal.token.clone();
    let setup_token = prepare_setup_token(config);
    let public_url = config.http.public_url.clone();
    // The worker's policy, for the database at `url`. Its failures while
    // PostgreSQL was down are not its own: it is retried as soon as
    // PostgreSQL is back.
    let worker_policy = |url: &str, pg_bin_dir: Option<PathBuf>| {
        let mut settings = config.worker_settings(url);
        settings.pg_bin_dir = pg_bin_dir;
        settings.gateway_token = Some(gateway_token.clone());
        settings.setup_token = setup_token.clone();
        settings.public_url = public_url.clone();
        settings.backup_repository = crate::repository::config::shown_url(config);
        // OMNI_ENCRYPT_LOCAL: the worker seals its backups (public keys) and restores them with the identity.
        settings.backup_encrypt = crate::repository::config::logical_encryption(config);
        settings.decrypt_identity_file = crate::repository::config::identity_file(config);
        WorkerPolicy::new(worker_bin.clone(), settings, upstreams.clone(), config.http.drain_timeout, worker_account.clone()).reporting_leader_to(board.clone())
    };
    // A point-in-time restore holds PostgreSQL's and the streamer's starts (pitr/online.rs).
    let hold = StartGate::new("the point-in-time restore in progress");
    // PostgreSQL (embedded) or the external URL.
    let (policy, postgres_commands) = match &config.database {
        Database::Embedded(embedded) => {
            match start_embedded(config, embedded, replication.as_ref(), &hold, running, signals, &worker_policy).await? {
                Some((policy, postgres)) => (policy, Some(postgres)),
                None => return Ok(()),
            }
        }
        Database::External { url } => {
            child::start_reaper(running.stage("background").tracker(), running.stage("background").token());
            tracing::info!("using the external PostgreSQL of DATABASE_URL; no embedded cluster");
            let bins = tokio::task::spawn_blocking(|| binaries::find(None).ok()).await?;
            (worker_policy(url, bins.map(|b| b.dir)), None)
        }
    };
    let deferred_wal = start_wal(config, running, &hold, postgres_commands);
    start_repository(config, running)?;

    let depends_on = matches!(config.database, Database::Embedded(_)).then_some("postgres");
    let api = supervise::spawn(policy, config.restart, board.clone(), running.stage("api"), depends_on);
    if config.dev {
        dev::watch_worker_binary(&worker_bin, api.commands(), running.stage("background").tracker(), running.stage("background").token());
    }
    running.handles.push(api);

    serve_until_stopped(config, running, signals, deferred_wal, addr, started).await
}

/// The embedded cluster: binaries found, the cluster prepared, PostgreSQL
/// supervised, the worker's first instance started beside it. Returns the
/// worker's policy and PostgreSQL's command channel once PostgreSQL accepts
/// connections; `None` when a stop came first.
async fn start_embedded(
    config: &Config,
    embedded: &EmbeddedConfig,
    replication: Option<&ReplicationConfig>,
    hold: &StartGate,
    running: &mut Running,
    signals: &mut Signals,
    worker_policy: &dyn Fn(&str, Option<PathBuf>) -> WorkerPolicy,
) -> Result<Option<(WorkerPolicy, mpsc::Sender<supervise::Command>)>> {
    let board = running.board.clone();
    tracing::info!("looking for PostgreSQL binaries");
    let explicit = embedded.bin_dir.clone();
    let find = async { Ok(tokio::task::spawn_blocking(move || binaries::find(explicit.as_deref())).await??) };
    // Finding them may mean a download: dropped at a stop (a download
    // moves into place only once complete).
    let bins = preparing(find, false, "looking for PostgreSQL binaries", signals, &running.shutdown).await?;
    tracing::info!("using {} from {} (found by {})", bins.version, bins.dir.display(), bins.found_by);
    let needs = cluster::Needs {
        resume: |dir, account, stop| crate::pitr::restore::resume(dir, account, false, stop),
        logical_wal_mb: replication.map(|r| r.max_wal_mb),
        stop: running.shutdown.asked(),
    };
    // OMNI_RESTORE_IF_EMPTY: an empty data directory is restored from the repository first.
    let restore = crate::repository::fetch::restore_if_empty(config);
    preparing(restore, true, "restoring from the off-site repository (OMNI_RESTORE_IF_EMPTY)", signals, &running.shutdown).await?;
    let prepare = cluster::prepare(embedded, bins, needs);
    let mut prepared = preparing(prepare, true, "preparing the PostgreSQL cluster (the lines above say which step)", signals, &running.shutdown).await?;
    if !embedded.memory_mode {
        prepared.extra_settings = crate::pitr::server_settings(&config.wal);
    } else {
        // Backups work in memory mode too (the database is thrown
        // away, the .sql backups are not): OMNI_BACKUP_DIR is made
        // for the worker's account as in persistent mode.
        let worker = crate::process::privilege::worker_account(&config.api_user)?;
        crate::process::privilege::prepare_backup_dir(&config.backup_dir, &worker)?;
    }
    crate::serve::logring::installed().add_secret(&prepared.password);
    let cluster = Arc::new(prepared);
    running.cluster = Some(cluster.clone());
    child::start_reaper(running.stage("background").tracker(), running.stage("background").token());
    let pg_started = Instant::now();
    let pg_policy = PostgresPolicy::new(cluster.clone(), config.restart).with_hold(hold.clone());
    let postgres = supervise::spawn(pg_policy, config.restart, board.clone(), running.stage("postgres"), None);
    let postgres_commands = postgres.commands();
    running.handles.push(postgres);
    // The worker applies migrations at start, so it connects once
    // PostgreSQL accepts connections on the app database. Its process
    // is started now, to be ready to connect by then; meanwhile the
    // gateway serves /gateway/status, which says why it waits.
    let mut policy = worker_policy(&cluster.url(cluster::APP_DATABASE), Some(cluster.binaries.dir.clone()));
    policy.prestart().await;
    // After a major upgrade: its record on the status board, and the
    // planner statistics rebuilt once PostgreSQL is ready (pg/upgrade.rs).
    if let Ok(Some(record)) = crate::pg::upgrade::load(&cluster.data_dir) {
        board.set_upgrade(record.to_json());
    }
    {
        let (cluster, board, stop) = (cluster.clone(), board.clone(), running.stage("jobs").token());
        running.stage("jobs").spawn(async move {
            let ready = crate::pg::worker_may_start(&cluster, &board);
            crate::pg::upgrade::analyze_in_background(cluster.clone(), ready, stop).await
        });
    }
    if !wait_first(crate::pg::worker_may_start(&cluster, &board), signals, running).await {
        return Ok(None);
    }
    tracing::info!("PostgreSQL accepts connections ({} ms): starting the API worker", pg_started.elapsed().as_millis());
    if let Some(replication) = replication {
        crate::relay::spawn(replication, &cluster, config.restart, &board, running.stage("relay"))?;
    } else if !cluster.memory_mode {
        running.stage("jobs").spawn(crate::relay::remove_leftovers(cluster.clone()));
    }
    Ok(Some((policy, postgres_commands)))
}

/// Point-in-time recovery: base backups, drills, the online restore, and the
/// WAL streamer, the third supervised child. Returns the streamer's policy
/// when its start waits until the stack serves (see [`serve_until_stopped`]).
fn start_wal(config: &Config, running: &mut Running, hold: &StartGate, postgres_commands: Option<mpsc::Sender<supervise::Command>>) -> Option<crate::pitr::receiver::ReceiverPolicy> {
    let board = running.board.clone();
    // The WAL streamer, third supervised child.
    // Under OMNI_WAL_SYNC commits wait for it, so it starts before the worker
    // (and stops after it). Otherwise nothing waits for it: it starts once
    // the stack serves (or after WAL_STREAMER_PATIENCE), so its start, and a
    // new cluster's first base backup, do not slow the service's own start.
    // Nothing is missed meanwhile: its slot keeps the WAL until it is streamed.
    let mut deferred_wal = None;
    let archive = running.cluster.clone().filter(|c| !c.memory_mode && config.wal.enabled);
    // The archive's keys; without an archive, OMNI_ENCRYPT_LOCAL still
    // encrypts the worker's logical backups, and the start says so.
    if archive.is_some() || (!config.wal.enabled && config.wal.encrypt_local) {
        if let Err(e) = crate::repository::config::local_crypt(config, None) {
            tracing::warn!("{e:#}");
        }
    }
    if let Some(cluster) = archive {
        let (jobs, asked) = (running.stage("jobs"), running.shutdown.asked());
        crate::pitr::spawn_sealer(&cluster, config.wal.clone(), jobs);
        let base_backups = crate::pitr::spawn_base_backups(&cluster, config.wal.clone(), config.backup_interval, jobs, asked.clone());
        // The off-site copy is drilled after each local drill, when there is one.
        let offsite = crate::repository::drill::after_local_drills(config, &cluster);
        crate::pitr::spawn_drills(&cluster, config.wal.clone(), jobs, asked, offsite);
        let policy = crate::pitr::receiver::ReceiverPolicy::new(cluster.clone(), config.wal.clone(), config.restart, base_backups.ask.clone()).with_hold(hold.clone());
        if let Some(postgres) = postgres_commands.clone() {
            let online = crate::pitr::online::Online::new(cluster, config.wal.clone(), board.clone(), hold.clone(), &base_backups, postgres, config.restart.stop_timeout);
            let _ = running.internal.online.set(Arc::new(online));
        }
        if config.wal.sync {
            let streamer = supervise::spawn(policy, config.restart, board.clone(), running.stage("wal"), Some("postgres"));
            if let Some(online) = running.internal.online.get() {
                online.set_streamer(streamer.commands());
            }
            running.handles.push(streamer);
        } else {
            deferred_wal = Some(policy);
        }
    }
    deferred_wal
}

/// The off-site shipper, when `OMNI_REPOSITORY_URL` is set: the WAL archive
/// (when streamed) and the logical backups go to the repository.
fn start_repository(config: &Config, running: &mut Running) -> Result<()> {
    // Checked by `check_features` before the gateway started.
    let settings = crate::repository::config::RepositoryConfig::parse(config)?;
    let Some(location) = settings.location.clone() else { return Ok(()) };
    for secret in crate::repository::store::secrets() {
        crate::serve::logring::installed().add_secret(&secret);
    }
    let cluster = running.cluster.clone().filter(|c| !c.memory_mode && config.wal.enabled);
    crate::repository::ship::set_crypt(&settings, cluster.as_ref().map(|_| config.wal.dir.as_path()));
    let repo = crate::repository::store::Repository::open_location(location)?;
    let wal_dir = cluster.as_ref().map(|_| config.wal.dir.clone());
    let pg = cluster.as_ref().map(|c| c.pg_config(cluster::APP_DATABASE));
    let shipper = crate::repository::ship::Shipper::new(repo, settings, wal_dir, (config.backup_dir.clone(), config.backup_keep), pg);
    shipper.spawn(&running.board, running.stage("repository"));
    Ok(())
}

/// Announces readiness once every child is ready, starts a deferred
/// streamer then (or after [`WAL_STREAMER_PATIENCE`]), drops a leftover
/// streamer slot, and acts on signals until a stop.
async fn serve_until_stopped(
    config: &Config,
    running: &mut Running,
    signals: &mut Signals,
    mut deferred_wal: Option<crate::pitr::receiver::ReceiverPolicy>,
    addr: SocketAddr,
    started: Instant,
) -> Result<()> {
    let board = running.board.clone();
    // With OMNI_WAL_DIR=off an earlier run's streamer slot would keep WAL for nobody.
    let mut leftover_slot = running.cluster.clone().filter(|c| !c.memory_mode && !config.wal.enabled);
    let mut ready_rx = board.subscribe();
    let mut announced = false;
    let wal_deadline = tokio::time::Instant::now() + WAL_STREAMER_PATIENCE;
    loop {
        if !announced && board.all_ready() {
            announced = true;
            tracing::info!("ready in {} ms: http://{addr}", started.elapsed().as_millis());
            running.notifier.notify("READY=1");
        }
        if announced || tokio::time::Instant::now() >= wal_deadline {
            if let Some(policy) = deferred_wal.take() {
                let streamer = supervise::spawn(policy, config.restart, board.clone(), running.stage("wal"), Some("postgres"));
                if let Some(online) = running.internal.online.get() {
                    online.set_streamer(streamer.commands());
                }
                running.handles.push(streamer);
            }
        }
        if announced {
            if let Some(cluster) = leftover_slot.take() {
                running.stage("jobs").spawn(crate::pitr::drop_leftover_slot(cluster));
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(wal_deadline), if deferred_wal.is_some() => {}
            event = signals.next() => match event {
                Event::Stop(name) => {
                    tracing::info!("{name} received: stopping");
                    return Ok(());
                }
                Event::Reload => on_sighup(running).await,
            },
            changed = ready_rx.changed(), if !announced => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Waits for `until` while answering signals: `false` when a stop came first.
async fn wait_first(until: impl std::future::Future<Output = ()>, signals: &mut Signals, running: &Running) -> bool {
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => return true,
            event = signals.next() => match event {
                Event::Stop(sig) => {
                    tracing::info!("{sig} received while starting: stopping");
                    return false;
                }
                Event::Reload => on_sighup(running).await,
            },
        }
    }
}

/// SIGHUP: a child that is down (`backoff`, `failed`) is retried at once;
/// a running worker is reloaded without dropping a request (a worker still
/// starting is reloaded once it is ready). The supervisors decide from their
/// own state, so nothing here races a state read from the board.
async fn on_sighup(running: &Running) {
    tracing::info!("SIGHUP received: retrying what is down now, reloading the API worker");
    for handle in &running.handles {
        if handle.name == "api" {
            handle.reload().await;
        } else {
            handle.retry().await;
        }
    }
}

/// Runs a step of the preparation (finding the binaries, preparing the
/// cluster: an upgrade, a restore resumed, initdb) while answering signals:
/// a stop asked ([`shutdown::AskOnce`]) cancels [`Shutdown::asked`], which a
/// `stoppable` step watches to end at its next safe step; any other step is
/// dropped at once.
async fn preparing<T>(step: impl std::future::Future<Output = Result<T>>, stoppable: bool, what: &str, signals: &mut Signals, shutdown: &Shutdown) -> Result<T> {
    tokio::pin!(step);
    let mut ask = shutdown::AskOnce::default();
    loop {
        tokio::select! {
            out = &mut step => return out,
            event = signals.next(), if !shutdown.asked().is_cancelled() => match event {
                Event::Stop(sig) => {
                    if ask.stops(sig, what) {
                        shutdown.ask();
                        if !stoppable {
                            return Err(shutdown::Stopped { during: what.to_owned() }.into());
                        }
                    }
                }
                Event::Reload => tracing::info!("SIGHUP received while {what}: nothing runs yet to retry or reload"),
            },
        }
    }
}

/// Stops every stage in order ([`stages`]), then cleans up. A second stop
/// signal hurries: no grace is waited out any more.
async fn stop(running: Running, signals: &mut Signals) {
    // A load balancer must see the 503 before connections start to close.
    running.board.set_stopping();
    running.notifier.notify("STOPPING=1");
    tracing::info!("stopping: /health answers 503");
    {
        let stopping = running.shutdown.stop();
        tokio::pin!(stopping);
        let mut hurried = false;
        loop {
            tokio::select! {
                _ = &mut stopping => break,
                event = signals.next(), if !hurried => if let Event::Stop(sig) = event {
                    tracing::warn!("{sig} received again while stopping: hurrying (no more waiting for requests to drain or a backup to finish; children still get their stop signals)");
                    hurried = true;
                    running.shutdown.hurry();
                },
            }
        }
    }
    if !running.shutdown.drained(TASKS_GRACE).await {
        tracing::warn!("{} tasks still running {} s after the stop; exiting anyway", running.shutdown.running(), TASKS_GRACE.as_secs());
    }
    if let Some(c) = &running.cluster {
        // A new cluster stopped before its first flush ended: the flush is
        // finished, not cut off, so what initdb wrote survives a power loss.
        if let Some(flush) = c.durable.lock().await.take() {
            tracing::info!("finishing the flush of the new cluster to disk");
            match flush.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("flushing the new cluster failed: {e:#}"),
                Err(e) => tracing::warn!("flushing the new cluster failed: {e}"),
            }
        }
    }
    // The children's last lines ("database system is shut down") are logged
    // before the gateway's own last one.
    if tokio::time::timeout(TASKS_GRACE, child::output_drained()).await.is_err() {
        tracing::warn!("a child's output was still open {} s after the stop", TASKS_GRACE.as_secs());
    }
    if let Some(c) = running.cluster {
        c.cleanup();
    }
    tracing::info!("stopped");
}

/// Logs the same warning as `GET /api/v1/migration/status` when an old SQLite database is around.
fn warn_about_sqlite(config: &Config) {
    for path in omni_contract::sqlite::find_all(&config.cwd) {
        tracing::warn!(
            "found an old SQLite database at {}: Omni now stores everything in PostgreSQL and will not read it. \
             Migrate its data before relying on this installation (see GET /api/v1/migration/status)",
            path.display()
        );
    }
}
