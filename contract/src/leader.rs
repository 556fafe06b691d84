//! Several workers on one PostgreSQL: who runs the once-per-cluster jobs,
//! and which operations run one at a time across all of them.
//!
//! * **Leadership** ([`Leadership::spawn`]): every worker keeps one
//!   *dedicated* session (its own connection, never the pool's) and tries
//!   `pg_try_advisory_lock(LEADER_KEY)` on it every [`TICK`]. A session-level
//!   advisory lock is held for as long as that session lives, so the worker
//!   whose session holds it leads (scheduled backups and their retention run
//!   there and nowhere else) until it stops, dies or loses its connection:
//!   PostgreSQL ends the dead session's backend and frees the lock, and the
//!   next worker's try takes it, within about one tick. A pooled connection
//!   would not do: a transaction-level lock ends with its transaction, and a
//!   session-level one would follow the connection back into the pool.
//!   TCP keepalives on the session bound how long a vanished machine (no
//!   FIN, no RST) keeps the lock: about [`KEEPALIVE_IDLE`] plus three probes.
//! * **One cluster operation at a time** ([`exclusive`]): a restore or an
//!   import holds `OPERATION_KEY` on a session of its own for its whole run;
//!   a second one, on any worker, is refused at once instead of queueing.
//! * **Restored data everywhere** ([`RESTORED_CHANNEL`]): after a restore
//!   commits, the restoring session sends `NOTIFY omni_restored`. Every
//!   worker LISTENs on its leadership session and resets its connection
//!   pool (idle connections closed, prepared statements forgotten), so no
//!   request runs a statement planned against the tables the restore
//!   replaced. Why LISTEN/NOTIFY rather than a generation counter read on
//!   every checkout: a restore is a rare event and every worker already holds
//!   the dedicated session, so it costs no query per request. A worker whose
//!   session was down when the notice went out resets its pool when the
//!   session comes back, so a missed notice cannot leave it stale. There are
//!   no caches of database content in the worker to invalidate.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

/// Session advisory lock whose holder leads ("omni" + "lead").
pub const LEADER_KEY: i64 = 0x6f6d_6e69_6c65_6164;
/// Session advisory lock held by a restore or an import ("omni" + "oper").
pub const OPERATION_KEY: i64 = 0x6f6d_6e69_6f70_6572;
/// Channel on which a finished restore is announced.
pub const RESTORED_CHANNEL: &str = "omni_restored";
/// How often a follower tries the lock and a leader checks its session.
pub const TICK: Duration = Duration::from_secs(1);
/// Longest a check of the session may take before it is given up as dead.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle time before TCP keepalive probes start on the dedicated sessions.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// This worker's view of leadership: `true` while its session holds the lock.
#[derive(Clone)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
}

impl Leadership {
    /// Starts the leadership task. `on_restored` runs when another (or this)
    /// worker announces a restore, and whenever the session is (re)opened.
    pub fn spawn(database_url: String, on_restored: impl Fn() + Send + Sync + 'static) -> Leadership {
        let (tx, leading) = watch::channel(false);
        let on_restored: Arc<dyn Fn() + Send + Sync> = Arc::new(on_restored);
        tokio::spawn(async move {
            let mut first = true;
            loop {
                match session(&database_url, &tx, on_restored.clone(), first).await {
                    Ok(()) => {}
                    Err(error) => tracing::warn!(%error, "leader lock: the dedicated database session failed; retrying"),
                }
                first = false;
                if tx.send_replace(false) {
                    tracing::warn!("leader lock: lost with the session; scheduled backups stop here until it is held again");
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(TICK).await;
            }
        });
        Leadership { leading }
    }

    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until this worker leads.
    pub async fn until_leading(&mut self) {
        let _ = self.leading.wait_for(|leading| *leading).await;
    }

    /// Completes when this worker stops leading.
    pub async fn until_not_leading(&mut self) {
        let _ = self.leading.wait_for(|leading| !*leading).await;
    }
}

/// One life of the dedicated session: connect, LISTEN, then try or check
/// the lock every tick until the session fails.
async fn session(database_url: &str, leading: &watch::Sender<bool>, on_restored: Arc<dyn Fn() + Send + Sync>, first: bool) -> Result<(), tokio_postgres::Error> {
    let (client, mut notices) = connect(database_url, "omni-leader").await?;
    let reset = on_restored.clone();
    let notice_task = tokio::spawn(async move {
        while let Some(name) = notices.recv().await {
            tracing::info!(backup = %name, "a restore finished on the database; resetting the connection pool so no statement planned before it is used");
            on_restored();
        }
    });
    // Dropping the task's handle does not stop it; the guard does.
    let _notice_guard = AbortOnDrop(notice_task);
    client.batch_execute(&format!("LISTEN {RESTORED_CHANNEL}")).await?;
    if !first {
        // The reconnect itself is the signal: a notice may have been missed.
        tracing::info!("leader lock: session back; resetting the connection pool in case a restore was announced meanwhile");
        reset();
    }
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if leading.is_closed() {
            return Ok(());
        }
        if *leading.borrow() {
            match tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("")).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    tracing::warn!(timeout_s = CHECK_TIMEOUT.as_secs(), "leader lock: the session does not answer; stepping down");
                    return Ok(());
                }
            }
        } else {
            let taken = tokio::time::timeout(CHECK_TIMEOUT, client.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_KEY])).await;
            match taken {
                Ok(Ok(row)) if row.get::<_, bool>(0) => {
                    tracing::info!("leader lock: taken; this worker now runs the scheduled backups and their retention");
                    leading.send_replace(true);
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Ok(()),
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A dedicated session with keepalives, its connection driven by a task that
/// forwards `NOTIFY` payloads to the returned channel and ends with the client.
async fn connect(database_url: &str, application: &str) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>), tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = database_url.parse()?;
    config
        .application_name(application)
        .connect_timeout(CHECK_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.channel() == RESTORED_CHANNEL => {
                    let _ = tx.send(n.payload().to_owned());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "{RESTORED_CHANNEL}: dedicated session ended");
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Held for the length of a restore or an import; dropping it closes its
/// session, which frees the lock.
pub struct OperationLock {
    client: tokio_postgres::Client,
}

impl OperationLock {
    /// Releases the lock now, while the session is still open: dropped
    /// instead, it is released only once the backend sees the closed
    /// connection, and a restore asked right after this one would find it
    /// still taken.
    pub async fn release(self) {
        if let Err(error) = self.client.execute("SELECT pg_advisory_unlock($1)", &[&OPERATION_KEY]).await {
            tracing::debug!(%error, "releasing the operation lock; it goes with the session");
        }
    }

    /// Announces a finished restore to every worker on this database.
    pub async fn announce_restored(&self, name: &str) {
        if let Err(error) = self.client.execute("SELECT pg_notify($1, $2)", &[&RESTORED_CHANNEL, &name]).await {
            tracing::warn!(%error, "could not announce the restore to the other workers; they reset their pools when their session reconnects");
        }
    }
}

/// Takes the cluster-wide operation lock on a session of its own, without
/// waiting: `Ok(None)` when another worker (or this one) runs a restore or
/// an import now.
pub async fn exclusive(database_url: &str) -> Result<Option<OperationLock>, tokio_postgres::Error> {
    let (client, _notices) = connect(database_url, "omni-operation").await?;
    let taken: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&OPERATION_KEY]).await?.get(0);
    Ok(taken.then_some(OperationLock { client }))
}

/// Runs `job` each time this worker becomes the leader, and cancels it (drops
/// its future) as soon as it stops leading.
pub fn while_leading<F, Fut>(mut leadership: Leadership, job: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            leadership.until_leading().await;
            let mut lost = leadership.clone();
            tokio::select! {
                _ = job() => {}
                _ = lost.until_not_leading() => {
                    tracing::info!("no longer the leader: scheduled backups stop here");
                }
            }
            if leadership.leading.has_changed().is_err() {
                return;
            }
        }
    })
}
