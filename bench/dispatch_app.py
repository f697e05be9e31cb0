"""Celery app for bench/dispatch.py: a plain task and a leader-only task that record when they start."""

import os
import time

import redis
from celery import Celery

from celery_cluster import install, leader_only

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/11")
app = Celery("dispatch_app", broker=BROKER)
app.conf.worker_prefetch_multiplier = 1
app.conf.task_default_queue = os.environ.get("BENCH_QUEUE", "bench")
app.conf.cluster_beat = "no"
install(app)
_redis = redis.Redis.from_url(BROKER)


@app.task(bind=True)
def plain(self, sent):
    _redis.rpush("bench:started", f"{self.request.id} {time.time():.6f} {sent}")


@app.task(bind=True)
@leader_only
def led(self, sent):
    _redis.rpush("bench:started", f"{self.request.id} {time.time():.6f} {sent}")
