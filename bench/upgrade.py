#!/usr/bin/env python3
"""Major-upgrade benchmark: the gateway's automatic upgrade beside a bare pg_upgrade.

Builds once a PostgreSQL 15 cluster (Debian's binaries) holding about
BENCH_UPGRADE_MB megabytes (default 1024) through a real omni-gateway, keeps
a pristine copy, then in each round, side by side on fresh copies of it:
  gateway    omni-gateway started with PGSERVE_BIN_DIR at PostgreSQL 17:
             from the start to /health 200 (upgrade included)
  bare       initdb (17) + pg_upgrade --copy, run by hand as the postgres account
  start      a normal omni-gateway start on the upgraded cluster, to /health 200
The target: gateway <= 1.15 x (bare + start). pg_upgrade --clone is measured
too when the filesystem can clone files.

Usage: bench/upgrade.py [ROUNDS]   (writes the "Major upgrade" section of BENCHMARKS.md)
Environment: BENCH_PROFILE (release), BENCH_UPGRADE_MB (1024), PG17_BIN_DIR
(default target/pg17/bin, fetched by tests/pg/fetch-pg17.sh).
"""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, wait_healthy, write_section  # noqa: E402

PROFILE = os.environ.get("BENCH_PROFILE", "release")
GATEWAY = ROOT / "target" / PROFILE / "omni-gateway"
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SIZE_MB = int(os.environ.get("BENCH_UPGRADE_MB", "1024"))
PG15 = Path("/usr/lib/postgresql/15/bin")


def pg17():
    if os.environ.get("PG17_BIN_DIR"):
        return Path(os.environ["PG17_BIN_DIR"])
    out = subprocess.run(["bash", str(ROOT / "tests/pg/fetch-pg17.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def as_postgres(args, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--"] + [str(a) for a in args], check=True, **kw)


class Gateway:
    """One omni-gateway run in `work`, timed from spawn to /health 200."""

    def __init__(self, work, bin_dir, log_name):
        self.port, self.pg_port = free_port(), free_port()
        env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
            "OMNI_PORT": str(self.port), "PGSERVE_PORT": str(self.pg_port), "PGSERVE_BIN_DIR": str(bin_dir),
            "LOG_LEVEL": "info",
        }
        self.log = work / log_name
        out = open(self.log, "w")
        t = time.perf_counter()
        self.proc = subprocess.Popen([str(GATEWAY)], cwd=work, env=env, stdout=out, stderr=out, start_new_session=True)
        wait_healthy(self.port, self.proc, timeout=3600, poll=0.01, log=self.log)
        self.seconds = time.perf_counter() - t

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def fill(work):
    """A PostgreSQL 15 cluster of about SIZE_MB in work/data/postgres."""
    gw = Gateway(work, PG15, "make.log")
    password = (work / "data" / "postgres.password").read_text().strip()
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(gw.pg_port), PGUSER="postgres", PGDATABASE="omni", PGPASSWORD=password)
    rows = SIZE_MB * 1024 * 1024 // 340  # ~340 bytes a row on disk, with its index entry
    sql = f"""CREATE TABLE bench (id bigint PRIMARY KEY, label text NOT NULL, amount numeric(12,2), at timestamptz);
              INSERT INTO bench SELECT g, 'row ' || g || ' with some text to give it a realistic width', g * 1.25,
                     '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, {rows}) g;
              CHECKPOINT;"""
    subprocess.run([str(PG15 / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], env=env, check=True)
    gw.stop()
    return rows


def du_mb(path):
    return int(subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def fresh_copy(pristine, work):
    """work/data/postgres (+ password file) as a copy of the pristine cluster."""
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(pristine / "postgres"), str(data / "postgres")], check=True)
    shutil.copy2(pristine / "postgres.password", data / "postgres.password")
    subprocess.run(["sync"], check=True)


def can_clone(directory):
    a, b = directory / ".clone-a", directory / ".clone-b"
    a.write_bytes(b"x" * 4096)
    ok = subprocess.run(["cp", "--reflink=always", str(a), str(b)], capture_output=True).returncode == 0
    a.unlink()
    b.unlink(missing_ok=True)
    return ok


def bare(work, new_bin, method):
    """initdb + pg_upgrade by hand on work/data/postgres; returns (initdb s, pg_upgrade s)."""
    data = work / "data" / "postgres"
    new = work / "data" / "new"
    new.mkdir()
    shutil.chown(new, "postgres", "postgres")
    new.chmod(0o700)
    password = (work / "data" / "postgres.password").read_text().strip()
    pw = work / "pw"
    pw.write_text(password)
    shutil.chown(pw, "postgres", "postgres")
    t = time.perf_counter()
    as_postgres([new_bin / "initdb", "-D", new, "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth=scram-sha-256", "--data-checksums", f"--pwfile={pw}", "--no-sync"], stdout=subprocess.DEVNULL)
    t_initdb = time.perf_counter() - t
    env = dict(os.environ, PGPASSWORD=password)
    t = time.perf_counter()
    as_postgres([new_bin / "pg_upgrade", "-b", PG15, "-B", new_bin, "-d", data, "-D", new, "-p", free_port(), "-P", free_port(),
                 "--socketdir", work / "sock", method], cwd=work / "sock", env=env, stdout=subprocess.DEVNULL)
    return t_initdb, time.perf_counter() - t


def main():
    new_bin = pg17()
    work = Path(tempfile.mkdtemp(prefix="omni-bench-upgrade-"))
    work.chmod(0o755)  # run as root, PostgreSQL runs as postgres and must reach its data directory
    (work / "sock").mkdir()
    shutil.chown(work / "sock", "postgres", "postgres")
    try:
        t = time.perf_counter()
        rows = fill(work)
        pristine = work / "pristine"
        (work / "data").rename(pristine)
        size = du_mb(pristine / "postgres")
        print(f"cluster: {rows} rows, {size} MB, made in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        clone = can_clone(work)
        t_gw, t_init, t_copy, t_clone, t_start = [], [], [], [], []
        for r in range(ROUNDS):
            fresh_copy(pristine, work)
            gw = Gateway(work, new_bin, f"upgrade-{r}.log")
            t_gw.append(gw.seconds)
            gw.stop()
            assert "upgrade done" in gw.log.read_text(), gw.log.read_text()[-3000:]
            # A normal start on the upgraded cluster.
            gw = Gateway(work, new_bin, f"start-{r}.log")
            t_start.append(gw.seconds)
            gw.stop()
            fresh_copy(pristine, work)
            i, c = bare(work, new_bin, "--copy")
            t_init.append(i)
            t_copy.append(c)
            if clone:
                fresh_copy(pristine, work)
                t_clone.append(sum(bare(work, new_bin, "--clone")))
            print(f"round {r + 1}: gateway {t_gw[-1]:.2f} s, initdb {i:.2f} s, pg_upgrade --copy {c:.2f} s, normal start {t_start[-1]:.2f} s", file=sys.stderr)
        med = statistics.median
        floor = med(t_init) + med(t_copy) + med(t_start)
        ratios = sorted(g / (i + c + s) for g, i, c, s in zip(t_gw, t_init, t_copy, t_start))
        verdict = "meets" if med(t_gw) / floor <= 1.15 else "misses"
        body = f"""Command: `BENCH_PROFILE={PROFILE} BENCH_UPGRADE_MB={SIZE_MB} python3 bench/upgrade.py {ROUNDS}` (`make bench`). A PostgreSQL 15
cluster of {size} MB ({rows} rows) made through the gateway; each round upgrades fresh copies of it to PostgreSQL 17.10
side by side. Medians of {ROUNDS} rounds, in seconds, on a 2-core machine; absolute times are noisy, compare the ratio.

| what | median s |
|---|---|
| gateway: start → `/health` 200, upgrade included | {med(t_gw):.2f} |
| bare `initdb` (17) | {med(t_init):.2f} |
| bare `pg_upgrade --copy` | {med(t_copy):.2f} |
| normal gateway start on the upgraded cluster | {med(t_start):.2f} |
| bare `initdb` + `pg_upgrade --clone` | {f"{med(t_clone):.2f}" if clone else "n/a: this filesystem cannot clone files"} |

Gateway ÷ (initdb + pg_upgrade --copy + normal start): **{med(t_gw) / floor:.2f}×** (per-round ratios {", ".join(f"{x:.2f}" for x in ratios)});
target ≤ 1.15×: {verdict} it. The gateway's extra work: reading the old cluster's settings (`postgres --single`),
measuring the cluster for the disk check, and the state file's fsyncs (`pg_upgrade`'s own consistency checks are in both:
the gateway no longer runs a separate `pg_upgrade --check` before it, which cost about 1 s, 1.16× in the run before that change)."""
        write_section("Major upgrade", body)
        print(body)
    finally:
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
