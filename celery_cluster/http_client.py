"""Sending messages to peers over HTTP: one keep-alive connection and one thread per peer.

Peers are independent: a slow or dead peer delays only its own queue, never
the heartbeats to others (the seed waited for every peer each round). A newer
heartbeat replaces an older one still waiting in a peer's queue, so a slow
peer gets the latest round rather than a backlog.

The connection is a minimal HTTP/1.1 keep-alive client over one socket with
TCP_NODELAY, not a ``requests.Session``: requests re-reads proxy settings from
the environment on every call and http.client parses headers with the email
package; together they cost ~1 ms of CPU per heartbeat here, more than the
whole round trip budget (see ``bench/failover.py``).
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from typing import Callable

from .auth import Signer
from .election import Envelope
from .messages import AppendEntries, Message, TimeoutNow, VoteRequest, decode, encode

log = logging.getLogger("celery_cluster.http")

BASE_PATH = "/cluster"


def endpoint_for(msg: Message) -> str:
    if isinstance(msg, VoteRequest):
        return "prevote" if msg.prevote else "requestvote"
    if isinstance(msg, AppendEntries):
        return "appendentries"
    if isinstance(msg, TimeoutNow):
        return "timeoutnow"
    raise TypeError(f"{type(msg).__name__} is a response, not a request")


class _PeerSender:
    def __init__(self, client: PeerClient, peer: str) -> None:
        self.client = client
        self.peer = peer
        self.queue: collections.deque[Message] = collections.deque()
        self.cond = threading.Condition()
        self.busy = False
        self.closed = False
        self.conn: _Connection | None = None
        self.rtts: collections.deque[float] = collections.deque(maxlen=512)  # heartbeat round trips, s
        self.thread = threading.Thread(target=self._run, name=f"celery-cluster-send-{peer}", daemon=True)
        self.thread.start()

    def put(self, msg: Message) -> None:
        with self.cond:
            if isinstance(msg, AppendEntries):
                for i, queued in enumerate(self.queue):
                    if isinstance(queued, AppendEntries):
                        if msg.payload is None and queued.version == msg.version:
                            msg = AppendEntries(msg.term, msg.leader, msg.round, msg.version, queued.payload)
                        del self.queue[i]
                        break
            self.queue.append(msg)
            self.cond.notify()

    def flush(self, deadline: float, clock: Callable[[], float]) -> None:
        with self.cond:
            while (self.queue or self.busy) and not self.closed:
                left = deadline - clock()
                if left <= 0:
                    return
                self.cond.wait(left)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                msg = self.queue.popleft()
                self.busy = True
            try:
                sent = time.perf_counter()
                reply = self._post(msg)
                if isinstance(msg, AppendEntries) and msg.payload is None:
                    self.rtts.append(time.perf_counter() - sent)
                if reply is not None:
                    self.client.on_response(reply)
            except Exception as exc:  # noqa: BLE001 - peers come and go; Raft retries by design
                log.debug("[cluster] %s to %s failed: %s", type(msg).__name__, self.peer, exc)
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()
        if self.conn is not None:
            self.conn.close()

    def _post(self, msg: Message) -> Message | None:
        if self.conn is None:
            self.conn = _Connection(self.peer, self.client.timeout)
        reply = self.client.post(self.conn, self.peer, msg)
        if self.conn.closed:  # the server closed it (after an error reply)
            self.conn = None
        return reply


class _Connection:
    """Just enough HTTP/1.1 for peer RPCs: POST with Content-Length, keep-alive."""

    def __init__(self, peer: str, timeout: float) -> None:
        host, _, port = peer.rpartition(":")
        self.host = peer
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        self.closed = False

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status_line = self.rfile.readline(1024)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ConnectionError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        length, close = 0, False
        for _ in range(100):
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = self.rfile.read(length) if length else b""
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        self.closed = True
        self.rfile.close()
        self.sock.close()


class PeerClient:
    """The :class:`~celery_cluster.node.Transport` over HTTP."""

    def __init__(
        self,
        node_id: str,
        peers: tuple[str, ...],
        *,
        timeout: float,
        on_response: Callable[[Message], None],
        signer: Signer | None = None,
    ) -> None:
        self.node_id = node_id
        self.timeout = timeout
        self.on_response = on_response
        self.signer = signer
        self._clock = time.monotonic
        self._senders = {p: _PeerSender(self, p) for p in peers}

    def send(self, envelope: Envelope) -> None:
        sender = self._senders.get(envelope.to)
        if sender is not None:
            sender.put(envelope.msg)

    def flush(self, timeout: float) -> None:
        deadline = self._clock() + timeout
        for s in self._senders.values():
            s.flush(deadline, self._clock)

    def close(self) -> None:
        for s in self._senders.values():
            s.close()

    def heartbeat_rtts(self) -> dict[str, dict[str, float | int | None]]:
        """Per peer: p50/p99 of recent heartbeat round trips (ms), for status and the benchmark."""
        out: dict[str, dict[str, float | int | None]] = {}
        for peer, sender in self._senders.items():
            samples = sorted(sender.rtts)
            n = len(samples)
            out[peer] = {
                "samples": n,
                "p50_ms": round(samples[n // 2] * 1000, 3) if n else None,
                "p99_ms": round(samples[min(n - 1, (n * 99) // 100)] * 1000, 3) if n else None,
            }
        return out

    def post(self, conn: _Connection, peer: str, msg: Message) -> Message | None:
        path = f"{BASE_PATH}/{endpoint_for(msg)}"
        body = json.dumps(encode(msg), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self.signer is not None:
            headers.update(self.signer.sign("POST", path, self.node_id, body))
        status, data = conn.post(path, body, headers)
        if status == 204:
            return None
        if status != 200:
            log.warning("[cluster] %s refused %s: HTTP %s %s", peer, path, status, data[:200])
            return None
        reply = decode(json.loads(data))
        if reply.sender != peer:
            log.warning("[cluster] %s answered as %s; ignoring", peer, reply.sender)
            return None
        return reply
