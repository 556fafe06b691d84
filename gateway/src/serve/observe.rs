//! Seeing inside the supervisor over HTTP: the log ring, its live stream,
//! the metrics history and the status stream.
//!
//! | Path | Auth | What |
//! |---|---|---|
//! | `GET /gateway/logs?component=&level=&since=&q=&limit=` | API key (asked of the worker) | stored lines, JSON |
//! | `GET /gateway/logs/stream?component=&level=&since=&q=` | API key | new lines, server-sent events |
//! | `GET /gateway/metrics/history` | API key | samples every 5 s for the last hour, restart times |
//! | `GET /gateway/events` | public, like `/gateway/status` | `/gateway/status` documents, server-sent events |
//!
//! Streams are server-sent events rather than WebSocket: they only flow one
//! way, pass through proxies as a plain HTTP response, resume with
//! `since=`/`Last-Event-ID`, and need no upgrade handling in the gateway.
//! Each stream is a task that copies from a broadcast receiver (or the
//! status board's watch) into a small channel the response body reads. A
//! client that reads slowly fills its channel, its task waits, its broadcast
//! receiver lags and then skips ahead with an `event: skipped` telling how
//! many lines it lost; nobody else waits for it. Streams end when the
//! gateway begins to stop, so they never hold up the drain.
//!
//! A stream also ends after [`STREAM_LIFETIME`] (the browser's EventSource
//! reconnects by itself, resuming with `Last-Event-ID`), and one client
//! address (as the gateway believes it, see `OMNI_TRUSTED_PROXIES`; IPv6 by
//! /64) holds at most [`STREAMS_PER_CLIENT`] streams at once: beyond that,
//! 429. So no client can hold the gateway's connections for itself.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{broadcast, mpsc};

use crate::serve::{error, json, Body, Surface};
use crate::serve::logring::{parse_level, Filter, Line};

/// Lines returned by `/gateway/logs` unless `limit=` says otherwise.
const DEFAULT_LIMIT: usize = 1000;
/// Largest `limit=`.
const MAX_LIMIT: usize = crate::serve::logring::MAX_LINES;
/// Events buffered per stream client before its task waits (and then lags).
const STREAM_BUFFER: usize = 64;
/// A comment line this often keeps idle proxies from closing the stream and
/// finds clients that went away.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest gap between two status documents on `/gateway/events`.
const STATUS_REFRESH: Duration = Duration::from_secs(5);
/// A stream ends this long after it began; the client reconnects.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(3600);
/// Streams (logs and status together) one client address may hold open.
pub const STREAMS_PER_CLIENT: usize = 8;

/// Open streams per client address.
#[derive(Default)]
pub struct StreamSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open stream; dropping it (the stream's task ends) frees the slot.
pub struct StreamSlot {
    slots: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl StreamSlots {
    /// A slot for `client`, or the 429 to answer when it holds the most.
    #[allow(clippy::result_large_err)] // the error is the response to send
    fn take(&self, client: IpAddr) -> Result<StreamSlot, Response<Body>> {
        let key = match client.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        };
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_default();
        if *count >= STREAMS_PER_CLIENT {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                &format!("this address already has {STREAMS_PER_CLIENT} live streams open (logs and status together); close one, e.g. another tab, and retry"),
            );
            response.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("10"));
            return Err(response);
        }
        *count += 1;
        Ok(StreamSlot { slots: self.0.clone(), key })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// `GET /gateway/logs`.
pub async fn logs(surface: &Surface, req: Request<Incoming>, client: IpAddr) -> Response<Body> {
    if let Err(denied) = surface.auth.check(req.headers(), client).await {
        return denied;
    }
    let (filter, limit) = match parse_filter(req.uri().query(), true) {
        Ok(parsed) => parsed,
        Err((code, detail)) => return error(StatusCode::UNPROCESSABLE_ENTITY, code, &detail),
    };
    let page = surface.logs.query(&filter, limit);
    json(StatusCode::OK, &serde_json::to_value(page).expect("log lines serialize"))
}

/// `GET /gateway/logs/stream`.
pub async fn logs_stream(surface: &Surface, req: Request<Incoming>, client: IpAddr) -> Response<Body> {
    if let Err(denied) = surface.auth.check(req.headers(), client).await {
        return denied;
    }
    let (mut filter, _) = match parse_filter(req.uri().query(), false) {
        Ok(parsed) => parsed,
        Err((code, detail)) => return error(StatusCode::UNPROCESSABLE_ENTITY, code, &detail),
    };
    let slot = match surface.stream_slots.take(client) {
        Ok(slot) => slot,
        Err(refused) => return refused,
    };
    // A reconnecting EventSource says where it stopped.
    if let Some(last) = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        filter.after_seq = Some(last);
    }
    // Subscribe before reading the backlog, so no line falls between them.
    let mut live = surface.logs.subscribe();
    let backlog = surface.logs.query(&filter, if filter.after_seq.is_some() || filter.since_ms.is_some() { DEFAULT_LIMIT } else { 0 });
    let (tx, body) = channel_body();
    let stop = surface.stop_streams.clone();
    surface.streams.spawn(async move {
        let _slot = slot;
        let expired = tokio::time::sleep(STREAM_LIFETIME);
        tokio::pin!(expired);
        let mut last_sent = backlog.last_seq;
        // `truncated`: more lines matched since `since` than are replayed (the newest are).
        let hello = serde_json::json!({ "last_seq": backlog.last_seq, "evicted": backlog.evicted, "truncated": backlog.truncated });
        if tx.send(event("hello", None, &hello.to_string())).await.is_err() {
            return;
        }
        for line in &backlog.lines {
            if tx.send(line_event(line)).await.is_err() {
                return;
            }
        }
        // Only live lines after what the backlog covered.
        filter.after_seq = None;
        filter.since_ms = None;
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut expired => return,
                _ = tx.closed() => return,
                _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
                received = live.recv() => match received {
                    Ok(line) if line.seq <= last_sent || !filter.matches(&line) => continue,
                    Ok(line) => {
                        last_sent = line.seq;
                        line_event(&line)
                    }
                    Err(broadcast::error::RecvError::Lagged(skipped)) => event("skipped", None, &serde_json::json!({ "skipped": skipped }).to_string()),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let sent = tokio::select! {
                sent = tx.send(next) => sent.is_ok(),
                _ = stop.cancelled() => false,
            };
            if !sent {
                return;
            }
        }
    });
    event_stream(body)
}

/// `GET /gateway/metrics/history`.
pub async fn metrics_history(surface: &Surface, req: Request<Incoming>, client: IpAddr) -> Response<Body> {
    if let Err(denied) = surface.auth.check(req.headers(), client).await {
        return denied;
    }
    if req.uri().query().is_some_and(|q| !q.is_empty()) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "unknown_parameter", "/gateway/metrics/history takes no parameters");
    }
    json(StatusCode::OK, &serde_json::to_value(surface.history.document()).expect("samples serialize"))
}

/// `GET /gateway/events`: the `/gateway/status` document at once, then on
/// every change of a state, pid, restart count, last exit or retry count,
/// and at least every [`STATUS_REFRESH`] so uptimes stay fresh.
pub async fn events(surface: &Arc<Surface>, client: IpAddr) -> Response<Body> {
    let slot = match surface.stream_slots.take(client) {
        Ok(slot) => slot,
        Err(refused) => return refused,
    };
    let (tx, body) = channel_body();
    let surface2 = surface.clone();
    let stop = surface.stop_streams.clone();
    surface.streams.spawn(async move {
        let surface = surface2;
        let _slot = slot;
        let expired = tokio::time::sleep(STREAM_LIFETIME);
        tokio::pin!(expired);
        let mut changes = surface.board.subscribe();
        let mut refresh = tokio::time::interval(STATUS_REFRESH);
        let mut last_key = String::new();
        refresh.reset();
        loop {
            let doc = surface.board.to_json();
            let key = change_key(&doc);
            let due = key != last_key;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut expired => return,
                _ = tx.closed() => return,
                _ = refresh.tick() => {
                    if tx.send(event("status", None, &surface.board.to_json().to_string())).await.is_err() {
                        return;
                    }
                    last_key = change_key(&surface.board.to_json());
                    continue;
                }
                changed = changes.changed(), if !due => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                sent = tx.send(event("status", None, &doc.to_string())), if due => {
                    if sent.is_err() {
                        return;
                    }
                    last_key = key;
                    refresh.reset();
                }
            }
        }
    });
    event_stream(body)
}

/// The fields whose change is news (uptime and the retry countdown change
/// all the time and are not).
fn change_key(doc: &serde_json::Value) -> String {
    let mut key = format!("{};", doc["gateway"]["state"]);
    for c in doc["components"].as_array().into_iter().flatten() {
        key.push_str(&format!(
            "{}|{}|{}|{}|{}|{}|{}|{};",
            c["name"], c["state"], c["pid"], c["restarts"], c["last_exit"], c["attempts"], c["crash_looping"], c["reloading"]
        ));
    }
    key
}

/// `component=&level=&since=&q=` (and `limit=` when `with_limit`). `since`
/// is a sequence number (lines after it) or an RFC 3339 time (lines at or
/// after it); `q` matches case-insensitively.
/// A refused parameter: its error code and what to do.
type Refused = (&'static str, String);

fn parse_filter(query: Option<&str>, with_limit: bool) -> Result<(Filter, usize), Refused> {
    let bad = |code: &'static str, detail: String| Err((code, detail));
    let mut filter = Filter::default();
    let mut limit = DEFAULT_LIMIT;
    for (name, value) in query_pairs(query.unwrap_or("")) {
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "component" => {
                if value.len() > 64 {
                    return bad("invalid_component", "component= is at most 64 characters".into());
                }
                filter.component = Some(value);
            }
            "level" => match parse_level(&value) {
                Some(level) => filter.min_level = Some(level),
                None => return bad("invalid_level", format!("level={value} is not a level: use error, warn, info, debug or trace (that level and the more severe ones are returned)")),
            },
            "since" => {
                if let Ok(seq) = value.parse::<u64>() {
                    filter.after_seq = Some(seq);
                } else if let Ok(time) = chrono::DateTime::parse_from_rfc3339(&value) {
                    filter.since_ms = Some(time.timestamp_millis());
                } else {
                    return bad("invalid_since", format!("since={value} is neither a line number (seq) nor an RFC 3339 time such as 2026-01-01T12:00:00Z"));
                }
            }
            "q" => {
                if value.len() > 256 {
                    return bad("invalid_query", "q= is at most 256 characters".into());
                }
                filter.query = Some(value.to_lowercase());
            }
            "limit" if with_limit => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => return bad("invalid_limit", format!("limit={value} must be a whole number from 1 to {MAX_LIMIT}")),
            },
            other => return bad("unknown_parameter", format!("unknown parameter {other:?}: use component, level, since, q{}", if with_limit { " or limit" } else { "" })),
        }
    }
    Ok((filter, limit))
}

/// `a=1&b=x%20y` → pairs, percent- and `+`-decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        crate::serve::logring::percent_decode(&s).unwrap_or(s)
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn line_event(line: &Line) -> Bytes {
    event("line", Some(line.seq), &serde_json::to_string(line).expect("a log line serializes"))
}

/// One server-sent event; `data` is one line of JSON.
fn event(name: &str, id: Option<u64>, data: &str) -> Bytes {
    let id = id.map(|i| format!("id: {i}\n")).unwrap_or_default();
    Bytes::from(format!("{id}event: {name}\ndata: {data}\n\n"))
}

fn event_stream(body: ChannelBody) -> Response<Body> {
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "text/event-stream")
        .header(hyper::header::CACHE_CONTROL, "no-store")
        // nginx would otherwise buffer the stream.
        .header("x-accel-buffering", "no")
        .body(body.boxed())
        .expect("static response parts are valid")
}

/// A response body fed from a channel; it ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

fn channel_body() -> (mpsc::Sender<Bytes>, ChannelBody) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    (tx, ChannelBody(rx))
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_bad_ones_are_refused() {
        let (f, limit) = parse_filter(Some("component=api&level=WARN&q=Exited+Un%65xpectedly&since=41&limit=5"), true).ok().unwrap();
        assert_eq!(f.component.as_deref(), Some("api"));
        assert_eq!(f.min_level, Some(tracing::Level::WARN));
        assert_eq!(f.query.as_deref(), Some("exited unexpectedly"));
        assert_eq!((f.after_seq, limit), (Some(41), 5));
        let (f, _) = parse_filter(Some("since=2026-01-01T00:00:00Z&component="), true).ok().unwrap();
        assert_eq!(f.since_ms, Some(1_767_225_600_000));
        assert_eq!(f.component, None, "an empty parameter is no filter");
        for bad in ["level=loud", "since=yesterday", "limit=0", "limit=99999", "colour=red"] {
            assert!(parse_filter(Some(bad), true).is_err(), "{bad}");
        }
        assert!(parse_filter(Some("limit=5"), false).is_err(), "a stream has no limit");
    }

    #[test]
    fn uptime_alone_is_not_a_change() {
        let a = serde_json::json!({"components": [{"name": "api", "state": "ready", "pid": 7, "restarts": 0, "uptime_s": 1.0}]});
        let mut b = a.clone();
        b["components"][0]["uptime_s"] = 9.0.into();
        assert_eq!(change_key(&a), change_key(&b));
        b["components"][0]["restarts"] = 1.into();
        assert_ne!(change_key(&a), change_key(&b));
    }
}
