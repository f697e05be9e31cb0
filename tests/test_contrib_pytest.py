"""The cluster step under ``celery.contrib.pytest``'s own fixtures (``celery_app``, ``celery_worker``).

This is how a user would test their app with the cluster installed: a one-node
cluster on an in-process worker leads at once, so leader-only tasks run there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from celery_cluster import fencing_token, install, leader_only
from tests.support import addresses, isolated_celery_state, wait_for


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The step exports CELERY_CLUSTER_* for its pool children: keep them out of later tests
    (a leaked CELERY_CLUSTER_LEADER_QUEUE would route another test's leader-only tasks)."""
    with isolated_celery_state(monkeypatch, tmp_path):
        yield


@pytest.fixture
def celery_app(celery_app: Any) -> Any:  # extends celery.contrib.pytest's fixture
    install(celery_app)
    return celery_app


@pytest.fixture
def celery_worker_pool() -> str:
    return "solo"


@pytest.fixture
def celery_worker_parameters(tmp_path: Path) -> dict[str, Any]:
    (me,) = addresses(1)
    return {"perform_ping_check": False, "cluster_nodes": me, "cluster_listen": me,
            "cluster_state_dir": str(tmp_path / "state"), "cluster_election_timeout": "0.3-0.6",
            "cluster_heartbeat_interval": "0.05", "cluster_beat": "no"}


def test_leader_only_task_runs_on_the_fixture_worker(celery_app: Any, celery_worker: Any) -> None:
    @celery_app.task
    @leader_only
    def whoami() -> int | None:
        return fencing_token()

    celery_worker.reload()  # the fixture worker learns the task defined in the test
    step = celery_worker.cluster_step
    wait_for(lambda: step.status()["is_leader"], "the one-node cluster to lead", timeout=10.0, interval=0.02,
             timeout_format="{} s")
    term = step.status()["term"]
    assert whoami.delay().get(timeout=10) == term
    assert step.status()["leader_queue_consumed"]
