//! One client's TLS stream, over rustls' unbuffered connection, with
//! buffers that an idle connection gives back.
//!
//! rustls' buffered connection (what `tokio-rustls` wraps) keeps a 4 KiB
//! buffer for received records from its first read to its end, and offers
//! no way to release it: with 1,000 idle HTTPS connections, 4 MB of the
//! gateway's memory held for bytes that are not coming. Here the received
//! records, the decrypted bytes not yet read and the records to send are in
//! buffers of the stream's own, freed whenever the client has nothing more
//! on its way and they hold nothing (a read that would wait): an idle
//! connection keeps rustls' state and the socket. Decrypted records go
//! straight into the reader's buffer; only what does not fit is kept.
//!
//! rustls still does everything TLS is: the handshake, records, alerts,
//! key updates, `close_notify`. This is only the plumbing between it and
//! the socket: received bytes in, decrypted bytes out, and whatever rustls
//! encodes sent in the order it was encoded.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How many bytes one read from the socket asks for: a whole record
/// (16 KiB of data and its framing) at most.
const READ_SIZE: usize = 16 * 1024 + 512;

/// Received bytes held for one message at most: a handshake message may
/// span records (rustls accepts up to 64 KiB), a record holds 16 KiB.
const MAX_RECEIVED: usize = 64 * 1024 + READ_SIZE;

/// Plaintext encrypted per write; the writer comes back for the rest.
const MAX_WRITE: usize = 64 * 1024;

/// Encrypted bytes waiting for the socket before writes wait for it.
const BACKLOG: usize = 64 * 1024;

/// A server's TLS stream over TCP, after its handshake ([`accept`]).
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Bytes received and not yet processed (the rest of a record, or of
    /// a handshake message).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read: `plain[taken..]`.
    plain: Vec<u8>,
    taken: usize,
    /// Records encoded and not yet sent: `outgoing[sent..]`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The client sent its `close_notify`, or closed the connection.
    peer_closed: bool,
    /// Our `close_notify` is queued; nothing more may be written.
    closing: bool,
}

/// What [`TlsStream::process`] does once rustls has processed every
/// received record.
enum Then<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// The TLS handshake of a client on `tcp`.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut stream = TlsStream { tcp, conn, incoming: Vec::new(), plain: Vec::new(), taken: 0, outgoing: Vec::new(), sent: 0, peer_closed: false, closing: false };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl TlsStream {
    /// The TCP connection (to wait for the client's bytes on).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The protocol ALPN chose.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Whether decrypted bytes wait to be read (then the socket may stay
    /// quiet: do not wait for it).
    pub fn has_unread(&self) -> bool {
        self.taken < self.plain.len()
    }

    /// Frees the buffers that hold nothing.
    fn shed(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if !self.has_unread() {
            self.plain = Vec::new();
            self.taken = 0;
        }
        if self.sent == self.outgoing.len() {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = self.process(None, Then::Nothing) {
                // The alert rustls queued, if the socket takes it now.
                let _ = self.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            // Our flight goes out before we wait for the client's.
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.peer_closed || ready!(self.poll_receive(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed the connection during the TLS handshake")));
            }
        }
    }

    /// Has rustls process every complete record received: what it
    /// decrypts goes to `read` as far as it has room, the rest to `plain`;
    /// what it encodes goes to `outgoing`. Then, once
    /// it may send application data, does `then`; returns the bytes of
    /// `then`'s data encrypted, `None` if it could not be done (the
    /// handshake is not done, or the connection is closed).
    fn process(&mut self, mut read: Option<&mut ReadBuf<'_>>, then: Then<'_>) -> io::Result<Option<usize>> {
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.queue_alert();
                    return Err(invalid(e));
                }
            };
            let mut done = None;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let mut payload = record.map_err(invalid)?.payload;
                        if let Some(buf) = read.as_deref_mut().filter(|_| self.plain.is_empty()) {
                            let n = buf.remaining().min(payload.len());
                            buf.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        self.plain.extend_from_slice(payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => append(&mut self.outgoing, 512, |out| encode.encode(out))?,
                // Sent from `outgoing` in order, before anything encoded later.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    done = Some(None);
                }
                ConnectionState::BlockedHandshake => done = Some(None),
                ConnectionState::WriteTraffic(mut traffic) => {
                    done = Some(match then {
                        Then::Nothing => None,
                        Then::Encrypt(data) => {
                            append(&mut self.outgoing, data.len() + 1024, |out| traffic.encrypt(data, out))?;
                            Some(data.len())
                        }
                        Then::CloseNotify => {
                            append(&mut self.outgoing, 64, |out| traffic.queue_close_notify(out))?;
                            Some(0)
                        }
                    });
                }
                // No early data is accepted (`max_early_data_size` is 0).
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected TLS early data")),
            }
            self.incoming.drain(..discard);
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// After an error: the alert rustls queued for the client, encoded
    /// into `outgoing`.
    fn queue_alert(&mut self) {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    let _ = append(&mut self.outgoing, 512, |out| encode.encode(out));
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }

    /// Reads what the client sent into `incoming`; 0 at its end. A read
    /// that would wait frees the buffers that hold nothing first.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_RECEIVED {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS message too large")));
        }
        // Readiness first: no buffer is allocated for a read that would wait.
        if let Poll::Ready(ready) = self.tcp.poll_read_ready(cx) {
            ready?;
            self.incoming.reserve(READ_SIZE);
            if let Poll::Ready(read) = tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.incoming) {
                return Poll::Ready(read);
            }
        }
        self.shed();
        Poll::Pending
    }

    /// Sends `outgoing`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// Appends to `out` what `write` encodes or encrypts into the slice it is
/// given: `room` bytes to start with, then as many as rustls says it needs.
fn append<E: Room>(out: &mut Vec<u8>, mut room: usize, mut write: impl FnMut(&mut [u8]) -> Result<usize, E>) -> io::Result<()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match e.needs() {
                Some(needed) => room = needed,
                None => {
                    out.truncate(start);
                    return Err(io::Error::other(e));
                }
            },
        }
    }
}

/// rustls' errors of the unbuffered API that can say how much room an
/// encoding needs.
trait Room: std::error::Error + Send + Sync + 'static {
    fn needs(&self) -> Option<usize>;
}

impl Room for EncodeError {
    fn needs(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(size) => Some(size.required_size),
            _ => None,
        }
    }
}

impl Room for EncryptError {
    fn needs(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(size) => Some(size.required_size),
            _ => None,
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.has_unread() {
                let n = buf.remaining().min(this.plain.len() - this.taken);
                buf.put_slice(&this.plain[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plain.len() {
                    this.plain.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            if let Err(e) = this.process(Some(buf), Then::Nothing) {
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // What rustls answered (a key update, session tickets) goes
            // out even if nothing is written; a full socket does not stop
            // the reading.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_receive(cx))? == 0 {
                this.peer_closed = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection is closing")));
        }
        if this.outgoing.len() - this.sent >= BACKLOG {
            ready!(this.poll_send(cx))?;
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        match this.process(None, Then::Encrypt(data))? {
            Some(n) => {
                // Sent now if the socket takes it; else by the flush.
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            None => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection is closed"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            this.process(None, Then::CloseNotify)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server config with a new self-signed certificate for `localhost`,
    /// and a client config trusting it that speaks only `version`.
    fn configs(version: &'static rustls::SupportedProtocolVersion) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap().with_no_client_auth().with_single_cert(vec![cert.der().clone()], der).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(cert.der().to_vec())).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(&[version]).unwrap().with_root_certificates(roots).with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// `len` bytes that differ from one record to the next.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 16_384) as u8).collect()
    }

    /// One poll of a read: `true` if it would wait.
    async fn read_would_wait(stream: &mut TlsStream) -> bool {
        let mut byte = [0u8; 1];
        poll_fn(|cx| Poll::Ready(Pin::new(&mut *stream).poll_read(cx, &mut ReadBuf::new(&mut byte)).is_pending())).await
    }

    #[tokio::test]
    async fn large_bodies_cross_both_ways_through_key_updates_and_idle_buffers_are_freed() {
        const LEN: usize = 3 * 1024 * 1024 + 5;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (server_config, client_config) = configs(version);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut tls = accept(tcp, server_config).await.unwrap();
                for _ in 0..2 {
                    let mut got = vec![0u8; LEN];
                    tls.read_exact(&mut got).await.unwrap();
                    assert!(got == pattern(LEN), "the server read what the client wrote");
                    tls.write_all(&got).await.unwrap();
                    tls.flush().await.unwrap();
                    // The client reads the echo before it writes again: quiet.
                    assert!(read_would_wait(&mut tls).await);
                    assert_eq!((tls.incoming.capacity(), tls.plain.capacity(), tls.outgoing.capacity()), (0, 0, 0), "an idle stream holds no buffer");
                }
                // The client's close_notify: the end of what it sends.
                assert_eq!(tls.read(&mut [0u8; 16]).await.unwrap(), 0);
                tls.shutdown().await.unwrap();
            });
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut client = tokio_rustls::TlsConnector::from(client_config).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
            assert_eq!(client.get_ref().1.protocol_version(), Some(version.version));
            for round in 0..2 {
                if round == 1 && version == &rustls::version::TLS13 {
                    // New keys each way (a KeyUpdate the server must answer).
                    client.get_mut().1.refresh_traffic_keys().unwrap();
                }
                client.write_all(&pattern(LEN)).await.unwrap();
                client.flush().await.unwrap();
                let mut echo = vec![0u8; LEN];
                client.read_exact(&mut echo).await.unwrap();
                assert!(echo == pattern(LEN), "round {round} over {version:?}: the echo differs");
            }
            client.shutdown().await.unwrap();
            // The server's close_notify, then the end.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_failed_handshake_is_an_error_and_plain_http_is_answered_with_an_alert() {
        let (server_config, _) = configs(&rustls::version::TLS13);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        // Plain HTTP on the TLS port.
        let plain = tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            answer
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let e = accept(tcp, server_config.clone()).await.err().expect("no handshake with plain HTTP");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let answer = plain.await.unwrap();
        assert_eq!(answer.first(), Some(&21), "a TLS alert record answers it: {answer:?}");

        // A client gone after its hello.
        let gone = tokio::spawn(async move {
            let (_, client_config) = configs(&rustls::version::TLS13);
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut hello = rustls::ClientConnection::new(client_config, ServerName::try_from("localhost").unwrap()).unwrap();
            let mut bytes = Vec::new();
            hello.write_tls(&mut bytes).unwrap();
            tcp.write_all(&bytes).await.unwrap();
        });
        let (tcp, _) = listener.accept().await.unwrap();
        gone.await.unwrap();
        let e = accept(tcp, server_config).await.err().expect("no handshake with a client gone");
        assert!(matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{e}");
    }
}
