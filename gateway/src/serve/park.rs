//! HTTP/1.1 over TLS that gives its buffers back while a connection is idle.
//!
//! hyper's HTTP/1.1 connection keeps an 8 KiB read buffer and an 8 KiB
//! write buffer from its first request to its end, and a server cannot make
//! it release them: about 13.5 KiB of every idle keep-alive connection
//! (BENCHMARKS.md, "HTTPS: where an idle connection's memory goes"). So a
//! connection quiet for [`PARK_AFTER`], with no request in flight, is
//! *parked*: hyper's connection is asked to end as it would at a stop
//! (`graceful_shutdown`, which closes an idle one at once and lets a
//! response still being written finish first), run to its end *without*
//! shutting the stream down, and taken apart (`into_parts`). The TLS stream
//! stays open; what hyper had read and not yet parsed (a request's first
//! bytes) is kept ([`Rewind`]) and handed to the next hyper connection,
//! built once the client sends again. The client sees one keep-alive
//! connection throughout.
//!
//! Only after hyper has written a response on the connection: a connection
//! hyper has not yet answered is busy by its count (its keep-alive state
//! starts busy), and asking it to end would make it close after its first
//! response.
//!
//! A request asking for a protocol switch (a WebSocket) is served the same
//! way; once the `101` is written the stream goes, with what hyper read
//! past the request, to the proxy's tunnel ([`ClientUpgrade`]).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::proxy::{wants_upgrade, ClientUpgrade, SwitchedTo};
use super::{Body, Watched};

/// How long an HTTP/1.1 connection over TLS is quiet before it is parked.
/// A second: a client between two requests of one page load is not parked,
/// and one that waits longer pays for two buffers (microseconds) when it
/// comes back.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// The stream of a TLS client, as the connection's task holds it.
pub type TlsIo = Watched<Box<crate::tls::stream::TlsStream>>;

/// A stream with bytes already read from it in front.
struct Rewind<T> {
    ahead: Bytes,
    io: T,
}

impl<T> Rewind<T> {
    fn new(ahead: Bytes, io: T) -> Rewind<T> {
        Rewind { ahead, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connection's side of [`ClientUpgrade`]: the sender of the request
/// that asked last.
#[derive(Clone, Default)]
pub struct UpgradeSlot(Arc<Mutex<Option<SwitchedTo>>>);

impl UpgradeSlot {
    /// For a request that asks for a protocol switch: its end of the channel.
    pub fn ask<B>(&self, req: &mut Request<B>) {
        let (tx, rx) = oneshot::channel();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        req.extensions_mut().insert(ClientUpgrade::new(rx));
    }

    /// The sender of a switch still awaited (its tunnel waits).
    fn awaited(&self) -> Option<SwitchedTo> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|tx| !tx.is_closed())
    }
}

/// `service`, with each request that asks for a protocol switch given its
/// end of `upgrades` ([`ClientUpgrade`]).
#[derive(Clone)]
pub struct AskingUpgrades<S> {
    pub service: S,
    pub upgrades: UpgradeSlot,
}

impl<S: hyper::service::Service<Request<Incoming>>> hyper::service::Service<Request<Incoming>> for AskingUpgrades<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<Incoming>) -> S::Future {
        if wants_upgrade(req.headers()) {
            self.upgrades.ask(&mut req);
        }
        self.service.call(req)
    }
}

/// What ends the connection, besides its client: the gateway's stop, its
/// cut-off, and the keep-alive idle limit (`OMNI_HEADER_TIMEOUT_S`).
pub struct Limits<'a> {
    pub idle_limit: Duration,
    pub peer: SocketAddr,
    pub stop: &'a CancellationToken,
    pub close_all: &'a CancellationToken,
    /// Requests in flight (their response bodies included).
    pub in_flight: &'a AtomicUsize,
    pub parks: &'a Parks,
}

/// Parked connections, now and since the start (`/metrics`).
#[derive(Default)]
pub struct Parks {
    now: AtomicU64,
    total: AtomicU64,
}

impl Parks {
    /// Counts a connection parked until the guard is dropped.
    fn park(&self) -> ParkedGuard<'_> {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.now.fetch_add(1, Ordering::Relaxed);
        ParkedGuard(&self.now)
    }

    pub fn metrics(&self) -> String {
        format!(
            "# HELP omni_https_connections_parked Idle HTTP/1.1 connections over TLS holding no HTTP buffers now (kept open, served again when the client sends).\n# TYPE omni_https_connections_parked gauge\nomni_https_connections_parked {}\n# HELP omni_https_parks_total Times an idle HTTP/1.1 connection over TLS gave its HTTP buffers back.\n# TYPE omni_https_parks_total counter\nomni_https_parks_total {}\n",
            self.now.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed)
        )
    }
}

struct ParkedGuard<'a>(&'a AtomicU64);

impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves HTTP/1.1 on `io` until the client leaves, the connection is idle
/// past the limit, or the gateway stops; parked whenever it is quiet (see
/// the module's comment).
pub async fn serve<S>(http1: &hyper::server::conn::http1::Builder, mut io: TlsIo, service: S, upgrades: UpgradeSlot, limits: Limits<'_>)
where
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Clone + Unpin,
    S::Future: Unpin,
{
    let Limits { idle_limit, peer, stop, close_all, in_flight, parks } = limits;
    let activity = io.activity.clone();
    let mut ahead = Bytes::new();
    let mut check = tokio::time::interval(Duration::from_millis(250));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut parked = None;
    loop {
        // Waits for the client's bytes, before the first request and while
        // parked; bytes read already, or decrypted and waiting in the TLS
        // stream, are served at once.
        if ahead.is_empty() && !io.io.has_unread() {
            tokio::select! {
                ready = io.io.tcp().readable() => if ready.is_err() {
                    return;
                },
                _ = stop.cancelled() => {
                    close(&mut io).await;
                    return;
                }
                _ = close_all.cancelled() => return,
                _ = tokio::time::sleep(idle_limit.saturating_sub(activity.quiet())) => {
                    close(&mut io).await;
                    return;
                }
            }
        }
        drop(parked.take());
        let writes_at_build = activity.writes();
        // Boxed: while parked, the task keeps no room for it.
        let mut conn = Box::new(http1.serve_connection(TokioIo::new(Rewind::new(std::mem::take(&mut ahead), io)), service.clone()));
        let mut parking = false;
        let mut ending = false;
        let ended = loop {
            tokio::select! {
                done = poll_fn(|cx| conn.poll_without_shutdown(cx)) => break done,
                _ = stop.cancelled(), if !ending => {
                    Pin::new(&mut *conn).graceful_shutdown();
                    ending = true;
                }
                _ = close_all.cancelled() => return,
                _ = check.tick() => {
                    let idle = in_flight.load(Ordering::Relaxed) == 0;
                    if idle && activity.quiet() >= idle_limit {
                        if ending {
                            tracing::debug!("closing the idle connection of {peer}: it did not end gracefully");
                            return;
                        }
                        Pin::new(&mut *conn).graceful_shutdown();
                        ending = true;
                    } else if idle && !parking && !ending && activity.writes() > writes_at_build && activity.quiet() >= PARK_AFTER {
                        Pin::new(&mut *conn).graceful_shutdown();
                        parking = true;
                    }
                }
            }
        };
        if ended.is_err() {
            return;
        }
        let parts = (*conn).into_parts();
        let rewind = parts.io.into_inner();
        // Copied out, at their own size: hyper's read buffer (8 KiB) would
        // stay allocated behind even an empty `Bytes` taken from it.
        ahead = if parts.read_buf.is_empty() && rewind.ahead.is_empty() {
            Bytes::new()
        } else {
            let mut read = BytesMut::with_capacity(parts.read_buf.len() + rewind.ahead.len());
            read.extend_from_slice(&parts.read_buf);
            read.extend_from_slice(&rewind.ahead);
            read.freeze()
        };
        drop(parts.read_buf);
        io = rewind.io;
        if let Some(tunnel) = upgrades.awaited() {
            // Switched protocols: the stream is the tunnel's now.
            let _ = tunnel.send(Box::new(Rewind::new(ahead, io)));
            return;
        }
        if !parking || ending {
            // The client asked to close (or spoke HTTP/1.0), or the gateway stops.
            close(&mut io).await;
            return;
        }
        // Parked: hyper's connection and its buffers are gone.
        parked = Some(parks.park());
    }
}

/// How long a closing connection's TLS goodbye may take to send.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// Ends the connection with TLS's goodbye (`close_notify`), sent within
/// [`CLOSE_WITHIN`].
async fn close(io: &mut TlsIo) {
    let _ = tokio::time::timeout(CLOSE_WITHIN, io.shutdown()).await;
}
