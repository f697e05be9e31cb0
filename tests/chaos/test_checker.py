"""The chaos checker on hand-made histories: it passes a clean one and catches each
violation it exists for (so a green chaos run means something)."""

from __future__ import annotations

from typing import Any

from tests.chaos.checker import check, leadership_intervals


def leader(node: str, term: int, at: float, run: int = 0, offset: float = 0.0) -> dict[str, Any]:
    return {"node": node, "run": run, "event": "leader", "term": term, "boottime": at, "mono": at + offset}


def down(node: str, term: int, at: float, lease_until: float, reason: str = "transfer", run: int = 0,
         offset: float = 0.0) -> dict[str, Any]:
    return {"node": node, "run": run, "event": "stepped_down", "term": term, "boottime": at,
            "mono": at + offset, "lease_until": lease_until + offset, "reason": reason}


def act(node: str, term: int, boot: float, lease_until: float, kind: str = "action", **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "node": node, "pid": 1, "term": term, "boot": boot, "lease_until": lease_until, **kw}


CLEAN_T = [leader("a", 1, 1.0), down("a", 1, 3.0, 3.0), leader("b", 2, 3.01), down("b", 2, 6.0, 5.5, "lost_quorum")]
CLEAN_A = [act("a", 1, 1.1, 1.5), act("a", 1, 2.9, 3.0), act("b", 2, 3.02, 3.5), act("b", 2, 5.4, 5.5)]


def test_a_clean_history_passes_with_its_figures() -> None:
    v = check(CLEAN_T, CLEAN_A, liveness=[(10.0, 10.8)])
    assert v.ok, v.violations
    assert v.figures["elections"] == 2 and v.figures["leader_only_actions"] == 4
    assert v.figures["max_failover_s"] == 0.01 and v.figures["max_recovery_s"] == 0.8


def test_overlapping_leadership_is_caught() -> None:
    t = [leader("a", 1, 1.0), down("a", 1, 3.0, 3.0), leader("b", 2, 2.5)]
    v = check(t, [])
    assert any("leadership overlap" in x for x in v.violations)


def test_a_jumped_clock_is_mapped_back_with_the_offset_it_had_when_leading() -> None:
    # a's clock ran 100 s ahead; its lease_until 3.0 (real) is logged as 103.0.
    t = [leader("a", 1, 1.0, offset=100.0), down("a", 1, 3.0, 3.0, offset=100.0), leader("b", 2, 3.01)]
    (iv, _) = leadership_intervals(t, [], {})
    assert (iv.start, iv.end) == (1.0, 3.0)
    assert check(t, []).ok


def test_a_dead_leader_holds_what_its_actions_last_read() -> None:
    t = [leader("a", 1, 1.0), leader("b", 2, 4.0)]  # a was killed: no step-down logged
    ok = check(t, [act("a", 1, 2.0, 2.9)], ended={("a", 0): 3.5})
    assert ok.ok, ok.violations
    bad = check(t, [act("a", 1, 3.9, 4.2)], ended={("a", 0): 4.5})  # it read a lease past b's start
    assert any("leadership overlap" in x for x in bad.violations)


def test_interleaved_leader_work_is_caught() -> None:
    t = CLEAN_T
    late = act("a", 1, 3.05, 3.5)  # term 1 acting at 3.05 under a lease to 3.5, after term 2's first act
    v = check(t, [*CLEAN_A, late])
    assert any("leader work interleaves" in x for x in v.violations)
    # Recorded late but under a lease that had ended before term 2 acted: not a violation.
    v = check(t, [*CLEAN_A, act("a", 1, 3.05, 3.0)])
    assert not any("interleaves" in x for x in v.violations)


def test_actions_outside_their_nodes_leadership_are_caught() -> None:
    v = check(CLEAN_T, [act("c", 1, 1.2, 1.4)])
    assert any("which it never led" in x for x in v.violations)
    v = check(CLEAN_T, [act("a", 1, 0.5, 1.2)])
    assert any("before its lease" in x for x in v.violations)
    v = check(CLEAN_T, [act("b", 2, 6.1, 6.2)])  # read after b gave term 2 up at 5.5 and logged it at 6.0
    assert any("after it gave term 2 up" in x for x in v.violations)


def test_a_read_between_the_step_down_and_its_log_line_is_sound() -> None:
    """A node decides to step down (``lease_until``), revokes what its pool processes read,
    then logs. A process whose read began in that gap (seen in CI: 31 us after the decision)
    may still have seen the lease - before the revoke - and acted under it."""
    t = [leader("b", 2, 3.0), down("b", 2, 5.5003, 5.5, "lost_quorum")]
    assert check(t, [act("b", 2, 5.50003, 5.6)]).violations == []
    assert check(t, [act("b", 2, 5.5004, 5.6)]).violations  # began after the log line: never revoked


def test_beat_runs_published_twice_or_missing_are_caught() -> None:
    beats = [act("a", 1, 1.1, 1.5, "beat", run=1), act("a", 1, 1.6, 2.0, "beat", run=2),
             act("b", 2, 3.1, 3.5, "beat", run=2)]
    assert any("beat run 2 published 2 times" in x for x in check(CLEAN_T, beats).violations)
    gap_in_term = [act("a", 1, 1.1, 1.5, "beat", run=1), act("a", 1, 2.1, 2.5, "beat", run=3)]
    assert any("beat run 2 never published" in x for x in check(CLEAN_T, gap_in_term).violations)


def test_a_run_lost_across_an_unplanned_end_is_the_documented_window() -> None:
    t = [leader("a", 1, 1.0), down("a", 1, 3.0, 3.0, "lost_quorum"), leader("b", 2, 4.0)]
    beats = [act("a", 1, 1.1, 1.5, "beat", run=1), act("b", 2, 4.1, 4.5, "beat", run=3)]
    v = check(t, beats)
    assert v.ok, v.violations
    assert v.figures["beat_lost_to_window"] == 1
    # The same gap across a planned handover is a violation: a planned handover must not lose a run.
    planned = [leader("a", 1, 1.0), down("a", 1, 3.0, 3.0, "transfer"), leader("b", 2, 3.01)]
    assert any("never published" in x for x in check(planned, beats).violations)


def test_leader_only_tasks_lost_or_run_twice_in_a_term_are_caught() -> None:
    runs = [act("a", 1, 1.1, 1.5, "lead", i=1), act("a", 1, 1.2, 1.5, "lead", i=1),
            act("b", 2, 3.1, 3.5, "lead", i=2)]
    v = check(CLEAN_T, runs, lead_sent=[1, 2, 3])
    assert any("task 1 ran 2 times in term 1" in x for x in v.violations)
    assert any("never ran: [3]" in x for x in v.violations)
    # Once in each of two terms is a redelivery (at-least-once): allowed.
    v = check(CLEAN_T, [act("a", 1, 1.1, 1.5, "lead", i=1), act("b", 2, 3.1, 3.5, "lead", i=1)], lead_sent=[1])
    assert v.ok and v.figures["lead_redelivered"] == 1


def test_a_task_lost_inside_the_redis_transport_is_told_apart() -> None:
    """Never delivered and the leader (the queue's consumer) killed just after the send: the
    transport's BRPOP window, counted. Anything else that never ran stays a violation."""
    t = [leader("a", 1, 1.0)]  # a leads from 1.0 until it is killed (ended below)
    ran = [act("a", 1, 1.1, 1.5, "lead", i=1)]
    kw: dict[str, Any] = {"ended": {("a", 0): 2.2}, "lead_sent": [1, 2], "kills": [("a", 2.15, 2.3)]}
    v = check(t, ran, lead_sent_at={1: 1.05, 2: 2.0}, **kw)
    assert v.ok, v.violations
    assert v.figures["lead_lost_to_transport"] == 1
    # A worker received it: it should have been requeued or restored - a real loss.
    v = check(t, ran, lead_sent_at={1: 1.05, 2: 2.0}, delivered=[1, 2], **kw)
    assert any("never ran: [2]" in x for x in v.violations)
    # Sent long before the kill: a real loss.
    v = check(t, ran, lead_sent_at={1: 1.05, 2: 1.1}, **kw)
    assert any("never ran: [2]" in x for x in v.violations)
    # The killed node was not the leader: a real loss.
    v = check(t, ran, lead_sent_at={1: 1.05, 2: 2.0}, **{**kw, "kills": [("b", 2.15, 2.3)]})
    assert any("never ran: [2]" in x for x in v.violations)
    # Sent after the kill was over: a real loss.
    v = check(t, ran, lead_sent_at={1: 1.05, 2: 2.4}, **kw)
    assert any("never ran: [2]" in x for x in v.violations)


def test_no_leader_after_a_stable_window_is_caught() -> None:
    assert any("no leader within 3.0 s" in x for x in check(CLEAN_T, [], liveness=[(10.0, None)]).violations)
    assert any("no leader within 3.0 s" in x for x in check(CLEAN_T, [], liveness=[(10.0, 13.5)]).violations)
