"""The Celery app: Django settings under the CELERY_ namespace, plus the two lines."""

import os

from celery import Celery

from celery_cluster import install

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
install(app)
