"""Membership changes over real HTTP on loopback: in-process clusters with their embedded
servers, ``POST /cluster/members`` and the joining node's own requests.

The core's rules (one server at a time, learners, removal of the leader, the cluster id)
are pinned by the scenario transcripts ``tests/testdata/membership*.txt`` and drawn by the
simulator; here the drivers, the transport and the route carry them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from celery_cluster import Cluster
from celery_cluster.auth import Signer
from celery_cluster.errors import MembershipError
from celery_cluster.members_client import change_members
from celery_cluster.state_file import StateFile
from tests.support import addresses, stop_all, the_leader, wait_for

FAST: dict[str, Any] = {"election_timeout": (0.3, 0.6), "heartbeat_interval": 0.05}
REPO = Path(__file__).resolve().parents[1]


def poll(pred: Any, what: str, timeout: float = 10.0) -> Any:
    return wait_for(pred, what, timeout=timeout, interval=0.01, timeout_format="{} s")


def start(nodes: list[str], me: str, tmp_path: Path, **kw: Any) -> Cluster:
    cl = Cluster(nodes, listen=me, state_dir=tmp_path / me.replace(":", "_"), **{**FAST, **kw})
    cl.start()
    return cl


def joiner(me: str, seeds: list[str], tmp_path: Path, **kw: Any) -> Cluster:
    cl = Cluster([], listen=me, join=seeds, state_dir=tmp_path / me.replace(":", "_"), **{**FAST, **kw})
    cl.start()
    return cl


def post(address: str, body: Any, **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"http://{address}/cluster/members", data=data, timeout=40, **kw)


@pytest.fixture
def three(tmp_path: Path):
    nodes = addresses(3)
    cls = [start(nodes, me, tmp_path) for me in nodes]
    poll(lambda: the_leader(cls), "a leader")
    yield nodes, cls
    stop_all(cls)


def test_a_joining_node_is_caught_up_added_and_counted(three, tmp_path: Path) -> None:
    nodes, cls = three
    [new] = addresses(1)
    d = joiner(new, nodes[:1], tmp_path)  # one seed is enough: a follower names the leader
    cls.append(d)
    assert d.status()["voter"] is False and d.members == ()
    poll(lambda: d.status()["voter"], "the new node to be added")
    want = (*nodes, new)
    poll(lambda: all(cl.members == want for cl in cls), "every node to hold the four members")
    st = the_leader(cls).status()
    assert st["members"] == list(want)
    assert st["config_version"][0] == st["term"]
    assert {n["address"] for n in st["nodes"]} == set(want) - {st["id"]}
    # It is a voter now: the configuration is on its disk, and it counts in elections.
    saved = StateFile(tmp_path / new.replace(":", "_"), new).load()
    assert saved is not None and saved.members == want and saved.cluster
    leader = the_leader(cls)
    leader.stepdown(to=new)
    poll(lambda: the_leader(cls) is d, "the new member to lead after a handover to it")


def test_remove_a_member_then_the_leader_itself(three) -> None:
    nodes, cls = three
    leader = the_leader(cls)
    follower = next(cl for cl in cls if cl is not leader)
    answer = post(leader.id, {"remove": follower.id})
    assert answer.status_code == 200, answer.text
    rest = tuple(n for n in nodes if n != follower.id)
    assert answer.json()["members"] == list(rest)
    poll(lambda: follower.members == rest, "the removed node to learn it")
    assert follower.status()["voter"] is False

    # The leader removes itself: answered once committed, then it hands over.
    others = [cl for cl in cls if cl not in (leader, follower)]
    answer = post(leader.id, {"remove": leader.id})
    assert answer.status_code == 200, answer.text
    assert answer.json()["members"] == [others[0].id]
    poll(lambda: the_leader(others) is others[0], "the last member to lead alone")
    assert not leader.is_leader() and not follower.is_leader()
    last = [t for t in leader.status()["recent_transitions"] if t["event"] == "stepped_down"][-1]
    assert last["reason"] == "removed"


def test_refusals_are_one_line_and_change_nothing(three, caplog: pytest.LogCaptureFixture) -> None:
    nodes, cls = three
    leader = the_leader(cls)
    follower = next(cl for cl in cls if cl is not leader)
    before = leader.status()["config_version"]

    # A follower names the leader; the client follows it.
    r = post(follower.id, {"add": "127.0.0.1:9"})
    assert r.status_code == 409 and r.json()["leader"] == leader.id, r.text
    for body, why in ((b"", "body must be"), (b"{", "body must be"), ({"add": 5}, "body must be"),
                      ({"add": "x"}, "add:"), ({"add": "127.0.0.1:1", "remove": "127.0.0.1:2"}, "body must be"),
                      ({"grow": "127.0.0.1:1"}, "body must be")):
        r = post(leader.id, body)
        assert r.status_code == 400 and why in r.json()["error"], (body, r.text)
    r = post(leader.id, {"add": leader.id})
    assert r.status_code == 409 and "already a member" in r.json()["error"]
    r = post(leader.id, {"remove": "127.0.0.1:9"})
    assert r.status_code == 409 and "not a member" in r.json()["error"]

    # An address where nothing answers: given up after the learner timeout (5 x 0.6 s).
    r = post(leader.id, {"add": "127.0.0.1:9"})
    assert r.status_code == 409 and "did not answer" in r.json()["error"], r.text

    # Removing a member when the rest would have no live majority: {leader, dead} of 2 needs 2.
    dead = next(cl for cl in cls if cl not in (leader, follower))
    dead.stop(transfer=False)
    poll(lambda: dead.id not in {n["address"] for n in leader.status()["nodes"]
                                 if n["last_contact_ms"] is not None and n["last_contact_ms"] < 300},
         "the leader to stop hearing the stopped node")
    r = post(leader.id, {"remove": follower.id})
    assert r.status_code == 409 and "answered lately" in r.json()["error"], r.text
    assert leader.status()["config_version"] == before
    assert all(cl.members == tuple(nodes) for cl in (leader, follower))


def test_a_secret_guards_the_route_and_the_join(tmp_path: Path) -> None:
    nodes = addresses(3)
    cls = [start(nodes, me, tmp_path, secret="s3cret") for me in nodes]
    try:
        leader = poll(lambda: the_leader(cls), "a leader")
        r = post(leader.id, {"add": "127.0.0.1:9"})
        assert r.status_code == 401, r.text
        with pytest.raises(MembershipError, match="refused to add .* 401|--secret-file"):
            change_members([leader.id], "add", "127.0.0.1:9", timeout=5)
        [new] = addresses(1)
        cls.append(joiner(new, nodes, tmp_path, secret="s3cret"))
        # Every node holding the new list is not yet the leader knowing it committed (the acks may be
        # on their way): a second change before that is refused ("not committed yet"), as it must be.
        poll(lambda: all(new in cl.members for cl in cls)
             and (lead := the_leader(cls)) is not None and not lead.node.core.change_pending(),
             "the signed join to be accepted and committed")
        answer = change_members(nodes, "remove", new, signer=Signer(b"s3cret"))
        assert new not in answer["members"]
    finally:
        stop_all(cls)


def test_a_different_static_list_does_not_override_the_replicated_one(three, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    nodes, cls = three
    leader = the_leader(cls)
    victim = next(cl for cl in cls if cl is not leader)
    victim.stop(transfer=False)
    cls.remove(victim)
    [extra] = addresses(1)
    with caplog.at_level(logging.WARNING, logger="celery_cluster"):
        again = start([*nodes, extra], victim.id, tmp_path)  # the rolling edit of the issue
    cls.append(again)
    assert again.members == tuple(nodes)
    assert any("replicated configuration" in r.getMessage() and extra in r.getMessage() for r in caplog.records)
    poll(lambda: again.status()["leader_id"] == leader.id, "the restarted node to follow the leader")

    # A node started with that new list is of another cluster: it never votes with this one.
    stranger = start([*nodes, extra], extra, tmp_path)
    cls.append(stranger)
    poll(lambda: any(r["event"] for r in stranger.status()["recent_transitions"]), "the stranger to start")
    with caplog.at_level(logging.WARNING, logger="celery_cluster"):
        # The refusal names both lists: the stranger's (with the extra address) and ours.
        poll(lambda: any("another cluster" in r.getMessage() and f"--cluster-nodes {','.join([*nodes, extra])}"
                         in r.getMessage() and f"members {','.join(nodes)}" in r.getMessage()
                         for r in caplog.records), "a mismatch warning naming both lists", timeout=5)
    assert stranger.status()["term"] == 0 and not stranger.is_leader()
    assert the_leader(cls[:-1]) is leader


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_the_members_command_and_a_standalone_node_that_joins(three, tmp_path: Path) -> None:
    nodes, cls = three
    follower = next(cl for cl in cls if not cl.is_leader())
    out = cli("members", "--node", follower.id)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-3:] == nodes

    # A standalone node started with --join (no --nodes) asks through the seed and is added.
    [new] = addresses(1)
    proc = subprocess.Popen([sys.executable, "-m", "celery_cluster.cli", "node", "--listen", new, "--join", nodes[0],
                             "--election-timeout", "0.3-0.6", "--heartbeat-interval", "0.05",
                             "--state-dir", str(tmp_path / "joined")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        poll(lambda: all(new in cl.members for cl in cls), "the standalone node to be added", timeout=30)
        out = cli("members", "--node", follower.id, "remove", new)
        assert out.returncode == 0, out.stderr
        assert f"removed {new}" in out.stdout and new not in out.stdout.split("now", 1)[1]
    finally:
        proc.terminate()
        log = proc.communicate(timeout=10)[0]
    assert "joined: members are" in log, log
    # Refusals: one line on stderr, exit 1; bad arguments exit 2.
    out = cli("members", "--node", follower.id, "remove", "127.0.0.1:9")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "not a member" in out.stderr, out
    out = cli("members", "--node", follower.id, "add")
    assert out.returncode == 2 and "needs the HOST:PORT" in out.stderr, out
    out = cli("node", "--listen", new)
    assert out.returncode == 2 and "--nodes" in out.stderr and "--join" in out.stderr, out
