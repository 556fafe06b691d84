#!/usr/bin/env bash
# Browser tests of ui-dist/ in headless Chromium against the real stack.
# Needs `cargo build --workspace` done first (make test does it). Installs
# Debian's Chromium (and certutil) when missing (never a downloaded browser), the npm
# dependencies from the lockfile, then runs every tests/ui/*.test.mjs.
#
#   tests/ui/run.sh --install-only   # Chromium and npm only (CI, while it compiles)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
  echo "tests/ui: installing Chromium with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
# certutil: https.test.mjs makes Chromium trust its test CA through an NSS database.
if ! command -v certutil >/dev/null; then
  echo "tests/ui: installing certutil (libnss3-tools) with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libnss3-tools >/dev/null
fi

cd "$here"
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi
[[ "${1:-}" == --install-only ]] && exit 0

for bin in omni-gateway omni-api; do
  if [ ! -x "$root/target/debug/$bin" ]; then
    echo "tests/ui: target/debug/$bin is missing; run \`cargo build --workspace\` first" >&2
    exit 2
  fi
done

cd "$root"
# One file at a time: each starts its own gateway and Chromium, and the
# machine may have only two cores.
exec node --test --test-concurrency=1 tests/ui/
