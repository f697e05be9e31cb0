"""The leadership state shared with pool processes (one mmap'd file, a seqlock)."""

from __future__ import annotations

import itertools
import multiprocessing
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_cluster.clock import lease_clock
from celery_cluster.leader_state import LeaderState


def test_publish_read_and_revoke(tmp_path: Path) -> None:
    state = LeaderState(tmp_path / "leader.mmap", create=True)
    assert state.read() == (0, 0.0) and state.current_term() is None
    state.publish(7, lease_clock() + 60)
    assert state.current_term() == 7
    state.revoke()
    assert state.current_term() is None


def test_an_expired_lease_is_not_leadership(tmp_path: Path) -> None:
    state = LeaderState(tmp_path / "leader.mmap", create=True)
    state.publish(3, lease_clock() - 0.001)
    assert state.read()[0] == 3
    assert state.current_term() is None


def test_a_writer_reopening_the_file_keeps_the_sequence_even(tmp_path: Path) -> None:
    path = tmp_path / "leader.mmap"
    LeaderState(path, create=True)
    with open(path, "r+b") as f:  # a writer died between its first and last store
        f.write(struct.pack("<Q", 5))
    assert LeaderState(path).read() == (0, 0.0)  # readers retry, then say "no leadership"
    writer = LeaderState(path)
    writer.publish(2, 9.5)
    assert LeaderState(path).read() == (2, 9.5)


def _reader(path: str, out: multiprocessing.Queue) -> None:
    out.put(LeaderState(path).current_term())


def test_a_spawned_process_sees_the_writers_lease(tmp_path: Path) -> None:
    path = tmp_path / "leader.mmap"
    state = LeaderState(path, create=True)
    state.publish(5, lease_clock() + 60)  # CLOCK_BOOTTIME is system-wide
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_reader, args=(str(path), out))
    p.start()
    assert out.get(timeout=30) == 5
    p.join(10)


# -- torn reads: every interleaving of one read with one write ---------------------------------

def _consistent(pair: tuple[int, float] | None, old: tuple[int, float], new: tuple[int, float]) -> bool:
    return pair is None or pair in (old, new)


def _interleavings(n_loads: int, n_stores: int):
    """Every order of a reader's loads and a writer's stores (each keeping its own order)."""
    for positions in itertools.combinations(range(n_loads + n_stores), n_stores):
        yield set(positions)


class _SteppedReader:
    """Runs a reader's loads one at a time, running writer stores at the chosen points."""

    def __init__(self, loads: list[Callable[[], object]], stores: list[Callable[[], None]],
                 positions: set[int]) -> None:
        self.loads, self.stores, self.positions = loads, stores, positions

    def run(self) -> list[object]:
        loads, stores, seen = iter(self.loads), iter(self.stores), []
        for i in range(len(self.loads) + len(self.stores)):
            if i in self.positions:
                next(stores)()
            else:
                seen.append(next(loads)())
        return seen


def _loads_of(state: LeaderState) -> list[Callable[[], object]]:
    """The reader's loads, in LeaderState._try_read's order."""
    m = state._map
    return [lambda: struct.unpack_from("<Q", m, 0)[0], lambda: struct.unpack_from("<Q", m, 8)[0],
            lambda: struct.unpack_from("<d", m, 16)[0], lambda: struct.unpack_from("<Q", m, 0)[0]]


def _accept(seen: list) -> tuple[int, float] | None:
    before, term, lease, after = seen
    return (term, lease) if before % 2 == 0 and after == before else None


def test_no_interleaving_of_a_read_with_a_write_yields_a_torn_pair(tmp_path: Path) -> None:
    """The deterministic proof: all 70 orders of the 4 loads and 4 stores."""
    checked = 0
    for positions in _interleavings(4, 4):
        state = LeaderState(tmp_path / "leader.mmap", create=True)
        state.publish(1, 10.5)
        stores = state._write_steps(2, 20.5)
        seen = _SteppedReader(_loads_of(state), stores, positions).run()
        assert _consistent(_accept(seen), (1, 10.5), (2, 20.5)), f"torn read {seen} for order {sorted(positions)}"
        # The real reader gives the same answer on the memory as the write left it.
        assert state.read() == (2, 20.5)
        checked += 1
    assert checked == 70


def test_the_interleaving_check_catches_the_old_protocol(tmp_path: Path) -> None:
    """The same check against the protocol this replaced (a leading and a trailing
    sequence number, compared leading-first): it finds torn reads, so the check above is
    able to fail."""
    torn = 0
    for positions in _interleavings(4, 5):
        buf = bytearray(32)
        struct.pack_into("<QQdQ", buf, 0, 2, 1, 10.5, 2)  # leading seq, term, lease, trailing seq
        stores = [lambda: struct.pack_into("<Q", buf, 0, 3), lambda: struct.pack_into("<Q", buf, 8, 2),
                  lambda: struct.pack_into("<d", buf, 16, 20.5), lambda: struct.pack_into("<Q", buf, 24, 4),
                  lambda: struct.pack_into("<Q", buf, 0, 4)]
        loads = [lambda: struct.unpack_from("<Q", buf, 0)[0], lambda: struct.unpack_from("<Q", buf, 8)[0],
                 lambda: struct.unpack_from("<d", buf, 16)[0], lambda: struct.unpack_from("<Q", buf, 24)[0]]
        seen = _SteppedReader(loads, stores, positions).run()
        torn += not _consistent(_accept(seen), (1, 10.5), (2, 20.5))
    assert torn > 0


# -- torn reads: real processes on real memory ----------------------------------------------

def _write_forever(path: str, started: multiprocessing.Event, stop: multiprocessing.Event) -> None:
    state = LeaderState(path)
    started.set()
    i = 1
    while not stop.is_set() and i < 50_000_000:
        state.publish(i, i + 0.5)  # the pair's own check: lease == term + 0.5
        i += 1


def _read_many(path: str, out: multiprocessing.Queue) -> None:
    """Read until many writes were seen and many reads overlapped one (bounded: 15 s, 5 M reads)."""
    state = LeaderState(path)
    torn = retries = distinct = reads = 0
    last = None
    deadline = time.monotonic() + 15
    while reads < 5_000_000 and not (distinct >= 2000 and retries >= 100):
        reads += 1
        if reads % 1000 == 0 and time.monotonic() > deadline:
            break
        pair = state._try_read()
        if pair is None:
            retries += 1
            continue
        term, lease = pair
        if term and lease != term + 0.5:
            torn += 1
        if pair != last:
            distinct += 1
            last = pair
    out.put((torn, retries, distinct, reads))


@pytest.mark.processes
def test_concurrent_processes_never_read_a_torn_pair(tmp_path: Path) -> None:
    path = tmp_path / "leader.mmap"
    LeaderState(path, create=True)
    ctx = multiprocessing.get_context("spawn")
    started, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    writer = ctx.Process(target=_write_forever, args=(str(path), started, stop), daemon=True)
    writer.start()
    try:
        assert started.wait(30)
        reader = ctx.Process(target=_read_many, args=(str(path), out), daemon=True)
        reader.start()
        torn, retries, distinct, reads = out.get(timeout=120)
        reader.join(10)
    finally:
        stop.set()
        writer.join(10)
        if writer.is_alive():
            writer.kill()
    # The reads really overlapped the writes (else this proves nothing)...
    assert distinct >= 2000 and retries >= 100, (distinct, retries, reads)
    # ...and not one of them returned half of one write and half of another.
    assert torn == 0, (torn, reads)
