"""Scenario transcripts: every ``tests/testdata/*.txt`` runs on the simulated cluster.

A transcript is read top to bottom, one command per line; ``#`` starts a comment.
Time is virtual (seconds); every node's timer and message is simulated by
``tests/simnet.py``, which also checks the safety invariants after every event
(one leader per term, never two lease holders at once, one vote per term...).

Setting up (a later ``cluster`` line starts a new story in the same file)::

    cluster n1 n2 n3 [timeout=1.0-2.0] [heartbeat=0.1] [drift=0.05] [seed=0]
    timeouts n1=1.0 n2=1.5          fixed election timeouts, so the story is deterministic
                                    (at t=0: from the start; later: from the next timer on)
    rates n1=0.95 n2=1.05           clock rates within the drift bound (before the first run)

Driving the cluster::

    run 1.2 | run until 5.0         advance virtual time by 1.2 s / up to t=5.0
    crash n2 | restart n2           restart keeps what n2 persisted (starts it if down)
    pause n1 3.0                    SIGSTOP for 3 s: its clock runs, its inbox waits
    partition n1 | n2 n3            split the network into groups (more '|' for more groups)
    block n1 -> n2 | cut n1 n2      drop n1's messages to n2 / both ways
    hold n2 n3 -> n1 [Type k=v..]   the network keeps matching messages ('*' = any node)...
    release [n2 -> n1] [Type k=v..] ...and sends them on late, through the network as it is
                                    now (no filter: all of them, and stop holding)
    heal                            undo partition/block/cut/hold (held messages are delivered)
    deliver n2 -> n1 Type k=v..     n1 receives this message 1 ms later, whatever the network
                                    (a late duplicate, a very old one)
    campaign n2                     n2's election timer fires now. Realistic only for a node
                                    that heard no leader for the minimum election timeout:
                                    a real timer never fires sooner (the lease relies on it)
    disk-fail n2 [after=N]          n2's disk fails on its write after N more (default 0): it
                                    fail-stops (sends nothing of that step, goes down);
                                    'restart n2' brings it back on what it had saved
    retire n1                       n1 shuts down: keeps voting, never campaigns or leads again
    join n4 [n5..]                  start new nodes with --cluster-join (no configuration)
    add n1 n4 [fails TEXT]          leader n1 adds n4 (a learner first, a member once caught up)
    remove n1 n3 [fails TEXT]       leader n1 removes n3 (itself too)
    static n3 n1 n2 n3 n4           restart n3 with this --cluster-nodes list (start it if new)
    broker n1 [n2..] down|up        what the driver says of these nodes' broker (health)
    propose n1 [fails TEXT]         the leader replaces the payload with "p<term>.<seq>"
    transfer n1 [to n2] [fails TEXT]  leadership transfer (TimeoutNow)
    set-term n3 7                   rewrite n3's persisted term, restart it
    set-state n3 k=v..              same for term / voted_for / payload_version / payload
    status                          print every node (shown when a test fails)

Expectations (``none`` means "nobody"; versions are written term.seq, e.g. 2.3)::

    expect n1 [ROLE|down] [term=T] [leader=X] [voted=X] [lease|no-lease]
                                    ROLE: follower, pre-candidate, candidate, leader (core role);
                                    lease: is_leader(now) is true
    expect leaders n1               exactly these nodes have is_leader(now) true
    expect no-leader                nobody has
    expect one-leader               exactly one node has, whichever
    expect voted n2 term=2 for=n1   what n2 has persisted
    expect event n1 [none] KIND [k=v..]
                                    KIND: a role (RoleChanged), lease (LeaseAcquired),
                                    stepped-down, committed, refused (VoteRefused: a vote
                                    or pre-vote refused, with its reason), members
                                    (MembersChanged), learner-dropped, mismatch
                                    (ClusterMismatch). Events are consumed in order:
                                    a match moves n1's cursor past it; 'none' checks every
                                    event since the cursor and moves it to the end.
    expect sent n2 -> n1 [none] Type [k=v..]
                                    same, for the messages n2 emitted to n1 (Type: VoteRequest,
                                    VoteResponse, AppendEntries, AppendResponse, TimeoutNow)
    expect committed n1 >= 2.3      the highest Committed event of n1 (also '=')
    expect payload n2 n3 = p2.3     payload held in memory (or on disk when down)
    expect version n2 n3 = 2.3      same for the payload version
    expect transfer-target n3       whom the last 'transfer' picked
    expect members n1 n2 = n1 n2 n3 the configuration each holds (in order)
    expect handover n1 -> n2        n2's latest election came after the end of the lease n1
                                    gave up in its latest stepped-down event (real time)
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from celery_cluster import messages
from celery_cluster.election import (
    ClusterMismatch,
    Committed,
    Election,
    LearnerDropped,
    LeaseAcquired,
    MembersChanged,
    Role,
    RoleChanged,
    SteppedDown,
    VoteRefused,
)
from tests.simnet import FailStop, FixedTimeout, Sim, propose_next

DATA = Path(__file__).parent / "testdata"

#: Scenarios that expose a known bug in the election core: file stem -> reason.
XFAIL: dict[str, str] = {}


class ScenarioError(AssertionError):
    pass


class Failed(Exception):
    """An expectation or a command went wrong; the interpreter adds file and line."""


# -- values ---------------------------------------------------------------------------


def version(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", text)
    if not m:
        raise Failed(f"bad version {text!r}: write term.seq, e.g. 2.3")
    return int(m[1]), int(m[2])


def value(key: str, text: str) -> Any:
    if text == "none":
        return None
    if key in ("version", "payload_version"):
        return version(text)
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"\d+", text):
        return int(text)
    return text


def keyvals(args: list[str]) -> dict[str, Any]:
    out = {}
    for a in args:
        if "=" not in a:
            raise Failed(f"expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        out[k.replace("-", "_")] = value(k, v)
    return out


EVENT_FIELDS = {"leader": "leader_id"}


def event_kind(ev: Any) -> str:
    if isinstance(ev, RoleChanged):
        return ev.role.value.replace("_", "-")
    return {LeaseAcquired: "lease", SteppedDown: "stepped-down", Committed: "committed",
            VoteRefused: "refused", FailStop: "fail-stop", MembersChanged: "members",
            LearnerDropped: "learner-dropped", ClusterMismatch: "mismatch"}[type(ev)]


def matches(obj: Any, want: dict[str, Any]) -> bool:
    for k, v in want.items():
        k = EVENT_FIELDS.get(k, k) if not hasattr(obj, k) else k
        if not hasattr(obj, k):
            raise Failed(f"{type(obj).__name__} has no field {k!r}")
        got = getattr(obj, k)
        if isinstance(got, Role):
            got = got.value.replace("_", "-")
        elif isinstance(got, tuple) and got and isinstance(got[0], str):
            got = ",".join(got)  # members
        if got != v:
            return False
    return True


def fmt(v: Any) -> str:
    if isinstance(v, tuple) and v and isinstance(v[0], str):
        return ",".join(v)  # members
    if isinstance(v, tuple):
        return f"{v[0]}.{v[1]}"
    if v is None or isinstance(v, bool):
        return str(v).lower()
    return str(v) if v != "" else '""'


def show(obj: Any) -> str:
    """One event or message, written the way a transcript would match it."""
    if isinstance(obj, (RoleChanged, LeaseAcquired, SteppedDown, Committed, VoteRefused, FailStop, MembersChanged,
                        LearnerDropped, ClusterMismatch)):
        detail = {("leader" if k == "leader_id" else k): v for k, v in vars(obj).items()
                  if k not in ("role", "lease_until")}
        return f"{event_kind(obj)} " + " ".join(f"{k}={fmt(v)}" for k, v in detail.items())
    return f"{type(obj).__name__} " + " ".join(f"{f.name}={fmt(getattr(obj, f.name))}" for f in fields(obj))


# -- the interpreter ----------------------------------------------------------------------


class Scenario:
    def __init__(self) -> None:
        self.sim: Sim | None = None
        self.sent: list[tuple[float, str, str, Any]] = []  # every message a node emitted
        self.holds: list[tuple[set[str], set[str], str | None, dict]] = []
        self.held: list[tuple[str, str, Any]] = []
        self.event_cursor: dict[str, int] = {}
        self.sent_cursor: dict[tuple[str, str], int] = {}
        self.transfer_target: str | None = None

    # helpers

    @property
    def s(self) -> Sim:
        if self.sim is None:
            raise Failed("no cluster yet: start with 'cluster n1 n2 n3'")
        return self.sim

    def node(self, name: str) -> str:
        if name not in self.s.ids:
            raise Failed(f"unknown node {name!r} (cluster: {' '.join(self.s.ids)})")
        return name

    def nodes(self, names: list[str]) -> set[str]:
        return set(self.s.ids) if names == ["*"] else {self.node(n) for n in names}

    def live(self, name: str) -> Election:
        n = self.s.nodes[self.node(name)]
        if n.core is None:
            raise Failed(f"{name} is down")
        return n.core

    def arrow(self, args: list[str]) -> tuple[list[str], list[str], list[str]]:
        """Split 'a b -> c d rest...' into sources, destinations and the rest."""
        if "->" not in args:
            raise Failed("expected 'SRC... -> DST...'")
        i = args.index("->")
        dst = []
        rest = args[i + 1:]
        while rest and (rest[0] in self.s.ids or rest[0] == "*"):
            dst.append(rest.pop(0))
        if not args[:i] or not dst:
            raise Failed("expected 'SRC... -> DST...'")
        return args[:i], dst, rest

    def message_filter(self, args: list[str]) -> tuple[str | None, dict]:
        if args and "=" not in args[0]:
            if args[0] not in messages.MESSAGE_TYPES:
                raise Failed(f"unknown message type {args[0]!r} (one of {', '.join(messages.MESSAGE_TYPES)})")
            return args[0], keyvals(args[1:])
        return None, keyvals(args)

    def _send(self, src: str, dst: str, msg: Any) -> None:
        self.sent.append((self.s.t, src, dst, msg))
        for srcs, dsts, kind, want in self.holds:
            if src in srcs and dst in dsts and kind in (None, type(msg).__name__) and matches(msg, want):
                self.held.append((src, dst, msg))
                return
        self.raw_send(src, dst, msg)

    def expect_failure(self, fn, args: list[str]) -> Any:
        """Run fn; with a trailing 'fails TEXT', it must raise an error mentioning TEXT."""
        if "fails" not in args:
            return fn()
        text = " ".join(args[args.index("fails") + 1:])
        try:
            fn()
        except Exception as e:  # we compare the text
            got = f"{type(e).__name__}: {e}"
            if text.lower() not in got.lower():
                raise Failed(f"failed with {got!r}, which does not mention {text!r}") from e
            return None
        raise Failed(f"expected a failure mentioning {text!r}, but it succeeded")

    def status(self) -> str:
        s = self.s
        rows = [f"t={s.t:.4f}"]
        for i in s.ids:
            n = s.nodes[i]
            if n.core is None:
                rows.append(f"  {i}: down (disk: term={n.disk.term} voted={n.disk.voted_for})")
                continue
            c = n.core
            rows.append(f"  {i}: {c.role.value} term={c.term} leader={c.leader_id} voted={c.voted_for} "
                        f"lease={s.is_leader(i)} version={c.version[0]}.{c.version[1]} payload={c.payload!r} "
                        f"members={','.join(c.members) or 'none'}"
                        + (" (paused)" if s.t < n.paused_until else ""))
        rows.append("  last events:")
        rows += [f"    {t:.4f} {node} {show(ev)}" for t, node, ev in s.events[-8:]]
        return "\n".join(rows)

    # commands

    def cmd_cluster(self, args: list[str]) -> None:
        self.__init__()  # a second 'cluster' line starts a new story
        ids = [a for a in args if "=" not in a]
        opts = dict(a.split("=", 1) for a in args if "=" in a)
        kw: dict[str, Any] = {}
        for k, v in opts.items():
            if k == "timeout":
                lo, hi = v.split("-")
                kw["election_timeout"] = (float(lo), float(hi))
            elif k == "heartbeat":
                kw["heartbeat_interval"] = float(v)
            elif k == "drift":
                kw["max_clock_drift"] = float(v)
            elif k == "seed":
                kw["seed"] = int(v)
            else:
                raise Failed(f"unknown cluster option {k!r}")
        self.sim = Sim(ids, **kw)
        self.raw_send = self.sim._send
        self.sim._send = self._send  # log and hold messages

    def _before_start(self, what: str) -> None:
        if self.s.t > 0:
            raise Failed(f"'{what}' must come before the first 'run'")

    def cmd_timeouts(self, args: list[str]) -> None:
        for node, v in keyvals(args).items():
            n = self.s.nodes[self.node(node)]
            n.rng = FixedTimeout(float(v))
            if n.core is not None and self.s.t == 0:
                self.s.restart(node)  # as if it had started with this timeout
            elif n.core is not None:
                n.core.rng = n.rng  # from its next timer on

    def cmd_rates(self, args: list[str]) -> None:
        self._before_start("rates")
        for node, v in keyvals(args).items():
            self.s.nodes[self.node(node)].rate = float(v)
            self.s.restart(node)

    def cmd_run(self, args: list[str]) -> None:
        if args[:1] == ["until"]:
            self.s.run_until(float(args[1]))
        else:
            self.s.run_for(float(args[0]))

    def cmd_crash(self, args: list[str]) -> None:
        """``crash n1 [n2...] [seen]``: ``seen`` - the others are told the process is gone
        (its connections closed, a new one refused), a network delay later."""
        seen = args[-1:] == ["seen"]
        for a in args[:-1] if seen else args:
            self.live(a)
            self.s.crash(a, visible=seen)

    def cmd_restart(self, args: list[str]) -> None:
        for a in args:
            self.s.fix_disk(self.node(a))
            self.s.restart(a)

    def cmd_pause(self, args: list[str]) -> None:
        self.live(args[0])
        self.s.pause(args[0], float(args[1]))

    def cmd_partition(self, args: list[str]) -> None:
        groups = [g.split() for g in " ".join(args).split("|")]
        for g in groups:
            self.nodes(g)
        self.s.partition(*groups)

    def cmd_block(self, args: list[str]) -> None:
        srcs, dsts, rest = self.arrow(args)
        if rest:
            raise Failed(f"unexpected {' '.join(rest)!r}")
        for a in self.nodes(srcs):
            for b in self.nodes(dsts):
                if a != b:
                    self.s.block(a, b)

    def cmd_cut(self, args: list[str]) -> None:
        a, b = self.node(args[0]), self.node(args[1])
        self.s.block(a, b)
        self.s.block(b, a)

    def cmd_hold(self, args: list[str]) -> None:
        srcs, dsts, rest = self.arrow(args)
        self.holds.append((self.nodes(srcs), self.nodes(dsts), *self.message_filter(rest)))

    def cmd_release(self, args: list[str]) -> None:
        if args:
            srcs, dsts, rest = self.arrow(args)
            srcs, dsts = self.nodes(srcs), self.nodes(dsts)
            kind, want = self.message_filter(rest)
        else:
            srcs = dsts = set(self.s.ids)
            kind, want = None, {}
            self.holds.clear()
        keep = []
        for src, dst, msg in self.held:
            if src in srcs and dst in dsts and kind in (None, type(msg).__name__) and matches(msg, want):
                self.raw_send(src, dst, msg)
            else:
                keep.append((src, dst, msg))
        self.held = keep

    def cmd_heal(self, args: list[str]) -> None:
        self.s.heal()
        self.cmd_release([])

    def cmd_deliver(self, args: list[str]) -> None:
        (src,), (dst,), rest = self.arrow(args)
        kind, kw = self.message_filter(rest)
        if kind is None:
            raise Failed("deliver needs a message type")
        cls = messages.MESSAGE_TYPES[kind]
        sender = next(f.name for f in fields(cls) if f.name in ("candidate", "voter", "leader", "follower"))
        kw.setdefault(sender, self.node(src))
        if "members" in kw and isinstance(kw["members"], str):
            kw["members"] = tuple(kw["members"].split(","))
        receiver = self.s.nodes[self.node(dst)].core
        kw.setdefault("cluster", receiver.cluster if receiver is not None else "")  # same cluster unless given
        try:
            msg = cls(**kw)
        except TypeError as e:
            raise Failed(f"cannot build {kind}: {e}") from e
        self.s._push(self.s.t + 0.001, "deliver", (self.node(dst), msg))  # whatever the network

    def cmd_campaign(self, args: list[str]) -> None:
        self.live(args[0])
        self.s.force_timeout(args[0])

    def cmd_disk_fail(self, args: list[str]) -> None:
        self.live(args[0])
        self.s.fail_disk(args[0], after=int(keyvals(args[1:]).get("after", 0)))

    def cmd_retire(self, args: list[str]) -> None:
        self.live(args[0])
        self.s.call(args[0], lambda c, now: c.retire(now))

    def cmd_propose(self, args: list[str]) -> None:
        self.live(args[0])
        self.expect_failure(lambda: self.s.call(args[0], propose_next), args[1:])

    def cmd_transfer(self, args: list[str]) -> None:
        self.live(args[0])
        target = self.node(args[2]) if args[1:2] == ["to"] else None

        def go() -> None:
            self.transfer_target, _ = self.s.call(args[0], lambda c, now: c.transfer_leadership(now, target))
        self.expect_failure(go, args[1:])

    def cmd_join(self, args: list[str]) -> None:
        for a in args:
            if a in self.s.nodes:
                raise Failed(f"{a} exists")
            self.s.add_node(a, join=True)

    def cmd_add(self, args: list[str]) -> None:
        self.live(args[0])
        node = args[1]
        self.expect_failure(lambda: self.s.call(args[0], lambda c, now: c.add_member(node, now)), args[2:])

    def cmd_remove(self, args: list[str]) -> None:
        self.live(args[0])
        node = args[1]
        self.expect_failure(lambda: self.s.call(args[0], lambda c, now: c.remove_member(node, now)), args[2:])

    def cmd_static(self, args: list[str]) -> None:
        if args[0] not in self.s.nodes:
            self.s.add_node(args[0], join=False, static=args[1:])  # a new node with its own list
        else:
            self.s.set_static(args[0], args[1:])

    def cmd_broker(self, args: list[str]) -> None:
        *names, state = args
        if state not in ("down", "up"):
            raise Failed("expected 'broker NODE... down|up'")
        for name in names:
            self.live(name)
            self.s.call(name, lambda c, now: c.set_broker_health(state == "up", now))

    def cmd_set_term(self, args: list[str]) -> None:
        self.s.set_hard_state(self.node(args[0]), term=int(args[1]))

    def cmd_set_state(self, args: list[str]) -> None:
        self.s.set_hard_state(self.node(args[0]), **keyvals(args[1:]))

    def cmd_status(self, args: list[str]) -> None:
        print(self.status())

    # expectations

    def cmd_expect(self, args: list[str]) -> None:
        what, rest = args[0], args[1:]
        handler = getattr(self, "expect_" + what.replace("-", "_"), None)
        if handler is not None:
            return handler(rest)
        if what in self.s.ids:
            return self.expect_node(what, rest)
        raise Failed(f"unknown expectation {what!r}")

    def expect_node(self, name: str, args: list[str]) -> None:
        n = self.s.nodes[name]
        if args == ["down"]:
            if n.core is not None:
                raise Failed(f"{name} is up")
            return
        c = self.live(name)
        problems = []
        for a in args:
            if a in ("lease", "no-lease"):
                if self.s.is_leader(name) != (a == "lease"):
                    problems.append(f"is_leader() is {self.s.is_leader(name)}")
            elif "=" not in a:
                try:
                    role = Role(a.replace("-", "_"))
                except ValueError:
                    raise Failed(f"unknown role {a!r}") from None
                if c.role is not role:
                    problems.append(f"role is {c.role.value}")
            else:
                (k, v), = keyvals([a]).items()
                got = {"term": c.term, "leader": c.leader_id, "voted": c.voted_for}.get(k, KeyError)
                if got is KeyError:
                    raise Failed(f"unknown node field {k!r} (term, leader, voted)")
                if got != v:
                    problems.append(f"{k} is {got}")
        if problems:
            raise Failed(f"{name}: " + ", ".join(problems))

    def expect_leaders(self, args: list[str]) -> None:
        want = [] if args == ["none"] else sorted(self.nodes(args))
        got = sorted(self.s.lease_holders())
        if got != want:
            raise Failed(f"nodes with is_leader() true: {got or 'none'}, expected {want or 'none'}")

    def expect_no_leader(self, args: list[str]) -> None:
        self.expect_leaders(["none"])

    def expect_one_leader(self, args: list[str]) -> None:
        if len(self.s.lease_holders()) != 1:
            raise Failed(f"nodes with is_leader() true: {self.s.lease_holders() or 'none'}, expected exactly one")

    def expect_voted(self, args: list[str]) -> None:
        disk = self.s.nodes[self.node(args[0])].disk
        want = keyvals(args[1:])
        got = {"term": disk.term, "for": disk.voted_for}
        for k, v in want.items():
            if k not in got:
                raise Failed(f"unknown field {k!r} (term, for)")
            if got[k] != v:
                raise Failed(f"{args[0]} persisted term={disk.term} voted_for={disk.voted_for}")

    def _consume(self, items: list, cursor: dict, key: Any, belongs, kind_of, args: list[str], what: str):
        none = args[:1] == ["none"]
        if none:
            args = args[1:]
        kind, want = args[0], keyvals(args[1:])
        start = cursor.get(key, 0)
        for i in range(start, len(items)):
            obj = belongs(items[i])
            if obj is not None and kind_of(obj) == kind and matches(obj, want):
                if none:
                    raise Failed(f"unexpected {what} at t={items[i][0]:.4f}: {show(obj)}")
                cursor[key] = i + 1
                return
        if none:
            cursor[key] = len(items)
            return
        seen = [f"{items[i][0]:.4f} {show(o)}" for i in range(start, len(items)) if (o := belongs(items[i]))]
        raise Failed(f"no {what} {' '.join(args)} since the last match; saw:\n    "
                     + ("\n    ".join(seen[-12:]) or "nothing"))

    def expect_event(self, args: list[str]) -> None:
        node = self.node(args[0])
        self._consume(self.s.events, self.event_cursor, node, lambda e: e[2] if e[1] == node else None,
                      event_kind, args[1:], f"event of {node}")

    def expect_sent(self, args: list[str]) -> None:
        (src,), (dst,), rest = self.arrow(args)
        self.nodes([src, dst])
        self._consume(self.sent, self.sent_cursor, (src, dst),
                      lambda m: m[3] if (m[1], m[2]) == (src, dst) else None,
                      lambda m: type(m).__name__, rest, f"message {src} -> {dst}")

    def expect_committed(self, args: list[str]) -> None:
        node, op, want = self.node(args[0]), args[1], version(args[2])
        if op not in (">=", "="):
            raise Failed(f"expected '>=' or '=', got {op!r}")
        got = max((e.version for _, n, e in self.s.events if n == node and isinstance(e, Committed)), default=(0, 0))
        if not (got >= want if op == ">=" else got == want):
            raise Failed(f"{node} committed {got[0]}.{got[1]}, expected {op} {args[2]}")

    def _held(self, node: str) -> tuple[tuple[int, int], str]:
        n = self.s.nodes[node]
        return (n.core.version, n.core.payload) if n.core else (tuple(n.disk.payload_version), n.disk.payload)

    def expect_payload(self, args: list[str]) -> None:
        self._expect_held(args, 1, str)

    def expect_version(self, args: list[str]) -> None:
        self._expect_held(args, 0, version)

    def _expect_held(self, args: list[str], which: int, parse) -> None:
        if "=" not in args:
            raise Failed("expected 'NODE... = VALUE'")
        i = args.index("=")
        want = parse(" ".join(args[i + 1:]))
        bad = {n: self._held(n)[which] for n in self.nodes(args[:i]) if self._held(n)[which] != want}
        if bad:
            raise Failed(f"expected {want!r}, but " + ", ".join(f"{n} holds {v!r}" for n, v in sorted(bad.items())))

    def expect_handover(self, args: list[str]) -> None:
        (old,), (new,), _ = self.arrow(args)
        downs = [e for _, n, e in self.s.events if n == old and isinstance(e, SteppedDown)]
        elected = [t for t, n, e in self.s.events if n == new and isinstance(e, RoleChanged) and e.role is Role.LEADER]
        if not downs or not elected:
            raise Failed(f"need a stepped-down event of {old} and a leader event of {new}")
        lease_end = self.s.nodes[old].real(downs[-1].lease_until)  # its clock -> real time
        if elected[-1] < lease_end:
            raise Failed(f"{new} was elected at t={elected[-1]:.4f}, before {old}'s lease ended at t={lease_end:.4f}")
        print(f"{old}'s lease ended at t={lease_end:.4f}; {new} elected at t={elected[-1]:.4f}")

    def expect_members(self, args: list[str]) -> None:
        if "=" not in args:
            raise Failed("expected 'NODE... = MEMBER...'")
        i = args.index("=")
        want = tuple(m for a in args[i + 1:] for m in a.split(",") if m)
        got = {}
        for name in self.nodes(args[:i]):
            n = self.s.nodes[name]
            got[name] = n.core.members if n.core is not None else n.disk.members
        bad = {k: v for k, v in got.items() if v != want}
        if bad:
            raise Failed(f"expected members {','.join(want)}, but "
                         + ", ".join(f"{k} holds {','.join(v) or 'none'}" for k, v in sorted(bad.items())))

    def expect_transfer_target(self, args: list[str]) -> None:
        if self.transfer_target != args[0]:
            raise Failed(f"the transfer went to {self.transfer_target}, expected {args[0]}")

    # running a file

    def run_file(self, path: Path) -> None:
        for lineno, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            cmd, *args = line.split()
            handler = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
            try:
                if handler is None:
                    raise Failed(f"unknown command {cmd!r}")
                handler(args)
            except Exception as e:  # every failure gets the file and line
                state = f"\n{self.status()}" if self.sim is not None else ""
                raise ScenarioError(f"{path.name}:{lineno}: {raw.strip()}\n  {type(e).__name__}: {e}{state}") from e


def scenario_params() -> list:
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[p.stem])]
                         if p.stem in XFAIL else []) for p in sorted(DATA.glob("*.txt"))]


@pytest.mark.parametrize("path", scenario_params())
def test_scenario(path: Path) -> None:
    Scenario().run_file(path)


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("cluster n1 n2 n3\n\n# comment\nfrobnicate n1\n")
    with pytest.raises(ScenarioError, match=r"(?s)bad\.txt:4: frobnicate n1\n.*unknown command 'frobnicate'"):
        Scenario().run_file(bad)
    bad.write_text("cluster n1 n2 n3\ntimeouts n1=1.0\nrun 1.2\nexpect n2 leader term=1\n")
    with pytest.raises(ScenarioError, match=r"(?s)bad\.txt:4: .*n2: role is follower"):
        Scenario().run_file(bad)
