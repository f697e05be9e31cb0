"""Benchmark: heartbeat round trip and leader CPU with TLS between members, against plain HTTP.

    python bench/tls_rtt.py [--seconds 20] [--nodes 3]      # `make bench-tls`

Runs real ``celery-cluster node`` processes on loopback twice - plain, then mutual TLS with
a throwaway CA (``openssl``) - with the default timing (heartbeat 0.1 s), lets each settle,
then reads the leader's own measurement of its heartbeats (``heartbeat_rtt`` in
``/cluster/status``: p50/p99 over the last 512 per peer) and the leader process's CPU over
the window. Each heartbeat is one request on a kept-alive connection, so TLS costs record
encryption, not handshakes (one per connection).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.certs import CA
from tests.support import free_ports

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run(mode: str, nodes: int, seconds: float, tmp: Path) -> dict:
    ports = free_ports(nodes)
    members = ",".join(f"127.0.0.1:{p}" for p in ports)
    extra: list[str] = []
    ctx = None
    scheme = "http"
    if mode == "tls":
        cert = CA(tmp, "bench").issue("member")
        extra = ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-ca", str(cert.ca)]
        ctx = ssl.create_default_context(cafile=str(cert.ca))
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        scheme = "https"
    procs = {p: subprocess.Popen([sys.executable, "-m", "celery_cluster", "node", "--listen", f"127.0.0.1:{p}",
                                  "--nodes", members, "--state-dir", str(tmp / f"{mode}-{p}"), *extra],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in ports}

    def status(port: int) -> dict | None:
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/cluster/status", timeout=1,
                                        context=ctx) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    try:
        deadline = time.monotonic() + 30
        leader = None
        while time.monotonic() < deadline and leader is None:
            leaders = [p for p in ports if (status(p) or {}).get("is_leader")]
            leader = leaders[0] if len(leaders) == 1 else None
            time.sleep(0.1)
        assert leader is not None, f"{mode}: no leader"
        time.sleep(5)  # settle: connections up, caches warm
        cpu0, t0 = cpu_seconds(procs[leader].pid), time.monotonic()
        time.sleep(seconds)
        cpu = (cpu_seconds(procs[leader].pid) - cpu0) / (time.monotonic() - t0) * 100
        st = status(leader)
        assert st is not None
        rtts = [n["heartbeat_rtt"] for n in st["nodes"]]
        return {"mode": mode, "p50_ms": round(sum(r["p50_ms"] for r in rtts) / len(rtts), 3),
                "p99_ms": round(max(r["p99_ms"] for r in rtts), 3), "samples": sum(r["samples"] for r in rtts),
                "leader_cpu_pct": round(cpu, 1)}
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="celery-cluster-tls-bench-") as tmp:
        results = [run(mode, args.nodes, args.seconds, Path(tmp)) for mode in ("plain", "tls")]
    print(f"heartbeat round trip as the leader measures it, {args.nodes} nodes, heartbeat 0.1 s, "
          f"{args.seconds:g} s per mode ({os.cpu_count()} cores)")
    print(f"{'mode':<6} {'p50 ms':>8} {'p99 ms':>8} {'samples':>8} {'leader CPU %':>13}")
    for r in results:
        print(f"{r['mode']:<6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['samples']:>8} {r['leader_cpu_pct']:>13}")


if __name__ == "__main__":
    main()
