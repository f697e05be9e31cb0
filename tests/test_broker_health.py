"""Leadership follows the broker: real ``celery worker`` processes, each reaching Redis through
its own TCP proxy (``tests/chaos/proxy.py``) so that one worker's path to the broker can be
cut while the others' and the workers' own links stay up.

A cut holds every byte in both directions (the proxy's delay set far beyond the test): TCP
connections stay open and silent, as behind a firewall that drops packets. Healing aborts
the held connections (the bytes are discarded) and lets new ones through.

Judged where the work runs: the beat messages (``assert_beat_fenced``: one leader per term,
each message sent by the leader of the term it carries), the replicated run numbers (a repeat
is a duplicate), and the transitions each worker logged.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.proxy import ProxyControl, proxy_argv
from tests.support import die_with_parent, free_ports
from tests.test_celery_workers import assert_beat_fenced, clusters, measure  # noqa: F401 - the fixture
from tests.workers import REPO, Cluster, poll

GRACE = 2.0
PERIOD = 1.0
CUT = 600.0  # seconds the proxy holds bytes: for ever, as far as the test goes


@pytest.fixture
def proxied(clusters: Any, tmp_path: Path) -> Any:
    """A factory: a 3-worker cluster whose workers each reach Redis through their own proxy."""
    procs: list[subprocess.Popen[bytes]] = []

    def make() -> tuple[Cluster, dict[str, ProxyControl]]:
        c = clusters("redis", extra_args=["--cluster-broker-grace", str(GRACE), "--cluster-broker-probe", "yes"])
        url = c.broker.url
        host_port, _, db = url.removeprefix("redis://").partition("/")
        proxies = {}
        for (name, w), port in zip(c.workers.items(), free_ports(len(c.workers))):
            control = str(tmp_path / f"proxy-{name}.sock")
            proc = subprocess.Popen(proxy_argv(f"127.0.0.1:{port}", host_port, control), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"proxy-{name}.err", "wb"),
                                    preexec_fn=die_with_parent)
            procs.append(proc)
            proxies[name] = ProxyControl(control)
            proxies[name].wait_ready(proc=proc)
            w.env = {"CC_TEST_BROKER": f"redis://127.0.0.1:{port}/{db}"}
        return c, proxies

    try:
        yield make
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def cut(proxy: ProxyControl) -> None:
    proxy.set_delay(CUT)
    proxy.drop_all()  # connections made before the cut die; new ones hang silently


def heal(proxy: ProxyControl) -> None:
    proxy.set_delay(0.0)
    proxy.drop_all()  # what the cut held is discarded: never delivered late


def runs_sent(c: Cluster) -> list[int]:
    return [int(r["cluster_run"]) for r in c.records("beat_sent") if r.get("cluster_run") is not None]


def stepped_down_reasons(c: Cluster, name: str) -> list[str]:
    st = c.workers[name].status() or {}
    return [t.get("reason") for t in st.get("recent_transitions", []) if t.get("event") == "stepped_down"]


def test_a_leader_cut_off_from_its_broker_hands_over(proxied: Any) -> None:
    c, proxies = proxied()
    c.start()
    leader, term = c.wait_leader()
    poll(lambda: len(c.records("beat_sent")) >= 3, 15, "three ticks")
    t_cut = time.time()
    cut(proxies[leader.name])
    new, new_term = c.wait_leader(timeout=GRACE + 10, min_term=term + 1)
    handover = time.time() - t_cut
    assert new is not leader
    assert "broker_unreachable" in stepped_down_reasons(c, leader.name)
    first = poll(lambda: next((s for s in c.beat_sends() if s["cluster_term"] >= new_term), None), 10,
                 "a tick from the new leader")
    time.sleep(4 * PERIOD)  # observation window: the schedule runs on the new leader, the old one is silent
    heal(proxies[leader.name])
    time.sleep(2 * PERIOD)  # observation window after the heal: nothing stale arrives, nothing repeats

    sends = assert_beat_fenced(c)
    runs = runs_sent(c)
    dupes = sorted(n for n, k in Counter(runs).items() if k > 1)
    missed = sorted(set(range(min(runs), max(runs) + 1)) - set(runs))
    gap = first["sent_at"] - max(s["sent_at"] for s in sends if s["cluster_term"] == term)
    measure("leader_cut_from_broker", grace_s=GRACE, handover_s=round(handover, 2), schedule_gap_s=round(gap, 2),
            runs=len(runs), duplicates=dupes, missed_runs=missed,
            leader_view=(c.workers[new.name].status() or {}).get("nodes"))
    assert not dupes, f"run numbers sent twice: {dupes}"
    assert handover <= GRACE + 5, f"handover took {handover:.1f} s"
    # Due runs missed: at most the grace period's worth plus the handover, and the ones the old
    # leader recorded but could not publish (the window this issue leaves, see the README).
    assert len(missed) <= (GRACE + 3) / PERIOD, f"missed {missed}"


def test_a_broker_outage_for_everyone_moves_nothing(proxied: Any) -> None:
    c, proxies = proxied()
    c.start()
    leader, term = c.wait_leader()
    poll(lambda: len(c.records("beat_sent")) >= 2, 15, "two ticks")
    for p in proxies.values():
        cut(p)
    time.sleep(GRACE * 3)  # well past the grace: nobody's broker works, so nothing may move
    elected = c.elected_terms()
    st = leader.status() or {}
    assert st.get("term") == term and st.get("is_leader"), st
    assert st.get("broker_healthy") is False, st
    assert max(elected) == term, f"elections during an outage that hit every worker: {elected}"
    t_heal = time.time()
    for p in proxies.values():
        heal(p)
    resumed = poll(lambda: next((s for s in c.beat_sends() if s["sent_at"] > t_heal), None), 15,
                   "a tick after the broker came back")
    measure("broker_down_for_everyone", elections_during_outage=max(elected) - term,
            beat_resumed_after_s=round(resumed["sent_at"] - t_heal, 2))
    assert max(c.elected_terms()) == term
    assert resumed["sent_at"] - t_heal <= 5.0


def test_a_slow_broker_within_the_grace_moves_nothing(proxied: Any) -> None:
    c, proxies = proxied()
    c.start()
    leader, term = c.wait_leader()
    poll(lambda: len(c.records("beat_sent")) >= 2, 15, "two ticks")
    proxies[leader.name].set_delay(0.1, 0.05)  # round trips of 0.2-0.3 s: slow, within the probe's 0.5 s bound
    time.sleep(GRACE * 3)
    proxies[leader.name].set_delay(0.0)
    st = leader.status() or {}
    assert st.get("is_leader") and st.get("term") == term, st
    assert max(c.elected_terms()) == term
    n = len(c.records("beat_sent"))
    poll(lambda: len(c.records("beat_sent")) > n, 10, "ticks from the same leader")
    measure("slow_broker", elections=max(c.elected_terms()) - term)
