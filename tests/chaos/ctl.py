"""The chaos harness's hands inside the test network: one process on the infrastructure host.

The harness runs in the root namespace, which has no route into the test network, so it
asks this process (stdin: one JSON request per line; stdout: one JSON reply per line):

``{"op": "statuses", "addrs": [...], "timeout": s}``  GET /cluster/status of each, in parallel
``{"op": "stepdown", "addr": a}``                     a signed POST /cluster/stepdown
``{"op": "members", "addrs": [...], "change": {..}}``  a signed POST /cluster/members (to the leader)
``{"op": "produce", "every": s}``                     worker mode: send ``chaos.lead(i)`` every s
``{"op": "produced"}``                                the ``i`` sent so far (and stop sending)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import sys
import threading
from typing import Any

from celery_cluster.auth import Signer, load_secret
from celery_cluster.clock import lease_clock


def _request(addr: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
             timeout: float = 0.5) -> tuple[int, Any]:
    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers={"Content-Length": str(len(body)), **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


class Ctl:
    def __init__(self, secret_file: str) -> None:
        secret = load_secret(secret_file=secret_file)
        assert secret is not None
        self.signer = Signer(secret)
        self.pool = concurrent.futures.ThreadPoolExecutor(8)
        self.sent: list[int] = []
        self.sent_at: dict[int, float] = {}  # i -> the machine's boot clock once the publish returned
        self.stop_producing = threading.Event()
        self.producer: threading.Thread | None = None

    def statuses(self, addrs: list[str], timeout: float) -> dict[str, Any]:
        def one(addr: str) -> Any:
            try:
                code, body = _request(addr, "GET", "/cluster/status", timeout=timeout)
                return body if code == 200 else None
            except (OSError, http.client.HTTPException):
                return None
        return dict(zip(addrs, self.pool.map(one, addrs)))

    def stepdown(self, addr: str) -> dict[str, Any]:
        path = "/cluster/stepdown"
        headers = self.signer.sign("POST", path, addr, b"")
        try:
            code, body = _request(addr, "POST", path, headers=headers, timeout=2.0)
        except (OSError, http.client.HTTPException) as exc:
            return {"status": None, "error": str(exc)}
        return {"status": code, "body": body}

    def members(self, addrs: list[str], change: dict[str, str]) -> dict[str, Any]:
        from celery_cluster.errors import MembershipError
        from celery_cluster.members_client import change_members

        (op, address), = change.items()
        try:
            return {"ok": True, **change_members(addrs, op, address, signer=self.signer, timeout=30)}
        except MembershipError as exc:
            return {"ok": False, "error": str(exc)}

    def produce(self, every: float) -> None:
        from tests.chaos.app import app  # only worker mode needs Celery here

        lead = app.tasks["chaos.lead"]

        def run() -> None:
            i = 0
            while not self.stop_producing.is_set() and i < 100_000:
                try:
                    lead.delay(i)
                    self.sent_at[i] = lease_clock()
                    self.sent.append(i)
                except Exception as exc:  # noqa: BLE001 - the broker is up the whole run; say so if not
                    print(json.dumps({"producer_error": str(exc)}), file=sys.stderr, flush=True)
                i += 1
                self.stop_producing.wait(every)
        self.producer = threading.Thread(target=run, daemon=True)
        self.producer.start()

    def produced(self) -> list[int]:
        self.stop_producing.set()
        if self.producer is not None:
            self.producer.join(10)
        return list(self.sent)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--secret-file", required=True)
    args = p.parse_args()
    ctl = Ctl(args.secret_file)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            if op == "statuses":
                reply: Any = {"statuses": ctl.statuses(req["addrs"], req.get("timeout", 0.5))}
            elif op == "stepdown":
                reply = ctl.stepdown(req["addr"])
            elif op == "members":
                reply = ctl.members(req["addrs"], req["change"])
            elif op == "produce":
                ctl.produce(req["every"])
                reply = {"ok": True}
            elif op == "produced":
                reply = {"sent": ctl.produced(), "sent_at": ctl.sent_at}
            else:
                reply = {"error": f"unknown op {op}"}
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            reply = {"error": repr(exc)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
