"""The Celery side: ``install(app)`` and the worker bootstep that runs the cluster node.

A *worker* step (consumer steps restart on every broker reconnect). Its
lifecycle, in Celery's order:

* ``__init__`` (all steps are built before any starts): resolve settings,
  refuse wrong ones, create the leader-state file and export its path so pool
  children - forked or spawned later - can read leadership;
* ``start``: drop the leader queue from this worker's consumed queues, start
  the node and its HTTP server;
* on leading: publish the lease for pool children, start consuming the leader
  queue (``call_soon`` onto the event loop), start beat for this term, send
  ``leader_elected``;
* on losing it: the reverse, then ``leadership_lost``;
* ``close`` (first hook of warm and cold shutdown): stop campaigning and hand
  leadership over, while still answering votes;
* ``stop`` / ``terminate``: stop beat, the leader queue, the node and server.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any

import click
from celery import Celery, bootsteps
from celery.exceptions import ImproperlyConfigured

from . import leader_state, signals
from .beat import LeaderBeat
from .cluster import Cluster
from .errors import ClusterError
from .leader_tasks import LeaderQueueRouter, is_leader_only, leader_queue_name, mark_task
from .settings import ClusterSettings, resolve, worker_options

log = logging.getLogger("celery_cluster")


class ClusterMisconfigured(ImproperlyConfigured, click.ClickException):
    """Wrong cluster settings. Also a ClickException, so ``celery worker`` prints the
    reason as one line and exits instead of dumping a traceback."""

    def __init__(self, message: str) -> None:
        click.ClickException.__init__(self, message)


def install(app: Celery) -> None:
    """Enable the cluster for ``app``: worker step, ``--cluster-*`` options, leader-queue routing.

    Call it where the ``-A`` module is imported (Celery reads worker options then).
    """
    if getattr(app, "_celery_cluster_installed", False):
        return
    app._celery_cluster_installed = True  # type: ignore[attr-defined]
    app.steps["worker"].add(ClusterStep)
    for option in worker_options():
        app.user_options["worker"].add(option)
    routes = app.conf.task_routes
    router = LeaderQueueRouter()
    if routes is None:
        app.conf.task_routes = (router,)
    elif isinstance(routes, (list, tuple)):
        app.conf.task_routes = (router, *routes)
    else:
        app.conf.task_routes = (router, routes)
    app.on_after_finalize.connect(_mark_leader_only_tasks, weak=False)
    from . import remote_control  # noqa: F401 - registers the inspect command


def _mark_leader_only_tasks(sender: Celery, **kwargs: Any) -> None:
    for task in list(sender.tasks.values()):
        if is_leader_only(task):
            mark_task(task)


def _routed_leader_queue(app: Celery) -> str | None:
    """The queue producers route leader-only tasks to (None if install() is not in effect)."""
    routes = app.conf.task_routes
    if not any(isinstance(r, LeaderQueueRouter) for r in (routes if isinstance(routes, (list, tuple)) else (routes,))):
        return None
    return leader_queue_name(app)


class ClusterStep(bootsteps.StartStopStep):
    label = "Cluster"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **options: Any) -> None:
        super().__init__(worker, **options)
        self.app: Celery = worker.app
        self.worker = worker
        self.cluster: Cluster | None = None
        self.beat: LeaderBeat | None = None
        self.leading_term: int | None = None
        self.consuming_leader_queue = False
        self._lock = threading.Lock()
        self._stop_publisher = threading.Event()
        try:
            self.settings: ClusterSettings | None = resolve(self.app.conf, options)
        except ClusterError as exc:
            raise ClusterMisconfigured(f"celery-cluster: {exc}") from None
        self.enabled = self.settings is not None
        if not self.enabled:
            log.info("[cluster] no --cluster-nodes configured: leader election is off for this worker")
            return
        routed = _routed_leader_queue(self.app)
        if routed is not None and routed != self.settings.leader_queue:
            # Producers route by app.conf/env; they never see this worker's command line.
            raise ClusterMisconfigured(
                f"celery-cluster: this worker would consume leader queue {self.settings.leader_queue!r} but "
                f"producers route leader-only tasks to {routed!r}; set cluster_leader_queue in the app config "
                "(or CELERY_CLUSTER_LEADER_QUEUE) so both agree, not --cluster-leader-queue alone")
        if options.get("beat") and self.settings.beat:
            raise ClusterMisconfigured("celery-cluster: -B/--beat runs a second scheduler next to the cluster's "
                                       "leader-only beat; drop -B (or set --cluster-beat no)")
        try:
            self.cluster = Cluster(
                self.settings.nodes,
                listen=self.settings.listen,
                advertise=self.settings.advertise,
                on_leader=self._on_leader,
                on_follower=self._on_follower,
                election_timeout=self.settings.election_timeout,
                heartbeat_interval=self.settings.heartbeat_interval,
                state_dir=self.settings.state_dir,
                secret_file=self.settings.secret_file,
            )
        except ClusterError as exc:
            raise ClusterMisconfigured(f"celery-cluster: {exc}") from None
        self.cluster.status_extras = self._status_extras
        # Pool children (forked or spawned) and this process's router use what we resolved.
        os.environ["CELERY_CLUSTER_LEADER_QUEUE"] = self.settings.leader_queue
        state_dir = self.cluster.state_dir or tempfile.mkdtemp(prefix="celery-cluster-")
        self.leader_state = leader_state.LeaderState(os.path.join(state_dir, "leader.mmap"), create=True)
        os.environ[leader_state.ENV_VAR] = str(self.leader_state.path)  # before the pool starts children
        leader_state._shared = self.leader_state
        _mark_leader_only_tasks(self.app)

    # -- bootstep hooks ----------------------------------------------------------

    def create(self, w: Any) -> ClusterStep:
        w.cluster_step = self
        return self

    def start(self, w: Any) -> None:
        assert self.cluster is not None and self.settings is not None
        self.app.amqp.queues.deselect(self.settings.leader_queue)  # followers never consume it
        self.cluster.start()
        threading.Thread(target=self._publish_lease, name="celery-cluster-lease", daemon=True).start()

    def close(self, w: Any) -> None:
        if self.cluster is not None:
            self.cluster.node.retire()  # hand over now; keep answering votes until stop

    def stop(self, w: Any) -> None:
        self._shutdown()

    def terminate(self, w: Any) -> None:
        self._shutdown()

    def info(self, w: Any) -> dict[str, Any]:
        return {"cluster": self.status()}

    # -- leadership --------------------------------------------------------------

    def _on_leader(self, term: int) -> None:
        assert self.cluster is not None and self.settings is not None
        lead = self.cluster.leadership()
        if lead is None or lead.term != term:
            return  # already lost
        with self._lock:
            self.leading_term = term
            self._publish_once()
            self._call_soon(self._consume_leader_queue, True)
            if self.settings.beat:
                self.beat = LeaderBeat(self.app, self.cluster, lead)
                self.beat.start()
        log.info("[cluster] %s leads in term %s", self.settings.advertise, term)
        signals.leader_elected.send(sender=self.worker.hostname, term=term)

    def _on_follower(self, term: int) -> None:
        with self._lock:
            was = self.leading_term
            self.leading_term = None
            self.leader_state.clear()
            self._stop_beat()
            if was is not None:
                self._call_soon(self._consume_leader_queue, False)
        if was is not None:
            signals.leadership_lost.send(sender=self.worker.hostname, term=was)

    def _stop_beat(self) -> None:
        beat, self.beat = self.beat, None
        if beat is not None:
            beat.stop(timeout=5.0)

    def _call_soon(self, fn: Any, *args: Any) -> None:
        consumer = getattr(self.worker, "consumer", None)
        if consumer is not None:
            consumer.call_soon(fn, *args)

    def _consume_leader_queue(self, on: bool) -> None:
        """Runs on the event loop thread (via call_soon)."""
        assert self.settings is not None
        consumer = self.worker.consumer
        queue = self.settings.leader_queue
        if on and self.leading_term is not None:
            consumer.add_task_queue(queue)
            self.consuming_leader_queue = True
        elif not on:
            if consumer.task_consumer is not None and queue in self.app.amqp.queues.consume_from:
                consumer.cancel_task_queue(queue)
            self.app.amqp.queues.deselect(queue)
            self.consuming_leader_queue = False

    def _publish_lease(self) -> None:
        assert self.cluster is not None
        interval = self.cluster.timing.heartbeat_interval / 2
        while not self._stop_publisher.wait(interval):
            self._publish_once()

    def _publish_once(self) -> None:
        assert self.cluster is not None
        lease = self.cluster.node.lease()
        if lease is None or self.leading_term is None:
            self.leader_state.clear()
        else:
            self.leader_state.publish(*lease)

    def _shutdown(self) -> None:
        self._stop_publisher.set()
        with self._lock:
            was, self.leading_term = self.leading_term, None
            self._stop_beat()
            self.leader_state.clear()
        if was is not None:  # the follower callback may not have run yet: never miss the signal
            signals.leadership_lost.send(sender=self.worker.hostname, term=was)
        if self.cluster is not None:
            self.cluster.stop(transfer=True)

    def _status_extras(self) -> dict[str, Any]:
        return {
            "worker": self.worker.hostname,
            "beat_running": bool(self.beat and self.beat.running),
            "leader_queue": self.settings.leader_queue if self.settings else None,
            "leader_queue_consumed": self.consuming_leader_queue,
        }

    def status(self) -> dict[str, Any]:
        """The cluster status plus beat and leader-queue state (also on GET /cluster/status)."""
        assert self.cluster is not None
        return self.cluster.status()
