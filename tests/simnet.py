"""A deterministic simulated cluster for the sans-I/O election core.

Virtual real time ``t`` drives an event queue. Each node has its own clock
(``offset + rate * t``, rate within the drift bound) and sees only its local
time, exactly like the driver's ``time.monotonic()``. The network can delay,
drop, duplicate and reorder messages and be partitioned (symmetrically or one
way); nodes can crash (keeping what they persisted), restart and pause (a
paused node handles nothing, its clock keeps running, and what was sent to it
is handled late when it resumes, as with SIGSTOP/SIGCONT). A node's disk can
fail on its Nth write: the node then fail-stops as the driver does - nothing
of that step is sent, the node leaves until it is restarted (on its last
durable state).

After every event the safety invariants are checked:

* at most one leader per term;
* ``is_leader(local now)`` true on at most one node at any real instant;
* no node grants two different votes in one term, restarts included;
* every new leader holds every committed payload;
* membership: every new leader started from a version at least the highest
  committed one (configuration included); no two states share a version; a
  leader changes its configuration one server at a time.

Nodes can be added while it runs (:meth:`Sim.add_node`, started to join, with no
configuration) and restarted with another static member list
(:meth:`Sim.set_static`): the list is then only a bootstrap list.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_cluster.election import (
    Committed,
    Election,
    LeaseAcquired,
    MembersChanged,
    Ready,
    Role,
    RoleChanged,
    SteppedDown,
)
from celery_cluster.messages import HardState, VoteResponse


class InvariantViolation(AssertionError):
    pass


@dataclass(frozen=True)
class FailStop:
    """Event: the node's disk failed on a write; the node fail-stopped."""

    node: str


class FixedTimeout(random.Random):
    """An rng whose ``uniform`` always returns one value: for readable transcripts."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def uniform(self, a: float, b: float) -> float:  # fixed on purpose
        return self.value


class EagerTimeout(random.Random):
    """Timeouts skewed hard towards the minimum: elections start as early as allowed."""

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random() ** 8


@dataclass
class SimNode:
    id: str
    rate: float = 1.0
    offset: float = 0.0
    disk: HardState = field(default_factory=HardState)
    core: Election | None = None
    paused_until: float = 0.0
    tick_gen: int = 0
    tick_at: float = -1.0
    rng: random.Random | None = None
    backlog: list[Any] = field(default_factory=list)  # messages that arrived while paused
    writes_left: int | None = None  # the disk fails on the write after this many more
    static: list[str] | None = None  # its --cluster-nodes list (None: the cluster's initial ids)
    join: bool = False  # started with --cluster-join: no configuration until a leader adds it
    last_members: tuple[str, ...] = ()

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def real(self, local: float) -> float:
        return (local - self.offset) / self.rate


class Sim:
    def __init__(
        self,
        ids: list[str],
        *,
        seed: int = 0,
        election_timeout: tuple[float, float] = (1.0, 2.0),
        heartbeat_interval: float = 0.1,
        max_clock_drift: float = 0.05,
        delay: tuple[float, float] = (0.0005, 0.002),
        rates: dict[str, float] | None = None,
        tick_slack: float = 0.001,
        eager: list[str] = (),
        gone_hints: bool = False,
        lying_hints: bool = False,
    ) -> None:
        """``gone_hints``: a crash is visible - every other node is told (``leader_gone``)
        a network delay later, as the driver tells it when the crashed node's connections
        close and a new one is refused; a pause or a partition is not. ``lying_hints``: a
        pause is reported as a crash too, which a real driver never does - safety must not
        depend on the hint being true."""
        self.rng = random.Random(seed)
        self.ids = list(ids)
        self.initial_ids = list(ids)
        self.timing = dict(election_timeout=election_timeout, heartbeat_interval=heartbeat_interval,
                           max_clock_drift=max_clock_drift)
        self.max_timeout = election_timeout[1]
        self.delay = delay
        self.drop = 0.0
        self.dup = 0.0
        self.tick_slack = tick_slack
        self.gone_hints, self.lying_hints = gone_hints, lying_hints
        self.gone_told = 0  # hints delivered to a live node
        self.blocked: set[tuple[str, str]] = set()
        self.slow: dict[tuple[str, str], float] = {}  # extra delay on a link: late, not lost
        self.t = 0.0
        self._queue: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self.nodes: dict[str, SimNode] = {}
        for i in ids:
            rate = (rates or {}).get(i, 1.0)
            self.nodes[i] = SimNode(i, rate=rate, offset=self.rng.uniform(0, 1000))
            if i in eager:
                self.nodes[i].rng = EagerTimeout(self.rng.getrandbits(64))
        # invariant bookkeeping
        self.leaders_by_term: dict[int, str] = {}
        self.votes: dict[tuple[str, int], str] = {}
        self.payload_of: dict[tuple[int, int], str | None] = {}
        self.max_committed: tuple[tuple[int, int], str | None] = ((0, 0), None)
        self.state_at: dict[tuple[int, int], tuple[str, tuple[str, ...]]] = {}  # version -> (payload, members)
        self.events: list[tuple[float, str, Any]] = []
        self.on_event: Callable[[str, Any], None] | None = None
        for i in ids:
            self.start(i)

    # -- node lifecycle -------------------------------------------------------

    def start(self, node_id: str) -> None:
        n = self.nodes[node_id]
        rng = n.rng or random.Random(self.rng.getrandbits(64))
        static = n.static if n.static is not None else self.initial_ids
        n.core = Election(node_id, static, now=n.local(self.t), state=n.disk, rng=rng, join=n.join, **self.timing)
        n.last_members = n.core.members
        n.backlog.clear()
        self._schedule_tick(n)

    def add_node(self, node_id: str, *, join: bool = True, static: list[str] | None = None) -> None:
        """A new node, started to join (no configuration) or with its own static list."""
        assert node_id not in self.nodes, f"{node_id} exists"
        self.ids.append(node_id)
        self.nodes[node_id] = SimNode(node_id, offset=self.rng.uniform(0, 1000), join=join, static=static)
        self.start(node_id)

    def set_static(self, node_id: str, static: list[str]) -> None:
        """Restart ``node_id`` with another static member list (a rolling edit of --cluster-nodes)."""
        n = self.nodes[node_id]
        n.static, n.join = list(static), False
        self.restart(node_id)

    def crash(self, node_id: str, *, visible: bool | None = None) -> None:
        n = self.nodes[node_id]
        n.core = None
        n.backlog.clear()
        n.tick_gen += 1
        n.tick_at = -1.0
        if self.gone_hints if visible is None else visible:
            self._tell_gone(node_id)

    def _tell_gone(self, node_id: str) -> None:
        for other in self.ids:
            if other != node_id:
                self._push(self.t + self.rng.uniform(*self.delay), "gone", (other, node_id))

    def restart(self, node_id: str) -> None:
        self.crash(node_id, visible=False)  # listening again at once: a connect is not refused
        self.start(node_id)

    def pause(self, node_id: str, duration: float) -> None:
        n = self.nodes[node_id]
        n.paused_until = max(n.paused_until, self.t + duration)
        self._push(n.paused_until, "resume", node_id)
        if self.lying_hints:
            self._tell_gone(node_id)

    def fail_disk(self, node_id: str, after: int = 0) -> None:
        """``node_id``'s disk fails on its write after ``after`` more successful ones."""
        self.nodes[node_id].writes_left = after

    def fix_disk(self, node_id: str) -> None:
        self.nodes[node_id].writes_left = None

    def set_hard_state(self, node_id: str, **changes: Any) -> None:
        """Rewrite a crashed node's persisted state (e.g. a higher term), then restart it."""
        n = self.nodes[node_id]
        d = n.disk
        n.disk = HardState(changes.get("term", d.term), changes.get("voted_for", d.voted_for),
                           changes.get("payload_version", d.payload_version), changes.get("payload", d.payload),
                           d.members, d.config_version, d.cluster)
        self.restart(node_id)

    # -- network faults -------------------------------------------------------

    def partition(self, *groups: list[str]) -> None:
        for a, b in itertools.permutations(range(len(groups)), 2):
            for x in groups[a]:
                for y in groups[b]:
                    self.blocked.add((x, y))

    def block(self, src: str, dst: str) -> None:
        self.blocked.add((src, dst))

    def heal(self) -> None:
        self.blocked.clear()
        self.slow.clear()
        self.drop = self.dup = 0.0

    # -- driving ------------------------------------------------------------------

    def run_until(self, t_end: float) -> None:
        while self._queue and self._queue[0][0] <= t_end:
            t, _, kind, data = heapq.heappop(self._queue)
            self.t = max(self.t, t)
            self._dispatch(kind, data)
            self.check_invariants()
        self.t = max(self.t, t_end)
        self.check_invariants()

    def run_for(self, dt: float) -> None:
        self.run_until(self.t + dt)

    def call(self, node_id: str, fn: Callable[[Election, float], Any]) -> Any:
        """Run an input on a live node's core (propose, transfer...) and apply its Ready."""
        n = self.nodes[node_id]
        assert n.core is not None and self.t >= n.paused_until, f"{node_id} is down or paused"
        result = fn(n.core, n.local(self.t))
        ready = result[1] if isinstance(result, tuple) else result
        self._apply(n, ready)
        self.check_invariants()
        return result

    def force_timeout(self, node_id: str) -> None:
        """Make ``node_id``'s election timer fire now."""
        def fire(core: Election, now: float) -> Ready:
            core.election_deadline = now
            return core.tick(now)
        self.call(node_id, fire)

    # -- queries ------------------------------------------------------------------

    def core(self, node_id: str) -> Election:
        core = self.nodes[node_id].core
        assert core is not None, f"{node_id} is down"
        return core

    def is_leader(self, node_id: str) -> bool:
        n = self.nodes[node_id]
        return n.core is not None and n.core.is_leader(n.local(self.t))

    def lease_holders(self) -> list[str]:
        return [i for i in self.ids if self.is_leader(i)]

    # -- internals ----------------------------------------------------------------

    def _push(self, t: float, kind: str, data: Any) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), kind, data))

    def _schedule_tick(self, n: SimNode) -> None:
        if n.core is None:
            return
        due = max(self.t, n.real(n.core.next_deadline()))
        if due == n.tick_at:
            return  # already scheduled
        n.tick_at = due
        n.tick_gen += 1
        self._push(due + self.rng.uniform(0, self.tick_slack), "tick", (n.id, n.tick_gen))

    def _dispatch(self, kind: str, data: Any) -> None:
        if kind == "tick":
            node_id, gen = data
            n = self.nodes[node_id]
            if n.core is None or gen != n.tick_gen or self.t < n.paused_until:
                return
            self._apply(n, n.core.tick(n.local(self.t)))
        elif kind == "deliver":
            to, msg = data
            n = self.nodes[to]
            if n.core is None:
                return
            if self.t < n.paused_until:
                n.backlog.append(msg)
                return
            self._apply(n, n.core.step(msg, n.local(self.t)))
        elif kind == "gone":
            observer, gone = data
            n = self.nodes[observer]
            if n.core is None or self.t < n.paused_until:
                return
            self.gone_told += 1
            self._apply(n, n.core.leader_gone(gone, n.local(self.t)))
        elif kind == "resume":
            n = self.nodes[data]
            if n.core is None or self.t < n.paused_until:
                return
            backlog, n.backlog = n.backlog, []
            self._apply(n, n.core.tick(n.local(self.t)))  # the timer thread wakes first
            for msg in backlog:
                self._push(self.t + self.rng.uniform(0, 0.001), "deliver", (n.id, msg))

    def _apply(self, n: SimNode, ready: Ready) -> None:
        core = n.core
        assert core is not None
        if ready.hard_state is not None and n.writes_left is not None:
            if n.writes_left == 0:
                # Fail-stop (Node._fail_stop): nothing of this step leaves, the node is gone.
                self.events.append((self.t, n.id, FailStop(n.id)))
                self.crash(n.id)
                return
            n.writes_left -= 1
        if ready.hard_state is not None:
            n.disk = ready.hard_state  # persisted before anything is sent
        if core.role is Role.LEADER:
            self.payload_of.setdefault(core.version, core.payload)
        if core.replicated:
            state = (core.payload, core.members)
            prior_state = self.state_at.setdefault(core.version, state)
            if prior_state != state:
                raise InvariantViolation(f"{n.id} holds version {core.version} as {state}, "
                                         f"another node as {prior_state}")
        for env in ready.messages:
            m = env.msg
            if isinstance(m, VoteResponse) and m.granted and not m.prevote:
                prior = self.votes.setdefault((n.id, m.term), env.to)
                if prior != env.to:
                    raise InvariantViolation(f"{n.id} voted for {prior} and {env.to} in term {m.term}")
                if n.disk.term != m.term or n.disk.voted_for != env.to:
                    raise InvariantViolation(f"{n.id} granted a vote in term {m.term} before persisting it")
            self._send(n.id, env.to, m)
        for ev in ready.events:
            self.events.append((self.t, n.id, ev))
            if self.on_event:
                self.on_event(n.id, ev)
            if isinstance(ev, RoleChanged) and ev.role is Role.LEADER:
                prior = self.leaders_by_term.setdefault(ev.term, n.id)
                if prior != n.id:
                    raise InvariantViolation(f"two leaders in term {ev.term}: {prior} and {n.id}")
                self._check_new_leader_payload(n.id, core.payload)
                if core.elected_with < self.max_committed[0]:
                    raise InvariantViolation(f"new leader {n.id} started from version {core.elected_with}, "
                                             f"older than the committed {self.max_committed[0]}")
            elif isinstance(ev, MembersChanged) and core.role is Role.LEADER and ev.version[0] == core.term:
                if len(set(ev.members) ^ set(n.last_members)) != 1:
                    raise InvariantViolation(f"leader {n.id} changed its configuration from {n.last_members} "
                                             f"to {ev.members}: not one server")
            elif isinstance(ev, Committed):
                payload = self.payload_of.get(ev.version)
                if ev.version > self.max_committed[0]:
                    self.max_committed = (ev.version, payload)
        if n.core is not None:
            n.last_members = n.core.members
        self._schedule_tick(n)

    def _check_new_leader_payload(self, node_id: str, payload: str | None) -> None:
        committed_version, committed_payload = self.max_committed
        if committed_payload is None:
            return
        if proposal_version(payload) < proposal_version(committed_payload):
            raise InvariantViolation(
                f"new leader {node_id} holds payload {payload!r}, older than committed {committed_payload!r}")

    def _send(self, src: str, dst: str, msg: Any) -> None:
        if dst not in self.nodes:
            return  # an address where nothing runs
        if (src, dst) in self.blocked or self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        extra = self.slow.get((src, dst), 0.0)
        for _ in range(copies):
            self._push(self.t + extra + self.rng.uniform(*self.delay), "deliver", (dst, msg))

    def check_invariants(self) -> None:
        holders = self.lease_holders()
        if len(holders) > 1:
            detail = ", ".join(f"{h} term {self.core(h).term} lease_until(local) {self.core(h).lease_until:.4f}"
                               for h in holders)
            raise InvariantViolation(f"two nodes act as leader at t={self.t:.4f}: {detail}")


def proposal_version(payload: str | None) -> tuple[int, int]:
    """Simulation payloads are ``"p<term>.<seq>"``: the version they were proposed at."""
    if not payload:
        return (0, 0)
    term, seq = payload[1:].split(".")
    return (int(term), int(seq))


def propose_next(core: Election, now: float) -> tuple[tuple[int, int], Ready]:
    """Propose a payload that names the version it will get."""
    return core.propose(f"p{core.term}.{core.version[1] + 1}", now)


__all__ = ["Sim", "InvariantViolation", "FailStop", "FixedTimeout", "propose_next", "proposal_version",
           "LeaseAcquired", "SteppedDown"]
