"""A leader worker saturated with CPU-bound leader-only tasks keeps its followers' heartbeats fresh.

Three clustered ``celery worker`` processes on a Redis database of our own, at the library's
DEFAULT cluster timing (election timeout 1.0-2.0 s, heartbeat 0.1 s: ``tests/workers.py``
passes fast timings, :class:`DefaultTimingWorker` drops them), the pool under test with
concurrency = ``os.cpu_count()``. Once one leader is agreed, the leader's pool is kept busy
for :data:`WINDOW` seconds with ``burn`` tasks (``@leader_only``, each spinning the CPU for
:data:`BURN` s) - a backlog always waits in the leader queue, and the total sent is bounded -
while every worker's ``GET /cluster/status`` is read every :data:`POLL_EVERY` s:

* each follower's ``leader_contact_ms`` (ms since it last heard its leader) must stay below
  the minimum election timeout, and no term may change (no election, no step-down);
* the leader must really have been saturated, or the test proves nothing: its pool's busy
  fraction (execution time of ``burn`` tasks inside the window / (window x concurrency)) is
  asserted, and so is the CPU its pool *demanded*: time on a CPU plus time runnable but
  waiting for one (``/proc/<pid>/task/<tid>/schedstat``), which holds on a machine other
  processes load too - there ``utime + stime``, also reported, only says how much it got.
* the workers really run at the default timing: the leader's ``lease_remaining_ms`` never
  exceeds the default lease (min timeout x (1 - drift) / (1 + drift) = 905 ms).

The 60 s window is the scenario; every other wait is poll-with-deadline, and every loop is
bounded in count as well as time.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

import pytest

from celery_cluster.config import Timing, parse_timeout_range
from celery_cluster.settings import OPTIONS
from tests.test_celery_workers import clusters, measure  # noqa: F401 - fixture
from tests.workers import Cluster, Status, Worker, poll

pytestmark = [pytest.mark.processes, pytest.mark.timeout(420)]

WINDOW = 60.0  # seconds of saturation (the scenario)
BURN = 0.5  # seconds of CPU spin per task
POLL_EVERY = 0.05  # status poll period
CORES = os.cpu_count() or 1
#: The library's defaults, which these workers run with (no timing flags on the command line).
DEFAULT_ELECTION_TIMEOUT = parse_timeout_range(OPTIONS["election_timeout"][1])
DEFAULT_HEARTBEAT = float(OPTIONS["heartbeat_interval"][1])
MIN_TIMEOUT_MS = DEFAULT_ELECTION_TIMEOUT[0] * 1000.0
_DRIFT = Timing().max_clock_drift
#: The longest lease a leader can hold at the default timing (ms).
DEFAULT_LEASE_MS = MIN_TIMEOUT_MS * (1 - _DRIFT) / (1 + _DRIFT)
PREFETCH = 4  # Celery's default worker_prefetch_multiplier: the leader reserves PREFETCH x concurrency
TIMING_FLAGS = ("--cluster-election-timeout", "--cluster-heartbeat-interval")


class DefaultTimingWorker(Worker):
    """:class:`tests.workers.Worker` at the library's default cluster timing, with ``pool``."""

    def __init__(self, cluster: Cluster, name: str, port: int | None, pool: str) -> None:
        super().__init__(cluster, name, port)
        self.pool = pool

    def argv(self) -> list[str]:
        base, out = super().argv(), []
        i = 0
        while i < len(base):  # bounded: one pass over the argument list
            arg = base[i]
            if arg in TIMING_FLAGS:
                i += 2  # the flag and its value: leave the library's default
                continue
            out.append(arg)
            if arg == "-P":
                out.append(self.pool)
                i += 2
                continue
            i += 1
        return out


def group_cpu_seconds(w: Worker) -> float:
    """utime + stime of every live process in the worker's process group (pool children too)."""
    ticks = 0
    for pid in w.group_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
        except (OSError, IndexError, ValueError):
            continue  # exited in between
    return ticks / os.sysconf("SC_CLK_TCK")


def sched_ns(pids: list[int]) -> dict[tuple[int, int], int]:
    """(pid, tid) -> ns on a CPU plus ns runnable on a run queue, for every thread of ``pids``."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run, wait, _ = f.read().split()
                out[(pid, int(tid))] = int(run) + int(wait)
            except (OSError, ValueError):
                continue
    return out


def demand_delta(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> float:
    """Seconds of CPU demanded between two :func:`sched_ns` readings (threads new since count from 0)."""
    return sum(v - before.get(k, 0) for k, v in after.items()) / 1e9


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


class Watcher:
    """Reads one worker's ``GET /cluster/status`` every :data:`POLL_EVERY` s from ``t_start``
    to ``t_end`` (monotonic) in a thread of its own; bounded in count and by ``t_end``."""

    def __init__(self, worker: Worker, t_start: float, t_end: float) -> None:
        self.worker, self.t_start, self.t_end = worker, t_start, t_end
        self.seen: list[tuple[float, Status]] = []  # (s into the window, status)
        self.failures: list[float] = []
        self.latencies: list[float] = []  # ms per answered request
        self.max_gap = 0.0
        self.thread = threading.Thread(target=self.run, name=f"watch-{worker.name}", daemon=True)

    def run(self) -> None:
        last = None
        for k in range(int((self.t_end - self.t_start) / POLL_EVERY) + 1):
            target = self.t_start + k * POLL_EVERY
            if target >= self.t_end or time.monotonic() >= self.t_end:
                return
            pause = target - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing of the 50 ms poll, not synchronisation
            now = time.monotonic()
            if last is not None:
                self.max_gap = max(self.max_gap, now - last)
            last = now
            st = self.worker.status(timeout=1.0)
            rel = round(now - self.t_start, 3)
            if st is None:
                self.failures.append(rel)
            else:
                self.latencies.append((time.monotonic() - now) * 1000)
                self.seen.append((rel, st))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_saturated_leader_keeps_heartbeats_fresh(clusters: Any, pool: str) -> None:
    import redis

    c: Cluster = clusters("redis", concurrency=CORES)
    c.workers = {n: DefaultTimingWorker(c, n, w.port, pool) for n, w in c.workers.items()}
    argv = c.workers["w1"].argv()
    assert not set(TIMING_FLAGS) & set(argv) and argv[argv.index("-P") + 1] == pool, argv
    assert argv[argv.index("-c") + 1] == str(CORES), argv
    assert DEFAULT_ELECTION_TIMEOUT == (1.0, 2.0) and DEFAULT_HEARTBEAT == 0.1

    c.start()
    leader, term = c.wait_leader(timeout=30)
    followers = [w for w in c.workers.values() if w is not leader]
    burn = c.app().tasks["tests.celery_app.burn"]
    queue = c.broker.leader_queue
    rds = redis.Redis.from_url(c.broker.url, socket_timeout=2)

    # Enough to fill the pool and its prefetch, a backlog on top, kept topped up; bounded overall.
    low_water = 2 * CORES  # messages that must always wait in the leader queue
    prefill = (PREFETCH + 1) * CORES + 2 * low_water
    max_tasks = prefill + int(1.25 * WINDOW / BURN * CORES)
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        for _ in range(max(0, min(n, max_tasks - sent))):
            burn.delay(sent, seconds=BURN)
            sent += 1

    try:
        send(prefill)
        poll(lambda: len(c.records("burn_start")) >= CORES, 30, f"{CORES} burn tasks running on the leader")
        poll(lambda: all((s := f.status()) and s.get("leader_contact_ms") is not None for f in followers), 10,
             "every follower reporting leader_contact_ms")

        def pool_pids() -> list[int]:
            # prefork: the pool children (not the main process); threads: the worker process itself
            pids = leader.group_pids()
            return [p for p in pids if p != leader.pid] if pool == "prefork" else [leader.pid]

        cpu0, machine0, demand0 = group_cpu_seconds(leader), machine_cpu(), sched_ns(pool_pids())
        t_start = time.monotonic()
        t_end = t_start + WINDOW
        # One watcher thread per worker, so a slow answer from one (the leader's HTTP server
        # shares a GIL with the burning threads under -P threads) delays no one else's samples.
        watchers = {w.name: Watcher(w, t_start, t_end) for w in c.workers.values()}
        for wt in watchers.values():
            wt.thread.start()
        min_depth = math.inf
        for k in range(int(WINDOW / POLL_EVERY) + 1):  # top up the backlog; bounded in count and by t_end
            target = t_start + k * POLL_EVERY
            if target >= t_end or time.monotonic() >= t_end:
                break
            pause = target - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing, not synchronisation
            depth = int(rds.llen(queue))
            min_depth = min(min_depth, depth)
            if depth < low_water:
                send(2 * low_water - depth)
        for wt in watchers.values():
            wt.thread.join(timeout=max(0.0, t_end - time.monotonic()) + 5.0)
            assert not wt.thread.is_alive(), f"watcher of {wt.worker.name} did not finish"
        t_stop = time.monotonic()
        cpu1, machine1, demand1 = group_cpu_seconds(leader), machine_cpu(), sched_ns(pool_pids())
    finally:
        rds.close()

    violations: list[str] = []
    terms_seen = {term}
    samples: list[tuple[float, str, float]] = []  # (t into the window, follower, leader_contact_ms)
    for wt in watchers.values():
        w = wt.worker
        violations += [f"{t}s: {w.name} did not answer" for t in wt.failures]
        for t, st in wt.seen:
            terms_seen.add(st["term"])
            if w is leader:
                if st["term"] != term or not st["is_leader"]:
                    violations.append(f"{t}s: leader {w.name} term {st['term']} is_leader {st['is_leader']}")
                continue
            if st["term"] != term or st["state"] != "follower" or st["leader_id"] != leader.address:
                violations.append(f"{t}s: follower {w.name} term {st['term']} state {st['state']} "
                                  f"leader {st['leader_id']}")
            if st["leader_contact_ms"] is None:
                violations.append(f"{t}s: follower {w.name} has no leader contact")
            else:
                samples.append((t, w.name, float(st["leader_contact_ms"])))
    lw = watchers[leader.name]
    leases = [st["lease_remaining_ms"] for _, st in lw.seen]
    leader_view = [p["last_contact_ms"] for _, st in lw.seen for p in st["nodes"] if p["last_contact_ms"] is not None]
    polls = min(len(watchers[f.name].seen) + len(watchers[f.name].failures) for f in followers)
    min_lease_ms, max_lease_ms = min(leases, default=math.nan), max(leases, default=math.nan)
    max_leader_peer_ms = max(leader_view, default=None)
    failures = sum(len(wt.failures) for wt in watchers.values())
    seconds = t_stop - t_start
    runs = c.records("burn")
    in_window = [r for r in runs if t_start <= r["ended"] <= t_stop]
    busy = sum(max(0.0, min(r["ended"], t_stop) - max(r["started"], t_start)) for r in runs)
    busy_fraction = busy / (seconds * CORES)
    cpu_fraction = (cpu1 - cpu0) / (seconds * CORES)  # CPU the leader's group got, of all cores
    demand_cores = demand_delta(demand0, demand1) / seconds  # cores' worth the pool wanted
    machine_busy = (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1])
    task_cpu_share = (sum(r["cpu"] for r in in_window) / sum(r["ended"] - r["started"] for r in in_window)
                      if in_window else 0.0)
    ages = [a for _, _, a in samples]
    worst = sorted(samples, key=lambda s: s[2], reverse=True)[:3]
    elected_after = [r for r in c.records("elected") if r["term"] != term]
    lost = c.records("lost")
    elections = len(terms_seen) - 1

    measure(f"load_{pool}", pool=pool, concurrency=CORES, seconds=round(seconds, 2), polls=polls,
            max_heartbeat_age_ms=max(ages, default=None),
            p99_heartbeat_age_ms=percentile(ages, 0.99) if ages else None,
            p50_heartbeat_age_ms=percentile(ages, 0.50) if ages else None,
            elections=elections, tasks_completed=len(in_window), busy_fraction=round(busy_fraction, 3),
            pool_runnable_cores=round(demand_cores, 3),
            leader_cpu_fraction_of_all_cores=round(cpu_fraction, 3), machine_cpu_busy=round(machine_busy, 3),
            task_cpu_share=round(task_cpu_share, 3), tasks_sent=sent, min_leader_queue_depth=min_depth,
            min_lease_remaining_ms=min_lease_ms, max_lease_remaining_ms=max_lease_ms,
            max_leader_view_peer_contact_ms=max_leader_peer_ms,
            leader_polls=len(lw.seen) + len(lw.failures),
            status_latency_ms={("leader" if wt.worker is leader else wt.worker.name):
                               {"p99": round(percentile(wt.latencies, 0.99), 1), "max": round(max(wt.latencies), 1)}
                               for wt in watchers.values() if wt.latencies},
            max_poll_gap_ms={wt.worker.name: round(wt.max_gap * 1000, 1) for wt in watchers.values()},
            status_failures=failures,
            worst_samples=[{"t_s": t, "follower": n, "ms": a} for t, n, a in worst])

    assert not violations, f"{len(violations)} violations, first ones: {violations[:10]}"
    assert elections == 0 and not elected_after and not lost, (terms_seen, elected_after, lost)
    assert polls >= 0.9 * WINDOW / POLL_EVERY, f"only {polls} polls in {seconds:.1f}s: the samples are too sparse"
    assert len(lw.seen) >= 0.5 * WINDOW / POLL_EVERY, f"only {len(lw.seen)} leader polls"
    assert max(ages) < MIN_TIMEOUT_MS, f"heartbeat age {max(ages)} ms >= {MIN_TIMEOUT_MS} ms: {worst}"
    # The pool really was saturated, and with work from the leader queue to spare.
    assert min_depth >= 1, "the leader queue ran dry: the pool may have idled for want of work"
    assert busy_fraction >= 0.8, f"leader pool busy {busy_fraction:.2f} of {seconds:.1f}s x {CORES}"
    if pool == "prefork":  # one process per core, each on a CPU or queued for one nearly all the time
        assert demand_cores >= 0.8 * CORES, f"pool runnable {demand_cores:.2f} cores of {CORES}"
    else:  # threads share one GIL: pure-Python spinning can keep at most one core busy
        assert demand_cores >= 0.8, f"pool runnable {demand_cores:.2f} cores (GIL-bound: at most 1)"
    # The premise: default timing (a fast-timing lease would be half as long).
    assert 0.5 * DEFAULT_LEASE_MS < max_lease_ms <= DEFAULT_LEASE_MS + 0.1, (max_lease_ms, DEFAULT_LEASE_MS)
    assert all(r["node"] == leader.name and r["token"] == term == r["term"] for r in runs), \
        "a burn task ran off the leader or outside its term"
