"""Endpoint addresses shared by every hybridft service: ``unix:PATH`` or ``tcp:HOST:PORT``.

One syntax for all listen/connect options (NBD, control sockets, comparator inputs) so operators
learn it once.  Parsing errors are ``ValueError`` with the offending text, which the CLIs turn
into a clear usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed address: ``kind`` is ``"unix"`` (``path`` set) or ``"tcp"`` (``host``/``port`` set)."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

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
        return f"tcp:{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6)."""
    kind, sep, rest = text.partition(":")
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
        return Endpoint("tcp", host=host, port=port)
    raise ValueError(f"bad address {text!r}: unknown kind {kind!r} (use unix: or tcp:)")


async def start_server(endpoint: Endpoint, handler: StreamHandler, **kwargs: object) -> asyncio.Server:
    """Listen on ``endpoint``; a stale unix socket file left by a crash is removed first."""
    if endpoint.kind == "unix":
        assert endpoint.path is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.path)
        return await asyncio.start_unix_server(handler, path=endpoint.path, **kwargs)  # type: ignore[arg-type]
    return await asyncio.start_server(handler, host=endpoint.host, port=endpoint.port, **kwargs)  # type: ignore[arg-type]


async def open_connection(
    endpoint: Endpoint, **kwargs: object
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``endpoint``."""
    if endpoint.kind == "unix":
        return await asyncio.open_unix_connection(endpoint.path, **kwargs)  # type: ignore[arg-type]
    return await asyncio.open_connection(endpoint.host, endpoint.port, **kwargs)  # type: ignore[arg-type]
