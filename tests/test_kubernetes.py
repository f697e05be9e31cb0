"""examples/kubernetes: valid against the Kubernetes JSON schemas (``kubernetes-validate``,
strict: unknown fields are errors), consistent with itself, and its commands work - run
outside Kubernetes as real processes on loopback, with the pod DNS names mapped to
loopback ports: three scheduler pods elect one leader, the readiness probe answers 200 on
each, the preStop hook hands leadership over, SIGTERM ends a pod within its grace period,
and an ordinary worker started with the Deployment's command serves leader-only tasks to
the leader without running any itself."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support import die_with_parent, free_ports
from tests.workers import clean_env, poll, read_records, redis_broker

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "examples" / "kubernetes").glob("*.yaml"))
K8S_VERSIONS = ("1.29.0", "1.33.0")


def documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_against_the_schema(version: str) -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {"Service", "StatefulSet", "PodDisruptionBudget", "Deployment", "ConfigMap"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    # The validator does catch a mistake (so a pass means something).
    broken = copy.deepcopy(one("StatefulSet"))
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_scheduler_group_is_consistent() -> None:
    sts, svc, pdb = one("StatefulSet"), one("Service", "celery-scheduler"), one("PodDisruptionBudget")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    argv = container["command"]
    port = svc["spec"]["ports"][0]["port"]
    name, service = sts["metadata"]["name"], spec["serviceName"]
    assert service == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    nodes = option(argv, "--cluster-nodes").split(",")
    assert nodes == [f"{name}-{i}.{service}:{port}" for i in range(spec["replicas"])]
    assert spec["replicas"] % 2 == 1 and spec["podManagementPolicy"] == "Parallel"
    assert option(argv, "--cluster-advertise") == f"$(POD_NAME).{service}:{port}"
    assert option(argv, "--cluster-listen") == f"0.0.0.0:{port}"
    assert option(argv, "--cluster-join") == f"{service}:{port}"  # pods beyond the list ask to be added
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert option(argv, "--cluster-state-dir") == mounts["state"]
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["state"]
    assert option(argv, "--cluster-secret-file").startswith(mounts["secret"] + "/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/cluster/health", "port": "cluster"}
    prestop = container["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "celery-cluster stepdown" in prestop and "--if-leader" in prestop  # a follower leaving moves nothing
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    workers = one("Deployment", "celery-workers")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not [a for a in workers if a.startswith("--cluster")], "ordinary workers take no cluster options"
    assert workers[:4] == argv[:4], "one app for both groups"


def get(address: str, path: str) -> tuple[int, Any]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def try_get(address: str, path: str) -> tuple[int, Any] | None:
    try:
        return get(address, path)
    except (OSError, http.client.HTTPException, ValueError):
        return None


class Pods:
    """The manifests' commands as local processes: ``<pod>.<service>:PORT`` and the pods'
    ``0.0.0.0:PORT`` become loopback ports, mounted paths become directories under tmp."""

    def __init__(self, tmp: Path, replicas: int | None = None) -> None:
        self.tmp = tmp
        self.broker = redis_broker()
        self.sts = one("StatefulSet")
        self.service = self.sts["spec"]["serviceName"]
        self.replicas = replicas or self.sts["spec"]["replicas"]
        self.names = [f"{self.sts['metadata']['name']}-{i}" for i in range(self.replicas)]
        self.ports = dict(zip(self.names, free_ports(self.replicas)))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        container = self.sts["spec"]["template"]["spec"]["containers"][0]
        self.command: list[str] = container["command"]
        self.mounts = {m["mountPath"]: tmp / m["name"] for m in container["volumeMounts"]}
        #: volumeClaimTemplates: each pod gets a volume of its own (the others are shared).
        self.per_pod = {t["metadata"]["name"] for t in self.sts["spec"].get("volumeClaimTemplates", [])}
        self.mount_names = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secret_path = Path(option(self.command, "--cluster-secret-file"))
        self.secret = self.local_path(str(secret_path))
        self.secret.parent.mkdir(parents=True, exist_ok=True)
        self.secret.write_text("k8s-example-test-secret\n")
        self.prestop = container["lifecycle"]["preStop"]["exec"]["command"]

    def address(self, pod: str) -> str:
        return f"127.0.0.1:{self.ports[pod]}"

    def local_path(self, path: str, pod: str | None = None) -> Path:
        for mount, local in self.mounts.items():
            if pod is not None and self.mount_names[mount] in self.per_pod:
                local = local / pod
            if path == mount or path.startswith(mount + "/"):
                return local / path[len(mount):].lstrip("/")
        raise AssertionError(f"{path} is not under a mounted volume")

    def localize(self, arg: str, pod: str | None) -> str:
        if pod is not None:
            arg = arg.replace("$(POD_NAME)", pod)
        for name, port in self.ports.items():
            arg = arg.replace(f"{name}.{self.service}:8899", f"127.0.0.1:{port}")
        if arg == f"{self.service}:8899":  # the headless Service's name: one of its pods (the first)
            arg = self.address(self.names[0])
        if pod is not None:
            arg = arg.replace("0.0.0.0:8899", self.address(pod))
        if arg.startswith("/") and any(arg == m or arg.startswith(m + "/") for m in self.mounts):
            arg = str(self.local_path(arg, pod))
        return arg

    def env(self, pod: str) -> dict[str, str]:
        return {**clean_env(), "POD_NAME": pod, "BROKER_URL": self.broker.url, "PYTHONPATH": str(REPO),
                "DEMO_DIR": str(self.tmp / "demo"), "DEMO_QUEUE": self.broker.default_queue,
                "CELERY_CLUSTER_LEADER_QUEUE": self.broker.leader_queue, "DEMO_WORKER": pod}

    def start(self, pod: str, command: list[str], clustered: bool = True) -> None:
        argv = [self.localize(a, pod if clustered else None).replace("$(POD_NAME)", pod) for a in command]
        assert argv[0] == "celery"
        argv = [str(Path(sys.executable).with_name("celery")), *argv[1:]]
        (self.tmp / "demo").mkdir(parents=True, exist_ok=True)
        log = open(self.tmp / f"{pod}.log", "ab")
        self.procs[pod] = subprocess.Popen(argv, cwd=REPO, env=self.env(pod), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, preexec_fn=die_with_parent)

    def run_prestop(self, pod: str) -> subprocess.CompletedProcess[str]:
        script = self.prestop[-1].replace("127.0.0.1:8899", self.address(pod))
        script = re.sub(r"(--secret-file )(\S+)", lambda m: m.group(1) + str(self.local_path(m.group(2))), script)
        script = script.replace("celery-cluster ", str(Path(sys.executable).with_name("celery-cluster")) + " ")
        return subprocess.run([*self.prestop[:-1], script], capture_output=True, text=True, timeout=30,
                              env=clean_env())

    def leader(self) -> str | None:
        views = {pod: try_get(self.address(pod), "/cluster/status") for pod in self.names if self.alive(pod)}
        leaders = [pod for pod, v in views.items() if v and v[1].get("is_leader")]
        return leaders[0] if len(leaders) == 1 else None

    def alive(self, pod: str) -> bool:
        return pod in self.procs and self.procs[pod].poll() is None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.broker.cleanup()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.mark.processes
def test_the_manifests_commands_run_as_the_pods_would(tmp_path: Path) -> None:
    pods = Pods(tmp_path)
    try:
        for pod in pods.names:
            pods.start(pod, pods.command)
        leader = poll(pods.leader, 60, "one leader among the scheduler pods", 0.1)
        # readinessProbe: every pod ready once a leader is known.
        poll(lambda: all((try_get(pods.address(p), "/cluster/health") or (0,))[0] == 200 for p in pods.names), 20,
             "every pod's readiness probe to answer 200", 0.1)

        # An ordinary worker, with the Deployment's command: a leader-only task sent from anywhere
        # runs on the scheduler group's leader.
        deployment = one("Deployment", "celery-workers")["spec"]["template"]["spec"]["containers"][0]["command"]
        pods.start("celery-workers-x", deployment, clustered=False)
        sender = subprocess.run(
            [sys.executable, "-c", "from examples.basic.app import rebuild_index\n"
             "for i in range(3): rebuild_index.delay(i)"], cwd=REPO, env=pods.env("sender"), timeout=60)
        assert sender.returncode == 0
        records = tmp_path / "demo" / "records.jsonl"
        poll(lambda: len({r["i"] for r in read_records(records) if r["task"] == "rebuild_index"}) == 3, 30,
             "the leader-only tasks", 0.1)
        ran = [r for r in read_records(records) if r["task"] == "rebuild_index"]
        assert {r["worker"] for r in ran} == {leader}, ran

        # preStop on a follower changes nothing; on the leader it hands leadership over.
        follower = next(p for p in pods.names if p != leader)
        out = pods.run_prestop(follower)
        assert out.returncode == 0 and "does not lead: nothing to hand over" in out.stdout, out
        assert pods.leader() == leader
        out = pods.run_prestop(leader)
        assert out.returncode == 0, out
        new = poll(lambda: (lambda l: l if l not in (None, leader) else None)(pods.leader()), 10,
                   "another pod to lead after the preStop hook", 0.05)

        # SIGTERM (what Kubernetes sends after preStop) ends the pod well within its grace period.
        grace = one("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        started = time.monotonic()
        pods.procs[new].send_signal(signal.SIGTERM)
        assert pods.procs[new].wait(grace) == 0
        took = time.monotonic() - started
        poll(lambda: pods.leader() not in (None, new), 10, "a leader among the remaining pods", 0.05)
        print(f"\nkubernetes example: leader {leader}, preStop handed over to {new}; SIGTERM ended it in "
              f"{took:.1f} s (grace {grace} s)")
    except BaseException:
        print(pods.logs())
        raise
    finally:
        pods.close()


@pytest.mark.processes
def test_the_scheduler_group_grows_to_five_and_shrinks_back(tmp_path: Path) -> None:
    """kubectl scale --replicas=5: the two new pods (beyond --cluster-nodes) join through the
    Service and are added one at a time; scaling back down is `celery cluster remove` of the
    highest pods, then fewer replicas. The same command for every pod throughout."""
    pods = Pods(tmp_path, replicas=5)
    base = one("StatefulSet")["spec"]["replicas"]
    try:
        for pod in pods.names[:base]:
            pods.start(pod, pods.command)
        poll(pods.leader, 60, "one leader among the first pods", 0.1)
        for pod in pods.names[base:]:
            pods.start(pod, pods.command)
        everyone = [pods.address(p) for p in pods.names]

        def members(names: list[str]) -> set[tuple[str, ...]]:  # in any order: pods join as they come up
            views = [try_get(pods.address(p), "/cluster/status") for p in names]
            return {tuple(sorted(v[1]["members"])) if v else () for v in views}

        poll(lambda: members(pods.names) == {tuple(sorted(everyone))}, 90, "all five pods to be members", 0.2)
        app = pods.command[pods.command.index("-A") + 1]
        celery = str(Path(sys.executable).with_name("celery"))
        for pod in reversed(pods.names[base:]):
            out = subprocess.run([celery, "-A", app, "cluster", "remove", pods.address(pod)], cwd=REPO,
                                 env=pods.env("kubectl-exec"), capture_output=True, text=True, timeout=90)
            assert out.returncode == 0, out.stdout + out.stderr
            pods.procs[pod].send_signal(signal.SIGTERM)
            assert pods.procs[pod].wait(30) == 0
        first = [pods.address(p) for p in pods.names[:base]]
        poll(lambda: members(pods.names[:base]) == {tuple(sorted(first))}, 30, "the first pods to be the members again",
             0.2)
        poll(pods.leader, 20, "one leader among the remaining pods", 0.1)
    except BaseException:
        print(pods.logs())
        raise
    finally:
        pods.close()
