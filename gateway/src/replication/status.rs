//! What the relay shows: the `replication` entry of `/gateway/status` and
//! the `omni_replication_*` metrics. It lives beside the status board, not
//! among its supervised children, so replication never makes `/health` fail
//! or holds back readiness: it is not on the request path.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::status::State;

/// The relay's picture, updated by the relay loop, read at scrape time.
#[derive(Debug, Clone)]
pub struct RelayView {
    pub state: State,
    /// Why the state is what it is ("copying", the error behind `backoff`).
    pub detail: Option<String>,
    /// `host:port/database` of the target, never credentials.
    pub target: String,
    /// Embedded databases replicated.
    pub databases: Vec<String>,
    /// WAL the slot still holds for the relay (0 once caught up).
    pub lag_bytes: u64,
    /// Age of the oldest change not yet on the target (0 once caught up).
    pub lag_seconds: f64,
    pub last_applied: Option<SystemTime>,
    pub applied_transactions: u64,
    /// Tables in the publication (every table of the replicated databases).
    pub tables: u64,
    pub restarts: u32,
    /// Failed runs in a row; the exponent of the retry delay.
    pub attempts: u32,
    pub next_retry: Option<Instant>,
    /// When a full copy last completed, and why it ran.
    pub last_copy: Option<String>,
}

impl RelayView {
    pub fn new(target: String, databases: Vec<String>) -> Self {
        RelayView {
            state: State::Starting,
            detail: None,
            target,
            databases,
            lag_bytes: 0,
            lag_seconds: 0.0,
            last_applied: None,
            applied_transactions: 0,
            tables: 0,
            restarts: 0,
            attempts: 0,
            next_retry: None,
            last_copy: None,
        }
    }

    /// The `/gateway/status` component.
    pub fn to_json(&self) -> serde_json::Value {
        let tenths = |d: Duration| (d.as_secs_f64() * 10.0).round() / 10.0;
        let last_applied = self.last_applied.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64());
        json!({
            "name": "replication",
            "state": self.state,
            "target": self.target,
            "databases": self.databases,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": (self.lag_seconds * 1000.0).round() / 1000.0,
            "last_applied_unix": last_applied,
            "applied_transactions": self.applied_transactions,
            "tables": self.tables,
            "restarts": self.restarts,
            "attempts": self.attempts,
            "next_retry_s": self.next_retry.map(|t| tenths(t.saturating_duration_since(Instant::now()))),
            "last_copy": self.last_copy,
            "detail": self.detail,
        })
    }

    /// The `omni_replication_*` lines of `/metrics`.
    pub fn metrics(&self) -> String {
        format!(
            "# HELP omni_replication_lag_bytes WAL the replication slot holds that the target has not applied yet.\n\
             # TYPE omni_replication_lag_bytes gauge\n\
             omni_replication_lag_bytes {}\n\
             # HELP omni_replication_lag_seconds Age of the oldest change not yet applied on the replication target.\n\
             # TYPE omni_replication_lag_seconds gauge\n\
             omni_replication_lag_seconds {}\n\
             # HELP omni_replication_applied_transactions_total Source transactions applied on the replication target since the gateway started.\n\
             # TYPE omni_replication_applied_transactions_total counter\n\
             omni_replication_applied_transactions_total {}\n\
             # HELP omni_replication_ready 1 while the relay streams changes to the target.\n\
             # TYPE omni_replication_ready gauge\n\
             omni_replication_ready {}\n",
            self.lag_bytes,
            self.lag_seconds,
            self.applied_transactions,
            u8::from(self.state == State::Ready)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_metrics_show_lag_and_never_credentials() {
        let mut v = RelayView::new("db.example:5432/omni".into(), vec!["omni".into()]);
        v.state = State::Backoff;
        v.lag_bytes = 4096;
        v.applied_transactions = 3;
        let doc = v.to_json();
        assert_eq!(doc["state"], "backoff");
        assert_eq!(doc["lag_bytes"], 4096);
        assert!(!doc.to_string().contains('@'));
        let text = v.metrics();
        assert!(text.contains("omni_replication_lag_bytes 4096\n"), "{text}");
        assert!(text.contains("omni_replication_applied_transactions_total 3\n"), "{text}");
        assert!(text.contains("omni_replication_ready 0\n"), "{text}");
    }
}
