//! Google Cloud Storage uploads through the JSON API.
//!
//! `object_store`'s GCS client uploads with the XML API: `PUT
//! /<bucket>/<object>` for one request, `POST ...?uploads` then `PUT
//! ...?partNumber=&uploadId=` for parts. Real GCS accepts both, but
//! fake-gcs-server (the emulator the tests run, v1.54 and still its newest
//! release) routes a path-style `PUT`/`POST` only to its JSON upload handler,
//! which refuses a request without `uploadType` (400 "invalid uploadType")
//! unless it is a signed URL: the emulator departs from the real API there.
//!
//! The JSON API's uploads are the other documented way in, accepted by
//! both: one `uploadType=multipart` request (metadata and bytes) for a
//! put, with `ifGenerationMatch=0` for write-once (a 412 when an object is
//! there, on real GCS and on the emulator alike), and a resumable session
//! (`uploadType=resumable`, chunks of a multiple of 256 KiB with
//! `Content-Range`, the last one with the total size) for big files. The
//! object appears only when the last chunk is in, like the XML multipart
//! upload it replaces. Reads, listings, deletes and copies stay with
//! `object_store`'s client; the same credentials (its provider's bearer
//! token) sign both.
//!
//! <https://cloud.google.com/storage/docs/uploading-objects#uploading-an-object>
//! <https://cloud.google.com/storage/docs/performing-resumable-uploads>

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    UploadPart,
};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

/// GCS's own endpoint, `object_store`'s default too.
const DEFAULT_BASE_URL: &str = "https://storage.googleapis.com";
/// A resumable upload's chunks are multiples of this (but the last).
const CHUNK_ALIGN: usize = 256 * 1024;

/// A [`GoogleCloudStorage`] whose uploads go through the JSON API.
#[derive(Debug)]
pub struct JsonUploads {
    inner: Arc<GoogleCloudStorage>,
    http: reqwest::Client,
    base_url: String,
    bucket: String,
}

impl JsonUploads {
    /// Builds the store as `builder` describes it (the same base URL, the
    /// same credentials).
    pub fn build(builder: GoogleCloudStorageBuilder, timeout: Duration) -> object_store::Result<JsonUploads> {
        let base_url = base_url(&builder);
        let bucket = builder.get_config_value(&GoogleConfigKey::Bucket).unwrap_or_default();
        let inner = Arc::new(builder.build()?);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .build()
            .map_err(|e| generic(format!("building the HTTP client: {e}")))?;
        Ok(JsonUploads { inner, http, base_url, bucket })
    }

    fn upload_url(&self) -> String {
        format!("{}/upload/storage/v1/b/{}/o", self.base_url, utf8_percent_encode(&self.bucket, NON_ALPHANUMERIC))
    }

    async fn bearer(&self) -> object_store::Result<Option<String>> {
        let credential = self.inner.credentials().get_credential().await?;
        Ok(Some(credential.bearer.clone()).filter(|b| !b.is_empty()))
    }

    async fn request(&self, method: reqwest::Method, url: &str) -> object_store::Result<reqwest::RequestBuilder> {
        let mut request = self.http.request(method, url);
        if let Some(bearer) = self.bearer().await? {
            request = request.bearer_auth(bearer);
        }
        Ok(request)
    }
}

/// The base URL `object_store` itself uses for this builder: its
/// `google_base_url`, else the service account key's `gcs_base_url` (how
/// an emulator is named), else GCS.
fn base_url(builder: &GoogleCloudStorageBuilder) -> String {
    let from_key = |json: &str| serde_json::from_str::<serde_json::Value>(json).ok()?.get("gcs_base_url")?.as_str().map(str::to_string);
    builder
        .get_config_value(&GoogleConfigKey::BaseUrl)
        .or_else(|| builder.get_config_value(&GoogleConfigKey::ServiceAccountKey).and_then(|k| from_key(&k)))
        .or_else(|| {
            let path = builder.get_config_value(&GoogleConfigKey::ServiceAccount)?;
            from_key(&std::fs::read_to_string(path).ok()?)
        })
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string())
        .trim_end_matches('/')
        .to_string()
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic { store: "GCS", source: message.into() }
}

/// The error for a response that is not a success.
async fn refused(what: &str, path: &Path, response: reqwest::Response, mode: Option<&PutMode>) -> object_store::Error {
    let status = response.status();
    let body: String = response.text().await.unwrap_or_default().chars().take(300).collect();
    let source = format!("{what} {path}: {status}: {body}").into();
    let path = path.to_string();
    match status.as_u16() {
        412 if matches!(mode, Some(PutMode::Create)) => object_store::Error::AlreadyExists { path, source },
        412 => object_store::Error::Precondition { path, source },
        404 => object_store::Error::NotFound { path, source },
        401 | 403 => object_store::Error::PermissionDenied { path, source },
        _ => object_store::Error::Generic { store: "GCS", source },
    }
}

fn failed(what: &str, path: &Path, e: reqwest::Error) -> object_store::Error {
    // The error text names the URL: no query string (the object's name and
    // the precondition are all it holds, but keep the habit).
    generic(format!("{what} {path}: {}", e.without_url()))
}

/// The put result of an upload's JSON answer (`generation`, `etag`).
async fn put_result(response: reqwest::Response) -> PutResult {
    let body = response.bytes().await.unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |name: &str| json.get(name).and_then(|v| v.as_str()).map(str::to_string);
    PutResult { e_tag: field("etag"), version: field("generation"), extensions: Default::default() }
}

/// The query of an upload under `mode`: write-once is `ifGenerationMatch=0`.
fn precondition(mode: &PutMode) -> object_store::Result<Option<String>> {
    Ok(match mode {
        PutMode::Overwrite => None,
        PutMode::Create => Some("0".to_string()),
        PutMode::Update(v) => Some(v.version.clone().ok_or_else(|| generic("an update of a GCS object needs its generation".into()))?),
    })
}

impl fmt::Display for JsonUploads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GoogleCloudStorage({}, JSON API uploads)", self.bucket)
    }
}

#[async_trait]
impl ObjectStore for JsonUploads {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        let mut url = format!("{}?uploadType=multipart", self.upload_url());
        if let Some(generation) = precondition(&opts.mode)? {
            url.push_str(&format!("&ifGenerationMatch={}", utf8_percent_encode(&generation, NON_ALPHANUMERIC)));
        }
        // multipart/related: the object's metadata, then its bytes.
        const BOUNDARY: &str = "omni-gcs-upload-5f1c0b7e9d";
        let metadata = serde_json::json!({ "name": location.as_ref() }).to_string();
        let mut body = Vec::with_capacity(payload.content_length() + 256);
        body.extend_from_slice(format!("--{BOUNDARY}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n--{BOUNDARY}\r\ncontent-type: application/octet-stream\r\n\r\n").as_bytes());
        for part in payload.iter() {
            body.extend_from_slice(part);
        }
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let response = self
            .request(reqwest::Method::POST, &url)
            .await?
            .header("content-type", format!("multipart/related; boundary={BOUNDARY}"))
            .body(body)
            .send()
            .await
            .map_err(|e| failed("uploading", location, e))?;
        if !response.status().is_success() {
            return Err(refused("uploading", location, response, Some(&opts.mode)).await);
        }
        Ok(put_result(response).await)
    }

    async fn put_multipart_opts(&self, location: &Path, _opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        let response = self
            .request(reqwest::Method::POST, &format!("{}?uploadType=resumable", self.upload_url()))
            .await?
            .header("content-type", "application/json; charset=UTF-8")
            .body(serde_json::json!({ "name": location.as_ref() }).to_string())
            .send()
            .await
            .map_err(|e| failed("starting the upload of", location, e))?;
        if !response.status().is_success() {
            return Err(refused("starting the upload of", location, response, None).await);
        }
        let session = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| generic(format!("starting the upload of {location}: no session URI in the answer")))?
            .to_string();
        let state = Session { store: JsonUploads { inner: self.inner.clone(), http: self.http.clone(), base_url: self.base_url.clone(), bucket: self.bucket.clone() }, path: location.clone(), session, sent: 0, pending: Vec::new() };
        Ok(Box::new(Resumable { state: Arc::new(tokio::sync::Mutex::new(state)), queued: Arc::default() }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A resumable upload session: bytes are sent in 256 KiB multiples as they
/// come; what is left goes with the total size at [`MultipartUpload::complete`].
#[derive(Debug)]
struct Session {
    store: JsonUploads,
    path: Path,
    session: String,
    /// Bytes the store has.
    sent: u64,
    /// Bytes not sent yet (less than one alignment after each part).
    pending: Vec<u8>,
}

impl Session {
    /// Sends `pending[..len]`; `total` only with the last chunk.
    async fn send(&mut self, len: usize, total: Option<u64>) -> object_store::Result<()> {
        let range = match (len, total) {
            (0, Some(total)) => format!("bytes */{total}"),
            (_, total) => format!("bytes {}-{}/{}", self.sent, self.sent + len as u64 - 1, total.map_or("*".to_string(), |t| t.to_string())),
        };
        let chunk: Vec<u8> = self.pending.drain(..len).collect();
        let response = self
            .store
            .request(reqwest::Method::PUT, &self.session)
            .await?
            .header("content-range", range)
            .body(chunk)
            .send()
            .await
            .map_err(|e| failed("uploading a part of", &self.path, e))?;
        // 308: the chunk is in, more expected; 200/201: the object is complete.
        let done = response.status().is_success();
        if !(done || response.status().as_u16() == 308) || done != total.is_some() {
            return Err(refused("uploading a part of", &self.path, response, None).await);
        }
        self.sent += len as u64;
        Ok(())
    }
}

#[derive(Debug)]
struct Resumable {
    state: Arc<tokio::sync::Mutex<Session>>,
    /// Bytes given to [`MultipartUpload::put_part`], in the order of the
    /// calls (appended before the call returns): the session's chunks must
    /// follow that order, whichever part's future runs first (the store
    /// runs several at once, each on its own task).
    queued: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Resumable {
    /// The queued bytes, moved behind what the session holds.
    fn take_queued(&self, session: &mut Session) {
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        session.pending.append(&mut queued);
    }
}

#[async_trait]
impl MultipartUpload for Resumable {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        {
            let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
            for part in data.iter() {
                queued.extend_from_slice(part);
            }
        }
        let this = Resumable { state: self.state.clone(), queued: self.queued.clone() };
        Box::pin(async move {
            let mut session = this.state.lock().await;
            this.take_queued(&mut session);
            let aligned = session.pending.len() / CHUNK_ALIGN * CHUNK_ALIGN;
            if aligned > 0 {
                session.send(aligned, None).await?;
            }
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let mut session = self.state.lock().await;
        self.take_queued(&mut session);
        let rest = session.pending.len();
        let total = session.sent + rest as u64;
        session.send(rest, Some(total)).await?;
        Ok(PutResult { e_tag: None, version: None, extensions: Default::default() })
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let session = self.state.lock().await;
        // Cancelling a session answers 499 on GCS; nothing of it was an object.
        let _ = session.store.request(reqwest::Method::DELETE, &session.session).await?.send().await;
        Ok(())
    }
}
