//! `/metrics` in the Prometheus text format: proxied requests by status
//! class, a latency histogram, upstream errors by kind, and each child's
//! state, restarts, failures in a row and crash-loop flag (read from the
//! status board at scrape time).
//!
//! Plain atomics: recording a request is a few relaxed increments, cheap
//! enough for the proxy's hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hyper::StatusCode;

use crate::status::{Board, GatewayState, State};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const ERROR_KINDS: [&str; 4] = ["unavailable", "connect", "closed", "timeout"];
const STATES: [State; 6] = [State::Starting, State::Ready, State::Backoff, State::Failed, State::Stopping, State::Stopped];

/// A reading of the request counters (all cumulative since the start).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub requests: u64,
    /// Responses with a 5xx status.
    pub server_errors: u64,
    /// Per latency bucket (upper bounds in [`BUCKETS`]), +Inf last; not cumulative.
    pub buckets: [u64; BUCKETS.len() + 1],
    pub upstream_errors: u64,
}

/// The latency at quantile `q` (0..1) of the requests counted in `buckets`
/// (per-bucket counts, +Inf last), in seconds, interpolated linearly inside
/// its bucket; `None` without requests. The +Inf bucket reads as 10 s.
pub fn quantile(buckets: &[u64; BUCKETS.len() + 1], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0.0;
    for (i, n) in buckets.iter().enumerate() {
        let next = seen + *n as f64;
        if next >= rank && *n > 0 {
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            let upper = BUCKETS.get(i).copied().unwrap_or(BUCKETS[BUCKETS.len() - 1]);
            return Some(lower + (upper - lower) * ((rank - seen) / *n as f64).clamp(0.0, 1.0));
        }
        seen = next;
    }
    Some(BUCKETS[BUCKETS.len() - 1])
}

#[derive(Default)]
pub struct Metrics {
    /// Requests by status class 1xx..5xx (index 0..4).
    by_class: [AtomicU64; 5],
    /// Cumulative-at-scrape histogram: per-bucket counts, +Inf last.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    latency_micros_sum: AtomicU64,
    upstream_errors: [AtomicU64; ERROR_KINDS.len()],
    /// `OMNI_WAL_DIR` when WAL is streamed (persistent mode): the ages of
    /// the newest archived WAL, base backup and good drill are read from it
    /// at scrape time.
    wal_dir: Option<std::path::PathBuf>,
}

impl Metrics {
    pub fn with_wal_dir(mut self, wal_dir: Option<std::path::PathBuf>) -> Self {
        self.wal_dir = wal_dir;
        self
    }

    pub fn observe_request(&self, status: StatusCode, took: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let bucket = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.latency_micros_sum.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn upstream_error(&self, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.upstream_errors[i].fetch_add(1, Relaxed);
        }
    }

    /// The counters now, for the history sampler (`metrics_history.rs`).
    pub fn counters(&self) -> Counters {
        let mut buckets = [0; BUCKETS.len() + 1];
        for (i, b) in self.buckets.iter().enumerate() {
            buckets[i] = b.load(Relaxed);
        }
        Counters {
            requests: self.by_class.iter().map(|c| c.load(Relaxed)).sum(),
            server_errors: self.by_class[4].load(Relaxed),
            buckets,
            upstream_errors: self.upstream_errors.iter().map(|c| c.load(Relaxed)).sum(),
        }
    }

    /// `OMNI_WAL_DIR`, when WAL is streamed.
    pub fn wal_dir(&self) -> Option<&std::path::Path> {
        self.wal_dir.as_deref()
    }

    pub fn render(&self, board: &Board) -> String {
        let mut out = String::new();
        out.push_str("# HELP omni_proxy_requests_total Requests proxied to the API worker, by response status class.\n");
        out.push_str("# TYPE omni_proxy_requests_total counter\n");
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(out, "omni_proxy_requests_total{{class=\"{}xx\"}} {}", i + 1, c.load(Relaxed));
        }
        out.push_str("# HELP omni_proxy_request_duration_seconds Time from receiving a request to sending the response head.\n");
        out.push_str("# TYPE omni_proxy_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "omni_proxy_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "omni_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "omni_proxy_request_duration_seconds_sum {}", self.latency_micros_sum.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "omni_proxy_request_duration_seconds_count {cumulative}");
        out.push_str("# HELP omni_proxy_upstream_errors_total Requests the worker could not answer, by kind.\n");
        out.push_str("# TYPE omni_proxy_upstream_errors_total counter\n");
        for (i, k) in ERROR_KINDS.iter().enumerate() {
            let _ = writeln!(out, "omni_proxy_upstream_errors_total{{kind=\"{k}\"}} {}", self.upstream_errors[i].load(Relaxed));
        }
        let snapshot = board.snapshot();
        out.push_str("# HELP omni_child_restarts_total Restarts of a supervised child since the gateway started.\n");
        out.push_str("# TYPE omni_child_restarts_total counter\n");
        for (name, c) in snapshot.iter() {
            let _ = writeln!(out, "omni_child_restarts_total{{component=\"{name}\"}} {}", c.restarts);
        }
        out.push_str("# HELP omni_child_restart_attempts Failed starts or runs in a row without a stable run (0 once stable).\n");
        out.push_str("# TYPE omni_child_restart_attempts gauge\n");
        for (name, c) in snapshot.iter() {
            let _ = writeln!(out, "omni_child_restart_attempts{{component=\"{name}\"}} {}", c.attempts);
        }
        out.push_str("# HELP omni_child_crash_looping 1 while a child has failed OMNI_CRASH_LOOP_LIMIT times in a row without a stable run; it is still being retried.\n");
        out.push_str("# TYPE omni_child_crash_looping gauge\n");
        for (name, c) in snapshot.iter() {
            let _ = writeln!(out, "omni_child_crash_looping{{component=\"{name}\"}} {}", u8::from(c.crash_looping));
        }
        out.push_str("# HELP omni_gateway_stopping 1 once the gateway has begun to stop (it answers /health with 503).\n");
        out.push_str("# TYPE omni_gateway_stopping gauge\n");
        let _ = writeln!(out, "omni_gateway_stopping {}", u8::from(snapshot.gateway == GatewayState::Stopping));
        out.push_str("# HELP omni_child_state 1 for the state each supervised child is in.\n");
        out.push_str("# TYPE omni_child_state gauge\n");
        for (name, c) in snapshot.iter() {
            for s in STATES {
                let _ = writeln!(out, "omni_child_state{{component=\"{name}\",state=\"{s}\"}} {}", u8::from(c.state == s));
            }
        }
        if let Some(relay) = board.replication() {
            out.push_str(&relay.metrics());
        }
        if let Some(repository) = board.repository() {
            out.push_str(&repository.metrics());
        }
        if let Some(dir) = &self.wal_dir {
            render_wal_ages(&mut out, dir);
        }
        out
    }
}

/// Point-in-time recovery ages, in seconds; a gauge is absent while there is
/// nothing to measure (no WAL yet, no base backup, no good drill), which an
/// alert on `absent(...)` catches.
fn render_wal_ages(out: &mut String, wal_dir: &std::path::Path) {
    let now = chrono::Utc::now();
    let age = |t: chrono::DateTime<chrono::Utc>| (now - t).num_milliseconds().max(0) as f64 / 1000.0;
    let gauges = [
        ("omni_wal_newest_archived_age_seconds", "Seconds since the WAL streamer last wrote into OMNI_WAL_DIR.", crate::pitr::archive::newest_write(wal_dir).map(chrono::DateTime::<chrono::Utc>::from)),
        ("omni_wal_newest_base_backup_age_seconds", "Seconds since the newest verified base backup ended.", crate::pitr::base::list(wal_dir).last().map(|b| b.finished_at)),
        ("omni_wal_last_good_drill_age_seconds", "Seconds since the last restore drill that passed (omni-gateway backup verify).", crate::pitr::restore::last_drill(wal_dir).filter(|d| d.ok).map(|d| d.at)),
    ];
    for (name, help, at) in gauges {
        if let Some(at) = at {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", age(at));
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_looping_child_shows_in_its_gauge() {
        let board = Board::new(&["postgres", "api"]);
        board.update("api", |c| {
            c.attempts = 6;
            c.crash_looping = true;
        });
        let text = Metrics::default().render(&board);
        assert!(text.contains("omni_child_crash_looping{component=\"api\"} 1"), "{text}");
        assert!(text.contains("omni_child_crash_looping{component=\"postgres\"} 0"), "{text}");
        assert!(text.contains("omni_child_restart_attempts{component=\"api\"} 6"), "{text}");
        assert!(text.contains("omni_gateway_stopping 0"), "{text}");
        board.set_stopping();
        assert!(Metrics::default().render(&board).contains("omni_gateway_stopping 1"));
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let metrics = Metrics::default();
        assert_eq!(quantile(&metrics.counters().buckets, 0.5), None, "no requests, no latency");
        for _ in 0..99 {
            metrics.observe_request(StatusCode::OK, Duration::from_micros(700));
        }
        metrics.observe_request(StatusCode::BAD_GATEWAY, Duration::from_millis(400));
        let c = metrics.counters();
        assert_eq!((c.requests, c.server_errors), (100, 1));
        let p50 = quantile(&c.buckets, 0.5).unwrap();
        assert!((0.0005..=0.001).contains(&p50), "{p50}");
        let p99 = quantile(&c.buckets, 0.99).unwrap();
        assert!(p99 <= 0.001, "99 of 100 are under 1 ms: {p99}");
        let p100 = quantile(&c.buckets, 1.0).unwrap();
        assert!((0.25..=0.5).contains(&p100), "{p100}");
    }
}
