"""What every benchmark script shares: where things are, free ports, waiting
for a gateway to be healthy, and writing one section of BENCHMARKS.md."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pg_bin_dir():
    """PGSERVE_BIN_DIR, else the newest /usr/lib/postgresql/*/bin."""
    if os.environ.get("PGSERVE_BIN_DIR"):
        return Path(os.environ["PGSERVE_BIN_DIR"])
    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_ok(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def wait_healthy(port, proc, timeout=120, poll=0.002, log=None):
    """Polls the gateway on `port` until /health is 200; fails if `proc` exits first."""
    deadline = time.perf_counter() + timeout
    while not health_ok(port):
        if proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            raise SystemExit(f"omni-gateway exited with {proc.returncode} before it was ready\n{tail}")
        if time.perf_counter() > deadline:
            raise SystemExit(f"omni-gateway not healthy within {timeout} s")
        time.sleep(poll)


def write_section(title, body):
    """Replaces `## title` … up to the next `## ` in BENCHMARKS.md (or appends it)."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured on this project's development machine; `make bench` regenerates every section.\n"
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == f"## {title}"), None)
    new = [f"## {title}", "", body, ""]
    if start is None:
        lines += [""] + new
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        lines[start:end] = new
    path.write_text("\n".join(lines).rstrip() + "\n")


def write_json(command, figures):
    """Replaces the figures `command` produced in BENCHMARKS.json (beside
    BENCHMARKS.md), keeping every other command's: a list of
    {name, value, unit, command}, sorted by name, so a change that moves a
    figure shows in the file's diff. `figures`: (name, value, unit) tuples."""
    path = ROOT / "BENCHMARKS.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    names = {name for name, _, _ in figures}
    entries = [e for e in entries if e["command"] != command and e["name"] not in names]
    entries += [{"name": name, "value": value, "unit": unit, "command": command} for name, value, unit in figures]
    entries.sort(key=lambda e: e["name"])
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")


# ── Off-site repository benchmark (bench/offsite.py) ─────────────────────────
# The object stores the tests run against, and the CPU time of a process.

def store_tools():
    """The test kit's object stores (`rclone`, `weed`, ...), installed into
    target/ by tests/stores/install.sh when missing: {name: path}."""
    import subprocess
    out = subprocess.run(["bash", str(ROOT / "tests" / "stores" / "install.sh")], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def settle_page_cache():
    """What is written flushed to disk and the page cache emptied (root
    only), before a timed step: with the cache full of what earlier steps
    wrote, the step's writers pay for reclaiming it, and not evenly (one
    upload of 1 GB in three took 60% longer, its S3 server's system time
    0.9 → 3.2 s). Returns whether the cache was emptied."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def cpu_seconds(pid):
    """User + system CPU time `pid` has used so far (from /proc/<pid>/stat)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds():
    """CPU time the whole machine has spent busy so far: every process and
    the kernel, all of /proc/stat's first line but idle and iowait."""
    fields = [int(f) for f in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def tcp_worker(pid):
    """A second worker like the gateway's (`pid`), listening on a TCP port,
    for the paths that cannot use the gateway's: the direct floor and nginx.
    The gateway's worker listens on a Unix socket in the gateway's private
    directory, which only the gateway reaches. This one runs the same binary
    with the same environment and account; returns (process, port)."""
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    for name in ("OMNI_API_LISTEN_FD", "OMNI_API_READY_FD", "OMNI_API_START_FD"):
        env.pop(name, None)
    port = free_port()
    env["OMNI_API_LISTEN"] = f"127.0.0.1:{port}"
    ids = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in open(f"/proc/{pid}/status")) if k in ("Uid", "Gid")}
    proc = subprocess.Popen([os.readlink(f"/proc/{pid}/exe")], env=env, cwd="/", user=ids["Uid"], group=ids["Gid"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the TCP worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the TCP worker did not become healthy within 30 s")


def static_ui(work):
    """A UI directory under `work` for OMNI_UI_DIR: an index page and the
    3-byte `/ping.txt` the proxy benchmarks request."""
    ui = work / "ui"
    ui.mkdir()
    (ui / "index.html").write_text("<!doctype html><title>bench</title>\n")
    (ui / "ping.txt").write_text("ok\n")
    return ui
