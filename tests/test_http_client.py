"""The peer client's per-peer queue, on its own (no sockets)."""

from __future__ import annotations

from celery_cluster.http_client import _Peer
from celery_cluster.messages import AppendEntries, TimeoutNow

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
