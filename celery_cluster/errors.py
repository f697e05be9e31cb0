"""One exception hierarchy for the whole project, rooted in :class:`ClusterError`.

Messages are written for the operator: they say what to change.
"""

from __future__ import annotations


class ClusterError(Exception):
    """Base class of every error raised by celery-cluster."""


class ConfigurationError(ClusterError, ValueError):
    """A setting is wrong (bad address, this node missing from the node list, bad timing)."""


class StateFileError(ClusterError):
    """The persisted state file is unreadable, corrupt or belongs to another node."""


class ProtocolError(ClusterError, ValueError):
    """A peer message is malformed: wrong fields, wrong types, absurd values."""


class AuthenticationError(ClusterError):
    """A request is unsigned, wrongly signed or outside the allowed clock skew."""


class TransferError(ClusterError):
    """Leadership could not be handed over (not leader, or no reachable peer)."""


class MembershipError(ClusterError):
    """A membership change was refused (not the leader, one pending, would lose the majority...)."""
