//! The connection pool, built so the worker outlives PostgreSQL restarts.
//!
//! A checkout hands out a pooled connection whose socket is still open; one
//! that sat unused for longer than [`VERIFY_AFTER_IDLE`] is first verified
//! with a round trip, so a connection broken by a restart is discarded
//! instead of handed to a handler. (A connection in steady use needs no
//! extra round trip: a restart closes its socket, which the pool sees.) Short
//! wait and connect timeouts turn "database down" into a fast 503 rather than
//! requests piling up behind a connect that will not succeed.
//!
//! **Failover** (a `DATABASE_URL` naming several hosts, libpq's multi-host
//! form with `target_session_attrs=read-write`, or one address in front of
//! an HA cluster): the pool dials the hosts in turn and keeps the one that
//! accepts writes. While none does, a failed dial starts a jittered,
//! growing pause ([`Redial`]: 100 ms doubling up to 500 ms, ±25 %) during
//! which requests get a 503 with `Retry-After` at once instead of each one
//! dialing every host again; the first request after the pause dials, and
//! the first success ends it. A failed checkout also asks each host,
//! directly, whether it answers as a standby: then the database is
//! `failing_over` (a server is there, none is primary yet), not
//! `unavailable`, in the answer and in `GET /api/v1/health`.
//!
//! Beside the pool, the worker's one dedicated session
//! ([`omni_contract::leader`]): it holds the leader lock when this worker
//! leads, and hears restores announced by any worker on the database, upon
//! which the pool is reset ([`Db::reset`]).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use omni_contract::leader::Leadership;
use tokio_postgres::NoTls;

use crate::errors::ApiError;

/// Upper bound on how long a request waits for a connection.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection not checked out for this long is verified (an empty query)
/// before it is handed out again.
const VERIFY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// First pause after a failed dial; it doubles per failure in a row.
const REDIAL_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between dials while the database is away.
const REDIAL_MAX: Duration = Duration::from_millis(500);
/// How long one host may take to say whether it is a standby.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A probe's verdict is reused for this long.
const PROBE_FRESH: Duration = Duration::from_millis(500);

/// The database as the worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    Ok,
    /// No host accepts writes, but at least one answers as a standby: an HA
    /// engine is promoting one (or about to).
    FailingOver,
    /// No host answers at all.
    Unavailable,
}

impl DbState {
    pub fn as_str(self) -> &'static str {
        match self {
            DbState::Ok => "ok",
            DbState::FailingOver => "failing_over",
            DbState::Unavailable => "unavailable",
        }
    }
}

/// Why [`Db::checkout`] has no connection.
#[derive(Debug)]
pub enum NoClient {
    /// Every connection is in use for longer than [`CHECKOUT_TIMEOUT`].
    Busy,
    /// The database is away: no dial until this pause is over.
    Away(Duration),
}

/// The pause between dials while the database is away, and the last
/// verdict on why it is away.
#[derive(Default)]
struct Redial {
    failures: u32,
    not_before: Option<Instant>,
    verdict: Option<(Instant, DbState)>,
}

impl Redial {
    /// After a failed dial: the next pause, jittered ±25 %.
    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let base = REDIAL_FIRST.saturating_mul(1 << self.failures.min(8).saturating_sub(1)).min(REDIAL_MAX);
        let pause = base.mul_f64(rand::random::<f64>() * 0.5 + 0.75);
        self.not_before = Some(Instant::now() + pause);
        pause
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failed_dials = self.failures, "database reachable for writes again");
        }
        *self = Redial::default();
    }

    /// What is left of the current pause.
    fn pause_left(&self) -> Option<Duration> {
        self.not_before.and_then(|t| t.checked_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }
}

/// The pool, cloned into every handler.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// DATABASE_URL parsed, for asking each host what it is.
    config: Arc<tokio_postgres::Config>,
    redial: Arc<Mutex<Redial>>,
    /// Started once the schema is in place ([`Db::lead`]); read by the
    /// health answer, which says whether this worker leads.
    leadership: Arc<OnceLock<Leadership>>,
}

pub type Client = deadpool_postgres::Object;

impl Db {
    pub fn connect(database_url: &str, pool_size: usize) -> anyhow::Result<Db> {
        let mut pg_config: tokio_postgres::Config =
            database_url.parse().context("DATABASE_URL is not a valid PostgreSQL URL")?;
        pg_config.connect_timeout(CHECKOUT_TIMEOUT);
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("omni-api");
        }
        // `Fast`: a closed socket is discarded at checkout; the round trip of
        // `Verified` is paid only by connections idle for a while (the hook).
        let config = Arc::new(pg_config.clone());
        let manager = Manager::from_config(pg_config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let verify_idle = Hook::async_fn(|client: &mut deadpool_postgres::ClientWrapper, metrics: &deadpool_postgres::Metrics| {
            let idle = metrics.last_used() > VERIFY_AFTER_IDLE;
            Box::pin(async move {
                if idle {
                    match tokio::time::timeout(CHECKOUT_TIMEOUT, client.simple_query("")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(HookError::Backend(e)),
                        Err(_) => return Err(HookError::message("an idle connection did not answer its check in time")),
                    }
                }
                Ok(())
            })
        });
        let pool = Pool::builder(manager)
            .post_recycle(verify_idle)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CHECKOUT_TIMEOUT))
            .create_timeout(Some(CHECKOUT_TIMEOUT))
            .recycle_timeout(Some(CHECKOUT_TIMEOUT))
            .build()
            .context("building the connection pool")?;
        Ok(Db { pool, config, redial: Arc::new(Mutex::new(Redial::default())), leadership: Arc::new(OnceLock::new()) })
    }

    /// A verified connection, or a 503 error (with `Retry-After`) for the client.
    pub async fn client(&self) -> Result<Client, ApiError> {
        match self.checkout().await {
            Ok(client) => Ok(client),
            Err(NoClient::Busy) => Err(ApiError::database_busy()),
            Err(NoClient::Away(pause)) => Err(self.away(pause).await),
        }
    }

    /// A verified connection, or why there is none without asking the hosts
    /// why (that probe takes up to [`PROBE_TIMEOUT`]): for work that has
    /// another way to go, such as a batch whose requests then go alone.
    pub async fn checkout(&self) -> Result<Client, NoClient> {
        let paused = self.redial.lock().unwrap_or_else(|e| e.into_inner()).pause_left();
        if let Some(left) = paused {
            return Err(NoClient::Away(left));
        }
        match self.pool.get().await {
            Ok(client) => {
                self.redial.lock().unwrap_or_else(|e| e.into_inner()).succeeded();
                Ok(client)
            }
            // Every connection busy: the database is fine, the pool is full.
            Err(deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => Err(NoClient::Busy),
            Err(error) => {
                tracing::warn!(%error, "no database connection");
                Err(NoClient::Away(self.redial.lock().unwrap_or_else(|e| e.into_inner()).failed()))
            }
        }
    }

    /// The 503 for a request while the database is away.
    async fn away(&self, pause: Duration) -> ApiError {
        let retry_after = pause.as_secs().max(1);
        match self.state_when_away().await {
            DbState::FailingOver => ApiError::database_failing_over(retry_after),
            _ => ApiError::database_unavailable().retry_after(retry_after),
        }
    }

    /// Why no connection could be made: `FailingOver` if some host answers
    /// as a standby (asked directly, each within [`PROBE_TIMEOUT`]; the
    /// verdict is reused for [`PROBE_FRESH`]), else `Unavailable`.
    async fn state_when_away(&self) -> DbState {
        let cached = self.redial.lock().unwrap_or_else(|e| e.into_inner()).verdict.filter(|(at, _)| at.elapsed() < PROBE_FRESH);
        if let Some((_, state)) = cached {
            return state;
        }
        let state = if omni_contract::leader::failover_under_way(&self.config, PROBE_TIMEOUT).await { DbState::FailingOver } else { DbState::Unavailable };
        self.redial.lock().unwrap_or_else(|e| e.into_inner()).verdict = Some((Instant::now(), state));
        state
    }

    /// The database's state for the health answer: a real query, bounded
    /// in time, and on failure why.
    pub async fn state(&self) -> DbState {
        match self.ping().await {
            Ok(()) => DbState::Ok,
            Err(_) => self.state_when_away().await,
        }
    }

    /// A connection for start-up work, retried while PostgreSQL is still
    /// coming up (the gateway starts us right after it is ready, but an
    /// external database may be slower), giving up after `patience`.
    pub async fn client_at_start(&self, patience: Duration) -> anyhow::Result<Client> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.pool.get().await {
                Ok(client) => return Ok(client),
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%error, "database not reachable yet, retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error).context(format!(
                        "could not connect to DATABASE_URL within {}s; check that PostgreSQL is running and the URL is right",
                        patience.as_secs()
                    )))
                }
            }
        }
    }

    /// Starts the leadership session on `database_url`; a restore announced
    /// on it resets this pool.
    pub fn lead(&self, database_url: &str) -> Leadership {
        let db = self.clone();
        let leadership = self.leadership.get_or_init(|| Leadership::spawn(database_url.to_owned(), move || db.reset()));
        leadership.clone()
    }

    /// Whether this worker leads; `None` before the leadership session starts.
    pub fn is_leader(&self) -> Option<bool> {
        self.leadership.get().map(Leadership::is_leader)
    }

    /// Forgets every idle connection and every prepared statement, so the
    /// next request plans against the tables as they are now (after a
    /// restore replaced them). Connections in use are verified on return as
    /// usual; their statement caches are cleared here too. Called when the
    /// database is known to be back (a restore said it serves, or the
    /// leadership session reconnected), so a pause between dials left from
    /// while it was away ends too: the next request dials at once instead
    /// of getting a 503 for the rest of the pause.
    pub fn reset(&self) {
        self.pool.manager().statement_caches.clear();
        let dropped = self.pool.retain(|_, _| false);
        self.redial.lock().unwrap_or_else(|e| e.into_inner()).succeeded();
        tracing::info!(closed = dropped.removed.len(), "connection pool reset");
    }

    /// Health: a real query, bounded in time.
    pub async fn ping(&self) -> Result<(), ApiError> {
        let check = async {
            let client = self.client().await?;
            client.query_one("SELECT 1", &[]).await?;
            Ok::<(), ApiError>(())
        };
        tokio::time::timeout(CHECKOUT_TIMEOUT, check).await.map_err(|_| ApiError::database_unavailable())?
    }
}
