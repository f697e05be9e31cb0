"""A small Celery app for the real-worker tests (``celery -A tests.celery_app worker ...``).

Everything that differs between test runs comes from the environment, read once at
import (the worker imports this module before it parses its options):

``CC_TEST_BROKER``          broker URL (default ``redis://127.0.0.1:6379/15``)
``CC_TEST_QUEUE``           ``task_default_queue`` (unique per test run)
``CC_TEST_LEADER_QUEUE``    the leader queue (``cluster_leader_queue``; the router and the
                            worker step both read it)
``CC_TEST_CONTROL``         ``control_exchange`` / ``event_exchange`` prefix, so broadcasts
                            (inspect, mingle) never reach another run's workers
``CC_TEST_PERIOD``          the ``tick`` beat schedule period in seconds (default 1.0)
``CC_TEST_RECORD``          the record file (JSON lines, appended with O_APPEND)
``CC_TEST_NODE``            this worker's short name (``w1``), stamped on every record
``CC_TEST_TRANSPORT_OPTIONS`` JSON object for ``broker_transport_options`` (optional)
``CC_TEST_SLOW_ELECTED``    seconds the ``leader_elected`` receiver takes (a slow user receiver)
``CC_TEST_BEAT_SCHEDULER``  ``beat_scheduler`` (optional)
``CC_TEST_BULK_ENTRIES``    that many more beat entries, ``bulk-<i>`` every ``CC_TEST_BULK_PERIOD``
                            seconds, all falling due together, sent to a queue nobody consumes

Records (one JSON object per line, one ``os.write`` each), each stamped with ``t``
(wall clock), ``mono`` (``time.monotonic()``), ``boot`` (the lease clock, CLOCK_BOOTTIME),
``node`` and ``pid``:

* ``beat_sent``: written in the *sending* process (the leader's beat thread) after a
  beat message carrying the ``cluster_term`` header was published: send time, sender,
  the sender's lease term read from the shared leader state at that moment.
* ``tick``: one per execution of the beat task (on any worker), with the send-side
  stamps copied from the message headers and ``fencing_token()``.
* ``lead``: one per execution of the ``@leader_only`` task ``lead(i)``: ``i``,
  ``fencing_token()``, the executing process's current leader-state term, node.
* ``prerun`` / ``postrun``: every delivery of ``lead`` to a pool process, before the
  leader check, and its final state (``REJECTED`` when a non-leader requeued it).
* ``elected`` / ``lost``: the cluster step's ``leader_elected`` / ``leadership_lost``
  signals (main process).
* ``plain``: one per execution of the ordinary task ``plain(i)``.
* ``relay``: ``relay(i)`` sent ``lead(i)`` from inside a worker, and where this worker
  process's router sent it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, signals

from celery_cluster import fencing_token, install, leader_only, leader_state
from celery_cluster import signals as cluster_signals
from celery_cluster.clock import lease_clock

DEFAULT_BROKER = "redis://127.0.0.1:6379/15"


def _node() -> str | None:
    return os.environ.get("CC_TEST_NODE")


def record(kind: str, **fields: Any) -> None:
    path = os.environ.get("CC_TEST_RECORD")
    if not path:
        return
    fields = {"kind": kind, "t": time.time(), "mono": time.monotonic(), "boot": lease_clock(), "node": _node(),
              "pid": os.getpid(), **fields}
    line = (json.dumps(fields, separators=(",", ":"), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of one line: O_APPEND keeps concurrent writers' lines whole
    finally:
        os.close(fd)


def _leader_term() -> int | None:
    state = leader_state.shared()
    return state.current_term() if state is not None else None


def create_app(
    broker: str = DEFAULT_BROKER,
    *,
    default_queue: str = "celery",
    leader_queue: str | None = None,
    control: str | None = None,
    period: float = 1.0,
    transport_options: dict[str, Any] | None = None,
) -> Celery:
    """The test app; the workers build it from the environment, test clients call it directly."""
    app = Celery("cc_test_app", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        broker_connection_retry_on_startup=True,
        task_default_queue=default_queue,
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=True,
        beat_schedule={"tick": {"task": "tests.celery_app.tick", "schedule": float(period)},
                       **{f"bulk-{i}": {"task": "tests.celery_app.plain", "args": (i,),
                                        "schedule": float(os.environ.get("CC_TEST_BULK_PERIOD", "10")),
                                        "options": {"queue": f"{default_queue}.sink"}}
                          for i in range(int(os.environ.get("CC_TEST_BULK_ENTRIES", "0")))}},
    )
    if leader_queue:
        app.conf.cluster_leader_queue = leader_queue
    if control:
        app.conf.control_exchange = control
        app.conf.event_exchange = f"{control}.ev"
    if transport_options:
        app.conf.broker_transport_options = dict(transport_options)
    if os.environ.get("CC_TEST_BEAT_SCHEDULER"):
        app.conf.beat_scheduler = os.environ["CC_TEST_BEAT_SCHEDULER"]

    @app.task(name="tests.celery_app.tick", bind=True, shared=False)
    def tick(self: Any) -> None:
        req = self.request
        record(
            "tick",
            id=req.id,
            hostname=req.hostname,
            token=fencing_token(),
            cluster_term=getattr(req, "cluster_term", None),
            sent_at=getattr(req, "cc_sent_at", None),
            sent_by=getattr(req, "cc_sent_by", None),
            sent_term=getattr(req, "cc_sent_term", None),
            redelivered=(req.delivery_info or {}).get("redelivered"),
        )

    @app.task(name="tests.celery_app.lead", bind=True, shared=False)
    @leader_only
    def lead(self: Any, i: int, sleep: float = 0.0) -> int:
        req = self.request
        record(
            "lead",
            i=i,
            id=req.id,
            hostname=req.hostname,
            token=fencing_token(),
            term=_leader_term(),
            redelivered=(req.delivery_info or {}).get("redelivered"),
            routing_key=(req.delivery_info or {}).get("routing_key"),
        )
        if sleep:
            time.sleep(sleep)
        return i

    @app.task(name="tests.celery_app.burn", bind=True, shared=False)
    @leader_only
    def burn(self: Any, i: int, seconds: float = 0.5) -> int:
        """Spin the CPU (pure Python arithmetic) for ``seconds`` of wall-clock time. Records
        ``burn_start`` before and ``burn`` after: ``started``/``ended`` (monotonic) and ``cpu``,
        the CPU time this thread got meanwhile (under the threads pool, the GIL share)."""
        req = self.request
        record("burn_start", i=i, id=req.id, hostname=req.hostname)
        started, cpu0 = time.monotonic(), time.thread_time()
        end = started + float(seconds)
        x = 0
        while time.monotonic() < end:  # bounded by the deadline
            for k in range(2000):
                x += k * k
        ended = time.monotonic()
        record("burn", i=i, id=req.id, hostname=req.hostname, started=started, ended=ended,
               cpu=time.thread_time() - cpu0, token=fencing_token(), term=_leader_term())
        return i

    @app.task(name="tests.celery_app.relay", bind=True, shared=False)
    def relay(self: Any, i: int) -> None:
        """Send ``lead(i)`` from inside a worker (routed by the worker process's own router)."""
        result = lead.delay(i)
        record("relay", i=i, id=self.request.id, hostname=self.request.hostname, lead_id=result.id,
               routed_to=app.amqp.router.route({}, lead.name, (i,), {}, lead).get("queue").name)

    @app.task(name="tests.celery_app.plain", bind=True, shared=False)
    def plain(self: Any, i: int) -> int:
        record("plain", i=i, id=self.request.id, hostname=self.request.hostname)
        return i

    install(app)
    return app


def create_app_from_env() -> Celery:
    env = os.environ
    transport = env.get("CC_TEST_TRANSPORT_OPTIONS")
    return create_app(
        env.get("CC_TEST_BROKER", DEFAULT_BROKER),
        default_queue=env.get("CC_TEST_QUEUE", "celery"),
        leader_queue=env.get("CC_TEST_LEADER_QUEUE") or None,
        control=env.get("CC_TEST_CONTROL") or None,
        period=float(env.get("CC_TEST_PERIOD", "1.0")),
        transport_options=json.loads(transport) if transport else None,
    )


# -- observation hooks (process-wide; they only write when CC_TEST_RECORD is set) --------

@signals.after_task_publish.connect(weak=False)
def _beat_sent(sender: Any = None, headers: dict | None = None, body: Any = None, **kwargs: Any) -> None:
    if headers and "cluster_term" in headers and "cc_sent_at" in headers:
        args = body[0] if isinstance(body, (list, tuple)) and body else None
        record("beat_sent", task=sender, id=headers.get("id"), cluster_term=headers["cluster_term"],
               cluster_run=headers.get("cluster_run"), sent_at=headers["cc_sent_at"],
               sent_term=headers.get("cc_sent_term"), args=args)


@signals.before_task_publish.connect(weak=False)
def _stamp_beat(sender: Any = None, headers: dict | None = None, **kwargs: Any) -> None:
    # Only beat-sent messages carry cluster_term: stamp when, by whom, and under which lease.
    if headers is not None and "cluster_term" in headers:
        headers["cc_sent_at"] = time.time()
        headers["cc_sent_by"] = _node()
        headers["cc_sent_term"] = _leader_term()


@signals.task_prerun.connect(weak=False)
def _prerun(sender: Any = None, task_id: str | None = None, args: Any = None, **kwargs: Any) -> None:
    if getattr(sender, "name", None) == "tests.celery_app.lead":
        req = sender.request
        info = req.delivery_info or {}
        record("prerun", id=task_id, i=(args or [None])[0], hostname=req.hostname, term=_leader_term(),
               redelivered=info.get("redelivered"), routing_key=info.get("routing_key"))


@signals.task_postrun.connect(weak=False)
def _postrun(sender: Any = None, task_id: str | None = None, args: Any = None, state: str | None = None,
             **kwargs: Any) -> None:
    if getattr(sender, "name", None) == "tests.celery_app.lead":
        record("postrun", id=task_id, i=(args or [None])[0], hostname=sender.request.hostname, state=state)


@cluster_signals.leader_elected.connect(weak=False)
def _elected(sender: Any = None, term: int | None = None, **kwargs: Any) -> None:
    record("elected", hostname=sender, term=term)
    slow = float(os.environ.get("CC_TEST_SLOW_ELECTED") or 0)
    if slow:
        time.sleep(slow)  # a user's receiver doing real work: must delay nothing that matters


@cluster_signals.leadership_lost.connect(weak=False)
def _lost(sender: Any = None, term: int | None = None, **kwargs: Any) -> None:
    record("lost", hostname=sender, term=term)


app = create_app_from_env()
