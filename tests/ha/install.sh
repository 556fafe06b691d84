#!/usr/bin/env bash
# What the high-availability tests (tests/tests/ha_patroni.rs) run against,
# from Debian's own packages: Patroni, etcd and HAProxy. Idempotent: installs
# only what is missing, prints one NAME=PATH line per tool.
#
#   bash tests/ha/install.sh
#
# Another apt-get may hold the dpkg lock (a CI step, another install):
# apt-get waits for it (DPkg::Lock::Timeout) rather than failing at once.
set -euo pipefail

missing=()
command -v patroni >/dev/null || missing+=(patroni)
command -v patronictl >/dev/null || missing+=(patroni)
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v haproxy >/dev/null || missing+=(haproxy)
# Patroni's etcd3 backend needs python3-etcd, in Debian's python (the one
# Patroni runs on, not another python3 first on PATH).
/usr/bin/python3 -c 'import etcd' 2>/dev/null || missing+=(python3-etcd)

if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "tests/ha: installing ${missing[*]} with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  apt=(env DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300)
  "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2 || {
    "${apt[@]}" update -q >&2
    "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2
  }
fi
# Debian starts the packaged services at install; the tests run their own
# on free ports and need none of them.
for service in etcd haproxy patroni; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
    $([ "$(id -u)" -eq 0 ] || echo sudo) systemctl disable --now "$service" >/dev/null 2>&1 || true
  fi
done

for tool in patroni patronictl etcd etcdctl haproxy; do
  echo "$tool=$(command -v "$tool")"
done
