"""The log limiter on its own, with a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from celery_cluster.log_limit import LogLimiter


def test_once_then_a_count_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = LogLimiter(logging.getLogger("cc.limit"), every=30.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="cc.limit")
    for _ in range(10):
        limiter.warning("peer-a", "refused %s", "a")
        now[0] += 1.0
    limiter.warning("peer-b", "refused %s", "b")  # another key: its own first line
    now[0] = 130.5
    limiter.warning("peer-a", "refused %s", "a")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a", "refused b", "refused a (and 9 more like it in the last 30 s)"]
