//! The store behind `OMNI_REPOSITORY_URL`: S3 (`s3://bucket/prefix`),
//! Google Cloud Storage (`gs://bucket/prefix`), Azure Blob
//! (`az://container/prefix`) or a directory (`file:///abs/path`), all through
//! Apache Arrow's `object_store` with its standard environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`: credentials, region, endpoint, `AWS_ALLOW_HTTP`,
//! the emulators' endpoints). Checksums stay off (`object_store`'s default):
//! S3-compatible stores such as R2, B2 or MinIO refuse some of them.
//!
//! Objects are written once ([`Repository::put_once`]): a conditional put
//! (`If-None-Match: *` on S3, its equivalents elsewhere) creates an object
//! only where none is. An object already there with the same bytes is an
//! upload retried after its answer was lost, and counts as done; one with
//! other bytes is a [`RepositoryError::Conflict`], never overwritten. A store
//! that ignores the condition (rclone's S3 server) simply overwrites with
//! the same bytes the retry would have written.
//!
//! Nothing secret reaches a message: the URL carries no credentials (they
//! come from the environment), and the store's error texts, which can name
//! request URLs, lose their query strings (signatures, SAS tokens) and any
//! credential value of the environment ([`redact`]).
//!
//! **Encryption** (`repository/crypt.rs`): with `OMNI_ENCRYPT_*` set, every
//! object the gateway writes goes through [`Repository::put_object`] or
//! [`Repository::put_file`], which seal it with age first (after the
//! layout's own compression) and record the SHA-256 of the *stored* bytes;
//! a sealer that cannot be made (an unreadable recipients file) is an error,
//! never a plain upload. An encrypted retry is new ciphertext: an object
//! already there that is an age file of the same size to the same
//! recipients is taken as the earlier upload of the same content (the
//! server, holding public keys only, cannot compare plaintexts); any other
//! difference is a conflict as before. Reads that need the content
//! ([`Repository::get_plain`]) decrypt with the restore's identity, or, on
//! the server, take the plain copy of a manifest or `.history` file kept
//! locally beside `repository.json` when it was uploaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart};
use sha2::{Digest, Sha256};

use super::crypt::{self, CryptError, Encryption, Keys};

/// The variable that names the repository, in every message about it.
pub const URL_VAR: &str = "OMNI_REPOSITORY_URL";

/// Files up to this size are uploaded in one conditional request; larger
/// ones (a big cluster's `base.tar.lz4`) in parts.
const SINGLE_PUT_MAX: u64 = 32 * 1024 * 1024;
/// The size of one part of a multipart upload.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once (rclone's default too): the
/// store's time per request overlaps instead of adding up. Memory stays
/// bounded: this many parts, the one being filled, and [`PIECES_QUEUED`] pieces.
const PARTS_IN_FLIGHT: usize = 4;
/// A big file is read (and sealed) in pieces of this size, each hashed and
/// handed to the upload as it comes: one pass over the file, no zeroed
/// part-sized buffer (a part is the list of its pieces).
const PIECE_BYTES: usize = 1024 * 1024;
/// Pieces read ahead of the upload.
const PIECES_QUEUED: usize = 4;

/// The kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    S3,
    Gcs,
    Azure,
    File,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::S3 => "s3",
            Scheme::Gcs => "gs",
            Scheme::Azure => "az",
            Scheme::File => "file",
        }
    }
}

/// `OMNI_REPOSITORY_URL`, parsed: which store, which bucket (container,
/// directory) and the prefix every object name starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub scheme: Scheme,
    /// The bucket or container; for `file://`, the absolute directory.
    pub bucket: String,
    /// Inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
}

impl Location {
    /// Parses a repository URL; the error says what is wrong and what a
    /// good one looks like (the caller names the variable).
    pub fn parse(url: &str) -> Result<Location, String> {
        const FORMS: &str = "expected s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///absolute/path";
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else { return Err(format!("not a URL; {FORMS}")) };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" | "azure" => Scheme::Azure,
            "file" => Scheme::File,
            other => return Err(format!("unknown scheme {other:?}; {FORMS}")),
        };
        if rest.contains(['?', '#']) {
            return Err(format!("a query string or fragment is not understood here (credentials and options come from the environment: AWS_*, GOOGLE_*, AZURE_*); {FORMS}"));
        }
        if scheme == Scheme::File {
            let Some(dir) = rest.strip_prefix('/') else { return Err(format!("a file:// URL needs an absolute path (three slashes: file:///srv/offsite); {FORMS}")) };
            let dir = format!("/{}", dir.trim_end_matches('/'));
            if dir == "/" || dir.split('/').any(|part| part == "..") {
                return Err("a file:// URL must name a directory other than / and without `..`".into());
            }
            return Ok(Location { scheme, bucket: dir, prefix: String::new() });
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') || bucket.contains(':') {
            return Err(format!("credentials or a port do not belong in the URL (use AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL and their GOOGLE_*/AZURE_* equivalents); {FORMS}"));
        }
        let valid_bucket = !bucket.is_empty() && bucket.len() <= 255 && bucket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid_bucket {
            return Err(format!("{bucket:?} is not a bucket or container name (letters, digits, '-', '.', '_'); {FORMS}"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            return Err(format!("the prefix {prefix:?} has an empty, `.` or `..` part"));
        }
        Ok(Location { scheme, bucket: bucket.to_string(), prefix })
    }

    /// The URL as shown in the log, the status and errors (it holds no secret).
    pub fn display(&self) -> String {
        match self.scheme {
            Scheme::File => format!("file://{}", self.bucket),
            _ if self.prefix.is_empty() => format!("{}://{}", self.scheme.as_str(), self.bucket),
            _ => format!("{}://{}/{}", self.scheme.as_str(), self.bucket, self.prefix),
        }
    }
}

/// What can go wrong with the repository, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("{URL_VAR}: {0}")]
    Url(String),
    /// An object of this name holds other bytes: never overwritten.
    #[error("{location}: the object {path} already exists with other content ({detail}); it was not overwritten and uploads are stopped. Another installation may be writing to the same prefix: give each its own {URL_VAR}, or move the object away, then restart the gateway")]
    Conflict { location: String, path: String, detail: String },
    #[error("{location}: {path} does not exist")]
    NotFound { location: String, path: String },
    #[error("{location}: {path} is damaged: its SHA-256 is {actual}, the manifest says {expected}")]
    Checksum { location: String, path: String, expected: String, actual: String },
    #[error("{location}: {what} {path} failed: {message}")]
    Store { location: String, what: &'static str, path: String, message: String },
    #[error("reading {path}: {source}")]
    Local { path: String, source: std::io::Error },
    /// Encryption is configured and cannot be applied, or an object cannot
    /// be decrypted: nothing was uploaded (or restored) for it.
    #[error(transparent)]
    Crypt(#[from] CryptError),
}

/// How the objects of this process are encrypted and read back (set once
/// the settings are read: [`set_crypt`]); every [`Repository`] opened after
/// takes it.
#[derive(Debug, Default)]
pub struct Crypt {
    /// What objects are sealed to (`Off`: plain).
    pub encryption: Encryption,
    /// The restore's private keys (`OMNI_DECRYPT_IDENTITY_FILE`, `--identity`).
    pub keys: Option<Keys>,
    /// Where the plain copies of manifests and `.history` files are kept
    /// (`OMNI_WAL_DIR/repository-plain`): what the server reads back.
    pub plain_copies: Option<PathBuf>,
    /// Where a large file is sealed before its upload (`OMNI_WAL_DIR/repository-outbox`).
    pub scratch: Option<PathBuf>,
}

static CRYPT: std::sync::RwLock<Option<Arc<Crypt>>> = std::sync::RwLock::new(None);

/// Sets the encryption of the repositories opened from now on.
pub fn set_crypt(crypt: Crypt) {
    *CRYPT.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(crypt));
}

fn process_crypt() -> Option<Arc<Crypt>> {
    CRYPT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// An object as stored: what [`Repository::put_object`] and
/// [`Repository::put_file`] confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub put: Put,
    /// The stored object's size and SHA-256 (of the encrypted bytes when sealed).
    pub size: u64,
    pub sha256: String,
    /// The public keys it is encrypted to (`passphrase`; empty: plain).
    pub recipients: Vec<String>,
}

/// Whether `there` (an object's first bytes, at least its header, and its
/// size) can stand for `ours` (what a retry would write, at least its
/// header, and its size): both age files to the same recipients whose
/// payloads (after the header, whose length varies: age adds random
/// "grease" stanzas) are of one length, which is that of the plaintext.
fn same_sealing(there_head: &[u8], there_size: u64, ours_head: &[u8], ours_size: u64) -> bool {
    let payload = |head: &[u8], size: u64| crypt::header_len(head).map(|h| size.saturating_sub(h as u64));
    crypt::is_sealed(there_head)
        && crypt::is_sealed(ours_head)
        && crypt::header_recipients(there_head) == crypt::header_recipients(ours_head)
        && payload(there_head, there_size).is_some()
        && payload(there_head, there_size) == payload(ours_head, ours_size)
}

/// Whether [`Repository::put_once`] wrote the object or found it there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    /// The same bytes were there (an earlier upload whose answer was lost).
    AlreadyThere,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the repository's prefix.
    pub path: String,
    pub size: u64,
    /// When the store says it was written.
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// An open repository; cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    location: Location,
    /// The store ignores or refuses conditional writes: every write looks
    /// for the object first (see [`Repository::put_once`]). Shared by the clones.
    look_first: Arc<std::sync::atomic::AtomicBool>,
    /// The process's encryption ([`set_crypt`]) when it was opened.
    crypt: Option<Arc<Crypt>>,
}

impl Repository {
    /// Opens the repository `url` names, with the credentials of the
    /// environment. Does not contact the store: a store that is down or a
    /// wrong key shows at the first upload, which is retried.
    pub fn open(url: &str) -> Result<Repository, RepositoryError> {
        let location = Location::parse(url).map_err(RepositoryError::Url)?;
        Repository::open_location(location)
    }

    pub fn open_location(location: Location) -> Result<Repository, RepositoryError> {
        install_crypto_provider();
        // object_store's own retries are kept short: the shipper retries
        // with its own capped backoff and reports each failure.
        let retry = RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), ..RetryConfig::default() };
        let failed = |e: object_store::Error| RepositoryError::Url(format!("{}: {}", location.display(), redact(&e.to_string())));
        // Timeouts go in as settings: `with_client_options` would replace the
        // client settings `from_env` read (AWS_ALLOW_HTTP, proxies, ...).
        let timeouts = [(ClientConfigKey::ConnectTimeout, "5s"), (ClientConfigKey::Timeout, "120s")];
        let store: Arc<dyn ObjectStore> = match location.scheme {
            Scheme::S3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey as Key};
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&location.bucket).with_retry(retry);
                if unsigned_payload_by_default(&[b.get_config_value(&Key::Endpoint), b.get_config_value(&Key::S3Endpoint)], std::env::var_os("AWS_UNSIGNED_PAYLOAD").is_some()) {
                    b = b.with_unsigned_payload(true);
                }
                for (key, value) in timeouts {
                    if b.get_config_value(&Key::Client(key)).is_none() {
                        b = b.with_config(Key::Client(key), value);
                    }
                }
                let setting = |name: &str| name.parse::<Key>().ok().and_then(|key| b.get_config_value(&key));
                if let Some(problem) = sse_mismatch(setting("aws_server_side_encryption").as_deref(), setting("aws_sse_kms_key_id").is_some(), setting("aws_sse_customer_key_base64").is_some()) {
                    return Err(RepositoryError::Url(problem));
                }
                Arc::new(b.build().map_err(failed)?)
            }
            Scheme::Gcs => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey as Key};
                let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(&location.bucket).with_retry(retry);
                for (key, value) in timeouts {
                    if b.get_config_value(&Key::Client(key)).is_none() {
                        b = b.with_config(Key::Client(key), value);
                    }
                }
                // Uploads through the JSON API (gcs.rs): the emulator refuses the XML API's.
                Arc::new(super::gcs::JsonUploads::build(b, Duration::from_secs(120)).map_err(failed)?)
            }
            Scheme::Azure => {
                use object_store::azure::{AzureConfigKey as Key, MicrosoftAzureBuilder};
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(&location.bucket).with_retry(retry);
                for (key, value) in timeouts {
                    if b.get_config_value(&Key::Client(key)).is_none() {
                        b = b.with_config(Key::Client(key), value);
                    }
                }
                Arc::new(b.build().map_err(failed)?)
            }
            Scheme::File => {
                std::fs::create_dir_all(&location.bucket).map_err(|e| RepositoryError::Url(format!("could not create {}: {e}", location.bucket)))?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&location.bucket).map_err(failed)?)
            }
        };
        Ok(Repository { store, location, look_first: Arc::default(), crypt: process_crypt() })
    }

    /// The same repository with its own encryption instead of the process's.
    pub fn with_crypt(mut self, crypt: Crypt) -> Repository {
        self.crypt = Some(Arc::new(crypt));
        self
    }

    /// The URL, safe to show anywhere.
    pub fn display(&self) -> String {
        self.location.display()
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    fn full(&self, path: &str) -> ObjectPath {
        if self.location.prefix.is_empty() {
            ObjectPath::from(path)
        } else {
            ObjectPath::from(format!("{}/{path}", self.location.prefix))
        }
    }

    fn relative(&self, full: &ObjectPath) -> String {
        let full = full.as_ref();
        if self.location.prefix.is_empty() {
            return full.to_string();
        }
        full.strip_prefix(&self.location.prefix).map(|r| r.trim_start_matches('/').to_string()).unwrap_or_else(|| full.to_string())
    }

    fn store_error(&self, what: &'static str, path: &str, e: object_store::Error) -> RepositoryError {
        match e {
            // A write finds no object by design: "not found" there is the bucket (container).
            object_store::Error::NotFound { .. } if what == "writing" => RepositoryError::Store {
                location: self.display(),
                what,
                path: path.to_string(),
                message: format!("the bucket (container) {:?} does not exist, NoSuchBucket ({})", self.location.bucket, redact(&e.to_string())),
            },
            object_store::Error::NotFound { .. } => RepositoryError::NotFound { location: self.display(), path: path.to_string() },
            e => RepositoryError::Store { location: self.display(), what, path: path.to_string(), message: redact(&e.to_string()) },
        }
    }

    /// Writes `bytes` at `path` unless an object is there: the same bytes
    /// there count as written, other bytes are a [`RepositoryError::Conflict`].
    ///
    /// A conditional put where the store honours it. A store that refuses
    /// conditional writes (`NotImplemented`: an S3-compatible store without
    /// `If-None-Match`, or `AWS_CONDITIONAL_PUT=disabled`) or that was found
    /// to ignore them ([`Repository::honours_conditional_writes`]) gets a
    /// lookup first and a plain write only where none is: another
    /// installation's object is still never overwritten, but two writers
    /// racing for one name could (each installation needs its own prefix).
    pub async fn put_once(&self, path: &str, bytes: Bytes) -> Result<Put, RepositoryError> {
        if self.looks_first() {
            return self.put_looking_first(path, bytes).await;
        }
        let opts = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        match self.store.put_opts(&self.full(path), PutPayload::from_bytes(bytes.clone()), opts).await {
            Ok(_) => Ok(Put::Created),
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => self.same_or_conflict(path, &bytes).await,
            Err(object_store::Error::NotImplemented { .. }) => {
                if !self.look_first.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!("{}: the store refuses conditional writes; each object is looked up before it is written (never overwritten, but give each installation its own prefix)", self.display());
                }
                self.put_looking_first(path, bytes).await
            }
            Err(e) => Err(self.store_error("writing", path, e)),
        }
    }

    /// Whether writes look for the object first (the store ignores or
    /// refuses conditional writes).
    pub fn looks_first(&self) -> bool {
        self.look_first.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// From now on, every write looks for the object first.
    pub fn look_first(&self) {
        self.look_first.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn put_looking_first(&self, path: &str, bytes: Bytes) -> Result<Put, RepositoryError> {
        if self.head(path).await?.is_some() {
            return self.same_or_conflict(path, &bytes).await;
        }
        self.store.put(&self.full(path), PutPayload::from_bytes(bytes)).await.map_err(|e| self.store_error("writing", path, e))?;
        Ok(Put::Created)
    }

    async fn same_or_conflict(&self, path: &str, bytes: &Bytes) -> Result<Put, RepositoryError> {
        let there = self.get(path).await?;
        if there == *bytes || same_sealing(&there, there.len() as u64, bytes, bytes.len() as u64) {
            Ok(Put::AlreadyThere)
        } else {
            Err(RepositoryError::Conflict { location: self.display(), path: path.to_string(), detail: format!("{} bytes there, {} to write", there.len(), bytes.len()) })
        }
    }

    /// Whether the store honours conditional writes: a probe object under
    /// `probe/` is created twice with the condition; a store that lets the
    /// second through ignores it (rclone's S3 server ignores
    /// `If-None-Match`). The probe is deleted after unless `delete` is false.
    pub async fn honours_conditional_writes(&self, delete: bool) -> Result<bool, RepositoryError> {
        let name = format!("probe/conditional-{:016x}", rand::random::<u64>());
        let opts = || PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        let body = match self.sealer()? {
            Some(sealer) => Bytes::from(sealer.seal(b"omni conditional write probe", &name)?),
            None => Bytes::from_static(b"omni conditional write probe"),
        };
        let payload = || PutPayload::from_bytes(body.clone());
        let honoured = match self.store.put_opts(&self.full(&name), payload(), opts()).await {
            Err(object_store::Error::NotImplemented { .. }) => false,
            Err(e) => return Err(self.store_error("writing", &name, e)),
            Ok(_) => match self.store.put_opts(&self.full(&name), payload(), opts()).await {
                Ok(_) => false,
                Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => true,
                Err(object_store::Error::NotImplemented { .. }) => false,
                Err(e) => return Err(self.store_error("writing", &name, e)),
            },
        };
        if delete {
            let _ = self.delete(&name).await;
        }
        Ok(honoured)
    }

    /// Uploads the file `local` to `path`, write-once like [`put_once`]
    /// (a big file in parts, after checking that no object is there; the
    /// object appears only once every part is in). Returns its size and SHA-256.
    ///
    /// [`put_once`]: Repository::put_once
    pub async fn put_file_once(&self, path: &str, local: &Path) -> Result<(Put, u64, String), RepositoryError> {
        let local_error = |source| RepositoryError::Local { path: local.display().to_string(), source };
        let size = std::fs::metadata(local).map_err(local_error)?.len();
        if size <= SINGLE_PUT_MAX {
            let bytes = Bytes::from(std::fs::read(local).map_err(local_error)?);
            let sha = sha256_hex(&bytes);
            return Ok((self.put_once(path, bytes).await?, size, sha));
        }
        // Only a retry finds an object there: then (and only then) the file
        // is read once before, for its SHA-256, to compare.
        if let Some(there) = self.head(path).await? {
            let src = local.to_path_buf();
            let sha = tokio::task::spawn_blocking(move || sha256_file(&src)).await.map_err(|e| local_error(std::io::Error::other(e)))?.map_err(local_error)?;
            let same = {
                let (stored, head) = self.sha256_of(path, there).await?;
                // An encrypted retry: see the module's text.
                (there == size && stored == sha) || same_sealing(&head, there, &file_head(local).map_err(local_error)?, size)
            };
            return if same {
                Ok((Put::AlreadyThere, size, sha))
            } else {
                Err(RepositoryError::Conflict { location: self.display(), path: path.to_string(), detail: format!("{there} bytes there, {size} to write, or other bytes") })
            };
        }
        let src = local.to_path_buf();
        let (size, sha) = self
            .put_pieces(path, move |pieces| {
                let local_error = |source| RepositoryError::Local { path: src.display().to_string(), source };
                let mut input = std::fs::File::open(&src).map_err(local_error)?;
                pieces.read_from(&mut input).map_err(local_error)
            })
            .await?;
        Ok((Put::Created, size, sha))
    }

    /// A multipart upload of the bytes `produce` writes into [`Pieces`] on
    /// a thread of its own: each piece is hashed there and sent as it comes,
    /// [`PARTS_IN_FLIGHT`] parts at a time (one on GCS, whose resumable
    /// session takes its chunks one after the other). The object appears
    /// only when the upload completes; any error, producing or sending,
    /// aborts it: nothing half-written is ever an object. Returns the
    /// stored size and SHA-256 (one pass: the bytes are hashed as they go).
    async fn put_pieces<F>(&self, path: &str, produce: F) -> Result<(u64, String), RepositoryError>
    where
        F: FnOnce(&mut Pieces) -> Result<(), RepositoryError> + Send + 'static,
    {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PIECES_QUEUED);
        let producing = tokio::task::spawn_blocking(move || {
            let mut pieces = Pieces { tx, buf: Vec::with_capacity(PIECE_BYTES), hasher: Sha256::new(), size: 0 };
            produce(&mut pieces)?;
            pieces.send().map_err(|source| RepositoryError::Local { path: "the upload".into(), source })?;
            Ok::<_, RepositoryError>((pieces.size, hex(&pieces.hasher.finalize())))
        });
        let joined = |e: tokio::task::JoinError| RepositoryError::Local { path: path.to_string(), source: std::io::Error::other(e) };
        let upload = match self.store.put_multipart(&self.full(path)).await {
            Ok(u) => u,
            Err(e) => {
                drop(rx);
                let _ = producing.await;
                return Err(self.store_error("starting the upload of", path, e));
            }
        };
        let in_flight = if self.location.scheme == Scheme::Gcs { 1 } else { PARTS_IN_FLIGHT };
        let mut parts = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let sent = async {
            while let Some(piece) = rx.recv().await {
                parts.wait_for_capacity(in_flight).await.map_err(|e| self.store_error("uploading a part of", path, e))?;
                parts.put(piece);
            }
            Ok::<(), RepositoryError>(())
        }
        .await;
        // A failed send stops the producer: its next piece finds no receiver.
        drop(rx);
        let produced = producing.await.map_err(joined).and_then(|done| done);
        let outcome = match (sent, produced) {
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            // finish() sends the last part, waits for all, completes; it aborts on failure itself.
            (Ok(()), Ok(done)) => return parts.finish().await.map(|_| done).map_err(|e| self.store_error("completing the upload of", path, e)),
        };
        // What was sent is not an object: it is dropped, not half-kept.
        let _ = parts.abort().await;
        outcome
    }

    /// The object's bytes.
    pub async fn get(&self, path: &str) -> Result<Bytes, RepositoryError> {
        let got = self.store.get(&self.full(path)).await.map_err(|e| self.store_error("reading", path, e))?;
        got.bytes().await.map_err(|e| self.store_error("reading", path, e))
    }

    /// The object's bytes, refused unless their SHA-256 is `sha256` (hex).
    pub async fn get_verified(&self, path: &str, sha256: &str) -> Result<Bytes, RepositoryError> {
        let bytes = self.get(path).await?;
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(RepositoryError::Checksum { location: self.display(), path: path.to_string(), expected: sha256.to_string(), actual });
        }
        Ok(bytes)
    }

    /// Streams the object at `path` into the new file `local` (never whole
    /// in memory: a base backup can be gigabytes), hashing as it goes; the
    /// file is flushed and kept only when its SHA-256 is `sha256`, removed
    /// otherwise. Returns the bytes written.
    pub async fn get_to_file_verified(&self, path: &str, local: &Path, sha256: &str) -> Result<u64, RepositoryError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let local_error = |source| RepositoryError::Local { path: local.display().to_string(), source };
        let got = self.store.get(&self.full(path)).await.map_err(|e| self.store_error("reading", path, e))?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(local).await.map_err(local_error)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let copied: Result<(), RepositoryError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.store_error("reading", path, e))?;
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(local_error)?;
                written += chunk.len() as u64;
            }
            file.sync_all().await.map_err(local_error)
        }
        .await;
        let actual = hex(&hasher.finalize());
        let failed = match copied {
            Err(e) => Some(e),
            Ok(()) if !actual.eq_ignore_ascii_case(sha256) => {
                Some(RepositoryError::Checksum { location: self.display(), path: path.to_string(), expected: sha256.to_string(), actual })
            }
            Ok(()) => None,
        };
        match failed {
            Some(e) => {
                drop(file);
                let _ = std::fs::remove_file(local);
                Err(e)
            }
            None => {
                drop(file);
                let opened = self.open_file(path, local);
                if opened.is_err() {
                    let _ = std::fs::remove_file(local);
                }
                opened.map(|plain| plain.unwrap_or(written))
            }
        }
    }

    /// The verified download `local` decrypted in place when it is an age
    /// file (streamed through a `.age` file beside it); its plain size then.
    fn open_file(&self, path: &str, local: &Path) -> Result<Option<u64>, RepositoryError> {
        let local_error = |source| RepositoryError::Local { path: local.display().to_string(), source };
        if !crypt::is_sealed(&file_head(local).map_err(local_error)?) {
            return Ok(None);
        }
        let Some(keys) = self.crypt.as_ref().and_then(|c| c.keys.as_ref()) else {
            return Err(crypt::needs_key(&file_head(local).map_err(local_error)?, path).into());
        };
        let sealed = local.with_extension("age-download");
        std::fs::rename(local, &sealed).map_err(local_error)?;
        let result = (|| {
            let mut reader = keys.open(std::fs::File::open(&sealed).map_err(local_error)?, path)?;
            let mut out = std::fs::File::create(local).map_err(local_error)?;
            let n = std::io::copy(&mut reader, &mut out).map_err(|e| CryptError::Damaged { what: path.to_string(), message: format!("its encrypted data is damaged ({e})") })?;
            out.sync_all().map_err(local_error)?;
            Ok::<u64, RepositoryError>(n)
        })();
        let _ = std::fs::remove_file(&sealed);
        result.map(Some)
    }

    /// The size of the object at `path`, `None` when there is none.
    pub async fn head(&self, path: &str) -> Result<Option<u64>, RepositoryError> {
        match self.store.head(&self.full(path)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_error("looking up", path, e)),
        }
    }

    /// The SHA-256 of an object, streamed (never whole in memory) in one
    /// request: rclone's S3 server answers a range request with the whole
    /// object (200, not 206), which object_store refuses.
    pub async fn sha256_of(&self, path: &str, size: u64) -> Result<(String, Vec<u8>), RepositoryError> {
        use futures::StreamExt;
        let mut hasher = Sha256::new();
        let mut read = 0u64;
        let mut head = Vec::new();
        let mut stream = self.store.get(&self.full(path)).await.map_err(|e| self.store_error("reading", path, e))?.into_stream();
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.map_err(|e| self.store_error("reading", path, e))?;
            read += bytes.len() as u64;
            hasher.update(&bytes);
            if head.len() < HEAD_BYTES {
                head.extend_from_slice(&bytes[..bytes.len().min(HEAD_BYTES - head.len())]);
            }
        }
        if read != size {
            return Err(RepositoryError::Store { location: self.display(), what: "reading", path: path.to_string(), message: format!("{read} bytes read, {size} expected") });
        }
        Ok((hex(&hasher.finalize()), head))
    }

    /// Whether objects are encrypted (`OMNI_ENCRYPT_*`).
    pub fn encrypts(&self) -> bool {
        self.crypt.as_ref().is_some_and(|c| c.encryption.is_on())
    }

    /// The sealer for the next object; `None` when nothing is encrypted. An
    /// error (a recipients file gone unreadable) stops the upload: fail closed.
    fn sealer(&self) -> Result<Option<crypt::Sealer>, RepositoryError> {
        match &self.crypt {
            Some(c) if c.encryption.is_on() => Ok(Some(c.encryption.sealer()?)),
            _ => Ok(None),
        }
    }

    /// The public keys the next objects are encrypted to (see [`Stored::recipients`]).
    pub fn sealer_recipients(&self) -> Result<Vec<String>, RepositoryError> {
        Ok(self.sealer()?.map(|s| s.recipients()).unwrap_or_default())
    }

    /// Writes `plain` at `path` once, encrypted when encryption is on (see
    /// the module's text); returns what is stored.
    pub async fn put_object(&self, path: &str, plain: Bytes) -> Result<Stored, RepositoryError> {
        let (bytes, recipients) = match self.sealer()? {
            None => (plain, Vec::new()),
            Some(sealer) => {
                let what = path.to_string();
                let sealed = tokio::task::spawn_blocking(move || sealer.seal(&plain, &what).map(|s| (s, sealer.recipients())))
                    .await
                    .map_err(|e| RepositoryError::Local { path: path.to_string(), source: std::io::Error::other(e) })??;
                (Bytes::from(sealed.0), sealed.1)
            }
        };
        let (mut size, mut sha256) = (bytes.len() as u64, sha256_hex(&bytes));
        let put = self.put_once(path, bytes).await?;
        if put == Put::AlreadyThere && !recipients.is_empty() {
            // The earlier upload's ciphertext is what the manifest must name.
            let there = self.get(path).await?;
            (size, sha256) = (there.len() as u64, sha256_hex(&there));
        }
        Ok(Stored { put, size, sha256, recipients })
    }

    /// Uploads the file `local` to `path` once ([`Repository::put_file_once`]),
    /// encrypted when encryption is on: a small file sealed in memory, a
    /// big one sealed while its parts are uploaded; over an object already
    /// there, sealed whole into the scratch directory first to be compared.
    pub async fn put_file(&self, path: &str, local: &Path) -> Result<Stored, RepositoryError> {
        let Some(sealer) = self.sealer()? else {
            let (put, size, sha256) = self.put_file_once(path, local).await?;
            return Ok(Stored { put, size, sha256, recipients: Vec::new() });
        };
        let local_size = std::fs::metadata(local).map_err(|source| RepositoryError::Local { path: local.display().to_string(), source })?.len();
        if local_size <= SINGLE_PUT_MAX {
            let plain = std::fs::read(local).map_err(|source| RepositoryError::Local { path: local.display().to_string(), source })?;
            return self.put_object(path, Bytes::from(plain)).await;
        }
        // A big file with no object there yet: sealed while it is uploaded.
        if self.head(path).await?.is_none() {
            let recipients = sealer.recipients();
            let (size, sha256) = self.put_sealed_stream(path, local, sealer).await?;
            return Ok(Stored { put: Put::Created, size, sha256, recipients });
        }
        // An object is there (an earlier upload whose answer was lost?):
        // sealed whole first, then compared as put_file_once compares.
        let scratch = self.crypt.as_ref().and_then(|c| c.scratch.clone()).unwrap_or_else(std::env::temp_dir);
        let local_error = |source| RepositoryError::Local { path: scratch.display().to_string(), source };
        std::fs::create_dir_all(&scratch).map_err(local_error)?;
        let sealed = scratch.join(format!("{}.age", path.replace('/', "_")));
        let recipients = sealer.recipients();
        let (src, dst) = (local.to_path_buf(), sealed.clone());
        let done = tokio::task::spawn_blocking(move || sealer.seal_file(&src, &dst)).await.map_err(|e| local_error(std::io::Error::other(e)))?;
        if let Err(e) = done {
            let _ = std::fs::remove_file(&sealed);
            // The plain file went away meanwhile: the caller's NotFound.
            if let CryptError::Io { source, .. } = &e {
                if source.kind() == std::io::ErrorKind::NotFound && !local.exists() {
                    return Err(RepositoryError::Local { path: local.display().to_string(), source: std::io::Error::from(std::io::ErrorKind::NotFound) });
                }
            }
            return Err(e.into());
        }
        let result = self.put_file_once(path, &sealed).await;
        let _ = std::fs::remove_file(&sealed);
        let (put, mut size, mut sha256) = result?;
        if put == Put::AlreadyThere {
            // The earlier upload's ciphertext (its header may differ in length) is what is stored.
            size = self.head(path).await?.unwrap_or(size);
            sha256 = self.sha256_of(path, size).await?.0;
        }
        Ok(Stored { put, size, sha256, recipients })
    }

    /// Uploads `local`, a file already sealed on this machine
    /// (`OMNI_ENCRYPT_LOCAL`, `pitr/sealed.rs`), as it is: the server holds
    /// public keys only and could not seal its content again. The object
    /// is the file's bytes, the recipients those its header names; a file
    /// that is not an age file is refused, never uploaded plain.
    pub async fn put_sealed_file(&self, path: &str, local: &Path) -> Result<Stored, RepositoryError> {
        let head = file_head(local).map_err(|source| RepositoryError::Local { path: local.display().to_string(), source })?;
        if !crypt::is_sealed(&head) {
            return Err(CryptError::Damaged { what: local.display().to_string(), message: "named as encrypted (.age) but not an age file: refusing to upload it".into() }.into());
        }
        let recipients = crypt::header_recipients(&head);
        let (put, mut size, mut sha256) = self.put_file_once(path, local).await?;
        if put == Put::AlreadyThere {
            // An earlier upload of another sealing of the same content (same recipients, same length).
            size = self.head(path).await?.unwrap_or(size);
            sha256 = self.sha256_of(path, size).await?.0;
        }
        Ok(Stored { put, size, sha256, recipients })
    }

    /// `local` sealed and uploaded in parts at the same time (the sealing
    /// thread writes into [`Pieces`], the upload sends them as they come):
    /// the upload of a big file costs little more than without encryption.
    /// Any error, sealing or sending, aborts the upload: nothing
    /// half-written, nothing plain. Returns the stored size and SHA-256.
    async fn put_sealed_stream(&self, path: &str, local: &Path, sealer: crypt::Sealer) -> Result<(u64, String), RepositoryError> {
        let src = local.to_path_buf();
        self.put_pieces(path, move |pieces| {
            let mut input = std::fs::File::open(&src).map_err(|source| RepositoryError::Local { path: src.display().to_string(), source })?;
            let io = |source| CryptError::Io { what: src.display().to_string(), source };
            let mut sealed = sealer.wrap(pieces).map_err(io)?;
            std::io::copy(&mut input, &mut sealed).map_err(io)?;
            sealed.finish().map_err(io)?;
            Ok(())
        })
        .await
    }

    /// The content of the object at `path`: decrypted when it is an age
    /// file (with the restore's identity; on the server, its plain copy
    /// kept locally), as stored otherwise. An encrypted object that cannot
    /// be opened is [`CryptError::NoKey`] or [`CryptError::WrongKey`],
    /// naming the keys it needs.
    pub async fn get_plain(&self, path: &str) -> Result<Bytes, RepositoryError> {
        let stored = self.get(path).await?;
        self.open_stored(path, stored)
    }

    /// [`Repository::get_plain`], with the stored bytes checked against `sha256` first.
    pub async fn get_plain_verified(&self, path: &str, sha256: &str) -> Result<Bytes, RepositoryError> {
        let stored = self.get_verified(path, sha256).await?;
        self.open_stored(path, stored)
    }

    fn open_stored(&self, path: &str, stored: Bytes) -> Result<Bytes, RepositoryError> {
        if !crypt::is_sealed(&stored) {
            return Ok(stored);
        }
        if let Some(keys) = self.crypt.as_ref().and_then(|c| c.keys.as_ref()) {
            return Ok(Bytes::from(keys.open_bytes(&stored, path)?));
        }
        if let Some(copy) = self.plain_copy(path).and_then(|p| std::fs::read(p).ok()) {
            return Ok(Bytes::from(copy));
        }
        Err(crypt::needs_key(&stored, path).into())
    }

    fn plain_copy(&self, path: &str) -> Option<PathBuf> {
        let dir = self.crypt.as_ref()?.plain_copies.as_ref()?;
        Some(dir.join(path))
    }

    /// Keeps `plain`, the content of the encrypted object `path`, locally
    /// (manifests and `.history` files: what retention and the window read
    /// back). Nothing is kept when objects are not encrypted.
    pub fn keep_plain_copy(&self, path: &str, plain: &[u8]) -> std::io::Result<()> {
        let Some(copy) = self.plain_copy(path).filter(|_| self.encrypts()) else { return Ok(()) };
        if let Some(dir) = copy.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomically(&copy, plain)
    }

    /// Every object under `prefix` (relative to the repository's own
    /// prefix; `""` for all), in name order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, RepositoryError> {
        let mut found = Vec::new();
        let root = if prefix.is_empty() && self.location.prefix.is_empty() { None } else { Some(self.full(prefix.trim_end_matches('/'))) };
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            let listed = self.store.list_with_delimiter(dir.as_ref()).await.map_err(|e| self.store_error("listing", prefix, e))?;
            found.extend(listed.objects.iter().map(|o| Listed { path: self.relative(&o.location), size: o.size, modified: o.last_modified }));
            pending.extend(listed.common_prefixes.into_iter().map(Some));
        }
        found.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(found)
    }

    /// When the newest object under `prefix` was written, by the store's
    /// clock (`None`: no object there): where a restore's WAL ends in time.
    pub async fn newest_write(&self, prefix: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, RepositoryError> {
        let mut newest = None;
        let mut pending = vec![Some(self.full(prefix.trim_end_matches('/')))];
        while let Some(dir) = pending.pop() {
            let listed = self.store.list_with_delimiter(dir.as_ref()).await.map_err(|e| self.store_error("listing", prefix, e))?;
            newest = listed.objects.iter().map(|o| o.last_modified).chain(newest).max();
            pending.extend(listed.common_prefixes.into_iter().map(Some));
        }
        Ok(newest)
    }

    /// Deletes the object at `path` (none there is not an error).
    pub async fn delete(&self, path: &str) -> Result<(), RepositoryError> {
        match self.store.delete(&self.full(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                if let Some(copy) = self.plain_copy(path) {
                    let _ = std::fs::remove_file(copy);
                }
                Ok(())
            }
            Err(e) => Err(self.store_error("deleting", path, e)),
        }
    }
}

/// Whether S3 requests go with `UNSIGNED-PAYLOAD` instead of the SHA-256
/// of their body in the SigV4 signature: yes over HTTPS (AWS's own
/// endpoint when none is set), unless `AWS_UNSIGNED_PAYLOAD` decides.
/// Over TLS the body's hash in the signature adds nothing TLS does not
/// already check on the way, and every object's own SHA-256 is in its
/// manifest (or `repository.json`) and checked at restore; yet it cost a
/// second SHA-256 pass over every byte uploaded, half the upload's CPU
/// (BENCHMARKS.md, the off-site profile). Over plain HTTP (`AWS_ALLOW_HTTP`,
/// a store on the same host) the signature keeps covering the bytes.
fn unsigned_payload_by_default(endpoints: &[Option<String>], variable_set: bool) -> bool {
    !variable_set && endpoints.iter().flatten().all(|e| e.trim().to_ascii_lowercase().starts_with("https://"))
}

/// Installs ring as rustls' process-wide crypto provider (the HTTP client
/// of the cloud stores is built without one); once, and harmless when one
/// is already installed.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// How much of an object's start is read to see its age header.
const HEAD_BYTES: usize = 64 * 1024;

/// The first bytes of a local file (its age header, when it is one).
fn file_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    std::fs::File::open(path)?.take(HEAD_BYTES as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 of a file, read in blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hex(&hasher.finalize()))
}

/// A server-side encryption key the S3 client would silently ignore: it
/// sends a KMS key id only with `aws:kms`/`aws:kms:dsse` and a customer key
/// only with `sse-c`, so a key set alone would leave the objects encrypted
/// with something else, or not at all, without a word.
fn sse_mismatch(kind: Option<&str>, kms_key: bool, customer_key: bool) -> Option<String> {
    let named = kind.map_or("not set".to_owned(), |k| format!("{k:?}"));
    if customer_key && kind != Some("sse-c") {
        return Some(format!(
            "AWS_SSE_CUSTOMER_KEY_BASE64 is set but AWS_SERVER_SIDE_ENCRYPTION is {named}: the key would not be sent; set AWS_SERVER_SIDE_ENCRYPTION=sse-c (SSE-C) or unset the key"
        ));
    }
    if kms_key && !matches!(kind, Some("aws:kms" | "aws:kms:dsse")) {
        return Some(format!("AWS_SSE_KMS_KEY_ID is set but AWS_SERVER_SIDE_ENCRYPTION is {named}: the key would not be used; set AWS_SERVER_SIDE_ENCRYPTION=aws:kms (SSE-KMS) or unset the key"));
    }
    None
}

/// The bytes of one multipart upload on their way from the thread that
/// reads (or seals) them to the upload: gathered into pieces of
/// [`PIECE_BYTES`], each hashed, counted and sent (blocking while
/// [`PIECES_QUEUED`] wait: the upload sets the pace).
struct Pieces {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    hasher: Sha256,
    size: u64,
}

impl Pieces {
    /// Sends the piece gathered so far (none: nothing).
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE_BYTES));
        self.hasher.update(&piece);
        self.size += piece.len() as u64;
        self.tx.blocking_send(Bytes::from(piece)).map_err(|_| std::io::Error::other("the upload stopped"))
    }

    /// Everything `input` holds, read straight into the pieces (no copy, no zeroing).
    fn read_from(&mut self, input: &mut impl std::io::Read) -> std::io::Result<()> {
        use std::io::Read;
        loop {
            let room = (PIECE_BYTES - self.buf.len()) as u64;
            if input.by_ref().take(room).read_to_end(&mut self.buf)? == 0 {
                return Ok(());
            }
            if self.buf.len() == PIECE_BYTES {
                self.send()?;
            }
        }
    }
}

impl std::io::Write for Pieces {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(PIECE_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIECE_BYTES {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The credential variables whose values never appear in a message.
const SECRET_VARS: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    // SSE-C: the key the store encrypts with and must never be shown.
    "AWS_SSE_CUSTOMER_KEY_BASE64",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
];

/// The values of the credential variables in the environment, for the
/// log's redaction.
pub fn secrets() -> Vec<String> {
    SECRET_VARS.iter().filter_map(|v| std::env::var(v).ok()).filter(|v| v.len() >= 4).collect()
}

/// A store's error text made safe to show: the query string of every URL
/// in it (presigned signatures, SAS tokens) and the credential values of
/// the environment become `***`.
pub fn redact(text: &str) -> String {
    let mut out = redact_queries(text);
    for secret in secrets() {
        out = out.replace(&secret, "***");
    }
    out
}

fn redact_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // Copy up to the end of "://", then the URL up to its query string.
        out.push_str(&rest[..at + 3]);
        rest = &rest[at + 3..];
        let end = rest.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')' | ',')).unwrap_or(rest.len());
        let url = &rest[..end];
        match url.find('?') {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?***");
            }
            None => out.push_str(url),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}


/// Writes `path` through `<path>.tmp`: flushed, renamed over it, the
/// directory flushed, so a crash leaves the old content or the new, never a
/// half file (the shipper's `repository.json`, the plain copies).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_side_encryption_key_without_its_kind_is_refused_naming_both_variables() {
        let customer = sse_mismatch(None, false, true).unwrap();
        assert!(customer.contains("AWS_SSE_CUSTOMER_KEY_BASE64") && customer.contains("AWS_SERVER_SIDE_ENCRYPTION=sse-c"), "{customer}");
        assert!(sse_mismatch(Some("AES256"), false, true).is_some());
        assert_eq!(sse_mismatch(Some("sse-c"), false, true), None);
        let kms = sse_mismatch(Some("sse-c"), true, false).unwrap();
        assert!(kms.contains("AWS_SSE_KMS_KEY_ID") && kms.contains("\"sse-c\""), "{kms}");
        assert_eq!(sse_mismatch(Some("aws:kms"), true, false), None);
        assert_eq!(sse_mismatch(Some("aws:kms:dsse"), true, false), None);
        assert_eq!(sse_mismatch(Some("AES256"), false, false), None, "SSE-S3 needs no key");
        assert_eq!(sse_mismatch(None, false, false), None);
    }

    #[tokio::test]
    async fn a_download_to_a_file_is_kept_only_when_its_sha256_matches() {
        let root = std::env::temp_dir().join(format!("omni-store-get-{}", std::process::id()));
        let repo = Repository::open(&format!("file://{}/repo", root.display())).unwrap();
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        repo.put_once("base/x/base.tar.lz4", Bytes::from(body.clone())).await.unwrap();
        let good = root.join("good");
        let written = repo.get_to_file_verified("base/x/base.tar.lz4", &good, &sha256_hex(&body)).await.unwrap();
        assert_eq!((written, std::fs::read(&good).unwrap()), (body.len() as u64, body.clone()));
        let bad = root.join("bad");
        let refused = repo.get_to_file_verified("base/x/base.tar.lz4", &bad, &"0".repeat(64)).await;
        assert!(matches!(refused, Err(RepositoryError::Checksum { .. })), "{refused:?}");
        assert!(!bad.exists(), "a file whose SHA-256 does not match is not left behind");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn encrypted_objects_are_age_files_a_retry_is_the_same_upload_and_only_the_key_or_a_plain_copy_reads_them() {
        use age::secrecy::ExposeSecret;
        let root = std::env::temp_dir().join(format!("omni-store-crypt-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&root).unwrap();
        let identity = age::x25519::Identity::generate();
        let recipients = root.join("recipients.txt");
        std::fs::write(&recipients, format!("{}\n", identity.to_public())).unwrap();
        let key = root.join("key.txt");
        std::fs::write(&key, format!("{}\n", identity.to_string().expose_secret())).unwrap();
        let encryption = Encryption::from_settings(&crypt::EncryptSettings { recipients_file: Some(recipients.clone()), ..Default::default() }).unwrap();
        let url = format!("file://{}/repo", root.display());
        let server = Repository::open(&url).unwrap().with_crypt(Crypt { encryption, keys: None, plain_copies: Some(root.join("plain")), scratch: Some(root.join("outbox")) });

        let plain = Bytes::from(vec![7u8; 100_000]);
        let first = server.put_object("g/wal/x.lz4", plain.clone()).await.unwrap();
        assert_eq!((first.put, first.recipients.clone()), (Put::Created, vec![identity.to_public().to_string()]));
        let stored = server.get("g/wal/x.lz4").await.unwrap();
        assert!(crypt::is_sealed(&stored) && sha256_hex(&stored) == first.sha256);
        // A retry seals again (other bytes, same size, same recipients): the upload already there.
        let again = server.put_object("g/wal/x.lz4", plain.clone()).await.unwrap();
        assert_eq!((again.put, again.sha256.clone()), (Put::AlreadyThere, first.sha256.clone()));
        assert_eq!(server.get("g/wal/x.lz4").await.unwrap(), stored, "never overwritten");
        // Other content of another size is still a conflict.
        assert!(matches!(server.put_object("g/wal/x.lz4", Bytes::from(vec![1u8; 10])).await, Err(RepositoryError::Conflict { .. })));

        // A small file (sealed in memory) and one past SINGLE_PUT_MAX (sealed
        // while its parts are uploaded); a retry of the big one goes through
        // the outbox, which is left empty.
        let local = root.join("base.tar.lz4");
        std::fs::write(&local, vec![3u8; 300_000]).unwrap();
        let file = server.put_file("g/base/1/base.tar.lz4", &local).await.unwrap();
        assert!(crypt::is_sealed(&server.get("g/base/1/base.tar.lz4").await.unwrap()));
        let big_plain: Vec<u8> = (0..SINGLE_PUT_MAX as usize + 3_000_000).map(|i| (i % 251) as u8).collect();
        let big = root.join("big.tar.lz4");
        std::fs::write(&big, &big_plain).unwrap();
        let first = server.put_file("g/base/1/big.tar.lz4", &big).await.unwrap();
        assert_eq!(first.put, Put::Created);
        let stored = server.get("g/base/1/big.tar.lz4").await.unwrap();
        assert!(crypt::is_sealed(&stored) && sha256_hex(&stored) == first.sha256 && stored.len() as u64 == first.size);
        let again = server.put_file("g/base/1/big.tar.lz4", &big).await.unwrap();
        assert_eq!((again.put, again.sha256), (Put::AlreadyThere, first.sha256.clone()));
        assert_eq!(std::fs::read_dir(root.join("outbox")).map_or(0, |d| d.count()), 0);

        // The server cannot read what it wrote, except through its plain copy.
        let err = server.get_plain("g/wal/x.lz4").await.unwrap_err().to_string();
        assert!(err.contains("OMNI_DECRYPT_IDENTITY_FILE") && err.contains(&crypt::short(&identity.to_public().to_string())), "{err}");
        server.keep_plain_copy("g/base/1/manifest.json", b"{}").unwrap();
        server.put_object("g/base/1/manifest.json", Bytes::from_static(b"{}")).await.unwrap();
        assert_eq!(server.get_plain("g/base/1/manifest.json").await.unwrap(), Bytes::from_static(b"{}"));
        server.delete("g/base/1/manifest.json").await.unwrap();
        assert!(!root.join("plain/g/base/1/manifest.json").exists(), "a deleted object's plain copy goes with it");

        // The restore's identity reads everything, a verified download included.
        let keys = crypt::Keys::load(&key, "--identity").unwrap();
        let restore = Repository::open(&url).unwrap().with_crypt(Crypt { keys: Some(keys), ..Crypt::default() });
        assert_eq!(restore.get_plain("g/wal/x.lz4").await.unwrap(), plain);
        let down = root.join("down");
        assert_eq!(restore.get_to_file_verified("g/base/1/base.tar.lz4", &down, &file.sha256).await.unwrap(), 300_000);
        assert_eq!(std::fs::read(&down).unwrap(), vec![3u8; 300_000]);
        let down = root.join("down-big");
        assert_eq!(restore.get_to_file_verified("g/base/1/big.tar.lz4", &down, &first.sha256).await.unwrap(), big_plain.len() as u64);
        assert!(std::fs::read(&down).unwrap() == big_plain);

        // Fail closed: the recipients file unreadable stops the write, nothing plain goes.
        std::fs::remove_file(&recipients).unwrap();
        let err = server.put_object("g/wal/y.lz4", plain).await.unwrap_err().to_string();
        assert!(err.contains("OMNI_ENCRYPT_RECIPIENTS_FILE") && err.contains("nothing is uploaded"), "{err}");
        assert_eq!(server.head("g/wal/y.lz4").await.unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn urls_of_every_scheme_parse() {
        let s3 = Location::parse("s3://my-bucket/omni/prod/").unwrap();
        assert_eq!((s3.scheme, s3.bucket.as_str(), s3.prefix.as_str()), (Scheme::S3, "my-bucket", "omni/prod"));
        assert_eq!(s3.display(), "s3://my-bucket/omni/prod");
        let gs = Location::parse("gs://b").unwrap();
        assert_eq!((gs.scheme, gs.prefix.as_str()), (Scheme::Gcs, ""));
        assert_eq!(Location::parse("az://container/p").unwrap().scheme, Scheme::Azure);
        let file = Location::parse("file:///srv/offsite/").unwrap();
        assert_eq!((file.scheme, file.bucket.as_str()), (Scheme::File, "/srv/offsite"));
    }

    #[test]
    fn malformed_urls_are_refused_with_what_to_write() {
        for bad in ["", "bucket/prefix", "ftp://host/x", "s3://", "s3://key:secret@bucket/p", "s3://bucket/a/../b", "file://relative/path", "file:///", "s3://bucket/p?x=1", "s3://bu cket/p"] {
            let e = Location::parse(bad).expect_err(bad);
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(Location::parse("ftp://h/x").unwrap_err().contains("unknown scheme \"ftp\""));
        assert!(Location::parse("s3://key:secret@bucket/p").unwrap_err().contains("AWS_ACCESS_KEY_ID"));
    }

    #[test]
    fn payloads_go_unsigned_over_https_only_unless_the_variable_says() {
        let https = Some("https://s3.example.com".to_string());
        let http = Some("http://127.0.0.1:9000".to_string());
        assert!(unsigned_payload_by_default(&[None, None], false), "AWS's own endpoint is HTTPS");
        assert!(unsigned_payload_by_default(&[https.clone(), None], false));
        assert!(!unsigned_payload_by_default(&[http.clone(), None], false));
        assert!(!unsigned_payload_by_default(&[https.clone(), http], false), "one plain endpoint signs");
        assert!(!unsigned_payload_by_default(&[https, None], true), "AWS_UNSIGNED_PAYLOAD decides when set");
    }

    #[test]
    fn error_texts_lose_query_strings() {
        let text = "Error performing PUT https://host:9000/bucket/x?X-Amz-Signature=abc&X-Amz-Credential=AKIA in 1s, \"http://a/b?sig=1\"";
        let safe = redact_queries(text);
        assert!(!safe.contains("abc") && !safe.contains("AKIA") && !safe.contains("sig=1"), "{safe}");
        assert!(safe.contains("https://host:9000/bucket/x?***"), "{safe}");
        assert_eq!(redact_queries("no url here"), "no url here");
    }

    #[tokio::test]
    async fn a_write_is_once_and_a_retry_of_the_same_bytes_is_not_an_error() {
        let dir = std::env::temp_dir().join(format!("omni-repo-test-{}-{:x}", std::process::id(), rand::random::<u32>()));
        let repo = Repository::open(&format!("file://{}", dir.display())).unwrap();
        assert_eq!(repo.put_once("a/b", Bytes::from_static(b"one")).await.unwrap(), Put::Created);
        assert_eq!(repo.put_once("a/b", Bytes::from_static(b"one")).await.unwrap(), Put::AlreadyThere);
        let conflict = repo.put_once("a/b", Bytes::from_static(b"two")).await.unwrap_err();
        assert!(matches!(conflict, RepositoryError::Conflict { .. }), "{conflict}");
        assert_eq!(repo.get("a/b").await.unwrap(), Bytes::from_static(b"one"), "never overwritten");
        assert!(repo.get_verified("a/b", &sha256_hex(b"one")).await.is_ok());
        assert!(matches!(repo.get_verified("a/b", &sha256_hex(b"two")).await, Err(RepositoryError::Checksum { .. })));
        repo.put_once("a/c/d", Bytes::from_static(b"x")).await.unwrap();
        let listed: Vec<String> = repo.list("a").await.unwrap().into_iter().map(|l| l.path).collect();
        assert_eq!(listed, ["a/b", "a/c/d"]);
        repo.delete("a/b").await.unwrap();
        repo.delete("a/b").await.unwrap();
        assert_eq!(repo.head("a/b").await.unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
