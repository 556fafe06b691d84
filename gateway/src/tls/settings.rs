//! HTTPS settings, parsed by the tls layer from the configuration's layers:
//! `OMNI_TLS_CERT`, `OMNI_TLS_KEY`, `OMNI_HTTP_PORT`, `OMNI_HSTS_MAX_AGE`.

use crate::config::{Config, ConfigError};

use super::CertFiles;

/// HTTPS on the gateway's port, when `OMNI_TLS_CERT` and `OMNI_TLS_KEY` are set.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpsSettings {
    pub files: CertFiles,
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
        let files = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => CertFiles { cert, key },
            (Some(_), None) => return Err(p.invalid("OMNI_TLS_KEY", "OMNI_TLS_CERT is set but OMNI_TLS_KEY is not: HTTPS needs both, the certificate (PEM, chain included) and its private key")),
            (None, Some(_)) => return Err(p.invalid("OMNI_TLS_CERT", "OMNI_TLS_KEY is set but OMNI_TLS_CERT is not: HTTPS needs both, the certificate (PEM, chain included) and its private key")),
        };
        if http_port != 0 && http_port == config.port {
            return Err(p.invalid("OMNI_HTTP_PORT", format!("it is OMNI_PORT too ({}), which serves HTTPS; pick another port for plain HTTP, or off", config.port)));
        }
        Ok(Some(HttpsSettings { files, http_port: (http_port != 0).then_some(http_port), hsts_max_age }))
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
        assert_eq!(on.files.cert, Path::new("/srv/tls/cert.pem"));
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
}
