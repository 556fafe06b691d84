#!/usr/bin/env python3
"""Point-in-time recovery benchmark (issue 14).

Starts a real omni-gateway (embedded PostgreSQL, WAL streaming on) in a
temporary directory, fills a table with about SIZE_MB of data, then:
  base backup   POST /api/v1/backup/base (pg_basebackup + pg_verifybackup)
                beside the bare tools with the same options on the same server
  restore-to    POST /api/v1/backup/restore-to a time after SIZE_MB more of
                writes (that much WAL to replay), the whole request: stop,
                restore, replay, start, serving again
  commit p50/99 preference upserts (POST /api/v1/preferences, one commit
                each), streaming on and with OMNI_WAL_SYNC=true

Usage: bench/pitr.py [SIZE_MB]   (default 1024; writes the "Point-in-time
recovery" section of BENCHMARKS.md)
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, pg_bin_dir, wait_healthy, write_section  # noqa: E402

PROFILE = os.environ.get("BENCH_PROFILE", "release")
GATEWAY = ROOT / "target" / PROFILE / "omni-gateway"
SIZE_MB = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
KEY = "bench-api-key-0123456789"
BIN = pg_bin_dir()
UPSERTS = 2000
SESSION = "6f1c2a4e-8b7d-4c3a-9e5f-0a1b2c3d4e5f"


def call(port, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    h = {"x-api-key": KEY, **(headers or {})}
    if data is not None:
        h["content-type"] = "application/json"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data, headers=h)
    with urllib.request.urlopen(req, timeout=7200) as r:
        return json.loads(r.read())


def timed(f):
    t = time.perf_counter()
    result = f()
    return time.perf_counter() - t, result


class Stack:
    def __init__(self, sync):
        self.work = Path(tempfile.mkdtemp(prefix="omni-bench-pitr-"))
        self.work.chmod(0o755)  # PostgreSQL runs as postgres and must reach its data directory
        self.port, self.pg_port = free_port(), free_port()
        env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
            "OMNI_PORT": str(self.port), "PGSERVE_PORT": str(self.pg_port), "PGSERVE_BIN_DIR": str(BIN),
            "OMNI_API_KEY": KEY, "LOG_LEVEL": "warn", "OMNI_WAL_SYNC": "true" if sync else "false",
        }
        self.log = self.work / "gateway.log"
        self.proc = subprocess.Popen([str(GATEWAY)], cwd=self.work, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.port, self.proc, poll=0.2, log=self.log)
        password = (self.work / "data" / "postgres.password").read_text().strip()
        self.pg_env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(self.pg_port), PGUSER="postgres", PGDATABASE="omni", PGPASSWORD=password)
        deadline = time.time() + 300
        while not call(self.port, "GET", "/api/v1/backup/window").get("streaming") or not call(self.port, "GET", "/api/v1/backup/window")["base_backups"]:
            if time.time() > deadline:
                raise SystemExit("WAL streaming and the first base backup did not start within 300 s")
            time.sleep(0.5)

    def psql(self, sql):
        out = subprocess.run([str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql], env=self.pg_env, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def fill(self, table, mb):
        # ~1 KB per row.
        self.psql(f"CREATE TABLE IF NOT EXISTS {table} (id bigint, pad text)")
        rows = mb * 1000
        for start in range(0, rows, 100_000):
            self.psql(f"INSERT INTO {table} SELECT g, repeat(md5(g::text), 30) FROM generate_series({start}, {min(rows, start + 100_000) - 1}) g")

    def archived(self):
        lsn = self.psql("SELECT pg_current_wal_lsn()")
        while self.psql(f"SELECT coalesce((SELECT flush_lsn >= '{lsn}' FROM pg_stat_replication WHERE application_name = 'omni_wal'), false)") != "t":
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        shutil.rmtree(self.work, ignore_errors=True)


def latency(stack):
    times = []
    for i in range(UPSERTS):
        t, _ = timed(lambda: call(stack.port, "POST", "/api/v1/preferences", {"key": f"k{i % 50}", "value": str(i)}, {"x-session-id": SESSION}))
        times.append(t * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


def main():
    rows = []
    stack = Stack(sync=False)
    try:
        stack.fill("bench_base", SIZE_MB)
        stack.archived()
        ours, _ = timed(lambda: call(stack.port, "POST", "/api/v1/backup/base"))
        bare_dir = stack.work / "bare-backup"
        # The same options wal/base.rs passes, then the same verification.
        bare_copy, _ = timed(lambda: subprocess.run([str(BIN / "pg_basebackup"), "-D", str(bare_dir), "--format=plain", "--wal-method=stream",
                                                      "--checkpoint=fast", "--manifest-checksums=CRC32C"], env=stack.pg_env, check=True))
        bare_verify, _ = timed(lambda: subprocess.run([str(BIN / "pg_verifybackup"), "--quiet", str(bare_dir)], check=True))
        shutil.rmtree(bare_dir)
        bare = bare_copy + bare_verify
        rows.append(f"| base backup of ~{SIZE_MB} MB (copy + verify) | {ours:.1f} s | {bare:.1f} s (pg_basebackup {bare_copy:.1f} s + pg_verifybackup {bare_verify:.1f} s) | {ours / bare:.2f}x |")

        stack.fill("bench_replay", SIZE_MB)
        stack.psql("SELECT pg_switch_wal()")
        stack.archived()
        took, _ = timed(lambda: call(stack.port, "POST", "/api/v1/backup/restore-to", {"target_time": "latest"}))
        rows.append(f"| restore-to latest, ~{SIZE_MB} MB of WAL to replay (whole request: stop, copy, replay, start, serving) | {took:.1f} s | not measured | — |")
        p50, p99 = latency(stack)
        rows.append(f"| preference upsert, streaming on | p50 {p50:.2f} ms, p99 {p99:.2f} ms | | |")
    finally:
        stack.stop()
    stack = Stack(sync=True)
    try:
        p50s, p99s = latency(stack)
        rows.append(f"| preference upsert, OMNI_WAL_SYNC=true | p50 {p50s:.2f} ms, p99 {p99s:.2f} ms | | |")
    finally:
        stack.stop()
    body = "\n".join([
        f"`bench/pitr.py {SIZE_MB}` ({PROFILE} build, PostgreSQL {BIN.parent.name}, {UPSERTS} upserts per latency row).",
        "",
        "| what | omni | bare tools | ratio |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    write_section("Point-in-time recovery", body)


if __name__ == "__main__":
    main()
