"""One PySyncObj node for the side-by-side benchmark (``bench/side_by_side.py``).

    python bench/peers/pysyncobj_node.py --self 127.0.0.1:7001 --partners 127.0.0.1:7002,127.0.0.1:7003 \
        --timeout 0.15-0.3 --heartbeat 0.03 --log node.log

Run as PySyncObj documents it: ``SyncObj(self, partners, SyncObjConf(...))`` with its own
auto-tick thread and defaults, only the three timing settings set to the cell's values
(``raftMinTimeout``, ``raftMaxTimeout``, ``appendEntriesPeriod``). Every change of its
Raft state is logged as a JSON line with ``time.monotonic()`` - the clock our nodes log
with - from PySyncObj's own ``onStateChanged`` callback, called on the transition itself
(no sampling, so nothing to exclude from its CPU). Unless ``--no-watch`` (the idle-CPU
measurement), a thread also logs how many partners it is connected to whenever that changes
(``getStatus()`` every 0.1 s): PySyncObj reconnects to a restarted partner only every
``connectionRetryTime`` (5 s), so the benchmark waits for a fully connected cluster before
each kill, as a fair run must.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pysyncobj import SyncObj, SyncObjConf

STATES = {0: "follower", 1: "candidate", 2: "leader"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--self", dest="me", required=True)
    ap.add_argument("--partners", required=True)
    ap.add_argument("--timeout", required=True, help="MIN-MAX seconds")
    ap.add_argument("--heartbeat", type=float, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--no-watch", action="store_true", help="do not log partner connections")
    args = ap.parse_args()
    lo, hi = (float(x) for x in args.timeout.split("-"))
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def on_state(old: int, new: int) -> None:
        line = json.dumps({"event": STATES.get(new, str(new)), "mono": time.monotonic(), "pid": os.getpid()})
        os.write(fd, (line + "\n").encode())

    conf = SyncObjConf(raftMinTimeout=lo, raftMaxTimeout=hi, appendEntriesPeriod=args.heartbeat,
                       onStateChanged=on_state)
    obj = SyncObj(args.me, [p for p in args.partners.split(",") if p], conf)
    print("ready", flush=True)
    connected = -1
    while True:
        if args.no_watch:
            time.sleep(3600)
            continue
        status = obj.getStatus()
        now = sum(1 for k, v in status.items() if k.startswith("partner_node_status_server_") and v == 2)
        if now != connected:
            connected = now
            line = json.dumps({"event": "links", "connected": now, "mono": time.monotonic(), "pid": os.getpid()})
            os.write(fd, (line + "\n").encode())
        time.sleep(0.1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
