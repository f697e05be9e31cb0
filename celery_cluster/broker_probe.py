"""Does this worker's broker answer? A bounded-time probe, for leadership that follows the broker.

Every ``interval`` seconds the probe asks the broker one round-trip question on a connection
of its own - a passive declare of the leader queue (answered "exists" or "not found": either
is an answer) - and waits at most ``timeout`` for it. The question runs on a helper thread,
so a connection stuck on an unreachable host (a silent drop holds a TCP connection open)
never blocks the probe: past the timeout the broker counts as down; a question unanswered
for a few timeouts is abandoned with its connection (closed in the background), and a new
one is made. A refused or reset connection fails at once.

The verdict goes to ``on_health(bool)`` after every probe; the node debounces it (a leader
hands over only after the broker grace period of continuous failures). With ``consumer_ok``
(the worker's consumer has its broker connection), an answer counts only while the worker's
own consumer is connected too - once it has been: a consumer that lost its connection and is
reconnecting cannot take leader-only tasks, so the broker does not work *for this worker*.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("celery_cluster.broker")

#: Seconds between probes.
DEFAULT_INTERVAL = 0.5
#: A question unanswered for this many timeouts is given up (and its connection closed).
ABANDON_AFTER = 4


class BrokerProbe:
    def __init__(self, app: Any, queue: str, on_health: Callable[[bool], None], *, timeout: float,
                 interval: float = DEFAULT_INTERVAL, consumer_ok: Callable[[], bool] | None = None) -> None:
        self.app = app
        self.consumer_ok = consumer_ok
        self._consumer_seen = False  # the consumer has had its connection once (start-up is not an outage)
        self.queue = queue
        self.on_health = on_health
        self.timeout = timeout
        self.interval = interval
        self.healthy: bool | None = None
        #: The broker answered the last probe (the consumer's connection aside): whether a
        #: publish can go through, which is what the leader's beat waits for.
        self.answers: bool | None = None
        self.last_error: str | None = None
        self._conn: Any = None
        self._inflight: tuple[threading.Event, dict[str, Any], float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="celery-cluster-broker-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop probing; never waits (a worker's shutdown must not wait on a broker that may
        not answer): the probe thread ends at its next look, its connection is closed in
        the background."""
        self._stop.set()
        self._drop_connection()

    def _run(self) -> None:
        while not self._stop.is_set():
            healthy = self.check()
            if healthy != self.healthy:
                if healthy:
                    log.info("[cluster] the broker answers")
                else:
                    log.warning("[cluster] the broker did not answer within %.1f s: %s", self.timeout,
                                self.last_error)
            self.healthy = healthy
            try:
                self.on_health(healthy)
            except Exception:
                log.exception("[cluster] reporting broker health failed")
            self._stop.wait(self.interval)

    def check(self) -> bool:
        """One verdict: the broker answered within the timeout, and the worker's consumer (if
        told how to ask) has its connection - or never had one yet (start-up)."""
        healthy = self.answers = self.probe()
        if healthy and self.consumer_ok is not None:
            if self.consumer_ok():
                self._consumer_seen = True
            elif self._consumer_seen:
                self.last_error = "the worker's consumer has lost its broker connection (reconnecting)"
                return False
        return healthy

    def probe(self) -> bool:
        """One question to the broker; True if it answered within the timeout.

        A question still unanswered at the timeout is not abandoned at once: a slow broker
        answers the next probe's wait (and a new connection would cost several round trips
        more); only one unanswered for ``ABANDON_AFTER`` timeouts is given up, its
        connection closed in the background and a new one made."""
        if self._inflight is None:
            done = threading.Event()
            outcome: dict[str, Any] = {}
            threading.Thread(target=self._ask_into, args=(done, outcome), name="celery-cluster-broker-ask",
                             daemon=True).start()
            self._inflight = (done, outcome, time.monotonic())
        done, outcome, started = self._inflight
        if not done.wait(self.timeout):
            self.last_error = f"no answer for {time.monotonic() - started:.1f} s"
            if time.monotonic() - started >= ABANDON_AFTER * self.timeout:
                self._inflight = None
                self._drop_connection()  # stuck on a silent network: start afresh next time
            return False
        self._inflight = None
        if outcome.get("ok"):
            self.last_error = None
            return True
        self.last_error = outcome.get("error")
        self._drop_connection()
        return False

    def _ask_into(self, done: threading.Event, outcome: dict[str, Any]) -> None:
        try:
            self._ask()
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - any failure means "no answer"
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            done.set()

    def _ask(self) -> None:
        conn = self._conn
        if conn is None:
            conn = self._conn = self.app.connection_for_write()
            conn.ensure_connection(max_retries=1, timeout=self.timeout)
        channel = conn.default_channel
        try:
            channel.queue_declare(queue=self.queue, passive=True)
        except conn.channel_errors:
            # "not found" (the leader queue may not exist yet) is an answer: the broker works.
            # AMQP closes the channel with that error: open a new one next time. (A virtual
            # transport's channel, Redis's, stays usable: keep it, and its connection.)
            if getattr(conn.transport, "driver_type", "") == "amqp":
                conn._default_channel = None

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            threading.Thread(target=_close_quietly, args=(conn,), daemon=True).start()


def _close_quietly(conn: Any) -> None:
    try:
        conn.collect()  # release without waiting on a broker that may never answer
    except Exception:  # noqa: BLE001
        pass


__all__ = ["BrokerProbe", "DEFAULT_INTERVAL"]
