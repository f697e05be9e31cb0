"""`make demo`: three Celery workers elect a leader; kill it; the schedule goes on.

    python examples/basic/demo.py              # kombu filesystem broker: no server needed
    BROKER_URL=redis://127.0.0.1:6379/9 python examples/basic/demo.py

Starts three ``celery worker`` processes of ``examples.basic.app`` on loopback,
prints who leads, sends leader-only tasks, kills the leader with SIGKILL,
shows the 2 s schedule continuing from the new leader, and checks that no
scheduled run was sent twice (every firing carries its replicated run number).
Exits 0 with a summary, 1 if a check fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PERIOD = 2.0


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def status(address: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{address}/cluster/status", timeout=0.5) as r:
            return json.loads(r.read())
    except OSError:
        return None


class Timeout(Exception):
    pass


def wait_for(what: str, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise Timeout(what)


def show_logs(demo_dir: Path, lines: int = 25) -> None:
    """After a failed wait: the end of each worker's log, so the reason is on screen."""
    for log in sorted(demo_dir.glob("worker*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log} (last {len(tail)} lines)", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)


def main() -> int:
    demo_dir = Path(tempfile.mkdtemp(prefix="celery-cluster-demo-"))
    broker = os.environ.get("BROKER_URL", "")
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    env = {**os.environ, "DEMO_DIR": str(demo_dir), "BROKER_URL": broker,
           "DEMO_QUEUE": f"demo-{os.getpid()}", "CELERY_CLUSTER_LEADER_QUEUE": f"demo-leader-{os.getpid()}",
           "PYTHONPATH": str(ROOT)}
    workers: dict[str, subprocess.Popen] = {}

    def start(i: int) -> None:
        log = open(demo_dir / f"worker{i}.log", "ab")
        workers[addrs[i]] = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.basic.app", "worker", "-P", "prefork", "-c", "1",
             "-n", f"demo{i}@%h", "-l", "info", "--without-mingle", "--without-gossip",
             "--cluster-nodes", ",".join(addrs), "--cluster-listen", addrs[i],
             "--cluster-state-dir", str(demo_dir / f"state{i}")],
            cwd=ROOT, env={**env, "DEMO_WORKER": f"demo{i}"}, stdout=log, stderr=subprocess.STDOUT)

    def leader() -> str | None:
        st = [status(a) for a in addrs if workers[a].poll() is None]
        leaders = [s["id"] for s in st if s and s["is_leader"]]
        return leaders[0] if len(leaders) == 1 else None

    def records() -> list[dict]:
        path = demo_dir / "records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    print(f"demo: broker {broker or 'filesystem:// (kombu, no server)'}; state in {demo_dir}")
    try:
        for i in range(3):
            start(i)
        first = wait_for("a leader", leader, 60)
        print(f"demo: leader is {first} (worker demo{addrs.index(first)}), term {status(first)['term']}")

        env_app = {**env}
        sender = subprocess.run(
            [sys.executable, "-c", "from examples.basic.app import rebuild_index\n"
             "for i in range(5): rebuild_index.delay(i)"], cwd=ROOT, env=env_app, check=True)
        assert sender.returncode == 0

        def leader_with_runs() -> tuple[str, int] | None:
            # Whoever leads now, once it has sent 3 runs in its term (leadership may have
            # moved since the first look, e.g. while a slow machine was starting the workers).
            current = leader()
            st = status(current) if current else None
            if st and sum(1 for r in records() if r["task"] == "report" and r["term"] == st["term"]) >= 3:
                return current, st["term"]
            return None

        first, term = wait_for("3 scheduled runs from the leader", leader_with_runs, 30)
        print(f"demo: {first} (worker demo{addrs.index(first)}) sent 3 scheduled runs in term {term}")

        victim = workers[first]
        t_kill = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        print(f"demo: killed the leader {first} with SIGKILL")
        second = wait_for("a new leader", leader, 30)
        failover = time.monotonic() - t_kill
        new_term = status(second)["term"]
        print(f"demo: new leader is {second} (worker demo{addrs.index(second)}), term {new_term}, "
              f"elected {failover:.2f} s after the kill")
        wait_for("3 scheduled runs from the new leader",
                 lambda: sum(1 for r in records() if r["task"] == "report" and r["term"] == new_term) >= 3, 30)
        wait_for("all 5 leader-only tasks",
                 lambda: len({r["i"] for r in records() if r["task"] == "rebuild_index"}) == 5, 30)
    except Timeout as exc:
        print(f"demo: timed out waiting for {exc}", file=sys.stderr)
        failed = True
    else:
        failed = False
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in workers.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    if failed:
        show_logs(demo_dir)
        print("demo: FAILED")
        return 1
    runs = [r for r in records() if r["task"] == "report"]
    numbers = [r["run"] for r in runs]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    gaps = sorted(set(range(min(numbers), max(numbers) + 1)) - set(numbers))
    leader_only = [r for r in records() if r["task"] == "rebuild_index"]
    print("\ndemo: scheduled runs (run number: term that sent it)")
    print("   " + ", ".join(f"{r['run']}:t{r['term']}" for r in sorted(runs, key=lambda r: r["run"])))
    print(f"demo: leader-only tasks ran {len(leader_only)} times for {len({r['i'] for r in leader_only})} "
          f"distinct tasks, in terms {sorted({r['term'] for r in leader_only})}")
    print(f"demo: duplicate runs: {duplicates or 'none'}; skipped run numbers: {gaps or 'none'}; "
          f"failover {failover:.2f} s")
    ok = not duplicates and len(leader_only) == 5
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
