//! TLS to the replication target, with libpq's `sslmode` meanings, so a
//! `PGSERVE_REPLICATION_URL` that works with `psql` works here:
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `allow`, `prefer` (the default, as in libpq) | when the server offers it | no |
//! | `require` | yes | no (libpq: chain checked when `sslrootcert` is given — so here) |
//! | `verify-ca` | yes | chain, against `sslrootcert` (else the system's trust store) |
//! | `verify-full` | yes | chain and host name |
//!
//! `sslrootcert=system` names the system's trust store (as in PostgreSQL 16's
//! libpq). The relay's own connections use rustls (`tokio-postgres-rustls`,
//! with ring; no C TLS library to install), `pg_dump`/`pg_restore` for the
//! initial copy get the same settings as `PGSSLMODE`/`PGSSLROOTCERT`.
//! tokio-postgres itself knows only `disable`/`prefer`/`require`, so these
//! parameters are taken out of the URL before it is parsed.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// The URL's TLS parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTls {
    /// `sslmode` as written (for `PGSSLMODE`), `prefer` when absent.
    pub mode: String,
    pub verify: Verify,
    /// `sslrootcert`: a PEM file; `None` = the system's trust store.
    pub root_cert: Option<PathBuf>,
}

impl TargetTls {
    fn ssl_mode(&self) -> SslMode {
        match self.mode.as_str() {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// `PGSSLMODE`/`PGSSLROOTCERT` for libpq's tools.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PGSSLMODE", self.mode.clone())];
        match &self.root_cert {
            Some(path) => env.push(("PGSSLROOTCERT", path.display().to_string())),
            None if self.verify != Verify::Nothing => env.push(("PGSSLROOTCERT", "system".into())),
            None => {}
        }
        env
    }
}

/// Splits `sslmode` and `sslrootcert` off the URL's query: the URL left
/// for tokio-postgres, and what they ask for.
pub fn split_url(url: &str) -> Result<(String, TargetTls), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut mode: Option<String> = None;
    let mut root_cert: Option<String> = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = percent_encoding::percent_decode_str(value).decode_utf8().map_err(|_| format!("the URL's {key} is not UTF-8"))?.into_owned();
        match key {
            "sslmode" => mode = Some(decoded),
            "sslrootcert" => root_cert = Some(decoded),
            _ => rest.push(pair),
        }
    }
    let mode = mode.unwrap_or_else(|| "prefer".into());
    let system = root_cert.as_deref() == Some("system");
    let verify = match mode.as_str() {
        "disable" | "allow" | "prefer" => Verify::Nothing,
        "require" if root_cert.is_some() && !system => Verify::Chain,
        "require" => Verify::Nothing,
        "verify-ca" => Verify::Chain,
        "verify-full" => Verify::ChainAndName,
        other => return Err(format!("sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full")),
    };
    let root_cert = root_cert.filter(|_| !system).map(PathBuf::from);
    if let Some(path) = &root_cert {
        if !path.is_absolute() {
            return Err(format!("sslrootcert={} must be an absolute path", path.display()));
        }
    }
    let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    Ok((url, TargetTls { mode, verify, root_cert }))
}

/// Applies the TLS mode to a parsed target configuration.
pub fn configure(config: &mut tokio_postgres::Config, tls: &TargetTls) {
    config.ssl_mode(tls.ssl_mode());
}

/// A connection to the target with the URL's TLS settings.
pub async fn connect(config: &tokio_postgres::Config, tls: &TargetTls) -> Result<tokio_postgres::Client> {
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(tls)?);
    let (client, connection) = config.connect(connector).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn client_config(tls: &TargetTls) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().context("TLS protocol versions")?;
    let config = match tls.verify {
        Verify::Nothing => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
        verify => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(tls)?), provider).build().context("the TLS certificate verifier")?;
            if verify == Verify::Chain {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            } else {
                builder.with_webpki_verifier(webpki)
            }
        }
    };
    Ok(config.with_no_client_auth())
}

/// The certificates the server's chain must lead to.
fn roots(tls: &TargetTls) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match &tls.root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading sslrootcert {}", path.display()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            anyhow::ensure!(added > 0, "sslrootcert {} holds no usable certificate", path.display());
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            anyhow::ensure!(added > 0, "sslmode={} checks the server's certificate, and the system has no trusted certificates: give sslrootcert=/path/to/ca.pem", tls.mode);
        }
    }
    Ok(store)
}

/// `prefer`/`require`: encrypted, the certificate not checked (libpq's
/// meaning); the handshake's signatures still are.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_mean_what_they_mean_to_libpq() {
        let (url, tls) = split_url("postgres://u:p@h/db").unwrap();
        assert_eq!((url.as_str(), tls.mode.as_str(), tls.verify), ("postgres://u:p@h/db", "prefer", Verify::Nothing));
        let (url, tls) = split_url("postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem").unwrap();
        assert_eq!(url, "postgres://u@h/db?application_name=x");
        assert_eq!((tls.verify, tls.root_cert.as_deref()), (Verify::ChainAndName, Some(std::path::Path::new("/etc/ca.pem"))));
        assert_eq!(tls.libpq_env(), vec![("PGSSLMODE", "verify-full".to_string()), ("PGSSLROOTCERT", "/etc/ca.pem".to_string())]);
        assert_eq!(split_url("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem").unwrap().1.verify, Verify::Chain, "libpq: require with a root certificate checks the chain");
        assert_eq!(split_url("postgres://u@h/db?sslmode=require").unwrap().1.verify, Verify::Nothing);
        let system = split_url("postgres://u@h/db?sslmode=verify-ca&sslrootcert=system").unwrap().1;
        assert_eq!((system.verify, system.root_cert), (Verify::Chain, None));
        assert!(split_url("postgres://u@h/db?sslmode=sometimes").unwrap_err().contains("verify-full"));
        assert!(split_url("postgres://u@h/db?sslmode=verify-ca&sslrootcert=ca.pem").unwrap_err().contains("absolute"));
    }
}
