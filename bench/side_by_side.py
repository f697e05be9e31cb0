"""Side by side with PySyncObj: failover after ``kill -9`` (B1/B2), cold start (B6), idle cost (B5).

    python bench/side_by_side.py            # full: 50 trials per cell (`make bench`)
    python bench/side_by_side.py --quick    # 12 trials per cell, fewer cells (`make bench-quick`)

Both systems run on loopback at the same time, with identical timeouts, and are measured
trial by trial, interleaved (ours, then PySyncObj, then PySyncObj, then ours...), so drift
on the shared machine hits both alike; what to compare is the ratio. The peer is installed
by ``bench/requirements.txt``, its version recorded in the results.

* failover: ``kill -9`` of the leader at a uniformly random point of a heartbeat interval
  (after the cluster was stable for the maximum timeout) until another node's ``leader``
  transition, on the shared monotonic clock. Ours logs ``leader`` when it holds its lease
  (a majority acknowledged its first heartbeat round: one round trip *after* winning the
  vote); PySyncObj logs its state change to leader (on winning the vote). The killed node
  is restarted and the cluster settles between trials.
* cold start: every node spawned at once until the first ``leader`` transition, from the
  first spawn (interpreter start-up and imports included).
* idle: CPU seconds (utime+stime, ``/proc/PID/stat``) over a window, as % of one core,
  leader and busiest follower, N=5.

Writes ``bench/results/<date>.json`` (with the machine), ``docs/bench/side_by_side.md``
and ``docs/bench/failover.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from failover import Member, ProcCluster, cpu_percent, free_ports, pct

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class PeerMember(Member):
    """A PySyncObj node: it writes its own log (``pysyncobj_node.py``), one file for all its
    incarnations; only the current one's lines count."""

    last: str = "follower"  # its latest logged state
    since: float = 0.0
    links: int = 0  # partners it is connected to, as it last logged

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.last, self.since, self.links = "follower", time.monotonic(), 0

    def events(self) -> list[dict]:
        if not self.log.exists():
            return []
        out = []
        for rec in super().events():
            if self.proc is None or rec.get("pid") != self.proc.pid:
                continue
            if rec["event"] == "links":
                self.links = rec["connected"]
                continue
            out.append(rec)
            self.last, self.since = rec["event"], rec["mono"]
        return out


@dataclass
class SyncObjCluster(ProcCluster):
    """PySyncObj nodes, one process each (``bench/peers/pysyncobj_node.py``); started,
    stopped and drained as our own cluster is."""

    watch: bool = True  # wait for full connectivity before a kill (off for the idle measurement)

    def __post_init__(self) -> None:
        addrs = [f"127.0.0.1:{p}" for p in free_ports(self.n)]
        for a in addrs:
            args = [PYTHON, str(REPO / "bench" / "peers" / "pysyncobj_node.py"), "--self", a,
                    "--partners", ",".join(x for x in addrs if x != a),
                    "--timeout", f"{self.timeout[0]}-{self.timeout[1]}", "--heartbeat", str(self.heartbeat),
                    "--log", str(self.root / (a.replace(":", "_") + ".log")), *([] if self.watch else ["--no-watch"])]
            self.members.append(PeerMember(a, self.root, self.root / (a.replace(":", "_") + ".log"), args))

    def leader(self, deadline: float) -> PeerMember:
        """One live member leads (for 3 heartbeats), none campaigns, and (when watched) every
        live member is connected to every partner."""
        while time.monotonic() < deadline:
            self.drain_events()
            live = [m for m in self.members if m.proc is not None and m.proc.poll() is None]
            leaders = [m for m in live if m.last == "leader"]
            if (len(leaders) == 1 and not any(m.last == "candidate" for m in live)
                    and time.monotonic() - leaders[0].since > 3 * self.heartbeat
                    and (not self.watch or all(m.links == self.n - 1 for m in live))):
                return leaders[0]
            time.sleep(0.02)
        raise TimeoutError("no stable PySyncObj leader")


def kill_trial(cl: ProcCluster, timeout: tuple[float, float], hb: float) -> float:
    """One kill -9 of the leader; seconds to another node's leader transition."""
    leader = cl.leader(time.monotonic() + 30)
    time.sleep(timeout[1] + random.uniform(0, hb))  # stable; then a random point of a heartbeat interval
    cl.drain_events()
    t_kill = time.monotonic()
    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGKILL)
    took = cl.wait_leader_event(leader, t_kill, t_kill + 20 * timeout[1]) - t_kill
    leader.proc.wait()
    leader.start()  # back (ours with its persisted state; PySyncObj keeps none by default)
    return took


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(samples, 50) * 1000, 1), "p99_ms": round(pct(samples, 99) * 1000, 1),
            "max_ms": round(max(samples) * 1000, 1), "trials": len(samples)}


def failover_cell(n: int, timeout: tuple[float, float], hb: float, trials: int) -> dict:
    ours: list[float] = []
    theirs: list[float] = []
    with ProcCluster(n, timeout, hb) as a, SyncObjCluster(n, timeout, hb) as b:
        for i in range(trials):
            order = [(a, ours), (b, theirs)] if i % 2 == 0 else [(b, theirs), (a, ours)]
            for cl, out in order:
                out.append(kill_trial(cl, timeout, hb))
    o, t = summary(ours), summary(theirs)
    return {"n": n, "timeout": list(timeout), "heartbeat": hb, "ours": o, "pysyncobj": t,
            "ratio_p50": round(o["p50_ms"] / t["p50_ms"], 2), "ratio_p99": round(o["p99_ms"] / t["p99_ms"], 2),
            "samples": {"ours": ours, "pysyncobj": theirs}}


def cold_start_cell(n: int, timeout: tuple[float, float], hb: float, trials: int) -> dict:
    """B6: all ``n`` processes started at once; seconds from the first spawn to the first
    ``leader`` transition (interpreter start-up and imports included)."""
    out: dict[str, list[float]] = {"ours": [], "pysyncobj": []}
    for i in range(trials):
        order = [("ours", ProcCluster), ("pysyncobj", SyncObjCluster)]
        for name, make in (order if i % 2 == 0 else order[::-1]):
            cl = make(n, timeout, hb)  # type: ignore[operator]
            t0 = time.monotonic()
            with cl:
                out[name].append(cl.wait_leader_event(None, t0, t0 + 60) - t0)
    return {"n": n, "timeout": list(timeout), "heartbeat": hb, "ours": summary(out["ours"]),
            "pysyncobj": summary(out["pysyncobj"]), "target_ms": 2 * timeout[1] * 1000}


def idle_cell(n: int, timeout: tuple[float, float], hb: float, seconds: float) -> dict:
    out = {}
    for name, make in (("ours", ProcCluster), ("pysyncobj", lambda *a: SyncObjCluster(*a, watch=False))):
        with make(n, timeout, hb) as cl:  # type: ignore[operator]
            leader = cl.leader(time.monotonic() + 30)
            cpu = cpu_percent(cl.members, seconds)
            out[name] = {"leader_pct": round(cpu[leader.address], 2),
                         "busiest_follower_pct": round(max(v for a, v in cpu.items() if a != leader.address), 2)}
    return {"n": n, "timeout": list(timeout), "heartbeat": hb, "seconds": seconds, **out}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def cell_name(c: dict) -> str:
    lo, hi = c["timeout"]
    return f"N={c['n']}, {lo:g}-{hi:g} s, hb {c['heartbeat']:g}"


def markdown(res: dict) -> str:
    lines = [f"Measured {res['date']} with `{res['command']}` on {res['machine']['cpu']} "
             f"({res['machine']['cores']} cores), PySyncObj {res['versions']['pysyncobj']}.", "",
             "| failover after kill -9 | trials | ours p50 / p99 / max ms | PySyncObj p50 / p99 / max ms "
             "| ratio p50 | ratio p99 |", "|---|---|---|---|---|---|"]
    for c in res["failover"]:
        o, t = c["ours"], c["pysyncobj"]
        lines.append(f"| {cell_name(c)} | {o['trials']} | {o['p50_ms']:.0f} / {o['p99_ms']:.0f} / {o['max_ms']:.0f} "
                     f"| {t['p50_ms']:.0f} / {t['p99_ms']:.0f} / {t['max_ms']:.0f} | {c['ratio_p50']:.2f} "
                     f"| {c['ratio_p99']:.2f} |")
    if res.get("cold_start"):
        lines += ["", "| cold start, all started at once, 1-2 s | trials | ours p50 / max ms | PySyncObj p50 / max ms "
                  "| target |", "|---|---|---|---|---|"]
        for c in res["cold_start"]:
            o, t = c["ours"], c["pysyncobj"]
            lines.append(f"| N={c['n']} | {o['trials']} | {o['p50_ms']:.0f} / {o['max_ms']:.0f} "
                         f"| {t['p50_ms']:.0f} / {t['max_ms']:.0f} | ≤ {c['target_ms']:.0f} |")
    idle = res.get("idle")
    if idle:
        lines += ["", "| idle CPU, " + cell_name(idle) + " | leader % of a core | busiest follower % |",
                  "|---|---|---|",
                  f"| ours | {idle['ours']['leader_pct']:.2f} | {idle['ours']['busiest_follower_pct']:.2f} |",
                  f"| PySyncObj | {idle['pysyncobj']['leader_pct']:.2f} "
                  f"| {idle['pysyncobj']['busiest_follower_pct']:.2f} |"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = res["failover"]
    fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.4), squeeze=False)
    for ax, c in zip(axes[0], cells):
        for name, style in (("ours", "-"), ("pysyncobj", "--")):
            xs = sorted(v * 1000 for v in c["samples"][name])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], style,
                    label="celery-cluster" if name == "ours" else "PySyncObj")
        ax.axvline(c["timeout"][0] * 1000, color="grey", linewidth=0.8)
        ax.set_title(cell_name(c), fontsize=9)
        ax.set_xlabel("failover after kill -9 (ms)")
        ax.set_ylabel("fraction of trials")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 trials per cell, three cells (a few minutes)")
    ap.add_argument("--trials", type=int, help="trials per cell (default 50, quick 12)")
    args = ap.parse_args()
    trials = args.trials or (12 if args.quick else 50)
    fast, wide, default = ((0.15, 0.3), 0.03), ((0.4, 1.4), 0.1), ((1.0, 2.0), 0.1)
    cells = [(3, *fast), (5, *fast), (3, *wide), (3, *default)]
    if not args.quick:
        cells += [(7, *fast), (9, *fast), (5, *wide), (5, *default)]
    res: dict = {"date": datetime.date.today().isoformat(), "machine": machine(),
                 "command": "make bench-quick" if args.quick else "make bench",
                 "versions": {"celery-cluster": metadata.version("celery-cluster"),
                              "pysyncobj": metadata.version("pysyncobj")},
                 "failover": [], "cold_start": [], "idle": None}
    for n, timeout, hb in cells:
        c = failover_cell(n, timeout, hb, trials)
        res["failover"].append(c)
        print(f"{cell_name(c)}: ours {c['ours']}, PySyncObj {c['pysyncobj']}, ratio p50 {c['ratio_p50']}", flush=True)
    res["cold_start"] = [cold_start_cell(n, *default, trials=3 if args.quick else 10)
                         for n in ((3, 5) if args.quick else (3, 5, 7, 9))]
    for c in res["cold_start"]:
        print(f"cold start N={c['n']}: ours {c['ours']}, PySyncObj {c['pysyncobj']}", flush=True)
    res["idle"] = idle_cell(5, *default, seconds=10 if args.quick else 30)
    print(f"idle: {res['idle']}", flush=True)
    out = REPO / "bench" / "results" / f"{res['date']}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    (REPO / "docs" / "bench" / "side_by_side.md").write_text(markdown(res))
    plot(res, REPO / "docs" / "bench" / "failover.png")
    print("\n" + markdown(res))
    print(f"wrote {out.relative_to(REPO)}, docs/bench/side_by_side.md, docs/bench/failover.png")


if __name__ == "__main__":
    main()
