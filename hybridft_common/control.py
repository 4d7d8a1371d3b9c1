"""The JSON-lines control protocol every hybridft service speaks on its control socket.

Why one protocol: the daemon drives the comparator and the disk server with the same verbs-and-
arguments shape, and the operator CLI talks to all three the same way.  A request is one line
``{"verb": "seal", "args": {...}}``; the reply is one line, either ``{"ok": true, "result": {...}}``
or ``{"ok": false, "error": "human readable", "code": "short-code"}``.  A handler that refuses a
request raises :class:`ControlError`; the service's state must then be unchanged (the contract of
every verb).

Who may connect is decided below this module (:func:`hybridft_common.endpoints.start_server`): a unix
socket is 0600 and its peers must be our uid or root; a ``tcp:`` address is mutual TLS, refused without
credentials.

A peer cannot break the server's parser or its memory: every line that is not a request (not JSON,
not UTF-8, nested deeper than the parser recurses, longer than :data:`MAX_LINE`) gets one
``bad-request`` reply and the connection goes on with the next line.  An over-long line is dropped
as it streams in, up to its newline, so a connection holds at most about twice ``MAX_LINE`` (the
stream reader stops reading from the socket beyond that).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hybridft_common.endpoints import (
    Endpoint,
    connect_blocking,
    open_connection,
    parse_endpoint,
    start_server,
)
from hybridft_common.errors import HybridftError
from hybridft_common.secure import ChannelError

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_LINE = 1 << 20

log = logging.getLogger("hybridft.control")


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
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deeply
        raise ControlError(f"unparsable reply from service: {_parse_error(exc)}", "protocol") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"malformed reply from service: {line[:200]!r}", "protocol")
    if reply["ok"]:
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {"value": result}
    raise ControlError(str(reply.get("error", "unknown error")), str(reply.get("code", "error")))


def _parse_error(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 ({exc.reason} at byte {exc.start})"
    return str(exc)


def _bad_request(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": "bad-request"}


async def _handle_line(line: bytes, dispatch: Dispatch) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _bad_request(f"malformed request: {_parse_error(exc)}")
    if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
        return _bad_request("request must be an object with a string 'verb'")
    args = request.get("args", {})
    if not isinstance(args, dict):
        return _bad_request("'args' must be an object")
    verb = request["verb"]
    try:
        result = await dispatch(verb, args)
    except HybridftError as exc:
        return {"ok": False, "error": exc.message, "code": exc.code}
    except Exception as exc:  # a handler's bug must not end the connection without a word
        log.exception("control verb %r failed", verb[:64])
        return {"ok": False, "error": f"internal error in {verb[:64]!r}: {exc!r}", "code": "internal"}
    return {"ok": True, "result": result}


def _encode_reply(reply: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(reply, separators=(",", ":")) + "\n").encode()
    except (TypeError, ValueError) as exc:  # a handler returned something that is not JSON
        log.error("unencodable control reply: %r", exc)
        return _encode_reply({"ok": False, "error": f"unencodable reply: {exc}", "code": "internal"})


async def _skip_line(reader: asyncio.StreamReader) -> bool:
    """Drop the rest of an over-long line, through its newline, as it arrives (never holding more
    than the reader's limit); ``False`` if the peer closed first."""
    while True:
        try:
            await reader.readuntil(b"\n")
            return True
        except asyncio.LimitOverrunError as exc:  # no newline within the limit yet: drop what came
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return False


async def serve_control(endpoint: Endpoint | str, dispatch: Dispatch) -> asyncio.Server:
    """Serve the control protocol on ``endpoint``; each connection handles requests in order."""
    if isinstance(endpoint, str):
        endpoint = parse_endpoint(endpoint)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        break
                    line = exc.partial  # the last line may lack its newline
                except asyncio.LimitOverrunError:
                    too_long = _bad_request(f"request line too long (over {MAX_LINE} bytes)")
                    writer.write(_encode_reply(too_long))
                    await writer.drain()
                    if not await _skip_line(reader):
                        break
                    continue
                writer.write(_encode_reply(await _handle_line(line, dispatch)))
                await writer.drain()
        except ConnectionError:
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
        try:
            self._reader, self._writer = await open_connection(self.endpoint, limit=MAX_LINE)
        except ChannelError as exc:  # a tcp: address without credentials: a refusal, like any other
            raise ControlError(exc.message, exc.code) from None

    async def call(self, verb: str, **args: Any) -> dict[str, Any]:
        async with self._lock:
            if self._writer is None:
                await self.connect()
            assert self._reader is not None and self._writer is not None
            self._writer.write(encode_request(verb, args))
            await self._writer.drain()
            try:
                line = await self._reader.readline()
            except ValueError:  # over MAX_LINE: the framing is lost, so is this connection
                await self.close()
                raise ControlError(f"reply from service over {MAX_LINE} bytes", "protocol") from None
            return decode_reply(line)

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
    try:
        sock = connect_blocking(ep, io_timeout)
    except ChannelError as exc:
        raise ControlError(exc.message, exc.code) from None
    with sock:
        sock.sendall(encode_request(verb, args))
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        return decode_reply(bytes(buf))
