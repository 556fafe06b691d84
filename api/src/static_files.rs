//! The UI for every path outside `/api`: the files of `ui-dist/`, built into
//! the binary ([`BuiltIn`]), or, when `OMNI_UI_DIR` is set (development),
//! plain files read from that directory at each request.
//!
//! Paths are untrusted: the raw request path is percent-decoded once and
//! refused (400) if it holds `..`, backslashes, NUL or invalid UTF-8. From a
//! directory, the file found is canonicalized and must still lie inside it,
//! so neither encoding tricks nor symlinks can reach a file outside it; the
//! built-in UI has no file outside it to reach. Unknown paths get
//! `index.html` (the UI routes in the browser). Responses carry an ETag (the
//! content's SHA-256 for the built-in files) so browsers revalidate with a
//! cheap 304.
//!
//! Every UI answer (files, 304s and errors alike) carries [`CONTENT_SECURITY_POLICY`]
//! (scripts, styles, images and connections from this origin only, no inline
//! script or style attribute, no plugins, never framed), `X-Frame-Options: DENY`
//! for browsers without `frame-ancestors`, `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer`: a page on another port or a sibling
//! subdomain cannot frame the signed-in UI and click Delete or Restore in it.

use std::{
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use percent_encoding::percent_decode_str;

use crate::{errors::ApiError, routes::AppState};

/// Router fallback: JSON 404 under `/api`, the UI everywhere else.
pub async fn fallback(State(state): State<AppState>, request: Request) -> Response {
    let path = request.uri().path();
    if path == "/api" || path.starts_with("/api/") {
        return ApiError::not_found("not_found", format!("no API endpoint at {path}; see /api/v1/openapi.json")).into_response();
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response =
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "UI files are read with GET or HEAD").into_response();
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        protect(response.headers_mut());
        return response;
    }
    let served = match &state.settings.ui_dir {
        Some(dir) => serve_dir(dir, path, request.headers()).await,
        None => serve_built_in(path, request.headers()),
    };
    let mut response = match served {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    protect(response.headers_mut());
    response
}

/// What a UI page may load: its own files only. No `'unsafe-inline'`: the
/// theme bootstrap is `js/boot.js`, and the UI sets styles through the CSSOM,
/// never as `style` attributes.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The security headers of every UI answer.
fn protect(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

/// Turns the raw URL path into a relative path with only normal components.
fn relative_path(raw: &str) -> Result<PathBuf, ApiError> {
    let refuse = || ApiError::bad_request("invalid_path", "the path is not a valid UI file path");
    let decoded = percent_decode_str(raw).decode_utf8().map_err(|_| refuse())?;
    if decoded.contains(['\0', '\\']) {
        return Err(refuse());
    }
    let mut relative = PathBuf::new();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return Err(refuse());
        }
        relative.push(segment);
    }
    // Belt and braces: nothing but plain names may remain.
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(refuse());
    }
    Ok(relative)
}

/// The files of `ui-dist/`, compiled into the binary. `debug-embed`: debug
/// builds embed them too, so a debug binary behaves as a release one
/// (it runs from any directory). Rebuilt when a file changes (`build.rs`).
#[derive(rust_embed::Embed)]
#[folder = "../ui-dist/"]
struct BuiltIn;

fn serve_built_in(raw_path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let relative = relative_path(raw_path)?;
    // Only plain names are left, so `/` joins them into the embedded key.
    let key = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
    let (name, file) = match BuiltIn::get(&key) {
        Some(file) => (key, file),
        None => ("index.html".to_owned(), BuiltIn::get("index.html").ok_or_else(|| ApiError::not_found("not_found", "the built-in UI has no index.html"))?),
    };
    let hash: String = file.metadata.sha256_hash()[..16].iter().map(|b| format!("{b:02x}")).collect();
    let etag = HeaderValue::from_str(&format!("\"{hash}\"")).expect("hex digits and quotes are a valid header value");
    let body = (!if_none_match(headers, &etag)).then(|| Body::from(file.data));
    Ok(answer(body, etag, content_type(Path::new(&name))))
}

/// 200 with `body`, or 304 when there is none; with the ETag and `no-cache`.
fn answer(body: Option<Body>, etag: HeaderValue, content_type: HeaderValue) -> Response {
    let mut response = match body {
        Some(body) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        None => StatusCode::NOT_MODIFIED.into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    // No fingerprinted file names: always revalidate, which the ETag makes cheap.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn serve_dir(ui_dir: &Path, raw_path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let relative = relative_path(raw_path)?;
    let root = tokio::fs::canonicalize(ui_dir).await.map_err(|e| {
        ApiError::internal(&format!("the UI directory {} (OMNI_UI_DIR) is not readable", ui_dir.display()), e)
    })?;
    let file = match resolve_inside(&root, &relative).await {
        Some(file) => file,
        None => resolve_inside(&root, Path::new("index.html"))
            .await
            .ok_or_else(|| ApiError::not_found("not_found", "no such UI file, and the UI has no index.html"))?,
    };
    let metadata = tokio::fs::metadata(&file).await.map_err(|e| ApiError::internal("reading a UI file", e))?;
    let etag = format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        metadata.ino(),
        metadata.len(),
        metadata.mtime(),
        metadata.mtime_nsec()
    );
    let etag = HeaderValue::from_str(&etag).expect("hex digits and quotes are a valid header value");
    let content_type = content_type(&file);

    let body = if if_none_match(headers, &etag) {
        None
    } else {
        Some(Body::from(tokio::fs::read(&file).await.map_err(|e| ApiError::internal("reading a UI file", e))?))
    };
    Ok(answer(body, etag, content_type))
}

/// The regular file at `root/relative`, only if its real path (symlinks
/// followed) is inside `root`.
async fn resolve_inside(root: &Path, relative: &Path) -> Option<PathBuf> {
    let real = tokio::fs::canonicalize(root.join(relative)).await.ok()?;
    let is_file = tokio::fs::metadata(&real).await.ok()?.is_file();
    (real.starts_with(root) && is_file).then_some(real)
}

fn content_type(file: &Path) -> HeaderValue {
    let mime = mime_guess::from_path(file).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(mime.essence_str(), "application/javascript" | "application/json" | "image/svg+xml");
    let value = if textual && mime.get_param("charset").is_none() {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.to_string()
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

/// RFC 9110 `If-None-Match`: `*` or a list of tags, compared weakly.
fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|value| {
        value.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/").as_bytes() == ours)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_traversal_in_any_encoding() {
        for raw in ["/../etc/passwd", "/a/%2e%2e/%2E%2E/etc", "/..%2fetc", "/a%5c..%5cb", "/a%00b", "/%ff", "/./x"] {
            assert!(relative_path(raw).is_err(), "{raw}");
        }
        assert_eq!(relative_path("/css//app.css").unwrap(), PathBuf::from("css/app.css"));
        assert_eq!(relative_path("/").unwrap(), PathBuf::new());
    }

    #[test]
    fn matches_etags_weakly_and_in_lists() {
        let etag = HeaderValue::from_static("\"1-2-3\"");
        let mut headers = HeaderMap::new();
        assert!(!if_none_match(&headers, &etag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\", W/\"1-2-3\""));
        assert!(if_none_match(&headers, &etag));
    }

    #[test]
    fn the_built_in_ui_is_the_ui_dist_directory() {
        let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui-dist");
        for name in ["index.html", "js/app.js", "styles.css"] {
            assert_eq!(BuiltIn::get(name).unwrap().data.as_ref(), std::fs::read(dist.join(name)).unwrap(), "{name}");
        }
        let mut on_disk = Vec::new();
        let mut dirs = vec![dist.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(entry.path());
                } else {
                    on_disk.push(entry.path().strip_prefix(&dist).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        assert_eq!(BuiltIn::iter().map(|n| n.into_owned()).collect::<Vec<_>>(), on_disk);
    }

    #[test]
    fn text_types_carry_a_charset() {
        assert_eq!(content_type(Path::new("a.html")), "text/html; charset=utf-8");
        assert_eq!(content_type(Path::new("a.png")), "image/png");
    }
}
