"""The example's periodic task. It logs which run of which schedule entry it is - the
cluster stamps every beat message with the run number it replicated (``cluster_run``)
and the term that sent it (``cluster_term``, a fencing token) - and, when
``DEMO_RECORD_FILE`` is set (the tests), appends the same as one JSON line."""

import json
import logging
import os
import time

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task(bind=True, name="demo.tick")
def tick(self, label: str = "") -> None:
    req = self.request
    # Message headers Celery does not know become attributes of the request.
    fields = {"label": label, "entry": getattr(req, "periodic_task_name", None),
              "run": getattr(req, "cluster_run", None), "term": getattr(req, "cluster_term", None),
              "id": req.id, "t": time.time(), "worker": req.hostname}
    log.info("demo.tick %s", fields)
    path = os.environ.get("DEMO_RECORD_FILE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(fields) + "\n").encode())
        finally:
            os.close(fd)
