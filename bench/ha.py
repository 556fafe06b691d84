#!/usr/bin/env python3
"""High-availability benchmark: gateways on a PostgreSQL run by Patroni.

Runs the HA test kit's measurements (tests/tests/ha_patroni.rs,
`bench_failovers_and_write_throughput`, ignored by `make test`): etcd and two
Patroni nodes from deploy/ha/ on loopback, two gateways with the multi-host
DATABASE_URL behind nginx (deploy/ha/nginx.conf), then
  failover     FAILOVERS times a `kill -9` of the primary's postmaster under
               three writers of preferences through nginx: the write
               unavailability the writers saw (first failed to first
               acknowledged write, their own timestamps), beside Patroni's
               promotion (the kill to the promoted node's PostgreSQL logging
               `database system is ready to accept connections`), and what
               the gateway adds (that log line to the first acknowledged
               write; target ≤ 1 s). Every acknowledged write is checked
               against the new primary's rows.
  throughput   first, preference writes (POST /api/v1/preferences, CLIENTS
               threads) through the cluster's two gateways (half the threads
               on each) beside one gateway on its embedded PostgreSQL, in
               interleaved rounds; and 3 s through the two gateways again
               after the failovers.

Usage: bench/ha.py [FAILOVERS] [ROUNDS] [SECONDS]   (defaults 10 3 10;
writes the "High availability (Patroni)" section of BENCHMARKS.md and its
figures into BENCHMARKS.json). The gateways are the workspace's debug build
(`cargo build --workspace`), as the test kit runs them.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_json, write_section  # noqa: E402

FAILOVERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 10
CLIENTS = 8
COMMAND = "python3 bench/ha.py" + "".join(f" {a}" for a in sys.argv[1:])
TEST = "ha_patroni::bench_failovers_and_write_throughput"


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main():
    load_start = loadavg()
    print(f"load average at start: {load_start}", flush=True)
    subprocess.run(["cargo", "build", "--quiet", "--workspace"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory(prefix="ha-bench-") as scratch:
        out = Path(scratch) / "ha.json"
        env = dict(os.environ, HA_BENCH_OUT=str(out), HA_BENCH_FAILOVERS=str(FAILOVERS), HA_BENCH_ROUNDS=str(ROUNDS),
                   HA_BENCH_SECONDS=str(SECONDS), HA_BENCH_CLIENTS=str(CLIENTS))
        subprocess.run(["cargo", "nextest", "run", "-p", "omni-tests", "--test", "e2e", "--run-ignored", "only",
                        "--no-capture", "-E", f"test(={TEST})"], cwd=ROOT, env=env, check=True)
        doc = json.loads(out.read_text())
    load_end = loadavg()
    print(f"load average at end: {load_end}", flush=True)

    events = doc["failovers"]
    med = lambda key: statistics.median(e[key] for e in events)  # noqa: E731
    unavailable, promotion, adds = med("unavailable_s"), med("patroni_promotion_s"), med("gateway_adds_s")
    worst_adds = max(e["gateway_adds_s"] for e in events)
    lost = sum(e["lost"] for e in events)
    acknowledged = sum(e["acknowledged"] for e in events)
    sides = {}
    for s in doc["throughput"]:
        sides.setdefault(s["side"], []).append(s["writes_per_s"])
    ha_rate = statistics.median(sides["patroni_two_gateways"])
    embedded_rate = statistics.median(sides["embedded_one_gateway"])
    ratio = ha_rate / embedded_rate
    after = doc["after_failovers"]
    refusal = f", first refusal: {after['first_refusal']}" if after["first_refusal"] else ", none refused"

    rows = "\n".join(
        f"| {e['failover']} | {e['promoted']} | {e['patroni_promotion_s']:.2f} | {e['unavailable_s']:.2f} | {e['gateway_adds_s']:+.2f} | {e['acknowledged']} | {e['refused']} | {e['lost']} |"
        for e in events)
    rounds = "\n".join(
        f"| {i + 1} | {a:.0f} | {b:.0f} |" for i, (a, b) in enumerate(zip(sides["patroni_two_gateways"], sides["embedded_one_gateway"])))
    body = f"""`{COMMAND}` (`make bench`): etcd and two Patroni nodes of PostgreSQL 15 from `deploy/ha/` on loopback
(`synchronous_mode: true`), two gateways (debug build) with the multi-host `DATABASE_URL` behind nginx
(`deploy/ha/nginx.conf`), three writers of preferences through nginx; {len(events)} × `kill -9` of the primary's postmaster.
*Patroni* is the kill to the promoted node's PostgreSQL logging `database system is ready to accept connections`
(its own log); *unavailable* is the writers' first failed to first acknowledged write (their own timestamps);
*gateway adds* is that log line to the first acknowledged write (target ≤ 1 s; it includes the write's own round trip).
Load average {load_start} at the start, {load_end} at the end (2 cores shared with other builds and tests).

| failover | promoted | Patroni (s) | unavailable (s) | gateway adds (s) | acknowledged | refused (503) | lost |
|---|---|---|---|---|---|---|---|
{rows}

Medians: Patroni's promotion **{promotion:.2f} s**, write unavailability **{unavailable:.2f} s**, the gateway adds
**{adds:.2f} s** (worst {worst_adds:.2f} s); {acknowledged} writes acknowledged, **{lost} lost**.

Preference writes (`POST /api/v1/preferences`, {doc['clients']} client threads, {doc['seconds']:.0f} s a round, rounds interleaved):
two gateways on the Patroni cluster (half the threads on each; every commit waits for the synchronous standby)
beside one gateway on its embedded PostgreSQL.

| round | two gateways on Patroni (writes/s) | one gateway, embedded PostgreSQL (writes/s) |
|---|---|---|
{rounds}

Medians: {ha_rate:.0f} beside {embedded_rate:.0f} writes/s, ratio **{ratio:.2f}** (measured before the failovers; after
them, {after['writes_per_s']:.0f} writes/s through the two gateways for 3 s{refusal})."""
    print(body)
    write_section("High availability (Patroni)", body)
    write_json(COMMAND, [
        ("ha.failover.patroni_promotion.p50", round(promotion, 2), "s"),
        ("ha.failover.write_unavailability.p50", round(unavailable, 2), "s"),
        ("ha.failover.gateway_adds.p50", round(adds, 2), "s"),
        ("ha.failover.gateway_adds.max", round(worst_adds, 2), "s"),
        ("ha.failover.acknowledged_writes_lost", lost, "writes"),
        ("ha.failover.count", len(events), "failovers"),
        ("ha.prefs_writes.patroni_two_gateways", round(ha_rate), "req/s"),
        ("ha.prefs_writes.embedded_one_gateway", round(embedded_rate), "req/s"),
        ("ha.prefs_writes.patroni_over_embedded", round(ratio, 3), "ratio"),
    ])


if __name__ == "__main__":
    main()
