"""Sending messages to peers over HTTP: one keep-alive connection per peer, one I/O thread.

Peers are independent: every peer has its own connection and queue, and all
sockets are non-blocking under one selector, so a slow, stopped or
unreachable peer delays only its own messages, never the heartbeats to others
(the seed waited for every peer each round). At most one request is in flight
per peer; a newer heartbeat replaces an older one still queued, so a slow peer
gets the latest round rather than a backlog.

One thread for all peers, rather than a thread each, because a heartbeat round
is then one wake-up instead of two per peer: on 2 cores that halved the
leader's idle CPU and its view of the round trip. The HTTP is minimal HTTP/1.1
(POST with Content-Length, keep-alive, TCP_NODELAY), not ``requests``:
requests re-reads proxy settings from the environment on every call, which
alone cost more than a whole loopback round trip here (``bench/failover.py``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import ipaddress
import json
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable

from .auth import Signer
from .election import Envelope
from .log_limit import LogLimiter
from .messages import AppendEntries, Message, TimeoutNow, VoteRequest, decode, encode
from .stats import PeerStats

log = logging.getLogger("celery_cluster.http")
_refusals = LogLimiter(log)
#: A refusal older than this no longer shows in status (the peer has accepted since, or is gone).
REFUSAL_SHOWN_FOR = 30.0

#: Seconds a resolved peer hostname is reused before it is looked up again (containers and
#: pods get new addresses when they are replaced).
DNS_TTL = 5.0

BASE_PATH = "/cluster"
_MAX_RESPONSE = 1 << 20


def endpoint_for(msg: Message) -> str:
    if isinstance(msg, VoteRequest):
        return "prevote" if msg.prevote else "requestvote"
    if isinstance(msg, AppendEntries):
        return "appendentries"
    if isinstance(msg, TimeoutNow):
        return "timeoutnow"
    raise TypeError(f"{type(msg).__name__} is a response, not a request")


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else body[:200].decode(errors="replace")


def parse_response(buf: bytes) -> tuple[int, bytes, bool, int] | None:
    """(status, body, close, bytes used) once ``buf`` holds a whole response, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise ConnectionError("response headers too long")
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ConnectionError(f"bad status line {lines[0][:80]!r}")
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length > _MAX_RESPONSE:
        raise ConnectionError("response too large")
    total = end + 4 + length
    if len(buf) < total:
        return None
    return int(parts[1]), bytes(buf[end + 4:total]), close, total


def error_kind(exc: BaseException) -> str:
    """How a request failed, for metrics: ``timeout``, ``dns`` (the name did not resolve),
    ``refused`` (nothing listens there) or ``connection`` (reset, closed, unreachable, a
    garbled response...)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "refused"
    return "connection"


def _resolve(sockaddr: tuple[str, int]) -> tuple[int, tuple[str, int]]:
    """(family, address) of a ``(hostname, port)``: the first the resolver gives."""
    family, _, _, _, address = socket.getaddrinfo(sockaddr[0], sockaddr[1], type=socket.SOCK_STREAM)[0]
    return family, (str(address[0]), int(address[1]))


class _Peer:
    """One peer's queue and connection state (touched only by the I/O thread, or under the lock)."""

    def __init__(self, address: str) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self.sockaddr = (host.strip("[]"), int(port))
        try:
            ipaddress.ip_address(self.sockaddr[0])
            self.literal = True
        except ValueError:
            self.literal = False  # a hostname: resolved off the I/O thread (see _connect)
        self.resolving: concurrent.futures.Future[tuple[int, tuple[str, int]]] | None = None
        self.resolved: tuple[int, tuple[str, int]] | None = None  # (family, sockaddr)
        self.resolved_at = -DNS_TTL
        self.queue: collections.deque[Message] = collections.deque()
        self.sock: socket.socket | None = None
        self.connected = False
        self.handshaking = False  # TLS: connected, handshake under way
        self.out = b""
        self.inbuf = bytearray()
        self.in_flight: Message | None = None
        self.sent_at = 0.0
        self.deadline = 0.0
        self.rtts: collections.deque[float] = collections.deque(maxlen=512)  # heartbeat round trips, s
        self.refused: tuple[int, str, float] | None = None  # the peer's last refusal: status, error, when
        self.stats = PeerStats()

    def enqueue(self, msg: Message) -> None:
        if isinstance(msg, AppendEntries):
            for i, queued in enumerate(self.queue):
                if isinstance(queued, AppendEntries):
                    if msg.payload is None and queued.version == msg.version:
                        msg = AppendEntries(msg.term, msg.leader, msg.round, msg.version, queued.payload)
                    del self.queue[i]
                    break
        self.queue.append(msg)


#: Most addresses one client keeps connections for (configurations change over time).
MAX_PEERS = 256


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        self.tls = tls
        self.timeout = timeout
        self.on_response = on_response
        self.signer = signer
        self._peers = {p: _Peer(p) for p in peers}
        self._lock = threading.Condition()
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        # Name lookups block (for seconds when a name's container is gone and the resolver
        # forwards upstream): never on the I/O thread, which serves every peer. One lookup
        # per peer at a time.
        self._resolver = concurrent.futures.ThreadPoolExecutor(max(1, len(peers)),
                                                               thread_name_prefix="celery-cluster-resolve")

    # -- Transport ---------------------------------------------------------------

    def send(self, envelope: Envelope) -> None:
        with self._lock:
            if self._closed:
                return
            peer = self._peers.get(envelope.to)
            if peer is None:
                if len(self._peers) >= MAX_PEERS:
                    return
                # A member added since we started (or a learner the leader catches up). Copy on
                # write: the I/O thread iterates the dict without the lock.
                try:
                    peer = _Peer(envelope.to)
                except ValueError:
                    return  # not HOST:PORT: nothing to connect to
                self._peers = {**self._peers, envelope.to: peer}
            peer.enqueue(envelope.msg)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery-cluster-send", daemon=True)
                self._thread.start()
        self._wake()

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while any(p.queue or p.in_flight for p in self._peers.values()) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._lock.wait(left)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
        self._resolver.shutdown(wait=False, cancel_futures=True)

    def refusals(self) -> dict[str, dict[str, object] | None]:
        """Per peer: its last refusal of our requests (HTTP status and error) if it was
        within :data:`REFUSAL_SHOWN_FOR` seconds and nothing was accepted since, else None."""
        now = time.monotonic()
        out: dict[str, dict[str, object] | None] = {}
        for address, peer in self._peers.items():
            r = peer.refused
            out[address] = ({"status": r[0], "error": r[1], "seconds_ago": round(now - r[2], 1)}
                            if r is not None and now - r[2] < REFUSAL_SHOWN_FOR else None)
        return out

    def heartbeat_rtts(self) -> dict[str, dict[str, float | int | None]]:
        """Per peer: p50/p99 of recent heartbeat round trips (ms), for status and the benchmark."""
        out: dict[str, dict[str, float | int | None]] = {}
        for address, peer in self._peers.items():
            samples = sorted(peer.rtts)
            n = len(samples)
            out[address] = {
                "samples": n,
                "p50_ms": round(samples[n // 2] * 1000, 3) if n else None,
                "p99_ms": round(samples[min(n - 1, (n * 99) // 100)] * 1000, 3) if n else None,
            }
        return out

    def peer_stats(self) -> dict[str, PeerStats]:
        """Per peer: heartbeat round-trip histogram and failed requests by kind (for metrics)."""
        return {address: peer.stats for address, peer in self._peers.items()}

    # -- the I/O thread ---------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or we are closing)

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                    for peer in self._peers.values():
                        if peer.in_flight is None and peer.queue:
                            self._start_request(peer, peer.queue.popleft())
                timeout = self._next_timeout()
                for key, events in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._on_ready(key.data, events)
                self._resolved()
                self._expire(time.monotonic())
        finally:
            for peer in self._peers.values():
                self._disconnect(peer)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _next_timeout(self) -> float | None:
        deadlines = [p.deadline for p in self._peers.values() if p.in_flight is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _start_request(self, peer: _Peer, msg: Message) -> None:
        path = f"{BASE_PATH}/{endpoint_for(msg)}"
        body = json.dumps(encode(msg), separators=(",", ":")).encode()
        headers = [f"POST {path} HTTP/1.1", f"Host: {peer.address}", "Content-Type: application/json",
                   f"Content-Length: {len(body)}"]
        if self.signer is not None:
            headers += [f"{k}: {v}" for k, v in self.signer.sign("POST", path, self.node_id, body).items()]
        peer.out = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body
        peer.in_flight = msg
        peer.sent_at = time.perf_counter()
        peer.deadline = time.monotonic() + self.timeout
        if peer.sock is None:
            self._connect(peer)
        else:
            self._write(peer)

    def _connect(self, peer: _Peer) -> None:
        if peer.literal:
            family = socket.AF_INET6 if ":" in peer.sockaddr[0] else socket.AF_INET
            self._connect_to(peer, family, peer.sockaddr)
        elif peer.resolved is not None and time.monotonic() - peer.resolved_at < DNS_TTL:
            self._connect_to(peer, *peer.resolved)
        elif peer.resolving is None:
            peer.resolving = self._resolver.submit(_resolve, peer.sockaddr)
            peer.resolving.add_done_callback(lambda _: self._wake())
        # else: a lookup for this peer is still running; the request waits for it or its deadline

    def _resolved(self) -> None:
        """Continue the requests whose peer's name lookup finished (I/O thread)."""
        for peer in self._peers.values():
            future = peer.resolving
            if future is None or not future.done():
                continue
            peer.resolving = None
            try:
                peer.resolved = future.result()
                peer.resolved_at = time.monotonic()
            except OSError as exc:
                peer.resolved = None
                if peer.in_flight is not None and peer.sock is None:
                    self._fail(peer, exc)
                continue
            if peer.in_flight is not None and peer.sock is None:
                self._connect_to(peer, *peer.resolved)

    def _connect_to(self, peer: _Peer, family: int, sockaddr: tuple[str, int]) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
        except OSError as exc:
            self._fail(peer, exc)
            return
        peer.sock, peer.connected, peer.inbuf = sock, False, bytearray()
        if err not in (0, errno.EINPROGRESS):
            self._fail(peer, OSError(err, os.strerror(err)))
            return
        self._selector.register(sock, selectors.EVENT_WRITE, peer)

    def _on_ready(self, peer: _Peer, events: int) -> None:
        if peer.sock is None:
            return
        if peer.handshaking:
            self._handshake(peer)
            return
        if not peer.connected and events & selectors.EVENT_WRITE:
            err = peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(peer, OSError(err, os.strerror(err)))
                return
            if self.tls is not None:
                self._start_tls(peer)
                return
            peer.connected = True
            self._write(peer)
            return
        if events & selectors.EVENT_WRITE:
            self._write(peer)
        if events & selectors.EVENT_READ and peer.sock is not None:
            self._read(peer)

    def _start_tls(self, peer: _Peer) -> None:
        """The TCP connection is up: wrap it (the selector must watch the new socket object)."""
        assert peer.sock is not None and self.tls is not None
        self._selector.unregister(peer.sock)
        try:
            peer.sock = self.tls.wrap_socket(peer.sock, server_hostname=peer.sockaddr[0],
                                             do_handshake_on_connect=False)
        except (ssl.SSLError, OSError, ValueError) as exc:
            peer.sock = None
            self._fail(peer, exc)
            return
        peer.handshaking = True
        self._selector.register(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
        self._handshake(peer)

    def _handshake(self, peer: _Peer) -> None:
        assert isinstance(peer.sock, ssl.SSLSocket)
        try:
            peer.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(peer.sock, selectors.EVENT_READ, peer)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(peer.sock, selectors.EVENT_WRITE, peer)
            return
        except (ssl.SSLError, OSError) as exc:
            peer.stats.errors.inc("tls")
            _refusals.warning((peer.address, "tls"), "[cluster] TLS handshake with %s failed: %s",
                              peer.address, getattr(exc, "reason", None) or exc)
            self._fail(peer, exc, counted=True)
            return
        peer.handshaking = False
        peer.connected = True
        self._write(peer)

    def _write(self, peer: _Peer) -> None:
        assert peer.sock is not None
        peer.connected = True
        try:
            sent = peer.sock.send(peer.out)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            self._fail(peer, exc)
            return
        peer.out = peer.out[sent:]
        self._selector.modify(peer.sock, selectors.EVENT_WRITE if peer.out else selectors.EVENT_READ, peer)

    def _read(self, peer: _Peer) -> None:
        assert peer.sock is not None
        try:
            data = peer.sock.recv(65536)
            # TLS may hold more decrypted data than the socket shows as readable: take it all.
            while isinstance(peer.sock, ssl.SSLSocket) and data and peer.sock.pending():
                data += peer.sock.recv(peer.sock.pending())
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._fail(peer, exc)
            return
        if not data:
            self._fail(peer, ConnectionError("connection closed by peer"))
            return
        peer.inbuf += data
        try:
            parsed = parse_response(bytes(peer.inbuf))
        except (ConnectionError, ValueError) as exc:
            self._fail(peer, exc)
            return
        if parsed is None:
            return
        status, body, close, used = parsed
        del peer.inbuf[:used]
        msg = peer.in_flight
        if isinstance(msg, AppendEntries) and msg.payload is None:
            rtt = time.perf_counter() - peer.sent_at
            peer.rtts.append(rtt)
            peer.stats.rtt.observe(rtt)
        if status in (200, 204):
            peer.refused = None
        self._finish(peer)
        if close:
            self._disconnect(peer)
        self._deliver(peer, status, body)

    def _deliver(self, peer: _Peer, status: int, body: bytes) -> None:
        if status == 204:
            return
        if status != 200:
            peer.stats.errors.inc("auth" if status in (401, 403) else "http")
            error = _error_text(body)
            peer.refused = (status, error, time.monotonic())
            _refusals.warning((peer.address, status), "[cluster] %s refuses our requests: HTTP %s %s%s",
                              peer.address, status, error,
                              " - check that every node has the same shared secret" if status == 401 else "")
            return
        try:
            reply = decode(json.loads(body))
        except ValueError as exc:
            peer.stats.errors.inc("malformed")
            log.warning("[cluster] %s sent a malformed reply: %s", peer.address, exc)
            return
        if reply.sender != peer.address:
            peer.stats.errors.inc("malformed")
            log.warning("[cluster] %s answered as %s; ignoring", peer.address, reply.sender)
            return
        try:
            self.on_response(reply)
        except Exception:  # the I/O thread must survive anything the node does
            log.exception("[cluster] error handling a reply from %s", peer.address)

    def _expire(self, now: float) -> None:
        for peer in self._peers.values():
            if peer.in_flight is not None and now >= peer.deadline:
                self._fail(peer, TimeoutError(f"no reply within {self.timeout:.3f} s"))

    def _fail(self, peer: _Peer, exc: BaseException, counted: bool = False) -> None:
        # Peers come and go; Raft retries by design. Drop the request and the connection.
        if peer.in_flight is not None:
            if not peer.literal:
                peer.resolved = None  # the name may point elsewhere now (a replaced container): look again
            if not counted:
                peer.stats.errors.inc(error_kind(exc))
            log.debug("[cluster] %s to %s failed: %s", type(peer.in_flight).__name__, peer.address, exc)
        self._disconnect(peer)
        self._finish(peer)

    def _finish(self, peer: _Peer) -> None:
        with self._lock:
            peer.in_flight = None
            peer.out = b""
            self._lock.notify_all()

    def _disconnect(self, peer: _Peer) -> None:
        if peer.sock is not None:
            try:
                self._selector.unregister(peer.sock)
            except (KeyError, ValueError):
                pass
            peer.sock.close()
        peer.sock, peer.connected, peer.handshaking, peer.inbuf = None, False, False, bytearray()
