"""The real ``docker-compose.yml`` and ``Dockerfile``, run on a private Docker engine with
locally built stand-in base images (``tests/containers.py``): three worker containers and
Redis come up, elect exactly one leader over the containers' DNS names, run beat on the
leader only; ``docker-compose kill`` of the leader gives a new leader and beat goes on
from it with no run twice; ``down -v`` removes every container, network, volume and the
app image, and the daemon this test started is stopped.

Needs root and ``docker.io docker-compose debootstrap`` (``.ci/run`` installs them and sets
``CC_REQUIRE_DOCKER=1``: CI fails rather than skips). The first run on a machine builds the
base images (about two minutes); later runs reuse them (``CC_DOCKER_CACHE``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.containers import Engine, build_wheels
from tests.support import free_ports, scrape, value
from tests.workers import http_status, poll

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("node1", "node2", "node3")
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "docker-compose.yml", "pyproject.toml", "README.md", "LICENSE",
                 "MANIFEST.in", "CHANGELOG.md")
CONTEXT_DIRS = ("celery_cluster", "examples")

pytestmark = [pytest.mark.processes, pytest.mark.timeout(1800)]


@pytest.fixture
def engine(docker_engine: Engine) -> Engine:
    return docker_engine  # the session's private dockerd (conftest.py)


def statuses(ports: dict[str, int]) -> dict[str, dict[str, Any] | None]:
    return {svc: http_status(port) for svc, port in ports.items()}


def one_leader(ports: dict[str, int], exclude: str | None = None) -> str | None:
    """The service every reachable node agrees leads (by its DNS name), or None."""
    views = {svc: st for svc, st in statuses(ports).items() if st is not None and svc != exclude}
    leaders = [svc for svc, st in views.items() if st["is_leader"]]
    if len(leaders) != 1 or len(views) < 2:
        return None
    leader_id = f"{leaders[0]}:8899"
    return leaders[0] if all(st["leader_id"] == leader_id for st in views.values()) else None


def published(port: int) -> float:
    return value(scrape(f"127.0.0.1:{port}")[1], "celery_cluster_beat_entries_published_total")


def test_compose_demo_elects_fails_over_and_beat_follows(engine: Engine, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in CONTEXT_FILES:
        shutil.copy(REPO / name, ctx / name)
    for name in CONTEXT_DIRS:
        shutil.copytree(REPO / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    build_wheels(REPO, ctx / ".wheels")
    ports = dict(zip(SERVICES, free_ports(3)))
    env = {"CELERY_CLUSTER_WHEELS": ".wheels", **{f"NODE{i + 1}_PORT": str(p) for i, p in enumerate(ports.values())}}
    project = f"cct{uuid.uuid4().hex[:8]}"
    compose_file = ctx / "docker-compose.yml"
    ok = False
    try:
        started = time.monotonic()
        engine.compose(project, compose_file, "up", "-d", "--build", env=env)
        leader = poll(lambda: one_leader(ports), 120, "one leader agreed by the three containers", 0.2)
        up = time.monotonic() - started
        views = statuses(ports)
        assert {st["id"] for st in views.values() if st} == {f"{svc}:8899" for svc in SERVICES}
        term = views[leader]["term"]
        # Beat on the leader only: its publish counter moves, the others' stay at 0.
        poll(lambda: published(ports[leader]) >= 2, 30, "two beat publishes from the leader", 0.2)
        followers = [svc for svc in SERVICES if svc != leader]
        assert all(published(ports[svc]) == 0 for svc in followers)
        assert [svc for svc, st in statuses(ports).items() if st and st["beat_running"]] == [leader]

        t_kill = time.monotonic()
        wall_kill = time.time()
        engine.compose(project, compose_file, "kill", leader, env=env)
        new = poll(lambda: one_leader(ports, exclude=leader), 30, "a new leader after the kill", 0.05)
        failover = time.monotonic() - t_kill
        new_term = statuses(ports)[new]["term"]
        assert new != leader and new_term > term
        before = published(ports[new])
        poll(lambda: published(ports[new]) >= before + 2, 30, "two beat publishes from the new leader", 0.2)

        records = collect_records(engine, project, compose_file, env, tmp_path)
        runs = sorted((r for r in records if r["task"] == "report"), key=lambda r: r["run"])
        numbers = [r["run"] for r in runs]
        assert len(numbers) == len(set(numbers)), f"a scheduled run executed twice: {numbers}"
        assert {r["term"] for r in runs if r["t"] < wall_kill - 0.5} <= {term}
        assert any(r["term"] == new_term for r in runs), (new_term, runs[-6:])
        around = [f"run {r['run']} term {r['term']} at {r['t'] - wall_kill:+.1f}s" for r in runs
                  if -6 < r["t"] - wall_kill < 8]
        print(f"\ncompose: up and one leader in {up:.1f} s: {leader}:8899 (term {term}); killed it; "
              f"{new}:8899 led (term {new_term}) {failover:.2f} s after the kill")
        print("compose: beat runs around the kill: " + "; ".join(around))
        ok = True
    finally:
        if not ok:
            logs = engine.compose(project, compose_file, "logs", "--no-color", "--tail", "60", env=env, check=False)
            print(logs.stdout.decode(errors="replace")[-8000:], file=sys.stderr)
        engine.compose(project, compose_file, "down", "-v", "--rmi", "local", "--remove-orphans", env=env,
                       check=False, timeout=300)
        leftovers = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout
        volumes = engine.docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout
        networks = engine.docker("network", "ls", "-q", "--filter",
                                 f"label=com.docker.compose.project={project}").stdout
        assert not leftovers.strip() and not volumes.strip() and not networks.strip(), \
            (leftovers, volumes, networks)


def collect_records(engine: Engine, project: str, compose_file: Path, env: dict[str, str],
                    tmp: Path) -> list[dict[str, Any]]:
    """Every container's records file (the killed one's too: its filesystem remains)."""
    out: list[dict[str, Any]] = []
    for svc in SERVICES:
        cid = engine.compose(project, compose_file, "ps", "-q", svc, env=env).stdout.decode().strip()
        dest = tmp / f"{svc}.jsonl"
        got = engine.docker("cp", f"{cid}:/tmp/demo/records.jsonl", str(dest), check=False)
        if got.returncode == 0:
            out += [json.loads(line) for line in dest.read_text().splitlines() if line.strip()]
    return out
