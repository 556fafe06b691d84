//! Certificates obtained by ACME (`OMNI_TLS_DOMAINS`) against Debian's
//! `pebble` test authority: a self-signed certificate at once, the error
//! in the status while the directory refuses connections, then pebble's
//! certificate served to new connections, and after a restart the stored
//! certificate served without a new order.
//!
//! Pebble runs on free ports, its HTTPS served with a certificate of a test
//! CA made here (`OMNI_ACME_CA_FILE`): first with `PEBBLE_VA_ALWAYS_VALID=1`
//! (its validation authority accepts every challenge without connecting),
//! then for real: `pebble-challtestsrv` as its DNS server resolves every
//! name to 127.0.0.1 and pebble fetches the HTTP-01 answer from the
//! gateway's plain port (`OMNI_HTTP_PORT`, pebble's `httpPort`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::gateway;

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::{bin_path, free_port, make_test_ca, wait_until, ChildGuard, TempPostgres, TEST_API_KEY};

const DOMAIN: &str = "omni-acme.example.com";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Pebble on free ports; its directory's HTTPS certificate signed by `ca.pem` of `dir`.
struct Pebble {
    child: ChildGuard,
    _dns: Option<ChildGuard>,
    directory: String,
    log: PathBuf,
}

impl Pebble {
    /// `http01`: validate for real, fetching challenges from this port
    /// (names resolved to 127.0.0.1); `None`: every challenge is valid.
    fn start(dir: &Path, http01: Option<u16>) -> Pebble {
        openssl(dir, &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "pebble.key", "-out", "pebble.csr", "-subj", "/CN=localhost"]);
        std::fs::write(dir.join("pebble.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(dir, &["x509", "-req", "-in", "pebble.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "7", "-days", "2", "-extfile", "pebble.ext", "-out", "pebble.pem"]);
        let port = free_port();
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{}", free_port()),
            "certificate": dir.join("pebble.pem"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": http01.unwrap_or_else(free_port),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let dns = http01.map(|_| {
            let (port, management) = (free_port(), free_port());
            let dns = ChildGuard::spawn(
                Command::new("pebble-challtestsrv")
                    .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", "", "-dns01"])
                    .arg(format!("127.0.0.1:{port}"))
                    .arg("-management")
                    .arg(format!("127.0.0.1:{management}"))
                    .stdin(Stdio::null())
                    .stdout(std::fs::File::create(dir.join("challtestsrv.log")).unwrap())
                    .stderr(Stdio::null()),
            );
            wait_until(Duration::from_secs(30), "pebble-challtestsrv", || std::net::TcpStream::connect(("127.0.0.1", management)).ok());
            (dns, port)
        });
        let mut command = Command::new("pebble");
        command.args(["-config", "pebble.json"]);
        match &dns {
            Some((_, port)) => command.arg("-dnsserver").arg(format!("127.0.0.1:{port}")),
            None => command.env("PEBBLE_VA_ALWAYS_VALID", "1"),
        };
        let child = ChildGuard::spawn(
            command
                .current_dir(dir)
                .env("PEBBLE_VA_NOSLEEP", "1")
                // No nonces refused at random: the outcome does not depend on luck.
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(dir.join("pebble.err")).unwrap()),
        );
        let directory = format!("https://127.0.0.1:{port}/dir");
        let ca = dir.join("ca.pem").display().to_string();
        wait_until(Duration::from_secs(30), "pebble's directory", || {
            let out = Command::new("curl").args(["-sS", "--cacert", &ca, "-o", "/dev/null", "-w", "%{http_code}", &directory]).output().unwrap();
            (String::from_utf8_lossy(&out.stdout) == "200").then_some(())
        });
        Pebble { child, _dns: dns.map(|(guard, _)| guard), directory, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default() + &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    /// Orders pebble has finalized (one log line each).
    fn finalized(&self) -> usize {
        self.log().lines().filter(|l| l.contains("Issued certificate")).count()
    }
}

/// A gateway for [`DOMAIN`] by ACME from `directory`, in `dir` (so its
/// data directory, and the stored certificate, outlive it).
fn gateway(dir: &Path, pg: &TempPostgres, directory: &str, http_port: u16) -> Gateway {
    let mut gw = GatewayBuilder::new(dir)
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("DATABASE_URL", pg.url())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_TLS_DOMAINS", DOMAIN)
        .env("OMNI_ACME_DIRECTORY", directory)
        .env("OMNI_ACME_EMAIL", "admin@example.com")
        .env("OMNI_ACME_CA_FILE", dir.join("ca.pem").display().to_string())
        .env("OMNI_HTTP_PORT", http_port.to_string())
        .spawn();
    let port = gw.port;
    wait_until(Duration::from_secs(60), "/health 200 over HTTPS", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway exited ({status}): {}", gw.log());
        }
        (curl(port, "/health").0 == 200).then_some(())
    });
    gw
}

/// `curl -k` over HTTPS (the certificate is checked by [`issuer`]): (status, body).
fn curl(port: u16, path: &str) -> (u16, String) {
    let resolve = format!("{DOMAIN}:{port}:127.0.0.1");
    let out = Command::new("curl").args(["-sS", "-k", "--resolve", &resolve, "-w", "\n%{http_code}", &format!("https://{DOMAIN}:{port}{path}")]).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_string())
}

fn tls_status(gw: &Gateway) -> serde_json::Value {
    let (code, body) = curl(gw.port, "/gateway/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["tls"].clone()
}

/// The issuer and subject alternative names of the certificate a new TLS connection gets.
fn served(port: u16) -> String {
    let script = format!("openssl s_client -connect 127.0.0.1:{port} -servername {DOMAIN} </dev/null 2>/dev/null | openssl x509 -noout -issuer -ext subjectAltName");
    let out = Command::new("sh").args(["-c", &script]).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn acme_serves_self_signed_then_pebbles_certificate_and_reuses_it_after_a_restart() {
    let dir = workdir();
    make_test_ca(dir.path(), "ca");
    let pg = TempPostgres::start_new();

    // A directory that refuses connections: the gateway serves, self-signed, and says why.
    let refused = format!("https://127.0.0.1:{}/dir", free_port());
    let mut gw = gateway(dir.path(), &pg, &refused, free_port());
    let cert = served(gw.port);
    assert!(cert.contains(&format!("DNS:{DOMAIN}")) && !cert.contains("Pebble"), "{cert}");
    let tls = wait_until(Duration::from_secs(60), "the ACME error in the status", || {
        let tls = tls_status(&gw);
        tls["last_error"].is_string().then_some(tls)
    });
    assert_eq!((tls["source"].as_str(), tls["state"].as_str()), (Some("acme"), Some("self-signed: waiting for the first certificate")), "{tls}");
    assert!(tls["last_error"].as_str().unwrap().contains(&refused), "{tls}");
    let (_, metrics) = curl(gw.port, "/metrics");
    assert!(metrics.contains("omni_tls_acme_last_error 1"), "{metrics}");
    gw.terminate();

    // Pebble: its certificate reaches new connections, the status says so.
    let pebble = Pebble::start(dir.path(), None);
    let mut gw = gateway(dir.path(), &pg, &pebble.directory, free_port());
    let cert = wait_until(Duration::from_secs(90), "a certificate issued by pebble", || {
        let cert = served(gw.port);
        cert.contains("Pebble").then_some(cert)
    });
    assert!(cert.contains(&format!("DNS:{DOMAIN}")), "{cert}");
    let tls = tls_status(&gw);
    assert_eq!(tls["source"], "acme", "{tls}");
    assert!(tls["state"].as_str().unwrap().starts_with("certificate obtained from"), "{tls}");
    assert!(tls["issuer"].as_str().unwrap().contains("Pebble"), "{tls}");
    assert_eq!((tls["acme"]["orders"].as_u64(), tls["last_error"].as_str()), (Some(1), None), "{tls}");
    let (_, metrics) = curl(gw.port, "/metrics");
    assert!(metrics.contains("omni_tls_acme_last_error 0") && metrics.contains("omni_tls_acme_orders_total 1"), "{metrics}");
    for name in ["cert.pem", "key.pem", "account.json"] {
        let mode = std::fs::metadata(dir.path().join("data/tls").join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    gw.terminate();
    let issued = pebble.finalized();
    assert_eq!(issued, 1, "{}", pebble.log());

    // A restart serves the stored certificate at once and orders nothing.
    let mut gw = gateway(dir.path(), &pg, &pebble.directory, free_port());
    assert!(served(gw.port).contains("Pebble"), "the stored certificate is not served first");
    let tls = tls_status(&gw);
    assert!(tls["state"].as_str().unwrap().contains("stored by an earlier run"), "{tls}");
    assert_eq!(tls["acme"]["orders"].as_u64(), Some(0), "{tls}");
    assert_eq!(pebble.finalized(), issued, "a new order after the restart: {}", pebble.log());
    gw.terminate();
    drop(pebble.child);
}

#[test]
fn acme_answers_pebbles_http01_check_on_the_plain_port() {
    let dir = workdir();
    make_test_ca(dir.path(), "ca");
    let pg = TempPostgres::start_new();
    let http_port = free_port();
    let pebble = Pebble::start(dir.path(), Some(http_port));
    let mut gw = gateway(dir.path(), &pg, &pebble.directory, http_port);
    let cert = wait_until(Duration::from_secs(90), "a certificate issued by pebble after a real HTTP-01 check", || {
        let tls = tls_status(&gw);
        assert!(tls["last_error"].is_null(), "{tls}\n{}\n{}", gw.log(), pebble.log());
        let cert = served(gw.port);
        cert.contains("Pebble").then_some(cert)
    });
    assert!(cert.contains(&format!("DNS:{DOMAIN}")), "{cert}");
    // Pebble fetched the answer from the plain port (its VA logs each check).
    let log = pebble.log();
    assert!(log.contains(&format!("Attempting to validate w/ HTTP: http://{DOMAIN}:{http_port}/.well-known/acme-challenge/")) && log.contains("set VALID by completed challenge"), "{log}");
    // The answered challenge is forgotten: the path is 404 again.
    let out = Command::new("curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:{http_port}/.well-known/acme-challenge/anything")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    gw.terminate();
}
