"""Parsing and validation of settings: node addresses, the node list, timing, the state directory.

Pure: no I/O beyond ``logging`` warnings (and reading the environment for the default
state directory). Every error is a :class:`ConfigurationError` that quotes the offending
value and says what to change.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

logger = logging.getLogger("celery_cluster")

# One DNS label; underscores are tolerated because container runtimes hand them out as names.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV4_LIKE_RE = re.compile(r"[0-9.]+")
_BRACKETED_RE = re.compile(r"\[([^\[\]]+)\]:([^:]*)")
# ASCII digits only: str.isdigit() would let through other scripts' digits.
_PORT_RE = re.compile(r"[0-9]{1,5}")
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_RANGE_RE = re.compile(rf"\s*({_NUMBER})\s*(?:-\s*({_NUMBER})\s*)?")
_UNSAFE_PATH_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_HOSTNAME_LEN = 253


def _invalid_address(text: object, hint: str = "") -> ConfigurationError:
    return ConfigurationError(f"invalid node address {text!r}: expected HOST:PORT{hint}")


def _parse_port(text: str, port: str) -> int:
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _invalid_address(text, " with a port from 1 to 65535")
    return int(port)


def _split(text: object) -> tuple[str, int, bool]:
    """(host without brackets, port, is_ipv6) of a node address, normalised."""
    if not isinstance(text, str):
        raise _invalid_address(text)
    stripped = text.strip()
    if not stripped or any(c.isspace() for c in stripped):
        raise _invalid_address(text)

    bracketed = _BRACKETED_RE.fullmatch(stripped)
    if bracketed:
        host, port = bracketed.groups()
        try:
            # Canonical (compressed, lowercase) form, so [0:0::1] and [::1] compare equal.
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise _invalid_address(text, " (only IPv6 addresses go in brackets)") from None
        return host, _parse_port(text, port), True
    if stripped.startswith("["):
        raise _invalid_address(text, " (an IPv6 address goes in brackets before the port, e.g. [::1]:8899)")

    host, sep, port = stripped.rpartition(":")
    if not sep or not host:
        raise _invalid_address(text)
    if ":" in host or "[" in host or "]" in host:
        raise _invalid_address(text, " (write IPv6 addresses in brackets, e.g. [::1]:8899)")
    if _IPV4_LIKE_RE.fullmatch(host):
        # Digits and dots only: must be a real IPv4 address, not a typo such as 127.0.0.1.1.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _invalid_address(text, " (the host is not a valid IPv4 address)") from None
    elif len(host) > _MAX_HOSTNAME_LEN or not _HOSTNAME_RE.fullmatch(host):
        raise _invalid_address(text, " (the host is not a valid hostname or IP address)")
    return host.lower(), _parse_port(text, port), False


def parse_address(text: str) -> str:
    """Normalise a node address: ``host:port``, ``[ipv6]:port`` or ``hostname:port``.

    Surrounding spaces are stripped, hostnames lowercased and IPv6 addresses written in
    canonical form inside brackets, so the same node is always spelled the same way (node
    addresses are compared as strings across the cluster). No DNS lookups: ``localhost:1``
    and ``127.0.0.1:1`` stay different addresses.
    """
    host, port, is_ipv6 = _split(text)
    return f"[{host}]:{port}" if is_ipv6 else f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of a node address, the host without brackets (ready for ``socket.bind``)."""
    host, port, _ = _split(address)
    return host, port


def parse_nodes(nodes: str | Iterable[str]) -> tuple[str, ...]:
    """The cluster's node list, from a comma-separated string or an iterable of addresses.

    Order is kept. Empty entries are refused rather than skipped: ``a,,c`` usually means a
    template variable expanded to nothing, and silently running with fewer nodes would
    change the majority size.
    """
    entries = nodes.split(",") if isinstance(nodes, str) else list(nodes)
    if all(isinstance(e, str) and not e.strip() for e in entries):
        raise ConfigurationError("the node list is empty: give every node's HOST:PORT, comma-separated")
    parsed: list[str] = []
    for entry in entries:
        if isinstance(entry, str) and not entry.strip():
            shown = nodes if isinstance(nodes, str) else entries
            raise ConfigurationError(
                f"empty entry in the node list {shown!r}: "
                "remove the stray comma or fill in the missing address"
            )
        address = parse_address(entry)
        if address in parsed:
            raise ConfigurationError(f"duplicate node address {address} in the node list")
        parsed.append(address)
    return tuple(parsed)


@dataclass(frozen=True)
class Membership:
    """The cluster's node list and this node's place in it, parsed and checked once.

    Build it with :meth:`parse`; the worker's settings, the standalone CLI and
    :class:`~celery_cluster.Cluster` all take the same object, so the list is parsed,
    normalised and checked (this node included, no duplicates, even sizes warned about)
    in exactly one place.
    """

    members: tuple[str, ...]
    advertise: str

    @classmethod
    def parse(cls, nodes: str | Iterable[str], advertise: str) -> Membership:
        """Refuse a node list without this node; warn (once) about an even-sized cluster.

        A node outside the list would count votes against the wrong majority.
        """
        members = parse_nodes(nodes)
        me = parse_address(advertise)
        if me not in members:
            raise ConfigurationError(
                f"the node list must include this node's advertise address {me} (got: {', '.join(members)})"
            )
        _warn_even(len(members))
        return cls(members, me)

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(m for m in self.members if m != self.advertise)


def check_membership(nodes: str | Iterable[str], advertise: str) -> None:
    """:meth:`Membership.parse` for its checks alone."""
    Membership.parse(nodes, advertise)


def _warn_even(count: int) -> None:
    if count % 2 == 0:
        # A majority of n is n // 2 + 1, so adding a node to an odd cluster raises the
        # majority without raising the number of failures it survives.
        tolerated = (count - 1) // 2
        if tolerated == 0:
            detail = "2 nodes need both up, so they tolerate no failure, like 1"
        else:
            plural = "" if tolerated == 1 else "s"
            detail = f"{count} nodes tolerate {tolerated} failure{plural}, like {count - 1}"
        logger.warning(
            "the node list has %d nodes, an even number, which tolerates no more failures than "
            "one node fewer (%s): use %d or %d nodes",
            count,
            detail,
            count - 1,
            count + 1,
        )


def _seconds(value: object, original: object) -> float:
    if not (_is_number(value) or isinstance(value, str)):
        raise _invalid_range(original)
    try:
        seconds = float(value)  # type: ignore[arg-type]  # a number or a str, checked above
    except ValueError:
        raise _invalid_range(original) from None
    if not math.isfinite(seconds):
        raise _invalid_range(original)
    return seconds


_RANGE_FORMS = "expected MIN-MAX seconds such as 1.0-2.0, or MIN alone"
#: Longer election timeouts are surely a unit mistake (milliseconds), and would leave a
#: dead leader unreplaced for minutes.
MAX_ELECTION_TIMEOUT = 60.0


def _invalid_range(value: object, problem: str = _RANGE_FORMS) -> ConfigurationError:
    return ConfigurationError(f"invalid election timeout {value!r}: {problem}")


def parse_timeout_range(text: str | tuple[float, float] | list[float] | float) -> tuple[float, float]:
    """An election timeout range in seconds: ``"1.0-2.0"``, ``"1-2"``, ``(1.0, 2.0)``.

    A single number ``MIN`` means ``(MIN, 2 * MIN)``. The maximum must exceed the minimum:
    the random spread is what keeps followers from all campaigning at once (split votes).
    """
    if isinstance(text, str):
        match = _RANGE_RE.fullmatch(text)
        if not match:
            raise _invalid_range(text)
        low_text, high_text = match.groups()
        low = float(low_text)
        high = float(high_text) if high_text is not None else 2 * low
    elif isinstance(text, (tuple, list)):
        if len(text) != 2:
            raise _invalid_range(text)
        low, high = _seconds(text[0], text), _seconds(text[1], text)
    else:
        low = _seconds(text, text)
        high = 2 * low
    if not math.isfinite(low) or not math.isfinite(high):
        raise _invalid_range(text)
    if low <= 0:
        raise _invalid_range(text, "the minimum must be more than 0 seconds")
    if high > MAX_ELECTION_TIMEOUT:
        raise _invalid_range(text, f"at most {MAX_ELECTION_TIMEOUT:g} s - the values are seconds, not "
                                   "milliseconds (1.0-2.0 is one to two seconds)")
    if high <= low:
        raise _invalid_range(text, f"the maximum {high!r} s must be greater than the minimum {low!r} s")
    return low, high


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True as a number of seconds is a mistake.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: The one table of timing defaults (etcd's: a 100 ms heartbeat, a 1 s election timeout
#: randomised up to 2 s); every module that needs a default takes it from here.
DEFAULT_ELECTION_TIMEOUT: tuple[float, float] = (1.0, 2.0)
DEFAULT_HEARTBEAT_INTERVAL = 0.1
DEFAULT_MAX_CLOCK_DRIFT = 0.05
#: How long a leader's broker may be unreachable before it hands over to a member whose
#: broker works (seconds).
DEFAULT_BROKER_GRACE = 3.0


def format_range(timeout: tuple[float, float]) -> str:
    return f"{timeout[0]!r}-{timeout[1]!r}"


@dataclass(frozen=True)
class Timing:
    """Raft timing, in seconds.

    ``election_timeout`` may be given in any form :func:`parse_timeout_range` accepts; it is
    stored as a ``(min, max)`` tuple of floats. ``max_clock_drift`` is the fraction by which
    two nodes' clocks may run at different rates (0.05 = 5 %); leases shrink by it.
    """

    election_timeout: tuple[float, float] = DEFAULT_ELECTION_TIMEOUT
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    max_clock_drift: float = DEFAULT_MAX_CLOCK_DRIFT
    #: How long a leader's broker may be down before it hands over to a member whose works.
    broker_grace: float = DEFAULT_BROKER_GRACE

    def __post_init__(self) -> None:
        # Frozen dataclass: normalising fields requires object.__setattr__.
        timeout = parse_timeout_range(self.election_timeout)
        object.__setattr__(self, "election_timeout", timeout)

        heartbeat = self.heartbeat_interval
        if not _is_number(heartbeat) or not math.isfinite(heartbeat) or heartbeat <= 0:
            raise ConfigurationError(f"heartbeat interval {heartbeat!r} must be a number of seconds above 0")
        heartbeat = float(heartbeat)
        object.__setattr__(self, "heartbeat_interval", heartbeat)
        # Several heartbeats must fit in the shortest timeout, or one lost packet deposes the leader.
        if heartbeat > timeout[0] / 4:
            raise ConfigurationError(
                f"heartbeat interval {heartbeat!r} s must be at most a quarter of the minimum election "
                f"timeout {timeout[0]!r} s (raise the timeout or lower the interval)"
            )

        drift = self.max_clock_drift
        if not _is_number(drift) or not 0 <= drift < 0.5:
            raise ConfigurationError(
                f"max clock drift {drift!r} must be a fraction from 0 up to (not including) 0.5, "
                "e.g. 0.05 for 5 %"
            )
        object.__setattr__(self, "max_clock_drift", float(drift))

        grace = self.broker_grace
        if isinstance(grace, str):
            try:
                grace = float(grace)
            except ValueError:
                raise ConfigurationError(f"broker grace {grace!r} must be a number of seconds") from None
        if not _is_number(grace) or not math.isfinite(grace) or grace < 0:
            raise ConfigurationError(f"broker grace {grace!r} must be a number of seconds, 0 or more")
        object.__setattr__(self, "broker_grace", float(grace))

    @property
    def rpc_timeout(self) -> float:
        """Per-request HTTP timeout: a few heartbeats, but at most half the minimum election timeout.

        A slow peer must not stall a leader's heartbeat round long enough for followers to
        time out; the 0.05 s floor leaves room for a loaded loopback.
        """
        return min(max(5 * self.heartbeat_interval, 0.05), self.election_timeout[0] / 2)


def default_state_dir(advertise: str, role: str | None = None) -> Path:
    """The documented per-node default state directory.

    ``$XDG_STATE_HOME/celery-cluster/<role>/<name>``, or ``~/.local/state/celery-cluster/...``
    when ``XDG_STATE_HOME`` is unset or not absolute (as the XDG spec requires), where
    ``<name>`` is the normalised advertise address with every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_``: ``127.0.0.1_8899``, ``__1__8899`` for ``[::1]:8899``,
    and ``<role>`` says who keeps state there - ``node`` for ``celery-cluster node``,
    ``worker-<app name>`` for a worker - so that a standalone node and a worker (or two
    apps) that use the same address one after the other never share a term or a vote.
    One directory per address lets several nodes share a machine without sharing a vote.

    Without ``role`` (and for a directory an earlier release made): ``celery-cluster/<name>``.
    """
    name = _UNSAFE_PATH_CHARS_RE.sub("_", parse_address(advertise))
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state") / "celery-cluster"
    if role is None:
        return base / name
    keyed = base / _UNSAFE_PATH_CHARS_RE.sub("_", role) / name
    earlier = base / name
    if not keyed.exists() and (earlier / "state.json").exists():
        # Keep the term and vote an earlier release saved: starting afresh could vote twice.
        logger.warning("using the state directory %s an earlier release made; move it to %s "
                       "(or set the state directory) to keep it apart from other roles and apps", earlier, keyed)
        return earlier
    return keyed
