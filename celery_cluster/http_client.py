"""Sending messages to peers over HTTP: one keep-alive connection and one thread per peer.

Peers are independent: a slow or dead peer delays only its own queue, never
the heartbeats to others (the seed waited for every peer each round). A newer
heartbeat replaces an older one still waiting in a peer's queue, so a slow
peer gets the latest round rather than a backlog.

The connection is a stdlib ``http.client.HTTPConnection`` with TCP_NODELAY, not
a ``requests.Session``: requests re-reads proxy settings from the environment
on every call, which cost ~0.8 ms per heartbeat here (``bench/failover.py``).
"""

from __future__ import annotations

import collections
import http.client
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
        self.conn: http.client.HTTPConnection | None = None
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
                reply = self._post(msg)
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
            host, _, port = self.peer.rpartition(":")
            self.conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.client.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = self.client.post(self.conn, self.peer, msg)
        if self.conn.sock is None:  # the server closed it (after an error reply)
            self.conn = None
        return reply


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

    def post(self, conn: http.client.HTTPConnection, peer: str, msg: Message) -> Message | None:
        path = f"{BASE_PATH}/{endpoint_for(msg)}"
        body = json.dumps(encode(msg), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if self.signer is not None:
            headers.update(self.signer.sign("POST", path, self.node_id, body))
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.will_close:
            conn.close()
        if resp.status == 204:
            return None
        if resp.status != 200:
            log.warning("[cluster] %s refused %s: HTTP %s %s", peer, path, resp.status, data[:200])
            return None
        reply = decode(json.loads(data))
        if reply.sender != peer:
            log.warning("[cluster] %s answered as %s; ignoring", peer, reply.sender)
            return None
        return reply
