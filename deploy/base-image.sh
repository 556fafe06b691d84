#!/bin/sh
# Makes sure the Docker daemon has the base image the Dockerfile starts FROM
# (debian:bookworm-slim), for machines that cannot pull from Docker Hub.
#
#   deploy/base-image.sh [cache-tarball]
#   deploy/base-image.sh --cache-only [cache-tarball]
#
# In order: the image is already there; `docker pull` works; a root
# filesystem tarball cached by an earlier run (default
# target/docker/debian-bookworm-slim.tar) is imported; else one is made with
# `debootstrap --variant=minbase bookworm` from the Debian mirror apt already
# uses, trimmed the way the official slim image is (no docs, man pages or
# locales), cached, and imported. debootstrap takes minutes; the cache makes
# every later run take seconds. Needs root for debootstrap.
#
# --cache-only makes the tarball (when missing) and imports nothing: no
# daemon needed, so CI makes it while the workspace compiles.
set -eu

cache_only=
if [ "${1:-}" = --cache-only ]; then
  cache_only=1
  shift
fi
image=${BASE_IMAGE:-debian:bookworm-slim}
cache=${1:-target/docker/debian-bookworm-slim.tar}

if [ -n "$cache_only" ] && [ -s "$cache" ]; then
  exit 0
fi
if [ -z "$cache_only" ] && docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
# Pulling fails fast (DNS) where Docker Hub is unreachable.
if [ -z "$cache_only" ] && timeout 120 docker pull -q "$image" >/dev/null 2>&1; then
  exit 0
fi

import() {
  # The official image runs bash by default; keep that so `docker run debian:bookworm-slim` behaves alike.
  docker import --change 'CMD ["bash"]' "$cache" "$image" >/dev/null
  echo "base image $image imported from $cache" >&2
}

if [ -z "$cache_only" ] && [ -s "$cache" ]; then
  import
  exit 0
fi

command -v debootstrap >/dev/null || {
  echo "cannot pull $image and debootstrap is not installed: apt-get install debootstrap" >&2
  exit 1
}
# The mirror apt is configured with (deb822 .sources or one-line .list), not a guess.
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*\([^ ]*\/debian\/\{0,1\}\)$/\1/p' | head -n 1)
[ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" && $2 ~ /\/debian\/?$/ { print $2; exit }')
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

root=$(mktemp -d "${TMPDIR:-/tmp}/omni-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "making $image with debootstrap from $mirror (takes a few minutes, once)" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"

# What the official slim image does: packages installed later leave their
# docs, man pages and translations out, apt keeps no caches.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
# The same sources as the official image (bookworm, updates, security), on this mirror.
security=$(echo "$mirror" | sed 's#/debian/\{0,1\}$#/debian-security#')
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -f "$root/etc/apt/sources.list"
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log "$root"/tmp/*
# The image's hostname and resolver come from Docker at run time.
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

# mktemp made the root 0700; / must be traversable by every account.
chmod 0755 "$root"
mkdir -p "$(dirname "$cache")"
tar --numeric-owner -C "$root" -cf "$cache.tmp" .
mv "$cache.tmp" "$cache"
if [ -n "$cache_only" ]; then
  echo "base image root filesystem cached in $cache" >&2
  exit 0
fi
import
