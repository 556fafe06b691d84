# A machine with systemd as PID 1 and Omni installed the way the header of
# deploy/omni-gateway.service says, the unit file as shipped. The tests run it
# (tests/tests/ops_docker.rs) to check the unit under a real systemd:
#
#   deploy/build-image.sh -f deploy/systemd.Dockerfile -t omni-systemd
#   docker run -d --cap-add SYS_ADMIN --tmpfs /run --tmpfs /run/lock \
#     -v /sys/fs/cgroup:/sys/fs/cgroup:ro -v ./omni.env:/etc/omni/omni.env:ro omni-systemd
#
# Same base and PostgreSQL as the product image (Dockerfile).
FROM debian:bookworm-slim
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends postgresql-common; \
    sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends systemd systemd-sysv postgresql-15 procps; \
    rm -rf /var/lib/apt/lists/* /var/lib/postgresql/*; \
    # A container has no consoles to log in on, and no PostgreSQL service of its own.
    systemctl mask getty@tty1.service console-getty.service systemd-logind.service postgresql.service; \
    useradd --system --home-dir /var/lib/omni --shell /usr/sbin/nologin omni

# The install steps of deploy/omni-gateway.service's header.
COPY target/release/omni-gateway target/release/omni-api /usr/local/bin/
COPY deploy/omni-gateway.service /etc/systemd/system/omni-gateway.service
RUN systemctl enable omni-gateway.service

# systemd stops on SIGRTMIN+3 (what `docker stop` sends here).
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
