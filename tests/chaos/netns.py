"""N simulated hosts, each in its own network namespace, joined by a bridge — plus faults.

Layout for a run with id ``RID`` (``<creating pid>x<random hex>``)::

    cct-RID-sw   "switch" namespace: bridge br0, ports p0..pN-1 (one end of each veth pair)
    cct-RID-h0   host 0: lo + eth0 (other end of veth p0), 10.231.X.1/24
    cct-RID-h1   host 1: lo + eth0, 10.231.X.2/24   ...

Nothing is ever created in the root namespace: veth pairs are born inside the switch
namespace with their peer moved straight into the host namespace, so a crash can leave at
most named namespaces behind, which :func:`sweep_stale` removes once their creator is dead.
The third octet X is claimed per run (a file created with O_EXCL under /run/cct-chaos/) so
concurrent runs pick different /24s, although separate namespaces could not clash anyway.

Faults (``cut``, ``oneway``, ``isolate``, ``partition``, ``heal``) are a set of blocked
*directed* pairs ``(src, dst)`` = "packets from src to dst are dropped", made real in one of
two ways, chosen per topology with ``drop=``:

``"route"`` (default)
    ``ip route add blackhole DST/32`` in src's namespace. The sender's kernel refuses at route
    lookup: a new ``connect()`` or ``sendto()`` fails *at once* with EINVAL, while data on an
    already established TCP connection is queued, sent nowhere, and retransmitted after heal
    (``send()`` succeeds, the reader just times out) — measured, see test_harness.py.
``"silent"``
    An ingress policy rule ``from SRC iif eth0 blackhole`` in dst's namespace (before the
    ``local`` table, which setup moves from priority 0 to 32000 for this). Packets leave the
    sender normally and vanish on arrival: every operation times out, like a real partition.

Either way a blocked direction also breaks TCP the other way (the SYN-ACK or ACKs are lost).
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

PREFIX = "cct-"
STATE_DIR = Path("/run/cct-chaos")
SUPERNET = ipaddress.ip_network("10.231.0.0/16")
IP = "ip"
# Rule priorities for the silent mode: one per source host, so removal is "del pref P".
_SILENT_PREF_BASE = 100
_LOCAL_PREF = 32000
_NAME_RE = re.compile(rf"^{re.escape(PREFIX)}(\d+)x([0-9a-f]+)-(?:sw|h\d+)$")

Drop = Literal["route", "silent"]

_live: set[Topology] = set()  # for the atexit fallback


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ``ip`` command; bounded so a wedged netlink call cannot hang a test run."""
    res = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _batch(ns: str, commands: Sequence[str]) -> None:
    """Run many ``ip`` commands in one namespace with one process (setup is ~10x faster)."""
    res = subprocess.run([IP, "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n",
                         capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch: {res.stderr.strip()}")


def _netns_names() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _start_time(pid: int) -> str | None:
    """Process start time (clock ticks since boot): tells a live creator from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _run_alive(run_id: str) -> bool:
    m = re.match(r"^(\d+)x", run_id)
    if not m:
        return False
    pid = int(m.group(1))
    now = _start_time(pid)
    if now is None:
        return False
    try:
        recorded = json.loads((STATE_DIR / f"{run_id}.json").read_text()).get("start")
    except (OSError, ValueError):
        return True  # no record (yet, or lost): trust the pid alone rather than kill a live run
    return recorded == now


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL everything in ``ns``; repeat (bounded) because a dying parent may just have forked."""
    for _ in range(20):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def sweep_stale() -> list[str]:
    """Delete namespaces and state files of earlier runs whose creating process is gone."""
    removed: list[str] = []
    runs: set[str] = set()
    for ns in _netns_names():
        m = _NAME_RE.match(ns)
        if m and not _run_alive(f"{m.group(1)}x{m.group(2)}"):
            _kill_netns_pids(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("*.json"):
            runs.add(f.stem)
        for f in STATE_DIR.glob("net-*"):
            try:
                runs.add(f.read_text().strip())
            except OSError:
                pass
        for run in runs:
            if run and not _run_alive(run):
                _forget_run(run)
    return removed


def _forget_run(run_id: str) -> None:
    for f in [STATE_DIR / f"{run_id}.json", *STATE_DIR.glob("net-*")]:
        try:
            if f.name.endswith(".json") or f.read_text().strip() == run_id:
                f.unlink()
        except OSError:
            pass


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks configured in the root namespace (read only) that a subnet must avoid."""
    nets = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        m = re.search(r"inet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest in ("local", "broadcast", "blackhole", "unreachable", "prohibit", "throw"):
            dest = line.split()[1]
        if dest != "default" and re.match(r"^\d+\.\d+\.\d+\.\d+(/\d+)?$", dest):
            nets.append(ipaddress.ip_network(dest, strict=False))
    return nets


def _claim_subnet(run_id: str) -> ipaddress.IPv4Network:
    """Pick a free /24 inside SUPERNET and claim it with an O_EXCL file (atomic across runs)."""
    used = _used_networks()
    octets = list(range(1, 255))
    random.shuffle(octets)
    for octet in octets:
        net = ipaddress.ip_network(f"{SUPERNET.network_address + (octet << 8)}/24")
        if any(net.overlaps(u) for u in used):
            continue
        try:
            fd = os.open(STATE_DIR / f"net-{octet}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(run_id)
        return net
    raise RuntimeError(f"no free /24 left in {SUPERNET}")


class Topology:
    """``n`` hosts on one bridge; processes run inside them; faults are blocked (src, dst) pairs.

    Use as a context manager (or call :meth:`close`): on exit every process started here and
    everything else still inside the namespaces is SIGKILLed and the namespaces are deleted,
    also when the body raised. An ``atexit`` hook does the same if nobody did.
    """

    def __init__(self, n: int, *, drop: Drop = "route") -> None:
        if not 1 <= n <= 200:
            raise ValueError("1 <= n <= 200")
        if drop not in ("route", "silent"):
            raise ValueError("drop must be 'route' or 'silent'")
        self.n = n
        self.drop: Drop = drop
        self.owner = os.getpid()
        self.procs: list[subprocess.Popen[Any]] = []
        self._blocked: set[tuple[int, int]] = set()
        self._closed = False
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        sweep_stale()
        self.run_id = f"{os.getpid()}x{random.getrandbits(24):06x}"
        (STATE_DIR / f"{self.run_id}.json").write_text(
            json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}))
        self.switch = f"{PREFIX}{self.run_id}-sw"
        self.hosts = [f"{PREFIX}{self.run_id}-h{i}" for i in range(n)]
        _live.add(self)
        try:
            self.network = _claim_subnet(self.run_id)
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------------

    def _build(self) -> None:
        for ns in (self.switch, *self.hosts):
            _ip("netns", "add", ns)
        sw = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        for i, ns in enumerate(self.hosts):
            # Born in the switch namespace, peer moved into the host at creation: no veth
            # ever appears in the root namespace, even for an instant.
            sw += [f"link add p{i} type veth peer name eth0 address {self.mac(i)} netns {ns}",
                   f"link set p{i} master br0", f"link set p{i} up"]
        _batch(self.switch, sw)
        for i, ns in enumerate(self.hosts):
            _batch(ns, [
                "link set lo up",
                f"addr add {self.host_ip(i)}/{self.network.prefixlen} dev eth0",
                "link set eth0 up",
                # Silent drops need rules that run before local delivery; moving `local`
                # down is harmless otherwise, so both modes get the same routing setup.
                f"rule add pref {_LOCAL_PREF} lookup local",
                "rule del pref 0 lookup local",
                # Static ARP: a silent drop also eats ARP requests (the kernel checks their
                # route too), and re-resolving after heal() would lag by up to a second.
                *(f"neigh replace {self.host_ip(j)} lladdr {self.mac(j)} nud permanent dev eth0"
                  for j in range(self.n) if j != i),
            ])

    # -- addressing and processes ------------------------------------------------------

    def host_ip(self, i: int) -> str:
        self._check(i)
        return str(self.network.network_address + i + 1)

    def mac(self, i: int) -> str:
        """Fixed locally administered MAC of host i's eth0 (unique on its bridge)."""
        self._check(i)
        return f"02:63:74:00:{(i + 1) >> 8:02x}:{(i + 1) & 0xFF:02x}"

    def address(self, i: int, port: int) -> str:
        return f"{self.host_ip(i)}:{port}"

    def popen(self, host: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``host``, in a new session so its process group can be
        killed. ``ip netns exec`` execs the command, so the Popen's pid is the process itself."""
        self._check(host)
        if self._closed:
            raise RuntimeError("topology is closed")
        popen_kwargs["start_new_session"] = True
        proc = subprocess.Popen([IP, "netns", "exec", self.hosts[host], *argv], **popen_kwargs)
        self.procs.append(proc)
        return proc

    # -- faults -------------------------------------------------------------------------

    @property
    def blocked(self) -> frozenset[tuple[int, int]]:
        """Directed pairs (src, dst) whose packets are currently dropped."""
        return frozenset(self._blocked)

    def cut(self, a: int, b: int) -> None:
        """Drop packets a->b and b->a."""
        self._block([(a, b), (b, a)])

    def oneway(self, a: int, b: int) -> None:
        """Drop a's packets to b; b's packets to a still arrive."""
        self._block([(a, b)])

    def isolate(self, a: int) -> None:
        """Cut ``a`` from every other host."""
        self._check(a)
        self._block([p for j in range(self.n) if j != a for p in ((a, j), (j, a))])

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Cut every pair of hosts that are in different groups; groups must cover each host
        exactly once (an unlisted host would be ambiguous: with everyone, or alone?)."""
        owner: dict[int, int] = {}
        for g, group in enumerate(groups):
            for h in group:
                self._check(h)
                if h in owner:
                    raise ValueError(f"host {h} is in two groups")
                owner[h] = g
        if len(owner) != self.n:
            raise ValueError(f"groups must cover all {self.n} hosts, got {sorted(owner)}")
        self._block([(a, b) for a in range(self.n) for b in range(self.n) if owner[a] != owner[b]])

    def heal(self) -> None:
        """Remove every drop this topology added."""
        for src, dst in sorted(self._blocked):
            self._apply(src, dst, add=False)
            self._blocked.discard((src, dst))

    def _block(self, pairs: Iterable[tuple[int, int]]) -> None:
        for src, dst in pairs:
            self._check(src)
            self._check(dst)
            if src == dst or (src, dst) in self._blocked:
                continue  # idempotent: the record says it is already in force
            self._apply(src, dst, add=True)
            self._blocked.add((src, dst))

    def _apply(self, src: int, dst: int, *, add: bool) -> None:
        if self.drop == "route":
            verb = "replace" if add else "del"
            _ip("-n", self.hosts[src], "route", verb, "blackhole", f"{self.host_ip(dst)}/32", check=add)
        else:
            verb = "add" if add else "del"
            _ip("-n", self.hosts[dst], "rule", verb, "pref", str(_SILENT_PREF_BASE + src),
                "from", f"{self.host_ip(src)}/32", "iif", "eth0", "blackhole", check=add)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"no host {i} (n={self.n})")

    # -- cleanup ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process, delete every namespace, release the subnet. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for proc in self.procs:
                # Only while unreaped: a reaped pid (and so its group id) may be reused.
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            existing = set(_netns_names())
            for ns in [*self.hosts, self.switch]:
                if ns in existing:
                    _kill_netns_pids(ns)  # daemons that left our process groups
            for proc in self.procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    try:
                        if stream:
                            stream.close()
                    except OSError:  # e.g. unflushed stdin to a dead process: BrokenPipe
                        pass
            for ns in [*self.hosts, self.switch]:
                if ns in existing:
                    _ip("netns", "del", ns, check=False)
            self._blocked.clear()
        finally:
            _forget_run(self.run_id)
            _live.discard(self)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for topo in list(_live):
        if topo.owner == os.getpid():  # a forked child exiting must not tear down our hosts
            topo.close()
