//! HTTPS settings, parsed by the tls layer from the configuration's layers:
//! `OMNI_TLS_CERT`, `OMNI_TLS_KEY`, `OMNI_HTTP_PORT`, `OMNI_HSTS_MAX_AGE`,
//! and for certificates obtained by ACME `OMNI_TLS_DOMAINS`,
//! `OMNI_ACME_DIRECTORY`, `OMNI_ACME_EMAIL`, `OMNI_ACME_CA_FILE`,
//! `OMNI_ACME_CHALLENGE`, and with an
//! external `DATABASE_URL` `OMNI_TLS_SECRET_FILE` (the store is shared then).

use std::path::PathBuf;

use crate::config::{Config, ConfigError};

use super::CertFiles;

/// Where the certificate comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// `OMNI_TLS_CERT` and `OMNI_TLS_KEY`, watched.
    Files(CertFiles),
    /// `OMNI_TLS_DOMAINS`: obtained by ACME.
    Acme(AcmeSettings),
}

/// The ACME client's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AcmeSettings {
    /// `OMNI_TLS_DOMAINS`, lower-cased, in order, without duplicates.
    pub domains: Vec<String>,
    /// `OMNI_ACME_DIRECTORY`.
    pub directory: String,
    /// `OMNI_ACME_EMAIL`.
    pub email: Option<String>,
    /// `OMNI_ACME_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// `OMNI_ACME_CHALLENGE`: how control of the domains is proven.
    pub challenge: Challenge,
    /// `OMNI_DATA_DIR/tls`: the account, the certificate and its key
    /// (with the embedded database).
    pub store: PathBuf,
    /// With an external `DATABASE_URL`: the store is there instead, shared
    /// by every gateway on that database.
    pub shared: Option<SharedSettings>,
}

/// The ACME challenge answered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Challenge {
    /// `http-01`: on the plain port (`OMNI_HTTP_PORT`), by any gateway of a shared store.
    Http01,
    /// `tls-alpn-01`: on the HTTPS port (ALPN `acme-tls/1`), by the gateway that ordered.
    TlsAlpn01,
}

/// Where several gateways keep one certificate (tls/shared.rs).
#[derive(Clone, PartialEq)]
pub struct SharedSettings {
    /// `DATABASE_URL` (external).
    pub database_url: String,
    /// `OMNI_TLS_SECRET_FILE`: what the private keys are sealed with.
    pub secret_file: PathBuf,
}

impl std::fmt::Debug for SharedSettings {
    // The URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSettings").field("secret_file", &self.secret_file).finish_non_exhaustive()
    }
}

/// HTTPS on the gateway's port, when `OMNI_TLS_CERT` and `OMNI_TLS_KEY`
/// (or `OMNI_TLS_DOMAINS`) are set.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpsSettings {
    pub source: Source,
    /// `OMNI_HTTP_PORT`: the plain port that redirects to HTTPS (and will
    /// answer ACME's HTTP-01 challenges); `None` with `off`.
    pub http_port: Option<u16>,
    /// `OMNI_HSTS_MAX_AGE` in seconds; 0 sends no `Strict-Transport-Security`.
    pub hsts_max_age: u64,
}

/// The plain port when HTTPS is on and `OMNI_HTTP_PORT` is empty.
pub const DEFAULT_HTTP_PORT: u16 = 80;

impl HttpsSettings {
    /// `None` when neither file is named (the port speaks plain HTTP).
    pub fn parse(config: &Config) -> Result<Option<HttpsSettings>, ConfigError> {
        let p = config.parser();
        let cert = p.optional_path("OMNI_TLS_CERT");
        let key = p.optional_path("OMNI_TLS_KEY");
        let hsts_max_age: u64 = p.number("OMNI_HSTS_MAX_AGE", "a whole number of seconds (0 turns HSTS off)")?;
        let http_port = match p.string("OMNI_HTTP_PORT") {
            None => DEFAULT_HTTP_PORT,
            Some(v) if v.eq_ignore_ascii_case("off") => 0,
            Some(_) => p.port("OMNI_HTTP_PORT", false).map_err(|_| p.invalid("OMNI_HTTP_PORT", "expected a port number from 1 to 65535, or off (no plain port)"))?.value,
        };
        let domains = p.string("OMNI_TLS_DOMAINS");
        if domains.is_some() && (cert.is_some() || key.is_some()) {
            return Err(p.invalid("OMNI_TLS_DOMAINS", "OMNI_TLS_CERT/OMNI_TLS_KEY are set too: a certificate comes either from files (OMNI_TLS_CERT and OMNI_TLS_KEY) or from ACME (OMNI_TLS_DOMAINS); unset one of them"));
        }
        let source = match (cert, key) {
            (None, None) => match domains {
                None => return Ok(None),
                Some(list) => Source::Acme(AcmeSettings::parse(config, &list)?),
            },
            (Some(cert), Some(key)) => Source::Files(CertFiles { cert, key }),
            (Some(_), None) => return Err(p.invalid("OMNI_TLS_KEY", "OMNI_TLS_CERT is set but OMNI_TLS_KEY is not: HTTPS needs both, the certificate (PEM, chain included) and its private key")),
            (None, Some(_)) => return Err(p.invalid("OMNI_TLS_CERT", "OMNI_TLS_KEY is set but OMNI_TLS_CERT is not: HTTPS needs both, the certificate (PEM, chain included) and its private key")),
        };
        if http_port != 0 && http_port == config.port {
            return Err(p.invalid("OMNI_HTTP_PORT", format!("it is OMNI_PORT too ({}), which serves HTTPS; pick another port for plain HTTP, or off", config.port)));
        }
        if http_port == 0 && matches!(&source, Source::Acme(acme) if acme.challenge == Challenge::Http01) {
            return Err(p.invalid("OMNI_HTTP_PORT", "OMNI_TLS_DOMAINS obtains certificates with the HTTP-01 challenge, which the certificate authority checks on the plain port: give OMNI_HTTP_PORT a port (reachable as port 80 of each domain), or use OMNI_TLS_CERT and OMNI_TLS_KEY"));
        }
        Ok(Some(HttpsSettings { source, http_port: (http_port != 0).then_some(http_port), hsts_max_age }))
    }
}

impl AcmeSettings {
    fn parse(config: &Config, list: &str) -> Result<AcmeSettings, ConfigError> {
        let p = config.parser();
        let mut domains: Vec<String> = Vec::new();
        for name in list.split(',').map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()).filter(|d| !d.is_empty()) {
            let valid = name.len() <= 253
                && name.split('.').count() >= 2
                && name.split('.').all(|label| !label.is_empty() && label.len() <= 63 && !label.starts_with('-') && !label.ends_with('-') && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                && name.parse::<std::net::IpAddr>().is_err();
            if !valid {
                return Err(p.invalid("OMNI_TLS_DOMAINS", format!("{name:?} is not a domain name an ACME certificate authority issues for (letters, digits and hyphens in dot-separated labels, such as omni.example.com; no IP addresses, no wildcards: HTTP-01 cannot prove them)")));
            }
            if !domains.contains(&name) {
                domains.push(name);
            }
        }
        if domains.is_empty() {
            return Err(p.invalid("OMNI_TLS_DOMAINS", "no domain name in the list; expected comma-separated names such as omni.example.com,www.omni.example.com"));
        }
        let directory = p.string("OMNI_ACME_DIRECTORY").unwrap_or_default();
        if !(directory.starts_with("https://") || directory.starts_with("http://")) || directory.parse::<hyper::Uri>().is_err() {
            return Err(p.invalid("OMNI_ACME_DIRECTORY", "expected the URL of an ACME directory, such as https://acme-v02.api.letsencrypt.org/directory"));
        }
        let email = p.string("OMNI_ACME_EMAIL");
        if let Some(email) = &email {
            if !email.contains('@') || email.contains(char::is_whitespace) || email.starts_with("mailto:") {
                return Err(p.invalid("OMNI_ACME_EMAIL", "expected an e-mail address such as admin@example.com (without mailto:), or nothing"));
            }
        }
        let ca_file = p.optional_path("OMNI_ACME_CA_FILE");
        let challenge = match p.string("OMNI_ACME_CHALLENGE").map(|c| c.to_ascii_lowercase()).as_deref() {
            None | Some("http-01") => Challenge::Http01,
            Some("tls-alpn-01") => Challenge::TlsAlpn01,
            Some(_) => return Err(p.invalid("OMNI_ACME_CHALLENGE", "expected http-01 (answered on OMNI_HTTP_PORT, reachable as port 80) or tls-alpn-01 (answered on OMNI_PORT, reachable as port 443)")),
        };
        // Several gateways can share a database only when it is external;
        // the embedded one is this gateway's own, and files serve it.
        let shared = match &config.database {
            crate::config::Database::External { url } => match p.optional_path("OMNI_TLS_SECRET_FILE") {
                Some(secret_file) => Some(SharedSettings { database_url: url.clone(), secret_file }),
                None => {
                    return Err(p.invalid(
                        "OMNI_TLS_SECRET_FILE",
                        "OMNI_TLS_DOMAINS with an external DATABASE_URL keeps the certificate and its private key in that database, shared by every gateway on it, sealed with a secret only the gateways hold: name a file of at least 32 random bytes, the same on every gateway (head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)",
                    ))
                }
            },
            crate::config::Database::Embedded(_) => None,
        };
        Ok(AcmeSettings { domains, directory, email, ca_file, challenge, store: p.path("OMNI_DATA_DIR").value.join("tls"), shared })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layers;
    use std::path::Path;

    fn parse(pairs: &[(&str, &str)]) -> Result<Option<HttpsSettings>, String> {
        let mut layers = Layers::default();
        for (k, v) in pairs {
            layers.environment.insert(k.to_string(), v.to_string());
        }
        layers.environment.insert("OMNI_SETTINGS_FILE".into(), "/nonexistent/omni-settings.json".into());
        let config = Config::parse(layers, Path::new("/srv")).map_err(|e| e.to_string())?;
        HttpsSettings::parse(&config).map_err(|e| e.to_string())
    }

    #[test]
    fn https_settings_need_both_files_and_name_what_is_wrong() {
        assert_eq!(parse(&[]).unwrap(), None);
        let on = parse(&[("OMNI_TLS_CERT", "tls/cert.pem"), ("OMNI_TLS_KEY", "/etc/key.pem")]).unwrap().unwrap();
        assert_eq!(on.source, Source::Files(CertFiles { cert: "/srv/tls/cert.pem".into(), key: "/etc/key.pem".into() }));
        assert_eq!((on.http_port, on.hsts_max_age), (Some(80), 31_536_000));
        let off = parse(&[("OMNI_TLS_CERT", "c"), ("OMNI_TLS_KEY", "k"), ("OMNI_HTTP_PORT", "off"), ("OMNI_HSTS_MAX_AGE", "0")]).unwrap().unwrap();
        assert_eq!((off.http_port, off.hsts_max_age), (None, 0));

        let err = parse(&[("OMNI_TLS_CERT", "c")]).unwrap_err();
        assert!(err.contains("OMNI_TLS_KEY") && err.contains("needs both"), "{err}");
        let err = parse(&[("OMNI_TLS_KEY", "k")]).unwrap_err();
        assert!(err.starts_with("OMNI_TLS_CERT"), "{err}");
        let err = parse(&[("OMNI_TLS_CERT", "c"), ("OMNI_TLS_KEY", "k"), ("OMNI_HTTP_PORT", "eighty")]).unwrap_err();
        assert!(err.contains("OMNI_HTTP_PORT") && err.contains("or off"), "{err}");
        let err = parse(&[("OMNI_TLS_CERT", "c"), ("OMNI_TLS_KEY", "k"), ("OMNI_PORT", "8443"), ("OMNI_HTTP_PORT", "8443")]).unwrap_err();
        assert!(err.contains("OMNI_HTTP_PORT") && err.contains("OMNI_PORT"), "{err}");
        let err = parse(&[("OMNI_HSTS_MAX_AGE", "a year")]).unwrap_err();
        assert!(err.contains("OMNI_HSTS_MAX_AGE"), "{err}");
    }

    #[test]
    fn acme_settings_take_domains_and_refuse_files_beside_them() {
        let on = parse(&[("OMNI_TLS_DOMAINS", " Omni.Example.com, www.omni.example.com,omni.example.com ")]).unwrap().unwrap();
        let Source::Acme(acme) = on.source else { panic!("not ACME: {on:?}") };
        assert_eq!(acme.domains, ["omni.example.com", "www.omni.example.com"]);
        assert_eq!(acme.directory, "https://acme-v02.api.letsencrypt.org/directory");
        assert_eq!((acme.email, acme.ca_file, acme.shared), (None, None, None));
        assert!(acme.store.ends_with("tls"), "{:?}", acme.store);
        assert_eq!(on.http_port, Some(80));

        let err = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("OMNI_TLS_CERT", "c"), ("OMNI_TLS_KEY", "k")]).unwrap_err();
        assert!(err.contains("OMNI_TLS_DOMAINS") && err.contains("OMNI_TLS_CERT"), "{err}");
        for bad in ["*.example.com", "127.0.0.1", "localhost", "a b.example"] {
            let err = parse(&[("OMNI_TLS_DOMAINS", bad)]).unwrap_err();
            assert!(err.starts_with("OMNI_TLS_DOMAINS"), "{bad}: {err}");
        }
        let err = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("OMNI_ACME_DIRECTORY", "letsencrypt")]).unwrap_err();
        assert!(err.starts_with("OMNI_ACME_DIRECTORY"), "{err}");
        let err = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("OMNI_HTTP_PORT", "off")]).unwrap_err();
        assert!(err.starts_with("OMNI_HTTP_PORT") && err.contains("HTTP-01"), "{err}");
        let err = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("OMNI_ACME_EMAIL", "admin")]).unwrap_err();
        assert!(err.starts_with("OMNI_ACME_EMAIL"), "{err}");
        let err = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("OMNI_ACME_CHALLENGE", "dns-01")]).unwrap_err();
        assert!(err.starts_with("OMNI_ACME_CHALLENGE") && err.contains("tls-alpn-01"), "{err}");
        // TLS-ALPN-01 needs no plain port.
        let on = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("OMNI_ACME_CHALLENGE", "TLS-ALPN-01"), ("OMNI_HTTP_PORT", "off")]).unwrap().unwrap();
        let Source::Acme(acme) = on.source else { panic!("not ACME: {on:?}") };
        assert_eq!((acme.challenge, on.http_port), (Challenge::TlsAlpn01, None));
    }

    #[test]
    fn acme_with_an_external_database_shares_the_store_and_needs_the_secret() {
        let url = "postgres://omni@db.example:5432/omni";
        let err = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("DATABASE_URL", url)]).unwrap_err();
        assert!(err.starts_with("OMNI_TLS_SECRET_FILE") && err.contains("same on every gateway"), "{err}");
        let on = parse(&[("OMNI_TLS_DOMAINS", "omni.example.com"), ("DATABASE_URL", url), ("OMNI_TLS_SECRET_FILE", "/etc/omni/tls-secret")]).unwrap().unwrap();
        let Source::Acme(acme) = on.source else { panic!("not ACME: {on:?}") };
        assert_eq!(acme.shared, Some(SharedSettings { database_url: url.into(), secret_file: "/etc/omni/tls-secret".into() }));
    }
}
