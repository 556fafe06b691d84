//! The external PostgreSQL of `DATABASE_URL` (SPEC §8).
//!
//! The gateway does not run it, so it cannot supervise it; it can only tell
//! the truth about it. `/health` asks it a real `SELECT 1` on every call (a
//! port probe would call a server that refuses logins healthy), and
//! `omni-gateway doctor` does the same once.
//!
//! `DATABASE_URL` may name several hosts (libpq's multi-host form,
//! `postgresql://h1:5432,h2:5432/omni?target_session_attrs=read-write`, for
//! a cluster run by Patroni or the like): the check connects to the first
//! host that accepts writes. When none does, each host is asked directly
//! whether it answers as a standby: then the database is `failing_over`
//! (its HA engine is promoting one) rather than `unavailable`, in `/health`
//! and `/gateway/status`. Either way `/health` answers 503 until a primary
//! accepts writes again, and the worker is kept (it is not what is broken).

use std::time::Duration;

use anyhow::{Context, Result};
use omni_contract::redact::url_password as redact;
use tokio::sync::Mutex;

/// How long `/health` waits for the external server before calling it down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long asking each host whether it is a standby may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The external server's state, as `/health` and `/gateway/status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ready,
    /// No host accepts writes, one answers as a standby.
    FailingOver,
    Unavailable,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::FailingOver => "failing_over",
            State::Unavailable => "unavailable",
        }
    }
}

/// A connection to the external server, opened on demand and reopened after any error.
pub struct ExternalDatabase {
    config: tokio_postgres::Config,
    /// Reused between checks so a health probe does not cost a login; `None`
    /// after an error, so the next check reconnects.
    client: Mutex<Option<tokio_postgres::Client>>,
    /// The URL without its password, for messages.
    pub display_url: String,
}

impl ExternalDatabase {
    pub fn new(url: &str) -> Result<Self> {
        let mut config: tokio_postgres::Config = url.parse().with_context(|| format!("DATABASE_URL={} is not a valid PostgreSQL URL", redact(url)))?;
        config.application_name("omni-gateway").connect_timeout(CHECK_TIMEOUT);
        Ok(ExternalDatabase { config, client: Mutex::new(None), display_url: redact(url) })
    }

    /// `SELECT 1` within [`CHECK_TIMEOUT`]; the error says what to check.
    pub async fn check(&self) -> Result<()> {
        let attempt = async {
            let mut slot = self.client.lock().await;
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                *slot = Some(crate::pg::connect(&self.config).await?);
            }
            let result = slot.as_ref().expect("connected above").simple_query("SELECT 1").await;
            if result.is_err() {
                *slot = None;
            }
            result.map(|_| ()).map_err(anyhow::Error::from)
        };
        match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e).with_context(|| format!("the external PostgreSQL at {} does not answer SELECT 1; check that it runs and that DATABASE_URL is right", self.display_url)),
            Err(_) => {
                *self.client.lock().await = None;
                anyhow::bail!("the external PostgreSQL at {} did not answer SELECT 1 within {} s; check that it runs and is reachable", self.display_url, CHECK_TIMEOUT.as_secs())
            }
        }
    }
}

impl ExternalDatabase {
    /// [`ExternalDatabase::check`], and on failure whether the database is
    /// failing over: `(state, what is wrong)`.
    pub async fn state(&self) -> (State, Option<String>) {
        match self.check().await {
            Ok(()) => (State::Ready, None),
            Err(e) if omni_contract::leader::failover_under_way(&self.config, PROBE_TIMEOUT).await => (
                State::FailingOver,
                Some(format!("the external PostgreSQL at {} is failing over: no host accepts writes yet, one answers as a standby ({e:#})", self.display_url)),
            ),
            Err(e) => (State::Unavailable, Some(format!("{e:#}"))),
        }
    }

    /// The `database` object of `/health` and `/gateway/status`, and what is
    /// wrong (for `/health`'s detail) when it is not ready.
    pub async fn status_json(&self) -> (serde_json::Value, Option<String>) {
        let (state, problem) = self.state().await;
        (serde_json::json!({ "kind": "external", "url": self.display_url, "state": state.as_str(), "detail": problem }), problem)
    }
}
