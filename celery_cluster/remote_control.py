"""``celery -A proj inspect cluster_status``: each worker answers with its cluster view."""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command


@inspect_command()
def cluster_status(state: Any, **kwargs: Any) -> dict[str, Any]:
    """This worker's cluster status (role, term, leader, lease, beat, leader queue)."""
    step = getattr(state.consumer.controller, "cluster_step", None)
    if step is None or not step.enabled:
        return {"enabled": False}
    return {"enabled": True, **step.status()}
