"""The HTTP side peers talk to: a Flask blueprint and an embedded server.

Mount :func:`make_blueprint` in your own Flask app (the seed's ``Routes()``), or
let :class:`~celery_cluster.cluster.Cluster` run the embedded server: threaded,
HTTP/1.1 keep-alive, TCP_NODELAY (without it, Nagle plus delayed ACK costs ~44 ms
per loopback request), bounded request size.

Every body is validated before it reaches the node: oversized → 413, unsigned
or wrongly signed (when a secret is set) → 401, malformed → 400, a sender that
is not a configured member → 403. None of these change any state.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wsgi import LimitedStream

from .auth import Signer
from .errors import AuthenticationError, ProtocolError, TransferError
from .messages import MAX_PAYLOAD_LEN, AppendEntries, TimeoutNow, VoteRequest, decode, encode

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("celery_cluster.http")

#: Largest request body accepted (a payload plus its envelope).
MAX_BODY = MAX_PAYLOAD_LEN + 64 * 1024

_RPC = {
    "requestvote": (VoteRequest, False),
    "prevote": (VoteRequest, True),
    "appendentries": (AppendEntries, None),
    "timeoutnow": (TimeoutNow, None),
}


def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status=status, mimetype="application/json")


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status=200, mimetype="application/json")


def make_blueprint(node: Node, signer: Signer | None = None) -> Blueprint:
    bp = Blueprint("celery_cluster", __name__, url_prefix="/cluster")

    def read_body() -> bytes:
        length = request.content_length
        if length is None or length > MAX_BODY:
            raise _Reject(413 if length else 411, f"body must have a Content-Length of at most {MAX_BODY} bytes")
        body = request.get_data(cache=True)
        if len(body) > MAX_BODY:
            raise _Reject(413, "body too large")
        return body

    def authenticate(body: bytes) -> str | None:
        if signer is None:
            return None
        try:
            return signer.verify(request.method, request.path, request.headers, body)
        except AuthenticationError as exc:
            raise _Reject(401, str(exc)) from None

    def rpc(name: str) -> Response:
        cls, prevote = _RPC[name]
        try:
            body = read_body()
            signed_by = authenticate(body)
            try:
                msg = decode(json.loads(body), expected=cls)
            except (ValueError, ProtocolError) as exc:
                raise _Reject(400, f"malformed {name} request: {exc}") from None
            if prevote is not None and msg.prevote != prevote:
                raise _Reject(400, f"{name} requires prevote={str(prevote).lower()}")
            if signed_by is not None and signed_by != msg.sender:
                raise _Reject(401, f"signed by {signed_by} but sent as {msg.sender}")
            if msg.sender not in node.members or msg.sender == node.id:
                raise _Reject(403, f"{msg.sender} is not a peer of {node.id}")
        except _Reject as rej:
            log.warning("[cluster] refused %s from %s: %s", request.path, request.remote_addr, rej.message)
            return _error(rej.status, rej.message)
        reply = node.handle_request(msg)
        if reply is None:
            return Response(status=204)
        return _json(encode(reply))

    for name in _RPC:
        bp.add_url_rule(f"/{name}", f"rpc_{name}", lambda name=name: rpc(name), methods=["POST"])

    @bp.get("/status")
    def status() -> Response:
        return _json(node.status())

    @bp.get("/id")
    def node_id() -> Response:
        return _json({"id": node.id})

    @bp.route("/stepdown", methods=["POST", "PUT"])
    def stepdown() -> Response:
        try:
            body = read_body() if request.content_length else b""
            if signer is not None:
                authenticate(body)
            target = None
            if body:
                try:
                    data = json.loads(body)
                except ValueError:
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

    return bp


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _KeepAliveHandler(WSGIRequestHandler):
    """HTTP/1.1 keep-alive with TCP_NODELAY: one connection per peer, ~0.2 ms a request.

    werkzeug's own ``run_wsgi`` closes every connection and, after each
    response, drains whatever the socket holds - on a kept-alive connection
    that would swallow the next request. This one bounds the body to its
    Content-Length, consumes it fully, and closes only after errors.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60  # idle keep-alive connections close eventually

    def run_wsgi(self) -> None:
        environ = self.make_environ()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if length < 0 or length > MAX_BODY or chunked:
            self._respond(413 if length > MAX_BODY else 400, [("Content-Type", "application/json")],
                          json.dumps({"error": f"need a Content-Length of at most {MAX_BODY} bytes"}).encode(),
                          close=True)
            return
        body = LimitedStream(self.rfile, length)
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
        except Exception:  # noqa: BLE001 - answer 500, keep serving
            log.exception("[cluster] error handling %s", self.path)
            result[:] = ["500 INTERNAL SERVER ERROR", [("Content-Type", "application/json")]]
            chunks = [b'{"error": "internal error"}']
        status, headers = result
        code = int(status.split(" ", 1)[0])
        self._respond(code, headers, b"".join(chunks), close=code >= 400 and code != 401 and code != 409)

    def _respond(self, code: int, headers: list[tuple[str, str]], data: bytes, *, close: bool) -> None:
        self.send_response(code)
        for key, value in headers:
            if key.lower() not in ("content-length", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # noqa: ARG002
        pass  # one line per heartbeat would drown the log


class EmbeddedServer:
    """A threaded werkzeug server in a daemon thread."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True,
                                                   request_handler=_KeepAliveHandler)
        self._server.daemon_threads = True
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="celery-cluster-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
