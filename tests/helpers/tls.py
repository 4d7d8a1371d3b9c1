"""TLS credentials for tests: a pair's CA with one host directory, and a stranger's CA with another.

RSA keys take a moment to make, so a module makes them once (``pair_creds`` fixtures call
:func:`make_creds` with ``tmp_path_factory``).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from hybridft_common.certs import init_ca, issue_host
from hybridft_common.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, TlsCreds


@dataclass(frozen=True)
class Creds:
    host: Path  # the pair's host directory (QEMU tls-creds-x509 layout), for 127.0.0.1 and localhost
    stranger: Path  # a host directory of another CA: valid certificates the pair must not trust

    def client_context(self, *, with_cert: bool = True, stranger: bool = False) -> ssl.SSLContext:
        """A client context trusting the pair's CA, presenting the pair's (or the stranger's, or no)
        client certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.host / CA_CERT))
        if with_cert:
            source = self.stranger if stranger else self.host
            ctx.load_cert_chain(source / CLIENT_CERT, source / CLIENT_KEY)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return TlsCreds(self.host).server_context()


def make_creds(base: Path) -> Creds:
    init_ca(base / "ca")
    host = issue_host(base / "ca", "localhost", ("127.0.0.1",)).dir
    init_ca(base / "other-ca", name="not the pair's CA")
    stranger = issue_host(base / "other-ca", "localhost", ("127.0.0.1",)).dir
    return Creds(host, stranger)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    except BaseException:
        sock.close()
        raise
