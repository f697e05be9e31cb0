"""Optional TLS for the embedded server and the peer client, mutual among members.

Every member has a certificate and key signed by the cluster's CA, and the CA's
certificate. The server presents its certificate and asks for the client's: a client
certificate is verified against the CA when one is presented (one from another CA ends
the handshake), and the peer RPCs and ``stepdown`` refuse a connection that presented
none (401) - while reads (``status``, ``health``, ``metrics``, the page) are also open to
clients without a certificate: Kubernetes probes and browsers present none. The client
verifies the server's certificate against the CA *and* the address it dialled (the
certificate must name the member's host, as an IP or DNS subject alternative name).

What this protects and what it does not is in ``docs/security.md``; the shared secret
(HMAC) stays on top of TLS: TLS proves "holds a certificate of this CA", the signature
"holds the cluster's secret", and together with the timestamp it bounds replay.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

#: Seconds a connecting client has to finish the TLS handshake (in its connection's thread).
HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class TLSConfig:
    cert: str
    key: str
    ca: str

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, ca: str | None) -> TLSConfig | None:
        """None when none of the three is given; all three or a ConfigurationError."""
        given = {"cert": cert, "key": key, "ca": ca}
        if not any(given.values()):
            return None
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise ConfigurationError(
                "TLS needs a certificate, its key and the cluster's CA certificate; missing: "
                + ", ".join(f"tls {m}" for m in missing))
        for name, value in given.items():
            if not Path(str(value)).is_file():
                raise ConfigurationError(f"tls {name} {value!r} is not a readable file")
        return cls(str(cert), str(key), str(ca))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # verified if presented; RPCs then require one
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(f"cannot load the TLS certificate {self.cert} with key {self.key}: "
                                     f"{getattr(exc, 'reason', None) or exc}") from None
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(f"cannot load the TLS CA certificate {self.ca}: "
                                     f"{getattr(exc, 'reason', None) or exc}") from None


__all__ = ["TLSConfig", "HANDSHAKE_TIMEOUT"]
