"""The leader's beat publishes within a bound, and nothing of a failed publish arrives later.

A stock beat publishes on a connection with no socket timeouts and kombu's publish retries:
cut off from its broker it can block for minutes (Redis waits for a reply that never comes),
and bytes it wrote before the cut are delivered whenever the network heals. For a leader both
are wrong: a firing it recorded but cannot send stalls the whole fleet's schedule, and a late
delivery after another member took over and sent the run would be a duplicate.

So the replicated beat publishes on a connection of its own, built by :func:`bounded_connection`:

- **Redis**: connect and reply timeouts of half the bound each;
- **AMQP** (py-amqp): publisher confirms (each message is acknowledged by the broker, waited
  for at most half the bound) and a connect timeout of half the bound;
- **both**: its sockets close with a reset (``SO_LINGER`` 0): what the kernel still holds of
  a failed publish is discarded when the connection is dropped, instead of being sent
  whenever the path heals (measured: a plain close of a socket whose publish timed out
  behind a cut let the message reach Redis once the cut healed a moment later; see
  ``tests/test_beat_publish.py``); and ``TCP_USER_TIMEOUT`` of a quarter of the bound, so
  the kernel gives up on a connection whose bytes go unacknowledged;
- one attempt per publish (``retry=False``) and per connect: a retry is the next firing.

The bound is the minimum election timeout, at least :data:`MIN_BOUND`. A publish that fails
with a broker error is *unrecorded* by the caller (see :mod:`celery_cluster.beat`).
Other transports keep their own behaviour: only the single attempt applies to them.
"""

from __future__ import annotations

import functools
import socket
import struct
from typing import Any

#: The publish bound never goes below this (seconds): a fast election profile (0.15 s) must not
#: turn one retransmitted packet into a failed publish.
MIN_BOUND = 0.5


def publish_bound(min_election_timeout: float) -> float:
    return max(float(min_election_timeout), MIN_BOUND)


def _user_timeout_ms(bound: float) -> int:
    return max(int(bound * 1000 / 4), 100)


def bounded_transport_options(driver: str, base: dict[str, Any], bound: float) -> dict[str, Any]:
    """``base`` (the app's ``broker_transport_options``) with the bounds for ``driver``."""
    opts = dict(base)
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    opts["max_retries"] = 0  # kombu's connect: the first attempt only, no retries
    opts["connect_retries_timeout"] = bound / 2
    if driver == "redis":
        opts.update(socket_timeout=bound / 2, socket_connect_timeout=bound / 2, retry_on_timeout=False)
        if user_timeout is not None:
            opts["socket_keepalive"] = True  # redis-py sets the options below only with it
            opts["socket_keepalive_options"] = {**(base.get("socket_keepalive_options") or {}),
                                                user_timeout: _user_timeout_ms(bound)}
    elif driver == "amqp":
        opts["confirm_publish"] = True
        if user_timeout is not None:
            opts["socket_settings"] = {**(base.get("socket_settings") or {}), user_timeout: _user_timeout_ms(bound)}
    return opts


_LINGER_0 = struct.pack("ii", 1, 0)


def _reset_on_close(sock: Any) -> None:
    """Close ``sock`` with a reset, discarding unsent bytes, never delivering them later."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)


@functools.cache
def _resetting_redis_channel(base: Any) -> type:
    """kombu's Redis channel class ``base``, its redis-py connections made with
    :func:`_reset_on_close` sockets (TCP and TLS; Unix sockets and Sentinel as they are)."""
    def resetting(cls: Any) -> type:
        class Resetting(cls):
            def _connect(self) -> Any:
                sock = super()._connect()
                _reset_on_close(sock)
                return sock

        Resetting.__name__ = Resetting.__qualname__ = f"Resetting{cls.__name__}"
        return Resetting

    return type(f"Bounded{base.__name__}", (base,), {"connection_class": resetting(base.connection_class),
                                                     "connection_class_ssl": resetting(base.connection_class_ssl)})


def bounded_connection(app: Any, bound: float) -> Any:
    """A connection for the leader's beat to publish on, within ``bound`` seconds a publish."""
    conn = app.connection_for_write(connect_timeout=bound / 2)
    transport = conn.transport  # made here, not connected yet: the options below are read on connect
    driver = getattr(transport, "driver_type", "")
    conn.transport_options = bounded_transport_options(driver, conn.transport_options, bound)
    if driver == "redis" and getattr(type(transport).Channel, "connection_class", None) is not None:
        transport.Channel = _resetting_redis_channel(type(transport).Channel)
    elif driver == "amqp":
        establish = transport.establish_connection

        def establish_resetting() -> Any:
            amqp_conn = establish()
            sock = getattr(getattr(amqp_conn, "transport", None), "sock", None)
            if sock is not None:
                _reset_on_close(sock)
            return amqp_conn

        transport.establish_connection = establish_resetting
    return conn


def publish_options(bound: float) -> dict[str, Any]:
    """Options for ``apply_async`` on the bounded connection: one attempt, the confirm bounded."""
    return {"retry": False, "confirm_timeout": bound / 2, "timeout": bound / 2}


def drop(connection: Any) -> None:
    """Release a connection a publish failed on without talking to the broker (a close could
    wait on it): its sockets close with a reset, discarding what they still hold."""
    try:
        connection.collect()
    except Exception:  # noqa: BLE001 - best effort: it is being thrown away
        pass


def is_broker_error(exc: BaseException, connection: Any) -> bool:
    """Whether ``exc`` (or what it wraps: Celery's beat re-raises as SchedulingError) says the
    broker could not be reached or did not confirm - as opposed to, say, arguments that do
    not serialize, which no other member could send either."""
    errors: tuple[type[BaseException], ...] = (OSError,)  # TimeoutError and socket.timeout among them
    try:
        errors += tuple(connection.connection_errors) + tuple(connection.channel_errors)
    except Exception:  # noqa: BLE001 - a transport that cannot say: the plain socket errors only
        pass
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, errors) or type(cur).__name__ in ("MessageNacked", "RecoverableConnectionError"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


__all__ = ["MIN_BOUND", "bounded_connection", "bounded_transport_options", "drop", "is_broker_error",
           "publish_bound", "publish_options"]
