//! Certificates obtained by the gateway itself (`OMNI_TLS_DOMAINS`), from
//! an ACME certificate authority (Let's Encrypt by default) with the
//! `instant-acme` client.
//!
//! * **Never blocks the start.** Until a certificate is obtained the port
//!   serves a self-signed one for the domains ([`self_signed`]) and the
//!   status says so; a certificate stored by an earlier run is served at
//!   once instead.
//! * **HTTP-01.** Each pending challenge's token and key authorization go
//!   into [`Challenges`], which the plain port (`OMNI_HTTP_PORT`) answers
//!   at `/.well-known/acme-challenge/<token>`. **TLS-ALPN-01**
//!   (`OMNI_ACME_CHALLENGE=tls-alpn-01`): a certificate with the
//!   acmeIdentifier extension ([`alpn_certificate`]) is served on the HTTPS
//!   port to handshakes offering ALPN `acme-tls/1`, by the ordering gateway
//!   only (rustls asks the resolver synchronously, so it cannot read the
//!   database): behind a load balancer, use HTTP-01.
//! * **Stored** ([`Store`]): with the embedded database, the account (its
//!   key) and the certificate with its key live in `OMNI_DATA_DIR/tls/`
//!   (mode 600). With an external `DATABASE_URL` they live in that database
//!   instead ([`super::shared`]), keys sealed with `OMNI_TLS_SECRET_FILE`:
//!   every gateway on it serves the same certificate, one of them (the one
//!   holding the claim on its row) orders and renews, the others load what
//!   it writes when `NOTIFY omni_tls` says so, and every gateway's plain
//!   port answers the challenges of any. A restart reuses what is stored
//!   and asks the authority for nothing while the certificate is fresh.
//! * **Renewed** at a moment inside the renewal window the authority
//!   suggests (ARI, RFC 9773) when it offers one, else when a third of the
//!   lifetime is left ([`renewal_at`]); a failure is retried with backoff
//!   from a minute up to a day, the last error in the status and
//!   `omni_tls_acme_last_error`. A directory that is down is an error like
//!   any other: the gateway keeps serving what it has.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use instant_acme::{Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy};
use rustls::{
    pki_types::{CertificateDer, Der, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio_util::sync::CancellationToken;
use x509_cert::der::Decode;

use super::{
    settings::{AcmeSettings, Challenge},
    shared::Shared,
    CertFiles, CertInfo, Live, TlsError,
};

/// Pending HTTP-01 challenges: token → key authorization, this gateway's
/// own, and with a shared store those any gateway on the database asked.
#[derive(Clone, Debug, Default)]
pub struct Challenges {
    local: Arc<RwLock<HashMap<String, String>>>,
    shared: Option<Arc<Shared>>,
}

/// Longer tokens are not looked up in the database (ACME's are 43 characters).
const MAX_TOKEN_LEN: usize = 256;

impl Challenges {
    /// The key authorization to answer for `token`, if one is pending.
    pub async fn answer(&self, token: &str) -> Option<String> {
        if let Some(answer) = self.local.read().unwrap_or_else(|e| e.into_inner()).get(token).cloned() {
            return Some(answer);
        }
        let shared = self.shared.as_ref()?;
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return None;
        }
        match shared.challenge(token).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!("an ACME HTTP-01 check asked for a token this gateway did not ask for, and the database that holds the others' cannot be read: {e:#}");
                None
            }
        }
    }

    fn put(&self, token: String, key_authorization: String) {
        self.local.write().unwrap_or_else(|e| e.into_inner()).insert(token, key_authorization);
    }

    /// Forgets this gateway's answers; returns their tokens.
    fn clear(&self) -> Vec<String> {
        self.local.write().unwrap_or_else(|e| e.into_inner()).drain().map(|(token, _)| token).collect()
    }
}

/// What the ACME task is doing, for the status and `/metrics`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AcmeStatus {
    /// In words: "self-signed: waiting for the first certificate", …
    pub state: String,
    /// The last failure (cleared by a certificate obtained or loaded).
    pub last_error: Option<String>,
    /// Unix seconds of the last failure.
    pub last_error_at: Option<u64>,
    /// Certificates ordered and obtained by this gateway since start.
    pub orders: u64,
    /// Failed attempts since the last success.
    pub failures: u64,
    /// Unix seconds of the next attempt (renewal or retry).
    pub next_attempt_at: Option<u64>,
    /// The gateway that ordered the certificate served (host:pid).
    pub obtained_by: Option<String>,
    /// Unix seconds: when it was obtained.
    pub obtained_at: Option<u64>,
    /// Unix seconds: when this gateway started serving it.
    pub loaded_at: Option<u64>,
    /// The authority's suggested renewal window (Unix seconds), when it offers ARI.
    pub renewal_window: Option<(u64, u64)>,
}

/// Where the account and the certificate are kept.
#[derive(Debug)]
pub enum Store {
    /// `OMNI_DATA_DIR/tls/`: this gateway's own.
    Files(PathBuf),
    /// The external database, shared by every gateway on it.
    Database(Arc<Shared>),
}

/// The ACME side of HTTPS: its settings, challenges and status.
#[derive(Debug)]
pub struct Acme {
    pub settings: AcmeSettings,
    pub challenges: Challenges,
    store: Store,
    status: RwLock<AcmeStatus>,
    /// Woken when the shared store announces a certificate (a permit is
    /// kept when nobody waits, so an announcement is never lost).
    announced: tokio::sync::Notify,
    /// Where in the authority's renewal window to renew, 0..1: chosen at
    /// random once, as RFC 9773 asks, so gateways of many sites spread out.
    window_point: f64,
}

pub const STATE_SELF_SIGNED: &str = "self-signed: waiting for the first certificate";

/// The longest wait between two failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
/// How long the start waits for the shared store before serving self-signed.
const START_LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a gateway waiting for another's order looks again, in case the
/// announcement is lost with its session.
const WAIT_FOR_OTHER: Duration = Duration::from_secs(30);
/// Bounds on how soon the authority's renewal information is asked again.
const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
const ARI_RECHECK_MAX: Duration = Duration::from_secs(6 * 3600);

/// Whether this gateway may order now.
enum Claim {
    Mine,
    /// Another gateway orders (named).
    Other(String),
    /// A certificate newer than the one served was in the store: now served.
    Newer,
}

impl Acme {
    pub fn status(&self) -> AcmeStatus {
        self.status.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut AcmeStatus)) {
        f(&mut self.status.write().unwrap_or_else(|e| e.into_inner()));
    }

    fn cert_files(&self) -> CertFiles {
        CertFiles { cert: self.settings.store.join("cert.pem"), key: self.settings.store.join("key.pem") }
    }

    /// The certificate to serve at start: the stored one when it is still
    /// valid and names the same domains, else a self-signed one. With a
    /// shared store the database is asked for up to [`START_LOAD_TIMEOUT`].
    pub async fn start(settings: AcmeSettings) -> Result<(Arc<Acme>, Arc<Live>), TlsError> {
        let store = match &settings.shared {
            Some(shared) => {
                let sealer = super::seal::Sealer::from_file(&shared.secret_file).map_err(TlsError)?;
                Store::Database(Arc::new(Shared::new(&shared.database_url, &settings.domains, sealer).map_err(TlsError)?))
            }
            None => Store::Files(settings.store.clone()),
        };
        let shared = match &store {
            Store::Database(shared) => Some(shared.clone()),
            Store::Files(_) => None,
        };
        let acme = Acme {
            challenges: Challenges { local: Default::default(), shared },
            store,
            status: RwLock::new(AcmeStatus {
                state: STATE_SELF_SIGNED.into(),
                last_error: None,
                last_error_at: None,
                orders: 0,
                failures: 0,
                next_attempt_at: None,
                obtained_by: None,
                obtained_at: None,
                loaded_at: None,
                renewal_window: None,
            }),
            announced: tokio::sync::Notify::new(),
            window_point: rand::random::<f64>(),
            settings,
        };
        let (key, info) = self_signed(&acme.settings.domains)?;
        let live = Live::new(key, info);
        match &acme.store {
            Store::Files(dir) => match acme.stored_files() {
                Some((key, info)) => {
                    tracing::info!(subject = %info.subject, "TLS certificate for {} loaded from {}", acme.settings.domains.join(", "), dir.display());
                    live.replace(key, info);
                    acme.update(|s| {
                        s.state = format!("certificate from {} (stored by an earlier run)", dir.display());
                        s.loaded_at = Some(super::unix(SystemTime::now()));
                    });
                }
                None => tracing::info!("serving a self-signed certificate for {} until the first one is obtained from {}", acme.settings.domains.join(", "), acme.settings.directory),
            },
            Store::Database(_) => match tokio::time::timeout(START_LOAD_TIMEOUT, acme.load_shared(&live)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => tracing::info!("no certificate for {} in the database yet: serving a self-signed one until one of the gateways obtains it from {}", acme.settings.domains.join(", "), acme.settings.directory),
                Ok(Err(e)) => tracing::warn!("serving a self-signed certificate for {} for now: {e:#}", acme.settings.domains.join(", ")),
                Err(_) => tracing::warn!("the database did not answer within {} s: serving a self-signed certificate for {} until it does", START_LOAD_TIMEOUT.as_secs(), acme.settings.domains.join(", ")),
            },
        }
        Ok((Arc::new(acme), live))
    }

    /// The certificate in `OMNI_DATA_DIR/tls`, when it loads, is still valid
    /// and was obtained for the domains asked today.
    fn stored_files(&self) -> Option<(Arc<CertifiedKey>, CertInfo)> {
        let files = self.cert_files();
        if !files.cert.exists() {
            return None;
        }
        let wanted = self.settings.domains.join(",");
        let had = std::fs::read_to_string(self.settings.store.join("domains")).unwrap_or_default();
        if had.trim() != wanted {
            tracing::info!("the certificate in {} is for {:?}, not {wanted:?}: a new one will be ordered", self.settings.store.display(), had.trim());
            return None;
        }
        match super::load(&files) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::warn!("the stored certificate in {} is not used, a new one will be ordered: {e}", self.settings.store.display());
                None
            }
        }
    }

    /// Serves the database's certificate when it differs from the one
    /// served; `true` when it did. A stored certificate that does not check
    /// out (expired, altered) is not served, and is left to be replaced.
    async fn load_shared(&self, live: &Live) -> anyhow::Result<bool> {
        let Store::Database(shared) = &self.store else { return Ok(false) };
        let Some(stored) = shared.load_certificate().await? else { return Ok(false) };
        let (key, info) = match super::check_pair(stored.chain_pem.as_bytes(), stored.key_pem.as_bytes(), "the certificate in the database (omni_tls_certificate.chain_pem)", "its key (omni_tls_certificate.key_sealed)") {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("the certificate for {} in the database is not served: {e}", self.settings.domains.join(", "));
                return Ok(false);
            }
        };
        if live.leaf().as_ref() == key.cert.first() {
            return Ok(false);
        }
        let now = super::unix(SystemTime::now());
        tracing::info!(subject = %info.subject, obtained_by = %stored.obtained_by, expires = %super::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after)), "TLS certificate for {} loaded from the database: new connections get it", self.settings.domains.join(", "));
        live.replace(key, info);
        self.update(|s| {
            s.state = format!(
                "certificate from the database: obtained by {} at {}, loaded at {}",
                stored.obtained_by,
                super::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(stored.obtained_at)),
                super::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(now))
            );
            s.obtained_by = Some(stored.obtained_by.clone());
            s.obtained_at = Some(stored.obtained_at);
            s.loaded_at = Some(now);
            s.last_error = None;
            s.failures = 0;
            s.renewal_window = None;
        });
        Ok(true)
    }

    /// Obtains and renews until `stop`; with a shared store, also follows
    /// the certificates the other gateways write.
    pub async fn run(self: Arc<Acme>, live: Arc<Live>, stop: CancellationToken) {
        match &self.store {
            Store::Database(shared) => {
                let listening = super::shared::listen(shared.clone(), || self.announced.notify_one(), stop.clone());
                tokio::join!(listening, self.renew(&live, &stop));
            }
            Store::Files(_) => self.renew(&live, &stop).await,
        }
    }

    async fn renew(&self, live: &Live, stop: &CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let wait = self.until_renewal(live).await;
            if !wait.is_zero() {
                self.update(|s| s.next_attempt_at = Some(super::unix(SystemTime::now() + wait)));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = self.announced.notified() => {
                        self.follow(live).await;
                    }
                    () = stop.cancelled() => return,
                }
                // Asked again: the window may have moved, or the certificate changed.
                continue;
            }
            let claim = match self.claim(live).await {
                Ok(claim) => claim,
                Err(e) => {
                    if !self.failed(&format!("{e:#}"), &mut backoff, live, stop).await {
                        return;
                    }
                    continue;
                }
            };
            match claim {
                Claim::Mine => {}
                Claim::Newer => continue,
                Claim::Other(holder) => {
                    self.update(|s| {
                        s.state = format!("renewal due: {holder} is ordering it; waiting for its certificate");
                        s.next_attempt_at = Some(super::unix(SystemTime::now() + WAIT_FOR_OTHER));
                    });
                    tokio::select! {
                        () = tokio::time::sleep(WAIT_FOR_OTHER) => {}
                        () = self.announced.notified() => {}
                        () = stop.cancelled() => return,
                    }
                    self.follow(live).await;
                    continue;
                }
            }
            let outcome = tokio::select! {
                outcome = self.obtain(live) => outcome,
                () = stop.cancelled() => return,
            };
            live.clear_alpn_challenges();
            let tokens = self.challenges.clear();
            if let Store::Database(shared) = &self.store {
                shared.forget_challenges(&tokens).await;
            }
            match outcome {
                Ok((key, info)) => {
                    let now = super::unix(SystemTime::now());
                    tracing::info!(subject = %info.subject, expires = %super::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after)), "TLS certificate for {} obtained from {}: new connections get it", self.settings.domains.join(", "), self.settings.directory);
                    live.replace(key, info);
                    backoff = FIRST_BACKOFF;
                    let me = super::shared::gateway_id();
                    self.update(|s| {
                        s.state = match &self.store {
                            Store::Files(_) => format!("certificate obtained from {}", self.settings.directory),
                            Store::Database(_) => format!("certificate obtained from {} by this gateway ({me}) at {}, stored in the database for the others", self.settings.directory, super::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(now))),
                        };
                        s.last_error = None;
                        s.orders += 1;
                        s.failures = 0;
                        s.obtained_by = Some(me.to_string());
                        s.obtained_at = Some(now);
                        s.loaded_at = Some(now);
                        s.renewal_window = None;
                    });
                }
                Err(e) => {
                    if let Store::Database(shared) = &self.store {
                        shared.release().await;
                    }
                    if !self.failed(&format!("{e:#}"), &mut backoff, live, stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// Records a failure and waits out the backoff (cut short when another
    /// gateway announces a certificate); `false` when stopped meanwhile.
    async fn failed(&self, e: &str, backoff: &mut Duration, live: &Live, stop: &CancellationToken) -> bool {
        tracing::warn!("could not obtain a TLS certificate for {} from {} (next attempt in {} s; the current certificate is still served): {e}", self.settings.domains.join(", "), self.settings.directory, backoff.as_secs());
        self.update(|s| {
            s.last_error = Some(e.to_string());
            s.last_error_at = Some(super::unix(SystemTime::now()));
            s.failures += 1;
            s.next_attempt_at = Some(super::unix(SystemTime::now() + *backoff));
        });
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            () = self.announced.notified() => {
                if self.follow(live).await {
                    *backoff = FIRST_BACKOFF;
                    return true;
                }
            }
            () = stop.cancelled() => return false,
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        true
    }

    /// Loads what the shared store announced; `true` when a new certificate is served.
    async fn follow(&self, live: &Live) -> bool {
        match self.load_shared(live).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!("a certificate was announced but cannot be loaded (the one served stays): {e:#}");
                false
            }
        }
    }

    /// Takes the right to order: always with files; with the shared store
    /// the claim on the certificate's row, after which the row is read
    /// again (another gateway may have renewed since this one looked).
    async fn claim(&self, live: &Live) -> anyhow::Result<Claim> {
        let Store::Database(shared) = &self.store else { return Ok(Claim::Mine) };
        if let Err(holder) = shared.claim().await? {
            return Ok(Claim::Other(holder));
        }
        match self.load_shared(live).await {
            Ok(false) => Ok(Claim::Mine),
            Ok(true) => {
                shared.release().await;
                Ok(Claim::Newer)
            }
            Err(e) => {
                // Unreadable (another secret, the database gone): never order over it.
                shared.release().await;
                Err(e)
            }
        }
    }

    /// Zero when the served certificate is self-signed or due; else the
    /// time until it is due, or until the authority's renewal information
    /// is to be asked again, whichever comes first.
    async fn until_renewal(&self, live: &Live) -> Duration {
        let Some((not_before, not_after)) = live.lifetime() else { return Duration::ZERO };
        if self.status().state == STATE_SELF_SIGNED {
            return Duration::ZERO;
        }
        let ari = self.renewal_info(live).await;
        self.update(|s| s.renewal_window = ari.map(|(window, _)| window));
        let now = super::unix(SystemTime::now());
        let wait = Duration::from_secs(renewal_at(not_before, not_after, ari.map(|(window, _)| window), self.window_point).saturating_sub(now));
        match ari {
            Some((_, recheck)) if !wait.is_zero() => wait.min(recheck.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX)),
            _ => wait,
        }
    }

    /// The authority's suggested renewal window for the served certificate
    /// and when to ask again; `None` when it offers no renewal information
    /// (or no account is stored yet, or it cannot be asked now: then the
    /// third-of-the-lifetime rule decides).
    async fn renewal_info(&self, live: &Live) -> Option<((u64, u64), Duration)> {
        let leaf = live.leaf()?;
        let id = certificate_id(&leaf)?;
        let account = match self.stored_account().await {
            Ok(Some(account)) => account,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!("renewal information not asked: {e:#}");
                return None;
            }
        };
        match account.renewal_info(&id).await {
            Ok((info, recheck)) => {
                let window = &info.suggested_window;
                let (start, end) = (window.start.unix_timestamp().max(0) as u64, window.end.unix_timestamp().max(0) as u64);
                tracing::debug!(start, end, "ACME renewal information (ARI) for the served certificate");
                Some(((start, end), recheck))
            }
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::info!("the authority's renewal information (ARI) could not be read, so the certificate is renewed when a third of its lifetime is left: {e}");
                None
            }
        }
    }

    /// One order: account, authorizations answered by HTTP-01 (or
    /// TLS-ALPN-01 on `live`), CSR, certificate; checked, stored, then returned.
    async fn obtain(&self, live: &Live) -> anyhow::Result<(Arc<CertifiedKey>, CertInfo)> {
        use anyhow::Context;
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self.settings.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await.context("new order")?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("authorization")?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => anyhow::bail!("the authorization for {} is {other:?}", authz.identifier()),
            }
            let Identifier::Dns(domain) = authz.identifier().identifier.clone() else { anyhow::bail!("the authority asks to prove {}, not a domain name", authz.identifier()) };
            match self.settings.challenge {
                Challenge::Http01 => {
                    let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| anyhow::anyhow!("the authority offers no HTTP-01 challenge for {domain}; try OMNI_ACME_CHALLENGE=tls-alpn-01"))?;
                    let (token, key_authorization) = (challenge.token.clone(), challenge.key_authorization().as_str().to_string());
                    if let Store::Database(shared) = &self.store {
                        // Before ready: the authority may ask any gateway behind the balancer.
                        shared.put_challenge(&token, &key_authorization).await?;
                    }
                    self.challenges.put(token, key_authorization);
                    challenge.set_ready().await.context("challenge ready")?;
                }
                Challenge::TlsAlpn01 => {
                    let mut challenge = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| anyhow::anyhow!("the authority offers no TLS-ALPN-01 challenge for {domain}; try OMNI_ACME_CHALLENGE=http-01"))?;
                    live.put_alpn_challenge(&domain, alpn_certificate(&domain, challenge.key_authorization().digest().as_ref())?);
                    challenge.set_ready().await.context("challenge ready")?;
                }
            }
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retries).await.context("waiting for the authorizations")?;
        if status != OrderStatus::Ready {
            anyhow::bail!(
                "the order is {status:?}, not ready: {}",
                match self.settings.challenge {
                    Challenge::Http01 => "the authority could not check http://<domain>/.well-known/acme-challenge/ on port 80 (OMNI_HTTP_PORT must be reachable as port 80 of each domain)",
                    Challenge::TlsAlpn01 => "the authority could not check TLS-ALPN-01 on port 443 (OMNI_PORT must be reachable as port 443 of each domain, without a TLS-terminating proxy in front)",
                }
            );
        }
        let key_pem = order.finalize().await.context("finalize")?;
        let chain_pem = order.poll_certificate(&retries).await.context("downloading the certificate")?;
        match &self.store {
            Store::Files(_) => {
                self.store_files(&chain_pem, &key_pem).context("storing the certificate")?;
                super::load(&self.cert_files()).map_err(|e| anyhow::anyhow!("the certificate obtained does not load: {e}"))
            }
            Store::Database(shared) => {
                let (key, info) = super::check_pair(chain_pem.as_bytes(), key_pem.as_bytes(), "the certificate obtained", "its key").map_err(|e| anyhow::anyhow!("{e}"))?;
                shared.save_certificate(&chain_pem, &key_pem, info.not_after).await?;
                Ok((key, info))
            }
        }
    }

    /// The account stored for this directory, if any (never creates one).
    async fn stored_account(&self) -> anyhow::Result<Option<Account>> {
        use anyhow::Context;
        let text = match &self.store {
            Store::Files(dir) => std::fs::read_to_string(dir.join("account.json")).ok(),
            Store::Database(shared) => shared.load_account(&self.settings.directory).await?,
        };
        let Some(stored) = text.and_then(|t| serde_json::from_str::<StoredAccount>(&t).ok()) else { return Ok(None) };
        if stored.directory != self.settings.directory {
            return Ok(None);
        }
        let account = self.account_builder()?.from_credentials(stored.credentials).await.with_context(|| format!("the ACME directory {}", self.settings.directory))?;
        Ok(Some(account))
    }

    fn account_builder(&self) -> anyhow::Result<instant_acme::AccountBuilder> {
        use anyhow::Context;
        match &self.settings.ca_file {
            Some(ca) => Account::builder_with_root(ca).with_context(|| format!("OMNI_ACME_CA_FILE={}: cannot use it as the CA of the ACME directory", ca.display())),
            None => Account::builder().context("the HTTPS client for the ACME directory"),
        }
    }

    /// The stored account for this directory, or a new one (then stored).
    async fn account(&self) -> anyhow::Result<Account> {
        use anyhow::Context;
        if let Some(account) = self.stored_account().await? {
            return Ok(account);
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = self
            .account_builder()?
            .create(&NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false }, self.settings.directory.clone(), None)
            .await
            .with_context(|| format!("creating an account at the ACME directory {}", self.settings.directory))?;
        let stored = serde_json::to_string(&StoredAccount { directory: self.settings.directory.clone(), credentials })?;
        match &self.store {
            Store::Files(dir) => write_private(dir, &dir.join("account.json"), stored.as_bytes())?,
            Store::Database(shared) => shared.save_account(&self.settings.directory, &stored).await?,
        }
        Ok(account)
    }

    fn store_files(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let files = self.cert_files();
        write_private(&self.settings.store, &files.key, key_pem.as_bytes())?;
        write_private(&self.settings.store, &files.cert, chain_pem.as_bytes())?;
        write_private(&self.settings.store, &self.settings.store.join("domains"), self.settings.domains.join(",").as_bytes())
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`
/// (Unix seconds): at `point` (0..1) of the authority's suggested `window`
/// when it offers one (a window in the past means now), else when a third
/// of the lifetime is left.
fn renewal_at(not_before: u64, not_after: u64, window: Option<(u64, u64)>, point: f64) -> u64 {
    match window {
        Some((start, end)) if end >= start => start + ((end - start) as f64 * point.clamp(0.0, 1.0)) as u64,
        _ => not_after - not_after.saturating_sub(not_before) / 3,
    }
}

/// The certificate answering TLS-ALPN-01 for `domain` (RFC 8737): self-signed,
/// naming only `domain`, with the critical acmeIdentifier extension holding
/// the SHA-256 `digest` of the key authorization.
fn alpn_certificate(domain: &str, digest: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key check parses the certificate
    // with webpki, which refuses the critical acmeIdentifier extension.
    let signing = super::provider().key_provider.load_private_key(der)?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
}

/// RFC 9773's identifier of a certificate (its authority key identifier and
/// serial), `None` when it has no authority key identifier (self-signed).
fn certificate_id(leaf: &CertificateDer<'_>) -> Option<CertificateIdentifier<'static>> {
    use x509_cert::der::oid::AssociatedOid;
    use x509_cert::ext::pkix::AuthorityKeyIdentifier;
    let cert = x509_cert::Certificate::from_der(leaf).ok()?;
    let tbs = &cert.tbs_certificate;
    let extension = tbs.extensions.as_ref()?.iter().find(|e| e.extn_id == AuthorityKeyIdentifier::OID)?;
    let aki = AuthorityKeyIdentifier::from_der(extension.extn_value.as_bytes()).ok()?;
    let key_id = aki.key_identifier?;
    Some(CertificateIdentifier::new(Der::from_slice(key_id.as_bytes()), Der::from_slice(tbs.serial_number.as_bytes())).into_owned())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Writes `path` (mode 600, in a mode 700 `dir`) by a rename, so a crash
/// leaves the old file or the new one.
fn write_private(dir: &Path, path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(content).and_then(|()| file.sync_all()).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// A self-signed certificate for `domains`, served until one is obtained.
pub fn self_signed(domains: &[String]) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let generated = rcgen::generate_simple_self_signed(domains.to_vec()).map_err(|e| TlsError(format!("cannot make a self-signed certificate for {}: {e}", domains.join(", "))))?;
    let der: CertificateDer<'static> = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()));
    let certified = CertifiedKey::from_der(vec![der.clone()], key, &super::provider()).map_err(|e| TlsError(format!("the self-signed certificate cannot be used: {e}")))?;
    let parsed = x509_cert::Certificate::from_der(&der).map_err(|e| TlsError(format!("the self-signed certificate cannot be parsed: {e}")))?;
    let validity = &parsed.tbs_certificate.validity;
    let info = CertInfo {
        subject: parsed.tbs_certificate.subject.to_string(),
        not_after: super::unix(validity.not_after.to_system_time()),
        not_before: super::unix(validity.not_before.to_system_time()),
        issuer: parsed.tbs_certificate.issuer.to_string(),
        chain_length: 1,
    };
    Ok((Arc::new(certified), info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_signed_certificate_names_the_domains_and_serves() {
        let (key, info) = self_signed(&["omni.example.com".into(), "www.omni.example.com".into()]).unwrap();
        assert_eq!(info.subject, info.issuer);
        assert!(info.not_after > super::super::unix(SystemTime::now()));
        assert_eq!(key.cert.len(), 1);
        let challenges = Challenges::default();
        challenges.put("t1".into(), "t1.thumb".into());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(async { (challenges.answer("t1").await, challenges.answer("t2").await) }), (Some("t1.thumb".into()), None));
        assert_eq!(challenges.clear(), ["t1"]);
        assert_eq!(rt.block_on(challenges.answer("t1")), None);
    }

    #[test]
    fn renewal_comes_when_a_third_of_the_lifetime_is_left_or_inside_the_authoritys_window() {
        let day = 86_400;
        // No renewal information: 90 days are renewed from day 60 on, six days after four.
        assert_eq!(renewal_at(0, 90 * day, None, 0.5), 60 * day);
        assert_eq!(renewal_at(day, 7 * day, None, 0.0), 5 * day);
        // A window from the authority decides instead, at the chosen point of it.
        assert_eq!(renewal_at(0, 90 * day, Some((70 * day, 72 * day)), 0.0), 70 * day);
        assert_eq!(renewal_at(0, 90 * day, Some((70 * day, 72 * day)), 0.5), 71 * day);
        assert_eq!(renewal_at(0, 90 * day, Some((70 * day, 72 * day)), 1.0), 72 * day);
        // Earlier than a third left (the authority revokes, say): the window still wins.
        assert_eq!(renewal_at(0, 90 * day, Some((3 * day, 4 * day)), 0.0), 3 * day);
        // A window that ends before it starts is no window.
        assert_eq!(renewal_at(0, 90 * day, Some((72 * day, 70 * day)), 0.5), 60 * day);
    }

    #[test]
    fn the_tls_alpn_01_certificate_names_the_domain_and_carries_the_critical_acme_identifier() {
        let digest = [7u8; 32];
        let key = alpn_certificate("omni.example.com", &digest).unwrap();
        let cert = x509_cert::Certificate::from_der(&key.cert[0]).unwrap();
        let extensions = cert.tbs_certificate.extensions.unwrap();
        let acme = extensions.iter().find(|e| e.extn_id.to_string() == "1.3.6.1.5.5.7.1.31").expect("the acmeIdentifier extension");
        assert!(acme.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(acme.extn_value.as_bytes(), [&[0x04, 32][..], &digest[..]].concat());
        let san = extensions.iter().find(|e| e.extn_id.to_string() == "2.5.29.17").expect("subjectAltName");
        assert!(san.extn_value.as_bytes().windows(16).any(|w| w == b"omni.example.com"));
    }

    #[test]
    fn the_renewal_information_identifier_is_the_authority_key_id_and_serial() {
        // A self-signed certificate names no authority key: no identifier, no ARI asked.
        let (key, _) = self_signed(&["omni.example.com".into()]).unwrap();
        assert!(certificate_id(&key.cert[0]).is_none());
        // RFC 9773 section 4.1's example: keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4, serial 00:87:65:43:21.
        let id = CertificateIdentifier::new(
            Der::from_slice(&[0x69, 0x88, 0x5B, 0x6B, 0x87, 0x46, 0x40, 0x41, 0xE1, 0xB3, 0x7B, 0x84, 0x7B, 0xA0, 0xAE, 0x2C, 0xDE, 0x01, 0xC8, 0xD4]),
            Der::from_slice(&[0x00, 0x87, 0x65, 0x43, 0x21]),
        );
        assert_eq!(id.to_string(), "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE");

        // A certificate signed by a CA: its serial and the CA's key identifier, read from the DER.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
        let mut leaf = rcgen::CertificateParams::new(vec!["omni.example.com".to_string()]).unwrap();
        leaf.serial_number = Some(rcgen::SerialNumber::from(vec![0x00, 0x87, 0x65, 0x43, 0x21]));
        leaf.use_authority_key_identifier_extension = true;
        let leaf = leaf.signed_by(&rcgen::KeyPair::generate().unwrap(), &issuer).unwrap();
        let expected = CertificateIdentifier::new(Der::from_slice(&ca.key_identifier(&ca_key)), Der::from_slice(&[0x00, 0x87, 0x65, 0x43, 0x21]));
        let id = certificate_id(leaf.der()).unwrap();
        assert_eq!(id.to_string(), expected.to_string());
        assert!(id.to_string().ends_with(".AIdlQyE"), "{id}");
    }
}
