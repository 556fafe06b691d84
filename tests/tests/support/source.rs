//! HTTP requests from a chosen loopback source address (127.0.0.x): the
//! socket is bound before it connects, so the server (or nginx) sees a
//! distinct real TCP peer per simulated client.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// A connection from `source` to `to`.
pub fn connect_from(source: IpAddr, to: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let stream = runtime.block_on(async {
        let socket = if source.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap_or_else(|e| panic!("binding {source}: {e}"));
        socket.connect(to).await.unwrap_or_else(|e| panic!("connecting {source} → {to}: {e}"))
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// Status and body of one `Connection: close` request from `source`.
pub fn send_from(source: &str, port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&serde_json::Value>) -> (u16, Vec<(String, String)>, String) {
    send_from_to(source, "127.0.0.1", port, method, path, headers, body)
}

/// The same, to the server at `host`.
pub fn send_from_to(source: &str, host: &str, port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&serde_json::Value>) -> (u16, Vec<(String, String)>, String) {
    let mut stream = connect_from(source.parse().unwrap(), SocketAddr::new(host.parse().unwrap(), port));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head from {method} {path}: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {text:?}"));
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    (status, headers, body.to_owned())
}

/// Opens `path` as a stream from `source` and returns the connection once
/// the response head has arrived, with that head's status.
pub fn open_stream_from(source: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, TcpStream) {
    let mut stream = connect_from(source.parse().unwrap(), SocketAddr::new("127.0.0.1".parse().unwrap(), port));
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\naccept: text/event-stream\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            other => panic!("{path}: the response head did not arrive ({other:?}): {:?}", String::from_utf8_lossy(&got)),
        }
    }
    let status = String::from_utf8_lossy(&got).split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, stream)
}
