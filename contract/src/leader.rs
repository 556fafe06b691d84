//! Several workers on one PostgreSQL: who runs the once-per-cluster jobs,
//! and which operations run one at a time across all of them.
//!
//! * **Leadership** ([`Leadership::spawn`]): a lease row with an epoch in
//!   the database (`omni_leader_lease`, migration 0005), not a session
//!   advisory lock. An advisory lock lives in one server's memory: on a
//!   failover to a standby (Patroni, CloudNativePG, a managed service) it
//!   vanishes, and the worker that held it cannot tell whether another one
//!   took it on the new primary. The row is replicated like any write. Every
//!   worker keeps one *dedicated* session (its own connection, never the
//!   pool's) and every [`TICK`] renews the lease if it holds it, or takes it
//!   if it has expired ([`LEASE_TTL`] after its last renewal); taking it
//!   increments the epoch. The holder runs the scheduled jobs (backups and
//!   their retention). A leader that cannot renew in time steps down on its
//!   own clock before the lease can expire on the database's, and each
//!   scheduled job calls [`Leadership::fence`] just before it writes: on a
//!   fresh connection, `NOT pg_is_in_recovery()` and the row still naming
//!   this worker and its epoch. So two workers never run the same slot's
//!   job, across a failover too: a stale leader's fence fails.
//!   The row also names the holder's backend (`holder_pid`): a leader whose
//!   session is gone from the server (it stopped, was killed, or the row
//!   came over in a failover) is replaced at the next tick of another
//!   worker; one that vanished without closing its connection, once its
//!   lease expires: within [`LEASE_TTL`] plus one tick. A stopping worker
//!   ends its session between two renewals ([`Leadership::stop`]), so the
//!   server never answers a renewal to a process that is gone.
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

use std::{
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::time::Instant;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

/// Session advisory lock held by a restore or an import ("omni" + "oper").
pub const OPERATION_KEY: i64 = 0x6f6d_6e69_6f70_6572;
/// Channel on which a finished restore is announced.
pub const RESTORED_CHANNEL: &str = "omni_restored";
/// How often a follower tries the lease and a leader renews it.
pub const TICK: Duration = Duration::from_secs(1);
/// How long a lease lasts after its last renewal (on the database's clock).
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// A leader steps down this long after a renewal was *sent* if no later one
/// succeeded: shorter than the lease, so it stops before another can start.
const STEP_DOWN_AFTER: Duration = Duration::from_millis(2500);
/// Longest a check of the session may take before it is given up as dead.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle time before TCP keepalive probes start on the dedicated sessions.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// This worker's view of leadership: `true` while it holds the lease.
#[derive(Clone)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
    lease: Arc<Mutex<Lease>>,
    database_url: Arc<str>,
    /// Set by [`Leadership::stop`]; the task ends between two renewals.
    stopping: Arc<watch::Sender<bool>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// What this worker knows of its own lease.
#[derive(Clone, Default)]
struct Lease {
    /// The epoch of the lease held, `None` when not leading.
    epoch: Option<i64>,
    /// Past this instant the lease may have expired on the database.
    valid_until: Option<Instant>,
}

/// This machine's host name, for naming a process to the others sharing a
/// database (`unknown-host` when it cannot be read).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".to_owned()
    }
}

/// The lease row's holder: unique per worker process.
fn holder_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = host_name();
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        format!("{host}:{}:{started:x}", std::process::id())
    })
}

/// Why a scheduled job may not write now.
#[derive(Debug, thiserror::Error)]
pub enum Fenced {
    #[error("this worker does not hold the leader lease")]
    NotLeading,
    #[error("the database this worker reaches is a standby (in recovery), not the primary")]
    InRecovery,
    #[error("the leader lease moved on (held epoch {held}, the database says {current})")]
    Superseded { held: i64, current: String },
    #[error("the database did not confirm the leader lease: {0}")]
    Database(String),
}

impl Leadership {
    /// Starts the leadership task. `on_restored` runs when another (or this)
    /// worker announces a restore, and whenever the session is (re)opened.
    pub fn spawn(database_url: String, on_restored: impl Fn() + Send + Sync + 'static) -> Leadership {
        let (tx, leading) = watch::channel(false);
        let lease = Arc::new(Mutex::new(Lease::default()));
        let on_restored: Arc<dyn Fn() + Send + Sync> = Arc::new(on_restored);
        let url: Arc<str> = database_url.into();
        let (task_url, task_lease) = (url.clone(), lease.clone());
        let (stopping, mut stop) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut first = true;
            loop {
                match session(&task_url, &tx, &task_lease, on_restored.clone(), first, stop.clone()).await {
                    Ok(()) => {}
                    Err(error) => tracing::warn!(%error, "leader lease: the dedicated database session failed; retrying"),
                }
                first = false;
                *task_lease.lock().unwrap_or_else(|e| e.into_inner()) = Lease::default();
                if tx.send_replace(false) {
                    tracing::warn!("leader lease: given up with the session; scheduled backups stop here until it is held again");
                }
                if tx.is_closed() || *stop.borrow() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = stopped(&mut stop) => return,
                }
            }
        });
        Leadership { leading, lease, database_url: url, stopping: Arc::new(stopping), task: Arc::new(Mutex::new(Some(task))) }
    }

    /// Ends the dedicated session cleanly, for a worker that is stopping:
    /// a renewal under way is answered first, then the session says goodbye
    /// to the server (so it logs no lost client). Waits at most `within`.
    /// This worker stops leading; its lease is taken at the next tick of
    /// another worker (its session is gone from the server).
    pub async fn stop(&self, within: Duration) {
        self.stopping.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            if tokio::time::timeout(within, task).await.is_err() {
                tracing::warn!(within_ms = within.as_millis() as u64, "leader lease: the dedicated session did not end in time; leaving it to the exit");
            }
        }
    }

    /// Whether this worker holds the lease, by its own clock.
    pub fn is_leader(&self) -> bool {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        *self.leading.borrow() && lease.valid_until.is_some_and(|until| Instant::now() < until)
    }

    /// The epoch of the lease this worker holds, if it leads.
    pub fn epoch(&self) -> Option<i64> {
        self.is_leader().then(|| self.lease.lock().unwrap_or_else(|e| e.into_inner()).epoch).flatten()
    }

    /// Checks, on a fresh connection, that this worker may write as the
    /// leader now: it holds the lease by its own clock, the server is a
    /// primary (`NOT pg_is_in_recovery()`), and the lease row still names
    /// this worker with the same epoch and has not expired. Call it just
    /// before a scheduled job writes anything.
    pub async fn fence(&self) -> Result<i64, Fenced> {
        let held = self.epoch().ok_or(Fenced::NotLeading)?;
        let check = async {
            let (client, _notices) = connect(&self.database_url, "omni-fence").await.map_err(|e| Fenced::Database(e.to_string()))?;
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), (SELECT epoch FROM omni_leader_lease WHERE holder = $1 AND expires_at > now())",
                    &[&holder_id()],
                )
                .await
                .map_err(|e| Fenced::Database(e.to_string()))?;
            Ok::<_, Fenced>((row.get::<_, bool>(0), row.get::<_, Option<i64>>(1)))
        };
        let (in_recovery, current) = tokio::time::timeout(CHECK_TIMEOUT, check).await.map_err(|_| Fenced::Database(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())))??;
        if in_recovery {
            return Err(Fenced::InRecovery);
        }
        match current {
            Some(epoch) if epoch == held => Ok(epoch),
            other => Err(Fenced::Superseded { held, current: other.map_or("no live lease of this worker".into(), |e| e.to_string()) }),
        }
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

/// Renews the lease if this worker holds it, takes it if it has expired;
/// returns the epoch held afterwards, `None` when another worker holds it.
/// A lease whose holder's session is gone from this server (the worker
/// stopped or died, or the lease was written on a server that has since
/// failed over) is taken at once rather than after it expires.
const TAKE_OR_RENEW: &str = "INSERT INTO omni_leader_lease AS l (id, holder, holder_pid, epoch, expires_at)
     VALUES (true, $1, pg_backend_pid(), 1, now() + make_interval(secs => $2))
     ON CONFLICT (id) DO UPDATE SET
         epoch = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() THEN l.epoch ELSE l.epoch + 1 END,
         acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() THEN l.acquired_at ELSE now() END,
         holder = EXCLUDED.holder,
         holder_pid = EXCLUDED.holder_pid,
         expires_at = EXCLUDED.expires_at
     WHERE l.holder = EXCLUDED.holder
        OR l.expires_at <= now()
        OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.holder_pid AND a.application_name = 'omni-leader')
     RETURNING epoch";

/// One life of the dedicated session: connect, LISTEN, then take or renew
/// the lease every tick until the session fails.
async fn session(
    database_url: &str,
    leading: &watch::Sender<bool>,
    lease: &Mutex<Lease>,
    on_restored: Arc<dyn Fn() + Send + Sync>,
    first: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut notices, connection) = connect_driven(database_url, "omni-leader").await?;
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
        tracing::info!("leader lease: session back; resetting the connection pool in case a restore was announced meanwhile");
        reset();
    }
    let statement = client.prepare(TAKE_OR_RENEW).await?;
    let ttl = LEASE_TTL.as_secs_f64();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped(&mut stop) => {
                // Between two renewals: nothing is asked of the server now.
                drop(client);
                let _ = tokio::time::timeout(CHECK_TIMEOUT, connection).await;
                return Ok(());
            }
        }
        if leading.is_closed() {
            return Ok(());
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(STEP_DOWN_AFTER, client.query_opt(&statement, &[&holder_id(), &ttl])).await;
        let epoch = match answer {
            Ok(Ok(row)) => row.map(|r| r.get::<_, i64>(0)),
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                if *leading.borrow() {
                    tracing::warn!(timeout_ms = STEP_DOWN_AFTER.as_millis() as u64, "leader lease: the renewal got no answer in time; stepping down");
                }
                return Ok(());
            }
        };
        let was = *leading.borrow();
        {
            let mut held = lease.lock().unwrap_or_else(|e| e.into_inner());
            match epoch {
                Some(epoch) => {
                    if held.epoch != Some(epoch) {
                        tracing::info!(epoch, "leader lease: taken; this worker now runs the scheduled backups and their retention");
                    }
                    *held = Lease { epoch: Some(epoch), valid_until: Some(sent + STEP_DOWN_AFTER) };
                }
                None => *held = Lease::default(),
            }
        }
        match (was, epoch.is_some()) {
            (false, true) => {
                leading.send_replace(true);
            }
            (true, false) => {
                tracing::warn!("leader lease: held by another worker now; stepping down");
                leading.send_replace(false);
            }
            _ => {}
        }
    }
}

/// Completes once [`Leadership::stop`] was called (or the leadership is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
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
    connect_driven(database_url, application).await.map(|(client, notices, _)| (client, notices))
}

/// [`connect`], with the task driving the connection: it ends once the
/// client is dropped and the server was told the session ends.
async fn connect_driven(
    database_url: &str,
    application: &str,
) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
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
    let driven = tokio::spawn(async move {
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
    Ok((client, rx, driven))
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
            if leadership.leading.has_changed().is_err() {
                // The leadership task ended (the worker stops): never leading again.
                return;
            }
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

/// Whether some host of `config` answers (`pg_is_in_recovery()`, as a
/// standby or as a primary), asked directly, one connection per host
/// whatever `target_session_attrs` says, all at once, each within
/// `timeout`. Asked after a read-write connection failed, `true` means a
/// failover is under way rather than the database being gone: an HA engine
/// is promoting a standby or is about to, or has just promoted one (the
/// read-write dial came a moment before the promotion ended, the probe a
/// moment after).
pub async fn failover_under_way(config: &tokio_postgres::Config, timeout: Duration) -> bool {
    use tokio_postgres::config::{Host, TargetSessionAttrs};
    let ports = config.get_ports();
    let mut probes = tokio::task::JoinSet::new();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let mut one = tokio_postgres::Config::new();
        match host {
            Host::Tcp(name) => one.host(name),
            Host::Unix(path) => one.host_path(path),
        };
        // libpq's rule: one port for every host, or one per host.
        one.port(ports.get(i).or(ports.first()).copied().unwrap_or(5432));
        if let Some(user) = config.get_user() {
            one.user(user);
        }
        if let Some(password) = config.get_password() {
            one.password(password);
        }
        if let Some(dbname) = config.get_dbname() {
            one.dbname(dbname);
        }
        one.ssl_mode(config.get_ssl_mode()).application_name("omni-failover-probe").connect_timeout(timeout).target_session_attrs(TargetSessionAttrs::Any);
        probes.spawn(async move {
            let ask = async {
                let (client, connection) = one.connect(NoTls).await.ok()?;
                let driver = tokio::spawn(connection);
                let in_recovery = client.query_one("SELECT pg_is_in_recovery()", &[]).await.ok().map(|row| row.get::<_, bool>(0));
                driver.abort();
                in_recovery
            };
            tokio::time::timeout(timeout, ask).await.ok().flatten().is_some()
        });
    }
    while let Some(answer) = probes.join_next().await {
        if answer.unwrap_or(false) {
            return true;
        }
    }
    false
}
