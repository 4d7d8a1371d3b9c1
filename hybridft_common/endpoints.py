"""Endpoint addresses shared by every hybridft service: ``unix:PATH`` or ``tcp:HOST:PORT[,tls-creds=DIR]``.

One syntax for all listen/connect options (NBD, control sockets, comparator inputs) so operators
learn it once.  Parsing errors are ``ValueError`` with the offending text, which the CLIs turn
into a clear usage error.

Safe by default (see :mod:`hybridft_common.secure` and :mod:`hybridft_common.tls`): a unix listener is a
0600 socket and accepts only peers of our uid or root (``SO_PEERCRED``); a ``tcp:`` listener or connection
is always mutual TLS with the credentials directory the endpoint carries (``,tls-creds=DIR``, the layout
of QEMU's ``tls-creds-x509``), and one without credentials is refused with a message saying how to make
them.  The credentials travel inside the address text so that ``pair.json`` and every command line that
hands an address to another process hand over its credentials with it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hybridft_common.secure import ChannelError, check_peer, unix_listener
from hybridft_common.tls import TlsCreds, require_creds

log = logging.getLogger("hybridft.endpoints")

TLS_OPTION = "tls-creds"
HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS peer may take to finish its handshake

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed address: ``kind`` is ``"unix"`` (``path`` set) or ``"tcp"`` (``host``/``port`` set, and
    ``tls_creds`` the credentials directory its TLS uses)."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    tls_creds: str | None = None

    def creds(self) -> TlsCreds:
        """This tcp endpoint's TLS credentials; :class:`~hybridft_common.tls.TlsError` when it has none."""
        return require_creds(str(self), self.tls_creds)

    def with_creds(self, tls_creds: str | None) -> Endpoint:
        """This endpoint with ``tls_creds`` as its credentials (unix endpoints, and tcp ones that name their
        own, are returned as they are)."""
        if self.kind != "tcp" or self.tls_creds or not tls_creds:
            return self
        return Endpoint("tcp", host=self.host, port=self.port, tls_creds=str(tls_creds))

    def new_socket(self) -> tuple[socket.socket, Any]:
        """A new stream socket of the right family and the address to connect or bind it to."""
        if self.kind == "unix":
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), self.path
        family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
        return socket.socket(family, socket.SOCK_STREAM), (self.host or "", self.port or 0)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        tls = f",{TLS_OPTION}={self.tls_creds}" if self.tls_creds else ""
        return f"tcp:{host}:{self.port}{tls}"


def parse_endpoint(text: str, tls_creds: str | None = None) -> Endpoint:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT[,tls-creds=DIR]`` (``tcp:[::1]:PORT`` for IPv6).

    ``tls_creds`` (a CLI's ``--tls-creds``) is used for a tcp address that names none itself.  Whether a
    tcp address has credentials is checked where it is used (listen or connect), not here.
    """
    kind, sep, rest = text.partition(":")
    creds_here: str | None = None
    if kind == "tcp" and "," in rest:
        rest, _, options = rest.partition(",")
        for option in options.split(","):
            key, eq, value = option.partition("=")
            if key != TLS_OPTION or not eq or not value:
                raise ValueError(f"bad address {text!r}: unknown option {option!r} (only {TLS_OPTION}=DIR)")
            creds_here = value
    if not sep or not rest:
        raise ValueError(f"bad address {text!r}: expected unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return Endpoint("unix", path=rest)
    if kind == "tcp":
        if rest.startswith("["):
            host, close, tail = rest[1:].partition("]")
            if not close or not tail.startswith(":"):
                raise ValueError(f"bad address {text!r}: expected tcp:[IPV6]:PORT")
            port_text = tail[1:]
        else:
            host, sep2, port_text = rest.rpartition(":")
            if not sep2 or not host:
                raise ValueError(f"bad address {text!r}: expected tcp:HOST:PORT")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"bad address {text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"bad address {text!r}: port {port} out of range")
        return Endpoint("tcp", host=host, port=port, tls_creds=creds_here or tls_creds or None)
    raise ValueError(f"bad address {text!r}: unknown kind {kind!r} (use unix: or tcp:)")


async def start_server(endpoint: Endpoint, handler: StreamHandler, **kwargs: Any) -> asyncio.Server:
    """Listen on ``endpoint``: a 0600 unix socket whose peers must be our uid or root (a stale socket file
    left by a crash is replaced), or mutual TLS on tcp (refused without credentials)."""
    if endpoint.kind == "unix":
        assert endpoint.path is not None
        sock = unix_listener(endpoint.path)
        return await asyncio.start_unix_server(_peer_checked(handler, str(endpoint)), sock=sock, **kwargs)
    ctx = endpoint.creds().server_context()
    return await asyncio.start_server(
        handler, host=endpoint.host, port=endpoint.port, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        **kwargs,
    )  # fmt: skip


def _peer_checked(handler: StreamHandler, where: str) -> StreamHandler:
    async def checked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            check_peer(writer.get_extra_info("socket"))
        except ChannelError as exc:
            log.warning("%s: connection refused: %s", where, exc.message)
            writer.close()
            return
        await handler(reader, writer)

    return checked


async def open_connection(
    endpoint: Endpoint, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``endpoint`` (mutual TLS on tcp; refused without credentials)."""
    if endpoint.kind == "unix":
        return await asyncio.open_unix_connection(endpoint.path, **kwargs)
    ctx = endpoint.creds().client_context()
    return await asyncio.open_connection(
        endpoint.host, endpoint.port, ssl=ctx, server_hostname=endpoint.host,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT, **kwargs,
    )  # fmt: skip


def connect_blocking(endpoint: Endpoint, timeout: float | None) -> socket.socket:
    """A connected blocking socket to ``endpoint`` (TLS-wrapped on tcp), ``timeout`` on every operation."""
    ctx: ssl.SSLContext | None = endpoint.creds().client_context() if endpoint.kind == "tcp" else None
    sock, target = endpoint.new_socket()
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        if ctx is not None:
            return ctx.wrap_socket(sock, server_hostname=endpoint.host)
    except BaseException:
        sock.close()
        raise
    return sock
