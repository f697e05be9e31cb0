"""Celery app for bench/beat_many.py: BENCH_ENTRIES entries every BENCH_PERIOD seconds, each
sent to a queue nobody consumes (BENCH_SINK), so the bench counts what beat published."""

import os

from celery import Celery
from celery.schedules import crontab

from celery_cluster import install

app = Celery("beat_app", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12"))
app.conf.task_default_queue = os.environ.get("BENCH_QUEUE", "bench-beat")
app.conf.task_ignore_result = True
app.conf.beat_max_loop_interval = 1.0
_sink = os.environ.get("BENCH_SINK", "bench-beat-sink")
# BENCH_PERIOD seconds, or "minute": a crontab firing every entry at each wall-clock minute.
_period = os.environ.get("BENCH_PERIOD", "5")
_schedule = crontab() if _period == "minute" else float(_period)
app.conf.beat_schedule = {
    f"entry-{i:05d}": {"task": "beat_app.noop", "schedule": _schedule, "options": {"queue": _sink}}
    for i in range(int(os.environ.get("BENCH_ENTRIES", "1000")))
}
install(app)


@app.task
def noop() -> None:
    pass
