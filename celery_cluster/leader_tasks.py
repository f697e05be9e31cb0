"""Tasks that run only on the leader: ``@leader_only``, ``LeaderOnlyTask``, ``fencing_token()``.

    @app.task
    @leader_only
    def rebuild_search_index(): ...

    # or, equivalently
    @app.task(base=LeaderOnlyTask)
    def rebuild_search_index(): ...

Contract:

* sending it from anywhere routes it to the leader queue (``install(app)``
  adds a router), which only the current leader consumes;
* the task is ``acks_late`` with ``reject_on_worker_lost``, and its body runs
  only after a lease check in the executing process (prefork children read the
  shared leader state); a non-leader that still receives one goes back to the
  leader queue, never lost and never run by a follower: prefetched from the
  leader queue before a step-down, it is rejected with requeue; routed
  elsewhere by hand, it is re-published to the leader queue (same task id)
  and this copy acknowledged;
* ``fencing_token()`` inside the body returns the term it runs under (for
  beat-sent tasks: the ``cluster_term`` header beat stamped on it).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from celery import Task, current_app, current_task
from celery.exceptions import Ignore, Reject

from . import leader_state, task_counts
from .settings import leader_queue

F = TypeVar("F", bound=Callable[..., Any])

MARK = "__celery_cluster_leader_only__"
_token: contextvars.ContextVar[int | None] = contextvars.ContextVar("celery_cluster_fencing_token", default=None)


class NotLeaderReject(Reject):
    """Raised (and requeued) when a leader-only task reaches a worker that is not the leader."""


def leader_queue_name(app: Any = None) -> str:
    """The leader queue: ``CELERY_CLUSTER_LEADER_QUEUE`` (the worker step exports what it
    resolved there), else the ``cluster_leader_queue`` setting, else the default."""
    return leader_queue((app or current_app).conf)


def _not_leader() -> NoReturn:
    """Send the message back to the leader queue instead of running it here."""
    task = current_task
    request = getattr(task, "request", None)
    queue = leader_queue_name(getattr(task, "app", None))
    came_from = ((request.delivery_info or {}).get("routing_key") if request is not None else None)
    if request is None or request.id is None or came_from == queue:
        # Prefetched from the leader queue before a step-down: requeue it there.
        task_counts.count("requeued")
        raise NotLeaderReject("this worker is not the cluster leader; requeued for the leader", requeue=True)
    # Routed elsewhere by hand: re-publish it to the leader queue, then ack this copy.
    task.apply_async(args=request.args, kwargs=request.kwargs, task_id=request.id, queue=queue,
                     headers={k: v for k, v in (request.headers or {}).items() if k.startswith("cluster_")})
    task_counts.count("republished")
    raise Ignore()


def _run_as_leader(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    state = leader_state.shared()
    term = state.current_term() if state is not None else None
    if term is None:
        _not_leader()
    task_counts.count("run")
    reset = _token.set(term)
    try:
        return fn(*args, **kwargs)
    finally:
        _token.reset(reset)


class LeaderOnlyTask(Task):
    """Base class for tasks that must run on the leader only (see the module docstring)."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    leader_only = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _run_as_leader(super().__call__, args, kwargs)


def leader_only(obj: F) -> F:
    """Mark a task function (under ``@app.task``) or a task (over it) as leader-only."""
    if isinstance(obj, Task):
        mark_task(obj)
        return obj

    return _guarded(obj)  # type: ignore[return-value]


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind the lease check, marked as leader-only for the router."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _run_as_leader(fn, args, kwargs)

    setattr(wrapper, MARK, True)
    return wrapper


def is_leader_only(task: Any) -> bool:
    return bool(getattr(task, "leader_only", False) or getattr(getattr(task, "run", None), MARK, False))


def mark_task(task: Task) -> None:
    """Give a leader-only task the message settings the contract needs."""
    task.leader_only = True
    task.acks_late = True
    task.reject_on_worker_lost = True
    if not getattr(task.run, MARK, False) and not isinstance(task, LeaderOnlyTask):
        task.run = _guarded(task.run)


def fencing_token() -> int | None:
    """The term the current task runs under: pass it to downstream systems to fence stale leaders."""
    token = _token.get()
    if token is not None:
        return token
    task = current_task
    if task is not None and task.request is not None:
        term = getattr(task.request, "cluster_term", None)
        if term is not None:
            return int(term)
    return None


class LeaderQueueRouter:
    """Routes leader-only tasks to the leader queue (installed by ``install(app)``).

    Holds no app: ``task_routes`` is pickled with the app for spawned pool
    children, and an app reference here would make that pickle recursive.
    """

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        task = task if task is not None else current_app.tasks.get(name)
        if task is not None and is_leader_only(task):
            return {"queue": leader_queue_name(getattr(task, "app", None))}
        return None
