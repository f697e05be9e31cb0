"""Benchmark: many periodic tasks, the cluster's leader beat side by side with stock `celery beat`.

    python bench/beat_many.py [--trials 2]

Two cells, each run for stock beat and for the cluster (three prefork workers, the leader
runs beat) in turn, trial by trial, on the local Redis; beat sends every task to a queue
nobody consumes, and the bench samples its length every 20 ms:

* throughput: 1,000 entries every 5 s for 30 s - messages published (and per second);
* burst: 5,000 entries on a crontab firing at every wall-clock minute, so all fall due at
  the same known instant - the time from that instant to the last publish of the round.

Targets (issue "Django and every scheduler"): throughput >= 0.9x stock; burst <= 1.5x stock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12")
SINK = f"bench-beat-sink-{os.getpid()}"


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=ROOT / "bench")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(10)


def run(kind: str, entries: int, period: float | str, seconds: float, tmp: Path,
        until: int | None = None) -> list[tuple[float, int, float]]:
    """Start stock beat or a 3-worker cluster; sample the sink's length for ``seconds`` from the
    first publish (or until it holds ``until`` messages, at most 300 s). Returns (time since
    first publish, messages, wall clock) samples."""
    r = redis.Redis.from_url(BROKER)
    r.delete(SINK)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}", "BENCH_BROKER": BROKER, "BENCH_SINK": SINK,
           "BENCH_ENTRIES": str(entries), "BENCH_PERIOD": str(period), "BENCH_QUEUE": f"bench-beat-{os.getpid()}"}
    celery = [sys.executable, "-m", "celery", "-A", "beat_app"]
    if kind == "stock":
        env["CELERY_CLUSTER_ALLOW_STANDALONE_BEAT"] = "yes"
        procs = [start([*celery, "beat", "-l", "warning", "-s", str(tmp / f"stock-{time.time()}")], env,
                       tmp / "stock.log")]
    else:
        from failover import free_ports

        addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
        procs = [start([*celery, "worker", "-P", "prefork", "-c", "1", "-n", f"bb{i}@%h", "-l", "warning",
                        "--without-mingle", "--without-gossip", "--cluster-nodes", ",".join(addrs),
                        "--cluster-listen", a, "--cluster-state-dir", str(tmp / f"{time.time()}-{i}")],
                       env, tmp / f"w{i}.log") for i, a in enumerate(addrs)]
    try:
        deadline = time.monotonic() + 120
        while r.llen(SINK) == 0:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"{kind}: nothing published (see {tmp})")
            time.sleep(0.005)
        first = time.monotonic()
        samples = []
        while (now := time.monotonic()) - first < (300.0 if until else seconds):
            samples.append((now - first, r.llen(SINK), time.time()))
            if until and samples[-1][1] >= until:
                break
            time.sleep(0.02)
        return samples
    finally:
        stop(procs)
        r.delete(SINK)


def burst_time(samples: list[tuple[float, int, float]], entries: int) -> float:
    """From the minute the round fell due to its last publish (wall clock)."""
    due = samples[0][2] // 60 * 60
    done = next((wall for _, n, wall in samples if n >= entries), None)
    if done is None:
        raise SystemExit(f"only {samples[-1][1]} of {entries} published in {samples[-1][0]:.0f} s")
    return done - due


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    tmp = Path(tempfile.mkdtemp(prefix="cc-beat-many-"))
    results: dict[str, dict[str, list[float]]] = {k: {"throughput": [], "burst": []} for k in ("stock", "cluster")}
    for trial in range(args.trials):
        for kind in ("stock", "cluster"):  # interleaved, trial by trial
            samples = run(kind, 1000, 5.0, 30.0, tmp)
            results[kind]["throughput"].append(samples[-1][1] / 30.0)
            samples = run(kind, 5000, "minute", 0.0, tmp, until=5000)
            results[kind]["burst"].append(burst_time(samples, 5000))
            print(f"trial {trial} {kind}: {results[kind]['throughput'][-1]:.0f} msg/s, "
                  f"burst of 5000 in {results[kind]['burst'][-1]:.2f} s", flush=True)
    med: dict[str, dict[str, Any]] = {k: {m: statistics.median(v) for m, v in c.items()} for k, c in results.items()}
    print("\n| cell | stock beat | cluster leader | ratio | target |")
    print("|---|---|---|---|---|")
    tp = med["cluster"]["throughput"] / med["stock"]["throughput"]
    bu = med["cluster"]["burst"] / med["stock"]["burst"]
    print(f"| 1,000 entries every 5 s, msg/s (median of {args.trials}) | {med['stock']['throughput']:.0f} | "
          f"{med['cluster']['throughput']:.0f} | {tp:.2f}x | >= 0.9x |")
    print(f"| 5,000 due at once, due instant to last publish, s | {med['stock']['burst']:.2f} | "
          f"{med['cluster']['burst']:.2f} | {bu:.2f}x | <= 1.5x |")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
