#!/usr/bin/env python3
"""What encryption costs off-site (issue 28): the gateway's upload of a base
backup with and without age encryption, beside pgBackRest with and without
aes-256-cbc (the issue's `repo1-cipher-type`, set here on the second of two
repositories: `repo2-cipher-type`), to the same S3 server.

The setting is bench/offsite.py's (its S3 server, gateway and pgBackRest
classes): one local `rclone serve s3` over TLS, one release omni-gateway
(embedded PostgreSQL, WAL streaming) whose cluster is filled with SIZE_MB of
rows of md5 text, and pgBackRest archiving the same cluster. What changes:

  gateway, plain       OMNI_REPOSITORY_URL=s3://omni-bench/gw-plain
  gateway, age         OMNI_REPOSITORY_URL=s3://omni-bench/gw-age and
                       OMNI_ENCRYPT_RECIPIENTS=<a key from age-keygen>
                       (X25519 + ChaCha20-Poly1305, after lz4)
  pgBackRest, plain    repo1, /pgbackrest-plain
  pgBackRest, aes      repo2, /pgbackrest-aes, repo2-cipher-type=aes-256-cbc,
                       repo2-cipher-pass (pgBackRest encrypts after compressing too)

Each repository has a prefix of its own in the same bucket. The encryption
variables are read at the start, so the gateway is restarted into the other
mode when the next measurement needs it, then waits (untimed) until its
upload queue is empty: the timed upload is the base backup's alone. Both
pgBackRest repositories take the WAL (`archive-push` writes to each); a
backup is `pgbackrest backup --type=full --repo=N` (lz4 level 1,
process-max=1, as bench/offsite.py), its expire runs after it, untimed.

In each round, interleaved (the order reversed every other round): a
gateway base backup in each mode (POST /api/v1/backup/base, then its
manifest.json polled in the bucket every 20 ms: the local part, the upload,
the gateway's CPU time during the upload), and a pgBackRest full backup to
each repository. Before each, what was written is flushed and the page
cache emptied (untimed, when run as root): with the cache full of the
earlier steps' writes, one upload in three took 60% longer, its S3 server
reclaiming memory. Medians of the rounds; ratios encrypted ÷ plain for each
tool, and encrypted gateway ÷ encrypted pgBackRest.

Needs pgbackrest and age-keygen (Debian's pgbackrest and age; installed with
apt-get when missing) and boto3 (pip when missing).

Usage: bench/offsite_crypt.py [ROUNDS] [SIZE_MB]   (defaults 5, 1024; writes
the "Off-site repository: encryption" section of BENCHMARKS.md and its
figures into BENCHMARKS.json). BENCH_PROFILE=debug runs target/debug's
binary (a check of the script, not a measurement: the table says so).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offsite  # noqa: E402  (the S3 server, gateway and pgBackRest of bench/offsite.py)
from common import ROOT, cpu_seconds, machine_busy_seconds, settle_page_cache, write_json, write_section  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SIZE_MB = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
COMMAND = f"python3 bench/offsite_crypt.py {ROUNDS} {SIZE_MB}"
BUCKET = offsite.BUCKET
CIPHER_PASS = "bench-cipher-pass-0123456789abcdef0123456789abcdef"
# The gateway's modes: a prefix of the bucket each, and the variables that
# make it. "local" is "age" with OMNI_ENCRYPT_LOCAL=true: base backups are
# sealed on disk (the local part of the backup) and uploaded as they are.
MODES = {"plain": {}, "age": {}, "local": {}}
MODE_VARS = ("OMNI_ENCRYPT_RECIPIENTS", "OMNI_ENCRYPT_RECIPIENTS_FILE", "OMNI_ENCRYPT_PASSPHRASE_FILE", "OMNI_ENCRYPT_LOCAL")
# pgBackRest's repositories: the number, its path, encrypted or not.
REPOS = {"plain": (1, "/pgbackrest-plain"), "aes": (2, "/pgbackrest-aes")}


def need_age_keygen():
    if not shutil.which("age-keygen"):
        print("installing age (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "age"], check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def age_public_key(work):
    """A new key pair from age-keygen in `work`; its public key (only that goes to the gateway, as in production)."""
    key = work / "age-key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    return subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True).stdout.strip()


class Gateway(offsite.Gateway):
    """bench/offsite.py's gateway, started in one of MODES (its prefix of the bucket, its variables)."""

    mode = "plain"

    def start(self):
        for var in MODE_VARS:
            self.env.pop(var, None)
        self.env.update(MODES[self.mode], OMNI_REPOSITORY_URL=f"s3://{BUCKET}/gw-{self.mode}")
        super().start()

    def switch(self, mode):
        """In `mode` (restarted when it was in another), with nothing waiting for upload."""
        if mode != self.mode:
            self.mode = mode
            self.stop()
            self.start()
        # Empty for 2 s on end (two rounds of OMNI_REPOSITORY_WAL_INTERVAL):
        # not a moment between two objects of the backlog.
        deadline, empty_since = time.time() + 3600, None
        while True:
            repo = self.call("GET", "/gateway/status")["repository"]
            if repo["state"] == "ok" and repo["queue_depth"] == 0:
                empty_since = empty_since or time.time()
                if time.time() - empty_since >= 2:
                    return
            else:
                empty_since = None
            if time.time() > deadline:
                raise SystemExit(f"the gateway's upload queue ({mode}) did not empty within an hour: {repo}; log: {self.log}")
            time.sleep(0.2)

    def generation(self):
        return next(k.split("/")[1] for k in self.s3.keys(f"gw-{self.mode}/") if "/base/" in k)


class PgBackRest(offsite.PgBackRest):
    """bench/offsite.py's pgBackRest with two S3 repositories on the same server: repo1 plain, repo2 aes-256-cbc."""

    def configure(self, gw):
        super().configure(gw)
        text = self.conf.read_text()
        repo1 = [line for line in text.splitlines() if line.startswith("repo1-")]
        repo2 = [line.replace("repo1-", "repo2-", 1) for line in repo1]
        lines = [line for line in repo1 if not line.startswith("repo1-path=")] + [f"repo1-path={REPOS['plain'][1]}"]
        lines += [line for line in repo2 if not line.startswith("repo2-path=")] + [f"repo2-path={REPOS['aes'][1]}", "repo2-cipher-type=aes-256-cbc",
                                                                                  f"repo2-cipher-pass={CIPHER_PASS}"]
        rest = [line for line in text.splitlines() if not line.startswith("repo1-")]
        at = rest.index("[global]") + 1
        self.conf.write_text("\n".join(rest[:at] + lines + rest[at:]) + "\n")

    def repo_size(self, repo):
        """Bytes of the newest backup in repository `repo`."""
        import json
        info = json.loads(self.run("info", "--output=json", f"--repo={repo}"))[0]
        return info["backup"][-1]["info"]["repository"]["delta"]


def main():
    rclone = offsite.need_tools()
    need_age_keygen()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-crypt-", dir=ROOT / "target"))
    work.chmod(0o755)  # PostgreSQL runs as postgres and must reach its directories
    MODES["age"] = {"OMNI_ENCRYPT_RECIPIENTS": age_public_key(work)}
    MODES["local"] = dict(MODES["age"], OMNI_ENCRYPT_LOCAL="true")
    s3 = gw = None
    results = {f"{what}_{mode}": [] for mode in MODES for what in ("gw_backup", "gw_local", "gw_upload", "gw_upload_cpu")}
    results.update({f"{what}_{repo}": [] for repo in REPOS for what in ("pgbr_backup", "pgbr_cpu")})
    sizes = {}
    settled = []
    try:
        s3 = offsite.S3Server(rclone, work)
        gw = Gateway(work, s3)
        gw.s3 = s3
        pgbr = offsite.filled_and_archived(gw, PgBackRest(work, s3, gw), SIZE_MB, sizes)
        wal_dir = gw.work / "data" / "wal"
        # Each mode once before the rounds, untimed: its prefix gets the
        # archive's backlog (the fill's WAL, the first base backups).
        for mode in MODES:
            print(f"gateway mode {mode}: uploading the backlog", file=sys.stderr, flush=True)
            gw.switch(mode)
        pgbr.configure(gw)

        def gateway_backup(i, mode):
            gw.switch(mode)
            gen = gw.generation()
            pgbr.configure(gw)  # a restart moves the cluster's socket directory
            settled.append(settle_page_cache())
            t0 = time.perf_counter()
            backup = gw.call("POST", "/api/v1/backup/base")
            t1 = time.perf_counter()
            cpu_before = cpu_seconds(gw.proc.pid)
            busy_before = machine_busy_seconds()
            manifest = f"gw-{mode}/{gen}/base/{backup['id']}/manifest.json"
            while not s3.exists(manifest):
                if time.perf_counter() - t1 > 1800:
                    raise SystemExit(f"{manifest} not in the bucket 30 min after the backup; log: {gw.log}")
                time.sleep(0.02)
            t2 = time.perf_counter()
            cpu = cpu_seconds(gw.proc.pid) - cpu_before
            # How busy the cores were during the upload (every process: the
            # gateway, the S3 server, PostgreSQL): a saturated machine's wall
            # time follows its CPU; an idle share means waiting somewhere.
            busy = (machine_busy_seconds() - busy_before) / ((t2 - t1) * os.cpu_count())
            size = sum(f.stat().st_size for f in (wal_dir / "base" / backup["id"]).rglob("*") if f.is_file())
            stored = sum(s3.keys(f"gw-{mode}/{gen}/base/{backup['id']}/").values())
            sizes[f"gateway {mode}"] = (size, stored)
            results[f"gw_backup_{mode}"].append(t2 - t0)
            results[f"gw_local_{mode}"].append(t1 - t0)
            results[f"gw_upload_{mode}"].append(t2 - t1)
            # Per GB of the base backup as PostgreSQL gave it (a sealed one is compressed on disk).
            results[f"gw_upload_cpu_{mode}"].append(cpu / (sizes["gateway plain"][0] / 1e9 if mode == "local" and "gateway plain" in sizes else size / 1e9))
            print(f"round {i + 1} gateway {mode}: base backup {t2 - t0:.1f} s (local {t1 - t0:.1f} s, upload {t2 - t1:.1f} s, {size / 1e6:.0f} MB, "
                  f"{stored / 1e6:.0f} MB stored, {cpu:.2f} s CPU; the cores {busy:.0%} busy during the upload)", file=sys.stderr, flush=True)

        def pgbackrest_backup(i, repo):
            n = REPOS[repo][0]
            settled.append(settle_page_cache())
            before = offsite.children_cpu()
            t, _ = offsite.timed(lambda: pgbr.run("backup", "--type=full", f"--repo={n}"))
            cpu = offsite.children_cpu() - before
            sizes[f"pgbackrest {repo}"] = pgbr.repo_size(n)
            pgbr.run("expire", f"--repo={n}")  # the previous backup (retention-full=1), untimed
            results[f"pgbr_backup_{repo}"].append(t)
            results[f"pgbr_cpu_{repo}"].append(cpu)
            print(f"round {i + 1} pgbackrest {repo}: backup {t:.1f} s ({sizes[f'pgbackrest {repo}'] / 1e6:.0f} MB in the repository, {cpu:.2f} s CPU)",
                  file=sys.stderr, flush=True)

        steps = [(gateway_backup, mode) for mode in MODES] + [(pgbackrest_backup, repo) for repo in REPOS]
        for i in range(ROUNDS):
            for step, what in (steps if i % 2 == 0 else steps[::-1]):
                step(i, what)
    finally:
        if gw:
            gw.stop()
        if s3:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results, sizes, load_start, os.getloadavg(), all(settled))


def report(results, sizes, load_start, load_end, settled):
    m = {k: statistics.median(v) for k, v in results.items()}
    pgver = subprocess.run(["pgbackrest", "version"], capture_output=True, text=True).stdout.strip()
    agever = subprocess.run(["age", "--version"], capture_output=True, text=True).stdout.strip()
    gb = sizes["gateway plain"][0] / 1e9
    enc_gw_upload = m["gw_upload_age"] / m["gw_upload_plain"]
    enc_gw_backup = m["gw_backup_age"] / m["gw_backup_plain"]
    enc_pgbr = m["pgbr_backup_aes"] / m["pgbr_backup_plain"]
    check = "" if offsite.PROFILE == "release" else (f"**A check of the script ({offsite.PROFILE} build), not a measurement.** ")
    lines = [
        f"{check}Command: `{COMMAND}` (run by `make bench`): medians of {ROUNDS} interleaved rounds (the order reversed every other round), "
        f"{offsite.PROFILE} build, {os.cpu_count()} cores (load average {load_start[0]:.1f} / {load_start[1]:.1f} at the start, "
        f"{load_end[0]:.1f} / {load_end[1]:.1f} at the end). bench/offsite.py's setting: one local `rclone serve s3` over TLS (self-signed) for everything, "
        f"a cluster of {sizes['cluster'] / 1e9:.2f} GB (rows of md5 text), PostgreSQL from {offsite.BIN}; {pgver} with compress-type=lz4, level 1, "
        f"process-max=1. Each repository has a prefix of its own in the same bucket. The gateway encrypts with age (X25519, ChaCha20-Poly1305; "
        f"`OMNI_ENCRYPT_RECIPIENTS` = one key from `age-keygen`, {agever or 'age'}), pgBackRest with `repo2-cipher-type=aes-256-cbc` and a `repo2-cipher-pass` (the issue's `repo1-cipher-type`: the encrypted repository is the second of two here, "
        f"both fed by the same `archive-push`); "
        f"both encrypt after compressing. The gateway is restarted into the other mode between measurements when needed and its upload queue "
        f"emptied first (untimed). "
        + ("Before each timed backup (the gateway's or pgBackRest's), what was written is flushed and the page cache emptied, untimed "
           "(`common.settle_page_cache`): each step starts with the memory free, instead of paying for reclaiming what the steps before it wrote."
           if settled else "**The page cache was not emptied between the steps (not root):** a step may pay for reclaiming what the ones before it wrote."),
        "",
        "| what | plain | encrypted | encrypted ÷ plain | target |",
        "|---|---:|---:|---:|---|",
        f"| gateway: upload of a base backup ({gb:.2f} GB; POST answered → `manifest.json` in the bucket) | {m['gw_upload_plain']:.2f} s | "
        f"{m['gw_upload_age']:.2f} s | {enc_gw_upload:.3f}× | ≤ 1.10× |",
        f"| gateway: base backup, `POST /api/v1/backup/base` → `manifest.json` in the bucket | {m['gw_backup_plain']:.1f} s | {m['gw_backup_age']:.1f} s | "
        f"{enc_gw_backup:.2f}× | |",
        f"| gateway: CPU per GB uploaded | {m['gw_upload_cpu_plain']:.2f} s | {m['gw_upload_cpu_age']:.2f} s | "
        f"{m['gw_upload_cpu_age'] / m['gw_upload_cpu_plain']:.2f}× | |",
        f"| pgBackRest: `backup --type=full` (aes-256-cbc encrypted) | {m['pgbr_backup_plain']:.1f} s | {m['pgbr_backup_aes']:.1f} s | {enc_pgbr:.2f}× | |",
        f"| pgBackRest: CPU of the backup (all its processes) | {m['pgbr_cpu_plain']:.1f} s | {m['pgbr_cpu_aes']:.1f} s | "
        f"{m['pgbr_cpu_aes'] / m['pgbr_cpu_plain']:.2f}× | |",
        "",
        "With `OMNI_ENCRYPT_LOCAL=true` as well (the same key; the base backup sealed on disk, then uploaded as it is), against age off-site only:",
        "",
        "| gateway | off-site only | local too | local too ÷ off-site only |",
        "|---|---:|---:|---:|",
        f"| local part of the base backup (`POST /api/v1/backup/base` answered) | {m['gw_local_age']:.1f} s | {m['gw_local_local']:.1f} s | "
        f"{m['gw_local_local'] / m['gw_local_age']:.2f}× |",
        f"| upload (answered → `manifest.json` in the bucket) | {m['gw_upload_age']:.1f} s | {m['gw_upload_local']:.1f} s | "
        f"{m['gw_upload_local'] / m['gw_upload_age']:.2f}× |",
        f"| whole base backup | {m['gw_backup_age']:.1f} s | {m['gw_backup_local']:.1f} s | {m['gw_backup_local'] / m['gw_backup_age']:.2f}× |",
        f"| on disk | {sizes['gateway age'][0] / 1e6:.0f} MB | {sizes['gateway local'][0] / 1e6:.0f} MB | |",
        "",
        f"Encrypted, gateway ÷ pgBackRest: base backup **{m['gw_backup_age'] / m['pgbr_backup_aes']:.2f}×** ({m['gw_backup_age']:.1f} s / "
        f"{m['pgbr_backup_aes']:.1f} s; plain {m['gw_backup_plain'] / m['pgbr_backup_plain']:.2f}×). "
        f"Sizes: the gateway's base backup {sizes['gateway plain'][0] / 1e6:.0f} MB, stored {sizes['gateway plain'][1] / 1e6:.0f} MB plain and "
        f"{sizes['gateway age'][1] / 1e6:.0f} MB encrypted; pgBackRest's full backup {sizes['pgbackrest plain'] / 1e6:.0f} MB plain, "
        f"{sizes['pgbackrest aes'] / 1e6:.0f} MB encrypted.",
        "",
        "Each round (plain / encrypted, seconds): gateway upload " + ", ".join(f"{p:.2f} / {e:.2f} ({e / p:.2f}×)" for p, e in zip(results["gw_upload_plain"], results["gw_upload_age"]))
        + "; gateway base backup " + ", ".join(f"{p:.1f} / {e:.1f}" for p, e in zip(results["gw_backup_plain"], results["gw_backup_age"]))
        + "; pgBackRest " + ", ".join(f"{p:.1f} / {e:.1f}" for p, e in zip(results["pgbr_backup_plain"], results["pgbr_backup_aes"])) + ".",
    ]
    print("\n".join(lines))
    if check:
        print(f"not written to BENCHMARKS.md / BENCHMARKS.json: {offsite.PROFILE} build", file=sys.stderr)
        return
    write_section("Off-site repository: encryption", "\n".join(lines))
    write_json(COMMAND, [
        ("offsite.encryption.upload_age_over_plain", round(enc_gw_upload, 3), "ratio"),
        ("offsite.encryption.base_backup_age_over_plain", round(enc_gw_backup, 3), "ratio"),
        ("offsite.encryption.pgbackrest_aes_over_plain", round(enc_pgbr, 3), "ratio"),
        ("offsite.encryption.gateway_age_over_pgbackrest_aes", round(m["gw_backup_age"] / m["pgbr_backup_aes"], 3), "ratio"),
        ("offsite.encryption.gateway_upload_plain", round(m["gw_upload_plain"], 2), "s"),
        ("offsite.encryption.gateway_upload_age", round(m["gw_upload_age"], 2), "s"),
        ("offsite.encryption.pgbackrest_plain", round(m["pgbr_backup_plain"], 2), "s"),
        ("offsite.encryption.pgbackrest_aes", round(m["pgbr_backup_aes"], 2), "s"),
        ("offsite.encryption.upload_cpu_per_gb_plain", round(m["gw_upload_cpu_plain"], 3), "s/GB"),
        ("offsite.encryption.upload_cpu_per_gb_age", round(m["gw_upload_cpu_age"], 3), "s/GB"),
        ("offsite.encryption.local_base_backup_over_offsite_only", round(m["gw_backup_local"] / m["gw_backup_age"], 3), "ratio"),
        ("offsite.encryption.local_backup_local_part", round(m["gw_local_local"], 2), "s"),
        ("offsite.encryption.local_backup_local_part_offsite_only", round(m["gw_local_age"], 2), "s"),
    ])


if __name__ == "__main__":
    main()
