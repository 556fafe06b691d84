//! Reading the rest of a request body that a handler answered without reading.
//!
//! A handler may decide before the body has arrived: a 401 for a missing API
//! key on a 50 MB upload, a 415, a 413 from the declared length. hyper then
//! sends the answer and closes the connection with the unread bytes still in
//! the socket's receive buffer, which makes the kernel send a reset. A client
//! still writing the body (the gateway's proxy, `curl -T`) sees the reset
//! before it has read the answer and reports a broken connection instead of
//! the 401. nginx solves the same problem with a "lingering close"; this is
//! that: the middleware keeps what the handler left of the body and reads it
//! to the end, bounded, before the answer goes out.
//!
//! Bounded three ways, so a client cannot hold a worker's task: at most
//! [`MAX_DRAIN`] bytes (a declared length beyond it is not drained at all; the
//! connection is closed instead), at most [`MAX_TIME`] in all, and at most
//! [`MAX_IDLE`] without a byte.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::{header, HeaderValue},
    middleware::Next,
    response::Response,
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

/// The largest remainder read to its end: the import upload limit.
pub const MAX_DRAIN: u64 = crate::import_routes::UPLOAD_LIMIT;
const MAX_TIME: Duration = Duration::from_secs(30);
const MAX_IDLE: Duration = Duration::from_secs(5);

/// The middleware; outermost, so it sees every answer.
pub async fn drain_unread_body(request: Request, next: Next) -> Response {
    // Most requests (every GET) have no body: nothing can be left unread.
    if HttpBody::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let left = Arc::new(Mutex::new(None));
    let request = request.map(|body| Body::new(Tracked { inner: Some(body), left: left.clone(), ended: false }));
    let mut response = next.run(request).await;
    let unread = left.lock().expect("the body slot is never poisoned").take();
    if let Some(body) = unread {
        if declared.is_some_and(|n| n > MAX_DRAIN) || !drain(body).await {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    response
}

/// Reads `body` to its end within the bounds; false when a bound stopped it.
async fn drain(mut body: Body) -> bool {
    let deadline = tokio::time::Instant::now() + MAX_TIME;
    let mut read: u64 = 0;
    loop {
        let wait = MAX_IDLE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > MAX_DRAIN {
                    return false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

/// The request body as handlers see it; if dropped before its end, what is
/// left goes back to the middleware.
struct Tracked {
    inner: Option<Body>,
    left: Arc<Mutex<Option<Body>>>,
    ended: bool,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(HttpBody::size_hint).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if !self.ended && !inner.is_end_stream() {
                *self.left.lock().expect("the body slot is never poisoned") = Some(inner);
            }
        }
    }
}
