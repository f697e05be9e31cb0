"""Hypothesis-driven fault schedules over the simulated cluster (see simnet.py).

Each example draws a cluster size, clock rates within the drift bound and a
list of faults (crash/restart, symmetric and one-way partitions, pauses,
drop/duplicate/delay bursts, proposals, leadership transfers, a disk that
fails on its Nth write - the node fail-stops and is restarted when the fault
ends - and membership changes: a spare node started to join and added by the
leader, removals of any member or of the leader itself, a node restarted with
a different static list; brokers reported down, the leader's or everyone's). The safety
invariants are checked after every simulated event; at the end the network is
healed and, after staying stable for 2x the maximum election timeout, exactly
one node must hold the lease and keep it.

CI runs ``SIM_EXAMPLES`` (default 1000) schedules; ``make sim`` runs 10,000.
A failure prints a command that replays it:
``python -m tests.test_simulation '<schedule json>'``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from celery_cluster.election import (
    ClusterMismatch,
    Committed,
    LearnerDropped,
    MembersChanged,
    RoleChanged,
    SteppedDown,
)
from celery_cluster.errors import ClusterError
from tests.simnet import Sim, propose_next

EXAMPLES = int(os.environ.get("SIM_EXAMPLES", "1000"))
TIMEOUT = (1.0, 2.0)
HEARTBEAT = 0.1
DRIFT = 0.05
FAULT_WINDOW = 12.0  # faults start within this many seconds
SPARES = 2  # nodes outside the bootstrap list that membership faults may add


def fault_strategy(n: int) -> st.SearchStrategy:
    node = st.integers(0, n)  # n stands for "whoever leads when the fault starts"
    at = st.floats(0.0, FAULT_WINDOW, allow_nan=False).map(lambda x: round(x, 3))
    length = st.floats(0.05, 6.0, allow_nan=False).map(lambda x: round(x, 3))
    return st.one_of(
        st.tuples(st.just("crash"), at, node, length),
        st.tuples(st.just("pause"), at, node, length),
        st.tuples(st.just("partition"), at, st.lists(st.booleans(), min_size=n, max_size=n), length),
        st.tuples(st.just("oneway"), at, st.tuples(node, node), length),
        st.tuples(st.just("cut"), at, st.tuples(node, node), length),
        st.tuples(st.just("slow"), at, st.tuples(node, node, st.floats(0.5, 4.0)), length),
        st.tuples(st.just("lossy"), at, st.tuples(st.floats(0, 0.5), st.floats(0, 0.3),
                                                 st.one_of(st.floats(0.001, 0.4), st.floats(0.4, 3.0))), length),
        st.tuples(st.just("transfer"), at),
        st.tuples(st.just("higher_term"), at, node, st.integers(1, 5)),
        st.tuples(st.just("disk"), at, node, length, st.integers(0, 4)),
        st.tuples(st.just("add"), at, st.integers(0, SPARES - 1)),
        st.tuples(st.just("remove"), at, st.integers(0, n + SPARES)),  # n: the leader; above: spares
        st.tuples(st.just("static"), at, node),
        st.tuples(st.just("broker"), at, st.lists(node, min_size=1, max_size=n + 1), length),  # brokers down
    )


@st.composite
def schedules(draw: st.DrawFn) -> dict:
    n = draw(st.sampled_from([1, 2, 3, 3, 4, 5, 5]))
    return {
        "n": n,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "rates": [round(draw(st.floats(1 - DRIFT, 1 + DRIFT)), 4) for _ in range(n)],
        # Nodes whose election timers fire near the minimum: the adversarial case for leases.
        "eager": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        "faults": draw(st.lists(fault_strategy(n), max_size=8)),
        "propose_every": draw(st.sampled_from([0.0, 0.25, 0.7])),
        # Crashes visible to the others (connections reset, a new one refused), and sometimes
        # pauses reported as crashes as well: safety must not rest on the hint being true.
        "hints": draw(st.sampled_from(["none", "crashes", "crashes", "lying"])),
    }


def run_schedule(schedule: dict) -> dict[str, int]:
    n = schedule["n"]
    ids = [f"n{i}" for i in range(n)]
    sim = Sim(ids, seed=schedule["seed"], election_timeout=TIMEOUT, heartbeat_interval=HEARTBEAT,
              max_clock_drift=DRIFT, rates=dict(zip(ids, schedule["rates"])),
              eager=[i for i, e in zip(ids, schedule.get("eager", [])) if e],
              gone_hints=schedule.get("hints", "none") != "none", lying_hints=schedule.get("hints") == "lying")
    resolved: dict[int, tuple] = {}
    actions: list[tuple[float, int, tuple]] = []
    heal_at = 0.0
    for i, f in enumerate(schedule["faults"]):
        actions.append((f[1], i, f))
        if len(f) > 3 and isinstance(f[3], float):
            actions.append((f[1] + f[3], i, ("end", f)))
            heal_at = max(heal_at, f[1] + f[3])
        heal_at = max(heal_at, f[1])
    every = schedule["propose_every"]
    if every:
        t = every
        while t < heal_at + 1:
            actions.append((t, -1, ("propose",)))
            t += every
    actions.sort(key=lambda a: (a[0], a[1]))
    for at, i, action in actions:
        sim.run_until(at)
        if action[0] == "end":
            action = ("end", resolved.get(i, action[1]))
        else:
            action = resolved[i] = resolve_leader(sim, ids, action)
        apply_action(sim, ids, action)
    sim.run_until(heal_at)
    # Heal everything, bring every node back, then let it settle.
    sim.heal()
    for i in sim.ids:
        sim.fix_disk(i)
    for i in sim.ids:
        if sim.nodes[i].core is None:
            sim.start(i)
    for i in sim.ids:  # every broker back
        core = sim.nodes[i].core
        if core is not None and not core.broker_healthy:
            if sim.t >= sim.nodes[i].paused_until:
                sim.call(i, lambda c, now: c.set_broker_health(True, now))
            else:  # paused: its driver would say so as it resumes; a healthy broker sends nothing
                core.broker_healthy, core.broker_down_since = True, None
    # Stable from the moment the last paused node resumes.
    stable_from = max(sim.t, *(sim.nodes[i].paused_until for i in sim.ids))
    sim.run_until(stable_from + 2 * TIMEOUT[1])
    holders = sim.lease_holders()
    assert len(holders) == 1, f"no single leader {2 * TIMEOUT[1]} s after healing: {holders} at t={sim.t:.3f}"
    leader = holders[0]
    stepdowns_before = sum(1 for _, _, e in sim.events if isinstance(e, SteppedDown))
    sim.run_for(2 * TIMEOUT[1])
    assert sim.lease_holders() == [leader], f"leader {leader} did not stay: {sim.lease_holders()}"
    stepdowns = sum(1 for _, _, e in sim.events if isinstance(e, SteppedDown))
    assert stepdowns == stepdowns_before, "a leader stepped down on a healthy network"
    return membership_counts(sim)


def membership_counts(sim: Sim) -> dict[str, int]:
    """What the schedule did to the configuration (make sim prints these as statistics)."""
    leaders = {t: n for t, n in ((e.term, node) for _, node, e in sim.events
                                 if isinstance(e, RoleChanged) and e.role.value == "leader")}
    changes = {e.version: e.members for _, node, e in sim.events
               if isinstance(e, MembersChanged) and leaders.get(e.version[0]) == node}
    return {
        "configuration changes": len(changes),
        "committed changes": len({v for v in changes
                                  if any(isinstance(e, Committed) and e.version >= v for _, _, e in sim.events)}),
        "leader removed itself": sum(1 for _, _, e in sim.events
                                     if isinstance(e, SteppedDown) and e.reason == "removed"),
        "learners given up": sum(1 for _, _, e in sim.events if isinstance(e, LearnerDropped)),
        "cluster mismatches": sum(1 for _, _, e in sim.events if isinstance(e, ClusterMismatch)),
        "crash hints delivered": sim.gone_told,
    }


def resolve_leader(sim: Sim, ids: list[str], action: tuple) -> tuple:
    """Replace node index ``len(ids)`` by the index of the current leader (or node 0)."""
    n = len(ids)
    leader = next((k for k, i in enumerate(ids) if sim.nodes[i].core is not None
                   and sim.core(i).role.value == "leader"), 0)
    def fix(x):
        return leader if x == n else x
    if action[0] in ("crash", "pause", "higher_term", "disk", "remove", "static"):
        return (*action[:2], fix(action[2]), *action[3:])
    if action[0] == "broker":
        return (*action[:2], [fix(x) for x in action[2]], *action[3:])
    if action[0] in ("oneway", "cut", "slow"):
        return (*action[:2], (fix(action[2][0]), fix(action[2][1]), *action[2][2:]), *action[3:])
    return action


def apply_action(sim: Sim, ids: list[str], action: tuple) -> None:
    kind = action[0]
    live = [i for i in sim.ids if sim.nodes[i].core is not None and sim.t >= sim.nodes[i].paused_until]
    if kind == "crash":
        sim.crash(ids[action[2]])
    elif kind == "pause":
        if sim.nodes[ids[action[2]]].core is not None:
            sim.pause(ids[action[2]], action[3])
    elif kind == "partition":
        side = action[2]
        sim.partition([i for i, s in zip(ids, side) if s], [i for i, s in zip(ids, side) if not s])
    elif kind == "oneway":
        a, b = action[2]
        if a != b:
            sim.block(ids[a], ids[b])
    elif kind == "slow":
        a, b, extra = action[2]
        if a != b:
            sim.slow[(ids[a], ids[b])] = extra
    elif kind == "cut":
        a, b = action[2]
        if a != b:
            sim.block(ids[a], ids[b])
            sim.block(ids[b], ids[a])
    elif kind == "lossy":
        sim.drop, sim.dup, hi = action[2]
        sim.delay = (0.0005, hi)
    elif kind == "transfer":
        for i in live:
            if sim.core(i).role.value == "leader":
                try:
                    sim.call(i, lambda c, now: c.transfer_leadership(now))
                except Exception:  # noqa: BLE001 - TransferError when no peer is reachable
                    pass
    elif kind == "disk":
        sim.fail_disk(ids[action[2]], after=action[4])
    elif kind == "higher_term":
        node = ids[action[2]]
        if sim.nodes[node].core is not None:
            sim.set_hard_state(node, term=sim.nodes[node].disk.term + action[3])
    elif kind in ("add", "remove"):
        spares = [f"s{k}" for k in range(SPARES)]
        if kind == "add":
            node = spares[action[2]]
            if node not in sim.nodes:
                sim.add_node(node, join=True)
        else:
            node = (ids + spares)[action[2]] if action[2] < len(ids) + SPARES else spares[-1]
        for i in live:
            if sim.core(i).role.value == "leader":
                try:
                    if kind == "add":
                        sim.call(i, lambda c, now: c.add_member(node, now))
                    else:
                        sim.call(i, lambda c, now: c.remove_member(node, now))
                except ClusterError:  # refused (pending change, no live majority...): nothing changed
                    pass
    elif kind == "broker":
        for node in {ids[k] for k in action[2]}:
            if sim.nodes[node].core is not None and sim.t >= sim.nodes[node].paused_until:
                sim.call(node, lambda c, now: c.set_broker_health(False, now))
    elif kind == "static":
        node = ids[action[2]]
        # A rolling edit of --cluster-nodes (the bootstrap list plus the spares), or a stale list
        # after membership changes: once a node holds a replicated configuration, neither matters.
        # (Before that, a new list is a new bootstrap configuration: not this fault.)
        if sim.nodes[node].disk.members:
            stale = sim.nodes[node].static not in (None, ids)
            sim.set_static(node, ids if stale else ids + [f"s{k}" for k in range(SPARES)])
    elif kind == "propose":
        for i in live:
            if sim.core(i).role.value == "leader":
                sim.call(i, propose_next)
    elif kind == "end":
        fault = action[1]
        if fault[0] in ("crash", "disk") and sim.nodes[ids[fault[2]]].core is None:
            sim.start(ids[fault[2]])
        if fault[0] == "disk":
            sim.fix_disk(ids[fault[2]])
        elif fault[0] in ("partition", "oneway", "cut"):
            sim.blocked.clear()
        elif fault[0] == "slow":
            sim.slow.clear()
        elif fault[0] == "broker":
            for node in sim.ids:
                n = sim.nodes[node]
                if n.core is not None and sim.t >= n.paused_until and not n.core.broker_healthy:
                    sim.call(node, lambda c, now: c.set_broker_health(True, now))
        elif fault[0] == "lossy":
            sim.drop = sim.dup = 0.0
            sim.delay = (0.0005, 0.002)


@pytest.mark.timeout(max(300, int(EXAMPLES * 0.3)))  # make sim's 10,000 schedules take minutes
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(schedules())
def test_fault_schedules_keep_safety_and_elect_a_leader(schedule: dict) -> None:
    try:
        counts = run_schedule(schedule)
    except AssertionError:
        print(f"\nreplay with: python -m tests.test_simulation '{json.dumps(schedule)}'", file=sys.stderr)
        raise
    for what, count in counts.items():
        if count:
            event(f"schedules with {what}")  # shown by --hypothesis-show-statistics (make sim)


def test_membership_faults_change_the_configuration() -> None:
    """The drawn membership faults are not vacuous: a leader adds a spare, removes a member,
    removes itself and hands over, all committed, on a cluster that stays safe."""
    counts = run_schedule({"n": 3, "seed": 7, "rates": [1.0, 1.0, 1.0], "eager": [False] * 3, "propose_every": 0.25,
                           "faults": [["add", 3.0, 0], ["remove", 5.0, 1], ["remove", 7.0, 3], ["add", 9.0, 1]]})
    assert counts["configuration changes"] == 4, counts
    assert counts["committed changes"] == 4, counts
    assert counts["leader removed itself"] >= 1, counts


if __name__ == "__main__":
    run_schedule(json.loads(sys.argv[1]))
    print("schedule passed")
