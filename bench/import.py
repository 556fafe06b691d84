#!/usr/bin/env python3
"""SQLite import benchmark: Omni's importer beside pgloader on one file.

Builds (once, cached under target/bench-import/) an SQLite file of the
prefixed era with 1,000,000 message traces and 1,000,000 trace payloads of
about 1 KB each, plus the smaller tables. Starts a real omni-gateway (release
build, embedded PostgreSQL) and in each round, interleaved:
  importer   POST /api/v1/migration/import {"path": ...} through the gateway
             (checks, safety backup, one transaction, binary COPY); peak RSS
             is the worker's VmHWM, reset before the round
  pgloader   the same file into a second database of the same cluster with
             the same schema pre-created (migrations/0002), `data only`;
             peak RSS from wait4
  floor      PostgreSQL alone: the importer's result, exported once as
             binary COPY files, loaded back by the server itself (COPY FROM
             a file, no client at all) into the emptied tables in one
             transaction, with the same plain indexes and foreign keys
             dropped and made again afterwards as the importer does: what
             the server needs for these rows however fast its client is
Both targets are emptied between rounds.

Usage: bench/import.py [ROUNDS]   (writes the "SQLite import" section of BENCHMARKS.md)
"""

import json
import os
import random
import shutil
import sqlite3
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
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 1
KEY = "bench-api-key-0123456789"
TRACES = int(os.environ.get("BENCH_IMPORT_TRACES", "1000000"))
PAYLOAD_BYTES = 1000
BIN = pg_bin_dir()
TABLES = [
    "omni_global_settings", "omni_setting_change_history", "omni_instance_configs", "omni_users",
    "omni_user_external_ids", "omni_access_rules", "omni_message_traces", "omni_trace_payloads",
]


def build_source(path):
    """The benchmark file: prefixed-era tables, so pgloader maps them by name."""
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    db.executescript("""
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
        CREATE TABLE omni_global_settings (id INTEGER PRIMARY KEY, key VARCHAR NOT NULL UNIQUE, value VARCHAR, value_type VARCHAR(20) NOT NULL,
            category VARCHAR, description VARCHAR, is_secret BOOLEAN NOT NULL, is_required BOOLEAN NOT NULL, default_value VARCHAR,
            validation_rules VARCHAR, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, created_by VARCHAR, updated_by VARCHAR);
        CREATE TABLE omni_setting_change_history (id INTEGER PRIMARY KEY, setting_id INTEGER NOT NULL, old_value VARCHAR, new_value VARCHAR,
            changed_by VARCHAR, changed_at DATETIME NOT NULL, change_reason VARCHAR);
        CREATE TABLE omni_instance_configs (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, channel_type VARCHAR NOT NULL,
            evolution_url VARCHAR, evolution_key VARCHAR, whatsapp_instance VARCHAR, webhook_base64 BOOLEAN NOT NULL, agent_api_url VARCHAR,
            agent_type VARCHAR NOT NULL, agent_timeout INTEGER, agent_stream_mode BOOLEAN NOT NULL, is_default BOOLEAN, is_active BOOLEAN,
            enable_auto_split BOOLEAN NOT NULL, created_at DATETIME, updated_at DATETIME);
        CREATE TABLE omni_users (id VARCHAR PRIMARY KEY, phone_number VARCHAR NOT NULL, whatsapp_jid VARCHAR NOT NULL,
            instance_name VARCHAR NOT NULL, display_name VARCHAR, last_seen_at DATETIME, message_count INTEGER, created_at DATETIME, updated_at DATETIME);
        CREATE TABLE omni_user_external_ids (id INTEGER PRIMARY KEY, user_id VARCHAR NOT NULL, provider VARCHAR NOT NULL,
            external_id VARCHAR NOT NULL, instance_name VARCHAR, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
        CREATE TABLE omni_access_rules (id INTEGER PRIMARY KEY, instance_name VARCHAR, phone_number VARCHAR NOT NULL,
            rule_type VARCHAR(10) NOT NULL, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL);
        CREATE TABLE omni_message_traces (trace_id VARCHAR PRIMARY KEY, instance_name VARCHAR, whatsapp_message_id VARCHAR,
            sender_phone VARCHAR, sender_name VARCHAR, message_type VARCHAR, has_media BOOLEAN, has_quoted_message BOOLEAN,
            message_length INTEGER, session_name VARCHAR, received_at DATETIME, completed_at DATETIME, status VARCHAR,
            blocked_by_access_rule BOOLEAN, agent_processing_time_ms INTEGER, total_processing_time_ms INTEGER,
            agent_response_success BOOLEAN, evolution_success BOOLEAN);
        CREATE TABLE omni_trace_payloads (id INTEGER PRIMARY KEY, trace_id VARCHAR, stage VARCHAR, payload_type VARCHAR,
            payload_compressed TEXT, payload_size_original INTEGER, payload_size_compressed INTEGER, timestamp DATETIME,
            status_code INTEGER, contains_media BOOLEAN, contains_base64 BOOLEAN);
        CREATE INDEX omni_trace_payloads_trace_id ON omni_trace_payloads (trace_id);
    """)
    at = "2024-01-01 12:00:00"
    db.executemany("INSERT INTO omni_global_settings VALUES (?,?,?,'string','general',NULL,0,'0',NULL,NULL,?,?,NULL,NULL)",
                   ((i, f"setting_{i}", f"value {i}", at, at) for i in range(1, 51)))
    db.executemany("INSERT INTO omni_setting_change_history VALUES (?,?,'a','b','admin',?,NULL)",
                   ((i, i % 50 + 1, at) for i in range(1, 201)))
    db.executemany("INSERT INTO omni_instance_configs VALUES (?,?,'whatsapp','http://evo','k',?,1,'http://agent','agent',60,'0',0,1,'1',?,?)",
                   ((i, f"instance-{i}", f"wa-{i}", at, at) for i in range(1, 11)))
    db.executemany("INSERT INTO omni_users VALUES (?,?,?,?,?,?,?,?,?)",
                   ((f"u-{i:08d}", f"+1555{i:07d}", f"{i}@s.whatsapp.net", f"instance-{i % 10 + 1}", f"User {i}", at, i % 100, at, at)
                    for i in range(10_000)))
    db.executemany("INSERT INTO omni_user_external_ids VALUES (?,?,'discord',?,?,?,?)",
                   ((i + 1, f"u-{i:08d}", f"d-{i}", f"instance-{i % 10 + 1}", at, at) for i in range(10_000)))
    db.executemany("INSERT INTO omni_access_rules VALUES (?,?,?,?,?,?)",
                   ((i, f"instance-{i % 10 + 1}", f"+1666{i:07d}", "allow" if i % 2 else "block", at, at) for i in range(1, 101)))
    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    blob = "".join(rng.choice(alphabet) for _ in range(PAYLOAD_BYTES * 4))

    def trace_id(i):
        return f"{i:08x}-0000-4000-8000-{i:012x}"

    def stamp(i, fraction):
        s = f"2024-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{(i // 60) % 60:02d}"
        return f"{s}.{i % 1_000_000:06d}" if fraction else s

    db.executemany("INSERT INTO omni_message_traces VALUES (?,?,?,?,?,'text',?,?,?,?,?,?,'completed','0',?,?,1,'1')",
                   ((trace_id(i), f"instance-{i % 10 + 1}", f"WAMID.{i}", f"+1555{i % 10_000:07d}", f"User {i % 10_000}",
                     i % 2, str(i % 3 == 0 and 1 or 0), i % 500, f"session-{i % 1000}", stamp(i, i % 2), stamp(i + 1, True),
                     i % 5000, i % 9000) for i in range(TRACES)))
    db.executemany("INSERT INTO omni_trace_payloads VALUES (?,?,'webhook_received','request',?,2048,?,?,200,0,'1')",
                   ((i + 1, trace_id(i), blob[i % (PAYLOAD_BYTES * 3):i % (PAYLOAD_BYTES * 3) + PAYLOAD_BYTES], PAYLOAD_BYTES, stamp(i, True))
                    for i in range(TRACES)))
    db.commit()
    db.close()
    tmp.rename(path)


def rows_in(path):
    db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return sum(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
    finally:
        db.close()


def vm_hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main():
    cache = ROOT / "target" / "bench-import"
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"omni-{TRACES}.db"
    if not source.exists():
        print(f"building {source} …", file=sys.stderr)
        build_source(source)
    total_rows = rows_in(source)
    size = source.stat().st_size
    pgloader = shutil.which("pgloader")
    if not pgloader:
        raise SystemExit("pgloader is not installed: apt-get install pgloader")
    pgloader_version = subprocess.run([pgloader, "--version"], capture_output=True, text=True).stdout.splitlines()[0]

    work = Path(tempfile.mkdtemp(prefix="omni-bench-import-"))
    work.chmod(0o755)
    (work / "data").mkdir()
    try:
        os.link(source, work / "data" / "automagik-omni.db")
    except OSError:
        shutil.copy(source, work / "data" / "automagik-omni.db")
    port, pg_port = free_port(), free_port()
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
        "OMNI_PORT": str(port), "PGSERVE_PORT": str(pg_port), "PGSERVE_BIN_DIR": str(BIN),
        "OMNI_API_KEY": KEY, "OMNI_BACKUP_KEEP": "2", "LOG_LEVEL": "warn",
    }
    log = open(work / "gateway.log", "w")
    gw = subprocess.Popen([str(GATEWAY)], cwd=work, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_healthy(port, gw, poll=0.2, log=work / "gateway.log")
        password = (work / "data" / "postgres.password").read_text().strip()
        pg_env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(pg_port), PGUSER="postgres", PGPASSWORD=password)

        def psql(database, sql):
            subprocess.run([str(BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql],
                           env=pg_env, check=True, stdout=subprocess.DEVNULL)

        psql("omni", "CREATE DATABASE pgl")
        subprocess.run([str(BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "pgl", "-f", str(ROOT / "migrations" / "0002_omni_schema.sql")],
                       env=pg_env, check=True, stdout=subprocess.DEVNULL)
        load = work / "load.pgl"
        load.write_text(
            f"LOAD DATABASE\n  FROM sqlite://{work / 'data' / 'automagik-omni.db'}\n"
            f"  INTO postgresql://postgres:{password}@127.0.0.1:{pg_port}/pgl\n"
            "  WITH data only, create no tables, create no indexes, reset no sequences, disable triggers,\n"
            # pgloader's defaults (100,000 prefetched rows per worker) exhaust its
            # heap on 1 KB payloads; these keep it within its default heap.
            "       workers = 2, concurrency = 1, batch rows = 5000, prefetch rows = 5000\n;\n")
        status = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/gateway/status", timeout=10).read())
        worker_pid = next(c["pid"] for c in status["components"] if c["name"] == "api")

        truncate = "TRUNCATE " + ", ".join(TABLES) + " CASCADE"
        exports = work / "floor"
        exports.mkdir()
        os.chmod(exports, 0o777)

        def psql_out(sql):
            return subprocess.run([str(BIN / "psql"), "-X", "-At", "-d", "omni", "-c", sql], env=pg_env, check=True,
                                  capture_output=True, text=True).stdout

        def floor_script():
            """The floor's SQL: per table, plain indexes and foreign keys dropped,
            COPY FROM the exported file, then made again (the importer's bulk path)."""
            lines = ["\\timing off", "BEGIN;", truncate + ";", "SET LOCAL maintenance_work_mem = '256MB';"]
            for t in TABLES:
                indexes = psql_out(f"SELECT indexrelid::regclass::text || '|' || pg_get_indexdef(indexrelid) FROM pg_index "
                                   f"WHERE indrelid = '{t}'::regclass AND NOT indisprimary AND NOT indisunique").split("\n")
                fks = psql_out(f"SELECT conname || '|' || pg_get_constraintdef(oid) FROM pg_constraint "
                               f"WHERE conrelid = '{t}'::regclass AND contype = 'f'").split("\n")
                indexes = [i.split("|", 1) for i in indexes if i]
                fks = [f.split("|", 1) for f in fks if f]
                lines += [f"DROP INDEX {name};" for name, _ in indexes]
                lines += [f"ALTER TABLE {t} DROP CONSTRAINT {name};" for name, _ in fks]
                lines.append(f"COPY {t} FROM '{exports / t}.bin' (FORMAT binary);")
                lines += [f"{definition};" for _, definition in indexes]
                lines += [f"ALTER TABLE {t} ADD CONSTRAINT {name} {definition};" for name, definition in fks]
            lines.append("COMMIT;")
            return "\n".join(lines) + "\n"

        times = {"importer": [], "pgloader": [], "floor": []}
        rss = {"importer": [], "pgloader": []}
        report = None
        for _ in range(ROUNDS):
            psql("omni", truncate)
            Path(f"/proc/{worker_pid}/clear_refs").write_text("5")
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/migration/import", method="POST",
                data=json.dumps({"path": "data/automagik-omni.db"}).encode(),
                headers={"x-api-key": KEY, "content-type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=3600) as r:
                report = json.loads(r.read())
            times["importer"].append(time.perf_counter() - started)
            rss["importer"].append(vm_hwm_kib(worker_pid) / 1024)
            assert report["imported"] == total_rows, report
            print(f"importer: {times['importer'][-1]:.1f} s, {rss['importer'][-1]:.0f} MiB", file=sys.stderr)

            if not any(exports.iterdir()):
                for t in TABLES:
                    psql("omni", f"COPY {t} TO '{exports / t}.bin' (FORMAT binary)")
                script = work / "floor.sql"
                script.write_text(floor_script())
            started = time.perf_counter()
            subprocess.run([str(BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "omni", "-f", str(script)],
                           env=pg_env, check=True, stdout=subprocess.DEVNULL)
            times["floor"].append(time.perf_counter() - started)
            loaded = int(psql_out(" + ".join(f"(SELECT count(*) FROM {t})" for t in TABLES).join(["SELECT ", ""])))
            assert loaded == total_rows, f"the floor loaded {loaded} of {total_rows} rows"
            print(f"floor: {times['floor'][-1]:.1f} s", file=sys.stderr)

            psql("pgl", truncate)
            started = time.perf_counter()
            proc = subprocess.Popen([pgloader, "--quiet", str(load)], cwd=work, env=dict(os.environ, HOME=str(work)),
                                    stdout=subprocess.DEVNULL, stderr=open(work / "pgloader.log", "w"))
            _, code, usage = os.wait4(proc.pid, 0)
            times["pgloader"].append(time.perf_counter() - started)
            rss["pgloader"].append(usage.ru_maxrss / 1024)
            if code != 0:
                raise SystemExit(f"pgloader failed:\n{(work / 'pgloader.log').read_text()[-3000:]}")
            loaded = subprocess.run([str(BIN / "psql"), "-X", "-At", "-d", "pgl", "-c",
                                     " + ".join(f"(SELECT count(*) FROM {t})" for t in TABLES).join(["SELECT ", ""])],
                                    env=pg_env, check=True, capture_output=True, text=True).stdout.strip()
            assert int(loaded) == total_rows, f"pgloader loaded {loaded} of {total_rows} rows"
            print({k: round(v[-1], 2) for k, v in times.items()}, {k: round(v[-1]) for k, v in rss.items()}, file=sys.stderr)
        version = subprocess.run([str(BIN / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, 15)
            gw.wait(timeout=60)
        subprocess.run(["rm", "-rf", str(work)])

    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: max(v) for k, v in rss.items()}
    floor_ratio = med["floor"] / med["importer"]
    rate = {k: total_rows / v for k, v in med.items()}
    ratio = rate["importer"] / rate["pgloader"]
    rounds = f"medians of {ROUNDS} interleaved rounds" if ROUNDS > 1 else "one round"
    lines = [
        f"`python3 bench/import.py {ROUNDS}` (run by `make bench`) — {rounds}, release build, {version}, {pgloader_version}, "
        f"one machine ({os.cpu_count()} cores). The file: {TRACES:,} message traces, "
        f"{TRACES:,} trace payloads of {PAYLOAD_BYTES} bytes and the smaller tables, {total_rows:,} rows, {size / 1e6:.0f} MB, "
        "prefixed era (so pgloader maps tables by name). Both load into the same cluster and the same pre-created schema "
        "(migrations/0002: indexes and foreign keys in place); the importer's time is the client's, through the gateway, and "
        "includes its checks (`PRAGMA quick_check`), the safety backup and the commit; pgloader runs `data only` with "
        "`disable triggers` (foreign keys not checked: it cannot order the tables itself) and smaller batches (`batch rows = 5000, prefetch rows = 5000`: with its defaults it runs out of heap on this file). Peak RSS: the worker's VmHWM, "
        "reset before the import; pgloader's from wait4.",
        "",
        "| loader | time | rows/s | peak RSS | target |",
        "|---|---:|---:|---:|---|",
        f"| Omni importer (`POST /api/v1/migration/import`) | {med['importer']:.1f} s | {rate['importer']:,.0f} | {mem['importer']:.0f} MiB | ≥ 200,000 rows/s, < 100 MB |",
        f"| pgloader, data only | {med['pgloader']:.1f} s | {rate['pgloader']:,.0f} | {mem['pgloader']:.0f} MiB | |",
        f"| floor: the server alone, `COPY FROM` files of the same rows, same index and foreign-key rebuilds, one transaction | {med['floor']:.1f} s | {rate['floor']:,.0f} | | |",
        "",
        f"Importer ÷ floor throughput: {floor_ratio:.2f}× (the importer's time includes its checks, the safety backup and the HTTP round trip).",
        "",
        f"Importer ÷ pgloader throughput: {ratio:.2f}× (target ≥ 1.0×). The importer's own report (last round): "
        f"{report['rows_per_second']:,} rows/s over {report['duration_ms'] / 1000:.1f} s, of which "
        f"{report['checks_ms'] / 1000:.1f} s checking the file before writing (`PRAGMA quick_check` reads all of it); "
        f"the copy itself: {total_rows / max((report['duration_ms'] - report['checks_ms']) / 1000, 0.001):,.0f} rows/s.",
    ]
    write_section("SQLite import", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
