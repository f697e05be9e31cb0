"""The node driver's contract, with a fake transport, a recording state file and a clock
the test moves by hand (no threads unless a test starts them; no network).

Everything a node does leaves a line in one shared journal - ``save``, ``send``,
``publish``, ``revoke`` - so the tests can assert *order*: state is durable before the
first message that depends on it leaves; the lease that pool processes read is revoked
before anything can let another node be elected; a node whose state cannot be saved
sends nothing of that step and gives leadership up.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from celery_cluster.clock import lease_clock
from celery_cluster.config import Timing
from celery_cluster.election import Envelope, Role
from celery_cluster.errors import StateFileError, TransferError
from celery_cluster.leader_state import LeaderState
from celery_cluster.messages import (
    AppendEntries,
    AppendResponse,
    HardState,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from celery_cluster.node import Node, NodeStopped

A, B, C = "10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"
TIMING = Timing((1.0, 2.0), 0.1)


class Journal(list):
    def kinds(self) -> list[str]:
        return [entry[0] for entry in self]

    def index_of(self, kind: str, pred: Any = lambda _: True) -> int:
        return next(i for i, e in enumerate(self) if e[0] == kind and pred(e[1]))


class FakeTransport:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def send(self, envelope: Envelope) -> None:
        self.journal.append(("send", envelope))

    def flush(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    def sent(self, kind: type) -> list[Envelope]:
        return [e[1] for e in self.journal if e[0] == "send" and isinstance(e[1].msg, kind)]


class RecordingStateFile:
    """Records every save; raises on the ``fail_at``-th save (1-based) and after it."""

    def __init__(self, journal: Journal, fail_at: int | None = None) -> None:
        self.journal = journal
        self.fail_at = fail_at
        self.saves = 0
        self.disk = HardState()

    def load(self) -> HardState | None:
        return None

    def save(self, state: HardState) -> None:
        self.saves += 1
        if self.fail_at is not None and self.saves >= self.fail_at:
            raise StateFileError("cannot save state file /srv/state.json: No space left on device")
        self.disk = state
        self.journal.append(("save", state))


class RecordingSink:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def publish(self, term: int, lease_until: float) -> None:
        self.journal.append(("publish", (term, lease_until)))

    def revoke(self) -> None:
        self.journal.append(("revoke", None))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_node(journal: Journal, *, fail_at: int | None = None, sink: Any = None, clock: Any = None,
              **kw: Any) -> tuple[Node, FakeTransport, RecordingStateFile, Clock]:
    clock = clock or Clock()
    transport = FakeTransport(journal)
    state = RecordingStateFile(journal, fail_at)
    node = Node(A, (A, B, C), transport=transport, timing=TIMING, state_file=state,  # type: ignore[arg-type]
                lease_sink=sink if sink is not None else RecordingSink(journal), clock=clock, **kw)
    return node, transport, state, clock


def tick(node: Node, clock: Clock, dt: float) -> None:
    clock.now += dt
    with node._lock:
        node._tick(clock())


def elect(node: Node, transport: FakeTransport, clock: Clock) -> None:
    """Drive A to leadership with a lease: timeout, pre-votes, votes, one heartbeat round."""
    tick(node, clock, 2.5)  # past the start-up window and any timeout
    assert node.core.role is Role.PRE_CANDIDATE
    node.receive(VoteResponse(1, B, True, True))
    assert node.core.role is Role.CANDIDATE
    node.receive(VoteResponse(1, B, True, False))
    assert node.core.role is Role.LEADER
    round_ = transport.sent(AppendEntries)[-1].msg.round
    node.receive(AppendResponse(1, B, round_, node.core.version, True))
    assert node.is_leader()


# -- durability before dependent messages -------------------------------------------------------


def test_a_campaign_is_durable_before_its_vote_requests_leave() -> None:
    journal = Journal()
    node, transport, _, clock = make_node(journal)
    tick(node, clock, 2.5)
    node.receive(VoteResponse(1, B, True, True))  # pre-vote granted: campaign for term 1
    save = journal.index_of("save", lambda hs: hs.term == 1 and hs.voted_for == A)
    first_request = journal.index_of("send", lambda env: isinstance(env.msg, VoteRequest) and not env.msg.prevote)
    assert save < first_request


def test_a_granted_vote_is_durable_before_the_reply_is_returned() -> None:
    journal = Journal()
    node, _, state, clock = make_node(journal)
    clock.now += 2.5  # past the start-up window
    reply = node.handle_request(VoteRequest(3, B, (0, 0)))
    assert isinstance(reply, VoteResponse) and reply.granted
    assert (state.disk.term, state.disk.voted_for) == (3, B)


def test_a_proposed_payload_is_durable_before_it_is_sent() -> None:
    journal = Journal()
    node, transport, state, clock = make_node(journal)
    elect(node, transport, clock)
    version = node.propose("beat-state")
    save = journal.index_of("save", lambda hs: hs.payload == "beat-state")
    send = journal.index_of("send", lambda env: isinstance(env.msg, AppendEntries) and env.msg.payload == "beat-state")
    assert save < send and state.disk.payload_version == version


# -- fail-stop --------------------------------------------------------------------------------


def test_a_vote_that_cannot_be_saved_is_never_granted_and_the_node_leaves() -> None:
    journal = Journal()
    failures: list[BaseException] = []
    node, transport, _, clock = make_node(journal, fail_at=1, on_failure=failures.append)
    clock.now += 2.5
    with pytest.raises(NodeStopped, match="not durable.*No space left"):
        node.handle_request(VoteRequest(3, B, (0, 0)))
    assert transport.sent(VoteResponse) == []
    assert node.failure is not None and node.health() == [f"state not durable: {node.failure}"]
    assert node.status()["failure"].endswith("No space left on device")
    with pytest.raises(NodeStopped):  # and it answers nothing any more
        node.handle_request(AppendEntries(3, B, 1, (0, 0)))


def test_a_leader_that_cannot_save_a_proposal_sends_nothing_and_gives_leadership_up() -> None:
    journal = Journal()
    followers: list[int] = []
    failures: list[BaseException] = []
    node, transport, state, clock = make_node(journal, on_follower=followers.append, on_failure=failures.append)
    elect(node, transport, clock)
    lead = node.leadership()
    assert lead is not None
    state.fail_at = state.saves + 1
    sent_before = len(transport.sent(AppendEntries))
    with pytest.raises(NodeStopped):
        node.propose("beat-state")
    # Nothing of the failed step left the node: the payload was never replicated.
    assert len(transport.sent(AppendEntries)) == sent_before
    assert journal.kinds()[-1] == "revoke"  # the lease pool processes read is gone
    assert lead.lost.is_set() and not lead.is_valid() and not node.is_leader()
    assert node.core.role is not Role.LEADER
    # Queued for the callback thread (not running here): leadership lost, then the failure.
    assert queued_callbacks(node)[-2:] == ["follower", "failed"]
    node.start()  # a node that fail-stopped does not start again
    assert not node._threads


def queued_callbacks(node: Node) -> list[str]:
    out = []
    while not node._callbacks.empty():
        out.append(node._callbacks.get_nowait()[0])
    return out


def test_a_stepdown_whose_new_term_cannot_be_saved_still_ends_leadership() -> None:
    """A higher term arrives while leading; saving it fails: the lease is revoked anyway and
    the follower callback is queued (nothing is answered)."""
    journal = Journal()
    node, transport, state, clock = make_node(journal)
    elect(node, transport, clock)
    lead = node.leadership()
    state.fail_at = state.saves + 1
    with pytest.raises(NodeStopped):
        node.handle_request(AppendEntries(5, B, 1, (0, 0)))
    assert lead is not None and lead.lost.is_set() and not node.is_leader()
    assert "revoke" in journal.kinds()
    assert queued_callbacks(node)[-2:] == ["follower", "failed"]


# -- the lease that leader work reads -------------------------------------------------------------


def test_the_sink_gets_every_lease_extension_and_never_a_later_end_than_the_node() -> None:
    journal = Journal()
    node, transport, _, clock = make_node(journal)

    def check_published() -> None:
        # This node's clock is the test's: the sink gets the lease carried over to the
        # machine's lease clock, ending no later than the node's own.
        term, until = [e[1] for e in journal if e[0] == "publish"][-1]
        remaining_there, remaining_here = until - lease_clock(), node.core.lease_until - clock()
        assert term == 1 and remaining_here - 0.05 < remaining_there <= remaining_here

    elect(node, transport, clock)
    check_published()
    first = len([e for e in journal if e[0] == "publish"])
    tick(node, clock, 0.1)  # the next heartbeat round, acknowledged: the lease is extended
    round_ = transport.sent(AppendEntries)[-1].msg.round
    node.receive(AppendResponse(1, C, round_, node.core.version, True))
    assert len([e for e in journal if e[0] == "publish"]) == first + 1
    check_published()


def test_transfer_revokes_the_lease_before_timeout_now_leaves() -> None:
    journal = Journal()
    node, transport, _, clock = make_node(journal)
    elect(node, transport, clock)
    node.transfer_leadership(B)
    revoke = journal.index_of("revoke")
    timeout_now = journal.index_of("send", lambda env: isinstance(env.msg, TimeoutNow))
    assert revoke < timeout_now


def test_a_higher_term_revokes_the_lease_before_it_is_saved_or_answered() -> None:
    journal = Journal()
    node, transport, _, clock = make_node(journal)
    elect(node, transport, clock)
    node.handle_request(AppendEntries(5, B, 1, (0, 0)))
    assert journal.index_of("revoke") < journal.index_of("save", lambda hs: hs.term == 5)


def test_lease_expiry_at_a_granted_vote_revokes_before_the_vote() -> None:
    """The lease runs out without a tick (the timer thread is late); a vote request for a
    higher term arrives: the step-down it causes revokes the lease before the vote is saved."""
    journal = Journal()
    node, transport, _, clock = make_node(journal)
    elect(node, transport, clock)
    clock.now = node.core.lease_until + 0.01
    reply = node.handle_request(VoteRequest(2, B, node.core.version))
    assert isinstance(reply, VoteResponse) and reply.granted
    assert journal.index_of("revoke") < journal.index_of("save", lambda hs: hs.voted_for == B)


def test_a_slow_callback_thread_does_not_delay_revocation(tmp_path: Path) -> None:
    """The bug this replaced: the lease pool children read stayed valid until the callback
    thread (busy in a user's on_leader) got round to clearing it."""
    journal = Journal()
    state = LeaderState(tmp_path / "leader.mmap", create=True)
    in_callback, release = threading.Event(), threading.Event()

    def slow_on_leader(term: int) -> None:
        in_callback.set()
        release.wait(5)

    node, transport, _, clock = make_node(journal, sink=state, on_leader=slow_on_leader, clock=lease_clock)
    node._callbacks.put(("follower", 0))  # what start() queues
    threading.Thread(target=node._run_callbacks, daemon=True).start()
    try:
        elect_now(node, transport)
        assert state.current_term() == 1
        assert in_callback.wait(5)
        node.transfer_leadership(B)
        assert state.current_term() is None  # at once, though on_leader is still running
    finally:
        release.set()


def tick_real(node: Node) -> None:
    with node._lock:
        node._tick(node.clock())


def elect_now(node: Node, transport: FakeTransport) -> None:
    """:func:`elect` for a node on a real clock: its election timer fires now."""
    with node._lock:
        node.core.election_deadline = node.clock()
        node.core.started_at -= 2.0  # past the start-up window
    tick_real(node)
    node.receive(VoteResponse(1, B, True, True))
    node.receive(VoteResponse(1, B, True, False))
    node.receive(AppendResponse(1, B, transport.sent(AppendEntries)[-1].msg.round, node.core.version, True))
    assert node.is_leader()


def test_a_forward_clock_jump_past_the_lease_ends_leadership_everywhere(tmp_path: Path) -> None:
    """A suspend (or a VM pause the hypervisor hides from CLOCK_MONOTONIC) as the node sees
    it with CLOCK_BOOTTIME: the clock jumps past the lease. The node, its leadership handle
    and the shared lease pool processes read must all say "not leader" at once."""
    journal = Journal()
    shared = LeaderState(tmp_path / "leader.mmap", create=True)
    offset = [0.0]

    def jumpy() -> float:
        return lease_clock() + offset[0]

    node, transport, _, _ = make_node(journal, sink=shared, clock=jumpy)
    elect_now(node, transport)
    lead = node.leadership()
    assert lead is not None and lead.is_valid() and shared.current_term() == 1
    with lead.acting() as ok:
        assert ok
    offset[0] += TIMING.election_timeout[0] * 2  # more than the lease
    assert not node.is_leader() and not lead.is_valid()
    with lead.acting() as ok:
        assert not ok
    # The shared lease was converted to the machine's clock when published: the jumped node
    # believed in it for less time, and pool processes, whose clock did not jump, see it end
    # no later than the node's own lease would have.
    assert shared.read()[1] <= lease_clock() + TIMING.election_timeout[0]
    tick_real(node)  # the timer thread wakes: the node steps down
    assert node.core.role is not Role.LEADER and shared.current_term() is None


# -- planned handover waits for leader work in flight -------------------------------------------


def test_a_planned_handover_waits_for_leader_work_in_flight_and_refuses_new_work() -> None:
    journal = Journal()
    node, transport, _, clock = make_node(journal, clock=lease_clock)
    elect_now(node, transport)
    lead = node.leadership()
    assert lead is not None
    finished = threading.Event()
    transferred: list[str] = []
    with lead.acting() as ok:
        assert ok
        t = threading.Thread(target=lambda: transferred.append(node.transfer_leadership(B)))
        t.start()
        deadline = time.monotonic() + 5
        while not node._draining and time.monotonic() < deadline:
            time.sleep(0.001)
        assert node._draining  # the handover is waiting for us...
        with lead.acting() as second:
            assert not second  # ...and no new leader work starts meanwhile
        assert transport.sent(TimeoutNow) == [] and node.is_leader()
        finished.set()
    t.join(5)
    assert transferred == [B] and transport.sent(TimeoutNow)


def test_a_handover_does_not_wait_forever_for_stuck_leader_work() -> None:
    journal = Journal()
    node, transport, _, clock = make_node(journal, clock=lease_clock)
    node.timing = Timing((0.2, 0.4), 0.05)  # the wait is bounded by the minimum election timeout
    with node._lock:
        node.core.election_deadline = lease_clock()
        node.core.started_at -= 2.0
    tick_real(node)
    node.receive(VoteResponse(1, B, True, True))
    node.receive(VoteResponse(1, B, True, False))
    node.receive(AppendResponse(1, B, transport.sent(AppendEntries)[-1].msg.round, node.core.version, True))
    lead = node.leadership()
    assert lead is not None
    with lead.acting() as ok:
        assert ok
        started = time.monotonic()
        try:
            node.transfer_leadership(B)
        except TransferError:
            pass  # the lease may have run out meanwhile (no more heartbeats here): also fine
        assert 0.15 < time.monotonic() - started < 2.0
    assert not node.is_leader()
