# Image for the docker-compose demo: the example app with celery-cluster installed.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY celery_cluster ./celery_cluster
COPY examples ./examples
RUN pip install --no-cache-dir . "celery[redis]"
ENV PYTHONPATH=/app
