"""``GET /cluster/`` (a one-page dashboard) and ``GET /cluster/overview`` (its data).

The overview is this node's status plus every other member's, fetched from their
``GET /cluster/status`` in parallel with a short timeout: a member that does not answer
is shown as unreachable, never waited for. Only the configured members are asked, so
the route cannot be pointed anywhere else. The page is one static HTML document with
inline CSS and script - no build step, no CDN, no external font - that fetches
``overview`` (beside itself, so it works wherever the blueprint is mounted) every
second and draws it.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import requests

from .tls import TLSConfig

#: Seconds a member has to answer the overview's status request.
FETCH_TIMEOUT = 0.5


def fetch_status(session: requests.Session, address: str, scheme: str = "http") -> dict[str, Any] | None:
    host = address
    try:
        resp = session.get(f"{scheme}://{host}/cluster/status", timeout=FETCH_TIMEOUT)
        if resp.status_code != 200:
            return None
        data = resp.json()
        return data if isinstance(data, dict) else None
    except (requests.RequestException, ValueError):
        return None


class Overview:
    """Builds the overview of one node's cluster."""

    def __init__(self, node_id: str, members: tuple[str, ...] | Callable[[], tuple[str, ...]],
                 local_status: Callable[[], dict[str, Any]],
                 session_factory: Callable[[], requests.Session] | None = None, scheme: str = "http") -> None:
        self.node_id = node_id
        #: The members to ask: a fixed tuple, or a callable (the configuration changes over time).
        self._members = members
        self.local_status = local_status
        self.scheme = scheme
        self._session_factory = session_factory or _plain_session
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="celery-cluster-overview")

    @property
    def members(self) -> tuple[str, ...]:
        members = self._members() if callable(self._members) else self._members
        return members if self.node_id in members else (*members, self.node_id)

    def __call__(self) -> dict[str, Any]:
        started = time.monotonic()
        session = self._session_factory()
        members = self.members
        try:
            others = [m for m in members if m != self.node_id]
            futures = {m: self._pool.submit(fetch_status, session, m, self.scheme) for m in others}
            statuses: dict[str, dict[str, Any] | None] = {self.node_id: self.local_status()}
            for member, future in futures.items():
                statuses[member] = future.result()
        finally:
            session.close()
        nodes: list[dict[str, Any]] = []
        for member in members:
            st = statuses.get(member)
            nodes.append({"address": member, "reachable": st is not None, "status": st})
        leaders = sorted(member for member in members if (statuses.get(member) or {}).get("is_leader"))
        return {"served_by": self.node_id, "nodes": nodes, "leaders": leaders,
                "took_ms": round((time.monotonic() - started) * 1000, 1)}

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _plain_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # members are reached directly, never through an environment proxy
    return session


def tls_session(tls: TLSConfig) -> requests.Session:
    """A session that verifies members against the cluster's CA and shows our certificate."""
    session = _plain_session()
    session.verify = tls.ca
    session.cert = (tls.cert, tls.key)
    return session


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>celery-cluster</title>
<style>
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1d2330; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  .sub { color: #667; margin-bottom: 1em; }
  table { border-collapse: collapse; min-width: 40em; }
  th, td { text-align: left; padding: .3em .8em; border-bottom: 1px solid #e3e6ea; white-space: nowrap; }
  th { font-weight: 600; color: #445; background: #f5f6f8; }
  tr.leader td { background: #eaf7ee; font-weight: 600; }
  tr.down td { color: #b3261e; }
  .badge { display: inline-block; padding: 0 .5em; border-radius: .7em; font-size: .85em; }
  .b-leader { background: #1e8e3e; color: #fff; }
  .b-follower { background: #dfe3e8; }
  .b-candidate, .b-pre_candidate { background: #f9ab00; }
  .b-down { background: #b3261e; color: #fff; }
  #banner { padding: .5em .8em; border-radius: .3em; display: inline-block; }
  .ok { background: #eaf7ee; } .bad { background: #fce8e6; }
  code { font-size: .95em; }
</style>
</head>
<body>
<h1>celery-cluster</h1>
<div class="sub">served by <code id="served-by">?</code> &middot; refreshed <span id="refreshed">never</span></div>
<div id="banner" data-leaders="">loading&hellip;</div>
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>role</th><th>term</th><th>lease left</th>
<th>last heard (by leader)</th><th>heartbeat RTT p50 / p99</th><th>beat</th><th>worker</th></tr></thead>
<tbody></tbody></table>
<h2>Beat</h2>
<div id="beat">&ndash;</div>
<table id="entries"><thead><tr><th>entry</th><th>task</th><th>schedule</th><th>last run</th><th>next run</th>
<th>runs</th><th>fired in term</th></tr></thead><tbody></tbody></table>
<h2>Recent transitions</h2>
<table id="transitions"><thead><tr><th>time</th><th>node</th><th>event</th><th>term</th><th>leader</th>
<th>reason</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
// overview sits beside this page: /cluster/overview from /cluster/ and from /cluster alike.
const OVERVIEW = location.pathname.endsWith("/") ? "overview"
  : location.pathname.split("/").pop() + "/overview";
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function row(cells, attrs) {
  const tr = el("tr", attrs);
  for (const c of cells) { const td = el("td"); if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "\\u2013" : String(c); tr.appendChild(td); }
  return tr;
}
function ms(v) { return v === null || v === undefined ? null : (v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(1) + " s"); }
function fill(id, rows) { const tb = document.querySelector("#" + id + " tbody"); tb.replaceChildren(...rows); }
function draw(o) {
  document.getElementById("served-by").textContent = o.served_by;
  document.getElementById("refreshed").textContent = new Date().toLocaleTimeString();
  const banner = document.getElementById("banner");
  banner.dataset.leaders = o.leaders.join(",");
  banner.className = o.leaders.length === 1 ? "ok" : "bad";
  banner.textContent = o.leaders.length === 1 ? "leader: " + o.leaders[0]
    : (o.leaders.length === 0 ? "no leader" : "more than one node claims leadership: " + o.leaders.join(", "));
  const leader = o.nodes.find(n => n.status && n.status.is_leader);
  const peerView = {};
  if (leader) for (const p of leader.status.nodes || []) peerView[p.address] = p;
  fill("nodes", o.nodes.map(n => {
    const s = n.status;
    if (!s) return row([n.address, el("span", {class: "badge b-down"}, "unreachable"), null, null, null, null, null, null],
                       {class: "down", "data-node": n.address, "data-role": "unreachable"});
    const view = peerView[n.address];
    const rtt = view && view.heartbeat_rtt && view.heartbeat_rtt.p50_ms !== null
      ? view.heartbeat_rtt.p50_ms + " / " + view.heartbeat_rtt.p99_ms + " ms" : null;
    const heard = s.is_leader ? "(leader)" : (view ? ms(view.last_contact_ms) : null);
    const beat = s.beat_enabled === undefined ? null : (s.beat_running ? "running" : (s.beat_state || "stopped"));
    return row([n.address, el("span", {class: "badge b-" + s.state}, s.state), s.term,
                s.is_leader ? ms(s.lease_remaining_ms) : null, heard, rtt, beat, s.worker || null],
               {class: s.is_leader ? "leader" : "", "data-node": n.address, "data-role": s.is_leader ? "leader" : s.state});
  }));
  const beatNode = o.nodes.find(n => n.status && n.status.beat_running);
  const beatDiv = document.getElementById("beat");
  beatDiv.dataset.runsOn = beatNode ? beatNode.address : "";
  const total = beatNode ? beatNode.status.beat_entries_total : 0;
  beatDiv.textContent = beatNode ? "beat runs on " + beatNode.address + " (" + (beatNode.status.worker || "") + "), " +
    total + " entr" + (total === 1 ? "y" : "ies") + (total > beatNode.status.beat_entries.length ? ", soonest " + beatNode.status.beat_entries.length + " shown" : "")
    : "no node runs beat" + (o.nodes.some(n => n.status && n.status.beat_enabled !== undefined) ? "" : " (standalone nodes have none)");
  fill("entries", beatNode ? beatNode.status.beat_entries.map(e => row([e.name, e.task, e.schedule,
    e.last_run_at, e.next_run_at, e.total_run_count, e.term], {"data-entry": e.name})) : []);
  const trans = [];
  for (const n of o.nodes) for (const t of (n.status && n.status.recent_transitions) || []) trans.push(Object.assign({node: n.address}, t));
  trans.sort((a, b) => a.ts < b.ts ? 1 : -1);
  fill("transitions", trans.slice(0, 30).map(t => row([t.ts, t.node, t.event, t.term, t.leader_id, t.reason])));
}
async function refresh() {
  try {
    const resp = await fetch(OVERVIEW, {cache: "no-store"});
    if (resp.ok) draw(await resp.json());
    else document.getElementById("banner").textContent = "overview: HTTP " + resp.status;
  } catch (err) {
    const b = document.getElementById("banner");
    b.className = "bad"; b.textContent = "cannot reach this node: " + err;
  }
  setTimeout(refresh, 1000);
}
refresh();
</script>
</body>
</html>
"""
