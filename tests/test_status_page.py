"""The status page (``GET /cluster/``) in headless Chromium, on three real workers.

Chromium loads the page from a worker, runs its script (``--virtual-time-budget`` lets
the refresh loop fetch ``overview`` a few times) and hands back the DOM it drew
(``--dump-dom``); the test reads what a person would see: exactly one leader, beat on
that leader with its entries and the terms that fired them, then - after ``kill -9`` of
the leader - the new leader. Screenshots are saved as artifacts (``CC_ARTIFACT_DIR``,
default ``artifacts/`` in the repository).

Chromium comes from Debian's ``chromium`` package (``.ci/run`` installs it and sets
``CC_REQUIRE_CHROMIUM=1``, so CI fails rather than skips without it).
"""

from __future__ import annotations

import html.parser
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.workers import REPO, Cluster, poll, redis_broker

pytestmark = pytest.mark.processes

ARTIFACTS = Path(os.environ.get("CC_ARTIFACT_DIR", REPO / "artifacts"))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "no chromium on PATH: apt-get install chromium (CI installs it)"
    if os.environ.get("CC_REQUIRE_CHROMIUM"):
        pytest.fail(reason)
    print(f"\nskipping: {reason}", file=sys.stderr)
    pytest.skip(reason)


def headless(url: str, *extra: str, timeout: float = 60) -> str:
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--user-data-dir=" + str(ARTIFACTS / ".chromium-profile"),
            "--virtual-time-budget=3000", *extra, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return out.stdout


class PageView(html.parser.HTMLParser):
    """What the drawn page says: the banner's leaders, each node row's role, where beat runs,
    the beat entry rows."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.leaders: list[str] | None = None
        self.roles: dict[str, str] = {}
        self.beat_on: str | None = None
        self.entries: list[list[str]] = []
        self._entry: list[str] | None = None
        self._in_td = False
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if a.get("id") == "banner" and "data-leaders" in a:
            self.leaders = [x for x in a["data-leaders"].split(",") if x]
        elif tag == "tr" and "data-node" in a:
            self.roles[a["data-node"]] = a.get("data-role", "")
        elif a.get("id") == "beat":
            self.beat_on = a.get("data-runs-on") or None
        elif tag == "tr" and "data-entry" in a:
            self._entry = []
            self.entries.append(self._entry)
        elif tag == "td" and self._entry is not None:
            self._in_td = True
            self._entry.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_td = False
        elif tag == "tr":
            self._entry = None

    def handle_data(self, data: str) -> None:
        if self._in_td and self._entry is not None:
            self._entry[-1] += data


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = Cluster(tmp_path / "cluster", redis_broker())
    c.tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield c
    finally:
        c.kill_all()
        c.close_app()
        c.broker.cleanup()


def test_the_page_shows_one_leader_its_beat_and_the_new_leader_after_a_kill(cluster: Cluster) -> None:
    chromium()  # skip (locally) or fail (CI) before starting anything
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    c = cluster
    c.start()
    leader, term = c.wait_leader()
    follower = next(w for w in c.workers.values() if w is not leader)
    url = f"http://{follower.address}/cluster"  # no trailing slash: the page finds overview anyway

    def drawn(want_leader: str, min_runs: int = 1) -> PageView | None:
        view = PageView(headless(url, "--dump-dom"))
        tick = next((e for e in view.entries if len(e) == 7 and e[1] == "tests.celery_app.tick"), None)
        done = (view.leaders == [want_leader] and view.beat_on == want_leader and tick is not None
                and tick[5].isdigit() and int(tick[5]) >= min_runs)
        return view if done else None

    view = poll(lambda: drawn(leader.address), 60, "the page to show the leader and its beat", 1.0)
    assert [a for a, role in view.roles.items() if role == "leader"] == [leader.address]
    assert set(view.roles) == {w.address for w in c.workers.values()}
    assert all(role == "follower" for a, role in view.roles.items() if a != leader.address)
    tick = next(e for e in view.entries if e[1] == "tests.celery_app.tick")
    assert tick[6] == str(term)  # fired in the leader's term
    assert tick[3] and tick[4]  # last run and next run
    shot = ARTIFACTS / "status-page.png"
    headless(url, "--window-size=1280,820", f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 10_000

    leader.send(signal.SIGKILL)
    leader.wait_exit(5)
    new, new_term = c.wait_leader(timeout=15, min_term=term + 1)
    runs_before = int(tick[5])
    view = poll(lambda: drawn(new.address, runs_before + 1), 60,
                "the page to show the new leader, its beat and a run it fired", 1.0)
    assert view.roles[leader.address] == "unreachable"
    assert [a for a, role in view.roles.items() if role == "leader"] == [new.address]
    tick = next(e for e in view.entries if e[1] == "tests.celery_app.tick")
    assert tick[6] == str(new_term)
    headless(url, "--window-size=1280,820", f"--screenshot={ARTIFACTS / 'status-page-after-failover.png'}")
    print(f"\nstatus page: leader {leader.address} (term {term}) killed, page shows {new.address} "
          f"(term {new_term}); screenshots in {ARTIFACTS}")
