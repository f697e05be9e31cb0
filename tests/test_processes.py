"""Real processes on loopback: ``celery-cluster node`` subprocesses, killed, paused and restarted.

Every node listens on 127.0.0.1 only, logs JSON transitions to its own file and is
observed through ``GET /cluster/status``. Synchronisation is always "poll with a
deadline"; the only pauses are short gaps between polling sweeps.

Leadership overlap is judged from the JSON logs, not from polling (a sweep is not an
instant): every ``leader`` event opens an interval at its ``mono`` and the matching
``stepped_down`` closes it at its ``lease_until`` (or the process's death closes it).
All processes share one machine, so ``lease_clock()`` (CLOCK_BOOTTIME) is one clock for all of them.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from celery_cluster.auth import Signer
from celery_cluster.clock import lease_clock
from celery_cluster.messages import AppendEntries, VoteRequest, encode
from celery_cluster.state_file import StateFile
from tests.support import HOST, die_with_parent, free_ports

pytestmark = [pytest.mark.processes, pytest.mark.timeout(60)]

MIN_TIMEOUT, MAX_TIMEOUT = 0.5, 1.0
HEARTBEAT = 0.05
STARTUP_DEADLINE = 15.0  # interpreter start + imports, several at once on 2 cores
POLL_GAP = 0.01  # between sweeps: keeps the poller from starving the nodes of CPU

Status = dict[str, Any]
Sweep = dict[str, Status]


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("celery-cluster")
    return [str(script)] if script.exists() else [sys.executable, "-m", "celery_cluster"]


def _child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_CLUSTER_SECRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_STATE_HOME"] = str(tmp / "xdg")  # never touch the real ~/.local/state
    return env


def http_request(addr: str, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclasses.dataclass
class Run:
    """One incarnation of a node process."""

    proc: subprocess.Popen[bytes]
    log: Path
    err: Path
    ended_at: float | None = None  # monotonic, taken after the process was reaped


@dataclasses.dataclass
class Member:
    addr: str
    state_dir: Path
    args: list[str]
    runs: list[Run] = dataclasses.field(default_factory=list)
    stopped: bool = False  # SIGSTOPped by the test

    @property
    def run(self) -> Run:
        return self.runs[-1]

    @property
    def alive(self) -> bool:
        return bool(self.runs) and self.run.proc.poll() is None

    @property
    def answering(self) -> bool:
        return self.alive and not self.stopped

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        """(run index, JSON transition) for every run, in order."""
        out = []
        for i, run in enumerate(self.runs):
            for line in run.log.read_text(errors="replace").splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "event" in obj:
                    out.append((i, obj))
        return out


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = _child_env(tmp)
        self.members: list[Member] = []
        self.others: list[subprocess.Popen[bytes]] = []

    # -- processes ---------------------------------------------------------------

    def start_cluster(self, n: int, extra: Sequence[str] = ()) -> tuple[list[Member], float]:
        """Start ``n`` nodes; return them and the monotonic time at which all answered."""
        for _attempt in range(3):
            ports = free_ports(n)
            addrs = [f"{HOST}:{p}" for p in ports]
            group = []
            for addr in addrs:
                sdir = self.tmp / addr.replace(":", "_")
                args = ["node", "--listen", addr, "--nodes", ",".join(addrs), "--state-dir", str(sdir),
                        "--election-timeout", f"{MIN_TIMEOUT}-{MAX_TIMEOUT}",
                        "--heartbeat-interval", str(HEARTBEAT), "--log-format", "json", *extra]
                group.append(Member(addr, sdir, args))
            self.members.extend(group)
            for m in group:
                self.spawn(m)
            try:
                return group, self.wait_up(group)
            except _PortTaken:
                for m in group:
                    self.kill(m)
        pytest.fail("could not find free loopback ports for the cluster")

    def spawn(self, m: Member) -> None:
        i = len(m.runs)
        name = m.addr.replace(":", "_")
        log, err = self.tmp / f"{name}.{i}.log", self.tmp / f"{name}.{i}.err"
        with open(log, "wb") as out, open(err, "wb") as errf:
            proc = subprocess.Popen([*_cli(), *m.args], stdin=subprocess.DEVNULL, stdout=out, stderr=errf,
                                    env=self.env, preexec_fn=die_with_parent)
        m.runs.append(Run(proc, log, err))
        m.stopped = False

    def wait_up(self, group: Sequence[Member]) -> float:
        deadline = lease_clock() + STARTUP_DEADLINE
        pending = list(group)
        while pending:
            for m in list(pending):
                if not m.alive:
                    err = m.run.err.read_text(errors="replace")
                    if "in use" in err:
                        raise _PortTaken(err)
                    pytest.fail(f"{m.addr} exited with {m.run.proc.returncode} at startup: {err}")
                if status(m.addr) is not None:
                    pending.remove(m)
            if pending:
                assert lease_clock() < deadline, f"nodes never answered: {[m.addr for m in pending]}"
                time.sleep(POLL_GAP)
        return lease_clock()

    def signal(self, m: Member, sig: int) -> None:
        m.run.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            m.stopped = True
        elif sig == signal.SIGCONT:
            m.stopped = False

    def kill(self, m: Member) -> float:
        """SIGKILL (after SIGCONT) and reap; returns the monotonic time after the process was gone."""
        run = m.run
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGCONT)
            run.proc.kill()
        run.proc.wait(10)
        if run.ended_at is None:
            run.ended_at = lease_clock()
        m.stopped = False
        return run.ended_at

    def wait_exit(self, m: Member, timeout: float) -> int | None:
        try:
            rc = m.run.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        m.run.ended_at = lease_clock()
        return rc

    def close(self) -> None:
        for m in self.members:
            for run in m.runs:
                if run.proc.poll() is None:
                    run.proc.send_signal(signal.SIGCONT)
                    run.proc.kill()
                run.proc.wait(10)
        for p in self.others:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)
        # Shown by pytest only when the test failed.
        for m in self.members:
            for i, run in enumerate(m.runs):
                print(f"==== {m.addr} run {i} (rc={run.proc.returncode})")
                print("\n".join(run.log.read_text(errors="replace").splitlines()[-40:]))
                err = run.err.read_text(errors="replace").strip()
                if err:
                    print("---- stderr\n" + err[-3000:])

    # -- observing ---------------------------------------------------------------

    def sweep(self, group: Sequence[Member]) -> Sweep:
        """Status of every answering member of ``group``; never two lease holders in one sweep."""
        replies = {}
        for m in group:
            if m.answering:
                s = status(m.addr)
                if s is not None:
                    replies[m.addr] = s
        leaders = sorted(a for a, s in replies.items() if s["is_leader"])
        assert len(leaders) <= 1, f"two nodes report is_leader in one sweep: {leaders}: {replies}"
        return replies

    def wait_for(self, group: Sequence[Member], cond: Callable[[Sweep], Any], deadline: float, what: str) -> Any:
        last: Sweep = {}
        while True:
            last = self.sweep(group)
            result = cond(last)
            if result:
                return result
            if lease_clock() > deadline:
                brief = {a: (s["state"], s["term"], s["is_leader"], s["leader_address"]) for a, s in last.items()}
                pytest.fail(f"timed out waiting for {what}; last sweep: {brief}")
            time.sleep(POLL_GAP)

    def hold(self, group: Sequence[Member], cond: Callable[[Sweep], Any], seconds: float, what: str) -> None:
        """Keep sweeping for ``seconds``; ``cond`` must hold in every sweep."""
        until = lease_clock() + seconds
        while lease_clock() < until:
            sw = self.sweep(group)
            assert cond(sw), f"{what} stopped holding: {sw}"
            time.sleep(POLL_GAP)

    def leadership_intervals(self) -> list[tuple[str, int, float, float]]:
        """(node, term, start, end) of every lease, from the JSON logs of every run."""
        intervals = []
        for m in self.members:
            open_: dict[tuple[int, int], float] = {}
            for run_i, ev in m.events():
                key = (run_i, ev["term"])
                if ev["event"] == "leader":
                    assert key not in open_, f"{m.addr} logged 'leader' twice for term {ev['term']}"
                    open_[key] = ev["mono"]
                elif ev["event"] == "stepped_down" and key in open_:
                    start = open_.pop(key)
                    end = ev.get("lease_until")
                    end = start if end is None else end
                    intervals.append((m.addr, ev["term"], start, end))
            for (run_i, term), start in open_.items():
                ended = m.runs[run_i].ended_at
                intervals.append((m.addr, term, start, math.inf if ended is None else ended))
        return intervals

    def assert_no_overlap(self) -> list[tuple[str, int, float, float]]:
        ivs = self.leadership_intervals()
        terms: dict[int, str] = {}
        for node, term, _, _ in ivs:
            assert terms.setdefault(term, node) == node, f"two leaders in term {term}: {terms[term]}, {node}"
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if a[0] != b[0]:
                    assert a[3] <= b[2] or b[3] <= a[2], f"leadership intervals overlap: {a} and {b}"
        return ivs


class _PortTaken(Exception):
    pass


def status(addr: str, timeout: float = 0.5) -> Status | None:
    try:
        code, body = http_request(addr, "GET", "/cluster/status", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None
    return json.loads(body) if code == 200 else None


def one_leader(group: Sequence[Member], exclude: Sequence[str] = ()) -> Callable[[Sweep], tuple[str, int] | None]:
    """Every answering member of ``group`` replied, exactly one holds a lease and all agree on it."""

    def cond(sw: Sweep) -> tuple[str, int] | None:
        expected = {m.addr for m in group if m.answering}
        if set(sw) != expected:
            return None
        leaders = [a for a, s in sw.items() if s["is_leader"]]
        if len(leaders) != 1 or leaders[0] in exclude:
            return None
        leader, term = leaders[0], sw[leaders[0]]["term"]
        if all(s["leader_address"] == leader and s["term"] == term for s in sw.values()):
            return leader, term
        return None

    return cond


def by_addr(group: Sequence[Member], addr: str) -> Member:
    return next(m for m in group if m.addr == addr)


def stepped_down(m: Member, term: int) -> dict[str, Any] | None:
    evs = [ev for _, ev in m.events() if ev["event"] == "stepped_down" and ev["term"] == term]
    return evs[-1] if evs else None


@pytest.fixture
def harness(tmp_path: Path):
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


# -- 1. election -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5])
def test_exactly_one_leader_and_agreement(harness: Harness, n: int) -> None:
    group, up = harness.start_cluster(n)
    leader, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT,
                                    f"one agreed leader within {2 * MAX_TIMEOUT} s of all {n} nodes up")
    assert term >= 1
    # Stays put while nothing happens.
    harness.hold(group, lambda sw: one_leader(group)(sw) == (leader, term), 0.3, "a stable leader")
    ivs = harness.assert_no_overlap()
    assert [iv[0] for iv in ivs] == [leader]


# -- 2. crash of the leader ----------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5])
def test_kill_leader_new_leader_without_overlap(harness: Harness, n: int) -> None:
    group, up = harness.start_cluster(n)
    old, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT, "first leader")
    killed_at = harness.kill(by_addr(group, old))
    bound = 2 * MAX_TIMEOUT + 0.5
    new, new_term = harness.wait_for(group, one_leader(group), killed_at + bound,
                                     f"a new leader within {bound} s of kill -9")
    assert new != old and new_term > term
    ivs = harness.assert_no_overlap()
    new_iv = next(iv for iv in ivs if iv[0] == new and iv[1] == new_term)
    assert new_iv[2] >= killed_at


def test_a_crash_the_followers_see_is_followed_by_an_election_at_the_minimum_timeout(harness: Harness) -> None:
    """kill -9 closes the leader's connections and nothing listens at its address any more:
    a follower sees that (the connection its heartbeats came on closed, a new one refused)
    and campaigns at its last contact + the minimum timeout, not after a timeout drawn up to
    the maximum (6 s here: without the hint a failover would often take 2-6 s)."""
    group, up = harness.start_cluster(3, ["--election-timeout", "1.0-6.0"])
    old, term = harness.wait_for(group, one_leader(group), up + 13.0, "first leader")
    killed_at = harness.kill(by_addr(group, old))
    new, new_term = harness.wait_for(group, one_leader(group), killed_at + 2.5,
                                     "a new leader within 2.5 s of kill -9 (timeouts 1.0-6.0 s)")
    assert new != old and new_term > term
    survivors = [m for m in group if m.addr != old]
    seen = [m.addr for m in survivors
            if any(f"leader {old} is gone" in r.log.read_text(errors="replace") + r.err.read_text(errors="replace")
                   for r in m.runs)]
    assert seen, "no survivor logged that it saw the leader gone"
    harness.assert_no_overlap()


# -- 3. pause of the leader (GC, VM migration) -----------------------------------------


def test_paused_leader_resumes_without_claiming_leadership(harness: Harness) -> None:
    group, up = harness.start_cluster(3)
    old, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT, "first leader")
    old_m = by_addr(group, old)
    harness.signal(old_m, signal.SIGSTOP)
    stopped_at = lease_clock()
    # A status request queued while the process is frozen: the very first thing it may answer.
    host, port = old.rsplit(":", 1)
    queued = http.client.HTTPConnection(host, int(port), timeout=5)
    queued.request("GET", "/cluster/status")

    new, new_term = harness.wait_for(group, one_leader(group), stopped_at + 2 * MAX_TIMEOUT + 1.0,
                                     "a new leader while the old one is paused")
    assert new != old and new_term > term
    # Stay paused longer than the maximum election timeout, watching the new leader meanwhile.
    harness.hold(group, lambda sw: new in sw and sw[new]["is_leader"],
                 max(0.0, stopped_at + 1.2 * MAX_TIMEOUT - lease_clock()), "the new leader")

    harness.signal(old_m, signal.SIGCONT)
    right_after = status(old, timeout=5)
    first = json.loads(queued.getresponse().read())
    queued.close()
    assert first["is_leader"] is False, f"resumed leader's first status reply claims leadership: {first}"
    assert right_after is not None and right_after["is_leader"] is False, right_after

    def old_follows(sw: Sweep) -> bool:
        s = sw.get(old)
        return bool(s) and s["state"] == "follower" and s["leader_address"] == new and not s["is_leader"] \
            and stepped_down(old_m, term) is not None

    harness.wait_for(group, old_follows, lease_clock() + 2 * MAX_TIMEOUT, "the old leader to follow")
    down = stepped_down(old_m, term)
    assert down is not None and down["reason"] in ("lease_expired", "lost_quorum", "higher_term"), down
    new_lease = next(ev for _, ev in by_addr(group, new).events()
                     if ev["event"] == "leader" and ev["term"] == new_term)
    assert new_lease["mono"] >= down["lease_until"], (new_lease, down)
    harness.assert_no_overlap()


# -- 4. a follower rejoining with a higher term ----------------------------------------


def test_rejoining_follower_with_higher_term_does_not_depose_leader(harness: Harness) -> None:
    group, up = harness.start_cluster(3)
    leader, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT, "first leader")
    f = next(m for m in group if m.addr != leader)
    harness.signal(f, signal.SIGTERM)
    assert harness.wait_exit(f, 5) == 0

    store = StateFile(f.state_dir, f.addr)
    saved = store.load()
    assert saved is not None and saved.term == term
    store.save(dataclasses.replace(saved, term=term + 5, voted_for=None))
    assert StateFile(f.state_dir, f.addr).load().term == term + 5  # checksum recomputed: it loads

    harness.spawn(f)
    harness.wait_up([f])

    def rejoined(sw: Sweep) -> tuple[str, int] | None:
        got = one_leader(group)(sw)
        return got if got and got[0] == leader and got[1] >= term + 5 else None

    _, new_term = harness.wait_for(group, rejoined, lease_clock() + 2 * MAX_TIMEOUT + 1.0,
                                   "the same leader, followed by the rejoined node")
    harness.hold(group, lambda sw: one_leader(group)(sw) == (leader, new_term), MAX_TIMEOUT,
                 "the leader after the rejoin")
    ivs = harness.assert_no_overlap()
    assert {iv[0] for iv in ivs} == {leader}, f"another node led: {ivs}"


# -- 5. leadership transfer -------------------------------------------------------------


def test_stepdown_hands_over(harness: Harness) -> None:
    group, up = harness.start_cluster(3)
    old, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT, "first leader")
    t0 = lease_clock()
    code, body = http_request(old, "POST", "/cluster/stepdown", body=b"")
    assert code == 200, body
    target = json.loads(body)["transferred_to"]
    new, new_term = harness.wait_for(group, one_leader(group, exclude=[old]), t0 + 0.5,
                                     "a new leader within 0.5 s of stepdown")
    assert new == target and new_term > term
    lease = next(ev for _, ev in by_addr(group, new).events() if ev["event"] == "leader" and ev["term"] == new_term)
    assert lease["mono"] - t0 < 0.5, f"new lease began {lease['mono'] - t0:.3f} s after stepdown"
    down = stepped_down(by_addr(group, old), term)
    assert down is not None and down["reason"] == "transfer", down
    harness.assert_no_overlap()


# -- 6. authentication ------------------------------------------------------------------


def test_unsigned_requests_rejected_with_secret(harness: Harness) -> None:
    secret = harness.tmp / "secret"
    secret.write_text("s3cret-for-tests\n")
    secret.chmod(0o600)
    group, up = harness.start_cluster(3, ["--secret-file", str(secret)])
    leader, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT, "a leader with auth on")
    follower = next(m.addr for m in group if m.addr != leader)
    third = next(m.addr for m in group if m.addr not in (leader, follower))
    big = term + 100
    vote = json.dumps(encode(VoteRequest(big, third, (big, 99), prevote=False, transfer=True))).encode()
    append = json.dumps(encode(AppendEntries(big, third, 1, (big, 99), "forged"))).encode()
    forged = Signer(b"not-the-secret")
    for target in (leader, follower):
        for path, body in (("/cluster/requestvote", vote), ("/cluster/appendentries", append)):
            code, _ = http_request(target, "POST", path, body=body)
            assert code == 401, (target, path, code)
            headers = forged.sign("POST", path, third, body)
            code, _ = http_request(target, "POST", path, body=body, headers=headers)
            assert code == 401, ("wrong secret", target, path, code)
    for body in (b"", json.dumps({"to": follower}).encode()):
        code, _ = http_request(leader, "POST", "/cluster/stepdown", body=body)
        assert code == 401, ("stepdown", body, code)

    harness.hold(group, lambda sw: one_leader(group)(sw) == (leader, term), 0.5, "the term and the leader")
    assert stepped_down(by_addr(group, leader), term) is None
    harness.assert_no_overlap()


# -- 7. graceful shutdown of the leader ---------------------------------------------------


def test_sigterm_leader_exits_zero_and_hands_over(harness: Harness) -> None:
    group, up = harness.start_cluster(3)
    old, term = harness.wait_for(group, one_leader(group), up + 2 * MAX_TIMEOUT, "first leader")
    old_m = by_addr(group, old)
    rest = [m for m in group if m is not old_m]
    t0 = lease_clock()
    harness.signal(old_m, signal.SIGTERM)
    # Watch the others while the old leader is still shutting down (it may answer meanwhile).
    new, new_term = harness.wait_for(rest, one_leader(rest), t0 + 1.0, "a new leader right after SIGTERM")
    rc = harness.wait_exit(old_m, max(0.0, t0 + 2.0 - lease_clock()))
    assert rc == 0, f"leader did not exit 0 within 2 s of SIGTERM (rc={rc})"
    assert new != old and new_term > term
    down = stepped_down(old_m, term)
    assert down is not None and down["reason"] == "transfer", down
    # A handover, not a failover: no follower can even time out within the minimum timeout.
    lease = next(ev for _, ev in by_addr(group, new).events() if ev["event"] == "leader" and ev["term"] == new_term)
    assert lease["mono"] - t0 < MIN_TIMEOUT, f"new lease began {lease['mono'] - t0:.3f} s after SIGTERM"
    harness.assert_no_overlap()


# -- 8. bad arguments ---------------------------------------------------------------------


def test_bad_arguments_exit_2_with_one_line(harness: Harness) -> None:
    a, b, c = (f"{HOST}:{p}" for p in free_ports(3))
    common = ["--state-dir", str(harness.tmp / "bad"), "--election-timeout", "0.5-1.0",
              "--heartbeat-interval", "0.05"]
    cases = {
        "this node missing": ["--listen", a, "--nodes", f"{b},{c}"],
        "duplicate": ["--listen", a, "--nodes", f"{a},{b},{b}"],
        "duplicate after normalising": ["--listen", a, "--nodes", f"{a},{b}, {b}"],
        "unparsable node": ["--listen", a, "--nodes", f"{a},{b},not-an-address"],
        "bad port": ["--listen", a, "--nodes", f"{a},{b},{HOST}:99999"],
        "bad ipv4": ["--listen", a, "--nodes", f"{a},{b},127.0.0.1.1:80"],
        "empty entry": ["--listen", a, "--nodes", f"{a},,{b}"],
        "unparsable listen": ["--listen", "nonsense", "--nodes", f"{a},{b},{c}"],
        "missing --nodes": ["--listen", a],
    }
    procs = {}
    for name, args in cases.items():
        p = subprocess.Popen([*_cli(), "node", *args, *common], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=harness.env,
                             preexec_fn=die_with_parent)
        harness.others.append(p)
        procs[name] = p
    for name, p in procs.items():
        _, err = p.communicate(timeout=20)
        lines = err.decode(errors="replace").splitlines()
        assert p.returncode == 2, (name, p.returncode, lines)
        assert len(lines) == 1 and lines[0].startswith("celery-cluster: error:"), (name, lines)


def test_careless_settings_exit_2_naming_what_to_change(harness: Harness) -> None:
    """A port someone else holds, an address this host does not have, a state directory that
    cannot be created, an election timeout in milliseconds: one line naming the value and
    what to change, exit 2, and no state written."""
    a, b, c = (f"{HOST}:{p}" for p in free_ports(3))
    held = socket.socket()
    held.bind((HOST, 0))
    held.listen(1)
    busy = f"{HOST}:{held.getsockname()[1]}"
    foreign = f"192.0.2.1:{free_ports(1)[0]}"  # TEST-NET-1: on no host (nothing is sent to it)
    timing = ["--election-timeout", "0.5-1.0", "--heartbeat-interval", "0.05"]
    cases = {
        "port in use": (["--listen", busy, "--nodes", f"{busy},{b},{c}", *timing],
                        f"cannot listen on {busy} (the listen address): Address already in use"),
        "address not here": (["--listen", foreign, "--nodes", f"{foreign},{b},{c}", *timing],
                             "this host has no such address"),
        "state dir unusable": (["--listen", a, "--nodes", f"{a},{b},{c}", "--state-dir", "/proc/cc-state", *timing],
                               "cannot use state directory /proc/cc-state"),
        "timeout in milliseconds": (["--listen", a, "--nodes", f"{a},{b},{c}", "--election-timeout", "1000-2000"],
                                    "seconds, not milliseconds"),
    }
    try:
        for name, (args, reason) in cases.items():
            if "--state-dir" not in args:
                args = [*args, "--state-dir", str(harness.tmp / name.replace(" ", "-"))]
            p = subprocess.run([*_cli(), "node", *args], stdin=subprocess.DEVNULL, capture_output=True,
                               env=harness.env, timeout=30, preexec_fn=die_with_parent)
            lines = p.stderr.decode(errors="replace").splitlines()
            assert p.returncode == 2, (name, p.returncode, lines)
            assert len(lines) == 1 and lines[0].startswith("celery-cluster: error:") and reason in lines[0], \
                (name, lines)
    finally:
        held.close()
    assert not list(harness.tmp.rglob("state.json"))


def test_stepdown_from_the_shell_with_a_secret(harness: Harness) -> None:
    """`celery-cluster stepdown`: refused without the secret (exit 1, says why), signed with
    it: the leader hands over - also when asked through a follower, and to a chosen node."""
    secret = harness.tmp / "secret"
    secret.write_text("s3cret\n")
    group, _ = harness.start_cluster(3, ["--secret-file", str(secret)])
    leader, term = harness.wait_for(group, one_leader(group), lease_clock() + 10, "a leader")

    def stepdown(node: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_cli(), "stepdown", "--node", node, *extra], capture_output=True, text=True,
                              env=harness.env, timeout=30, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    p = stepdown(leader)
    assert p.returncode == 1 and "HTTP 401" in p.stderr and "--secret-file" in p.stderr, (p.stdout, p.stderr)
    assert harness.wait_for(group, one_leader(group), lease_clock() + 5, "the same leader") == (leader, term)

    follower, other = [m.addr for m in group if m.addr != leader]
    p = stepdown(follower, "--secret-file", str(secret), "--to", other)  # asked through a follower
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert p.stdout.strip() == f"leadership handed over from {leader} to {other}"
    new, new_term = harness.wait_for(group, one_leader(group, exclude=[leader]), lease_clock() + 5, "the new leader")
    assert (new, new_term > term) == (other, True)
    assert stepped_down(by_addr(group, leader), term)["reason"] == "transfer"
    harness.assert_no_overlap()
