"""``GET /cluster/metrics``: scraped over real HTTP on loopback and parsed with
``prometheus_client``'s own parser, on in-process clusters and on the ``celery-cluster
node`` CLI. (The worker's beat and leader-only task metrics are checked against what the
workers really did in ``tests/test_celery_workers.py``.)"""

from __future__ import annotations

import http.client
import math
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_cluster import Cluster
from tests import support
from tests.support import addresses, free_ports, scrape, stop_all, the_leader, total, value

FAST: dict[str, Any] = {"election_timeout": (0.3, 0.6), "heartbeat_interval": 0.05}
wait_for = partial(support.wait_for, timeout=10.0, interval=0.01, timeout_format="{} s")

@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(nodes: list[str], me: str, **kw: Any) -> Cluster:
        cl = Cluster(nodes, listen=me, state_dir=tmp_path / me.replace(":", "_"), **{**FAST, **kw})
        made.append(cl)
        return cl

    yield make
    stop_all(made)


def test_three_nodes_report_one_leader_elections_rtts_and_stepdowns(clusters: Any) -> None:
    nodes = addresses(3)
    cls = [clusters(nodes, me) for me in nodes]
    for cl in cls:
        cl.start()
    leader = wait_for(lambda: the_leader(cls), "one agreed leader")
    # Heartbeats flow: the leader's round trips to both peers are in its histogram.
    wait_for(lambda: all(total(scrape(leader.id)[1], "celery_cluster_peer_heartbeat_rtt_seconds_count",
                               peer=p) >= 5 for p in nodes if p != leader.id), "heartbeat round trips")

    scraped = {cl.id: scrape(cl.id) for cl in cls}
    for address, (content_type, m) in scraped.items():
        assert content_type.startswith("text/plain")
        is_leader = address == leader.id
        assert value(m, "celery_cluster_is_leader") == (1 if is_leader else 0)
        assert value(m, "celery_cluster_role", role="leader") == (1 if is_leader else 0)
        assert value(m, "celery_cluster_role", role="follower") == (0 if is_leader else 1)
        assert value(m, "celery_cluster_leader", leader=leader.id) == 1
        assert value(m, "celery_cluster_term") == leader.status()["term"]
        assert value(m, "celery_cluster_node_info", node=address, clock=leader.status()["clock"]) == 1
        assert value(m, "celery_cluster_leader_changes_total") >= 1
        assert value(m, "celery_cluster_failed") == 0
        # Every node saved its term and vote at least once, each write timed.
        assert value(m, "celery_cluster_state_write_seconds_count") >= 1
        assert value(m, "celery_cluster_state_write_seconds_bucket", le="+Inf") == \
            value(m, "celery_cluster_state_write_seconds_count")
        for peer in nodes:
            if peer != address:
                # The leader hears every follower; a follower hears the leader (and the other
                # follower only if it campaigned: NaN, never heard, otherwise).
                contact = value(m, "celery_cluster_peer_last_contact_seconds", peer=peer)
                if is_leader or peer == leader.id:
                    assert 0 <= contact < 1.0
                else:
                    assert math.isnan(contact) or contact >= 0
        lease = value(m, "celery_cluster_lease_remaining_seconds")
        assert (0 < lease <= FAST["election_timeout"][0]) if is_leader else lease == 0
    won = sum(value(m, "celery_cluster_elections_won_total") for _, m in scraped.values())
    started = sum(value(m, "celery_cluster_elections_started_total") for _, m in scraped.values())
    assert won >= 1 and started >= won
    assert value(scraped[leader.id][1], "celery_cluster_elections_won_total") >= 1

    # A planned handover: counted as a step-down with its reason, and every node sees a new leader.
    before = {cl.id: value(scrape(cl.id)[1], "celery_cluster_leader_changes_total") for cl in cls}
    target = leader.stepdown()
    new = wait_for(lambda: (lambda l: l if l is not None and l.id == target else None)(the_leader(cls)),
                   "the target to lead")
    m = scrape(leader.id)[1]
    assert value(m, "celery_cluster_stepdowns_total", reason="transfer") == 1
    assert value(m, "celery_cluster_is_leader") == 0
    assert value(scrape(new.id)[1], "celery_cluster_is_leader") == 1
    wait_for(lambda: all(value(scrape(cl.id)[1], "celery_cluster_leader_changes_total") == before[cl.id] + 1
                         for cl in cls), "every node to count one leader change")


def test_a_dead_peer_and_a_wrong_secret_show_as_request_errors(clusters: Any) -> None:
    nodes = addresses(3)
    a = clusters(nodes, nodes[0], secret="right")
    b = clusters(nodes, nodes[1], secret="right")
    wrong = clusters(nodes, nodes[2], secret="wrong")  # its requests are refused: 401
    for cl in (a, b, wrong):
        cl.start()
    leader = wait_for(lambda: the_leader([a, b]), "a leader among the two that agree")
    wait_for(lambda: total(scrape(wrong.id)[1], "celery_cluster_peer_request_errors_total", kind="auth") >= 1,
             "the wrong-secret node to count refusals of its requests")
    _, m = scrape(wrong.id)
    assert value(m, "celery_cluster_is_leader") == 0
    # The majority's leader is refused by the odd one out too.
    wait_for(lambda: value(scrape(leader.id)[1], "celery_cluster_peer_request_errors_total",
                           peer=wrong.id, kind="auth") >= 1, "the leader to count the refusals")

    wrong.stop(transfer=False)  # now nothing listens there: connection refused
    wait_for(lambda: total(scrape(leader.id)[1], "celery_cluster_peer_request_errors_total",
                           peer=wrong.id, kind="refused") >= 1, "refused connections to the stopped node")


def test_openmetrics_when_the_scraper_asks(clusters: Any) -> None:
    me = addresses(1)[0]
    cl = clusters([me], me)
    cl.start()
    wait_for(cl.is_leader, "the single node to lead")
    content_type, m = scrape(me, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert value(m, "celery_cluster_is_leader") == 1
    assert value(m, "celery_cluster_elections_won_total") == 1


def test_a_mounted_blueprint_serves_metrics(tmp_path: Path) -> None:
    """Your own Flask app: the blueprint's /cluster/metrics reads the same registry."""
    from flask import Flask

    me = addresses(1)[0]
    cl = Cluster([me], advertise=me, state_dir=tmp_path, **FAST)
    app = Flask("mine")
    app.register_blueprint(cl.blueprint())
    cl.start()
    try:
        wait_for(cl.is_leader, "the single node to lead")
        resp = app.test_client().get("/cluster/metrics")
        assert resp.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(resp.get_data(as_text=True))}
        assert families["celery_cluster_is_leader"].samples[0].value == 1
        assert families["celery_cluster_elections_started"].type == "counter"
        assert families["celery_cluster_state_write_seconds"].type == "histogram"
    finally:
        cl.stop(transfer=False)


def test_the_standalone_cli_node_serves_metrics(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    me = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_cluster", "node", "--listen", me, "--nodes", me,
         "--state-dir", str(tmp_path), "--election-timeout", "0.3-0.6", "--heartbeat-interval", "0.05"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def leading() -> bool:
            try:
                return value(scrape(me)[1], "celery_cluster_is_leader") == 1
            except (OSError, http.client.HTTPException):
                return False

        wait_for(leading, "the CLI node to lead and serve metrics")
        m = scrape(me)[1]
        assert value(m, "celery_cluster_elections_won_total") == 1
        assert not math.isnan(value(m, "celery_cluster_lease_remaining_seconds"))
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
