"""Leadership state shared with pool processes: a 24-byte file mapped in memory.

Prefork children (``fork`` or ``spawn``) never see the worker's bootstep
objects, so the worker writes ``(term, lease_until)`` here and tasks read it.
``lease_until`` is a :func:`~celery_cluster.clock.lease_clock` reading
(``CLOCK_BOOTTIME`` on Linux, system-wide), so a child compares it with its own
reading of the same clock. The path travels in the environment (set before the
pool starts), which both start methods inherit. Threads and solo pools read
the same file.

Only the node writes here, under its lock (:class:`~celery_cluster.node.Node`
is the :class:`~celery_cluster.node.LeaseSink`): every extension of the lease
as it happens, and the revocation on the thread that gives leadership up,
before anything lets another node be elected. The lease written never ends
later than the node's own.

A seqlock guards the pair: the writer makes the sequence odd, stores the
data, then makes it even again; the reader loads the sequence, the data, and
the sequence again, and keeps the data only if both loads saw the same even
number - any write that overlapped the read changed it. (The reverse check,
comparing the sequence stored *first* with one stored *last*, accepts torn
reads: see ``tests/test_leader_state.py``.) It relies on stores becoming
visible in program order, which x86-64 guarantees (TSO); each access is a
separate ``struct`` call, so the interpreter never reorders them.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

from .clock import lease_clock

ENV_VAR = "CELERY_CLUSTER_LEADER_STATE"
_SEQ = struct.Struct("<Q")  # at 0: even when stable, odd while a write is under way
_TERM = struct.Struct("<Q")  # at 8
_LEASE = struct.Struct("<d")  # at 16: lease_until on lease_clock()
_SIZE = 24
_RETRIES = 100


class LeaderState:
    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.write(bytes(_SIZE))
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        (self._seq,) = _SEQ.unpack_from(self._map, 0)
        self._seq += self._seq % 2  # a writer that died mid-write left it odd

    # -- writer (the node, under its lock) ------------------------------------------------

    def publish(self, term: int, lease_until: float) -> None:
        for store in self._write_steps(term, lease_until):
            store()

    def revoke(self) -> None:
        self.publish(0, 0.0)


    def _write_steps(self, term: int, lease_until: float) -> list[Callable[[], None]]:
        """The stores of one write, in order (tests interleave them with a reader's loads)."""
        seq = self._seq

        def done() -> None:
            self._seq = seq + 2
            _SEQ.pack_into(self._map, 0, seq + 2)

        return [
            lambda: _SEQ.pack_into(self._map, 0, seq + 1),
            lambda: _TERM.pack_into(self._map, 8, term),
            lambda: _LEASE.pack_into(self._map, 16, lease_until),
            done,
        ]

    # -- readers (any process) ---------------------------------------------------------

    def _try_read(self) -> tuple[int, float] | None:
        """One attempt: the pair, or None if a write overlapped it."""
        (before,) = _SEQ.unpack_from(self._map, 0)
        if before % 2:
            return None
        (term,) = _TERM.unpack_from(self._map, 8)
        (lease_until,) = _LEASE.unpack_from(self._map, 16)
        (after,) = _SEQ.unpack_from(self._map, 0)
        return (term, lease_until) if after == before else None

    def read(self) -> tuple[int, float]:
        """(term, lease_until); a read that overlaps a write is retried. If writes keep
        overlapping, ``(0, 0.0)``: no leadership, the safe answer."""
        for _ in range(_RETRIES):
            pair = self._try_read()
            if pair is not None:
                return pair
        return 0, 0.0

    def current_term(self) -> int | None:
        """The term this process may act as leader in right now, or None."""
        term, lease_until = self.read()
        return term if term and lease_clock() < lease_until else None


_shared: LeaderState | None = None


def shared() -> LeaderState | None:
    """The state file named by the environment (opened once per process), if any."""
    global _shared
    if _shared is None:
        path = os.environ.get(ENV_VAR)
        if path and os.path.exists(path):
            _shared = LeaderState(path)
    return _shared
