"""``GET /cluster/metrics``: the node's state and counters in Prometheus text format.

A collector reads the node, its peer client and their counters (``celery_cluster.stats``)
at scrape time and hands metric families to ``prometheus_client``, which writes the
exposition. Each :class:`~celery_cluster.Cluster` has a registry of its own, so several
nodes in one process (tests, a user's app) never share or clash in the global registry.
The Celery step adds beat and leader-only task metrics through ``extras``.

Every name starts with ``celery_cluster_``; see the README's "Metrics" table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from .election import Role
from .http_client import PeerClient
from .node import Node
from .stats import Counters, HistogramSnapshot

Extras = Callable[[], Iterable[Metric]]

PREFIX = "celery_cluster_"


def counter(name: str, doc: str, counts: Counters | dict[tuple[str, ...], int], labels: tuple[str, ...] = (),
            fixed: dict[str, str] | None = None) -> CounterMetricFamily:
    """A counter family from a :class:`Counters` (or its snapshot); ``fixed`` labels go first."""
    fixed = fixed or {}
    family = CounterMetricFamily(PREFIX + name, doc, labels=[*fixed, *labels])
    snapshot = counts.snapshot() if isinstance(counts, Counters) else counts
    if not labels and not snapshot:
        snapshot = {(): 0}  # an unlabelled counter is always there, from 0
    for key, value in sorted(snapshot.items()):
        family.add_metric([*fixed.values(), *key], value)
    return family


def gauge(name: str, doc: str, value: float | None = None, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    if labels:
        return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    return GaugeMetricFamily(PREFIX + name, doc, value=math.nan if value is None else value)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    buckets = [("+Inf" if math.isinf(bound) else repr(bound), count) for bound, count in snap.buckets]
    family.add_metric(labels, buckets, snap.sum)


class ClusterCollector:
    """Reads one node (and its peer client) at every scrape."""

    def __init__(self, node: Node, client: PeerClient | None, extras: Callable[[], Extras | None]) -> None:
        self.node = node
        self.client = client
        self._extras = extras

    def collect(self) -> Iterator[Metric]:
        node = self.node
        status = node.status()
        info = GaugeMetricFamily(PREFIX + "node_info", "This node: its address and the clock its leases use.",
                                 labels=["node", "clock"])
        info.add_metric([node.id, str(status["clock"])], 1)
        yield info
        role = gauge("role", "1 for the role this node is in, 0 for the others.", labels=("role",))
        for r in Role:
            role.add_metric([r.value], 1 if status["state"] == r.value else 0)
        yield role
        yield gauge("term", "The current term.", status["term"])
        yield gauge("is_leader", "1 while this node holds a valid leader lease.", 1 if status["is_leader"] else 0)
        yield gauge("lease_remaining_seconds", "Seconds left on this node's leader lease (0 unless leading).",
                    status["lease_remaining_ms"] / 1000)
        leader = GaugeMetricFamily(PREFIX + "leader", "1 labelled with the leader this node knows of (none: "
                                   "no series).", labels=["leader"])
        if status["leader_id"] is not None:
            leader.add_metric([status["leader_id"]], 1)
        yield leader
        yield gauge("failed", "1 if this node fail-stopped because its state could not be made durable.",
                    1 if status["failure"] else 0)
        yield gauge("broker_healthy", "1 while this node's broker answers (as its probe last saw; always 1 "
                    "without one, e.g. a standalone node).", 1 if status["broker_healthy"] else 0)
        members = gauge("members", "1 for each voting member in this node's configuration.", labels=("member",))
        for m in status["members"]:
            members.add_metric([m], 1)
        yield members
        stats = node.stats
        yield counter("elections_started", "Elections this node started (terms it campaigned in).",
                      stats.elections_started)
        yield counter("elections_won", "Elections this node won.", stats.elections_won)
        yield counter("leader_changes", "Times this node saw a different leader than before.", stats.leader_changes)
        yield counter("stepdowns", "Leaderships this node gave up, by reason.", stats.stepdowns, ("reason",))
        writes = HistogramMetricFamily(PREFIX + "state_write_seconds", "Time to make the state file durable "
                                       "(write, fsync, rename).", labels=[])
        _add_histogram(writes, [], stats.state_writes.snapshot())
        yield writes
        yield counter("state_write_failures", "State writes that failed (each makes the node fail-stop).",
                      stats.state_write_failures)

        contact = gauge("peer_last_contact_seconds", "Seconds since this node last heard each peer (NaN: never).",
                        labels=("peer",))
        for peer in status["nodes"]:
            ms = peer["last_contact_ms"]
            contact.add_metric([peer["address"]], math.nan if ms is None else ms / 1000)
        yield contact
        if self.client is not None:
            peer_stats = self.client.peer_stats()
            rtt = HistogramMetricFamily(PREFIX + "peer_heartbeat_rtt_seconds",
                                        "Round trip of heartbeats this node sent as leader, per peer.",
                                        labels=["peer"])
            errors = CounterMetricFamily(PREFIX + "peer_request_errors", "Requests to a peer that failed, by "
                                         "kind: timeout, refused, connection, tls, auth, http, malformed.",
                                         labels=["peer", "kind"])
            for address, ps in sorted(peer_stats.items()):
                _add_histogram(rtt, [address], ps.rtt.snapshot())
                for (kind,), value in sorted(ps.errors.snapshot().items()):
                    errors.add_metric([address, kind], value)
            yield rtt
            yield errors
        extras = self._extras()
        if extras is not None:
            yield from extras()


def make_registry(node: Node, client: PeerClient | None, extras: Callable[[], Extras | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(node, client, extras))
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition and its content type: Prometheus text format, or OpenMetrics when the
    scraper's ``Accept`` header asks for it (as Prometheus does)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


__all__ = ["ClusterCollector", "make_registry", "render", "counter", "gauge", "PREFIX"]
