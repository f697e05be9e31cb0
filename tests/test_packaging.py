"""The package as a user gets it: build the sdist and, from it, the wheel; install the wheel
into a fresh virtualenv (its dependencies from the package index, as ``pip install``
would); run ``celery-cluster --version`` and ``examples/basic`` (three workers, a leader
kill, on the local Redis) with that environment, away from the source tree so nothing is
imported from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import celery_cluster
from tests.support import claim_redis_db

REPO = Path(__file__).resolve().parents[1]
CLAIM_KEY = "celery-cluster-tests:packaging"

pytestmark = [pytest.mark.processes, pytest.mark.timeout(900)]


def run(*argv: str | Path, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert out.returncode == 0, f"{argv} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_sdist_and_wheel_install_and_run_the_example(tmp_path: Path) -> None:
    # Build from a copy: the build must not depend on (or leave) anything in the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "artifacts", "*.egg-info", "build",
                                                             "dist", "__pycache__", ".pytest_cache", ".hypothesis"))
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, src, cwd=src)
    [sdist] = dist.glob("celery_cluster-*.tar.gz")
    [wheel] = dist.glob("celery_cluster-*.whl")
    version = celery_cluster.__version__
    assert sdist.name == f"celery_cluster-{version}.tar.gz"

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in ("LICENSE", "CHANGELOG.md", "README.md", "celery_cluster/py.typed",
                     "tests/testdata/campaign.txt", "tests/test_scenarios.py", "examples/basic/demo.py",
                     "examples/django/manage.py", "bench/failover.py"):
        assert required in names, f"{required} missing from the sdist"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, cwd=tmp_path)
    assert run(env_dir / "bin" / "celery-cluster", "--version", cwd=tmp_path).strip() == f"celery-cluster {version}"
    with zipfile.ZipFile(wheel) as whl:
        metadata = whl.read(f"celery_cluster-{version}.dist-info/METADATA").decode()
        assert any(n.endswith("licenses/LICENSE") for n in whl.namelist())
    assert "License-Expression: BSD-3-Clause" in metadata
    assert "Classifier: Framework :: Celery" in metadata
    assert "Requires-Dist: prometheus_client" in metadata.replace("prometheus-client", "prometheus_client")

    # The example, from a directory holding only the example: the package comes from the wheel.
    site = tmp_path / "site"
    shutil.copytree(REPO / "examples", site / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    where = run(python, "-c", "import celery_cluster; print(celery_cluster.__file__)", cwd=site).strip()
    assert where.startswith(str(env_dir)), where
    # On the local Redis, not the demo's default (kombu's filesystem transport): that transport
    # can hand a reader a message file another process is still writing (a JSONDecodeError in
    # kombu's filesystem ``_get``), which took a worker down in two CI runs. celery[redis] is how a
    # Redis user installs the client (kombu's Redis transport also needs ``packaging``).
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "celery[redis]", cwd=tmp_path)
    with claim_redis_db(CLAIM_KEY) as db:
        out = run(python, site / "examples" / "basic" / "demo.py", cwd=site, timeout=240,
                  env={**os.environ, "BROKER_URL": db.url})
    assert "demo: OK" in out, out
    print("\n" + "\n".join(line for line in out.splitlines() if line.startswith("demo:")))
