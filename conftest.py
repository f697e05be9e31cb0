from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

# Celery's own pytest fixtures (celery_app, celery_worker, ...). Registered here, in the root
# conftest, so that they win over pytest-celery's Docker-based ones of the same names.
pytest_plugins = ("celery.contrib.pytest",)


def docker_unavailable(reason: str) -> None:
    """Skip a container test with a printed reason - or fail, where CI says Docker must run."""
    if os.environ.get("CC_REQUIRE_DOCKER"):
        pytest.fail(reason)
    print(f"\nskipping: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """One private dockerd for the session's container tests (see tests/containers.py), with
    the stand-in base images built (or reused from the machine's cache)."""
    from tests.containers import Engine, missing_tools

    if os.geteuid() != 0:
        docker_unavailable("the container tests start their own dockerd: run as root")
    missing = missing_tools()
    if missing:
        docker_unavailable(f"missing {', '.join(missing)}: apt-get install docker.io docker-compose debootstrap "
                           "(CI installs them)")
    engine = Engine()
    engine.start()
    try:
        spent = engine.ensure_base_images()
        print(f"\nstand-in base images: {', '.join(f'{k} {v:.0f} s' for k, v in spent.items())}")
        yield engine
    finally:
        engine.stop()
