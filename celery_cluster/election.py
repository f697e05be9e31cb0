"""The Raft leader-election state machine, sans I/O.

:class:`Election` takes messages (:meth:`~Election.step`) and the time
(:meth:`~Election.tick`) in, and hands back a :class:`Ready`: hard state to
persist, messages to send and events for the driver. It never reads a clock,
sleeps, opens a socket or starts a thread; ``now`` is always a monotonic reading
the caller passes in, and randomness comes from the ``rng`` it is given.

The driver must handle each Ready in order: **persist ``hard_state`` first**,
then send ``messages``, then act on ``events``.

Rules, with their reason (Raft paper / Ongaro's thesis, ch. 3, 6 and 9):

* Majority of the *configured* members, ``N // 2 + 1``, self counted once.
* A higher term is adopted first, in one place at the top of :meth:`~Election.step`
  (clear vote, step down) - except from a pre-vote, a vote request the
  recent-leader rule refuses, a granted pre-vote and TimeoutNow; then a vote is
  granted iff not yet voted in the term or voted for the same candidate. Every
  refusal is a :class:`VoteRefused` event with its reason.
* Pre-vote: a node asks "would you vote for me in term+1?" before bumping its
  term, so a partitioned node cannot inflate terms.
* Recent-leader rule ("stickiness"): a node that heard from a live leader within
  the minimum election timeout - or that *is* a leader holding a lease, or that
  restarted less than that long ago - refuses votes and pre-votes, whatever its
  own role, without adopting the candidate's term. This is what makes the
  leader lease sound; unlike etcd, pre-candidates get no exception.
  Two exceptions, both safe because the lease holder gave its lease up: a
  ``transfer`` vote (the leader sent TimeoutNow and stepped down) and a
  candidate that *is* the leader the voter follows (self re-election, below).
* Check-quorum and lease: a leader acts only while ``now < lease_until``, where
  ``lease_until`` is the start of the latest heartbeat round acknowledged by a
  majority plus ``min_timeout * (1 - drift) / (1 + drift)``. A voter in that
  majority refuses votes for ``min_timeout`` of its own clock after receiving
  the round, so with clock rates within ``1 ± drift`` no other node can win an
  election before the lease ends. The leader steps down two heartbeats before
  that if no majority answered.
* Replicated payload: a Raft log of one entry. The leader re-stamps the payload
  with its own term when elected, so its version (term, seq) exceeds every
  version in the cluster; votes go only to candidates whose version is at least
  the voter's, so every elected leader holds every committed version.
* A leader that learns of a higher term from a follower while its lease is
  valid (a node that restarted with a higher term) runs for term+1 itself
  instead of stepping down: its followers vote for it, so the rejoining node
  does not depose it.
* A retiring node (:meth:`~Election.retire`, a worker in warm shutdown) keeps
  voting but never campaigns or leads again, even through a campaign that was
  under way when it retired.
* Membership (Ongaro's thesis, section 4.1): the voting members are part of the
  replicated state, versioned with the payload; the first leader stamps the
  bootstrap list into it. Each node counts votes, acknowledgements and commits
  against the latest configuration it holds, committed or not. The leader
  changes it one server at a time (:meth:`~Election.add_member`,
  :meth:`~Election.remove_member`), only once it has committed state in its own
  term and never while an earlier change is uncommitted. Any majority of a
  configuration meets any majority of one that differs by one server, so the
  lease and vote arguments above hold across each step. A new server first
  catches up as a learner (sent the state, not counted), then is added; a node
  not in its own configuration never campaigns; a leader that removed itself
  hands over once the change is committed.
* Broker health (:meth:`~Election.set_broker_health`, fed by the driver): a leader
  whose broker has not worked for ``broker_grace`` hands over (the transfer path,
  reason ``broker_unreachable``) to a reachable member whose acknowledgements have
  said for that long that its broker works; if none has, nothing changes (so the
  end of an outage that hit everyone moves nothing either). A voter whose broker
  works refuses a pre-vote to a candidate whose broker does not. Planned
  handovers prefer a member with a working broker. Only refusals and transfers
  are added, so the arguments above are untouched.
* A crash seen (:meth:`~Election.leader_gone`, fed by the driver when the leader's
  connections close and a new one is refused - never for a silent timeout, which may be
  a pause or a partition): a follower of that leader moves its election deadline to
  ``leader_contact + min_timeout`` plus a margin and a stagger by its rank among the
  members (so the survivors campaign one after another, not at once), instead of
  waiting out a randomised timeout up to the maximum. It only brings a deadline
  forward to one the node could have drawn: the recent-leader rule still makes
  every voter refuse for ``min_timeout`` after it last heard the leader, so the
  lease argument above is untouched.
* Every message carries the cluster id (a digest of the bootstrap member list);
  a message from another cluster is dropped (:class:`ClusterMismatch`); one
  without an id (a release before ids) is not checked. A node
  with no replicated configuration (started to join) takes the id and the state
  from the first leader that sends them.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import DEFAULT_BROKER_GRACE, DEFAULT_ELECTION_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MAX_CLOCK_DRIFT
from .errors import ClusterError, MembershipError, TransferError
from .messages import (
    AppendEntries,
    AppendResponse,
    HardState,
    Message,
    TimeoutNow,
    Version,
    VoteRequest,
    VoteResponse,
    cluster_id,
)


class NotLeader(ClusterError):
    """Raised by :meth:`Election.propose` on a node that is not the leader."""


class Role(str, enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


# -- outputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    to: str
    msg: Message


@dataclass(frozen=True)
class RoleChanged:
    """The node's role changed (logged as follower / pre_candidate / candidate)."""

    role: Role
    term: int
    leader_id: str | None


@dataclass(frozen=True)
class LeaseAcquired:
    """``is_leader()`` became true for the first time in ``term``: start leader work."""

    term: int
    lease_until: float


@dataclass(frozen=True)
class SteppedDown:
    """Leadership of ``term`` is over. ``lease_until`` is the last instant ``is_leader()``
    could have been true (``-inf`` if it never was in this term)."""

    term: int
    # higher_term | lost_quorum | lease_expired | transfer | shutdown | callback_error | state_not_durable | removed
    # | broker_unreachable
    reason: str
    lease_until: float
    had_lease: bool


@dataclass(frozen=True)
class Committed:
    """A majority now holds payload ``version``."""

    version: Version


@dataclass(frozen=True)
class VoteRefused:
    """This node refused ``candidate`` a vote (or a pre-vote) for ``term``, and why.

    ``reason``: ``leader_recently_heard`` (the recent-leader rule), ``restarted_recently``
    (the same rule just after a restart), ``leading`` (this node holds a lease),
    ``stale_term``, ``already_voted`` (for ``voted_for``), ``candidate_behind`` (its
    payload version is older than ours) or ``candidate_broker_down`` (a pre-vote from a
    candidate whose broker does not work, while ours does).
    """

    candidate: str
    term: int
    prevote: bool
    reason: str


@dataclass(frozen=True)
class MembersChanged:
    """This node now uses configuration ``members`` (state version ``version``; not yet
    committed when a leader proposes it or a follower receives it)."""

    members: tuple[str, ...]
    version: Version


@dataclass(frozen=True)
class LearnerDropped:
    """The leader gave up adding ``node``: ``no_answer`` or ``not_caught_up`` within ``learner_timeout``."""

    node: str
    reason: str


@dataclass(frozen=True)
class ClusterMismatch:
    """A message from ``sender`` was dropped: it belongs to cluster ``theirs``, we to ``ours``."""

    sender: str
    theirs: str
    ours: str
    #: The sender's bootstrap list, when it said (a candidate with no replicated configuration).
    their_members: tuple[str, ...] | None = None


Event = (RoleChanged | LeaseAcquired | SteppedDown | Committed | VoteRefused | MembersChanged | LearnerDropped
         | ClusterMismatch)


@dataclass
class Ready:
    hard_state: HardState | None = None
    messages: list[Envelope] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


NEVER = -math.inf
#: After a crash is seen: the first survivor campaigns this fraction of the minimum timeout
#: (plus 5 ms) after the recent-leader rule ends, the next ones this fraction further apart
#: (at least 15 ms) - see :meth:`Election.gone_delay`.
GONE_MARGIN = 0.02
GONE_STAGGER = 0.05


class Election:
    """One member's view of the election. See the module docstring for the rules."""

    def __init__(
        self,
        node_id: str,
        members: Iterable[str],
        *,
        now: float,
        election_timeout: tuple[float, float] = DEFAULT_ELECTION_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        max_clock_drift: float = DEFAULT_MAX_CLOCK_DRIFT,
        state: HardState | None = None,
        rng: random.Random | None = None,
        join: bool = False,
        learner_timeout: float | None = None,
        broker_grace: float = DEFAULT_BROKER_GRACE,
    ) -> None:
        """``members`` is the bootstrap configuration: used (and its digest taken as the cluster
        id) only while ``state`` holds no replicated configuration. ``join``: start with no
        configuration at all and wait for a leader to add this node (``members`` is ignored)."""
        self.id = node_id
        self.min_timeout, self.max_timeout = election_timeout
        self.heartbeat_interval = heartbeat_interval
        self.lease_duration = self.min_timeout * (1 - max_clock_drift) / (1 + max_clock_drift)
        #: How long the leader waits for a learner to catch up before giving it up.
        self.learner_timeout = learner_timeout if learner_timeout is not None else 5 * self.max_timeout
        self.broker_grace = broker_grace
        #: Whether this node's broker works (the driver says), and since when it does not.
        self.broker_healthy = True
        self.broker_down_since: float | None = None
        self._broker_check_at = math.inf
        self.rng = rng or random.Random()

        state = state or HardState()
        self.term = state.term
        self.voted_for = state.voted_for
        self.version: Version = tuple(state.payload_version)  # type: ignore[assignment]
        self.payload = state.payload
        self._saved = state
        #: The bootstrap list given at start (only contact addresses once a configuration is replicated).
        self.static_members: tuple[str, ...] = () if join else tuple(dict.fromkeys(members))
        if state.members:
            self.replicated = True
            self.cluster = state.cluster
            self.config_version: Version = tuple(state.config_version)  # type: ignore[assignment]
            self._set_members(state.members)
        else:
            if not join and node_id not in self.static_members:
                raise ValueError(f"{node_id} is not among the members {self.static_members}")
            self.replicated = False
            self.cluster = cluster_id(self.static_members) if self.static_members else ""
            self.config_version = (0, 0)
            self._set_members(self.static_members)

        self.role = Role.FOLLOWER
        self.leader_id: str | None = None
        self.started_at = now
        # The recent-leader rule remembers who we last heard lead, and when, apart
        # from leader_id: adopting a higher term (even from a late response)
        # must not make a node forget a leader whose lease may count on it.
        self.contact_leader: str | None = None
        self.leader_contact = NEVER
        self.last_heard: dict[str, float] = {}  # any message, per peer (for status)
        # A lone member leads at once; others wait a randomised timeout.
        self.election_deadline = now if self.members == (self.id,) else now + self._random_timeout()

        self._votes: dict[str, bool] = {}
        #: A retiring node (shutting down) still votes but never campaigns.
        self.passive = False
        # leader state
        self.lease_until = NEVER
        self._had_lease = False
        self._round = 0
        self._round_started: dict[int, float] = {}
        self._quorum_round_start = NEVER
        self._peer_round: dict[str, int] = {}
        self._payload_round: dict[str, int] = {}  # last round in which we sent each peer the payload
        self.peer_version: dict[str, Version] = {}
        self.peer_contact: dict[str, float] = {}
        self.next_heartbeat = NEVER
        self.commit_version: Version = (0, 0)
        #: Leader only: nodes being caught up before they are added, and when each was asked for.
        self.learners: dict[str, float] = {}
        #: Leader only: the version it started from when elected (what it held of the past).
        self.elected_with: Version = (0, 0)
        #: The newest version this node holds and knows to be committed (heard from a leader).
        self.known_commit: Version = (0, 0)
        #: Leader only: nodes it removed, told again once the removal is committed.
        self._removed: set[str] = set()
        #: Leader only: whether each peer's broker worked, as its latest acknowledgement said,
        #: and since when it has said so without a break.
        self.peer_healthy: dict[str, bool] = {}
        self.peer_healthy_since: dict[str, float] = {}

        self._out: list[Envelope] = []
        self._events: list[Event] = []

    # -- queries ---------------------------------------------------------------

    def is_leader(self, now: float) -> bool:
        """True only while this node leads *and* its lease is valid at ``now``."""
        return self.role is Role.LEADER and now < self.lease_until

    def next_deadline(self) -> float:
        """The latest time by which :meth:`tick` must be called next."""
        if self.role is Role.LEADER:
            # The end of the broker grace, once; after that every heartbeat tick re-checks.
            return min(self.next_heartbeat, self._stepdown_at(), self._broker_check_at)
        return self.election_deadline

    @property
    def hard_state(self) -> HardState:
        if not self.replicated:
            return HardState(self.term, self.voted_for, self.version, self.payload)
        return HardState(self.term, self.voted_for, self.version, self.payload, self.members,
                         self.config_version, self.cluster)

    @property
    def voter(self) -> bool:
        """Whether this node is in its own configuration (only voters count)."""
        return self.id in self.members

    @property
    def may_campaign(self) -> bool:
        """Voters campaign; so does a node outside its configuration while that configuration
        is not known to be committed - a leader that removed itself and lost its followers
        before the change was committed must be able to finish it (with the votes of the
        new configuration, never its own), or a cluster shrinking from two to one could
        wait for ever. Once it knows the change committed, it never campaigns again."""
        return not self.passive and (self.voter or (self.replicated and self.config_version > self.known_commit))

    def change_pending(self) -> bool:
        """The leader's latest configuration change is not committed yet."""
        return self.config_version > self.commit_version

    # -- inputs ----------------------------------------------------------------

    def tick(self, now: float) -> Ready:
        if self.role is Role.LEADER:
            if now >= self._stepdown_at():
                reason = "lease_expired" if now >= self.lease_until else "lost_quorum"
                self._become_follower(now, self.term, None, reason)
            elif self._broker_handover(now):
                pass
            elif now >= self.next_heartbeat:
                self._drop_stale_learners(now)
                self._broadcast(now)
        elif now >= self.election_deadline:
            if not self.may_campaign:
                self.election_deadline = now + self._random_timeout()  # never campaigns; just wait again
            else:
                self._start_prevote(now)
        return self._ready()

    def step(self, msg: Message, now: float) -> Ready:
        sender = msg.sender
        if sender == self.id:
            return self._ready()  # never a message from ourselves (a misconfigured address)
        if msg.cluster != self.cluster and msg.cluster:  # no id: a release before ids; not checked
            joining = (not self.replicated and not self.static_members
                       and isinstance(msg, AppendEntries) and msg.members is not None)
            if not joining:
                said = msg.members if isinstance(msg, VoteRequest) else None
                self._events.append(ClusterMismatch(sender, msg.cluster, self.cluster, said))
                return self._ready()
            self.cluster = msg.cluster  # a joining node takes the id of the leader that adds it
        self.last_heard[sender] = now
        # The recent-leader rule is judged once, on the state the request found.
        sticky = self._sticky_reason(msg.candidate, now, msg.transfer) if isinstance(msg, VoteRequest) else None
        if msg.term > self.term and self._adopts_term(msg, sticky):
            # The one place a higher term is adopted (Raft §5.1): clear the vote, step down.
            rerun = isinstance(msg, AppendResponse) and self.is_leader(now)
            leader = msg.leader if isinstance(msg, AppendEntries) else None
            self._become_follower(now, msg.term, leader, "higher_term")
            if rerun:
                # A node came back with a higher term while our followers still
                # follow us: win the next term ourselves rather than be deposed.
                self._campaign(now, transfer=False)
                return self._ready()
        if isinstance(msg, VoteRequest):
            self._on_vote_request(msg, now, sticky)
        elif isinstance(msg, VoteResponse):
            self._on_vote_response(msg, now)
        elif isinstance(msg, AppendEntries):
            self._on_append(msg, now)
        elif isinstance(msg, AppendResponse):
            self._on_append_response(msg, now)
        elif isinstance(msg, TimeoutNow):
            self._on_timeout_now(msg, now)
        return self._ready()

    def _adopts_term(self, msg: Message, sticky: str | None) -> bool:
        """Whether a message with a higher term than ours makes us adopt that term.

        Not a pre-vote request (never change state for a pre-vote), nor a vote request the
        recent-leader rule refuses (a disruptive candidate must not depose a leader), nor
        a granted pre-vote (its term is the one the pre-candidate would use), nor a refused
        pre-vote unless we are still pre-campaigning, nor TimeoutNow (only our own leader's,
        in our term, counts).
        """
        if isinstance(msg, VoteRequest):
            return not msg.prevote and sticky is None
        if isinstance(msg, VoteResponse) and msg.prevote:
            return not msg.granted and self.role is Role.PRE_CANDIDATE
        return not isinstance(msg, TimeoutNow)

    def retire(self, now: float) -> Ready:
        """Shutting down: never campaign or lead again (a campaign under way is abandoned),
        but keep voting so a successor can be elected. Leadership itself is given up by
        :meth:`transfer_leadership` or :meth:`step_down`."""
        self.passive = True
        if self.role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
            self._set_role(Role.FOLLOWER, None)
            self._votes = {}
            self.election_deadline = now + self._random_timeout()
        return self._ready()

    def propose(self, payload: str, now: float) -> tuple[Version, Ready]:
        """Replace the replicated payload (leader only) and send it at once.

        Returns the new version; a :class:`Committed` event with a version at
        least this one says a majority holds it.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader (leader: {self.leader_id})")
        self.version = (self.term, self.version[1] + 1)
        self.payload = payload
        self._broadcast(now)
        return self.version, self._ready()

    # -- broker health ----------------------------------------------------------

    def set_broker_health(self, healthy: bool, now: float) -> Ready:
        """The driver's latest word on this node's broker. A leader whose broker stays down
        for ``broker_grace`` hands over to a member whose broker works (if any)."""
        if healthy:
            self.broker_down_since = None
            self._broker_check_at = math.inf
        elif self.broker_healthy or self.broker_down_since is None:
            self.broker_down_since = now
            self._broker_check_at = now + self.broker_grace
        self.broker_healthy = healthy
        if self.role is Role.LEADER:
            self._broker_handover(now)
        return self._ready()

    def leader_gone(self, leader: str, now: float) -> Ready:
        """The driver saw ``leader``'s process gone (its connections closed and a new one
        refused). A follower of that leader campaigns at ``leader_contact + min_timeout``
        plus :meth:`gone_delay` - the earliest moment the recent-leader rule lets the other
        voters grant - rather than after a random timeout; nothing changes otherwise."""
        if (self.role is Role.FOLLOWER and self.contact_leader == leader and leader != self.id
                and self.may_campaign):
            at = max(now, self.leader_contact + self.min_timeout + self.gone_delay(leader))
            if at < self.election_deadline:
                self.election_deadline = at
        return self._ready()

    def gone_delay(self, leader: str) -> float:
        """Margin plus stagger after the minimum timeout for a follower whose leader crashed:
        the margin covers voters that heard the leader's last heartbeat a little after us;
        the stagger orders the survivors by id, one pre-vote and vote round apart, so they
        do not split the vote (a candidate refused for an older log just lets the next one
        try a stagger later)."""
        others = sorted(m for m in self.members if m != leader)
        rank = others.index(self.id) if self.id in others else len(others)
        return GONE_MARGIN * self.min_timeout + 0.005 + rank * max(GONE_STAGGER * self.min_timeout, 0.015)

    def _broker_handover(self, now: float) -> bool:
        """Leader: hand over if our broker has been down for the grace period and a reachable
        member reports a working one. True if it did."""
        if (self.role is not Role.LEADER or self.broker_down_since is None
                or now - self.broker_down_since < self.broker_grace):
            return False
        self._broker_check_at = math.inf  # from here on, every heartbeat tick looks again
        # Only to a member whose broker has worked for the grace period too: when a broker outage
        # that hit everyone ends, our own probe may say so a moment after theirs - no handover then.
        healthy = [p for p in self.peers if self.peer_healthy.get(p)
                   and now - self.peer_healthy_since.get(p, math.inf) >= self.broker_grace
                   and now - self.peer_contact.get(p, NEVER) < self.min_timeout]
        if not healthy:
            return False  # nobody's broker works better: never flap over an outage that hits everyone
        target = max(healthy, key=lambda p: (self.peer_version.get(p, (0, 0)), self.peer_contact[p]))
        self._transfer(now, target, "broker_unreachable")
        return True

    # -- membership ------------------------------------------------------------

    def _check_change(self, what: str) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader (leader: {self.leader_id}): send {what} to the leader")
        if self.commit_version < self.elected_with or self.commit_version[0] != self.term:
            raise MembershipError(f"cannot {what} yet: the leader has not committed state in its term {self.term}")
        if self.change_pending():
            raise MembershipError(f"cannot {what}: the change to {', '.join(self.members)} is not committed yet")

    def add_member(self, node: str, now: float) -> Ready:
        """Start adding ``node``: it is sent the state as a learner and, once it holds the
        leader's version, added to the configuration (one server). Raises
        :class:`MembershipError` (nothing changed) if a change is pending or ``node`` is a member;
        :class:`LearnerDropped` follows if it does not catch up within ``learner_timeout``."""
        self._check_change(f"add {node}")
        if node in self.members:
            raise MembershipError(f"{node} is already a member")
        if self.learners and node not in self.learners:
            raise MembershipError(f"cannot add {node}: {', '.join(self.learners)} is being added")
        if node not in self.learners:
            self.learners[node] = now
            self._send_append(node)
        return self._ready()

    def remove_member(self, node: str, now: float) -> tuple[Version, Ready]:
        """Remove ``node`` (this leader itself included: it then hands over once the change is
        committed). Refused, changing nothing, when a change is pending, ``node`` is not a
        member, or fewer of the remaining members than their majority answered lately."""
        self._check_change(f"remove {node}")
        if node not in self.members:
            raise MembershipError(f"{node} is not a member (members: {', '.join(self.members)})")
        remaining = tuple(m for m in self.members if m != node)
        if not remaining:
            raise MembershipError(f"cannot remove {node}: it is the only member")
        live = [m for m in remaining if m == self.id or now - self.peer_contact.get(m, NEVER) < self.min_timeout]
        need = len(remaining) // 2 + 1
        if len(live) < need:
            raise MembershipError(
                f"cannot remove {node}: only {len(live)} of the remaining {len(remaining)} members "
                f"answered lately ({', '.join(live) or 'none'}), {need} are needed for their majority")
        self._change_members(remaining, now)
        if node != self.id:
            self._removed.add(node)
            self._send_append(node)  # tell it now, and again once committed (it then never campaigns)
        return self.version, self._ready()

    def _change_members(self, members: tuple[str, ...], now: float) -> None:
        self.version = (self.term, self.version[1] + 1)
        self.config_version = self.version
        self._set_members(members)
        self._events.append(MembersChanged(self.members, self.version))
        self._broadcast(now)

    def _set_members(self, members: tuple[str, ...]) -> None:
        self.members = tuple(members)
        self.peers: tuple[str, ...] = tuple(m for m in self.members if m != self.id)
        self.quorum = len(self.members) // 2 + 1

    def _drop_stale_learners(self, now: float) -> None:
        for node, since in list(self.learners.items()):
            if now - since >= self.learner_timeout:
                del self.learners[node]
                answered = node in self.peer_contact
                self._events.append(LearnerDropped(node, "not_caught_up" if answered else "no_answer"))

    def _maybe_promote(self, node: str, now: float) -> None:
        """A learner that holds our version becomes a member (the one-server "add")."""
        if self.peer_version.get(node) != self.version or self.change_pending():
            return
        del self.learners[node]
        self._change_members((*self.members, node), now)

    def transfer_leadership(self, now: float, target: str | None = None) -> tuple[str, Ready]:
        """Hand leadership to ``target`` or to the most up-to-date reachable peer.

        The leader steps down (reason ``transfer``) as it sends TimeoutNow, so its
        lease ends here, before the target can be elected.
        """
        if self.role is not Role.LEADER:
            raise TransferError(f"{self.id} is not the leader")
        target = self._transfer(now, target)
        return target, self._ready()

    def _transfer(self, now: float, target: str | None, reason: str | None = None) -> str:
        reachable = [p for p in self.peers if now - self.peer_contact.get(p, NEVER) < self.min_timeout]
        if target is not None:
            if target not in reachable:
                raise TransferError(f"cannot transfer to {target}: not a reachable peer")
        elif not reachable:
            raise TransferError("no peer answered within the election timeout; nobody to hand over to")
        else:
            # Prefer a member whose broker works, then the most up to date.
            target = max(reachable, key=lambda p: (self.peer_healthy.get(p, True), self.peer_version.get(p, (0, 0)),
                                                   self.peer_contact[p]))
        behind = self.peer_version.get(target, (0, 0)) < self.version
        self._send(target, TimeoutNow(self.term, self.id, self.version, self.payload if behind else None,
                                      self.members if behind else None, self.cluster))
        self._become_follower(now, self.term, None, reason or ("transfer" if self.voter else "removed"))
        return target

    def step_down(self, now: float, reason: str) -> Ready:
        """Give up leadership without a handover (``shutdown``, ``callback_error``)."""
        if self.role is Role.LEADER:
            self._become_follower(now, self.term, None, reason)
        return self._ready()

    # -- votes -----------------------------------------------------------------

    def _sticky_reason(self, candidate: str, now: float, transfer: bool) -> str | None:
        """The recent-leader rule: why we must refuse (pre-)votes right now, or None.

        A transfer vote passes (the leader gave its lease up when it sent TimeoutNow), and
        so does the leader we follow re-running for a new term (its lease is its own).
        """
        if transfer or (self.role is not Role.LEADER and candidate == self.contact_leader):
            return None
        if now - self.started_at < self.min_timeout:
            return "restarted_recently"  # we may have acked a leader's round we no longer remember
        if self.role is Role.LEADER:
            return "leading" if now < self.lease_until else None
        if self.contact_leader is not None and now - self.leader_contact < self.min_timeout:
            return "leader_recently_heard"
        return None

    def _on_vote_request(self, m: VoteRequest, now: float, sticky: str | None) -> None:
        reason = sticky
        if reason is None:
            if m.prevote:
                # Never change our own state for a pre-vote.
                reason = "stale_term" if m.term <= self.term else None
            elif m.term < self.term:
                reason = "stale_term"
            elif self.voted_for not in (None, m.candidate):
                reason = "already_voted"
            if reason is None and m.version < self.version:
                reason = "candidate_behind"
            if reason is None and m.prevote and not m.healthy and self.broker_healthy:
                reason = "candidate_broker_down"  # we could use the leadership; it could not
        if reason is not None:
            self._events.append(VoteRefused(m.candidate, m.term, m.prevote, reason))
            self._send(m.candidate, VoteResponse(self.term, self.id, False, m.prevote, self.cluster,
                                                 self.broker_healthy))
            if (self.role is Role.LEADER and m.candidate not in self.members and m.candidate not in self.learners
                    and m.term - m.prevote <= self.term):
                # A node we removed that missed it: tell it again (never one with a higher term,
                # whose answer would make us run again).
                self._send_append(m.candidate)
            return
        if m.prevote:
            self._send(m.candidate, VoteResponse(m.term, self.id, True, True, self.cluster, self.broker_healthy))
            return
        self.voted_for = m.candidate  # the term was adopted in step(): m.term == self.term
        self.election_deadline = now + self._random_timeout()
        self._send(m.candidate, VoteResponse(self.term, self.id, True, False, self.cluster, self.broker_healthy))

    def _on_vote_response(self, m: VoteResponse, now: float) -> None:
        if m.prevote:
            if self.role is not Role.PRE_CANDIDATE:
                return
            self._votes[m.voter] = m.granted and m.term == self.term + 1
            if self._granted() >= self.quorum:
                self._campaign(now, transfer=False)
            return
        if self.role is not Role.CANDIDATE or m.term < self.term:
            return  # stale (a higher term was adopted in step())
        self._votes[m.voter] = m.granted
        if self._granted() >= self.quorum:
            self._become_leader(now)

    def _granted(self) -> int:
        """Votes granted by members of our configuration (ourselves included if we are one)."""
        return sum(1 for voter, g in self._votes.items() if g and voter in self.members)

    def _start_prevote(self, now: float) -> None:
        if self.contact_leader is not None and now - self.leader_contact < self.min_timeout:
            # Our own lease promise binds us too: no campaign while the leader may hold a lease.
            self.election_deadline = self.leader_contact + self.min_timeout
            return
        self._set_role(Role.PRE_CANDIDATE, None)
        self._votes = {self.id: True}
        self.election_deadline = now + self._random_timeout()
        for p in self.peers:
            self._send(p, VoteRequest(self.term + 1, self.id, self.version, prevote=True, cluster=self.cluster,
                                      members=None if self.replicated else self.members, healthy=self.broker_healthy))
        if self._granted() >= self.quorum:
            self._campaign(now, transfer=False)

    def _campaign(self, now: float, transfer: bool) -> None:
        if not self.may_campaign:
            return  # retiring, or not a member: never lead again
        self.term += 1
        self.voted_for = self.id
        self._set_role(Role.CANDIDATE, None)
        self._votes = {self.id: True}
        self.election_deadline = now + self._random_timeout()
        for p in self.peers:
            self._send(p, VoteRequest(self.term, self.id, self.version, prevote=False, transfer=transfer,
                                      cluster=self.cluster, members=None if self.replicated else self.members,
                                      healthy=self.broker_healthy))
        if self._granted() >= self.quorum:
            self._become_leader(now)

    # -- leadership ------------------------------------------------------------

    def _become_leader(self, now: float) -> None:
        self._set_role(Role.LEADER, self.id)
        # Re-stamp the payload in our term: our version now exceeds every other,
        # and committing it commits everything before it (Raft's no-op entry).
        self.elected_with = self.version
        self.version = (self.term, self.version[1] + 1)
        if not self.replicated:
            # The first leader makes the bootstrap list the replicated configuration.
            self.replicated = True
            self.config_version = self.version
        self.lease_until = NEVER
        self._had_lease = False
        self._round = 0
        self._round_started = {}
        self._quorum_round_start = now
        self._peer_round = {}
        self._payload_round = {}
        self.peer_version = {}
        self.peer_contact = {}
        self.commit_version = (0, 0)
        self.learners = {}
        self._removed = set()
        self.peer_healthy = {}
        self.peer_healthy_since = {}
        self._broadcast(now)

    def _broadcast(self, now: float) -> None:
        """Start heartbeat round ``n``: AppendEntries to every peer, payload to those that may lack it."""
        self._round += 1
        self._round_started[self._round] = now
        self.next_heartbeat = now + self.heartbeat_interval
        for p in self.peers:
            self._send_append(p)
        for p in self.learners:
            self._send_append(p)
        self._advance(now)

    def _send_append(self, peer: str) -> None:
        behind = self.peer_version.get(peer) != self.version
        if behind:
            self._payload_round[peer] = self._round
            self._send(peer, AppendEntries(self.term, self.id, self._round, self.version, self.payload,
                                           self.members, self.cluster, self.commit_version))
        else:
            self._send(peer, AppendEntries(self.term, self.id, self._round, self.version, None, None,
                                           self.cluster, self.commit_version))

    def _on_append_response(self, m: AppendResponse, now: float) -> None:
        if self.role is not Role.LEADER or m.term < self.term or not m.success:
            return
        peer = m.follower
        learner = peer in self.learners
        if peer not in self.members and not learner:
            return  # a node we removed, answering the notice
        self.peer_contact[peer] = now
        self.peer_healthy[peer] = m.healthy
        if m.healthy:
            self.peer_healthy_since.setdefault(peer, now)
        else:
            self.peer_healthy_since.pop(peer, None)
        self.peer_version[peer] = max(m.version, self.peer_version.get(peer, (0, 0)))
        self._peer_round[peer] = max(m.round, self._peer_round.get(peer, 0))
        if self.peer_version[peer] < self.version and self._payload_round.get(peer) != self._round:
            self._send_append(peer)  # it lacks the payload: don't wait for the next round
        if learner:
            self._maybe_promote(peer, now)
        self._advance(now)

    def _advance(self, now: float) -> None:
        """Recompute the lease and the commit version from what peers acknowledged."""
        mine = [self._round] if self.voter else []
        rounds = sorted([*mine, *(self._peer_round.get(p, 0) for p in self.peers)], reverse=True)
        majority_round = rounds[self.quorum - 1] if len(rounds) >= self.quorum else 0
        if majority_round in self._round_started:
            started = self._round_started[majority_round]
            self._quorum_round_start = max(self._quorum_round_start, started)
            self.lease_until = max(self.lease_until, started + self.lease_duration)
            for r in [r for r in self._round_started if r < majority_round]:
                del self._round_started[r]
            if not self._had_lease and now < self.lease_until:
                self._had_lease = True
                self._events.append(LeaseAcquired(self.term, self.lease_until))
        mine_v = [self.version] if self.voter else []
        held = sorted([*mine_v, *(v for p in self.peers if (v := self.peer_version.get(p, (0, 0)))[0] == self.term)],
                      reverse=True)
        if len(held) >= self.quorum and held[self.quorum - 1] > self.commit_version:
            self.commit_version = held[self.quorum - 1]
            if self.commit_version == self.version:
                self.known_commit = self.version
            self._events.append(Committed(self.commit_version))
            if not self.change_pending():
                for node in self._removed:
                    self._send_append(node)  # the removal is committed: now it knows for sure
                self._removed.clear()
                if not self.voter:
                    self._hand_over_after_removal(now)

    def _hand_over_after_removal(self, now: float) -> None:
        """We removed ourselves and that is committed: hand over, or step down if nobody answers."""
        try:
            self._transfer(now, None)
        except TransferError:
            self._become_follower(now, self.term, None, "removed")

    def _stepdown_at(self) -> float:
        """Check-quorum: step down two heartbeats before the lease would lapse."""
        return self._quorum_round_start + self.lease_duration - 2 * self.heartbeat_interval

    # -- following -------------------------------------------------------------

    def _on_append(self, m: AppendEntries, now: float) -> None:
        if m.term < self.term:
            # A leader of an older term: tell it our term (it may re-run, see module doc).
            self._send(m.leader, AppendResponse(self.term, self.id, m.round, self.version, False, self.cluster,
                                                self.broker_healthy))
            return
        if self.role is not Role.FOLLOWER or self.leader_id != m.leader:
            if self.role is Role.LEADER:
                return  # impossible: one leader per term; never follow a twin
            self._become_follower(now, m.term, m.leader, "leader_found")  # (pre-)candidate: the term has a leader
        self.contact_leader, self.leader_contact = m.leader, now
        self.election_deadline = now + self._random_timeout()
        self._adopt_payload(m.version, m.payload, m.members)
        if self.version == m.version and m.commit >= m.version:
            self.known_commit = self.version  # what we hold is committed
        self._send(m.leader, AppendResponse(self.term, self.id, m.round, self.version, True, self.cluster,
                                            self.broker_healthy))

    def _on_timeout_now(self, m: TimeoutNow, now: float) -> None:
        if m.term != self.term or self.role is not Role.FOLLOWER or self.leader_id not in (None, m.leader):
            return  # stale or not from our leader
        if self.passive:
            return  # shutting down: the sender's election timeout will find another leader
        self._adopt_payload(m.version, m.payload, m.members)
        self._campaign(now, transfer=True)

    def _adopt_payload(self, version: Version, payload: str | None, members: tuple[str, ...] | None) -> None:
        """Take the leader's state if it came along and is newer: messages reorder, never downgrade.

        Its configuration is used at once, committed or not (thesis section 4.1); a newer
        leader's state may take it back, as Raft truncates an uncommitted entry."""
        if payload is not None and version > self.version:
            self.version, self.payload = version, payload
            if members is not None and (members != self.members or not self.replicated):
                changed = members != self.members
                self.replicated = True
                self.config_version = version
                self._set_members(members)
                if changed:
                    self._events.append(MembersChanged(self.members, version))

    def _become_follower(self, now: float, term: int, leader: str | None, reason: str) -> None:
        if self.role is Role.LEADER:
            last = min(now, self.lease_until) if self._had_lease else NEVER
            self._events.append(SteppedDown(self.term, reason, last, self._had_lease))
            self.lease_until = NEVER
        if term > self.term:
            self.term = term
            self.voted_for = None
        self._set_role(Role.FOLLOWER, leader)
        if leader is not None:
            self.contact_leader, self.leader_contact = leader, now
        self.election_deadline = now + self._random_timeout()

    # -- plumbing ----------------------------------------------------------------

    def _set_role(self, role: Role, leader: str | None) -> None:
        changed = role is not self.role or leader != self.leader_id
        self.role, self.leader_id = role, leader
        if changed:
            self._events.append(RoleChanged(role, self.term, leader))

    def _random_timeout(self) -> float:
        return self.rng.uniform(self.min_timeout, self.max_timeout)

    def _send(self, to: str, msg: Message) -> None:
        self._out.append(Envelope(to, msg))

    def _ready(self) -> Ready:
        hs = self.hard_state
        ready = Ready(hs if hs != self._saved else None, self._out, self._events)
        self._saved = hs
        self._out, self._events = [], []
        return ready
