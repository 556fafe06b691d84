//! Someone is told when backups stop: `OMNI_BACKUP_HEARTBEAT_URL`.
//!
//! The healthchecks.io convention (Uptime Kuma's push monitors and cron
//! monitors of other services take the same shape): a request to the URL
//! says "alive and well", a request to `<url>/fail` with the reason in the
//! body says "broken, and why"; a monitor that hears nothing for its period
//! raises the alarm itself, which covers the machine that died silently.
//!
//! * A success ping only ever follows a confirmed remote write: the caller
//!   sends [`Heartbeat::ok`] after a base backup's manifest or a logical
//!   backup is in the repository, and [`Heartbeat::keepalive`] while WAL
//!   uploads are healthy, at most once per `OMNI_BACKUP_HEARTBEAT_INTERVAL`.
//! * A failure is pinged when uploads go from healthy to failing, and again
//!   once per interval while they keep failing, not at every retry.
//! * The URL carries the monitor's secret (the check's UUID, a push token):
//!   logs and status show its scheme and host only.
//! * A ping that cannot be delivered is logged and kept in the status; it
//!   never blocks or fails an upload.

use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

/// How long one ping may take before it is given up.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LastPing {
    /// Unix seconds.
    pub at: u64,
    /// `ok` or `fail`: what was reported.
    pub kind: &'static str,
    /// Whether the monitor answered 2xx.
    pub delivered: bool,
    /// What was said (the event or the reason), or why it was not delivered.
    pub detail: String,
}

#[derive(Default)]
struct State {
    /// When the last success ping was delivered.
    last_ok: Option<Instant>,
    /// When uploads were last reported failing (cleared by a success).
    failing_since_ping: Option<Instant>,
    last: Option<LastPing>,
}

pub struct Heartbeat {
    url: String,
    interval: Duration,
    client: reqwest::Client,
    state: Mutex<State>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Heartbeat({}, every {:?})", shown(&self.url), self.interval)
    }
}

/// `https://hc-ping.com/…`: the URL without what identifies the check.
pub fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}/…")
        }
        None => "…".into(),
    }
}

/// `<url>/fail`, before any query string (`…/push/TOKEN/fail?status=down`).
fn fail_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = format!("{}/fail", base.trim_end_matches('/'));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl Heartbeat {
    /// From `OMNI_BACKUP_HEARTBEAT_URL` and `OMNI_BACKUP_HEARTBEAT_INTERVAL`;
    /// the error names the variable and never the URL's secret part.
    pub fn new(url: &str, interval: Duration) -> Result<Heartbeat, String> {
        let parsed = reqwest::Url::parse(url).map_err(|_| format!("OMNI_BACKUP_HEARTBEAT_URL={} is not a URL; expected http:// or https://", shown(url)))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!("OMNI_BACKUP_HEARTBEAT_URL={}: expected an http:// or https:// URL with a host", shown(url)));
        }
        if interval < Duration::from_secs(1) {
            return Err("OMNI_BACKUP_HEARTBEAT_INTERVAL must be at least 1s".into());
        }
        super::store::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(PING_TIMEOUT)
            .user_agent(concat!("omni-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("OMNI_BACKUP_HEARTBEAT_URL: cannot build its HTTP client: {e}"))?;
        Ok(Heartbeat { url: url.to_string(), interval, client, state: Mutex::new(State::default()) })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The last ping and its outcome, for the status.
    pub fn last(&self) -> Option<LastPing> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).last.clone()
    }

    /// A remote write was confirmed (`event` says which): the monitor hears
    /// "alive" now.
    pub async fn ok(&self, event: &str) {
        let delivered = self.send("ok", &self.url, event).await;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if delivered {
            state.last_ok = Some(Instant::now());
        }
        state.failing_since_ping = None;
    }

    /// WAL uploads are healthy: a success ping if none was delivered within
    /// the interval, or if a failure was reported since the last one.
    /// Returns whether one was sent.
    pub async fn keepalive(&self) -> bool {
        let due = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // After a failure was reported, the recovery is told at once.
            state.failing_since_ping.is_some() || state.last_ok.is_none_or(|t| t.elapsed() >= self.interval)
        };
        if due {
            self.ok("WAL uploads healthy").await;
        }
        due
    }

    /// Uploads are failing (`reason`, already free of secrets): pinged when
    /// they start failing and once per interval after that. Returns whether
    /// a ping was sent.
    pub async fn failed(&self, reason: &str) -> bool {
        let due = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.failing_since_ping.is_none_or(|t| t.elapsed() >= self.interval)
        };
        if due {
            self.send("fail", &fail_url(&self.url), reason).await;
            self.state.lock().unwrap_or_else(|e| e.into_inner()).failing_since_ping = Some(Instant::now());
        }
        due
    }

    async fn send(&self, kind: &'static str, url: &str, body: &str) -> bool {
        let result = self.client.post(url).header("content-type", "text/plain; charset=utf-8").body(body.to_string()).send().await;
        let (delivered, detail) = match result {
            Ok(response) if response.status().is_success() => (true, body.to_string()),
            Ok(response) => (false, format!("the monitor at {} answered {}", shown(&self.url), response.status())),
            // reqwest's error text carries the URL: say what failed without it.
            Err(e) => (false, format!("the monitor at {} did not answer ({})", shown(&self.url), what_failed(&e))),
        };
        if delivered {
            tracing::debug!(kind, "heartbeat delivered to {}", shown(&self.url));
        } else {
            tracing::warn!(kind, "heartbeat not delivered: {detail}");
        }
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).last = Some(LastPing { at, kind, delivered, detail });
        delivered
    }
}

fn what_failed(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused or unreachable"
    } else {
        "request failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader, Read, Write},
        net::TcpListener,
        sync::{mpsc, Arc},
    };

    /// A real HTTP server on a free port: every request's method, path and
    /// body go to the channel; it answers `status`.
    fn monitor(status: u16) -> (String, mpsc::Receiver<(String, String, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/ping/5bf7c6a0-secret-uuid", listener.local_addr().unwrap().port());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut parts = line.split(' ');
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let _ = write!(stream, "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK");
                if tx.send((method, path, String::from_utf8(body).unwrap())).is_err() {
                    return;
                }
            }
        });
        (url, rx)
    }

    fn next(rx: &mpsc::Receiver<(String, String, String)>) -> (String, String, String) {
        rx.recv_timeout(Duration::from_secs(10)).expect("the monitor got no request")
    }

    #[tokio::test]
    async fn success_and_failure_pings_reach_the_monitor_and_repeat_only_per_interval() {
        let (url, rx) = monitor(200);
        let beat = Arc::new(Heartbeat::new(&url, Duration::from_secs(3600)).unwrap());

        beat.ok("base backup 20261205T081500 in the repository").await;
        assert_eq!(next(&rx), ("POST".into(), "/ping/5bf7c6a0-secret-uuid".into(), "base backup 20261205T081500 in the repository".into()));
        // Just delivered: no keepalive due within the hour.
        assert!(!beat.keepalive().await);

        assert!(beat.failed("the store answered 403: wrong credentials").await);
        assert_eq!(next(&rx), ("POST".into(), "/ping/5bf7c6a0-secret-uuid/fail".into(), "the store answered 403: wrong credentials".into()));
        // Still failing a second later: not pinged again within the interval.
        assert!(!beat.failed("the store answered 403: wrong credentials").await);
        let last = beat.last().unwrap();
        assert_eq!((last.kind, last.delivered), ("fail", true));

        // Recovered: the next confirmed write is pinged at once.
        beat.ok("logical backup omni-20261205.dump in the repository").await;
        assert_eq!(next(&rx).1, "/ping/5bf7c6a0-secret-uuid");
        assert!(rx.try_recv().is_err(), "a ping nobody asked for");
    }

    #[tokio::test]
    async fn keepalive_pings_once_per_interval_and_fail_keeps_a_query_string() {
        let (url, rx) = monitor(200);
        let beat = Heartbeat::new(&format!("{url}?status=up"), Duration::from_secs(1)).unwrap();
        assert!(beat.keepalive().await, "nothing delivered yet: a keepalive is due");
        assert_eq!(next(&rx).1, "/ping/5bf7c6a0-secret-uuid?status=up");
        assert!(!beat.keepalive().await);
        // Once the interval has passed (waited for by condition, not a sleep of fixed length).
        let started = Instant::now();
        while !beat.keepalive().await {
            assert!(started.elapsed() < Duration::from_secs(5), "no keepalive after the 1 s interval");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(next(&rx).2, "WAL uploads healthy");
        beat.failed("no space").await;
        assert_eq!(next(&rx).1, "/ping/5bf7c6a0-secret-uuid/fail?status=up");
    }

    #[tokio::test]
    async fn an_unreachable_or_refusing_monitor_is_reported_without_its_secret() {
        let (url, _rx) = monitor(500);
        let beat = Heartbeat::new(&url, Duration::from_secs(60)).unwrap();
        beat.ok("x").await;
        let last = beat.last().unwrap();
        assert!(!last.delivered && last.detail.contains("500") && !last.detail.contains("secret-uuid"), "{last:?}");
        // Refused until it answers: the next ok is tried again (no success was recorded).
        assert!(beat.keepalive().await);

        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let beat = Heartbeat::new(&format!("http://127.0.0.1:{port}/secret-token"), Duration::from_secs(60)).unwrap();
        beat.failed("the store is gone").await;
        let last = beat.last().unwrap();
        assert!(!last.delivered && !last.detail.contains("secret-token"), "{last:?}");
        assert!(format!("{beat:?}").contains("127.0.0.1") && !format!("{beat:?}").contains("secret-token"));
    }

    #[test]
    fn bad_urls_are_refused_naming_the_variable_without_the_secret() {
        for url in ["hc-ping.com/uuid-secret", "ftp://hc-ping.com/uuid-secret", "https://"] {
            let err = Heartbeat::new(url, Duration::from_secs(60)).unwrap_err();
            assert!(err.contains("OMNI_BACKUP_HEARTBEAT_URL") && !err.contains("secret"), "{url}: {err}");
        }
        assert!(Heartbeat::new("https://hc-ping.com/x", Duration::ZERO).unwrap_err().contains("OMNI_BACKUP_HEARTBEAT_INTERVAL"));
        assert_eq!(shown("https://user:pw@hc-ping.com/abc?x=1"), "https://hc-ping.com/…");
        assert_eq!(fail_url("https://hc-ping.com/abc/"), "https://hc-ping.com/abc/fail");
    }
}
