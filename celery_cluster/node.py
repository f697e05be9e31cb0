"""The node driver: runs an :class:`~celery_cluster.election.Election` in real time.

It owns the timer thread, persistence, the callback thread, leadership handles
and the lease sink. It knows nothing about HTTP: a :class:`Transport` sends
envelopes and feeds responses back through :meth:`Node.receive`; incoming
requests arrive through :meth:`Node.handle_request`.

Every :class:`~celery_cluster.election.Ready` is handled under the node lock, in
this order (:meth:`Node._handle`):

1. leadership given up in this step is revoked - the lease sink (what pool
   processes read) cleared and :attr:`Leadership.lost` set - on this thread,
   before anything below can let another node be elected (a vote granted, a
   higher term answered, TimeoutNow sent);
2. the hard state is made durable; if that fails the node **fail-stops**: it
   sends nothing of this step, gives up leadership and leaves the cluster;
3. messages are handed to the transport;
4. events are acted on; the lease sink gets every extension of the lease.

So the lease that leader work checks is written and revoked only here, under
one lock, from the core's own state: no other thread can publish a lease of an
older leadership. User callbacks run on their own thread, which nothing in
the election waits for.

Time is one injectable clock (default :func:`~celery_cluster.clock.lease_clock`,
``CLOCK_BOOTTIME`` on Linux, which keeps counting through suspend).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .clock import NAME as CLOCK_NAME
from .clock import lease_clock
from .config import Timing
from .election import (
    ClusterMismatch,
    Committed,
    Election,
    Envelope,
    LearnerDropped,
    LeaseAcquired,
    MembersChanged,
    Ready,
    Role,
    RoleChanged,
    SteppedDown,
    VoteRefused,
)
from .errors import ClusterError, MembershipError, TransferError
from .messages import AppendResponse, HardState, Message, Version, VoteResponse
from .state_file import StateFile
from .stats import NodeStats

Callback = Callable[[int], Any]
DEFAULT_TIMING = Timing()
#: How many transitions ``status()`` lists (``recent_transitions``).
RECENT_TRANSITIONS = 20


class Transport(Protocol):
    def send(self, envelope: Envelope) -> None:
        """Queue ``envelope`` for delivery; never blocks on the network."""

    def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until queued messages have been sent."""

    def close(self) -> None: ...


class LeaseSink(Protocol):
    """Where the node publishes its lease for leader work in other processes
    (:class:`~celery_cluster.leader_state.LeaderState`). Called under the node lock."""

    def publish(self, term: int, lease_until: float) -> None:
        """``lease_until`` is on :func:`~celery_cluster.clock.lease_clock`."""

    def revoke(self) -> None: ...


class NodeStopped(ClusterError):
    """A request reached a node that was stopped (or that fail-stopped)."""


class Leadership:
    """A handle on one term of leadership, for leader-only work.

    ``is_valid()`` re-checks the lease on the monotonic clock every call: check it
    right before each leader-only action. ``lost`` is set as soon as the node
    steps down (it may lag the lease's end if the process was paused; the lease
    check never does).
    """

    def __init__(self, node: Node, term: int) -> None:
        self.term = term
        self.lost = threading.Event()
        self._node = node

    def is_valid(self) -> bool:
        return not self.lost.is_set() and self._node.is_leader(term=self.term)

    def wait_lost(self, timeout: float | None = None) -> bool:
        return self.lost.wait(timeout)

    @contextlib.contextmanager
    def acting(self) -> Iterator[bool]:
        """Mark leader work that must finish before a *planned* handover (stepdown,
        warm shutdown) gives the lease away: ``with lead.acting() as ok: if ok: ...``.

        ``ok`` is False - do nothing - when the lease is gone or a handover has
        begun. A handover waits for such work up to the minimum election timeout;
        the work must still re-check :meth:`is_valid` right before it acts.
        """
        ok = self._node._begin_action(self.term)
        try:
            yield ok
        finally:
            if ok:
                self._node._end_action()

    def __repr__(self) -> str:
        return f"<Leadership term={self.term} valid={self.is_valid()}>"


class Node:
    def __init__(
        self,
        node_id: str,
        members: tuple[str, ...],
        *,
        transport: Transport,
        timing: Timing = DEFAULT_TIMING,
        state_file: StateFile | None = None,
        on_leader: Callback | None = None,
        on_follower: Callback | None = None,
        on_failure: Callable[[BaseException], Any] | None = None,
        lease_sink: LeaseSink | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = lease_clock,
        join: bool = False,
    ) -> None:
        """``members``: the static list (``--cluster-nodes``), the bootstrap configuration of
        a new cluster; once the state file holds a replicated configuration, that wins.
        ``join``: start with no configuration and wait to be added (``--cluster-join``)."""
        self.id = node_id
        self.static_members = members
        self.timing = timing
        self.transport = transport
        self.state_file = state_file
        self.on_leader = on_leader
        self.on_follower = on_follower
        self.on_failure = on_failure
        self.lease_sink = lease_sink
        self.log = logger or logging.getLogger("celery_cluster")
        self.clock = clock
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._committed = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)
        self._callbacks: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._leadership: Leadership | None = None
        self._published: tuple[int, float] | None = None  # what the lease sink holds
        self._actions = 0  # leader work in flight (Leadership.acting)
        self._draining = 0  # planned handovers waiting for that work
        #: Why this node fail-stopped (its state could not be made durable), else None.
        self.failure: BaseException | None = None
        self._running = False
        self._stopping = False  # stop() is handing over: still answering, no second stop()
        self._stopped = False
        self._ended = threading.Event()  # set by stop() and by a fail-stop
        self._timer_deadline = -math.inf  # what the timer thread sleeps towards
        self._threads: list[threading.Thread] = []
        #: Counters and histograms for metrics (``celery_cluster.metrics`` reads them).
        self.stats = NodeStats()
        #: The latest transitions (the JSON log records), for the status page.
        self.transitions: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_TRANSITIONS)
        self._last_leader: str | None = None
        self._dropped_learners: dict[str, str] = {}  # node -> why the leader gave it up
        self._mismatch_logged: dict[str, float] = {}  # sender -> when we last said so
        #: Addresses this node talks to besides its configuration (join seeds, a leader found).
        self.contacts: set[str] = set()
        state = state_file.load() if state_file is not None else None
        self.core = Election(
            node_id,
            members,
            now=clock(),
            election_timeout=timing.election_timeout,
            heartbeat_interval=timing.heartbeat_interval,
            max_clock_drift=timing.max_clock_drift,
            broker_grace=timing.broker_grace,
            state=state or HardState(),
            join=join and not (state and state.members),
        )
        self._campaign_term = self.core.term  # a campaign before a restart is not counted again
        if self.core.replicated and members and set(members) != set(self.core.members):
            self.log.warning(
                "[cluster] %s: --cluster-nodes lists %s, but the replicated configuration (saved in the state "
                "file) is %s: using the replicated one; change members with `cluster add|remove`, not the list",
                node_id, ",".join(members), ",".join(self.core.members))

    @property
    def members(self) -> tuple[str, ...]:
        """The voting members this node uses now (the latest configuration it holds)."""
        return self.core.members

    def knows(self, address: str) -> bool:
        """Whether ``address`` may send us RPCs: a member, a learner being added, an address
        of the static list, a join seed or the leader we follow."""
        c = self.core
        if address != self.id and not c.replicated and not self.static_members:
            return True  # joining: the leader that adds us may be none of our seeds (a secret authenticates it)
        return address != self.id and (address in c.members or address in c.learners
                                       or address in self.static_members or address in self.contacts
                                       or address in (c.leader_id, c.contact_leader))

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._running or self._stopping or self._stopped or self.failure is not None:
                return
            self._running = True
            self._log_transition("follower", self.core.term, self.core.leader_id)
        self._callbacks.put(("follower", self.core.term))  # on_follower once at start
        for name, target in (("election", self._run_timer), ("callbacks", self._run_callbacks)):
            t = threading.Thread(target=target, name=f"celery-cluster-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, *, transfer: bool = True, timeout: float = 1.0) -> None:
        """Hand leadership over (or step down), then stop. Safe to call in any state, twice."""
        with self._lock:
            if self._stopping or self._stopped:
                return
            self._stopping = True
            if self.failure is None:
                self._relinquish(transfer)
            self._stopped = True
            self._running = False
            self._timer_deadline = math.inf
            self._wake.notify_all()
            self._ended.set()
        self.transport.flush(timeout / 2)
        self._callbacks.put(None)
        for t in self._threads:
            if t is not threading.current_thread():  # stop() may be called from a callback
                t.join(timeout / 2)
        self.transport.close()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the node to stop (or fail-stop); True if it did."""
        return self._ended.wait(timeout)

    # -- inputs from the transport ----------------------------------------------

    def handle_request(self, msg: Message) -> Message | None:
        """Step an incoming request; return the reply for its sender (after persisting).

        Raises :class:`NodeStopped` once :meth:`stop` ran: a stopped node must not vote
        or write its state file (a new instance may already own that file)."""
        with self._lock:
            self._check_running()
            ready = self.core.step(msg, self.clock())
            reply = None
            for env in ready.messages:
                if env.to == msg.sender and isinstance(env.msg, (VoteResponse, AppendResponse)):
                    reply = env
                    break
            if reply is not None:
                ready.messages.remove(reply)
            self._handle(ready)
            self._check_running()  # fail-stopped in this step: the reply depends on what was not saved
            return reply.msg if reply is not None else None

    def _check_running(self) -> None:
        if self.failure is not None:
            raise NodeStopped(f"{self.id} left the cluster: its state is not durable ({self.failure})")
        if self._stopped:
            raise NodeStopped(f"{self.id} is stopped")

    def receive(self, msg: Message) -> None:
        """Step a response that came back from a peer."""
        with self._lock:
            if self._stopped or self.failure is not None:
                return
            self._handle(self.core.step(msg, self.clock()))

    # -- leader API -------------------------------------------------------------

    def is_leader(self, term: int | None = None) -> bool:
        """Lease-checked: true only while this node's lease is valid right now."""
        with self._lock:
            return self.core.is_leader(self.clock()) and (term is None or term == self.core.term)

    def retire(self) -> None:
        """Shutting down: never campaign or lead again (a campaign under way is
        abandoned), hand leadership over (or step down), but keep answering votes
        so the successor can be elected."""
        with self._lock:
            if self._stopped or self.failure is not None:
                return
            self._handle(self.core.retire(self.clock()))
            self._relinquish(transfer=True)

    def _relinquish(self, transfer: bool) -> None:
        """With the lock held: hand leadership over, or step down if nobody can take it.

        The one path by which this node gives leadership up on purpose (stop, retire);
        stepdown goes through :meth:`transfer_leadership`, which drains the same way.
        """
        if self.core.role is not Role.LEADER:
            return
        with self._draining_leader_work():
            if self.core.role is not Role.LEADER:
                return  # lost while leader work finished
            ready = None
            if transfer:
                try:
                    _, ready = self.core.transfer_leadership(self.clock())
                except TransferError:
                    pass  # no reachable peer: step down without a handover
            self._handle(ready if ready is not None else self.core.step_down(self.clock(), "shutdown"))

    @contextlib.contextmanager
    def _draining_leader_work(self) -> Iterator[None]:
        """With the lock held: refuse new leader work and wait (at most the minimum
        election timeout) for the work in flight - a beat firing between its commit
        and its publish - so that a planned handover neither loses nor repeats it."""
        self._draining += 1
        try:
            limit = self.timing.election_timeout[0]
            deadline = self.clock() + limit
            while self._actions and self.core.role is Role.LEADER:
                left = deadline - self.clock()
                if left <= 0:
                    self.log.warning("[cluster] leader work still in flight after %.1f s; handing over anyway",
                                     limit)
                    break
                self._drained.wait(left)
            yield
        finally:
            self._draining -= 1

    def _begin_action(self, term: int) -> bool:
        with self._lock:
            if self._draining or not self.is_leader(term):
                return False
            self._actions += 1
            return True

    def _end_action(self) -> None:
        with self._lock:
            self._actions -= 1
            if not self._actions:
                self._drained.notify_all()

    def leadership(self) -> Leadership | None:
        """The handle of the current term's leadership, if this node leads."""
        with self._lock:
            lead = self._leadership
            return lead if lead is not None and lead.is_valid() else None

    def propose(self, payload: str) -> Version:
        """Replace the replicated payload; returns its version (see :meth:`wait_committed`)."""
        with self._lock:
            self._check_running()
            version, ready = self.core.propose(payload, self.clock())
            self._handle(ready)
            self._check_running()  # fail-stopped saving it: it was never sent
            return version

    def wait_committed(self, version: Version, timeout: float) -> bool:
        """Block until a majority holds ``version`` in this leader's term (False on timeout or loss)."""
        deadline = self.clock() + timeout
        with self._lock:
            while True:
                if self.core.role is not Role.LEADER or self.core.term != version[0]:
                    return False
                if self.core.commit_version >= version:
                    return True
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._committed.wait(left)

    # -- broker health ------------------------------------------------------------

    @property
    def broker_healthy(self) -> bool:
        """Whether this node's broker answered its last probe (always True without a probe)."""
        with self._lock:
            return self.core.broker_healthy

    def set_broker_health(self, healthy: bool) -> None:
        """Whether this node's broker works (the worker's probe says, every half second or
        so). A leader whose broker stays down for the broker grace hands over to a member
        whose broker works (reason ``broker_unreachable``)."""
        with self._lock:
            if self._stopped or self.failure is not None:
                return
            if healthy != self.core.broker_healthy:
                self.log.warning("[cluster] %s: the broker %s", self.id,
                                 "works again" if healthy else "does not answer")
            self._handle(self.core.set_broker_health(healthy, self.clock()))

    # -- a crashed leader ------------------------------------------------------

    def follows(self, peer: str) -> bool:
        """Whether ``peer`` is the leader this node last heard, and this node a follower."""
        with self._lock:
            return self.core.role is Role.FOLLOWER and self.core.contact_leader == peer

    def leader_gone(self, peer: str) -> None:
        """The transport saw ``peer``'s process gone (its connection closed, a new one refused):
        a follower of ``peer`` campaigns as soon as the recent-leader rule allows."""
        with self._lock:
            if self._stopped or self.failure is not None:
                return
            before = self.core.election_deadline
            self._handle(self.core.leader_gone(peer, self.clock()))
            if self.core.election_deadline < before:
                self.log.info("[cluster] %s: leader %s is gone (connection refused); campaigning in %.0f ms",
                              self.id, peer, max(0.0, self.core.election_deadline - self.clock()) * 1000)

    # -- membership -------------------------------------------------------------

    def add_member(self, node: str, timeout: float) -> tuple[str, ...]:
        """Leader only: catch ``node`` up as a learner, add it, and wait until a majority of the
        new configuration holds it. Returns the members. Raises :class:`MembershipError`
        (or :class:`~celery_cluster.election.NotLeader`) with nothing changed when refused."""
        deadline = self.clock() + timeout
        with self._lock:
            self._check_running()
            self._dropped_learners.pop(node, None)
            self._handle(self.core.add_member(node, self.clock()))
            term = self.core.term
            while True:
                c = self.core
                if node in c.members and c.commit_version >= c.config_version:
                    return c.members
                if node in self._dropped_learners:
                    why = {"no_answer": "did not answer", "not_caught_up": "did not catch up"}.get(
                        self._dropped_learners.pop(node), "was given up")
                    raise MembershipError(f"{node} {why} within {c.learner_timeout:g} s: not added; is it running "
                                          "with --cluster-join and reachable from the leader?")
                if c.role is not Role.LEADER or c.term != term:
                    raise MembershipError(f"leadership moved while adding {node}; ask the new leader "
                                          f"({c.leader_id or 'not known yet'})")
                left = deadline - self.clock()
                if left <= 0:
                    raise MembershipError(f"adding {node} is still in progress after {timeout:.0f} s")
                self._committed.wait(left)

    def remove_member(self, node: str, timeout: float) -> tuple[str, ...]:
        """Leader only: remove ``node`` (this node too: it hands over once that is committed)
        and wait until a majority of the new configuration holds the change."""
        deadline = self.clock() + timeout
        with self._lock:
            self._check_running()
            version, ready = self.core.remove_member(node, self.clock())
            self._handle(ready)
            while True:
                c = self.core
                if c.commit_version >= version:
                    return c.members
                if c.term != version[0] or (c.role is not Role.LEADER and c.voter):
                    raise MembershipError(f"leadership moved while removing {node}: the change may or may not "
                                          f"have been committed; check the members on the new leader "
                                          f"({c.leader_id or 'not known yet'})")
                left = deadline - self.clock()
                if left <= 0:
                    raise MembershipError(f"removing {node} is not committed after {timeout:.0f} s")
                self._committed.wait(left)

    @property
    def payload(self) -> tuple[Version, str]:
        with self._lock:
            return self.core.version, self.core.payload

    def transfer_leadership(self, target: str | None = None) -> str:
        """Hand leadership to ``target`` (or the best reachable peer), once leader work in
        flight has finished (see :meth:`Leadership.acting`). Raises TransferError."""
        with self._lock:
            if self.core.role is not Role.LEADER:
                raise TransferError(f"{self.id} is not the leader")
            with self._draining_leader_work():
                target, ready = self.core.transfer_leadership(self.clock(), target)
                self._handle(ready)
        return target

    def status(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            c = self.core
            lease_ms = max(0.0, (c.lease_until - now) * 1000) if c.is_leader(now) else 0.0
            return {
                "id": self.id,
                "leader_id": c.leader_id,
                "leader_address": c.leader_id,
                "state": c.role.value,
                "term": c.term,
                "voted_for": c.voted_for,
                "is_leader": c.is_leader(now),
                "lease_remaining_ms": round(lease_ms, 1),
                # A follower's view of its leader: ms since it last heard it (None: never).
                "leader_contact_ms": (round((now - c.leader_contact) * 1000, 1)
                                      if c.contact_leader is not None and c.role is not Role.LEADER else None),
                "clock": CLOCK_NAME,
                "payload_version": list(c.version),
                "broker_healthy": c.broker_healthy,
                "members": list(c.members),
                "config_version": list(c.config_version),
                "learners": sorted(c.learners) if c.role is Role.LEADER else [],
                "voter": c.voter,
                "failure": str(self.failure) if self.failure is not None else None,
                "recent_transitions": [
                    {k: t[k] for k in ("ts", "event", "term", "leader_id", "reason") if k in t}
                    for t in self.transitions
                ],
                "nodes": [
                    {
                        "address": p,
                        "last_contact_ms": round((now - c.last_heard[p]) * 1000, 1) if p in c.last_heard else None,
                        # The leader's view of the peer's broker (None on followers, or not heard yet).
                        "broker_healthy": c.peer_healthy.get(p) if c.role is Role.LEADER else None,
                    }
                    for p in (*c.peers, *(sorted(c.learners) if c.role is Role.LEADER else ()))
                ],
            }

    # -- internals -------------------------------------------------------------

    def health(self) -> list[str]:
        """What keeps this node from being healthy (empty when it is): it fail-stopped,
        or it neither leads nor heard a leader within the maximum election timeout."""
        with self._lock:
            if self.failure is not None:
                return [f"state not durable: {self.failure}"]
            if self._stopped:
                return ["stopped"]
            now = self.clock()
            c = self.core
            if not c.is_leader(now) and not (c.contact_leader is not None
                                             and now - c.leader_contact < c.max_timeout):
                return ["no leader known"]
            return []

    def _handle(self, ready: Ready) -> None:
        """Revoke, persist, send, then act on events (module docstring). Lock held."""
        for ev in ready.events:
            if isinstance(ev, SteppedDown):
                self._revoke(ev.term)  # before anything leaves: see the module docstring
        if ready.hard_state is not None and self.state_file is not None:
            started = time.perf_counter()
            try:
                self.state_file.save(ready.hard_state)
            except Exception as exc:  # noqa: BLE001 - StateFileError (ENOSPC, EIO, EROFS...) or worse
                self.stats.state_write_failures.inc()
                self._fail_stop(exc, ready)
                return
            self.stats.state_writes.observe(time.perf_counter() - started)
        for env in ready.messages:
            self.transport.send(env)
        for ev in ready.events:
            self._on_event(ev)
        if self.core.voted_for == self.id and self.core.term > self._campaign_term:
            # We vote for ourselves only when campaigning, once per term.
            self._campaign_term = self.core.term
            self.stats.elections_started.inc()
        leader = self.core.leader_id
        if leader is not None and leader != self._last_leader:
            self._last_leader = leader
            self.stats.leader_changes.inc()
        self._publish_lease()
        if self.core.next_deadline() < self._timer_deadline:
            self._wake.notify_all()  # only when the timer must fire earlier than it planned

    def _revoke(self, term: int | None) -> None:
        """End leadership of ``term`` (None: whichever) for everything that acts on it."""
        if self._published is not None and self.lease_sink is not None:
            self.lease_sink.revoke()
        self._published = None
        lead = self._leadership
        if lead is not None and term in (None, lead.term):
            lead.lost.set()

    def _publish_lease(self) -> None:
        """Hand every extension of the lease to the sink, from the core's own state."""
        c = self.core
        if self.lease_sink is None or c.role is not Role.LEADER or (c.term, c.lease_until) == self._published:
            return
        if self._leadership is None or self._leadership.term != c.term:
            return  # not yet acquired in this term (LeaseAcquired creates the handle)
        self._published = (c.term, c.lease_until)
        if self.clock is lease_clock:
            shared = c.lease_until
        else:
            # An injected clock (tests): carry the remaining lease over to the shared
            # clock, reading that one first so the result can only come out earlier.
            base = lease_clock()
            shared = base + (c.lease_until - self.clock())
        self.lease_sink.publish(c.term, shared)

    def _fail_stop(self, exc: BaseException, ready: Ready) -> None:
        """The state of ``ready`` could not be made durable: send none of its messages,
        give leadership up, and leave the cluster (fail-stop, as etcd and hashicorp/raft
        do): the core already believes what was not saved, so nothing it says can be
        trusted any more. Lock held."""
        self.failure = exc
        self.log.critical("[cluster] %s: %s; this node leaves the cluster (fail-stop: its votes and "
                          "acknowledgements could no longer be trusted across a restart)", self.id, exc)
        events: list[object] = [ev for ev in ready.events if isinstance(ev, SteppedDown)]  # this step ended
        if self.core.role is Role.LEADER:
            events += self.core.step_down(self.clock(), "state_not_durable").events
        self._revoke(None)
        for ev in events:
            self._on_event(ev)
        self._running = False
        self._timer_deadline = math.inf
        self._wake.notify_all()
        self._committed.notify_all()
        self._drained.notify_all()
        self._ended.set()
        self._callbacks.put(("failed", exc))

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, RoleChanged):
            if ev.role is Role.LEADER:
                self.stats.elections_won.inc()
            if ev.role is not Role.LEADER:  # "leader" is logged when the lease starts
                self._log_transition(ev.role.value, ev.term, ev.leader_id)
        elif isinstance(ev, LeaseAcquired):
            self._leadership = Leadership(self, ev.term)
            self._log_transition("leader", ev.term, self.id, lease_until=ev.lease_until)
            self._callbacks.put(("leader", self._leadership))
        elif isinstance(ev, SteppedDown):
            lead = self._leadership
            if lead is not None and lead.term == ev.term:
                lead.lost.set()  # a handle created in this same step is lost too
            self.stats.stepdowns.inc(ev.reason)
            self._log_transition("stepped_down", ev.term, self.core.leader_id,
                                 reason=ev.reason, lease_until=ev.lease_until)
            if ev.had_lease:
                self._callbacks.put(("follower", ev.term))
            self._committed.notify_all()  # wait_committed() returns False at once, not at its timeout
            self._drained.notify_all()
        elif isinstance(ev, Committed):
            self._committed.notify_all()
        elif isinstance(ev, MembersChanged):
            self.log.info("[cluster] %s: members are now %s (version %s.%s)%s", self.id, ",".join(ev.members),
                          *ev.version, "" if self.id in ev.members else "; this node is not one of them: it "
                          "will never campaign (stop it, or add it back)")
            self._committed.notify_all()
        elif isinstance(ev, LearnerDropped):
            self._dropped_learners[ev.node] = ev.reason
            self.log.warning("[cluster] gave up adding %s: %s", ev.node, ev.reason.replace("_", " "))
            self._committed.notify_all()
        elif isinstance(ev, ClusterMismatch):
            now = self.clock()
            if now - self._mismatch_logged.get(ev.sender, -math.inf) >= 60:
                self._mismatch_logged[ev.sender] = now
                theirs = (f"started with --cluster-nodes {','.join(ev.their_members)}, cluster id {ev.theirs}"
                          if ev.their_members else f"cluster id {ev.theirs}")
                self.log.warning(
                    "[cluster] ignoring %s: it belongs to another cluster (%s; ours: members %s, cluster id %s). "
                    "A node started with a different --cluster-nodes list never joins this one: start it with "
                    "--cluster-join and add it with `cluster add`", ev.sender, theirs,
                    ",".join(self.core.members) or "none yet", ev.ours or "none yet")
        elif isinstance(ev, VoteRefused):
            self.log.debug("[cluster] refused %s %s for term %s: %s", ev.candidate,
                           "a pre-vote" if ev.prevote else "a vote", ev.term, ev.reason)

    def _tick(self, now: float) -> None:
        """One timer event (the timer thread's; unit tests drive it by hand). Lock held."""
        self._handle(self.core.tick(now))

    def _run_timer(self) -> None:
        with self._lock:
            while self._running:
                now = self.clock()
                deadline = self.core.next_deadline()
                if now >= deadline:
                    self._timer_deadline = -math.inf  # we are awake: nobody needs to wake us
                    self._tick(now)
                    continue
                self._timer_deadline = deadline
                self._wake.wait(deadline - now)
                self._timer_deadline = -math.inf

    def _run_callbacks(self) -> None:
        while True:
            item = self._callbacks.get()
            if item is None:
                return
            kind, arg = item
            if kind == "leader":
                lead: Leadership = arg
                if lead.lost.is_set() or self.on_leader is None:
                    continue  # lost before we got to it: nothing to start
                self._invoke(self.on_leader, lead.term)
            elif kind == "failed":
                if self.on_failure is not None:
                    try:
                        self.on_failure(arg)
                    except Exception:
                        self.log.exception("[cluster] on_failure callback failed")
            elif self.on_follower is not None:
                self._invoke(self.on_follower, arg)

    def _invoke(self, fn: Callback, term: int) -> None:
        try:
            fn(term)
        except Exception:  # a user callback must not kill the node
            self.log.exception("[cluster] %s callback failed in term %s; stepping down",
                               getattr(fn, "__name__", fn), term)
            with self._lock:
                if self.core.term == term:
                    self._handle(self.core.step_down(self.clock(), "callback_error"))

    def _log_transition(self, event: str, term: int, leader_id: str | None, **extra: Any) -> None:
        record = {
            "ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "mono": round(self.clock(), 6),  # the node's clock, on which lease_until is measured
            "boottime": round(lease_clock(), 6),  # the machine's, whatever the node's clock says
            "node": self.id,
            "event": event,
            "term": term,
            "leader_id": leader_id,
            **{k: (None if isinstance(v, float) and v == float("-inf") else v) for k, v in extra.items()},
        }
        self.transitions.append(record)
        state = {"id": self.id, "leader_id": leader_id, "state": event, "term": term,
                 "voted_for": self.core.voted_for}
        text = "[cluster] Current state is " + json.dumps(state, separators=(",", ":"))
        if "reason" in extra:
            text += f" (reason: {extra['reason']})"
        self.log.info(text, extra={"cluster_event": record})


__all__ = ["Node", "Leadership", "Transport", "LeaseSink", "NodeStopped"]
