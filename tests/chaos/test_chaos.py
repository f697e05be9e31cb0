"""The real-process fault suite (see runner.py): a randomized schedule per mode, checked
from the executing processes' view.

CI runs ``CHAOS_SECONDS`` (default 120) with ``CHAOS_NODES`` (default 3) per mode; ``make
chaos`` runs 600 s with 5 nodes. The seed is printed and replays with ``CHAOS_SEED=``. The
history of a run is in its ``history.json`` (path printed on failure); the summary line of
each run is also appended to ``chaos-summary.txt`` in the pytest base temp directory.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.chaos.runner import ChaosRun, summary

SECONDS = float(os.environ.get("CHAOS_SECONDS", "120"))
NODES = int(os.environ.get("CHAOS_NODES", "3"))

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(int(SECONDS * 2 + 300))]


@pytest.mark.parametrize("mode", ["standalone", "worker"])
def test_chaos(mode: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    seed = int(os.environ["CHAOS_SEED"]) if os.environ.get("CHAOS_SEED") else random.randrange(2**32)
    print(f"\nchaos {mode}: seed {seed} (replay with CHAOS_SEED={seed}), history in {tmp_path / mode}")
    with ChaosRun(mode, nodes=NODES, seconds=SECONDS, seed=seed, out=tmp_path / mode) as run:
        verdict = run.run()
    line = summary(mode, run, verdict)
    print(line)
    if not verdict.ok:  # keep the evidence past pytest's tmp retention
        kept = Path(os.environ.get("CHAOS_KEEP", "/tmp")) / f"celery-cluster-chaos-{mode}-{seed}"
        shutil.copytree(tmp_path / mode, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        line += f"\nevidence kept in {kept}"
    with open(tmp_path_factory.getbasetemp() / "chaos-summary.txt", "a") as f:
        f.write(line + "\n")
    assert verdict.ok, "\n".join([line, *verdict.violations[:30],
                                  f"replay: CHAOS_SEED={seed} CHAOS_SECONDS={SECONDS:g} CHAOS_NODES={NODES} "
                                  f".venv/bin/python -m pytest -s tests/chaos/test_chaos.py -k {mode}; "
                                  f"history: {tmp_path / mode / 'history.json'}"])
