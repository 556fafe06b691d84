#!/usr/bin/env python3
"""Cost of seeing inside the gateway: proxy throughput, latency and gateway
CPU per request with one live log client attached to
`GET /gateway/logs/stream`, beside the same without it, in interleaved rounds
of the same run (issue 17; target: overhead < 5%).

The log ring and the metrics sampler are always on (there is no switch); the
client is what varies. To give the stream something to carry, the gateway
runs at LOG_LEVEL=info, and a second client polls `/gateway/logs` and
`/gateway/metrics/history` once a second in the "attached" runs, as an open
Logs page and status page do. The request is a 3-byte static file served by
omni-api, so the proxy's own cost shows.

Usage: bench/logs.py [ROUNDS] [SECONDS]   (writes the "Log ring and live log client" section of BENCHMARKS.md;
BENCH_NO_WRITE=1 only prints; OMNI_GATEWAY_BIN picks the gateway binary, default target/release)
"""

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, static_ui, wait_healthy, write_section  # noqa: E402

GATEWAY = Path(os.environ.get("OMNI_GATEWAY_BIN", ROOT / "target" / "release" / "omni-gateway"))
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SECONDS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
CONNECTIONS = 64
PATH = "/ping.txt"
KEY = "bench-key-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(port):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True).stdout
    if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        raise SystemExit(f"wrk reported errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, p99, total


class LogClient:
    """A live reader of /gateway/logs/stream, plus the page's polling."""

    def __init__(self, port):
        self.port, self.stop, self.bytes = port, threading.Event(), 0
        self.threads = [threading.Thread(target=self.stream, daemon=True), threading.Thread(target=self.poll, daemon=True)]
        for t in self.threads:
            t.start()

    def stream(self):
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(f"GET /gateway/logs/stream HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\n\r\n".encode())
            s.settimeout(0.5)
            while not self.stop.is_set():
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                self.bytes += len(chunk)

    def poll(self):
        while not self.stop.wait(1.0):
            for path in ("/gateway/logs?limit=200", "/gateway/metrics/history"):
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"x-api-key": KEY})
                with urllib.request.urlopen(req, timeout=5) as r:
                    self.bytes += len(r.read())

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)


def main():
    if not GATEWAY.exists():
        raise SystemExit(f"{GATEWAY} is missing: cargo build --release --workspace (or set OMNI_GATEWAY_BIN)")
    if not shutil.which("wrk"):
        raise SystemExit("bench/logs.py needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="omni-logs-bench-"))
    os.chmod(work, 0o755)
    ui = static_ui(work)
    port = free_port()
    env = dict(os.environ, OMNI_PORT=str(port), PGSERVE_PORT="0", LOG_LEVEL="info", OMNI_UI_DIR=str(ui),
               PGSERVE_MEMORY_MODE="true", OMNI_API_KEY=KEY)
    gw = subprocess.Popen([str(GATEWAY)], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    runs = {"without": [], "with": []}
    streamed = 0
    try:
        wait_healthy(port, gw)
        for i in range(ROUNDS):
            for name in ("without", "with"):
                client = LogClient(port) if name == "with" else None
                before = cpu_ticks(gw.pid)
                rps, p99, total = wrk(port)
                cpu_us = (cpu_ticks(gw.pid) - before) / CLK_TCK / total * 1e6
                if client:
                    client.close()
                    streamed += client.bytes
                runs[name].append((rps, p99, cpu_us))
                print(f"round {i + 1}/{ROUNDS} {name:7} log client: {rps:9.0f} req/s  p99 {p99:.3f} ms  gateway CPU {cpu_us:.1f} µs/request", flush=True)
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in runs.items()}
    w, a = med["without"], med["with"]
    lines = [
        f"Command: `python3 bench/logs.py {ROUNDS} {SECONDS}`: wrk, {CONNECTIONS} connections, 2 threads, {SECONDS} s per run, "
        f"{ROUNDS} interleaved rounds through omni-gateway (LOG_LEVEL=info, memory mode), GET of a 3-byte static file; "
        f"\"with\" = one client on /gateway/logs/stream plus /gateway/logs and /gateway/metrics/history polled every second; "
        f"{os.cpu_count()} cores shared by wrk, the gateway and the worker. Medians; {streamed} bytes reached the log client.",
        "",
        "| live log client | requests/s | p99 ms | gateway CPU µs/request |",
        "|---|---:|---:|---:|",
        f"| without | {w[0]:.0f} | {w[1]:.3f} | {w[2]:.1f} |",
        f"| with | {a[0]:.0f} | {a[1]:.3f} | {a[2]:.1f} |",
        "",
        f"- throughput with ÷ without: **{a[0] / w[0]:.3f}**; CPU per request with ÷ without: **{a[2] / w[2]:.3f}** (target: overhead < 5%)",
        "",
        "The log ring and the metrics sampler have no switch, so both rows include them; the proxy writes no log line per "
        "request at `info` (only `debug` on an upstream failure), so the ring does no per-request work, and the sampler "
        "reads its figures once a second. The difference between the rows is the attached client.",
    ]
    if os.environ.get("BENCH_NO_WRITE") != "1":
        write_section("Log ring and live log client", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
