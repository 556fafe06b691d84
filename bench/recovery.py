#!/usr/bin/env python3
"""Recovery benchmark: what a restore from the WAL archive alone brings back,
and how long it takes beside PostgreSQL's own tools.

Two measurements, each on real gateways (embedded PostgreSQL, WAL streaming
into an OMNI_WAL_DIR outside the data directory):

  recovery point  KILLS rounds (default 20) without OMNI_WAL_SYNC and
                  SYNC_KILLS (default 5) with it. Each round: a fresh
                  gateway, one psql session inserting numbered rows at
                  RATE commits/s (default 1000) and noting when each commit
                  was acknowledged, then SIGKILL of every process of the
                  stack at a random moment, the data directory and its
                  password file deleted (the disk lost), `omni-gateway
                  restore --to latest` from the archive alone, a start, and
                  the rows counted: an acknowledged row that is missing is
                  lost. Reported: lost rows per kill (median, max, how many
                  kills lost any) and how long before the kill the last lost
                  row was committed (the server's clock_timestamp() in its
                  INSERT, against the wall clock when the kill signals went
                  out; same machine, same clock).
  1 GB restore    a cluster of SIZE_MB (default 1024) with a base backup
                  taken after the fill and SIZE_MB/8 more writes after it,
                  the data directory deleted; `omni-gateway restore --to
                  latest` (the whole command: unpack, replay, promote, new
                  password) beside the same by hand (lz4 + tar, pg_wal,
                  recovery.signal, postgres with restore_command on the
                  archive, until promoted), ROUNDS rounds (default 3), the
                  order alternating, page cache dropped before each.

Needs the lz4 command (Debian package lz4) for the by-hand restore.

Usage: bench/recovery.py   (writes the "Recovery from the archive alone"
section of BENCHMARKS.md; BENCH_RECOVERY_ONLY=point|restore runs one part)
"""

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, pg_bin_dir, wait_healthy, write_section  # noqa: E402

PROFILE = os.environ.get("BENCH_PROFILE", "release")
GATEWAY = ROOT / "target" / PROFILE / "omni-gateway"
BIN = pg_bin_dir()
KEY = "bench-api-key-0123456789"
KILLS = int(os.environ.get("BENCH_RECOVERY_KILLS", "20"))
SYNC_KILLS = int(os.environ.get("BENCH_RECOVERY_SYNC_KILLS", "5"))
RATE = int(os.environ.get("BENCH_RECOVERY_RATE", "1000"))
SIZE_MB = int(os.environ.get("BENCH_RECOVERY_MB", "1024"))
ROUNDS = int(os.environ.get("BENCH_RECOVERY_ROUNDS", "3"))
ONLY = os.environ.get("BENCH_RECOVERY_ONLY", "")


class Stack:
    """A gateway in a temporary directory whose WAL archive is on "another
    disk" (a sibling directory the data-disk loss does not touch)."""

    def __init__(self, sync=False):
        self.work = Path(tempfile.mkdtemp(prefix="omni-bench-recovery-", dir=os.environ.get("BENCH_DIR")))
        self.work.chmod(0o755)  # PostgreSQL runs as postgres and must reach its data directory
        self.wal = self.work / "archive-disk" / "wal"
        self.wal.parent.mkdir()
        self.wal.parent.chmod(0o755)
        self.data = self.work / "data-disk" / "postgres"
        self.data.parent.mkdir()
        self.data.parent.chmod(0o755)
        self.port, self.pg_port = free_port(), free_port()
        self.env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
            "OMNI_PORT": str(self.port), "PGSERVE_PORT": str(self.pg_port), "PGSERVE_BIN_DIR": str(BIN),
            "PGSERVE_DATA_DIR": str(self.data), "OMNI_WAL_DIR": str(self.wal),
            "OMNI_API_KEY": KEY, "LOG_LEVEL": "warn", "OMNI_WAL_SYNC": "true" if sync else "false",
        }
        self.proc = None
        self.start()

    def start(self):
        self.log = self.work / "gateway.log"
        self.proc = subprocess.Popen([str(GATEWAY)], cwd=self.work, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.port, self.proc, poll=0.05, log=self.log)
        password = Path(f"{self.data}.password").read_text().strip()
        self.pg_env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(self.pg_port), PGUSER="postgres", PGDATABASE="omni", PGPASSWORD=password)

    def wait_streaming(self):
        """Until the streamer is connected and a base backup covers its stream."""
        deadline = time.time() + 300
        while not (self.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'omni_wal' AND state = 'streaming'") == "1"
                   and any((self.wal / "base").glob("*/base.tar*"))):
            if time.time() > deadline:
                raise SystemExit(f"WAL streaming and a base backup did not start within 300 s\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def psql(self, sql):
        out = subprocess.run([str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql], env=self.pg_env, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def tree(self):
        """The gateway and every process below it (PostgreSQL, its backends,
        the streamer, the worker), read from /proc in one pass."""
        children = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        pids, todo = {self.proc.pid}, [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in pids:
                    pids.add(child)
                    todo.append(child)
        return pids

    def kill_all(self):
        """A power loss as far as processes go: every process of the stack is
        frozen (SIGSTOP) first, so none commits after the moment returned,
        then killed (SIGKILL)."""
        pids = self.tree()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        killed_at = time.time()
        # A process forked between the listing and the freeze (it cannot
        # commit: its postmaster is frozen).
        pids |= self.tree()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        deadline = time.time() + 30
        while subprocess.run(["pgrep", "-f", str(self.work)], capture_output=True).returncode == 0:
            if time.time() > deadline:
                raise SystemExit("processes of the killed stack are still running")
            subprocess.run(["pkill", "-9", "-f", str(self.work)])
            time.sleep(0.05)
        return killed_at

    def lose_data_disk(self):
        shutil.rmtree(self.data.parent)
        self.data.parent.mkdir()
        self.data.parent.chmod(0o755)

    def restore_latest(self):
        out = subprocess.run([str(GATEWAY), "restore", "--to", "latest"], cwd=self.work, env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"omni-gateway restore failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        subprocess.run(["pkill", "-9", "-f", str(self.work)])
        shutil.rmtree(self.work, ignore_errors=True)


class Writer:
    """SESSIONS psql sessions inserting numbered rows, RATE commits/s in all;
    each `INSERT 0 1` a session prints acknowledges its next row, noted with
    the moment it was read."""

    SESSIONS = int(os.environ.get("BENCH_RECOVERY_SESSIONS", "4"))

    def __init__(self, stack):
        stack.psql("CREATE TABLE bench_acks (n bigint PRIMARY KEY)")
        self.acked = []  # (n, the server's wall clock just before its commit)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.procs, self.threads = [], []
        for s in range(self.SESSIONS):
            proc = subprocess.Popen([str(BIN / "psql"), "-X", "-A", "-t"], env=stack.pg_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self.procs.append(proc)
            base = s * 1_000_000_000
            for target in (lambda p=proc, b=base: self.send(p, b), lambda p=proc, b=base: self.read(p, b)):
                t = threading.Thread(target=target, daemon=True)
                t.start()
                self.threads.append(t)

    def send(self, proc, base):
        started = time.perf_counter()
        rate = RATE / self.SESSIONS
        sent = 0
        try:
            while not self.stopping.is_set():
                delay = started + sent / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                proc.stdin.write(f"INSERT INTO bench_acks VALUES ({base + sent + 1}) RETURNING extract(epoch FROM clock_timestamp());\n")
                sent += 1
        except (BrokenPipeError, OSError, ValueError):
            pass

    def read(self, proc, base):
        # Each row prints the server's clock just before its commit, then
        # psql's `INSERT 0 1` once the commit is acknowledged.
        n, clock = 0, None
        for line in proc.stdout:
            if line.startswith("INSERT 0 1"):
                n += 1
                with self.lock:
                    self.acked.append((base + n, clock))
            elif line.strip():
                clock = float(line)

    def finish(self):
        self.stopping.set()
        for proc in self.procs:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        for t in self.threads:
            t.join(30)
        for proc in self.procs:
            proc.wait(10)


def recovery_point(sync):
    stack = Stack(sync=sync)
    try:
        stack.wait_streaming()
        writer = Writer(stack)
        run_for = random.uniform(2.0, 4.0)
        deadline = time.perf_counter() + run_for
        while time.perf_counter() < deadline:
            time.sleep(0.01)
        killed_at = stack.kill_all()
        writer.finish()
        # Every `INSERT 0 1` psql printed is a commit the server acknowledged,
        # so before it was killed, even when read here a moment after the kill.
        acked = writer.acked
        stack.lose_data_disk()
        stack.restore_latest()
        stack.start()
        present = {int(x) for x in stack.psql("SELECT n FROM bench_acks").split()}
        lost = [(n, t) for n, t in acked if n not in present]
        if os.environ.get("BENCH_RECOVERY_DEBUG") and lost:
            newest_kept = max(t for n, t in acked if n in present)
            print(f"  lost {sorted(lost)[:5]}..., newest kept commit {killed_at - newest_kept:.3f} s before the kill, sent {len(acked)}")
        before_kill_ms = (killed_at - max(t for _, t in lost)) * 1000 if lost else None
        achieved = len(acked) / run_for
        return len(acked), len(lost), before_kill_ms, achieved
    finally:
        stack.stop()


def drop_caches():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def as_postgres(args, **kw):
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], **kw)


def by_hand(stack, backup_dir):
    """The same restore with PostgreSQL's tools: unpack the base backup and its
    WAL, recovery.signal, postgres replaying from the archive until promoted."""
    data = stack.work / "by-hand"
    archive = " ".join(str(d) for d in sorted(stack.wal.glob("stream*")))
    # The streamer's newest segment is still `.partial`: it is read like the others.
    restore = f'for d in {archive}; do for f in "$d/%f" "$d/%f.partial"; do [ -f "$f" ] && exec cp "$f" "%p"; done; done; exit 1'
    port = free_port()
    started = time.perf_counter()
    data.mkdir(mode=0o700)
    shutil.chown(data, "postgres", "postgres")
    as_postgres(["sh", "-c", f"lz4 -dc {backup_dir}/base.tar.lz4 | tar -x -C {data} && tar -x -C {data}/pg_wal -f {backup_dir}/pg_wal.tar && touch {data}/recovery.signal"], check=True)
    log = stack.work / "by-hand.log"
    proc = subprocess.Popen(["runuser", "-u", "postgres", "--", str(BIN / "postgres"), "-D", str(data), "-p", str(port), "-c", "unix_socket_directories=",
                             "-c", "listen_addresses=127.0.0.1", "-c", f"restore_command={restore}", "-c", "recovery_target_timeline=latest", "-c", "recovery_init_sync_method=syncfs",
                             "-c", "recovery_target_action=promote", "-c", "synchronous_standby_names="],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    try:
        # Promoted = the server writes "database system is ready to accept connections".
        while "ready to accept connections" not in log.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"the by-hand restore's postgres exited: {log.read_text()[-2000:]}")
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
        shutil.rmtree(data, ignore_errors=True)
        if os.environ.get("BENCH_RECOVERY_DEBUG"):
            shutil.copy(log, "/tmp/by-hand.log")


def restore_from_archive():
    stack = Stack()
    try:
        stack.wait_streaming()
        stack.psql("CREATE TABLE bench_fill (id bigint, pad text)")
        rows = SIZE_MB * 1000
        for start in range(0, rows, 100_000):
            # ~1 KB per row that neither TOAST nor lz4 can shrink.
            stack.psql(f"INSERT INTO bench_fill SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 30) i) "
                       f"FROM generate_series({start}, {min(rows, start + 100_000) - 1}) g")
        out = subprocess.run(["curl", "-sf", "-X", "POST", "-H", f"x-api-key: {KEY}", f"http://127.0.0.1:{stack.port}/api/v1/backup/base"], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"base backup failed: {out.stdout} {out.stderr}")
        stack.psql(f"INSERT INTO bench_fill SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 30) i) FROM generate_series(1, {rows // 8}) g")
        cluster_mb = int(stack.psql("SELECT pg_database_size('omni')")) / 1e6
        expected = stack.psql("SELECT count(*) FROM bench_fill")
        stack.psql("SELECT pg_switch_wal()")
        lsn = stack.psql("SELECT pg_current_wal_lsn()")
        while stack.psql(f"SELECT flush_lsn >= '{lsn}' FROM pg_stat_replication WHERE application_name = 'omni_wal'") != "t":
            time.sleep(0.1)
        backups = sorted((stack.wal / "base").glob("*/base.tar*"), key=lambda p: p.stat().st_mtime)
        backup_dir = backups[-1].parent
        stack.proc.terminate()
        stack.proc.wait(120)
        ours, bare = [], []
        for i in range(ROUNDS):
            for which in (["omni", "bare"] if i % 2 == 0 else ["bare", "omni"]):
                stack.lose_data_disk()
                drop_caches()
                if which == "omni":
                    t = time.perf_counter()
                    stack.restore_latest()
                    ours.append(time.perf_counter() - t)
                else:
                    bare.append(by_hand(stack, backup_dir))
        # The last restore is served and holds every row.
        stack.lose_data_disk()
        stack.restore_latest()
        stack.start()
        got = stack.psql("SELECT count(*) FROM bench_fill")
        if got != expected:
            raise SystemExit(f"the restored cluster has {got} rows, {expected} were written")
        return cluster_mb, ours, bare
    finally:
        stack.stop()


def main():
    if not shutil.which("lz4"):
        raise SystemExit("bench/recovery.py needs the lz4 command for the by-hand restore (apt-get install lz4)")
    rows = []
    if ONLY in ("", "point"):
        for sync, kills in ((False, KILLS), (True, SYNC_KILLS)):
            results = [recovery_point(sync) for _ in range(kills)]
            for i, (acked, lost, before, rate) in enumerate(results):
                print(f"sync={sync} kill {i + 1}: {acked} acknowledged ({rate:.0f}/s), {lost} lost" + (f", last lost committed {before:.1f} ms before the kill" if before is not None else ""))
            losts = [r[1] for r in results]
            befores = [r[2] for r in results if r[2] is not None]
            rates = [r[3] for r in results]
            label = "OMNI_WAL_SYNC=true" if sync else "without OMNI_WAL_SYNC"
            when = f"median {statistics.median(befores):.1f} ms, max {max(befores):.1f} ms" if befores else "—"
            rows.append(f"| recovery point, {label}: {kills} kills at {statistics.median(rates):.0f} commits/s (median achieved) | "
                        f"median {statistics.median(losts):g}, max {max(losts)} (per kill: {', '.join(map(str, losts))}) | {sum(1 for x in losts if x)} of {kills} | {when} |")
    point_table = [
        "| measure | acknowledged rows lost per kill | kills that lost any | last lost row committed before the kill |",
        "|---|---|---|---|",
        *rows,
    ] if rows else []
    restore_rows = []
    if ONLY in ("", "restore"):
        cluster_mb, ours, bare = restore_from_archive()
        ratio = statistics.median(ours) / statistics.median(bare)
        per_round = ", ".join(f"{o / b:.2f}x" for o, b in zip(ours, bare))
        load = os.getloadavg()[2]
        restore_rows = [
            "| restore of a cluster from the archive alone | omni-gateway restore --to latest | by hand with PostgreSQL's tools | ratio |",
            "|---|---|---|---|",
            f"| {cluster_mb:.0f} MB cluster, base backup + {SIZE_MB // 8} MB of WAL after it, data directory lost; medians of {ROUNDS}, order alternating "
            f"(omni {', '.join(f'{x:.1f}' for x in ours)} s; by hand {', '.join(f'{x:.1f}' for x in bare)} s; load average {load:.1f} at the end) | {statistics.median(ours):.1f} s | {statistics.median(bare):.1f} s | "
            f"{ratio:.2f}x of the medians; per round {per_round} (target ≤ 1.1x) |",
        ]
    body = "\n".join([
        f"`python3 bench/recovery.py` ({PROFILE} build, PostgreSQL {BIN.parent.name}; OMNI_WAL_DIR and the data directory in sibling directories; the data directory and "
        "its password file deleted before each restore, as when the data disk is lost). A row counts as lost when psql printed its `INSERT 0 1` (the server acknowledged "
        "its commit, so before the kill) and the restored cluster does not have it; each row's commit time is the server's `clock_timestamp()` in its INSERT. The by-hand restore pipes `lz4` and `tar`, starts `postgres` with a `restore_command` that also reads the newest `.partial` "
        "segment and `recovery_init_sync_method=syncfs` (as the gateway does: one syncfs instead of an fsync per file), and waits for PostgreSQL's \"ready to accept "
        "connections\" after promotion; omni's time is the whole `restore` command (it also checks the base backup, sets a new superuser password and stops the "
        "cluster cleanly).",
        "",
        *point_table,
        "",
        *restore_rows,
    ])
    print(body)
    if ONLY == "":
        write_section("Recovery from the archive alone", body)


if __name__ == "__main__":
    main()
