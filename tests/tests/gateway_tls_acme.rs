//! Certificates obtained by ACME (`OMNI_TLS_DOMAINS`) against Debian's
//! `pebble` test authority: a self-signed certificate at once, the error
//! in the status while the directory refuses connections, then pebble's
//! certificate served to new connections, and after a restart the stored
//! certificate served without a new order. The gateways here use an
//! external database, so the certificate is kept there, its key sealed
//! (`OMNI_TLS_SECRET_FILE`): two gateways on one database serve one
//! certificate that one of them ordered, answer each other's HTTP-01
//! checks, and both get the renewed one (pebble's `certificateValidityPeriod`
//! makes certificates short-lived; this pebble, 2.4, has neither profiles
//! nor renewal information, so the third-of-the-lifetime rule renews).
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

/// How pebble is run.
struct PebbleOptions {
    /// Its directory's port (chosen before it runs, so a gateway can be
    /// pointed at it while it is still down).
    port: u16,
    /// `Some(port)`: validate HTTP-01 for real on this port of `dns_ip`;
    /// `None` (and no `tls_alpn01`): every challenge is valid.
    http01: Option<u16>,
    /// `Some(port)`: validate TLS-ALPN-01 for real on this port of `dns_ip`.
    tls_alpn01: Option<u16>,
    /// The address pebble-challtestsrv gives every name.
    dns_ip: &'static str,
    /// Seconds a certificate is valid (pebble's default: five years).
    validity_s: Option<u64>,
}

impl Pebble {
    /// `http01`: validate for real, fetching challenges from this port
    /// (names resolved to 127.0.0.1); `None`: every challenge is valid.
    fn start(dir: &Path, http01: Option<u16>) -> Pebble {
        Pebble::start_with(dir, PebbleOptions { port: free_port(), http01, tls_alpn01: None, dns_ip: "127.0.0.1", validity_s: None })
    }

    fn start_with(dir: &Path, options: PebbleOptions) -> Pebble {
        let PebbleOptions { port, http01, tls_alpn01, dns_ip, validity_s } = options;
        openssl(dir, &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "pebble.key", "-out", "pebble.csr", "-subj", "/CN=localhost"]);
        std::fs::write(dir.join("pebble.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(dir, &["x509", "-req", "-in", "pebble.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "7", "-days", "2", "-extfile", "pebble.ext", "-out", "pebble.pem"]);
        let mut config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{}", free_port()),
            "certificate": dir.join("pebble.pem"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": http01.unwrap_or_else(free_port),
            "tlsPort": tls_alpn01.unwrap_or_else(free_port),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(validity) = validity_s {
            config["pebble"]["certificateValidityPeriod"] = validity.into();
        }
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let dns = http01.or(tls_alpn01).map(|_| {
            let (port, management) = (free_port(), free_port());
            let dns = ChildGuard::spawn(
                Command::new("pebble-challtestsrv")
                    .args(["-defaultIPv4", dns_ip, "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", "", "-dns01"])
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
/// data directory outlives it), on `pg` with the secret `dir/../tls-secret`.
fn gateway(dir: &Path, pg: &TempPostgres, directory: &str, http_port: u16) -> Gateway {
    gateway_on(dir, "127.0.0.1", pg, directory, http_port, &secret(dir.parent().unwrap(), "tls-secret"))
}

/// The same on `host` (its HTTPS and plain ports), sealing with `secret`.
fn gateway_on(dir: &Path, host: &str, pg: &TempPostgres, directory: &str, http_port: u16, secret: &Path) -> Gateway {
    std::fs::create_dir_all(dir).unwrap();
    let ca = dir.parent().unwrap().join("ca.pem");
    let mut gw = GatewayBuilder::new(dir)
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("DATABASE_URL", pg.url())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_HOST", host)
        .env("OMNI_TLS_DOMAINS", DOMAIN)
        .env("OMNI_TLS_SECRET_FILE", secret.display().to_string())
        .env("OMNI_ACME_DIRECTORY", directory)
        .env("OMNI_ACME_EMAIL", "admin@example.com")
        .env("OMNI_ACME_CA_FILE", ca.display().to_string())
        .env("OMNI_HTTP_PORT", http_port.to_string())
        .spawn();
    let port = gw.port;
    wait_until(Duration::from_secs(60), "/health 200 over HTTPS", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway exited ({status}): {}", gw.log());
        }
        (curl_at(host, port, "/health").0 == 200).then_some(())
    });
    gw
}

/// A gateway for [`DOMAIN`] on its own embedded database: the account and
/// certificate are files in `dir/data/tls` then.
fn embedded_gateway(dir: &Path, directory: &str, http_port: u16) -> Gateway {
    embedded_gateway_with(dir, directory, &[("OMNI_HTTP_PORT", http_port.to_string())])
}

fn embedded_gateway_with(dir: &Path, directory: &str, env: &[(&str, String)]) -> Gateway {
    std::fs::create_dir_all(dir).unwrap();
    omni_tests::copy_gateway_cluster(&omni_tests::pg_bin_dir(), dir);
    let ca = dir.parent().unwrap().join("ca.pem");
    let gw = GatewayBuilder::new(dir)
        .env("OMNI_API_BIN", bin_path("fake-worker").display().to_string())
        .env("OMNI_API_KEY", TEST_API_KEY)
        .env("OMNI_TLS_DOMAINS", DOMAIN)
        .env("OMNI_ACME_DIRECTORY", directory)
        .env("OMNI_ACME_CA_FILE", ca.display().to_string());
    let mut gw = env.iter().fold(gw, |gw, (name, value)| gw.env(name, value.clone())).spawn();
    let port = gw.port;
    wait_until(Duration::from_secs(90), "/health 200 over HTTPS", || {
        if let Some(status) = gw.child.try_status() {
            panic!("the gateway exited ({status}): {}", gw.log());
        }
        (curl(port, "/health").0 == 200).then_some(())
    });
    gw
}

/// A secret file (mode 600) in `dir`, made once.
fn secret(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if !path.exists() {
        let out = Command::new("openssl").args(["rand", "-base64", "32"]).output().expect("openssl rand");
        assert!(out.status.success());
        std::fs::write(&path, out.stdout).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

/// `curl -k` over HTTPS (the certificate is checked by [`served`]): (status, body).
fn curl(port: u16, path: &str) -> (u16, String) {
    curl_at("127.0.0.1", port, path)
}

fn curl_at(host: &str, port: u16, path: &str) -> (u16, String) {
    let resolve = format!("{DOMAIN}:{port}:{host}");
    let out = Command::new("curl").args(["-sS", "-k", "--resolve", &resolve, "-w", "\n%{http_code}", &format!("https://{DOMAIN}:{port}{path}")]).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_string())
}

fn tls_status(gw: &Gateway) -> serde_json::Value {
    tls_status_at("127.0.0.1", gw)
}

fn tls_status_at(host: &str, gw: &Gateway) -> serde_json::Value {
    let (code, body) = curl_at(host, gw.port, "/gateway/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["tls"].clone()
}

/// The issuer and subject alternative names of the certificate a new TLS connection gets.
fn served(port: u16) -> String {
    served_at("127.0.0.1", port)
}

/// The same, with its serial number, from `host`.
fn served_at(host: &str, port: u16) -> String {
    let script = format!("openssl s_client -connect {host}:{port} -servername {DOMAIN} </dev/null 2>/dev/null | openssl x509 -noout -serial -issuer -ext subjectAltName");
    let out = Command::new("sh").args(["-c", &script]).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The serial of the certificate `host:port` serves when pebble issued it.
fn pebble_serial(host: &str, port: u16) -> Option<String> {
    let cert = served_at(host, port);
    cert.contains("Pebble").then(|| cert.lines().find_map(|l| l.strip_prefix("serial=")).unwrap_or_default().to_string())
}

/// The stored certificate's row: (chain PEM, sealed key, obtained_by).
fn stored_row(pg: &TempPostgres) -> (String, Vec<u8>, String) {
    let mut db = pg.client();
    let row = db.query_one("SELECT chain_pem, key_sealed, obtained_by FROM omni_tls_certificate WHERE domains = $1", &[&DOMAIN]).unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn acme_serves_self_signed_then_pebbles_certificate_and_reuses_it_after_a_restart() {
    let dir = workdir();
    make_test_ca(dir.path(), "ca");
    let pg = TempPostgres::start_new();
    let home = dir.path().join("gw");

    // A directory that refuses connections: the gateway serves, self-signed, and says why.
    let refused = format!("https://127.0.0.1:{}/dir", free_port());
    let mut gw = gateway(&home, &pg, &refused, free_port());
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
    let mut gw = gateway(&home, &pg, &pebble.directory, free_port());
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
    // Kept in the database, the key sealed; nothing on disk.
    let (chain, sealed_key, obtained_by) = stored_row(&pg);
    assert!(chain.contains("BEGIN CERTIFICATE"), "{chain}");
    assert!(!sealed_key.windows(11).any(|w| w == b"PRIVATE KEY") && sealed_key.len() > 100, "the key is stored in the clear");
    assert!(obtained_by.ends_with(&format!(":{}", gw.child.pid())), "{obtained_by}");
    let mut db = pg.client();
    let account: Vec<u8> = db.query_one("SELECT credentials_sealed FROM omni_tls_account WHERE directory = $1", &[&pebble.directory]).unwrap().get(0);
    assert!(!String::from_utf8_lossy(&account).contains("key_pkcs8"), "the account key is stored in the clear");
    assert!(!home.join("data/tls").exists(), "files were written beside the database store");
    gw.terminate();
    let issued = pebble.finalized();
    assert_eq!(issued, 1, "{}", pebble.log());

    // A restart serves the stored certificate at once and orders nothing.
    let mut gw = gateway(&home, &pg, &pebble.directory, free_port());
    assert!(served(gw.port).contains("Pebble"), "the stored certificate is not served first");
    let tls = tls_status(&gw);
    assert!(tls["state"].as_str().unwrap().starts_with(&format!("certificate from the database: obtained by {obtained_by} at")), "{tls}");
    assert_eq!(tls["acme"]["orders"].as_u64(), Some(0), "{tls}");
    assert_eq!(pebble.finalized(), issued, "a new order after the restart: {}", pebble.log());
    gw.terminate();

    // A gateway with another secret cannot open the key: it says which
    // variable, serves self-signed, and orders nothing over the stored one.
    let other = secret(dir.path(), "other-secret");
    let mut gw = gateway_on(&dir.path().join("gw-other"), "127.0.0.1", &pg, &pebble.directory, free_port(), &other);
    let tls = wait_until(Duration::from_secs(60), "the secret's error in the status", || {
        let tls = tls_status(&gw);
        tls["last_error"].is_string().then_some(tls)
    });
    assert!(tls["last_error"].as_str().unwrap().contains("OMNI_TLS_SECRET_FILE"), "{tls}");
    assert!(!served(gw.port).contains("Pebble"));
    assert_eq!(pebble.finalized(), issued, "a gateway with another secret ordered: {}", pebble.log());
    assert_eq!(stored_row(&pg).2, obtained_by);
    gw.terminate();
    drop(pebble.child);
}

#[test]
fn acme_answers_pebbles_http01_check_on_the_plain_port_and_keeps_files_with_the_embedded_database() {
    let dir = workdir();
    make_test_ca(dir.path(), "ca");
    let http_port = free_port();
    let pebble = Pebble::start(dir.path(), Some(http_port));
    // The embedded database: this gateway's store is files.
    let home = dir.path().join("gw");
    let mut gw = embedded_gateway(&home, &pebble.directory, http_port);
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
    for name in ["cert.pem", "key.pem", "account.json"] {
        let mode = std::fs::metadata(home.join("data/tls").join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    gw.terminate();
}

#[test]
fn acme_two_gateways_on_one_database_share_one_order_answer_each_others_checks_and_get_the_renewal() {
    let dir = workdir();
    make_test_ca(dir.path(), "ca");
    let pg = TempPostgres::start_new();
    let secret = secret(dir.path(), "tls-secret");
    // Both plain ports on one port number, A's on 127.0.0.1 and B's on
    // 127.0.0.2; pebble's DNS sends every check to B.
    let (http_port, pebble_port) = (free_port(), free_port());
    let directory = format!("https://127.0.0.1:{pebble_port}/dir");

    // B first, while pebble is still down: its attempt fails and it waits
    // (a minute) — so A, started once pebble is up, is the one that orders,
    // and pebble's check of A's order can only be answered by B.
    let mut b = gateway_on(&dir.path().join("gw-b"), "127.0.0.2", &pg, &directory, http_port, &secret);
    wait_until(Duration::from_secs(60), "B's failed attempt in its status", || tls_status_at("127.0.0.2", &b)["last_error"].is_string().then_some(()));
    let pebble = Pebble::start_with(dir.path(), PebbleOptions { port: pebble_port, http01: Some(http_port), tls_alpn01: None, dns_ip: "127.0.0.2", validity_s: Some(90) });
    let mut a = gateway_on(&dir.path().join("gw-a"), "127.0.0.1", &pg, &directory, http_port, &secret);

    let first = wait_until(Duration::from_secs(90), "one pebble certificate served by both gateways", || {
        let (on_a, on_b) = (pebble_serial("127.0.0.1", a.port)?, pebble_serial("127.0.0.2", b.port)?);
        (on_a == on_b).then_some(on_a)
    });
    let (status_a, status_b) = (tls_status_at("127.0.0.1", &a), tls_status_at("127.0.0.2", &b));
    assert_eq!(pebble.finalized(), 1, "{}", pebble.log());
    assert_eq!((status_a["acme"]["orders"].as_u64(), status_b["acme"]["orders"].as_u64()), (Some(1), Some(0)), "{status_a}\n{status_b}");
    let a_id = format!(":{}", a.child.pid());
    assert!(status_b["state"].as_str().unwrap().starts_with("certificate from the database: obtained by") && status_b["state"].as_str().unwrap().contains(&a_id), "{status_b}");
    assert!(status_b["last_error"].is_null(), "B's failure outlived the certificate it loaded: {status_b}");
    assert!(stored_row(&pg).2.ends_with(&a_id));
    // Pebble checked the plain port of the name, which its DNS gives B only.
    let log = pebble.log();
    assert!(log.contains(&format!("Attempting to validate w/ HTTP: http://{DOMAIN}:{http_port}/.well-known/acme-challenge/")) && log.contains("set VALID by completed challenge"), "{log}");
    assert!(a.log().contains("obtained from") && !b.log().contains("obtained from"), "B ordered too:\n{}", b.log());

    // A 90 s certificate is renewed 60 s in, by whichever gateway claims
    // it first; the other one is told, and both serve the new one.
    let renewed = wait_until(Duration::from_secs(150), "a renewed certificate served by both gateways", || {
        let (on_a, on_b) = (pebble_serial("127.0.0.1", a.port)?, pebble_serial("127.0.0.2", b.port)?);
        (on_a == on_b && on_a != first).then_some(on_a)
    });
    let (status_a, status_b) = (tls_status_at("127.0.0.1", &a), tls_status_at("127.0.0.2", &b));
    let orders = status_a["acme"]["orders"].as_u64().unwrap() + status_b["acme"]["orders"].as_u64().unwrap();
    assert!(orders >= 2, "{status_a}\n{status_b}");
    assert_eq!(pebble.finalized() as u64, orders, "an order that was not served, or two gateways ordering one renewal: {}", pebble.log());
    assert_ne!(renewed, first);
    a.terminate();
    b.terminate();
}

#[test]
fn acme_answers_pebbles_tls_alpn01_check_on_the_https_port_without_a_plain_port() {
    let dir = workdir();
    make_test_ca(dir.path(), "ca");
    let https_port = free_port();
    let pebble = Pebble::start_with(dir.path(), PebbleOptions { port: free_port(), http01: None, tls_alpn01: Some(https_port), dns_ip: "127.0.0.1", validity_s: None });
    let mut gw = embedded_gateway_with(
        &dir.path().join("gw"),
        &pebble.directory,
        &[("OMNI_PORT", https_port.to_string()), ("OMNI_HTTP_PORT", "off".into()), ("OMNI_ACME_CHALLENGE", "tls-alpn-01".into())],
    );
    let cert = wait_until(Duration::from_secs(90), "a certificate issued by pebble after a real TLS-ALPN-01 check", || {
        let tls = tls_status(&gw);
        assert!(tls["last_error"].is_null(), "{tls}\n{}\n{}", gw.log(), pebble.log());
        let cert = served(gw.port);
        cert.contains("Pebble").then_some(cert)
    });
    assert!(cert.contains(&format!("DNS:{DOMAIN}")), "{cert}");
    assert_eq!(pebble.finalized(), 1, "{}", pebble.log());
    // Checked for real (no plain port to answer HTTP-01, and pebble's VA is not told to pass all).
    assert!(pebble.log().contains("set VALID by completed challenge"), "{}", pebble.log());
    // The check is over: a handshake offering acme-tls/1 gets no certificate now.
    let script = format!("openssl s_client -connect 127.0.0.1:{https_port} -servername {DOMAIN} -alpn acme-tls/1 </dev/null 2>&1");
    let out = String::from_utf8_lossy(&Command::new("sh").args(["-c", &script]).output().unwrap().stdout).into_owned();
    assert!(!out.contains("BEGIN CERTIFICATE") && !out.contains("Pebble"), "{out}");
    gw.terminate();
}
