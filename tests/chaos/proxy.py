"""TCP proxy with runtime-adjustable delay, run inside a host namespace in front of a node.

    python -m tests.chaos.proxy --listen 10.231.7.2:8899 --target 127.0.0.1:8899 --control /tmp/p.sock

The node listens on loopback inside its namespace (advertising the host IP, e.g. with
``--cluster-advertise``); peers reach it only through the proxy. Bytes are forwarded both
ways unchanged, on one upstream connection per accepted connection, so keep-alive and order
are preserved; TCP_NODELAY is set on both sides so the proxy adds no Nagle stalls.

Delay: every chunk read is held for ``delay + uniform(0, jitter)`` seconds, but never
released before the chunk read before it in the same direction (release = max(arrival +
d, previous release)), so jitter reorders nothing. EOF is queued behind the data. A request
and its reply cross the proxy once each, so a round trip gains about 2 * delay.

Control: a Unix *stream* socket at ``--control`` (pathname sockets are not tied to a network
namespace, so the harness in the root namespace can reach it). One JSON line in, one JSON
line out; the reply is sent after the change took effect, so a test knows that the next
byte it sends is delayed. Requests: ``{"op": "set", "delay": s, "jitter": s}``,
``{"op": "drop"}`` (abort every open connection: both ends see a reset), ``{"op": "stats"}``.
:class:`ProxyControl` wraps this.

Caveat: the client's connect always succeeds (the kernel completes the handshake before the
proxy knows whether the target is up); a dead target shows up as an immediate close.

Overhead at zero delay, measured on the 2-core dev box (``python -m tests.chaos.bench_proxy``:
300-byte request and echo reply, one keep-alive connection, 2000 round trips, 3 runs):
client and echo server in the same namespace, p50 24-30 us direct (loopback) vs 101-130 us
through the proxy, i.e. +75-100 us per round trip at p50, about +150 us at p99; across the
bridge the same (29-33 us direct vs 103-129 us). Negligible next to election timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Stop reading from a side when this much is waiting in the delay queue towards the other
# side: memory stays bounded whatever the delay, and TCP flow control pushes back.
_HIGH_WATER = 1 << 20


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class Settings:
    delay: float = 0.0
    jitter: float = 0.0


class _Half:
    """One direction (src -> dst) of a proxied connection, with its delay queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings, on_eof: Callable[[], None]) -> None:
        self.loop = loop
        self.settings = settings
        self.on_eof = on_eof
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.last_release = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.eof_sent = False
        self.paused = False

    def feed(self, data: bytes | None) -> None:
        """``data`` read from src (None = EOF): forward now or queue it with its release time."""
        s = self.settings
        now = self.loop.time()
        hold = s.delay + (random.uniform(0.0, s.jitter) if s.jitter > 0 else 0.0)
        if hold <= 0 and not self.queue and self.dst is not None:
            self._write(data)  # fast path: zero delay and nothing queued ahead
            return
        release = max(now + hold, self.last_release)
        self.last_release = release
        self.queue.append((release, data))
        if data:
            self.queued += len(data)
            if self.queued > _HIGH_WATER and self.src is not None and not self.paused:
                self.paused = True
                self.src.pause_reading()
        self._arm()

    def flush(self) -> None:
        self.timer = None
        if self.dst is None:
            return  # upstream not connected yet; connected() calls flush again
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data:
                self.queued -= len(data)
            self._write(data)
        if self.paused and self.queued <= _HIGH_WATER // 2 and self.src is not None:
            self.paused = False
            self.src.resume_reading()
        self._arm()

    def _arm(self) -> None:
        if self.queue and self.timer is None and self.dst is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def _write(self, data: bytes | None) -> None:
        assert self.dst is not None
        if self.dst.is_closing():
            return
        if data is None:
            self.eof_sent = True
            if self.dst.can_write_eof():
                self.dst.write_eof()
            self.on_eof()  # EOF may leave the queue long after eof_received: re-check here
        else:
            self.dst.write(data)

    def cancel(self) -> None:
        if self.timer:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Side(asyncio.Protocol):
    """Protocol for one socket: what it reads goes into ``out``; ``inbound`` writes into it."""

    def __init__(self, conn: _Conn, out: _Half, inbound: _Half,
                 on_made: Callable[[asyncio.Transport], None] | None = None) -> None:
        self.conn = conn
        self.out = out
        self.inbound = inbound
        self.on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.on_made:
            self.on_made(transport)  # type: ignore[arg-type]

    # Our socket's send buffer is full: stop reading from the peer that feeds it.
    def pause_writing(self) -> None:
        if self.inbound.src is not None:
            self.inbound.src.pause_reading()

    def resume_writing(self) -> None:
        if self.inbound.src is not None and not self.inbound.paused:
            self.inbound.src.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.out.feed(data)

    def eof_received(self) -> bool:
        self.out.feed(None)
        return True  # keep the transport open: the other direction may still be talking

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(exc)


class _Conn:
    """A client connection and its upstream; closed when both directions saw EOF or one died."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        loop = asyncio.get_running_loop()
        self.up = _Half(loop, proxy.settings, self.maybe_close)    # client -> target
        self.down = _Half(loop, proxy.settings, self.maybe_close)  # target -> client
        self.client = _Side(self, self.up, self.down, on_made=self.client_made)
        self.server = _Side(self, self.down, self.up)
        self.transports: list[asyncio.Transport] = []

    def client_made(self, transport: asyncio.Transport) -> None:
        self.up.src = self.down.dst = transport
        self.transports.append(transport)
        transport.pause_reading()  # until upstream is connected, so nothing piles up
        asyncio.get_running_loop().create_task(self._connect(transport))

    async def _connect(self, client: asyncio.Transport) -> None:
        host, port = self.proxy.target
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: self.server, host, port)
        except OSError:
            client.abort()
            return
        self.transports.append(upstream)
        self.up.dst = self.down.src = upstream  # type: ignore[assignment]
        if client.is_closing():
            upstream.abort()
            return
        client.resume_reading()
        self.up.flush()

    def maybe_close(self) -> None:
        if self.up.eof_sent and self.down.eof_sent:
            self.close(abort=False)

    def lost(self, exc: Exception | None) -> None:
        # A reset or close on one side: deliver nothing more, mirror it to the other side
        # at once (only EOF travels through the delay queue; resets are not delayed).
        self.close(abort=exc is not None)

    def close(self, *, abort: bool) -> None:
        self.up.cancel()
        self.down.cancel()
        for t in self.transports:
            t.abort() if abort else t.close()
        self.proxy.conns.discard(self)


class Proxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], control: str) -> None:
        self.listen = listen
        self.target = target
        self.control = control
        self.settings = Settings()
        self.conns: set[_Conn] = set()
        self.accepted = 0

    def _factory(self) -> asyncio.Protocol:
        conn = _Conn(self)
        self.conns.add(conn)
        self.accepted += 1
        return conn.client

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "set":
            delay, jitter = float(req.get("delay", 0.0)), float(req.get("jitter", 0.0))
            if delay < 0 or jitter < 0:
                return {"ok": False, "error": "negative delay or jitter"}
            self.settings.delay, self.settings.jitter = delay, jitter
        elif op == "drop":
            dropped = len(self.conns)
            for conn in list(self.conns):
                conn.close(abort=True)
            return {"ok": True, "dropped": dropped}
        elif op != "stats":
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, "delay": self.settings.delay, "jitter": self.settings.jitter,
                "open": len(self.conns), "accepted": self.accepted}

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                reply = self.handle(json.loads(line))
            except (ValueError, TypeError, AttributeError) as e:
                reply = {"ok": False, "error": str(e)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory, *self.listen, reuse_address=True, backlog=128)
        Path(self.control).unlink(missing_ok=True)
        # Control last: once it answers, the listener is already bound (readiness signal).
        control = await asyncio.start_unix_server(self._control, self.control)
        async with server, control:
            await asyncio.Future()  # run until killed; the harness SIGKILLs the process group


class _Topo(Protocol):
    def popen(self, host: int, argv: list[str], **kw: Any) -> Any: ...
    def address(self, i: int, port: int) -> str: ...


class ProxyControl:
    """Harness-side handle on a running proxy's control socket."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def _call(self, req: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("proxy closed the control connection")
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        if not reply.get("ok"):
            raise RuntimeError(f"proxy: {reply.get('error')}")
        return reply

    def set_delay(self, delay: float, jitter: float = 0.0) -> None:
        """From now on hold each chunk (both directions) for delay + uniform(0, jitter) s."""
        self._call({"op": "set", "delay": delay, "jitter": jitter})

    def drop_all(self) -> int:
        """Abort every open proxied connection (peers see a reset); returns how many."""
        return int(self._call({"op": "drop"})["dropped"])

    def stats(self) -> dict[str, Any]:
        return self._call({"op": "stats"})

    def wait_ready(self, timeout: float = 5.0, proc: Any = None) -> None:
        """Poll until the proxy answers (it binds its listener before the control socket).
        With ``proc`` (its Popen), fail at once if the proxy exited, e.g. port in use."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.stats()
                return
            except (OSError, ConnectionError):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"proxy exited with {proc.returncode}") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"proxy at {self.path} not ready within {timeout} s") from None
                time.sleep(0.01)


REPO = Path(__file__).resolve().parents[2]


def proxy_argv(listen: str, target: str, control: str, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "tests.chaos.proxy",
            "--listen", listen, "--target", target, "--control", control]


def start_proxy(topo: _Topo, host: int, port: int, target_port: int, control: str) -> ProxyControl:
    """Run a proxy in ``host`` on host_ip:port -> 127.0.0.1:target_port; returns it ready.
    ``control`` must be a path no other live proxy uses (e.g. under pytest's tmp_path)."""
    proc = topo.popen(host, proxy_argv(topo.address(host, port), f"127.0.0.1:{target_port}", control),
                      cwd=REPO)
    ctl = ProxyControl(control)
    ctl.wait_ready(proc=proc)
    return ctl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="IP:PORT to accept on")
    ap.add_argument("--target", required=True, help="IP:PORT to forward to")
    ap.add_argument("--control", required=True, help="path of the Unix control socket")
    args = ap.parse_args()
    asyncio.run(Proxy(_split(args.listen), _split(args.target), args.control).serve())


if __name__ == "__main__":
    main()
