"""The JSON-lines control protocol every hybridft service speaks on its control socket.

Why one protocol: the daemon drives the comparator and the disk server with the same verbs-and-
arguments shape, and the operator CLI talks to all three the same way.  A request is one line
``{"verb": "seal", "args": {...}}``; the reply is one line, either ``{"ok": true, "result": {...}}``
or ``{"ok": false, "error": "human readable", "code": "short-code"}``.  A handler that refuses a
request raises :class:`ControlError`; the service's state must then be unchanged (the contract of
every verb).  Malformed lines get an ``ok: false`` reply and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from hybridft_common.endpoints import Endpoint, open_connection, parse_endpoint, start_server
from hybridft_common.errors import HybridftError

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_LINE = 1 << 20


class ControlError(HybridftError):
    """A refused control request, or a failed call: ``code`` is stable for scripts, ``message`` is for
    people.  Handlers may raise it or any other :class:`HybridftError` (the cores' own refusals)."""


def encode_request(verb: str, args: dict[str, Any] | None = None) -> bytes:
    return (json.dumps({"verb": verb, "args": args or {}}, separators=(",", ":")) + "\n").encode()


def decode_reply(line: bytes) -> dict[str, Any]:
    """Return the result of a reply line or raise :class:`ControlError` for an ``ok: false`` reply."""
    if not line:
        raise ControlError("control connection closed without a reply", "closed")
    try:
        reply = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ControlError(f"unparsable reply from service: {exc}", "protocol") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"malformed reply from service: {line[:200]!r}", "protocol")
    if reply["ok"]:
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {"value": result}
    raise ControlError(str(reply.get("error", "unknown error")), str(reply.get("code", "error")))


async def _handle_line(line: bytes, dispatch: Dispatch) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"ok": False, "error": f"malformed request: {exc}", "code": "bad-request"}
    if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
        return {"ok": False, "error": "request must be an object with a string 'verb'", "code": "bad-request"}
    args = request.get("args", {})
    if not isinstance(args, dict):
        return {"ok": False, "error": "'args' must be an object", "code": "bad-request"}
    try:
        result = await dispatch(request["verb"], args)
    except HybridftError as exc:
        return {"ok": False, "error": exc.message, "code": exc.code}
    return {"ok": True, "result": result}


async def serve_control(endpoint: Endpoint | str, dispatch: Dispatch) -> asyncio.Server:
    """Serve the control protocol on ``endpoint``; each connection handles requests in order."""
    if isinstance(endpoint, str):
        endpoint = parse_endpoint(endpoint)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok":false,"error":"request line too long","code":"bad-request"}\n')
                    break
                if not line:
                    break
                reply = await _handle_line(line, dispatch)
                writer.write((json.dumps(reply, separators=(",", ":")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await start_server(endpoint, on_connect, limit=MAX_LINE)


class AsyncControlClient:
    """A persistent asyncio connection to a control socket (the daemon's hot path uses this)."""

    def __init__(self, endpoint: Endpoint | str) -> None:
        self.endpoint = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        self._reader, self._writer = await open_connection(self.endpoint, limit=MAX_LINE)

    async def call(self, verb: str, **args: Any) -> dict[str, Any]:
        async with self._lock:
            if self._writer is None:
                await self.connect()
            assert self._reader is not None and self._writer is not None
            self._writer.write(encode_request(verb, args))
            await self._writer.drain()
            return decode_reply(await self._reader.readline())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None


def call(endpoint: Endpoint | str, verb: str, io_timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
    """One blocking request (for CLIs and tests). Raises :class:`ControlError` or ``OSError``.

    ``io_timeout`` bounds the socket wait; every other keyword is a verb argument (so a verb may
    itself take ``timeout``, as the comparator's ``next-request`` long-poll does).
    """
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    sock, target = ep.new_socket()
    with sock:
        sock.settimeout(io_timeout)
        sock.connect(target)
        sock.sendall(encode_request(verb, args))
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        return decode_reply(bytes(buf))
