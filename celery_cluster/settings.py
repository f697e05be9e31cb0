"""Cluster settings for the Celery worker: CLI option > environment > Celery setting.

Every option has three spellings: ``--cluster-nodes`` on ``celery worker``,
``CELERY_CLUSTER_NODES`` in the environment, and the Celery setting
``cluster_nodes`` (``CELERY_CLUSTER_NODES`` in Django settings with the
``CELERY`` namespace).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from click import Option

from .config import (
    DEFAULT_BROKER_GRACE,
    DEFAULT_ELECTION_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    Membership,
    Timing,
    format_range,
    parse_address,
    parse_nodes,
)
from .errors import ConfigurationError
from .tls import TLSConfig

DEFAULT_LEADER_QUEUE = "celery_cluster.leader"

#: name -> (help text, default)
OPTIONS: dict[str, tuple[str, Any]] = {
    "nodes": ("Comma-separated HOST:PORT of every cluster member, this worker included: the bootstrap list of "
              "a new cluster (once the configuration is replicated, members change with `cluster add|remove`).",
              None),
    "join": ("Comma-separated HOST:PORT of members to ask to add this worker to a running cluster (a new "
             "member: it starts with no configuration unless --cluster-nodes lists it).", None),
    "listen": ("HOST:PORT this worker serves the /cluster routes on.", None),
    "advertise": ("HOST:PORT peers reach this worker at (default: --cluster-listen).", None),
    "secret_file": ("File holding the shared HMAC secret for peer requests.", None),
    "tls_cert": ("PEM certificate of this worker for TLS between members (with --cluster-tls-key/-ca).", None),
    "tls_key": ("PEM private key of --cluster-tls-cert.", None),
    "tls_ca": ("PEM certificate of the CA that signed every member's certificate.", None),
    "state_dir": ("Directory for the term/vote/schedule state file.", None),
    "election_timeout": (f"Election timeout MIN-MAX seconds (default {format_range(DEFAULT_ELECTION_TIMEOUT)}).",
                         format_range(DEFAULT_ELECTION_TIMEOUT)),
    "heartbeat_interval": (f"Leader heartbeat interval in seconds (default {DEFAULT_HEARTBEAT_INTERVAL:g}).",
                           str(DEFAULT_HEARTBEAT_INTERVAL)),
    "broker_grace": (f"Seconds the leader's broker may be unreachable before it hands over to a worker whose "
                     f"broker works (default {DEFAULT_BROKER_GRACE:g}).", str(DEFAULT_BROKER_GRACE)),
    "broker_probe": ("Probe the broker so that a leader cut off from it hands over: yes/no (default yes).",
                     "yes"),
    "leader_queue": (f"Queue only the leader consumes (default {DEFAULT_LEADER_QUEUE}).", DEFAULT_LEADER_QUEUE),
    "beat": ("Run the beat schedule on the leader: yes/no (default yes).", "yes"),
}


def worker_options() -> list[Option]:
    return [Option((f"--cluster-{name.replace('_', '-')}",), default=None, help=help_)
            for name, (help_, _) in OPTIONS.items()]


@dataclass(frozen=True)
class ClusterSettings:
    """Everything a clustered worker was told, parsed and checked once (at the step's
    construction, so a mistake refuses the worker before anything is built)."""

    membership: Membership
    listen: str | None
    secret_file: str | None
    state_dir: str | None
    timing: Timing
    tls: TLSConfig | None
    leader_queue: str
    beat: bool
    broker_probe: bool = True
    #: Members to ask to add this worker (``--cluster-join``); empty unless it joins.
    join: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.membership.members

    @property
    def advertise(self) -> str:
        return self.membership.advertise

    @property
    def election_timeout(self) -> tuple[float, float]:
        return self.timing.election_timeout

    @property
    def heartbeat_interval(self) -> float:
        return self.timing.heartbeat_interval


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


def leader_queue(conf: Any, cli: Mapping[str, Any] | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The leader queue's name - the one resolver, for the worker (which may also have
    ``--cluster-leader-queue``) and for producers and pool children (which have only the
    environment and the app's config; the worker exports what it resolved)."""
    for value in ((cli or {}).get("cluster_leader_queue"), env.get("CELERY_CLUSTER_LEADER_QUEUE"),
                  conf.get("cluster_leader_queue")):
        if value:  # an empty value (a template that expanded to nothing) counts as unset
            return str(value)
    return DEFAULT_LEADER_QUEUE


def resolve(conf: Any, cli: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> ClusterSettings | None:
    """The effective settings, or None when no nodes are configured (the step stays off)."""
    raw = {name: _raw(name, cli, conf, env) for name in OPTIONS}
    if not raw["nodes"] and not raw["join"]:
        return None
    listen = parse_address(raw["listen"]) if raw["listen"] else None
    advertise = raw["advertise"] or listen
    if not advertise:
        given = "--cluster-nodes" if raw["nodes"] else "--cluster-join"
        raise ConfigurationError(f"{given} is set but neither --cluster-listen nor --cluster-advertise is")
    join = parse_nodes(raw["join"]) if raw["join"] else ()
    me = parse_address(advertise)
    if join and (not raw["nodes"] or me not in parse_nodes(raw["nodes"])):
        # A new member: no configuration of its own; --cluster-nodes (if any) names contacts only.
        membership = Membership((), me)
    else:
        membership = Membership.parse(raw["nodes"], advertise)
        join = ()
    heartbeat = raw["heartbeat_interval"]
    if isinstance(heartbeat, str):
        try:
            heartbeat = float(heartbeat)
        except ValueError:
            raise ConfigurationError(f"invalid --cluster-heartbeat-interval {heartbeat!r}: "
                                     "expected seconds such as 0.1") from None
    timing = Timing(DEFAULT_ELECTION_TIMEOUT if not raw["election_timeout"] else raw["election_timeout"],
                    DEFAULT_HEARTBEAT_INTERVAL if heartbeat is None else heartbeat,
                    broker_grace=DEFAULT_BROKER_GRACE if raw["broker_grace"] in (None, "") else raw["broker_grace"])
    return ClusterSettings(
        membership=membership,
        listen=listen,
        secret_file=raw["secret_file"] or None,
        state_dir=raw["state_dir"] or None,
        timing=timing,
        tls=TLSConfig.from_options(raw["tls_cert"], raw["tls_key"], raw["tls_ca"]),
        leader_queue=leader_queue(conf, cli, env),
        beat=parse_bool("--cluster-beat", raw["beat"], True),
        broker_probe=parse_bool("--cluster-broker-probe", raw["broker_probe"], True),
        join=join,
    )
