"""Hypothesis-generated bad input against every ``/cluster`` route of a real node on 127.0.0.1.

One module-scoped node - A of [A, B, C], where B and C are loopback ports nobody listens on, so
A never elects itself - runs the embedded server with a shared secret and its state in a
temporary directory (election timeout 40-60 s: it changes no hard state on its own). For every
route (the four RPCs, ``status``, ``id``, ``health``, ``metrics``, ``overview``, ``stepdown``,
and unknown paths - ``/cluster`` and ``/cluster/``, the status page, among them) each
example draws one request - method, request target, framing, headers, signature, body - and
sends it on a new connection, over a raw socket (so the framing can be wrong) or through
``http.client``; a separate test sends several requests on one keep-alive connection, one after
the other or pipelined. After every request:

* a non-empty request gets an answer within ``IO_TIMEOUT``, and its status is 2xx or 4xx (or the
  503 by which ``GET /cluster/health`` says "unhealthy");
* a 2xx only for a read (GET/HEAD of ``status``, ``id``, ``health``, ``metrics``, ``overview``,
  the page; OPTIONS with an empty body)
  or for a validly signed, well-formed RPC from a peer - which a canonical request also must get;
* term, vote, payload (version and text), members, "heard from" and the state file are untouched unless
  the request was validly signed (fresh timestamp, a peer's name, a well-formed message of the
  route's type from that same peer); after such a request the state file still loads and holds
  what the node holds;
* an answer that says ``Connection: close`` is followed by the server closing the connection,
  and one that does not leaves it usable;
* the server keeps answering (``GET /cluster/status`` -> 200 on a new connection) and none of
  the node's threads has died.

``FUZZ_EXAMPLES`` (default 500) examples per route; ``FUZZ_EXAMPLES=5000`` for the long run
(``python -m pytest -q -p no:randomly tests/test_fuzz_routes.py``). A failure shows the exact
bytes sent and the answer (and hypothesis's ``@reproduce_failure`` blob).

The ``test_defect_*`` tests at the end pin library defects the fuzzing found, each with a minimal
request; they fail until the library is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from celery_cluster import Cluster
from celery_cluster.http_server import MAX_BODY
from celery_cluster.messages import MAX_ADDRESS_LEN, MAX_NUMBER, MAX_PAYLOAD_LEN, MAX_TERM, HardState
from celery_cluster.state_file import StateFile
from celery_cluster.status_page import PAGE
from tests.support import free_ports

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
#: Every socket operation (connect, send, each receive) gives up after this many seconds.
IO_TIMEOUT = 3.0
HOST = "127.0.0.1"
SECRET = b"fuzz: correct horse battery staple"
#: The node starts from this state (a term and a payload to protect).
INITIAL = HardState(term=5, voted_for=None, payload_version=(5, 1), payload="initial")
#: Validly signed, well-formed messages keep term and version below this, so that one example
#: cannot wedge the shared node at term 2**53 for the rest of the run (that boundary has its
#: own test, on a node of its own: test_defect_term_at_the_accepted_maximum_fail_stops_the_node).
CAP = 10**6

RPCS = ("requestvote", "prevote", "appendentries", "timeoutnow")
#: "health" (GET /cluster/health, 200 or 503 - a Kubernetes probe) is not in the README's list.
READS = ("status", "id", "health", "metrics", "overview")
ROUTES = (*RPCS, *READS, "stepdown", "unknown")
TYPE_OF = {"requestvote": "VoteRequest", "prevote": "VoteRequest", "appendentries": "AppendEntries",
           "timeoutnow": "TimeoutNow"}
SENDER_FIELD = {"requestvote": "candidate", "prevote": "candidate", "appendentries": "leader",
                "timeoutnow": "leader"}
#: The fields of each RPC's message: name -> (kind, required). From the protocol as documented
#: in celery_cluster/messages.py, written out again here so the test does not trust the decoder.
FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "VoteRequest": {"term": ("term", True), "candidate": ("address", True), "version": ("version", True),
                    "prevote": ("bool", False), "transfer": ("bool", False), "cluster": ("cluster", False),
                    "members": ("members", False), "healthy": ("bool", False)},
    "AppendEntries": {"term": ("term", True), "leader": ("address", True), "round": ("count", True),
                      "version": ("version", True), "payload": ("payload", False), "members": ("members", False),
                      "cluster": ("cluster", False), "commit": ("version", False)},
    "TimeoutNow": {"term": ("term", True), "leader": ("address", True), "version": ("version", True),
                   "payload": ("payload", False), "members": ("members", False), "cluster": ("cluster", False)},
}
#: Most members a configuration may list; the longest cluster id (messages.py, written out again).
MAX_MEMBERS, MAX_CLUSTER_ID = 64, 64
#: The signature headers (celery_cluster/auth.py; spelled out so a rename there shows up here).
SENDER_HEADER = "X-Cluster-Sender"
TIMESTAMP_HEADER = "X-Cluster-Timestamp"
SIGNATURE_HEADER = "X-Cluster-Signature"
STRANGER = "127.0.0.1:1"
#: What a timestamp must look like (README: unix seconds, a decimal string, up to 3 decimals).
TIMESTAMP_RE = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,3})?")


# == the node under test ==========================================================================


@dataclasses.dataclass
class Target:
    cl: Cluster
    nodes: list[str]
    state_dir: Path
    #: The threads the node started (server, election timer, callbacks): they must stay alive.
    threads: set[threading.Thread] = dataclasses.field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.cl.port is not None
        return self.cl.port

    @property
    def cluster_id(self) -> str:
        """The node's cluster id (messages carrying another are dropped, changing nothing)."""
        return self.cl.node.core.cluster

    @property
    def me(self) -> str:
        return self.nodes[0]

    @property
    def peers(self) -> list[str]:
        return self.nodes[1:]

    @property
    def state_path(self) -> Path:
        sf = getattr(self.cl.node, "state_file", None)
        return Path(getattr(sf, "path", self.state_dir / "state.json"))


def _quiet_loggers() -> list[tuple[logging.Logger, int]]:
    """Every refusal logs a warning: thousands of records would fill the captured log of a
    failure. Errors (a 500's traceback) still show."""
    saved = []
    for name in ("celery_cluster.http", "werkzeug"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL if name == "werkzeug" else logging.ERROR)
    return saved


@contextlib.contextmanager
def running_node(state_dir: Path, initial: HardState | None) -> Iterator[Target]:
    """Node A of [A, B, C] (B, C: free loopback ports nobody listens on), started, with the
    shared secret; ``initial`` pre-written to its state file."""
    nodes = [f"{HOST}:{p}" for p in free_ports(3)]
    if initial is not None:
        StateFile(state_dir, nodes[0]).save(initial)
    cl = Cluster(nodes, listen=nodes[0], state_dir=state_dir, secret=SECRET,
                 election_timeout=(40.0, 60.0), heartbeat_interval=0.05)
    saved = _quiet_loggers()
    before = set(threading.enumerate())
    cl.start()
    t = Target(cl, nodes, state_dir, threads=set(threading.enumerate()) - before)
    try:
        check_alive(t, "at start")
        yield t
    finally:
        cl.stop(transfer=False, timeout=0.2)
        for logger, level in saved:
            logger.setLevel(level)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with running_node(tmp_path_factory.mktemp("fuzz-node"), INITIAL) as t:
        yield t


# == what the node holds ==========================================================================


def snapshot(t: Target) -> dict[str, Any]:
    """Everything a refused request must leave alone."""
    st_ = t.cl.status()
    _, payload = t.cl.payload
    core = getattr(t.cl.node, "core", None)
    heard = getattr(core, "last_heard", None)
    try:
        stat = os.stat(t.state_path)
        file = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        file = None
    return {
        "term": st_["term"],
        "voted_for": st_["voted_for"],
        "payload_version": tuple(st_["payload_version"]),
        "payload_sha256": hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:16],
        "members": tuple(st_["members"]),
        "config_version": tuple(st_["config_version"]),
        "heard": dict(heard) if isinstance(heard, dict)
        else {n["address"]: n["last_contact_ms"] is not None for n in st_["nodes"]},
        "failure": st_.get("failure"),
        "state_file": file,
    }


def check_state_file(t: Target, ctx: str) -> None:
    """After a validly signed request: the state file loads and holds what the node holds."""
    st_ = t.cl.status()
    version, payload = t.cl.payload
    try:
        stored = StateFile(t.state_dir, t.me).load()
    except Exception as exc:  # noqa: BLE001 - report what broke the file
        raise AssertionError(f"the state file no longer loads: {exc!r}\n{ctx}") from None
    core = t.cl.node.core  # the replicated configuration, once a leader (or a message) gave one
    held = HardState(st_["term"], st_["voted_for"], version, payload,
                     *((tuple(st_["members"]), tuple(st_["config_version"]), core.cluster) if core.replicated else ()))
    assert stored == held, f"state file {stored!r} != node {held!r}\n{ctx}"
    assert st_.get("failure") is None, f"the node fail-stopped: {st_.get('failure')}\n{ctx}"


STATUS_REQUEST = f"GET /cluster/status HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


def check_alive(t: Target, ctx: str) -> None:
    """The server answers GET /cluster/status on a new connection; no node thread has died."""
    reply = exchange(t.port, STATUS_REQUEST, half_close=False, method="GET")
    assert isinstance(reply, Reply) and reply.status == 200, \
        f"the server stopped answering GET /cluster/status: {reply!r}\nafter: {ctx}"
    status = json.loads(reply.body)
    assert status["id"] == t.me, status
    assert status.get("failure") is None, f"the node fail-stopped: {status['failure']}\nafter: {ctx}"
    dead = [th.name for th in t.threads if not th.is_alive()]
    assert not dead, f"node threads died: {dead}\nafter: {ctx}"


# == talking to it ================================================================================


@dataclasses.dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    #: After an answer saying "Connection: close": did the server then close? (None: not checked)
    closed: bool | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    @property
    def says_close(self) -> bool:
        return "close" in (self.header("connection") or "").lower()

    def __repr__(self) -> str:
        head = "".join(f"\n    {k}: {v}" for k, v in self.headers)
        return f"<{self.status} {self.reason}{head}\n    body {shorten(self.body, 400)}>"


@dataclasses.dataclass
class NoAnswer:
    why: str
    partial: bytes = b""

    def __repr__(self) -> str:
        return f"<no answer: {self.why}; received {shorten(self.partial, 400)}>"


def shorten(data: bytes, limit: int = 2000) -> str:
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit // 2]!r} ... ({len(data)} bytes) ... {data[-limit // 4:]!r}"


class _Reader:
    """Reads HTTP/1.x responses off one socket (several in a row on a kept-alive connection)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _line(self) -> bytes | None:
        while b"\n" not in self.buf:
            if len(self.buf) > 65536 or not self._fill():
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def read(self, method: str) -> Reply | NoAnswer:
        start = self.buf
        try:
            line = self._line()
            if line is None:
                return NoAnswer("connection closed before a status line", start + self.buf)
            parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                return NoAnswer(f"not an HTTP status line: {line!r}", self.buf)
            headers = []
            while True:
                h = self._line()
                if h is None:
                    return NoAnswer("connection closed inside the response headers", line + self.buf)
                if h in (b"\r\n", b"\n"):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers.append((name.strip().lower(), value.strip()))
            reply = Reply(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, b"")
            length = reply.header("content-length")
            if method == "HEAD" or reply.status in (204, 304) or reply.status < 200:
                return reply
            if length is None:
                while self._fill():
                    pass
                reply.body, self.buf = self.buf, b""
                return reply
            need = int(length)
            while len(self.buf) < need:
                if not self._fill():
                    return NoAnswer(f"connection closed {need - len(self.buf)} bytes short of the body",
                                    line + self.buf)
            reply.body, self.buf = self.buf[:need], self.buf[need:]
            return reply
        except TimeoutError:
            return NoAnswer(f"nothing for {IO_TIMEOUT} s (the server hangs)", start + self.buf)

    def closed_after(self) -> bool:
        """True if the server closes the connection (EOF or reset) within IO_TIMEOUT. Whatever
        comes first is dropped: the body of an error page sent for a request the server could
        not parse (so it did not know it was a HEAD)."""
        try:
            while len(self.buf) < 1 << 20:
                if not self._fill():
                    return True
            return False
        except TimeoutError:
            return False


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before taking it all; its answer is still there


def exchange(port: int, data: bytes, *, half_close: bool, method: str) -> Reply | NoAnswer:
    """Send ``data`` on a new connection and read one response (bounded by IO_TIMEOUT)."""
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        _send(sock, data)
        if half_close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        reader = _Reader(sock)
        reply = reader.read(method)
        if isinstance(reply, Reply) and reply.says_close:
            reply.closed = reader.closed_after()
        return reply


def exchange_http_client(port: int, method: str, target: str, headers: list[tuple[str, str]],
                         body: bytes) -> Reply | NoAnswer:
    """The same through http.client: a well-formed request as a real client frames it."""
    conn = http.client.HTTPConnection(HOST, port, timeout=IO_TIMEOUT)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        try:
            conn.endheaders(body)
            resp = conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as exc:
            return NoAnswer(f"http.client: {exc!r}")
        except TimeoutError:
            return NoAnswer(f"nothing for {IO_TIMEOUT} s (the server hangs)")
        data = resp.read()
        reply = Reply(resp.status, resp.reason, [(k.lower(), v) for k, v in resp.getheaders()], data)
        if reply.says_close:
            reply.closed = resp.will_close or conn.sock is None
        return reply
    finally:
        conn.close()


# == signing (written out from the README/auth docstring, not with the library's Signer) ========


def hmac_hex(secret: bytes, method: str, path: str, timestamp: str, sender: str, body: bytes) -> str:
    head = f"{method.upper()}\n{path}\n{timestamp}\n{sender}\n".encode("utf-8", "surrogatepass")
    return hmac.new(secret, head + body, hashlib.sha256).hexdigest()


def fresh_timestamp(offset: float = 0.0) -> str:
    return f"{time.time() + offset:.3f}"


# == the oracle ===================================================================================


def _count(v: Any, cap: int = MAX_NUMBER) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= cap


def _field_ok(kind: str, v: Any) -> bool:
    if kind == "count":
        return _count(v)
    if kind == "term":
        return _count(v, MAX_TERM)
    if kind == "address":
        return isinstance(v, str) and 0 < len(v) <= MAX_ADDRESS_LEN
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "version":
        return isinstance(v, list) and len(v) == 2 and all(_count(x, MAX_TERM) for x in v)
    if kind == "payload":
        return v is None or (isinstance(v, str) and len(v) <= MAX_PAYLOAD_LEN)
    if kind == "cluster":
        return isinstance(v, str) and len(v) <= MAX_CLUSTER_ID
    if kind == "members":
        return v is None or (isinstance(v, list) and 0 < len(v) <= MAX_MEMBERS
                             and all(_field_ok("address", m) for m in v) and len(set(v)) == len(v))
    raise AssertionError(kind)


def parse_json(body: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(body)
    except (ValueError, RecursionError):
        return False, None


def well_formed(route: str, body: bytes) -> dict[str, Any] | None:
    """The message, if ``body`` is a well-formed ``route`` request (whoever it names)."""
    ok, obj = parse_json(body)
    if not ok or not isinstance(obj, dict) or obj.get("type") != TYPE_OF[route]:
        return None
    fields = FIELDS[TYPE_OF[route]]
    if set(obj) - set(fields) - {"type"}:
        return None
    for name, (kind, required) in fields.items():
        if name not in obj:
            if required:
                return None
        elif not _field_ok(kind, obj[name]):
            return None
    if route == "requestvote" and obj.get("prevote", False) is not False:
        return None
    if route == "prevote" and obj.get("prevote") is not True:
        return None
    return obj


def acceptable(t: Target, route: str, body: bytes, signed_by: str | None) -> bool:
    """May this request change the node's state? Only a well-formed message of the route's
    type, validly signed by the peer it names."""
    if route not in RPCS or signed_by is None or signed_by not in t.peers:
        return False
    msg = well_formed(route, body)
    return msg is not None and msg[SENDER_FIELD[route]] == signed_by


def too_big_for_the_shared_node(route: str, body: bytes) -> bool:
    msg = well_formed(route, body)
    return msg is not None and not (msg["term"] < CAP and all(v < CAP for v in msg["version"]))


def stepdown_status(t: Target, body: bytes) -> int:
    """What a validly signed, well-framed stepdown must get from this node (never the leader)."""
    if not body:
        return 409
    ok, obj = parse_json(body)
    if not ok:
        return 400
    to = obj.get("to") if isinstance(obj, dict) else None
    if to is not None and to not in t.nodes:
        return 400
    return 409


def expected_status(t: Target, route: str, method: str, body: bytes, sig: Signature) -> frozenset[int] | None:
    """What a canonical request (plain method, target, framing and headers) must get."""
    if route in ("status", "id", "metrics", "overview"):
        return frozenset({200})
    if route == "health":
        return frozenset({200, 503})  # this node never leads, and hears a leader only from signed heartbeats
    if route == "unknown":
        return frozenset({404})
    if len(body) > MAX_BODY:
        return frozenset({413})
    if sig.signed_by is None:
        return frozenset({401})
    if not sig.certain:
        return None
    if route == "stepdown":
        return frozenset({stepdown_status(t, body)})
    msg = well_formed(route, body)
    if msg is None:
        return frozenset({400})
    if msg[SENDER_FIELD[route]] != sig.signed_by:
        return frozenset({401})
    if sig.signed_by not in t.peers:
        return frozenset({403})
    return frozenset({200, 204})


@dataclasses.dataclass
class Probe:
    """One request: the bytes on the wire and what the oracle knows about them."""

    route: str
    method: str
    data: bytes
    half_close: bool = True
    #: A validly signed, well-formed RPC from a peer: the only kind that may change state.
    may_change: bool = False
    #: The exact statuses a canonical request must get (None: only the general rules apply).
    expect: frozenset[int] | None = None
    #: Send with http.client instead of a raw socket: (method, target, headers, body).
    via_client: tuple[str, str, list[tuple[str, str]], bytes] | None = None
    #: The connection is closed after this request (it asked, or it is HTTP/1.0).
    asks_close: bool = False
    what: str = ""

    def describe(self) -> str:
        how = "http.client" if self.via_client else ("raw, half-closed" if self.half_close else "raw")
        return (f"route {self.route} ({self.what}; {how}; may change state: {self.may_change}; "
                f"expected {sorted(self.expect) if self.expect else 'any 2xx/4xx'})\n"
                f"  request ({len(self.data)} bytes): {shorten(self.data)}")


def is_health_answer(t: Target, probe: Probe, reply: Reply) -> bool:
    """GET /cluster/health's 503: the one 5xx by design (a probe's "unhealthy", with reasons)."""
    if reply.status != 503 or probe.method.upper() not in ("GET", "HEAD"):
        return False
    if probe.method == "HEAD":
        return reply.body == b""
    ok, obj = parse_json(reply.body)
    return ok and isinstance(obj, dict) and obj.get("healthy") is False and obj.get("id") == t.me


def is_read_answer(t: Target, probe: Probe, reply: Reply) -> bool:
    """A 2xx that an unsigned request may get: a read of status/id/health, or OPTIONS."""
    method = probe.method.upper()
    if method == "OPTIONS":
        # Flask's automatic OPTIONS (200, "Allow:", empty body); no state, no data. See the report.
        return reply.body == b""
    if method not in ("GET", "HEAD"):
        return False
    if probe.method == "HEAD":
        return reply.body == b""
    if reply.body.startswith(b"<!doctype html>"):  # the status page, always the same document
        return reply.body == PAGE.encode()
    if (reply.header("content-type") or "").startswith(("text/plain", "application/openmetrics-text")):
        return reply.body.startswith(b"# HELP celery_cluster_")  # metrics
    ok, obj = parse_json(reply.body)
    return ok and isinstance(obj, dict) and (obj.get("id") == t.me or obj.get("served_by") == t.me)


def check_reply(t: Target, probe: Probe, reply: Reply | NoAnswer, ctx: str) -> None:
    assert isinstance(reply, Reply) or not probe.data, f"no answer\n{ctx}"
    if not isinstance(reply, Reply):
        return
    assert 200 <= reply.status < 300 or 400 <= reply.status < 500 or is_health_answer(t, probe, reply), \
        f"status {reply.status}\n{ctx}"
    if 200 <= reply.status < 300 and not probe.may_change:
        assert is_read_answer(t, probe, reply), f"2xx for a request that is not a read nor validly signed\n{ctx}"
    if probe.expect is not None:
        assert reply.status in probe.expect, f"a canonical request got {reply.status}\n{ctx}"
        if reply.status == 200 and probe.route in RPCS:
            ok, obj = parse_json(reply.body)
            want = "AppendResponse" if probe.route == "appendentries" else "VoteResponse"
            assert ok and isinstance(obj, dict) and obj.get("type") == want, f"bad RPC answer\n{ctx}"
    if reply.says_close:
        assert reply.closed is not False, f"answered 'Connection: close' but kept the connection open\n{ctx}"


def wire_method(raw: bytes) -> str:
    """The method the server reads off the request line (as its parse_request splits it: one
    empty line before the request line is skipped, as RFC 9112 section 2.2 allows)."""
    first, _, rest = raw.partition(b"\n")
    if first in (b"\r", b""):
        first = rest.split(b"\n", 1)[0]
    words = first.decode("latin-1").rstrip("\r\n").split()
    return words[0] if words else ""


def _note(text: str) -> None:
    try:
        note(text)
    except InvalidArgument:  # not inside a hypothesis test
        pass


def _event(text: str) -> None:
    """Counted in ``--hypothesis-show-statistics``: which answers the fuzzing reached."""
    try:
        event(text)
    except InvalidArgument:
        pass


def assert_unchanged(before: dict[str, Any], after: dict[str, Any], ctx: str) -> None:
    assert after == before, f"state changed without a valid signature:\n  before {before}\n  after  {after}\n{ctx}"


def run_probe(t: Target, probe: Probe) -> None:
    _note(probe.describe())
    before = snapshot(t)
    if probe.via_client is not None:
        reply = exchange_http_client(t.port, *probe.via_client)
    else:
        reply = exchange(t.port, probe.data, half_close=probe.half_close, method=probe.method)
    after = snapshot(t)
    _event(f"{probe.route}: {reply.status if isinstance(reply, Reply) else 'no answer'}"
           f"{' (validly signed, well-formed)' if probe.may_change else ''}")
    ctx = f"{probe.describe()}\n  answer: {reply!r}"
    check_reply(t, probe, reply, ctx)
    if probe.may_change:
        check_state_file(t, ctx)
    else:
        assert_unchanged(before, after, ctx)
    check_alive(t, ctx)


# == drawing requests =============================================================================


def pick(data: st.DataObject, weighted: list[tuple[int, Any]], label: str) -> Any:
    """One of ``weighted`` ((weight, value) pairs); shrinks towards the first."""
    options = [value for weight, value in weighted for _ in range(weight)]
    return data.draw(st.sampled_from(options), label=label)


TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                min_size=1, max_size=12)
LATIN1 = st.characters(min_codepoint=0, max_codepoint=255)
#: Header values: printable latin-1 mostly, now and then a control character (no "\n").
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\n"),
                       max_size=40)
ODD_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "post",
               "get", "Post", "PRI", "M-SEARCH", "PROPFIND", "X" * 300]

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                      st.text(max_size=20))
JSON_VALUE = st.recursive(JSON_LEAF, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
BAD_VALUE = st.one_of(
    st.sampled_from([None, True, False, -1, 0, 1, MAX_NUMBER + 1, 2**63, -2**63, 2**64, 10**30, 0.0, 6.0,
                     -0.0, 1e308, float("inf"), float("-inf"), float("nan"), "", "6", "true", "null", [],
                     {}, [1, 2], {"a": 1}, [[5, 1]], "x" * (MAX_ADDRESS_LEN + 1)]),
    JSON_VALUE,
)


def draw_number(data: st.DataObject, current: int, label: str) -> int:
    """Near the node's current value (so some messages are news and some are stale), or small."""
    if pick(data, [(3, "rel"), (1, "abs")], f"{label} kind") == "rel":
        return max(0, current + data.draw(st.integers(-3, 3), label=f"{label} - current"))
    return data.draw(st.integers(0, 12), label=label)


def valid_message(data: st.DataObject, t: Target, route: str, sender: str) -> dict[str, Any]:
    st_ = t.cl.status()
    term = draw_number(data, st_["term"], "term")
    version = [draw_number(data, st_["payload_version"][0], "version term"),
               draw_number(data, st_["payload_version"][1], "version seq")]
    msg: dict[str, Any] = {"type": TYPE_OF[route], "term": term, SENDER_FIELD[route]: sender, "version": version}
    if route in ("requestvote", "prevote"):
        if route == "prevote" or data.draw(st.booleans(), label="explicit prevote flag"):
            msg["prevote"] = route == "prevote"
        if data.draw(st.booleans(), label="transfer flag present"):
            msg["transfer"] = data.draw(st.booleans(), label="transfer")
    if route == "appendentries":
        msg["round"] = data.draw(st.one_of(st.integers(0, 50), st.just(MAX_NUMBER), st.integers(0, MAX_NUMBER)),
                                 label="round")
    if data.draw(st.booleans(), label="cluster id present"):
        msg["cluster"] = data.draw(st.sampled_from(["", t.cluster_id, "0123456789abcdef", "x" * 64]),
                                   label="cluster id")
    if route in ("appendentries", "timeoutnow", "requestvote", "prevote") and data.draw(
            st.booleans(), label="members present"):
        # Subsets of [A, B, C]: a member list naming another node would make it a peer (rightly),
        # which the oracle's fixed idea of "a peer" does not follow. Bad lists come from mutate().
        msg["members"] = data.draw(st.one_of(st.just(None), st.just(list(t.nodes)),
                                             st.lists(st.sampled_from(t.nodes), min_size=1, max_size=3, unique=True)),
                                   label="members")
    if route in ("requestvote", "prevote") and data.draw(st.booleans(), label="healthy present"):
        msg["healthy"] = data.draw(st.booleans(), label="healthy")
    if route == "appendentries" and data.draw(st.booleans(), label="commit present"):
        msg["commit"] = [draw_number(data, st_["payload_version"][0], "commit term"),
                         draw_number(data, st_["payload_version"][1], "commit seq")]
    if route in ("appendentries", "timeoutnow"):
        payload = pick(data, [(2, "absent"), (2, "null"), (3, "text"), (1, "big")], "payload")
        if payload == "null":
            msg["payload"] = None
        elif payload == "text":
            msg["payload"] = data.draw(st.text(max_size=60), label="payload text")
        elif payload == "big":
            msg["payload"] = "p" * 65536
    order = data.draw(st.permutations(list(msg)), label="field order")
    return {k: msg[k] for k in order}


def mutate(data: st.DataObject, t: Target, msg: dict[str, Any], route: str) -> Any:
    """1-3 changes that make the message wrong (or, now and then, leave it right)."""
    out: Any = dict(msg)
    for i in range(data.draw(st.integers(1, 3), label="mutations")):
        how = pick(data, [(4, "set"), (2, "drop"), (2, "extra"), (2, "sender"), (2, "version"), (1, "type"),
                          (1, "prevote"), (1, "huge payload"), (1, "wrap")], f"mutation {i}")
        if not isinstance(out, dict):
            break
        if how in ("set", "drop") and not out:
            how = "extra"
        if how == "set":
            field = data.draw(st.sampled_from(sorted(out)), label="field")
            out[field] = data.draw(BAD_VALUE, label="value")
        elif how == "drop":
            out.pop(data.draw(st.sampled_from(sorted(out)), label="dropped field"), None)
        elif how == "extra":
            out[data.draw(st.one_of(st.sampled_from(["extra", "prevote", "round", "payload", "transfer", "Type",
                                                     "term ", "granted", "success"]),
                                    st.text(max_size=8)), label="extra field")] = \
                data.draw(BAD_VALUE, label="extra value")
        elif how == "sender":
            out[SENDER_FIELD[route]] = data.draw(st.one_of(
                st.sampled_from([STRANGER, t.me, "", " ", t.peers[0] + " ", t.peers[0].upper(), "a" * 300,
                                 "a" * 301, "127.0.0.1", "\u00e9\u00e8:1", "x\ny", "\ud800", None, 7,
                                 [t.peers[0]]]),
                st.text(max_size=30)), label="sender")
        elif how == "version":
            out["version"] = data.draw(st.sampled_from(
                [[], [1], [1, 2, 3], "5,1", {"0": 5, "1": 1}, [5.0, 1], [True, 1], [-1, 0], [MAX_NUMBER + 1, 0],
                 [0, MAX_NUMBER + 1], None, [None, None], [[5], [1]]]), label="version")
        elif how == "type":
            out["type"] = data.draw(st.one_of(st.sampled_from(
                ["VoteRequest", "VoteResponse", "AppendEntries", "AppendResponse", "TimeoutNow", "votereq",
                 "", None, 1, ["VoteRequest"], "VoteRequest\x00"]), st.text(max_size=12)), label="type")
        elif how == "prevote":
            out["prevote"] = data.draw(st.sampled_from([True, False, None, 0, 1, "true"]), label="prevote")
        elif how == "huge payload":
            out["payload"] = "p" * (MAX_PAYLOAD_LEN + 1)
        else:
            out = data.draw(st.sampled_from([[out], {"message": out}, [out, out]]), label="wrapped")
    return out


def special_body(data: st.DataObject, t: Target, route: str, sender: str) -> bytes:
    """Bytes no JSON encoder would make, and JSON that a naive parser gets wrong."""
    base = json.dumps({"type": TYPE_OF.get(route, "VoteRequest"), "term": 6, "candidate": sender,
                       "version": [5, 1]}).encode()
    return data.draw(st.sampled_from([
        b"", b" ", b"\r\n", b"null", b"0", b"[]", b"{}", b'"VoteRequest"',
        b"[" * 100_000, b"[" * 1000 + b"]" * 1000, b'{"a":' * 50_000, b"{" * 100_000,
        b'{"type": "VoteRequest", "term": NaN}', b'{"term": Infinity}', b"-Infinity",
        b"9" * 5000, b"1" + b"0" * 4300, b"1e999999",
        b"\xef\xbb\xbf" + base, base.decode().encode("utf-16"), base.decode().encode("utf-32"),
        base + b"garbage", base + b"\x00", base[:-1], base.replace(b'"term": 6', b'"term": 6, "term": 7'),
        base.replace(b"6", b"\xff"), b"\xff\xfe\x00\x01", b'{"candidate": "\\ud800"}',
        base.replace(sender.encode(), b"".join(b"\\u%04x" % c for c in sender.encode())),
        b" " * (MAX_BODY + 1),
    ]), label="special body")


def rpc_body(data: st.DataObject, t: Target, route: str, sender: str) -> bytes:
    kind = pick(data, [(4, "valid"), (5, "mutated"), (1, "json"), (1, "bytes"), (2, "special")], "body kind")
    if kind == "valid":
        return json.dumps(valid_message(data, t, route, sender)).encode()
    if kind == "mutated":
        return json.dumps(mutate(data, t, valid_message(data, t, route, sender), route)).encode()
    if kind == "json":
        return json.dumps(data.draw(JSON_VALUE, label="json body")).encode()
    if kind == "bytes":
        return data.draw(st.binary(max_size=512), label="byte body")
    return special_body(data, t, route, sender)


def stepdown_body(data: st.DataObject, t: Target) -> bytes:
    kind = pick(data, [(4, "empty"), (3, "to"), (1, "json"), (1, "bytes"), (2, "special")], "body kind")
    if kind == "empty":
        return b""
    if kind == "to":
        to = data.draw(st.one_of(st.sampled_from([*t.peers, t.me, STRANGER, "", None, 5, [], {}, [t.peers[0]],
                                                  t.peers[0] + "/", "\ud800"]), st.text(max_size=20)),
                       label="to")
        body: Any = {"to": to}
        if data.draw(st.booleans(), label="extra key"):
            body["extra"] = data.draw(BAD_VALUE, label="extra value")
        return json.dumps(body).encode()
    if kind == "json":
        return json.dumps(data.draw(JSON_VALUE, label="json body")).encode()
    if kind == "bytes":
        return data.draw(st.binary(max_size=256), label="byte body")
    return special_body(data, t, "stepdown", t.peers[0])


def read_body(data: st.DataObject, t: Target) -> bytes:
    """Bodies for GET-ish routes: usually none."""
    kind = pick(data, [(6, "empty"), (1, "json"), (1, "bytes")], "body kind")
    if kind == "empty":
        return b""
    if kind == "json":
        return json.dumps(data.draw(JSON_VALUE, label="json body")).encode()
    return data.draw(st.binary(max_size=256), label="byte body")


ODD_PATHS = [
    "/", "*", "/cluster", "/cluster/", "/cluster//status", "/../cluster/id", "/cluster/status/",
    "/cluster/%2e%2e/cluster/id", "/cluster/requestvote/", "/CLUSTER/status", "/cluster/Status", "/cluster/id;x",
    "/cluster/status%00", "/favicon.ico", "/" + "a" * 8000, "http://[::1]/", "//[::1]/cluster/id",
    "//[/cluster/id", "http://[/", "//a@b/cluster/status", "http:///cluster/status", "cluster/status", "?", "#",
]
UNKNOWN_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=16).filter(
    lambda s: s not in (*RPCS, *READS, "stepdown"))


def draw_target(data: st.DataObject, t: Target, route: str) -> tuple[str, str, bool]:
    """(request target, the path it is signed over, canonical?)."""
    if route == "unknown":
        kind = pick(data, [(4, "cluster"), (1, "root"), (2, "random"), (3, "fixed"), (1, "slashslash")], "path")
        if kind == "cluster":
            path = "/cluster/" + data.draw(UNKNOWN_SEGMENT, label="segment")
            return path, path, True
        if kind == "root":
            path = "/" + data.draw(UNKNOWN_SEGMENT, label="segment")
            return path, path, True
        if kind == "random":
            path = data.draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255),
                                     max_size=40), label="raw path")
            return path or "/", path or "/", False
        if kind == "slashslash":
            path = "//" + data.draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                            max_size=12), label="after //")
            return path, path, False
        path = data.draw(st.sampled_from(ODD_PATHS), label="fixed path")
        return path, path, False
    path = f"/cluster/{route}"
    kind = pick(data, [(30, "canonical"), (1, "query"), (1, "slash"), (1, "double"), (1, "inner double"),
                       (1, "encoded"), (2, "authority"), (1, "case"), (1, "suffix"), (1, "fragment"),
                       (1, "dotdot")], "target")
    if kind == "query":
        target = path + "?" + data.draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                                max_size=20), label="query")
    elif kind == "authority":  # absolute-form and "//authority/path" targets, with odd hosts
        host = data.draw(st.sampled_from([t.me, "127.0.0.1", "[::1]", "[::1]:80", "[::1", "[", "]", "a@b", "h:po",
                                          "", "%5B", "xn--", "\xe9"]), label="host")
        target = data.draw(st.sampled_from(["http://", "https://", "//", "HTTP://", "ftp://"]), label="scheme") + \
            host + path
    elif kind == "suffix":
        target = path + data.draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255),
                                          min_size=1, max_size=6), label="suffix")
    else:
        target = {"canonical": path, "slash": path + "/", "double": "/" + path,
                  "inner double": f"/cluster//{route}", "case": path.upper(), "fragment": path + "#x",
                  "encoded": path.replace(route[0], f"%{ord(route[0]):02x}", 1),
                  "dotdot": f"/cluster/../cluster/{route}"}[kind]
    return target, path, kind == "canonical"


def draw_method(data: st.DataObject, route: str) -> tuple[str, bool]:
    default = "POST" if route in RPCS or route == "stepdown" else "GET"
    weighted: list[tuple[int, Any]] = [(16, default)]
    if route == "stepdown":
        weighted.append((5, "PUT"))
    if route in READS:
        weighted.append((2, "HEAD"))
    weighted += [(2, "odd"), (1, "token")]
    method = pick(data, weighted, "method")
    if method == "odd":
        method = data.draw(st.sampled_from(ODD_METHODS), label="odd method")
    elif method == "token":
        method = data.draw(TOKEN, label="method token")
    plain = method == default or (route == "stepdown" and method == "PUT") or (route in READS and method == "HEAD")
    return method, plain


@dataclasses.dataclass
class Signature:
    headers: list[tuple[str, str]]
    #: Who these headers may validly sign for (None: no valid, fresh signature).
    signed_by: str | None
    what: str
    #: The signature certainly verifies (False when it only may: duplicated headers).
    certain: bool = True


def draw_signature(data: st.DataObject, t: Target, method: str, path: str, body: bytes,
                   sender: str, route: str) -> Signature:
    """The three signature headers, right or wrong in one of many ways. (Valid ones are drawn
    more often for the RPCs and stepdown: only they get the body past authentication.)"""
    valid_weight = 12 if route in (*RPCS, "stepdown") else 3
    mode = pick(data, [(valid_weight, "valid"), (2, "none"), (1, "tampered signature"), (1, "other secret"),
                       (1, "stale"), (1, "future"), (1, "timestamp changed"), (1, "malformed timestamp"),
                       (1, "other body"), (1, "other path"), (1, "other method"), (1, "sender changed"),
                       (1, "signed as the other peer"), (1, "missing one"), (1, "duplicated"),
                       (1, "bad sender characters"), (1, "empty values"), (1, "garbage")], "signature")
    ts = fresh_timestamp()
    m = method.upper()

    def headers(sender_: str, ts_: str, sig: str) -> list[tuple[str, str]]:
        return [(SENDER_HEADER, sender_), (TIMESTAMP_HEADER, ts_), (SIGNATURE_HEADER, sig)]

    def sign(sender_: str = sender, ts_: str = ts, secret: bytes = SECRET, m_: str = m, path_: str = path,
             body_: bytes = body) -> str:
        return hmac_hex(secret, m_, path_, ts_, sender_, body_)

    if mode == "valid":
        style = pick(data, [(3, "plain"), (1, "upper hex"), (1, "lower names"), (1, "whole seconds"),
                            (1, "one decimal"), (1, "shuffled")], "valid style")
        if style == "whole seconds":
            ts = f"{time.time():.0f}"
        elif style == "one decimal":
            ts = f"{time.time():.1f}"
        sig = sign(ts_=ts)
        hs = headers(sender, ts, sig.upper() if style == "upper hex" else sig)
        if style == "lower names":
            hs = [(k.lower(), v) for k, v in hs]
        if style == "shuffled":
            hs = data.draw(st.permutations(hs), label="header order")
        return Signature(hs, sender, f"valid ({style})")
    if mode == "none":
        return Signature([], None, "unsigned")
    if mode == "tampered signature":
        sig = sign()
        i = data.draw(st.integers(0, len(sig) - 1), label="flipped hex digit")
        new = data.draw(st.sampled_from([c for c in "0123456789abcdef" if c != sig[i]]), label="to")
        return Signature(headers(sender, ts, sig[:i] + new + sig[i + 1:]), None, mode)
    if mode == "other secret":
        return Signature(headers(sender, ts, sign(secret=b"not the cluster's secret")), None, mode)
    if mode in ("stale", "future"):
        skew = data.draw(st.one_of(st.floats(31.0, 120.0), st.sampled_from([31.0, 3600.0, 1e6, 1e9])),
                         label="skew (s)")
        when = time.time() + (skew if mode == "future" else -skew)
        ts = f"{max(when, 0.0):.3f}"
        return Signature(headers(sender, ts, sign(ts_=ts)), None, f"{mode} by {skew:.0f} s (a replay)")
    if mode == "timestamp changed":
        new = data.draw(st.sampled_from([f"{float(ts) + 0.001:.3f}", f"{float(ts) - 1:.3f}", ts[:-1], ts + "0",
                                         ts.split(".")[0]]), label="changed timestamp")
        return Signature(headers(sender, new, sign()), None, mode)
    if mode == "malformed timestamp":
        bad = data.draw(st.one_of(st.sampled_from(
            ["", "nan", "inf", "1e9", f"{float(ts):e}", "-" + ts, "+" + ts, f" {ts}x", ts + "1", ts + ".",
             "0x10", f"{float(ts):.4f}", "1" * 16, "\xb9\xb2", ts.replace(".", ",")]),
            st.text(alphabet=LATIN1, max_size=20)), label="malformed timestamp")
        if TIMESTAMP_RE.fullmatch(bad) and abs(float(bad) - time.time()) <= 30:
            bad = "x" + bad  # the draw happened to be a well-formed, fresh timestamp
        return Signature(headers(sender, bad, sign(ts_=bad)), None, f"{mode} {bad!r}")
    if mode == "other body":
        return Signature(headers(sender, ts, sign(body_=body + b" ")), None, mode)
    if mode == "other path":
        other = data.draw(st.sampled_from([p for p in [f"/cluster/{r}" for r in (*RPCS, "stepdown")] + [
            path + "/", path.upper(), "", "/", path + "?"] if p != path]), label="signed path")
        return Signature(headers(sender, ts, sign(path_=other)), None, f"{mode} {other!r}")
    if mode == "other method":
        other = data.draw(st.sampled_from([x for x in ("GET", "PUT", "POST", "DELETE", "") if x != m]),
                          label="signed method")
        return Signature(headers(sender, ts, sign(m_=other)), None, f"{mode} {other!r}")
    if mode == "sender changed":
        other = data.draw(st.sampled_from([n for n in [*t.nodes, STRANGER] if n != sender]), label="header sender")
        return Signature(headers(other, ts, sign()), None, f"signed as {sender}, header says {other}")
    if mode == "signed as the other peer":
        other = next(p for p in [*t.peers, t.me] if p != sender)
        return Signature(headers(other, ts, sign(sender_=other)), other, f"validly signed by {other}")
    if mode == "missing one":
        hs = headers(sender, ts, sign())
        del hs[data.draw(st.integers(0, 2), label="missing header")]
        return Signature(hs, None, mode)
    if mode == "duplicated":
        good = headers(sender, ts, sign())
        i = data.draw(st.integers(0, 2), label="duplicated header")
        bad = (good[i][0], data.draw(st.sampled_from(["", "x", STRANGER, "0", "0" * 64]), label="bad copy"))
        hs = data.draw(st.permutations([*good, bad]), label="header order")
        return Signature(hs, sender, f"{mode} (one copy wrong: {bad})", certain=False)  # may or may not verify
    if mode == "bad sender characters":
        bad = data.draw(st.sampled_from([sender + "\x00", sender + "\x7f", "\xe9" + sender, sender + "\t",
                                         "\x01", sender.replace(":", "\xa0")]), label="sender header")
        return Signature(headers(bad, ts, hmac_hex(SECRET, m, path, ts, bad, body)), None, f"{mode} {bad!r}")
    if mode == "empty values":
        hs = headers(sender, ts, sign())
        i = data.draw(st.integers(0, 2), label="emptied header")
        hs[i] = (hs[i][0], "")
        return Signature(hs, None, mode)
    return Signature([(data.draw(st.sampled_from([SENDER_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER]),
                                 label="header"), data.draw(HEADER_VALUE, label="value"))
                      for _ in range(data.draw(st.integers(1, 4), label="garbage headers"))], None, mode)


ODD_HEADERS: list[tuple[str, str]] = [
    ("Connection", "close"), ("Connection", "keep-alive"), ("Connection", "Upgrade"), ("Upgrade", "h2c"),
    ("Expect", "100-continue"), ("Host", ""), ("Host", "a" * 300), ("Content-Type", "text/plain"),
    ("Content-Type", ""), ("Accept-Encoding", "gzip"), ("Content-Encoding", "gzip"), ("Range", "bytes=0-1"),
    ("X-Long", "x" * 8000), ("X-Too-Long", "x" * 8300), ("TE", "trailers"), ("Trailer", "X-Cluster-Signature"),
    ("X_Underscore", "1"), ("Cookie", "a=b"), ("X-Empty", ""), ("Transfer-Encoding", "identity"),
    ("Transfer-Encoding", "gzip"), ("Proxy-Connection", "keep-alive"), ("Max-Forwards", "0"),
    ("X-Bare-CR", "a\rb"), ("X-Obs-Fold", "a\r\n b"), ("X-NUL", "a\x00b"), ("X-Trailing-CR", "a\r"),
    ("Content-Length", "0"), ("Transfer-Encoding", "chunked"),
]


def draw_extra_headers(data: st.DataObject) -> list[tuple[str, str]]:
    if data.draw(st.integers(0, 3), label="odd headers?") < 3:  # 1 in 4
        return []
    out = []
    for _ in range(data.draw(st.integers(1, 3), label="odd header count")):
        if data.draw(st.booleans(), label="known odd header"):
            out.append(data.draw(st.sampled_from(ODD_HEADERS), label="odd header"))
        else:
            out.append((data.draw(TOKEN, label="header name"), data.draw(HEADER_VALUE, label="header value")))
    return out


#: Content-Length values that are not plain digits (or are absurd).
ODD_LENGTHS = ["+{n}", " {n} ", "0{n}", "{n}_0", "{n}.0", "-{n}", "", "abc", "0x{n}", "{n}, {n}", "{n} {n}",
               "99999999999999999999", str(MAX_BODY + 1), "-0", "-1", "1e3", "\xb2", str(2**63), "{n};x"]


def chunked(body: bytes, data: st.DataObject) -> bytes:
    n = data.draw(st.integers(1, 3), label="chunks")
    size = max(1, -(-len(body) // n))
    out = b"".join(b"%x\r\n" % len(body[i:i + size]) + body[i:i + size] + b"\r\n"
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


@dataclasses.dataclass
class Framing:
    headers: list[tuple[str, str]]
    body: bytes
    half_close: bool
    plain: bool
    what: str


def draw_framing(data: st.DataObject, body: bytes, *, keep_alive: bool) -> Framing:
    n = len(body)
    cl = ("Content-Length", str(n))
    if keep_alive:  # self-delimiting framings only: what follows must start a new request
        mode = pick(data, [(8, "exact"), (1, "chunked"), (1, "no length")], "framing")
        if mode == "no length" and body:
            mode = "exact"
    else:
        mode = pick(data, [(12, "exact"), (1, "no length"), (1, "short"), (1, "long"), (1, "chunked"),
                           (1, "chunked and length"), (1, "odd length"), (1, "duplicate length"),
                           (1, "conflicting lengths"), (1, "absurd length"), (1, "spaced name")], "framing")
    if mode == "exact":
        return Framing([cl], body, False, True, "exact Content-Length")
    if mode == "no length":
        return Framing([], body, True, False, mode)
    if mode == "short":
        extra = data.draw(st.integers(1, 100), label="bytes missing")
        return Framing([("Content-Length", str(n + extra))], body, True, False, f"Content-Length {extra} too big")
    if mode == "long":
        cut = data.draw(st.integers(0, n), label="declared length") if n else 0
        tail = b"" if n else data.draw(st.binary(min_size=1, max_size=40), label="bytes after the body")
        return Framing([("Content-Length", str(cut))], body + tail, True, False, "Content-Length too small")
    if mode == "chunked":
        te = data.draw(st.sampled_from(["chunked", "Chunked", "gzip, chunked"]), label="Transfer-Encoding")
        return Framing([("Transfer-Encoding", te)], chunked(body, data), True, False, f"Transfer-Encoding: {te}")
    if mode == "chunked and length":
        return Framing([cl, ("Transfer-Encoding", "chunked")], chunked(body, data), True, False, mode)
    if mode == "odd length":
        value = data.draw(st.sampled_from(ODD_LENGTHS), label="Content-Length").replace("{n}", str(n))
        return Framing([("Content-Length", value)], body, True, False, f"Content-Length {value!r}")
    if mode == "duplicate length":
        return Framing([cl, cl], body, True, False, mode)
    if mode == "conflicting lengths":
        other = ("Content-Length", str(data.draw(st.sampled_from([0, n + 1, max(0, n - 1), MAX_BODY + 1]),
                                                 label="second length")))
        pair = data.draw(st.permutations([cl, other]), label="order")
        return Framing(list(pair), body, True, False, f"{mode} {pair}")
    if mode == "absurd length":
        value = data.draw(st.sampled_from([str(MAX_BODY + 1), str(10**20), str(2**64), "9" * 400]),
                          label="Content-Length")
        return Framing([("Content-Length", value)], body, True, False, f"Content-Length {value}")
    name = data.draw(st.sampled_from(["Content-Length ", "content-length", "CONTENT-LENGTH", " Content-Length",
                                      "Content-Length\t"]), label="header name")
    return Framing([(name, str(n))], body, True, False, f"Content-Length spelled {name!r}")


def clean_value(value: str) -> bool:
    """No control characters but HTAB: a value a server may refuse (RFC 9110 5.5) is not "plain"."""
    return all(c == "\t" or " " <= c <= "~" or c >= "\x80" for c in value)


def render(method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes,
           eol: bytes = b"\r\n") -> bytes:
    head = [f"{method} {target} {version}".encode("latin-1", "replace")]
    head += [f"{k}: {v}".encode("latin-1", "replace") for k, v in headers]
    return eol.join(head) + eol + eol + body


def draw_request_line(data: st.DataObject) -> tuple[str, str, bytes, bool]:
    """(what to do to the request line, version, line ending, plain?) - usually a normal HTTP/1.1 line."""
    kind = pick(data, [(14, "normal"), (1, "http/1.0"), (1, "odd version"), (1, "bare LF"), (1, "odd spacing"),
                       (1, "leading CRLF")], "request line")
    if kind == "normal":
        return "", "HTTP/1.1", b"\r\n", True
    if kind == "http/1.0":
        return "", "HTTP/1.0", b"\r\n", False
    if kind == "odd version":
        return "", data.draw(st.sampled_from(["HTTP/2.0", "HTTP/0.9", "http/1.1", "HTTP/1.1x", "HTTP/1.",
                                              "HTTP/1.1 extra", "", "HTTP/11", "HTTP/1.1\x00"]),
                             label="version"), b"\r\n", False
    if kind == "bare LF":
        return "", "HTTP/1.1", b"\n", False
    if kind == "odd spacing":
        return "spacing", "HTTP/1.1", b"\r\n", False
    return "leading", "HTTP/1.1", b"\r\n", False


def byte_mutations(data: st.DataObject, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="byte mutations")):
        how = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]), label="how")
        at = data.draw(st.integers(0, max(0, len(out) - 1)), label="at") if out else 0
        if how == "flip" and out:
            out[at] = data.draw(st.integers(0, 255), label="byte")
        elif how == "insert":
            out[at:at] = data.draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b":", b" ", b"\r\n\r\n",
                                                    b"Content-Length: 5\r\n", b"\xff", b"%"]), label="inserted")
        elif how == "delete" and out:
            del out[at:at + data.draw(st.integers(1, 8), label="deleted")]
        elif how == "truncate":
            del out[at:]
        else:
            out += data.draw(st.binary(max_size=64), label="appended")
    return bytes(out)


def build_probes(data: st.DataObject, t: Target, route: str, *, keep_alive: bool = False) -> list[Probe]:
    """One request for ``route`` (two when it is a replay), every part drawn."""
    if not keep_alive and data.draw(st.integers(0, 19), label="random bytes?") == 19:  # 1 in 20
        prefix = data.draw(st.sampled_from([b"", f"POST /cluster/{route} HTTP/1.1\r\n".encode(),
                                            f"GET /cluster/{route} HTTP/1.1\r\n".encode()]), label="prefix")
        raw = prefix + data.draw(st.binary(min_size=1, max_size=2048), label="random bytes")
        return [Probe(route, wire_method(raw), raw, what="random bytes")]

    method, plain_method = draw_method(data, route)
    target, signed_path, canonical_target = draw_target(data, t, route)
    who = pick(data, [(6, t.peers[0]), (2, t.peers[1]), (1, t.me), (1, STRANGER)], "named sender") \
        if route in RPCS else data.draw(st.sampled_from([*t.peers, t.me, STRANGER]), label="signing sender")
    if route in RPCS:
        body = rpc_body(data, t, route, who)
    elif route == "stepdown":
        body = stepdown_body(data, t)
    else:
        body = read_body(data, t)
    sig = draw_signature(data, t, method, signed_path, body, who, route)
    if sig.signed_by is not None and route in RPCS and too_big_for_the_shared_node(route, body):
        ts = fresh_timestamp()
        sig = Signature([(SENDER_HEADER, who), (TIMESTAMP_HEADER, ts),
                         (SIGNATURE_HEADER, hmac_hex(SECRET, method, signed_path, ts, who, body + b"!"))],
                        None, "signature spoiled: the message's term/version is above CAP")
    may_change = acceptable(t, route, body, sig.signed_by)

    framing = draw_framing(data, body, keep_alive=keep_alive)
    extra = draw_extra_headers(data)
    if keep_alive:
        extra = [h for h in extra if h[0].lower() not in ("content-length", "transfer-encoding", "x-too-long")]
    base = [("Host", t.me)] + ([("Content-Type", "application/json")] if body else [])
    headers = base + sig.headers + framing.headers + extra
    if not keep_alive and data.draw(st.integers(0, 29), label="too many headers?") == 29:  # 1 in 30
        headers += [(f"X-H{i}", "v") for i in range(101)]
        extra = [("many", "headers")]
    hack, version, eol, plain_line = ("", "HTTP/1.1", b"\r\n", True) if keep_alive else draw_request_line(data)
    raw = render(method, target, version, headers, framing.body, eol)
    if hack == "spacing":
        raw = raw.replace(b" ", data.draw(st.sampled_from([b"  ", b"\t", b" \t "]), label="spacing"), 2)
    elif hack == "leading":
        raw = b"\r\n" + raw
    mutated = not keep_alive and data.draw(st.integers(0, 14), label="mutate bytes?") == 14  # 1 in 15
    if mutated:
        raw = byte_mutations(data, raw)
    plain = plain_method and canonical_target and framing.plain and not extra and plain_line and not mutated \
        and all(clean_value(v) for _, v in headers)

    expect = expected_status(t, route, method, body, sig) if plain else None

    via_client = None
    # (Not for bodies the server refuses unread: http.client would see EPIPE, not the 413.)
    if plain and not keep_alive and len(body) <= 65536 and data.draw(st.integers(0, 3), label="http.client?") == 3:
        via_client = (method, target, base + sig.headers + [("Content-Length", str(len(body)))], body)
        if not all(v.isascii() and v.isprintable() for _, v in via_client[2]):
            via_client = None
    # (What this server honours: "Connection: close" exactly, not a token list - see the report.)
    asks_close = version == "HTTP/1.0" or any(k.lower() == "connection" and v.lower() == "close" for k, v in extra)
    if keep_alive:
        half_close = False  # the connection carries the next request
    else:  # a request whose end the server cannot tell must end with the connection's write side
        half_close = framing.half_close or mutated or data.draw(st.booleans(), label="half-close")
    probe = Probe(route, wire_method(raw), raw, half_close=half_close,
                  may_change=may_change, expect=expect, via_client=via_client, asks_close=asks_close,
                  what=f"{method} {target!r}; {framing.what}; signature: {sig.what}"
                       + (f"; extra headers {[k for k, _ in extra]}" if extra else "")
                       + ("; bytes mutated" if mutated else ""))
    if sig.signed_by is not None and not keep_alive and data.draw(st.integers(0, 9), label="replay?") == 9:
        return [probe, dataclasses.replace(probe, what=probe.what + "; sent again (a replay within the window)")]
    return [probe]


# == the tests ====================================================================================

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, print_blob=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.mark.parametrize("route", ROUTES)
@FUZZ
@given(data=st.data())
def test_fuzz_route(fuzz_node: Target, route: str, data: st.DataObject) -> None:
    """One request per example (a fresh connection each), for every route."""
    for probe in build_probes(data, fuzz_node, route):
        run_probe(fuzz_node, probe)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(data=st.data())
def test_fuzz_keep_alive(fuzz_node: Target, data: st.DataObject) -> None:
    """2-6 well-framed requests (any route, good or bad) on one connection, one at a time or
    pipelined: every one is answered until an answer says "Connection: close", which the server
    then honours; an answer that does not say it leaves the connection open for the next."""
    t = fuzz_node
    n = data.draw(st.integers(2, 6), label="requests")
    probes = [p for _ in range(n)
              for p in build_probes(data, t, data.draw(st.sampled_from(ROUTES), label="route"), keep_alive=True)]
    pipelined = data.draw(st.booleans(), label="pipelined")
    before = snapshot(t)
    log = [f"{'pipelined' if pipelined else 'one at a time'} on one connection:"]
    for i, p in enumerate(probes):
        note(f"#{i}: {p.describe()}")
    sock = socket.create_connection((HOST, t.port), timeout=IO_TIMEOUT)
    try:
        reader = _Reader(sock)
        if pipelined:
            _send(sock, b"".join(p.data for p in probes))
        for i, p in enumerate(probes):
            if not pipelined:
                _send(sock, p.data)
            reply = reader.read(p.method)
            _event(f"keep-alive {p.route}: {reply.status if isinstance(reply, Reply) else 'no answer'}")
            log.append(f"  #{i}: {p.describe()}\n    answer: {reply!r}")
            ctx = "\n".join(log)
            if isinstance(reply, Reply) and reply.says_close:
                reply.closed = reader.closed_after()
            check_reply(t, p, reply, ctx)
            assert isinstance(reply, Reply)
            if reply.says_close or p.asks_close:
                if not reply.says_close:
                    assert reader.closed_after(), f"asked to close, still open\n{ctx}"
                break  # the rest was never read by the server; a new connection would be a new example
    finally:
        sock.close()
    ctx = "\n".join(log)
    if any(p.may_change for p in probes):
        check_state_file(t, ctx)
    else:
        after = snapshot(t)
        assert_unchanged(before, after, ctx)
    check_alive(t, ctx)


def test_the_oracle_signs_like_the_library(fuzz_node: Target) -> None:
    """The test's own signing (written out from the docs) is what the node accepts: a canonical,
    validly signed heartbeat is answered 200, so the fuzzing's 'valid' cases really are valid."""
    t = fuzz_node
    st_ = t.cl.status()
    body = json.dumps({"type": "AppendEntries", "term": st_["term"], "leader": t.peers[0], "round": 1,
                       "version": st_["payload_version"], "payload": None}).encode()
    ts = fresh_timestamp()
    headers = [("Host", t.me), ("Content-Type", "application/json"), (SENDER_HEADER, t.peers[0]),
               (TIMESTAMP_HEADER, ts),
               (SIGNATURE_HEADER, hmac_hex(SECRET, "POST", "/cluster/appendentries", ts, t.peers[0], body)),
               ("Content-Length", str(len(body)))]
    probe = Probe("appendentries", "POST", render("POST", "/cluster/appendentries", "HTTP/1.1", headers, body),
                  may_change=True, expect=frozenset({200}), what="canonical signed heartbeat")
    assert acceptable(t, "appendentries", body, t.peers[0])
    run_probe(t, probe)


# == defects the fuzzing found, each pinned by a case of its own ===================================


def _raw_case(t: Target, data: bytes, method: str = "POST") -> tuple[Reply | NoAnswer, str]:
    before = snapshot(t)
    reply = exchange(t.port, data, half_close=True, method=method)
    assert snapshot(t) == before
    return reply, f"request {data!r}\nanswer {reply!r}"


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/cluster/status"), ("GET", "/cluster/id"), ("POST", "/cluster/stepdown"),
    ("PUT", "/cluster/stepdown"), ("POST", "/cluster/requestvote?x=1"), ("GET", "/cluster/nope"),
])
def test_a_body_shorter_than_its_content_length_is_a_400(fuzz_node: Target, method: str, target: str) -> None:
    """Found by fuzzing: every route served through WSGI answered 500 when the body ended
    (client half-close) before its Content-Length (LimitedStream.exhaust() raised
    ClientDisconnected into the catch-all). It is a framing error: 400, on every path."""
    reply, ctx = _raw_case(fuzz_node, f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
                           .encode(), method)
    assert isinstance(reply, Reply) and 400 <= reply.status < 500, ctx
    check_alive(fuzz_node, ctx)


@pytest.mark.parametrize("target", ["//[", "//[/cluster/status", "//[::1/cluster/requestvote", "http://[x/"])
def test_an_unbalanced_bracket_in_the_target_is_a_400(fuzz_node: Target, target: str) -> None:
    """Found by fuzzing: an unbalanced "[" in the request target made werkzeug's make_environ()
    raise ValueError outside the handler's try - a traceback and no answer at all."""
    for method in ("GET", "POST"):
        reply, ctx = _raw_case(fuzz_node, f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                               .encode(), method)
        assert isinstance(reply, Reply) and 400 <= reply.status < 500, ctx
    check_alive(fuzz_node, target)


@pytest.mark.parametrize("request_line", ["GET /cluster/status HTTP/1.1", "POST /cluster/requestvote HTTP/1.1",
                                          "POST /cluster/stepdown HTTP/1.1"])
def test_a_carriage_return_inside_a_header_value_is_a_400(fuzz_node: Target, request_line: str) -> None:
    """Found by fuzzing: a bare CR in a header value ("A: 0\\r0") made werkzeug's Headers.add()
    raise ValueError inside parse_request - a traceback and no answer, on every route."""
    data = f"{request_line}\r\nHost: x\r\nA: 0\r0\r\nContent-Length: 0\r\n\r\n".encode()
    reply, ctx = _raw_case(fuzz_node, data, request_line.split()[0])
    assert isinstance(reply, Reply) and 400 <= reply.status < 500, ctx
    check_alive(fuzz_node, ctx)


@pytest.mark.parametrize(("method", "target"), [("GET", "/cluster//status"), ("GET", "/cluster//id"),
                                              ("POST", "/cluster//requestvote"), ("POST", "/cluster//stepdown")])
def test_a_double_slash_in_the_path_is_a_404_not_a_redirect(fuzz_node: Target, method: str, target: str) -> None:
    """Found by fuzzing: Flask merges slashes by default, so "/cluster//status" was answered
    with a 308 redirect - the one 3xx any route gave."""
    data = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
    reply, ctx = _raw_case(fuzz_node, data, method)
    assert isinstance(reply, Reply) and 400 <= reply.status < 500, ctx


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"to":' * 100_000])
def test_a_signed_stepdown_with_deeply_nested_json_is_a_400(fuzz_node: Target, body: bytes) -> None:
    """Found by fuzzing: the stepdown view caught ValueError from json.loads but not
    RecursionError (the RPC path caught both): a 500, which without a secret anyone could cause."""
    t = fuzz_node
    ts = fresh_timestamp()
    headers = [("Host", t.me), (SENDER_HEADER, t.peers[0]), (TIMESTAMP_HEADER, ts),
               (SIGNATURE_HEADER, hmac_hex(SECRET, "POST", "/cluster/stepdown", ts, t.peers[0], body)),
               ("Content-Length", str(len(body)))]
    reply, ctx = _raw_case(t, render("POST", "/cluster/stepdown", "HTTP/1.1", headers, body))
    assert isinstance(reply, Reply) and reply.status == 400, ctx
    check_alive(t, "deep stepdown")


def test_the_largest_term_a_message_may_carry_leaves_room_to_count_on(tmp_path: Path) -> None:
    """Found by fuzzing: messages could carry term 2**53 (the state file's own bound), so a node
    that adopted it could not campaign (2**53 + 1 cannot be saved) and fail-stopped. Messages now
    stop at MAX_TERM = 2**52: a term beyond is a 400, and from MAX_TERM itself the node can still
    campaign and save its new term."""
    with running_node(tmp_path, None) as t:
        nodes, peer = t.nodes, t.nodes[1]

        def signed(route: str, msg: dict[str, Any]) -> Reply | NoAnswer:
            body = json.dumps(msg).encode()
            ts = fresh_timestamp()
            headers = [("Host", nodes[0]), (SENDER_HEADER, peer), (TIMESTAMP_HEADER, ts),
                       (SIGNATURE_HEADER, hmac_hex(SECRET, "POST", f"/cluster/{route}", ts, peer, body)),
                       ("Content-Length", str(len(body)))]
            return exchange(t.port, render("POST", f"/cluster/{route}", "HTTP/1.1", headers, body),
                            half_close=False, method="POST")

        beyond = signed("appendentries", {"type": "AppendEntries", "term": MAX_TERM + 1, "leader": peer,
                                          "round": 1, "version": [0, 0]})
        assert isinstance(beyond, Reply) and beyond.status == 400, beyond
        first = signed("appendentries", {"type": "AppendEntries", "term": MAX_TERM, "leader": peer, "round": 1,
                                         "version": [0, 0]})
        assert isinstance(first, Reply) and first.status == 200, first
        second = signed("timeoutnow", {"type": "TimeoutNow", "term": MAX_TERM, "leader": peer,
                                       "version": [0, 0]})
        ctx = f"appendentries at MAX_TERM -> {first!r}\ntimeoutnow at MAX_TERM -> {second!r}"
        assert isinstance(second, Reply) and second.status < 500, ctx
        check_alive(t, ctx)
        assert t.cl.node.failure is None and t.cl.node.core.term == MAX_TERM + 1, ctx
