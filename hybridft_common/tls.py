"""Mutual TLS for every ``tcp:`` channel, from a credentials directory laid out as QEMU's ``tls-creds-x509``.

Why one layout: the pair's TCP channels are spoken partly by QEMU (the migration stream, the NBD mirror,
the filter chardevs) and partly by hybridft (control sockets, the heartbeat, the NBD server, the
comparator).  QEMU's ``-object tls-creds-x509,dir=DIR`` reads::

    DIR/ca-cert.pem        the pair's CA (both ends trust only it)
    DIR/server-cert.pem    this host's certificate when it listens
    DIR/server-key.pem
    DIR/client-cert.pem    this host's certificate when it connects
    DIR/client-key.pem

so the same directory serves both (``hybridft certs issue`` writes it, see :mod:`hybridft_common.certs`).
Both ends present a certificate signed by the pair's CA and both verify the other's (``CERT_REQUIRED``
on the server side is what makes the peer *authenticated*: a client without a certificate, or with one
from another CA, fails the handshake).  Clients also check the server's name against the address they
dial, as QEMU does (so a certificate names the host's DNS name and its IP addresses).

A ``tcp:`` endpoint without credentials is refused by :func:`require_creds` with a message that says how
to make them; nothing in hybridft listens or dials over TCP in clear.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from hybridft_common.secure import ChannelError

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)

HOW_TO = (
    "make credentials with `hybridft certs init CA_DIR` and `hybridft certs issue CA_DIR --host NAME "
    "--ip ADDRESS`, then give the host's directory (CA_DIR/NAME) as tls-creds "
    "(`tcp:HOST:PORT,tls-creds=DIR`, or --tls-creds DIR)"
)


class TlsError(ChannelError):
    """Missing or unusable TLS credentials."""

    def __init__(self, message: str, code: str = "tls") -> None:
        super().__init__(message, code)


@dataclass(frozen=True, slots=True)
class TlsCreds:
    """A credentials directory (see the module docstring)."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def check(self, *names: str) -> None:
        missing = [name for name in names or FILES if not self.path(name).is_file()]
        if missing:
            raise TlsError(f"TLS credentials {self.dir} lack {', '.join(missing)}; {HOW_TO}")

    def server_context(self) -> ssl.SSLContext:
        """A server context that demands a client certificate from the pair's CA."""
        self.check(CA_CERT, SERVER_CERT, SERVER_KEY)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.path(SERVER_CERT), self.path(SERVER_KEY))
            ctx.load_verify_locations(cafile=str(self.path(CA_CERT)))
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load TLS credentials from {self.dir}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that presents this host's client certificate and verifies the server's."""
        self.check(CA_CERT, CLIENT_CERT, CLIENT_KEY)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.path(CLIENT_CERT), self.path(CLIENT_KEY))
            ctx.load_verify_locations(cafile=str(self.path(CA_CERT)))
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load TLS credentials from {self.dir}: {exc}") from None
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def require_creds(endpoint_text: str, creds: str | Path | None) -> TlsCreds:
    """The credentials of a ``tcp:`` endpoint, or a :class:`TlsError` that says how to make them."""
    if not creds:
        raise TlsError(f"{endpoint_text}: a tcp: address needs TLS credentials; {HOW_TO}", "tls-required")
    return TlsCreds(Path(creds))
