"""Tests of the chaos harness itself: namespaces, blackhole faults, the delay proxy, cleanup.

Every wait is a bounded poll or an operation with its own timeout; the negative checks
("nothing gets through") necessarily wait out a short timeout (BLOCKED_WAIT).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.agent import Agent
from tests.chaos.netns import STATE_DIR, Topology, _netns_names, sweep_stale
from tests.chaos.proxy import REPO, start_proxy

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="network namespaces need root and iproute2")]

PORT, UDP_PORT = 7000, 7001
BLOCKED_WAIT = 0.3  # how long a silently dropped connect is given before we call it blocked
FAST = 0.1          # an EINVAL from a blackhole route comes back well within this


def agents(topo: Topology) -> list[Agent]:
    """One agent per host, each with a TCP echo server and a UDP sink listening."""
    out = [Agent(topo, i) for i in range(topo.n)]
    for a in out:
        a.ok("listen_tcp", port=PORT)
        a.ok("listen_udp", port=UDP_PORT)
    return out


def connect(ags: list[Agent], topo: Topology, src: int, dst: int) -> dict:
    return ags[src].call("connect", addr=topo.address(dst, PORT), timeout=BLOCKED_WAIT)


def assert_reach(ags: list[Agent], topo: Topology, src: int, dst: int) -> None:
    reply = connect(ags, topo, src, dst)
    assert reply["ok"], f"{src}->{dst}: {reply}"


def assert_blocked(ags: list[Agent], topo: Topology, src: int, dst: int, *, fast: bool) -> None:
    """``fast``: src holds a blackhole route to dst, so its kernel refuses at once."""
    reply = connect(ags, topo, src, dst)
    if fast:
        assert (reply["ok"], reply["error"]) == (False, "EINVAL"), f"{src}->{dst}: {reply}"
        assert reply["elapsed"] < FAST
    else:
        assert (reply["ok"], reply["error"]) == (False, "timeout"), f"{src}->{dst}: {reply}"


def kernel_drops(topo: Topology) -> list[str]:
    """What the namespaces actually hold, so tests see the kernel state and not our record."""
    out = []
    for ns in topo.hosts:
        routes = subprocess.run(["ip", "-n", ns, "route", "show", "type", "blackhole"],
                                capture_output=True, text=True, check=True).stdout
        rules = subprocess.run(["ip", "-n", ns, "rule", "show"],
                               capture_output=True, text=True, check=True).stdout
        out += [f"{ns}: {line}" for line in (routes + rules).splitlines() if "blackhole" in line]
    return out


def wait_dead(pids: list[int], timeout: float = 3.0) -> list[int]:
    """Pids still alive (zombies count as dead) after polling up to ``timeout`` s."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


@pytest.fixture(params=["route", "silent"])
def drop(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tmp_sock(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "proxy.sock")


# -- connectivity and faults ----------------------------------------------------------------


def test_hosts_reach_each_other() -> None:
    with Topology(3) as topo:
        assert len({topo.host_ip(i) for i in range(3)}) == 3
        assert topo.address(2, 80) == f"{topo.host_ip(2)}:80"
        ags = agents(topo)
        for src in range(3):
            for dst in range(3):
                assert_reach(ags, topo, src, dst)


def test_cut_blocks_both_directions_and_heal_restores(drop: str) -> None:
    with Topology(3, drop=drop) as topo:  # type: ignore[arg-type]
        ags = agents(topo)
        topo.cut(0, 1)
        assert topo.blocked == {(0, 1), (1, 0)}
        assert_blocked(ags, topo, 0, 1, fast=drop == "route")
        assert_blocked(ags, topo, 1, 0, fast=drop == "route")
        for src, dst in [(0, 2), (2, 0), (1, 2), (2, 1)]:
            assert_reach(ags, topo, src, dst)
        topo.heal()
        assert topo.blocked == frozenset() and kernel_drops(topo) == []
        assert_reach(ags, topo, 0, 1)
        assert_reach(ags, topo, 1, 0)


def test_oneway_drops_one_direction_only(drop: str) -> None:
    with Topology(2, drop=drop) as topo:  # type: ignore[arg-type]
        ags = agents(topo)
        topo.oneway(0, 1)
        assert topo.blocked == {(0, 1)}
        assert_blocked(ags, topo, 0, 1, fast=drop == "route")
        # 1's SYN reaches 0, but 0's SYN-ACK is dropped: TCP fails both ways, silently here.
        assert_blocked(ags, topo, 1, 0, fast=False)
        # UDP shows the directions apart: 1 -> 0 arrives...
        ags[1].ok("send_udp", addr=topo.address(0, UDP_PORT), data="from-1")
        assert ags[0].ok("recv_udp", timeout=2)["data"] == "from-1"
        # ...0 -> 1 does not: refused at the sender (route) or lost on the way (silent).
        sent = ags[0].call("send_udp", addr=topo.address(1, UDP_PORT), data="lost")
        assert sent["ok"] == (drop == "silent") and sent.get("error") in (None, "EINVAL")
        topo.heal()
        ags[0].ok("send_udp", addr=topo.address(1, UDP_PORT), data="after-heal")
        # The first datagram 1 ever gets is the post-heal one: "lost" never arrived.
        assert ags[1].ok("recv_udp", timeout=2)["data"] == "after-heal"


def test_isolate(drop: str) -> None:
    with Topology(3, drop=drop) as topo:  # type: ignore[arg-type]
        ags = agents(topo)
        topo.isolate(1)
        assert topo.blocked == {(1, 0), (0, 1), (1, 2), (2, 1)}
        for other in (0, 2):
            assert_blocked(ags, topo, 1, other, fast=drop == "route")
            assert_blocked(ags, topo, other, 1, fast=drop == "route")
        assert_reach(ags, topo, 0, 2)
        assert_reach(ags, topo, 2, 0)
        topo.heal()
        assert_reach(ags, topo, 1, 0)


def test_partition(drop: str) -> None:
    with Topology(4, drop=drop) as topo:  # type: ignore[arg-type]
        ags = agents(topo)
        topo.partition([[0, 1], [2, 3]])
        for src in range(4):
            for dst in range(4):
                if (src < 2) == (dst < 2):
                    assert_reach(ags, topo, src, dst)
                else:
                    assert_blocked(ags, topo, src, dst, fast=drop == "route")
        with pytest.raises(ValueError):
            topo.partition([[0, 1], [1, 2, 3]])  # host 1 twice
        with pytest.raises(ValueError):
            topo.partition([[0, 1], [2]])        # host 3 missing
        topo.heal()
        assert_reach(ags, topo, 0, 3)


def test_faults_are_idempotent_and_recorded(drop: str) -> None:
    with Topology(3, drop=drop) as topo:  # type: ignore[arg-type]
        topo.cut(0, 1)
        topo.cut(1, 0)
        topo.oneway(0, 1)
        assert topo.blocked == {(0, 1), (1, 0)}
        assert len(kernel_drops(topo)) == 2
        topo.isolate(0)
        assert len(kernel_drops(topo)) == 4 == len(topo.blocked)
        topo.heal()
        topo.heal()
        assert kernel_drops(topo) == [] and topo.blocked == frozenset()
        with pytest.raises(IndexError):
            topo.cut(0, 3)


def test_blackhole_route_on_established_connection_is_silent() -> None:
    """Route mode: new connects fail at once, but an open connection just stops (no error),
    and its queued bytes are retransmitted after heal."""
    with Topology(2) as topo:
        ags = agents(topo)
        ags[0].ok("open", id="c", addr=topo.address(1, PORT))
        ags[0].ok("rtt", id="c", size=300)
        topo.cut(0, 1)
        stalled = ags[0].call("rtt", id="c", size=300, timeout=BLOCKED_WAIT)
        assert (stalled["ok"], stalled["error"]) == (False, "timeout")  # send() succeeded
        assert_blocked(ags, topo, 0, 1, fast=True)
        topo.heal()
        late = ags[0].ok("recv", id="c", size=300, timeout=5)  # next retransmission delivers it
        assert late["elapsed"] < 5
        ags[0].ok("rtt", id="c", size=300)


# -- proxy ---------------------------------------------------------------------------------


def test_proxy_forwards_and_delays(tmp_sock: str) -> None:
    with Topology(2) as topo:
        client, server = Agent(topo, 0), Agent(topo, 1)
        server.ok("listen_tcp", port=PORT, host="127.0.0.1")  # reachable only via the proxy
        ctl = start_proxy(topo, 1, 8000, PORT, tmp_sock)
        assert not client.call("connect", addr=topo.address(1, PORT), timeout=BLOCKED_WAIT)["ok"]
        client.ok("open", id="c", addr=topo.address(1, 8000))
        base = sorted(client.ok("rtt", id="c", count=21)["rtts"])[10]
        assert base < 0.01

        # Each chunk crosses the proxy once per direction: a round trip gains 2 * delay.
        ctl.set_delay(0.1)
        for rtt in client.ok("rtt", id="c", count=3)["rtts"]:
            assert 0.2 <= rtt < 0.2 + base + 0.05
        ctl.set_delay(0.05, jitter=0.05)
        for rtt in client.ok("rtt", id="c", count=5)["rtts"]:
            assert 0.1 <= rtt < 0.2 + base + 0.05
        client.ok("stream", id="c", count=200)  # jitter must not reorder bytes
        ctl.set_delay(0.0)
        assert sorted(client.ok("rtt", id="c", count=21)["rtts"])[10] < 0.01

        stats = ctl.stats()
        assert (stats["accepted"], stats["open"]) == (1, 1)  # one keep-alive connection throughout
        assert ctl.drop_all() == 1
        assert client.call("rtt", id="c", timeout=2)["error"] in ("ECONNRESET", "EPIPE", "ConnectionError")
        client.ok("open", id="d", addr=topo.address(1, 8000))
        client.ok("rtt", id="d")
        client.ok("close", id="d")  # the client's FIN travels on; the proxy forgets the pair
        deadline = time.monotonic() + 2
        while ctl.stats()["open"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ctl.stats()["open"] == 0
        with pytest.raises(RuntimeError):
            ctl.set_delay(-1)


def test_proxy_with_dead_target_closes_at_once(tmp_sock: str) -> None:
    with Topology(1) as topo:
        client = Agent(topo, 0)
        start_proxy(topo, 0, 8000, PORT, tmp_sock)  # nothing listens on PORT
        client.ok("open", id="c", addr=topo.address(0, 8000))  # the kernel accepted it
        assert not client.call("rtt", id="c", timeout=2)["ok"]
        with pytest.raises(RuntimeError, match="exited"):  # port taken: fails fast, no 5 s wait
            start_proxy(topo, 0, 8000, PORT, tmp_sock + ".2")


# -- cleanup -------------------------------------------------------------------------------

# Double-forks into a new session: out of reach of killpg, found only via `ip netns pids`.
DAEMON = ("import os, sys, time\n"
          "if os.fork() == 0:\n"
          "    os.setsid()\n"
          "    print(os.getpid(), flush=True)\n"
          "    time.sleep(30)\n")


def test_cleanup_when_body_raises() -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(2) as topo:
            names = [*topo.hosts, topo.switch]
            run_id = topo.run_id
            assert set(names) <= set(_netns_names())
            ags = agents(topo)
            daemon = topo.popen(1, [sys.executable, "-c", DAEMON], stdout=subprocess.PIPE, text=True)
            assert daemon.stdout
            pids += [a.proc.pid for a in ags] + [int(daemon.stdout.readline())]
            topo.cut(0, 1)
            raise RuntimeError("boom")
    assert not set(names) & set(_netns_names())
    assert wait_dead(pids) == []
    leftovers = [f for f in STATE_DIR.iterdir() if run_id in f.name or run_id in f.read_text()]
    assert leftovers == []


def _child(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter that creates a topology and prints its names."""
    script = ("import json, os, sys, time\n"
              "from tests.chaos.netns import Topology\n"
              "t = Topology(2)\n"
              "t.popen(0, [sys.executable, '-c', 'import time; time.sleep(30)'], stdout=-3, stderr=-3)\n"
              "print(json.dumps([*t.hosts, t.switch]), flush=True)\n" + code)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return json.loads(out.splitlines()[0])


def test_atexit_cleans_up_an_unclosed_topology() -> None:
    names = _child("")  # interpreter exits normally without close()
    assert not set(names) & set(_netns_names())


def test_sweep_stale_removes_namespaces_of_dead_runs() -> None:
    names = _child("os._exit(0)")  # no atexit: simulates a crash
    assert set(names) <= set(_netns_names())
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", names[0]], capture_output=True,
                                           text=True, check=True).stdout.split()]
    assert pids  # the orphaned sleeper
    sweep_stale()  # (a concurrent run's constructor may have swept them first: also fine)
    assert not set(names) & set(_netns_names())
    assert wait_dead(pids) == []
    with Topology(1) as live:
        sweep_stale()
        assert live.hosts[0] in _netns_names()  # a live run is never swept
