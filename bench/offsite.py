#!/usr/bin/env python3
"""Off-site repository benchmark (issue 27): the gateway's uploads to S3 and
its restore from the bucket, beside rclone and pgBackRest on the same server.

One local S3 server — `rclone serve s3` from the test kit (tests/stores/), over
TLS with a self-signed certificate because pgBackRest speaks S3 over TLS only;
every client uses that same TLS endpoint — and one release omni-gateway
(embedded PostgreSQL, WAL streaming, OMNI_REPOSITORY_URL=s3://…) whose cluster
is filled with SIZE_MB of rows (1 KB each, md5 text: lz4 cannot make it
vanish). Then, in each round, interleaved (the order reversed every other round):

  gateway base backup  POST /api/v1/backup/base until its manifest.json is in
                       the bucket (HEAD polled every 20 ms); also split into the
                       local backup (the POST) and the upload (POST answered →
                       manifest there), the gateway's CPU time during the upload
  rclone copy          the same base backup files, `rclone copy` to the same
                       bucket (the transfer floor)
  pgbackrest backup    `pgbackrest backup --type=full` of the same cluster to an
                       S3 repository on the same server (compress-type=lz4, the
                       level class of the gateway's lz4 base backups; process-max=1;
                       its expire of the previous backup runs after the round,
                       untimed, as the gateway's retention in the bucket is)
  gateway restore      `omni-gateway restore --from s3://… --to latest` into an
                       empty directory (download, check, unpack, replay)
  pgbackrest restore   `pgbackrest restore` into an empty directory, then a bare
                       postgres replaying (archive-get) until it accepts connections
  recovery point       WRITE_SECONDS of psql sessions committing numbered rows at
                       1,000/s in all (8 psql sessions); each commit's acknowledgement (psql's
                       `INSERT 0 1` read) is timed, then pg_current_wal_flush_lsn()
                       (an upper bound of its commit record's end); the bucket's
                       wal/ is listed every 50 ms and a write counts as off-site
                       at the first listing that shows a chunk (or the whole
                       segment) reaching its LSN

pgBackRest needs WAL archiving: archive_mode=on and an archive_command running
`pgbackrest archive-push` (ALTER SYSTEM, after the fill, the gateway restarted
once); restored copies of the cluster archive nothing (the command checks its
directory).

Needs pgbackrest (Debian's; installed with apt-get when missing) and boto3
(listing the bucket; pip when missing).

Usage: bench/offsite.py [ROUNDS] [SIZE_MB]   (defaults 3, 1024; writes the
"Off-site repository" section of BENCHMARKS.md and its figures into BENCHMARKS.json)
BENCH_OFFSITE_WRITE_SECONDS (default 20): each round's write load.
BENCH_OFFSITE_PERF=/path/prefix: profile the gateway during each upload with
`perf record` (Debian's linux-perf) and print where its CPU went instead of
writing the table.
"""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import json
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_seconds, free_port, pg_bin_dir, store_tools, wait_healthy, write_json, write_section  # noqa: E402

PROFILE = os.environ.get("BENCH_PROFILE", "release")
GATEWAY = ROOT / "target" / PROFILE / "omni-gateway"
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SIZE_MB = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
WRITE_SECONDS = float(os.environ.get("BENCH_OFFSITE_WRITE_SECONDS", "20"))
RATE = 1000
SESSIONS = 8
LIST_EVERY = 0.05
KEY = "bench-api-key-0123456789"
BIN = pg_bin_dir()
BUCKET = "omni-bench"
PREFIX = "omni"
ACCESS, SECRET = "bench-access", "bench-secret-key-0123456789"
SEGMENT = 16 << 20
COMMAND = f"python3 bench/offsite.py {ROUNDS} {SIZE_MB}"
# A file name: `perf record` samples the gateway during each base backup's
# upload into it, the script prints where the CPU went and writes no table
# (the profiler's cost is in those rounds).
PERF = os.environ.get("BENCH_OFFSITE_PERF")


def need_tools():
    if not GATEWAY.exists():
        raise SystemExit("build first: cargo build --release --workspace")
    if not shutil.which("pgbackrest"):
        print("installing pgbackrest (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "pgbackrest"], check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    try:
        import boto3  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "boto3"], check=True)
    rclone = ROOT / "target" / "stores-venv" / "bin" / "rclone"
    return rclone if rclone.exists() else Path(store_tools()["rclone"])


def timed(f):
    t = time.perf_counter()
    result = f()
    return time.perf_counter() - t, result


def children_cpu():
    r = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def as_postgres(args):
    return ["runuser", "-u", "postgres", "--", *args]


class S3Server:
    """`rclone serve s3` over TLS (self-signed), its files under `work/s3`."""

    def __init__(self, rclone, work):
        self.dir = work / "s3"
        (self.dir / "data" / BUCKET).mkdir(parents=True)
        self.cert, self.key = self.dir / "cert.pem", self.dir / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True)
        self.port = free_port()
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self.rclone = rclone
        self.proc = subprocess.Popen([str(rclone), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--cert", str(self.cert), "--key", str(self.key),
                                      "--auth-key", f"{ACCESS},{SECRET}", "--config", "/dev/null", str(self.dir / "data")],
                                     stdout=open(self.dir / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        import boto3
        import botocore.config
        import urllib3
        urllib3.disable_warnings()
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, region_name="us-east-1",
                                   verify=False, config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        deadline = time.time() + 60
        while True:
            try:
                self.client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"rclone serve s3 did not serve: {(self.dir / 'server.log').read_text()[-2000:]}")
                time.sleep(0.1)

    def keys(self, prefix):
        """{key: size} under `prefix`."""
        found, token = {}, None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client.list_objects_v2(**kw)
            for o in page.get("Contents", []):
                found[o["Key"]] = o["Size"]
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def exists(self, key):
        try:
            self.client.head_object(Bucket=BUCKET, Key=key)
            return True
        except Exception:
            return False

    def rclone_env(self):
        return dict(os.environ, RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other", RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS,
                    RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET, RCLONE_CONFIG_BENCH_ENDPOINT=self.endpoint, RCLONE_CONFIG_BENCH_REGION="us-east-1",
                    RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true")

    def rclone_cmd(self, *args):
        return [str(self.rclone), "--config", "/dev/null", "--no-check-certificate", *args]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def s3_env(s3):
    return {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.endpoint,
            # The server's certificate is self-signed (object_store's `allow_invalid_certificates`).
            "AWS_ALLOW_INVALID_CERTIFICATES": "true"}


class Gateway:
    def __init__(self, work, s3):
        self.work = work / "gateway"
        self.work.mkdir()
        self.port, self.pg_port = free_port(), free_port()
        self.env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
            "OMNI_PORT": str(self.port), "PGSERVE_PORT": str(self.pg_port), "PGSERVE_BIN_DIR": str(BIN),
            "OMNI_API_KEY": KEY, "LOG_LEVEL": "info",
            "OMNI_REPOSITORY_URL": f"s3://{BUCKET}/{PREFIX}",
            # Rounds are minutes apart: older base backups go (here and in the
            # bucket), so the disk holds two of them at most.
            "OMNI_PITR_WINDOW": "1m", "OMNI_BACKUP_DRILL_INTERVAL": "30d",
            **s3_env(s3),
        }
        self.log = self.work / "gateway.log"
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([str(GATEWAY)], cwd=self.work, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.port, self.proc, poll=0.2, log=self.log)
        password = (self.work / "data" / "postgres.password").read_text().strip()
        self.pg_env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(self.pg_port), PGUSER="postgres", PGDATABASE="omni", PGPASSWORD=password)
        deadline = time.time() + 300
        while not (w := self.call("GET", "/api/v1/backup/window")).get("streaming") or not w["base_backups"]:
            if time.time() > deadline:
                raise SystemExit("WAL streaming and the first base backup did not start within 300 s")
            time.sleep(0.5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

    def call(self, method, path):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method, headers={"x-api-key": KEY})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise SystemExit(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}") from None

    def psql(self, sql):
        out = subprocess.run([str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql], env=self.pg_env, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def postmaster(self):
        """(data directory, socket directory) of the running cluster, from postmaster.pid."""
        pid_file = next(p for p in (self.work / "data").rglob("postmaster.pid"))
        lines = pid_file.read_text().splitlines()
        return Path(lines[1]), lines[4]

    def fill(self, mb):
        # ~1 KB per row of md5 text (30 different ones): lz4 and TOAST
        # leave most of it, so the backups really move about `mb` MB.
        self.psql("CREATE TABLE IF NOT EXISTS bench_fill (id bigint, pad text)")
        rows = mb * 1000
        for start in range(0, rows, 100_000):
            self.psql(f"INSERT INTO bench_fill SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 30) i) "
                      f"FROM generate_series({start}, {min(rows, start + 100_000) - 1}) g")
        self.psql("CHECKPOINT")


class PgBackRest:
    """pgBackRest with an S3 repository on the same server (TLS, certificate not checked)."""

    def __init__(self, work, s3, gw):
        self.dir = work / "pgbackrest"
        for d in ("log", "lock", "spool"):
            (self.dir / d).mkdir(parents=True)
        self.data, _ = gw.postmaster()
        self.conf = self.dir / "pgbackrest.conf"
        self.s3 = s3
        self.configure(gw)
        # Only the benchmark's cluster archives: a restored copy runs the same
        # command from its own directory and archives nothing.
        self.archive = self.dir / "archive.sh"
        self.archive.write_text(f"""#!/bin/sh
[ "$(pwd -P)" = "{self.data.resolve()}" ] || exit 0
exec pgbackrest --config={self.conf} --stanza=bench archive-push "$1"
""")
        self.archive.chmod(0o755)
        subprocess.run(["chown", "-R", "postgres:postgres", str(self.dir)], check=True)

    def configure(self, gw):
        """The configuration, for the gateway's cluster as it runs now (its socket directory changes at each start)."""
        data, socket_dir = gw.postmaster()
        s3 = self.s3
        self.pg_env = gw.pg_env
        self.conf.write_text(f"""[global]
repo1-type=s3
repo1-path=/pgbackrest
repo1-s3-bucket={BUCKET}
repo1-s3-endpoint=127.0.0.1
repo1-storage-port={s3.port}
repo1-s3-region=us-east-1
repo1-s3-key={ACCESS}
repo1-s3-key-secret={SECRET}
repo1-s3-uri-style=path
repo1-storage-verify-tls=n
repo1-retention-full=1
expire-auto=n
compress-type=lz4
compress-level=1
process-max=1
start-fast=y
log-path={self.dir / 'log'}
lock-path={self.dir / 'lock'}
spool-path={self.dir / 'spool'}
log-level-console=warn
log-level-file=info

[bench]
pg1-path={data}
pg1-port={gw.pg_port}
pg1-socket-path={socket_dir}
""")

    def run(self, *args, check=True):
        out = subprocess.run(as_postgres(["pgbackrest", f"--config={self.conf}", "--stanza=bench", *args]), env=self.pg_env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise SystemExit(f"pgbackrest {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                             + "".join(p.read_text()[-3000:] for p in (self.dir / "log").glob("*.log")))
        return out.stdout

    def newest(self):
        info = json.loads(self.run("info", "--output=json"))[0]
        b = info["backup"][-1]
        return b["label"], b["info"]["size"], b["info"]["repository"]["delta"]


class Writer:
    """SESSIONS psql sessions committing numbered rows, RATE commits/s in all.
    For each: the moment psql printed `INSERT 0 1` (the acknowledgement, read
    here) and the flush LSN just after it (an upper bound of its commit's end)."""

    def __init__(self, gw):
        gw.psql("CREATE TABLE IF NOT EXISTS bench_acks (n bigint PRIMARY KEY)")
        self.base = int(gw.psql("SELECT coalesce(max(n), 0) FROM bench_acks")) + 1
        self.acks = {}  # n → [ack time, lsn]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.procs, self.threads = [], []
        for s in range(SESSIONS):
            proc = subprocess.Popen([str(BIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"], env=gw.pg_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self.procs.append(proc)
            for target in (self.send, self.read):
                t = threading.Thread(target=target, args=(proc, s), daemon=True)
                t.start()
                self.threads.append(t)

    def number(self, session, i):
        return self.base + i * SESSIONS + session

    def send(self, proc, session):
        started = time.perf_counter()
        rate = RATE / SESSIONS
        i = 0
        try:
            while not self.stopping.is_set():
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                n = self.number(session, i)
                proc.stdin.write(f"INSERT INTO bench_acks VALUES ({n});\nSELECT {n}, pg_current_wal_flush_lsn();\n")
                i += 1
        except (BrokenPipeError, OSError, ValueError):
            pass

    def read(self, proc, session):
        i = 0
        for line in proc.stdout:
            if line.startswith("INSERT 0 1"):
                now = time.perf_counter()
                with self.lock:
                    self.acks[self.number(session, i)] = [now, None]
                i += 1
            elif "|" in line:
                n, lsn = line.strip().split("|")
                with self.lock:
                    self.acks[int(n)][1] = parse_lsn(lsn)

    def finish(self):
        self.stopping.set()
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            proc.wait(30)
        for t in self.threads:
            t.join(30)


def parse_lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def segment_start(name):
    """The LSN a WAL segment's file name starts at (16 MB segments)."""
    return int(name[8:16], 16) * (1 << 32) + int(name[16:24], 16) * SEGMENT


class Lister(threading.Thread):
    """Lists `<prefix>/` (the generation's wal/) every LIST_EVERY s; notes the
    moment each object was first listed (when the listing's answer came)."""

    def __init__(self, s3, prefix):
        super().__init__(daemon=True)
        self.s3, self.prefix = s3, prefix
        self.first_seen = {}
        self.stopping = threading.Event()
        self.lists = 0

    def run(self):
        while not self.stopping.is_set():
            t = time.perf_counter()
            keys = self.s3.keys(self.prefix)
            now = time.perf_counter()
            self.lists += 1
            for k in keys:
                self.first_seen.setdefault(k, now)
            time.sleep(max(0.0, LIST_EVERY - (now - t)))

    def coverage(self):
        """Per segment start LSN: [(end LSN covered, first seen)], from chunks and whole segments."""
        cover = {}
        for key, seen in self.first_seen.items():
            name = key.rsplit("/wal/", 1)[-1]
            if name.endswith(".lz4") and len(name) == 28:
                start = segment_start(name[:24])
                cover.setdefault(start, []).append((start + SEGMENT, seen))
            elif ".chunks/" in name:
                seg, chunk = name.split(".chunks/")
                start = segment_start(seg)
                cover.setdefault(start, []).append((start + int(chunk.split("-")[1], 16), seen))
        return cover


def recovery_point(gw, s3, gen):
    """One writer run: the latency (s) from each acknowledgement to its bytes listed in the bucket."""
    lister = Lister(s3, f"{PREFIX}/{gen}/wal/")
    lister.start()
    while lister.lists < 2:
        time.sleep(0.01)
    writer = Writer(gw)
    started = time.perf_counter()
    while time.perf_counter() - started < WRITE_SECONDS:
        time.sleep(0.05)
    writer.finish()
    acks = {n: v for n, v in writer.acks.items() if v[1] is not None}
    ack_times = [a for a, _ in acks.values()]
    rate = len(acks) / (max(ack_times) - min(ack_times))
    elapsed = time.perf_counter() - started
    newest = max(lsn for _, lsn in acks.values())
    # Until the newest write is off-site (at most 30 s more).
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        cover = lister.coverage()
        seg = ((newest - 1) // SEGMENT) * SEGMENT
        if any(end >= newest for end, _ in cover.get(seg, [])):
            break
        time.sleep(0.1)
    lister.stopping.set()
    lister.join(10)
    cover = lister.coverage()
    latencies, missing = [], 0
    for ack, lsn in acks.values():
        seg = ((lsn - 1) // SEGMENT) * SEGMENT
        times = [seen for end, seen in cover.get(seg, []) if end >= lsn]
        if not times:
            missing += 1
            continue
        latencies.append(max(0.0, min(times) - ack))
    return latencies, missing, rate, lister.lists / elapsed


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def filled_and_archived(gw, pgbr, size_mb, sizes):
    """The cluster filled with `size_mb` of rows (its size in `sizes["cluster"]`)
    and archiving through `pgbr` (the gateway restarted for archive_mode, the
    stanza made and checked): where both off-site benchmarks start. Returns `pgbr`."""
    print(f"filling {size_mb} MB", file=sys.stderr, flush=True)
    t, _ = timed(lambda: gw.fill(size_mb))
    sizes["cluster"] = int(gw.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
    print(f"filled in {t:.0f} s: cluster {sizes['cluster'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    gw.psql("ALTER SYSTEM SET archive_mode = on")
    gw.psql(f"ALTER SYSTEM SET archive_command = '{pgbr.archive} %p'")
    gw.stop()
    gw.start()
    pgbr.configure(gw)
    pgbr.run("stanza-create")
    pgbr.run("check")
    return pgbr


def main():
    rclone = need_tools()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-", dir=ROOT / "target"))
    work.chmod(0o755)  # PostgreSQL runs as postgres and must reach its directories
    s3 = gw = None
    results = {k: [] for k in ("gw_backup", "gw_local", "gw_upload", "rclone_copy", "pgbr_backup", "gw_restore", "pgbr_restore", "pgbr_restore_files",
                                "gw_upload_cpu", "rclone_cpu", "pgbr_backup_cpu")}
    rp_rounds = []
    sizes = {}
    try:
        s3 = S3Server(rclone, work)
        gw = Gateway(work, s3)
        pgbr = filled_and_archived(gw, PgBackRest(work, s3, gw), SIZE_MB, sizes)
        gen = next(k.split("/")[1] for k in s3.keys(f"{PREFIX}/") if "/base/" in k)
        wal_dir = gw.work / "data" / "wal"

        def gateway_backup(i):
            t0 = time.perf_counter()
            backup = gw.call("POST", "/api/v1/backup/base")
            t1 = time.perf_counter()
            cpu_before = cpu_seconds(gw.proc.pid)
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-p", str(gw.proc.pid), "-o", f"{PERF}.{i}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if PERF else None
            manifest = f"{PREFIX}/{gen}/base/{backup['id']}/manifest.json"
            while not s3.exists(manifest):
                if time.perf_counter() - t1 > 1800:
                    raise SystemExit(f"{manifest} not in the bucket 30 min after the backup; log: {gw.log}")
                time.sleep(0.02)
            t2 = time.perf_counter()
            cpu = cpu_seconds(gw.proc.pid) - cpu_before
            if perf:
                perf.send_signal(signal.SIGINT)
                perf.wait(60)
            local = wal_dir / "base" / backup["id"]
            size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
            sizes["gateway base backup"] = size
            results["gw_backup"].append(t2 - t0)
            results["gw_local"].append(t1 - t0)
            results["gw_upload"].append(t2 - t1)
            results["gw_upload_cpu"].append(cpu / (size / 1e9))
            print(f"round {i + 1} gateway base backup {t2 - t0:.1f} s (local {t1 - t0:.1f} s, upload {t2 - t1:.1f} s, {size / 1e6:.0f} MB, "
                  f"{cpu:.2f} s CPU)", file=sys.stderr, flush=True)
            return local

        def rclone_copy(i, local):
            dest = f"bench:{BUCKET}/rclone-copy/{i}"
            before = children_cpu()
            t, _ = timed(lambda: subprocess.run(s3.rclone_cmd("copy", str(local), dest), env=s3.rclone_env(), check=True))
            cpu = children_cpu() - before
            results["rclone_copy"].append(t)
            results["rclone_cpu"].append(cpu / (sizes["gateway base backup"] / 1e9))
            print(f"round {i + 1} rclone copy {t:.1f} s ({cpu:.2f} s CPU)", file=sys.stderr, flush=True)
            subprocess.run(s3.rclone_cmd("purge", dest), env=s3.rclone_env(), check=True)

        def pgbackrest_backup(i):
            before = children_cpu()
            t, _ = timed(lambda: pgbr.run("backup", "--type=full"))
            cpu = children_cpu() - before
            label, size, repo = pgbr.newest()
            sizes["pgbackrest backup"] = repo
            results["pgbr_backup"].append(t)
            results["pgbr_backup_cpu"].append(cpu)
            print(f"round {i + 1} pgbackrest backup {t:.1f} s ({label}: {size / 1e6:.0f} MB, {repo / 1e6:.0f} MB in the repository, {cpu:.2f} s CPU)", file=sys.stderr, flush=True)

        def settle():
            # A restore lists the bucket once, then fetches: the chunks of a
            # segment that completes meanwhile are deleted under it (the
            # whole segment replaces them) and the fetch fails. Wait until the
            # newest completed local segment is whole in the bucket, its chunks gone.
            stream = wal_dir / "stream"
            deadline = time.time() + 120
            while True:
                done = sorted(p.name for p in stream.iterdir() if len(p.name) == 24)
                wal = s3.keys(f"{PREFIX}/{gen}/wal/")
                if not done or (f"{PREFIX}/{gen}/wal/{done[-1]}.lz4" in wal and not any(f"/{done[-1]}.chunks/" in k for k in wal)):
                    return
                if time.time() > deadline:
                    raise SystemExit(f"the shipper did not upload {done[-1]} within 120 s")
                time.sleep(0.2)

        def gateway_restore(i):
            settle()
            target = work / f"restore-gateway-{i}"
            target.mkdir(mode=0o755)
            env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PGSERVE_BIN_DIR": str(BIN), "PGSERVE_PORT": str(free_port()),
                   "LOG_LEVEL": "warn", **s3_env(s3)}
            log = work / f"restore-gateway-{i}.log"
            t, out = timed(lambda: subprocess.run([str(GATEWAY), "restore", "--from", f"s3://{BUCKET}/{PREFIX}", "--to", "latest"], cwd=target, env=env,
                                                  stdout=open(log, "w"), stderr=subprocess.STDOUT))
            if out.returncode != 0:
                raise SystemExit(f"omni-gateway restore --from failed ({out.returncode}):\n{log.read_text()[-3000:]}")
            results["gw_restore"].append(t)
            print(f"round {i + 1} gateway restore {t:.1f} s", file=sys.stderr, flush=True)
            shutil.rmtree(target)

        def pgbackrest_restore(i):
            target = work / f"restore-pgbackrest-{i}"
            target.mkdir(mode=0o700)
            shutil.chown(target, "postgres", "postgres")
            port = free_port()
            log = work / f"restore-pgbackrest-{i}.log"
            started = time.perf_counter()
            pgbr.run("restore", f"--pg1-path={target}")
            files = time.perf_counter() - started
            proc = subprocess.Popen(as_postgres([str(BIN / "postgres"), "-D", str(target), "-p", str(port), "-c", "unix_socket_directories=",
                                                 "-c", "listen_addresses=127.0.0.1", "-c", "archive_mode=off", "-c", "synchronous_standby_names=",
                                                 "-c", "recovery_init_sync_method=syncfs"]),
                                    stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
            try:
                while "ready to accept connections" not in log.read_text():
                    if proc.poll() is not None:
                        raise SystemExit(f"the restored postgres exited: {log.read_text()[-2000:]}")
                    time.sleep(0.01)
                t = time.perf_counter() - started
            finally:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(60)
            results["pgbr_restore"].append(t)
            results["pgbr_restore_files"].append(files)
            pgbr.run("expire")  # the previous backup (repo1-retention-full=1), untimed
            print(f"round {i + 1} pgbackrest restore {t:.1f} s (files {files:.1f} s)", file=sys.stderr, flush=True)
            shutil.rmtree(target)

        def writes(i):
            lat, missing, rate, lists = recovery_point(gw, s3, gen)
            rp_rounds.append((lat, missing, rate, lists))
            print(f"round {i + 1} recovery point: {len(lat)} writes at {rate:.0f}/s, p50 {pct(lat, 50) * 1000:.0f} ms, p99 {pct(lat, 99) * 1000:.0f} ms, "
                  f"max {max(lat) * 1000:.0f} ms, {missing} not off-site; {lists:.1f} listings/s", file=sys.stderr, flush=True)

        for i in range(ROUNDS):
            if i % 2 == 0:
                local = gateway_backup(i)
                rclone_copy(i, local)
                pgbackrest_backup(i)
                gateway_restore(i)
                pgbackrest_restore(i)
            else:
                pgbackrest_backup(i)
                local = gateway_backup(i)
                rclone_copy(i, local)
                pgbackrest_restore(i)
                gateway_restore(i)
            writes(i)
    finally:
        if gw:
            gw.stop()
        if s3:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    if PERF:
        for i in range(ROUNDS):
            print(f"── perf report of the gateway during upload {i + 1} ({PERF}.{i}) ──")
            out = subprocess.run(["perf", "report", "-i", f"{PERF}.{i}", "--stdio", "--no-children", "--sort", "dso,symbol", "--percent-limit", "1"],
                                 capture_output=True, text=True).stdout
            print("\n".join(line for line in out.splitlines() if line and not line.startswith("#")))
        print(f"no table written (profiled); results: {json.dumps({k: [round(x, 2) for x in v] for k, v in results.items()})}")
        return
    report(results, rp_rounds, sizes, load_start, load_end)


def report(results, rp_rounds, sizes, load_start, load_end):
    m = {k: statistics.median(v) for k, v in results.items()}
    rp = {"p50": statistics.median(pct(r[0], 50) for r in rp_rounds), "p99": statistics.median(pct(r[0], 99) for r in rp_rounds),
          "max": max(max(r[0]) for r in rp_rounds), "writes": sum(len(r[0]) for r in rp_rounds), "missing": sum(r[1] for r in rp_rounds),
          "rate": statistics.median(r[2] for r in rp_rounds), "lists": statistics.median(r[3] for r in rp_rounds)}
    pgver = subprocess.run(["pgbackrest", "version"], capture_output=True, text=True).stdout.strip()
    gb = sizes["gateway base backup"] / 1e9
    lines = [
        f"Command: `{COMMAND}` (run by `make bench`): medians of {ROUNDS} interleaved rounds (the order reversed every other round), release build, "
        f"{os.cpu_count()} cores shared with other work (load average {load_start[0]:.1f} / {load_start[1]:.1f} at the start, {load_end[0]:.1f} / {load_end[1]:.1f} at the end). "
        f"One local S3 server for everything: `rclone serve s3` (the test kit's) over TLS with a self-signed certificate, as pgBackRest needs, its files on the same disk. "
        f"Cluster: {sizes['cluster'] / 1e9:.2f} GB (rows of md5 text); PostgreSQL from {BIN}; {pgver} with compress-type=lz4, level 1, process-max=1 — "
        f"the same lz4 class as the gateway's `base.tar.lz4`.",
        "",
        "| what | gateway | rclone copy (floor) | pgBackRest | gateway ÷ other | target |",
        "|---|---:|---:|---:|---:|---|",
        f"| base backup, `POST /api/v1/backup/base` → `manifest.json` in the bucket | {m['gw_backup']:.1f} s | | {m['pgbr_backup']:.1f} s | "
        f"{m['gw_backup'] / m['pgbr_backup']:.2f}× pgBackRest | faster than pgBackRest |",
        f"| — of which the upload (POST answered → manifest there), {gb:.2f} GB | {m['gw_upload']:.1f} s | {m['rclone_copy']:.1f} s | | "
        f"{m['gw_upload'] / m['rclone_copy']:.2f}× rclone | ≤ 1.1× rclone |",
        f"| — of which the local backup (pg_basebackup, lz4, check) | {m['gw_local']:.1f} s | | | | |",
        f"| restore from the bucket into an empty directory, replayed and consistent | {m['gw_restore']:.1f} s | | {m['pgbr_restore']:.1f} s "
        f"(files {m['pgbr_restore_files']:.1f} s) | {m['gw_restore'] / m['pgbr_restore']:.2f}× pgBackRest | |",
        f"| CPU per GB uploaded | {m['gw_upload_cpu']:.2f} s | {m['rclone_cpu']:.2f} s | | {m['gw_upload_cpu'] / m['rclone_cpu']:.2f}× rclone | |",
        "",
        f"Sizes: the gateway's base backup {gb * 1000:.0f} MB (base.tar.lz4, pg_wal.tar, backup_manifest: what `rclone copy` copies too); "
        f"pgBackRest's full backup {sizes['pgbackrest backup'] / 1e6:.0f} MB in its repository. pgBackRest's backup CPU (compression included, all its processes): "
        f"{m['pgbr_backup_cpu']:.1f} s. The gateway's restore is `omni-gateway restore --from s3://… --to latest` (download, SHA-256 checks, unpack, replay of the WAL since, "
        f"PostgreSQL stopped again); pgBackRest's is `pgbackrest restore` then a bare postgres replaying through `archive-get` until it accepts connections. "
        f"`rclone copy` runs with its defaults (4 parts at a time, an MD5 of each).",
        "",
        "Each round (gateway / other, seconds): base backup " + ", ".join(f"{g:.1f} / {p:.1f}" for g, p in zip(results["gw_backup"], results["pgbr_backup"]))
        + "; upload " + ", ".join(f"{g:.1f} / {r:.1f}" for g, r in zip(results["gw_upload"], results["rclone_copy"]))
        + "; restore " + ", ".join(f"{g:.1f} / {p:.1f}" for g, p in zip(results["gw_restore"], results["pgbr_restore"]))
        + "; recovery point p99 " + ", ".join(f"{pct(r[0], 99) * 1000:.0f} ms" for r in rp_rounds) + ".",
        "",
        f"**Off-site recovery point under {RATE:,} writes/s** (`OMNI_REPOSITORY_WAL_INTERVAL` default 1 s): {SESSIONS} psql sessions committing numbered rows "
        f"for {WRITE_SECONDS:.0f} s per round ({rp['rate']:.0f} commits/s achieved, {rp['writes']:,} writes in all); for each, the time from its acknowledgement "
        f"(psql's `INSERT 0 1` read) to the first listing of the bucket's `wal/` ({rp['lists']:.0f} listings/s) showing a chunk or the whole segment reaching "
        f"`pg_current_wal_flush_lsn()` read right after it: **p50 {rp['p50'] * 1000:.0f} ms, p99 {rp['p99'] * 1000:.0f} ms** (medians of the rounds' own; "
        f"target p99 ≤ 1,500 ms), worst {rp['max'] * 1000:.0f} ms; {rp['missing']} writes never seen off-site.",
    ]
    write_section("Off-site repository", "\n".join(lines))
    write_json(COMMAND, [
        ("offsite.base_backup.gateway_over_pgbackrest", round(m["gw_backup"] / m["pgbr_backup"], 3), "ratio"),
        ("offsite.base_backup.upload_over_rclone_copy", round(m["gw_upload"] / m["rclone_copy"], 3), "ratio"),
        ("offsite.base_backup.gateway", round(m["gw_backup"], 2), "s"),
        ("offsite.base_backup.gateway_upload", round(m["gw_upload"], 2), "s"),
        ("offsite.base_backup.rclone_copy", round(m["rclone_copy"], 2), "s"),
        ("offsite.base_backup.pgbackrest", round(m["pgbr_backup"], 2), "s"),
        ("offsite.restore.gateway", round(m["gw_restore"], 2), "s"),
        ("offsite.restore.pgbackrest", round(m["pgbr_restore"], 2), "s"),
        ("offsite.restore.gateway_over_pgbackrest", round(m["gw_restore"] / m["pgbr_restore"], 3), "ratio"),
        ("offsite.recovery_point.p50", round(rp["p50"] * 1000), "ms"),
        ("offsite.recovery_point.p99", round(rp["p99"] * 1000), "ms"),
        ("offsite.upload.cpu_per_gb", round(m["gw_upload_cpu"], 3), "s/GB"),
        ("offsite.upload.rclone_cpu_per_gb", round(m["rclone_cpu"], 3), "s/GB"),
    ])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
