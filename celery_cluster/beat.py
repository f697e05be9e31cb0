"""Beat on the leader only, with its schedule state replicated through the cluster.

One :class:`LeaderBeat` per term of leadership (a stopped service cannot be
restarted - see shared notes): a thread in the worker process that runs the
configured scheduler class, made replicated by :func:`replicated_scheduler`.

For the firings of every round - everything ``tick()`` finds due at once, see
:meth:`ReplicatedSchedulerMixin.tick` - the leader

1. records each entry's new ``last_run_at``/``total_run_count`` in the cluster
   payload, all in one update, and waits until a majority holds it (sent at
   once, not at the next heartbeat);
2. re-checks the lease (``is_leader(now)``) right before each publish;
3. publishes with headers ``cluster_term`` (the fencing token) and
   ``cluster_run`` (the entry's replicated run count: a duplicate firing would
   repeat a number, a skipped one would leave a gap), each publish bounded
   (:mod:`celery_cluster.beat_publish`: at most the minimum election timeout,
   and nothing of a failed publish reaches the broker later);
4. takes back what the broker did not take: a publish that failed on a broker
   error drops the connection, tells the node, and restores those entries'
   previous runs in a second replicated update - they stay due, for this
   leader once its broker answers or for the member it hands over to.

Steps 1-4 run as one piece of leader work (``Leadership.acting``): a planned
handover (stepdown, warm shutdown) waits for a firing in flight to be
published before it gives the lease away, so it neither loses that run nor
lets the successor repeat it.

A new leader seeds its scheduler from the payload, which holds every committed
firing (Raft's up-to-date rule), so no due time fires twice across a failover
and none is skipped; an overdue entry fires once, late, as after a restart.
The windows: a leader that *crashes* or loses its lease unplanned (pause,
partition) after step 1 commits but before step 3 publishes loses that run -
the new leader sees it as done; so does one whose take-back (step 4) cannot
reach a majority before its lease ends; and a publish the broker took but
whose reply was lost within the bound is taken back and sent again (the same
``cluster_run``: a consumer can tell). While the broker probe says the broker
does not answer, nothing is recorded at all (step 0): the runs stay due.

Beat is supervised: an exception anywhere in the scheduler (building it,
``tick()``, a scheduler of the user's) is logged, and the scheduler is built
anew after a back-off of 1 s, doubling up to 30 s, for as long as this term
lasts. :meth:`LeaderBeat.status` says ``running`` or ``failing: <error>``,
with the number of restarts and the last error; a leader whose beat is not
running fails ``GET /cluster/health``.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.beat import PersistentScheduler, Scheduler
from celery.signals import beat_init
from celery.utils.imports import symbol_by_name

from . import beat_publish
from .stats import Counters

if TYPE_CHECKING:
    from .cluster import Cluster
    from .node import Leadership

log = logging.getLogger("celery_cluster.beat")

PAYLOAD_FORMAT = 1
#: The most firings one replicated update records; a round with more due takes several. It
#: bounds the documented window: a leader that crashes between an update's commit and its
#: publishes loses the runs of that one update - at most this many.
MAX_BATCH = 100
#: Seconds between looks at the broker while its probe says it does not answer.
BROKER_RETRY = 0.5


#: name -> (last_run_at, total_run_count): what the cluster knows was fired, per entry.
ScheduleState = dict[str, tuple[datetime.datetime | None, int]]


def encode_schedule(state: ScheduleState, terms: dict[str, int] | None = None) -> str:
    """The payload. ``terms`` (name -> the term that fired it last) is optional: for the
    status page, and ignored by readers that predate it."""
    terms = terms or {}
    entries: dict[str, dict[str, Any]] = {}
    for name, (last_run_at, count) in state.items():
        entries[name] = {"last_run_at": last_run_at.isoformat() if last_run_at else None, "total_run_count": count}
        if name in terms:
            entries[name]["term"] = terms[name]
    return json.dumps({"format": PAYLOAD_FORMAT, "beat": entries}, sort_keys=True, separators=(",", ":"))


def decode_payload(payload: str) -> tuple[ScheduleState, dict[str, int]]:
    """Replicated entry state from a payload ('' means nothing replicated yet), and the term
    that last fired each entry where the payload says."""
    if not payload:
        return {}, {}
    data = json.loads(payload)
    if not isinstance(data, dict) or data.get("format") != PAYLOAD_FORMAT:
        raise ValueError(f"unknown replicated beat state format: {str(data)[:80]}")
    state: ScheduleState = {}
    terms: dict[str, int] = {}
    for name, e in data.get("beat", {}).items():
        when = datetime.datetime.fromisoformat(e["last_run_at"]) if e.get("last_run_at") else None
        state[name] = (when, int(e.get("total_run_count", 0)))
        if e.get("term") is not None:
            terms[name] = int(e["term"])
    return state, terms


def decode_schedule(payload: str) -> ScheduleState:
    """Replicated entry state from a payload ('' means nothing replicated yet)."""
    return decode_payload(payload)[0]


class ReplicatedSchedulerMixin:
    """Mixed into the configured scheduler class; see the module docstring.

    The scheduler's hooks it relies on: ``setup_schedule()``, the ``schedule`` mapping
    of name -> entry (each with ``name``, ``options``, ``last_run_at`` and
    ``total_run_count``), ``reserve()`` / ``apply_entry()`` as ``Scheduler.tick()``
    calls them. Entries are never copied, and what is replicated is kept here, not
    read back from the scheduler's entries: a scheduler may keep the reserved state
    elsewhere (django-celery-beat's ``reserve()`` advances the entry's database row,
    not the entry in its schedule).
    """

    cluster_beat: LeaderBeat
    _seeded: Any = None  # the schedule mapping the replicated state was last applied to
    _batch: list[tuple[Any, Any, Any]] | None = None  # (entry, reserved, producer) while tick() collects
    _broker_down_logged = False  # said once per outage
    _publish_error: BaseException | None = None  # what the last apply_async() raised

    @functools.cached_property
    def connection(self) -> Any:
        # Celery's Scheduler.close() pops and releases it under this name, as its own.
        return beat_publish.bounded_connection(self.app, self.cluster_beat.publish_bound)  # type: ignore[attr-defined]

    def _ensure_connected(self) -> Any:
        # Celery connects here, when the producer is first made - retrying for
        # broker_connection_max_retries (100) while the broker is away. The bounded
        # connection connects on the first publish instead, within the publish bound.
        return self.connection

    def _drop_connection(self) -> None:
        """After a broker failure: forget the producer and its connection without talking to the
        broker (a polite close could wait on it); the next publish connects afresh."""
        self.__dict__.pop("producer", None)
        conn = self.__dict__.pop("connection", None)
        if conn is not None:
            beat_publish.drop(conn)

    def close(self) -> None:
        if self.cluster_beat.broker_failed_recently():
            self._drop_connection()
        super().close()  # type: ignore[misc]

    def setup_schedule(self) -> None:
        self._state: ScheduleState
        self._terms: dict[str, int]
        self._state, self._terms = decode_payload(self.cluster_beat.cluster.payload[1])
        self._reserved: dict[str, Any] = {}
        super().setup_schedule()  # type: ignore[misc]
        self._seed(self.schedule)

    def reserve(self, entry: Any) -> Any:
        reserved = super().reserve(entry)  # type: ignore[misc]
        self._reserved[entry.name] = reserved  # what apply_entry() is about to fire
        return reserved

    @property
    def schedule(self) -> Any:
        # Schedulers that reload their entries from storage (django-celery-beat's
        # DatabaseScheduler, whenever the table changes) hand out a new mapping built
        # from what they stored - which may lag what this cluster has fired: apply the
        # replicated state to every new mapping before anyone reads it.
        schedule = super().schedule  # type: ignore[misc]
        if schedule is not self._seeded and self._seeded is not None:
            self._seed(schedule)
        return schedule

    @schedule.setter
    def schedule(self, value: Any) -> None:
        super(ReplicatedSchedulerMixin, type(self)).schedule.fset(self, value)  # type: ignore[misc]

    def _seed(self, schedule: Any) -> None:
        """Bring every entry up to the replicated state where that has seen more runs: the
        run count says which is newer (storage lags by its sync interval; a fresh entry
        from ``beat_schedule`` has none), and a tie keeps what storage says (an entry
        re-enabled in the admin starts its interval from then, as under stock beat)."""
        for name, (last_run_at, count) in self._state.items():
            entry = schedule.get(name)
            if entry is None or count <= (entry.total_run_count or 0):
                continue
            if last_run_at is not None:
                entry.last_run_at = last_run_at
            entry.total_run_count = count
            _sync_model(entry)
        self._seeded = schedule
        self._heap = None  # rebuild from the seeded times

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Celery's ``tick()`` sends one due entry per call and answers 0 while more are due:
        call it while it does, collecting what it fires (up to :data:`MAX_BATCH`), then
        record them in one replicated update and publish them - not one commit (and one
        copy of the whole state on every node's disk) per entry."""
        self._batch = []
        try:
            interval = super().tick(*args, **kwargs)  # type: ignore[misc]
            while interval == 0 and self._batch and len(self._batch) < MAX_BATCH:
                interval = super().tick(*args, **kwargs)  # type: ignore[misc]
        finally:
            batch, self._batch = self._batch, None
            if batch:
                self._fire(batch)
        return float(interval)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        reserved = self._reserved.pop(entry.name, None) or self.schedule[entry.name]
        if self._batch is not None:
            self._batch.append((entry, reserved, producer))
        else:  # called outside tick(), by a driver of its own
            self._fire([(entry, reserved, producer)])

    def _fire(self, batch: list[tuple[Any, Any, Any]]) -> None:
        """Record ``batch`` (entry, reserved entry, producer) in the replicated state, then
        publish each - under one piece of leader work a planned handover waits for."""
        beat = self.cluster_beat
        if not beat.broker_answers() or beat.broker_failed_recently():
            # The broker's probe says it does not answer: record nothing we could not send. The
            # runs stay due - for the member we hand over to after the grace, or for us once
            # the broker answers again (then they fire once, late, as after a restart).
            if not self._broker_down_logged:
                log.warning("[cluster] beat: the broker does not answer; %d due run(s) wait for it (or for the "
                            "member this one hands over to)", len(batch))
                self._broker_down_logged = True
            beat.counts.inc("held_broker_down", amount=len(batch))
            for entry, _, _ in reversed(batch):
                self._withdraw(entry)
            beat._wait(BROKER_RETRY)
            return
        self._broker_down_logged = False
        state, terms = dict(self._state), dict(self._terms)
        for entry, reserved, _ in batch:
            state[entry.name] = (reserved.last_run_at, reserved.total_run_count)
            terms[entry.name] = beat.leadership.term
        with beat.leadership.acting() as ok:
            if not ok or not beat.record_firing(state, terms):
                # Nothing recorded: the runs stay due - for the successor, or for us if
                # the handover does not happen after all.
                log.info("[cluster] beat: leadership ending; %d due run(s) left for the next leader", len(batch))
                beat.counts.inc("left_for_successor", amount=len(batch))
                for entry, _, _ in reversed(batch):  # the earliest reservation of an entry wins
                    self._withdraw(entry)
                return
            before = self._state, self._terms
            self._state, self._terms = state, terms
            unsent: list[Any] = []
            for i, (entry, reserved, producer) in enumerate(batch):
                if unsent:  # the broker failed this round: the rest wait with it
                    unsent.append(entry)
                    continue
                if not beat.leadership.is_valid():  # the lease, re-checked right before each publish
                    log.warning("[cluster] beat: lease lost before sending %d recorded run(s); not sent",
                                len(batch) - i)
                    beat.counts.inc("lost_to_lease", amount=len(batch) - i)
                    return
                # The run number is replicated with the firing: unique across failovers,
                # so consumers can spot a duplicate (same number twice) or a gap.
                exc = self._publish(entry, reserved.total_run_count, producer)
                if exc is not None and beat_publish.is_broker_error(exc, self.connection):
                    unsent.append(entry)
            if unsent:
                self._unrecord(unsent, *before)

    def _unrecord(self, unsent: list[Any], state: ScheduleState, terms: dict[str, int]) -> None:
        """The broker failed to take ``unsent`` (within the publish bound, and the connection
        is dropped, so none of it arrives later): take their firings back out of the
        replicated state - they are due again, for this leader once its broker answers or
        for the member it hands over to. Called as leader work, inside ``acting()``."""
        beat = self.cluster_beat
        self._drop_connection()
        beat.broker_failed()
        new_state, new_terms = dict(self._state), dict(self._terms)
        for entry in unsent:  # ``entry`` is the one tick() reserved from: the run before this one
            if entry.name in state:
                new_state[entry.name] = state[entry.name]
            else:
                new_state[entry.name] = (entry.last_run_at, entry.total_run_count)
            if entry.name in terms:
                new_terms[entry.name] = terms[entry.name]
            else:
                new_terms.pop(entry.name, None)
        if not beat.leadership.is_valid() or not beat.record_firing(new_state, new_terms):
            log.error("[cluster] beat: the broker did not take %d recorded run(s) and leadership ended before "
                      "they could be taken back: lost (%s)", len(unsent), ", ".join(e.name for e in unsent))
            beat.counts.inc("lost_unsent", amount=len(unsent))
            return
        self._state, self._terms = new_state, new_terms
        for entry in reversed(unsent):
            self._withdraw(entry)
        log.warning("[cluster] beat: the broker did not take %d run(s); taken back, they stay due (%s)",
                    len(unsent), ", ".join(e.name for e in unsent))
        beat.counts.inc("unsent_taken_back", amount=len(unsent))

    def _publish(self, entry: Any, run: int, producer: Any) -> BaseException | None:
        """Publish one firing, bounded (:mod:`celery_cluster.beat_publish`); what it raised."""
        # The headers ride on the entry's options for this one publish. The entry is not
        # copied: entry classes need not be copyable (django-celery-beat's ModelEntry
        # takes (model, app)), and nothing else uses this instance meanwhile.
        beat = self.cluster_beat
        options = entry.options
        entry.options = {**options, **beat_publish.publish_options(beat.publish_bound),
                         "headers": {**options.get("headers", {}),
                                     "cluster_term": beat.leadership.term, "cluster_run": run}}
        self._publish_error = None
        try:
            super().apply_entry(entry, producer=producer)  # type: ignore[misc]
        finally:
            entry.options = options
        return self._publish_error

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        # Counted here, not in apply_entry(): Celery's apply_entry logs and swallows a
        # failed publish, and schedulers may override apply_entry.
        counts = self.cluster_beat.counts
        try:
            result = super().apply_async(entry, producer, advance, **kwargs)  # type: ignore[misc]
        except Exception as exc:
            counts.inc("publish_failed")
            self._publish_error = exc
            raise
        counts.inc("published")
        return result

    def _withdraw(self, entry: Any) -> None:
        """Undo ``tick()``'s ``reserve()`` of ``entry``: it stays due. ``tick()`` has already
        pushed the reserved copy on the heap, so the heap is dropped and rebuilt from the
        schedule (there is no documented hook for a firing that did not happen)."""
        self.schedule[entry.name] = entry
        _sync_model(entry)  # ModelEntry's next() advanced the shared model row
        self._heap = None


def _sync_model(entry: Any) -> None:
    """django-celery-beat's ModelEntry keeps its state in ``entry.model`` too (which its
    ``next()`` advances and its scheduler's ``sync()`` saves): keep the two the same."""
    model = getattr(entry, "model", None)
    if model is not None and hasattr(model, "total_run_count"):
        model.last_run_at = entry.last_run_at
        model.total_run_count = entry.total_run_count


def replicated_scheduler(app: Celery, beat: LeaderBeat, scheduler: str | type | None = None) -> type:
    cls = symbol_by_name(scheduler or app.conf.beat_scheduler)
    if cls is PersistentScheduler:
        cls = Scheduler  # the replicated payload replaces the local shelve file
    return type(f"Replicated{cls.__name__}", (ReplicatedSchedulerMixin, cls), {"cluster_beat": beat})


class LeaderBeat:
    """The beat scheduler for one term of leadership, in a supervised thread of the worker."""

    #: Back-off before the scheduler is built again after an error (doubling up to the maximum).
    RESTART_BACKOFF = (1.0, 30.0)

    def __init__(self, app: Celery, cluster: Cluster, leadership: Leadership, *,
                 scheduler: str | type | None = None, commit_timeout: float | None = None,
                 counts: Counters | None = None, follow_broker: bool = False,
                 broker_answers: Callable[[], bool] | None = None) -> None:
        self.app = app
        #: Outcomes for metrics, by event: ``published``, ``publish_failed``, ``restart``,
        #: ``left_for_successor`` (due runs not recorded: the next leader sends them),
        #: ``lost_to_lease`` (recorded, then not sent: the lease ended in between),
        #: ``unsent_taken_back`` (the broker did not take them: unrecorded, due again),
        #: ``lost_unsent`` (that, but leadership ended before they could be taken back)
        #: and ``held_broker_down`` (due while the broker did not answer: not fired yet). The
        #: worker passes one Counters for all its terms, so they only grow.
        self.counts = counts if counts is not None else Counters()
        self.cluster = cluster
        self.leadership = leadership
        self.scheduler_cls = replicated_scheduler(app, self, scheduler)
        self.max_interval = float(app.conf.beat_max_loop_interval or 5.0)
        self.commit_timeout = commit_timeout or cluster.timing.election_timeout[0]
        #: No publish of this beat takes longer (seconds): see :mod:`celery_cluster.beat_publish`.
        self.publish_bound = beat_publish.publish_bound(cluster.timing.election_timeout[0])
        #: Whether a failed publish tells the node its broker is down (with the broker probe,
        #: which says when it answers again): leadership then follows the broker.
        self.follow_broker = follow_broker
        self._broker_failed_at: float | None = None  # time.monotonic() of the last failed publish
        #: Whether the broker answers publishes (the probe's verdict without the consumer's
        #: connection: beat publishes on its own connection; a consumer still reconnecting -
        #: RabbitMQ can hold the old one for a minute - must not stop the schedule).
        self.broker_answers = broker_answers or (lambda: cluster.broker_healthy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"celery-cluster-beat-{leadership.term}",
                                        daemon=True)
        #: ``running``, ``failing: <error>`` or ``stopped``.
        self.state = "starting"
        self.scheduler: Any = None  # the scheduler of the current (re)start
        self.restarts = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # time.time()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self.state == "running"

    def status(self) -> dict[str, Any]:
        return {"beat_state": self.state if self._thread.is_alive() else "stopped",
                "beat_restarts": self.restarts, "beat_last_error": self.last_error,
                "beat_last_error_at": self.last_error_at}

    def entries(self, limit: int = 200) -> tuple[list[dict[str, Any]], int]:
        """The schedule as this leader's beat sees it - name, task, schedule, last run, next
        run, run count and the term that fired it last - soonest first, at most ``limit``;
        and how many entries there are. Read from another thread (the status page): only
        a copy of the mapping and pure schedule arithmetic, never the scheduler's storage."""
        scheduler = self.scheduler
        mapping = getattr(scheduler, "_seeded", None)
        if mapping is None:
            return [], 0
        try:
            items = list(mapping.items())
        except RuntimeError:  # the mapping changed while copying: the next refresh shows it
            return [], 0
        terms = dict(getattr(scheduler, "_terms", {}))
        out = []
        for name, entry in items:
            try:
                last = entry.last_run_at
                now = entry.schedule.now()
                next_run = now + entry.schedule.remaining_estimate(last) if last is not None else None
            except Exception:  # noqa: BLE001 - a custom schedule without the arithmetic: show less
                next_run = None
            out.append({"name": name, "task": entry.task, "schedule": str(entry.schedule),
                        "last_run_at": last.isoformat() if last is not None else None,
                        "next_run_at": next_run.isoformat() if next_run is not None else None,
                        "total_run_count": entry.total_run_count, "term": terms.get(name)})
        out.sort(key=lambda e: (e["next_run_at"] is None, e["next_run_at"] or "", e["name"]))
        return out[:limit], len(out)

    def broker_failed(self) -> None:
        """A publish failed on a broker error: hold firings for :data:`BROKER_RETRY` (and, when
        following the broker, until the node's probe says it answers again)."""
        self._broker_failed_at = time.monotonic()
        if self.follow_broker:
            self.cluster.node.set_broker_health(False)

    def broker_failed_recently(self) -> bool:
        return self._broker_failed_at is not None and time.monotonic() - self._broker_failed_at < BROKER_RETRY

    def record_firing(self, state: ScheduleState, terms: dict[str, int] | None = None) -> bool:
        """Replicate the schedule's state to a majority; False if leadership went first."""
        try:
            version = self.cluster.propose(encode_schedule(state, terms))
        except Exception as exc:  # noqa: BLE001 - NotLeader: we lost it between tick and now
            log.warning("[cluster] beat: cannot record firing: %s", exc)
            return False
        while self.leadership.is_valid() and not self._stop.is_set():
            if self.cluster.wait_committed(version, self.commit_timeout):
                return True
        log.warning("[cluster] beat: leadership lost before a majority recorded the firing; not sent")
        return False

    def _leading(self) -> bool:
        return not self._stop.is_set() and self.leadership.is_valid()

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking for shutdown and for step-down (checked every 0.1 s)."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and not self.leadership.lost.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, 0.1))

    def _run(self) -> None:
        self.app.set_current()
        backoff = self.RESTART_BACKOFF[0]
        try:
            while self._leading():
                healthy_since = time.monotonic()
                try:
                    self._run_scheduler()
                    return  # leadership over or stopping
                except Exception as exc:  # supervised: log, back off, build it again
                    if time.monotonic() - healthy_since > self.RESTART_BACKOFF[1]:
                        backoff = self.RESTART_BACKOFF[0]  # it ran well for a while: start over
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.last_error_at = time.time()
                    self.state = f"failing: {self.last_error}"
                    log.exception("[cluster] beat failed in term %s (%s); restarting in %.0f s",
                                  self.leadership.term, self.last_error, backoff)
                    self._wait(backoff)
                    backoff = min(backoff * 2, self.RESTART_BACKOFF[1])
                    if self._leading():
                        self.restarts += 1
                        self.counts.inc("restart")
        finally:
            self.state = "stopped"
            log.info("[cluster] beat stopped (term %s)", self.leadership.term)

    def _run_scheduler(self) -> None:
        scheduler = self.scheduler = self.scheduler_cls(app=self.app, max_interval=self.max_interval, lazy=False)
        # As celery.beat.Service.start() does (receivers may use sender.app and
        # sender.scheduler); beat_embedded_init is not sent: this beat is a thread,
        # not a process (like `celery worker -B` in thread mode).
        beat_init.send(sender=self)
        try:
            log.info("[cluster] beat started in term %s (%s)", self.leadership.term,
                     self.scheduler_cls.__mro__[2].__name__)
            if self.last_error is None:
                self.state = "running"  # after a failure: only once a tick goes through
            while self._leading():
                interval = scheduler.tick()
                self.state = "running"  # a tick went through (after a restart: it recovered)
                self._wait(min(interval or 0.0, self.max_interval))
        finally:
            try:
                scheduler.close()
            except Exception:
                log.exception("[cluster] beat: error closing the scheduler")
