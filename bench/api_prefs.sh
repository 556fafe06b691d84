#!/usr/bin/env bash
# Preference GET and POST throughput and latency, straight at the worker.
#
# Starts a throw-away PostgreSQL and omni-api (tests/examples/sandbox.rs),
# then runs wrk with 32 connections: GET /api/v1/preferences/{key} and
# POST /api/v1/preferences (body from a small Lua script). Prints requests/s,
# p50 and p99 per endpoint.
#
#   bench/api_prefs.sh                       # release build of omni-api
#   BENCH_SECONDS=20 bench/api_prefs.sh
#   OMNI_API_BIN=target/debug/omni-api bench/api_prefs.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${BENCH_SECONDS:-10}"
connections=32
threads=2
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install wrk)" >&2; exit 1; }

if [[ -z "${OMNI_API_BIN:-}" ]]; then
    cargo build --quiet --release -p omni-api
    export OMNI_API_BIN="$root/target/release/omni-api"
fi
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
request = function()
  counter = counter + 1
  return wrk.format(nil, "/api/v1/preferences", nil,
    string.format('{"key":"bench.%d","value":"value-%d"}', counter % 100, counter))
end
LUA
} > "$scripts/post.lua"

curl -sf -X POST "$base/api/v1/preferences" -H "x-session-id: $session" -H 'content-type: application/json' \
    -d '{"key":"theme","value":"dark"}' >/dev/null

echo "omni-api $OMNI_API_BIN, $connections connections, ${seconds}s each"
get_line="$(wrk -t "$threads" -c "$connections" -d "${seconds}s" -s "$scripts/get.lua" "$base/api/v1/preferences/theme" | tail -1)"
post_line="$(wrk -t "$threads" -c "$connections" -d "${seconds}s" -s "$scripts/post.lua" "$base/api/v1/preferences" | tail -1)"
echo "$get_line"
echo "$post_line"

# The "Preferences API" section of BENCHMARKS.md (other sections are left alone).
python3 - "$get_line" "$post_line" "$seconds" "$connections" <<'PY'
import sys
sys.path.insert(0, "bench")
from common import write_section
get, post, seconds, connections = sys.argv[1:]
def row(line, label):
    f = line.split()
    return f"| {label} | {f[1]} | {f[4]} | {f[7]} | {f[10]} |"
write_section("Preferences API", "\n".join([
    f"Command: `bash bench/api_prefs.sh` (run by `make bench`; BENCH_SECONDS={seconds}): wrk, {connections} connections, 2 threads, "
    "straight at a release omni-api on a throw-away PostgreSQL, on the same 2 cores. Target: p99 under 5 ms.",
    "",
    "| request | requests/s | p50 ms | p99 ms | errors |",
    "|---|---:|---:|---:|---:|",
    row(get, "GET /api/v1/preferences/theme"),
    row(post, "POST /api/v1/preferences (upsert, 100 keys)"),
]))
PY
