#!/usr/bin/env python3
"""Proxy benchmark: the same small GET straight to the worker, through
omni-gateway, and through nginx as a keep-alive reverse proxy to the same
worker, measured side by side with wrk in interleaved rounds.

The stack is the real one (release omni-gateway with its embedded PostgreSQL
and omni-api). The request is the UI's 195-byte favicon, served from memory, so the worker's own cost
is small and the proxies' overhead shows. Reports requests/s, p50 and p99
(medians over rounds), the gateway's CPU time per request and its memory.

Usage: bench/proxy.py [ROUNDS] [SECONDS]   (writes the "Proxy" section of BENCHMARKS.md
and its figures, ratios included, into BENCHMARKS.json)

BENCH_GATEWAY_B=path/to/other/omni-gateway adds a second gateway binary (an
older commit's build, say) to the same interleaved rounds, with its own
stack, and only prints: how a change moved the figures, measured side by side.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, machine_busy_seconds, tcp_worker, wait_healthy, write_json, write_section  # noqa: E402

GATEWAY = ROOT / "target" / "release" / "omni-gateway"
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SECONDS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
CONNECTIONS = 64
# The smallest file of the UI built into omni-api (195 bytes), served from
# memory as users run it: OMNI_UI_DIR (development) reads files from disk on
# every request, on blocking threads, and its cost (80 µs of the worker's CPU
# per request, 8 context switches) drowned the proxies' differences.
PATH = "/favicon.svg"
BODY = (ROOT / "ui-dist" / "favicon.svg").read_bytes()
CLK_TCK = os.sysconf("SC_CLK_TCK")
GATEWAY_B = os.environ.get("BENCH_GATEWAY_B")


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def cpu_ticks(pid):
    """(user, system) CPU ticks of `pid`."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def tree_cpu_ticks(pid):
    """(user, system) CPU ticks of `pid` and its children (nginx: the master and its workers)."""
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    ticks = [cpu_ticks(pid)] + [cpu_ticks(int(c)) for c in children]
    return sum(t[0] for t in ticks), sum(t[1] for t in ticks)


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(port, connections=CONNECTIONS, threads=2):
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{SECONDS}s", "--latency", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        raise SystemExit(f"wrk reported errors against port {port}:\n{out}")
    return rps, p50, p99, total


def main():
    if not GATEWAY.exists():
        raise SystemExit("build first: cargo build --release --workspace")
    if not shutil.which("wrk") or not shutil.which("nginx"):
        raise SystemExit("bench/proxy.py needs wrk and nginx: apt-get install wrk nginx-light")
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="omni-proxy-bench-"))
    os.chmod(work, 0o755)
    gw_port, nginx_port = free_port(), free_port()

    def start_gateway(binary, port, name):
        env = dict(os.environ, OMNI_PORT=str(port), PGSERVE_PORT="0", LOG_LEVEL="warn",
                   PGSERVE_MEMORY_MODE="true", OMNI_API_KEY="bench-key-0123456789")
        (work / name).mkdir()
        return subprocess.Popen([str(binary)], cwd=work / name, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    gw = start_gateway(GATEWAY, gw_port, "a")
    gw_b, gw_b_port = None, None
    nginx = None
    tcp = None
    try:
        wait_healthy(gw_port, gw)
        if GATEWAY_B:
            gw_b_port = free_port()
            gw_b = start_gateway(GATEWAY_B, gw_b_port, "b")
            wait_healthy(gw_b_port, gw_b)
        api = next(c for c in get_json(f"http://127.0.0.1:{gw_port}/gateway/status")["components"] if c["name"] == "api")
        tcp, worker_port = tcp_worker(api["pid"])
        conf = work / "nginx.conf"
        conf.write_text(f"""
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream worker {{ server 127.0.0.1:{worker_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{nginx_port};
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
        targets = [("direct", worker_port, None), ("gateway", gw_port, gw.pid), ("nginx", nginx_port, nginx.pid)]
        if gw_b:
            targets.insert(2, ("gateway-b", gw_b_port, gw_b.pid))
        for _, port, _ in targets:
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{PATH}", timeout=1) as r:
                        if r.read() == BODY:
                            break
                except Exception:
                    time.sleep(0.05)
            else:
                raise SystemExit(f"port {port} does not serve {PATH}")
        results = {name: [] for name, _, _ in targets}
        # One connection, one request at a time: the latency a proxy adds
        # when it is not queueing behind a saturated machine.
        unloaded = {name: [] for name, _, _ in targets}
        # The proxies' own CPU time (nginx: master and workers) per request,
        # user and system apart; and the whole machine's (wrk, the worker,
        # the proxy, the kernel) per request on every path.
        cpu = {name: [0, 0, 0] for name, _, pid in targets if pid}
        machine = {name: [0, 0] for name, _, _ in targets}
        for i in range(ROUNDS):
            for name, port, pid in targets:
                before = tree_cpu_ticks(pid) if pid else (0, 0)
                busy_before = machine_busy_seconds()
                rps, p50, p99, total = wrk(port)
                machine[name][0] += machine_busy_seconds() - busy_before
                machine[name][1] += total
                if pid:
                    after = tree_cpu_ticks(pid)
                    cpu[name][0] += after[0] - before[0]
                    cpu[name][1] += after[1] - before[1]
                    cpu[name][2] += total
                results[name].append((rps, p50, p99))
                print(f"round {i + 1}/{ROUNDS} {name:9} {rps:9.0f} req/s  p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
                _, p50_1, p99_1, _ = wrk(port, connections=1, threads=1)
                unloaded[name].append((p50_1, p99_1))
                print(f"round {i + 1}/{ROUNDS} {name:9} 1 connection: p50 {p50_1 * 1000:.0f} µs  p99 {p99_1 * 1000:.0f} µs", flush=True)
        rss = rss_kib(gw.pid)
    finally:
        if nginx:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=10)
        if tcp:
            tcp.send_signal(signal.SIGTERM)
            tcp.wait(timeout=30)
        for g in (gw, gw_b):
            if g:
                g.send_signal(signal.SIGTERM)
                g.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in results.items()}
    d, g, n = med["direct"], med["gateway"], med["nginx"]
    one = {k: tuple(statistics.median(r[i] for r in v) for i in range(2)) for k, v in unloaded.items()}
    cpu_us = {k: (v[0] + v[1]) / CLK_TCK / v[2] * 1e6 for k, v in cpu.items()}
    user_us = {k: v[0] / CLK_TCK / v[2] * 1e6 for k, v in cpu.items()}
    sys_us = {k: v[1] / CLK_TCK / v[2] * 1e6 for k, v in cpu.items()}
    machine_us = {k: v[0] / v[1] * 1e6 for k, v in machine.items()}
    # On a saturated machine requests/s is the cores over the whole
    # machine's CPU per request: 1.2x nginx's requests/s leaves the proxy
    # what 1.2x takes off nginx's whole-machine figure, less what the
    # direct path (wrk and the worker) costs without a proxy.
    budget_12 = machine_us["nginx"] / 1.2 - machine_us["direct"]
    if gw_b:
        b = med["gateway-b"]
        print(f"gateway {g[0]:.0f} req/s, gateway-b {b[0]:.0f} req/s: a ÷ b {g[0] / b[0]:.3f}; ÷ nginx: a {g[0] / n[0]:.3f}, b {b[0] / n[0]:.3f}; "
              f"CPU per request a {cpu_us['gateway']:.1f} µs (user {user_us['gateway']:.1f}), b {cpu_us['gateway-b']:.1f} µs (user {user_us['gateway-b']:.1f}), "
              f"nginx {cpu_us['nginx']:.1f} µs (user {user_us['nginx']:.1f}); "
              f"1 connection over direct a {(one['gateway'][0] - one['direct'][0]) * 1000:.0f} µs, b {(one['gateway-b'][0] - one['direct'][0]) * 1000:.0f} µs")
        print(f"p99 a {g[2]:.3f} ms, b {b[2]:.3f} ms, nginx {n[2]:.3f} ms (a ÷ b {g[2] / b[2]:.3f}); "
              f"p50 over direct at {CONNECTIONS} connections a {(g[1] - d[1]) * 1000:.0f} µs, b {(b[1] - d[1]) * 1000:.0f} µs, nginx {(n[1] - d[1]) * 1000:.0f} µs; "
              f"CPU per request a ÷ b {cpu_us['gateway'] / cpu_us['gateway-b']:.3f}; "
              f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        return
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    lines = [
        f"Command: `python3 bench/proxy.py {ROUNDS} {SECONDS}` (run by `make bench`): wrk, {CONNECTIONS} connections, 2 threads, "
        f"{SECONDS} s per run, {ROUNDS} interleaved rounds, GET of the 195-byte favicon built into omni-api; {os.cpu_count()} cores shared by "
        f"wrk, the proxy and the worker (1-minute load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after it). "
        f"{nginx_version} as a reverse proxy with upstream keep-alive (128) to the same worker. Medians.",
        "",
        "| path | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        f"| direct to the worker | {d[0]:.0f} | {d[1]:.3f} | {d[2]:.3f} |",
        f"| through omni-gateway | {g[0]:.0f} | {g[1]:.3f} | {g[2]:.3f} |",
        f"| through nginx | {n[0]:.0f} | {n[1]:.3f} | {n[2]:.3f} |",
        "",
        "One connection, one request at a time (no queueing), medians:",
        "",
        "| path | p50 µs | p99 µs |",
        "|---|---:|---:|",
        f"| direct to the worker | {one['direct'][0] * 1000:.0f} | {one['direct'][1] * 1000:.0f} |",
        f"| through omni-gateway | {one['gateway'][0] * 1000:.0f} | {one['gateway'][1] * 1000:.0f} |",
        f"| through nginx | {one['nginx'][0] * 1000:.0f} | {one['nginx'][1] * 1000:.0f} |",
        "",
        f"- gateway ÷ nginx throughput: **{g[0] / n[0]:.2f}** (target ≥ 1.2); gateway p99 ÷ nginx p99: **{g[2] / n[2]:.2f}** (target ≤ 1.0)",
        f"- gateway p50 overhead over direct, one connection: **{(one['gateway'][0] - one['direct'][0]) * 1000:.0f} µs** (target ≤ 60 µs); "
        f"at {CONNECTIONS} connections on a saturated machine: {(g[1] - d[1]) * 1000:.0f} µs (nginx: {(n[1] - d[1]) * 1000:.0f} µs)",
        f"- CPU per proxied request: gateway {cpu_us['gateway']:.1f} µs (user {user_us['gateway']:.1f}, system {sys_us['gateway']:.1f}), "
        f"nginx (master and workers) {cpu_us['nginx']:.1f} µs (user {user_us['nginx']:.1f}, system {sys_us['nginx']:.1f}); "
        f"gateway resident memory after the runs: {rss / 1024:.1f} MiB",
        f"- The whole machine's CPU per request (wrk, worker, proxy, kernel): direct {machine_us['direct']:.1f} µs, "
        f"through the gateway {machine_us['gateway']:.1f} µs, through nginx {machine_us['nginx']:.1f} µs. "
        f"At {CONNECTIONS} connections the 2 cores are saturated, so 1.2× nginx's requests/s needs the whole machine at "
        f"{machine_us['nginx'] / 1.2:.1f} µs per request: {budget_12:.1f} µs for the proxy over the direct path, "
        f"against the gateway's system time alone of {sys_us['gateway']:.1f} µs (nginx's {sys_us['nginx']:.1f})",
    ]
    write_section("Proxy", "\n".join(lines))
    one_over = lambda k: (one[k][0] - one["direct"][0]) * 1000
    write_json(f"python3 bench/proxy.py {ROUNDS} {SECONDS}", [
        ("proxy.gateway_over_nginx.requests_per_s", round(g[0] / n[0], 3), "ratio"),
        ("proxy.gateway_over_nginx.p99", round(g[2] / n[2], 3), "ratio"),
        ("proxy.direct.requests_per_s", round(d[0]), "req/s"),
        ("proxy.gateway.requests_per_s", round(g[0]), "req/s"),
        ("proxy.nginx.requests_per_s", round(n[0]), "req/s"),
        ("proxy.gateway.p99", g[2], "ms"),
        ("proxy.nginx.p99", n[2], "ms"),
        ("proxy.gateway.p50_over_direct_64_connections", round((g[1] - d[1]) * 1000), "µs"),
        ("proxy.nginx.p50_over_direct_64_connections", round((n[1] - d[1]) * 1000), "µs"),
        ("proxy.gateway.p50_over_direct_1_connection", round(one_over("gateway")), "µs"),
        ("proxy.nginx.p50_over_direct_1_connection", round(one_over("nginx")), "µs"),
        ("proxy.gateway.cpu_per_request", round(cpu_us["gateway"], 1), "µs"),
        ("proxy.nginx.cpu_per_request", round(cpu_us["nginx"], 1), "µs"),
        ("proxy.gateway.system_cpu_per_request", round(sys_us["gateway"], 1), "µs"),
        ("proxy.nginx.system_cpu_per_request", round(sys_us["nginx"], 1), "µs"),
        ("proxy.direct.machine_cpu_per_request", round(machine_us["direct"], 1), "µs"),
        ("proxy.gateway.machine_cpu_per_request", round(machine_us["gateway"], 1), "µs"),
        ("proxy.nginx.machine_cpu_per_request", round(machine_us["nginx"], 1), "µs"),
        ("proxy.gateway.rss_after", round(rss / 1024, 1), "MiB"),
    ])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
