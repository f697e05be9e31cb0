"""The HTTP side peers talk to: a Flask blueprint and an embedded server.

Mount :func:`make_blueprint` in your own Flask app (the seed's ``Routes()``), or
let :class:`~celery_cluster.cluster.Cluster` run the embedded server: threaded,
HTTP/1.1 keep-alive, TCP_NODELAY (without it, Nagle plus delayed ACK costs ~44 ms
per loopback request), bounded request size.

Every body is validated before it reaches the node: oversized → 413, unsigned
or wrongly signed (when a secret is set) → 401, malformed → 400, a sender that
is not a configured member → 403. None of these change any state.

One framing rule for every request on every path - the peer RPC fast path,
the Flask routes behind the embedded server, the blueprint in your own app
(:func:`body_length`): ``Transfer-Encoding`` (chunked) → 411, send a
Content-Length; a Content-Length that is not one decimal number → 400; one
above :data:`MAX_BODY` → 413, and the body is not read; no Content-Length → an
empty body (RFC 9112 §6.3). One close rule for the embedded server
(:func:`closes_connection`): it closes the connection after refusing the
framing itself (it no longer knows where the next request starts) and after
a 5xx; every other answer, refusals included, keeps it open.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import ClientDisconnected, HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wsgi import LimitedStream

from .auth import SENDER_HEADER, Signer
from .config import parse_address, split_host_port
from .election import NotLeader
from .errors import AuthenticationError, ConfigurationError, MembershipError, ProtocolError, TransferError
from .log_limit import LogLimiter
from .messages import MAX_PAYLOAD_LEN, AppendEntries, TimeoutNow, VoteRequest, decode, encode
from .node import NodeStopped
from .status_page import PAGE
from .tls import HANDSHAKE_TIMEOUT

#: How long ``POST /cluster/members`` waits for its change to be committed (a new node's
#: catch-up included: the core gives a learner up after 5 x the maximum election timeout).
MEMBERS_TIMEOUT = 30.0

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("celery_cluster.http")
_refusals = LogLimiter(log)

#: Largest request body accepted (a payload plus its envelope).
MAX_BODY = MAX_PAYLOAD_LEN + 64 * 1024

_RPC_PREFIX = "/cluster/"
#: WSGI environ key: None on a plain connection; with TLS, the names (DNS and IP subject
#: alternative names) in the client's certificate - empty when it showed none.
CLIENT_CERT_ENVIRON = "celery_cluster.client_cert"
_MAX_HEADERS = 100
_MAX_HEADER_LINE = 8192

_RPC = {
    "requestvote": (VoteRequest, False),
    "prevote": (VoteRequest, True),
    "appendentries": (AppendEntries, None),
    "timeoutnow": (TimeoutNow, None),
}


class _Reject(Exception):
    def __init__(self, status: int, message: str, *, framing: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.framing = framing  # the request's framing itself was refused


def body_length(headers: Any) -> int:
    """The request body's length under the one framing rule (module docstring); a refusal
    is a :class:`_Reject` with ``framing`` set."""
    if headers.get("Transfer-Encoding") is not None:
        raise _Reject(411, f"send the body with a Content-Length (at most {MAX_BODY} bytes), not "
                           "Transfer-Encoding", framing=True)
    values = set(headers.getlist("Content-Length")) if hasattr(headers, "getlist") else {headers.get("Content-Length")}
    values.discard(None)
    if not values:
        return 0
    raw = values.pop().strip() if len(values) == 1 else ""
    if not raw.isascii() or not raw.isdigit():
        raise _Reject(400, "Content-Length must be one decimal number of bytes", framing=True)
    length = int(raw)
    if length > MAX_BODY:
        raise _Reject(413, f"body too large: at most {MAX_BODY} bytes", framing=True)
    return length


def closes_connection(status: int, rejected: _Reject | None = None) -> bool:
    """The one close rule of the embedded server (module docstring)."""
    return (rejected is not None and rejected.framing) or status >= 500


ClientCert = frozenset[str] | None


def require_client_cert(client_cert: ClientCert) -> None:
    if client_cert is not None and not client_cert:
        raise _Reject(401, "a client certificate signed by the cluster's CA is required")


def certificate_names(cert: dict[str, Any]) -> frozenset[str]:
    """The DNS names (lowercased) and IP addresses (canonical) a certificate is for."""
    names = set()
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value.lower())
        elif kind == "IP Address":
            try:
                names.add(ipaddress.ip_address(value.strip()).compressed)
            except ValueError:
                pass
    if not names:  # a certificate without subject alternative names: its common name, else nothing
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    names.add(value.lower())
    return frozenset(names or {""})  # non-empty: "a certificate was shown", even naming nothing


def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status=status, mimetype="application/json")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status=status, mimetype="application/json")


class RpcEndpoint:
    """Validates and handles one peer RPC. Shared by the Flask view and the
    embedded server's fast path, so both apply exactly the same checks."""

    def __init__(self, node: Node, signer: Signer | None) -> None:
        self.node = node
        self.signer = signer

    def __call__(self, name: str, method: str, path: str, headers: Any, body: bytes,
                 remote: str | None, client_cert: ClientCert = None,
                 on_handled: Callable[[str], None] | None = None) -> tuple[int, bytes]:
        """Returns (HTTP status, JSON body); every refusal happens before the node sees anything.
        ``client_cert``: None on a plain connection, else the names in the TLS client's
        certificate (verified against the CA by the handshake): one is required for RPCs,
        and it must name the sender the message claims - a member's certificate cannot
        speak for another member. ``on_handled`` is told the sender of a message the node
        handled."""
        cls, prevote = _RPC[name]
        try:
            require_client_cert(client_cert)
            if len(body) > MAX_BODY:
                raise _Reject(413, "body too large")
            signed_by = self.authenticate(method, path, headers, body)
            try:
                msg = decode(json.loads(body), expected=cls)
            except (ValueError, RecursionError, ProtocolError) as exc:  # RecursionError: deep nesting
                raise _Reject(400, f"malformed {name} request: {exc}") from None
            if prevote is not None and isinstance(msg, VoteRequest) and msg.prevote != prevote:
                raise _Reject(400, f"{name} requires prevote={str(prevote).lower()}")
            if signed_by is not None and signed_by != msg.sender:
                raise _Reject(401, f"signed by {signed_by} but sent as {msg.sender}")
            if not self.node.knows(msg.sender):
                raise _Reject(403, f"{msg.sender} is not a peer of {self.node.id}")
            if client_cert and split_host_port(msg.sender)[0] not in client_cert:
                raise _Reject(403, f"the client certificate does not name {msg.sender}")
        except _Reject as rej:
            # Name the peer by the node address it claims (unverified: it is what an operator
            # recognises), and say it once, then every 30 s with a count - not per heartbeat.
            claimed = headers.get(SENDER_HEADER) or "?"
            _refusals.warning((claimed, remote, rej.status), "[cluster] refused %s from %s (says it is %s): %s",
                              path, remote, claimed, rej.message)
            return rej.status, json.dumps({"error": rej.message}).encode()
        try:
            reply = self.node.handle_request(msg)
        except NodeStopped as exc:  # 503 closes the connection: the peer reconnects to a new instance
            return 503, json.dumps({"error": str(exc)}).encode()
        if on_handled is not None:
            on_handled(msg.sender)
        if reply is None:
            return 204, b""
        return 200, json.dumps(encode(reply), separators=(",", ":")).encode()

    def authenticate(self, method: str, path: str, headers: Any, body: bytes) -> str | None:
        """The signing sender, None without a secret; a bad signature is a 401 refusal."""
        if self.signer is None:
            return None
        try:
            return self.signer.verify(method, path, headers, body)
        except AuthenticationError as exc:
            raise _Reject(401, str(exc)) from None


def make_blueprint(node: Node, signer: Signer | None = None,
                   status: Callable[[], dict[str, Any]] | None = None,
                   health: Callable[[], list[str]] | None = None,
                   metrics: Callable[[str | None], tuple[bytes, str]] | None = None,
                   overview: Callable[[], dict[str, Any]] | None = None) -> Blueprint:
    bp = Blueprint("celery_cluster", __name__, url_prefix="/cluster")
    endpoint = RpcEndpoint(node, signer)
    bp.rpc_endpoint = endpoint  # type: ignore[attr-defined]  # the embedded server's fast path uses it

    def read_body() -> bytes:
        length = body_length(request.headers)
        body = request.get_data(cache=True) if length else b""
        if len(body) > MAX_BODY:
            raise _Reject(413, "body too large")
        return body

    def rpc(name: str) -> Response:
        try:
            body = read_body()
        except _Reject as rej:
            return _error(rej.status, rej.message)
        code, data = endpoint(name, request.method, request.path, request.headers, body, request.remote_addr,
                              request.environ.get(CLIENT_CERT_ENVIRON))
        return Response(data or None, status=code, mimetype="application/json")

    for name in _RPC:
        bp.add_url_rule(f"/{name}", f"rpc_{name}", lambda name=name: rpc(name), methods=["POST"],
                        provide_automatic_options=False)

    @bp.get("/status")
    def status_route() -> Response:
        return _json(status() if status is not None else node.status())

    @bp.get("/health")
    def health_route() -> Response:
        problems = health() if health is not None else node.health()
        body = {"healthy": not problems, "reasons": problems, "id": node.id}
        return Response(json.dumps(body, separators=(",", ":")), status=503 if problems else 200,
                        mimetype="application/json")

    @bp.get("", strict_slashes=False)  # /cluster and /cluster/: never a redirect
    def page() -> Response:
        return Response(PAGE, status=200, mimetype="text/html",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'"})

    @bp.get("/overview")
    def overview_route() -> Response:
        if overview is None:
            return _error(404, "no overview here")
        return _json(overview())

    @bp.get("/metrics")
    def metrics_route() -> Response:
        if metrics is None:
            return _error(404, "metrics are not served here")
        data, content_type = metrics(request.headers.get("Accept"))
        return Response(data, status=200, content_type=content_type)

    @bp.get("/id")
    def node_id() -> Response:
        return _json({"id": node.id})

    @bp.route("/stepdown", methods=["POST", "PUT"], provide_automatic_options=False)
    def stepdown() -> Response:
        try:
            require_client_cert(request.environ.get(CLIENT_CERT_ENVIRON))
            body = read_body()
            endpoint.authenticate(request.method, request.path, request.headers, body)
            target = None
            if body:
                try:
                    data = json.loads(body)
                except (ValueError, RecursionError):  # RecursionError: deep nesting
                    raise _Reject(400, "body must be JSON: {\"to\": \"HOST:PORT\"} or empty") from None
                target = data.get("to") if isinstance(data, dict) else None
                if target is not None and target not in node.members:
                    raise _Reject(400, f"{target} is not a member")
            new = node.transfer_leadership(target)
        except _Reject as rej:
            return _error(rej.status, rej.message)
        except TransferError as exc:
            return _error(409, str(exc))
        return _json({"transferred_to": new, "from": node.id})

    @bp.post("/members")
    def members_route() -> Response:
        """``{"add": "HOST:PORT"}`` or ``{"remove": "HOST:PORT"}``, on the leader: one server
        at a time, answered once a majority of the new configuration holds it. A follower
        answers 409 with the leader's address; a refused change is a 409 naming why."""
        try:
            require_client_cert(request.environ.get(CLIENT_CERT_ENVIRON))
            body = read_body()
            endpoint.authenticate(request.method, request.path, request.headers, body)
            usage = 'body must be {"add": "HOST:PORT"} or {"remove": "HOST:PORT"}'
            try:
                data = json.loads(body) if body else None
            except (ValueError, RecursionError):  # RecursionError: deep nesting
                raise _Reject(400, usage) from None
            if not isinstance(data, dict) or len(data) != 1 or not set(data) <= {"add", "remove"}:
                raise _Reject(400, usage)
            (op, raw), = data.items()
            try:
                address = parse_address(raw) if isinstance(raw, str) else None
            except ConfigurationError as exc:
                raise _Reject(400, f"{op}: {exc}") from None
            if address is None:
                raise _Reject(400, usage)
            if not node.is_leader():
                leader = node.core.leader_id
                return _json({"error": f"{node.id} is not the leader; send this to the leader",
                              "leader": leader, "members": list(node.members)}, 409)
            timeout = MEMBERS_TIMEOUT
            change = node.add_member if op == "add" else node.remove_member
            members = change(address, timeout)
        except _Reject as rej:
            return _error(rej.status, rej.message)
        except (MembershipError, NotLeader) as exc:
            return _json({"error": str(exc), "leader": node.core.leader_id, "members": list(node.members)}, 409)
        except NodeStopped as exc:
            return _error(503, str(exc))
        st = node.status()
        return _json({op: address, "members": list(members), "config_version": st["config_version"],
                      "leader": st["leader_id"]})

    return bp


def make_app(blueprint: Blueprint) -> Flask:
    """The embedded server's Flask app: the blueprint, bounded bodies, and the answers a peer
    or a probe gets for everything else - JSON 4xx, never a redirect (Flask would merge
    ``//`` with a 308) or an HTML page."""
    app = Flask("celery_cluster")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.url_map.merge_slashes = False
    app.register_blueprint(blueprint)

    @app.errorhandler(HTTPException)
    def json_error(exc: HTTPException) -> Response:
        return _error(exc.code or 400, exc.description or exc.name)

    return app


#: Seconds a connect to a leader whose connection closed may take. Refused means nothing
#: listens there: the process is gone. Accepted (twice, :data:`GONE_RECHECK` apart: a dying
#: process may hold its listener an instant longer), or no answer in time (a pause or a
#: partition looks the same), means nothing is concluded.
GONE_CHECK_TIMEOUT = 0.2
GONE_RECHECK = 0.02


def _confirm_gone(node: Node, peer: str) -> None:
    try:
        host, port = split_host_port(peer)
    except ValueError:
        return
    for attempt in range(2):
        try:
            with socket.create_connection((host, port), timeout=GONE_CHECK_TIMEOUT):
                pass
        except ConnectionRefusedError:
            node.leader_gone(peer)
            return
        except OSError:
            return
        if attempt == 0:
            time.sleep(GONE_RECHECK)


class _KeepAliveHandler(WSGIRequestHandler):
    """HTTP/1.1 keep-alive with TCP_NODELAY: one connection per peer, ~0.2 ms a request.

    werkzeug's own ``run_wsgi`` closes every connection and, after each
    response, drains whatever the socket holds - on a kept-alive connection
    that would swallow the next request. This one bounds the body to its
    Content-Length, consumes it fully, and closes only as the close rule says.

    It relies on werkzeug internals - ``WSGIRequestHandler.make_environ`` reading
    ``self.headers``, ``LimitedStream.exhaust`` - hence the pinned werkzeug range
    in ``pyproject.toml`` (3.1.x); ``tests/test_http.py`` and
    ``tests/test_fuzz_routes.py`` check this handler against it.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # idle keep-alive connections close eventually

    #: None on a plain connection; with TLS, the names in the client's certificate (see
    #: :data:`CLIENT_CERT_ENVIRON`).
    client_cert: ClientCert = None
    _tls_failed = False

    def setup(self) -> None:
        ctx: ssl.SSLContext | None = getattr(self.server, "tls", None)
        if ctx is not None:
            # The handshake runs here, in this connection's thread - never in the accept loop,
            # where one silent client would stall every other.
            raw = self.request
            raw.settimeout(HANDSHAKE_TIMEOUT)
            tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self.request = tls
            try:
                tls.do_handshake()
                peer = tls.getpeercert()
                self.client_cert = certificate_names(peer) if peer else frozenset()
            except (ssl.SSLError, OSError) as exc:
                self._tls_failed = True
                _refusals.warning((self.client_address[0], "tls"), "[cluster] TLS handshake with %s failed: %s",
                                  self.client_address[0], getattr(exc, "reason", None) or exc)
        super().setup()
        self.server.track(self.connection, True)  # type: ignore[attr-defined]

    def handle(self) -> None:
        if not self._tls_failed:
            super().handle()

    #: The member whose heartbeats (AppendEntries) this connection carried, if any.
    _heartbeats_from: str | None = None

    def finish(self) -> None:
        self.server.track(self.connection, False)  # type: ignore[attr-defined]
        super().finish()
        # The connection our leader's heartbeats came on has closed: if nothing listens at its
        # address any more, its process is gone - say so, and a follower campaigns as soon as
        # the recent-leader rule allows instead of after a random timeout (Election.leader_gone).
        rpc = self.server.rpc_endpoint  # type: ignore[attr-defined]
        sender = self._heartbeats_from
        if sender is not None and rpc is not None and rpc.node.follows(sender):
            threading.Thread(target=_confirm_gone, args=(rpc.node, sender), name="celery-cluster-gone-check",
                             daemon=True).start()

    def _saw_heartbeat(self, sender: str) -> None:
        self._heartbeats_from = sender

    def parse_request(self) -> bool:
        """Request line and headers without http.client's email parser (~4x faster)."""
        self.command = None  # type: ignore[assignment]  # http.server's own reset before parsing
        self.close_connection = True
        raw: bytes = self.raw_requestline  # type: ignore[has-type]  # set by handle_one_request()
        if raw in (b"\r\n", b"\n"):  # one empty line before a request is allowed
            self.raw_requestline = self.rfile.readline(65537)
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            self.request_version = "HTTP/1.0"
            self.send_error(400, "Bad request line")
            return False
        self.command, self.path, self.request_version = words
        headers = Headers()
        for _ in range(_MAX_HEADERS):
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(line) > _MAX_HEADER_LINE:
                self.send_error(431, "Header line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("iso-8859-1").partition(":")
            try:
                if not sep or not name.strip():
                    raise ValueError("no header name")
                headers.add(name.strip(), value.strip())  # refuses a bare CR or LF in a value
            except ValueError:
                self.send_error(400, "Malformed header")
                return False
        else:
            self.send_error(431, "Too many headers")
            return False
        self.headers = headers  # type: ignore[assignment]
        tokens = {t.strip().lower() for v in headers.getlist("Connection") for t in v.split(",")}
        self.close_connection = "close" in tokens or (
            self.request_version == "HTTP/1.0" and "keep-alive" not in tokens)
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors before a request could be read (request line, headers): JSON like every
        other refusal, and the connection closes (where the next request starts is unknown)."""
        self.close_connection = True
        body = json.dumps({"error": message or "bad request"}).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            pass  # the client went away

    def run_wsgi(self) -> None:
        rpc = self.server.rpc_endpoint  # type: ignore[attr-defined]
        if self.command == "POST" and rpc is not None and self.path.startswith(_RPC_PREFIX):
            name = self.path[len(_RPC_PREFIX):]
            if name in _RPC:
                self._fast_rpc(rpc, name)
                return
        try:
            length = body_length(self.headers)
            try:
                environ = self.make_environ()
            except ValueError:  # e.g. an unbalanced "[" in the request target (urlsplit)
                raise _Reject(400, "malformed request target", framing=True) from None
        except _Reject as rej:
            self._refuse(rej)
            return
        body = LimitedStream(self.rfile, length)  # type: ignore[arg-type]  # a buffered binary file
        environ[CLIENT_CERT_ENVIRON] = self.client_cert
        if self.client_cert is not None:
            environ["wsgi.url_scheme"] = "https"
        environ["wsgi.input"] = body
        environ["wsgi.input_terminated"] = True
        result: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            result[:] = [status, headers]
            return chunks.append

        chunks: list[bytes] = []
        try:
            app_iter = self.server.app(environ, start_response)
            try:
                chunks.extend(app_iter)
            finally:
                if hasattr(app_iter, "close"):
                    app_iter.close()
            body.exhaust()  # bounded by MAX_BODY: the next request starts clean
        except ClientDisconnected:  # the body ended before its Content-Length
            self._refuse(_Reject(400, "the body is shorter than its Content-Length", framing=True))
            return
        except Exception:  # answer 500, keep serving
            log.exception("[cluster] error handling %s", self.path)
            result[:] = ["500 INTERNAL SERVER ERROR", [("Content-Type", "application/json")]]
            chunks = [b'{"error": "internal error"}']
        status, headers = result
        code = int(status.split(" ", 1)[0])
        self._respond(code, headers, b"".join(chunks), close=closes_connection(code))

    def _fast_rpc(self, rpc: RpcEndpoint, name: str) -> None:
        """Peer RPCs skip WSGI and Flask: the hot path of every heartbeat."""
        try:
            length = body_length(self.headers)
        except _Reject as rej:
            self._refuse(rej)
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self._refuse(_Reject(400, "the body is shorter than its Content-Length", framing=True))
            return
        code, data = rpc(name, "POST", self.path, self.headers, body, self.client_address[0], self.client_cert,
                         on_handled=self._saw_heartbeat if name == "appendentries" else None)
        self._respond(code, [("Content-Type", "application/json")] if data else [], data,
                      close=closes_connection(code))

    def _refuse(self, rej: _Reject) -> None:
        _refusals.warning((self.client_address[0], rej.status), "[cluster] refused %s %s from %s: %s",
                          self.command, self.path, self.client_address[0], rej.message)
        self._respond(rej.status, [("Content-Type", "application/json")],
                      json.dumps({"error": rej.message}).encode(), close=closes_connection(rej.status, rej))

    def _respond(self, code: int, headers: list[tuple[str, str]], data: bytes, *, close: bool) -> None:
        self.send_response(code)
        length = str(len(data))
        for key, value in headers:
            if key.lower() == "content-length" and self.command == "HEAD":
                length = value  # the length a GET would have had
            elif key.lower() not in ("content-length", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", length)
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per heartbeat would drown the log


class EmbeddedServer:
    """A threaded werkzeug server in a daemon thread.

    Given ``rpc_endpoint`` (the blueprint's), peer RPCs take the fast path;
    everything else goes through the Flask ``app``.
    """

    def __init__(self, app: Any, host: str, port: int, rpc_endpoint: RpcEndpoint | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        # Bind here, so that a port in use or an address not on this host is an OSError for
        # the caller to explain - werkzeug would print its own advice and sys.exit(1).
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            self._server: BaseWSGIServer = make_server(host, port, app, threaded=True,
                                                       request_handler=_KeepAliveHandler, fd=sock.fileno())
        finally:
            sock.close()  # the server holds a duplicate of it
        self._server.daemon_threads = True  # type: ignore[attr-defined]  # ThreadingMixIn's
        self._server.rpc_endpoint = rpc_endpoint  # type: ignore[attr-defined]
        self._server.track = self._track  # type: ignore[attr-defined]
        self._server.tls = tls  # type: ignore[attr-defined]
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="celery-cluster-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def stop(self) -> None:
        """Stop accepting, then end every kept-alive connection: a stopped node answers
        nothing more, rather than whatever its handler threads would still say."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the handler's next read sees EOF and it exits
            except OSError:
                pass  # already closed
