"""A leader-only task for the container smoke test."""

from __future__ import annotations

from celery import shared_task

from celery_cluster import fencing_token, leader_only


@shared_task(name="smoke.lead")
@leader_only
def lead(i: int) -> dict:
    """Runs on the cluster's leader only; answers the term it ran under."""
    return {"i": i, "term": fencing_token()}
