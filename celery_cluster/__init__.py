"""celery-cluster: leader election among Celery workers, and leader-only beat and tasks.

The public API is declared here and only here.
"""

from .cluster import Cluster
from .errors import (
    AuthenticationError,
    ClusterError,
    ConfigurationError,
    ProtocolError,
    StateFileError,
    TransferError,
)
from .node import Leadership

__all__ = [
    "Cluster",
    "Leadership",
    "ClusterError",
    "ConfigurationError",
    "StateFileError",
    "ProtocolError",
    "AuthenticationError",
    "TransferError",
]
__version__ = "0.1.0"
