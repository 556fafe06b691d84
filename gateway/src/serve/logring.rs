//! The gateway's recent log, in memory: its own lines and every child's
//! (children's output is re-emitted as tracing events in `process/child.rs`, so one
//! tracing layer sees both), for `GET /gateway/logs` and its live stream.
//!
//! * **Structured.** Each line keeps its time, component (`gateway`, or the
//!   child or supervised component the event names), level and message.
//! * **Redacted before it is stored.** Passwords in URLs, `sk-omni-` API keys,
//!   values given to a `password` in any case and quoting (`password='…'`,
//!   `PASSWORD '…'`, `PGPASSWORD=…`; `omni_contract::redact::password_values`)
//!   and the known secret values from the configuration (`OMNI_API_KEY`,
//!   the passwords of `DATABASE_URL` and `PGSERVE_REPLICATION_URL`, the
//!   embedded cluster's password, `OMNI_GATEWAY_TOKEN`) never enter the
//!   ring, so no reader can see them.
//! * **Bounded.** At most [`MAX_LINES`] lines and [`MAX_BYTES`] bytes of
//!   message text; the oldest lines go first.
//! * **Never in the way.** Storing a line is a short mutex hold and a
//!   non-blocking broadcast send; a slow stream reader falls behind on its
//!   own receiver, skips ahead and is told how many lines it missed. Nothing
//!   that logs (the proxy, a child's output reader) ever waits for a reader.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Most lines kept.
pub const MAX_LINES: usize = 10_000;
/// Most bytes of line text kept (component and message).
pub const MAX_BYTES: usize = 5 * 1024 * 1024;
/// Longest single message kept; a longer one is cut (and says so).
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines a stream reader may fall behind before it skips ahead.
const BROADCAST_CAPACITY: usize = 1024;

/// One stored log line, as `/gateway/logs` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Increases by one per line stored; `since=` resumes after it.
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Milliseconds since the Unix epoch (for charts and `since=` by time).
    pub unix_ms: i64,
    pub component: String,
    pub level: &'static str,
    pub message: String,
}

impl Line {
    fn bytes(&self) -> usize {
        self.component.len() + self.message.len() + self.time.len() + 32
    }
}

/// Which lines a reader wants (`component=&level=&since=&q=`).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Exactly this component.
    pub component: Option<String>,
    /// This level and the more severe ones (`warn` → warn and error).
    pub min_level: Option<Level>,
    /// Lines after this sequence number.
    pub after_seq: Option<u64>,
    /// Lines at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Case-insensitive text the message (or component) must contain.
    pub query: Option<String>,
}

impl Filter {
    pub fn matches(&self, line: &Line) -> bool {
        if self.component.as_deref().is_some_and(|c| c != line.component) {
            return false;
        }
        if let Some(min) = self.min_level {
            // tracing orders levels by verbosity: ERROR < WARN < INFO.
            if parse_level(line.level).is_none_or(|l| l > min) {
                return false;
            }
        }
        if self.after_seq.is_some_and(|s| line.seq <= s) || self.since_ms.is_some_and(|t| line.unix_ms < t) {
            return false;
        }
        match &self.query {
            Some(q) => contains_ignoring_case(&line.message, q) || contains_ignoring_case(&line.component, q),
            None => true,
        }
    }
}

/// `error`, `warn`, `info`, `debug`, `trace`, in any case.
pub fn parse_level(text: &str) -> Option<Level> {
    text.parse().ok()
}

fn contains_ignoring_case(haystack: &str, needle_lower: &str) -> bool {
    haystack.to_lowercase().contains(needle_lower)
}

/// What a query returns besides the lines.
#[derive(Debug, Serialize)]
pub struct Page {
    pub lines: Vec<Line>,
    /// The newest sequence number stored (resume a stream after it).
    pub last_seq: u64,
    /// Lines dropped from the ring's tail since the gateway started.
    pub evicted: u64,
    /// True when more lines matched than `limit` (the newest are returned).
    pub truncated: bool,
}

struct Stored {
    lines: VecDeque<Arc<Line>>,
    bytes: usize,
    next_seq: u64,
    evicted: u64,
}

/// The ring. Shared by the tracing layer (writer) and the HTTP surface (readers).
pub struct LogRing {
    stored: Mutex<Stored>,
    max_lines: usize,
    max_bytes: usize,
    /// New lines for live readers; a reader that lags skips ahead.
    live: broadcast::Sender<Arc<Line>>,
    /// Exact values never to store (`***` instead), longest first.
    secrets: RwLock<Vec<String>>,
}

impl LogRing {
    pub fn new() -> Arc<LogRing> {
        LogRing::with_limits(MAX_LINES, MAX_BYTES)
    }

    pub fn with_limits(max_lines: usize, max_bytes: usize) -> Arc<LogRing> {
        Arc::new(LogRing {
            stored: Mutex::new(Stored { lines: VecDeque::new(), bytes: 0, next_seq: 1, evicted: 0 }),
            max_lines,
            max_bytes,
            live: broadcast::channel(BROADCAST_CAPACITY).0,
            secrets: RwLock::new(Vec::new()),
        })
    }

    /// A tracing layer storing every event it sees here.
    pub fn layer(self: &Arc<Self>) -> RingLayer {
        RingLayer { ring: self.clone() }
    }

    /// Adds a value that must never be stored (a password, a key). Values
    /// shorter than four characters are ignored: replacing them would mangle
    /// ordinary words. A URL's password is added as written and decoded.
    pub fn add_secret(&self, secret: &str) {
        let mut candidates = vec![secret.to_owned()];
        if let Some(decoded) = percent_decode(secret) {
            candidates.push(decoded);
        }
        let mut secrets = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        for s in candidates {
            if s.chars().count() >= 4 && !secrets.contains(&s) {
                secrets.push(s);
            }
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// Adds the password of a connection URL (`scheme://user:password@host`).
    pub fn add_url_secret(&self, url: &str) {
        if let Some(password) = url_password(url) {
            self.add_secret(password);
        }
    }

    /// Stores a line (redacted) and hands it to live readers.
    pub fn push(&self, component: &str, level: Level, message: &str) {
        let message = self.redact(message);
        let mut message = message.into_owned();
        if message.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" … (cut)");
        }
        let now = chrono::Utc::now();
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        let line = Arc::new(Line {
            seq: stored.next_seq,
            time: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            unix_ms: now.timestamp_millis(),
            component: component.to_owned(),
            level: level_name(level),
            message,
        });
        stored.next_seq += 1;
        stored.bytes += line.bytes();
        stored.lines.push_back(line.clone());
        while stored.lines.len() > self.max_lines || (stored.bytes > self.max_bytes && stored.lines.len() > 1) {
            let Some(old) = stored.lines.pop_front() else { break };
            stored.bytes -= old.bytes();
            stored.evicted += 1;
        }
        drop(stored);
        // No receivers is the usual case; that is not an error.
        let _ = self.live.send(line);
    }

    /// The newest `limit` lines that match `filter`, oldest first.
    pub fn query(&self, filter: &Filter, limit: usize) -> Page {
        let stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<Line> = Vec::new();
        let mut truncated = false;
        for line in stored.lines.iter().rev() {
            if !filter.matches(line) {
                continue;
            }
            if lines.len() == limit {
                truncated = true;
                break;
            }
            lines.push(Line::clone(line));
        }
        lines.reverse();
        Page { lines, last_seq: stored.next_seq - 1, evicted: stored.evicted, truncated }
    }

    /// Lines and bytes held now.
    pub fn usage(&self) -> (usize, usize) {
        let stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        (stored.lines.len(), stored.bytes)
    }

    /// New lines from now on. A receiver that falls more than
    /// `BROADCAST_CAPACITY` lines behind gets `Lagged(n)` and resumes at the
    /// oldest line still buffered.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Line>> {
        self.live.subscribe()
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let secrets = self.secrets.read().unwrap_or_else(|e| e.into_inner());
        redact(text, &secrets)
    }
}

static INSTALLED: std::sync::OnceLock<Arc<LogRing>> = std::sync::OnceLock::new();

/// Makes `ring` the one the tracing layer feeds (`main` does this once, with
/// the logging setup).
pub fn install(ring: Arc<LogRing>) {
    let _ = INSTALLED.set(ring);
}

/// The installed ring; an empty one nobody feeds when logging was set up
/// without it (tests of the library).
pub fn installed() -> Arc<LogRing> {
    INSTALLED.get_or_init(LogRing::new).clone()
}

/// Redaction, as a pure function of the text and the known secrets.
pub fn redact<'a>(text: &'a str, secrets: &[String]) -> std::borrow::Cow<'a, str> {
    let suspicious = text.contains("://") || text.contains("sk-omni-") || omni_contract::redact::mentions_password(text) || secrets.iter().any(|s| text.contains(s.as_str()));
    if !suspicious {
        return text.into();
    }
    let mut out = text.to_owned();
    for secret in secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out = replace_tokens(&out, "sk-omni-", |_| "sk-omni-***".to_owned());
    out = omni_contract::redact::password_values(&out).into_owned();
    // Each URL-looking word: its password hidden.
    let mut result = String::with_capacity(out.len());
    for (i, word) in out.split(' ').enumerate() {
        if i > 0 {
            result.push(' ');
        }
        if word.contains("://") {
            result.push_str(&omni_contract::redact::url_password(word));
        } else {
            result.push_str(word);
        }
    }
    result.into()
}

/// Replaces `prefix` and the token after it (up to whitespace, a quote or a
/// comma) with `with(token)`.
fn replace_tokens(text: &str, prefix: &str, with: impl Fn(&str) -> String) -> String {
    if !text.contains(prefix) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        out.push_str(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let end = after.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | '}' | ')')).unwrap_or(after.len());
        out.push_str(&with(&after[..end]));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The password part of `scheme://user:password@host…`, as written.
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let before_query = rest.find('?').unwrap_or(rest.len());
    let at = rest[..before_query].rfind('@')?;
    let (_, password) = rest[..at].split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// `%40` → `@`; `None` when there is nothing to decode or it is not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The tracing layer: formats an event like the pretty log does (message,
/// then ` key=value` fields) and stores it under its component: the `child`
/// or `component` field when there is one, else `gateway`.
pub struct RingLayer {
    ring: Arc<LogRing>,
}

impl<S: Subscriber> Layer<S> for RingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let component = visitor.component.as_deref().unwrap_or("gateway");
        let mut message = visitor.message;
        message.push_str(&visitor.rest);
        self.ring.push(component, *event.metadata().level(), &message);
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    component: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "child" | "component" => self.component = Some(value.to_owned()),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "child" | "component" => self.component = Some(format!("{value:?}").trim_matches('"').to_owned()),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_before_they_are_stored() {
        let ring = LogRing::with_limits(100, 1 << 20);
        ring.add_url_secret("postgres://omni:p%40ss-w0rd@db:5432/omni");
        ring.add_secret("sk-omni-configured-key-123");
        ring.push("gateway", Level::INFO, "connecting to postgres://omni:p%40ss-w0rd@db:5432/omni now");
        ring.push("api", Level::WARN, "key sk-omni-AbC_def-123 rejected; decoded p@ss-w0rd seen; conninfo host=x password=hunter22 user=y");
        ring.push("gateway", Level::INFO, "target postgres://rep:other@h/db, the key sk-omni-configured-key-123");
        let all = ring.query(&Filter::default(), 10).lines.iter().map(|l| l.message.clone()).collect::<Vec<_>>().join("\n");
        ring.add_secret("internal-token-0123456789");
        ring.push("api", Level::INFO, "ALTER ROLE omni PASSWORD 'quoted s3cret'; PGPASSWORD=upper-s3cret; password='single-s3cret'");
        ring.push("api", Level::INFO, "OMNI_GATEWAY_TOKEN=internal-token-0123456789");
        for secret in ["p%40ss-w0rd", "p@ss-w0rd", "AbC_def", "hunter22", "other", "configured-key", "s3cret", "internal-token"] {
            assert!(!all.contains(secret), "{secret} leaked in:\n{all}");
        }
        assert!(all.contains("postgres://omni:***@db:5432/omni"), "{all}");
    }

    #[test]
    fn the_ring_keeps_within_its_line_and_byte_bounds() {
        let ring = LogRing::with_limits(50, 4096);
        for i in 0..1000 {
            ring.push("postgres", Level::INFO, &format!("line {i} {}", "x".repeat(i % 100)));
        }
        let (lines, bytes) = ring.usage();
        assert!(lines <= 50 && bytes <= 4096, "{lines} lines, {bytes} bytes");
        let page = ring.query(&Filter::default(), 1000);
        assert_eq!(page.lines.last().unwrap().message.split(' ').nth(1), Some("999"), "the newest line is kept");
        assert_eq!(page.last_seq, 1000);
        assert_eq!(page.evicted as usize + page.lines.len(), 1000);
    }

    #[test]
    fn filters_select_exactly_the_matching_lines() {
        let ring = LogRing::with_limits(100, 1 << 20);
        ring.push("api", Level::ERROR, "Boom");
        ring.push("api", Level::INFO, "fine");
        ring.push("postgres", Level::WARN, "checkpoints are too frequent");
        ring.push("gateway", Level::DEBUG, "boom in debug");
        let pick = |f: Filter| ring.query(&f, 100).lines.iter().map(|l| l.seq).collect::<Vec<_>>();
        assert_eq!(pick(Filter { component: Some("api".into()), ..Filter::default() }), [1, 2]);
        assert_eq!(pick(Filter { min_level: Some(Level::WARN), ..Filter::default() }), [1, 3]);
        assert_eq!(pick(Filter { query: Some("boom".into()), ..Filter::default() }), [1, 4]);
        assert_eq!(pick(Filter { after_seq: Some(2), ..Filter::default() }), [3, 4]);
        let page = ring.query(&Filter::default(), 2);
        assert!(page.truncated);
        assert_eq!(page.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [3, 4], "the newest lines, oldest first");
    }

    #[test]
    fn a_lagging_reader_is_told_how_far_it_fell_behind() {
        let ring = LogRing::with_limits(10, 1 << 20);
        let mut rx = ring.subscribe();
        for i in 0..(BROADCAST_CAPACITY + 5) {
            ring.push("api", Level::INFO, &format!("{i}"));
        }
        assert!(matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Lagged(5))));
        assert_eq!(rx.try_recv().unwrap().message, "5");
    }
}
