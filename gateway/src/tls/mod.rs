//! HTTPS at the gateway: the certificate, its checks, and its replacement
//! while serving.
//!
//! Layer: below `serve` (which terminates TLS with [`server_config`]) and
//! `app` (which reads `OMNI_TLS_CERT`/`OMNI_TLS_KEY` and starts
//! [`watch`]); it depends on nothing of ours.
//!
//! * **Checked at start, named.** [`load`] refuses a key readable by every
//!   account, a key that does not match the certificate, a certificate that
//!   has expired or is not yet valid, and files that hold no PEM of the
//!   right kind, each naming the variable and the file.
//! * **Replaced without a restart.** [`Live`] is rustls' certificate
//!   resolver: each new handshake takes the current certificate, and
//!   connections already open keep theirs. [`watch`] follows the files'
//!   directories (certbot and Kubernetes replace files by renaming, which a
//!   watch on the file itself would lose) and reloads after a quiet moment;
//!   a new pair that fails the checks is logged and the old one stays.
//! * ALPN offers `h2` then `http/1.1` (and `acme-tls/1`, whose handshakes
//!   get the TLS-ALPN-01 challenge certificate of [`Live::put_alpn_challenge`]).
//! * Each client's stream is rustls' unbuffered connection with buffers of
//!   its own, freed while the connection is idle ([`stream`]).
//! * Certificates obtained by ACME (`OMNI_TLS_DOMAINS`): [`acme`]; with an
//!   external database kept in it for every gateway on it ([`shared`]), the
//!   private keys sealed with `OMNI_TLS_SECRET_FILE` ([`seal`]).

pub mod acme;
pub mod seal;
pub mod settings;
pub mod shared;
pub mod stream;

use std::{
    path::{Path, PathBuf},
    sync::{mpsc, Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use x509_cert::der::Decode;

/// Where the certificate and its key are (`OMNI_TLS_CERT`, `OMNI_TLS_KEY`).
#[derive(Clone, Debug, PartialEq)]
pub struct CertFiles {
    /// PEM: the certificate, then its chain.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What a loaded certificate says about itself, for logs and the status.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CertInfo {
    /// The end-entity certificate's subject.
    pub subject: String,
    /// The issuer's name (the subject again when self-signed).
    pub issuer: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// Certificates in the file (the end entity and its chain).
    pub chain_length: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the pair.
pub fn load(files: &CertFiles) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let cert_var = format!("OMNI_TLS_CERT={}", files.cert.display());
    let key_var = format!("OMNI_TLS_KEY={}", files.key.display());
    let cert_pem = std::fs::read(&files.cert).map_err(|e| TlsError(format!("{cert_var}: cannot read it ({e})")))?;
    let key_pem = read_key(&files.key, &key_var)?;
    check_pair(&cert_pem, &key_pem, &cert_var, &key_var)
}

/// Checks a certificate chain and its key given as PEM; `cert_var` and
/// `key_var` name where each came from in the errors.
pub fn check_pair(cert_pem: &[u8], key_pem: &[u8], cert_var: &str, key_var: &str) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{cert_var}: not a PEM certificate file ({e})")))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError(format!("{cert_var}: no CERTIFICATE block in the file; it must hold the certificate, then its chain, in PEM")));
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        let hint = if CertificateDer::pem_slice_iter(key_pem).next().is_some() { " (it holds a certificate: are OMNI_TLS_CERT and OMNI_TLS_KEY swapped?)" } else { "" };
        TlsError(format!("{key_var}: no private key in the file{hint}; expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block"))
    })?;

    let parsed = x509_cert::Certificate::from_der(leaf).map_err(|e| TlsError(format!("{cert_var}: the first certificate cannot be parsed ({e})")))?;
    let tbs = &parsed.tbs_certificate;
    let subject = tbs.subject.to_string();
    if tbs.version != x509_cert::Version::V3 {
        return Err(TlsError(format!("{cert_var}: the certificate for {subject} is an X.509 {:?} certificate, without the extensions (subject alternative names) browsers and TLS libraries require; issue a version 3 certificate", tbs.version)));
    }
    let not_before = tbs.validity.not_before.to_system_time();
    let not_after = tbs.validity.not_after.to_system_time();
    let now = SystemTime::now();
    if not_after <= now {
        return Err(TlsError(format!("{cert_var}: the certificate for {subject} expired on {}; renew it", utc(not_after))));
    }
    if not_before > now + Duration::from_secs(300) {
        return Err(TlsError(format!("{cert_var}: the certificate for {subject} is not valid before {} (is this machine's clock right?)", utc(not_before))));
    }

    let certified = CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError(format!("{key_var} does not match the certificate of {cert_var} ({subject}): give the key the certificate was issued for")),
        other => TlsError(format!("{key_var}: the key cannot be used ({other})")),
    })?;
    let info = CertInfo { subject, issuer: tbs.issuer.to_string(), not_before: unix(not_before), not_after: unix(not_after), chain_length: chain.len() };
    Ok((Arc::new(certified), info))
}

/// The key file's content, refused when every account may read it.
fn read_key(path: &Path, var: &str) -> Result<Vec<u8>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| TlsError(format!("{var}: cannot read it ({e})")))?;
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(TlsError(format!("{var}: the private key is readable by every account on this machine (mode {:o}); chmod 600 it (or 640 with a group that needs it)", mode & 0o777)));
    }
    std::fs::read(path).map_err(|e| TlsError(format!("{var}: cannot read it ({e})")))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn utc(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The certificate new handshakes get; replaced by [`Live::replace`].
#[derive(Debug)]
pub struct Live {
    current: RwLock<(Arc<CertifiedKey>, CertInfo)>,
    /// Reloads tried since start, and why the last one was refused (cleared
    /// by a reload taken): for the status, and for waiting on in tests.
    reloads: std::sync::atomic::AtomicU64,
    last_error: RwLock<Option<String>>,
    /// TLS-ALPN-01 challenge certificates by domain, served only to a
    /// handshake that offers ALPN `acme-tls/1` (the authority's check).
    alpn_challenges: RwLock<std::collections::HashMap<String, Arc<CertifiedKey>>>,
}

/// The ALPN protocol of ACME's TLS-ALPN-01 check (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

impl Live {
    pub fn new(key: Arc<CertifiedKey>, info: CertInfo) -> Arc<Live> {
        Arc::new(Live { current: RwLock::new((key, info)), reloads: Default::default(), last_error: RwLock::new(None), alpn_challenges: Default::default() })
    }

    /// Serves `key` to the authority's TLS-ALPN-01 check of `domain`.
    pub fn put_alpn_challenge(&self, domain: &str, key: Arc<CertifiedKey>) {
        self.alpn_challenges.write().unwrap_or_else(|e| e.into_inner()).insert(domain.to_ascii_lowercase(), key);
    }

    pub fn clear_alpn_challenges(&self) {
        self.alpn_challenges.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn replace(&self, key: Arc<CertifiedKey>, info: CertInfo) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (key, info);
    }

    /// Reloads tried, and the last refusal (None after a reload was taken).
    pub fn reloads(&self) -> (u64, Option<String>) {
        (self.reloads.load(std::sync::atomic::Ordering::SeqCst), self.last_error.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn reloaded(&self, outcome: Result<(Arc<CertifiedKey>, CertInfo), TlsError>, cert: &Path) {
        match outcome {
            Ok((key, info)) => {
                tracing::info!(subject = %info.subject, expires = %utc(SystemTime::UNIX_EPOCH + Duration::from_secs(info.not_after)), "TLS certificate reloaded from {}: new connections get it", cert.display());
                self.replace(key, info);
                *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Err(e) => {
                tracing::warn!("TLS certificate files changed but were not taken, the previous certificate is still served: {e}");
                *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
        self.reloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The served certificate's validity (Unix seconds), `None` if unknown.
    pub fn lifetime(&self) -> Option<(u64, u64)> {
        let info = self.info();
        (info.not_after > 0).then_some((info.not_before, info.not_after))
    }

    pub fn info(&self) -> CertInfo {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// The served end-entity certificate (DER): tells two certificates apart.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).0.cert.first().cloned()
    }
}

impl ResolvesServerCert for Live {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // RFC 8737: a handshake offering acme-tls/1 gets the challenge
        // certificate for its server name, or no certificate at all.
        if hello.alpn().is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN)) {
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.alpn_challenges.read().unwrap_or_else(|e| e.into_inner()).get(&name).cloned();
        }
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone())
    }
}

/// rustls' server side: the certificate from `live`, ALPN `h2` then
/// `http/1.1`; `acme-tls/1` last, chosen only by a client offering nothing
/// else (an authority's TLS-ALPN-01 check, which closes after the handshake).
pub fn server_config(live: Arc<Live>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(live);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Arc::new(config)
}

/// How long the files must be quiet before they are read again: a renewal
/// writes the certificate and the key one after the other.
const SETTLE: Duration = Duration::from_millis(300);

/// Reloads `files` into `live` whenever either changes, until the returned
/// watcher is dropped. Each outcome is logged; a failed reload keeps the
/// certificate being served.
pub fn watch(files: CertFiles, live: Arc<Live>) -> Result<notify::RecommendedWatcher, TlsError> {
    use notify::{RecursiveMode, Watcher};
    let (tx, rx) = mpsc::channel::<()>();
    let names: Vec<PathBuf> = [&files.cert, &files.key].iter().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())).collect();
    let wanted = names.clone();
    let plain: Vec<PathBuf> = vec![files.cert.clone(), files.key.clone()];
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // A rename into place, a write, a symlink switched (certbot's live/ links, Kubernetes' ..data).
        let touches = event.paths.iter().any(|p| {
            wanted.iter().chain(plain.iter()).any(|w| w == p || w.file_name() == p.file_name() || p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..")))
        });
        if touches {
            let _ = tx.send(());
        }
    })
    .map_err(|e| TlsError(format!("cannot watch the certificate files: {e}")))?;
    let mut dirs: Vec<PathBuf> = names.iter().chain([&files.cert, &files.key]).filter_map(|p| p.parent().map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| TlsError(format!("cannot watch {}: {e}", dir.display())))?;
    }
    std::thread::Builder::new()
        .name("tls-reload".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Let a renewal finish writing both files.
                while rx.recv_timeout(SETTLE).is_ok() {}
                live.reloaded(load(&files), &files.cert);
            }
        })
        .map_err(|e| TlsError(format!("cannot start the certificate reloader: {e}")))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scratch;
    use std::{os::unix::fs::PermissionsExt, process::Command, time::Instant};


    fn openssl(args: &[&str], dir: &Path) {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (.ci/run installs it)");
        assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }

    /// A self-signed P-256 certificate for `cn` valid `days` (negative: expired), key mode 600.
    fn pair(dir: &Path, name: &str, cn: &str, days: i32) -> CertFiles {
        let (key, csr, cert, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{cn}\n")).unwrap();
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key], dir);
        openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={cn}"), "-out", &csr], dir);
        openssl(&["x509", "-req", "-in", &csr, "-signkey", &key, "-days", &days.to_string(), "-extfile", &ext, "-out", &cert], dir);
        std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
        CertFiles { cert: dir.join(cert), key: dir.join(key) }
    }

    #[test]
    fn a_good_pair_loads_and_bad_ones_are_refused_naming_the_variable() {
        let dir = Scratch::new("load");
        let good = pair(&dir.0, "good", "omni.example", 30);
        let (_, info) = load(&good).unwrap();
        assert_eq!((info.subject.as_str(), info.chain_length), ("CN=omni.example", 1));
        let days_left = (info.not_after - unix(SystemTime::now())) / 86_400;
        assert!((28..=30).contains(&days_left), "{days_left}");

        let v1 = dir.0.join("v1.pem");
        openssl(&["x509", "-req", "-in", "good.csr", "-signkey", "good.key", "-days", "30", "-out", "v1.pem"], &dir.0);
        let err = load(&CertFiles { cert: v1, key: good.key.clone() }).unwrap_err().to_string();
        assert!(err.contains("OMNI_TLS_CERT") && err.contains("version 3"), "{err}");

        let other = pair(&dir.0, "other", "other.example", 30);
        let err = load(&CertFiles { cert: good.cert.clone(), key: other.key.clone() }).unwrap_err().to_string();
        assert!(err.contains("OMNI_TLS_KEY") && err.contains("does not match") && err.contains("omni.example"), "{err}");

        let expired = pair(&dir.0, "expired", "old.example", -1);
        let err = load(&expired).unwrap_err().to_string();
        assert!(err.contains("OMNI_TLS_CERT") && err.contains("expired"), "{err}");

        std::fs::set_permissions(&good.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&good).unwrap_err().to_string();
        assert!(err.contains("OMNI_TLS_KEY") && err.contains("every account") && err.contains("644"), "{err}");
        std::fs::set_permissions(&good.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        load(&good).unwrap();

        let err = load(&CertFiles { cert: good.key.clone(), key: good.key.clone() }).unwrap_err().to_string();
        assert!(err.contains("OMNI_TLS_CERT") && err.contains("no CERTIFICATE"), "{err}");
        let swapped = dir.0.join("swapped.pem");
        std::fs::copy(&good.cert, &swapped).unwrap();
        std::fs::set_permissions(&swapped, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(&CertFiles { cert: good.cert.clone(), key: swapped }).unwrap_err().to_string();
        assert!(err.contains("swapped"), "{err}");
        let err = load(&CertFiles { cert: dir.0.join("absent.pem"), key: good.key.clone() }).unwrap_err().to_string();
        assert!(err.contains("OMNI_TLS_CERT") && err.contains("absent.pem"), "{err}");
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn replaced_files_are_served_to_new_handshakes_and_a_bad_replacement_keeps_the_old() {
        let dir = Scratch::new("watch");
        let files = pair(&dir.0, "live", "first.example", 30);
        let (key, info) = load(&files).unwrap();
        let live = Live::new(key, info);
        let _watcher = watch(files.clone(), live.clone()).unwrap();

        // Replaced the way certbot and most tools do it: new files renamed into place.
        let next = pair(&dir.0, "next", "second.example", 30);
        std::fs::rename(&next.key, &files.key).unwrap();
        std::fs::rename(&next.cert, &files.cert).unwrap();
        wait_for("the second certificate", || live.info().subject == "CN=second.example");

        // A key that does not match the certificate: refused, the second stays.
        let stray = pair(&dir.0, "stray", "stray.example", 30);
        std::fs::rename(&stray.key, &files.key).unwrap();
        // The reloader ran (its verdict is the log); then a good pair again is taken.
        let third = pair(&dir.0, "third", "third.example", 30);
        std::fs::copy(&stray.cert, &files.cert).unwrap();
        wait_for("the stray pair", || live.info().subject == "CN=stray.example");
        let tried = live.reloads().0;
        std::fs::write(&files.cert, b"not a certificate").unwrap();
        wait_for("the broken file's reload", || live.reloads().0 > tried && live.reloads().1.is_some());
        assert_eq!(live.info().subject, "CN=stray.example", "a broken file replaced the served certificate");
        assert!(live.reloads().1.unwrap().contains("OMNI_TLS_CERT"));
        std::fs::rename(&third.key, &files.key).unwrap();
        std::fs::rename(&third.cert, &files.cert).unwrap();
        wait_for("the third certificate", || live.info().subject == "CN=third.example");
    }

    #[test]
    fn the_server_config_offers_h2_then_http1() {
        let dir = Scratch::new("alpn");
        let (key, info) = load(&pair(&dir.0, "a", "localhost", 1)).unwrap();
        let config = server_config(Live::new(key, info));
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"acme-tls/1".to_vec()]);
    }
}
