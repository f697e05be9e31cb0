"""Warnings that repeat many times a second (a peer with the wrong secret is refused on every
heartbeat) are logged once, then at most once per interval with how many were held back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any


class LogLimiter:
    def __init__(self, logger: logging.Logger, every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.every, self.clock = logger, every, clock
        self._lock = threading.Lock()
        self._state: dict[Hashable, tuple[float, int]] = {}  # key -> (last logged at, held back since)

    def warning(self, key: Hashable, msg: str, *args: Any) -> None:
        """Log ``msg % args`` now if ``key`` was not logged within ``every`` seconds;
        otherwise count it, and say how many were held back next time it is logged."""
        now = self.clock()
        with self._lock:
            last, held = self._state.get(key, (-float("inf"), 0))
            if now - last < self.every:
                self._state[key] = (last, held + 1)
                return
            self._state[key] = (now, 0)
        if held:
            msg += f" (and {held} more like it in the last {now - last:.0f} s)"
        self.log.warning(msg, *args)
