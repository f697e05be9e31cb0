"""A private Docker engine for container tests, with stand-in base images built offline.

No image registry is reachable here, so the images the project's ``Dockerfile`` and
``docker-compose.yml`` name (``python:3.11-slim``, ``redis:7``) are built locally from
Debian packages: ``debootstrap`` a minimal bookworm root filesystem (python3, venv, pip),
import it, put a virtualenv on top for the Python stand-in, and ``apt-get install
redis-server`` into a copy for the Redis one. The project and its dependencies go into
the app image as wheels built on the host (``PIP_FIND_LINKS``), installed with no index.

The engine is a ``dockerd`` of our own - its own socket, exec root and pid file under a
temporary directory, ``--iptables=false`` (so the host's FORWARD policy and bridge
netfilter, which the network-namespace tests rely on, stay untouched) - and its data root
under ``CC_DOCKER_CACHE`` (default ``/var/tmp/celery-cluster-docker``), so that the base
images are built once per machine and reused by later runs. Only what this module started
is stopped: the daemon by its pid.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("CC_DOCKER_CACHE", "/var/tmp/celery-cluster-docker"))
BASE_IMAGE = "celery-cluster-test/bookworm:minbase"
#: Bumped when a stand-in's recipe changes, so a cached image of the old recipe is rebuilt.
REDIS_RECIPE = "2"
MIRROR = "http://deb.debian.org/debian"
TOOLS = ("docker", "dockerd", "docker-compose", "debootstrap")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


class Engine:
    def __init__(self) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="ccd-", dir="/tmp"))  # short: socket paths
        self.sock = self.run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.run_dir / "dockerd.log"

    # -- the daemon -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        (CACHE / "data").mkdir(parents=True, exist_ok=True)
        # One engine at a time on the cached data root (two test sessions on one machine
        # would share it): the second waits for the first to stop.
        self._lock: Any = open(CACHE / "engine.lock", "w")  # held until stop()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--iptables=false", "--data-root", str(CACHE / "data"),
                 "--exec-root", str(self.run_dir / "exec"), "-H", f"unix://{self.sock}",
                 "--pidfile", str(self.run_dir / "docker.pid")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if subprocess.run(["docker", "info"], env=self.env, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd not ready within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()  # releases the flock
            self._lock = None

    # -- commands -----------------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = 600, check: bool = True,
               input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        out = subprocess.run(["docker", *args], env=self.env, capture_output=True, timeout=timeout, input=input)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.decode(errors='replace')[-2000:]}")
        return out

    def compose(self, project: str, compose_file: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        out = subprocess.run(["docker-compose", "-p", project, "-f", str(compose_file), *args],
                             env={**self.env, **(env or {})}, cwd=compose_file.parent, capture_output=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)}: {out.stdout.decode(errors='replace')[-2000:]}"
                               f"{out.stderr.decode(errors='replace')[-3000:]}")
        return out

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    # -- stand-in base images ----------------------------------------------------------------

    def ensure_base_images(self) -> dict[str, float]:
        """Build what is missing; returns seconds spent per image (0 when cached)."""
        spent: dict[str, float] = {}
        rootfs = CACHE / "rootfs"
        started = time.monotonic()
        if not self.has_image(BASE_IMAGE):
            if not (rootfs / "usr" / "bin" / "python3").exists():
                shutil.rmtree(rootfs, ignore_errors=True)
                out = subprocess.run(["debootstrap", "--variant=minbase",
                                      "--include=python3,python3-venv,python3-pip,ca-certificates",
                                      "bookworm", str(rootfs), MIRROR], capture_output=True, timeout=900)
                if out.returncode != 0:
                    raise RuntimeError(f"debootstrap: {out.stderr.decode(errors='replace')[-3000:]}")
            self._import(rootfs, BASE_IMAGE)
        spent["base"] = time.monotonic() - started

        started = time.monotonic()
        if not self.has_image("python:3.11-slim"):
            ctx = Path(tempfile.mkdtemp(prefix="ccd-py-"))
            try:
                (ctx / "Dockerfile").write_text(
                    f"FROM {BASE_IMAGE}\nRUN python3 -m venv /usr/local/py\n"
                    "ENV PATH=/usr/local/py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
                    'CMD ["python3"]\n')
                self.docker("build", "-t", "python:3.11-slim", str(ctx))
            finally:
                shutil.rmtree(ctx, ignore_errors=True)
        spent["python"] = time.monotonic() - started

        started = time.monotonic()
        if self.docker("image", "inspect", "-f", "{{ index .Config.Labels \"recipe\" }}", "redis:7",
                       check=False).stdout.decode().strip() != REDIS_RECIPE:
            copy = CACHE / "rootfs-redis"
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["cp", "-a", str(rootfs), str(copy)], check=True, timeout=300)
            try:
                shutil.copy("/etc/resolv.conf", copy / "etc" / "resolv.conf")
                out = subprocess.run(["chroot", str(copy), "sh", "-c",
                                      "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                                      "--no-install-recommends redis-server && apt-get clean"],
                                     capture_output=True, timeout=900)
                if out.returncode != 0:
                    raise RuntimeError(f"redis-server into the image: {out.stderr.decode(errors='replace')[-3000:]}")
                # Like the official image, whose redis-server is built with protected mode off
                # (containers reach it over the compose network, not loopback).
                wrapper = copy / "usr" / "local" / "bin" / "redis-server"
                wrapper.write_text('#!/bin/sh\nexec /usr/bin/redis-server "$@" --protected-mode no\n')
                wrapper.chmod(0o755)
                self._import(copy, "redis:7", 'CMD ["redis-server"]', f"LABEL recipe={REDIS_RECIPE}")
            finally:
                shutil.rmtree(copy, ignore_errors=True)
        spent["redis"] = time.monotonic() - started
        return spent

    def _import(self, rootfs: Path, name: str, *changes: str) -> None:
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        argv = ["docker", "import"]
        for change in changes:
            argv += ["--change", change]
        out = subprocess.run([*argv, "-", name], stdin=tar.stdout, env=self.env, capture_output=True, timeout=600)
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(60)
        if out.returncode != 0:
            raise RuntimeError(f"docker import {name}: {out.stderr.decode(errors='replace')}")


def build_wheels(repo: Path, into: Path, extra: tuple[str, ...] = ()) -> None:
    """The project and everything ``celery[redis]`` needs, as wheels (the containers have no
    package index). Debian bookworm's Python is 3.11.2: ``redis`` then wants ``async-timeout``."""
    into.mkdir(parents=True, exist_ok=True)
    for argv in ([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(into),
                  str(repo), "celery[redis]", *extra],
                 [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                  "-d", str(into), "async-timeout>=4.0.3", "packaging"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {out.stderr[-3000:]}")
