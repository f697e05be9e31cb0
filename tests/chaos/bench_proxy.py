"""Measure what the proxy adds at zero delay: ``sudo .venv/bin/python -m tests.chaos.bench_proxy``.

300-byte request, 300-byte echo reply, one keep-alive connection, 2000 round trips after
200 of warm-up; client and echo server are agents (agent.py). Prints p50/p99 for the
direct path and through the proxy, in the same namespace and across the bridge.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from tests.chaos.agent import Agent
from tests.chaos.netns import Topology
from tests.chaos.proxy import start_proxy


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e6


def main(count: int = 2000) -> None:
    with Topology(2) as topo, tempfile.TemporaryDirectory() as tmp:
        server, remote = Agent(topo, 1), Agent(topo, 0)
        local = Agent(topo, 1)
        server.ok("listen_tcp", port=7000, host="127.0.0.1")
        server.ok("listen_tcp", port=7001, host=topo.host_ip(1))
        start_proxy(topo, 1, 8000, 7000, str(Path(tmp) / "p.sock"))
        paths = {
            "same ns, direct (lo)": (local, "127.0.0.1:7000"),
            "same ns, via proxy": (local, topo.address(1, 8000)),
            "across bridge, direct": (remote, topo.address(1, 7001)),
            "across bridge, via proxy": (remote, topo.address(1, 8000)),
        }
        for name, (agent, addr) in paths.items():
            agent.ok("open", id=name, addr=addr)
            agent.ok("rtt", id=name, count=200, deadline=30)
            rtts = agent.ok("rtt", id=name, count=count, deadline=60)["rtts"]
            print(f"{name:26s} p50 {_pct(rtts, .5):6.0f} us  p99 {_pct(rtts, .99):6.0f} us"
                  f"  mean {statistics.mean(rtts) * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
