"""The chaos run: real processes in network namespaces, a seeded random schedule of faults,
and the checker's verdict.

Topology (``tests/chaos/netns.py``, silent drops: a partition loses packets, it does not
refuse them): one host per node, plus an infrastructure host that is never cut off and
runs the control process (``ctl.py``) and, in worker mode, Redis. Partitions separate
nodes from each other; every node keeps its path to the broker (a leader cut off from
its broker is the subject of its own issue). Every node listens on
127.0.0.1 inside its host behind a TCP proxy on the host's address (``proxy.py``), which
it advertises: peers reach it only through the proxy, which can add delay. Every node's
state directory is its own small tmpfs, so "disk full" is real.

Modes: ``standalone`` runs ``tests/chaos/node.py`` (the CLI's Cluster plus leader work and
a jumpable clock); ``worker`` runs ``celery -A tests.chaos.app worker -P prefork -c 2``.

Faults, one at a time, each healed before the next: kill -9 (and restart on the same
state dir), SIGSTOP/SIGCONT past the election timeout, the leader isolated, a
majority/minority split, one cut link, one-way (the leader cannot send), a random
partition, delay with jitter through the proxies, a full state disk (the node must
fail-stop; it is restarted once there is room again), a burst of stepdowns every few
hundred ms, a forward clock jump of the leader (SIGUSR2), a member replaced (removed
through the leader - often the leader itself -, killed, its state wiped, started again
with --join and added back); in worker mode the
``leader_elected`` receiver is slow (0.2 s) throughout. After each heal, an agreed
leader must appear within 3 s. The history goes to ``history.json``; one summary line
is printed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery_cluster.clock import lease_clock
from tests.chaos.checker import Verdict, check
from tests.chaos.netns import Topology
from tests.chaos.proxy import ProxyControl, proxy_argv
from tests.chaos.relay import rabbitmq_in, redis_in

REPO = Path(__file__).resolve().parents[2]
PORT = 8899
TIMEOUT = (0.5, 1.0)
HEARTBEAT = 0.05
LIVENESS_BOUND = 3.0
FAULTS = ("kill", "pause", "isolate", "split", "cut", "oneway", "partition", "delay", "disk", "stepdowns", "jump",
          "replace")


@dataclasses.dataclass
class Member:
    index: int
    name: str
    address: str
    disk: Path
    proxy: ProxyControl | None = None
    runs: list[tuple[subprocess.Popen[Any], Path]] = dataclasses.field(default_factory=list)
    stopped: bool = False  # SIGSTOPped
    failed: bool = False  # fail-stopped (worker mode: alive, out of the cluster)
    join: bool = False  # its next start asks to be added (--join) instead of bootstrapping

    @property
    def proc(self) -> subprocess.Popen[Any] | None:
        return self.runs[-1][0] if self.runs else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ChaosRun:
    """``broker_host``: the broker gets a host of its own (index ``broker_index``), so a test can
    cut a worker's path to it (``topo.cut(i, run.broker_index)``) and nothing else; ``broker``
    is ``redis`` (a redis-server there) or ``rabbitmq`` (the machine's RabbitMQ, behind a
    relay there: ``tests/chaos/relay.py``). ``worker_args`` and ``env`` go to every worker."""

    def __init__(self, mode: str, *, nodes: int, seconds: float, seed: int, out: Path, broker: str = "redis",
                 broker_host: bool = False, worker_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        assert mode in ("standalone", "worker")
        assert broker in ("redis", "rabbitmq") and (broker == "redis" or broker_host)
        self.mode, self.n, self.seconds, self.seed, self.out = mode, nodes, seconds, seed, out
        self.broker_kind, self.broker_host = broker, broker_host
        self.broker_index = nodes + 1 if broker_host else nodes
        self.worker_args, self.extra_env = list(worker_args), dict(env or {})
        self.relay: subprocess.Popen[bytes] | None = None
        self.rng = random.Random(seed)
        self.records = out / "records.jsonl"
        self.secret = out / "secret"
        self.faults: list[dict[str, Any]] = []
        self.liveness: list[tuple[float, float | None]] = []
        self.ended: dict[tuple[str, int], float] = {}
        self.problems: list[str] = []  # harness-level violations (exit codes...)
        self.members: list[Member] = []
        self.topo: Topology | None = None
        self.ctl: subprocess.Popen[str] | None = None
        self._ctl_lock = threading.Lock()
        self.mounts: list[Path] = []

    # -- setup and teardown ------------------------------------------------------------------

    def __enter__(self) -> ChaosRun:
        self.out.mkdir(parents=True, exist_ok=True)
        self.secret.write_text(os.urandom(16).hex())
        self.topo = Topology(self.n + (2 if self.broker_host else 1), drop="silent")
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup(self) -> None:
        topo = self.topo
        assert topo is not None
        infra = self.n
        nodes = ",".join(topo.address(i, PORT) for i in range(self.n))
        self.nodes_arg = nodes
        bhost = self.broker_index
        if self.broker_kind == "redis":
            redis_dir = self.out / "redis"
            redis_dir.mkdir(exist_ok=True)
            self.broker = (redis_in(topo, bhost, redis_dir) if self.mode == "worker"
                           else f"redis://{topo.host_ip(bhost)}:6379/0")  # unused: nothing publishes
        else:
            self.broker, self.relay = rabbitmq_in(topo, bhost, self.out)
        self.ctl = topo.popen(infra, [sys.executable, "-m", "tests.chaos.ctl", "--secret-file", str(self.secret)],
                              cwd=REPO, env=self._env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(self.out / "ctl.err", "wb"), text=True)
        assert json.loads(self.ctl.stdout.readline()) == {"ready": True}  # type: ignore[union-attr]
        for i in range(self.n):
            disk = self.out / f"disk{i}"
            disk.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(disk)], check=True)
            self.mounts.append(disk)
            m = Member(i, f"n{i}", topo.address(i, PORT), disk)
            control = str(self.out / f"proxy{i}.sock")
            proc = topo.popen(i, proxy_argv(m.address, f"127.0.0.1:{PORT}", control), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=open(self.out / f"proxy{i}.err", "wb"))
            m.proxy = ProxyControl(control)
            m.proxy.wait_ready(proc=proc)
            self.members.append(m)
        for m in self.members:
            self.start(m)

    def __exit__(self, *exc: object) -> None:
        if self.topo is not None:
            self.topo.close()
        if self.relay is not None:
            self.relay.kill()
            self.relay.wait(5)
        for disk in self.mounts:
            subprocess.run(["umount", "-l", str(disk)], check=False)

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_CLUSTER_", "CHAOS_"))}
        env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CHAOS_BROKER=getattr(self, "broker", ""),
                   CHAOS_RECORDS=str(self.records), **self.extra_env, **extra)
        return env

    # -- processes -------------------------------------------------------------------------------

    def start(self, m: Member) -> None:
        assert self.topo is not None
        run = len(m.runs)
        state = m.disk / "state"
        if self.mode == "standalone":
            log = self.out / f"{m.name}.{run}.jsonl"
            argv = [sys.executable, "-m", "tests.chaos.node", "--name", m.name, "--listen", f"127.0.0.1:{PORT}",
                    "--advertise", m.address, "--join" if m.join else "--nodes", self.nodes_arg,
                    "--state-dir", str(state),
                    "--secret-file", str(self.secret), "--records", str(self.records),
                    "--election-timeout", f"{TIMEOUT[0]}-{TIMEOUT[1]}", "--heartbeat-interval", str(HEARTBEAT)]
            proc = self.topo.popen(m.index, argv, cwd=REPO, env=self._env(), stdout=open(log, "wb"),
                                   stderr=open(self.out / f"{m.name}.{run}.err", "wb"))
        else:
            log = self.out / f"{m.name}.{run}.transitions.jsonl"
            argv = [sys.executable, "-m", "celery", "-A", "tests.chaos.app", "worker", "-P", "prefork", "-c", "2",
                    "-n", f"{m.name}@chaos", "-l", "info", "--without-mingle", "--without-gossip",
                    "--cluster-join" if m.join else "--cluster-nodes", self.nodes_arg,
                    "--cluster-listen", f"127.0.0.1:{PORT}",
                    "--cluster-advertise", m.address, "--cluster-state-dir", str(state),
                    "--cluster-secret-file", str(self.secret),
                    "--cluster-election-timeout", f"{TIMEOUT[0]}-{TIMEOUT[1]}",
                    "--cluster-heartbeat-interval", str(HEARTBEAT), *self.worker_args]
            proc = self.topo.popen(m.index, argv, cwd=REPO,
                                   env=self._env(CHAOS_NODE=m.name, CHAOS_TRANSITIONS=str(log)),
                                   stdout=open(self.out / f"{m.name}.{run}.log", "wb"), stderr=subprocess.STDOUT)
        m.runs.append((proc, log))
        m.stopped = m.failed = False

    def kill(self, m: Member) -> None:
        if m.alive:
            assert m.proc is not None
            os.killpg(m.proc.pid, signal.SIGKILL)
            self.ended[(m.name, len(m.runs) - 1)] = lease_clock()
            m.proc.wait(10)
        m.stopped = False

    def signal_group(self, m: Member, sig: int) -> None:
        if m.alive:
            assert m.proc is not None
            os.killpg(m.proc.pid, sig)

    # -- observation (through the control process) ----------------------------------------------

    def _ctl(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.ctl is not None and self.ctl.stdin is not None and self.ctl.stdout is not None
        with self._ctl_lock:
            self.ctl.stdin.write(json.dumps(req) + "\n")
            self.ctl.stdin.flush()
            line = self.ctl.stdout.readline()
        if not line:
            raise RuntimeError(f"the control process died ({self.ctl.poll()}); see ctl.err")
        return json.loads(line)

    def statuses(self) -> dict[str, Any]:
        live = [m.address for m in self.members if m.alive and not m.stopped]
        return self._ctl({"op": "statuses", "addrs": live, "timeout": 0.3})["statuses"]

    def agreed_leader(self) -> str | None:
        sts = {a: s for a, s in self.statuses().items() if s is not None and not s.get("failure")}
        leaders = [a for a, s in sts.items() if s.get("is_leader")]
        if len(leaders) != 1 or not sts:
            return None
        term = sts[leaders[0]]["term"]
        return leaders[0] if all(s["term"] == term and s["leader_id"] == leaders[0] for s in sts.values()) else None

    def leader(self) -> Member | None:
        addr = self.agreed_leader()
        return next((m for m in self.members if m.address == addr), None)

    def wait_leader(self, bound: float) -> float | None:
        """The lease-clock instant an agreed leader was first seen, or None within ``bound``."""
        deadline = lease_clock() + bound
        while lease_clock() < deadline:
            if self.agreed_leader() is not None:
                return lease_clock()
            time.sleep(0.02)  # polling interval
        return None

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)  # a fault's duration: part of the scenario, not synchronisation

    # -- the schedule ---------------------------------------------------------------------------

    def victim(self) -> Member:
        """The leader, more often than not (the interesting case), else anyone alive."""
        lead = self.leader()
        alive = [m for m in self.members if m.alive and not m.stopped and not m.failed]
        if lead is not None and (self.rng.random() < 0.6 or not alive):
            return lead
        return self.rng.choice(alive or self.members)

    def run(self) -> Verdict:
        assert self.topo is not None
        first = self.wait_leader(30.0)
        self.liveness.append((lease_clock(), first))
        if self.mode == "worker":
            self._ctl({"op": "produce", "every": 0.1})
        end = time.monotonic() + self.seconds
        count = 0
        while time.monotonic() < end and count < 10_000:
            count += 1
            kind = self.rng.choice(FAULTS)
            started = lease_clock()
            detail = getattr(self, f"fault_{kind}")()
            healed = lease_clock()
            self.faults.append({"kind": kind, "start": started, "healed": healed, **(detail or {})})
            self.liveness.append((healed, self.wait_leader(LIVENESS_BOUND + 0.5)))
            self.wait(self.rng.uniform(0.3, 1.0))
        return self.finish()

    # -- faults (each returns a description; each heals itself) -----------------------------------

    def fault_kill(self) -> dict[str, Any]:
        m = self.victim()
        self.kill(m)
        killed = lease_clock()  # the SIGKILL landed between the fault's start and this
        self.wait(self.rng.uniform(0.3, 2.0))
        self.start(m)
        return {"node": m.name, "killed": killed}

    def fault_pause(self) -> dict[str, Any]:
        m = self.victim()
        self.signal_group(m, signal.SIGSTOP)
        m.stopped = True
        self.wait(self.rng.uniform(1.2 * TIMEOUT[1], 3.0))
        self.signal_group(m, signal.SIGCONT)
        m.stopped = False
        return {"node": m.name}

    def _network(self, detail: dict[str, Any]) -> dict[str, Any]:
        assert self.topo is not None
        self.wait(self.rng.uniform(1.5, 3.5))
        self.topo.heal()
        return detail

    def _separate(self, groups: list[list[int]]) -> None:
        """Cut every pair of *nodes* in different groups. The infrastructure host (broker,
        control) stays reachable from all: a node cut off from its broker is a fault of its
        own (see the README: Redis loses a message a BRPOP popped for a connection that the
        cut then kills - a transport property, not the election's)."""
        group = {h: g for g, hosts in enumerate(groups) for h in hosts}
        for a in range(self.n):
            for b in range(self.n):
                if a != b and group[a] != group[b]:
                    self.topo.oneway(a, b)  # type: ignore[union-attr]

    def fault_isolate(self) -> dict[str, Any]:
        m = self.victim()
        self._separate([[m.index], [h for h in range(self.n) if h != m.index]])
        return self._network({"node": m.name})

    def fault_split(self) -> dict[str, Any]:
        hosts = list(range(self.n))
        self.rng.shuffle(hosts)
        minority = hosts[: (self.n - 1) // 2]
        self._separate([minority, [h for h in range(self.n) if h not in minority]])
        return self._network({"minority": [self.members[h].name for h in minority]})

    def fault_partition(self) -> dict[str, Any]:
        groups: list[list[int]] = [[] for _ in range(self.rng.randint(2, 3))]
        for h in range(self.n):
            self.rng.choice(groups).append(h)
        self._separate(groups)
        return self._network({"groups": [[self.members[h].name for h in g] for g in groups if g]})

    def fault_cut(self) -> dict[str, Any]:
        a, b = self.rng.sample(range(self.n), 2)
        self.topo.cut(a, b)  # type: ignore[union-attr]
        return self._network({"link": [self.members[a].name, self.members[b].name]})

    def fault_oneway(self) -> dict[str, Any]:
        m = self.victim()
        for j in range(self.n):
            if j != m.index:
                self.topo.oneway(m.index, j)  # type: ignore[union-attr]
        return self._network({"cannot_send": m.name})

    def fault_delay(self) -> dict[str, Any]:
        chosen = self.rng.sample(self.members, self.rng.randint(1, self.n))
        delay, jitter = self.rng.uniform(0.02, 0.15), self.rng.uniform(0.0, 0.1)
        for m in chosen:
            assert m.proxy is not None
            m.proxy.set_delay(delay, jitter)
        self.wait(self.rng.uniform(2.0, 4.0))
        for m in chosen:
            assert m.proxy is not None
            m.proxy.set_delay(0.0, 0.0)
        return {"nodes": [m.name for m in chosen], "delay": round(delay, 3), "jitter": round(jitter, 3)}

    def fault_disk(self) -> dict[str, Any]:
        m = self.victim()
        filler = m.disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                for _ in range(1024):  # 512 KiB disk: bounded
                    f.write(b"\0" * 4096)
            except OSError:
                pass  # ENOSPC: full
        # Its next write (a new term) must fail: make one happen.
        lead = self.leader()
        if lead is not None:
            self._ctl({"op": "stepdown", "addr": lead.address})
        deadline = time.monotonic() + 5.0
        outcome = "no write needed"
        while time.monotonic() < deadline:
            if self.mode == "standalone" and not m.alive:
                rc = m.proc.returncode  # type: ignore[union-attr]
                outcome = f"exit {rc}"
                err = (self.out / f"{m.name}.{len(m.runs) - 1}.err").read_text(errors="replace")
                # 3: it was running and fail-stopped; 2: it was (re)starting and refused the
                # full state directory at start, with one line naming it.
                refused_at_start = rc == 2 and "cannot use state directory" in err
                if rc != 3 and not refused_at_start:
                    self.problems.append(f"{m.name} with a full disk exited {rc}, not 3 (fail-stop)")
                break
            st = self.statuses().get(m.address) if m.alive else None
            if st is not None and st.get("failure"):
                m.failed = True
                outcome = "left the cluster"
                break
            time.sleep(0.05)  # polling interval
        filler.unlink()
        if m.alive and m.failed:  # a worker that left the cluster rejoins by restarting
            self.signal_group(m, signal.SIGTERM)
            try:
                m.proc.wait(20)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill(m)
        if not m.alive:
            self.start(m)
        return {"node": m.name, "outcome": outcome}

    def fault_stepdowns(self) -> dict[str, Any]:
        done = 0
        until = time.monotonic() + 2.0
        while time.monotonic() < until and done < 20:
            lead = self.leader()
            if lead is not None:
                reply = self._ctl({"op": "stepdown", "addr": lead.address})
                done += reply.get("status") == 200
            self.wait(self.rng.uniform(0.2, 0.4))
        return {"stepdowns": done}

    def fault_replace(self) -> dict[str, Any]:
        """Replace a member as an operator replaces a dead host: remove it through the leader
        (the leader itself as often as not), kill it, wipe its state, start it with --join and
        wait until the leader has added it back - two one-server changes."""
        m = self.victim()
        lead = self.leader()
        if lead is None:
            return {"node": m.name, "outcome": "no leader to ask"}
        others = [x.address for x in self.members if x is not m and x.alive and not x.stopped]
        removed = self._ctl({"op": "members", "addrs": [lead.address, *others], "change": {"remove": m.address}})
        if not removed.get("ok"):
            return {"node": m.name, "outcome": f"removal refused: {removed.get('error')}"}
        self.kill(m)
        killed = lease_clock()
        shutil.rmtree(m.disk / "state", ignore_errors=True)
        m.join = True
        self.start(m)
        deadline = time.monotonic() + 30.0
        outcome = "not added back within 30 s"
        while time.monotonic() < deadline:
            st = self.statuses().get(m.address)
            if st is not None and st.get("voter") and self.agreed_leader() is not None:
                outcome = "replaced"
                break
            time.sleep(0.1)  # polling interval
        m.join = False  # its state holds the configuration from now on
        if outcome != "replaced":
            self.problems.append(f"{m.name} was removed and restarted with --join but not added back within 30 s")
        return {"node": m.name, "outcome": outcome, "was_leader": m is lead, "killed": killed}

    def fault_jump(self) -> dict[str, Any]:
        m = self.victim()
        self.signal_group(m, signal.SIGUSR2) if self.mode == "standalone" else os.kill(m.proc.pid, signal.SIGUSR2)  # type: ignore[union-attr]
        return {"node": m.name}

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> Verdict:
        assert self.topo is not None
        self.topo.heal()
        for m in self.members:
            if m.stopped:
                self.signal_group(m, signal.SIGCONT)
                m.stopped = False
            if not m.alive:
                self.start(m)
        if self.wait_leader(60.0) is None:  # restarted workers may take seconds to boot
            self.problems.append("no leader once every fault was healed and every node restarted")
        sent: list[int] = []
        sent_at: dict[int, float] = {}
        if self.mode == "worker":
            produced = self._ctl({"op": "produced"})
            sent = produced["sent"]
            sent_at = {int(i): t for i, t in produced["sent_at"].items()}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not set(sent) <= self._lead_done():
                time.sleep(0.2)  # polling interval
        for m in self.members:
            self.signal_group(m, signal.SIGTERM)
        for m in self.members:
            try:
                if m.proc is not None:
                    m.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill(m)
        transitions, actions = self.history()
        delivered = {r["i"] for r in self._records() if r.get("kind") == "delivery"}
        # A replaced member is killed too (right after its removal): the same Redis window applies.
        kills = [(f["node"], f["start"], f.get("killed", f["healed"])) for f in self.faults
                 if f["kind"] == "kill" or (f["kind"] == "replace" and "killed" in f)]
        verdict = check(transitions, actions, ended=self.ended, lead_sent=sent, liveness=self.liveness,
                        liveness_bound=LIVENESS_BOUND, expect_beat=self.mode == "worker",
                        lead_sent_at=sent_at, delivered=delivered, kills=kills)
        verdict.violations[:0] = self.problems
        lost = sorted(set(sent) - {a["i"] for a in actions if a["kind"] == "lead"})
        for i in (lost[:5] if not verdict.ok else []):  # where each lost task was last seen, for the diagnosis
            seen = [r for r in self._records() if r.get("kind") in ("delivery", "outcome") and r.get("i") == i]
            verdict.violations.append(f"  task {i} deliveries: {seen or 'none'}")
        kinds: dict[str, int] = {}
        for f in self.faults:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        verdict.figures["faults"] = len(self.faults)
        verdict.figures["fault_kinds"] = kinds
        (self.out / "history.json").write_text(json.dumps({
            "mode": self.mode, "nodes": self.n, "seconds": self.seconds, "seed": self.seed,
            "faults": self.faults, "liveness": self.liveness, "figures": verdict.figures,
            "violations": verdict.violations, "transitions": transitions, "actions": actions,
            "ended": [[k[0], k[1], v] for k, v in self.ended.items()], "lead_sent": sent,
            "lead_sent_at": sent_at}, indent=1))
        return verdict

    def _lead_done(self) -> set[int]:
        return {a["i"] for a in self._records() if a.get("kind") == "lead"}

    def _records(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        out = []
        for line in self.records.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def history(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        transitions = []
        for m in self.members:
            for run, (_, log) in enumerate(m.runs):
                if not log.exists():
                    continue
                for line in log.read_text(errors="replace").splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and "event" in rec:
                        transitions.append({**rec, "node": m.name, "run": run})
        actions = [a for a in self._records() if a.get("kind") in ("action", "lead", "beat")]
        return transitions, actions


def summary(mode: str, run: ChaosRun, verdict: Verdict) -> str:
    f = verdict.figures
    return (f"chaos {mode}: seed={run.seed} nodes={run.n} seconds={run.seconds:g} faults={f['faults']} "
            f"elections={f['elections']} max_failover={f['max_failover_s']}s max_recovery={f['max_recovery_s']}s "
            f"leader_only_actions={f['leader_only_actions']} beat_publishes={f['beat_publishes']} "
            f"(lost_to_window={f['beat_lost_to_window']}) lead_tasks={f['lead_tasks']} "
            f"(redelivered={f['lead_redelivered']}, lost_to_transport={f['lead_lost_to_transport']}) "
            f"violations={len(verdict.violations)}")
