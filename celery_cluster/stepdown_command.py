"""``celery-cluster stepdown``: a planned handover from the shell, signed when there is a secret.

    celery-cluster stepdown --node 10.0.0.1:8899 [--to 10.0.0.2:8899] [--secret-file F] [--if-leader]
                            [--tls-cert C --tls-key K --tls-ca CA]

``--node`` is any member: if it does not lead, the request goes to the leader it names -
unless ``--if-leader``, which hands over only if ``--node`` itself leads (what a pod's
preStop hook wants: a follower going away must not move leadership).
Exit 0 once leadership was handed over, 1 if it could not be (no leader known, the target
unreachable, refused), 2 for bad arguments.
"""

from __future__ import annotations

import json
from typing import Any

import click
import requests

from .auth import Signer, load_secret
from .config import parse_address
from .errors import ClusterError
from .tls import TLSConfig

PATH = "/cluster/stepdown"


class StepdownFailed(click.ClickException):
    exit_code = 1

    def format_message(self) -> str:
        return self.message


def stepdown(node: str, to: str | None, signer: Signer | None, timeout: float = 5.0,
             tls: TLSConfig | None = None, if_leader: bool = False) -> dict[str, Any] | None:
    """Ask the leader (found through ``node``) to hand over; returns its answer. With
    ``if_leader``, only if ``node`` itself leads (else None, and nothing is asked)."""
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not see cluster traffic
    scheme = "http"
    if tls is not None:
        scheme, session.verify, session.cert = "https", tls.ca, (tls.cert, tls.key)

    def _url(address: str, path: str) -> str:
        return f"{scheme}://{address}{path}"

    try:
        status = session.get(_url(node, "/cluster/status"), timeout=timeout).json()
    except (requests.RequestException, ValueError) as exc:
        raise StepdownFailed(f"celery-cluster: cannot read the status of {node}: {exc}") from None
    if if_leader and not status.get("is_leader"):
        return None
    leader = node if status.get("is_leader") else status.get("leader_id")
    if not leader:
        raise StepdownFailed(f"celery-cluster: {node} knows no leader right now (state {status.get('state')}, "
                             f"term {status.get('term')}); try again in a moment")
    body = json.dumps({"to": to}).encode() if to else b""
    headers = {"Content-Type": "application/json"}
    if signer is not None:
        headers.update(signer.sign("POST", PATH, node, body))
    try:
        resp = session.post(_url(leader, PATH), data=body, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise StepdownFailed(f"celery-cluster: cannot reach the leader {leader}: {exc}") from None
    try:
        answer: dict[str, Any] = resp.json()
    except ValueError:
        answer = {"error": resp.text[:200]}
    if resp.status_code != 200:
        hint = " (give the cluster's secret: --secret-file)" if resp.status_code == 401 else ""
        raise StepdownFailed(f"celery-cluster: {leader} refused the stepdown: HTTP {resp.status_code} "
                             f"{answer.get('error')}{hint}")
    return answer


@click.command(name="stepdown")
@click.option("--node", required=True, help="HOST:PORT of any member (the request goes to the leader).")
@click.option("--to", default=None, help="HOST:PORT of the member to hand over to (default: the best one).")
@click.option("--secret-file", default=None, help="File holding the shared HMAC secret (or CELERY_CLUSTER_SECRET).")
@click.option("--if-leader", is_flag=True,
              help="Only if --node itself leads; otherwise do nothing and exit 0 (a preStop hook).")
@click.option("--tls-cert", default=None, help="PEM client certificate (when the members use TLS).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-ca", default=None, help="PEM certificate of the cluster's CA.")
@click.option("--timeout", default=5.0, show_default=True, type=float, help="Seconds per request.")
def stepdown_command(node: str, to: str | None, secret_file: str | None, if_leader: bool, tls_cert: str | None,
                     tls_key: str | None, tls_ca: str | None, timeout: float) -> None:
    """Hand leadership over, as SIGTERM to the leader would, without stopping it."""
    try:
        node = parse_address(node)
        to = parse_address(to) if to else None
        secret = load_secret(secret_file=secret_file)
        tls = TLSConfig.from_options(tls_cert, tls_key, tls_ca)
    except ClusterError as exc:
        raise click.UsageError(str(exc)) from None
    answer = stepdown(node, to, Signer(secret) if secret else None, timeout, tls, if_leader)
    if answer is None:
        click.echo(f"{node} does not lead: nothing to hand over")
        return
    click.echo(f"leadership handed over from {answer.get('from')} to {answer.get('transferred_to')}")
