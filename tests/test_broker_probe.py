"""broker_probe.py on its own, against the local Redis and loopback sockets (no mocks): the
verdicts, their bound, the consumer's connection, and a stop that never waits."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_cluster.broker_probe import BrokerProbe
from tests.support import HOST, claim_redis_db, free_port

CLAIM_KEY = "celery-cluster-tests:broker-probe"
TIMEOUT = 0.3


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claim_redis_db(CLAIM_KEY) as db:
        yield db.url


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A listener that accepts connections and never answers a byte: a broker behind a path
    that holds everything (what a silent network drop looks like to the client)."""
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"redis://{HOST}:{srv.getsockname()[1]}/0"
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


def probe_for(url: str, **kw: object) -> BrokerProbe:
    app = Celery("p", broker=url, set_as_current=False)
    return BrokerProbe(app, "celery-cluster-leader", lambda ok: None, timeout=TIMEOUT, **kw)  # type: ignore[arg-type]


def test_a_broker_that_answers_is_healthy(redis_url: str) -> None:
    probe = probe_for(redis_url)
    try:
        assert probe.check() and probe.check()  # the leader queue need not exist: any answer counts
        assert probe.last_error is None
    finally:
        probe.stop()


def test_a_refused_connection_is_unhealthy_at_once() -> None:
    probe = probe_for(f"redis://{HOST}:{free_port()}/0")
    t = time.monotonic()
    try:
        assert not probe.check()
    finally:
        probe.stop()
    assert time.monotonic() - t <= TIMEOUT + 0.2
    assert probe.last_error


def test_a_silent_broker_is_unhealthy_within_the_timeout_and_stop_never_waits(silent_broker: str) -> None:
    probe = probe_for(silent_broker)
    t = time.monotonic()
    assert not probe.check()
    took = time.monotonic() - t
    assert TIMEOUT - 0.05 <= took <= TIMEOUT + 0.2, took
    assert "no answer" in (probe.last_error or "")
    t = time.monotonic()
    probe.stop()  # a question is still in flight on a connection that will never answer
    assert time.monotonic() - t < 0.1


def test_the_workers_consumer_counts_once_it_has_connected(redis_url: str) -> None:
    connected = [False]
    probe = probe_for(redis_url, consumer_ok=lambda: connected[0])
    try:
        assert probe.check()  # start-up: the consumer has not connected yet - not an outage
        connected[0] = True
        assert probe.check()
        connected[0] = False  # it lost its connection and reconnects
        assert not probe.check()
        assert "consumer" in (probe.last_error or "")
        assert probe.answers  # the broker itself answers: the leader's beat may publish
        connected[0] = True
        assert probe.check()
    finally:
        probe.stop()
