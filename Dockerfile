# Image for the docker-compose demo: the example app with celery-cluster installed.
#   docker compose build                      # from PyPI and this directory's source
# PIP_FIND_LINKS=<dir in the build context> installs from wheels there instead, with no
# package index (the project's own tests build it that way, offline).
FROM python:3.11-slim
WORKDIR /app
ARG PIP_FIND_LINKS=""
COPY . /src
RUN if [ -n "$PIP_FIND_LINKS" ]; then \
        pip install --no-cache-dir --no-index --find-links "/src/$PIP_FIND_LINKS" celery-cluster "celery[redis]"; \
    else \
        pip install --no-cache-dir /src "celery[redis]"; \
    fi \
 && cp -r /src/examples /app/examples && rm -rf /src
ENV PYTHONPATH=/app
