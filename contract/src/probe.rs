//! A small HTTP/1.1 GET for loopback probes: the gateway's health checks of
//! the worker, `omni-gateway healthcheck` and `doctor`, and the worker's read
//! of `/gateway/status`. One client (hyper's), one timeout covering connect,
//! head and body, and a bounded body, instead of a parser per caller.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Where a probe connects: a TCP address, or a Unix socket (the worker's,
/// which only the gateway can reach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(Arc<Path>),
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint::Tcp(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => addr.fmt(f),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Endpoint {
    /// The `Host` a request to it names: the address, or `localhost` for a socket.
    pub fn host(&self) -> String {
        match self {
            Endpoint::Tcp(addr) => addr.to_string(),
            Endpoint::Unix(_) => "localhost".to_owned(),
        }
    }
}

/// Largest body a probe reads; status documents are a few KiB.
const BODY_LIMIT: usize = 1024 * 1024;

/// The status and body of a probe.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    /// The body as text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("nothing answers on {addr}: {source}")]
    Connect { addr: Endpoint, source: std::io::Error },
    #[error("no answer from {addr} within {} ms", .timeout.as_millis())]
    Timeout { addr: Endpoint, timeout: Duration },
    #[error("bad HTTP exchange with {addr}: {detail}")]
    Http { addr: Endpoint, detail: String },
}

/// `GET path` on `addr` over a fresh connection, all within `timeout`.
pub async fn get(addr: impl Into<Endpoint>, path: &str, timeout: Duration) -> Result<Answer, ProbeError> {
    let addr = addr.into();
    match tokio::time::timeout(timeout, exchange(&addr, path)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout { addr, timeout }),
    }
}

/// `method path` on `addr` with `headers` and a JSON `body` (empty when
/// `None`), all within `timeout`: the worker's calls of the gateway's
/// internal endpoints, some of which answer only once a long job is done.
pub async fn send(addr: SocketAddr, method: hyper::Method, path: &str, headers: &[(&str, &str)], body: Option<Bytes>, timeout: Duration) -> Result<Answer, ProbeError> {
    let http = |detail: String| ProbeError::Http { addr: addr.into(), detail };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| ProbeError::Connect { addr: addr.into(), source })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, concat!("omni-probe/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(http_body_util::Full::new(body.unwrap_or_default())).map_err(|e| http(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| http(e.to_string()))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), BODY_LIMIT).collect().await.map_err(|e| http(e.to_string()))?.to_bytes();
        driver.abort();
        Ok(Answer { status, body })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout { addr: addr.into(), timeout }),
    }
}

async fn exchange(addr: &Endpoint, path: &str) -> Result<Answer, ProbeError> {
    match addr {
        Endpoint::Tcp(tcp) => {
            let stream = tokio::net::TcpStream::connect(tcp).await.map_err(|source| ProbeError::Connect { addr: addr.clone(), source })?;
            let _ = stream.set_nodelay(true);
            exchange_on(stream, addr, path).await
        }
        Endpoint::Unix(socket) => {
            let stream = tokio::net::UnixStream::connect(socket).await.map_err(|source| ProbeError::Connect { addr: addr.clone(), source })?;
            exchange_on(stream, addr, path).await
        }
    }
}

async fn exchange_on<S>(stream: S, addr: &Endpoint, path: &str) -> Result<Answer, ProbeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |detail: String| ProbeError::Http { addr: addr.clone(), detail };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| http(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.host())
        .header(hyper::header::USER_AGENT, concat!("omni-probe/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| http(e.to_string()))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), BODY_LIMIT).collect().await.map_err(|e| http(e.to_string()))?.to_bytes();
    driver.abort();
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn one_shot_server(reply: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            socket.write_all(reply).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn reads_status_and_body() {
        let addr = one_shot_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown").await;
        let answer = get(addr, "/health", Duration::from_secs(2)).await.unwrap();
        assert_eq!((answer.status, answer.text().as_str()), (503, "down"));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let addr = one_shot_server(b"").await;
        let listener_gone = get(addr, "/", Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(listener_gone, ProbeError::Http { .. } | ProbeError::Timeout { .. }), "{listener_gone}");
    }

    #[tokio::test]
    async fn asks_over_a_unix_socket() {
        let dir = std::env::temp_dir().join(format!("omni-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path: Arc<Path> = dir.join("api.sock").into();
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = socket.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase().contains("host: localhost"));
            socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
        });
        let answer = get(Endpoint::Unix(path.clone()), "/api/v1/health", Duration::from_secs(2)).await.unwrap();
        assert_eq!((answer.status, answer.text().as_str()), (200, "ok"));
        std::fs::remove_dir_all(&dir).unwrap();
        let gone = get(Endpoint::Unix(path), "/", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(gone, ProbeError::Connect { .. }), "{gone}");
        assert!(gone.to_string().contains("unix:"), "{gone}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(matches!(get(addr, "/", Duration::from_secs(1)).await, Err(ProbeError::Connect { .. })));
    }
}
