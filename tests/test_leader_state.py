"""The leadership state shared with pool processes (one mmap'd file)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from celery_cluster.leader_state import LeaderState


def test_publish_read_and_clear(tmp_path: Path) -> None:
    state = LeaderState(tmp_path / "leader.mmap", create=True)
    assert state.read() == (0, 0.0) and state.current_term() is None
    state.publish(7, time.monotonic() + 60)
    assert state.current_term() == 7
    state.clear()
    assert state.current_term() is None


def test_an_expired_lease_is_not_leadership(tmp_path: Path) -> None:
    state = LeaderState(tmp_path / "leader.mmap", create=True)
    state.publish(3, time.monotonic() - 0.001)
    assert state.read()[0] == 3
    assert state.current_term() is None


def _reader(path: str, out: multiprocessing.Queue) -> None:
    reader = LeaderState(path)
    out.put(reader.current_term())


def test_a_spawned_process_sees_the_writers_lease(tmp_path: Path) -> None:
    path = tmp_path / "leader.mmap"
    state = LeaderState(path, create=True)
    state.publish(5, time.monotonic() + 60)  # time.monotonic() is system-wide on Linux
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_reader, args=(str(path), out))
    p.start()
    assert out.get(timeout=30) == 5
    p.join(10)


def test_reads_are_consistent_while_a_writer_runs(tmp_path: Path) -> None:
    path = tmp_path / "leader.mmap"
    writer = LeaderState(path, create=True)
    reader = LeaderState(path)
    for i in range(1, 20001):
        writer.publish(i, float(i))
        term, lease = reader.read()
        assert lease == float(term)  # never half of one write and half of another
