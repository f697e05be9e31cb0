"""The node driver and the public Cluster, with real threads, real HTTP on loopback and
real state files.

Clusters here run in one process on 127.0.0.1 with short timings (election timeout
0.3-0.6 s, heartbeat 0.05 s). Nothing sleeps to synchronise: tests poll with a deadline
(:func:`wait_for`) or wait on events.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from celery_cluster import (
    Cluster,
    ClusterError,
    ConfigurationError,
    Leadership,
    StateFileError,
    TransferError,
)
from celery_cluster.messages import HardState
from celery_cluster.state_file import StateFile
from tests import support
from tests.support import addresses, hand_over, stop_all, the_leader

FAST: dict[str, Any] = {"election_timeout": (0.3, 0.6), "heartbeat_interval": 0.05}
ELECTION_THREAD = "celery-cluster-election"


# -- helpers -----------------------------------------------------------------------


#: ``wait_for(pred, timeout=5.0, what="")``: poll every 5 ms until ``pred`` is truthy (returned).
wait_for = partial(support.wait_for, timeout=5.0, interval=0.005, timeout_format="{} s")


def stays(pred: Callable[[], Any], duration: float, what: str = "") -> None:
    """Assert ``pred`` holds at every poll for ``duration`` (for "nothing more happens")."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert pred(), f"no longer true: {what or pred}"
        time.sleep(0.005)
    assert pred(), f"no longer true: {what or pred}"


def serves(address: str) -> bool:
    """Does a celery-cluster server for ``address`` answer there? (Not just "is the port
    open": once we let a port go, another process on the machine may take it.)"""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
    try:
        conn.request("GET", "/cluster/id")
        resp = conn.getresponse()
        return resp.status == 200 and json.loads(resp.read()) == {"id": address}
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


class Recorder:
    """Records callback invocations: (kind, term, thread name), thread-safely."""

    def __init__(self, fail_leader_terms: set[int] | None = None) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()
        self.fail_leader_terms = fail_leader_terms or set()

    def on_leader(self, term: int) -> None:
        with self.lock:
            self.calls.append(("leader", term, threading.current_thread().name))
        if term in self.fail_leader_terms:
            raise RuntimeError(f"on_leader failed on purpose in term {term}")

    def on_follower(self, term: int) -> None:
        with self.lock:
            self.calls.append(("follower", term, threading.current_thread().name))

    def kinds(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(k, t) for k, t, _ in self.calls]

    def threads(self) -> set[str]:
        with self.lock:
            return {name for _, _, name in self.calls}


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """A factory of Clusters with their state in tmp_path; all are stopped at teardown."""
    made: list[Cluster] = []

    def make(nodes: list[str], me: str, *, listen: bool = True, **kwargs: Any) -> Cluster:
        opts: dict[str, Any] = {**FAST, "state_dir": tmp_path / me.replace(":", "_")}
        opts.update(kwargs)
        if opts.get("persist") is False:
            opts.pop("state_dir")
        if listen:
            cl = Cluster(nodes, listen=me, **opts)
        else:
            cl = Cluster(nodes, advertise=me, **opts)
        made.append(cl)
        return cl

    yield make
    stop_all(made)


def start_all(cls: list[Cluster]) -> None:
    for cl in cls:
        cl.start()


def three_node_cluster(clusters: Callable[..., Cluster], **kwargs: Any) -> list[Cluster]:
    nodes = addresses(3)
    cls = [clusters(nodes, me, **kwargs) for me in nodes]
    start_all(cls)
    return cls


# -- a single node -------------------------------------------------------------------


def test_single_node_leads_at_once(clusters: Callable[..., Cluster]) -> None:
    (me,) = addresses(1)
    rec = Recorder()
    # A long election timeout: leading "at once" must not wait for it.
    cl = clusters([me], me, listen=False, election_timeout=(2.0, 4.0), heartbeat_interval=0.05,
                  on_leader=rec.on_leader, on_follower=rec.on_follower)
    assert not cl.is_leader()
    started = time.monotonic()
    cl.start()
    wait_for(cl.is_leader, timeout=1.0, what="the lone node to lead")
    assert time.monotonic() - started < 1.0
    wait_for(lambda: ("leader", 1) in rec.kinds(), timeout=1.0, what="on_leader(1)")
    assert rec.kinds() == [("follower", 0), ("leader", 1)]
    status = cl.status()
    assert status["state"] == "leader"
    assert status["is_leader"] is True
    assert status["term"] == 1
    assert status["leader_id"] == me and status["voted_for"] == me
    assert status["nodes"] == []
    # The lease is renewed on its own (no peers to ask): still leading after a few
    # lease lengths (0.3 s * 0.95 / 1.05 each).
    renewed_after = time.monotonic() + 0.7
    wait_for(lambda: time.monotonic() > renewed_after and cl.is_leader(), timeout=3.0)
    assert cl.status()["term"] == 1
    assert rec.kinds() == [("follower", 0), ("leader", 1)]


# -- three nodes on loopback -----------------------------------------------------------


def test_three_clusters_elect_exactly_one_leader(clusters: Callable[..., Cluster]) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    term = leader.status()["term"]
    assert term >= 1
    followers = [cl for cl in cls if cl is not leader]
    for cl in followers:
        st = cl.status()
        assert st["state"] == "follower"
        assert st["term"] == term
        assert st["is_leader"] is False
    # It stays that way: one leader, same term, heartbeats keep everybody in line.
    stays(lambda: [cl.is_leader() for cl in cls].count(True) <= 1
          and all(cl.status()["term"] == term for cl in cls), 0.5, "one leader, same term")
    assert leader.is_leader()


def test_status_fields(clusters: Callable[..., Cluster]) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    # Let every follower answer a heartbeat, so the leader has heard from both.
    wait_for(lambda: all(n["last_contact_ms"] is not None for n in leader.status()["nodes"]))
    members = {cl.id for cl in cls}
    for cl in cls:
        st = cl.status()
        json.dumps(st)  # JSON-ready
        for key in ("id", "leader_id", "state", "term", "voted_for", "is_leader", "leader_address",
                    "lease_remaining_ms", "nodes"):
            assert key in st, key
        assert st["id"] == cl.id
        assert st["leader_id"] == leader.id
        assert st["leader_address"] == leader.id
        assert isinstance(st["term"], int) and st["term"] >= 1
        assert st["voted_for"] is None or st["voted_for"] in members
        listed = {n["address"] for n in st["nodes"]}
        assert members - {cl.id} <= listed <= members
        for n in st["nodes"]:
            assert set(n) >= {"address", "last_contact_ms"}
            assert n["last_contact_ms"] is None or 0 <= n["last_contact_ms"] < 5000
        # Every node has heard from the leader (followers need not hear from each other).
        contact = {n["address"]: n["last_contact_ms"] for n in st["nodes"]}
        if cl is leader:
            assert all(contact[p] is not None for p in members - {cl.id})
        else:
            assert contact[leader.id] is not None and contact[leader.id] < 1000
    st = leader.status()
    assert st["state"] == "leader" and st["is_leader"] is True and st["voted_for"] == leader.id
    lease_ms = 300 * 0.95 / 1.05
    assert 0 < st["lease_remaining_ms"] <= lease_ms + 1
    for cl in cls:
        if cl is not leader:
            st = cl.status()
            assert st["state"] == "follower"
            assert st["is_leader"] is False
            assert st["lease_remaining_ms"] == 0
            assert 0 <= st["leader_contact_ms"] < 1000  # how long since it heard the leader
    assert leader.status()["leader_contact_ms"] is None
    assert {cl.status()["clock"] for cl in cls} == {"CLOCK_BOOTTIME"}


def test_callbacks_are_edge_triggered_and_run_off_the_election_thread(
    clusters: Callable[..., Cluster],
) -> None:
    nodes = addresses(3)
    recs = {me: Recorder() for me in nodes}
    cls = [clusters(nodes, me, on_leader=recs[me].on_leader, on_follower=recs[me].on_follower)
           for me in nodes]
    start_all(cls)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    term = leader.status()["term"]
    wait_for(lambda: ("leader", term) in recs[leader.id].kinds(), what="on_leader on the leader")
    # The followers switched to following the new leader (and possibly went through
    # pre-candidate and candidate): none of that is a loss of leadership.
    stays(lambda: all(recs[cl.id].kinds() == [("follower", 0)] for cl in cls if cl is not leader)
          and recs[leader.id].kinds() == [("follower", 0), ("leader", term)], 0.3,
          "on_follower once at start, on_leader once")

    # A handover: the old leader loses (one on_follower), the new one leads (one on_leader).
    target = leader.stepdown()
    new = next(cl for cl in cls if cl.id == target)
    wait_for(lambda: the_leader(cls) is new, what="the transfer target to lead")
    new_term = new.status()["term"]
    assert new_term > term
    wait_for(lambda: len(recs[leader.id].kinds()) == 3 and len(recs[new.id].kinds()) == 2,
             what="the callbacks of the handover")
    bystander = next(cl for cl in cls if cl not in (leader, new))
    stays(lambda: recs[leader.id].kinds() == [("follower", 0), ("leader", term), ("follower", term)]
          and recs[new.id].kinds() == [("follower", 0), ("leader", new_term)]
          and recs[bystander.id].kinds() == [("follower", 0)], 0.3, "edge-triggered callbacks")

    names = set().union(*(r.threads() for r in recs.values()))
    assert ELECTION_THREAD not in names
    assert names == {"celery-cluster-callbacks"}


def test_on_leader_exception_steps_down_and_node_keeps_working(
    clusters: Callable[..., Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="celery_cluster")
    (me,) = addresses(1)
    rec = Recorder(fail_leader_terms={1})
    handles: list[Leadership | None] = []
    inner_on_leader = rec.on_leader

    def on_leader(term: int) -> None:
        handles.append(cl.leadership())  # the driver's lock is free here: no deadlock
        inner_on_leader(term)

    cl = clusters([me], me, listen=False, on_leader=on_leader, on_follower=rec.on_follower)
    cl.start()
    # Term 1: on_leader raises -> the node steps down and reports the loss...
    wait_for(lambda: ("follower", 1) in rec.kinds(), what="on_follower(1) after the failed on_leader")
    first = handles[0]
    assert first is not None and first.term == 1
    assert first.lost.is_set() and not first.is_valid()
    # ...and keeps working: it is elected again in a later term and on_leader succeeds.
    wait_for(lambda: cl.is_leader() and cl.status()["term"] >= 2, what="re-election")
    wait_for(lambda: len(rec.kinds()) >= 4, what="on_leader in the next term")
    kinds = rec.kinds()
    assert kinds[:3] == [("follower", 0), ("leader", 1), ("follower", 1)]
    assert kinds[3][0] == "leader" and kinds[3][1] >= 2
    assert cl.leadership() is not None and cl.leadership().term == cl.status()["term"]

    failures = [r for r in caplog.records if r.exc_info and "callback failed" in r.getMessage()]
    assert len(failures) == 1
    assert isinstance(failures[0].exc_info[1], RuntimeError)
    stepped = [r for r in caplog.records if getattr(r, "cluster_event", {}).get("event") == "stepped_down"]
    assert [r.cluster_event["reason"] for r in stepped] == ["callback_error"]
    assert stepped[0].cluster_event["term"] == 1
    assert "callback_error" in stepped[0].getMessage()


def test_on_leader_exception_in_a_three_node_cluster_hands_over(clusters: Callable[..., Cluster]) -> None:
    nodes = addresses(3)
    failed: list[int] = []

    def boom(term: int) -> None:
        if not failed:
            failed.append(term)
            raise RuntimeError("first leader refuses to lead")

    cls = [clusters(nodes, me, on_leader=boom) for me in nodes]
    start_all(cls)
    wait_for(lambda: failed, what="the first on_leader")
    # Someone leads afterwards, in a later term than the one whose callback failed.
    leader = wait_for(lambda: (lambda l: l if l is not None and l.status()["term"] > failed[0] else None)(
        the_leader(cls)), what="a leader after the failed callback")
    assert leader.leadership() is not None


# -- the Leadership handle ----------------------------------------------------------------


def test_leadership_handle_is_invalidated_on_stepdown(clusters: Callable[..., Cluster]) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    handle = leader.leadership()
    assert isinstance(handle, Leadership)
    assert handle.term == leader.status()["term"]
    assert handle.is_valid()
    assert not handle.lost.is_set()
    assert all(cl.leadership() is None for cl in cls if cl is not leader)

    leader.stepdown()
    assert handle.wait_lost(timeout=0)  # set at once, before stepdown() returns
    assert handle.lost.is_set()
    assert not handle.is_valid()
    assert leader.leadership() is None
    new = wait_for(lambda: the_leader(cls), what="the new leader")
    assert new is not leader
    new_handle = new.leadership()
    assert new_handle is not None and new_handle.term > handle.term and new_handle.is_valid()
    assert not handle.is_valid()  # a handle never comes back to life


def test_leadership_handle_lost_on_stop(clusters: Callable[..., Cluster]) -> None:
    (me,) = addresses(1)
    cl = clusters([me], me, listen=False)
    cl.start()
    wait_for(cl.is_leader, what="the lone node to lead")
    handle = cl.leadership()
    assert handle is not None and handle.is_valid()
    cl.stop()
    assert handle.lost.is_set()
    assert not handle.is_valid()
    assert not cl.is_leader()


# -- stop() ------------------------------------------------------------------------------


def test_stop_without_start_and_twice(clusters: Callable[..., Cluster]) -> None:
    nodes = addresses(3)
    cl = clusters(nodes, nodes[0])
    cl.stop()
    cl.stop()
    # The client is closed (its I/O thread, started on first send, never ran); nothing was listening.
    assert cl.client._closed and cl.client._thread is None
    assert not threads_named("celery-cluster-send")
    assert not serves(nodes[0])


def test_stop_after_start_and_twice(clusters: Callable[..., Cluster]) -> None:
    nodes = addresses(3)
    cl = clusters(nodes, nodes[0])
    cl.start()
    assert serves(nodes[0])
    assert cl.node._threads and all(t.is_alive() for t in cl.node._threads)
    cl.stop()
    cl.stop()
    wait_for(lambda: not any(t.is_alive() for t in cl.node._threads), timeout=2.0,
             what="the node's threads to end")
    assert not serves(nodes[0])
    cl.stop()  # still fine


def test_stop_from_a_callback(clusters: Callable[..., Cluster], caplog: pytest.LogCaptureFixture) -> None:
    """A callback may stop its own cluster (e.g. a worker shutting down from on_leader)."""
    caplog.set_level(logging.INFO, logger="celery_cluster")
    (me,) = addresses(1)
    stopped = threading.Event()

    def on_leader(term: int) -> None:
        cl.stop()
        stopped.set()

    cl = clusters([me], me, on_leader=on_leader)
    cl.start()
    assert stopped.wait(5.0)
    assert not cl.is_leader()
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    assert not serves(me)  # the embedded server went down too


def test_stop_hands_leadership_over(clusters: Callable[..., Cluster]) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    term = leader.status()["term"]
    leader.stop()  # transfer=True by default
    rest = [cl for cl in cls if cl is not leader]
    new = wait_for(lambda: the_leader(rest), timeout=3.0, what="a leader among the remaining two")
    assert new.status()["term"] > term


# -- stepdown / transfer -------------------------------------------------------------------


def test_stepdown_hands_leadership_to_another_node(clusters: Callable[..., Cluster]) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    term = leader.status()["term"]
    follower = next(cl for cl in cls if cl is not leader)
    with pytest.raises(TransferError):
        follower.stepdown()
    assert leader.is_leader()  # a refused stepdown on a follower changes nothing

    target = leader.stepdown()
    assert target in {cl.id for cl in cls} - {leader.id}
    assert not leader.is_leader()  # the lease ends before stepdown() returns
    new = wait_for(lambda: the_leader(cls), what="the target to lead")
    assert new.id == target
    assert new.status()["term"] > term
    with pytest.raises(TransferError):
        leader.stepdown()  # no longer the leader

    # To a named node this time.
    other = next(cl for cl in cls if cl is not new and cl is not leader)
    assert hand_over(new, other.id) == other.id
    wait_for(lambda: the_leader(cls) is other, what="the named target to lead")


# -- replicated payload ---------------------------------------------------------------------


def test_propose_replicates_the_payload_to_followers_state_files(
    clusters: Callable[..., Cluster], tmp_path: Path
) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    follower = next(cl for cl in cls if cl is not leader)
    with pytest.raises(ClusterError):
        follower.propose("nope")

    version = leader.propose('{"schedule": 1}')
    assert version[0] == leader.status()["term"]
    assert leader.wait_committed(version, timeout=3.0)
    assert leader.payload == (version, '{"schedule": 1}')
    for cl in cls:
        wait_for(lambda cl=cl: cl.payload == (version, '{"schedule": 1}'), what=f"{cl.id} to hold it")
        on_disk = StateFile(cl.state_dir, cl.id).load()  # a fresh reader: what a restart would see
        assert on_disk is not None
        assert on_disk.payload == '{"schedule": 1}'
        assert tuple(on_disk.payload_version) == version

    # A newer version replaces it; the followers' files follow.
    v2 = leader.propose("second")
    assert v2 > version
    assert leader.wait_committed(v2, timeout=3.0)
    for cl in cls:
        wait_for(lambda cl=cl: (StateFile(cl.state_dir, cl.id).load() or HardState()).payload == "second",
                 what=f"{cl.id}'s state file to hold the new payload")


def test_wait_committed_is_false_on_a_follower(clusters: Callable[..., Cluster]) -> None:
    cls = three_node_cluster(clusters)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    version = leader.propose("x")
    follower = next(cl for cl in cls if cl is not leader)
    assert follower.wait_committed(version, timeout=0.2) is False


def test_restarted_node_keeps_its_term_and_rejoins(clusters: Callable[..., Cluster]) -> None:
    nodes = addresses(3)
    cls = [clusters(nodes, me) for me in nodes]
    start_all(cls)
    leader = wait_for(lambda: the_leader(cls), what="one agreed leader")
    term = leader.status()["term"]
    follower = next(cl for cl in cls if cl is not leader)
    follower.stop(transfer=False)
    again = clusters(nodes, follower.id)  # same address, same state directory
    assert again.status()["term"] == term  # loaded from its state file
    again.start()
    live = [again if cl is follower else cl for cl in cls]
    # It hears the leader again (not a stale connection to the stopped instance).
    wait_for(lambda: again.status()["leader_id"] is not None and the_leader(live) is not None,
             what="the restarted node to follow the leader")


# -- state files ------------------------------------------------------------------------------


def test_corrupt_state_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    nodes = addresses(3)
    state_dir = tmp_path / "me"
    state_dir.mkdir()
    path = state_dir / "state.json"
    path.write_bytes(b'{"format": "celery-cluster-state", "term": ')  # truncated
    before = path.read_bytes()
    sender_names = [f"celery-cluster-send-{p}" for p in nodes[1:]]
    with pytest.raises(StateFileError) as excinfo:
        Cluster(nodes, listen=nodes[0], state_dir=state_dir, **FAST)
    assert isinstance(excinfo.value, ClusterError)
    assert str(path) in str(excinfo.value)
    assert path.read_bytes() == before
    # Nothing is left running by the failed constructor.
    wait_for(lambda: not any(threads_named(n) for n in sender_names), timeout=2.0,
             what="no sender thread left behind")


def test_state_file_of_another_node_is_refused_and_left_alone(tmp_path: Path) -> None:
    me, other = addresses(2)
    state_dir = tmp_path / "shared"
    StateFile(state_dir, other).save(HardState(term=7, voted_for=other))
    path = state_dir / "state.json"
    before = path.read_bytes()
    with pytest.raises(StateFileError) as excinfo:
        Cluster([me], advertise=me, state_dir=state_dir, **FAST)
    message = str(excinfo.value)
    assert str(path) in message
    assert other in message
    assert path.read_bytes() == before


def test_state_is_persisted_before_and_loaded_after_a_restart(clusters: Callable[..., Cluster]) -> None:
    (me,) = addresses(1)
    cl = clusters([me], me, listen=False)
    cl.start()
    wait_for(cl.is_leader, what="the lone node to lead")
    cl.stop()
    on_disk = StateFile(cl.state_dir, me).load()
    assert on_disk is not None and on_disk.term == 1 and on_disk.voted_for == me
    again = clusters([me], me, listen=False)
    again.start()
    wait_for(again.is_leader, what="the restarted node to lead")
    assert again.status()["term"] == 2  # never term 1 again


# -- configuration --------------------------------------------------------------------------


def test_persist_false_warns_at_start(clusters: Callable[..., Cluster], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="celery_cluster")
    (me,) = addresses(1)
    cl = clusters([me], me, listen=False, persist=False)
    assert cl.state_dir is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    cl.start()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "persistence" in warnings[0].getMessage()
    wait_for(cl.is_leader, what="the lone node to lead without persistence")


def test_persist_false_with_a_state_dir_is_a_configuration_error(tmp_path: Path) -> None:
    (me,) = addresses(1)
    with pytest.raises(ConfigurationError, match="persist=False"):
        Cluster([me], advertise=me, persist=False, state_dir=tmp_path)


@pytest.mark.parametrize("heartbeat", [0.1, 0.3, 0.5])
def test_heartbeat_too_close_to_the_election_timeout_is_refused(tmp_path: Path, heartbeat: float) -> None:
    (me,) = addresses(1)
    with pytest.raises(ConfigurationError) as excinfo:
        Cluster([me], advertise=me, state_dir=tmp_path, election_timeout=(0.3, 0.6), heartbeat_interval=heartbeat)
    message = str(excinfo.value)
    assert "heartbeat interval" in message
    assert str(heartbeat) in message and "0.3" in message
    assert not (tmp_path / "state.json").exists()


def test_heartbeat_at_a_quarter_of_the_election_timeout_is_accepted(tmp_path: Path) -> None:
    (me,) = addresses(1)
    cl = Cluster([me], advertise=me, state_dir=tmp_path, election_timeout=(0.4, 0.8), heartbeat_interval=0.1)
    assert cl.timing.heartbeat_interval == 0.1
    cl.stop()


def test_node_missing_from_its_node_list_is_refused(tmp_path: Path) -> None:
    me, a, b = addresses(3)
    with pytest.raises(ConfigurationError, match=me.replace(".", r"\.")):
        Cluster([a, b], listen=me, state_dir=tmp_path, **FAST)


def test_wait_committed_returns_false_as_soon_as_leadership_is_lost(tmp_path: Path) -> None:
    (me,) = addresses(1)
    cl = Cluster([me], listen=me, state_dir=tmp_path / "a", election_timeout=(0.3, 0.6), heartbeat_interval=0.05)
    cl.start()
    try:
        wait_for(cl.is_leader, timeout=5.0, what="the single node to lead")
        version = cl.propose("x")
        assert cl.wait_committed(version, 1.0)
        # A version of this term that will never commit once we step down.
        pending = (version[0], version[1] + 1)
        t0 = time.monotonic()
        threading.Timer(0.1, lambda: cl.node.retire()).start()
        assert not cl.wait_committed(pending, 5.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        cl.stop()


def test_a_stopped_cluster_cannot_be_started_again(tmp_path: Path) -> None:
    (me,) = addresses(1)
    cl = Cluster([me], listen=me, state_dir=tmp_path / "a")
    cl.stop()
    with pytest.raises(ClusterError, match="create a new one"):
        cl.start()
    assert not serves(me)
