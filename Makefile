VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test sim chaos fuzz bench-quick bench bench-dispatch bench-beat bench-tls demo clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Whole test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

## Deterministic simulation with 10,000 fault schedules.
sim: $(STAMP)
	SIM_EXAMPLES=10000 $(PY) -m pytest -q -p no:randomly --hypothesis-show-statistics tests/test_simulation.py

## The real-process fault suite, long: 10 minutes per mode (standalone, worker) with 5 nodes (root).
## Replay a run with CHAOS_SEED=<seed printed> (and CHAOS_SECONDS / CHAOS_NODES as printed).
CHAOS_SECONDS ?= 600
CHAOS_NODES ?= 5
chaos: $(STAMP)
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_NODES=$(CHAOS_NODES) $(PY) -m pytest -q -s -p no:randomly tests/chaos/test_chaos.py

## Hypothesis-generated bad input on every HTTP route, 5,000 cases per route.
fuzz: $(STAMP)
	FUZZ_EXAMPLES=5000 $(PY) -m pytest -q -p no:randomly tests/test_fuzz_routes.py

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(PY) -m pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

## Side by side with PySyncObj (failover after kill -9, idle CPU), a short run (~5 min).
bench-quick: $(BENCH_STAMP)
	$(PY) bench/side_by_side.py --quick

## The full benchmark: side by side with the peers, then handoff / heartbeat / idle detail.
bench: $(BENCH_STAMP)
	$(PY) bench/side_by_side.py
	$(PY) bench/failover.py

## @leader_only dispatch latency against a plain task, on the local Redis.
bench-dispatch: $(STAMP)
	$(PY) bench/dispatch.py

## Many periodic tasks: the cluster's leader beat side by side with stock celery beat (Redis).
bench-beat: $(STAMP)
	$(PY) bench/beat_many.py

## Heartbeat round trip and leader CPU with TLS between members, against plain HTTP.
bench-tls: $(STAMP)
	$(PY) bench/tls_rtt.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

## Three workers on loopback, kill the leader, watch the schedule continue (no broker server needed).
demo: $(STAMP)
	$(PY) examples/basic/demo.py
