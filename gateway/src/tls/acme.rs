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
//!   at `/.well-known/acme-challenge/<token>`.
//! * **Stored.** The account (its key) and the certificate with its key
//!   live in `OMNI_DATA_DIR/tls/` (mode 600): a restart reuses them and
//!   asks the authority for nothing while the certificate is fresh.
//! * **Renewed** when a third of its lifetime is left; a failure is retried
//!   with backoff from a minute up to a day, the last error in the status
//!   and `omni_tls_acme_last_error`. A directory that is down is an error
//!   like any other: the gateway keeps serving what it has.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use instant_acme::{Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio_util::sync::CancellationToken;
use x509_cert::der::Decode;

use super::{settings::AcmeSettings, CertFiles, CertInfo, Live, TlsError};

/// Pending HTTP-01 challenges: token → key authorization.
#[derive(Clone, Debug, Default)]
pub struct Challenges(Arc<RwLock<HashMap<String, String>>>);

impl Challenges {
    /// The key authorization to answer for `token`, if one is pending.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }

    fn put(&self, token: String, key_authorization: String) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(token, key_authorization);
    }

    fn clear(&self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// What the ACME task is doing, for the status and `/metrics`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AcmeStatus {
    /// In words: "self-signed: waiting for the first certificate", …
    pub state: String,
    /// The last failure (cleared by a certificate obtained).
    pub last_error: Option<String>,
    /// Unix seconds of the last failure.
    pub last_error_at: Option<u64>,
    /// Certificates ordered and obtained since start.
    pub orders: u64,
    /// Failed attempts since the last success.
    pub failures: u64,
    /// Unix seconds of the next attempt (renewal or retry).
    pub next_attempt_at: Option<u64>,
}

/// The ACME side of HTTPS: its settings, challenges and status.
#[derive(Debug)]
pub struct Acme {
    pub settings: AcmeSettings,
    pub challenges: Challenges,
    status: RwLock<AcmeStatus>,
}

pub const STATE_SELF_SIGNED: &str = "self-signed: waiting for the first certificate";

/// The longest wait between two failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);
const FIRST_BACKOFF: Duration = Duration::from_secs(60);

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
    /// valid and names the same domains, else a self-signed one.
    pub fn start(settings: AcmeSettings) -> Result<(Arc<Acme>, Arc<Live>), TlsError> {
        let acme = Acme {
            settings,
            challenges: Challenges::default(),
            status: RwLock::new(AcmeStatus { state: STATE_SELF_SIGNED.into(), last_error: None, last_error_at: None, orders: 0, failures: 0, next_attempt_at: None }),
        };
        let live = match acme.stored() {
            Some((key, info)) => {
                tracing::info!(subject = %info.subject, "TLS certificate for {} loaded from {}", acme.settings.domains.join(", "), acme.settings.store.display());
                acme.update(|s| s.state = format!("certificate from {} (stored by an earlier run)", acme.settings.store.display()));
                Live::new(key, info)
            }
            None => {
                let (key, info) = self_signed(&acme.settings.domains)?;
                tracing::info!("serving a self-signed certificate for {} until the first one is obtained from {}", acme.settings.domains.join(", "), acme.settings.directory);
                Live::new(key, info)
            }
        };
        Ok((Arc::new(acme), live))
    }

    /// The stored certificate, when it loads, is still valid and was
    /// obtained for the domains asked today.
    fn stored(&self) -> Option<(Arc<CertifiedKey>, CertInfo)> {
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

    /// Obtains and renews until `stop`.
    pub async fn run(self: Arc<Acme>, live: Arc<Live>, stop: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let wait = self.until_renewal(&live);
            if !wait.is_zero() {
                self.update(|s| s.next_attempt_at = Some(super::unix(SystemTime::now() + wait)));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
            let outcome = tokio::select! {
                outcome = self.obtain() => outcome,
                () = stop.cancelled() => return,
            };
            self.challenges.clear();
            match outcome {
                Ok((key, info)) => {
                    tracing::info!(subject = %info.subject, expires = %super::utc(SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after)), "TLS certificate for {} obtained from {}: new connections get it", self.settings.domains.join(", "), self.settings.directory);
                    live.replace(key, info);
                    backoff = FIRST_BACKOFF;
                    self.update(|s| {
                        s.state = format!("certificate obtained from {}", self.settings.directory);
                        s.last_error = None;
                        s.orders += 1;
                        s.failures = 0;
                    });
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    tracing::warn!("could not obtain a TLS certificate for {} from {} (next attempt in {} s; the current certificate is still served): {e}", self.settings.domains.join(", "), self.settings.directory, backoff.as_secs());
                    self.update(|s| {
                        s.last_error = Some(e);
                        s.last_error_at = Some(super::unix(SystemTime::now()));
                        s.failures += 1;
                        s.next_attempt_at = Some(super::unix(SystemTime::now() + backoff));
                    });
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Zero when the served certificate is self-signed or has a third of
    /// its lifetime left or less; else the time until then.
    fn until_renewal(&self, live: &Live) -> Duration {
        let Some((not_before, not_after)) = live.lifetime() else { return Duration::ZERO };
        if self.status().state == STATE_SELF_SIGNED {
            return Duration::ZERO;
        }
        until_renewal(not_before, not_after, super::unix(SystemTime::now()))
    }

    /// One order: account, authorizations answered by HTTP-01, CSR,
    /// certificate; stored, then returned.
    async fn obtain(&self) -> anyhow::Result<(Arc<CertifiedKey>, CertInfo)> {
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
            let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| anyhow::anyhow!("the authority offers no HTTP-01 challenge (the only kind answered so far)"))?;
            self.challenges.put(challenge.token.clone(), challenge.key_authorization().as_str().to_string());
            challenge.set_ready().await.context("challenge ready")?;
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retries).await.context("waiting for the authorizations")?;
        if status != OrderStatus::Ready {
            anyhow::bail!("the order is {status:?}, not ready: the authority could not check http://<domain>/.well-known/acme-challenge/ on port 80 (OMNI_HTTP_PORT must be reachable as port 80 of each domain)");
        }
        let key_pem = order.finalize().await.context("finalize")?;
        let chain_pem = order.poll_certificate(&retries).await.context("downloading the certificate")?;
        self.store(&chain_pem, &key_pem).context("storing the certificate")?;
        super::load(&self.cert_files()).map_err(|e| anyhow::anyhow!("the certificate obtained does not load: {e}"))
    }

    /// The stored account for this directory, or a new one (then stored).
    async fn account(&self) -> anyhow::Result<Account> {
        use anyhow::Context;
        let path = self.settings.store.join("account.json");
        let builder = || match &self.settings.ca_file {
            Some(ca) => Account::builder_with_root(ca).with_context(|| format!("OMNI_ACME_CA_FILE={}: cannot use it as the CA of the ACME directory", ca.display())),
            None => Account::builder().context("the HTTPS client for the ACME directory"),
        };
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(stored) = serde_json::from_str::<StoredAccount>(&text) {
                if stored.directory == self.settings.directory {
                    return builder()?.from_credentials(stored.credentials).await.with_context(|| format!("the ACME directory {}", self.settings.directory));
                }
            }
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(&NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false }, self.settings.directory.clone(), None)
            .await
            .with_context(|| format!("creating an account at the ACME directory {}", self.settings.directory))?;
        let stored = StoredAccount { directory: self.settings.directory.clone(), credentials };
        write_private(&self.settings.store, &path, serde_json::to_string(&stored)?.as_bytes())?;
        Ok(account)
    }

    fn store(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let files = self.cert_files();
        write_private(&self.settings.store, &files.key, key_pem.as_bytes())?;
        write_private(&self.settings.store, &files.cert, chain_pem.as_bytes())?;
        write_private(&self.settings.store, &self.settings.store.join("domains"), self.settings.domains.join(",").as_bytes())
    }
}

/// How long until a certificate valid from `not_before` to `not_after`
/// (Unix seconds) has a third of its lifetime left, at `now`.
fn until_renewal(not_before: u64, not_after: u64, now: u64) -> Duration {
    let renew_at = not_after - not_after.saturating_sub(not_before) / 3;
    Duration::from_secs(renew_at.saturating_sub(now))
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
        assert_eq!((challenges.answer("t1").as_deref(), challenges.answer("t2")), (Some("t1.thumb"), None));
        challenges.clear();
        assert_eq!(challenges.answer("t1"), None);
    }

    #[test]
    fn renewal_comes_when_a_third_of_the_lifetime_is_left() {
        let day = 86_400;
        // 90 days: renewed from day 60 on.
        assert_eq!(until_renewal(0, 90 * day, 10 * day), Duration::from_secs(50 * day));
        assert_eq!(until_renewal(0, 90 * day, 60 * day), Duration::ZERO);
        assert_eq!(until_renewal(0, 90 * day, 100 * day), Duration::ZERO);
        // A six-day certificate: after four days.
        assert_eq!(until_renewal(day, 7 * day, day), Duration::from_secs(4 * day));
    }
}
