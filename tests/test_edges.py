"""The guarantee where the work runs, with real workers: the lease pool children read,
planned handovers of beat, and a disk that fills up.

* Handovers under a slow ``leader_elected`` receiver: a separate process reads the three
  workers' shared leader state exactly as a prefork child does, all through ten stepdowns;
  it must never see two valid leases at one instant.
* A rolling SIGTERM of all three workers with a 1 s schedule: every replicated run number
  is published once - none missing, none twice.
* A worker whose state directory is full fail-stops: it leaves the cluster, stops leader
  work, keeps running ordinary tasks, and says why on ``GET /cluster/health``; a standalone
  node exits 3 with one line naming the file and the OS error.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_cluster.cli import EXIT_STATE_NOT_DURABLE
from celery_cluster.leader_state import LeaderState
from tests.support import HOST, die_with_parent, free_ports
from tests.test_celery_workers import assert_beat_fenced, clusters, measure  # noqa: F401 - fixture
from tests.workers import MAX_TIMEOUT, SHUTDOWN_WAIT, Cluster, poll

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def post(port: int, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("POST", path, body=body, headers={"Content-Length": str(len(body))})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# -- the lease as children read it, across handovers ----------------------------------------------


def _watch_leases(paths: list[str], started: Any, stop: Any, out: Any) -> None:
    """Read every worker's leader state as a prefork child does, in two passes per sweep.

    A lease is revoked once and never comes back in the same term, so a worker that shows
    the same valid term in both passes held it throughout; any *other* worker read valid in
    between (after it in the first pass, before it in the second) held one at the same time.
    """
    states = [LeaderState(p) for p in paths]
    started.set()
    sweeps = valid_sweeps = 0
    holders: set[tuple[int, int]] = set()
    overlaps: list[str] = []
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        first = [s.current_term() for s in states]
        second = [s.current_term() for s in states]
        sweeps += 1
        valid_sweeps += any(t is not None for t in first)
        for i, term in enumerate(first):
            if term is not None:
                holders.add((i, term))
            if term is None or second[i] != term:
                continue
            between = [(j, first[j]) for j in range(i + 1, len(states))] + [(j, second[j]) for j in range(i)]
            others = [(j, t) for j, t in between if t is not None]
            if others and len(overlaps) < 10:
                overlaps.append(f"worker {i} held term {term} while {others} held a lease")
    out.put((sweeps, valid_sweeps, sorted(holders), overlaps))


@contextlib.contextmanager
def lease_watcher(paths: list[Path]) -> Iterator[Any]:
    ctx = multiprocessing.get_context("spawn")
    started, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_watch_leases, args=([str(p) for p in paths], started, stop, out), daemon=True)
    proc.start()
    assert started.wait(60), "the lease watcher did not start"
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        stop.set()
        sweeps, valid, holders, overlaps = out.get(timeout=30)
        proc.join(10)
        result.update(sweeps=sweeps, valid_sweeps=valid, holders=holders, overlaps=overlaps)


def test_handovers_under_a_slow_receiver_never_show_children_two_leases(clusters: Any) -> None:
    """The review's measurement: a 0.2 s ``leader_elected`` receiver, a stepdown during it,
    and a process reading the shared state as a child does. Before the node revoked the lease
    itself, that process still saw the old term after the new leader's lease began in 8 of
    10 handovers."""
    c: Cluster = clusters("redis", env={"CC_TEST_SLOW_ELECTED": "0.2"})
    c.start()
    leader, term = c.wait_leader()
    workers = list(c.workers.values())
    with lease_watcher([w.state_dir / "leader.mmap" for w in workers]) as seen:
        for _ in range(10):
            # Right after the election, while the new leader's receiver is still busy.
            poll(lambda: any(r["term"] == term for r in c.records("elected")), 10, f"leader_elected of term {term}")
            status, body = post(leader.port, "/cluster/stepdown")
            assert status == 200, body
            leader, term = c.wait_leader(timeout=10, min_term=term + 1)
    measure("handover_lease_watch", handovers=10, sweeps=seen["sweeps"], holders=len(seen["holders"]))
    assert seen["overlaps"] == []
    # The watcher really watched: it saw leases, held by every worker in turn.
    assert seen["valid_sweeps"] > 1000 and len(seen["holders"]) >= 10
    assert {i for i, _ in seen["holders"]} == {0, 1, 2}


# -- planned handovers of beat ---------------------------------------------------------------


def test_a_rolling_sigterm_of_every_worker_neither_misses_nor_repeats_a_run(clusters: Any) -> None:
    c: Cluster = clusters("redis")
    c.start()
    leader, term = c.wait_leader()
    poll(lambda: len(c.records("beat_sent")) >= 2, 15, "two ticks")
    for name in list(c.workers):
        w = c.workers[name]
        w.send(signal.SIGTERM)
        assert w.wait_exit(SHUTDOWN_WAIT) == 0
        c.restart(name)
        c.wait_ready([name])
        leader, term = c.wait_leader(timeout=15, min_term=term)
        sent = len(c.records("beat_sent"))
        poll(lambda: len(c.records("beat_sent")) >= sent + 2, 15, f"two ticks after restarting {name}")
    sends = assert_beat_fenced(c)
    runs = [s["cluster_run"] for s in c.records("beat_sent")]
    repeated = {r: k for r, k in Counter(runs).items() if k > 1}
    missing = sorted(set(range(min(runs), max(runs) + 1)) - set(runs))
    times = [s["sent_at"] for s in sends]
    gap = max(b - a for a, b in zip(times, times[1:]))
    measure("rolling_sigterm", restarts=3, runs=len(runs), repeated=repeated, missing=missing, max_gap_s=round(gap, 3))
    assert repeated == {} and missing == []
    assert gap < 2 * c.period + MAX_TIMEOUT, f"a {gap:.2f} s gap in a 1 s schedule"


# -- a full disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A real disk that can fill up: a tmpfs of ``size`` (needs root, as CI has)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Write until the file system says ENOSPC."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            for _ in range(1 << 20):  # bounded: 4 GiB at most
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
        else:
            raise AssertionError(f"{directory} never filled up")


def test_a_standalone_node_with_a_full_disk_exits_3_naming_the_file(tmp_path: Path) -> None:
    ports = free_ports(3)
    nodes = ",".join(f"{HOST}:{p}" for p in ports)
    cli = Path(sys.executable).with_name("celery-cluster")
    with small_tmpfs(tmp_path / "disk") as disk:
        procs = []
        try:
            for i, port in enumerate(ports):
                state = (disk if i == 0 else tmp_path / f"s{i}")
                procs.append(subprocess.Popen(
                    [str(cli), "node", "--listen", f"{HOST}:{port}", "--nodes", nodes, "--state-dir", str(state),
                     "--election-timeout", "0.5-1.0", "--heartbeat-interval", "0.05"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                    preexec_fn=die_with_parent))
            leader_port = poll(lambda: next((p for p in ports if (get_status(p) or {}).get("is_leader")), None),
                               20, "a leader")
            fill(disk)
            if leader_port == ports[0]:
                post(ports[0], "/cluster/stepdown")  # the next term needs a write on the full disk
            else:
                os.kill(procs[ports.index(leader_port)].pid, signal.SIGKILL)  # a new election: a new term
            rc = procs[0].wait(30)
            err = procs[0].stderr.read().decode()  # type: ignore[union-attr]
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_STATE_NOT_DURABLE, err
    assert lines[-1].startswith("celery-cluster: error: cannot save state file ")
    assert str(disk / "state.json") in lines[-1] and "No space left on device" in lines[-1]


def get_status(port: int) -> dict[str, Any] | None:
    try:
        return get(port, "/cluster/status")[1]
    except (OSError, ValueError, http.client.HTTPException):
        return None


def test_a_worker_with_a_full_disk_leaves_the_cluster_and_keeps_running_ordinary_tasks(
        clusters: Any, tmp_path: Path) -> None:
    c: Cluster = clusters("redis")
    victim = c.workers["w1"]
    with small_tmpfs(tmp_path / "disk") as disk:
        victim.state_dir = disk / "state"
        c.start()
        leader, term = c.wait_leader()
        if leader is not victim:  # make it the leader: the worst case
            status, body = post(leader.port, "/cluster/stepdown", json.dumps({"to": victim.address}).encode())
            assert status == 200, body
            leader, term = c.wait_leader(timeout=10, min_term=term + 1)
        assert leader is victim
        fill(disk)
        status, body = post(victim.port, "/cluster/stepdown")  # the successor's term: a write on the full disk
        assert status == 200, body
        health = poll(lambda: (lambda r: r if r[0] == 503 and "state not durable" in str(r[1]) else None)(
            get(victim.port, "/cluster/health")), 15, "the victim to report it left the cluster")
        assert "No space left on device" in health[1]["reasons"][0]
        new, new_term = c.wait_leader(timeout=15, min_term=term + 1, exclude=["w1"])
        st = get(victim.port, "/cluster/status")[1]
        assert not st["is_leader"] and not st["leader_queue_consumed"] and not st["beat_running"]
        assert "leaves the cluster" in victim.log_text() and victim.alive
        # Ordinary tasks still run on it.
        plain = c.app().tasks["tests.celery_app.plain"]
        for i in range(20):
            plain.delay(i)
        poll(lambda: any(r["node"] == "w1" for r in c.records("plain")), 30, "w1 to run an ordinary task")
        assert_beat_fenced(c)


def test_many_entries_due_at_once_across_a_leader_kill(clusters: Any) -> None:
    """300 entries falling due together (recorded MAX_BATCH at a time, then published): the
    leader is killed between two rounds, and every entry's runs are each published once."""
    c: Cluster = clusters("redis", env={"CC_TEST_BULK_ENTRIES": "300", "CC_TEST_BULK_PERIOD": "6"})
    c.start()
    leader, term = c.wait_leader()

    def bulk() -> list[dict[str, Any]]:
        return [r for r in c.records("beat_sent") if r["task"] == "tests.celery_app.plain"]

    poll(lambda: len(bulk()) >= 300, 30, "the first round of 300")
    leader.kill_group()
    new, new_term = c.wait_leader(timeout=10, min_term=term + 1, exclude=[leader.name])
    poll(lambda: len(bulk()) >= 600, 30, "the second round, from the new leader")
    time.sleep(1.0)  # observation window: a duplicate would show up now
    runs = Counter((tuple(r["args"]), r["cluster_run"]) for r in bulk())
    per_entry: dict[tuple[Any, ...], list[int]] = {}
    for (args, run), n in runs.items():
        per_entry.setdefault(args, []).extend([run] * n)
    measure("bulk_across_kill", entries=len(per_entry), publishes=len(bulk()),
            terms=sorted({r["cluster_term"] for r in bulk()}))
    assert len(per_entry) == 300
    assert all(sorted(v)[:2] == [1, 2] and len(v) == len(set(v)) for v in per_entry.values()), \
        {k: v for k, v in per_entry.items() if sorted(v)[:2] != [1, 2] or len(v) != len(set(v))}
    assert {r["cluster_term"] for r in bulk() if r["cluster_run"] == 2} == {new_term}
