#!/bin/sh
# Builds an image from binaries built beforehand (no Rust toolchain image
# needed), for `make image` and for the tests that run the image for real.
#
#   deploy/build-image.sh [-t TAG] [-f DOCKERFILE] [-b BINARY_DIR]
#
# Defaults: -t omni-gateway:local -f Dockerfile -b target/release. The build
# context is staged in a temporary directory (the Dockerfile,
# deploy/omni-gateway.service and the two binaries as target/release/, which
# are the whole install: omni-api carries the UI), so it is small whatever
# lies in the work tree. The base image comes from
# deploy/base-image.sh (debootstrap when Docker Hub is unreachable); apt runs
# inside the build over the host's network, since a daemon started with
# --bridge=none gives build containers none of their own.
set -eu
cd "$(dirname "$0")/.."

tag=omni-gateway:local
file=Dockerfile
bins=target/release
while getopts t:f:b: opt; do
  case $opt in
    t) tag=$OPTARG ;;
    f) file=$OPTARG ;;
    b) bins=$OPTARG ;;
    *) echo "usage: $0 [-t TAG] [-f DOCKERFILE] [-b BINARY_DIR]" >&2; exit 2 ;;
  esac
done

# The Dockerfile picks its stage with BuildKit (the legacy builder would build
# the rust:1-bookworm stage too). docker.io's client before 23 has BuildKit
# built in; later clients need the buildx plugin.
cli=
if docker buildx version >/dev/null 2>&1; then
  cli=docker
else
  for c in docker /usr/bin/docker; do
    v=$("$c" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p') || continue
    if [ -n "$v" ] && [ "$v" -lt 23 ]; then cli=$c; break; fi
  done
fi
if [ -z "$cli" ]; then
  echo "building needs BuildKit: install the buildx plugin (docker-buildx-plugin) or Debian's docker.io client" >&2
  exit 1
fi

if ! docker version >/dev/null 2>&1; then
  echo "no Docker daemon answers${DOCKER_HOST:+ at DOCKER_HOST=$DOCKER_HOST}: start it (systemctl start docker) or point DOCKER_HOST at one" >&2
  exit 1
fi
sh deploy/base-image.sh

ctx=$(mktemp -d "${TMPDIR:-/tmp}/omni-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/target/release" "$ctx/deploy"
for b in omni-gateway omni-api; do
  if [ ! -x "$bins/$b" ]; then
    echo "$bins/$b is missing: run cargo build --release -p omni-gateway -p omni-api first" >&2
    exit 1
  fi
  ln "$bins/$b" "$ctx/target/release/$b" 2>/dev/null || cp "$bins/$b" "$ctx/target/release/$b"
done
cp "$file" "$ctx/Dockerfile"
cp deploy/omni-gateway.service "$ctx/deploy/"

DOCKER_BUILDKIT=1 "$cli" build --progress plain --network host --build-arg BINARIES=prebuilt -t "$tag" "$ctx"
