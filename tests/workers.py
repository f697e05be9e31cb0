"""Start, watch, kill and restart real ``celery worker`` processes for the cluster tests.

Each worker runs ``celery -A tests.celery_app worker -P prefork`` in its own session
(``start_new_session=True``), so teardown can SIGKILL the whole process group (main
process and pool children). The worker also gets PDEATHSIG=SIGKILL: if pytest itself
dies, no worker outlives it. Every incarnation logs to its own file.

Observation is two-fold: ``GET /cluster/status`` on each worker, polled with a deadline,
and the JSON-lines record file the test app appends to (see ``tests/celery_app``).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support import HOST, die_with_parent, free_ports, wait_for

REPO = Path(__file__).resolve().parents[1]
MIN_TIMEOUT, MAX_TIMEOUT = 0.5, 1.0
HEARTBEAT = 0.05
#: "another worker leads and runs beat" must happen within this many seconds of a crash.
FAILOVER_BOUND = 2 * MAX_TIMEOUT + 1.0
STARTUP_DEADLINE = 40.0  # interpreter + celery imports, several workers at once on 2 cores
POLL = 0.02
STALE_CLAIM = 3600.0  # a Redis database claimed longer ago than this belongs to a dead test run

Status = dict[str, Any]


def celery_cli() -> list[str]:
    script = Path(sys.executable).with_name("celery")
    return [str(script)] if script.exists() else [sys.executable, "-m", "celery"]


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = POLL) -> Any:
    """Call ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    return wait_for(predicate, what, timeout=timeout, interval=interval, timeout_format="{:.1f}s")


def http_status(port: int, timeout: float = 0.5) -> Status | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/cluster/status")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        return json.loads(body)
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line still being written is never partial (one O_APPEND write), but be safe
        if isinstance(obj, dict):
            out.append(obj)
    return out


#: Seconds a warm shutdown (SIGTERM) may take. Not ours: billiard's pool child that finished a
#: task in the instant the shutdown began waits up to 30 s (300 x 0.1 s,
#: ``Worker._ensure_messages_consumed``) for the parent to read its result, which the
#: parent's stopped event loop no longer does; seen in rolling-SIGTERM runs (the child's
#: stack in ``_ensure_messages_consumed``, its task succeeding 2 ms after "Warm shutdown").
SHUTDOWN_WAIT = 45.0


def clean_env() -> dict[str, str]:
    """The test process's environment without any cluster or test-app settings."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_CLUSTER_", "CC_TEST_", "CELERY_WORKER_"))}


# -- brokers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Broker:
    """Where one test run's messages go, and how to leave nothing behind."""

    kind: str  # "redis" | "rabbitmq"
    url: str
    run_id: str
    default_queue: str
    leader_queue: str
    control: str
    cleanup: Callable[[], None] = lambda: None

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting (ready, not reserved by a consumer) in the test's two task queues."""
        from kombu import Connection

        depths = {}
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                for q in (self.default_queue, self.leader_queue):
                    depths[q] = int(client.llen(q))
            finally:
                client.close()
            return depths
        with Connection(self.url, connect_timeout=5) as conn:
            channel = conn.channel()
            for q in (self.default_queue, self.leader_queue):
                try:
                    _, count, _ = channel.queue_declare(q, passive=True)
                    depths[q] = int(count)
                except Exception:  # noqa: BLE001 - a queue never declared holds nothing
                    depths[q] = 0
                    channel = conn.channel()
        return depths


def _names(run_id: str) -> dict[str, str]:
    return {"default_queue": f"cct.{run_id}.q", "leader_queue": f"cct.{run_id}.leader",
            "control": f"cct.{run_id}.ctl"}


def _stale_claim(claim: bytes | None) -> bool:
    if claim is None:
        return False
    try:
        return time.time() - float(claim.split(b":")[-1]) > STALE_CLAIM
    except ValueError:
        return False


def redis_broker(port: int = 6379, db_candidates: Iterable[int] = range(1, 16)) -> Broker:
    """A Redis database of our own on the shared server: an empty one, claimed and flushed after.

    Only databases that are empty (or hold nothing but a stale claim of ours) are taken, so
    the databases other users of this server hold are never touched."""
    import redis

    run_id = new_run_id()
    claim_key = "cct-workers-claim"  # this module's own key: other test modules claim databases too
    for db in db_candidates:
        client = redis.Redis(host=HOST, port=port, db=db)
        try:
            if _stale_claim(client.get(claim_key)):
                client.flushdb()  # left behind by a test run that was killed before its teardown
            if client.dbsize() != 0:
                continue
            if not client.set(claim_key, f"{run_id}:{time.time()}", nx=True):
                continue
            if client.dbsize() != 1:  # someone else raced us into this database
                client.delete(claim_key)
                continue
        finally:
            client.close()
        url = f"redis://{HOST}:{port}/{db}"

        def cleanup(db: int = db) -> None:
            c = redis.Redis(host=HOST, port=port, db=db)
            try:
                claim = c.get(claim_key)
                if claim is not None and claim.split(b":")[0] == run_id.encode():
                    c.flushdb()
            finally:
                c.close()

        return Broker("redis", url, run_id, cleanup=cleanup, **_names(run_id))
    raise RuntimeError("no empty Redis database left on 127.0.0.1:6379 for the test run")


def rabbitmq_broker(url: str = "amqp://guest:guest@127.0.0.1:5672//") -> Broker:
    """The shared vhost, with queue and exchange names unique to this run (deleted after)."""
    run_id = new_run_id()
    names = _names(run_id)

    def cleanup() -> None:
        from kombu import Connection

        with Connection(url, connect_timeout=5) as conn:
            for q in (names["default_queue"], names["leader_queue"]):
                try:
                    conn.channel().queue_delete(q)
                except Exception:  # noqa: BLE001
                    pass
            for ex in (names["default_queue"], names["leader_queue"], f"{names['control']}.pidbox",
                       f"reply.{names['control']}.pidbox", f"{names['control']}.ev"):
                try:
                    conn.channel().exchange_delete(ex)
                except Exception:  # noqa: BLE001
                    pass

    return Broker("rabbitmq", url, run_id, cleanup=cleanup, **names)


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port (no automatic persistence)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found")
        self.starts += 1
        log = open(self.dir / f"redis.{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--dbfilename", "dump.rdb", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )
        log.close()
        poll(self.ping, 10.0, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        import redis

        c = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(c.ping())
        except redis.RedisError:
            return False
        finally:
            c.close()

    def client(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=2)

    def snapshot_and_stop(self) -> None:
        """SAVE (an explicit snapshot: the restart keeps what was queued), then stop the server
        (SIGTERM: a normal shutdown, which with ``--save ""`` writes nothing more)."""
        c = self.client()
        try:
            c.save()
        finally:
            c.close()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


# -- workers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Incarnation:
    proc: subprocess.Popen[bytes]
    log: Path
    started_at: float  # time.time()
    ended_at: float | None = None


class Worker:
    def __init__(self, cluster: Cluster, name: str, port: int | None) -> None:
        self.cluster = cluster
        self.name = name
        self.port = port
        self.nodename = f"{name}@{cluster.hostname}"
        self.state_dir = cluster.tmp / f"state-{name}"
        self.runs: list[Incarnation] = []
        #: Start with ``--cluster-join`` these addresses (a new member) instead of ``--cluster-nodes``.
        self.join: list[str] | None = None
        #: A fixed ``--cluster-nodes`` list (default: every clustered worker of the test cluster).
        self.static: list[str] | None = None
        #: Extra environment for this worker only (e.g. its own broker URL, through a proxy).
        self.env: dict[str, str] = {}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def argv(self) -> list[str]:
        c = self.cluster
        argv = [*celery_cli(), "-A", "tests.celery_app", "worker", "-P", "prefork", "-c", str(c.concurrency),
                "-n", self.nodename, "-l", "info", "--without-mingle", "--without-gossip"]
        if self.port is not None:
            if self.join is not None:
                argv += ["--cluster-join", ",".join(self.join)]
            else:
                nodes = self.static or [w.address for w in c.workers.values() if w.port is not None]
                argv += ["--cluster-nodes", ",".join(nodes)]
            argv += ["--cluster-listen", self.address, "--cluster-state-dir", str(self.state_dir),
                     "--cluster-election-timeout", f"{MIN_TIMEOUT}-{MAX_TIMEOUT}",
                     "--cluster-heartbeat-interval", str(HEARTBEAT)]
        return argv + list(c.extra_args)

    def start(self, extra_args: Sequence[str] = ()) -> Incarnation:
        assert not self.alive, f"{self.name} is already running"
        log = self.cluster.tmp / f"{self.name}.{len(self.runs)}.log"
        env = {**self.cluster.env, "CC_TEST_NODE": self.name, **self.env}
        with open(log, "wb") as out:
            proc = subprocess.Popen([*self.argv(), *extra_args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent)
        run = Incarnation(proc, log, time.time())
        self.runs.append(run)
        return run

    @property
    def run(self) -> Incarnation:
        return self.runs[-1]

    @property
    def pid(self) -> int:
        return self.run.proc.pid

    @property
    def alive(self) -> bool:
        return bool(self.runs) and self.run.proc.poll() is None

    def send(self, sig: int) -> float:
        """Signal the worker's main process only; returns the time.time() just before."""
        t = time.time()
        os.kill(self.pid, sig)
        return t

    def wait_exit(self, timeout: float) -> int:
        rc = self.run.proc.wait(timeout)
        self.run.ended_at = self.run.ended_at or time.time()
        return rc

    def kill_group(self) -> None:
        for run in self.runs:
            try:  # always: pool children may outlive a main process that already exited
                os.killpg(run.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                run.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            run.ended_at = run.ended_at or time.time()

    def group_pids(self) -> list[int]:
        """Processes still in the current incarnation's process group (pool children included)."""
        pgid = self.run.proc.pid
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != b"Z":
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
        return pids

    def status(self, timeout: float = 0.5) -> Status | None:
        if self.port is None or not self.alive:
            return None
        return http_status(self.port, timeout)

    def log_text(self, run: int = -1) -> str:
        path = self.runs[run].log
        return path.read_text(errors="replace") if path.exists() else ""

    def ready(self) -> bool:
        """The current incarnation logged ``ready.`` and (if clustered) answers /cluster/status."""
        if not self.alive:
            raise AssertionError(f"{self.name} exited with {self.run.proc.returncode}:\n{self.log_text()[-3000:]}")
        if f"{self.nodename} ready." not in self.log_text():
            return False
        return self.port is None or self.status() is not None


class Cluster:
    """``size`` clustered workers on one broker, plus (optionally) unclustered ones."""

    def __init__(self, tmp: Path, broker: Broker, *, size: int = 3, concurrency: int = 2, period: float = 1.0,
                 transport_options: dict[str, Any] | None = None, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.broker = broker
        self.concurrency = concurrency
        self.period = period
        self.transport_options = transport_options
        self.extra_args = list(extra_args)
        self.hostname = "cct"
        self.record_path = tmp / "records.jsonl"
        self.env = {**clean_env(), **(env or {}),
                    "PYTHONUNBUFFERED": "1",
                    "CC_TEST_BROKER": broker.url,
                    "CC_TEST_QUEUE": broker.default_queue,
                    "CC_TEST_LEADER_QUEUE": broker.leader_queue,
                    "CC_TEST_CONTROL": broker.control,
                    "CC_TEST_PERIOD": str(period),
                    "CC_TEST_RECORD": str(self.record_path)}
        if transport_options:
            self.env["CC_TEST_TRANSPORT_OPTIONS"] = json.dumps(transport_options)
        ports = free_ports(size)
        self.workers: dict[str, Worker] = {}
        for i, port in enumerate(ports, 1):
            self.workers[f"w{i}"] = Worker(self, f"w{i}", port)
        self._app: Any = None

    # -- processes ---------------------------------------------------------------------------

    def add_worker(self, name: str, clustered: bool = False) -> Worker:
        w = Worker(self, name, free_ports(1)[0] if clustered else None)
        self.workers[name] = w
        return w

    def start(self, names: Iterable[str] | None = None, wait: bool = True) -> None:
        names = list(names or self.workers)
        for n in names:
            self.workers[n].start()
        if wait:
            self.wait_ready(names)

    def wait_ready(self, names: Iterable[str], timeout: float = STARTUP_DEADLINE) -> None:
        names = list(names)
        poll(lambda: all(self.workers[n].ready() for n in names), timeout, f"workers {names} ready", 0.05)

    def restart(self, name: str) -> Worker:
        w = self.workers[name]
        assert not w.alive
        w.start()
        return w

    def kill_all(self) -> None:
        for w in self.workers.values():
            w.kill_group()

    # -- observation -------------------------------------------------------------------------

    def by_address(self, address: str | None) -> Worker | None:
        for w in self.workers.values():
            if w.port is not None and w.address == address:
                return w
        return None

    def statuses(self) -> dict[str, Status | None]:
        return {n: w.status() for n, w in self.workers.items() if w.port is not None and w.alive}

    def agreed_leader(self, *, min_term: int = 0, exclude: Iterable[str] = ()) -> tuple[Worker, int] | None:
        """(leader, term) when exactly one live worker claims a lease in a term >= ``min_term``
        and every other live worker that answers names it as leader in that same term."""
        exclude = set(exclude)
        sts = {n: s for n, s in self.statuses().items() if n not in exclude}
        leaders = [(n, s) for n, s in sts.items() if s and s.get("is_leader")]
        if len(leaders) != 1:
            return None
        name, st = leaders[0]
        term = st["term"]
        if term < min_term:
            return None
        for _, s in sts.items():
            if s is None or s.get("term") != term or s.get("leader_id") != st["id"]:
                return None
        return self.workers[name], term

    def wait_leader(self, timeout: float = 20.0, **kw: Any) -> tuple[Worker, int]:
        return poll(lambda: self.agreed_leader(**kw), timeout, "one agreed leader")

    def records(self, *kinds: str) -> list[dict[str, Any]]:
        recs = read_records(self.record_path)
        return [r for r in recs if not kinds or r["kind"] in kinds]

    def elected_terms(self) -> dict[int, set[str]]:
        """term -> every node name that announced leadership in it (must be one)."""
        out: dict[int, set[str]] = {}
        for r in self.records("elected"):
            out.setdefault(int(r["term"]), set()).add(r["node"])
        return out

    def beat_sends(self) -> list[dict[str, Any]]:
        """One entry per beat-sent message id, from the sender's record and/or the executed tick,
        sorted by send time: {id, sent_at, sent_by, cluster_term, sent_term, executed_by, executed_at}."""
        sends: dict[str, dict[str, Any]] = {}
        for r in self.records("beat_sent", "tick"):
            e = sends.setdefault(r["id"], {"id": r["id"], "executed_by": [], "executed_at": [],
                                           "recorded_by_sender": False})
            if r["kind"] == "beat_sent":
                e.update(sent_at=r["sent_at"], sent_by=r["node"], cluster_term=r["cluster_term"],
                         sent_term=r["sent_term"], recorded_by_sender=True)
            else:
                e["executed_by"].append(r["node"])
                e["executed_at"].append(r["t"])
                e.setdefault("sent_at", r["sent_at"])
                e.setdefault("sent_by", r["sent_by"])
                e.setdefault("cluster_term", r["cluster_term"])
                e.setdefault("sent_term", r["sent_term"])
                e.setdefault("token", r["token"])
                if r["token"] is not None:
                    e["token"] = r["token"]
        return sorted(sends.values(), key=lambda e: e["sent_at"])

    def app(self) -> Any:
        """A client app for this run (same broker, queues and tasks as the workers)."""
        if self._app is None:
            from tests.celery_app import create_app

            self._app = create_app(self.broker.url, default_queue=self.broker.default_queue,
                                   leader_queue=self.broker.leader_queue, control=self.broker.control,
                                   period=self.period, transport_options=self.transport_options)
        return self._app

    def inspect_cluster_status(self, timeout: float = 1.5) -> dict[str, dict[str, Any]]:
        """``celery inspect cluster_status`` over the broker: nodename -> reply."""
        names = [w.nodename for w in self.workers.values() if w.alive]
        replies = self.app().control.broadcast("cluster_status", reply=True, timeout=timeout, destination=names,
                                                limit=len(names))
        out: dict[str, dict[str, Any]] = {}
        for reply in replies or []:
            out.update(reply)
        return out

    def close_app(self) -> None:
        if self._app is not None:
            try:
                self._app.close()
            except Exception:  # noqa: BLE001
                pass
            self._app = None

    def report(self, tail: int = 120) -> str:
        parts = [f"== test dir: {self.tmp}", f"== broker: {self.broker.kind} {self.broker.url} "
                 f"queues {self.broker.default_queue}, {self.broker.leader_queue}"]
        for w in self.workers.values():
            for i, run in enumerate(w.runs):
                text = run.log.read_text(errors="replace") if run.log.exists() else "(no log)"
                lines = text.splitlines()
                parts.append(f"== {w.name} run {i} pid {run.proc.pid} rc {run.proc.returncode} "
                             f"({len(lines)} lines, last {tail}): {run.log}")
                parts.extend(lines[-tail:])
        recs = self.records()
        parts.append(f"== records ({len(recs)}), last 60: {self.record_path}")
        parts.extend(json.dumps(r) for r in recs[-60:])
        return "\n".join(parts)
