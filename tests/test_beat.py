"""beat.py on its own: seeding from the replicated payload, commit before publish, lease re-check.

A unit test of one module, so the cluster is a stub; the real-worker tests in
test_celery_workers.py cover the same path end to end.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.beat import PersistentScheduler, ScheduleEntry, Scheduler

from celery_cluster.beat import (
    MAX_BATCH,
    LeaderBeat,
    decode_payload,
    decode_schedule,
    encode_schedule,
    replicated_scheduler,
)
from celery_cluster.config import Timing


class RecordingScheduler(Scheduler):
    """A user's own beat_scheduler: records what would be published."""

    sent: list[tuple[str, dict[str, Any]]] = []

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kw: Any) -> None:
        RecordingScheduler.sent.append((entry.name, dict(entry.options.get("headers", {}))))


class StubCluster:
    def __init__(self, payload: str = "") -> None:
        self.payload = ((1, 1), payload)
        self.timing = Timing((0.2, 0.4), 0.05)
        self.proposals: list[str] = []
        self.commits = True
        self.broker_healthy = True

    def propose(self, text: str) -> tuple[int, int]:
        self.proposals.append(text)
        return (3, len(self.proposals))

    def wait_committed(self, version: tuple[int, int], timeout: float) -> bool:
        return self.commits


class StubLeadership:
    def __init__(self, term: int = 3) -> None:
        self.term = term
        self.lost = threading.Event()
        self.valid = True
        self.handing_over = False
        self.acted = 0

    def is_valid(self) -> bool:
        return self.valid

    @contextlib.contextmanager
    def acting(self) -> Iterator[bool]:
        ok = self.valid and not self.handing_over
        self.acted += ok
        yield ok


@pytest.fixture
def app() -> Celery:
    RecordingScheduler.sent = []
    app = Celery("b", set_as_current=False)
    app.conf.beat_schedule = {"every-second": {"task": "b.tick", "schedule": 1.0}}
    app.conf.beat_scheduler = f"{__name__}:RecordingScheduler"
    return app


def make(app: Celery, cluster: StubCluster, lead: StubLeadership) -> Any:
    beat = LeaderBeat(app, cluster, lead)  # type: ignore[arg-type]
    return beat, beat.scheduler_cls(app=app, max_interval=1, lazy=False)


def test_the_replicated_state_round_trips(app: Celery) -> None:
    when = app.now()
    assert decode_schedule(encode_schedule({"e": (when, 9), "never": (None, 0)})) == {"e": (when, 9),
                                                                                     "never": (None, 0)}
    assert decode_schedule("") == {}
    # The term that fired each entry rides along (the status page shows it), where known.
    assert decode_payload(encode_schedule({"e": (when, 9), "never": (None, 0)}, {"e": 4})) == \
        ({"e": (when, 9), "never": (None, 0)}, {"e": 4})
    with pytest.raises(ValueError):
        decode_schedule('{"format": 99}')


def test_the_configured_scheduler_class_is_used_and_the_shelve_one_replaced(app: Celery) -> None:
    beat, scheduler = make(app, StubCluster(), StubLeadership())
    assert isinstance(scheduler, RecordingScheduler)
    assert replicated_scheduler(app, beat, PersistentScheduler).__mro__[2] is Scheduler
    app.conf.beat_max_loop_interval = 7
    assert LeaderBeat(app, StubCluster(), StubLeadership()).max_interval == 7  # type: ignore[arg-type]


def test_a_new_leader_seeds_its_schedule_and_fires_an_overdue_entry_once(app: Celery) -> None:
    ten_ago = app.now() - datetime.timedelta(seconds=10)
    payload = encode_schedule({"every-second": (ten_ago, 41)})
    cluster = StubCluster(payload)
    _, scheduler = make(app, cluster, StubLeadership(term=3))
    entry = scheduler.schedule["every-second"]
    assert (entry.last_run_at, entry.total_run_count) == (ten_ago, 41)
    scheduler.tick()
    assert RecordingScheduler.sent == [("every-second", {"cluster_term": 3, "cluster_run": 42})]
    # The firing was replicated before it was sent, with the run it got.
    (state,) = [decode_schedule(p) for p in cluster.proposals]
    assert state["every-second"][1] == 42
    scheduler.tick()  # not due again for a second: the overdue entry fired once
    assert len(RecordingScheduler.sent) == 1


def test_nothing_is_sent_that_a_majority_did_not_record(app: Celery) -> None:
    cluster, lead = StubCluster(), StubLeadership()
    _, scheduler = make(app, cluster, lead)
    scheduler.schedule["every-second"].last_run_at = app.now() - datetime.timedelta(seconds=5)
    scheduler._heap = None
    cluster.commits = False

    def lose_while_waiting(version: tuple[int, int], timeout: float) -> bool:
        lead.valid = False  # leadership went while waiting for the commit
        return False

    cluster.wait_committed = lose_while_waiting  # type: ignore[method-assign]
    scheduler.tick()
    assert cluster.proposals and RecordingScheduler.sent == []


def test_a_handover_under_way_leaves_the_due_run_unrecorded_for_the_successor(app: Celery) -> None:
    """Planned handover: once it has begun, beat records nothing (the successor fires the
    run), rather than recording a firing that nobody would publish."""
    cluster, lead = StubCluster(), StubLeadership()
    _, scheduler = make(app, cluster, lead)
    scheduler.schedule["every-second"].last_run_at = app.now() - datetime.timedelta(seconds=5)
    scheduler._heap = None
    lead.handing_over = True
    scheduler.tick()
    assert cluster.proposals == [] and RecordingScheduler.sent == []
    lead.handing_over = False
    scheduler._heap = None
    scheduler.tick()
    assert len(cluster.proposals) == 1 and len(RecordingScheduler.sent) == 1


def test_runs_due_while_the_broker_does_not_answer_are_not_recorded_and_stay_due(app: Celery) -> None:
    """Beat never records a firing it could not publish: while the probe says the broker is
    down, nothing is proposed or sent; the run stays due and fires once when it answers."""
    cluster, lead = StubCluster(), StubLeadership()
    beat, scheduler = make(app, cluster, lead)
    scheduler.schedule["every-second"].last_run_at = app.now() - datetime.timedelta(seconds=5)
    scheduler._heap = None
    cluster.broker_healthy = False
    scheduler.tick()
    scheduler.tick()
    assert cluster.proposals == [] and RecordingScheduler.sent == []
    assert beat.counts.snapshot()[("held_broker_down",)] == 2
    cluster.broker_healthy = True
    scheduler.tick()
    assert len(cluster.proposals) == 1 and len(RecordingScheduler.sent) == 1
    scheduler.tick()
    assert len(RecordingScheduler.sent) == 1  # once


class FailingScheduler(RecordingScheduler):
    """A scheduler whose tick() raises for a while (a database down, say)."""

    failures = 0

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if FailingScheduler.failures:
            FailingScheduler.failures -= 1
            raise RuntimeError("database is down")
        return super().tick(*args, **kwargs)


def test_beat_is_supervised_restarted_with_backoff_and_reports_its_state(
        app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    FailingScheduler.failures = 2
    waits: list[float] = []
    beat = LeaderBeat(app, StubCluster(), StubLeadership(), scheduler=FailingScheduler)  # type: ignore[arg-type]
    states: list[str] = []

    def fast_wait(seconds: float) -> None:  # the back-off, recorded instead of slept
        waits.append(seconds)
        states.append(beat.state)

    monkeypatch.setattr(beat, "_wait", fast_wait)
    beat.RESTART_BACKOFF = (1.0, 30.0)
    beat.start()
    deadline = threading.Event()
    for _ in range(500):  # poll with a deadline (5 s)
        if beat.state == "running" and beat.restarts == 2:
            break
        deadline.wait(0.01)
    beat.stop()
    assert states[:2] == ["failing: RuntimeError: database is down"] * 2
    assert waits[:2] == [1.0, 2.0]  # doubling back-off
    assert beat.restarts == 2 and beat.last_error == "RuntimeError: database is down"
    assert beat.last_error_at is not None
    assert beat.status()["beat_state"] == "stopped"


def test_nothing_is_sent_when_the_lease_ends_between_commit_and_publish(app: Celery) -> None:
    cluster, lead = StubCluster(), StubLeadership()
    _, scheduler = make(app, cluster, lead)
    scheduler.schedule["every-second"].last_run_at = app.now() - datetime.timedelta(seconds=5)
    scheduler._heap = None
    original = cluster.wait_committed

    def commit_then_lose(version: tuple[int, int], timeout: float) -> bool:
        lead.valid = False  # the lease ends right after the commit is confirmed
        return original(version, timeout)

    cluster.wait_committed = commit_then_lose  # type: ignore[method-assign]
    scheduler.tick()
    assert cluster.proposals and RecordingScheduler.sent == []


class ModelLikeEntry(ScheduleEntry):
    """An entry class with its own constructor (as django-celery-beat's ModelEntry(model, app)):
    copy.copy() of it raises TypeError, so beat must never copy entries."""

    def __init__(self, model: dict[str, Any], app: Any = None) -> None:
        super().__init__(name=model["name"], task=model["task"], schedule=model["schedule"], app=app,
                         last_run_at=model.get("last_run_at"), total_run_count=model.get("count", 0))

    def _next_instance(self, last_run_at: Any = None, only_update_last_run_at: bool = False) -> ModelLikeEntry:
        return ModelLikeEntry({"name": self.name, "task": self.task, "schedule": self.schedule,
                               "last_run_at": self.default_now(), "count": self.total_run_count + 1}, self.app)

    __next__ = next = _next_instance

    def __reduce__(self) -> Any:
        raise TypeError("a model entry is not picklable")


class ModelScheduler(RecordingScheduler):
    Entry = ModelLikeEntry

    def setup_schedule(self) -> None:
        self.data = {"model": ModelLikeEntry({"name": "model", "task": "b.tick", "schedule": 1.0,
                                              "last_run_at": self.app.now() - datetime.timedelta(seconds=5)},
                                             self.app)}


def test_an_entry_class_with_its_own_constructor_is_fired_without_being_copied(app: Celery) -> None:
    import copy

    with pytest.raises(TypeError):
        copy.copy(ModelLikeEntry({"name": "x", "task": "t", "schedule": 1.0}))
    cluster, lead = StubCluster(), StubLeadership(term=7)
    beat = LeaderBeat(app, cluster, lead, scheduler=ModelScheduler)  # type: ignore[arg-type]
    scheduler = beat.scheduler_cls(app=app, max_interval=1, lazy=False)
    scheduler.tick()
    assert RecordingScheduler.sent == [("model", {"cluster_term": 7, "cluster_run": 1})]
    assert scheduler.schedule["model"].options.get("headers", {}).get("cluster_term") is None  # not left behind


def test_everything_due_at_once_is_recorded_in_one_update_then_published(app: Celery) -> None:
    """A thousand entries due together: a replicated update per MAX_BATCH (not a thousand),
    then every one published once with its own run number."""
    long_ago = app.now() - datetime.timedelta(seconds=60)
    app.conf.beat_schedule = {f"e{i}": {"task": "b.tick", "schedule": 5.0} for i in range(1000)}
    cluster, lead = StubCluster(), StubLeadership()
    _, scheduler = make(app, cluster, lead)
    for entry in scheduler.schedule.values():
        entry.last_run_at = long_ago
    scheduler._heap = None
    ticks = 0
    while scheduler.tick() == 0 and ticks < 100:  # as LeaderBeat's loop: again at once while 0
        ticks += 1
    assert len(cluster.proposals) == 1000 // MAX_BATCH
    state = decode_schedule(cluster.proposals[-1])
    assert len(state) == 1000 and {count for _, count in state.values()} == {1}
    assert sorted(name for name, _ in RecordingScheduler.sent) == sorted(f"e{i}" for i in range(1000))
    assert {headers["cluster_run"] for _, headers in RecordingScheduler.sent} == {1}
    assert scheduler.tick() > 0 and len(cluster.proposals) == 1000 // MAX_BATCH  # nothing due any more


def test_a_round_that_cannot_be_recorded_leaves_every_entry_due(app: Celery) -> None:
    long_ago = app.now() - datetime.timedelta(seconds=60)
    app.conf.beat_schedule = {f"e{i}": {"task": "b.tick", "schedule": 5.0} for i in range(3)}
    cluster, lead = StubCluster(), StubLeadership()
    _, scheduler = make(app, cluster, lead)
    for entry in scheduler.schedule.values():
        entry.last_run_at = long_ago
    scheduler._heap = None
    lead.handing_over = True
    scheduler.tick()
    assert cluster.proposals == [] and RecordingScheduler.sent == []
    assert all(e.last_run_at == long_ago and e.total_run_count == 0 for e in scheduler.schedule.values())
    lead.handing_over = False
    scheduler.tick()
    assert len(cluster.proposals) == 1 and len(RecordingScheduler.sent) == 3


class BrokerDownScheduler(RecordingScheduler):
    """Publishes fail with ``error`` while it is set (as a publish to an unreachable broker)."""

    error: BaseException | None = None

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kw: Any) -> None:
        if BrokerDownScheduler.error is not None:
            raise BrokerDownScheduler.error
        super().apply_async(entry, producer, advance, **kw)


@pytest.fixture
def broker_down(app: Celery) -> Iterator[Celery]:
    app.conf.beat_scheduler = f"{__name__}:BrokerDownScheduler"
    BrokerDownScheduler.error = ConnectionRefusedError(111, "Connection refused")
    yield app
    BrokerDownScheduler.error = None


def overdue(app: Celery, scheduler: Any, seconds: float = 5, count: int = 7) -> None:
    entry = scheduler.schedule["every-second"]
    entry.last_run_at, entry.total_run_count = app.now() - datetime.timedelta(seconds=seconds), count
    scheduler._heap = None


def test_a_run_the_broker_did_not_take_is_taken_back_and_sent_once_it_does(broker_down: Celery) -> None:
    """Beat never keeps a firing it could not publish: recorded, the publish fails on a broker
    error, the record is taken back (a second update, back to the run before) and the run stays
    due; held while the broker just failed; then sent once, with the run number it had."""
    app = broker_down
    cluster, lead = StubCluster(), StubLeadership()
    beat, scheduler = make(app, cluster, lead)
    overdue(app, scheduler)
    scheduler.tick()
    assert [decode_schedule(p)["every-second"][1] for p in cluster.proposals] == [8, 7]
    assert RecordingScheduler.sent == []
    counts = beat.counts.snapshot()
    assert counts[("publish_failed",)] == 1 and counts[("unsent_taken_back",)] == 1
    assert scheduler.schedule["every-second"].total_run_count == 7  # due again
    scheduler.tick()  # the broker failed just now: held, nothing recorded
    assert len(cluster.proposals) == 2 and beat.counts.snapshot()[("held_broker_down",)] == 1
    BrokerDownScheduler.error = None
    beat._broker_failed_at = None  # the retry pause is over
    scheduler.tick()
    assert RecordingScheduler.sent == [("every-second", {"cluster_term": 3, "cluster_run": 8})]
    assert decode_schedule(cluster.proposals[-1])["every-second"][1] == 8
    scheduler.tick()
    assert len(RecordingScheduler.sent) == 1  # once


def test_a_publish_failing_for_another_reason_is_not_taken_back(broker_down: Celery) -> None:
    """Arguments that do not serialize fail on any member: the firing stays recorded (as under
    stock beat, which logs it and moves on) instead of being retried for ever."""
    BrokerDownScheduler.error = TypeError("Object of type set is not JSON serializable")
    cluster, lead = StubCluster(), StubLeadership()
    beat, scheduler = make(broker_down, cluster, lead)
    overdue(broker_down, scheduler)
    scheduler.tick()
    assert [decode_schedule(p)["every-second"][1] for p in cluster.proposals] == [8]
    assert ("unsent_taken_back",) not in beat.counts.snapshot()
    assert not beat.broker_failed_recently()


def test_a_run_that_cannot_be_taken_back_is_counted_lost(broker_down: Celery) -> None:
    """The take-back needs a majority too: leadership lost before it commits, the run is lost
    (counted, logged) - the window the README names."""
    cluster, lead = StubCluster(), StubLeadership()
    beat, scheduler = make(broker_down, cluster, lead)
    overdue(broker_down, scheduler)
    commits = 0

    def firing_commits_then_leadership_ends(version: tuple[int, int], timeout: float) -> bool:
        nonlocal commits
        commits += 1
        if commits == 1:
            return True  # the firing is recorded
        lead.valid = False  # the take-back never gets a majority: leadership ends meanwhile
        return False

    cluster.wait_committed = firing_commits_then_leadership_ends  # type: ignore[method-assign]
    scheduler.tick()
    assert commits == 2
    assert beat.counts.snapshot()[("lost_unsent",)] == 1
    assert RecordingScheduler.sent == []


def test_a_failed_publish_tells_the_node_when_leadership_follows_the_broker(broker_down: Celery) -> None:
    reports: list[bool] = []
    cluster, lead = StubCluster(), StubLeadership()
    cluster.node = type("Node", (), {"set_broker_health": lambda self, ok: reports.append(ok)})()  # type: ignore[attr-defined]
    beat = LeaderBeat(broker_down, cluster, lead, follow_broker=True)  # type: ignore[arg-type]
    scheduler = beat.scheduler_cls(app=broker_down, max_interval=1, lazy=False)
    overdue(broker_down, scheduler)
    scheduler.tick()
    assert reports == [False]
