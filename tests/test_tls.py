"""TLS between members, on loopback, with a CA and certificates made for the test
(``tests/certs.py``): members with certificates of the cluster's CA elect a leader over
TLS; a member whose certificate comes from another CA, or a client with none, gets
nowhere with RPCs and changes nothing; reads stay open to clients without a certificate
(probes, browsers); the CLI node and ``celery-cluster stepdown`` take the same options."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from celery_cluster import Cluster, ConfigurationError
from celery_cluster.settings import resolve
from celery_cluster.tls import TLSConfig
from tests import support
from tests.certs import CA, Cert
from tests.support import addresses, free_ports, scrape, stop_all, the_leader, total

FAST: dict[str, Any] = {"election_timeout": (0.3, 0.6), "heartbeat_interval": 0.05}
wait_for = partial(support.wait_for, timeout=10.0, interval=0.01, timeout_format="{} s")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pki")
    ours, theirs = CA(d, "ours"), CA(d, "theirs")
    return {"member": ours.issue("member"), "operator": ours.issue("operator"),
            "stranger": theirs.issue("stranger"),
            "wrong-host": ours.issue("wrong-host", ips=("10.255.255.1",), dns=("elsewhere.invalid",))}


def tls_of(cert: Cert) -> TLSConfig:
    return TLSConfig(str(cert.cert), str(cert.key), str(cert.ca))


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(nodes: list[str], me: str, cert: Cert, **kw: Any) -> Cluster:
        cl = Cluster(nodes, listen=me, state_dir=tmp_path / me.replace(":", "_"), tls=tls_of(cert), **{**FAST, **kw})
        made.append(cl)
        return cl

    yield make
    stop_all(made)


def session(cert: Cert | None, ca: Path) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify=
    s.verify = str(ca)
    if cert is not None:
        s.cert = (str(cert.cert), str(cert.key))
    return s


def test_members_elect_over_tls_and_strangers_change_nothing(clusters: Any, pki: dict[str, Cert]) -> None:
    nodes = addresses(3)
    cls = [clusters(nodes, me, pki["member"]) for me in nodes]
    for cl in cls:
        cl.start()
    leader = wait_for(lambda: the_leader(cls), "a leader elected over TLS")
    wait_for(lambda: all(p["heartbeat_rtt"]["samples"] >= 5 for p in leader.status()["nodes"]),
             "heartbeats over TLS")
    ca = pki["member"].ca
    target = next(cl for cl in cls if cl is not leader)
    before = target.status()

    # Reads: open to a client without a certificate (a probe, a browser) - over TLS only.
    s = session(None, ca)
    assert s.get(f"https://{target.id}/cluster/health").status_code == 200
    assert s.get(f"https://{target.id}/cluster/status").json()["leader_id"] == leader.id
    assert "celery_cluster_is_leader" in s.get(f"https://{target.id}/cluster/metrics").text
    # RPCs and stepdown: refused without a client certificate, before the body is looked at.
    body = json.dumps({"type": "VoteRequest", "term": 10**6, "candidate": nodes[0], "version": [0, 0],
                       "prevote": False, "transfer": False}).encode()
    for path in ("/cluster/requestvote", "/cluster/appendentries", "/cluster/stepdown"):
        resp = s.post(f"https://{target.id}{path}", data=body)
        assert resp.status_code == 401 and "client certificate" in resp.json()["error"], (path, resp.text)
    # A certificate from another CA: the handshake itself fails.
    with pytest.raises(requests.exceptions.SSLError):
        session(pki["stranger"], ca).get(f"https://{target.id}/cluster/status")
    # Plain HTTP to a TLS port: no answer a plain client could take for one.
    host, _, port = target.id.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=3)
    with pytest.raises((http.client.HTTPException, ConnectionError, socket.timeout)):
        conn.request("GET", "/cluster/status")
        conn.getresponse()
    conn.close()
    after = target.status()
    assert (after["term"], after["voted_for"], after["leader_id"]) == \
        (before["term"], before["voted_for"], before["leader_id"])
    assert the_leader(cls) is leader

    # With a member's certificate the overview (which fetches every member over TLS) works.
    overview = session(pki["operator"], ca).get(f"https://{target.id}/cluster/overview").json()
    assert overview["leaders"] == [leader.id] and all(n["reachable"] for n in overview["nodes"])


def test_a_member_with_another_cas_certificate_is_shut_out(clusters: Any, pki: dict[str, Cert]) -> None:
    nodes = addresses(3)
    a, b = clusters(nodes, nodes[0], pki["member"]), clusters(nodes, nodes[1], pki["member"])
    stranger = clusters(nodes, nodes[2], pki["stranger"])
    for cl in (a, b, stranger):
        cl.start()
    leader = wait_for(lambda: the_leader([a, b]), "a leader among the two members of our CA")
    # Both directions fail at the handshake, and are counted as such.
    wait_for(lambda: total(scrape_tls(stranger.id, pki["stranger"])[1], "celery_cluster_peer_request_errors_total",
                           kind="tls") >= 2, "the stranger's handshakes to fail")
    wait_for(lambda: total(scrape_tls(leader.id, pki["member"])[1], "celery_cluster_peer_request_errors_total",
                           peer=stranger.id, kind="tls") >= 2, "the leader's handshakes with the stranger to fail")
    assert not stranger.is_leader() and stranger.status()["leader_id"] is None


def test_a_certificate_for_another_host_is_refused_both_ways(clusters: Any, pki: dict[str, Cert]) -> None:
    """A certificate of our CA that does not name the member's address: as a server, the
    client refuses it (hostname check); as a client, its RPCs are refused (403: the
    certificate must name the sender the message claims). It can neither lead nor vote."""
    nodes = addresses(3)
    good = [clusters(nodes, me, pki["member"]) for me in nodes[:2]]
    impostor = clusters(nodes, nodes[2], pki["wrong-host"])
    for cl in (*good, impostor):
        cl.start()
    leader = wait_for(lambda: the_leader(good), "a leader among the two well-named members")
    wait_for(lambda: total(scrape_tls(leader.id, pki["member"])[1], "celery_cluster_peer_request_errors_total",
                           peer=impostor.id, kind="tls") >= 1, "the leader to refuse the impostor's certificate")
    wait_for(lambda: total(scrape_tls(impostor.id, pki["member"], check_hostname=False)[1],
                           "celery_cluster_peer_request_errors_total",
                           kind="auth") >= 2, "the members to refuse the impostor's requests")
    assert not impostor.is_leader() and impostor.status()["leader_id"] is None
    assert not any(p["address"] == impostor.id and p["heartbeat_rtt"]["samples"]
                   for p in leader.status()["nodes"])
    # Its refused requests changed nothing: the leader still leads in the term it won.
    term = leader.status()["term"]
    time.sleep(1.5)  # observation window: several of the impostor's election timeouts
    assert the_leader(good) is leader and leader.status()["term"] == term


def scrape_tls(address: str, cert: Cert, check_hostname: bool = True) -> tuple[
        str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    ctx = ssl.create_default_context(cafile=str(cert.ca))
    ctx.check_hostname = check_hostname
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return scrape(address, context=ctx)


def test_tls_settings_are_all_or_nothing(tmp_path: Path, pki: dict[str, Cert]) -> None:
    m = pki["member"]
    with pytest.raises(ConfigurationError, match="missing: tls key, tls ca"):
        TLSConfig.from_options(str(m.cert), None, None)
    with pytest.raises(ConfigurationError, match="is not a readable file"):
        TLSConfig.from_options(str(m.cert), str(tmp_path / "nope.key"), str(m.ca))
    # A key that does not match the certificate: refused when the Cluster is built.
    (me,) = addresses(1)
    with pytest.raises(ConfigurationError, match="cannot load the TLS certificate"):
        Cluster([me], listen=me, state_dir=tmp_path, tls=TLSConfig(str(m.cert), str(pki["operator"].key), str(m.ca)))
    assert not any(tmp_path.iterdir())
    # The worker's settings: --cluster-tls-* (or env, or app config).
    s = resolve({}, {"cluster_nodes": me, "cluster_listen": me, "cluster_tls_cert": str(m.cert),
                     "cluster_tls_key": str(m.key)}, {"CELERY_CLUSTER_TLS_CA": str(m.ca)})
    assert s is not None and s.tls == tls_of(m)
    with pytest.raises(ConfigurationError, match="missing: tls ca"):
        resolve({}, {"cluster_nodes": me, "cluster_listen": me, "cluster_tls_cert": str(m.cert),
                     "cluster_tls_key": str(m.key)}, {})


def test_cli_node_and_stepdown_over_tls(tmp_path: Path, pki: dict[str, Cert]) -> None:
    m = pki["member"]
    ports = free_ports(3)
    nodes = ",".join(f"127.0.0.1:{p}" for p in ports)
    tls_args = ["--tls-cert", str(m.cert), "--tls-key", str(m.key), "--tls-ca", str(m.ca)]
    procs = [subprocess.Popen([sys.executable, "-m", "celery_cluster", "node", "--listen", f"127.0.0.1:{p}",
                               "--nodes", nodes, "--state-dir", str(tmp_path / str(p)), "--election-timeout",
                               "0.3-0.6", "--heartbeat-interval", "0.05", *tls_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    s = session(m, m.ca)

    def leader() -> str | None:
        found = []
        for p in ports:
            try:
                st = s.get(f"https://127.0.0.1:{p}/cluster/status", timeout=1).json()
            except (requests.RequestException, ValueError):
                return None
            if st["is_leader"]:
                found.append(st["id"])
        return found[0] if len(found) == 1 else None

    try:
        first = wait_for(leader, "the CLI nodes to elect a leader over TLS")
        cmd = [sys.executable, "-m", "celery_cluster", "stepdown", "--node", f"127.0.0.1:{ports[0]}"]
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "cannot read the status" in refused.stderr, refused
        done = subprocess.run([*cmd, *tls_args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done
        assert f"handed over from {first}" in done.stdout
        wait_for(lambda: (lambda l: l if l not in (None, first) else None)(leader()), "another leader")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(10) == 0
