"""``celery-cluster node``: run one standalone member (the seed's example, as a tool).

    celery-cluster node --listen 127.0.0.1:8899 --nodes 127.0.0.1:8899,127.0.0.1:8898,127.0.0.1:8897
    celery-cluster node --listen 127.0.0.1:8896 --join 127.0.0.1:8899        # a new member
    celery-cluster members --node 127.0.0.1:8899 [add|remove HOST:PORT]

SIGTERM/SIGINT hand leadership over (if leading) and exit 0. Bad arguments
print one line and exit 2. A node whose state cannot be made durable (disk
full, I/O error, read-only file system) gives leadership up, leaves the
cluster and exits 3 with one line naming the file and the OS error.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import click

from . import __version__
from .cluster import Cluster
from .config import DEFAULT_ELECTION_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL, format_range
from .errors import ClusterError
from .members_command import members_command
from .stepdown_command import stepdown_command
from .tls import TLSConfig

#: Exit status of a node that fail-stopped because its state could not be saved.
EXIT_STATE_NOT_DURABLE = 3


class JsonTransitionFormatter(logging.Formatter):
    """One JSON object per line for state transitions (``ts``, ``mono``, ``node``, ``event``...)."""

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "cluster_event", None)
        if event is not None:
            return json.dumps(event, separators=(",", ":"))
        return json.dumps({"ts": self.formatTime(record), "level": record.levelname,
                           "logger": record.name, "message": record.getMessage()})


def _setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonTransitionFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


@click.group()
@click.version_option(__version__, "--version", prog_name="celery-cluster", message="%(prog)s %(version)s")
def cli() -> None:
    """celery-cluster: leader election for Celery workers."""


@cli.command()
@click.option("--listen", required=True, help="HOST:PORT to serve the /cluster routes on.")
@click.option("--nodes", default=None,
              help="Comma-separated HOST:PORT of every member, this one included: a new cluster's bootstrap list.")
@click.option("--join", default=None,
              help="Comma-separated HOST:PORT of members to ask to add this node to a running cluster.")
@click.option("--advertise", default=None, help="HOST:PORT peers reach this node at (default: --listen).")
@click.option("--election-timeout", default=format_range(DEFAULT_ELECTION_TIMEOUT), show_default=True,
              help="MIN-MAX seconds.")
@click.option("--heartbeat-interval", default=DEFAULT_HEARTBEAT_INTERVAL, type=float, show_default=True,
              help="Seconds.")
@click.option("--state-dir", default=None, help="Directory for the term/vote file (default: per-node dir).")
@click.option("--in-memory", is_flag=True, help="Keep no state on disk (gives up no-double-vote across restarts).")
@click.option("--secret-file", default=None, help="File holding the shared HMAC secret.")
@click.option("--tls-cert", default=None, help="PEM certificate of this node (TLS between members).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-ca", default=None, help="PEM certificate of the CA that signed every member's.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
def node(listen: str, nodes: str | None, join: str | None, advertise: str | None, election_timeout: str,
         heartbeat_interval: float, state_dir: str | None, in_memory: bool, secret_file: str | None,
         tls_cert: str | None, tls_key: str | None, tls_ca: str | None, log_format: str) -> None:
    """Run one cluster member until SIGTERM/SIGINT."""
    _setup_logging(log_format)
    stop = threading.Event()
    try:
        if not nodes and not join:
            raise ClusterError("give --nodes (a new cluster's members) or --join (members of a running one)")
        tls = TLSConfig.from_options(tls_cert, tls_key, tls_ca)
        cluster = Cluster(nodes or [], join=join, listen=listen, advertise=advertise, tls=tls,
                          election_timeout=election_timeout,
                          heartbeat_interval=heartbeat_interval, state_dir=state_dir,
                          secret_file=secret_file, persist=not in_memory,
                          on_failure=lambda exc: stop.set())
        cluster.start()
    except (ClusterError, OSError) as exc:
        click.echo(f"celery-cluster: error: {exc}", err=True)
        sys.exit(2)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    cluster.stop(transfer=True, timeout=1.0)
    if cluster.failure is not None:
        # Fail-stop: the node's state could not be made durable (disk full, I/O error...).
        click.echo(f"celery-cluster: error: {cluster.failure}", err=True)
        sys.exit(EXIT_STATE_NOT_DURABLE)
    sys.exit(0)


cli.add_command(stepdown_command)
cli.add_command(members_command)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="celery-cluster",
                 standalone_mode=False)
    except click.UsageError as exc:  # one line, exit 2, like other bad arguments
        click.echo(f"celery-cluster: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as exc:  # one line with its own exit status
        click.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
