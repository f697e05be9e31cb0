"""A probe process for one host: tiny TCP/UDP servers and clients, driven over stdin/stdout.

One agent per host namespace replaces a Python start-up per probe (~50 ms) with a pipe
round trip, and reports errno and elapsed time so tests can tell "refused at once" (EINVAL)
from "timed out". Protocol: one JSON object per line each way; every operation is bounded
by its own timeout, and the agent exits when stdin closes.

    {"op": "listen_tcp", "port": P}        echo server on 0.0.0.0:P (or "host": H)
    {"op": "listen_udp", "port": P}        remember datagrams arriving on 0.0.0.0:P
    {"op": "recv_udp", "timeout": T}       -> {"ok", "data"} the next remembered datagram
    {"op": "send_udp", "addr": "IP:P", "data": S}
    {"op": "connect", "addr": "IP:P", "timeout": T}     connect + echo one short message
    {"op": "open", "id": K, "addr": ..., "timeout": T}  keep a connection under name K
    {"op": "rtt", "id": K, "size": B, "count": C, "timeout": T}  -> {"ok", "rtts": [...]}
    {"op": "stream", "id": K, "count": C}  C small writes; the echo must come back in order
    {"op": "recv", "id": K, "size": B, "timeout": T}    read B bytes (e.g. a late echo)
    {"op": "close", "id": K}
Every reply carries "ok", and on failure "error" (errno name, or "timeout"/"closed") and
"elapsed" (s).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _error(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _echo(conn: socket.socket) -> None:
    conn.settimeout(60)  # bounded: an idle test connection cannot pin the thread forever
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def _serve_tcp(srv: socket.socket) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


class AgentServer:
    def __init__(self) -> None:
        self.datagrams: queue.Queue[bytes] = queue.Queue()
        self.conns: dict[str, socket.socket] = {}

    def _udp_loop(self, sock: socket.socket) -> None:
        while True:
            self.datagrams.put(sock.recv(65536))

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        timeout = float(req.get("timeout", 2.0))
        if op == "listen_tcp":
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((req.get("host", "0.0.0.0"), req["port"]))
            srv.listen(64)
            threading.Thread(target=_serve_tcp, args=(srv,), daemon=True).start()
        elif op == "listen_udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", req["port"]))
            threading.Thread(target=self._udp_loop, args=(sock,), daemon=True).start()
        elif op == "recv_udp":
            try:
                return {"ok": True, "data": self.datagrams.get(timeout=timeout).decode()}
            except queue.Empty:
                return {"ok": False, "error": "timeout"}
        elif op == "send_udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(req["data"].encode(), _split(req["addr"]))
        elif op == "connect":
            with socket.create_connection(_split(req["addr"]), timeout=timeout) as sock:
                sock.sendall(b"ping")
                _recv_exactly(sock, 4)
        elif op == "open":
            sock = socket.create_connection(_split(req["addr"]), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[req["id"]] = sock
        elif op == "rtt":
            sock = self.conns[req["id"]]
            sock.settimeout(timeout)
            payload = os.urandom(int(req.get("size", 300)))
            rtts = []
            for _ in range(int(req.get("count", 1))):
                t0 = time.perf_counter()
                sock.sendall(payload)
                if _recv_exactly(sock, len(payload)) != payload:
                    return {"ok": False, "error": "corrupt"}
                rtts.append(time.perf_counter() - t0)
            return {"ok": True, "rtts": rtts}
        elif op == "stream":
            # Many small writes back to back, checking the echo comes back in order.
            sock = self.conns[req["id"]]
            sock.settimeout(timeout)
            chunks = [f"{i:08d}".encode() for i in range(int(req["count"]))]
            for c in chunks:
                sock.sendall(c)
            got = _recv_exactly(sock, sum(map(len, chunks)))
            return {"ok": True} if got == b"".join(chunks) else {"ok": False, "error": "reordered"}
        elif op == "recv":
            sock = self.conns[req["id"]]
            sock.settimeout(timeout)
            _recv_exactly(sock, int(req["size"]))
        elif op == "close":
            self.conns.pop(req["id"]).close()
        else:
            return {"ok": False, "error": f"unknown op {op}"}
        return {"ok": True}

    def run(self) -> None:
        for line in sys.stdin:
            req = json.loads(line)
            t0 = time.monotonic()
            try:
                reply = self.handle(req)
            except Exception as e:  # noqa: BLE001 - report, never die: the test decides what an error means
                reply = {"ok": False, "error": _error(e)}
            reply["elapsed"] = time.monotonic() - t0
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


class Agent:
    """Test-side handle: starts an agent in a host via ``topo.popen`` and calls it."""

    def __init__(self, topo: Any, host: int) -> None:
        self.host = host
        self.proc = topo.popen(host, [sys.executable, "-u", __file__],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""

    def call(self, op: str, *, deadline: float = 10.0, **kw: Any) -> dict[str, Any]:
        """Send one request; wait at most ``deadline`` s for its reply line."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **kw}).encode() + b"\n")
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + deadline
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"agent on host {self.host}: no reply to {op} in {deadline} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ConnectionError(f"agent on host {self.host} exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        """Like :meth:`call`, but the operation must succeed."""
        reply = self.call(op, **kw)
        assert reply["ok"], f"host {self.host} {op} {kw}: {reply}"
        return reply


if __name__ == "__main__":
    AgentServer().run()
