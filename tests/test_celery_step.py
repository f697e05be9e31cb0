"""The Celery integration in real (in-process) workers: ``celery.contrib.testing.worker.start_worker``.

Every worker runs in a thread of the test process (``TestWorkController``), on a
real Redis broker (``redis://127.0.0.1:6379/<db>``: an empty database claimed for
the test with ``SET cc-test-claim NX`` - the protocol ``tests/workers.py`` uses too, so
concurrent test runs never share or flush each other's database) or on ``memory://``
where the broker does not matter. ``start_worker`` passes its extra keyword arguments
(``cluster_nodes=...``) to every bootstep's ``__init__``, exactly as
``celery worker --cluster-nodes ...`` does. Its teardown is a *cold* shutdown:
the steps get ``close`` then ``terminate`` (not ``stop``).

Synchronisation is always "poll with a deadline".
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import ImproperlyConfigured

from celery_cluster import LeaderOnlyTask, fencing_token, install, leader_only, leader_state, signals
from celery_cluster.errors import ConfigurationError
from celery_cluster.settings import DEFAULT_LEADER_QUEUE, leader_queue, resolve
from tests import support
from tests.support import HOST, RedisDB, claim_redis_db, free_port, isolated_celery_state

pytestmark = pytest.mark.timeout(90)

CLAIM_KEY = "cc-test-claim"
# Elections well inside a second, but a lease (~0.45 s) that survives a busy 2-core CI box.
FAST = {"cluster_election_timeout": "0.5-1.0", "cluster_heartbeat_interval": "0.05"}
DEADLINE = 20.0


# -- helpers ---------------------------------------------------------------------


#: ``wait_for(pred, what, timeout=DEADLINE)``: poll every 20 ms until ``pred`` is truthy (returned).
wait_for = partial(support.wait_for, timeout=DEADLINE, interval=0.02, timeout_format="{:.0f}s")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def cluster_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("celery-cluster"))


def beat_threads() -> list[str]:
    return [n for n in cluster_threads() if n.startswith("celery-cluster-beat-")]


def make_app(broker: str, **conf: Any) -> Celery:
    app = Celery(f"cc_test_{uuid.uuid4().hex[:8]}", broker=broker, set_as_current=False)
    app.conf.update(
        worker_hijack_root_logger=False,  # leave pytest's log capture alone
        broker_connection_retry_on_startup=False,
        task_default_queue=f"cc-default-{uuid.uuid4().hex[:6]}",
        **conf,
    )
    install(app)
    return app


def hostname(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}@cc-test"


@contextmanager
def cluster_worker(app: Celery, tmp_path: Path, *, port: int | None = None, nodes: str | None = None,
                   pool: str = "threads", name: str | None = None, **kwargs: Any) -> Iterator[Any]:
    """A one-node cluster worker (or a member of ``nodes``) listening on ``port``."""
    port = port or free_port()
    addr = f"{HOST}:{port}"
    options = {"cluster_nodes": nodes or addr, "cluster_listen": addr,
               "cluster_state_dir": str(tmp_path / f"state-{port}"), **FAST, **kwargs}
    with start_worker(app, pool=pool, concurrency=2 if pool == "threads" else 1, perform_ping_check=False,
                      hostname=name or hostname("w"), loglevel="WARNING", shutdown_timeout=30,
                      **options) as worker:
        worker.cluster_addr = addr
        worker.cluster_port = port
        yield worker


def inspect(app: Celery, worker: Any, command: str) -> Any:
    """The worker's reply to an inspect command, retried: on Redis, a broadcast sent before the
    worker's pidbox subscription is up is lost (pub/sub), even after start_worker returned."""
    def ask() -> Any:
        replies = app.control.inspect(timeout=1.0, destination=[worker.hostname], limit=1)._request(command)
        return (replies or {}).get(worker.hostname)

    return wait_for(ask, f"a reply to `inspect {command}`")


def cluster_status(app: Celery, worker: Any) -> dict[str, Any]:
    return inspect(app, worker, "cluster_status")


def wait_leader(app: Celery, worker: Any) -> dict[str, Any]:
    """Wait until the worker leads, runs beat (if on) and consumes the leader queue."""
    step = worker.cluster_step

    def ready() -> bool:
        st = step.status()
        return st["is_leader"] and st["leader_queue_consumed"] and (st["beat_running"] or not step.settings.beat)

    wait_for(ready, "the worker to lead, run beat and consume the leader queue")
    return step.status()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with isolated_celery_state(monkeypatch, tmp_path):
        yield


@pytest.fixture()
def redis_db() -> Iterator[RedisDB]:
    with claim_redis_db(CLAIM_KEY) as db:
        yield db


class Recorder:
    """Task executions, recorded by tasks running in the worker's thread pool."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: list[tuple[str, int | None, float]] = []

    def add(self, name: str) -> None:
        with self.lock:
            self.runs.append((name, fencing_token(), time.monotonic()))

    def of(self, name: str) -> list[tuple[str, int | None, float]]:
        with self.lock:
            return [r for r in self.runs if r[0] == name]


# -- one-node cluster on Redis ---------------------------------------------------------


def test_single_node_leads_runs_beat_leader_tasks_and_terminates_cleanly(tmp_path: Path, redis_db: Any) -> None:
    app = make_app(redis_db.url, beat_schedule={
        "tick": {"task": "cc.tick", "schedule": 0.5},
        "leader-tick": {"task": "cc.leader_tick", "schedule": 0.5},
    })
    rec = Recorder()

    @app.task(name="cc.tick")
    def tick() -> None:
        rec.add("tick")

    @app.task(name="cc.leader_tick")
    @leader_only
    def leader_tick() -> None:
        rec.add("leader_tick")

    @app.task(name="cc.decorated")
    @leader_only
    def decorated() -> int | None:
        rec.add("decorated")
        return fencing_token()

    @leader_only
    @app.task(name="cc.decorated_over")
    def decorated_over() -> int | None:
        rec.add("decorated_over")
        return fencing_token()

    @app.task(name="cc.based", base=LeaderOnlyTask)
    def based() -> int | None:
        rec.add("based")
        return fencing_token()

    @app.task(name="cc.plain")
    def plain() -> None:
        rec.add("plain")

    elected: list[tuple[str, int]] = []
    lost: list[tuple[str, int]] = []

    def on_elected(sender: str, term: int, **kw: Any) -> None:
        elected.append((sender, term))

    def on_lost(sender: str, term: int, **kw: Any) -> None:
        lost.append((sender, term))

    signals.leader_elected.connect(on_elected, weak=False)
    signals.leadership_lost.connect(on_lost, weak=False)
    try:
        with cluster_worker(app, tmp_path) as worker:
            port = worker.cluster_port
            st = wait_leader(app, worker)
            term = st["term"]
            assert term >= 1 and st["id"] == worker.cluster_addr == st["leader_id"]
            assert wait_for(lambda: elected, "leader_elected") == [(worker.hostname, term)]

            # the leader queue is consumed: in the app's selection and in `inspect active_queues`
            assert DEFAULT_LEADER_QUEUE in app.amqp.queues.consume_from
            active = inspect(app, worker, "active_queues")
            assert DEFAULT_LEADER_QUEUE in {q["name"] for q in active}

            # `inspect cluster_status` and `inspect stats` (the step's info under "cluster")
            reply = cluster_status(app, worker)
            assert reply["enabled"] is True
            assert reply["is_leader"] is True and reply["state"] == "leader" and reply["term"] == term
            assert reply["beat_running"] is True and reply["leader_queue_consumed"] is True
            assert reply["leader_queue"] == DEFAULT_LEADER_QUEUE
            assert reply["nodes"] == []
            cluster_info = inspect(app, worker, "stats")["cluster"]
            assert cluster_info["is_leader"] is True and cluster_info["term"] == term
            assert cluster_info["id"] == worker.cluster_addr

            # beat: a 0.5 s schedule fires repeatedly, stamped with the term
            wait_for(lambda: len(rec.of("tick")) >= 3 and len(rec.of("leader_tick")) >= 2, "beat firings")
            ticks = rec.of("tick")
            assert {tok for _, tok, _ in ticks} == {term}  # plain task: fencing_token() from `cluster_term`
            assert {tok for _, tok, _ in rec.of("leader_tick")} == {term}
            # a schedule, not a burst: at most one firing per 0.5 s since the first (delays only lower it)
            assert len(rec.of("tick")) <= (time.monotonic() - ticks[0][2]) / 0.5 + 2, ticks

            # leader-only tasks sent from outside: routed to the leader queue, run with the term
            for task in (decorated, decorated_over, based):
                assert task.acks_late and task.reject_on_worker_lost
                assert app.amqp.router.route({}, task.name)["queue"].name == DEFAULT_LEADER_QUEUE
                task.delay()
            plain.delay()  # not sent by beat: no term
            wait_for(lambda: all(rec.of(n) for n in ("decorated", "decorated_over", "based", "plain")),
                     "the leader-only tasks to run")
            for name in ("decorated", "decorated_over", "based"):
                assert [tok for _, tok, _ in rec.of(name)] == [term], name
            assert [tok for _, tok, _ in rec.of("plain")] == [None]
            assert beat_threads() == [f"celery-cluster-beat-{term}"]
            assert not port_is_free(port)

        # terminate (the fixture's cold shutdown): beat, node and HTTP server are gone
        wait_for(lambda: not cluster_threads(), "the celery-cluster threads to end", timeout=10)
        assert port_is_free(port)
        assert wait_for(lambda: lost, "leadership_lost", timeout=5) == [(worker.hostname, term)]
        assert leader_state.shared() is not None and leader_state.shared().current_term() is None
        # nothing publishes the schedule any more
        default_queue = app.conf.task_default_queue
        before = redis_db.llen(default_queue)
        time.sleep(1.2)  # observing an absence: longer than two schedule periods
        assert redis_db.llen(default_queue) == before
    finally:
        signals.leader_elected.disconnect(on_elected)
        signals.leadership_lost.disconnect(on_lost)


def test_solo_pool_leader_runs_leader_only_tasks_on_a_configured_queue(tmp_path: Path, redis_db: Any) -> None:
    app = make_app(redis_db.url, cluster_leader_queue="cc-leader-solo")  # read by install() and the step
    rec = Recorder()

    @app.task(name="cc.solo_leader", base=LeaderOnlyTask)
    def solo_leader() -> None:
        rec.add("solo_leader")

    with cluster_worker(app, tmp_path, pool="solo", cluster_beat="no") as worker:
        st = wait_leader(app, worker)
        assert st["beat_running"] is False and not beat_threads()  # --cluster-beat no
        assert st["leader_queue"] == "cc-leader-solo" and "cc-leader-solo" in app.amqp.queues.consume_from
        assert DEFAULT_LEADER_QUEUE not in app.amqp.queues.consume_from
        assert app.amqp.router.route({}, solo_leader.name)["queue"].name == "cc-leader-solo"
        solo_leader.delay()
        wait_for(lambda: rec.of("solo_leader"), "the leader-only task on the solo pool")
        assert [tok for _, tok, _ in rec.of("solo_leader")] == [st["term"]]
    wait_for(lambda: not cluster_threads(), "the celery-cluster threads to end", timeout=10)


def test_follower_without_quorum_never_consumes_the_leader_queue(tmp_path: Path, redis_db: Any) -> None:
    """A member of a 2-node cluster whose peer is down never leads: the leader queue stays put."""
    app = make_app(redis_db.url)
    rec = Recorder()

    @app.task(name="cc.only_leader")
    @leader_only
    def only_leader() -> None:
        rec.add("only_leader")

    me, peer = free_port(), free_port()
    nodes = f"{HOST}:{me},{HOST}:{peer}"
    with cluster_worker(app, tmp_path, port=me, nodes=nodes) as worker:
        only_leader.delay()
        assert wait_for(lambda: redis_db.llen(DEFAULT_LEADER_QUEUE), "the message in the leader queue") == 1
        reply = cluster_status(app, worker)
        assert reply["enabled"] is True and reply["is_leader"] is False
        assert reply["leader_queue_consumed"] is False and reply["beat_running"] is False
        assert [p["address"] for p in reply["nodes"]] == [f"{HOST}:{peer}"]
        assert reply["nodes"][0]["last_contact_ms"] is None  # never heard from it
        assert DEFAULT_LEADER_QUEUE not in app.amqp.queues.consume_from
        active = inspect(app, worker, "active_queues")
        assert DEFAULT_LEADER_QUEUE not in {q["name"] for q in active}
        # it campaigns (pre-vote, so the term stays) and keeps failing: still not consumed, not run
        wait_for(lambda: worker.cluster_step.status()["state"] == "pre_candidate", "a failed campaign")
        end = time.monotonic() + 2.0  # two maximum election timeouts of observation
        while time.monotonic() < end:
            st = worker.cluster_step.status()
            assert not st["is_leader"] and not st["leader_queue_consumed"] and not st["beat_running"]
            time.sleep(0.05)
        assert redis_db.llen(DEFAULT_LEADER_QUEUE) == 1 and rec.of("only_leader") == []
    wait_for(lambda: not cluster_threads(), "the celery-cluster threads to end", timeout=10)
    assert port_is_free(me)


# -- settings ----------------------------------------------------------------------


def test_settings_precedence_in_a_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI option (worker kwarg) > CELERY_CLUSTER_* environment > app.conf.cluster_*."""
    port = free_port()
    addr = f"{HOST}:{port}"
    conf_dir, env_dir, cli_dir = (tmp_path / d for d in ("conf", "env", "cli"))
    app = make_app(broker="memory://", cluster_nodes=addr, cluster_listen=addr,
                   cluster_election_timeout="3-6",             # conf only
                   cluster_heartbeat_interval=0.2,            # conf < env
                   cluster_state_dir=str(conf_dir),           # conf < env < cli
                   cluster_beat="yes")                        # conf < cli
    monkeypatch.setenv("CELERY_CLUSTER_HEARTBEAT_INTERVAL", "0.25")
    monkeypatch.setenv("CELERY_CLUSTER_STATE_DIR", str(env_dir))
    with start_worker(app, pool="solo", perform_ping_check=False, hostname=hostname("prec"), loglevel="WARNING",
                      cluster_state_dir=str(cli_dir), cluster_beat="no") as worker:
        step = worker.cluster_step
        s = step.settings
        assert s.nodes == (addr,) and s.listen == addr and s.advertise == addr
        assert s.election_timeout == (3.0, 6.0)
        assert s.heartbeat_interval == 0.25
        assert s.state_dir == str(cli_dir) and step.cluster.state_dir == str(cli_dir)
        assert s.beat is False
        assert step.cluster.timing.election_timeout == (3.0, 6.0)
        assert step.cluster.timing.heartbeat_interval == 0.25
        assert Path(os.environ[leader_state.ENV_VAR]).parent == cli_dir
        wait_for(lambda: any(cli_dir.iterdir()), "the state file in the CLI's state dir")
        assert not env_dir.exists() and not conf_dir.exists()
    wait_for(lambda: not cluster_threads(), "the celery-cluster threads to end", timeout=10)
    assert port_is_free(port)


class _Conf(dict):
    """Stands in for app.conf (resolve only calls .get)."""


def test_resolve_precedence_unit() -> None:
    conf = _Conf(cluster_nodes="127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", cluster_listen="127.0.0.1:1",
                 cluster_leader_queue="conf-q", cluster_heartbeat_interval=0.3, cluster_beat="no",
                 cluster_election_timeout="2-4")
    env = {"CELERY_CLUSTER_LISTEN": "127.0.0.1:2", "CELERY_CLUSTER_LEADER_QUEUE": "env-q",
           "CELERY_CLUSTER_BEAT": "yes"}
    cli = {"cluster_listen": "127.0.0.1:3", "cluster_advertise": None, "cluster_beat": None}
    s = resolve(conf, cli, env)
    assert s is not None
    assert s.nodes == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    assert s.listen == s.advertise == "127.0.0.1:3"      # cli > env > conf
    assert s.leader_queue == "env-q"                     # env > conf
    assert s.beat is True                                # env ('yes') > conf ('no'); cli None = unset
    assert s.heartbeat_interval == 0.3                   # conf
    assert s.election_timeout == (2.0, 4.0)
    # defaults
    d = resolve(_Conf(), {"cluster_nodes": "h:1", "cluster_listen": "h:1"}, {})
    assert d is not None
    assert (d.election_timeout, d.heartbeat_interval, d.leader_queue, d.beat) == \
        ((1.0, 2.0), 0.1, DEFAULT_LEADER_QUEUE, True)
    assert d.secret_file is None and d.state_dir is None
    # advertise differs from listen
    a = resolve(_Conf(), {"cluster_nodes": "h:1,h:2", "cluster_listen": "0.0.0.0:1", "cluster_advertise": "h:1"}, {})
    assert a is not None and (a.listen, a.advertise) == ("0.0.0.0:1", "h:1")
    # env alone enables it
    e = resolve(_Conf(), {}, {"CELERY_CLUSTER_NODES": "h:1", "CELERY_CLUSTER_LISTEN": "h:1",
                              "CELERY_CLUSTER_BEAT": "off"})
    assert e is not None and e.nodes == ("h:1",) and e.beat is False


def test_one_leader_queue_resolver() -> None:
    """Worker (cli > env > conf) and producers (env > conf) resolve the queue the same way;
    an empty value counts as unset."""
    conf = _Conf(cluster_leader_queue="conf-q")
    assert leader_queue(conf, {"cluster_leader_queue": "cli-q"}, {"CELERY_CLUSTER_LEADER_QUEUE": "env-q"}) == "cli-q"
    assert leader_queue(conf, None, {"CELERY_CLUSTER_LEADER_QUEUE": "env-q"}) == "env-q"
    assert leader_queue(conf, {"cluster_leader_queue": ""}, {"CELERY_CLUSTER_LEADER_QUEUE": ""}) == "conf-q"
    assert leader_queue(_Conf(), None, {}) == DEFAULT_LEADER_QUEUE


@pytest.mark.parametrize("conf, cli, env", [
    ({}, {}, {}),
    ({"cluster_nodes": ""}, {}, {}),
    ({}, {"cluster_nodes": None}, {"CELERY_CLUSTER_NODES": ""}),
])
def test_resolve_without_nodes_is_off(conf: dict, cli: dict, env: dict) -> None:
    assert resolve(_Conf(conf), cli, env) is None


@pytest.mark.parametrize("cli, fragment", [
    ({"cluster_nodes": "h:1"}, "neither --cluster-listen nor --cluster-advertise"),
    ({"cluster_nodes": "h:1", "cluster_listen": "h:1", "cluster_heartbeat_interval": "fast"},
     "invalid --cluster-heartbeat-interval"),
    ({"cluster_nodes": "h:1", "cluster_listen": "h:1", "cluster_beat": "maybe"}, "invalid --cluster-beat"),
    ({"cluster_nodes": "h:1", "cluster_listen": "h:1", "cluster_election_timeout": "2-1"}, "must be greater"),
    ({"cluster_nodes": "h:1,,h:2", "cluster_listen": "h:1"}, "empty entry"),
    ({"cluster_nodes": "h:1,h:2,h:4", "cluster_listen": "h:3"}, "must include this node's advertise address h:3"),
    ({"cluster_nodes": "h:1", "cluster_listen": "h:1", "cluster_heartbeat_interval": "0.5"}, "quarter of the minimum"),
])
def test_resolve_refuses_bad_values(cli: dict, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        resolve(_Conf(), cli, {})


@pytest.mark.parametrize("options, fragment", [
    pytest.param({"cluster_nodes": "127.0.0.1:{a},127.0.0.1:{b}", "cluster_listen": "127.0.0.1:{c}"},
                 "must include this node", id="not-in-nodes"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}",
                  "cluster_election_timeout": "2-1"}, "election timeout", id="timeout-reversed"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}",
                  "cluster_election_timeout": "soon"}, "election timeout", id="timeout-garbage"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}",
                  "cluster_election_timeout": "0.2-0.4", "cluster_heartbeat_interval": "0.1"},
                 "quarter of the minimum election timeout", id="heartbeat-too-slow"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}", "beat": True},
                 "-B/--beat runs a second scheduler", id="beat-and-cluster-beat"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}", "beat": True,
                  "cluster_beat": "no"}, "still leaves the cluster's beat on", id="beat-and-cluster-beat-off-here"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}",
                  "conf:beat_scheduler": "redbeat.RedBeatScheduler"}, "elects its own beat with a Redis lock",
                 id="redbeat"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}"}, "--cluster-listen", id="no-listen"),
    pytest.param({"cluster_nodes": "127.0.0.1:{a}", "cluster_listen": "127.0.0.1:{a}",
                  "cluster_leader_queue": "elsewhere"}, "cluster_leader_queue", id="leader-queue-cli"),
])
def test_wrong_settings_refuse_to_start(tmp_path: Path, options: dict, fragment: str) -> None:
    ports = {"a": free_port(), "b": free_port(), "c": free_port()}
    opts = {k: v.format(**ports) if isinstance(v, str) else v for k, v in options.items()}
    app = make_app(broker="memory://")
    for key in [k for k in opts if k.startswith("conf:")]:
        app.conf[key[5:]] = opts.pop(key)
    with pytest.raises(ImproperlyConfigured) as info:
        with start_worker(app, pool="solo", perform_ping_check=False, hostname=hostname("bad"),
                          loglevel="WARNING", cluster_state_dir=str(tmp_path / "state"), **opts):
            pytest.fail("the worker started")  # pragma: no cover
    message = str(info.value)
    assert message.startswith("celery-cluster: ") and fragment in message, message
    assert "\n" not in message
    assert not cluster_threads()
    assert all(port_is_free(p) for p in ports.values())


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_no_nodes_disables_the_step_with_one_log_line(redis_db: Any) -> None:
    app = make_app(redis_db.url)
    handler = _ListHandler()
    logger = logging.getLogger("celery_cluster")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, hostname=hostname("off"),
                          loglevel="WARNING") as worker:
            assert not hasattr(worker, "cluster_step")
            assert not any(type(s).__name__ == "ClusterStep" for s in worker.steps)
            assert cluster_status(app, worker) == {"enabled": False}
            assert "cluster" not in inspect(app, worker, "stats")
            assert not cluster_threads()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [r.getMessage() for r in handler.records]
    assert len(lines) == 1, lines
    assert "no --cluster-nodes" in lines[0] and "\n" not in lines[0]
    assert handler.records[0].levelno == logging.INFO
    assert leader_state.ENV_VAR not in os.environ


# -- restart in one process: a second worker re-elects in a later term ------------------------


def test_restart_reuses_state_dir_and_bumps_term(tmp_path: Path, redis_db: Any) -> None:
    app = make_app(redis_db.url, beat_schedule={"tick": {"task": "cc.tick2", "schedule": 0.5}})
    rec = Recorder()

    @app.task(name="cc.tick2")
    def tick2() -> None:
        rec.add("tick2")

    port = free_port()
    terms = []
    for _ in range(2):
        with cluster_worker(app, tmp_path, port=port) as worker:
            terms.append(wait_leader(app, worker)["term"])
            n = len(rec.of("tick2"))
            wait_for(lambda: len(rec.of("tick2")) > n, "a beat firing in this term")
        wait_for(lambda: not cluster_threads(), "the celery-cluster threads to end", timeout=10)
        assert port_is_free(port)
    assert terms[1] > terms[0]  # the persisted term is not reused
    assert [tok for _, tok, _ in rec.of("tick2")] == sorted(tok for _, tok, _ in rec.of("tick2"))
    assert {tok for _, tok, _ in rec.of("tick2")} <= set(terms)
