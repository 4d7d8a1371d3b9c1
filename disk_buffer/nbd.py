"""Sans-I/O NBD protocol: the fixed-newstyle handshake and the transmission-phase codec.

Why sans-I/O: the server's hot path is "bytes arrive, complete requests come out, replies go back".
Keeping that in plain classes fed with bytes (like h11) means the asyncio shell only moves bytes, the
protocol rules are unit-tested without sockets, and one parser call handles every request already
sitting in the receive buffer (no per-request coroutine, no per-request ``readexactly``).

What is implemented (server side only, see the NBD protocol spec, doc/proto.md):

* handshake: fixed newstyle with ``NBD_FLAG_NO_ZEROES``; options ``EXPORT_NAME``, ``INFO``, ``GO``,
  ``LIST``, ``ABORT``; every other option (``STRUCTURED_REPLY`` included) is refused politely with
  ``NBD_REP_ERR_UNSUP`` and the negotiation goes on.  With ``tls=True`` (a ``tcp:`` listener) TLS is
  *required*, as in the spec's "TLS-only" mode and QEMU's ``nbd/server.c``: before ``NBD_OPT_STARTTLS``
  every option but ``ABORT`` gets ``NBD_REP_ERR_TLS_REQD`` (``EXPORT_NAME``, which has no error reply,
  closes the connection); ``STARTTLS`` is acknowledged and :attr:`ServerHandshake.starttls` tells the
  shell to run the TLS handshake, after which the negotiation starts over inside TLS (a second
  ``STARTTLS`` gets ``NBD_REP_ERR_INVALID``).  Without TLS, ``STARTTLS`` gets ``NBD_REP_ERR_POLICY``.
  ``INFO``/``GO`` always report ``NBD_INFO_EXPORT`` and ``NBD_INFO_BLOCK_SIZE`` (minimum 512).
  A malformed handshake raises :class:`HandshakeError`: the shell closes that one connection.
* transmission: simple replies only.  :class:`RequestParser` turns a byte stream into
  :class:`Request` objects; :func:`check_request` applies the spec's error rules (``EINVAL`` for
  unknown commands/flags, misaligned or out-of-range reads/trims, ``ENOSPC`` for writes past the
  end); the reply encoders build the bytes.  A request header with a bad magic cannot be resynchronised
  and raises :class:`TransmissionError` (the shell hard-disconnects, as the spec allows).  A write whose
  payload is larger than the advertised maximum is consumed and discarded in a streaming way (never
  buffered) and answered with ``EINVAL``, so one bad request does not kill the connection.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from hybridft_common.fastpath import available, speedups

# --- magics -------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# --- handshake flags ----------------------------------------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# --- transmission flags (per export) ------------------------------------------------------------
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


# plain ints for the hot path (an Enum attribute lookup costs more than the comparison)
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --- error values (the only ones the protocol allows) --------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ESHUTDOWN = 108

MIN_BLOCK = 512
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 << 20
MAX_OPTION_LENGTH = 64 << 10  # longer options are skipped and refused with ERR_TOO_BIG
MAX_NAME = 4096

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
REQUEST_SIZE = _REQUEST.size  # 28


class NbdError(Exception):
    """Base of the NBD codec's errors."""


class HandshakeError(NbdError):
    """The client broke the handshake; close this connection (and only this one)."""


class TransmissionError(NbdError):
    """The request stream cannot be parsed any more (bad magic); hard-disconnect this client."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export."""

    name: str
    size: int
    flags: int
    description: str = ""


DEFAULT_TRANSMISSION_FLAGS = (
    TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN
)


def server_greeting() -> bytes:
    """The first bytes the server sends: magics and the handshake flags."""
    return _U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT) + _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


class ServerHandshake:
    """The server's side of the fixed-newstyle negotiation.

    Feed it the client's bytes with :meth:`receive`; it returns the bytes to send back.  When
    :attr:`export` is set the transmission phase starts and :attr:`leftover` holds any request bytes
    that arrived in the same read.  :attr:`aborted` means the client sent ``NBD_OPT_ABORT``: send
    the returned bytes, then close.
    """

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        min_block: int = MIN_BLOCK,
        preferred_block: int = PREFERRED_BLOCK,
        max_payload: int = MAX_PAYLOAD,
        tls: bool = False,
    ) -> None:
        self.exports = exports
        #: TLS is required (see the module docstring); ``tls_active`` once the shell finished it
        self.tls_required = tls
        self.tls_active = False
        #: the client asked for STARTTLS and got its ACK: the shell runs the TLS handshake now and then
        #: calls :meth:`tls_started`; no option may be read before that
        self.starttls = False
        self.block_sizes = (min_block, preferred_block, max_payload)
        self.export: ExportInfo | None = None
        self.aborted = False
        self.no_zeroes = False
        #: the client asked for NBD_INFO_BLOCK_SIZE in the GO that finished the handshake, so it
        #: promised to honour the minimum block size; others (EXPORT_NAME, GO without it) may send
        #: byte-granular requests, which are served (as qemu-nbd does) rather than refused
        self.block_size_requested = False
        self.leftover = b""
        self._buf = bytearray()
        self._have_flags = False
        self._skip = 0  # bytes of an over-long option still to discard
        self._skip_option = 0

    @property
    def finished(self) -> bool:
        return self.export is not None or self.aborted

    def receive(self, data: bytes) -> bytes:
        """Consume client bytes; return the reply bytes.  Raises :class:`HandshakeError`."""
        if self.finished:
            raise HandshakeError("data received after the handshake finished")
        if self.starttls:
            raise HandshakeError("data received in clear after STARTTLS was acknowledged")
        self._buf += data
        out = bytearray()
        while not self.finished and not self.starttls:
            if self._skip:
                take = min(self._skip, len(self._buf))
                del self._buf[:take]
                self._skip -= take
                if self._skip:
                    break
                out += option_reply(self._skip_option, Rep.ERR_TOO_BIG, b"option too long")
                continue
            if not self._have_flags:
                if len(self._buf) < 4:
                    break
                (client_flags,) = _U32.unpack_from(self._buf)
                del self._buf[:4]
                if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    raise HandshakeError(f"unknown client flags 0x{client_flags:x}")
                self.no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
                self._have_flags = True
                continue
            if len(self._buf) < _OPTION_HEADER.size:
                break
            magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
            if magic != IHAVEOPT:
                raise HandshakeError(f"bad option magic 0x{magic:x}")
            if length > MAX_OPTION_LENGTH:
                if option == Opt.EXPORT_NAME:
                    raise HandshakeError(f"NBD_OPT_EXPORT_NAME of {length} bytes")
                del self._buf[: _OPTION_HEADER.size]
                self._skip, self._skip_option = length, option
                continue
            if len(self._buf) < _OPTION_HEADER.size + length:
                break
            payload = bytes(self._buf[_OPTION_HEADER.size : _OPTION_HEADER.size + length])
            del self._buf[: _OPTION_HEADER.size + length]
            out += self._option(option, payload)
        if self.export is not None:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        if self.starttls and self._buf:
            raise HandshakeError("bytes in clear after NBD_OPT_STARTTLS (before the TLS handshake)")
        return bytes(out)

    def tls_started(self) -> None:
        """The TLS handshake the ACK to STARTTLS announced is done: options go on inside TLS."""
        if not self.starttls:
            raise HandshakeError("TLS started without NBD_OPT_STARTTLS")
        self.starttls = False
        self.tls_active = True

    def _option(self, option: int, data: bytes) -> bytes:
        if option == Opt.STARTTLS:
            if data:
                raise HandshakeError("NBD_OPT_STARTTLS with data")
            if not self.tls_required:
                return option_reply(option, Rep.ERR_POLICY, b"TLS not configured")
            if self.tls_active:
                return option_reply(option, Rep.ERR_INVALID, b"TLS already enabled")
            self.starttls = True
            return option_reply(option, Rep.ACK)
        if self.tls_required and not self.tls_active:
            if option == Opt.EXPORT_NAME:  # no error reply exists for it: the spec says disconnect
                raise HandshakeError("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
            if option == Opt.ABORT:
                self.aborted = True
                return option_reply(option, Rep.ACK)
            refusal = f"option {option} not permitted before TLS".encode()
            return option_reply(option, Rep.ERR_TLS_REQD, refusal)
        if option == Opt.EXPORT_NAME:
            export = self.exports.get(_decode_name(data))
            if export is None:
                # This option has no error reply: the spec says to close the connection.
                raise HandshakeError(f"NBD_OPT_EXPORT_NAME for unknown export {data[:64]!r}")
            self.export = export
            reply = _U64.pack(export.size) + _U16.pack(export.flags)
            return reply if self.no_zeroes else reply + bytes(124)
        if option == Opt.ABORT:
            self.aborted = True
            return option_reply(option, Rep.ACK)
        if option == Opt.LIST:
            if data:
                return option_reply(option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            out = bytearray()
            for name in self.exports:
                encoded = name.encode()
                out += option_reply(option, Rep.SERVER, _U32.pack(len(encoded)) + encoded)
            return bytes(out + option_reply(option, Rep.ACK))
        if option in (Opt.INFO, Opt.GO):
            return self._info_or_go(option, data)
        return option_reply(option, Rep.ERR_UNSUP, f"option {option} not supported".encode())

    def _info_or_go(self, option: int, data: bytes) -> bytes:
        if len(data) < 6:
            return option_reply(option, Rep.ERR_INVALID, b"option data too short")
        (name_length,) = _U32.unpack_from(data)
        if name_length > len(data) - 6:
            return option_reply(option, Rep.ERR_INVALID, b"export name length exceeds option length")
        (count,) = _U16.unpack_from(data, 4 + name_length)
        if len(data) != 6 + name_length + 2 * count:
            return option_reply(option, Rep.ERR_INVALID, b"information request count mismatch")
        try:
            name = _decode_name(data[4 : 4 + name_length])
        except HandshakeError as exc:
            return option_reply(option, Rep.ERR_INVALID, str(exc).encode())
        export = self.exports.get(name)
        if export is None:
            return option_reply(option, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode()[:MAX_NAME])
        requested = {_U16.unpack_from(data, 6 + name_length + 2 * i)[0] for i in range(count)}
        out = bytearray()
        out += option_reply(
            option, Rep.INFO, _U16.pack(Info.EXPORT) + _U64.pack(export.size) + _U16.pack(export.flags)
        )
        if Info.NAME in requested:
            out += option_reply(option, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requested and export.description:
            out += option_reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION) + export.description.encode())
        block_info = _U16.pack(Info.BLOCK_SIZE) + struct.pack(">III", *self.block_sizes)
        out += option_reply(option, Rep.INFO, block_info)
        out += option_reply(option, Rep.ACK)
        if option == Opt.GO:
            self.export = export
            self.block_size_requested = Info.BLOCK_SIZE in requested
        return bytes(out)


def _decode_name(raw: bytes) -> str:
    if len(raw) > MAX_NAME:
        raise HandshakeError("export name longer than 4096 bytes")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HandshakeError("export name is not UTF-8") from None
    if "\0" in name:
        raise HandshakeError("export name contains NUL")
    return name


class Request(NamedTuple):
    """One transmission-phase request.

    ``payload`` is the write data (``None`` for other commands, and for an over-long write whose
    payload was discarded: ``oversized`` is then true and the reply must be ``EINVAL``).  A named
    tuple because the parser builds one per request: ``tuple.__new__`` is the cheapest object.
    """

    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    payload: bytes | None = None
    oversized: bool = False


_new_tuple = tuple.__new__
if available is not None:  # bound whenever built: tests run both implementations
    _nbd_next_request = available.nbd_next_request
    _nbd_take_writes = available.nbd_take_writes
_KEEP_BUFFER = 8 << 20  # a connection keeps a receive buffer up to this size between requests


class RequestParser:
    """Turns the transmission-phase byte stream into :class:`Request` objects.

    Two ways in: :meth:`feed` (any bytes), or the zero-copy pair :meth:`get_buffer` /
    :meth:`buffer_updated` that ``asyncio.BufferedProtocol`` uses to ``recv_into`` the parser's own
    buffer.  The buffer grows to hold one whole request (up to the maximum payload), so a 1 MiB
    write is received in place and copied exactly once, into the ``bytes`` the disk buffer keeps.

    :meth:`next_request` returns the next complete request or ``None``.  Requests left in the
    buffer stay there until asked for, which is how the shell applies back-pressure: it stops
    asking (and stops reading from the socket).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, initial_size: int = 256 << 10) -> None:
        self.max_payload = max_payload
        self._initial_size = initial_size
        self._buf = bytearray(initial_size)
        # One long-lived view: the buffer is never resized in place (it is replaced), so the export
        # is harmless and saves creating a memoryview per request.
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._need = REQUEST_SIZE  # bytes the request at _start needs in total
        self._discard = 0  # payload bytes of an oversized write still to drop

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into requests."""
        return self._end - self._start

    def get_buffer(self, min_free: int = 64 << 10) -> memoryview:
        """Writable space after the received bytes (room for the current request at least)."""
        have = self._end - self._start
        want = max(self._need, have + min_free)
        buf = self._buf
        if self._start and len(buf) - self._start < want:
            buf[0:have] = buf[self._start : self._end]  # same-size slice assignment: no resize
            self._start, self._end = 0, have
        if len(buf) < want:
            grown = bytearray(max(want, 2 * len(buf)))
            grown[0:have] = buf[self._start : self._end]
            self._buf = buf = grown
            self._view = memoryview(grown)
            self._start, self._end = 0, have
        elif have == 0 and len(buf) > _KEEP_BUFFER and self._need <= REQUEST_SIZE:
            self._buf = buf = bytearray(self._initial_size)  # give memory back after a huge write
            self._view = memoryview(buf)
            self._start = self._end = 0
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the memoryview :meth:`get_buffer` returned."""
        self._end += nbytes
        if self._discard:
            take = min(self._discard, self._end - self._start)
            self._discard -= take
            self._start += take
            if self._start == self._end:
                self._start = self._end = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            target.release()
            self.buffer_updated(n)
            view = view[n:]

    def next_request_compiled(self) -> Request | None:
        """:meth:`next_request_python` with the header decode and payload copy in C
        (``_speedups.nbd_next_request``)."""
        start = self._start
        end = self._end
        if end - start < REQUEST_SIZE:
            self._need = REQUEST_SIZE
            if start == end:
                self._start = self._end = 0
            return None
        try:
            request, self._start, need, discard = _nbd_next_request(
                self._buf, start, end, self.max_payload, Request
            )
        except ValueError as exc:
            raise TransmissionError(f"bad request magic 0x{exc.args[0]:08x}") from None
        if need >= 0:
            self._need = need
        if discard >= 0:
            self._discard = discard
        return request

    def next_request_python(self) -> Request | None:
        """The next complete request, or ``None``.  Raises :class:`TransmissionError` on a bad magic."""
        start = self._start
        avail = self._end - start
        if avail < REQUEST_SIZE:
            self._need = REQUEST_SIZE
            if not avail:
                self._start = self._end = 0
            return None
        buf = self._buf
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf, start)
        if magic != REQUEST_MAGIC:
            raise TransmissionError(f"bad request magic 0x{magic:08x}")
        if command != CMD_WRITE:
            self._start = start + REQUEST_SIZE
            return _new_tuple(Request, (flags, command, cookie, offset, length, None, False))
        if length > self.max_payload:
            # Consume and drop the payload as it streams in; the reply is EINVAL.
            take = min(length, avail - REQUEST_SIZE)
            self._start = start + REQUEST_SIZE + take
            self._discard = length - take
            self._need = REQUEST_SIZE
            return _new_tuple(Request, (flags, command, cookie, offset, length, None, True))
        end = start + REQUEST_SIZE + length
        if end > self._end:
            self._need = REQUEST_SIZE + length
            return None
        payload = bytes(self._view[start + REQUEST_SIZE : end])
        self._start = end
        self._need = REQUEST_SIZE
        return _new_tuple(Request, (flags, command, cookie, offset, length, payload, False))

    # HYBRIDFT_PURE_PYTHON=1 or no extension: the reference
    next_request = next_request_python if speedups is None else next_request_compiled

    def take_writes_python(
        self, size: int, min_block: int, max_count: int, max_bytes: int, min_count: int = 2
    ) -> tuple[list[int], list[bytes], bytes] | None:
        """Consume the run of *plain* writes at the head of the buffer, for the server's fast path.

        Plain: a complete ``NBD_CMD_WRITE`` with no flags, a payload of 1 byte to the maximum, in
        range of an export of ``size`` bytes and aligned to ``min_block`` -- the requests that
        :func:`check_request` passes and that need nothing but the write and an OK reply.  The run
        stops at the first other request (incomplete, a bad magic, another command, any flag, an
        error to report), which :meth:`next_request` then handles one by one; and after
        ``max_count`` writes or ``max_bytes`` of payload, which bounds how far one batch may carry
        the disk buffer past its budget.

        Returns ``(offsets, payloads, replies)`` -- ``replies`` the OK reply of each, concatenated
        -- or ``None`` if the head holds fewer than ``min_count`` plain writes (the server takes a
        lone write this way only where that costs less than one by one: see ``_BATCH_MIN``).
        """
        buf = self._buf
        start = self._start
        end = self._end
        mask = min_block - 1
        max_payload = self.max_payload
        offsets: list[int] = []
        # (payload start, stop, cookie) of each write: copied once the run is long enough
        spans: list[tuple[int, int, int]] = []
        taken = 0
        while len(offsets) < max_count and taken < max_bytes and end - start >= REQUEST_SIZE:
            magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf, start)
            stop = start + REQUEST_SIZE + length
            if (
                magic != REQUEST_MAGIC
                or command != CMD_WRITE
                or flags
                or not 0 < length <= max_payload
                or stop > end
                or offset > size
                or length > size - offset
                or (offset | length) & mask
            ):
                break
            offsets.append(offset)
            spans.append((start + REQUEST_SIZE, stop, cookie))
            taken += length
            start = stop
        if len(offsets) < min_count:
            return None
        view = self._view
        payloads = [bytes(view[a:b]) for a, b, _ in spans]
        replies = b"".join([_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) for _, _, cookie in spans])
        self._set_head(start)
        return offsets, payloads, replies

    def _set_head(self, start: int) -> None:
        """After a batch: the head is a request boundary (an empty buffer starts over at 0)."""
        if start == self._end:
            self._start = self._end = 0
        else:
            self._start = start
        self._need = REQUEST_SIZE

    def take_writes_compiled(
        self, size: int, min_block: int, max_count: int, max_bytes: int, min_count: int = 2
    ) -> tuple[list[int], list[bytes], bytes] | None:
        """:meth:`take_writes_python` in C (``_speedups.nbd_take_writes``)."""
        if self._end - self._start < min_count * REQUEST_SIZE:  # the common "nothing left": no call
            return None
        batch = _nbd_take_writes(
            self._buf,
            self._start,
            self._end,
            self.max_payload,
            size,
            min_block,
            max_count,
            max_bytes,
            min_count,
        )
        if batch is None:
            return None
        offsets, payloads, replies, start = batch
        self._set_head(start)
        return offsets, payloads, replies

    take_writes = take_writes_python if speedups is None else take_writes_compiled

    def __iter__(self) -> Iterator[Request]:
        while (request := self.next_request()) is not None:
            yield request


_ALLOWED_FLAGS: dict[int, int] = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_DISC: CMD_FLAG_FUA,
}


def check_request(
    request: Request, size: int, min_block: int = MIN_BLOCK, max_payload: int = MAX_PAYLOAD
) -> int:
    """The NBD error for ``request`` against an export of ``size`` bytes, or 0 if it may run.

    Unknown commands and flags -> ``EINVAL``; an oversized write -> ``EINVAL``; writes (and write
    zeroes) past the end -> ``ENOSPC``; reads and trims past the end, misaligned offsets/lengths,
    and reads longer than the maximum payload -> ``EINVAL``.
    """
    command = request.command
    allowed = _ALLOWED_FLAGS.get(command)
    if allowed is None or request.flags & ~allowed:
        return EINVAL
    if command == CMD_DISC:
        return 0
    if command == CMD_FLUSH:
        return EINVAL if (request.offset or request.length) else 0
    if request.oversized:
        return EINVAL
    offset, length = request.offset, request.length
    if command == CMD_READ and length > max_payload:
        return EINVAL
    if offset > size or length > size - offset:
        return ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if (offset | length) & (min_block - 1):
        return EINVAL
    return 0


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header (a successful read is followed by the data)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


_pack_reply = _SIMPLE_REPLY.pack


def ok_reply(cookie: int) -> bytes:
    """A successful simple reply header (the hot path's common case)."""
    return _pack_reply(SIMPLE_REPLY_MAGIC, 0, cookie)


# --- client-side encoders (used by tests and the benchmark's raw probes) -----------------------
def encode_request(command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_go(name: str, infos: tuple[int, ...] = (Info.BLOCK_SIZE,), option: int = Opt.GO) -> bytes:
    raw = name.encode()
    body = _U32.pack(len(raw)) + raw + _U16.pack(len(infos)) + b"".join(_U16.pack(i) for i in infos)
    return encode_option(option, body)


def decode_simple_reply(data: bytes) -> tuple[int, int]:
    """-> (error, cookie) from a 16-byte simple reply header."""
    magic, error, cookie = _SIMPLE_REPLY.unpack_from(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise TransmissionError(f"bad reply magic 0x{magic:08x}")
    return error, cookie


def decode_option_reply(data: bytes) -> tuple[int, int, int]:
    """-> (option, reply type, data length) from a 20-byte option reply header."""
    magic, option, reply, length = _OPTION_REPLY.unpack_from(data)
    if magic != OPTION_REPLY_MAGIC:
        raise HandshakeError(f"bad option reply magic 0x{magic:x}")
    return option, reply, length
