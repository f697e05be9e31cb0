"""The Celery side: ``install(app)`` and the worker bootstep that runs the cluster node.

A *worker* step (consumer steps restart on every broker reconnect). Its
lifecycle, in Celery's order:

* ``__init__``: resolve settings and refuse wrong ones (no I/O);
* ``create`` (all steps are created before any starts, still inside the
  worker's construction): check the state directory, create the leader-state
  file, build the node and take its listen address, and export what pool
  children - forked or spawned later - need to read leadership;
* ``start``: drop the leader queue from this worker's consumed queues, start
  the node and its HTTP server;
* on leading: start consuming the leader queue (``call_soon`` onto the event
  loop), start beat for this term, send ``leader_elected``;
* on losing it: the reverse, then ``leadership_lost``;
* ``close`` (first hook of warm and cold shutdown): stop campaigning and hand
  leadership over, while still answering votes;
* ``stop`` / ``terminate``: stop beat, the leader queue, the node and server.

The lease pool children read is not written here: the node writes every
extension and revokes it itself, synchronously, on whichever thread gives
leadership up (``Node._handle``). What the callbacks here do - beat, the
leader queue - only follows, and everything they start re-checks the lease
before it acts. The signals ``leader_elected`` and ``leadership_lost`` go out
on a thread of their own, so a slow receiver delays nothing else.

If the node fail-stops (its state file could not be written: disk full, I/O
error), this worker stops all leader work, leaves the cluster (``GET
/cluster/health`` says why) and keeps running ordinary tasks.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from typing import Any

import click
from celery import Celery, bootsteps
from celery import signals as celery_signals
from celery.exceptions import ImproperlyConfigured

from . import leader_state, signals, task_counts
from .beat import LeaderBeat
from .broker_probe import BrokerProbe
from .clock import lease_clock
from .cluster import Cluster
from .config import default_state_dir, parse_address
from .errors import ClusterError
from .leader_tasks import LeaderQueueRouter, is_leader_only, leader_queue_name, mark_task
from .metrics import counter, gauge
from .settings import ClusterSettings, app_flag, resolve, worker_options
from .state_file import StateFile
from .stats import Counters

log = logging.getLogger("celery_cluster")
#: The most beat entries GET /cluster/status lists (soonest due first).
BEAT_ENTRIES_SHOWN = 200


class ClusterMisconfigured(ImproperlyConfigured, click.ClickException):
    """Wrong cluster settings. Also a ClickException, so ``celery worker`` prints the
    reason as one line and exits 2 (as ``celery-cluster node`` does for bad settings)
    instead of dumping a traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        click.ClickException.__init__(self, message)


def install(app: Celery) -> None:
    """Enable the cluster for ``app``: worker step, ``--cluster-*`` options, leader-queue routing.

    Call it where the ``-A`` module is imported (Celery reads worker options then).
    """
    if getattr(app, "_celery_cluster_installed", False):
        return
    app._celery_cluster_installed = True
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
    celery_signals.beat_init.connect(refuse_standalone_beat, weak=False)
    from . import remote_control  # noqa: F401 - registers the inspect command


def refuse_embedded_beat(app: Celery, cluster_beat: bool) -> None:
    """``-B`` is stock beat on *this* worker, whatever the cluster does: refuse it unless the
    cluster's beat is off for every worker (the app's configuration, not one worker's flag)."""
    if cluster_beat:
        raise ClusterMisconfigured(
            "celery-cluster: -B/--beat runs a second scheduler next to the cluster's leader-only beat, and every "
            "periodic task would be sent twice; drop -B: the elected leader already runs beat")
    if app_flag(app.conf, "beat", True):
        raise ClusterMisconfigured(
            "celery-cluster: -B/--beat with --cluster-beat no on this worker still leaves the cluster's beat on "
            "the other workers, so every periodic task would be sent twice; drop -B (or, to run stock beat here "
            "instead, set cluster_beat = False in the app's configuration for every worker)")


def refuse_foreign_scheduler(app: Celery) -> None:
    """Schedulers that elect their own beat cannot be run by the cluster's."""
    scheduler = app.conf.beat_scheduler
    name = scheduler if isinstance(scheduler, str) else f"{scheduler.__module__}:{scheduler.__name__}"
    if name.split(":")[0].split(".")[0] == "redbeat":
        raise ClusterMisconfigured(
            f"celery-cluster: beat_scheduler {name} elects its own beat with a Redis lock and keeps its own "
            "schedule state, next to the cluster's leader-only beat; use celery's default scheduler or "
            "django_celery_beat.schedulers:DatabaseScheduler, or keep RedBeat and set cluster_beat = False "
            "(then run its `celery beat` as RedBeat expects)")


def refuse_standalone_beat(sender: Any = None, **kwargs: Any) -> None:
    """``beat_init`` receiver: a ``celery beat`` of an app that runs beat on its cluster leader
    would send every periodic task twice. Stops it with one line (exit 2) unless the app turns
    the cluster's beat off or explicitly allows a standalone beat."""
    app = getattr(sender, "app", None)
    if app is None or isinstance(sender, LeaderBeat) or not getattr(app, "_celery_cluster_installed", False):
        return
    if not app_flag(app.conf, "beat", True) or app_flag(app.conf, "allow_standalone_beat", False):
        return
    message = ("celery-cluster: this app runs beat on its elected cluster leader (install(app)), so this "
               "`celery beat` would send every periodic task a second time; stop it, or set "
               "cluster_allow_standalone_beat = True (CELERY_CLUSTER_ALLOW_STANDALONE_BEAT=yes) if it is "
               "meant to run beside the cluster")
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)  # through Celery's signal dispatch, which logs and swallows Exceptions


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
    #: The node's lease clock (tests replace it to jump time; see ``celery_cluster.clock``).
    clock = staticmethod(lease_clock)

    def __init__(self, worker: Any, **options: Any) -> None:
        super().__init__(worker, **options)
        self.app: Celery = worker.app
        self.worker = worker
        self.cluster: Cluster | None = None
        self.broker_probe: BrokerProbe | None = None
        self._member_change: dict[str, Any] | None = None  # the latest `cluster add|remove` on this worker
        self.beat: LeaderBeat | None = None
        self.leading_term: int | None = None
        self.consuming_leader_queue = False
        self.beat_counts = Counters()  # across every term this worker leads (metrics)
        self._lock = threading.Lock()
        self._signals: queue.Queue[tuple[Any, int] | None] = queue.Queue()
        self._signal_thread: threading.Thread | None = None
        try:
            self.settings: ClusterSettings | None = resolve(self.app.conf, options)
        except ClusterError as exc:
            raise ClusterMisconfigured(f"celery-cluster: {exc}") from None
        self.enabled = self.settings is not None
        if self.settings is None:
            log.info("[cluster] no --cluster-nodes configured: leader election is off for this worker")
            return
        routed = _routed_leader_queue(self.app)
        if routed is not None and routed != self.settings.leader_queue:
            # Producers route by app.conf/env; they never see this worker's command line.
            raise ClusterMisconfigured(
                f"celery-cluster: this worker would consume leader queue {self.settings.leader_queue!r} but "
                f"producers route leader-only tasks to {routed!r}; set cluster_leader_queue in the app config "
                "(or CELERY_CLUSTER_LEADER_QUEUE) so both agree, not --cluster-leader-queue alone")
        if self.settings.beat:
            refuse_foreign_scheduler(self.app)
        if options.get("beat"):
            refuse_embedded_beat(self.app, self.settings.beat)
        if getattr(worker.pool_cls, "is_green", False):
            raise ClusterMisconfigured(
                f"celery-cluster: the {worker.pool_cls.__module__.rsplit('.', 1)[-1]} pool is not supported (the "
                "cluster node runs OS threads and a selector loop, not greenlets): run the cluster on a prefork, "
                "threads or solo worker and keep green pools for other queues")

    # -- bootstep hooks ----------------------------------------------------------

    def create(self, w: Any) -> ClusterStep:
        """Build what the step needs on disk and on the network, in Celery's create()
        phase - still inside the worker's construction, so a refusal is one line and exit
        status 2 - and before the pool forks or spawns its children (they start later)."""
        w.cluster_step = self
        assert self.settings is not None
        try:
            self.cluster = self._build()
        except ClusterError as exc:
            raise ClusterMisconfigured(f"celery-cluster: {exc}") from None
        # Pool children (forked or spawned) and this process's router use what we resolved.
        os.environ["CELERY_CLUSTER_LEADER_QUEUE"] = self.settings.leader_queue
        os.environ[leader_state.ENV_VAR] = str(self.leader_state.path)
        leader_state._shared = self.leader_state
        os.environ[task_counts.ENV_VAR] = str(self.task_counts.path)
        task_counts._shared, task_counts._shared_pid = self.task_counts, os.getpid()
        _mark_leader_only_tasks(self.app)
        return self

    @property
    def role(self) -> str:
        """Who keeps state in the default state directory: this app's workers."""
        return f"worker-{self.app.main or 'celery'}"

    def _build(self) -> Cluster:
        assert self.settings is not None
        state_dir = self.settings.state_dir or str(default_state_dir(self.settings.advertise, self.role))
        StateFile(state_dir, self.settings.advertise).ensure_writable()
        mmap_path = os.path.join(state_dir, "leader.mmap")
        try:
            self.leader_state = leader_state.LeaderState(mmap_path, create=True)
            self.task_counts = task_counts.TaskCounts(os.path.join(state_dir, "task_counts.mmap"), create=True)
        except OSError as exc:
            raise ClusterError(f"cannot create {exc.filename or mmap_path}: {exc.strerror or exc}: set "
                               "--cluster-state-dir to a directory this worker can write") from None
        cluster = Cluster(
            self.settings.membership,
            role=self.role,
            listen=self.settings.listen,
            on_leader=self._on_leader,
            on_follower=self._on_follower,
            on_failure=self._on_failure,
            lease_sink=self.leader_state,
            timing=self.settings.timing,
            state_dir=state_dir,
            secret_file=self.settings.secret_file,
            tls=self.settings.tls,
            clock=self.clock,
            join=self.settings.join or None,
        )
        cluster.status_extras = self._status_extras
        cluster.health_extras = self._health_extras
        cluster.metrics_extras = self._metrics_extras
        try:
            cluster.bind()
        except ClusterError:
            cluster.stop(transfer=False)
            raise
        return cluster

    def start(self, w: Any) -> None:
        assert self.cluster is not None and self.settings is not None
        self.app.amqp.queues.deselect(self.settings.leader_queue)  # followers never consume it
        self._signal_thread = threading.Thread(target=self._send_signals, name="celery-cluster-signals",
                                               daemon=True)
        self._signal_thread.start()
        self.cluster.start()
        # Leadership follows the broker (--cluster-broker-probe): a leader whose broker does not
        # answer for the broker grace hands over to a worker whose broker does. Bounded: at most
        # the minimum election timeout per probe.
        if self.settings.broker_probe:
            self.broker_probe = BrokerProbe(self.app, self.settings.leader_queue,
                                            self.cluster.node.set_broker_health,
                                            consumer_ok=lambda: getattr(getattr(w, "consumer", None),
                                                                        "connection", None) is not None,
                                            timeout=self.settings.timing.election_timeout[0])
            self.broker_probe.start()

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
            self._call_soon(self._consume_leader_queue, True)
            if self.settings.beat:
                probe = self.broker_probe
                self.beat = LeaderBeat(self.app, self.cluster, lead, counts=self.beat_counts,
                                       follow_broker=probe is not None,
                                       broker_answers=None if probe is None else lambda: probe.answers is not False)
                self.beat.start()
        log.info("[cluster] %s leads in term %s", self.settings.advertise, term)
        self._signals.put((signals.leader_elected, term))

    def _on_follower(self, term: int) -> None:
        with self._lock:
            was = self.leading_term
            self.leading_term = None
            self._stop_beat()
            if was is not None:
                self._call_soon(self._consume_leader_queue, False)
        if was is not None:
            self._signals.put((signals.leadership_lost, was))

    def _on_failure(self, exc: BaseException) -> None:
        """The node fail-stopped: it already gave leadership up; stop what followed it."""
        self._on_follower(0)
        log.critical("[cluster] %s left the cluster and does no leader work any more; it keeps running "
                     "ordinary tasks. Fix the state directory and restart this worker.", self.settings.advertise
                     if self.settings else "?")

    def _send_signals(self) -> None:
        """User receivers run here, never on a thread the election or leader work waits for."""
        while True:
            item = self._signals.get()
            if item is None:
                return
            signal, term = item
            try:
                signal.send(sender=self.worker.hostname, term=term)
            except Exception:  # Celery's Signal.send already logs receiver errors
                log.exception("[cluster] error sending %s", signal.name)

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

    def _shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.node.retire()  # gives leadership up (revoking the lease) if close() did not
        with self._lock:
            was, self.leading_term = self.leading_term, None
            self._stop_beat()
        if was is not None:  # the follower callback may not have run yet: never miss the signal
            self._signals.put((signals.leadership_lost, was))
        self._signals.put(None)
        if self._signal_thread is not None:
            self._signal_thread.join(5.0)  # let receivers see leadership_lost, within bounds
        if self.cluster is not None:
            self.cluster.stop(transfer=True)
        if self.broker_probe is not None:
            self.broker_probe.stop()  # after the node: its verdicts are ignored once it stopped

    def _status_extras(self) -> dict[str, Any]:
        beat = self.beat
        return {
            "worker": self.worker.hostname,
            "beat_enabled": bool(self.settings and self.settings.beat),
            "beat_running": bool(beat and beat.running),
            **(beat.status() if beat is not None else {"beat_state": "stopped", "beat_restarts": 0,
                                                      "beat_last_error": None, "beat_last_error_at": None}),
            "leader_queue": self.settings.leader_queue if self.settings else None,
            "leader_queue_consumed": self.consuming_leader_queue,
            "broker_probe_error": self.broker_probe.last_error if self.broker_probe is not None else None,
            **self._beat_entries(beat),
        }

    @staticmethod
    def _beat_entries(beat: LeaderBeat | None) -> dict[str, Any]:
        if beat is None or not beat.running:
            return {"beat_entries": [], "beat_entries_total": 0}
        entries, count = beat.entries(BEAT_ENTRIES_SHOWN)
        return {"beat_entries": entries, "beat_entries_total": count}

    def _health_extras(self) -> list[str]:
        """A leader whose beat is not running fails the health check: the schedule stops."""
        if self.leading_term is None or not (self.settings and self.settings.beat):
            return []
        beat = self.beat
        if beat is None or beat.status()["beat_state"] == "stopped":
            return ["this leader's beat is not running"]
        if beat.state.startswith("failing"):
            return [f"this leader's beat is {beat.state}"]
        return []

    def _metrics_extras(self) -> list[Any]:
        """Beat and leader-only task metrics for GET /cluster/metrics."""
        beat = self.beat
        counts = self.beat_counts.snapshot()
        return [
            gauge("beat_enabled", "1 if this worker runs the beat schedule when it leads.",
                  1 if self.settings and self.settings.beat else 0),
            gauge("beat_running", "1 while this worker's beat runs (it leads and its scheduler ticks).",
                  1 if beat is not None and beat.running else 0),
            counter("beat_restarts", "Times this worker's beat was rebuilt after an error.",
                    {(): counts.get(("restart",), 0)}),
            counter("beat_entries_published", "Due runs this worker's beat published.",
                    {(): counts.get(("published",), 0)}),
            counter("beat_publish_failures", "Due runs whose publish to the broker failed.",
                    {(): counts.get(("publish_failed",), 0)}),
            counter("beat_runs_not_sent", "Due runs not sent by this worker: left for the next leader "
                    "(not recorded), lost to the lease (recorded, then the lease ended), held while the "
                    "broker did not answer (not recorded; they stay due), taken back after the broker did not "
                    "take them (unrecorded; they stay due), or lost unsent (the broker did not take them and "
                    "leadership ended before they could be taken back).",
                    {(reason,): counts.get((reason,), 0)
                     for reason in ("left_for_successor", "lost_to_lease", "held_broker_down", "unsent_taken_back",
                                    "lost_unsent")},
                    ("reason",)),
            gauge("leader_queue_consumed", "1 while this worker consumes the leader queue.",
                  1 if self.consuming_leader_queue else 0),
            counter("leader_only_tasks", "Leader-only task messages this worker's pool handled, by outcome: "
                    "run (under a valid lease), requeued, republished (to the leader queue).",
                    {(k,): v for k, v in self.task_counts.snapshot().items()}, ("outcome",)),
        ]

    def status(self) -> dict[str, Any]:
        """The cluster status plus beat and leader-queue state (also on GET /cluster/status)."""
        assert self.cluster is not None
        return {**self.cluster.status(), "member_change": dict(self._member_change) if self._member_change else None}

    def change_members(self, op: str, address: str) -> None:
        """Start ``op`` (add/remove) ``address`` on this leader, off the consumer's thread (a
        remote-control command must not block it); its outcome shows in :meth:`status` as
        ``member_change``. Raises ClusterError at once for a bad address."""
        assert self.cluster is not None
        cluster = self.cluster
        address = parse_address(address)
        change: dict[str, Any] = {"op": op, "address": address, "state": "running", "error": None, "members": None}
        self._member_change = change

        def run() -> None:
            try:
                fn = cluster.add_member if op == "add" else cluster.remove_member
                change["members"] = list(fn(address))
                change["state"] = "done"
            except ClusterError as exc:
                change.update(state="failed", error=str(exc))

        threading.Thread(target=run, name="celery-cluster-members", daemon=True).start()
