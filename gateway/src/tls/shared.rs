//! The TLS store several gateways share: the ACME account, the certificate
//! with its key, and the pending HTTP-01 answers, in the external
//! PostgreSQL of `DATABASE_URL` (tables of migration 0006).
//!
//! * **One orderer.** A gateway orders only while it holds the claim on the
//!   certificate's row ([`Shared::claim`], ten minutes, renewed by nothing:
//!   an order takes seconds). Why not the workers' leader lease: it is the
//!   worker's (another process, renewed every second on its own session),
//!   and the gateway would have to learn who holds it; a claim on the row
//!   being written serializes exactly the thing that must not run twice,
//!   and, like the lease, is a replicated row that survives a failover.
//!   The claim also fences the write: [`Shared::save_certificate`] writes
//!   only while the row still names this gateway.
//! * **Everyone serves it.** The writer sends `NOTIFY omni_tls` with the
//!   domains; every gateway LISTENs on a dedicated session ([`listen`]) and
//!   loads the row again. A gateway whose session was down reloads when it
//!   comes back, so a missed notice cannot leave it on an old certificate.
//! * **Any plain port answers.** Challenge answers are rows, so the
//!   authority's check may reach any gateway behind a load balancer.
//! * Secret columns are sealed ([`super::seal`]).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use super::seal::Sealer;

/// The channel on which a written certificate is announced (payload: its domains).
pub const CHANNEL: &str = "omni_tls";
/// How long a claim to order lasts: far beyond an order's few seconds, short
/// enough that a gateway that died ordering is replaced the same hour.
const CLAIM: Duration = Duration::from_secs(600);
/// How long an HTTP-01 answer is kept if its order never clears it.
const CHALLENGE_TTL: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A certificate as stored: what any gateway needs to serve it.
#[derive(Clone, Debug)]
pub struct StoredCertificate {
    pub chain_pem: String,
    pub key_pem: String,
    /// The gateway that ordered it ([`gateway_id`]).
    pub obtained_by: String,
    /// Unix seconds.
    pub obtained_at: u64,
}

/// The shared store for one list of domains.
#[derive(Debug)]
pub struct Shared {
    config: tokio_postgres::Config,
    /// `OMNI_TLS_DOMAINS` joined with commas: the certificate's row.
    domains: String,
    sealer: Sealer,
    /// A session for reads and writes, opened on demand, dropped after an error.
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// Who this gateway is in `claimed_by` and `obtained_by`: host and pid.
pub fn gateway_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{}:{}", omni_contract::leader::host_name(), std::process::id()))
}

impl Shared {
    pub fn new(database_url: &str, domains: &[String], sealer: Sealer) -> Result<Shared, String> {
        let mut config: tokio_postgres::Config = database_url.parse().map_err(|e| format!("DATABASE_URL: not a PostgreSQL URL ({e})"))?;
        // Keepalives: a session cut without a word (a partition, a failover)
        // is noticed and replaced instead of hanging the renewal.
        config
            .application_name("omni-gateway-tls")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        Ok(Shared { config, domains: domains.join(","), sealer, client: tokio::sync::Mutex::new(None) })
    }

    /// The session, opened (and the schema migrated) when it is not; a
    /// session whose connection died is closed, and replaced here.
    async fn session(&self) -> anyhow::Result<tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>>> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let (mut client, connection) = self.config.connect(NoTls).await.map_err(|e| anyhow::anyhow!("the TLS store in DATABASE_URL: cannot connect ({e})"))?;
            // Ends with the client, which the slot owns.
            tokio::spawn(connection);
            // The worker applies migrations too, but the gateway may come first
            // (and a test's stand-in worker never does): both take the same lock.
            omni_contract::migrations::apply(&mut client).await.map_err(|e| anyhow::anyhow!("the TLS store in DATABASE_URL: {e:#}"))?;
            *slot = Some(client);
        }
        Ok(slot)
    }

    fn key_label(&self) -> String {
        format!("omni_tls_certificate.key_sealed for {}", self.domains)
    }

    fn account_label(directory: &str) -> String {
        format!("omni_tls_account.credentials_sealed for {directory}")
    }

    /// The stored certificate for these domains, if one was obtained.
    pub async fn load_certificate(&self) -> anyhow::Result<Option<StoredCertificate>> {
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        let row = c
            .query_opt(
                "SELECT chain_pem, key_sealed, obtained_by, extract(epoch FROM obtained_at)::bigint FROM omni_tls_certificate WHERE domains = $1 AND chain_pem IS NOT NULL AND key_sealed IS NOT NULL",
                &[&self.domains],
            )
            .await
            .map_err(|e| failed("reading the certificate", e))?;
        let Some(row) = row else { return Ok(None) };
        let key = self.sealer.open(&self.key_label(), row.get::<_, &[u8]>(1)).map_err(anyhow::Error::msg)?;
        Ok(Some(StoredCertificate {
            chain_pem: row.get(0),
            key_pem: String::from_utf8(key).map_err(|_| anyhow::anyhow!("{}: not a PEM key", self.key_label()))?,
            obtained_by: row.get::<_, Option<String>>(2).unwrap_or_default(),
            obtained_at: row.get::<_, Option<i64>>(3).unwrap_or(0).max(0) as u64,
        }))
    }

    /// Takes the claim to order (or keeps it); `Err(holder)` names who
    /// holds it when another gateway does.
    pub async fn claim(&self) -> anyhow::Result<Result<(), String>> {
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        let secs = CLAIM.as_secs_f64();
        let taken = c
            .query_opt(
                "INSERT INTO omni_tls_certificate AS t (domains, claimed_by, claimed_until) VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (domains) DO UPDATE SET claimed_by = EXCLUDED.claimed_by, claimed_until = EXCLUDED.claimed_until
                 WHERE t.claimed_until IS NULL OR t.claimed_until <= now() OR t.claimed_by = EXCLUDED.claimed_by
                 RETURNING 1",
                &[&self.domains, &gateway_id(), &secs],
            )
            .await
            .map_err(|e| failed("claiming the certificate's order", e))?;
        if taken.is_some() {
            return Ok(Ok(()));
        }
        let holder = c.query_opt("SELECT claimed_by FROM omni_tls_certificate WHERE domains = $1", &[&self.domains]).await.map_err(|e| failed("reading the claim", e))?;
        Ok(Err(holder.and_then(|r| r.get::<_, Option<String>>(0)).unwrap_or_else(|| "another gateway".into())))
    }

    /// Gives the claim up (after a failed order: another gateway may try).
    pub async fn release(&self) {
        let released = async {
            let session = self.session().await?;
            let c = session.as_ref().expect("opened by session()");
            c.execute("UPDATE omni_tls_certificate SET claimed_by = NULL, claimed_until = NULL WHERE domains = $1 AND claimed_by = $2", &[&self.domains, &gateway_id()])
                .await
                .map_err(|e| failed("releasing the claim", e))
        }
        .await;
        if let Err(e) = released {
            tracing::debug!("{e:#}; the claim expires by itself");
        }
    }

    /// Writes the certificate obtained under this gateway's claim, releases
    /// the claim, and announces it; refused when the claim was lost.
    pub async fn save_certificate(&self, chain_pem: &str, key_pem: &str, not_after: u64) -> anyhow::Result<()> {
        let sealed = self.sealer.seal(&self.key_label(), key_pem.as_bytes());
        let not_after = not_after as f64;
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        let written = c
            .execute(
                "UPDATE omni_tls_certificate SET chain_pem = $2, key_sealed = $3, not_after = to_timestamp($4), obtained_by = $5, obtained_at = now(), claimed_by = NULL, claimed_until = NULL
                 WHERE domains = $1 AND claimed_by = $5",
                &[&self.domains, &chain_pem, &sealed, &not_after, &gateway_id()],
            )
            .await
            .map_err(|e| failed("writing the certificate", e))?;
        if written != 1 {
            anyhow::bail!("the claim to order {} was lost while ordering (it lasts {} s); the certificate obtained is not stored", self.domains, CLAIM.as_secs());
        }
        c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.domains]).await.map_err(|e| failed("announcing the certificate (the others load it when their session reconnects)", e))?;
        Ok(())
    }

    /// The ACME account at `directory` (its credentials' JSON), if one is stored.
    pub async fn load_account(&self, directory: &str) -> anyhow::Result<Option<String>> {
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        let row = c.query_opt("SELECT credentials_sealed FROM omni_tls_account WHERE directory = $1", &[&directory]).await.map_err(|e| failed("reading the ACME account", e))?;
        row.map(|r| {
            let plain = self.sealer.open(&Self::account_label(directory), r.get::<_, &[u8]>(0)).map_err(anyhow::Error::msg)?;
            String::from_utf8(plain).map_err(|_| anyhow::anyhow!("the stored ACME account for {directory} is not text"))
        })
        .transpose()
    }

    pub async fn save_account(&self, directory: &str, credentials_json: &str) -> anyhow::Result<()> {
        let sealed = self.sealer.seal(&Self::account_label(directory), credentials_json.as_bytes());
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        c.execute(
            "INSERT INTO omni_tls_account (directory, credentials_sealed, created_by) VALUES ($1, $2, $3)
             ON CONFLICT (directory) DO UPDATE SET credentials_sealed = EXCLUDED.credentials_sealed, created_by = EXCLUDED.created_by, created_at = now()",
            &[&directory, &sealed, &gateway_id()],
        )
        .await
        .map_err(|e| failed("writing the ACME account", e))?;
        Ok(())
    }

    /// Makes `token` answerable by every gateway's plain port.
    pub async fn put_challenge(&self, token: &str, key_authorization: &str) -> anyhow::Result<()> {
        let ttl = CHALLENGE_TTL.as_secs_f64();
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        c.execute("DELETE FROM omni_tls_challenge WHERE expires_at <= now()", &[]).await.map_err(|e| failed("dropping expired HTTP-01 answers", e))?;
        c.execute(
            "INSERT INTO omni_tls_challenge (token, key_authorization, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (token) DO UPDATE SET key_authorization = EXCLUDED.key_authorization, expires_at = EXCLUDED.expires_at",
            &[&token, &key_authorization, &ttl],
        )
        .await
        .map_err(|e| failed("writing the HTTP-01 answer", e))?;
        Ok(())
    }

    pub async fn forget_challenges(&self, tokens: &[String]) {
        if tokens.is_empty() {
            return;
        }
        let forgotten = async {
            let session = self.session().await?;
            let c = session.as_ref().expect("opened by session()");
            c.execute("DELETE FROM omni_tls_challenge WHERE token = ANY($1)", &[&tokens]).await.map_err(|e| failed("forgetting HTTP-01 answers", e))
        }
        .await;
        if let Err(e) = forgotten {
            tracing::debug!("{e:#}; they expire by themselves");
        }
    }

    /// The answer any gateway stored for `token`.
    pub async fn challenge(&self, token: &str) -> anyhow::Result<Option<String>> {
        let session = self.session().await?;
        let c = session.as_ref().expect("opened by session()");
        let row = c.query_opt("SELECT key_authorization FROM omni_tls_challenge WHERE token = $1 AND expires_at > now()", &[&token]).await.map_err(|e| failed("reading an HTTP-01 answer", e))?;
        Ok(row.map(|r| r.get(0)))
    }
}

/// An error of the store's session, saying what was being done.
fn failed(what: &str, e: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!("the TLS store in DATABASE_URL: {what}: {e}")
}

/// Calls `changed` whenever a certificate for these domains is announced,
/// and each time the session (re)opens (a notice may have been missed),
/// until `stop`. Retries the session every few seconds while it fails.
pub async fn listen(shared: Arc<Shared>, changed: impl Fn(), stop: tokio_util::sync::CancellationToken) {
    let mut failures = 0u32;
    loop {
        let session = async {
            let (client, mut connection) = shared.config.connect(NoTls).await?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let driver = tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                            let _ = tx.send(n.payload().to_owned());
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            let result = async {
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                tracing::debug!("TLS store: listening for {CHANNEL}");
                changed();
                while let Some(domains) = rx.recv().await {
                    if domains == shared.domains {
                        changed();
                    }
                }
                Ok::<_, tokio_postgres::Error>(())
            }
            .await;
            driver.abort();
            result
        };
        tokio::select! {
            ended = session => match ended {
                Ok(()) => {
                    failures = 0;
                    tracing::warn!("TLS store: the {CHANNEL} session ended; reconnecting");
                }
                Err(e) => {
                    failures += 1;
                    // Once, then quietly: the database may be down for a while.
                    if failures == 1 {
                        tracing::warn!("TLS store: cannot listen for {CHANNEL} on DATABASE_URL ({e}); retrying, the certificate served now stays");
                    }
                }
            },
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => return,
        }
    }
}
