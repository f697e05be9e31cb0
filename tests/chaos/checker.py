"""The chaos checker: judges a run's history from the executing processes' view.

Pure: it takes what the run wrote down and returns violations and figures. All
times are CLOCK_BOOTTIME readings (``boot``), one clock for every process on the
machine, whatever a node's own (possibly jumped) clock said.

Inputs:

``transitions``
    every node's JSON transition log, one dict per line, tagged with ``node`` and
    ``run`` (incarnation): ``event`` (``leader`` when the lease starts,
    ``stepped_down`` with ``reason`` and ``lease_until``), ``term``, ``mono``
    (the node's clock) and ``boottime`` (the machine's).
``actions``
    one dict per act of leadership where it ran: ``kind`` (``action`` - the
    standalone node's leader work, ``lead`` - a ``@leader_only`` body, ``beat`` -
    a beat publish), ``node``, ``pid``, ``term``, ``boot`` (when it was recorded,
    just after the lease check) and ``lease_until`` (the lease the acting process
    read, on the machine's clock); ``run`` for beat, ``i`` for leader-only tasks.
``ended``
    ``(node, run) -> boot`` for incarnations that died without logging a step-down.

Violations:

* two leadership intervals (``leader`` → the end of the lease it gave up, or the
  last lease its actions read if the process died) of different terms overlap;
* leader work of two terms interleaves: an action of term T that may still have
  been under its lease (``min(boot, lease_until)``) after the first action of a
  term > T was recorded;
* an action of a (node, term) that never announced a lease, before it did, or
  under a lease that ends after the one the node gave up, read once the step-down was
  logged (the node revokes what its pool processes read before it logs; an action records
  the time before its read);
* a beat run published twice, or missing within one leader's term (a run missing
  across a term change that ended unplanned is the documented window: a crash
  between commit and publish - counted, not a violation);
* a leader-only task sent and never run, or run twice in one term - except one that
  no worker ever received and whose sending was followed within
  :data:`TRANSPORT_WINDOW` by a ``kill -9`` of the leader: kombu's Redis transport
  removes a message with BRPOP and only then records it as unacknowledged, so a
  consumer killed in between loses it (a broker property, documented in the
  README; counted as ``lead_lost_to_transport``, not a violation);
* no leader within the liveness bound after a healed, stable window (the
  runner measures those; passed in as ``liveness``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

PLANNED = {"transfer", "shutdown"}  # step-down reasons that hand over on purpose
#: Seconds from a leader-only task's publish to a kill -9 of the leader within which the
#: task may be lost inside the Redis transport (BRPOP, then the unacked record).
TRANSPORT_WINDOW = 1.0


@dataclasses.dataclass
class Interval:
    node: str
    run: int
    term: int
    start: float
    end: float
    reason: str  # the step-down reason, or "died"
    #: When the step-down was logged: after the node revoked what its pool processes read (the
    #: node revokes first, then persists, sends and logs). None if the process died.
    logged_at: float | None = None

    def overlaps(self, other: Interval) -> bool:
        return self.start < other.end and other.start < self.end


@dataclasses.dataclass
class Verdict:
    violations: list[str]
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.violations


def leadership_intervals(transitions: Iterable[dict[str, Any]], actions: Iterable[dict[str, Any]],
                         ended: dict[tuple[str, int], float]) -> list[Interval]:
    """One interval per (node, run, term) that acquired a lease."""
    last_lease: dict[tuple[str, int], float] = {}
    for a in actions:
        key = (a["node"], a["term"])
        last_lease[key] = max(last_lease.get(key, -math.inf), a["lease_until"])
    open_: dict[tuple[str, int], tuple[int, float, float]] = {}  # (node, run) -> (term, start, offset)
    out: list[Interval] = []
    for t in sorted(transitions, key=lambda t: t["boottime"]):
        key = (t["node"], t["run"])
        if t["event"] == "leader":
            open_[key] = (t["term"], t["boottime"], t["mono"] - t["boottime"])
        elif t["event"] == "stepped_down" and key in open_ and open_[key][0] == t["term"]:
            term, start, offset = open_.pop(key)
            # The node's clock may have jumped forward since (never back): the offset it had
            # when the lease began maps its lease_until to the latest real instant it can mean.
            end = t["lease_until"] - offset if t.get("lease_until") is not None else start
            out.append(Interval(t["node"], t["run"], term, start, max(start, end), t.get("reason", "?"),
                                t["boottime"]))
    for (node, run), (term, start, _) in open_.items():
        # Died (kill -9) or still leading at the end: it held what its actions last read.
        end = max(start, min(last_lease.get((node, term), start), ended.get((node, run), math.inf)))
        out.append(Interval(node, run, term, start, end, "died"))
    return sorted(out, key=lambda i: i.start)


def check(transitions: list[dict[str, Any]], actions: list[dict[str, Any]], *,
          ended: dict[tuple[str, int], float] | None = None, lead_sent: Iterable[int] = (),
          liveness: Iterable[tuple[float, float | None]] = (), liveness_bound: float = 3.0,
          expect_beat: bool = False, lead_sent_at: dict[int, float] | None = None,
          delivered: Iterable[int] = (), kills: Iterable[tuple[str, float, float]] = ()) -> Verdict:
    ended = ended or {}
    violations: list[str] = []
    intervals = leadership_intervals(transitions, actions, ended)

    # 1. Leadership intervals of different terms never overlap.
    for i, a in enumerate(intervals):
        for b in intervals[i + 1:]:
            if b.start >= a.end:
                continue
            if a.term != b.term and a.overlaps(b):
                violations.append(f"leadership overlap: {a.node} term {a.term} [{a.start:.4f}, {a.end:.4f}] and "
                                  f"{b.node} term {b.term} [{b.start:.4f}, {b.end:.4f}]")
    terms_by_node: dict[tuple[str, int], Interval] = {}
    for iv in intervals:
        terms_by_node.setdefault((iv.node, iv.term), iv)
    holders: dict[int, set[str]] = defaultdict(set)
    for iv in intervals:
        holders[iv.term].add(iv.node)
    for term, nodes in holders.items():
        if len(nodes) > 1:
            violations.append(f"two leaders in term {term}: {sorted(nodes)}")

    # 2. Leader work of two terms never interleaves; 3. every action inside its node's lease.
    acts = sorted(actions, key=lambda a: a["boot"])
    first_of: dict[int, float] = {}
    for a in acts:
        first_of.setdefault(a["term"], a["boot"])
    later_firsts = sorted(first_of.items())
    for a in acts:
        upper = min(a["boot"], a["lease_until"])
        for term, first in later_firsts:
            if term > a["term"] and first < upper:
                violations.append(f"leader work interleaves: {a['kind']} of term {a['term']} by {a['node']} "
                                  f"(pid {a['pid']}) under a lease to {upper:.4f}, after the first action of "
                                  f"term {term} at {first:.4f}")
                break
        iv = terms_by_node.get((a["node"], a["term"]))
        if iv is None:
            violations.append(f"{a['kind']} by {a['node']} in term {a['term']}, which it never led")
        elif a["boot"] < iv.start - 0.001 and a["lease_until"] > iv.start:  # (1 ms: log line vs act)
            violations.append(f"{a['kind']} by {a['node']} at {a['boot']:.4f} before its lease of term "
                              f"{a['term']} began at {iv.start:.4f}")
        elif (iv.reason != "died" and a["lease_until"] > iv.end + 1e-6 and a["boot"] > iv.end
              and (iv.logged_at is None or a["boot"] > iv.logged_at)):
            # ``boot`` is taken before the process reads the lease; the node decides to step down
            # at ``end``, revokes, then logs (``logged_at``). A read that began in between may
            # still see the lease (it was not revoked yet) and is sound; one that began after
            # the log line and still saw a lease past ``end`` read what was never revoked.
            violations.append(f"{a['kind']} by {a['node']} at {a['boot']:.4f} under a lease to "
                              f"{a['lease_until']:.4f}, after it gave term {a['term']} up at {iv.end:.4f}")

    # 4. Beat: every replicated run number published once.
    beat = [a for a in acts if a["kind"] == "beat"]
    runs = Counter(a["run"] for a in beat)
    for run, n in sorted(runs.items()):
        if n > 1:
            violations.append(f"beat run {run} published {n} times")
    run_term = {a["run"]: a["term"] for a in beat}
    unplanned_ends = {iv.term for iv in intervals if iv.reason not in PLANNED}
    lost_to_window = 0
    if runs:
        for run in range(min(runs), max(runs) + 1):
            if run in runs:
                continue
            before = max((r for r in runs if r < run), default=None)
            after = min((r for r in runs if r > run), default=None)
            t0, t1 = run_term.get(before), run_term.get(after)
            if t0 is not None and t1 is not None and t0 != t1 and any(t0 <= t < t1 for t in unplanned_ends):
                lost_to_window += 1
            else:
                violations.append(f"beat run {run} never published (runs {before} in term {t0}, "
                                  f"{after} in term {t1})")
    if expect_beat and not beat:
        violations.append("no beat publish at all")

    # 5. Leader-only tasks: none lost, none run twice in one term.
    lead = [a for a in acts if a["kind"] == "lead"]
    ran = Counter((a["i"], a["term"]) for a in lead)
    for (i, term), n in sorted(ran.items()):
        if n > 1:
            violations.append(f"leader-only task {i} ran {n} times in term {term}")
    lost = sorted(set(lead_sent) - {a["i"] for a in lead})
    lost_to_transport = [i for i in lost if _lost_in_transport(i, lead_sent_at or {}, set(delivered),
                                                               list(kills), intervals)]
    lost = [i for i in lost if i not in lost_to_transport]
    if lost:
        violations.append(f"{len(lost)} leader-only tasks never ran: {lost[:10]}")

    # 6. Liveness after every healed, stable window.
    recoveries = []
    for healed_at, leader_at in liveness:
        if leader_at is None or leader_at - healed_at > liveness_bound:
            violations.append(f"no leader within {liveness_bound} s of the stable window from {healed_at:.3f}")
        else:
            recoveries.append(leader_at - healed_at)

    figures = {
        "elections": len(intervals),
        "max_failover_s": round(max_failover(intervals), 3),
        "leader_only_actions": len(acts),
        "beat_publishes": len(beat),
        "beat_lost_to_window": lost_to_window,
        "lead_tasks": f"{len({a['i'] for a in lead})}/{len(set(lead_sent))}",
        "lead_redelivered": sum(n - 1 for n in Counter(a["i"] for a in lead).values()),
        "lead_lost_to_transport": len(lost_to_transport),
        "max_recovery_s": round(max(recoveries, default=0.0), 3),
    }
    return Verdict(violations, figures)


def _lost_in_transport(i: int, sent_at: dict[int, float], delivered: set[int],
                       kills: list[tuple[str, float, float]], intervals: list[Interval]) -> bool:
    """Task ``i`` never reached a worker, and the node leading when it was sent (so consuming
    the leader queue) was killed within :data:`TRANSPORT_WINDOW` after. A kill is known to
    have happened between its fault's start and end (``(node, start, end)``)."""
    if i in delivered or i not in sent_at:
        return False
    sent = sent_at[i]
    # The leader then: the last to have been elected before the send (its lease as the actions
    # read it may end earlier, but it kept consuming the leader queue until it died) - or one
    # that led within the window before it: a leader that just handed over (a member replaced:
    # removed, then killed) still consumes the queue until its worker cancels the consumer.
    elected = [iv for iv in intervals if iv.start <= sent]
    if not elected:
        return False
    consumers = {max(elected, key=lambda iv: iv.start).node}
    consumers |= {iv.node for iv in elected if iv.end >= sent - TRANSPORT_WINDOW}
    return any(node in consumers and start <= sent + TRANSPORT_WINDOW and sent <= end for node, start, end in kills)


def max_failover(intervals: list[Interval]) -> float:
    """The longest time from the end of one leadership to the start of the next."""
    gaps = [b.start - a.end for a, b in zip(intervals, intervals[1:]) if b.start > a.end]
    return max(gaps, default=0.0)
