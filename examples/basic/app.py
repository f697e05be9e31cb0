"""The demo's Celery app: a 2 s beat schedule and one leader-only task.

Two lines enable the cluster: ``from celery_cluster import install`` and
``install(app)``. Everything else is an ordinary Celery app.
"""

import json
import os
import time
from pathlib import Path

from celery import Celery

from celery_cluster import fencing_token, install, leader_only

DEMO_DIR = Path(os.environ.get("DEMO_DIR", "/tmp/celery-cluster-demo"))
DEMO_DIR.mkdir(parents=True, exist_ok=True)  # the records file lives here, whatever the broker
BROKER_URL = os.environ.get("BROKER_URL") or "filesystem://"

app = Celery("demo", broker=BROKER_URL)
if BROKER_URL.startswith("filesystem"):
    # kombu's filesystem transport: a broker that needs no server (folders under DEMO_DIR).
    queue_dir = DEMO_DIR / "broker"
    for sub in ("queue", "processed", "control"):
        (queue_dir / sub).mkdir(parents=True, exist_ok=True)
    app.conf.broker_transport_options = {
        "data_folder_in": str(queue_dir / "queue"),
        "data_folder_out": str(queue_dir / "queue"),
        "processed_folder": str(queue_dir / "processed"),
        "control_folder": str(queue_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
app.conf.beat_schedule = {"report": {"task": "examples.basic.app.report", "schedule": 2.0}}
app.conf.worker_prefetch_multiplier = 1
app.conf.task_default_queue = os.environ.get("DEMO_QUEUE", "celery")
install(app)


def record(**fields):
    """One JSON line per execution (O_APPEND: safe across worker processes)."""
    line = json.dumps({"t": round(time.time(), 3), "worker": os.environ.get("DEMO_WORKER"), **fields})
    fd = os.open(DEMO_DIR / "records.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.task(bind=True)
def report(self):
    """Sent by beat on the leader; headers carry the term and the replicated run number."""
    record(task="report", term=fencing_token(), run=getattr(self.request, "cluster_run", None))


@app.task
@leader_only
def rebuild_index(i):
    """Runs only on the leader; fencing_token() is the term it runs under."""
    record(task="rebuild_index", i=i, term=fencing_token())
