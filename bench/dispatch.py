"""Benchmark: `@leader_only` dispatch latency against a plain task, on Redis.

    python bench/dispatch.py [--tasks 300]

Three real prefork workers form a cluster; the client sends one task at a time,
alternating a plain task (any worker) and a leader-only task (routed to the
leader queue, lease-checked in the pool child), and measures send -> body
start with the wall clock of this machine. Target: leader-only p50 <= 1.1x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=300, help="tasks of each kind")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    os.environ.setdefault("BENCH_QUEUE", f"bench-{os.getpid()}")
    os.environ.setdefault("CELERY_CLUSTER_LEADER_QUEUE", f"bench-leader-{os.getpid()}")
    import dispatch_app  # after the environment is set
    from failover import free_ports, pct

    r = dispatch_app._redis
    r.delete("bench:started")
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    tmp = Path(tempfile.mkdtemp(prefix="cc-dispatch-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}"}
    procs = []
    for i, a in enumerate(addrs):
        log = open(tmp / f"w{i}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "dispatch_app", "worker", "-P", "prefork", "-c", "2",
             "-n", f"bench{i}@%h", "-l", "warning", "--without-mingle", "--without-gossip",
             "--cluster-nodes", ",".join(addrs), "--cluster-listen", a, "--cluster-state-dir", str(tmp / f"s{i}")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                st = [json.loads(urllib.request.urlopen(f"http://{a}/cluster/status", timeout=0.5).read())
                      for a in addrs]
                if sum(s["is_leader"] for s in st) == 1:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        time.sleep(3)  # the leader starts consuming its queue; workers warm up
        lat: dict[str, list[float]] = {"plain": [], "leader_only": []}
        for i in range(2 * args.tasks + 20):
            kind = "plain" if i % 2 else "leader_only"
            task = dispatch_app.plain if kind == "plain" else dispatch_app.led
            sent = time.time()
            task.delay(sent)
            item = r.blpop("bench:started", timeout=10)
            if item is None:
                raise SystemExit(f"{kind} task did not start within 10 s")
            _, started, _ = item[1].decode().split()
            if i >= 20:  # the first ones warm connections and pool children
                lat[kind].append((float(started) - sent) * 1000)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    print("| task | n | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for kind, v in lat.items():
        print(f"| {kind} | {len(v)} | {pct(v, 50):.2f} | {pct(v, 99):.2f} |")
    ratio = pct(lat["leader_only"], 50) / pct(lat["plain"], 50)
    print(f"\nleader_only / plain dispatch latency (p50): {ratio:.2f}x (target <= 1.1x)")


if __name__ == "__main__":
    main()
