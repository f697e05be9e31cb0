"""Publishes on the leader beat's bounded connection (``celery_cluster.beat_publish``), on
command, from inside a test host: ``tests/test_beat_publish.py`` cuts its path to the broker.

    python -m tests.chaos.publisher BROKER_URL QUEUE BOUND

One JSON line out per line in: ``publish`` -> ``{"ok", "error", "seconds"}`` (a publish on the
bounded connection, as the beat makes it); ``count`` -> ``{"count"}`` (messages in QUEUE,
asked on a fresh connection of Celery's usual kind). Prints ``{"ready": true}`` first, after
one warm-up publish (which declares QUEUE).
"""

from __future__ import annotations

import json
import sys
import time

from celery import Celery
from kombu import Queue

from celery_cluster import beat_publish


def main(url: str, queue: str, bound: float) -> None:
    app = Celery("publisher", broker=url)
    q = Queue(queue)
    conn = beat_publish.bounded_connection(app, bound)
    producer = app.amqp.Producer(conn, auto_declare=False)

    def publish(declare: bool = False) -> dict[str, object]:
        nonlocal conn, producer
        t = time.monotonic()
        try:
            app.send_task("chaos.tick", producer=producer, queue=q, declare=[q] if declare else None,
                          **beat_publish.publish_options(bound))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            seconds = time.monotonic() - t
            beat_publish.drop(conn)  # as the beat does after a broker error
            conn = beat_publish.bounded_connection(app, bound)
            producer = app.amqp.Producer(conn, auto_declare=False)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": seconds}
        return {"ok": True, "error": None, "seconds": time.monotonic() - t}

    def count() -> dict[str, object]:
        with app.connection_for_read() as c:
            return {"count": c.default_channel.queue_declare(queue=queue, passive=True).message_count}

    assert publish(declare=True)["ok"]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        print(json.dumps(publish() if cmd == "publish" else count()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
