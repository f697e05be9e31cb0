"""Cluster settings for the Celery worker: CLI option > environment > Celery setting.

Every option has three spellings: ``--cluster-nodes`` on ``celery worker``,
``CELERY_CLUSTER_NODES`` in the environment, and the Celery setting
``cluster_nodes`` (``CELERY_CLUSTER_NODES`` in Django settings with the
``CELERY`` namespace).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from click import Option

from .config import (
    DEFAULT_ELECTION_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    format_range,
    parse_address,
    parse_nodes,
    parse_timeout_range,
)
from .errors import ConfigurationError

DEFAULT_LEADER_QUEUE = "celery_cluster.leader"

#: name -> (help text, default)
OPTIONS: dict[str, tuple[str, Any]] = {
    "nodes": ("Comma-separated HOST:PORT of every cluster member, this worker included.", None),
    "listen": ("HOST:PORT this worker serves the /cluster routes on.", None),
    "advertise": ("HOST:PORT peers reach this worker at (default: --cluster-listen).", None),
    "secret_file": ("File holding the shared HMAC secret for peer requests.", None),
    "state_dir": ("Directory for the term/vote/schedule state file.", None),
    "election_timeout": (f"Election timeout MIN-MAX seconds (default {format_range(DEFAULT_ELECTION_TIMEOUT)}).",
                         format_range(DEFAULT_ELECTION_TIMEOUT)),
    "heartbeat_interval": (f"Leader heartbeat interval in seconds (default {DEFAULT_HEARTBEAT_INTERVAL:g}).",
                           str(DEFAULT_HEARTBEAT_INTERVAL)),
    "leader_queue": (f"Queue only the leader consumes (default {DEFAULT_LEADER_QUEUE}).", DEFAULT_LEADER_QUEUE),
    "beat": ("Run the beat schedule on the leader: yes/no (default yes).", "yes"),
}


def worker_options() -> list[Option]:
    return [Option((f"--cluster-{name.replace('_', '-')}",), default=None, help=help_)
            for name, (help_, _) in OPTIONS.items()]


@dataclass(frozen=True)
class ClusterSettings:
    nodes: tuple[str, ...]
    listen: str | None
    advertise: str
    secret_file: str | None
    state_dir: str | None
    election_timeout: tuple[float, float]
    heartbeat_interval: float
    leader_queue: str
    beat: bool


def _raw(name: str, cli: Mapping[str, Any], conf: Any, env: Mapping[str, str]) -> Any:
    value = cli.get(f"cluster_{name}")
    if value is None:
        value = env.get(f"CELERY_CLUSTER_{name.upper()}")
    if value is None:
        value = conf.get(f"cluster_{name}")
    return value


_YES = ("yes", "true", "1", "on")
_NO = ("no", "false", "0", "off")


def parse_bool(name: str, value: Any, default: bool) -> bool:
    """A yes/no setting given as a bool or as text (CLI, environment, Django settings)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _YES + _NO:
        raise ConfigurationError(f"invalid {name} {value!r}: expected yes or no")
    return text in _YES


def app_flag(conf: Any, name: str, default: bool, env: Mapping[str, str] = os.environ) -> bool:
    """A yes/no cluster setting of the *app* (environment > Celery setting), for processes
    that have no ``--cluster-*`` options (``celery beat``) or must not trust one worker's."""
    value = env.get(f"CELERY_CLUSTER_{name.upper()}")
    if value is None:
        value = conf.get(f"cluster_{name}")
    return parse_bool(f"cluster_{name}", value, default)


def resolve(conf: Any, cli: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> ClusterSettings | None:
    """The effective settings, or None when no nodes are configured (the step stays off)."""
    raw = {name: _raw(name, cli, conf, env) for name in OPTIONS}
    if not raw["nodes"]:
        return None
    nodes = parse_nodes(raw["nodes"])
    listen = parse_address(raw["listen"]) if raw["listen"] else None
    advertise = parse_address(raw["advertise"]) if raw["advertise"] else listen
    if advertise is None:
        raise ConfigurationError("--cluster-nodes is set but neither --cluster-listen nor --cluster-advertise is")
    try:
        heartbeat = float(raw["heartbeat_interval"] if raw["heartbeat_interval"] is not None
                          else DEFAULT_HEARTBEAT_INTERVAL)
    except (TypeError, ValueError):
        raise ConfigurationError(f"invalid --cluster-heartbeat-interval {raw['heartbeat_interval']!r}: "
                                 "expected seconds such as 0.1") from None
    beat = parse_bool("--cluster-beat", raw["beat"], True)
    return ClusterSettings(
        nodes=nodes,
        listen=listen,
        advertise=advertise,
        secret_file=raw["secret_file"] or None,
        state_dir=raw["state_dir"] or None,
        election_timeout=parse_timeout_range(raw["election_timeout"] or OPTIONS["election_timeout"][1]),
        heartbeat_interval=heartbeat,
        leader_queue=str(raw["leader_queue"] or DEFAULT_LEADER_QUEUE),
        beat=beat,
    )
