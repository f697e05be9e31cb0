"""@leader_only / LeaderOnlyTask / routing, in one process (the real-worker tests cover the rest)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import Ignore, Reject

from celery_cluster import LeaderOnlyTask, fencing_token, install, leader_only, leader_state
from celery_cluster.clock import lease_clock
from celery_cluster.leader_tasks import LeaderQueueRouter, is_leader_only


@pytest.fixture
def app() -> Celery:
    app = Celery("t", broker="memory://", set_as_current=False)
    install(app)
    return app


def test_install_keeps_the_app_picklable_for_spawned_children(app: Celery) -> None:
    # Regression: a router holding the app made the pickle recursive and lost conf changes.
    app.conf.include = ("proj.tasks",)
    copy = pickle.loads(pickle.dumps(app))
    assert copy.conf.include == ("proj.tasks",)
    assert any(isinstance(r, LeaderQueueRouter) for r in copy.conf.task_routes)


def test_leader_only_tasks_route_to_the_leader_queue_and_others_do_not(app: Celery,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELERY_CLUSTER_LEADER_QUEUE", raising=False)

    @app.task
    @leader_only
    def a() -> None: ...

    @app.task(base=LeaderOnlyTask)
    def b() -> None: ...

    @app.task
    def c() -> None: ...

    app.finalize()
    route = app.amqp.router.route  # (options, name, args, kwargs, task_type), as send_task calls it
    assert route({}, a.name, (), {}, a)["queue"].name == "celery_cluster.leader"
    assert route({}, b.name, (), {}, b)["queue"].name == "celery_cluster.leader"
    assert route({}, c.name, (), {}, c)["queue"].name == "celery"
    assert is_leader_only(a) and a.acks_late and a.reject_on_worker_lost
    assert b.acks_late and not is_leader_only(c)
    app.conf.cluster_leader_queue = "only-the-leader"
    assert route({}, a.name, (), {}, a)["queue"].name == "only-the-leader"


@pytest.fixture
def shared_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> leader_state.LeaderState:
    state = leader_state.LeaderState(tmp_path / "leader.mmap", create=True)
    monkeypatch.setattr(leader_state, "_shared", state)
    return state


def test_body_runs_with_the_fencing_token_only_while_the_lease_holds(
        app: Celery, shared_state: leader_state.LeaderState) -> None:
    @app.task
    @leader_only
    def work(x: int) -> tuple[int, int | None]:
        return x, fencing_token()

    shared_state.publish(4, lease_clock() + 30)
    assert work.run(1) == (1, 4)
    shared_state.publish(4, lease_clock() - 0.01)  # lease over: the body must not run
    with pytest.raises((Reject, Ignore)):
        work.run(2)


def test_a_message_prefetched_from_the_leader_queue_is_requeued(
        app: Celery, shared_state: leader_state.LeaderState) -> None:
    ran = []

    @app.task(bind=True, base=LeaderOnlyTask)
    def prefetched(self) -> None:
        ran.append(1)

    prefetched.push_request(id="x", delivery_info={"routing_key": "celery_cluster.leader"}, args=(), kwargs={})
    try:
        with pytest.raises(Reject) as info:
            prefetched()
    finally:
        prefetched.pop_request()
    assert info.value.requeue and not ran
