"""Broker health in the election core (the stories are in ``testdata/broker.txt``)."""

from __future__ import annotations

from celery_cluster.election import Role
from tests.simnet import Sim


def test_a_leader_with_nobody_to_hand_over_to_does_not_spin() -> None:
    """Past the grace with every broker down, the leader's next deadline stays ahead of now:
    it looks again at each heartbeat, it does not tick in a loop."""
    sim = Sim(["a", "b", "c"], seed=3)
    sim.run_for(3.0)
    [leader] = sim.lease_holders()
    for node in sim.ids:
        sim.call(node, lambda c, now: c.set_broker_health(False, now))
    ticks = 0
    core = sim.core(leader)
    original = core.tick

    def counted(now: float):  # type: ignore[no-untyped-def]
        nonlocal ticks
        ticks += 1
        return original(now)

    core.tick = counted  # type: ignore[method-assign]
    sim.run_for(10.0)
    assert sim.lease_holders() == [leader] and core.role is Role.LEADER
    assert core.next_deadline() > sim.nodes[leader].local(sim.t)
    assert ticks <= 10.0 / core.heartbeat_interval + 5, ticks  # one per heartbeat (+ the grace's end)


def test_a_healthy_broker_clears_the_grace() -> None:
    sim = Sim(["a", "b", "c"], seed=4)
    sim.run_for(3.0)
    [leader] = sim.lease_holders()
    sim.call(leader, lambda c, now: c.set_broker_health(False, now))
    sim.run_for(1.0)
    sim.call(leader, lambda c, now: c.set_broker_health(True, now))  # back within the grace
    sim.run_for(5.0)
    assert sim.lease_holders() == [leader]
