#!/usr/bin/env bash
# Preference GET and POST throughput and latency, straight at the worker and
# through omni-gateway as users run it.
#
# 1. A throw-away PostgreSQL and omni-api (tests/examples/sandbox.rs), hit
#    straight at the worker.
# 2. A release omni-gateway in persistent mode (its own cluster in a new data
#    directory, fsync and synchronous_commit on, WAL streamed to OMNI_WAL_DIR:
#    the defaults), hit through the gateway's port.
# Each runs wrk with 32 connections: GET /api/v1/preferences/{key} and
# POST /api/v1/preferences (body from a small Lua script). Prints requests/s,
# p50 and p99 per endpoint, writes the "Preferences API" section of
# BENCHMARKS.md and the figures into BENCHMARKS.json.
#
#   bench/api_prefs.sh                       # release build of omni-api and omni-gateway
#   BENCH_SECONDS=20 bench/api_prefs.sh
#   OMNI_API_BIN=target/debug/omni-api bench/api_prefs.sh   # the worker-only rows
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${BENCH_SECONDS:-10}"
connections=32
threads=2
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install wrk)" >&2; exit 1; }

if [[ -z "${OMNI_API_BIN:-}" ]]; then
    cargo build --quiet --release -p omni-api -p omni-gateway
    export OMNI_API_BIN="$root/target/release/omni-api"
fi
gateway_bin="$root/target/release/omni-gateway"
[[ -x "$gateway_bin" ]] || { echo "bench: build the gateway first: cargo build --release --workspace" >&2; exit 1; }
cargo build --quiet -p omni-tests --example sandbox

coproc SANDBOX { LOG_LEVEL=warn exec "$root/target/debug/examples/sandbox"; }
trap 'exec {SANDBOX[1]}>&- 2>/dev/null || true; wait "$SANDBOX_PID" 2>/dev/null || true' EXIT
read -r port_line <&"${SANDBOX[0]}"
port="${port_line#port=}"
base="http://127.0.0.1:$port"
session="$(cat /proc/sys/kernel/random/uuid)"

scripts="$(mktemp -d)"
trap 'rm -rf "$scripts"; exec {SANDBOX[1]}>&- 2>/dev/null || true; wait "$SANDBOX_PID" 2>/dev/null || true' EXIT

# Shared by both runs: headers, and a done() that prints one summary line.
cat > "$scripts/common.lua" <<LUA
wrk.headers["x-session-id"] = "$session"
wrk.headers["content-type"] = "application/json"
function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("%-6s %10.0f req/s   p50 %6.2f ms   p99 %6.2f ms   errors %d\n",
    wrk.method, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, errors))
end
LUA
cat "$scripts/common.lua" > "$scripts/get.lua"
{ cat "$scripts/common.lua"; cat <<'LUA'
wrk.method = "POST"
local counter = 0
-- Values of one length: each write overwrites an existing key with a value
-- no longer than the one it replaces (the common write; a longer anonymous
-- value takes the locked path that keeps the storage limits exact).
request = function()
  counter = counter + 1
  return wrk.format(nil, "/api/v1/preferences", nil,
    string.format('{"key":"bench.%d","value":"value-%09d"}', counter % 99, counter))
end
LUA
} > "$scripts/post.lua"

run_pair() { # base url, label: prints "GET …" and "POST …" summary lines
    local base="$1"
    curl -sf -X POST "$base/api/v1/preferences" -H "x-session-id: $session" -H 'content-type: application/json' \
        -d '{"key":"theme","value":"dark"}' >/dev/null
    wrk -t "$threads" -c "$connections" -d "${seconds}s" -s "$scripts/get.lua" "$base/api/v1/preferences/theme" | tail -1
    # Not measured: creates the 99 keys, so the measured run overwrites.
    wrk -t "$threads" -c "$connections" -d 2s -s "$scripts/post.lua" "$base/api/v1/preferences" >/dev/null
    wrk -t "$threads" -c "$connections" -d "${seconds}s" -s "$scripts/post.lua" "$base/api/v1/preferences" | tail -1
}

load_before="$(cut -d' ' -f1 /proc/loadavg)"
echo "omni-api $OMNI_API_BIN, $connections connections, ${seconds}s each (load average $load_before)"
mapfile -t worker_lines < <(run_pair "$base")
printf '%s\n' "${worker_lines[@]}"
exec {SANDBOX[1]}>&-
wait "$SANDBOX_PID" 2>/dev/null || true

# Through the gateway, persistent mode, every durability setting at its default.
gw_dir="$(mktemp -d "${TMPDIR:-/tmp}/omni-prefs-bench-XXXXXX")"
chmod 755 "$gw_dir"
gw_port="$(python3 -c 'import sys; sys.path.insert(0, "bench"); from common import free_port; print(free_port())')"
OMNI_PORT="$gw_port" OMNI_DATA_DIR="$gw_dir/data" PGSERVE_PORT=0 PGSERVE_MEMORY_MODE=false LOG_LEVEL=warn \
    OMNI_API_KEY=bench-key-0123456789 OMNI_API_BIN="$OMNI_API_BIN" setsid "$gateway_bin" >"$gw_dir/gateway.log" 2>&1 &
gw_pid=$!
trap 'rm -rf "$scripts"; kill -TERM "$gw_pid" 2>/dev/null; wait "$gw_pid" 2>/dev/null; rm -rf "$gw_dir"' EXIT
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$gw_port/health" >/dev/null && break
    kill -0 "$gw_pid" 2>/dev/null || { echo "bench: omni-gateway exited:" >&2; tail -20 "$gw_dir/gateway.log" >&2; exit 1; }
    sleep 0.1
done
curl -sf "http://127.0.0.1:$gw_port/health" >/dev/null || { echo "bench: omni-gateway not healthy in 60 s" >&2; exit 1; }
# A new install streams WAL and takes its first base backup at once: measured
# after that, as the service runs from then on.
for _ in $(seq 1 600); do
    curl -sf -H "x-api-key: bench-key-0123456789" "http://127.0.0.1:$gw_port/api/v1/backup/window" \
        | python3 -c 'import json, sys; w = json.load(sys.stdin); sys.exit(0 if w["streaming"] and w["base_backups"] else 1)' && break
    sleep 0.1
done
echo "omni-gateway $gateway_bin (persistent mode, $gw_dir: fsync and synchronous_commit on)"
mapfile -t gateway_lines < <(run_pair "http://127.0.0.1:$gw_port")
printf '%s\n' "${gateway_lines[@]}"

# The "Preferences API" section of BENCHMARKS.md (other sections are left alone)
# and the figures in BENCHMARKS.json.
python3 - "${worker_lines[0]}" "${worker_lines[1]}" "${gateway_lines[0]}" "${gateway_lines[1]}" "$seconds" "$connections" \
    "$load_before" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import sys
sys.path.insert(0, "bench")
from common import write_section, write_json
wget, wpost, gget, gpost, seconds, connections, load_before, load_after = sys.argv[1:]
def fields(line):
    f = line.split()
    return {"rps": float(f[1]), "p50": float(f[4]), "p99": float(f[7]), "errors": int(f[10])}
def row(line, label):
    f = fields(line)
    return f"| {label} | {f['rps']:.0f} | {f['p50']:.2f} | {f['p99']:.2f} | {f['errors']} |"
g_get, g_post = fields(gget), fields(gpost)
met = lambda v, limit: "met" if v < limit else "NOT met"
command = "bash bench/api_prefs.sh"
write_section("Preferences API", "\n".join([
    f"Command: `{command}` (run by `make bench`; BENCH_SECONDS={seconds}): wrk, {connections} connections, 2 threads, on the same 2 cores "
    f"(1-minute load average {load_before} before the run, {load_after} after it). "
    "Worker rows: straight at a release omni-api on a throw-away PostgreSQL. Gateway rows: through a release omni-gateway as users run it: "
    "persistent mode, a new cluster, `fsync` and `synchronous_commit` on, WAL streamed to `OMNI_WAL_DIR` (all defaults), "
    "measured once it streams WAL and its first base backup is kept. POST overwrites 99 existing keys (created by a 2 s run before) "
    "with values of one length. "
    "Targets through the gateway: POST p99 under 5 ms, GET p99 under 3 ms.",
    "",
    "| request | requests/s | p50 ms | p99 ms | errors |",
    "|---|---:|---:|---:|---:|",
    row(wget, "worker: GET /api/v1/preferences/theme"),
    row(wpost, "worker: POST /api/v1/preferences (upsert, 99 keys)"),
    row(gget, "gateway: GET /api/v1/preferences/theme"),
    row(gpost, "gateway: POST /api/v1/preferences (upsert, 99 keys)"),
    "",
    f"- through the gateway: GET p99 **{g_get['p99']:.2f} ms** (target < 3 ms: {met(g_get['p99'], 3)}), "
    f"POST p99 **{g_post['p99']:.2f} ms** (target < 5 ms: {met(g_post['p99'], 5)})",
]))
out = []
for where, get, post in (("worker", fields(wget), fields(wpost)), ("gateway", g_get, g_post)):
    for method, f in (("get", get), ("post", post)):
        out += [(f"prefs.{where}.{method}.requests_per_s", round(f["rps"]), "req/s"),
                (f"prefs.{where}.{method}.p50", f["p50"], "ms"),
                (f"prefs.{where}.{method}.p99", f["p99"], "ms")]
write_json(command, out)
PY
