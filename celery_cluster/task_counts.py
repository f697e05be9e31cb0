"""Counts of leader-only task outcomes, shared by a worker's pool processes.

Leader-only bodies run in pool children (prefork), whose counters the worker process -
which serves ``/cluster/metrics`` - cannot see. So the outcomes are counted in a small file
mapped in memory next to ``leader.mmap``: one 8-byte slot per outcome, each increment a
read-modify-write under an exclusive ``flock`` (a few microseconds; leader-only tasks are
not that frequent). The path travels in the environment like the leader state's.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

ENV_VAR = "CELERY_CLUSTER_TASK_COUNTS"
#: ``run``: a body started under a valid lease; ``requeued``: a follower sent a prefetched
#: message back to the leader queue; ``republished``: one routed elsewhere by hand was
#: re-published to the leader queue.
OUTCOMES = ("run", "requeued", "republished")
_SLOT = struct.Struct("<Q")
_SIZE = _SLOT.size * len(OUTCOMES)


class TaskCounts:
    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:  # counts start from 0 with each worker
                f.write(bytes(_SIZE))
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, _SIZE)

    def inc(self, outcome: str) -> None:
        offset = OUTCOMES.index(outcome) * _SLOT.size
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            (value,) = _SLOT.unpack_from(self._map, offset)
            _SLOT.pack_into(self._map, offset, value + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def snapshot(self) -> dict[str, int]:
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            return {name: _SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i, name in enumerate(OUTCOMES)}
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


_shared: TaskCounts | None = None
_shared_pid: int | None = None


def shared() -> TaskCounts | None:
    """The counts file named by the environment (opened once per process), if any."""
    global _shared, _shared_pid
    if _shared is None or _shared_pid != os.getpid():
        # After a fork the inherited descriptor shares its flock with the parent's: reopen.
        path = os.environ.get(ENV_VAR)
        _shared = TaskCounts(path) if path and os.path.exists(path) else None
        _shared_pid = os.getpid()
    return _shared


def count(outcome: str) -> None:
    """Count one outcome if this process belongs to a clustered worker (else nothing)."""
    try:
        counts = shared()
        if counts is not None:
            counts.inc(outcome)
    except OSError:  # a metric must never change what happens to the task
        pass
