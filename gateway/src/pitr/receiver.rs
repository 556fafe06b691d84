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

use super::archive::SEGMENT_BYTES;
use super::{archive, base, generation, SLOT};
use crate::process::child::{self, Output};
use crate::config::{RestartPolicy, WalConfig};
use crate::pg::cluster::Cluster;
use crate::supervise::{CheckTiming, Policy, StopSignals};

pub struct ReceiverPolicy {
    cluster: Arc<Cluster>,
    wal: WalConfig,
    restart: RestartPolicy,
    /// Asks the base-backup task for a backup (when the stream has none).
    base_backup: mpsc::Sender<()>,
    /// Kept open between checks; dropped on any error.
    client: Option<tokio_postgres::Client>,
    /// Held by a point-in-time restore ([`super::online`]): a start waits for it.
    hold: Option<crate::supervise::gate::StartGate>,
}

impl ReceiverPolicy {
    pub fn new(cluster: Arc<Cluster>, wal: WalConfig, restart: RestartPolicy, base_backup: mpsc::Sender<()>) -> Self {
        ReceiverPolicy { cluster, wal, restart, base_backup, client: None, hold: None }
    }

    /// Starts wait while a point-in-time restore holds `hold`.
    pub fn with_hold(mut self, hold: crate::supervise::gate::StartGate) -> Self {
        self.hold = Some(hold);
        self
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = crate::pg::connect(&self.cluster.pg_config("postgres")).await.context("connecting to PostgreSQL")?;
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

    /// `pg_receivewal` resumes where the newest file of `stream/` ends. When
    /// the server cannot stream from there — that WAL was removed while no
    /// slot held it (`OMNI_WAL_DIR` was off, the slot was dropped), the
    /// stream is on a timeline outside this server's history, or it is
    /// ahead of the server (a data directory from elsewhere) — it would fail
    /// at every start, forever. The stream is retired instead (it stays
    /// readable by restores to times inside it), the gap is said, and the
    /// new stream gets its own base backup ([`Policy::on_ready`]).
    async fn retire_unreachable_stream(&mut self) -> Result<()> {
        let stream = archive::stream_dir(&self.wal.dir);
        let Some(newest) = archive::segments(&stream).into_iter().last() else { return Ok(()) };
        let Some((tli, segno)) = segment_number(&newest.name) else { return Ok(()) };
        // A .partial is streamed again from its start; a complete one is followed by the next.
        let start_segno = if newest.partial { segno } else { segno + 1 };
        let start = start_segno * SEGMENT_BYTES;
        let start_name = format!("{:08X}{:08X}{:08X}", tli, start_segno >> 8, start_segno & 0xFF);
        let client = self.client().await?;
        let row = client.query_one("SELECT pg_walfile_name(pg_current_wal_flush_lsn()), pg_current_wal_flush_lsn()::text", &[]).await?;
        let (current, flush): (String, String) = (row.get(0), row.get(1));
        let server_tli = u32::from_str_radix(&current[..8], 16).unwrap_or(0);
        let flush = super::archive::parse_lsn(&flush).unwrap_or(u64::MAX);
        let why = if tli > server_tli {
            Some(format!("it is on timeline {tli}, which is not in this server's history (the server is on timeline {server_tli})"))
        } else if start > flush {
            Some(format!("it ends at WAL position {}, ahead of this server ({}): the data directory is not the one this stream came from", lsn_text(start), lsn_text(flush)))
        } else if tli < server_tli && !history_reaches(client, server_tli, tli, start).await {
            Some(format!("its timeline {tli} is not in this server's history at {} (the server, on timeline {server_tli}, forked from it earlier)", lsn_text(start)))
        } else {
            let held: i64 = client
                .query_one("SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}' AND substr(name, 9, 16) = $1", &[&&start_name[8..]])
                .await?
                .get(0);
            (held == 0).then(|| format!("the server no longer has WAL segment {start_name} (requested WAL segment has already been removed: no slot kept it while the streamer was away)"))
        };
        let Some(why) = why else { return Ok(()) };
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
        let old = archive::retire_stream(&self.wal.dir, &stamp, &self.cluster.account)?;
        tracing::error!(
            "the WAL stream in {} cannot continue from this server: {why}. Point-in-time recovery has a gap from the end of that stream ({}) until the new base backup; \
             the stream so far moved to {} (restores to times inside it still read it), streaming starts afresh, and a base backup is taken now",
            stream.display(),
            newest.name,
            old.display()
        );
        Ok(())
    }
}

/// Timeline and segment number of a segment file name.
fn segment_number(name: &str) -> Option<(u32, u64)> {
    let tli = u32::from_str_radix(name.get(..8)?, 16).ok()?;
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    // 16 MB segments: 256 per 4 GB "log" number.
    Some((tli, log * 0x100 + seg))
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Whether the server's history (its `<tli>.history` file) has `tli`
/// going on until at least `start`; unreadable history says yes (the
/// streamer then tells for itself).
async fn history_reaches(client: &tokio_postgres::Client, server_tli: u32, tli: u32, start: u64) -> bool {
    let file = format!("pg_wal/{server_tli:08X}.history");
    let Ok(row) = client.query_one("SELECT pg_read_file($1)", &[&file]).await else { return true };
    let text: String = row.get(0);
    history_switch_point(&text, tli).is_some_and(|switch| start <= switch)
}

/// Where a `.history` file says timeline `tli` ended.
fn history_switch_point(text: &str, tli: u32) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()?.parse::<u32>().ok()? == tli).then_some(())?;
        super::archive::parse_lsn(fields.next()?)
    })
}

impl Policy for ReceiverPolicy {
    fn name(&self) -> &'static str {
        "wal"
    }

    fn gate(&self) -> Option<crate::supervise::gate::StartGate> {
        self.hold.clone()
    }

    async fn start(&mut self) -> Result<Child> {
        if let Some(hold) = &self.hold {
            hold.wait("the WAL streamer").await;
        }
        archive::prepare(&self.wal.dir, &self.cluster.account)?;
        // Never a segment of this cluster into another one's archive (generation.rs).
        generation::reconcile(&self.wal.dir, &self.cluster.data_dir, &self.cluster.account).context("OMNI_WAL_DIR: checking which cluster the archive belongs to")?;
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
        self.retire_unreachable_stream().await?;
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
            if unfixable { crate::supervise::permanent(e) } else { e }
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

    /// It stops after PostgreSQL (`app.rs`), to receive everything up to
    /// the shutdown checkpoint; a start racing PostgreSQL's stop would only
    /// fail against it.
    fn abandons_starts_once_stop_asked(&self) -> bool {
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_give_their_position() {
        assert_eq!(segment_number("000000020000000100000003"), Some((2, 0x103)));
        assert_eq!(lsn_text(0x103 * SEGMENT_BYTES), "1/3000000");
    }

    #[test]
    fn a_history_file_says_where_each_timeline_ended() {
        let text = "1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point\n";
        assert_eq!(history_switch_point(text, 1), Some(0x3000060));
        assert_eq!(history_switch_point(text, 2), Some(0x5000000));
        assert_eq!(history_switch_point(text, 3), None);
    }
}
