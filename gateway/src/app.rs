//! Wiring: the order in which the gateway brings things up and takes them
//! down.
//!
//! Up: bind the port → find binaries → prepare the cluster → supervise
//! PostgreSQL → (worker) → ready. Down, on SIGTERM/SIGINT: stop accepting and
//! drain → stop the worker → stop PostgreSQL (fast shutdown) → remove what
//! was only for this run. Every step logs what it is doing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, Database};
use crate::http::{self, Surface};
use crate::postgres::{binaries, cluster, PostgresPolicy};
use crate::status::Board;
use crate::supervisor;

/// Runs the gateway until a stop signal; returns the process exit code.
pub async fn run(config: Config) -> Result<i32> {
    let started = Instant::now();
    tracing::info!("omni-gateway {} starting in {}", env!("CARGO_PKG_VERSION"), config.cwd.display());

    // Signals first: a Ctrl-C during a slow initdb must still stop cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let addr = SocketAddr::new(config.host, config.port);
    let listener = http::bind(addr).await?;
    tracing::info!("listening on http://{addr}");

    let components: &[&'static str] = match config.database {
        Database::Embedded(_) => &["postgres"],
        Database::External { .. } => &[],
    };
    let board = Board::new(components);
    let (stop_http_tx, stop_http_rx) = tokio::sync::watch::channel(false);
    let surface = Arc::new(Surface { board: board.clone() });
    let server = tokio::spawn(http::serve(listener, surface, stop_http_rx, Duration::from_secs(10)));

    let mut handles = Vec::new();
    let mut cluster_for_cleanup = None;
    if let Database::Embedded(embedded) = &config.database {
        tracing::info!("looking for PostgreSQL binaries");
        let bins = tokio::task::spawn_blocking({
            let explicit = embedded.bin_dir.clone();
            move || binaries::find(explicit.as_deref())
        })
        .await??;
        tracing::info!("using {} from {} (found by {})", bins.version, bins.dir.display(), bins.found_by);
        let cluster = Arc::new(cluster::prepare(embedded, bins).await?);
        cluster_for_cleanup = Some(cluster.clone());
        let pg_started = Instant::now();
        handles.push(supervisor::spawn(PostgresPolicy::new(cluster.clone(), config.restart), config.restart, board.clone()));
        let outcome = tokio::select! {
            r = board.wait_ready("postgres") => Some(r),
            _ = sigterm.recv() => None,
            _ = sigint.recv() => None,
        };
        match outcome {
            Some(Ok(())) => tracing::info!("PostgreSQL ready in {} ms", pg_started.elapsed().as_millis()),
            Some(Err(state)) => tracing::error!("PostgreSQL is {state}; the gateway keeps running so /gateway/status shows why"),
            None => return shutdown(handles, stop_http_tx, server, cluster_for_cleanup).await,
        }
    }

    if board.all_ready() {
        tracing::info!("ready in {} ms", started.elapsed().as_millis());
    }

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received: stopping"),
        _ = sigint.recv() => tracing::info!("SIGINT received: stopping"),
    }
    shutdown(handles, stop_http_tx, server, cluster_for_cleanup).await
}

/// Stops in reverse start order and cleans up.
async fn shutdown(
    handles: Vec<supervisor::Handle>,
    stop_http: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    cluster: Option<Arc<cluster::Cluster>>,
) -> Result<i32> {
    let _ = stop_http.send(true);
    let _ = server.await;
    for handle in handles.into_iter().rev() {
        tracing::info!("stopping {}", handle.name);
        handle.stop().await;
    }
    if let Some(c) = cluster {
        c.cleanup();
    }
    tracing::info!("stopped");
    Ok(0)
}
