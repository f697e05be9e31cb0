"""docker-compose.yml and the Dockerfile, checked statically (tests/test_containers.py runs them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from celery_cluster.settings import resolve

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_three_workers_form_one_valid_cluster() -> None:
    services = load()["services"]
    workers = {name: s for name, s in services.items() if name.startswith("node")}
    assert len(workers) == 3
    advertised = []
    for svc in workers.values():
        env = {k: str(v) for k, v in svc["environment"].items()}
        cmd = svc["command"]
        assert cmd[:4] == ["celery", "-A", "examples.basic.app", "worker"]
        cli = {"cluster_listen": option(cmd, "--cluster-listen"),
               "cluster_advertise": option(cmd, "--cluster-advertise"),
               "cluster_state_dir": option(cmd, "--cluster-state-dir")}
        settings = resolve({}, cli, env)  # the same resolution the worker step runs
        assert settings is not None and settings.advertise in settings.nodes
        assert settings.advertise.startswith(svc["hostname"] + ":")
        assert env.get("CELERY_CLUSTER_SECRET"), "non-loopback listeners need a shared secret"
        assert svc["depends_on"] == ["redis"] and env["BROKER_URL"].startswith("redis://redis:")
        assert any(v.endswith(":" + settings.state_dir) for v in svc["volumes"]), "state must survive restarts"
        advertised.append(settings.advertise)
    assert sorted(advertised) == sorted(settings.nodes)
    host_ports = [svc["ports"][0].split(":")[0] for svc in workers.values()]
    assert len(set(host_ports)) == 3


def test_dockerfile_installs_the_package_and_the_example() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY . /src" in text and "/src/examples /app/examples" in text and '"celery[redis]"' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "celery_cluster" not in ignored and "examples" not in ignored and ".venv" in ignored
    assert (ROOT / "examples" / "basic" / "app.py").exists()
