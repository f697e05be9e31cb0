"""The peer client's per-peer queue, on its own (no sockets)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from celery_cluster import Cluster, http_client
from celery_cluster.http_client import _Peer
from celery_cluster.messages import AppendEntries, TimeoutNow
from tests.support import addresses, stop_all, the_leader, wait_for

LEADER = "127.0.0.1:1"


def ae(round_: int, version: tuple[int, int], payload: str | None = None) -> AppendEntries:
    return AppendEntries(1, LEADER, round_, version, payload)


def test_a_newer_heartbeat_replaces_a_queued_one() -> None:
    peer = _Peer("127.0.0.1:2")
    peer.enqueue(ae(1, (1, 1)))
    peer.enqueue(ae(2, (1, 1)))
    assert list(peer.queue) == [ae(2, (1, 1))]


def test_a_replaced_heartbeat_hands_its_payload_on_when_the_version_is_the_same() -> None:
    """The leader sends a peer that lacks the payload one AppendEntries carrying it, and then
    heartbeats without it. If the carrier is still queued when the next heartbeat replaces
    it, the payload must move to the replacement - or the peer never gets it this round."""
    peer = _Peer("127.0.0.1:2")
    peer.enqueue(ae(1, (1, 2), payload="beat-state"))
    peer.enqueue(ae(2, (1, 2)))
    assert list(peer.queue) == [ae(2, (1, 2), payload="beat-state")]


def test_a_newer_version_does_not_inherit_an_older_payload() -> None:
    peer = _Peer("127.0.0.1:2")
    peer.enqueue(ae(1, (1, 2), payload="old"))
    peer.enqueue(ae(2, (1, 3)))
    assert list(peer.queue) == [ae(2, (1, 3))]


def test_other_messages_are_never_replaced() -> None:
    peer = _Peer("127.0.0.1:2")
    peer.enqueue(TimeoutNow(1, LEADER, (1, 1)))
    peer.enqueue(ae(1, (1, 1)))
    peer.enqueue(ae(2, (1, 1)))
    assert list(peer.queue) == [TimeoutNow(1, LEADER, (1, 1)), ae(2, (1, 1))]


def test_a_peer_name_that_takes_seconds_to_resolve_never_stalls_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found running the compose demo: with the leader's container killed, its name took
    seconds to resolve (Docker's DNS forwards it upstream), and the lookup ran on the one I/O
    thread - no vote reached the live peer, no new leader for 30 s. Lookups now run aside."""
    real = http_client._resolve
    lookups: list[str] = []

    def slow(sockaddr: tuple[str, int]) -> tuple[int, tuple[str, int]]:
        lookups.append(sockaddr[0])
        if sockaddr[0] == "gone.invalid":
            time.sleep(3.0)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(sockaddr)

    monkeypatch.setattr(http_client, "_resolve", slow)
    a, b = addresses(2)
    b_name = "localhost:" + b.rpartition(":")[2]  # a name, resolved off the I/O thread too
    nodes = [a, b_name, "gone.invalid:1"]
    cls = [Cluster(nodes, listen=a, state_dir=tmp_path / "a", election_timeout=(0.3, 0.6), heartbeat_interval=0.05),
           Cluster(nodes, listen=b, advertise=b_name, state_dir=tmp_path / "b", election_timeout=(0.3, 0.6),
                   heartbeat_interval=0.05)]
    try:
        for cl in cls:
            cl.start()
        started = time.monotonic()
        leader = wait_for(lambda: the_leader(cls), "a leader of the two live nodes", timeout=2.5, interval=0.01,
                          timeout_format="{} s")
        elected = time.monotonic() - started
        # Heartbeats flow to the live peer while lookups of the dead one hang for 3 s each.
        wait_for(lambda: next(p for p in leader.status()["nodes"] if p["address"] != "gone.invalid:1")
                 ["heartbeat_rtt"]["samples"] >= 20, "20 heartbeats to the live peer", timeout=2.5, interval=0.01,
                 timeout_format="{} s")
        assert elected < 2.5 and "gone.invalid" in lookups
        errors = leader.client.peer_stats()["gone.invalid:1"].errors.snapshot()
        assert errors.get(("timeout",), 0) >= 1  # requests to it time out while its name resolves
    finally:
        stop_all(cls)
