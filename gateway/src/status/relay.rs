//! What the relay shows: the `replication` entry of `/gateway/status` and
//! the `omni_replication_*` metrics. It lives beside the status board, not
//! among its supervised children, so replication never makes `/health` fail
//! or holds back readiness: it is not on the request path.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::status::State;

/// One replicated database's picture, updated by its relay loop.
#[derive(Debug, Clone)]
pub struct DbView {
    /// The embedded database.
    pub database: String,
    /// The database it goes into on the target server.
    pub target_database: String,
    pub state: State,
    /// Why the state is what it is ("copying", the error behind `backoff`).
    pub detail: Option<String>,
    /// WAL the slot still holds for the relay (0 once caught up).
    pub lag_bytes: u64,
    /// Age of the oldest change not yet on the target (0 once caught up).
    pub lag_seconds: f64,
    pub last_applied: Option<SystemTime>,
    pub applied_transactions: u64,
    /// Tables in the database's publication.
    pub tables: u64,
    pub restarts: u32,
    /// Failed runs in a row; the exponent of the retry delay.
    pub attempts: u32,
    pub next_retry: Option<Instant>,
    /// When a full copy last completed, and why it ran.
    pub last_copy: Option<String>,
}

impl DbView {
    pub fn new(database: String, target_database: String) -> Self {
        DbView {
            database,
            target_database,
            state: State::Starting,
            detail: None,
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

    fn to_json(&self) -> serde_json::Value {
        json!({
            "database": self.database,
            "target_database": self.target_database,
            "state": self.state,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": round_ms(self.lag_seconds),
            "last_applied_unix": unix(self.last_applied),
            "applied_transactions": self.applied_transactions,
            "tables": self.tables,
            "restarts": self.restarts,
            "attempts": self.attempts,
            "next_retry_s": self.next_retry.map(tenths_until),
            "last_copy": self.last_copy,
            "detail": self.detail,
        })
    }
}

/// The relay's picture: one [`DbView`] per replicated database, read at
/// scrape time and shown as one `replication` component (the sums and the
/// worst state) with the databases listed inside it.
#[derive(Debug, Clone)]
pub struct RelayView {
    /// `host:port` of the target server, never credentials.
    pub target: String,
    /// Set while the databases to replicate are being resolved (`*`).
    pub detail: Option<String>,
    pub dbs: Vec<DbView>,
}

impl RelayView {
    pub fn new(target: String) -> Self {
        RelayView { target, detail: None, dbs: Vec::new() }
    }

    /// `ready` only when every database streams; otherwise the state of the
    /// one furthest from it (`backoff` before `starting`).
    pub fn state(&self) -> State {
        let rank = |s: State| match s {
            State::Backoff | State::Failed => 3,
            State::Starting => 2,
            State::Stopped => 1,
            _ => 0,
        };
        self.dbs.iter().map(|d| d.state).max_by_key(|s| rank(*s)).unwrap_or(State::Starting)
    }

    /// The first database not streaming, and why.
    fn detail_text(&self) -> Option<String> {
        if self.dbs.is_empty() {
            return self.detail.clone();
        }
        let worst = self.state();
        self.dbs
            .iter()
            .find(|d| d.state == worst && d.detail.is_some())
            .map(|d| if self.dbs.len() > 1 { format!("{}: {}", d.database, d.detail.as_deref().unwrap_or("")) } else { d.detail.clone().unwrap_or_default() })
    }

    pub fn lag_bytes(&self) -> u64 {
        self.dbs.iter().map(|d| d.lag_bytes).sum()
    }

    pub fn lag_seconds(&self) -> f64 {
        self.dbs.iter().map(|d| d.lag_seconds).fold(0.0, f64::max)
    }

    pub fn applied_transactions(&self) -> u64 {
        self.dbs.iter().map(|d| d.applied_transactions).sum()
    }

    /// The `/gateway/status` component.
    pub fn to_json(&self) -> serde_json::Value {
        let last_applied = self.dbs.iter().filter_map(|d| d.last_applied).max();
        let last_copy = self.dbs.iter().filter_map(|d| d.last_copy.clone()).collect::<Vec<_>>();
        json!({
            "name": "replication",
            "state": self.state(),
            "target": self.target,
            "databases": self.dbs.iter().map(|d| d.database.clone()).collect::<Vec<_>>(),
            "lag_bytes": self.lag_bytes(),
            "lag_seconds": round_ms(self.lag_seconds()),
            "last_applied_unix": unix(last_applied),
            "applied_transactions": self.applied_transactions(),
            "tables": self.dbs.iter().map(|d| d.tables).sum::<u64>(),
            "restarts": self.dbs.iter().map(|d| d.restarts).sum::<u32>(),
            "attempts": self.dbs.iter().map(|d| d.attempts).max().unwrap_or(0),
            "next_retry_s": self.dbs.iter().filter_map(|d| d.next_retry).min().map(tenths_until),
            "last_copy": (!last_copy.is_empty()).then(|| last_copy.join("; ")),
            "detail": self.detail_text(),
            "per_database": self.dbs.iter().map(DbView::to_json).collect::<Vec<_>>(),
        })
    }

    /// The `omni_replication_*` lines of `/metrics`: totals, then one
    /// labelled lag line per database.
    pub fn metrics(&self) -> String {
        let mut text = format!(
            "# HELP omni_replication_lag_bytes WAL the replication slots hold that the target has not applied yet.\n\
             # TYPE omni_replication_lag_bytes gauge\n\
             omni_replication_lag_bytes {}\n\
             # HELP omni_replication_lag_seconds Age of the oldest change not yet applied on the replication target.\n\
             # TYPE omni_replication_lag_seconds gauge\n\
             omni_replication_lag_seconds {}\n\
             # HELP omni_replication_applied_transactions_total Source transactions applied on the replication target since the gateway started.\n\
             # TYPE omni_replication_applied_transactions_total counter\n\
             omni_replication_applied_transactions_total {}\n\
             # HELP omni_replication_ready 1 while the relay streams every replicated database to the target.\n\
             # TYPE omni_replication_ready gauge\n\
             omni_replication_ready {}\n",
            self.lag_bytes(),
            self.lag_seconds(),
            self.applied_transactions(),
            u8::from(self.state() == State::Ready)
        );
        text.push_str("# HELP omni_replication_database_lag_bytes WAL held for one replicated database.\n# TYPE omni_replication_database_lag_bytes gauge\n");
        for d in &self.dbs {
            text.push_str(&format!("omni_replication_database_lag_bytes{{database=\"{}\"}} {}\n", d.database.replace('\\', "\\\\").replace('"', "\\\""), d.lag_bytes));
        }
        text
    }
}

fn round_ms(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

fn unix(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64())
}

fn tenths_until(t: Instant) -> f64 {
    let d: Duration = t.saturating_duration_since(Instant::now());
    (d.as_secs_f64() * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_metrics_show_lag_and_never_credentials() {
        let mut v = RelayView::new("db.example:5432".into());
        v.dbs.push(DbView::new("omni".into(), "copy".into()));
        v.dbs.push(DbView::new("extra".into(), "extra".into()));
        v.dbs[0].state = State::Ready;
        v.dbs[1].state = State::Backoff;
        v.dbs[1].detail = Some("the target has no database extra".into());
        v.dbs[0].lag_bytes = 4000;
        v.dbs[1].lag_bytes = 96;
        v.dbs[0].applied_transactions = 3;
        let doc = v.to_json();
        assert_eq!(doc["state"], "backoff");
        assert_eq!(doc["lag_bytes"], 4096);
        assert!(!doc.to_string().contains('@'));
        let text = v.metrics();
        assert!(text.contains("omni_replication_lag_bytes 4096\n"), "{text}");
        assert!(text.contains("omni_replication_applied_transactions_total 3\n"), "{text}");
        assert!(text.contains("omni_replication_ready 0\n"), "{text}");
        assert!(text.contains("omni_replication_database_lag_bytes{database=\"extra\"} 96\n"), "{text}");
        assert_eq!(doc["detail"], "extra: the target has no database extra", "the database that holds the relay back is named");
        assert_eq!(doc["per_database"][0]["state"], "ready");
    }
}
