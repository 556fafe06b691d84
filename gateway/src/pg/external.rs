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
//!
//! One check at a time, shared: a `/health` asked while a check is under way
//! gets that check's answer. While the server is away a check takes its
//! whole [`CHECK_TIMEOUT`] and the probe after it; monitors asking meanwhile
//! would otherwise queue behind it for the one connection, one full check
//! after another.

use std::time::Duration;

use anyhow::{Context, Result};
use omni_contract::redact::url_password as redact;
use tokio::sync::{watch, Mutex};

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
    /// Where the check under way will say its answer ([`ExternalDatabase::state`]).
    under_way: std::sync::Mutex<Option<watch::Receiver<Option<Checked>>>>,
}

/// A check's answer: the state, and what is wrong when it is not ready.
type Checked = (State, Option<String>);

/// Clears the check under way when its task ends or is dropped, so the
/// next caller starts one.
struct UnderWay<'a>(&'a std::sync::Mutex<Option<watch::Receiver<Option<Checked>>>>);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl ExternalDatabase {
    pub fn new(url: &str) -> Result<Self> {
        let mut config: tokio_postgres::Config = url.parse().with_context(|| format!("DATABASE_URL={} is not a valid PostgreSQL URL", redact(url)))?;
        config.application_name("omni-gateway").connect_timeout(CHECK_TIMEOUT);
        Ok(ExternalDatabase { config, client: Mutex::new(None), display_url: redact(url), under_way: std::sync::Mutex::new(None) })
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
    /// failing over: `(state, what is wrong)`. The answer of the check under
    /// way if there is one, else of a new one.
    pub async fn state(&self) -> Checked {
        let (joined, answer) = {
            let mut under_way = self.under_way.lock().unwrap_or_else(|e| e.into_inner());
            match under_way.as_ref() {
                Some(answer) => (Some(answer.clone()), None),
                None => {
                    let (answer, told) = watch::channel(None);
                    *under_way = Some(told);
                    (None, Some(answer))
                }
            }
        };
        if let Some(mut told) = joined {
            let checked = told.wait_for(Option::is_some).await.ok().and_then(|checked| checked.clone());
            // `None`: that check was dropped before its answer; ask anew.
            return match checked {
                Some(checked) => checked,
                None => self.check_state().await,
            };
        }
        let _clear = UnderWay(&self.under_way);
        let checked = self.check_state().await;
        answer.expect("this call started the check").send_replace(Some(checked.clone()));
        checked
    }

    async fn check_state(&self) -> Checked {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A server that accepts connections and never answers, as a proxy does
    /// while it retries a dead node: a check takes its whole timeout. Five
    /// `/health` asked together share one check (and its one probe) instead
    /// of queueing for the connection, one full check after another.
    #[tokio::test]
    async fn health_asked_during_a_check_gets_that_checks_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counting = accepted.clone();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counting.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        let db = Arc::new(ExternalDatabase::new(&format!("postgresql://omni@127.0.0.1:{port}/omni")).unwrap());
        let asks: Vec<_> = (0..5)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move { db.state().await })
            })
            .collect();
        for ask in asks {
            let (state, problem) = ask.await.unwrap();
            assert_eq!(state, State::Unavailable);
            assert!(problem.is_some_and(|p| p.contains("did not answer SELECT 1 within 2 s")));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "one check and one probe for five callers");
        assert!(db.under_way.lock().unwrap().is_none(), "the next call starts a check of its own");
        server.abort();
    }
}
