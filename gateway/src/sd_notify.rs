//! systemd's notify protocol (`Type=notify`): `READY=1` once the service is
//! usable, `STATUS=` lines as components change, `WATCHDOG=1` keep-alives at
//! half of `WATCHDOG_USEC`, and `STOPPING=1` when a stop begins.
//!
//! Messages are datagrams to the Unix socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). Without that variable every call is
//! a no-op, so the rest of the gateway never checks whether systemd is there.
//! Children never see these variables (see `child`).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::status::Board;

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
    let parts: Vec<String> = board.snapshot().iter().map(|(n, c)| format!("{n} {}", c.state)).collect();
    if parts.is_empty() {
        "starting".into()
    } else {
        parts.join(", ")
    }
}

/// Keeps systemd informed: `STATUS=` on every change, `WATCHDOG=1` on the
/// interval systemd asked for. Runs until the board is dropped.
pub fn spawn_reporter(notifier: std::sync::Arc<Notifier>, board: Board) {
    if !notifier.enabled() {
        return;
    }
    if let Some(every) = Notifier::watchdog_interval() {
        let n = notifier.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                n.notify("WATCHDOG=1");
            }
        });
    }
    tokio::spawn(async move {
        let mut rx = board.subscribe();
        let mut last = String::new();
        loop {
            let line = status_line(&board);
            if line != last {
                notifier.notify(&format!("STATUS={line}"));
                last = line;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}
