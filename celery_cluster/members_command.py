"""``celery-cluster members``: show or change the cluster's members from the shell.

    celery-cluster members --node 10.0.0.1:8899                      # list them
    celery-cluster members --node 10.0.0.1:8899 add 10.0.0.4:8899     # started with --join
    celery-cluster members --node 10.0.0.1:8899 remove 10.0.0.3:8899

``--node`` is any member: the change goes to the leader it names. One server at a time;
the answer comes once a majority of the new configuration holds it. Exit 0 on success,
1 if the change was refused (the reason in one line; nothing changed), 2 for bad arguments.
"""

from __future__ import annotations

from typing import Any

import click
import requests

from . import members_client
from .auth import Signer, load_secret
from .config import parse_address
from .errors import ClusterError, MembershipError
from .members_client import change_members
from .tls import TLSConfig


class MembersFailed(click.ClickException):
    exit_code = 1

    def format_message(self) -> str:
        return self.message


def read_members(node: str, tls: TLSConfig | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """``node``'s view: its members, configuration version and leader."""
    session, scheme = members_client.session_for(tls)
    with session:
        try:
            status: dict[str, Any] = session.get(f"{scheme}://{node}/cluster/status", timeout=timeout).json()
        except (requests.RequestException, ValueError) as exc:
            raise MembersFailed(f"celery-cluster: cannot read the status of {node}: {exc}") from None
    return status


@click.command(name="members")
@click.option("--node", required=True, help="HOST:PORT of any member (changes go to the leader).")
@click.argument("action", type=click.Choice(["list", "add", "remove"]), default="list")
@click.argument("address", required=False)
@click.option("--secret-file", default=None, help="File holding the shared HMAC secret (or CELERY_CLUSTER_SECRET).")
@click.option("--tls-cert", default=None, help="PEM client certificate (when the members use TLS).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-ca", default=None, help="PEM certificate of the cluster's CA.")
@click.option("--timeout", default=40.0, show_default=True, type=float,
              help="Seconds to wait for the change to be committed.")
def members_command(node: str, action: str, address: str | None, secret_file: str | None, tls_cert: str | None,
                    tls_key: str | None, tls_ca: str | None, timeout: float) -> None:
    """List the members, or add/remove one (one server at a time, through the leader)."""
    try:
        node = parse_address(node)
        if action != "list" and not address:
            raise click.UsageError(f"{action} needs the HOST:PORT of the member")
        address = parse_address(address) if address else None
        secret = load_secret(secret_file=secret_file)
        tls = TLSConfig.from_options(tls_cert, tls_key, tls_ca)
    except ClusterError as exc:
        raise click.UsageError(str(exc)) from None
    if action == "list":
        st = read_members(node, tls)
        click.echo(f"members (version {'.'.join(map(str, st.get('config_version', [])))}, leader "
                   f"{st.get('leader_id') or 'not known'}):")
        for m in st.get("members", []):
            click.echo(f"  {m}")
        return
    assert address is not None
    try:
        answer = change_members([node], action, address, signer=Signer(secret) if secret else None, tls=tls,
                                timeout=timeout)
    except MembershipError as exc:
        raise MembersFailed(f"celery-cluster: {exc}") from None
    verb = "added" if action == "add" else "removed"
    click.echo(f"{verb} {address}; members are now {', '.join(answer['members'])} "
               f"(version {'.'.join(map(str, answer['config_version']))})")
