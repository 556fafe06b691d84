//! Wiring: the order in which the gateway brings things up and takes them
//! down.
//!
//! Up: bind the port → find binaries → prepare the cluster → supervise
//! PostgreSQL → once it is ready, supervise the worker → ready (`READY=1`).
//! While running: SIGHUP reloads the worker without dropping a request.
//! Down, on SIGTERM/SIGINT: `STOPPING=1` → stop accepting and drain → stop
//! the worker → stop PostgreSQL (fast shutdown) → remove what was only for
//! this run. Every step logs what it is doing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::config::{Config, Database};
use crate::http::{self, Surface};
use crate::metrics::Metrics;
use crate::postgres::{binaries, cluster, PostgresPolicy};
use crate::proxy::Proxy;
use crate::sd_notify::{self, Notifier};
use crate::status::Board;
use crate::upstream::Upstreams;
use crate::worker::{self, WorkerPolicy};
use crate::{child, dev, supervisor};

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

/// What must be stopped, in reverse start order.
struct Running {
    handles: Vec<supervisor::Handle>,
    stop_http: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    cluster: Option<Arc<cluster::Cluster>>,
    notifier: Arc<Notifier>,
}

/// Runs the gateway until a stop signal; returns the process exit code.
pub async fn run(config: Config) -> Result<i32> {
    let started = Instant::now();
    tracing::info!("omni-gateway {} starting in {}", env!("CARGO_PKG_VERSION"), config.cwd.display());
    // Signals first: a Ctrl-C during a slow initdb must still stop cleanly.
    let mut signals = Signals::install()?;
    let notifier = Arc::new(Notifier::from_env());
    warn_about_sqlite(&config);
    if config.replication_url.is_some() {
        tracing::warn!(
            "PGSERVE_REPLICATION_URL is set, but this version does not replicate yet (SPEC §8): nothing is sent to that server. \
             Use backups (OMNI_BACKUP_INTERVAL) to keep copies elsewhere meanwhile"
        );
    }

    let addr = SocketAddr::new(config.host, config.port);
    let listener = http::bind(addr).await?;
    tracing::info!("listening on http://{addr}");

    let worker_bin = worker::locate_binary(config.api_bin.as_deref())?;
    let worker_account = worker::prepare_account(&config, &worker_bin)?;
    let components: &[&'static str] = match config.database {
        Database::Embedded(_) => &["postgres", "api"],
        Database::External { .. } => &["api"],
    };
    let board = Board::new(components);
    sd_notify::spawn_reporter(notifier.clone(), board.clone());
    let upstreams = Upstreams::default();
    let (stop_http, stop_http_rx) = tokio::sync::watch::channel(false);
    let surface = Arc::new(Surface {
        board: board.clone(),
        proxy: Proxy { upstreams: upstreams.clone(), limits: config.http, metrics: Arc::new(Metrics::default()) },
        database: match &config.database {
            Database::External { url } => Some(Arc::new(crate::external::ExternalDatabase::new(url)?)),
            Database::Embedded(_) => None,
        },
    });
    let server = tokio::spawn(http::serve(listener, surface, stop_http_rx, config.http));
    let mut running = Running { handles: Vec::new(), stop_http, server, cluster: None, notifier: notifier.clone() };

    // PostgreSQL (embedded) or the external URL.
    let (database_url, pg_bin_dir) = match &config.database {
        Database::Embedded(embedded) => {
            tracing::info!("looking for PostgreSQL binaries");
            let explicit = embedded.bin_dir.clone();
            let bins = tokio::task::spawn_blocking(move || binaries::find(explicit.as_deref())).await??;
            tracing::info!("using {} from {} (found by {})", bins.version, bins.dir.display(), bins.found_by);
            let cluster = Arc::new(cluster::prepare(embedded, bins).await?);
            running.cluster = Some(cluster.clone());
            child::start_reaper();
            let pg_started = Instant::now();
            running.handles.push(supervisor::spawn(PostgresPolicy::new(cluster.clone(), config.restart), config.restart, board.clone()));
            tokio::select! {
                r = crate::postgres::worker_may_start(&cluster, &board) => match r {
                    Ok(()) => tracing::info!("PostgreSQL accepts connections ({} ms): starting the API worker", pg_started.elapsed().as_millis()),
                    Err(state) => tracing::error!("PostgreSQL is {state}; the gateway keeps running so /gateway/status shows why"),
                },
                event = signals.next() => if let Event::Stop(name) = event {
                    tracing::info!("{name} received while starting: stopping");
                    return shutdown(running).await;
                },
            }
            (cluster.url(cluster::APP_DATABASE), Some(cluster.binaries.dir.clone()))
        }
        Database::External { url } => {
            child::start_reaper();
            tracing::info!("using the external PostgreSQL of DATABASE_URL; no embedded cluster");
            let bins = tokio::task::spawn_blocking(|| binaries::find(None).ok()).await?;
            (url.clone(), bins.map(|b| b.dir))
        }
    };

    // The worker, once its database is there.
    let mut settings = config.worker_settings(&database_url);
    settings.pg_bin_dir = pg_bin_dir;
    let policy = WorkerPolicy::new(worker_bin.clone(), settings, upstreams, config.http.drain_timeout, worker_account);
    let api = supervisor::spawn(policy, config.restart, board.clone());
    if config.dev {
        dev::watch_worker_binary(&worker_bin, api.commands());
    }
    running.handles.push(api);

    let mut ready_rx = board.subscribe();
    let mut announced = false;
    loop {
        if !announced && board.all_ready() {
            announced = true;
            tracing::info!("ready in {} ms: http://{addr}", started.elapsed().as_millis());
            notifier.notify("READY=1");
        }
        tokio::select! {
            event = signals.next() => match event {
                Event::Stop(name) => {
                    tracing::info!("{name} received: stopping");
                    break;
                }
                Event::Reload => {
                    tracing::info!("SIGHUP received: reloading the API worker");
                    if let Some(api) = running.handles.iter().find(|h| h.name == "api") {
                        api.reload().await;
                    }
                }
            },
            changed = ready_rx.changed(), if !announced => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    shutdown(running).await
}

/// Stops in reverse start order and cleans up.
async fn shutdown(running: Running) -> Result<i32> {
    running.notifier.notify("STOPPING=1");
    let _ = running.stop_http.send(true);
    let _ = running.server.await;
    for handle in running.handles.into_iter().rev() {
        tracing::info!("stopping {}", handle.name);
        handle.stop().await;
    }
    if let Some(c) = running.cluster {
        c.cleanup();
    }
    tracing::info!("stopped");
    Ok(0)
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
