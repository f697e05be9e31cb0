"""The worker app pytest-celery runs in its container: its template, plus the two lines that
enable the cluster. pytest-celery replaces the ``imports``, ``app`` and ``config`` lines."""

from __future__ import annotations

import json

from celery import Celery

from celery_cluster import install

imports = None

app = Celery("celery_test_app")
config = None

if config:
    app.config_from_object(config)
    print(f"Changed worker configuration: {json.dumps(config, indent=4)}")

install(app)

if __name__ == "__main__":
    app.start()
