#!/usr/bin/env python3
"""Startup benchmark: omni-gateway against bare initdb + pg_ctl, side by side.

Each round runs, in turn and on the same PostgreSQL binaries:
  bare cold     initdb + pg_ctl -w start on a new directory
  gateway cold  omni-gateway on a new data directory, until /health is 200
  bare warm     pg_ctl -w start of an existing cluster
  gateway warm  omni-gateway on an existing cluster, until /health is 200
  gateway mem   omni-gateway in memory mode, until /health is 200
Interleaving the variants inside each round spreads the machine's noise over
all of them; the table reports medians and ratios from this one run.

Usage: bench/startup.py [ROUNDS]   (writes the "Startup" section of BENCHMARKS.md)
"""

import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, pg_bin_dir, wait_healthy, write_section  # noqa: E402

GATEWAY = ROOT / "target" / "release" / "omni-gateway"
ROUNDS = int(sys.argv[1]) if __name__ == "__main__" and len(sys.argv) > 1 else 7


BIN = pg_bin_dir()
AS_ROOT = os.geteuid() == 0
PG_USER = pwd.getpwnam("postgres") if AS_ROOT else None


def as_pg(cmd):
    """Runs PostgreSQL tools as the postgres account when we are root."""
    return ["runuser", "-u", "postgres", "--"] + cmd if AS_ROOT else cmd


def new_dir(parent):
    d = Path(tempfile.mkdtemp(dir=parent))
    if AS_ROOT:
        os.chown(d, PG_USER.pw_uid, PG_USER.pw_gid)
    return d


def bare_cold(work):
    data = new_dir(work) / "pg"
    t = time.perf_counter()
    subprocess.run(as_pg([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]),
                   check=True, stdout=subprocess.DEVNULL)
    start_pg(data)
    elapsed = time.perf_counter() - t
    stop_pg(data)
    return elapsed, data


def start_pg(data):
    port = free_port()
    subprocess.run(as_pg([str(BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(data.parent / "log"),
                          "-o", f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, stdout=subprocess.DEVNULL)


def stop_pg(data):
    subprocess.run(as_pg([str(BIN / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"]), check=True, stdout=subprocess.DEVNULL)


def bare_warm(data):
    t = time.perf_counter()
    start_pg(data)
    elapsed = time.perf_counter() - t
    stop_pg(data)
    return elapsed


def gateway(cwd, extra_env):
    """Starts the gateway, waits for /health 200, returns (seconds, rss_kib), stops it."""
    port = free_port()
    env = dict(os.environ, OMNI_PORT=str(port), PGSERVE_PORT="0", LOG_LEVEL="warn", PGSERVE_BIN_DIR=str(BIN), **extra_env)
    t = time.perf_counter()
    p = subprocess.Popen([str(GATEWAY)], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        wait_healthy(port, p, timeout=60)
        elapsed = time.perf_counter() - t
        rss = int(next(line.split()[1] for line in open(f"/proc/{p.pid}/status") if line.startswith("VmRSS")))
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return elapsed, rss


def main():
    if not GATEWAY.exists():
        raise SystemExit("build first: cargo build --release --workspace")
    work = Path(tempfile.mkdtemp(prefix="omni-bench-"))
    os.chmod(work, 0o755)
    results = {k: [] for k in ["bare_cold", "gw_cold", "bare_warm", "gw_warm", "gw_mem"]}
    rss = []
    try:
        # Warm the page cache and the memory-mode template once, outside the figures.
        gateway(new_dir(work), {"PGSERVE_MEMORY_MODE": "true"})
        for i in range(ROUNDS):
            secs, data = bare_cold(work)
            results["bare_cold"].append(secs)
            gw_dir = new_dir(work)
            secs, _ = gateway(gw_dir, {})
            results["gw_cold"].append(secs)
            results["bare_warm"].append(bare_warm(data))
            secs, r = gateway(gw_dir, {})
            results["gw_warm"].append(secs)
            rss.append(r)
            secs, _ = gateway(new_dir(work), {"PGSERVE_MEMORY_MODE": "true"})
            results["gw_mem"].append(secs)
            print(f"round {i + 1}/{ROUNDS}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in results.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) * 1000 for k, v in results.items()}
    version = subprocess.run([str(BIN / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    table = [
        f"Command: `python3 bench/startup.py {ROUNDS}` (run by `make bench`), {ROUNDS} interleaved rounds, {version}, "
        f"{os.cpu_count()} cores. Time is from process start to `/health` answering 200 (gateway) or to `pg_ctl -w start` returning (bare).",
        "",
        "| what | median ms | gateway ÷ bare | target |",
        "|---|---:|---:|---|",
        f"| bare `initdb` + `pg_ctl -w start` | {med['bare_cold']:.0f} | | |",
        f"| gateway cold start (new data dir) | {med['gw_cold']:.0f} | {med['gw_cold'] / med['bare_cold']:.2f} | ≤ 1.2 |",
        f"| bare `pg_ctl -w start` (existing cluster) | {med['bare_warm']:.0f} | | |",
        f"| gateway warm start | {med['gw_warm']:.0f} | {med['gw_warm'] / med['bare_warm']:.2f} | ≤ 1.2 |",
        f"| gateway memory mode | {med['gw_mem']:.0f} | {med['gw_mem'] / med['bare_cold']:.2f} (vs bare initdb + start) | < 1.0 |",
        "",
        f"Gateway resident memory when ready (warm start): median {statistics.median(rss) / 1024:.1f} MiB.",
    ]
    write_section("Startup", "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
