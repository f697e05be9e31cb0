"""Benchmark: failover, planned handoff, heartbeat round trip and idle CPU.

Runs real ``celery-cluster node`` processes on loopback and prints a table.

    python bench/failover.py            # full run (~10 min on 2 cores)
    python bench/failover.py --quick    # fewer trials (~2 min): `make bench-quick`

* failover: ``kill -9`` of the leader until another node's ``leader`` log event
  (``is_leader()`` became true there), both on the shared monotonic clock;
  the killed node is restarted and the cluster settles between trials.
* handoff: ``POST /cluster/stepdown`` until the new leader's ``leader`` event.
* heartbeat RTT, two views: (a) one peer at a time - an AppendEntries over a
  kept-alive loopback connection to a follower process, sequentially; (b) the leader's own
  measurement while it broadcasts to 4 peers
  at N=5, read from ``/cluster/status`` (``heartbeat_rtt``): four concurrent
  requests on 2 cores also wait for each other and for the GIL.
* idle CPU: utime+stime from ``/proc/PID/stat`` over 10 s, as % of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Member:
    address: str
    state_dir: Path
    log: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    offset: int = 0  # bytes of the log already read

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def events(self) -> list[dict]:
        """New JSON transition events since the last call."""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "event" in rec:
                out.append(rec)
        return out

    def status(self, timeout: float = 0.5) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{self.address}/cluster/status", timeout=timeout) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class ProcCluster:
    n: int
    timeout: tuple[float, float]
    heartbeat: float
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cc-bench-")))
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(self.n)
        addrs = [f"127.0.0.1:{p}" for p in ports]
        for a in addrs:
            d = self.root / a.replace(":", "_")
            d.mkdir()
            args = [PYTHON, "-m", "celery_cluster", "node", "--listen", a, "--nodes", ",".join(addrs),
                    "--state-dir", str(d), "--log-format", "json",
                    "--election-timeout", f"{self.timeout[0]}-{self.timeout[1]}",
                    "--heartbeat-interval", str(self.heartbeat)]
            self.members.append(Member(a, d, d / "node.log", args))

    def __enter__(self) -> ProcCluster:
        for m in self.members:
            m.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.members:
            if m.proc and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def leader(self, deadline: float) -> Member:
        """Wait until every live member agrees on one leader that holds its lease."""
        while time.monotonic() < deadline:
            st = {m.address: m.status() for m in self.members if m.proc.poll() is None}
            leaders = [a for a, s in st.items() if s and s["is_leader"]]
            if len(leaders) == 1 and all(s and s["leader_id"] == leaders[0] for s in st.values()):
                return next(m for m in self.members if m.address == leaders[0])
            time.sleep(0.02)
        raise TimeoutError("no stable leader")

    def wait_leader_event(self, exclude: Member | None, after: float, deadline: float) -> float:
        """Monotonic time of the first `leader` event after `after` on a member other than `exclude`."""
        while time.monotonic() < deadline:
            for m in self.members:
                if m is exclude:
                    continue
                for ev in m.events():
                    if ev["event"] == "leader" and ev["mono"] > after:
                        return ev["mono"]
            time.sleep(0.002)
        raise TimeoutError("no new leader")

    def drain_events(self) -> None:
        for m in self.members:
            m.events()


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def bench_failover(n: int, timeout: tuple[float, float], hb: float, trials: int) -> list[float]:
    out: list[float] = []
    with ProcCluster(n, timeout, hb) as cl:
        leader = cl.leader(time.monotonic() + 30)
        for _ in range(trials):
            time.sleep(timeout[1])  # let every follower hear a few heartbeats (and restarts age past min)
            cl.drain_events()
            t_kill = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            new = cl.wait_leader_event(leader, t_kill, t_kill + 20 * timeout[1])
            out.append(new - t_kill)
            leader.proc.wait()
            leader.start()  # back with its persisted state
            leader = cl.leader(time.monotonic() + 30)
    return out


def bench_handoff(n: int, timeout: tuple[float, float], hb: float, trials: int) -> list[float]:
    out: list[float] = []
    with ProcCluster(n, timeout, hb) as cl:
        leader = cl.leader(time.monotonic() + 30)
        for _ in range(trials):
            time.sleep(5 * hb)
            cl.drain_events()
            t0 = time.monotonic()
            req = urllib.request.Request(f"http://{leader.address}/cluster/stepdown", method="POST", data=b"")
            urllib.request.urlopen(req, timeout=2).read()
            out.append(cl.wait_leader_event(leader, t0, t0 + 10) - t0)
            leader = cl.leader(time.monotonic() + 10)
    return out


def cpu_percent(members: list, seconds: float) -> dict[str, float]:
    """% of one core each member's process used over ``seconds``, after 2 s to settle."""
    time.sleep(2)
    before = {m.address: m.cpu_seconds() for m in members}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {m.address: (m.cpu_seconds() - before[m.address]) / elapsed * 100 for m in members}


def bench_idle(n: int, timeout: tuple[float, float], hb: float, seconds: float) -> dict:
    with ProcCluster(n, timeout, hb) as cl:
        leader = cl.leader(time.monotonic() + 30)
        cpu = cpu_percent(cl.members, seconds)
        rtts = [p["heartbeat_rtt"] for p in leader.status()["nodes"]]
        return {
            "leader_cpu_pct": cpu[leader.address],
            "max_follower_cpu_pct": max(v for a, v in cpu.items() if a != leader.address),
            "rtt_p50_ms": sorted(r["p50_ms"] for r in rtts)[len(rtts) // 2],
            "rtt_p99_ms": max(r["p99_ms"] for r in rtts),
            "rtt_samples": sum(r["samples"] for r in rtts),
        }


def bench_rtt_sequential(requests: int) -> list[float]:
    from celery_cluster.http_client import parse_response
    from celery_cluster.messages import AppendEntries, encode

    with ProcCluster(3, (1.0, 2.0), 0.1) as cl:
        leader = cl.leader(time.monotonic() + 30)
        follower = next(m for m in cl.members if m is not leader)
        host, port = follower.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A heartbeat of an old term: handled in full, answered, changes nothing.
        body = json.dumps(encode(AppendEntries(0, leader.address, 1, (0, 0), None))).encode()
        request = (f"POST /cluster/appendentries HTTP/1.1\r\nHost: {follower.address}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        out = []
        for _ in range(requests):
            t0 = time.perf_counter()
            sock.sendall(request)
            buf = b""
            while (parsed := parse_response(buf)) is None:
                buf += sock.recv(65536)
            out.append(time.perf_counter() - t0)
            assert parsed[0] == 200
        sock.close()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    default, fast = ((1.0, 2.0), 0.1), ((0.15, 0.3), 0.03)
    slow_trials, fast_trials, handoffs = (12, 40, 30) if args.quick else (60, 200, 100)
    rows = []

    def row(name: str, samples: list[float], target: str) -> None:
        ms = [s * 1000 for s in samples]
        rows.append((name, len(ms), pct(ms, 50), pct(ms, 99), max(ms), target))
        print(f"  {name}: n={len(ms)} p50={pct(ms, 50):.0f} ms p99={pct(ms, 99):.0f} ms max={max(ms):.0f} ms",
              file=sys.stderr, flush=True)

    for n in (3, 5):
        row(f"failover kill -9, N={n}, 1.0-2.0 s", bench_failover(n, *default, slow_trials),
            "p50 <= 1500, p99 <= 2500")
    for n in (3, 5):
        row(f"failover kill -9, N={n}, 0.15-0.3 s", bench_failover(n, *fast, fast_trials),
            "p50 <= 171, p99 <= 415")
    row("handoff via stepdown, N=3, 1.0-2.0 s", bench_handoff(3, *default, handoffs), "p50 <= 50")
    seq = [s * 1000 for s in bench_rtt_sequential(2000)]
    idle = bench_idle(5, *default, 10.0)

    print("\n| measurement | trials | p50 ms | p99 ms | max ms | target |")
    print("|---|---|---|---|---|---|")
    for name, k, p50, p99, mx, target in rows:
        print(f"| {name} | {k} | {p50:.0f} | {p99:.0f} | {mx:.0f} | {target} |")
    print(f"| heartbeat RTT, one peer at a time | {len(seq)} | {pct(seq, 50):.3f} | {pct(seq, 99):.3f} | "
          f"{max(seq):.3f} | p50 <= 0.5 |")
    print(f"| heartbeat RTT (leader's view, broadcast to 4), N=5 | {idle['rtt_samples']} | {idle['rtt_p50_ms']:.3f} | "
          f"{idle['rtt_p99_ms']:.3f} | - | p50 <= 0.5 |")
    print(f"\nidle CPU at N=5 (10 s): leader {idle['leader_cpu_pct']:.2f} % of a core "
          f"(target <= 1 %), busiest follower {idle['max_follower_cpu_pct']:.2f} %")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "idle": idle}, indent=2))


if __name__ == "__main__":
    main()
