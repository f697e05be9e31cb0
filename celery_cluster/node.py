"""The node driver: runs an :class:`~celery_cluster.election.Election` in real time.

It owns the timer thread, persistence (hard state is fsynced before any
message that depends on it leaves), the callback thread and leadership
handles. It knows nothing about HTTP: a :class:`Transport` sends envelopes and
feeds responses back through :meth:`Node.receive`; incoming requests arrive
through :meth:`Node.handle_request`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Protocol

from .config import Timing
from .election import (
    Committed,
    Election,
    Envelope,
    LeaseAcquired,
    Ready,
    Role,
    RoleChanged,
    SteppedDown,
)
from .errors import ClusterError, TransferError
from .messages import AppendResponse, HardState, Message, Version, VoteResponse
from .state_file import StateFile

Callback = Callable[[int], Any]


class Transport(Protocol):
    def send(self, envelope: Envelope) -> None:
        """Queue ``envelope`` for delivery; never blocks on the network."""

    def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until queued messages have been sent."""

    def close(self) -> None: ...


class NodeStopped(ClusterError):
    """A request reached a node that was stopped."""


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

    def __repr__(self) -> str:
        return f"<Leadership term={self.term} valid={self.is_valid()}>"


class Node:
    def __init__(
        self,
        node_id: str,
        members: tuple[str, ...],
        *,
        transport: Transport,
        timing: Timing = Timing(),
        state_file: StateFile | None = None,
        on_leader: Callback | None = None,
        on_follower: Callback | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = node_id
        self.members = members
        self.timing = timing
        self.transport = transport
        self.state_file = state_file
        self.on_leader = on_leader
        self.on_follower = on_follower
        self.log = logger or logging.getLogger("celery_cluster")
        self.clock = clock
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._committed = threading.Condition(self._lock)
        self._callbacks: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._leadership: Leadership | None = None
        self._running = False
        self._stopped = False
        self._timer_deadline = -math.inf  # what the timer thread sleeps towards
        self._threads: list[threading.Thread] = []
        state = state_file.load() if state_file is not None else None
        self.core = Election(
            node_id,
            members,
            now=clock(),
            election_timeout=timing.election_timeout,
            heartbeat_interval=timing.heartbeat_interval,
            max_clock_drift=timing.max_clock_drift,
            state=state or HardState(),
        )

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._running or self._stopped:
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
            if self._stopped:
                return
            self._stopped = True
            self._relinquish(transfer)
            self._running = False
            self._timer_deadline = math.inf
            self._wake.notify_all()
        self.transport.flush(timeout / 2)
        self._callbacks.put(None)
        for t in self._threads:
            if t is not threading.current_thread():  # stop() may be called from a callback
                t.join(timeout / 2)
        self.transport.close()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # -- inputs from the transport ----------------------------------------------

    def handle_request(self, msg: Message) -> Message | None:
        """Step an incoming request; return the reply for its sender (after persisting).

        Raises :class:`NodeStopped` once :meth:`stop` ran: a stopped node must not vote
        or write its state file (a new instance may already own that file)."""
        with self._lock:
            if self._stopped:
                raise NodeStopped(f"{self.id} is stopped")
            ready = self.core.step(msg, self.clock())
            reply = None
            for env in ready.messages:
                if env.to == msg.sender and isinstance(env.msg, (VoteResponse, AppendResponse)):
                    reply = env
                    break
            if reply is not None:
                ready.messages.remove(reply)
            self._handle(ready)
            return reply.msg if reply is not None else None

    def receive(self, msg: Message) -> None:
        """Step a response that came back from a peer."""
        with self._lock:
            if self._stopped:
                return
            self._handle(self.core.step(msg, self.clock()))

    # -- leader API -------------------------------------------------------------

    def is_leader(self, term: int | None = None) -> bool:
        """Lease-checked: true only while this node's lease is valid right now."""
        with self._lock:
            return self.core.is_leader(self.clock()) and (term is None or term == self.core.term)

    def lease(self) -> tuple[int, float] | None:
        """(term, lease_until on the monotonic clock) while this node leads, else None."""
        with self._lock:
            if not self.core.is_leader(self.clock()):
                return None
            return self.core.term, self.core.lease_until

    def retire(self) -> None:
        """Shutting down: hand leadership over (or step down) and never campaign again,
        but keep answering votes so the successor can be elected."""
        with self._lock:
            self.core.passive = True
            self._relinquish(transfer=True)

    def _relinquish(self, transfer: bool) -> None:
        """With the lock held: hand leadership over, or step down if nobody can take it."""
        if self.core.role is not Role.LEADER:
            return
        ready = None
        if transfer:
            try:
                _, ready = self.core.transfer_leadership(self.clock())
            except TransferError:
                pass  # no reachable peer: step down without a handover
        self._handle(ready if ready is not None else self.core.step_down(self.clock(), "shutdown"))

    def leadership(self) -> Leadership | None:
        """The handle of the current term's leadership, if this node leads."""
        with self._lock:
            lead = self._leadership
            return lead if lead is not None and lead.is_valid() else None

    def propose(self, payload: str) -> Version:
        """Replace the replicated payload; returns its version (see :meth:`wait_committed`)."""
        with self._lock:
            version, ready = self.core.propose(payload, self.clock())
            self._handle(ready)
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

    @property
    def payload(self) -> tuple[Version, str]:
        with self._lock:
            return self.core.version, self.core.payload

    def transfer_leadership(self, target: str | None = None) -> str:
        """Hand leadership to ``target`` (or the best reachable peer). Raises TransferError."""
        with self._lock:
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
                "payload_version": list(c.version),
                "nodes": [
                    {
                        "address": p,
                        "last_contact_ms": round((now - c.last_heard[p]) * 1000, 1) if p in c.last_heard else None,
                    }
                    for p in c.peers
                ],
            }

    # -- internals -------------------------------------------------------------

    def _handle(self, ready: Ready) -> None:
        """Persist, then send, then act on events. Called with the lock held."""
        if ready.hard_state is not None and self.state_file is not None:
            self.state_file.save(ready.hard_state)  # raises: never send what we could not persist
        for env in ready.messages:
            self.transport.send(env)
        for ev in ready.events:
            self._on_event(ev)
        if self.core.next_deadline() < self._timer_deadline:
            self._wake.notify_all()  # only when the timer must fire earlier than it planned

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, RoleChanged):
            if ev.role is not Role.LEADER:  # "leader" is logged when the lease starts
                self._log_transition(ev.role.value, ev.term, ev.leader_id)
        elif isinstance(ev, LeaseAcquired):
            self._leadership = Leadership(self, ev.term)
            self._log_transition("leader", ev.term, self.id, lease_until=ev.lease_until)
            self._callbacks.put(("leader", self._leadership))
        elif isinstance(ev, SteppedDown):
            lead = self._leadership
            if lead is not None and lead.term == ev.term:
                lead.lost.set()  # at once, before any callback runs
            self._log_transition("stepped_down", ev.term, self.core.leader_id,
                                 reason=ev.reason, lease_until=ev.lease_until)
            if ev.had_lease:
                self._callbacks.put(("follower", ev.term))
            self._committed.notify_all()  # wait_committed() returns False at once, not at its timeout
        elif isinstance(ev, Committed):
            self._committed.notify_all()

    def _run_timer(self) -> None:
        with self._lock:
            while self._running:
                now = self.clock()
                deadline = self.core.next_deadline()
                if now >= deadline:
                    self._timer_deadline = -math.inf  # we are awake: nobody needs to wake us
                    self._handle(self.core.tick(now))
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
            elif self.on_follower is not None:
                self._invoke(self.on_follower, arg)

    def _invoke(self, fn: Callback, term: int) -> None:
        try:
            fn(term)
        except Exception:  # noqa: BLE001 - a user callback must not kill the node
            self.log.exception("[cluster] %s callback failed in term %s; stepping down",
                               getattr(fn, "__name__", fn), term)
            with self._lock:
                if self.core.term == term:
                    self._handle(self.core.step_down(self.clock(), "callback_error"))

    def _log_transition(self, event: str, term: int, leader_id: str | None, **extra: Any) -> None:
        record = {
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "mono": round(self.clock(), 6),
            "node": self.id,
            "event": event,
            "term": term,
            "leader_id": leader_id,
            **{k: (None if isinstance(v, float) and v == float("-inf") else v) for k, v in extra.items()},
        }
        state = {"id": self.id, "leader_id": leader_id, "state": event, "term": term,
                 "voted_for": self.core.voted_for}
        text = "[cluster] Current state is %s" % json.dumps(state, separators=(",", ":"))
        if "reason" in extra:
            text += f" (reason: {extra['reason']})"
        self.log.info(text, extra={"cluster_event": record})


__all__ = ["Node", "Leadership", "Transport", "NodeStopped"]
