"""The public :class:`Cluster`: a node, its HTTP client and (optionally) its server."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Blueprint

from .auth import Signer, load_secret
from .clock import lease_clock
from .config import (
    DEFAULT_ELECTION_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_CLOCK_DRIFT,
    Membership,
    Timing,
    default_state_dir,
    parse_address,
    parse_nodes,
    parse_timeout_range,
    split_host_port,
)
from .errors import ClusterError, ConfigurationError, MembershipError
from .http_client import PeerClient
from .http_server import EmbeddedServer, make_app, make_blueprint
from .members_client import change_members
from .messages import Version
from .metrics import Extras, make_registry, render
from .node import Leadership, LeaseSink, Node
from .state_file import StateFile
from .status_page import Overview, tls_session
from .tls import TLSConfig

log = logging.getLogger("celery_cluster")


class Cluster:
    """One member of a leader-election cluster.

    ``nodes`` lists every member's advertise address (``HOST:PORT``), this one
    included, or is a :class:`~celery_cluster.config.Membership` parsed already.
    Timing is ``election_timeout``/``heartbeat_interval``/``max_clock_drift``, or one
    :class:`~celery_cluster.config.Timing` as ``timing``. With ``listen`` set, :meth:`start`
    runs an embedded HTTP server
    there; otherwise mount :meth:`blueprint` in your own Flask app and pass
    ``advertise``. ``on_leader(term)`` runs when this node's lease starts,
    ``on_follower(term)`` at start and when leadership is lost; both run on a
    callback thread, and an exception in one makes the node step down.
    ``on_failure(exc)`` runs (on that thread) if the node fail-stops because its
    state could not be made durable. ``lease_sink`` receives every lease and
    its revocation synchronously (the Celery step passes the shared-memory
    state pool processes read); ``clock`` is the lease clock (tests inject one).

    State (term, vote, replicated payload) is kept in ``state_dir`` - by default
    ``$XDG_STATE_HOME/celery-cluster/<role>/<advertise>`` (``~/.local/state/...``; ``role``
    is ``node`` unless the caller says who it is, as the Celery worker does).
    ``persist=False`` keeps it in memory only and gives up the no-double-vote
    guarantee across restarts; it must be asked for and warns.
    """

    def __init__(
        self,
        nodes: Iterable[str] | str | Membership,
        *,
        listen: str | None = None,
        advertise: str | None = None,
        on_leader: Callable[[int], Any] | None = None,
        on_follower: Callable[[int], Any] | None = None,
        logger: logging.Logger | None = None,
        election_timeout: tuple[float, float] | str | None = None,
        heartbeat_interval: float | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        secret: str | bytes | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        tls: TLSConfig | None = None,
        persist: bool = True,
        max_clock_drift: float | None = None,
        timing: Timing | None = None,
        on_failure: Callable[[BaseException], Any] | None = None,
        lease_sink: LeaseSink | None = None,
        clock: Callable[[], float] = lease_clock,
        role: str = "node",
        join: Iterable[str] | str | None = None,
    ) -> None:
        self.log = logger or log
        self.listen = parse_address(listen) if listen else None
        #: Members to ask to add this node (``join=``, ``--cluster-join``): a node that ``nodes``
        #: does not list starts with no configuration and asks them; one it lists bootstraps.
        self.join = parse_nodes(join) if join else ()
        if self.join and not isinstance(nodes, Membership):
            if advertise is None and self.listen is None:
                raise ConfigurationError("give listen= (embedded server) or advertise= (your own server)")
            me = parse_address(advertise or self.listen or "")
            if not nodes or me not in parse_nodes(nodes):
                nodes = Membership((), me)
        if isinstance(nodes, Membership) and nodes.members:
            self.join = ()  # listed: a bootstrap member, nothing to ask
        if isinstance(nodes, Membership):
            membership = nodes  # parsed and checked by the caller (the worker's settings, the CLI)
            if advertise is not None and parse_address(advertise) != membership.advertise:
                raise ConfigurationError(f"advertise={advertise!r} disagrees with the membership's "
                                         f"{membership.advertise}")
        else:
            if advertise is None and self.listen is None:
                raise ConfigurationError("give listen= (embedded server) or advertise= (your own server)")
            membership = Membership.parse(nodes, advertise or self.listen or "")
        self.membership = membership
        self.advertise = membership.advertise
        if timing is None:
            timing = Timing(DEFAULT_ELECTION_TIMEOUT if election_timeout is None
                            else parse_timeout_range(election_timeout),
                            DEFAULT_HEARTBEAT_INTERVAL if heartbeat_interval is None else heartbeat_interval,
                            DEFAULT_MAX_CLOCK_DRIFT if max_clock_drift is None else max_clock_drift)
        elif (election_timeout, heartbeat_interval, max_clock_drift) != (None, None, None):
            raise ConfigurationError("give timing= or election_timeout=/heartbeat_interval=/max_clock_drift=, "
                                     "not both")
        self.timing = timing
        secret_bytes = load_secret(secret=secret, secret_file=secret_file)
        self.signer = Signer(secret_bytes) if secret_bytes else None
        self.tls = tls
        # Built (and the files loaded) now: a bad certificate is a ConfigurationError at once.
        self._tls_server = tls.server_context() if tls is not None else None
        self._tls_client = tls.client_context() if tls is not None else None
        self.state_dir: str | None = None
        state_file: StateFile | None = None
        if persist:
            self.state_dir = (os.fspath(state_dir) if state_dir is not None
                              else str(default_state_dir(self.advertise, role)))
            state_file = StateFile(self.state_dir, self.advertise)
            state_file.ensure_writable()
        else:
            if state_dir is not None:
                raise ConfigurationError("persist=False and state_dir= contradict each other; pick one")
        self.client = PeerClient(
            self.advertise,
            membership.peers,
            timeout=self.timing.rpc_timeout,
            on_response=lambda msg: self.node.receive(msg),
            signer=self.signer,
            tls=self._tls_client,
        )
        try:
            self.node = Node(self.advertise, membership.members, transport=self.client, timing=self.timing,
                             state_file=state_file, on_leader=on_leader, on_follower=on_follower,
                             on_failure=on_failure, lease_sink=lease_sink, logger=self.log, clock=clock,
                             join=bool(self.join))
            self.node.contacts.update(a for a in self.join if a != self.advertise)
        except BaseException:
            self.client.close()  # e.g. StateFileError: don't leave the per-peer sender threads behind
            raise
        self._server: EmbeddedServer | None = None
        self._bp: Blueprint | None = None
        #: Extra fields for status() and GET /cluster/status (the Celery step adds beat and queue state).
        self.status_extras: Callable[[], dict[str, Any]] | None = None
        #: Extra problems for health() and GET /cluster/health (the Celery step adds a failing beat).
        self.health_extras: Callable[[], list[str]] | None = None
        #: Extra metric families for GET /cluster/metrics (the Celery step adds beat and task metrics).
        self.metrics_extras: Extras | None = None
        self._registry = make_registry(self.node, self.client, lambda: self.metrics_extras)
        self._joiner: threading.Thread | None = None
        self._overview = Overview(self.advertise, lambda: self.node.members or self.join, self.status,
                                  session_factory=(lambda: tls_session(tls)) if tls is not None else None,
                                  scheme="https" if tls is not None else "http")

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the node (and the embedded server when ``listen`` was given)."""
        if self.node.stopped:
            raise ClusterError("this Cluster was stopped; create a new one to start again")
        if self.node.state_file is None:
            self.log.warning("[cluster] running WITHOUT persistence: after a restart this node may vote "
                             "twice in a term; pass state_dir= to keep the guarantee")
        if self.signer is None and self.listen and not _is_loopback(self.listen):
            self.log.warning("[cluster] listening on %s without a shared secret: anyone who can reach it "
                             "can disrupt elections; set a secret (CELERY_CLUSTER_SECRET / --secret-file)",
                             self.listen)
        self.bind()
        if self._server is not None:
            self._server.start()
        self.node.start()
        if self.join and not self.node.core.voter:
            self._joiner = threading.Thread(target=self._ask_to_join, name="celery-cluster-join", daemon=True)
            self._joiner.start()

    def _ask_to_join(self) -> None:
        """Until this node is a member: ask the leader (through the join seeds) to add it."""
        delay = 1.0
        while not self.node.stopped and not self.node.core.voter:
            try:
                seeds = [a for a in self.join if a != self.advertise] or list(self.join)
                answer = change_members(seeds, "add", self.advertise, signer=self.signer, tls=self.tls,
                                        sender=self.advertise)
            except MembershipError as exc:
                self.log.warning("[cluster] %s: not a member yet: %s; asking again in %.0f s", self.advertise,
                                 exc, delay)
                if self.node.wait_stopped(delay):
                    return
                delay = min(delay * 2, 5.0)
                continue
            self.log.info("[cluster] %s joined: members are %s", self.advertise, ",".join(answer.get("members", [])))
            return

    def bind(self) -> None:
        """Take the listen address now (``start()`` does it if you don't): a port in use or
        an address this host does not have is a :class:`ConfigurationError` naming it."""
        if not self.listen or self._server is not None:
            return
        host, port = split_host_port(self.listen)
        try:
            self._server = EmbeddedServer(make_app(self.blueprint()), host, port,
                                          rpc_endpoint=self.blueprint().rpc_endpoint,  # type: ignore[attr-defined]
                                          tls=self._tls_server)
        except OSError as exc:
            hint = {errno.EADDRINUSE: "another process listens there: pick another port",
                    errno.EADDRNOTAVAIL: "this host has no such address: listen on one of its own addresses "
                                         "(or 0.0.0.0) and advertise the one peers reach"}.get(
                exc.errno or 0, "check the address")
            raise ConfigurationError(f"cannot listen on {self.listen} (the listen address): "
                                     f"{exc.strerror or exc}: {hint}") from None

    def stop(self, *, transfer: bool = True, timeout: float = 1.0) -> None:
        """Hand leadership over if leading, then stop. Works whether or not start() ran."""
        self.node.stop(transfer=transfer, timeout=timeout)
        if self._server is not None:
            self._server.stop()
        self._overview.close()

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API -------------------------------------------------------------------

    def blueprint(self) -> Blueprint:
        """The ``/cluster`` routes, to mount in your own Flask app."""
        if self._bp is None:
            self._bp = make_blueprint(self.node, self.signer, status=self.status, health=self.health,
                                      metrics=self.metrics, overview=self.overview)
        return self._bp

    def is_leader(self) -> bool:
        """Lease-checked leadership: call it right before each leader-only action."""
        return self.node.is_leader()

    def leadership(self) -> Leadership | None:
        return self.node.leadership()

    def status(self) -> dict[str, Any]:
        """The node's status plus, per peer, recent heartbeat round trips (``heartbeat_rtt``)."""
        status = self.node.status()
        rtts = self.client.heartbeat_rtts()
        refusals = self.client.refusals()
        for peer in status["nodes"]:
            peer["heartbeat_rtt"] = rtts.get(peer["address"])
            peer["refuses_us"] = refusals.get(peer["address"])
        if self.status_extras is not None:
            status.update(self.status_extras())
        return status

    def health(self) -> list[str]:
        """Why this node is unhealthy (empty when healthy): it fail-stopped (its state could
        not be made durable), it knows no leader, or (Celery) it leads without a running beat.
        ``GET /cluster/health`` answers 503 with these, else 200: a Kubernetes probe."""
        problems = self.node.health()
        if self.health_extras is not None:
            problems += self.health_extras()
        return problems

    def overview(self) -> dict[str, Any]:
        """``GET /cluster/overview``: every member's status, as the status page shows it."""
        return self._overview()

    def metrics(self, accept: str | None = None) -> tuple[bytes, str]:
        """``GET /cluster/metrics``: the exposition (Prometheus text, or OpenMetrics if
        ``accept`` asks for it) and its content type."""
        return render(self._registry, accept)

    @property
    def failure(self) -> BaseException | None:
        """Why this node fail-stopped and left the cluster, if it did."""
        return self.node.failure

    @property
    def broker_healthy(self) -> bool:
        """Whether this node's broker answered its last probe (always True without a probe)."""
        return self.node.broker_healthy

    @property
    def members(self) -> tuple[str, ...]:
        """The voting members this node uses now (the replicated configuration, once there is one)."""
        return self.node.members

    def add_member(self, address: str, timeout: float = 30.0) -> tuple[str, ...]:
        """On the leader: add ``address`` (started with ``join=``); returns the new members."""
        return self.node.add_member(parse_address(address), timeout)

    def remove_member(self, address: str, timeout: float = 30.0) -> tuple[str, ...]:
        """On the leader: remove ``address`` (itself too: it then hands over); returns the members."""
        return self.node.remove_member(parse_address(address), timeout)

    def stepdown(self, to: str | None = None) -> str:
        """Transfer leadership (to ``to`` or the most up-to-date reachable peer); returns the target."""
        return self.node.transfer_leadership(parse_address(to) if to else None)

    def propose(self, payload: str) -> Version:
        return self.node.propose(payload)

    def wait_committed(self, version: Version, timeout: float) -> bool:
        return self.node.wait_committed(version, timeout)

    @property
    def payload(self) -> tuple[Version, str]:
        return self.node.payload

    @property
    def id(self) -> str:
        return self.advertise

    @property
    def port(self) -> int | None:
        return self._server.port if self._server else None


def _is_loopback(address: str) -> bool:
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
