#!/usr/bin/env python3
"""HTTPS benchmark (issue 29): omni-gateway terminating TLS beside nginx
terminating TLS with the same certificate and key, both proxying to the same
worker, in interleaved rounds.

Figures, medians over rounds:
  * new TLS connections per second: wrk with `Connection: close`, so every
    request is a full handshake (ECDSA P-256 certificate, TLS 1.3) and the
    handshake is what is measured;
  * keep-alive requests per second over HTTPS (HTTP/1.1) at 64 connections (wrk);
  * HTTP/2 requests per second at 64 concurrent streams (h2load: 4
    connections of 16 streams);
  * resident memory with 1,000 idle TLS connections: the gateway process
    against nginx's master and workers together, before and after 1,000
    clients each complete a handshake and one request over HTTP/1.1 and sit
    idle, and after 1,000 more over HTTP/2 with the first still open. The
    requests of each 1,000 come at once, so the proxy's pool to the worker
    grows as far as it lets it; the worker's own growth is reported beside.

The request is the UI's 195-byte favicon, built into omni-api and served
from memory (as users run it, without OMNI_UI_DIR), so the proxies' own
cost shows. Needs a release build (`cargo build --release --workspace`;
OMNI_GATEWAY_BIN picks another gateway binary), wrk, nginx and h2load
(Debian's nghttp2-client; installed here with apt-get when missing and
running as root).

Usage: bench/tls.py [ROUNDS] [SECONDS]   (writes the "HTTPS" section of
BENCHMARKS.md and its figures into BENCHMARKS.json; BENCH_NO_WRITE=1 only prints)
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, tcp_worker, write_json, write_section  # noqa: E402

GATEWAY = Path(os.environ.get("OMNI_GATEWAY_BIN", ROOT / "target" / "release" / "omni-gateway"))
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SECONDS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
CONNECTIONS = 64
H2_CONNECTIONS, H2_STREAMS = 4, 16
IDLE = 1000
PATH = "/favicon.svg"
# Idle connections must outlive the measurement on both sides.
IDLE_LIMIT_S = 300


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw)


def need_tools():
    missing = [t for t in ("wrk", "nginx", "h2load", "openssl") if not shutil.which(t)]
    if missing == ["h2load"] and os.geteuid() == 0:
        print("installing h2load (nghttp2-client) with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        missing = []
    if missing:
        raise SystemExit(f"bench/tls.py needs {', '.join(missing)}: apt-get install wrk nginx-light nghttp2-client openssl")


def make_certificate(work):
    """A CA and an ECDSA P-256 certificate it signed for 127.0.0.1: (ca, cert, key)."""
    ca, ca_key, cert, key, csr, ext = (work / n for n in ("ca.pem", "ca.key", "cert.pem", "key.pem", "cert.csr", "cert.ext"))
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
       "-subj", "/CN=omni bench CA", "-keyout", str(ca_key), "-out", str(ca),
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
       "-keyout", str(key), "-out", str(csr))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    sh("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
       "-extfile", str(ext), "-out", str(cert))
    os.chmod(key, 0o600)
    return ca, cert, key


def client_context(ca, alpn):
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols([alpn])
    return ctx


def https_get_json(port, ca, path):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_context(ca, "http/1.1").wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    return json.loads(body)


def wait_https_healthy(port, ca, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return https_get_json(port, ca, "/health")
        except Exception as e:  # not yet listening, or not yet ready
            if proc.poll() is not None:
                raise SystemExit(f"omni-gateway exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise SystemExit(f"omni-gateway not healthy over HTTPS within {timeout} s ({e})")
            time.sleep(0.05)


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid):
    """RSS of `pid` and its children (nginx: the master and its workers)."""
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return rss_kib(pid) + sum(rss_kib(int(c)) for c in children)


# ── load generators ─────────────────────────────────────────────────────────

def wrk(port, close):
    args = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s"]
    if close:
        args += ["-H", "Connection: close"]
    out = sh(*args, f"https://127.0.0.1:{port}{PATH}").stdout
    if re.search(r"Non-2xx or 3xx responses", out):
        raise SystemExit(f"wrk reported errors against port {port}:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    # With `Connection: close` a server may close before wrk's read of the
    # next request sees it; count those, refuse anything else.
    if errors and (int(errors.group(1)) or int(errors.group(3)) or int(errors.group(4)) or int(errors.group(2)) > total // 100):
        raise SystemExit(f"wrk reported socket errors against port {port}:\n{out}")
    return rps


def h2load(port):
    out = sh("h2load", "-t2", f"-c{H2_CONNECTIONS}", f"-m{H2_STREAMS}", f"-D{SECONDS}", f"https://127.0.0.1:{port}{PATH}").stdout
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not done or int(done.group(5)) or int(done.group(6)) or "h2" not in out:
        raise SystemExit(f"h2load failed against port {port}:\n{out}")
    return float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))


# ── idle connections ────────────────────────────────────────────────────────

def read_http1_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        body += s.recv(65536)
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_send_get(s, port):
    """The client preface and one GET on stream 1 (HPACK literals, no Huffman)."""
    authority = f"127.0.0.1:{port}".encode()
    block = b"\x82\x87" + b"\x44" + bytes([len(PATH)]) + PATH.encode() + b"\x41" + bytes([len(authority)]) + authority
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0) + h2_frame(1, 0x5, 1, block))


def h2_read_response(s):
    """Reads frames until stream 1 ends, acknowledging the server's SETTINGS."""
    buf = b""
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("HTTP/2 connection closed before the response ended")
            buf += chunk
        length, kind, flags, stream = int.from_bytes(buf[:3], "big"), buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        buf = buf[9 + length:]
        if kind == 4 and not flags & 1:
            s.sendall(h2_frame(4, 1, 0))  # SETTINGS ACK
        if kind == 7:
            raise RuntimeError("GOAWAY")
        if stream == 1 and kind in (0, 1) and flags & 1:
            return


def open_idle(port, ca, protocol):
    """IDLE connections that each completed a handshake and one request, kept
    open. The handshakes come one after another, then the IDLE requests all
    at once (a page load of many clients): the proxy's pool to the worker
    grows as far as its idle limit lets it, as it would in production."""
    ctx = client_context(ca, protocol)
    conns = []
    for _ in range(IDLE):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        if s.selected_alpn_protocol() != protocol:
            raise SystemExit(f"port {port} chose {s.selected_alpn_protocol()!r}, not {protocol}")
        conns.append(s)
    for s in conns:
        if protocol == "h2":
            h2_send_get(s, port)
        else:
            s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    for s in conns:
        if protocol == "h2":
            h2_read_response(s)
        else:
            read_http1_response(s)
    return conns


def settle(pid_rss):
    """RSS once it stops moving (a connection's last buffers freed): two equal readings 200 ms apart, at most 5 s,
    from 5 s after the last request, as a client that stays connected would see it. By then the gateway has parked
    its quiet HTTP/1.1 connections (serve/park.rs, after 1 s), closed the burst's surplus connections to the worker
    (serve/upstream.rs, after 2 s) and given the freed memory back (serve/trim.rs, at the 4th quiet second)."""
    time.sleep(5)
    last = pid_rss()
    for _ in range(25):
        time.sleep(0.2)
        now = pid_rss()
        if now == last:
            return now
        last = now
    return last


def idle_memory(name, port, ca, rss_of, worker_pid):
    """RSS before, with IDLE idle HTTP/1.1 connections, then with IDLE idle
    HTTP/2 ones more (both kept open, so neither reuses what the other freed)."""
    rows = {"before": settle(rss_of)}
    worker_before = rss_kib(worker_pid)
    open_conns = []
    for protocol in ("http/1.1", "h2"):
        open_conns += open_idle(port, ca, protocol)
        rows[protocol] = settle(rss_of)
        rows[f"worker {protocol}"] = rss_kib(worker_pid) - worker_before
        print(f"{name:8} +{IDLE} idle {protocol:8} connections: RSS {rows[protocol] / 1024:.1f} MiB (before any {rows['before'] / 1024:.1f} MiB)", flush=True)
    open_now = established(port)
    for c in open_conns:
        c.close()
    if open_now < 2 * IDLE:
        raise SystemExit(f"{name}: only {open_now} of {2 * IDLE} idle connections were still open at the end")
    # The next server starts with its port free of them.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and established(port) > 0:
        time.sleep(0.05)
    return rows


def established(port):
    out = sh("ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
    return len(out.splitlines())


# ── the run ─────────────────────────────────────────────────────────────────

def main():
    if not GATEWAY.exists():
        raise SystemExit(f"{GATEWAY} does not exist: cargo build --release --workspace")
    need_tools()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="omni-tls-bench-"))
    os.chmod(work, 0o755)
    ca, cert, key = make_certificate(work)
    gw_port, nginx_port = free_port(), free_port()
    (work / "gw").mkdir()
    env = dict(os.environ, OMNI_PORT=str(gw_port), PGSERVE_PORT="0", LOG_LEVEL="warn",
               PGSERVE_MEMORY_MODE="true", OMNI_API_KEY="bench-key-0123456789",
               OMNI_TLS_CERT=str(cert), OMNI_TLS_KEY=str(key), OMNI_HTTP_PORT="off",
               OMNI_HEADER_TIMEOUT_S=str(IDLE_LIMIT_S), OMNI_MAX_CONNECTIONS="8192")
    gw = subprocess.Popen([str(GATEWAY)], cwd=work / "gw", env=env, stdout=subprocess.DEVNULL, stderr=open(work / "gw.log", "w"),
                          start_new_session=True)
    nginx = None
    tcp = None
    try:
        wait_https_healthy(gw_port, ca, gw)
        status = https_get_json(gw_port, ca, "/gateway/status")
        worker = next(c for c in status["components"] if c["name"] == "api")
        tcp, worker_port = tcp_worker(worker["pid"])
        conf = work / "nginx.conf"
        conf.write_text(f"""
worker_processes auto;
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_timeout {IDLE_LIMIT_S}s;
  # The default (1,000) ends a connection every 1,000 requests: handshakes in the keep-alive
  # figures, and h2load does not reconnect. The gateway has no such limit.
  keepalive_requests 100000000;
  client_header_timeout {IDLE_LIMIT_S}s;
  upstream worker {{ server 127.0.0.1:{worker_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{nginx_port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://worker;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
""")
        nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", nginx_port), timeout=1):
                    break
            except OSError:
                if nginx.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"nginx did not start: {(work / 'nginx-error.log').read_text() if (work / 'nginx-error.log').exists() else ''}")
                time.sleep(0.05)
        # Memory first, while both servers are fresh: the throughput runs
        # leave each with buffers it keeps.
        memory = {
            "gateway": idle_memory("gateway", gw_port, ca, lambda: rss_kib(gw.pid), worker["pid"]),
            "nginx": idle_memory("nginx", nginx_port, ca, lambda: tree_rss_kib(nginx.pid), tcp.pid),
        }
        targets = [("gateway", gw_port), ("nginx", nginx_port)]
        runs = {name: {"handshakes": [], "keepalive": [], "h2": []} for name, _ in targets}
        for i in range(ROUNDS):
            for name, port in targets:
                r = runs[name]
                r["handshakes"].append(wrk(port, close=True))
                r["keepalive"].append(wrk(port, close=False))
                r["h2"].append(h2load(port))
                print(f"round {i + 1}/{ROUNDS} {name:8} new connections {r['handshakes'][-1]:7.0f}/s  "
                      f"keep-alive {r['keepalive'][-1]:7.0f} req/s  h2 {r['h2'][-1]:7.0f} req/s", flush=True)
    finally:
        if nginx:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=10)
        if tcp:
            tcp.send_signal(signal.SIGTERM)
            tcp.wait(timeout=30)
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    g, n = med["gateway"], med["nginx"]
    load_after = os.getloadavg()[0]
    per_conn = {name: {"http/1.1": (m["http/1.1"] - m["before"]) / IDLE, "h2": (m["h2"] - m["http/1.1"]) / IDLE} for name, m in memory.items()}
    # The figure the target is about: the server with IDLE idle HTTP/2 connections alone (browsers speak h2).
    h2_alone = {name: m["before"] + (m["h2"] - m["http/1.1"]) for name, m in memory.items()}
    mib = lambda kib: kib / 1024
    nginx_version = sh("nginx", "-v").stderr.strip()
    h2load_version = sh("h2load", "--version").stdout.strip().splitlines()[0]
    lines = [
        f"Command: `python3 bench/tls.py {ROUNDS} {SECONDS}` (run by `make bench`): {ROUNDS} interleaved rounds of {SECONDS} s per "
        f"figure, medians; GET of the 195-byte favicon built into omni-api through each proxy; the same ECDSA P-256 certificate "
        f"and key for both; {nginx_version} (`worker_processes auto`, TLS 1.2/1.3, upstream keep-alive 128) beside the release "
        f"omni-gateway; {os.cpu_count()} cores shared by the clients, the proxy and the worker (1-minute load average "
        f"{load_before:.1f} before the run, {load_after:.1f} after it).",
        "",
        "| | omni-gateway | nginx | gateway ÷ nginx |",
        "|---|---:|---:|---:|",
        f"| new TLS connections/s (wrk, {CONNECTIONS} connections, `Connection: close`) | {g['handshakes']:.0f} | {n['handshakes']:.0f} | **{g['handshakes'] / n['handshakes']:.2f}** |",
        f"| keep-alive requests/s over HTTPS (wrk, HTTP/1.1, {CONNECTIONS} connections) | {g['keepalive']:.0f} | {n['keepalive']:.0f} | **{g['keepalive'] / n['keepalive']:.2f}** |",
        f"| HTTP/2 requests/s ({h2load_version}, {H2_CONNECTIONS} connections × {H2_STREAMS} streams) | {g['h2']:.0f} | {n['h2']:.0f} | **{g['h2'] / n['h2']:.2f}** |",
        "",
        f"Resident memory with idle TLS connections, each after its handshake and one request (handshakes one after another, "
        f"then the requests all at once): "
        f"{IDLE} HTTP/1.1, then {IDLE} HTTP/2 more with the first still open (gateway: its process; nginx: master and workers; "
        "RSS, so shared pages count in each nginx process):",
        "",
        "| | omni-gateway | nginx |",
        "|---|---:|---:|",
        f"| fresh, no connection | {mib(memory['gateway']['before']):.1f} MiB | {mib(memory['nginx']['before']):.1f} MiB |",
        f"| {IDLE} idle HTTP/1.1 connections | {mib(memory['gateway']['http/1.1']):.1f} MiB ({per_conn['gateway']['http/1.1']:.1f} KiB each) | "
        f"{mib(memory['nginx']['http/1.1']):.1f} MiB ({per_conn['nginx']['http/1.1']:.1f} KiB each) |",
        f"| and {IDLE} idle HTTP/2 connections more | {mib(memory['gateway']['h2']):.1f} MiB ({per_conn['gateway']['h2']:.1f} KiB each) | "
        f"{mib(memory['nginx']['h2']):.1f} MiB ({per_conn['nginx']['h2']:.1f} KiB each) |",
        f"| so with {IDLE} idle HTTP/2 connections alone | {mib(h2_alone['gateway']):.1f} MiB | {mib(h2_alone['nginx']):.1f} MiB |",
        f"| the worker's growth meanwhile (HTTP/1.1, then HTTP/2) | {memory['gateway']['worker http/1.1'] / 1024:+.1f}, {memory['gateway']['worker h2'] / 1024:+.1f} MiB | "
        f"{memory['nginx']['worker http/1.1'] / 1024:+.1f}, {memory['nginx']['worker h2'] / 1024:+.1f} MiB |",
        "",
        f"Targets: ≥ 1.0× nginx on each throughput row; gateway resident memory under 32 MiB with {IDLE} idle TLS connections.",
    ]
    print("\n".join(lines))
    if os.environ.get("BENCH_NO_WRITE"):
        return
    write_section("HTTPS", "\n".join(lines))
    write_json(f"python3 bench/tls.py {ROUNDS} {SECONDS}", [
        ("tls.gateway_over_nginx.new_connections_per_s", round(g["handshakes"] / n["handshakes"], 3), "ratio"),
        ("tls.gateway_over_nginx.keepalive_requests_per_s", round(g["keepalive"] / n["keepalive"], 3), "ratio"),
        ("tls.gateway_over_nginx.h2_requests_per_s", round(g["h2"] / n["h2"], 3), "ratio"),
        ("tls.gateway.new_connections_per_s", round(g["handshakes"]), "conn/s"),
        ("tls.nginx.new_connections_per_s", round(n["handshakes"]), "conn/s"),
        ("tls.gateway.keepalive_requests_per_s", round(g["keepalive"]), "req/s"),
        ("tls.nginx.keepalive_requests_per_s", round(n["keepalive"]), "req/s"),
        ("tls.gateway.h2_requests_per_s", round(g["h2"]), "req/s"),
        ("tls.nginx.h2_requests_per_s", round(n["h2"]), "req/s"),
        ("tls.gateway.rss_idle_before", round(mib(memory["gateway"]["before"]), 1), "MiB"),
        ("tls.gateway.rss_1000_idle_http1", round(mib(memory["gateway"]["http/1.1"]), 1), "MiB"),
        ("tls.gateway.rss_1000_idle_h2", round(mib(h2_alone["gateway"]), 1), "MiB"),
        ("tls.nginx.rss_1000_idle_http1", round(mib(memory["nginx"]["http/1.1"]), 1), "MiB"),
        ("tls.nginx.rss_1000_idle_h2", round(mib(h2_alone["nginx"]), 1), "MiB"),
        ("tls.gateway.idle_connection_http1", round(per_conn["gateway"]["http/1.1"], 1), "KiB"),
        ("tls.gateway.idle_connection_h2", round(per_conn["gateway"]["h2"], 1), "KiB"),
    ])


if __name__ == "__main__":
    main()
