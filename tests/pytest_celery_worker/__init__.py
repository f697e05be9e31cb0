"""Modules pytest-celery writes into its worker container's /app (see tests/test_pytest_celery.py)."""
