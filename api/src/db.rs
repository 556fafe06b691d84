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
//! Beside the pool, the worker's one dedicated session
//! ([`omni_contract::leader`]): it holds the leader lock when this worker
//! leads, and hears restores announced by any worker on the database, upon
//! which the pool is reset ([`Db::reset`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

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

/// The pool, cloned into every handler.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
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
        Ok(Db { pool, leadership: Arc::new(OnceLock::new()) })
    }

    /// A verified connection, or a 503 error for the client.
    pub async fn client(&self) -> Result<Client, ApiError> {
        Ok(self.pool.get().await?)
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
    /// usual; their statement caches are cleared here too.
    pub fn reset(&self) {
        self.pool.manager().statement_caches.clear();
        let dropped = self.pool.retain(|_, _| false);
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
