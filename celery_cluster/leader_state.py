"""Leadership state shared with pool processes: a 24-byte file mapped in memory.

Prefork children (``fork`` or ``spawn``) never see the worker's bootstep
objects, so the worker writes ``(term, lease_until)`` here and tasks read it.
``lease_until`` is a ``time.monotonic()`` reading: on Linux that clock is
system-wide, so a child compares it with its own ``time.monotonic()``. The
path travels in the environment (set before the pool starts), which both
start methods inherit. Threads, solo and green pools read the same file.

The worker refreshes the lease here every heartbeat; a reader only ever sees
an older (earlier) ``lease_until`` than the node's, so it errs towards "not
leader", never the other way.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

ENV_VAR = "CELERY_CLUSTER_LEADER_STATE"
# A seqlock: sequence (odd while writing), term, lease_until (monotonic), sequence again.
_SEQ = struct.Struct("<Q")
_DATA = struct.Struct("<Qd")
_SIZE = 2 * _SEQ.size + _DATA.size


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
        self._seq = 0

    def publish(self, term: int, lease_until: float) -> None:
        """Writer side (the worker's main process only)."""
        self._seq += 2
        _SEQ.pack_into(self._map, 0, self._seq - 1)
        _DATA.pack_into(self._map, _SEQ.size, term, lease_until)
        _SEQ.pack_into(self._map, _SEQ.size + _DATA.size, self._seq)
        _SEQ.pack_into(self._map, 0, self._seq)

    def clear(self) -> None:
        self.publish(0, 0.0)

    def read(self) -> tuple[int, float]:
        """(term, lease_until); a torn read during a write is retried."""
        for _ in range(100):
            (before,) = _SEQ.unpack_from(self._map, 0)
            term, lease_until = _DATA.unpack_from(self._map, _SEQ.size)
            (after,) = _SEQ.unpack_from(self._map, _SEQ.size + _DATA.size)
            if before == after and before % 2 == 0:
                return term, lease_until
        return 0, 0.0

    def current_term(self) -> int | None:
        """The term this process may act as leader in right now, or None."""
        term, lease_until = self.read()
        return term if term and time.monotonic() < lease_until else None

    def close(self) -> None:
        self._map.close()


_shared: LeaderState | None = None


def shared() -> LeaderState | None:
    """The state file named by the environment (opened once per process), if any."""
    global _shared
    if _shared is None:
        path = os.environ.get(ENV_VAR)
        if path and os.path.exists(path):
            _shared = LeaderState(path)
    return _shared
