#!/usr/bin/env python3
"""Backup benchmark: the backup API beside raw pg_dump / psql on one database.

Starts a real omni-gateway (embedded PostgreSQL, release build) in a temporary
directory, fills a table with N rows, and in each round runs, interleaved:
  api backup     POST /api/v1/backup/create through the gateway
  raw pg_dump    pg_dump --clean --if-exists > file, same server, same account
  api restore    POST /api/v1/backup/restore/<api backup> (includes the safety backup)
  raw psql       psql --single-transaction -v ON_ERROR_STOP=1 -f <raw dump>
Then downloads a 1 GiB backup file through the gateway and compares it with
reading the same file from disk (both from the page cache after the first read).

Usage: bench/backup.py [ROUNDS]   (writes the "Backups" section of BENCHMARKS.md)
"""

import os
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
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
KEY = "bench-api-key-0123456789"
SIZES = [100_000, 1_000_000]


BIN = pg_bin_dir()


def call(port, method, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers={"x-api-key": KEY})
    with urllib.request.urlopen(req, timeout=3600) as r:
        import json
        return json.loads(r.read())


def timed(f):
    t = time.perf_counter()
    result = f()
    return time.perf_counter() - t, result


def main():
    work = Path(tempfile.mkdtemp(prefix="omni-bench-backup-"))
    work.chmod(0o755)  # run as root, PostgreSQL runs as postgres and must reach its data directory
    port, pg_port = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
        "OMNI_PORT": str(port), "PGSERVE_PORT": str(pg_port), "PGSERVE_BIN_DIR": str(BIN),
        "OMNI_API_KEY": KEY, "OMNI_BACKUP_KEEP": "0", "LOG_LEVEL": "warn",
    }
    log = open(work / "gateway.log", "w")
    gw = subprocess.Popen([str(GATEWAY)], cwd=work, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_healthy(port, gw, poll=0.2, log=work / "gateway.log")
        password = (work / "data" / "postgres.password").read_text().strip()
        pg_env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg_port), PGUSER="postgres", PGDATABASE="omni", PGPASSWORD=password)
        backups = work / "data" / "backups"

        def psql(sql):
            subprocess.run([str(BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], env=pg_env, check=True, stdout=subprocess.DEVNULL)

        rows = []
        for n in SIZES:
            psql("SET client_min_messages = warning; DROP TABLE IF EXISTS bench")
            psql(f"""CREATE TABLE bench (id bigint PRIMARY KEY, label text NOT NULL, amount numeric(12,2), at timestamptz, payload jsonb);
                     INSERT INTO bench SELECT g, 'row ' || g || ' some text to give the row a realistic width', g * 1.25,
                            '2024-01-01'::timestamptz + g * interval '1 minute', jsonb_build_object('n', g, 'even', g % 2 = 0)
                     FROM generate_series(1, {n}) g""")
            psql("VACUUM ANALYZE bench")
            raw_file = work / "raw.sql"
            t = {"api backup": [], "raw pg_dump": [], "api restore": [], "raw psql": []}
            size = 0
            for _ in range(ROUNDS):
                d, created = timed(lambda: call(port, "POST", "/api/v1/backup/create"))
                t["api backup"].append(d)
                size = created["size_bytes"]

                def raw_dump():
                    with open(raw_file, "wb") as f:
                        subprocess.run([str(BIN / "pg_dump"), "--clean", "--if-exists"], env=pg_env, stdout=f, check=True)
                        os.fsync(f.fileno())
                t["raw pg_dump"].append(timed(raw_dump)[0])

                d, restored = timed(lambda: call(port, "POST", f"/api/v1/backup/restore/{created['backup_file']}"))
                t["api restore"].append(d)
                t["raw psql"].append(timed(lambda: subprocess.run(
                    [str(BIN / "psql"), "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "-f", str(raw_file)],
                    env=pg_env, check=True, stdout=subprocess.DEVNULL))[0])
                for name in (created["backup_file"], restored["safety_backup"]):
                    call(port, "DELETE", f"/api/v1/backup/{name}")
            med = {k: statistics.median(v) for k, v in t.items()}
            rows.append((n, size, med))
            print(n, size, {k: round(v, 2) for k, v in med.items()}, file=sys.stderr)

        # Download: a 1 GiB file in the backup directory (copies of the last dump).
        big = backups / "omni_backup_20000101_000000.sql"
        chunk = raw_file.read_bytes()
        with open(big, "wb") as f:
            written = 0
            while written < 1 << 30:
                part = chunk[: (1 << 30) - written]
                f.write(part)
                written += len(part)
        gib = big.stat().st_size
        subprocess.run(["cat", str(big)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        disk, http = [], []
        for _ in range(3):
            disk.append(timed(lambda: subprocess.run(["cat", str(big)], stdout=subprocess.DEVNULL, check=True))[0])
            http.append(timed(lambda: subprocess.run(
                ["curl", "-sSf", "-o", "/dev/null", "-H", f"x-api-key: {KEY}", f"http://127.0.0.1:{port}/api/v1/backup/download/{big.name}"],
                check=True))[0])
        disk_s, http_s = statistics.median(disk), statistics.median(http)
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, 15)
            gw.wait(timeout=60)
        subprocess.run(["rm", "-rf", str(work)])

    published = {100_000: "10–20 s", 1_000_000: "60–120 s"}
    lines = [
        f"`python3 bench/backup.py {ROUNDS}` — medians of {ROUNDS} interleaved rounds, release build, one machine "
        f"({os.cpu_count()} cores), PostgreSQL from {BIN}. API times are measured by the client through the gateway. "
        "The API restore includes its safety backup (a full pg_dump first), so it is compared with raw pg_dump + psql as well as psql alone.",
        "",
        "| rows | dump size | API backup | raw pg_dump | ratio | API restore | raw psql -1 | raw pg_dump + psql | ratio to dump+psql | published (product we replace) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, size, m in rows:
        both = m["raw pg_dump"] + m["raw psql"]
        lines.append(
            f"| {n:,} | {size / 1e6:.1f} MB | {m['api backup']:.2f} s | {m['raw pg_dump']:.2f} s | {m['api backup'] / m['raw pg_dump']:.2f}× "
            f"| {m['api restore']:.2f} s | {m['raw psql']:.2f} s | {both:.2f} s | {m['api restore'] / both:.2f}× | {published[n]} |"
        )
    lines += [
        "",
        f"Download of a {gib / 2**30:.0f} GiB backup through the gateway (curl → gateway → worker, streamed): "
        f"{http_s:.2f} s ({gib / http_s / 1e6:.0f} MB/s); reading the same file from the page cache with `cat`: "
        f"{disk_s:.2f} s ({gib / disk_s / 1e6:.0f} MB/s); ratio {http_s / disk_s:.1f}×.",
    ]
    write_section("Backups", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
