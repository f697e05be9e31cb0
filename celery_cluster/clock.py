"""The clock every lease, vote refusal and shared-memory lease is measured on.

``CLOCK_MONOTONIC`` stops while the machine is suspended (and, on some
hypervisors, while a VM is paused): a leader resumed after such a pause would
believe in a lease its peers stopped honouring long ago. ``CLOCK_BOOTTIME``
keeps counting through suspend, so on Linux that is the clock used here. Other
systems fall back to ``time.monotonic()`` (documented in the README: there, a
suspended leader is only as safe as its fencing token).

It is system-wide, so a pool child compares a lease its worker wrote with its
own reading of the same clock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)

#: The clock's name, for logs and status.
NAME = "CLOCK_BOOTTIME" if _BOOTTIME is not None else "monotonic"

lease_clock: Callable[[], float]
if _BOOTTIME is not None:
    lease_clock = functools.partial(time.clock_gettime, _BOOTTIME)
else:  # pragma: no cover - not Linux
    lease_clock = time.monotonic

__all__ = ["lease_clock", "NAME"]
