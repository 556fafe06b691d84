//! The embedded PostgreSQL: finding binaries, preparing the cluster, and the
//! supervision policy that runs `postgres` as a direct child.

pub mod binaries;
pub mod cluster;
pub mod pidfile;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tokio::process::Child;

use crate::child;
use crate::config::RestartPolicy;
use crate::supervisor::{CheckTiming, Policy, StopSignals};
use cluster::{Cluster, APP_DATABASE};

/// Supervision policy for `postgres`: health is a real `SELECT 1` over TCP,
/// stop is a fast shutdown (SIGINT) escalating to immediate (SIGQUIT).
pub struct PostgresPolicy {
    pub cluster: Arc<Cluster>,
    pub restart: RestartPolicy,
    /// Kept open between checks; dropped on any error and reconnected.
    client: Option<tokio_postgres::Client>,
}

impl PostgresPolicy {
    pub fn new(cluster: Arc<Cluster>, restart: RestartPolicy) -> Self {
        PostgresPolicy { cluster, restart, client: None }
    }
}

/// Opens a connection and drives it in the background.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Policy for PostgresPolicy {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn start(&mut self) -> Result<Child> {
        self.client = None;
        self.cluster.preflight()?;
        tracing::info!("starting PostgreSQL {} on 127.0.0.1:{}", self.cluster.binaries.major, self.cluster.port);
        child::spawn(self.cluster.postgres_spec()).await.context("could not start postgres")
    }

    async fn check(&mut self) -> Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.cluster.pg_config("postgres")).await?);
        }
        let client = self.client.as_ref().expect("connected above");
        if let Err(e) = client.simple_query("SELECT 1").await {
            self.client = None;
            return Err(e.into());
        }
        Ok(())
    }

    async fn on_ready(&mut self) -> Result<()> {
        // A brand-new cluster counts as ready only once it is on disk.
        if let Some(flush) = self.cluster.durable.lock().await.take() {
            flush.await.context("the flush of the new cluster did not finish")??;
        }
        let client = self.client.as_ref().context("no connection after the ready check")?;
        let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&APP_DATABASE]).await?.is_some();
        if !exists {
            tracing::info!("creating database {APP_DATABASE}");
            client.simple_query(&format!("CREATE DATABASE {APP_DATABASE}")).await.context("creating the app database")?;
        }
        Ok(())
    }

    fn stop_signals(&self) -> StopSignals {
        StopSignals { first: Signal::SIGINT, second: Some(Signal::SIGQUIT), grace: self.restart.stop_timeout }
    }

    fn timing(&self) -> CheckTiming {
        CheckTiming {
            // A refused connection costs microseconds; poll tightly so start-up
            // is not padded by the poll interval.
            ready_poll: Duration::from_millis(5),
            // Crash recovery of a large cluster can take minutes; while the
            // process lives and recovers, it is not restarted.
            start_timeout: Duration::from_secs(600),
            live_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(3),
            failures_before_restart: 3,
        }
    }
}
