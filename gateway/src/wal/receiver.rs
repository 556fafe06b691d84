//! `pg_receivewal`'s supervision policy: the third supervised child.
//!
//! Each start makes sure the replication slot exists (so WAL the streamer has
//! not received yet is kept for it, up to `max_slot_wal_keep_size`), then
//! runs `pg_receivewal --synchronous --no-loop` into `stream/`: every chunk
//! is flushed before it is acknowledged, and any error ends the run so the
//! supervisor's backoff (not the tool's own loop) retries it and the status
//! shows it. Healthy means the slot is active: the streamer is connected.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::mpsc;
use tracing::Level;

use super::{archive, base, SLOT};
use crate::child::{self, Output};
use crate::config::{RestartPolicy, WalConfig};
use crate::postgres::cluster::Cluster;
use crate::supervisor::{CheckTiming, Policy, StopSignals};

pub struct ReceiverPolicy {
    cluster: Arc<Cluster>,
    wal: WalConfig,
    restart: RestartPolicy,
    /// Asks the base-backup task for a backup (when the stream has none).
    base_backup: mpsc::Sender<()>,
    /// Kept open between checks; dropped on any error.
    client: Option<tokio_postgres::Client>,
    /// Held by a point-in-time restore ([`super::online`]): a start waits for it.
    hold: Option<super::online::Hold>,
}

impl ReceiverPolicy {
    pub fn new(cluster: Arc<Cluster>, wal: WalConfig, restart: RestartPolicy, base_backup: mpsc::Sender<()>) -> Self {
        ReceiverPolicy { cluster, wal, restart, base_backup, client: None, hold: None }
    }

    /// Starts wait while a point-in-time restore holds `hold`.
    pub fn with_hold(mut self, hold: super::online::Hold) -> Self {
        self.hold = Some(hold);
        self
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = crate::postgres::connect(&self.cluster.pg_config("postgres")).await.context("connecting to PostgreSQL")?;
            // The slot functions write no commit record, but under
            // OMNI_WAL_SYNC nothing of ours should ever wait for the streamer.
            client.simple_query("SET synchronous_commit = local").await?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Creates the slot when missing; a slot whose WAL was dropped (`lost`:
    /// the streamer was away longer than the cap allows) is made anew, and
    /// the gap is said out loud.
    async fn ensure_slot(&mut self) -> Result<()> {
        let (wal_dir, account) = (self.wal.dir.clone(), self.cluster.account.clone());
        let client = self.client().await?;
        let row = client.query_opt("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT]).await?;
        let status: Option<Option<String>> = row.map(|r| r.get(0));
        if let Some(Some(status)) = &status {
            if status == "lost" {
                tracing::error!(
                    "the WAL slot {SLOT} lost WAL (the streamer was down or its disk full while more than {} MB was written): \
                     point-in-time recovery has a gap until the next base backup; making the slot anew",
                    super::MAX_SLOT_WAL_KEEP_MB
                );
                client.execute("SELECT pg_drop_replication_slot($1)", &[&SLOT]).await?;
                // pg_receivewal resumes after the newest segment it finds,
                // which the server no longer has: the stream so far (still
                // good for restores up to the gap) is moved aside, and the
                // new one starts at the new slot in an empty directory.
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
                let old = archive::retire_stream(&wal_dir, &stamp, &account)?;
                tracing::warn!("the WAL streamed before the gap stays in {} for restores to points before it", old.display());
            } else {
                return Ok(());
            }
        }
        client.execute("SELECT pg_create_physical_replication_slot($1, true)", &[&SLOT]).await.context("creating the WAL slot")?;
        tracing::info!("created replication slot {SLOT} for the WAL streamer");
        Ok(())
    }
}

impl Policy for ReceiverPolicy {
    fn name(&self) -> &'static str {
        "wal"
    }

    async fn start(&mut self) -> Result<Child> {
        if let Some(hold) = &self.hold {
            hold.wait("the WAL streamer").await;
        }
        archive::prepare(&self.wal.dir, &self.cluster.account)?;
        let stream = archive::stream_dir(&self.wal.dir);
        archive::remove_short_partials(&stream);
        // A full disk is said as such in the status (not only "exit status 1").
        if let Some(free) = archive::free_bytes(&stream).filter(|free| *free < archive::SEGMENT_BYTES) {
            bail!(
                "OMNI_WAL_DIR is full ({} MB free on {}; a WAL segment needs 16 MB). PostgreSQL keeps serving and its slot keeps the WAL \
                 (up to {} MB); free space there and streaming resumes by itself",
                free / 1_000_000,
                stream.display(),
                super::MAX_SLOT_WAL_KEEP_MB
            );
        }
        self.ensure_slot().await?;
        tracing::info!("streaming WAL into {} (slot {SLOT}{})", stream.display(), if self.wal.sync { ", commits wait for it: OMNI_WAL_SYNC" } else { "" });
        let mut spec = super::tool(&super::Server::of(&self.cluster), "pg_receivewal")
            .arg("-D")
            .arg(&stream)
            .arg("--slot")
            .arg(SLOT)
            .arg("--synchronous")
            .arg("--no-loop")
            .arg("--status-interval=1");
        spec.output = Output::Text { routine: Level::INFO };
        // It flushes what it has and exits on SIGTERM.
        spec.death_signal = Signal::SIGTERM;
        let child = child::spawn(spec).await.map_err(|e| {
            let unfixable = matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied);
            let e = anyhow::Error::new(e).context("could not start pg_receivewal");
            if unfixable { crate::supervisor::permanent(e) } else { e }
        })?;
        Ok(child)
    }

    async fn check(&mut self) -> Result<()> {
        let result = async {
            let client = self.client().await?;
            let row = client.query_opt("SELECT active, wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT]).await?;
            match row {
                None => bail!("the replication slot {SLOT} is gone"),
                Some(r) if !r.get::<_, bool>(0) => bail!("pg_receivewal is not connected to its slot yet"),
                Some(r) if r.get::<_, Option<String>>(1).as_deref() == Some("lost") => bail!("the slot {SLOT} lost WAL: a restart makes it anew"),
                Some(_) => Ok(()),
            }
        }
        .await;
        if result.is_err() {
            self.client = None;
        }
        result
    }

    async fn on_ready(&mut self) -> Result<()> {
        if !has_base_for_stream(&self.wal) {
            tracing::info!("no base backup covers this stream yet: taking one now");
            let _ = self.base_backup.try_send(());
        }
        Ok(())
    }

    fn on_run_end(&mut self) {
        self.client = None;
    }

    fn stop_signals(&self) -> StopSignals {
        StopSignals { first: Signal::SIGTERM, second: Some(Signal::SIGKILL), grace: self.restart.stop_timeout.min(Duration::from_secs(10)) }
    }

    fn timing(&self) -> CheckTiming {
        CheckTiming {
            ready_poll: Duration::from_millis(100),
            start_timeout: Duration::from_secs(60),
            live_interval: Duration::from_secs(2),
            check_timeout: Duration::from_secs(3),
            failures_before_restart: 3,
        }
    }
}

/// Whether a base backup starts inside the current stream directory, so
/// that its WAL replays from it: a new cluster, or a fresh stream after a
/// restore (a new timeline), needs one of its own.
fn has_base_for_stream(wal: &WalConfig) -> bool {
    let Some(first) = archive::segments(&archive::stream_dir(&wal.dir)).into_iter().next() else { return false };
    base::list(&wal.dir).iter().any(|b| b.start_segment.len() == 24 && b.start_segment[8..] >= *first.position() && b.start_segment[..8] >= first.name[..8])
}
