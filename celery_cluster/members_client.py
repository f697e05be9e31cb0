"""Asking the leader to change the members: ``POST /cluster/members``, from the shell or a
joining node.

Any member can be asked; one that does not lead answers 409 with the leader's address,
and the request follows it (a few hops at most: leadership can move meanwhile). The
change is answered once a majority of the new configuration holds it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import requests

from .auth import Signer
from .errors import MembershipError
from .tls import TLSConfig

PATH = "/cluster/members"
#: Leader redirects followed before giving up (leadership moving under our feet).
MAX_HOPS = 3


def session_for(tls: TLSConfig | None) -> tuple[requests.Session, str]:
    """A session for cluster routes (no environment proxy; the cluster's CA and our certificate
    with TLS) and the URL scheme to use with it."""
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not see cluster traffic
    if tls is None:
        return session, "http"
    session.verify, session.cert = tls.ca, (tls.cert, tls.key)
    return session, "https"


def change_members(nodes: Iterable[str], op: str, address: str, *, signer: Signer | None = None,
                   tls: TLSConfig | None = None, timeout: float = 40.0, sender: str | None = None) -> dict[str, Any]:
    """``op`` (``add`` or ``remove``) ``address``, asked of the first of ``nodes`` that answers
    and then of the leader it names. Returns the leader's answer (``members``,
    ``config_version``); raises :class:`MembershipError` with the reason otherwise."""
    if op not in ("add", "remove"):
        raise ValueError(f"op must be add or remove, not {op!r}")
    session, scheme = session_for(tls)
    body = json.dumps({op: address}).encode()
    problems: list[str] = []
    with session:
        for first in nodes:
            target, hops = first, 0
            while True:
                headers = {"Content-Type": "application/json"}
                if signer is not None:
                    headers.update(signer.sign("POST", PATH, sender or target, body))
                try:
                    resp = session.post(f"{scheme}://{target}{PATH}", data=body, headers=headers, timeout=timeout)
                except requests.RequestException as exc:
                    problems.append(f"{target}: {type(exc).__name__}")
                    break
                try:
                    answer: dict[str, Any] = resp.json()
                except ValueError:
                    answer = {"error": resp.text[:200]}
                if resp.status_code == 200:
                    return answer
                leader = answer.get("leader")
                if resp.status_code == 409 and "not the leader" in str(answer.get("error")):
                    if leader and leader != target and hops < MAX_HOPS:
                        target, hops = leader, hops + 1
                        continue
                    problems.append(f"{target}: no leader known right now")
                    break
                hint = " (give the cluster's secret: --secret-file)" if resp.status_code == 401 else ""
                raise MembershipError(f"{target} refused to {op} {address}: {answer.get('error')}{hint}")
    raise MembershipError(f"could not reach a leader to {op} {address}: " + "; ".join(problems or ["no node given"]))


__all__ = ["change_members", "PATH"]
