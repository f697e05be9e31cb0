"""The Django example (``examples/django``) with django-celery-beat's DatabaseScheduler on the
local PostgreSQL, run by three real ``celery -A proj worker`` processes.

Each test creates a throwaway database (``cc_dj_<run id>``), migrates it, and drops it at
the end. Periodic tasks are created and changed through the ORM in a separate process
(``manage.py shell``), as an admin or a deploy script would. Every run of ``demo.tick``
appends ``entry`` (the PeriodicTask's name), ``run`` (the run number the cluster
replicated before publishing) and ``term`` to a record file: a duplicate firing repeats a
run number, a skipped one leaves a gap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import HOST, die_with_parent, free_ports
from tests.workers import Broker, http_status, poll, redis_broker

pytestmark = [pytest.mark.processes, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "examples" / "django"
TIMING = ("0.5-1.0", "0.05")


def measure(name: str, **values: Any) -> None:
    print(f"MEASURE {name}: " + json.dumps(values, default=str))


def psql(sql: str, db: str = "postgres") -> None:
    import psycopg

    with psycopg.connect(host=HOST, user="postgres", dbname=db, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


@pytest.fixture
def database() -> Iterator[str]:
    name = f"cc_dj_{uuid.uuid4().hex[:10]}"
    try:
        psql(f"CREATE DATABASE {name}")
    except Exception as exc:  # noqa: BLE001 - say what the suite needs
        pytest.fail(f"these tests need PostgreSQL on {HOST}:5432 (user postgres; .ci/run starts it): {exc}")
    try:
        yield name
    finally:
        psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' "
             "AND pid <> pg_backend_pid()")
        psql(f"DROP DATABASE IF EXISTS {name}")


class Project:
    """The example project on one database and one broker, with its worker processes."""

    def __init__(self, tmp: Path, db: str, broker: Broker, size: int = 3) -> None:
        self.tmp, self.db, self.broker = tmp, db, broker
        self.records = tmp / "records.jsonl"
        self.ports = free_ports(size)
        self.names = [f"w{i + 1}" for i in range(size)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.runs: dict[str, int] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "PROJ_", "DEMO_"))}
        self.env.update(PYTHONPATH=os.pathsep.join([str(PROJECT), str(REPO)]), PYTHONUNBUFFERED="1",
                        PROJ_DB_NAME=db, CELERY_BROKER_URL=broker.url, DEMO_RECORD_FILE=str(self.records),
                        DJANGO_SETTINGS_MODULE="proj.settings")

    def manage(self, *args: str, code: str | None = None) -> str:
        argv = [sys.executable, str(PROJECT / "manage.py"), *args]
        if code is not None:
            argv += ["-c", textwrap.dedent(code)]
        proc = subprocess.run(argv, cwd=PROJECT, env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def add_interval(self, name: str, every: float, **fields: Any) -> None:
        self.manage("shell", code=f"""
            from django_celery_beat.models import IntervalSchedule, PeriodicTask
            every, _ = IntervalSchedule.objects.get_or_create(every={every!r}, period=IntervalSchedule.SECONDS)
            PeriodicTask.objects.create(name={name!r}, task="demo.tick", interval=every,
                                        args={json.dumps([name])!r}, **{fields!r})
        """)

    def address(self, name: str) -> str:
        return f"{HOST}:{self.ports[self.names.index(name)]}"

    def start(self, name: str) -> None:
        run = self.runs.get(name, 0)
        self.runs[name] = run + 1
        argv = [sys.executable, "-m", "celery", "-A", "proj", "worker", "-P", "prefork", "-c", "1", "-n",
                f"{name}@django", "-l", "info", "--without-mingle", "--without-gossip",
                "--cluster-nodes", ",".join(self.address(n) for n in self.names),
                "--cluster-listen", self.address(name), "--cluster-state-dir", str(self.tmp / f"state-{name}"),
                "--cluster-election-timeout", TIMING[0], "--cluster-heartbeat-interval", TIMING[1]]
        with open(self.tmp / f"{name}.{run}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(argv, cwd=PROJECT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=die_with_parent)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def kill_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def leader(self, min_term: int = 0) -> tuple[str, int] | None:
        sts = {n: http_status(self.ports[self.names.index(n)]) for n, p in self.procs.items() if p.poll() is None}
        leaders = [(n, s["term"]) for n, s in sts.items() if s and s.get("is_leader") and s.get("beat_running")]
        if len(leaders) != 1 or leaders[0][1] < min_term:
            return None
        name, term = leaders[0]
        if any(s is None or s["leader_id"] != self.address(name) for s in sts.values()):
            return None
        return name, term

    def ticks(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        return [json.loads(line) for line in self.records.read_text().splitlines() if line.strip()]

    def report(self) -> str:
        parts = []
        for name, runs in self.runs.items():
            for run in range(runs):
                log = self.tmp / f"{name}.{run}.log"
                parts.append(f"== {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:]))
        return "\n".join(parts)


@pytest.fixture
def project(tmp_path: Path, database: str, request: pytest.FixtureRequest) -> Iterator[Project]:
    broker = redis_broker()
    p = Project(tmp_path, database, broker)
    p.manage("migrate", "-v", "0")
    failed_before = request.session.testsfailed
    try:
        yield p
    finally:
        p.kill_all()
        if request.session.testsfailed > failed_before:
            print(p.report(), file=sys.stderr)
        broker.cleanup()


def check_runs(ticks: list[dict[str, Any]], entry: str) -> dict[str, Any]:
    runs = [t["run"] for t in ticks if t["entry"] == entry]
    counts = Counter(runs)
    duplicates = {r: n for r, n in counts.items() if n > 1}
    missed = sorted(set(range(min(runs), max(runs) + 1)) - set(runs)) if runs else []
    return {"runs": len(runs), "duplicates": duplicates, "missed": missed}


def test_database_scheduler_across_three_leader_kills_and_a_live_orm_change(project: Project) -> None:
    p = project
    p.add_interval("every-second", 1.0)
    for name in p.names:
        p.start(name)
    leader, term = poll(p.leader, 60, "one leader running the DatabaseScheduler", 0.05)
    poll(lambda: len([t for t in p.ticks() if t["entry"] == "every-second"]) >= 3, 20, "three ticks")
    gaps: list[float] = []
    for _ in range(3):
        before = len(p.ticks())
        killed_at = time.time()
        p.kill(leader)
        new = poll(lambda: p.leader(min_term=term + 1), 15, "a new leader", 0.02)
        first = poll(lambda: next((t for t in p.ticks()[before:] if t["term"] > term), None), 15,
                     "a tick from the new leader", 0.05)
        gaps.append(first["t"] - killed_at)
        p.start(leader)  # the killed worker comes back on its state dir
        leader, term = new
        poll(lambda: len(p.ticks()) >= before + 4, 20, "ticks after the failover", 0.05)
    # A periodic task added through the ORM while the cluster runs reaches the leader.
    added_at = time.time()
    p.add_interval("added-live", 1.0)
    first_added = poll(lambda: next((t for t in p.ticks() if t["entry"] == "added-live"), None), 20,
                       "the entry added through the ORM to fire", 0.05)
    poll(lambda: len([t for t in p.ticks() if t["entry"] == "added-live"]) >= 3, 20, "it keeps firing", 0.05)
    time.sleep(1.5)  # observation window: a duplicate would show up now
    ticks = p.ticks()
    every, added = check_runs(ticks, "every-second"), check_runs(ticks, "added-live")
    measure("django_database_scheduler", kills=3, every_second=every, added_live=added,
            failover_to_first_tick_s=[round(g, 2) for g in gaps], orm_add_to_first_fire_s=round(
                first_added["t"] - added_at, 2))
    assert every["duplicates"] == {} and every["missed"] == [], every
    assert added["duplicates"] == {} and added["missed"] == [], added
    assert first_added["t"] - added_at < 5 + 2, "an ORM change reaches the leader within the refresh interval"
    terms = {t["term"] for t in ticks if t["entry"] == "every-second"}
    assert len(terms) >= 4, f"three failovers, four leaders' terms: {terms}"


def test_django_celery_beat_semantics_and_admin_changes_survive_a_failover(project: Project) -> None:
    """one_off, expires, start_time, a clocked schedule, an interval edited and a task disabled
    through the ORM while the cluster runs - and all of it still holds after the leader is
    killed (django-celery-beat's own logic decides; the cluster only replicates what fired)."""
    p = project
    out = p.manage("shell", code="""
        import datetime
        from django.utils import timezone
        from django_celery_beat.models import ClockedSchedule, IntervalSchedule, PeriodicTask
        now = timezone.now()
        one, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
        def add(name, **kw):
            kw.setdefault("interval", one)
            PeriodicTask.objects.create(name=name, task="demo.tick", args='["%s"]' % name, **kw)
        add("steady")
        add("one-off", one_off=True)
        add("expires", expires=now + datetime.timedelta(seconds=8))
        add("starts-later", start_time=now + datetime.timedelta(seconds=10))
        add("to-edit")
        add("to-disable")
        clocked = ClockedSchedule.objects.create(clocked_time=now + datetime.timedelta(seconds=12))
        add("clocked", interval=None, clocked=clocked, one_off=True)
        print("created at", now.timestamp())
    """)
    # The instant every relative time above was computed from (not when the shell exited:
    # Django's start-up and teardown take a second or so on a loaded machine).
    created = float(out.split("created at", 1)[1].split()[0])
    for name in p.names:
        p.start(name)
    leader, term = poll(p.leader, 60, "one leader running the DatabaseScheduler", 0.05)

    def fired(entry: str) -> list[dict[str, Any]]:
        return [t for t in p.ticks() if t["entry"] == entry]

    poll(lambda: len(fired("to-edit")) >= 2 and len(fired("to-disable")) >= 2, 30, "the editable entries firing")
    p.manage("shell", code="""
        from django_celery_beat.models import IntervalSchedule, PeriodicTask
        three, _ = IntervalSchedule.objects.get_or_create(every=3, period=IntervalSchedule.SECONDS)
        t = PeriodicTask.objects.get(name="to-edit"); t.interval = three; t.save()
        t = PeriodicTask.objects.get(name="to-disable"); t.enabled = False; t.save()
    """)
    changed = time.time()
    time.sleep(6)  # observe the changes on this leader
    p.kill(leader)  # ...and on the next one
    new_leader, _ = poll(lambda: p.leader(min_term=term + 1), 15, "a new leader", 0.05)
    p.start(leader)
    time.sleep(12)  # past every start_time, expiry and clocked time
    ticks = p.ticks()
    t_edit = [t["t"] for t in fired("to-edit") if t["t"] > changed + 6]  # after the change reached the leader
    gaps = [b - a for a, b in zip(t_edit, t_edit[1:])]
    measure("django_semantics", counts={e: len(fired(e)) for e in
                                        ("steady", "one-off", "expires", "starts-later", "clocked", "to-edit",
                                         "to-disable")}, edited_gaps=[round(g, 2) for g in gaps])
    assert len(fired("one-off")) == 1
    assert len(fired("clocked")) == 1 and fired("clocked")[0]["t"] >= created + 11.5
    expires_last = max(t["t"] for t in fired("expires"))
    assert created + 6 <= expires_last <= created + 9.5, expires_last - created
    assert min(t["t"] for t in fired("starts-later")) >= created + 9.5
    assert all(t["t"] <= changed + 5 + 1 for t in fired("to-disable")), "a disabled task kept firing"
    assert gaps and all(2.5 <= g <= 3.6 for g in gaps), gaps  # the edited interval, on both leaders
    for entry in ("steady", "one-off", "expires", "starts-later", "clocked", "to-edit", "to-disable"):
        stats = check_runs(ticks, entry)
        assert stats["duplicates"] == {}, (entry, stats)
