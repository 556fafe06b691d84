//! systemd's notify protocol (`Type=notify`): `READY=1` once the service is
//! usable, `STATUS=` lines as components change, `WATCHDOG=1` keep-alives at
//! half of `WATCHDOG_USEC` while every supervision loop makes progress, and
//! `STOPPING=1` when a stop begins.
//!
//! Messages are datagrams to the Unix socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). Without that variable every call is
//! a no-op, so the rest of the gateway never checks whether systemd is there.
//! Children never see these variables (see `process/child.rs`).
//!
//! Kept by hand rather than taken from the `sd-notify` crate: its 0.5
//! connects `NOTIFY_SOCKET` as a path only, while sd_notify(3) also accepts
//! an `@` abstract name, and it would call a zero `WATCHDOG_USEC` an interval.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::status::{Board, GatewayState, State};

pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty()).and_then(|path| match UnixDatagram::unbound() {
            Ok(sock) => Some((sock, path)),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET is set but no socket could be made: {e}");
                None
            }
        });
        Notifier { socket }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one message (`KEY=value` lines).
    pub fn notify(&self, message: &str) {
        let Some((sock, path)) = &self.socket else { return };
        let result = match path.strip_prefix('@') {
            Some(name) => send_abstract(sock, name, message),
            None => sock.send_to(message.as_bytes(), path).map(|_| ()),
        };
        if let Err(e) = result {
            tracing::warn!("could not notify systemd at {path}: {e}");
        }
    }

    /// Asks systemd to wait `by` longer for `READY=1` (or for the stop): a
    /// long step such as a major upgrade sends this again before it runs out.
    pub fn extend_timeout(&self, by: Duration) {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
    }

    /// The watchdog interval asked for by systemd, if it is meant for us.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &str, message: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(message.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_sock: &UnixDatagram, _name: &str, _message: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract sockets exist only on Linux"))
}

/// One line summarising the components, for `STATUS=`.
pub fn status_line(board: &Board) -> String {
    let snapshot = board.snapshot();
    let parts: Vec<String> = snapshot
        .iter()
        .map(|(n, c)| match c.state {
            State::Backoff => format!("{n} backoff (attempt {}{})", c.attempts, if c.crash_looping { ", crash loop" } else { "" }),
            State::Ready if c.reloading => format!("{n} ready (reloading)"),
            state => format!("{n} {state}"),
        })
        .collect();
    let line = if parts.is_empty() { "starting".into() } else { parts.join(", ") };
    match snapshot.gateway {
        GatewayState::Stopping => format!("stopping: {line}"),
        GatewayState::Running => line,
    }
}

/// Keeps systemd informed until `stop`: `STATUS=` on every change, and
/// `WATCHDOG=1` on the interval systemd asked for, but only while every
/// supervision loop keeps its heartbeat promise (see `status`). A loop
/// stuck in an await makes the pings stop, and systemd restarts the
/// gateway: the watchdog vouches for supervision, not just for a live
/// runtime.
pub fn spawn_reporter(notifier: Arc<Notifier>, board: Board, tasks: &TaskTracker, stop: CancellationToken) {
    if !notifier.enabled() {
        return;
    }
    if let Some(every) = Notifier::watchdog_interval() {
        let (n, board, stop) = (notifier.clone(), board.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut withheld = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let stalled = board.stalled(std::time::Instant::now());
                if stalled.is_empty() {
                    if withheld {
                        tracing::info!("supervision is making progress again; watchdog pings resume");
                    }
                    withheld = false;
                    n.notify("WATCHDOG=1");
                } else if !withheld {
                    withheld = true;
                    tracing::error!(
                        "supervision of {} made no progress in the time it promised; withholding the systemd watchdog ping so the service manager restarts the gateway",
                        stalled.join(", ")
                    );
                }
            }
        });
    }
    tasks.spawn(async move {
        let mut rx = board.subscribe();
        let mut last = String::new();
        loop {
            let line = status_line(&board);
            if line != last {
                notifier.notify(&format!("STATUS={line}"));
                last = line;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_says_why_a_child_is_down_and_when_the_gateway_stops() {
        let board = Board::new(&["postgres", "api"]);
        board.transition("postgres", State::Ready, None);
        board.update("api", |c| {
            c.attempts = 7;
            c.crash_looping = true;
        });
        board.transition("api", State::Backoff, None);
        assert_eq!(status_line(&board), "postgres ready, api backoff (attempt 7, crash loop)");
        board.set_stopping();
        assert!(status_line(&board).starts_with("stopping: "));
    }
}
