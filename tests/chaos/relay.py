"""A byte relay between a TCP address and a Unix socket path, either way round.

    python -m tests.chaos.relay --listen tcp:10.231.7.5:5672 --target unix:/tmp/rabbit.sock
    python -m tests.chaos.relay --listen unix:/tmp/rabbit.sock --target tcp:127.0.0.1:5672

Pathname Unix sockets are not tied to a network namespace, so the pair of these puts a
server that runs in the root namespace (the machine's RabbitMQ on loopback) behind an
address inside a namespace of the test's own: the first relay runs in the broker's host
namespace, the second in the root namespace. Workers reach the broker across the bridge,
where the harness cuts links, exactly as they would reach a broker on its own host.
Prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def rabbitmq_in(topo: Any, host: int, workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """The machine's RabbitMQ (127.0.0.1:5672, root namespace) at ``host``'s address in ``topo``:
    returns the broker URL and the root-namespace relay (the caller kills it; the one in the
    namespace dies with the topology)."""
    sock = workdir / "rabbit.sock"
    root = subprocess.Popen([sys.executable, "-m", "tests.chaos.relay", "--listen", f"unix:{sock}",
                             "--target", "tcp:127.0.0.1:5672"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=open(workdir / "relay-root.err", "wb"))
    front = topo.popen(host, [sys.executable, "-m", "tests.chaos.relay", "--listen",
                              f"tcp:{topo.host_ip(host)}:5672", "--target", f"unix:{sock}"],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=open(workdir / "relay-ns.err", "wb"))
    for proc in (root, front):
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready", "a relay did not start"
    return f"amqp://guest:guest@{topo.host_ip(host)}:5672//", root


def redis_in(topo: Any, host: int, workdir: Path) -> str:
    """A redis-server of its own inside ``host``; returns its URL (it dies with the topology)."""
    import shutil

    topo.popen(host, [shutil.which("redis-server") or "redis-server", "--bind", topo.host_ip(host),
                      "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no",
                      "--dir", str(workdir)], stdout=open(workdir / "redis.log", "wb"), stderr=subprocess.STDOUT)
    return f"redis://{topo.host_ip(host)}:6379/0"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _open(target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, _, where = target.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(where)
    host, _, port = where.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def main(listen: str, target: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            up_reader, up_writer = await _open(target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    kind, _, where = listen.partition(":")
    if kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        server = await asyncio.start_unix_server(handle, where)
    else:
        host, _, port = where.rpartition(":")
        server = await asyncio.start_server(handle, host, int(port), reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True, help="tcp:HOST:PORT or unix:PATH")
    parser.add_argument("--target", required=True, help="tcp:HOST:PORT or unix:PATH")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.listen, args.target))
    except KeyboardInterrupt:
        sys.exit(0)
