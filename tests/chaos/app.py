"""The Celery app of the chaos suite's worker mode (``celery -A tests.chaos.app worker``).

From the environment: ``CHAOS_BROKER`` (Redis in its own namespace, or RabbitMQ behind a
relay there), ``CHAOS_RECORDS``
(the action file), ``CHAOS_NODE`` (this worker's name), ``CHAOS_TRANSITIONS`` (this
incarnation's JSON transition log), ``CHAOS_PERIOD`` (the beat schedule, s).

What it records, from the executing process's view, each with the lease that process
read from the shared leader state right then (on the machine's clock):

* ``lead``: the body of the ``@leader_only`` task ``lead(i)``, in the pool child;
* ``beat``: a beat publish, in the leader's beat thread (``after_task_publish``), with the
  replicated run number.

Test-only: SIGUSR2 jumps the node's lease clock forward by ``CHAOS_JUMP`` seconds, and the
``leader_elected`` receiver takes 0.2 s (a slow user receiver).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

from celery import Celery, signals

from celery_cluster import fencing_token, install, leader_only, leader_state
from celery_cluster import signals as cluster_signals
from celery_cluster.clock import lease_clock
from celery_cluster.worker_step import ClusterStep

NODE = os.environ.get("CHAOS_NODE", "?")


def record(kind: str, **fields: Any) -> None:
    path = os.environ.get("CHAOS_RECORDS")
    if not path:
        return
    line = (json.dumps({"kind": kind, "node": NODE, "pid": os.getpid(), **fields}, separators=(",", ":"))
            + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _lease_of(term: int | None) -> float:
    """The end of the lease of ``term`` as this process reads the shared leader state right
    now; 0.0 if that lease is already gone (revoked after the check this work passed)."""
    state = leader_state.shared()
    seen, lease_until = state.read() if state is not None else (0, 0.0)
    return lease_until if term is not None and seen == term else 0.0


class JumpClock:
    offset = 0.0

    def __call__(self) -> float:
        return lease_clock() + JumpClock.offset


ClusterStep.clock = staticmethod(JumpClock())  # type: ignore[assignment]

BROKER = os.environ.get("CHAOS_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("chaos", broker=BROKER)
app.conf.update(
    task_default_queue="chaos",
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    # At-least-once within seconds on Redis (README): unacknowledged messages of a killed worker
    # come back after visibility_timeout, swept every second; and a worker killed while it held
    # the sweep's mutex blocks every sweep only until unacked_mutex_expire (default 300 s).
    broker_transport_options={"visibility_timeout": 10, "unacked_restore_interval": 1,
                              "unacked_restore_throttle": 1, "unacked_mutex_expire": 5}
    if BROKER.startswith("redis") else {},
    beat_schedule={"tick": {"task": "chaos.tick", "schedule": float(os.environ.get("CHAOS_PERIOD", "0.5"))}},
    beat_max_loop_interval=0.2,
)


@app.task(name="chaos.lead", bind=True)
@leader_only
def lead(self: Any, i: int) -> None:
    term = fencing_token()  # the term the lease check let this body run under
    before = lease_clock()  # taken before the lease is read (the checker orders by it)
    record("lead", i=i, term=term, lease_until=_lease_of(term), boot=before)
    time.sleep(0.02)


@app.task(name="chaos.tick")
def tick() -> None:
    pass


install(app)


@signals.after_task_publish.connect(weak=False)
def _beat_published(sender: Any = None, headers: dict | None = None, **kwargs: Any) -> None:
    if headers and "cluster_run" in headers:
        term = headers["cluster_term"]
        before = lease_clock()  # taken before the lease is read (the checker orders by it)
        record("beat", run=headers["cluster_run"], term=term, lease_until=_lease_of(term), boot=before)


@signals.task_prerun.connect(weak=False)
def _delivered(sender: Any = None, task_id: str | None = None, args: Any = None, **kwargs: Any) -> None:
    """Every delivery of ``lead`` to a pool process, before the leader check (for diagnosis)."""
    if getattr(sender, "name", None) == "chaos.lead":
        info = sender.request.delivery_info or {}
        record("delivery", i=(args or [None])[0], boot=lease_clock(), redelivered=info.get("redelivered"),
               routing_key=info.get("routing_key"))


@signals.task_postrun.connect(weak=False)
def _outcome(sender: Any = None, args: Any = None, state: str | None = None, **kwargs: Any) -> None:
    if getattr(sender, "name", None) == "chaos.lead":
        record("outcome", i=(args or [None])[0], boot=lease_clock(), state=state)


@cluster_signals.leader_elected.connect(weak=False)
def _slow_receiver(sender: Any = None, term: int | None = None, **kwargs: Any) -> None:
    time.sleep(0.2)


class _Transitions(logging.Handler):
    def emit(self, rec: logging.LogRecord) -> None:
        event = getattr(rec, "cluster_event", None)
        path = os.environ.get("CHAOS_TRANSITIONS")
        if event is not None and path:
            with open(path, "a") as f:
                f.write(json.dumps(event, separators=(",", ":")) + "\n")


@signals.celeryd_after_setup.connect(weak=False)
def _setup(**kwargs: Any) -> None:
    """In the worker's main process only (children never log transitions nor jump)."""
    logging.getLogger("celery_cluster").addHandler(_Transitions())
    jump = float(os.environ.get("CHAOS_JUMP", "3.0"))

    def on_jump(*_: Any) -> None:
        JumpClock.offset += jump

    signal.signal(signal.SIGUSR2, on_jump)
