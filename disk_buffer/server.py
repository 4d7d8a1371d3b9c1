"""The asyncio shell around the NBD codec and the disk buffer: ``hybridft disk serve``.

Why this shape: the primary's ``blockdev-mirror`` (write-blocking) waits for every replica write, so
the server's per-request cost is added to the guest's write latency.  The hot path is therefore one
``asyncio.BufferedProtocol`` per connection that receives straight into the sans-I/O
:class:`RequestParser`'s buffer (a 1 MiB write is copied once, into the bytes the buffer keeps);
every complete request in the buffer is executed synchronously against the in-memory
:class:`~disk_buffer.buffer.DiskBuffer` and all replies of that batch leave in one ``writelines``.
No coroutine, task or future is created per request.

Ordering is what makes epochs exact: the control socket runs on the same event loop, so a ``seal``
happens between two request batches; every write acknowledged before ``seal`` belongs to the sealed
epoch, every later one to the next.

Back-pressure: when the buffer is over its speculation or write-out budget (``has_room()`` is false)
the connection stops taking requests out of its parser and pauses reading from the socket until
``wait_for_room()`` returns; the same happens while the transport's send buffer is over its
high-water mark.

Memory per peer is bounded whatever the peer sends.  A READ is the one request whose reply is
bigger than the request (28 bytes can ask for 32 MiB), so read replies go to the transport as they
are made, and a batch stops executing requests once the replies waiting in the transport reach the
connection's reply budget (``--reply-budget``); it goes on when the transport has drained to its
low-water mark (the peer read its replies), reading from the socket being paused meanwhile.  A
peer that pipelines READs and never reads therefore costs the budget plus one reply, not the sum
of its requests.  Other replies are smaller than their requests, so the bytes read bound them.
A READ longer than the advertised maximum block size is refused with ``EINVAL`` before anything
is allocated.  A peer that connects and does not finish the handshake within
``--handshake-timeout`` seconds is dropped, and connections beyond ``--max-connections`` are
closed at once (before the greeting), leaving the others untouched.

Who may connect: on a unix address (a 0600 socket) only peers of our uid or root (``SO_PEERCRED``); on a
``tcp:`` address TLS is required (``NBD_OPT_STARTTLS``, as QEMU's NBD client does with ``tls-creds``) and
the client must present a certificate of the pair's CA, so only the authenticated primary's mirror can
write `replica`.  The control socket follows the same rules (:mod:`hybridft_common.endpoints`).

Errors never take the server down: a broken handshake or an unparsable request stream closes that
connection only; a request the buffer refuses gets an NBD error reply; anything unexpected is logged
and answered with ``EIO``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import click

from disk_buffer import nbd
from disk_buffer.nbd import (
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    Cmd,
    check_request,
    ok_reply,
)
from disk_buffer.store import WriteBatchError
from hybridft_common import eventloop, fastpath
from hybridft_common.busypoll import DEFAULT_POLL_US, PollCounters, PollWindow, spin
from hybridft_common.control import ControlError, Dispatch, serve_control
from hybridft_common.endpoints import Endpoint, parse_endpoint
from hybridft_common.errors import HybridftError
from hybridft_common.secure import ChannelError, check_peer, unix_listener

log = logging.getLogger("hybridft.disk.server")

DEFAULT_REPLY_BUDGET = 64 << 20  # reply bytes one connection may queue before it waits for its peer
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to the end of the option haggling
DEFAULT_MAX_CONNECTIONS = 16  # the pair uses two (the primary's mirror, the secondary's view)
# read data at least this big is handed to the transport on its own (Python 3.11's writelines joins
# its list into one new bytes object: a copy small replies can afford), and smaller read replies are
# handed over whenever this many bytes of them are queued, so the budget is checked that often
_LARGE_REPLY = 256 << 10
# the fast path's batch of plain writes (RequestParser.take_writes): at most this many, and it stops
# once this much payload is taken -- which bounds how far past its budget one batch carries the
# buffer (has_room is checked after each batch, not after each write)
_BATCH_COUNT = 1024
_BATCH_BYTES = 1 << 20
# A lone write goes the batch way too (_serve_writes): at queue depth 1, 30.6k instructions per
# request against 48.0k one by one through the general loop compiled, and 55.7k against 59.3k in pure
# Python (bench.disk_micro --qd 1 --callgrind).
_BATCH_MIN = 1


class BlockBackend(Protocol):
    """The part of :class:`~disk_buffer.buffer.DiskBuffer` the NBD connections use."""

    size: int

    def read(self, export: Any, offset: int, length: int) -> bytes: ...
    def write(self, export: Any, offset: int, data: bytes | memoryview) -> None: ...
    def write_many(self, export: Any, offsets: list[int], payloads: list[bytes]) -> None:
        """Each write in order; raises :class:`WriteBatchError` at the first refused one."""

    def write_zeroes(self, export: Any, offset: int, length: int) -> None: ...
    def trim(self, export: Any, offset: int, length: int) -> None: ...
    def flush(self, export: Any) -> None: ...
    def has_room(self) -> bool: ...
    async def wait_for_room(self) -> None: ...


def _error_for(exc: BaseException, command: int) -> int:
    """Map a refusal from the buffer to an NBD error value."""
    if isinstance(exc, HybridftError):
        if exc.code == "range":
            return nbd.ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else nbd.EINVAL
        if exc.code == "nospace":
            return nbd.ENOSPC
        if exc.code in ("wrong-state", "read-only"):
            return nbd.EPERM
        return nbd.EIO
    if isinstance(exc, OSError) and exc.errno in (28, 122, 27):  # ENOSPC, EDQUOT, EFBIG
        return nbd.ENOSPC
    return nbd.EIO


def _batch_cookie(replies: bytes, index: int) -> int:
    """The cookie of the ``index``-th write of a batch, from its OK reply (16 bytes, cookie last)."""
    return int.from_bytes(replies[16 * index + 8 : 16 * index + 16], "big")


class NbdConnection(asyncio.BufferedProtocol):
    """One client: handshake first, then the request loop described in the module docstring.

    A ``BufferedProtocol``: the event loop receives straight into the request parser's buffer.
    """

    def __init__(self, server: NbdServer, tls: ssl.SSLContext | None = None) -> None:
        self.server = server
        self.tls = tls  # the listener's server context: TLS is then required (STARTTLS)
        self.transport: asyncio.Transport | None = None
        self.handshake: nbd.ServerHandshake | None = nbd.ServerHandshake(
            server.export_infos,
            min_block=server.min_block,
            max_payload=server.max_payload,
            tls=tls is not None,
        )
        self._tls_task: asyncio.Task[None] | None = None
        self._tls_early = bytearray()  # options that came through TLS before start_tls returned
        self._handshake_buffer = bytearray(4096)
        self.parser = nbd.RequestParser(server.max_payload)
        self.export: Any = None
        self.min_block = server.min_block
        self.size = server.backend.size
        self._room_wait: asyncio.Task[None] | None = None
        self._waiting_for_room = False
        self._write_paused = False
        self._reading_paused = False
        self._closing = False
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.peer = "?"
        # spinning for the next request once answered (hybridft_common.busypoll): the socket's
        # descriptor, the window, and whether a spin is already scheduled
        self._fds: tuple[int, ...] = ()
        self._poll = PollWindow(server.poll_ns, server.poll_counters) if server.poll_ns else None
        self._poll_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, but not an asyncio.Transport instance under uvloop (its classes are its own)
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fds = (sock.fileno(),)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = str(transport.get_extra_info("peername") or "unix")
        server = self.server
        try:
            check_peer(sock)
        except ChannelError as exc:
            log.warning("NBD client refused: %s", exc.message)
            self._closing = True
            transport.close()
            return
        if len(server.connections) >= server.max_connections:
            log.warning(
                "NBD client %s refused: %d connections already (--max-connections)",
                self.peer,
                len(server.connections),
            )
            self._closing = True
            transport.close()
            return
        server.connections.add(self)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            server.handshake_timeout, self._handshake_expired
        )
        transport.write(nbd.server_greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._room_wait is not None:
            self._room_wait.cancel()
        self._end_handshake_timer()
        if self._tls_task is not None:
            self._tls_task.cancel()
        self._closing = True

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.handshake is None or self._closing or self.transport is None:
            return
        log.warning(
            "NBD client %s did not finish the handshake in %g s; dropping it",
            self.peer,
            self.server.handshake_timeout,
        )
        self._closing = True
        self.transport.abort()

    def _end_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.handshake is not None:
            return memoryview(self._handshake_buffer)
        return self.parser.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self.handshake is not None:
            data = bytes(self._handshake_buffer[:nbytes])
            if self._tls_task is not None and not self._tls_task.done():
                # the TLS layer delivered options before start_tls returned its transport: they are
                # answered (on that transport) once it has
                self._tls_early += data
                return
            leftover = self._negotiate(data)
            if not leftover:
                return
            self.parser.feed(leftover)
        else:
            self.parser.buffer_updated(nbytes)
        self._process()
        if self._poll is not None and not self._poll_scheduled and self.handshake is None:
            # after the callbacks of this receive: a TLS transport may hold more of it, decrypted,
            # that a spin on the socket would not see
            self._poll_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._poll_for_next)

    def _poll_for_next(self) -> None:
        """Answered, and nothing more to do: spin for the client's next request instead of letting
        the event loop sleep, if :class:`PollWindow` says it pays (see :mod:`hybridft_common.busypoll`).

        Not while replies wait in the transport (the loop must send them first) or reading is
        paused.  The spin holds up this event loop for at most the window: the other connections
        and the control socket wait that long at worst.
        """
        self._poll_scheduled = False
        poll, transport = self._poll, self.transport
        if (
            poll is None
            or transport is None
            or self._closing
            or self._waiting_for_room
            or self._write_paused
            or not self._fds
            or transport.get_write_buffer_size()
        ):
            return
        try:
            spin(poll, self._fds)
        except OSError as exc:  # the descriptor went away under us: stop polling this connection
            log.debug("NBD client %s: polling stopped (%s)", self.peer, exc)
            self._poll = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        self._process()

    # -- handshake ----------------------------------------------------------------------------
    def _negotiate(self, data: bytes) -> bytes:
        """Run the handshake; return request bytes that followed it (if any)."""
        handshake = self.handshake
        transport = self.transport
        assert handshake is not None and transport is not None
        try:
            out = handshake.receive(data)
        except nbd.HandshakeError as exc:
            log.warning("NBD handshake from %s failed: %s; closing that connection", self.peer, exc)
            self._closing = True
            transport.abort()
            return b""
        if out:
            transport.write(out)
        if handshake.starttls:
            transport.pause_reading()  # nothing more in clear: start_tls takes the socket over
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            return b""
        if handshake.aborted:
            self._closing = True
            transport.close()
            return b""
        if handshake.export is None:
            return b""
        self._end_handshake_timer()
        self.export = self.server.exports[handshake.export.name]
        self.min_block = self.server.min_block if handshake.block_size_requested else 1
        self.handshake = None
        log.info("NBD client %s attached to export %r", self.peer, handshake.export.name)
        return handshake.leftover

    async def _start_tls(self) -> None:
        """After the ACK to NBD_OPT_STARTTLS: the TLS handshake (the peer must present a certificate
        of the pair's CA), then the option haggling goes on inside TLS."""
        transport, handshake, tls = self.transport, self.handshake, self.tls
        assert transport is not None and handshake is not None and tls is not None
        try:
            new = await asyncio.get_running_loop().start_tls(
                transport, self, tls, server_side=True, ssl_handshake_timeout=self.server.handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.warning("NBD client %s: TLS handshake failed (%s); closing that connection", self.peer, exc)
            self._closing = True
            transport.abort()
            return
        if new is None or self._closing:
            return
        # uvloop's TLS transport is not an asyncio.Transport subclass (it has the same methods)
        self.transport = cast(asyncio.Transport, new)
        handshake.tls_started()
        log.info("NBD client %s: TLS established", self.peer)
        early, self._tls_early = bytes(self._tls_early), bytearray()
        if early:
            leftover = self._negotiate(early)
            if leftover:
                self.parser.feed(leftover)
                self._process()

    # -- transmission -------------------------------------------------------------------------
    def _process(self) -> None:
        """Execute every complete request in the parser (unless paused); reply in one write.

        Read payloads are the exception: big ones, and every ``_LARGE_REPLY`` bytes of small ones,
        are handed to the transport as they come, and the batch stops there once the transport
        holds the reply budget and has paused writing.
        """
        transport = self.transport
        if transport is None or self._closing or self._waiting_for_room or self._write_paused:
            return
        if self._serve_writes(transport):
            return
        backend = self.server.backend
        export = self.export
        size = self.size
        min_block = self.min_block
        max_payload = self.server.max_payload
        reply_budget = self.server.reply_budget
        out: list[bytes] = []
        append = out.append
        queued = 0  # read payload bytes in ``out``
        parser = self.parser
        next_request = parser.next_request
        take_writes = parser.take_writes
        write = backend.write
        has_room = backend.has_room
        batch_tried = True  # by _serve_writes, just now: the head is not a run of plain writes
        try:
            while True:
                # a run of plain writes after the requests handled here (a FUA write, a read):
                # executed and answered as one batch
                batch = (
                    None
                    if batch_tried
                    else take_writes(size, min_block, _BATCH_COUNT, _BATCH_BYTES, _BATCH_MIN)
                )
                batch_tried = False
                if batch is not None:
                    self._write_batch(export, *batch, append)
                    if not has_room():
                        self._wait_for_room()
                        break
                    if not parser.buffered:  # the receive held plain writes only (QD1: one)
                        break
                    continue
                request = next_request()
                if request is None:
                    break
                command = request.command
                error = check_request(request, size, min_block, max_payload)
                if error:
                    append(nbd.simple_reply(request.cookie, error))
                    continue
                try:
                    if command == CMD_WRITE:
                        assert request.payload is not None
                        write(export, request.offset, request.payload)
                        if request.flags & CMD_FLAG_FUA:
                            backend.flush(export)
                        append(ok_reply(request.cookie))
                        if not has_room():
                            self._wait_for_room()
                            break
                    elif command == CMD_READ:
                        data = backend.read(export, request.offset, request.length)
                        if len(data) != request.length:
                            raise RuntimeError(f"backend returned {len(data)} of {request.length} bytes")
                        append(ok_reply(request.cookie))
                        if len(data) < _LARGE_REPLY:
                            append(data)
                            queued += len(data)
                            if queued < _LARGE_REPLY:
                                continue
                            transport.writelines(out)
                        else:
                            # on its own (writelines would copy it into a joined buffer first), and
                            # as a view: the transport slices off what the socket took at once,
                            # which for bytes would be another copy
                            transport.writelines(out)
                            transport.write(memoryview(data))
                        del data
                        out = []
                        append = out.append
                        queued = 0
                        if self._write_paused and transport.get_write_buffer_size() >= reply_budget:
                            # the reply budget is spent and the peer is not reading: the next
                            # request waits for resume_writing (reading is paused meanwhile)
                            break
                    elif command == CMD_FLUSH:
                        backend.flush(export)
                        append(ok_reply(request.cookie))
                    elif command in (CMD_TRIM, CMD_WRITE_ZEROES):
                        if command == CMD_TRIM:
                            backend.trim(export, request.offset, request.length)
                        else:
                            backend.write_zeroes(export, request.offset, request.length)
                        if request.flags & CMD_FLAG_FUA:
                            backend.flush(export)
                        append(ok_reply(request.cookie))
                        if not backend.has_room():
                            self._wait_for_room()
                            break
                    elif command == CMD_DISC:
                        self._closing = True
                        break
                    else:  # pragma: no cover - check_request refuses unknown commands
                        append(nbd.simple_reply(request.cookie, nbd.EINVAL))
                except Exception as exc:
                    error = _error_for(exc, command)
                    if not isinstance(exc, HybridftError):
                        log.exception(
                            "NBD %s at %d+%d failed", Cmd(command).name, request.offset, request.length
                        )
                    append(nbd.simple_reply(request.cookie, error))
        except nbd.TransmissionError as exc:
            log.warning("NBD client %s sent an unparsable request (%s); disconnecting", self.peer, exc)
            self._closing = True
        if out:
            transport.writelines(out)
        if self._closing:
            transport.close()

    def _serve_writes(self, transport: asyncio.Transport) -> bool:
        """The common case on its own: the runs of plain writes at the head of the buffer, each
        applied as one batch and answered in one write.  Returns whether that was all there was
        (nothing left, or the buffer is full and reading paused); otherwise :meth:`_process`'s
        general loop takes the request that stopped the run.

        Why apart from the general loop: a client at queue depth 1 sends one write per receive, and
        the general loop's set-up was a measurable share of the server's cost per request
        (``bench.disk_micro --qd 1 --callgrind``).  Replies of a run are written before the
        requests after it are even parsed; NBD lets a server answer in any order.
        """
        parser = self.parser
        take_writes = parser.take_writes
        backend = self.server.backend
        replies: list[bytes] = []
        while True:
            batch = take_writes(self.size, self.min_block, _BATCH_COUNT, _BATCH_BYTES, _BATCH_MIN)
            if batch is None:
                done = not parser.buffered
                break
            offsets, payloads, ok_replies = batch
            # _write_batch, inline: the call cost 1.2k instructions per request at QD1 (4 %)
            try:
                backend.write_many(self.export, offsets, payloads)
            except Exception as exc:
                self._answer_failed_batch(exc, self.export, offsets, payloads, ok_replies, replies.append)
            else:
                replies.append(ok_replies)
            if not backend.has_room():
                self._wait_for_room()
                done = True
                break
            if not parser.buffered:  # the receive held plain writes only (QD1: one)
                done = True
                break
        if replies:
            transport.writelines(replies)
        return done

    def _write_batch(
        self, export: Any, offsets: list[int], payloads: list[bytes], replies: bytes, append: Any
    ) -> None:
        """Apply a batch of plain writes; ``append`` each one's reply (``replies`` holds their OK
        replies, 16 bytes each), an error reply for each refused one, as one call per write would."""
        try:
            self.server.backend.write_many(export, offsets, payloads)
        except Exception as exc:
            self._answer_failed_batch(exc, export, offsets, payloads, replies, append)
        else:
            append(replies)

    def _answer_failed_batch(
        self,
        exc: Exception,
        export: Any,
        offsets: list[int],
        payloads: list[bytes],
        replies: bytes,
        append: Any,
    ) -> None:
        """``write_many`` raised ``exc`` for a batch: answer each write as one call per write would
        have (OK up to a refused one, its error, then the rest tried again)."""
        write_many = self.server.backend.write_many
        done, count = 0, len(offsets)
        while True:
            if not isinstance(exc, WriteBatchError):  # not a refusal: nothing of the rest is known written
                log.error("NBD batch of %d writes failed", count - done, exc_info=exc)
                for i in range(done, count):
                    append(nbd.simple_reply(_batch_cookie(replies, i), _error_for(exc, CMD_WRITE)))
                return
            failed = done + exc.index
            if failed > done:
                append(replies[16 * done : 16 * failed])
            if not isinstance(exc.cause, HybridftError):
                log.error("NBD WRITE at %d failed: %r", offsets[failed], exc.cause)
            append(nbd.simple_reply(_batch_cookie(replies, failed), _error_for(exc.cause, CMD_WRITE)))
            done = failed + 1
            if done >= count:
                return
            try:
                write_many(export, offsets[done:], payloads[done:])
            except Exception as again:
                exc = again
                continue
            append(replies[16 * done :])
            return

    def _wait_for_room(self) -> None:
        self._waiting_for_room = True
        self._update_reading()
        self._room_wait = asyncio.get_running_loop().create_task(self._room_returned())

    async def _room_returned(self) -> None:
        await self.server.backend.wait_for_room()
        self._room_wait = None
        self._waiting_for_room = False
        self._update_reading()
        self._process()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want_paused = self._waiting_for_room or self._write_paused
        if want_paused and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not want_paused and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False


class NbdServer:
    """Listens for NBD clients and serves ``exports`` (name -> the backend's export token).

    ``reply_budget``, ``handshake_timeout`` and ``max_connections`` bound what one peer can make
    the server hold (see the module docstring).
    """

    def __init__(
        self,
        backend: BlockBackend,
        exports: Mapping[str, Any],
        *,
        min_block: int = nbd.MIN_BLOCK,
        max_payload: int = nbd.MAX_PAYLOAD,
        reply_budget: int = DEFAULT_REPLY_BUDGET,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        poll_ns: int = 0,
    ) -> None:
        if reply_budget < 1 or handshake_timeout <= 0 or max_connections < 1:
            raise ValueError("reply_budget, handshake_timeout and max_connections must be positive")
        if poll_ns < 0:
            raise ValueError("poll_ns cannot be negative")
        # 0: no spinning for a client's next request (hybridft_common.busypoll); the counters are
        # every connection's, for status
        self.poll_ns = poll_ns
        self.poll_counters = PollCounters()
        self.backend = backend
        self.exports = dict(exports)
        self.min_block = min_block
        self.max_payload = max_payload
        self.reply_budget = reply_budget
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.export_infos = {
            name: nbd.ExportInfo(name, backend.size, nbd.DEFAULT_TRANSMISSION_FLAGS) for name in self.exports
        }
        self.connections: set[NbdConnection] = set()

    async def listen(self, endpoint: Endpoint | str) -> asyncio.Server:
        """Listen on ``endpoint``: a 0600 unix socket, or tcp with TLS required (refused without
        credentials, see :mod:`hybridft_common.tls`)."""
        ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
        loop = asyncio.get_running_loop()
        if ep.kind == "unix":
            assert ep.path is not None
            sock = unix_listener(ep.path)
            return await loop.create_unix_server(lambda: NbdConnection(self), sock=sock)
        tls = ep.creds().server_context()  # every connection of this listener goes through STARTTLS
        return await loop.create_server(lambda: NbdConnection(self, tls), host=ep.host, port=ep.port)

    def close_connections(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()


def _int_arg(args: dict[str, Any], name: str) -> int:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"'{name}' must be an integer, got {value!r}", "bad-request")
    return value


def make_control_dispatch(buffer: Any, runtime: Callable[[], dict[str, Any]] | None = None) -> Dispatch:
    """The control verbs of the disk server, mapped onto the :class:`DiskBuffer` facade.

    ``runtime``: more of how the server runs, for ``status`` (the NBD side's polling counters).
    """

    async def dispatch(verb: str, args: dict[str, Any]) -> dict[str, Any]:
        if verb == "seal":
            return {"epoch": buffer.seal()}
        if verb == "commit":
            epoch = _int_arg(args, "epoch")
            await buffer.commit(epoch)
            return {"epoch": epoch}
        if verb == "rollback":
            result = buffer.rollback()
            return result if isinstance(result, dict) else {"result": result}
        if verb == "failover":
            await buffer.failover()
            return buffer.status()
        if verb == "status":
            described = {"event_loop": eventloop.running_loop_name(), "fastpath": fastpath.describe()}
            if runtime is not None:
                described |= runtime()
            return buffer.status() | {"runtime": described}
        if verb == "prepare-checkpoint":
            buffer.prepare_checkpoint()
            return {"checkpoint_in_progress": True}
        raise ControlError(
            f"unknown verb {verb!r} (expected seal, commit, rollback, failover, status, prepare-checkpoint)",
            "unknown-verb",
        )

    return dispatch


def make_fenced_control_dispatch(
    buffer: Any, runtime: Callable[[], dict[str, Any]] | None = None
) -> Dispatch:
    """:func:`make_control_dispatch` behind the fencing generation (:mod:`hybridft_common.fencing`),
    recorded durably in the state directory's ``generation`` file: after a failover the old
    primary's daemon can neither seal, commit nor roll back."""
    from disk_buffer.store import DiskBufferError
    from hybridft_common.fencing import Fence, GenerationFile, fenced_dispatch

    record = GenerationFile(Path(buffer.state_dir) / "generation")
    try:
        fence = Fence(record.load())
    except ValueError as exc:
        raise DiskBufferError(str(exc), "corrupt") from None
    return fenced_dispatch(make_control_dispatch(buffer, runtime), fence, record)


async def run_server(
    image: str | Path,
    state_dir: str | Path,
    nbd_endpoint: str | Sequence[str],
    control_endpoint: str,
    *,
    speculation_budget: int = 256 << 20,
    writeout_budget: int = 256 << 20,
    reply_budget: int = DEFAULT_REPLY_BUDGET,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    prefault: int = 0,
    poll_us: int = DEFAULT_POLL_US,
    stop: asyncio.Event | None = None,
) -> None:
    """Recover the buffer, serve NBD and control until ``stop`` is set (or SIGTERM/SIGINT).

    ``poll_us``: how long a connection spins for its client's next request once answered
    (:mod:`hybridft_common.busypoll`); 0 turns spinning off.

    ``prefault``: bytes of heap to fault in before serving, so the first epochs' writes do not each
    take a page fault (:func:`~disk_buffer.buffer.prefault_heap`).  Off by default: the server then
    holds that memory from its start, and its RSS no longer shows what the buffer holds.
    """
    from disk_buffer.buffer import DiskBuffer, Export, prefault_heap

    # several NBD addresses: on two hosts the secondary's `view` is local (unix) while the primary's
    # mirror reaches `replica` over tcp (TLS)
    nbd_eps = [
        parse_endpoint(text) for text in ([nbd_endpoint] if isinstance(nbd_endpoint, str) else nbd_endpoint)
    ]
    control_ep = parse_endpoint(control_endpoint)
    buffer = DiskBuffer.open(
        image, state_dir, speculation_budget=speculation_budget, writeout_budget=writeout_budget
    )
    # in this thread: it is the one that allocates the epoch data (the heap is per thread arena)
    started = time.monotonic()
    faulted = prefault_heap(prefault)
    if faulted:
        log.info("pre-faulted %d MiB of heap in %.2f s", faulted >> 20, time.monotonic() - started)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    nbd_server = NbdServer(
        buffer,
        {"replica": Export.REPLICA, "view": Export.VIEW},
        reply_budget=reply_budget,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        poll_ns=poll_us * 1000,
    )

    def runtime() -> dict[str, Any]:
        return {"busy_poll": {"window_us": poll_us, **nbd_server.poll_counters.as_dict()}}

    try:
        control_server = await serve_control(control_ep, make_fenced_control_dispatch(buffer, runtime))
        servers.append(control_server)
        nbd_bound = []
        for nbd_ep in nbd_eps:
            servers.append(await nbd_server.listen(nbd_ep))
            nbd_bound.append(_bound(servers[-1], nbd_ep))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        status = buffer.status()
        control_bound = _bound(control_server, control_ep)
        log.info(
            "serving %s (%d bytes) on %s, control on %s; committed epoch %s",
            image,
            buffer.size,
            ", ".join(map(str, nbd_bound)),
            control_bound,
            status.get("committed"),
        )
        also = "".join(f" nbd-also={ep}" for ep in nbd_bound[1:])
        print(f"ready nbd={nbd_bound[0]} control={control_bound}{also}", flush=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for server in servers:
            server.close()
        nbd_server.close_connections()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        await buffer.aclose()
        for ep in (*nbd_eps, control_ep):
            if ep.kind == "unix" and ep.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ep.path)


def _bound(server: asyncio.Server, requested: Endpoint) -> Endpoint:
    """The address actually listened on (``tcp:HOST:0`` becomes the port the kernel chose)."""
    if requested.kind != "tcp" or not server.sockets:
        return requested
    host, port = server.sockets[0].getsockname()[:2]
    return Endpoint("tcp", host=host, port=port, tls_creds=requested.tls_creds)


def _endpoint_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    try:
        for text in [value] if isinstance(value, str) else value:
            parse_endpoint(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.command("serve")
@click.option(
    "--image", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The replica image (raw)."
)
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the journal and state.",
)
@click.option(
    "--nbd",
    "nbd_endpoints",
    required=True,
    multiple=True,
    callback=_endpoint_option,
    help="NBD listen address: unix:PATH or tcp:HOST:PORT (repeatable: the same exports on each).",
)
@click.option(
    "--control",
    "control_endpoint",
    required=True,
    callback=_endpoint_option,
    help="Control socket: unix:PATH or tcp:HOST:PORT.",
)
@click.option(
    "--speculation-budget",
    type=click.IntRange(min=1),
    default=256 << 20,
    show_default=True,
    help="Bytes of unsealed+sealed primary writes before reading from clients pauses.",
)
@click.option(
    "--writeout-budget",
    type=click.IntRange(min=1),
    default=256 << 20,
    show_default=True,
    help="Bytes committed but not yet applied to IMG before reading pauses.",
)
@click.option(
    "--prefault",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Bytes of memory to fault in at start, so the first epochs' writes take no page fault each "
    "(the server holds that memory from then on).",
)
@click.option(
    "--reply-budget",
    type=click.IntRange(min=1),
    default=DEFAULT_REPLY_BUDGET,
    show_default=True,
    help="Bytes of read replies one NBD connection may queue before it waits for its client.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_HANDSHAKE_TIMEOUT,
    show_default=True,
    help="Seconds a client may take to finish the NBD handshake before it is dropped.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    help="NBD connections served at once; more are closed on accept.",
)
@click.option(
    "--tls-creds",
    type=click.Path(file_okay=False),
    default=None,
    help="TLS credentials directory (QEMU tls-creds-x509 layout) for tcp: addresses; see `hybridft certs`.",
)
@click.option(
    "--poll-us",
    type=click.IntRange(min=0, max=10_000),
    default=DEFAULT_POLL_US,
    show_default=True,
    help="Microseconds an NBD connection spins for its client's next request once answered, instead "
    "of sleeping: a wakeup saved per request at low queue depth, paid in CPU (spinning backs off "
    "while it does not pay); 0 turns it off.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and recovery step.")
def serve_command(
    image: Path,
    state_dir: Path,
    nbd_endpoints: tuple[str, ...],
    control_endpoint: str,
    tls_creds: str | None,
    speculation_budget: int,
    writeout_budget: int,
    prefault: int,
    reply_budget: int,
    handshake_timeout: float,
    max_connections: int,
    poll_us: int,
    verbose: bool,
) -> None:
    """Serve the `replica` and `view` NBD exports of IMG (foreground; SIGTERM/SIGINT stop it cleanly)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not image.is_file():
        raise click.ClickException(f"image {image} does not exist or is not a regular file")
    nbd_endpoints = tuple(str(parse_endpoint(text, tls_creds)) for text in nbd_endpoints)
    control_endpoint = str(parse_endpoint(control_endpoint, tls_creds))
    try:
        eventloop.run(
            run_server(
                image,
                state_dir,
                nbd_endpoints,
                control_endpoint,
                speculation_budget=speculation_budget,
                writeout_budget=writeout_budget,
                reply_budget=reply_budget,
                handshake_timeout=handshake_timeout,
                max_connections=max_connections,
                prefault=prefault,
                poll_us=poll_us,
            ),
            "disk",
        )
    except HybridftError as exc:
        raise click.ClickException(f"{exc.message} ({exc.code})") from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
