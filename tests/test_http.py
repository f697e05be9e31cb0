"""The ``/cluster`` HTTP API: real servers on 127.0.0.1, real clients, real state files.

Most refusal tests talk to one node whose peers are never started, with a long election
timeout, so the node's state only changes through what the tests send; each refusal must
leave term, vote, role, leader, payload, "heard from" and the state file's bytes alone.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from celery_cluster import Cluster
from celery_cluster.auth import Signer
from celery_cluster.http_server import MAX_BODY, _KeepAliveHandler
from celery_cluster.messages import MAX_TERM, HardState
from celery_cluster.state_file import StateFile
from tests import support
from tests.support import addresses, hand_over, stop_all, the_leader

SECRET = "correct horse battery staple"
FAST: dict[str, Any] = {"election_timeout": (0.3, 0.6), "heartbeat_interval": 0.05}
#: Long enough that a node never campaigns by itself during a test.
QUIET: dict[str, Any] = {"election_timeout": (30.0, 60.0), "heartbeat_interval": 0.05}
ENDPOINTS = ("requestvote", "prevote", "appendentries", "timeoutnow")
SENDER_FIELD = {"requestvote": "candidate", "prevote": "candidate", "appendentries": "leader",
                "timeoutnow": "leader"}
INITIAL = HardState(term=5, voted_for=None, payload_version=(5, 1), payload="initial")


# -- helpers -----------------------------------------------------------------------------


#: ``wait_for(pred, timeout=5.0, what="")``: poll every 5 ms until ``pred`` is truthy (returned).
wait_for = partial(support.wait_for, timeout=5.0, interval=0.005, timeout_format="{} s")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def base_message(endpoint: str, sender: str) -> dict[str, Any]:
    """A well-formed request of ``endpoint`` from ``sender`` (that would change state if accepted)."""
    if endpoint == "requestvote":
        return {"type": "VoteRequest", "term": 6, "candidate": sender, "version": [5, 1],
                "prevote": False, "transfer": False}
    if endpoint == "prevote":
        return {"type": "VoteRequest", "term": 6, "candidate": sender, "version": [5, 1], "prevote": True}
    if endpoint == "appendentries":
        return {"type": "AppendEntries", "term": 6, "leader": sender, "round": 1, "version": [6, 1],
                "payload": "from the new leader"}
    return {"type": "TimeoutNow", "term": 5, "leader": sender, "version": [5, 1], "payload": None}


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw_request(port: int, data: bytes) -> Response:
    """Send bytes as they are (for what http.client would not send) and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        return Response(resp.status, resp.headers, resp.read())


def post_json(port: int, endpoint: str, body: bytes, signer: Signer | None = None,
              sign_as: str | None = None, sign_path: str | None = None) -> Response:
    path = f"/cluster/{endpoint}"
    headers = {"Content-Type": "application/json"}
    if signer is not None:
        assert sign_as is not None
        headers.update(signer.sign("POST", sign_path or path, sign_as, body))
    return request(port, "POST", path, body, headers)


def snapshot(cl: Cluster) -> dict[str, Any]:
    """Everything a request could change: the node's state and its state file's bytes."""
    st = cl.status()
    return {
        "term": st["term"],
        "voted_for": st["voted_for"],
        "state": st["state"],
        "leader_id": st["leader_id"],
        "payload": cl.payload,
        "heard_from": {n["address"]: n["last_contact_ms"] is not None for n in st["nodes"]},
        "file": (Path(cl.state_dir) / "state.json").read_bytes(),
    }


def assert_json_error(resp: Response) -> None:
    assert 400 <= resp.status < 500, resp
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    error = resp.json()["error"]
    assert isinstance(error, str) and error


def quiet_node(directory: Path, secret: str | None = None, listen: bool = True
               ) -> tuple[Cluster, list[str]]:
    """Node A of [A, B, C] with B and C never started, its state file pre-written."""
    nodes = addresses(3)
    StateFile(directory, nodes[0]).save(INITIAL)
    kwargs: dict[str, Any] = {**QUIET, "state_dir": directory, "secret": secret}
    if listen:
        cl = Cluster(nodes, listen=nodes[0], **kwargs)
    else:
        cl = Cluster(nodes, advertise=nodes[0], **kwargs)
    return cl, nodes


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[str]]]:
    """A running node on the embedded server, without a secret."""
    cl, nodes = quiet_node(tmp_path_factory.mktemp("served"))
    cl.start()
    yield cl, nodes
    cl.stop(transfer=False, timeout=0.2)


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[str], Any]]:
    """A node whose blueprint is mounted in a user's Flask app (driven by Flask's test client)."""
    cl, nodes = quiet_node(tmp_path_factory.mktemp("mounted"), listen=False)
    app = Flask("users_app")
    app.register_blueprint(cl.blueprint())
    cl.start()
    yield cl, nodes, app.test_client()
    cl.stop(transfer=False, timeout=0.2)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[str]]]:
    """A running node on the embedded server, with a shared secret."""
    cl, nodes = quiet_node(tmp_path_factory.mktemp("signed"), secret=SECRET)
    cl.start()
    yield cl, nodes
    cl.stop(transfer=False, timeout=0.2)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., tuple[Cluster, list[str]]]]:
    made: list[Cluster] = []

    def make(secret: str | None = None) -> tuple[Cluster, list[str]]:
        cl, nodes = quiet_node(tmp_path / f"n{len(made)}", secret=secret)
        made.append(cl)
        cl.start()
        return cl, nodes

    yield make
    stop_all(made)


# -- malformed bodies --------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any], str, list[str]], Any]


def _set(**changes: Any) -> Mutation:
    def mutate(msg: dict[str, Any], endpoint: str, nodes: list[str]) -> Any:
        return {**msg, **changes}
    return mutate


def _drop(field: str) -> Mutation:
    def mutate(msg: dict[str, Any], endpoint: str, nodes: list[str]) -> Any:
        name = SENDER_FIELD[endpoint] if field == "<sender>" else field
        return {k: v for k, v in msg.items() if k != name}
    return mutate


def _sender(which: Callable[[list[str]], Any]) -> Mutation:
    def mutate(msg: dict[str, Any], endpoint: str, nodes: list[str]) -> Any:
        return {**msg, SENDER_FIELD[endpoint]: which(nodes)}
    return mutate


def _raw(data: bytes) -> Mutation:
    return lambda msg, endpoint, nodes: data


def _wrong_prevote_flag(msg: dict[str, Any], endpoint: str, nodes: list[str]) -> Any:
    if endpoint == "requestvote":
        return {**msg, "prevote": True}
    if endpoint == "prevote":
        return {**msg, "prevote": False}
    return {**msg, "prevote": True}  # not a field of AppendEntries / TimeoutNow


def _missing_prevote_flag(msg: dict[str, Any], endpoint: str, nodes: list[str]) -> Any:
    return {k: v for k, v in msg.items() if k != "prevote"} if endpoint == "prevote" else msg


def _typed_field(msg: dict[str, Any], endpoint: str, nodes: list[str]) -> Any:
    """A field of the message's own kind with the wrong type."""
    if endpoint in ("requestvote", "prevote"):
        return {**msg, "prevote": "true" if endpoint == "prevote" else 0}
    return {**msg, "payload": 7}


MUTATIONS: dict[str, Mutation] = {
    "malformed-json": _raw(b'{"type": "VoteRequest", "term": 6,'),
    "not-utf8": _raw(b"\xff\xfe\x00\x01"),
    "empty-body": _raw(b""),
    "deep-nesting": _raw(b"[" * 100_000),
    "nan": _raw(b'{"type": "VoteRequest", "term": NaN}'),
    "huge-literal": _raw(b"9" * 5000),
    "array": lambda msg, endpoint, nodes: [msg],
    "string": _raw(b'"VoteRequest"'),
    "null": _raw(b"null"),
    "number": _raw(b"6"),
    "term-string": _set(term="6"),
    "term-float": _set(term=6.0),
    "term-null": _set(term=None),
    "version-string": _set(version="5,1"),
    "version-short": _set(version=[5]),
    "version-long": _set(version=[5, 1, 0]),
    "version-item-string": _set(version=[5, "1"]),
    "sender-int": _sender(lambda nodes: 7),
    "sender-empty": _sender(lambda nodes: ""),
    "sender-list": _sender(lambda nodes: [nodes[1]]),
    "flag-or-payload-wrong-type": _typed_field,
    "missing-type": _drop("type"),
    "missing-term": _drop("term"),
    "missing-version": _drop("version"),
    "missing-sender": _drop("<sender>"),
    "wrong-message-type": _set(type="VoteResponse"),
    "unknown-message-type": _set(type="Hello"),
    "unknown-field": _set(extra=1),
    "negative-term": _set(term=-1),
    "absurd-term": _set(term=MAX_TERM + 1),  # a node could not count on from it
    "huge-term": _set(term=10**30),
    "negative-version": _set(version=[-1, 1]),
    "absurd-version": _set(version=[5, MAX_TERM + 1]),
    "bool-term": _set(term=True),
    "bool-version": _set(version=[True, 1]),
    "prevote-flag-on-the-wrong-endpoint": _wrong_prevote_flag,
}
FORBIDDEN: dict[str, Mutation] = {
    "unknown-sender": _sender(lambda nodes: "127.0.0.1:1"),
    "self-as-sender": _sender(lambda nodes: nodes[0]),
}


def encode_body(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


# Cases that exist for one endpoint only (only prevote requires the flag; only AppendEntries has a round).
_ENDPOINT_CASES = [(e, c) for e in ENDPOINTS for c in MUTATIONS] + [
    ("prevote", "missing-prevote-flag"), ("appendentries", "bool-round"), ("appendentries", "negative-round")]


@pytest.mark.parametrize(("endpoint", "case"), _ENDPOINT_CASES)
def test_malformed_rpc_is_refused_and_changes_nothing(served: tuple[Cluster, list[str]], endpoint: str,
                                                      case: str) -> None:
    cl, nodes = served
    msg = base_message(endpoint, nodes[1])
    if case == "missing-prevote-flag":
        body = _missing_prevote_flag(msg, endpoint, nodes)
    elif case in ("bool-round", "negative-round"):
        body = {**msg, "round": True if case == "bool-round" else -1}
    else:
        body = MUTATIONS[case](msg, endpoint, nodes)
    before = snapshot(cl)
    resp = post_json(cl.port, endpoint, encode_body(body))
    assert_json_error(resp)
    assert resp.status == 400, resp
    assert snapshot(cl) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(FORBIDDEN))
def test_rpc_from_a_non_peer_is_forbidden_and_changes_nothing(served: tuple[Cluster, list[str]],
                                                             endpoint: str, case: str) -> None:
    cl, nodes = served
    body = FORBIDDEN[case](base_message(endpoint, nodes[1]), endpoint, nodes)
    before = snapshot(cl)
    resp = post_json(cl.port, endpoint, encode_body(body))
    assert_json_error(resp)
    assert resp.status == 403, resp
    assert snapshot(cl) == before


def _request_head(endpoint: str, *headers: str) -> bytes:
    lines = [f"POST /cluster/{endpoint} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


RAW_CASES: dict[str, Callable[[str, bytes], tuple[bytes, int]]] = {
    # The body is not even sent: the header alone must be enough to refuse it.
    "oversized": lambda ep, body: (_request_head(ep, f"Content-Length: {MAX_BODY + 1}"), 413),
    # No Content-Length: an empty body (RFC 9112), which is not a valid message.
    "no-content-length": lambda ep, body: (_request_head(ep, "Connection: close") + body, 400),
    "chunked": lambda ep, body: (_request_head(ep, "Transfer-Encoding: chunked")
                                 + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n", 411),
    "bad-content-length": lambda ep, body: (_request_head(ep, "Content-Length: twelve") + body, 400),
    "negative-content-length": lambda ep, body: (_request_head(ep, "Content-Length: -5") + body, 400),
    "two-content-lengths": lambda ep, body: (_request_head(ep, f"Content-Length: {len(body)}",
                                                           f"Content-Length: {len(body) + 1}") + body, 400),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(RAW_CASES))
def test_bad_framing_is_refused_and_changes_nothing(served: tuple[Cluster, list[str]], endpoint: str,
                                                    case: str) -> None:
    cl, nodes = served
    body = json.dumps(base_message(endpoint, nodes[1])).encode()
    data, expected = RAW_CASES[case](endpoint, body)
    before = snapshot(cl)
    resp = raw_request(cl.port, data)
    assert_json_error(resp)
    assert resp.status == expected, resp
    assert snapshot(cl) == before


# One rule on every path: the peer fast path (requestvote...) and the Flask routes (stepdown).
FRAMING_PATHS = ["/cluster/requestvote", "/cluster/stepdown"]


@pytest.mark.parametrize("path", FRAMING_PATHS)
@pytest.mark.parametrize(("headers", "status"), [
    (("Transfer-Encoding: chunked",), 411),
    (("Content-Length: twelve",), 400),
    ((f"Content-Length: {MAX_BODY + 1}",), 413),
    (("Content-Length: 3", "Content-Length: 4"), 400),
])
def test_one_framing_rule_on_every_path_and_the_connection_closes(served: tuple[Cluster, list[str]], path: str,
                                                                   headers: tuple[str, ...], status: int) -> None:
    cl, _ = served
    head = "\r\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers]) + "\r\n\r\n"
    with socket.create_connection(("127.0.0.1", cl.port), timeout=5) as sock:
        sock.sendall(head.encode())
        resp = http.client.HTTPResponse(sock, method="POST")
        resp.begin()
        resp.read()
        assert resp.status == status
        assert (resp.getheader("Connection") or "").lower() == "close"
        assert sock.recv(1) == b""  # and it really is closed


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/cluster/requestvote", b"{", 400),          # malformed, but framed: the body was read
    ("/cluster/requestvote", json.dumps({"type": "VoteRequest", "term": 1, "candidate": "10.9.9.9:1",
                                         "version": [0, 0]}).encode(), 403),
    ("/cluster/stepdown", b"{", 400),
    ("/cluster/nowhere", b"", 404),
])
def test_other_refusals_keep_the_connection_open(served: tuple[Cluster, list[str]], path: str, body: bytes,
                                                 status: int) -> None:
    cl, nodes = served
    conn = http.client.HTTPConnection("127.0.0.1", cl.port, timeout=5)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == status and not resp.will_close
        sock = conn.sock
        conn.request("GET", "/cluster/id")  # on the same connection
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"id": nodes[0]} and conn.sock is sock
    finally:
        conn.close()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversized_body_is_refused_with_413(served: tuple[Cluster, list[str]], endpoint: str) -> None:
    """A whole oversized body sent with its (honest) Content-Length."""
    cl, nodes = served
    before = snapshot(cl)
    body = b" " * (MAX_BODY + 1)
    conn = http.client.HTTPConnection("127.0.0.1", cl.port, timeout=5)
    try:
        try:
            conn.request("POST", f"/cluster/{endpoint}", body=body, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all; the answer is still there
        resp = conn.getresponse()
        got = Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()
    assert got.status == 413, got
    assert_json_error(got)
    assert snapshot(cl) == before


# -- the same refusals through a blueprint mounted in the user's own Flask app ----------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(MUTATIONS) + list(FORBIDDEN))
def test_mounted_blueprint_refuses_the_same(mounted: tuple[Cluster, list[str], Any], endpoint: str,
                                            case: str) -> None:
    cl, nodes, client = mounted
    mutate = MUTATIONS.get(case) or FORBIDDEN[case]
    body = encode_body(mutate(base_message(endpoint, nodes[1]), endpoint, nodes))
    before = snapshot(cl)
    resp = client.post(f"/cluster/{endpoint}", data=body, content_type="application/json")
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.data[:200])
    if case != "empty-body":  # Flask's test client sends no Content-Length for an empty body: 411
        assert resp.status_code == (403 if case in FORBIDDEN else 400)
    assert isinstance(resp.get_json()["error"], str)
    assert snapshot(cl) == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_mounted_blueprint_refuses_oversized_and_unframed_bodies(mounted: tuple[Cluster, list[str], Any],
                                                                 endpoint: str) -> None:
    cl, nodes, client = mounted
    before = snapshot(cl)
    resp = client.post(f"/cluster/{endpoint}", data=b" " * (MAX_BODY + 1), content_type="application/json")
    assert resp.status_code == 413
    assert isinstance(resp.get_json()["error"], str)
    resp = client.post(f"/cluster/{endpoint}")  # no body, no Content-Length
    assert 400 <= resp.status_code < 500
    assert isinstance(resp.get_json()["error"], str)
    assert snapshot(cl) == before


# -- accepted requests (the other side of every refusal above) ---------------------------------


def test_valid_rpcs_are_accepted_and_do_change_state(fresh: Callable[..., tuple[Cluster, list[str]]]) -> None:
    """The requests the refusal tests mutate are accepted as they are, and visibly so."""
    cl, nodes = fresh()
    b = nodes[1]
    file = Path(cl.state_dir) / "state.json"

    before = snapshot(cl)
    resp = post_json(cl.port, "prevote", json.dumps(base_message("prevote", b)).encode())
    assert resp.status == 200, resp
    reply = resp.json()
    assert reply["type"] == "VoteResponse" and reply["voter"] == cl.id and reply["prevote"] is True
    after = snapshot(cl)
    assert after["heard_from"][b] and not before["heard_from"][b]
    assert after["term"] == 5 and after["file"] == before["file"]  # a pre-vote never changes the term

    resp = post_json(cl.port, "requestvote", json.dumps(base_message("requestvote", b)).encode())
    assert resp.status == 200, resp
    assert resp.json()["type"] == "VoteResponse" and resp.json()["prevote"] is False

    resp = post_json(cl.port, "appendentries", json.dumps(base_message("appendentries", b)).encode())
    assert resp.status == 200, resp
    reply = resp.json()
    assert reply["type"] == "AppendResponse" and reply["success"] is True and reply["follower"] == cl.id
    st = cl.status()
    assert st["term"] == 6 and st["leader_id"] == b and st["state"] == "follower"
    assert cl.payload == ((6, 1), "from the new leader")
    on_disk = StateFile(cl.state_dir, cl.id).load()
    assert on_disk is not None and on_disk.term == 6 and on_disk.payload == "from the new leader"

    # TimeoutNow from the leader it follows: it campaigns at once (term 7, votes for itself).
    written = file.read_bytes()
    msg = {**base_message("timeoutnow", b), "term": 6, "version": [6, 1]}
    resp = post_json(cl.port, "timeoutnow", json.dumps(msg).encode())
    assert resp.status == 204, resp
    st = cl.status()
    assert st["term"] == 7 and st["voted_for"] == cl.id and st["state"] == "candidate"
    assert file.read_bytes() != written


# -- authentication ------------------------------------------------------------------------------


def _signed_cases(endpoint: str, nodes: list[str]) -> dict[str, tuple[bytes, dict[str, str]]]:
    a, b, c = nodes
    path = f"/cluster/{endpoint}"
    body = json.dumps(base_message(endpoint, b)).encode()
    good = Signer(SECRET)
    return {
        "unsigned": (body, {}),
        "wrong-secret": (body, Signer("another secret").sign("POST", path, b, body)),
        "tampered-body": (body, good.sign("POST", path, b, body.replace(b'"term": 6', b'"term": 7')
                                          .replace(b'"term": 5', b'"term": 6'))),
        "garbage-signature": (body, {**good.sign("POST", path, b, body), "X-Cluster-Signature": "00" * 32}),
        "stale-timestamp": (body, Signer(SECRET, clock=lambda: time.time() - 60).sign("POST", path, b, body)),
        "future-timestamp": (body, Signer(SECRET, clock=lambda: time.time() + 60).sign("POST", path, b, body)),
        "signed-by-another-member": (body, good.sign("POST", path, c, body)),
        "signed-for-another-path": (body, good.sign("POST", "/cluster/other", b, body)),
        "missing-timestamp": (body, {k: v for k, v in good.sign("POST", path, b, body).items()
                                     if k != "X-Cluster-Timestamp"}),
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(_signed_cases("prevote", ["a:1", "b:1", "c:1"])))
def test_unauthenticated_rpc_is_refused_with_401_and_changes_nothing(
    signed: tuple[Cluster, list[str]], endpoint: str, case: str
) -> None:
    cl, nodes = signed
    body, headers = _signed_cases(endpoint, nodes)[case]
    before = snapshot(cl)
    resp = request(cl.port, "POST", f"/cluster/{endpoint}", body, {"Content-Type": "application/json", **headers})
    assert resp.status == 401, resp
    assert_json_error(resp)
    assert snapshot(cl) == before


def test_stepdown_needs_a_signature_when_a_secret_is_set(signed: tuple[Cluster, list[str]]) -> None:
    cl, nodes = signed
    before = snapshot(cl)
    for body in (b"", json.dumps({"to": nodes[1]}).encode()):
        resp = request(cl.port, "POST", "/cluster/stepdown", body)
        assert resp.status == 401, resp
        assert_json_error(resp)
        headers = Signer("another secret").sign("POST", "/cluster/stepdown", nodes[1], body)
        resp = request(cl.port, "POST", "/cluster/stepdown", body, headers)
        assert resp.status == 401, resp
    # Correctly signed, it passes authentication and is refused for what it is: not the leader.
    headers = Signer(SECRET).sign("POST", "/cluster/stepdown", nodes[1], b"")
    resp = request(cl.port, "POST", "/cluster/stepdown", b"", headers)
    assert resp.status == 409, resp
    assert snapshot(cl) == before


def test_correctly_signed_rpc_is_accepted(fresh: Callable[..., tuple[Cluster, list[str]]]) -> None:
    cl, nodes = fresh(secret=SECRET)
    signer = Signer(SECRET)
    b = nodes[1]
    body = json.dumps(base_message("appendentries", b)).encode()
    resp = post_json(cl.port, "appendentries", body, signer=signer, sign_as=b)
    assert resp.status == 200, resp
    assert resp.json()["success"] is True
    assert cl.status()["term"] == 6 and cl.status()["leader_id"] == b
    body = json.dumps(base_message("prevote", b)).encode()
    resp = post_json(cl.port, "prevote", body, signer=signer, sign_as=b)
    assert resp.status == 200, resp
    assert resp.json()["type"] == "VoteResponse"


def test_three_nodes_with_a_shared_secret_elect_a_leader(tmp_path: Path) -> None:
    """And a node with the wrong secret is left out: signatures are really checked."""
    nodes = addresses(3)
    secrets = {nodes[0]: SECRET, nodes[1]: SECRET, nodes[2]: "not the cluster's secret"}
    cls = [Cluster(nodes, listen=me, state_dir=tmp_path / str(i), secret=secrets[me], **FAST)
           for i, me in enumerate(nodes)]
    try:
        for cl in cls:
            cl.start()
        good, odd = cls[:2], cls[2]

        def agreed() -> Cluster | None:
            return the_leader(cls, good)

        leader = wait_for(agreed, what="a leader among the two nodes sharing the secret")
        assert leader in good
        assert odd.status()["leader_id"] is None and odd.status()["term"] == 0
        follower = next(cl for cl in good if cl is not leader)

        # Status over HTTP, from the leader and from the follower.
        st = request(leader.port, "GET", "/cluster/status").json()
        assert st["id"] == leader.id and st["is_leader"] is True and st["state"] == "leader"
        assert st["leader_id"] == st["leader_address"] == leader.id
        assert st["lease_remaining_ms"] > 0
        assert {n["address"] for n in st["nodes"]} >= {follower.id, odd.id}
        assert all(n["last_contact_ms"] is not None for n in st["nodes"] if n["address"] == follower.id)
        st = request(follower.port, "GET", "/cluster/status").json()
        assert st["is_leader"] is False and st["leader_address"] == leader.id and st["lease_remaining_ms"] == 0

        # An unsigned stepdown on the leader is refused and changes nothing...
        resp = request(leader.port, "POST", "/cluster/stepdown", b"")
        assert resp.status == 401, resp
        assert leader.is_leader()
        # ...a signed one hands over to the only reachable peer, which then leads.
        headers = Signer(SECRET).sign("POST", "/cluster/stepdown", follower.id, b"")
        resp = request(leader.port, "POST", "/cluster/stepdown", b"", headers)
        assert resp.status == 200, resp
        assert resp.json() == {"transferred_to": follower.id, "from": leader.id}
        wait_for(lambda: agreed() is follower, what="the transfer target to lead")
    finally:
        stop_all(cls)


def test_a_node_with_the_wrong_secret_is_named_once_and_shown_in_status(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong secret on one node: each side says so once (then a count every 30 s, not ten
    lines a second), names the peer by its node address, and status shows who refuses whom."""
    nodes = addresses(3)
    secrets = {nodes[0]: SECRET, nodes[1]: SECRET, nodes[2]: "not the cluster's secret"}
    cls = [Cluster(nodes, listen=me, state_dir=tmp_path / str(i), secret=secrets[me], **FAST)
           for i, me in enumerate(nodes)]
    caplog.set_level(logging.WARNING, logger="celery_cluster.http")
    try:
        for cl in cls:
            cl.start()
        good, odd = cls[:2], cls[2]
        leader = wait_for(lambda: the_leader(cls, good), what="a leader among the two nodes sharing the secret")

        def refused_by(cl: Cluster) -> dict[str, Any]:
            return {n["address"]: n["refuses_us"] for n in cl.status()["nodes"] if n["refuses_us"]}

        # The odd node's pre-votes are refused by both; the leader's heartbeats by the odd one.
        wait_for(lambda: set(refused_by(odd)) == {good[0].id, good[1].id}, what="the odd node to see refusals")
        wait_for(lambda: odd.id in refused_by(leader), what="the leader to see the odd node refuse it")
        assert refused_by(leader)[odd.id]["status"] == 401
        assert "signature" in refused_by(leader)[odd.id]["error"]
        deadline = time.monotonic() + 1.0  # ~20 heartbeats refused meanwhile
        while time.monotonic() < deadline:
            time.sleep(0.05)  # the observation window
        lines = [r.getMessage() for r in caplog.records if r.name == "celery_cluster.http"]
        refusing = [m for m in lines if "refuses our requests" in m]
        refused = [m for m in lines if m.startswith("[cluster] refused")]
        assert refusing and refused
        assert len(lines) <= 8, lines  # once per (peer, kind), not once per heartbeat
        assert any(odd.id in m and "same shared secret" in m for m in refusing), refusing
        assert all(any(f"says it is {n})" in m for n in nodes) for m in refused), refused  # the peer's name
    finally:
        stop_all(cls)


# -- status, id, stepdown --------------------------------------------------------------------


def test_status_and_id_endpoints(served: tuple[Cluster, list[str]]) -> None:
    cl, nodes = served
    resp = request(cl.port, "GET", "/cluster/id")
    assert resp.status == 200
    assert resp.json() == {"id": nodes[0]}
    resp = request(cl.port, "GET", "/cluster/status")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    st = resp.json()
    assert st["id"] == nodes[0]
    assert st["state"] == "follower"
    assert st["term"] == INITIAL.term  # loaded from the state file
    assert st["voted_for"] is None
    assert st["leader_id"] is None and st["leader_address"] is None
    assert st["is_leader"] is False and st["lease_remaining_ms"] == 0
    listed = {n["address"]: n for n in st["nodes"]}
    assert set(nodes[1:]) <= set(listed) <= set(nodes)
    assert listed[nodes[1]]["last_contact_ms"] is None  # never heard from


def test_stepdown_on_a_follower_is_a_conflict(served: tuple[Cluster, list[str]]) -> None:
    cl, nodes = served
    before = snapshot(cl)
    resp = request(cl.port, "POST", "/cluster/stepdown", b"")
    assert resp.status == 409, resp
    assert "not the leader" in resp.json()["error"]
    resp = request(cl.port, "POST", "/cluster/stepdown", json.dumps({"to": "127.0.0.1:1"}).encode())
    assert resp.status == 400, resp
    assert snapshot(cl) == before


# -- the connection -------------------------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(
    fresh: Callable[..., tuple[Cluster, list[str]]]
) -> None:
    cl, nodes = fresh()
    conn = http.client.HTTPConnection("127.0.0.1", cl.port, timeout=5)
    try:
        conn.connect()
        sock = conn.sock
        local = sock.getsockname()
        calls: list[tuple[str, str, bytes | None]] = [
            ("GET", "/cluster/status", None),
            ("GET", "/cluster/id", None),
            ("POST", "/cluster/prevote", json.dumps(base_message("prevote", nodes[1])).encode()),
            ("POST", "/cluster/appendentries", json.dumps(base_message("appendentries", nodes[1])).encode()),
            ("GET", "/cluster/status", None),
        ] * 3
        for method, path, body in calls:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, (path, resp.status, data)
            assert resp.version == 11
            assert (resp.getheader("Connection") or "").lower() != "close"
            assert not resp.will_close
            assert conn.sock is sock  # the very same connection
        assert sock.getsockname() == local
    finally:
        conn.close()
    assert cl.status()["leader_id"] == nodes[1]  # the requests really reached the node


def test_refusals_that_close_the_connection_say_so(served: tuple[Cluster, list[str]]) -> None:
    cl, nodes = served
    conn = http.client.HTTPConnection("127.0.0.1", cl.port, timeout=5)
    try:
        conn.request("POST", "/cluster/prevote", body=b"{", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 400
        if resp.will_close:
            assert (resp.getheader("Connection") or "").lower() == "close"
        # Whatever it decided, the client can go on (http.client reconnects when told to).
        conn.request("GET", "/cluster/id")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"id": nodes[0]}
    finally:
        conn.close()


def test_server_sets_tcp_nodelay(served: tuple[Cluster, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    setup = _KeepAliveHandler.setup

    def spy(self: _KeepAliveHandler) -> None:
        setup(self)
        seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(_KeepAliveHandler, "setup", spy)
    cl, _ = served
    assert request(cl.port, "GET", "/cluster/id").status == 200
    wait_for(lambda: seen, timeout=2.0, what="the handler's setup")
    assert seen and all(v != 0 for v in seen)


def test_a_stopped_node_takes_no_more_requests(fresh: Callable[..., tuple[Cluster, list[str]]]) -> None:
    """Peers keep their connections: after stop() a request on one must not reach the node."""
    cl, nodes = fresh()
    conn = http.client.HTTPConnection("127.0.0.1", cl.port, timeout=5)
    try:
        body = json.dumps(base_message("prevote", nodes[1])).encode()
        conn.request("POST", "/cluster/prevote", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        cl.stop(transfer=False, timeout=0.2)
        before = snapshot(cl)
        body = json.dumps(base_message("appendentries", nodes[1])).encode()
        try:
            conn.request("POST", "/cluster/appendentries", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (ConnectionError, http.client.HTTPException):
            pass  # closed: fine too
        else:
            assert resp.status == 503, (resp.status, data)
            assert resp.will_close
        assert snapshot(cl) == before
        assert cl.status()["term"] == INITIAL.term
    finally:
        conn.close()


def test_stop_closes_kept_alive_connections(fresh: Callable[..., tuple[Cluster, list[str]]]) -> None:
    """A stopped node answers nothing more on a connection a peer kept open (it once went on
    answering 401s, or GETs, from the handler thread of that connection)."""
    cl, _ = fresh()
    sock = socket.create_connection(("127.0.0.1", cl.port), timeout=5)
    try:
        sock.sendall(b"GET /cluster/id HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        cl.stop(transfer=False, timeout=0.2)
        sock.settimeout(5)
        rest = first.split(b"\r\n\r\n", 1)[1]
        while True:  # the rest of the first response, then EOF: the server ended the connection
            data = sock.recv(4096)
            if not data:
                break
            rest += data
        assert len(rest) <= len(json.dumps({"id": cl.id})) + 2
    finally:
        sock.close()


# -- the blueprint in the user's own Flask app ------------------------------------------------------


def test_blueprint_mounts_in_the_users_flask_app(tmp_path: Path) -> None:
    (me,) = addresses(1)
    cl = Cluster([me], listen=None, advertise=me, state_dir=tmp_path, **FAST)
    app = Flask("users_app")

    @app.get("/health")
    def health() -> str:
        return "ok"

    app.register_blueprint(cl.blueprint())
    client = app.test_client()
    try:
        resp = client.get("/cluster/status")
        assert resp.status_code == 200
        st = resp.get_json()
        assert st["id"] == me and st["state"] == "follower" and st["is_leader"] is False
        assert client.get("/cluster/id").get_json() == {"id": me}
        assert client.get("/health").data == b"ok"
        assert cl.port is None  # no embedded server
        cl.start()
        wait_for(lambda: client.get("/cluster/status").get_json()["is_leader"], what="leadership via the app")
        st = client.get("/cluster/status").get_json()
        assert st["state"] == "leader" and st["leader_address"] == me and st["term"] == 1
    finally:
        cl.stop()


def test_a_node_served_by_the_users_app_takes_part_in_elections(tmp_path: Path) -> None:
    """Two embedded servers and one blueprint in a user's app (served by plain werkzeug)."""
    nodes = addresses(3)
    cls = [Cluster(nodes, listen=me, state_dir=tmp_path / str(i), **FAST) for i, me in enumerate(nodes[:2])]
    mounted = Cluster(nodes, advertise=nodes[2], state_dir=tmp_path / "2", **FAST)
    cls.append(mounted)
    app = Flask("users_app")
    app.register_blueprint(mounted.blueprint())
    server = make_server("127.0.0.1", port_of(nodes[2]), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        for cl in cls:
            cl.start()

        def agreed() -> Cluster | None:
            return the_leader(cls)

        leader = wait_for(agreed, what="one leader all three agree on")
        if leader is not mounted:
            hand_over(leader, mounted.id)
            wait_for(lambda: agreed() is mounted, what="the mounted node to lead")
    finally:
        stop_all(cls)
        server.shutdown()
        server.server_close()
