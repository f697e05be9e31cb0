"""Leadership follows the broker, on the network an operator has: three ``celery worker``
processes and the broker each on a host of their own (network namespaces on a bridge,
``tests/chaos/netns.py``, silent drops: a cut link loses packets, it refuses nothing).

The broker is Redis (a redis-server in its namespace) or RabbitMQ (the machine's, behind a
relay in its namespace: ``tests/chaos/relay.py``). Leader-only tasks are produced all along
(every 0.2 s, from the harness's control host). The whole history is judged by the chaos
checker (``tests/chaos/checker.py``): no two leaseholders at once, leader work of two
terms never interleaved, no beat run published twice, every leader-only task run.

Figures (``pytest -rA tests/test_broker_netns.py``, one ``MEASURE`` line per scenario): the
due runs in the window, the runs published (the broker acknowledged them: Celery's
``after_task_publish``), duplicates, the handover time, elections.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from celery_cluster.clock import lease_clock
from tests.chaos.runner import TIMEOUT, ChaosRun
from tests.test_celery_workers import measure
from tests.workers import poll

pytestmark = [pytest.mark.processes, pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")]

GRACE = 2.0
PERIOD = 1.0
#: Seconds a cut lasts: several times the grace, so the new leader runs the schedule a while.
CUT = 8.0


def chaos_run(tmp_path: Path, broker: str) -> ChaosRun:
    return ChaosRun("worker", nodes=3, seconds=0, seed=0, out=tmp_path / "run", broker=broker, broker_host=True,
                    worker_args=["--cluster-broker-grace", str(GRACE), "--cluster-broker-probe", "yes"],
                    env={"CHAOS_PERIOD": str(PERIOD)})


def beats(run: ChaosRun) -> list[dict[str, Any]]:
    return sorted((r for r in run._records() if r.get("kind") == "beat"), key=lambda r: r["boot"])


def terms(run: ChaosRun) -> set[int]:
    return {s["term"] for s in run.statuses().values() if s}


def window_figures(run: ChaosRun, start: float, end: float) -> dict[str, Any]:
    sent = beats(run)
    counts = Counter(r["run"] for r in sent)
    inside = [r for r in sent if start <= r["boot"] <= end]
    return {"window_s": round(end - start, 2), "due": int((end - start) / PERIOD),
            "published": len(inside), "duplicates": sorted(n for n, k in counts.items() if k > 1)}


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_leader_cut_off_from_its_broker_hands_over(tmp_path: Path, broker: str) -> None:
    with chaos_run(tmp_path, broker) as run:
        assert run.wait_leader(60.0) is not None, "no leader"
        old = run.leader()
        assert old is not None
        old_term = run.statuses()[old.address]["term"]
        poll(lambda: len(beats(run)) >= 3, 20, "three beat runs")
        run._ctl({"op": "produce", "every": 0.2})
        t_cut = lease_clock()
        run.topo.cut(old.index, run.broker_index)  # type: ignore[union-attr]
        new = poll(lambda: (m := run.leader()) is not None and m is not old and m, GRACE + 10, "a new leader")
        handover = lease_clock() - t_cut
        first_new = poll(lambda: next((r for r in beats(run) if r["boot"] > t_cut and r["node"] == new.name), None),
                         10, "a beat run from the new leader")
        run.wait(max(0.0, t_cut + CUT - lease_clock()))  # the cut lasts CUT seconds in all
        t_heal = lease_clock()
        run.topo.heal()  # type: ignore[union-attr]
        run.wait(3.0)  # after the heal: nothing the old leader held may arrive now
        t_end = lease_clock()
        old_stale = [r for r in beats(run) if r["node"] == old.name and r["boot"] > t_cut]
        figures = window_figures(run, t_cut, t_end)
        verdict = run.finish()
        transitions, _ = run.history()
    reasons = [t.get("reason") for t in transitions if t["node"] == old.name and t.get("event") == "stepped_down"]
    last_old = max((r["boot"] for r in beats(run) if r["node"] == old.name and r["boot"] <= t_cut), default=t_cut)
    figures.update(broker=broker, grace_s=GRACE, handover_s=round(handover, 2),
                   schedule_gap_s=round(first_new["boot"] - last_old, 2), cut_s=round(t_heal - t_cut, 2),
                   sent_by_old_leader_after_cut=len(old_stale), lead_tasks=verdict.figures.get("lead_tasks"),
                   violations=len(verdict.violations))
    measure(f"leader_cut_from_{broker}", **figures)
    assert verdict.ok, verdict.violations
    assert "broker_unreachable" in reasons, reasons
    assert old_term < run_term(transitions, new.name)
    assert not figures["duplicates"]
    assert handover <= GRACE + 1.5 + 2 * TIMEOUT[1], f"handover took {handover:.2f} s"
    # Missed: at most the grace's worth, plus detection (one probe) and the failover.
    assert figures["due"] - figures["published"] <= (GRACE + 1.5 + TIMEOUT[1]) / PERIOD + 1, figures


def run_term(transitions: list[dict[str, Any]], node: str) -> int:
    return max(t["term"] for t in transitions if t["node"] == node and t.get("event") == "leader")


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_broker_outage_for_every_worker_moves_nothing(tmp_path: Path, broker: str) -> None:
    with chaos_run(tmp_path, broker) as run:
        assert run.wait_leader(60.0) is not None, "no leader"
        leader = run.leader()
        assert leader is not None
        before = terms(run)
        poll(lambda: len(beats(run)) >= 3, 20, "three beat runs")
        for m in run.members:
            run.topo.cut(m.index, run.broker_index)  # type: ignore[union-attr]
        run.wait(3 * GRACE)  # well past the grace: nobody's broker works, so nothing may move
        during = terms(run)
        st = run.statuses()[leader.address]
        t_heal = lease_clock()
        run.topo.heal()  # type: ignore[union-attr]
        resumed = poll(lambda: next((r for r in beats(run) if r["boot"] > t_heal), None), 15,
                       "a beat run after the heal")
        transitions, _ = run.history()  # before finish(): its SIGTERMs hand over on purpose
        verdict = run.finish()
    elections = len({t["term"] for t in transitions if t.get("event") == "leader"}) - 1
    measure(f"{broker}_down_for_every_worker", broker=broker, outage_s=round(3 * GRACE, 1),
            elections_during_outage=len(during - before), elections_in_run=elections,
            beat_resumed_after_s=round(resumed["boot"] - t_heal, 2), violations=len(verdict.violations))
    assert verdict.ok, verdict.violations
    assert st["is_leader"] and st["broker_healthy"] is False, st
    assert during == before, f"terms moved during an outage that hit every worker: {before} -> {during}"
    assert elections == 0, [t for t in transitions if t.get("event") in ("leader", "stepped_down")]
    assert resumed["node"] == leader.name
    assert resumed["boot"] - t_heal <= 2.0, f"beat resumed {resumed['boot'] - t_heal:.2f} s after the heal"
