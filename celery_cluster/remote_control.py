"""Remote-control commands the cluster step answers (through the broker, like Celery's own):

* ``celery -A proj inspect cluster_status`` - each worker's cluster view;
* ``cluster_stepdown`` - the leader hands over (``celery -A proj cluster stepdown``); the
  broker's access control is the authentication, so no secret is needed.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from .errors import ClusterError


def _step(state: Any) -> Any:
    step = getattr(state.consumer.controller, "cluster_step", None)
    return step if step is not None and step.enabled and step.cluster is not None else None


@inspect_command()
def cluster_status(state: Any, **kwargs: Any) -> dict[str, Any]:
    """This worker's cluster status (role, term, leader, lease, beat, leader queue)."""
    step = _step(state)
    if step is None:
        return {"enabled": False}
    return {"enabled": True, **step.status()}


@control_command(args=[("to", str)], signature="[to]")
def cluster_stepdown(state: Any, to: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """If this worker leads: hand leadership over (to ``to``, or the best peer)."""
    step = _step(state)
    if step is None:
        return {"enabled": False}
    if not step.cluster.is_leader():
        return {"enabled": True, "leader": False, "id": step.cluster.id}
    try:
        target = step.cluster.stepdown(to or None)
    except ClusterError as exc:  # TransferError: nobody reachable; ConfigurationError: a bad --to
        return {"enabled": True, "leader": True, "id": step.cluster.id, "error": str(exc)}
    return {"enabled": True, "leader": True, "id": step.cluster.id, "transferred_to": target}


@control_command(args=[("op", str), ("address", str)], signature="<add|remove> <HOST:PORT>")
def cluster_members(state: Any, op: str = "", address: str = "", **kwargs: Any) -> dict[str, Any]:
    """If this worker leads: start adding or removing ``address`` (one server at a time). The
    change runs off the consumer's thread; ``cluster_status`` shows it as ``member_change``."""
    step = _step(state)
    if step is None:
        return {"enabled": False}
    if not step.cluster.is_leader():
        return {"enabled": True, "leader": False, "id": step.cluster.id}
    if op not in ("add", "remove"):
        return {"enabled": True, "leader": True, "id": step.cluster.id, "error": f"unknown operation {op!r}"}
    try:
        step.change_members(op, address)
    except ClusterError as exc:  # ConfigurationError: not HOST:PORT
        return {"enabled": True, "leader": True, "id": step.cluster.id, "error": str(exc)}
    return {"enabled": True, "leader": True, "id": step.cluster.id, "started": op, "address": address}
