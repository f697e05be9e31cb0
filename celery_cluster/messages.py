"""The messages nodes exchange, the persisted hard state, and their JSON codec.

Pure data: no I/O. The codec validates everything it decodes, so a malformed
peer message is a :class:`ProtocolError` before it can reach the state machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

#: A payload version: (term in which the leader stamped it, sequence number).
#: Compared as a tuple, like Raft's (last log term, last log index).
Version = tuple[int, int]

#: Numbers above this are absurd (2**53: exact in JSON doubles); the state file's bound.
MAX_NUMBER = 2**53
#: The largest term or payload sequence number a message may carry: a node must be able to
#: count on from any term it accepts (campaign, re-stamp) and still save it, so messages stop
#: far below the state file's bound - 2**52 elections from there are out of reach.
MAX_TERM = 2**52
#: Longest node address accepted in a message.
MAX_ADDRESS_LEN = 300
#: Largest replicated payload (characters).
MAX_PAYLOAD_LEN = 4 * 1024 * 1024
#: Most voting members a configuration may list.
MAX_MEMBERS = 64
#: Longest cluster id (a hex digest of the bootstrap member list).
MAX_CLUSTER_ID_LEN = 64


def cluster_id(members: tuple[str, ...] | list[str]) -> str:
    """The id of a cluster bootstrapped with ``members``: the same set gives the same id.

    Every message carries its sender's id, so nodes started with different static member
    lists never vote for each other or follow each other's leader.
    """
    canonical = ",".join(sorted(set(members)))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class HardState:
    """What a node must remember across restarts, written before any reply that depends on it."""

    term: int = 0
    voted_for: str | None = None
    payload_version: Version = (0, 0)
    payload: str = ""
    #: The replicated configuration (voting members), part of the state ``payload_version``
    #: versions; empty until a leader first stamps the bootstrap list into it.
    members: tuple[str, ...] = ()
    #: The version at which ``members`` last changed.
    config_version: Version = (0, 0)
    #: The cluster id this replicated state belongs to (empty with ``members``).
    cluster: str = ""


@dataclass(frozen=True)
class VoteRequest:
    """RequestVote, or a pre-vote when ``prevote`` (the term is then the one the candidate *would* use)."""

    term: int
    candidate: str
    version: Version
    prevote: bool = False
    #: Sent after a TimeoutNow: voters skip the recent-leader rule (the leader asked for it).
    transfer: bool = False
    cluster: str = ""
    #: The candidate's bootstrap list while it has no replicated configuration (else None):
    #: a node of another cluster can then name both lists in its refusal.
    members: tuple[str, ...] | None = None
    #: Whether the candidate's broker works (a voter whose own works refuses it a pre-vote).
    healthy: bool = True

    @property
    def sender(self) -> str:
        return self.candidate


@dataclass(frozen=True)
class VoteResponse:
    term: int
    voter: str
    granted: bool
    prevote: bool = False
    cluster: str = ""
    #: Whether the voter's broker works.
    healthy: bool = True

    @property
    def sender(self) -> str:
        return self.voter


@dataclass(frozen=True)
class AppendEntries:
    """Heartbeat of round ``round``; carries the state (payload and members, else None) when the
    follower may lack it."""

    term: int
    leader: str
    round: int
    version: Version
    payload: str | None = None
    members: tuple[str, ...] | None = None
    cluster: str = ""
    #: The leader's commit version (Raft's leaderCommit): what a majority holds.
    commit: Version = (0, 0)

    @property
    def sender(self) -> str:
        return self.leader


@dataclass(frozen=True)
class AppendResponse:
    term: int
    follower: str
    round: int
    version: Version
    success: bool
    cluster: str = ""
    #: Whether the follower's broker works (the leader hands over to one whose does, if its own fails).
    healthy: bool = True

    @property
    def sender(self) -> str:
        return self.follower


@dataclass(frozen=True)
class TimeoutNow:
    """Leadership transfer: "campaign now". Carries the state if the target lacks it."""

    term: int
    leader: str
    version: Version
    payload: str | None = None
    members: tuple[str, ...] | None = None
    cluster: str = ""

    @property
    def sender(self) -> str:
        return self.leader


Message = VoteRequest | VoteResponse | AppendEntries | AppendResponse | TimeoutNow

MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (VoteRequest, VoteResponse, AppendEntries, AppendResponse, TimeoutNow)
}


_FIELD_NAMES = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGE_TYPES.values()}


def encode(msg: Message) -> dict[str, Any]:
    """A JSON-ready dict of ``msg``, tagged with its type."""
    d: dict[str, Any] = {name: getattr(msg, name) for name in _FIELD_NAMES[type(msg)]}
    if "version" in d:
        d["version"] = list(d["version"])
    if "commit" in d:
        d["commit"] = list(d["commit"])
    if d.get("members") is not None:
        d["members"] = list(d["members"])
    d["type"] = type(msg).__name__
    return d


def decode(data: Any, expected: type | None = None) -> Message:
    """Validate ``data`` (a decoded JSON object) and build the message it describes.

    Raises :class:`ProtocolError` naming the first bad field.
    """
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    name = data.get("type")
    if not isinstance(name, str) or name not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {name!r}")
    cls = MESSAGE_TYPES[name]
    if expected is not None and cls is not expected:
        raise ProtocolError(f"expected a {expected.__name__}, got {name}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields) - {"type"}
    if unknown:
        raise ProtocolError(f"{name}: unknown field(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for fname, f in fields.items():
        if fname not in data:
            if f.default is dataclasses.MISSING:
                raise ProtocolError(f"{name}: missing field {fname!r}")
            continue
        kwargs[fname] = _check(name, fname, data[fname])
    msg: Message = cls(**kwargs)
    return msg


def _number(where: str, value: Any, limit: int = MAX_NUMBER) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where} must be an integer")
    if not 0 <= value <= limit:
        raise ProtocolError(f"{where} out of range (0..2**{limit.bit_length() - 1})")
    return value


def _check(name: str, field: str, value: Any) -> Any:
    where = f"{name}.{field}"
    if field == "term":
        return _number(where, value, MAX_TERM)
    if field == "round":
        return _number(where, value)
    if field in ("candidate", "voter", "leader", "follower"):
        if not isinstance(value, str) or not value or len(value) > MAX_ADDRESS_LEN:
            raise ProtocolError(f"{where} must be a node address string")
        return value
    if field in ("prevote", "transfer", "granted", "success", "healthy"):
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false")
        return value
    if field in ("version", "commit"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ProtocolError(f"{where} must be [term, sequence]")
        return (_number(where, value[0], MAX_TERM), _number(where, value[1], MAX_TERM))
    if field == "payload":
        if value is not None and (not isinstance(value, str) or len(value) > MAX_PAYLOAD_LEN):
            raise ProtocolError(f"{where} must be null or a string of at most {MAX_PAYLOAD_LEN} characters")
        return value
    if field == "members":
        if value is None:
            return None
        if (not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_MEMBERS
                or not all(isinstance(m, str) and 0 < len(m) <= MAX_ADDRESS_LEN for m in value)
                or len(set(value)) != len(value)):
            raise ProtocolError(f"{where} must be null or a list of 1 to {MAX_MEMBERS} distinct node addresses")
        return tuple(value)
    if field == "cluster":
        if not isinstance(value, str) or len(value) > MAX_CLUSTER_ID_LEN:
            raise ProtocolError(f"{where} must be a cluster id string")
        return value
    raise ProtocolError(f"{where}: unexpected field")  # pragma: no cover - fields are fixed above
