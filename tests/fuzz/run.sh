#!/usr/bin/env bash
# Property-based fuzzing of the worker's OpenAPI document with schemathesis.
#
# Starts a throw-away PostgreSQL and omni-api (tests/examples/sandbox.rs),
# runs schemathesis against /api/v1/openapi.json within a time budget with
# every check it has (`--checks all`): no 5xx, and no status, header, body or
# rejection the document does not state. A schema-valid request refused, or a
# schema-invalid one accepted, fails the run: the document must say every
# constraint a handler enforces.
#
#   tests/fuzz/run.sh              # default budget: FUZZ_SECONDS=120
#   FUZZ_SECONDS=600 tests/fuzz/run.sh
#   tests/fuzz/run.sh --install-only   # schemathesis only (CI, while it compiles)
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
budget="${FUZZ_SECONDS:-120}"
venv="$root/target/fuzz-venv"
report_dir="$root/target/fuzz-report"

if [[ ! -x "$venv/bin/st" ]]; then
    echo "fuzz: installing schemathesis into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # The version whose checks this API was last fuzzed clean with: a new
    # release may add checks, which should be met on purpose, not in CI.
    "$venv/bin/pip" install --quiet 'schemathesis==4.32.5'
fi

[[ "${1:-}" == --install-only ]] && exit 0

# The worker and the sandbox that starts it. Built for the whole workspace:
# `-p omni-api` or `-p omni-tests` alone would unify dependencies' features
# differently and compile them all again (minutes in CI, right after the
# test build, whose dependencies these are).
cargo build --quiet --workspace --bins --examples

# The sandbox lives as long as its stdin: closing our end stops it, and so
# does this script dying for any reason.
coproc SANDBOX { exec "$root/target/debug/examples/sandbox"; }
trap 'exec {SANDBOX[1]}>&- 2>/dev/null || true; wait "$SANDBOX_PID" 2>/dev/null || true' EXIT
read -r port_line <&"${SANDBOX[0]}"
read -r key_line <&"${SANDBOX[0]}"
port="${port_line#port=}"
api_key="${key_line#api_key=}"
echo "fuzz: omni-api on 127.0.0.1:$port, budget ${budget}s" >&2

mkdir -p "$report_dir"
# schemathesis keeps a cache in its working directory; keep it under target/.
cd "$report_dir"
fuzz() {
  "$venv/bin/st" --config-file "$root/tests/fuzz/schemathesis.toml" run "http://127.0.0.1:$port/api/v1/openapi.json" \
    --checks all \
    --max-time "$budget" \
    --workers 1 \
    --request-timeout 10 \
    --header "x-api-key: $api_key" \
    --report junit --report-dir "$report_dir" \
    --no-color 2>&1 | tee "$report_dir/last-run.txt"
  return "${PIPESTATUS[0]}"
}
# One worker: with two threads, CPython 3.11's `ast` and `linecache` raced
# inside hypothesis ("AST constructor recursion depth mismatch", a KeyError
# in the coverage phase) in 3 of 3 local runs, none with one. A run that still
# stops on such an internal error of the tool, with no failing check, is run
# again, up to three runs in all; any check failure stands.
for attempt in 1 2 3; do
  if fuzz; then
    exit 0
  fi
  if grep -q "^=* FAILURES =*$" "$report_dir/last-run.txt" || ! grep -q "Runtime Error" "$report_dir/last-run.txt"; then
    exit 1
  fi
  echo "fuzz: schemathesis stopped on an internal error of its own, not on a check (run $attempt of 3)" >&2
done
exit 1
