"""Membership changes on real ``celery worker`` processes (Redis broker, a 1 s beat schedule):
replacing a dead member, the unsafe rolling edit of ``--cluster-nodes``, growing 3 -> 5 with
``--cluster-join`` while the leader is killed, and shrinking 5 -> 3 with ``celery cluster
remove`` (the leader removing itself included).

Judged where the work runs: every beat message was sent by the one leader of the term it
carries (``assert_beat_fenced``), and every replicated run number was sent once - a gap is a
missed due time, a repeat a duplicate. The only misses allowed are at a leader ``kill -9``
(the documented window: a firing committed, the leader killed before it published).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from typing import Any

from tests.test_celery_workers import assert_beat_fenced, clusters, measure  # noqa: F401 - the fixture
from tests.workers import REPO, SHUTDOWN_WAIT, Cluster, celery_cli, poll

SETTLE = 30.0  # starting workers on 2 cores, several at once


def members_of(c: Cluster, names: list[str]) -> set[tuple[str, ...]]:
    """The configurations the named (live) workers report (sorted: members are listed in the
    order they were added, and concurrent joins come in any order)."""
    out = set()
    for n in names:
        st = c.workers[n].status()
        out.add(tuple(sorted(st["members"])) if st else ("<no answer>",))
    return out


def wait_members(c: Cluster, names: list[str], want: list[str], timeout: float = SETTLE) -> None:
    poll(lambda: members_of(c, names) == {tuple(sorted(want))}, timeout, f"{names} to hold members {want}", 0.1)


def cluster_cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*celery_cli(), "-A", "tests.celery_app", "cluster", *args], cwd=REPO, env=c.env,
                          capture_output=True, text=True, timeout=90)


def beat_runs(c: Cluster) -> tuple[list[int], list[int], list[int]]:
    """(every replicated run number sent, the duplicates, the gaps) of the ``tick`` entry."""
    runs = [int(r["cluster_run"]) for r in c.records("beat_sent") if r.get("cluster_run") is not None]
    dupes = sorted(n for n, k in Counter(runs).items() if k > 1)
    gaps = sorted(set(range(min(runs), max(runs) + 1)) - set(runs)) if runs else []
    return runs, dupes, gaps


def test_replace_a_dead_member_while_beat_runs(clusters: Any) -> None:
    c = clusters("redis")
    c.start()
    leader, term = c.wait_leader()
    poll(lambda: len(c.records("beat_sent")) >= 3, 15, "three ticks")
    dead = next(w for w in c.workers.values() if w is not leader)
    dead.send(signal.SIGKILL)  # the host is gone for good
    dead.wait_exit(5)

    out = cluster_cli(c, "remove", dead.address)
    assert out.returncode == 0, out.stdout + out.stderr
    rest = [w.address for w in c.workers.values() if w is not dead]
    assert out.stdout.strip().endswith(", ".join(rest)), out.stdout
    fresh = c.add_worker("w4", clustered=True)
    fresh.join = rest
    fresh.start()
    c.wait_ready(["w4"], timeout=SETTLE)
    live = [n for n, w in c.workers.items() if w.alive]
    wait_members(c, live, [*rest, fresh.address])
    n_before = len(c.records("beat_sent"))
    poll(lambda: len(c.records("beat_sent")) >= n_before + 4, 15, "four more ticks after the replacement")
    view = cluster_cli(c, "status")
    assert "members (version" in view.stdout and fresh.address in view.stdout, view.stdout

    sends = assert_beat_fenced(c)
    runs, dupes, gaps = beat_runs(c)
    changes = [r for r in (c.workers[n].status() for n in live) if r]
    measure("replace_dead_member", changes=2, failovers=len({s["cluster_term"] for s in sends}) - 1,
            beat_runs=len(runs), duplicates=dupes, missed=gaps, config_version=changes[0]["config_version"])
    assert not dupes, f"run numbers sent twice: {dupes}"
    assert not gaps, f"run numbers never sent (missed due times): {gaps}"


def test_rolling_edit_then_grow_with_a_leader_kill_then_shrink(clusters: Any) -> None:
    c = clusters("redis")
    first = [w.address for w in c.workers.values()]
    for w in c.workers.values():
        w.static = list(first)
    c.start()
    leader, term = c.wait_leader()
    poll(lambda: len(c.records("beat_sent")) >= 2, 15, "two ticks")

    # 1. The rolling edit the issue describes: two new workers with the five-node list, and one
    # old member restarted with it. The replicated configuration wins; the new ones never vote.
    w4, w5 = c.add_worker("w4", clustered=True), c.add_worker("w5", clustered=True)
    five = [*first, w4.address, w5.address]
    for w in (w4, w5):
        w.static = list(five)
    c.start(["w4", "w5"])
    edited = next(w for w in c.workers.values() if w.address in first and w is not leader)
    edited.send(signal.SIGTERM)
    edited.wait_exit(SHUTDOWN_WAIT)
    edited.static = list(five)
    edited.start()
    c.wait_ready([edited.name])
    wait_members(c, ["w1", "w2", "w3"], first)
    time.sleep(3.0)  # observation window: the new nodes must stay out, whatever their timers do
    for w in (w4, w5):
        st = w.status()
        assert st is not None and st["term"] == 0 and not st["is_leader"] and sorted(st["members"]) == sorted(five), st
    assert "another cluster" in edited.log_text() or any("another cluster" in c.workers[n].log_text()
                                                         for n in ("w1", "w2", "w3"))
    assert "using the replicated one" in edited.log_text()
    leader, term = c.wait_leader(exclude=["w4", "w5"])

    # 2. Grow 3 -> 5 with --cluster-join while the leader is killed.
    for w in (w4, w5):
        w.send(signal.SIGTERM)
        w.wait_exit(SHUTDOWN_WAIT)
        w.join = list(first)
        w.start()
    t_kill = leader.send(signal.SIGKILL)
    leader.wait_exit(5)
    c.wait_ready(["w4", "w5"], timeout=SETTLE)
    leader.start()
    c.wait_ready([leader.name], timeout=SETTLE)
    wait_members(c, list(c.workers), five, timeout=60)
    leader, term = c.wait_leader(timeout=20)

    # 3. Shrink 5 -> 3: the leader removes itself (and hands over), then one more follower.
    out = cluster_cli(c, "remove", leader.address)
    assert out.returncode == 0, out.stdout + out.stderr
    gone = [leader]
    new_leader, _ = c.wait_leader(timeout=20, exclude=[leader.name])
    assert new_leader is not leader
    follower = next(w for w in c.workers.values() if w not in (leader, new_leader))
    out = cluster_cli(c, "remove", follower.address)
    assert out.returncode == 0, out.stdout + out.stderr
    gone.append(follower)
    for w in gone:
        w.send(signal.SIGTERM)
        w.wait_exit(SHUTDOWN_WAIT)
    remaining = [n for n, w in c.workers.items() if w not in gone]
    wait_members(c, remaining, [a for a in five if a not in {w.address for w in gone}])
    final, final_term = c.wait_leader(timeout=20)
    n_before = len(c.records("beat_sent"))
    poll(lambda: len(c.records("beat_sent")) >= n_before + 3, 15, "ticks from the three-member cluster")

    sends = assert_beat_fenced(c)
    assert {s["cluster_term"] for s in sends} >= {final_term}, "the three-member cluster's leader sent no tick"
    elected = c.elected_terms()
    runs, dupes, gaps = beat_runs(c)
    near_kill = [s["cluster_run"] for s in c.records("beat_sent") if abs(s["sent_at"] - t_kill) < 3]
    measure("grow_and_shrink", changes=4, failovers=len(elected) - 1, beat_runs=len(runs), duplicates=dupes,
            missed=gaps, runs_near_the_kill=near_kill)
    assert not dupes, f"run numbers sent twice: {dupes}"
    # A miss is allowed only in the documented window of the kill -9 (committed, not yet published).
    late = [g for g in gaps if not near_kill or not (min(near_kill) - 2 <= g <= max(near_kill) + 2)]
    assert not late, f"run numbers missed away from the leader kill: {late} (near the kill: {near_kill})"
    # One leader per term throughout (assert_beat_fenced checked it too), the rolling edit included.
    for term_, nodes in elected.items():
        assert len(nodes) == 1, (term_, nodes)
    assert final_term >= 3
