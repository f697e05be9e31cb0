"""``celery -A proj cluster status``: the table logic, the click command, and the real CLI.

The end-to-end tests run the installed ``celery`` script as a subprocess (so the
``celery.commands`` entry point is what makes ``cluster`` a subcommand) against a
worker started in the test process with ``celery.contrib.testing.worker.start_worker``
on a real Redis broker (an empty database claimed per test with ``SET cc-test-claim NX``,
the protocol ``tests/workers.py`` uses too). The app module lives in a tmp dir put on
``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner

from celery_cluster import status_command
from celery_cluster.status_command import EXIT_BEAT_DOWN, beat_problems, build_rows, format_table, summary
from tests import support
from tests.support import HOST, claim_redis_db, free_port, isolated_celery_state

pytestmark = pytest.mark.timeout(120)

CLAIM_KEY = "cc-test-claim"
FAST = {"cluster_election_timeout": "0.5-1.0", "cluster_heartbeat_interval": "0.05"}
CELERY = Path(sys.executable).with_name("celery")

APP_MODULE = textwrap.dedent("""
    import os
    from celery import Celery
    from celery.beat import Scheduler
    from celery_cluster import install

    app = Celery("cc_status_app", broker=os.environ["CC_STATUS_TEST_BROKER"])
    app.conf.worker_hijack_root_logger = False
    app.conf.broker_connection_retry_on_startup = False
    app.conf.beat_scheduler = f"{__name__}:FlakyScheduler"
    install(app)

    class FlakyScheduler(Scheduler):
        # A user's scheduler whose storage can go down: tick() raises while the file exists.

        def tick(self, *args, **kwargs):
            if os.path.exists(os.environ.get("CC_STATUS_BEAT_DOWN", "/nonexistent")):
                raise RuntimeError("the schedule database is down")
            return super().tick(*args, **kwargs)
""")


# -- helpers -------------------------------------------------------------------------


#: ``wait_for(pred, what, timeout=20.0)``: poll every 20 ms until ``pred`` is truthy (returned).
wait_for = partial(support.wait_for, timeout=20.0, interval=0.02, timeout_format="{:.0f}s")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with isolated_celery_state(monkeypatch, tmp_path):
        yield


@pytest.fixture()
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """(module name, app): an importable app module in tmp_path, on a Redis database of our own."""
    with claim_redis_db(CLAIM_KEY) as db:
        url = db.url
        name = f"cc_status_app_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(APP_MODULE)
        monkeypatch.setenv("CC_STATUS_TEST_BROKER", url)
        monkeypatch.syspath_prepend(str(tmp_path))
        module = importlib.import_module(name)
        try:
            yield name, module.app
        finally:
            sys.modules.pop(name, None)


def run_cli(module: str, tmp_path: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``celery -A module cluster status ARGS`` in a subprocess, on the broker the test's app uses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_CLUSTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return subprocess.run([str(CELERY), "-A", module, "cluster", "status", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(tmp_path))


@contextmanager
def worker_on(app: Any, tmp_path: Path, *, cluster: bool) -> Iterator[Any]:
    name = f"st-{uuid.uuid4().hex[:6]}@cc-test"
    options: dict[str, Any] = {}
    addr = None
    if cluster:
        addr = f"{HOST}:{free_port()}"
        options = {"cluster_nodes": addr, "cluster_listen": addr,
                   "cluster_state_dir": str(tmp_path / "state"), **FAST}
    with start_worker(app, pool="threads", perform_ping_check=False, hostname=name, loglevel="WARNING",
                      shutdown_timeout=30, **options) as worker:
        worker.cluster_addr = addr
        # On Redis a broadcast sent before the worker's pidbox subscription is up is lost (pub/sub),
        # even after start_worker returned: wait until the worker answers before running the CLI.
        wait_for(lambda: app.control.inspect(timeout=1.0, destination=[name], limit=1).ping(),
                 "the worker to answer remote control")
        yield worker
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("celery-cluster")],
             "the celery-cluster threads to end", timeout=10)


def _status(addr: str, *, state: str = "follower", term: int = 4, leader: str | None = None,
            is_leader: bool = False, nodes: list[tuple[str, float | None]] = (), beat: bool = False,
            queue: bool = False) -> dict[str, Any]:
    return {
        "enabled": True, "id": addr, "leader_id": leader, "leader_address": leader, "state": state,
        "term": term, "voted_for": leader, "is_leader": is_leader, "lease_remaining_ms": 0.0,
        "payload_version": [term, 1],
        "nodes": [{"address": a, "last_contact_ms": ms, "heartbeat_rtt": None} for a, ms in nodes],
        "beat_running": beat, "leader_queue": "celery_cluster.leader", "leader_queue_consumed": queue,
    }


A, B, C = "10.0.0.1:9001", "10.0.0.2:9001", "10.0.0.3:9001"
THREE = {
    "celery@a": _status(A, state="leader", leader=A, is_leader=True, nodes=[(B, 12.34), (C, 4021.0)],
                        beat=True, queue=True),
    "celery@b": _status(B, leader=A, nodes=[(A, 20.0), (C, None)]),
    "celery@off": {"enabled": False},
    "celery@old": {"error": "KeyError('cluster_status')"},
}


# -- table logic ---------------------------------------------------------------------


def test_rows_for_leader_follower_missing_off_and_error() -> None:
    rows = build_rows(THREE)
    assert rows == [
        (f"celery@a ({A})", "leader", "4", A, "-", "yes", "yes"),
        (f"celery@b ({B})", "follower", "4", A, "12.3", "no", "no"),   # the leader's view of b
        (f"- ({C})", "no reply", "-", "-", "4021.0", "-", "-"),          # a member nobody answered for
        ("celery@off", "off", "-", "-", "-", "-", "-"),
        ("celery@old", "error", "-", "-", "-", "-", "-"),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["NODE", "ROLE", "TERM", "LEADER", "LAST", "CONTACT", "(ms)", "BEAT", "LEADER",
                                "QUEUE"]
    assert len(table) == 1 + len(rows)
    role_col, contact_col = table[0].index("ROLE"), table[0].index("LAST CONTACT")
    for line, row in zip(table[1:], rows):  # columns are aligned under their headers
        assert line[role_col:].startswith(row[1]) and line[contact_col:].startswith(row[4]), line
    assert summary(THREE) == f"4 workers replied; leader: celery@a ({A}), term 4"


def test_rows_without_a_leader() -> None:
    replies = {
        "celery@a": _status(A, state="candidate", term=7, nodes=[(B, 900.0)]),
        "celery@b": _status(B, state="pre_candidate", term=6, nodes=[(A, 950.0)]),
    }
    rows = build_rows(replies)
    assert [r[1] for r in rows] == ["candidate", "pre_candidate"]
    assert [r[3] for r in rows] == ["-", "-"] and [r[4] for r in rows] == ["-", "-"]
    assert summary(replies) == "2 workers replied; no leader among them"


def test_lapsed_lease_and_only_off_workers() -> None:
    lapsed = {"celery@a": _status(A, state="leader", leader=A, is_leader=False)}
    assert build_rows(lapsed)[0][1] == "leader (no lease)"
    off = {"celery@x": {"enabled": False}}
    assert build_rows(off) == [("celery@x", "off", "-", "-", "-", "-", "-")]
    assert summary(off) == "1 worker replied; leader election is off on all of them"


def test_peers_refusing_requests_are_flagged() -> None:
    replies = dict(THREE)
    replies["celery@a"] = {**THREE["celery@a"], "nodes": [
        {"address": B, "last_contact_ms": 12.3, "heartbeat_rtt": None, "refuses_us": None},
        {"address": C, "last_contact_ms": None, "heartbeat_rtt": None,
         "refuses_us": {"status": 401, "error": "bad signature", "seconds_ago": 0.1}}]}
    lines = summary(replies).splitlines()
    assert lines[1] == (f"WARNING: peers refuse requests: {C} refuses celery@a ({A}): HTTP 401 bad signature - "
                        "check that every node has the same secret")


def test_a_leader_whose_beat_is_failing_is_flagged() -> None:
    failing = dict(THREE)
    failing["celery@a"] = {**THREE["celery@a"], "beat_running": False, "beat_enabled": True,
                           "beat_state": "failing: OperationalError: database is locked", "beat_restarts": 3}
    assert build_rows(failing)[0][5] == "FAILING"
    assert beat_problems(failing) == [f"celery@a ({A}): beat failing: OperationalError: database is locked, "
                                      "3 restarts"]
    assert summary(failing).splitlines()[1].startswith("WARNING: leader has no running beat")
    # A follower without beat is normal, and so is a leader with the cluster's beat switched off.
    off = dict(THREE)
    off["celery@a"] = {**THREE["celery@a"], "beat_running": False, "beat_enabled": False}
    assert beat_problems(off) == [] and beat_problems(THREE) == []


# -- the click command (in process; the inspect call is replaced) -------------------------


@pytest.fixture()
def memory_app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"cc_status_mem_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE)
    monkeypatch.setenv("CC_STATUS_TEST_BROKER", "memory://")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _invoke(module: str, *args: str) -> Any:
    from celery.bin.celery import celery

    return CliRunner().invoke(celery, ["-A", module, "cluster", "status", *args])


def test_command_table_json_and_options(memory_app_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, float, Any]] = []

    def fake(app: Any, timeout: float = 1.0, destination: Any = None) -> dict[str, Any]:
        calls.append((app.main, timeout, destination))
        return THREE

    monkeypatch.setattr(status_command, "request_status", fake)
    result = _invoke(memory_app_module)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("NODE")
    assert f"celery@b ({B})" in result.output and "12.3" in result.output
    assert result.output.rstrip().endswith(f"leader: celery@a ({A}), term 4")
    assert calls[-1] == ("cc_status_app", 1.0, None)

    result = _invoke(memory_app_module, "--json", "--timeout", "2.5", "-d", "celery@a,celery@b")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == THREE
    assert calls[-1] == ("cc_status_app", 2.5, ["celery@a", "celery@b"])


def test_command_no_reply_exits_1(memory_app_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_command, "request_status", lambda app, timeout=1.0, destination=None: {})
    for extra in ((), ("--json",)):
        result = _invoke(memory_app_module, "-t", "0.1", *extra)
        assert result.exit_code == 1
        assert "No workers replied to `cluster_status` within 0.1s" in result.output


def test_command_exits_2_when_the_leader_has_no_running_beat(memory_app_module: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    down = {**THREE, "celery@a": {**THREE["celery@a"], "beat_running": False, "beat_state": "stopped"}}
    monkeypatch.setattr(status_command, "request_status", lambda app, timeout=1.0, destination=None: down)
    for extra in ((), ("--json",)):
        result = _invoke(memory_app_module, *extra)
        assert result.exit_code == EXIT_BEAT_DOWN, result.output
    assert "WARNING: leader has no running beat" in _invoke(memory_app_module).output


def test_workers_answering_under_one_name_are_all_shown_and_flagged(memory_app_module: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Three workers started as the README's first draft did (no -n): all `celery@host`."""
    class FakeControl:
        def broadcast(self, command: str, **kwargs: Any) -> list[dict[str, Any]]:
            assert command == "cluster_status" and kwargs["reply"] is True
            return [{"celery@host": THREE["celery@a"]}, {"celery@host": THREE["celery@b"]},
                    {"celery@host": _status(C, leader=A)}]

    app = type("App", (), {"control": FakeControl()})()
    replies = status_command.request_status(app)
    assert list(replies) == ["celery@host", "celery@host#2", "celery@host#3"]
    assert status_command.duplicate_names(replies) == {"celery@host": 3}
    monkeypatch.setattr(status_command, "request_status", lambda app, timeout=1.0, destination=None: replies)
    result = _invoke(memory_app_module)
    assert result.exit_code == status_command.EXIT_DUPLICATE_NAMES, result.output
    assert "WARNING: 3 workers answered as celery@host: give each worker its own name" in result.output
    assert f"celery@host#3 ({C})" in result.output  # none of them hidden


def test_entry_point_is_registered() -> None:
    eps = [ep for ep in entry_points(group="celery.commands") if ep.name == "cluster"]
    assert [ep.value for ep in eps] == ["celery_cluster.status_command:cluster"]
    assert eps[0].load() is status_command.cluster


# -- the real CLI against a real worker ---------------------------------------------------------


def test_cli_no_workers(app_module: tuple[str, Any], tmp_path: Path) -> None:
    module, _ = app_module
    proc = run_cli(module, tmp_path, "--timeout", "0.5")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "No workers replied to `cluster_status` within 0.5s" in proc.stderr
    assert proc.stdout == ""


def test_cli_against_a_leader_worker(app_module: tuple[str, Any], tmp_path: Path) -> None:
    module, app = app_module
    with worker_on(app, tmp_path, cluster=True) as worker:
        step = worker.cluster_step
        wait_for(lambda: step.status()["is_leader"] and step.status()["beat_running"]
                 and step.status()["leader_queue_consumed"], "the worker to lead")
        term = step.status()["term"]

        proc = run_cli(module, tmp_path, "--json", "--timeout", "2")
        assert proc.returncode == 0, proc.stderr
        replies = json.loads(proc.stdout)
        mine = replies[worker.hostname]
        assert mine["enabled"] is True and mine["id"] == worker.cluster_addr
        assert mine["is_leader"] is True and mine["state"] == "leader" and mine["term"] == term
        assert mine["leader_id"] == worker.cluster_addr and mine["nodes"] == []
        assert mine["beat_running"] is True and mine["leader_queue_consumed"] is True

        proc = run_cli(module, tmp_path, "--timeout", "2")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split()[:2] == ["NODE", "ROLE"]
        row = next(line for line in lines if line.startswith(worker.hostname))
        assert row.split() == [worker.hostname, f"({worker.cluster_addr})", "leader", str(term),
                               worker.cluster_addr, "-", "yes", "yes"]
        assert f"leader: {worker.hostname} ({worker.cluster_addr}), term {term}" in proc.stdout


def test_cli_and_health_flag_a_leader_whose_beat_keeps_failing(app_module: tuple[str, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Beat dies in the scheduler (its storage is down): the worker still leads, but the
    health endpoint answers 503 with the reason, `cluster status` flags it and exits 2;
    once the storage is back, the supervisor's restart makes it healthy again."""
    module, app = app_module
    down = tmp_path / "beat-down"
    monkeypatch.setenv("CC_STATUS_BEAT_DOWN", str(down))
    with worker_on(app, tmp_path, cluster=True) as worker:
        step = worker.cluster_step
        wait_for(lambda: step.status()["is_leader"] and step.status()["beat_running"], "the worker to lead")
        assert health(worker.cluster_addr) == (200, [])
        down.touch()
        wait_for(lambda: step.status()["beat_state"].startswith("failing"), "beat to fail")
        code, reasons = health(worker.cluster_addr)
        assert code == 503 and reasons == ["this leader's beat is failing: RuntimeError: the schedule database is down"]
        proc = run_cli(module, tmp_path, "--timeout", "2")
        assert proc.returncode == EXIT_BEAT_DOWN, (proc.stdout, proc.stderr)
        assert "WARNING: leader has no running beat" in proc.stdout and "FAILING" in proc.stdout
        assert step.status()["is_leader"]  # it still leads: the operator is told, not left guessing
        down.unlink()
        wait_for(lambda: step.status()["beat_state"] == "running", "beat to recover after its back-off")
        assert step.status()["beat_restarts"] >= 1 and step.status()["beat_last_error"]
        assert health(worker.cluster_addr) == (200, [])
        assert run_cli(module, tmp_path, "--timeout", "2").returncode == 0


def health(addr: str) -> tuple[int, list[str]]:
    import http.client

    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/cluster/health")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())["reasons"]
    finally:
        conn.close()


def test_cli_against_a_worker_without_cluster(app_module: tuple[str, Any], tmp_path: Path) -> None:
    module, app = app_module
    with worker_on(app, tmp_path, cluster=False) as worker:
        proc = run_cli(module, tmp_path, "--json", "--timeout", "2")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)[worker.hostname] == {"enabled": False}

        proc = run_cli(module, tmp_path, "-t", "2")
        assert proc.returncode == 0, proc.stderr
        row = next(line for line in proc.stdout.splitlines() if line.startswith(worker.hostname))
        assert row.split() == [worker.hostname, "off", "-", "-", "-", "-", "-"]
        assert "leader election is off" in proc.stdout
