"""Helpers shared by the test modules (import them: ``from tests.support import ...``).

- loopback ports and addresses: :func:`free_ports`, :func:`free_port`, :func:`addresses`;
- "poll with a deadline": :func:`wait_for` (every module binds its own default timeout,
  polling interval and message format, see the ``functools.partial`` at the top of each);
- a Redis database of our own: :func:`claim_redis_db` (``SET <claim key> NX`` on an empty
  database; every module passes its own claim key);
- in-process Celery workers: :func:`isolated_celery_state`;
- in-process clusters on loopback: :func:`the_leader`, :func:`hand_over`, :func:`stop_all`;
- child processes: :func:`die_with_parent`.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_cluster import TransferError

if TYPE_CHECKING:
    from celery_cluster import Cluster

HOST = "127.0.0.1"


# -- ports and addresses on loopback -------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on ``HOST`` (all bound at once, then let go)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def addresses(n: int) -> list[str]:
    """``n`` distinct ``host:port`` addresses on ``HOST``, free when this returned."""
    return [f"{HOST}:{p}" for p in free_ports(n)]


# -- poll with a deadline ----------------------------------------------------------------------


def wait_for(pred: Callable[[], Any], what: Any = "", *, timeout: float, interval: float,
             timeout_format: str) -> Any:
    """Call ``pred`` every ``interval`` seconds until it returns something truthy (returned);
    fail (AssertionError naming ``what``, or ``pred``) once ``timeout`` seconds have passed.
    ``timeout_format`` shows the timeout in that message (``"{:.1f}s"``, ``"{} s"`` ...)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_format.format(timeout)} waiting for {what or pred}")
        time.sleep(interval)  # polling interval, not synchronisation


# -- a Redis database of our own ---------------------------------------------------------------


class RedisDB:
    """A Redis database of our own: ``url`` for the broker, ``client`` to look inside."""

    def __init__(self, db: int, client: Any, run_id: str) -> None:
        self.db, self.client, self.run_id = db, client, run_id
        self.url = f"redis://{HOST}:6379/{db}"

    def llen(self, queue: str) -> int:
        return int(self.client.llen(queue))


@contextmanager
def claim_redis_db(claim_key: str, candidates: range = range(15, 0, -1)) -> Iterator[RedisDB]:
    """An empty database on the local Redis, claimed with ``SET claim_key NX`` and ours until
    the end (then flushed), so concurrent test runs never share or flush each other's."""
    import redis

    run_id = uuid.uuid4().hex
    for db in candidates:
        client = redis.Redis(host=HOST, port=6379, db=db, socket_timeout=5)
        try:
            claimed = client.dbsize() == 0 and client.set(claim_key, run_id, nx=True)
            if claimed and client.dbsize() != 1:  # someone else raced us into this database
                client.delete(claim_key)
                claimed = False
        except redis.exceptions.ConnectionError as exc:
            client.close()
            pytest.fail(f"these tests need Redis at {HOST}:6379 (CI starts one): {exc}")
        if not claimed:
            client.close()
            continue
        try:
            yield RedisDB(db, client, run_id)
        finally:
            if client.get(claim_key) == run_id.encode():
                client.flushdb()
            client.close()
        return
    pytest.fail("no empty Redis database left on 127.0.0.1:6379 for this test")


# -- in-process Celery workers -----------------------------------------------------------------


@contextmanager
def isolated_celery_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No CELERY_CLUSTER_* from outside, and none of the ones the step exports leaks out."""
    from celery import _state as celery_state

    from celery_cluster import leader_state

    saved = {k: v for k, v in os.environ.items() if k.startswith("CELERY_CLUSTER_")}
    for key in saved:
        del os.environ[key]
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(leader_state, "_shared", None)
    # start_worker makes the test's app the default and current app: put the previous ones back
    default_app, current_app = celery_state.default_app, getattr(celery_state._tls, "current_app", None)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("CELERY_CLUSTER_")]:
            del os.environ[key]
        os.environ.update(saved)
        celery_state.set_default_app(default_app)
        celery_state._set_current_app(current_app)


# -- in-process clusters on loopback -----------------------------------------------------------


def the_leader(cls: list[Cluster], judges: list[Cluster] | None = None) -> Cluster | None:
    """The one leader among ``cls`` that every one of ``judges`` (default: all of ``cls``)
    agrees on, or None."""
    leaders = [cl for cl in cls if cl.is_leader()]
    if len(leaders) != 1:
        return None
    leader = leaders[0]
    if all(cl.status()["leader_id"] == leader.id for cl in (cls if judges is None else judges)):
        return leader
    return None


def hand_over(cl: Cluster, to: str) -> str:
    """``cl.stepdown(to=to)`` once ``to`` counts as reachable: right after an election the
    leader may not have had its first heartbeat answer from every follower yet."""
    def attempt() -> str | None:
        try:
            return cl.stepdown(to=to)
        except TransferError as exc:
            if "not a reachable peer" not in str(exc):
                raise
            return None

    return wait_for(attempt, f"{to} to be reachable from {cl.id}", timeout=2.0, interval=0.005,
                    timeout_format="{} s")


def stop_all(cls: list[Cluster]) -> None:
    """Stop clusters concurrently (each server's shutdown waits for its poll interval)."""
    stoppers = [threading.Thread(target=cl.stop, kwargs={"transfer": False, "timeout": 0.2}) for cl in cls]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(10)


# -- child processes ---------------------------------------------------------------------------


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn``: PDEATHSIG=SIGKILL, so if pytest itself dies, no child outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- /cluster/metrics -------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str, accept: str | None = None, context: Any = None) -> tuple[str, Samples]:
    """(content type, {(sample name, labels): value}) of a node's /cluster/metrics (over TLS
    with ``context``, an ``ssl.SSLContext``)."""
    host, _, port = address.rpartition(":")
    if context is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=2,
                                                                       context=context)
    else:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2)
    try:
        conn.request("GET", "/cluster/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        content_type = resp.getheader("Content-Type") or ""
    finally:
        conn.close()
    samples: Samples = {}
    if "openmetrics" in content_type:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
        families = list(om_families(body))
    else:
        families = list(text_string_to_metric_families(body))
    for family in families:
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
