# Celery's own pytest fixtures (celery_app, celery_worker, ...). Registered here, in the root
# conftest, so that they win over pytest-celery's Docker-based ones if that is ever installed.
pytest_plugins = ("celery.contrib.pytest",)
