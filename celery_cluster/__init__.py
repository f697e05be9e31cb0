"""celery-cluster: leader election among Celery workers, and leader-only beat and tasks.

The public API is declared here and only here.
"""

from .cluster import Cluster
from .errors import (
    AuthenticationError,
    ClusterError,
    ConfigurationError,
    MembershipError,
    ProtocolError,
    StateFileError,
    TransferError,
)
from .node import Leadership

# The Celery integration is imported on first use, so the election core and the
# standalone node do not pay for importing Celery.
_CELERY_API = {
    "install": "worker_step",
    "ClusterStep": "worker_step",
    "leader_only": "leader_tasks",
    "LeaderOnlyTask": "leader_tasks",
    "fencing_token": "leader_tasks",
}


def __getattr__(name: str) -> object:
    if name in _CELERY_API:
        import importlib

        value = getattr(importlib.import_module(f".{_CELERY_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'celery_cluster' has no attribute {name!r}")


__all__ = [
    "install",
    "leader_only",
    "LeaderOnlyTask",
    "fencing_token",
    "ClusterStep",
    "Cluster",
    "Leadership",
    "ClusterError",
    "ConfigurationError",
    "StateFileError",
    "ProtocolError",
    "AuthenticationError",
    "TransferError",
    "MembershipError",
]
__version__ = "0.1.0"
