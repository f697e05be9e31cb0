"""``celery -A proj cluster status``: every worker's view of the cluster, as a table.

Registered as a ``celery`` subcommand through the ``celery.commands`` entry
point (``pyproject.toml``), which ``celery/bin/celery.py`` loads with
``click_plugins.with_plugins``. It broadcasts the remote-control inspect
command ``cluster_status`` (``celery_cluster.remote_control``) and prints one
row per answering worker::

    NODE                                 ROLE      TERM  LEADER           LAST CONTACT (ms)  BEAT  LEADER QUEUE
    celery@a (127.0.0.1:9001)            leader    3     127.0.0.1:9001   -                  yes   yes
    celery@b (127.0.0.1:9002)            follower  3     127.0.0.1:9001   12.5               no    no
    - (127.0.0.1:9003)                   no reply  -     -                4021.0             -     -
    celery@c                             off       -     -                -                  -     -

* LAST CONTACT: milliseconds since the leader last heard from that node (the
  leader's per-peer ``nodes`` list); ``-`` for the leader itself or when no
  answering worker leads that node's cluster.
* ``no reply``: a cluster member the answering workers know about but no
  worker answered for (down, or not running this app).
* ``off``: the worker runs without ``--cluster-nodes`` (it answers
  ``{"enabled": false}``); ``error``: the worker could not answer (for example
  it never imported ``celery_cluster``).

* BEAT: ``yes`` / ``no``; ``FAILING`` when beat keeps failing on that worker
  (it is restarted with back-off; the error is in the summary).

``--json`` prints the raw replies (``{worker: status}``). No reply at all within
``--timeout`` exits with status 1; a leader whose beat is not running (the
schedule has stopped although the cluster has a leader) exits with status 2;
workers answering under one node name (several started as ``celery@host``)
are all shown and the command exits with status 3.
"""

from __future__ import annotations

import json as _json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import click
from celery.bin.base import (
    COMMA_SEPARATED_LIST,
    CeleryCommand,
    CeleryOption,
    handle_preload_options,
    handle_remote_command_error,
)
from celery.exceptions import CeleryCommandException

from .config import parse_address
from .errors import ConfigurationError

INSPECT_COMMAND = "cluster_status"
EXIT_NO_REPLY = 1
EXIT_BEAT_DOWN = 2
EXIT_DUPLICATE_NAMES = 3

HEADERS = ("NODE", "ROLE", "TERM", "LEADER", "LAST CONTACT (ms)", "BEAT", "LEADER QUEUE")


def request_status(app: Any, timeout: float = 1.0, destination: list[str] | None = None) -> dict[str, Any]:
    """``{worker name: cluster_status reply}`` from every worker that answered within ``timeout``.

    Workers that answer under the same node name (several started as ``celery@host``)
    are all kept, as ``name#2``, ``name#3``...: Celery's own inspect would keep one.
    """
    replies = app.control.broadcast(INSPECT_COMMAND, reply=True, timeout=timeout, destination=destination)
    out: dict[str, Any] = {}
    for item in replies or ():
        for name, reply in item.items():
            key, n = name, 1
            while key in out:
                n += 1
                key = f"{name}{DUPLICATE_MARK}{n}"
            out[key] = reply
    return out


DUPLICATE_MARK = "#"


def duplicate_names(replies: Mapping[str, Any]) -> dict[str, int]:
    """Node name -> how many workers answered under it, for names more than one used."""
    counts: dict[str, int] = {}
    for key in replies:
        name = key.split(DUPLICATE_MARK, 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return {name: n for name, n in counts.items() if n > 1}


def _fmt_ms(value: Any) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return str(value)


def _yes_no(value: Any) -> str:
    return "yes" if value else "no"


def _beat(reply: Mapping[str, Any]) -> str:
    if str(reply.get("beat_state") or "").startswith("failing"):
        return "FAILING"
    return _yes_no(reply.get("beat_running"))


def beat_problems(replies: Mapping[str, Any]) -> list[str]:
    """"<worker> (<address>): <what is wrong>" for every leader whose beat is not running."""
    problems = []
    for worker, reply in sorted(replies.items()):
        if (isinstance(reply, dict) and reply.get("enabled") and reply.get("is_leader")
                and reply.get("beat_enabled", True) and not reply.get("beat_running")):
            state = reply.get("beat_state") or "not running"
            if reply.get("beat_restarts"):
                state += f", {reply['beat_restarts']} restarts"
            problems.append(f"{worker} ({reply.get('id')}): beat {state}")
    return problems


def _leader_views(replies: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Cluster address -> the status reported by the worker that leads with that address."""
    views: dict[str, dict[str, Any]] = {}
    for reply in replies.values():
        if isinstance(reply, dict) and reply.get("enabled") and reply.get("is_leader") and reply.get("id"):
            views[str(reply["id"])] = reply
    return views


def _contact_from_leader(leaders: Mapping[str, dict[str, Any]], address: str, leader_id: Any) -> Any:
    """ms since the leader (``leader_id``, or any answering leader that lists ``address``) heard from it."""
    candidates: Iterable[dict[str, Any]]
    if leader_id is not None and str(leader_id) in leaders:
        candidates = [leaders[str(leader_id)]]
    else:
        candidates = leaders.values()
    for leader in candidates:
        for peer in leader.get("nodes") or ():
            if isinstance(peer, dict) and peer.get("address") == address:
                return peer.get("last_contact_ms")
    return None


def build_rows(replies: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The table rows (without the header) for the replies of ``request_status``."""
    leaders = _leader_views(replies)
    answered: set[str] = set()
    known: set[str] = set()
    cluster_rows: list[tuple[tuple[Any, ...], tuple[str, ...]]] = []
    other_rows: list[tuple[tuple[Any, ...], tuple[str, ...]]] = []
    for worker, reply in replies.items():
        if not isinstance(reply, dict) or "error" in reply or "enabled" not in reply:
            other_rows.append(((1, worker), (worker, "error", "-", "-", "-", "-", "-")))
            continue
        if not reply.get("enabled"):
            other_rows.append(((0, worker), (worker, "off", "-", "-", "-", "-", "-")))
            continue
        address = str(reply.get("id") or "?")
        answered.add(address)
        known.update(str(p.get("address")) for p in reply.get("nodes") or () if isinstance(p, dict))
        role = str(reply.get("state") or "?")
        if role == "leader" and not reply.get("is_leader"):
            role = "leader (no lease)"
        if reply.get("is_leader"):
            contact = None  # the leader itself
        else:
            contact = _contact_from_leader(leaders, address, reply.get("leader_id"))
        cluster_rows.append(((address, worker), (
            f"{worker} ({address})",
            role,
            str(reply.get("term", "-")),
            str(reply.get("leader_id") or "-"),
            _fmt_ms(contact),
            _beat(reply),
            _yes_no(reply.get("leader_queue_consumed")),
        )))
    for address in sorted(known - answered):
        contact = _contact_from_leader(leaders, address, None)
        cluster_rows.append(((address, ""), (f"- ({address})", "no reply", "-", "-", _fmt_ms(contact), "-", "-")))
    cluster_rows.sort(key=lambda r: r[0])
    other_rows.sort(key=lambda r: r[0])
    return [row for _, row in cluster_rows] + [row for _, row in other_rows]


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    lines = []
    for row in (HEADERS, *rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def summary(replies: Mapping[str, Any]) -> str:
    leaders = _leader_views(replies)
    n = len(replies)
    head = f"{n} worker{'s' if n != 1 else ''} replied"
    if not leaders:
        enabled = any(isinstance(r, dict) and r.get("enabled") for r in replies.values())
        return head + ("; no leader among them" if enabled else "; leader election is off on all of them")
    names = {str(r.get("id")): w for w, r in replies.items() if isinstance(r, dict) and r.get("id")}
    parts = [f"{names.get(addr, '?')} ({addr}), term {view.get('term')}" for addr, view in sorted(leaders.items())]
    text = f"{head}; leader: " + "; ".join(parts)
    for view in leaders.values():
        if view.get("members"):
            version = ".".join(str(n) for n in view.get("config_version") or ())
            text += f"\nmembers (version {version}): " + ", ".join(view["members"])
            if view.get("learners"):
                text += " (being added: " + ", ".join(view["learners"]) + ")"
    problems = beat_problems(replies)
    if problems:
        text += "\nWARNING: leader has no running beat (the schedule is not being sent): " + "; ".join(problems)
    for name, n in sorted(duplicate_names(replies).items()):
        text += (f"\nWARNING: {n} workers answered as {name}: give each worker its own name "
                 "(celery worker -n w1@%h, -n w2@%h, ...), or their replies hide each other")
    refusals = refusal_problems(replies)
    if refusals:
        text += "\nWARNING: peers refuse requests: " + "; ".join(refusals)
    return text


def refusal_problems(replies: Mapping[str, Any]) -> list[str]:
    """"<peer> refuses <worker>: HTTP 401 ..." for every refusal a worker saw lately."""
    out = []
    for worker, reply in sorted(replies.items()):
        if not isinstance(reply, dict):
            continue
        for peer in reply.get("nodes") or ():
            refused = isinstance(peer, dict) and peer.get("refuses_us")
            if refused:
                hint = " - check that every node has the same secret" if refused.get("status") == 401 else ""
                out.append(f"{peer.get('address')} refuses {worker} ({reply.get('id')}): HTTP {refused.get('status')} "
                           f"{refused.get('error')}{hint}")
    return out


@click.group(name="cluster")
@click.pass_context
def cluster(ctx: click.Context, **kwargs: Any) -> None:
    """celery-cluster: leader election among the workers (see `cluster status`)."""


@cluster.command(name="status", cls=CeleryCommand)
@click.option("-t", "--timeout", cls=CeleryOption, type=float, default=1.0, show_default=True,
              help_group="Remote Control Options", help="Seconds to wait for the workers' replies.")
@click.option("-d", "--destination", cls=CeleryOption, type=COMMA_SEPARATED_LIST,
              help_group="Remote Control Options", help="Comma separated list of worker names to ask.")
@click.option("-j", "--json", "as_json", cls=CeleryOption, is_flag=True,
              help_group="Remote Control Options", help="Print the raw replies as JSON.")
@click.pass_context
@handle_preload_options
def status(ctx: click.Context, timeout: float, destination: list[str] | None, as_json: bool,
           **kwargs: Any) -> None:
    """Ask every worker for its cluster status (inspect `cluster_status`) and print a table."""
    app = ctx.obj.app
    try:
        replies = request_status(app, timeout=timeout, destination=destination)
    except Exception as exc:  # noqa: BLE001 - broker errors become a clean CLI error
        handle_remote_command_error("cluster status", exc)
    if not replies:
        raise CeleryCommandException(
            message=f"No workers replied to `{INSPECT_COMMAND}` within {timeout:g}s "
                    "(are workers of this app running, on this broker?)",
            exit_code=EXIT_NO_REPLY,
        )
    if as_json:
        ctx.obj.echo(_json.dumps(replies, indent=2, sort_keys=True, default=str))
    else:
        ctx.obj.echo(format_table(build_rows(replies)))
        if not ctx.obj.quiet:
            ctx.obj.echo("\n" + summary(replies))
    if beat_problems(replies):
        ctx.exit(EXIT_BEAT_DOWN)
    if duplicate_names(replies):
        ctx.exit(EXIT_DUPLICATE_NAMES)


@cluster.command(name="stepdown", cls=CeleryCommand)
@click.option("--to", cls=CeleryOption, default=None, help_group="Stepdown Options",
              help="HOST:PORT of the member to hand over to (default: the best reachable one).")
@click.option("-t", "--timeout", cls=CeleryOption, type=float, default=5.0, show_default=True,
              help_group="Remote Control Options", help="Seconds to wait for the leader's answer.")
@click.pass_context
@handle_preload_options
def stepdown(ctx: click.Context, to: str | None, timeout: float, **kwargs: Any) -> None:
    """Make the leader hand leadership over (a planned handover, as SIGTERM would, without stopping it)."""
    app = ctx.obj.app
    try:
        replies = app.control.broadcast("cluster_stepdown", arguments={"to": to}, reply=True, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - broker errors become a clean CLI error
        handle_remote_command_error("cluster stepdown", exc)
    leaders = [(worker, r) for item in replies or () for worker, r in item.items()
               if isinstance(r, dict) and r.get("leader")]
    if not leaders:
        raise CeleryCommandException(
            message=f"No worker answered as the cluster leader within {timeout:g}s (is there a leader? "
                    "see `celery -A proj cluster status`)", exit_code=EXIT_NO_REPLY)
    failed = False
    for worker, r in leaders:
        if r.get("error"):
            ctx.obj.error(f"{worker} ({r.get('id')}) could not hand over: {r['error']}")
            failed = True
        else:
            ctx.obj.echo(f"{worker} ({r.get('id')}) handed leadership over to {r.get('transferred_to')}")
    if failed:
        ctx.exit(EXIT_NO_REPLY)


def _change_members(ctx: click.Context, op: str, address: str, timeout: float) -> None:
    app = ctx.obj.app
    what = f"cluster {op}"
    try:
        address = parse_address(address)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        replies = app.control.broadcast("cluster_members", arguments={"op": op, "address": address}, reply=True,
                                        timeout=1.0)
    except Exception as exc:  # noqa: BLE001 - broker errors become a clean CLI error
        handle_remote_command_error(what, exc)
    leaders = [(worker, r) for item in replies or () for worker, r in item.items()
               if isinstance(r, dict) and r.get("leader")]
    if not leaders:
        raise CeleryCommandException(
            message="No worker answered as the cluster leader within 1s (is there a leader? "
                    "see `celery -A proj cluster status`)", exit_code=EXIT_NO_REPLY)
    worker, r = leaders[0]
    if r.get("error"):
        raise CeleryCommandException(message=f"{worker} ({r.get('id')}) refused to {op} {address}: {r['error']}",
                                     exit_code=EXIT_NO_REPLY)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = request_status(app, timeout=1.0, destination=[worker]).get(worker) or {}
        except Exception as exc:  # noqa: BLE001
            handle_remote_command_error(what, exc)
        change = reply.get("member_change") or {}
        if change.get("address") != address:
            pass  # not started yet (the thread runs on the leader)
        elif change.get("state") == "failed":
            raise CeleryCommandException(message=f"{worker} ({r.get('id')}) could not {op} {address}: "
                                                 f"{change.get('error')}", exit_code=EXIT_NO_REPLY)
        elif change.get("state") == "done":
            ctx.obj.echo(f"{'added' if op == 'add' else 'removed'} {change['address']}; members are now "
                         + ", ".join(change.get("members") or []))
            return
        time.sleep(0.2)  # polling the leader's status through the broker
    raise CeleryCommandException(message=f"the {op} of {address} did not finish within {timeout:g}s; "
                                         "see `celery -A proj cluster status`", exit_code=EXIT_NO_REPLY)


def _members_command(op: str, doc: str) -> click.Command:
    """``celery cluster add|remove HOST:PORT``: the same command, one operation each."""

    @click.argument("address")
    @click.option("-t", "--timeout", cls=CeleryOption, type=float, default=40.0, show_default=True,
                  help_group="Remote Control Options", help="Seconds to wait for the change to be committed.")
    @click.pass_context
    @handle_preload_options
    def command(ctx: click.Context, address: str, timeout: float, **kwargs: Any) -> None:
        _change_members(ctx, op, address, timeout)

    command.__doc__ = doc
    return cluster.command(name=op, cls=CeleryCommand)(command)


add = _members_command("add", "Add the worker at HOST:PORT (started with --cluster-join) as a member.")
remove = _members_command("remove", "Remove the member at HOST:PORT (before scaling a worker away for good).")


__all__ = ["cluster", "status", "stepdown", "add", "remove", "request_status", "build_rows", "format_table",
           "summary", "beat_problems", "duplicate_names", "refusal_problems"]
