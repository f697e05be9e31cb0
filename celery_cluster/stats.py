"""Counters and histograms the node driver and the peer client keep for metrics.

Plain Python, no dependency: ``celery_cluster.metrics`` turns a snapshot of these into
Prometheus metric families at scrape time. Updates happen on the threads that already
hold the relevant lock (the node's, or the peer client's I/O thread); a snapshot copies
under a small lock of its own so a scrape never sees a half-updated histogram.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass

#: Seconds. Loopback round trips are ~0.2 ms; a cross-host one a few ms; a timeout is at
#: most half the election timeout.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Seconds. An fsync'd write of the state file: tens of microseconds on tmpfs, ms on disks.
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    #: (upper bound, cumulative count), the last bound being +inf
    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


class Histogram:
    """Fixed-bucket histogram with Prometheus semantics (``le`` bounds, cumulative counts)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            running += n
            cumulative.append((bound, running))
        return HistogramSnapshot(tuple(cumulative), total, running)


class Counters:
    """Monotonic counters keyed by a label tuple (``()`` for an unlabelled one)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, ...]] = Counter()
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[labels] += amount

    def snapshot(self) -> dict[tuple[str, ...], int]:
        with self._lock:
            return dict(self._counts)


class NodeStats:
    """What a node counts: elections, leader changes, step-downs by reason, state writes."""

    def __init__(self) -> None:
        self.elections_started = Counters()
        self.elections_won = Counters()
        self.leader_changes = Counters()
        self.stepdowns = Counters()  # label: reason
        self.state_writes = Histogram(WRITE_BUCKETS)
        self.state_write_failures = Counters()


class PeerStats:
    """What the peer client counts per peer: heartbeat round trips and failed requests."""

    def __init__(self) -> None:
        self.rtt = Histogram(RTT_BUCKETS)
        self.errors = Counters()  # label: kind


__all__ = ["Histogram", "HistogramSnapshot", "Counters", "NodeStats", "PeerStats", "RTT_BUCKETS", "WRITE_BUCKETS"]
