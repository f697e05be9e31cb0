"""Container smoke test with pytest-celery (1.x, the official plugin), on locally built images.

pytest-celery starts Redis (broker and result backend) and a worker container on a Docker
network of its own; this module points it at the session's private engine (conftest.py),
at the ``redis:7`` stand-in instead of ``redis:latest``, and at a worker image built here from
the ``python:3.11-slim`` stand-in with celery-cluster installed from wheels (no registry and
no package index are reachable from the engine). The worker's app is pytest-celery's
template plus ``install(app)``, and its command adds a one-member cluster: the worker
elects itself, consumes the leader queue, and runs a ``@leader_only`` task sent from the
test under its term.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

docker = pytest.importorskip("docker")
pytest_celery = pytest.importorskip("pytest_celery")
from pytest_celery import (  # noqa: E402
    DEFAULT_WORKER_CONTAINER_TIMEOUT,
    DEFAULT_WORKER_VOLUME,
    CeleryBackendCluster,
    CeleryBrokerCluster,
    CeleryTestSetup,
    CeleryWorkerContainer,
)
from pytest_celery.fixtures.worker import celery_worker  # noqa: E402, F401 - over celery.contrib.pytest's (conftest)
from pytest_docker_tools import container, fxtr  # noqa: E402

from tests.containers import Engine, build_wheels  # noqa: E402
from tests.pytest_celery_worker import app as worker_app_module  # noqa: E402
from tests.pytest_celery_worker import tasks as worker_tasks_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER_IMAGE = "celery-cluster-test/pytest-celery-worker:latest"

pytestmark = [pytest.mark.processes, pytest.mark.timeout(900)]


class ClusterWorkerContainer(CeleryWorkerContainer):
    """pytest-celery's worker, as a one-member cluster listening on the container's loopback."""

    @classmethod
    def command(cls, *args: str, **kwargs: Any) -> list[str]:
        return super().command("--cluster-nodes", "127.0.0.1:8899", "--cluster-listen", "127.0.0.1:8899",
                               "--cluster-election-timeout", "0.5-1.0", "--cluster-heartbeat-interval", "0.1",
                               *args, **kwargs)

    @classmethod
    def version(cls) -> str:
        import celery

        return celery.__version__


# -- pytest-celery, pointed at what this machine can run ------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _tests_outside_containers() -> Any:
    """This machine has a /.dockerenv, from which pytest-docker-tools concludes the tests run
    inside a container and hands out containers' internal ports, which pytest-celery then
    joins to "localhost". The tests run on the engine's host: use the published ports."""
    import pytest_docker_tools.wrappers.container as wrappers

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wrappers, "tests_inside_container", lambda: False)
        yield


@pytest.fixture(scope="session")
def docker_client(docker_engine: Engine) -> Any:  # pytest-docker-tools' client: our engine
    client = docker.DockerClient(base_url=f"unix://{docker_engine.sock}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def cluster_worker_image(docker_engine: Engine) -> str:
    ctx = Path(tempfile.mkdtemp(prefix="ccd-pcw-"))
    try:
        build_wheels(REPO, ctx / "wheels", extra=("psutil",))  # psutil: pytest-celery's worker utils
        (ctx / "Dockerfile").write_text(
            "FROM python:3.11-slim\n"
            "COPY wheels /wheels\n"
            'RUN pip install --no-cache-dir --no-index --find-links /wheels celery-cluster "celery[redis]" psutil'
            " && rm -rf /wheels\n"
            "WORKDIR /app\n")
        docker_engine.docker("build", "-t", WORKER_IMAGE, str(ctx))
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return WORKER_IMAGE


@pytest.fixture
def default_redis_broker_image() -> str:
    return "redis:7"


@pytest.fixture
def default_redis_backend_image() -> str:
    return "redis:7"


@pytest.fixture
def celery_broker_cluster(celery_redis_broker: Any) -> Any:
    cluster = CeleryBrokerCluster(celery_redis_broker)
    yield cluster
    cluster.teardown()


@pytest.fixture
def celery_backend_cluster(celery_redis_backend: Any) -> Any:
    cluster = CeleryBackendCluster(celery_redis_backend)
    yield cluster
    cluster.teardown()


@pytest.fixture
def default_worker_container_cls() -> type[CeleryWorkerContainer]:
    return ClusterWorkerContainer


@pytest.fixture(scope="session")
def default_worker_container_session_cls() -> type[CeleryWorkerContainer]:
    return ClusterWorkerContainer


@pytest.fixture
def default_worker_app_module() -> ModuleType:
    return worker_app_module


@pytest.fixture
def default_worker_tasks(default_worker_tasks: set) -> set:
    return {*default_worker_tasks, worker_tasks_module}


default_worker_container = container(
    image="{cluster_worker_image}",
    environment=fxtr("default_worker_env"),
    network="{default_pytest_celery_network.name}",
    volumes={"{default_worker_volume.name}": DEFAULT_WORKER_VOLUME},
    wrapper_class=ClusterWorkerContainer,
    timeout=DEFAULT_WORKER_CONTAINER_TIMEOUT,
    command=fxtr("default_worker_command"),
)


# -- the test ---------------------------------------------------------------------------------


def test_a_clustered_worker_container_runs_leader_only_tasks(celery_setup: CeleryTestSetup) -> None:
    worker = celery_setup.worker
    assert worker is not None
    worker.wait_for_log("[cluster] 127.0.0.1:8899 leads in term", timeout=60)
    # The leader queue is consumed (and, on Redis, bound: a message sent to an unbound
    # queue would be dropped) once the consumer is up.
    worker.wait_for_log("Started consuming from celery_cluster.leader", timeout=60)
    queues = celery_setup.app.control.inspect(timeout=10).active_queues() or {}
    assert {q["name"] for q in queues.get(worker.hostname(), [])} == {"celery", "celery_cluster.leader"}, queues
    assert celery_setup.app.send_task("pytest_celery.vendors.worker.tasks.ping").get(timeout=30) == "pong"
    results = [celery_setup.app.send_task("smoke.lead", args=(i,), queue="celery_cluster.leader")
               for i in range(3)]
    answers = [r.get(timeout=60) for r in results]
    assert [a["i"] for a in answers] == [0, 1, 2]
    assert {a["term"] for a in answers} == {1}, answers  # under the lease of the term it leads
    assert "refused" not in worker.logs().lower()
    print(f"\npytest-celery: worker {worker.hostname()} leads term 1 and ran {len(answers)} leader-only tasks")
