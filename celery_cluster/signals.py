"""Celery signals sent by the cluster step (in the worker's main process).

    from celery_cluster.signals import leader_elected

    @leader_elected.connect
    def on_elected(sender, term, **kwargs): ...

``sender`` is the worker's node name (``celery@host``).
"""

from celery.utils.dispatch import Signal

leader_elected = Signal(name="leader_elected", providing_args={"term"})
leadership_lost = Signal(name="leadership_lost", providing_args={"term"})

__all__ = ["leader_elected", "leadership_lost"]
