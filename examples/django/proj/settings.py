"""A minimal Django project with django-celery-beat on PostgreSQL, run by a celery-cluster.

Everything that differs per deployment comes from the environment. Run every worker as

    celery -A proj worker -n w1@%h --cluster-nodes HOST1:8899,HOST2:8899,HOST3:8899 \\
        --cluster-listen HOST1:8899 --cluster-secret-file /etc/proj/cluster.key

(no ``celery beat``, no ``-B``): the elected worker runs the DatabaseScheduler, and
periodic tasks edited in the admin or the ORM reach it within the scheduler's refresh.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_celery_beat",
    "demo",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PROJ_DB_NAME", "proj"),
        "USER": os.environ.get("PROJ_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("PROJ_DB_PASSWORD", ""),
        "HOST": os.environ.get("PROJ_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("PROJ_DB_PORT", "5432"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

# Celery, read by app.config_from_object("django.conf:settings", namespace="CELERY").
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# celery-cluster settings have the same namespace (the worker options override them):
# CELERY_CLUSTER_NODES = "10.0.0.1:8899,10.0.0.2:8899,10.0.0.3:8899"
# CELERY_CLUSTER_SECRET_FILE = "/etc/proj/cluster.key"
