"""Request signing with a shared secret (HMAC-SHA256).

Every peer request carries three headers:

* ``X-Cluster-Sender``: the sender's node address,
* ``X-Cluster-Timestamp``: unix wall-clock seconds, a decimal string (up to 3 decimals),
* ``X-Cluster-Signature``: hex HMAC-SHA256 over the canonical string below.

The signed bytes are ``METHOD\\npath\\ntimestamp\\nsender\\n`` followed by the raw
body. The timestamp bounds replays to the allowed clock skew; the sender is
signed so a node cannot be impersonated by merely rewriting the header.

Pure functions of their inputs (plus the injected clock): no I/O except
:func:`load_secret` reading the secret file.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from collections.abc import Callable, Mapping

from .errors import AuthenticationError, ConfigurationError

SENDER_HEADER = "X-Cluster-Sender"
TIMESTAMP_HEADER = "X-Cluster-Timestamp"
SIGNATURE_HEADER = "X-Cluster-Signature"

#: Environment variable consulted by :func:`load_secret` when nothing explicit is given.
SECRET_ENV_VAR = "CELERY_CLUSTER_SECRET"

#: Plain ASCII digits only: ``float()`` would also take "nan", "1e9", "-5" or "  7 ",
#: and ``str.isdigit`` takes non-ASCII digits; none of these are something we emit.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,3})?")


def _valid_sender(sender: str) -> bool:
    # The canonical string is newline-separated and the body follows the sender, so a
    # sender containing "\n" could shift bytes between sender and body and re-attribute
    # a genuine signature ("a" + body "x\ny" == "a\nx" + body "y"). Printable ASCII
    # excludes that, and is all an HTTP header can carry unambiguously anyway.
    return bool(sender) and sender.isascii() and sender.isprintable()


def _canonical(method: str, path: str, timestamp: str, sender: str, body: bytes) -> bytes:
    head = f"{method.upper()}\n{path}\n{timestamp}\n{sender}\n"
    return head.encode("utf-8") + body


class Signer:
    """Signs outgoing requests and verifies incoming ones with one shared secret."""

    __slots__ = ("_key", "_max_skew", "_clock")

    def __init__(
        self,
        secret: bytes | str,
        *,
        max_skew: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not key:
            # An empty key still "works" with HMAC, silently giving no protection at all.
            raise ConfigurationError("the cluster secret is empty; set a non-empty shared secret")
        if not (math.isfinite(max_skew) and max_skew > 0):
            raise ConfigurationError(f"max_skew must be a positive number of seconds, got {max_skew!r}")
        self._key = key
        self._max_skew = float(max_skew)
        self._clock = clock

    def __repr__(self) -> str:
        # Never show the key: signers end up in logs and tracebacks.
        return f"Signer(max_skew={self._max_skew:g})"

    @property
    def max_skew(self) -> float:
        return self._max_skew

    def _digest(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, sender: str, body: bytes) -> dict[str, str]:
        """Return the three signature headers for a request from ``sender``."""
        if not _valid_sender(sender):
            raise ConfigurationError(f"node address {sender!r} must be non-empty printable ASCII")
        # Millisecond precision: enough for a ±seconds window, and the exact string is signed.
        timestamp = f"{self._clock():.3f}"
        return {
            SENDER_HEADER: sender,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: self._digest(_canonical(method, path, timestamp, sender, body)),
        }

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """Return the authenticated sender, or raise :class:`AuthenticationError`.

        ``path`` must be the same string the client signed (the URL path only,
        no query); ``headers`` may be any mapping, looked up case-insensitively.
        """
        # HTTP header names are case-insensitive; a plain dict is not, werkzeug's Headers is.
        lowered = {str(k).lower(): v for k, v in headers.items()}
        sender = lowered.get(SENDER_HEADER.lower())
        timestamp = lowered.get(TIMESTAMP_HEADER.lower())
        signature = lowered.get(SIGNATURE_HEADER.lower())
        if not sender or not timestamp or not signature:
            raise AuthenticationError("missing signature headers")
        if not _TIMESTAMP_RE.fullmatch(timestamp):
            raise AuthenticationError("malformed timestamp")
        if not _valid_sender(sender):
            # No genuine signature can exist for such a sender (see _valid_sender).
            raise AuthenticationError("bad signature")
        expected = self._digest(_canonical(method, path, timestamp, sender, body))
        # Constant time, so response timing does not leak how much of a forgery matched.
        # Encoded to bytes because compare_digest rejects non-ASCII str.
        if not hmac.compare_digest(expected.encode("ascii"), signature.strip().lower().encode("utf-8", "replace")):
            raise AuthenticationError("bad signature")
        # Checked after the signature so the skew diagnosis (usually: fix NTP) only goes
        # to genuine peers; a forger learns nothing beyond "bad signature".
        if abs(self._clock() - float(timestamp)) > self._max_skew:
            raise AuthenticationError(
                f"timestamp outside the allowed ±{self._max_skew:g} s clock skew"
            )
        return sender


def load_secret(
    *,
    secret: str | bytes | None = None,
    secret_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
) -> bytes | None:
    """Find the shared secret: explicit ``secret`` > ``secret_file`` > ``$CELERY_CLUSTER_SECRET``.

    Returns None when none is configured (authentication off). Something configured
    but empty is an error rather than "off": failing open would silently disable auth.
    """
    if secret is not None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ConfigurationError("the cluster secret is empty; give a non-empty secret")
        return key
    if secret_file is not None:
        name = os.fspath(secret_file)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the cluster secret file {name!r}: {exc.strerror or exc}"
            ) from exc
        # Editors and `echo` add a trailing newline the other nodes' copies may lack.
        key = data.strip()
        if not key:
            raise ConfigurationError(f"the cluster secret file {name!r} is empty")
        return key
    value = env.get(SECRET_ENV_VAR)
    if value is None:
        return None
    if not value:
        raise ConfigurationError(
            f"{SECRET_ENV_VAR} is set but empty; give it a value or unset it"
        )
    return value.encode("utf-8")
