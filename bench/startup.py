#!/usr/bin/env python3
"""Startup benchmark: omni-gateway beside the true floor, a bare `postgres`.

The floor is the same work with nothing around it: a `postgres` process
started directly on the cluster (no pg_ctl, whose 100 ms polling would hide
overhead), ready at its first `SELECT 1` over TCP, tried every 10 ms, with the
same password authentication (SCRAM) as the gateway's. Each round runs, in
turn and on the same PostgreSQL binaries:

  bare cold     initdb --data-checksums (with its fsync) + bare postgres
  gateway cold  omni-gateway on a new data directory, until /health is 200
  bare warm     bare postgres on the gateway's cluster
  gateway warm  omni-gateway on that existing cluster, until /health is 200
  gateway mem   omni-gateway in memory mode, until /health is 200

Memory mode is compared with the warm floor (a throw-away cluster should
start about as fast as an existing one). Interleaving the variants inside
each round spreads the machine's noise over all of them; the table reports
medians and ratios from this one run.

Usage: bench/startup.py [ROUNDS]   (writes the "Startup" section of BENCHMARKS.md)
"""

import base64
import hashlib
import hmac
import os
import pwd
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, pg_bin_dir, wait_healthy, write_section  # noqa: E402

GATEWAY = Path(os.environ.get("OMNI_GATEWAY_BIN", ROOT / "target" / "release" / "omni-gateway"))
ROUNDS = int(sys.argv[1]) if __name__ == "__main__" and len(sys.argv) > 1 else 9
FLOOR_POLL = 0.010

BIN = pg_bin_dir()
AS_ROOT = os.geteuid() == 0
PG_USER = pwd.getpwnam("postgres") if AS_ROOT else None


def as_pg():
    """Popen arguments that run a PostgreSQL process as the postgres account
    when we are root (a plain setuid, as the gateway does; no runuser/PAM)."""
    if not AS_ROOT:
        return {}
    return {"user": PG_USER.pw_uid, "group": PG_USER.pw_gid, "extra_groups": []}


def new_dir(parent):
    d = Path(tempfile.mkdtemp(dir=parent))
    os.chmod(d, 0o755)
    if AS_ROOT:
        os.chown(d, PG_USER.pw_uid, PG_USER.pw_gid)
    return d


# ---------------------------------------------------------------- SELECT 1 over TCP

def _read_msg(sock):
    head = _read_exact(sock, 5)
    kind, length = head[:1], struct.unpack("!I", head[1:])[0]
    return kind, _read_exact(sock, length - 4)


def _read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _send(sock, kind, body):
    sock.sendall(kind + struct.pack("!I", len(body) + 4) + body)


def select1(port, password, user="postgres", database="postgres"):
    """One connection, SCRAM-SHA-256 (or trust) login, `SELECT 1`. Raises
    while the server does not accept connections or answers an error."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
        sock.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
        nonce = base64.b64encode(os.urandom(18)).decode()
        client_first = f"n=,r={nonce}"
        client_key = stored_key = auth_message = None
        while True:
            kind, body = _read_msg(sock)
            if kind == b"E":
                raise ConnectionError(body.decode(errors="replace"))
            if kind == b"Z":
                break
            if kind != b"R":
                continue
            code = struct.unpack("!I", body[:4])[0]
            if code == 10:  # SASL: start SCRAM-SHA-256
                first = ("n,," + client_first).encode()
                _send(sock, b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
            elif code == 11:  # SASLContinue: the server's nonce, salt and iterations
                server_first = body[4:].decode()
                attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
                client_key = hmac.digest(salted, b"Client Key", "sha256")
                stored_key = hashlib.sha256(client_key).digest()
                final_bare = f"c=biws,r={attrs['r']}"
                auth_message = f"{client_first},{server_first},{final_bare}".encode()
                signature = hmac.digest(stored_key, auth_message, "sha256")
                proof = bytes(a ^ b for a, b in zip(client_key, signature))
                _send(sock, b"p", f"{final_bare},p={base64.b64encode(proof).decode()}".encode())
            elif code not in (0, 12):
                raise ConnectionError(f"unsupported authentication request {code}")
        _send(sock, b"Q", b"SELECT 1\0")
        while True:
            kind, body = _read_msg(sock)
            if kind == b"E":
                raise ConnectionError(body.decode(errors="replace"))
            if kind == b"Z":
                return


# ---------------------------------------------------------------- the floor

def bare_postgres(data, password):
    """Starts `postgres` on `data`, waits for its first SELECT 1 (tried every
    10 ms), returns (seconds, process). Stop it with stop_bare()."""
    port = free_port()
    sock_dir = Path(tempfile.mkdtemp(dir=data.parent))
    if AS_ROOT:
        os.chown(sock_dir, PG_USER.pw_uid, PG_USER.pw_gid)
    t = time.perf_counter()
    p = subprocess.Popen([str(BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock_dir), "-c", "listen_addresses=127.0.0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **as_pg())
    deadline = t + 60
    while True:
        try:
            select1(port, password)
            return time.perf_counter() - t, p
        except OSError:
            if p.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"bare postgres on {data} did not start (exit {p.poll()})")
            time.sleep(FLOOR_POLL)


def stop_bare(p):
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)


def bare_cold(work):
    """initdb as the gateway runs it, but with its own fsync, then the bare start."""
    parent = new_dir(work)
    data = parent / "pg"
    password = "bench-password"
    pwfile = parent / "pw"
    pwfile.write_text(password)
    if AS_ROOT:
        os.chown(pwfile, PG_USER.pw_uid, PG_USER.pw_gid)
    t = time.perf_counter()
    subprocess.run([str(BIN / "initdb"), "-D", str(data), "--username=postgres", "--encoding=UTF8", "--locale=C",
                    "--auth=scram-sha-256", "--data-checksums", f"--pwfile={pwfile}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_pg())
    _, p = bare_postgres(data, password)
    elapsed = time.perf_counter() - t
    stop_bare(p)
    return elapsed


def bare_warm(gw_dir):
    """The gateway's own cluster, started bare."""
    data = gw_dir / "data" / "postgres"
    password = (gw_dir / "data" / "postgres.password").read_text().strip()
    elapsed, p = bare_postgres(data, password)
    stop_bare(p)
    return elapsed


# ---------------------------------------------------------------- the gateway

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
        # Warm the page cache, the binaries cache and the memory-mode template once, outside the figures.
        gateway(new_dir(work), {"PGSERVE_MEMORY_MODE": "true"})
        bare_cold(work)
        for i in range(ROUNDS):
            results["bare_cold"].append(bare_cold(work))
            gw_dir = new_dir(work)
            results["gw_cold"].append(gateway(gw_dir, {})[0])
            results["bare_warm"].append(bare_warm(gw_dir))
            secs, r = gateway(gw_dir, {})
            results["gw_warm"].append(secs)
            rss.append(r)
            results["gw_mem"].append(gateway(new_dir(work), {"PGSERVE_MEMORY_MODE": "true"})[0])
            print(f"round {i + 1}/{ROUNDS}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in results.items()), flush=True)
            shutil.rmtree(gw_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) * 1000 for k, v in results.items()}
    version = subprocess.run([str(BIN / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    table = [
        f"Command: `python3 bench/startup.py {ROUNDS}` (run by `make bench`), {ROUNDS} interleaved rounds, {version}, "
        f"{os.cpu_count()} cores, run as {'root' if AS_ROOT else 'a regular user'}. "
        "Gateway: from process start to `/health` answering 200 (tried every 2 ms). "
        "Floor: a bare `postgres` process on the same cluster, from its start to its first `SELECT 1` over TCP with the "
        "same password login (tried every 10 ms); cold adds `initdb` with the gateway's options, `--data-checksums` included, "
        "and its own fsync. The floor is not `pg_ctl -w start`, whose 100 ms polling hid the gateway's overhead "
        "in earlier versions of this table.",
        "",
        "| what | median ms | ÷ floor | target |",
        "|---|---:|---:|---|",
        f"| floor cold: `initdb --data-checksums` + bare `postgres` | {med['bare_cold']:.0f} | | |",
        f"| gateway cold start (new data dir) | {med['gw_cold']:.0f} | {med['gw_cold'] / med['bare_cold']:.2f} | ≤ 1.1 |",
        f"| floor warm: bare `postgres` on the existing cluster | {med['bare_warm']:.0f} | | |",
        f"| gateway warm start | {med['gw_warm']:.0f} | {med['gw_warm'] / med['bare_warm']:.2f} | ≤ 1.2 |",
        f"| gateway memory mode | {med['gw_mem']:.0f} | {med['gw_mem'] / med['bare_warm']:.2f} (of the warm floor) | ≤ 2.0 |",
        "",
        f"Gateway resident memory when ready (warm start): median {statistics.median(rss) / 1024:.1f} MiB.",
    ]
    if os.environ.get("BENCH_NO_WRITE"):
        print("\n".join(table))
        return
    write_section("Startup", "\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
