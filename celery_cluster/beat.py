"""Beat on the leader only, with its schedule state replicated through the cluster.

One :class:`LeaderBeat` per term of leadership (a stopped service cannot be
restarted - see shared notes): a thread in the worker process that runs the
configured scheduler class, made replicated by :func:`replicated_scheduler`.

For every firing, :meth:`ReplicatedSchedulerMixin.apply_entry`

1. records the entry's new ``last_run_at``/``total_run_count`` in the cluster
   payload and waits until a majority holds it (sent at once, not at the next
   heartbeat);
2. re-checks the lease (``is_leader(now)``) right before publishing;
3. publishes with headers ``cluster_term`` (the fencing token) and
   ``cluster_run`` (the entry's replicated run count: a duplicate firing would
   repeat a number, a skipped one would leave a gap).

A new leader seeds its scheduler from the payload, which holds every committed
firing (Raft's up-to-date rule), so no due time fires twice across a failover
and none is skipped; an overdue entry fires once, late, as after a restart.
The one window: a leader that loses leadership (or dies) after step 1 commits
but before step 3 publishes loses that run - the new leader sees it as done.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.beat import PersistentScheduler, Scheduler
from celery.utils.imports import symbol_by_name

if TYPE_CHECKING:
    from .cluster import Cluster
    from .node import Leadership

log = logging.getLogger("celery_cluster.beat")

PAYLOAD_FORMAT = 1


def encode_schedule(schedule: dict[str, Any]) -> str:
    entries = {
        name: {"last_run_at": e.last_run_at.isoformat() if e.last_run_at else None,
               "total_run_count": e.total_run_count}
        for name, e in schedule.items()
    }
    return json.dumps({"format": PAYLOAD_FORMAT, "beat": entries}, sort_keys=True, separators=(",", ":"))


def decode_schedule(payload: str) -> dict[str, tuple[datetime.datetime | None, int]]:
    """Replicated entry state from a payload ('' means nothing replicated yet)."""
    if not payload:
        return {}
    data = json.loads(payload)
    if not isinstance(data, dict) or data.get("format") != PAYLOAD_FORMAT:
        raise ValueError(f"unknown replicated beat state format: {str(data)[:80]}")
    out = {}
    for name, e in data.get("beat", {}).items():
        when = datetime.datetime.fromisoformat(e["last_run_at"]) if e.get("last_run_at") else None
        out[name] = (when, int(e.get("total_run_count", 0)))
    return out


class ReplicatedSchedulerMixin:
    """Mixed into the configured scheduler class; see the module docstring."""

    cluster_beat: LeaderBeat

    def setup_schedule(self) -> None:
        super().setup_schedule()  # type: ignore[misc]
        _, payload = self.cluster_beat.cluster.payload
        for name, (last_run_at, count) in decode_schedule(payload).items():
            entry = self.schedule.get(name)  # type: ignore[attr-defined]
            if entry is not None:
                if last_run_at is not None:
                    entry.last_run_at = last_run_at
                entry.total_run_count = count
        self._heap = None  # rebuild from the seeded times

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        beat = self.cluster_beat
        if not beat.record_firing(self.schedule):  # type: ignore[attr-defined]
            return
        # The run number is replicated with the firing: unique across failovers,
        # so consumers can spot a duplicate (same number twice) or a gap.
        run = self.schedule[entry.name].total_run_count  # type: ignore[attr-defined]
        options = dict(entry.options)
        options["headers"] = {**options.get("headers", {}), "cluster_term": beat.leadership.term,
                              "cluster_run": run}
        entry = copy.copy(entry)
        entry.options = options
        if not beat.leadership.is_valid():  # the lease, re-checked right before publishing
            log.warning("[cluster] beat: lease lost before sending %s; not sent", entry.name)
            return
        super().apply_entry(entry, producer=producer)  # type: ignore[misc]


def replicated_scheduler(app: Celery, beat: LeaderBeat, scheduler: str | type | None = None) -> type:
    cls = symbol_by_name(scheduler or app.conf.beat_scheduler)
    if cls is PersistentScheduler:
        cls = Scheduler  # the replicated payload replaces the local shelve file
    return type(f"Replicated{cls.__name__}", (ReplicatedSchedulerMixin, cls), {"cluster_beat": beat})


class LeaderBeat:
    """The beat scheduler for one term of leadership, in a thread of the worker."""

    def __init__(self, app: Celery, cluster: Cluster, leadership: Leadership, *,
                 scheduler: str | type | None = None, commit_timeout: float | None = None) -> None:
        self.app = app
        self.cluster = cluster
        self.leadership = leadership
        self.scheduler_cls = replicated_scheduler(app, self, scheduler)
        self.max_interval = float(app.conf.beat_max_loop_interval or 5.0)
        self.commit_timeout = commit_timeout or cluster.timing.election_timeout[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"celery-cluster-beat-{leadership.term}",
                                        daemon=True)
        self.fired = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def record_firing(self, schedule: dict[str, Any]) -> bool:
        """Replicate the schedule's state to a majority; False if leadership went first."""
        try:
            version = self.cluster.propose(encode_schedule(schedule))
        except Exception as exc:  # noqa: BLE001 - NotLeader: we lost it between tick and now
            log.warning("[cluster] beat: cannot record firing: %s", exc)
            return False
        while self.leadership.is_valid() and not self._stop.is_set():
            if self.cluster.wait_committed(version, self.commit_timeout):
                self.fired += 1
                return True
        log.warning("[cluster] beat: leadership lost before a majority recorded the firing; not sent")
        return False

    def _run(self) -> None:
        self.app.set_current()
        scheduler = self.scheduler_cls(app=self.app, max_interval=self.max_interval, lazy=False)
        log.info("[cluster] beat started in term %s (%s)", self.leadership.term, self.scheduler_cls.__mro__[2].__name__)
        try:
            while not self._stop.is_set() and self.leadership.is_valid():
                interval = scheduler.tick()
                deadline = time.monotonic() + min(interval or 0.0, self.max_interval)
                # Wake for shutdown and for step-down alike (checked every 0.1 s at most).
                while not self._stop.is_set() and not self.leadership.lost.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stop.wait(min(left, 0.1))
        except Exception:  # noqa: BLE001 - never let a scheduler error go unnoticed
            log.exception("[cluster] beat stopped by an error")
        finally:
            try:
                scheduler.close()
            except Exception:  # noqa: BLE001
                log.exception("[cluster] beat: error closing the scheduler")
            log.info("[cluster] beat stopped (term %s)", self.leadership.term)
