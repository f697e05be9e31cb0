"""The leader beat's publish is bounded, and a publish that failed never arrives later.

A publisher (``tests/chaos/publisher.py``) inside one network namespace, the broker inside
another (Redis: a redis-server there; RabbitMQ: the machine's, behind a relay there), silent
drops between them (``tests/chaos/netns.py``): packets vanish, TCP connections stay open.
With the path cut, a publish on the beat's bounded connection must fail within the bound;
after the path heals (TCP would retransmit what it held), the broker must still hold only
the message published before the cut.

Figures: ``pytest -rA tests/test_beat_publish.py`` (``MEASURE`` lines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from celery_cluster import beat_publish
from tests.chaos.netns import Topology
from tests.chaos.relay import REPO, rabbitmq_in, redis_in
from tests.test_celery_workers import measure

pytestmark = [pytest.mark.processes, pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")]

BOUND = 0.5  # the bound for a 0.5 s minimum election timeout (and the floor)


def test_the_bound_has_a_floor() -> None:
    assert beat_publish.publish_bound(1.0) == 1.0
    assert beat_publish.publish_bound(0.15) == beat_publish.MIN_BOUND


def test_broker_errors_are_told_from_other_failures() -> None:
    from celery.beat import SchedulingError

    try:
        try:
            raise TimeoutError("Timeout reading from socket")
        except TimeoutError as exc:
            raise SchedulingError("Couldn't apply scheduled task tick") from exc
    except SchedulingError as wrapped:
        assert beat_publish.is_broker_error(wrapped, None)
    try:
        try:
            raise TypeError("Object of type set is not JSON serializable")
        except TypeError:
            raise SchedulingError("Couldn't apply scheduled task tick")  # noqa: B904 - as Celery's reraise
    except SchedulingError as wrapped:
        assert not beat_publish.is_broker_error(wrapped, None)


class Publisher:
    def __init__(self, topo: Topology, host: int, url: str, queue: str) -> None:
        self.proc = topo.popen(host, [sys.executable, "-m", "tests.chaos.publisher", url, queue, str(BOUND)],
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self._read() == {"ready": True}

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the publisher exited with {self.proc.poll()}"
        return json.loads(line)

    def ask(self, cmd: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_publish_to_a_cut_off_broker_fails_within_the_bound_and_never_arrives(tmp_path: Path,
                                                                                broker: str) -> None:
    relay = None
    with Topology(2, drop="silent") as topo:
        try:
            if broker == "redis":
                url = redis_in(topo, 1, tmp_path)
            else:
                url, relay = rabbitmq_in(topo, 1, tmp_path)
            queue = f"cc-bound-{uuid.uuid4().hex[:8]}"
            deadline = time.monotonic() + 20
            while True:  # the broker may take a moment to listen
                try:
                    pub = Publisher(topo, 0, url, queue)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # polling interval: the broker is starting
            ok = pub.ask("publish")
            assert ok["ok"], ok
            topo.cut(0, 1)
            cut = pub.ask("publish")
            topo.heal()
            time.sleep(3.0)  # past TCP's retransmissions: what the cut held would arrive now
            count = pub.ask("count")["count"]
            if broker == "rabbitmq":
                pub.ask("count")  # (the queue is auto-deleted with the vhost's other test queues)
            measure(f"publish_to_cut_{broker}", bound_s=BOUND, seconds=round(cut["seconds"], 3), ok=cut["ok"],
                    error=cut["error"], healthy_publish_s=round(ok["seconds"], 4), messages_after_heal=count)
            assert not cut["ok"], "a publish to a broker behind a cut succeeded"
            assert cut["seconds"] <= BOUND + 0.1, f"the publish took {cut['seconds']:.3f} s (bound {BOUND} s)"
            assert count == 2, f"{count} messages: the warm-up and the first publish only, nothing late"
        finally:
            if relay is not None:
                relay.kill()
                relay.wait(5)
