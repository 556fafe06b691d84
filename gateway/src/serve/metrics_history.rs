//! The last hour of the gateway's own counters, for the status page's
//! charts (`GET /gateway/metrics/history`).
//!
//! Every [`INTERVAL`] the sampler reads the proxy's counters (`metrics.rs`)
//! and turns the difference since the previous reading into a [`Sample`]:
//! requests per second, p50/p99 latency of that interval, upstream errors,
//! each component's restarts so far, and the storage figures when there are
//! any (replication lag, ages of the newest archived WAL and base backup).
//! [`CAPACITY`] samples cover more than an hour. Restarts are also recorded
//! the moment the status board shows them (not at the next tick), so a chart
//! can mark them on its time axis at their own time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::serve::metrics::{quantile, Counters, Metrics};
use crate::status::Board;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 65 minutes at one per 5 s.
pub const CAPACITY: usize = 780;
/// Restart events kept.
const RESTARTS_KEPT: usize = 500;

/// One interval's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// End of the interval, milliseconds since the Unix epoch.
    pub unix_ms: i64,
    pub requests_per_s: f64,
    /// Latency of the requests answered in this interval, in milliseconds;
    /// absent when there were none.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests the worker could not answer, in this interval.
    pub upstream_errors: u64,
    /// 5xx responses in this interval.
    pub server_errors: u64,
    /// Restarts of each component since the gateway started.
    pub restarts: BTreeMap<String, u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_lag_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_age_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_backup_age_s: Option<f64>,
    /// The off-site repository (when set): lag in seconds, bytes queued,
    /// bytes uploaded since the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_lag_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_queue_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository_uploaded_bytes: Option<u64>,
}

/// A restart, at the moment the board showed it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Restart {
    pub unix_ms: i64,
    pub component: String,
    /// Its restart count after this one.
    pub restarts: u32,
    /// How the previous run ended (`killed by SIGKILL`).
    pub last_exit: Option<String>,
}

#[derive(Default)]
struct Rings {
    samples: VecDeque<Sample>,
    restarts: VecDeque<Restart>,
}

/// The history, shared by the sampler (writer) and the HTTP surface.
#[derive(Default, Clone)]
pub struct History {
    rings: Arc<Mutex<Rings>>,
}

/// The `/gateway/metrics/history` document.
#[derive(Serialize)]
pub struct Document {
    pub interval_s: u64,
    pub samples: Vec<Sample>,
    pub restarts: Vec<Restart>,
}

impl History {
    pub fn document(&self) -> Document {
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        Document { interval_s: INTERVAL.as_secs(), samples: rings.samples.iter().cloned().collect(), restarts: rings.restarts.iter().cloned().collect() }
    }

    fn push(&self, sample: Sample) {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        rings.samples.push_back(sample);
        while rings.samples.len() > CAPACITY {
            rings.samples.pop_front();
        }
    }

    fn restarted(&self, restart: Restart) {
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        rings.restarts.push_back(restart);
        while rings.restarts.len() > RESTARTS_KEPT {
            rings.restarts.pop_front();
        }
    }

    /// Starts the sampler and the restart recorder; both end with `stop`.
    pub fn spawn(&self, metrics: Arc<Metrics>, board: Board, tasks: &TaskTracker, stop: CancellationToken) {
        let history = self.clone();
        let (board_for_restarts, stop_restarts) = (board.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut previous = (metrics.counters(), tokio::time::Instant::now());
            while stop.run_until_cancelled(tick.tick()).await.is_some() {
                let now = (metrics.counters(), tokio::time::Instant::now());
                let storage = match metrics.wal_dir().map(std::path::Path::to_path_buf) {
                    Some(dir) => tokio::task::spawn_blocking(move || wal_ages(&dir)).await.unwrap_or_default(),
                    None => (None, None),
                };
                let mut sample = sample(&previous.0, &now.0, now.1 - previous.1, &board);
                (sample.wal_age_s, sample.base_backup_age_s) = storage;
                history.push(sample);
                previous = now;
            }
        });
        let history = self.clone();
        tasks.spawn(async move {
            let mut rx = board_for_restarts.subscribe();
            let mut seen: BTreeMap<&'static str, u32> = rx.borrow_and_update().iter().map(|(n, c)| (n, c.restarts)).collect();
            while let Some(Ok(())) = stop_restarts.run_until_cancelled(rx.changed()).await {
                let snapshot = rx.borrow_and_update().clone();
                for (name, c) in snapshot.iter() {
                    let before = seen.insert(name, c.restarts).unwrap_or(0);
                    if c.restarts > before {
                        history.restarted(Restart { unix_ms: chrono::Utc::now().timestamp_millis(), component: name.to_owned(), restarts: c.restarts, last_exit: c.last_exit.clone() });
                    }
                }
            }
        });
    }
}

/// The figures of one interval, from two readings `took` apart.
fn sample(before: &Counters, after: &Counters, took: Duration, board: &Board) -> Sample {
    let mut delta = after.buckets;
    for (d, b) in delta.iter_mut().zip(before.buckets) {
        *d = d.saturating_sub(b);
    }
    let ms = |s: f64| (s * 1e6).round() / 1e3;
    let snapshot = board.snapshot();
    let mut restarts: BTreeMap<String, u32> = snapshot.iter().map(|(n, c)| (n.to_owned(), c.restarts)).collect();
    let repository = board.repository();
    let relay = board.replication();
    if let Some(relay) = &relay {
        restarts.insert("replication".into(), relay.dbs.iter().map(|d| d.restarts).sum());
    }
    Sample {
        unix_ms: chrono::Utc::now().timestamp_millis(),
        requests_per_s: (after.requests.saturating_sub(before.requests)) as f64 / took.as_secs_f64().max(0.001),
        p50_ms: quantile(&delta, 0.5).map(ms),
        p99_ms: quantile(&delta, 0.99).map(ms),
        upstream_errors: after.upstream_errors.saturating_sub(before.upstream_errors),
        server_errors: after.server_errors.saturating_sub(before.server_errors),
        restarts,
        replication_lag_s: relay.map(|r| r.lag_seconds()),
        wal_age_s: None,
        base_backup_age_s: None,
        repository_lag_s: repository.as_ref().map(|r| r.lag_seconds),
        repository_queue_bytes: repository.as_ref().map(|r| r.lag_bytes),
        repository_uploaded_bytes: repository.as_ref().map(|r| r.uploaded_bytes),
    }
}

/// Seconds since the newest archived WAL and the newest base backup.
fn wal_ages(dir: &std::path::Path) -> (Option<f64>, Option<f64>) {
    let now = chrono::Utc::now();
    let age = |t: chrono::DateTime<chrono::Utc>| (now - t).num_milliseconds().max(0) as f64 / 1000.0;
    let wal = crate::pitr::archive::newest_write(dir).map(chrono::DateTime::<chrono::Utc>::from).map(age);
    let base = crate::pitr::base::list(dir).last().map(|b| age(b.finished_at));
    (wal, base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    #[test]
    fn a_sample_is_the_difference_between_two_readings() {
        let board = Board::new(&["postgres", "api"]);
        board.update("api", |c| c.restarts = 2);
        let metrics = Metrics::default();
        let before = metrics.counters();
        for _ in 0..50 {
            metrics.observe_request(StatusCode::OK, Duration::from_millis(3));
        }
        metrics.upstream_error("connect");
        let s = sample(&before, &metrics.counters(), Duration::from_secs(5), &board);
        assert_eq!(s.requests_per_s, 10.0);
        let p50 = s.p50_ms.unwrap();
        assert!((2.5..=5.0).contains(&p50), "{p50}");
        assert_eq!(s.upstream_errors, 1);
        assert_eq!(s.restarts["api"], 2);
        let idle = sample(&metrics.counters(), &metrics.counters(), Duration::from_secs(5), &board);
        assert_eq!((idle.requests_per_s, idle.p99_ms), (0.0, None));
    }

    #[test]
    fn the_history_keeps_at_most_its_capacity() {
        let history = History::default();
        let board = Board::new(&["api"]);
        let c = Counters::default();
        for _ in 0..CAPACITY + 10 {
            history.push(sample(&c, &c, INTERVAL, &board));
        }
        assert_eq!(history.document().samples.len(), CAPACITY);
        assert!(CAPACITY as u64 * INTERVAL.as_secs() >= 3600, "at least an hour");
    }
}
