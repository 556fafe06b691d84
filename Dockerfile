# Omni in one container. omni-gateway is PID 1: it reaps zombies, forwards
# signals, runs the embedded PostgreSQL as the unprivileged user `postgres`
# (the gateway itself runs as root only to hand the data directory to that
# user) and the API worker, and serves everything on port 8882.
#
#   docker build -t omni .
#   docker run -d --name omni -p 8882:8882 -v omni-data:/var/lib/omni --stop-timeout 60 omni
#   docker exec omni omni-gateway doctor      # healthy: exit 0; else what would stop a start, and how to fix it
#
# Two ways to get the binaries (BuildKit builds only the stage it needs):
#   BINARIES=build (default)  compiled here in rust:1-bookworm, from the sources;
#   BINARIES=prebuilt         copied from target/release/ of the build context,
#                             for machines that cannot pull rust:1-bookworm:
#                             `make image` (deploy/build-image.sh) does that.
# No `# syntax=` line: BuildKit's built-in frontend reads this file, so
# nothing is fetched from Docker Hub but the base images.
#
# --stop-timeout 60: a graceful stop drains requests and shuts PostgreSQL down
# cleanly (up to 55 s with the default timeouts); Docker's default of 10 s would
# SIGKILL it midway (safe, but the next start runs crash recovery).
# External database instead of the embedded one: -e DATABASE_URL=postgres://…

ARG BINARIES=build

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p omni-gateway -p omni-api \
 && install -D -m 0755 -t /out target/release/omni-gateway target/release/omni-api

FROM scratch AS prebuilt
COPY target/release/omni-gateway target/release/omni-api /out/

FROM ${BINARIES} AS binaries

FROM debian:bookworm-slim
# PostgreSQL server binaries only: postgresql-common is told not to create a
# cluster, and nothing starts a service (the gateway runs postgres itself).
# The client tools (pg_dump, psql) come along and serve backups; procps gives
# `ps` to whoever needs to see what runs as whom.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-common; \
    sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends postgresql-15 procps; \
    rm -rf /var/lib/apt/lists/* /var/lib/postgresql/*; \
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres; \
    /usr/lib/postgresql/15/bin/postgres --version

# The two binaries are the whole install: omni-api carries the UI and the
# migrations built in.
COPY --from=binaries /out/omni-gateway /out/omni-api /usr/local/bin/

ENV OMNI_HOST=0.0.0.0 \
    OMNI_PORT=8882 \
    PGSERVE_BIN_DIR=/usr/lib/postgresql/15/bin \
    PGSERVE_USER=postgres \
    NO_COLOR=1

# Relative defaults resolve here: the cluster is /var/lib/omni/data/postgres,
# backups /var/lib/omni/data/backups. Keep this directory in a volume.
WORKDIR /var/lib/omni
VOLUME /var/lib/omni
EXPOSE 8882
STOPSIGNAL SIGTERM
# `omni-gateway healthcheck` GETs /health on OMNI_PORT: 200 only when
# PostgreSQL (or DATABASE_URL) and the worker are ready. No curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["omni-gateway", "healthcheck"]
# Exec form: the gateway is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["omni-gateway"]
CMD ["run"]
