"""A standalone node for the chaos suite: ``celery-cluster node`` plus leader work and a clock
the harness can jump.

    python -m tests.chaos.node --listen 127.0.0.1:P --advertise IP:P --nodes ... --state-dir D \\
        --secret-file F --records R --election-timeout 0.5-1.0 --heartbeat-interval 0.05

It builds the same :class:`~celery_cluster.Cluster` the CLI builds, with two test-only
additions: the lease clock is ``lease_clock() + offset``, where SIGUSR2 adds
``--jump`` seconds to the offset (a suspend as the node sees it), and a leader-work loop
that, every ``--act-every`` seconds while this node leads, records one action under
``Leadership.acting()`` after a lease check - exactly what leader work must do - with the
lease it read from its lease sink (as a pool process would). Transitions go to stdout as
JSON lines. Exit codes as the CLI's: 0 after SIGTERM, 3 when the state could not be saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from celery_cluster import Cluster, ClusterError
from celery_cluster.cli import EXIT_STATE_NOT_DURABLE, JsonTransitionFormatter
from celery_cluster.clock import lease_clock


class JumpClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return lease_clock() + self.offset


class LatestLease:
    """The lease sink: remembers the lease as the node publishes and revokes it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = (0, 0.0)

    def publish(self, term: int, lease_until: float) -> None:
        with self.lock:
            self.value = (term, lease_until)

    def revoke(self) -> None:
        with self.lock:
            self.value = (0, 0.0)

    def read(self) -> tuple[int, float]:
        with self.lock:
            return self.value


def record(path: str, **fields: object) -> None:
    line = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("--listen", "--advertise", "--state-dir", "--secret-file", "--records", "--name"):
        p.add_argument(name, required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--nodes")
    group.add_argument("--join")  # a replaced member: no configuration, asks to be added
    p.add_argument("--election-timeout", default="0.5-1.0")
    p.add_argument("--heartbeat-interval", type=float, default=0.05)
    p.add_argument("--jump", type=float, default=3.0)
    p.add_argument("--act-every", type=float, default=0.02)
    args = p.parse_args()

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonTransitionFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)

    clock, sink, stop = JumpClock(), LatestLease(), threading.Event()
    try:  # as `celery-cluster node` does: a state directory it cannot write refuses the start
        cluster = Cluster(args.nodes or [], join=args.join, listen=args.listen, advertise=args.advertise,
                          election_timeout=args.election_timeout, heartbeat_interval=args.heartbeat_interval,
                          state_dir=args.state_dir, secret_file=args.secret_file, lease_sink=sink, clock=clock,
                          on_failure=lambda exc: stop.set())
    except ClusterError as exc:
        print(f"celery-cluster: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    def jump(*_: object) -> None:
        clock.offset += args.jump
        logging.getLogger("chaos").info("clock jumped forward by %.1f s", args.jump)

    signal.signal(signal.SIGUSR2, jump)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    pid = os.getpid()
    while not stop.wait(args.act_every):
        lead = cluster.leadership()
        if lead is None:
            continue
        with lead.acting() as ok:
            if not ok or not lead.is_valid():
                continue
            before = lease_clock()  # taken before the lease is read (the checker orders by it)
            term, lease_until = sink.read()
            if term != lead.term:
                continue
            record(args.records, kind="action", node=args.name, pid=pid, term=term, boot=before,
                   lease_until=lease_until)
    cluster.stop(transfer=True, timeout=1.0)
    if cluster.failure is not None:
        print(f"celery-cluster: error: {cluster.failure}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STATE_NOT_DURABLE)
    sys.exit(0)


if __name__ == "__main__":
    main()
