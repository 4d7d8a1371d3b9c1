"""QEMU net-filter framing: a sans-I/O codec plus thin asyncio socket helpers.

QEMU's ``filter-mirror`` / ``filter-redirector`` (and ``colo-compare``) move packets over a
chardev as records::

    u32 big-endian  length            bytes that follow (virtio header + Ethernet frame)
    u32 big-endian  vnet_hdr_len      only when the filter has vnet_hdr_support=on
    length bytes    [virtio_net_hdr of vnet_hdr_len bytes] + Ethernet frame (no FCS)

QEMU itself refuses records larger than its packet buffer (``NET_BUFSIZE`` = 4096 + 65536) and
drops the connection; we do the same with :class:`FrameTooLarge` so one garbage length cannot make
us allocate gigabytes or wait forever for bytes that will never come.

Why the decoder looks the way it does:

* **One buffer, batches.** The comparator's throughput is bounded by Python per-call overhead, so
  the shell reads as much as the socket has (``recv_into`` straight into the decoder's buffer,
  no intermediate ``bytes``) and the decoder returns every complete frame of that read as one list.
  A partial frame simply stays in the buffer until the next read.
* **Sans-I/O.** :class:`FrameDecoder` is fed bytes and returns frames; it never touches a socket,
  so it is tested byte-by-byte and against a real QEMU with the same code.
* **Virtio headers are kept, not dropped.** With ``vnet_hdr_support=on`` the guest's TCP checksums
  are typically partial (``VIRTIO_NET_HDR_F_NEEDS_CSUM``); a released frame must go back into QEMU
  with the very header it came with or the client sees bad checksums.  The decoder therefore hands
  out the Ethernet frame (what the comparator looks at) and, in parallel, its header.

The asyncio helpers (:class:`FrameSocketReader`, :class:`FrameSocketWriter`) use
``loop.add_reader``/``add_writer`` on non-blocking sockets rather than streams: the comparator
must be able to drain a socket *synchronously* at a seal ("everything QEMU wrote before ``stop``
returned belongs to this epoch"), and reading straight into the decoder's buffer saves a copy.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import socket
import ssl
import struct
import termios
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from hybridft_common.endpoints import Endpoint
from hybridft_common.fastpath import available, speedups
from hybridft_common.secure import unix_listener

log = logging.getLogger(__name__)

#: QEMU's NET_BUFSIZE: the largest record a net filter accepts (and therefore ever sends).
MAX_RECORD = 4096 + 65536
#: the largest virtio-net header QEMU knows (virtio_net_hdr_v1_hash is 20 bytes); leave room.
MAX_VNET_HDR = 64

_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")

if available is not None:  # bound whenever built: tests run both implementations
    _decode_records = available.decode_records
    _encode_records = available.encode_records


class FramingError(Exception):
    """The peer sent bytes that are not QEMU net-filter framing; close that connection only."""


class FrameTooLarge(FramingError):
    """A record length beyond what QEMU can produce (or a lying virtio header length)."""


class FrameDecoder:
    """Turn a byte stream into Ethernet frames (sans-I/O, batch oriented).

    Feed it with :meth:`feed` (copies ``data`` in), or zero-copy with :meth:`get_buffer` +
    :meth:`buffer_updated` (``sock.recv_into(decoder.get_buffer())``).  Both return the list of
    complete frames, in order.  With ``vnet_hdr=True`` the virtio header of each returned frame is
    in :attr:`vnet_headers` (same index), replaced on every call.

    A bad record (absurd length, impossible virtio header length) means the stream has lost its
    framing for good.  The frames complete before it are still returned (nothing good is lost);
    :attr:`error` is set, and that call (when it had no good frames) or any later call raises
    :class:`FramingError`; the caller closes the connection.
    """

    def __init__(self, vnet_hdr: bool = False, *, max_record: int = MAX_RECORD, read_size: int = 256 << 10):
        if max_record < 1:
            raise ValueError("max_record must be positive")
        self.vnet_hdr = vnet_hdr
        self.max_record = max_record
        self.read_size = read_size
        self._head = 8 if vnet_hdr else 4
        # room for one whole maximal record plus a full read behind it
        self._buf = bytearray(max_record + self._head + read_size)
        self._view = memoryview(self._buf)
        self._start = 0  # first unconsumed byte
        self._end = 0  # one past the last received byte
        self.error: FramingError | None = None
        self.vnet_headers: list[bytes] = []
        self.frames_decoded = 0
        self.bytes_decoded = 0

    # -- input -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held in the buffer (0 at a record boundary)."""
        return self._end - self._start

    def get_buffer(self) -> memoryview:
        """Writable space for the next read (at least ``read_size`` bytes)."""
        if self.error is not None:
            raise self.error
        if len(self._buf) - self._end < self.read_size:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        """``nbytes`` were written into the last :meth:`get_buffer`; return the complete frames."""
        if self.error is not None:
            raise self.error
        self._end += nbytes
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Copy ``data`` in and return the complete frames (any size of ``data`` is fine)."""
        data = memoryview(data).cast("B")
        frames: list[bytes] = []
        headers: list[bytes] = []
        pos = 0
        while True:
            space = self.get_buffer()
            n = min(len(space), len(data) - pos)
            space[:n] = data[pos : pos + n]
            pos += n
            frames.extend(self.buffer_updated(n))
            headers.extend(self.vnet_headers)
            if pos >= len(data) or self.error is not None:
                break
        self.vnet_headers = headers
        return frames

    # -- internals -------------------------------------------------------------------------------
    def _compact(self) -> None:
        start, end = self._start, self._end
        if start:
            self._buf[0 : end - start] = self._buf[start:end]
            self._start, self._end = 0, end - start

    def _parse_compiled(self) -> list[bytes]:
        """:meth:`_parse_python` in C (``hybridft_common._speedups.decode_records``)."""
        frames, self.vnet_headers, pos, nbytes, error = _decode_records(
            self._buf, self._start, self._end, self.vnet_hdr, self.max_record
        )
        if error is not None:
            self.error = FrameTooLarge(error)
        end = self._end
        if pos == end:
            pos = end = 0
        self._start, self._end = pos, end
        self.frames_decoded += len(frames)
        self.bytes_decoded += nbytes
        if self.error is not None and not frames:
            raise self.error
        return frames

    def _parse_python(self) -> list[bytes]:
        """The reference decoder: every complete record between ``_start`` and ``_end``."""
        buf, view = self._buf, self._view
        pos, end = self._start, self._end
        limit = self.max_record
        frames: list[bytes] = []
        append = frames.append
        nbytes = 0
        if not self.vnet_hdr:
            unpack = _U32.unpack_from
            while end - pos >= 4:
                (length,) = unpack(buf, pos)
                if length > limit:
                    self.error = FrameTooLarge(f"record length {length} exceeds QEMU's maximum {limit}")
                    break
                stop = pos + 4 + length
                if stop > end:
                    break
                append(view[pos + 4 : stop].tobytes())
                nbytes += length
                pos = stop
            self.vnet_headers = []
        else:
            unpack2 = _U32x2.unpack_from
            headers: list[bytes] = []
            while end - pos >= 8:
                length, hdr_len = unpack2(buf, pos)
                if length > limit:
                    self.error = FrameTooLarge(f"record length {length} exceeds QEMU's maximum {limit}")
                    break
                if hdr_len > length or hdr_len > MAX_VNET_HDR:
                    self.error = FrameTooLarge(
                        f"vnet_hdr_len {hdr_len} is impossible for a record of {length} bytes "
                        "(is vnet_hdr_support set on one side only?)"
                    )
                    break
                stop = pos + 8 + length
                if stop > end:
                    break
                headers.append(view[pos + 8 : pos + 8 + hdr_len].tobytes())
                append(view[pos + 8 + hdr_len : stop].tobytes())
                nbytes += length
                pos = stop
            self.vnet_headers = headers
        if pos == end:
            pos = end = 0
        self._start, self._end = pos, end
        self.frames_decoded += len(frames)
        self.bytes_decoded += nbytes
        if self.error is not None and not frames:
            raise self.error
        return frames

    # HYBRIDFT_PURE_PYTHON=1 or no extension: the reference
    _parse = _parse_python if speedups is None else _parse_compiled


def encode_frame(frame: bytes | memoryview, vnet_header: bytes | None = None) -> bytes:
    """One record; pass ``vnet_header`` (possibly ``b""``) when the peer has vnet_hdr_support=on."""
    if vnet_header is None:
        return _U32.pack(len(frame)) + bytes(frame)
    return _U32x2.pack(len(vnet_header) + len(frame), len(vnet_header)) + vnet_header + bytes(frame)


def encode_frames_python(
    frames: Sequence[bytes | memoryview], vnet_headers: Sequence[bytes] | None = None
) -> bytes:
    """Many records in one buffer (one ``send`` for a whole batch); the reference encoder."""
    pack = _U32.pack
    parts: list[bytes | memoryview] = []
    append = parts.append
    if vnet_headers is None:
        for frame in frames:
            append(pack(len(frame)))
            append(frame)
    else:
        if len(vnet_headers) != len(frames):
            raise ValueError("one vnet header per frame")
        pack2 = _U32x2.pack
        for frame, header in zip(frames, vnet_headers, strict=True):
            append(pack2(len(header) + len(frame), len(header)))
            append(header)
            append(frame)
    return b"".join(parts)


def encode_frames_compiled(
    frames: Sequence[bytes | memoryview], vnet_headers: Sequence[bytes] | None = None
) -> bytes:
    """:func:`encode_frames_python` in C: one allocation for the whole batch, no part list."""
    return _encode_records(frames, vnet_headers)


encode_frames = encode_frames_python if speedups is None else encode_frames_compiled


# ------------------------------------------------------------------------------------------------
# asyncio shell helpers
# ------------------------------------------------------------------------------------------------


def listen_socket(endpoint: Endpoint, backlog: int = 16) -> socket.socket:
    """A non-blocking listening socket for ``endpoint`` (a stale unix socket file is replaced; a tcp one
    is plain: the caller wraps each accepted connection in TLS)."""
    if endpoint.kind == "unix":
        assert endpoint.path is not None
        sock = unix_listener(endpoint.path, backlog)  # mode 0600 (the peers are checked on accept)
        sock.setblocking(False)
        return sock
    sock, address = endpoint.new_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def tune_socket(sock: socket.socket, bufsize: int = 4 << 20) -> None:
    """Non-blocking, large kernel buffers, no Nagle: frames are latency sensitive."""
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


FramesCallback = Callable[[list[bytes], list[bytes]], None]
CloseCallback = Callable[[str], None]


class FrameSocketReader:
    """Reads framed records from a non-blocking socket and hands each read's frames to a callback.

    ``on_frames(frames, vnet_headers)`` runs once per ``recv`` batch.  ``on_close(reason)`` runs
    once, when the peer closes, errs, or sends bad framing (the reason says which); the socket is
    closed then and only this connection is affected.  :meth:`drain_now` reads synchronously
    until the socket is empty (used at a seal).
    """

    def __init__(
        self,
        sock: socket.socket,
        decoder: FrameDecoder,
        on_frames: FramesCallback,
        on_close: CloseCallback,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_reads_per_wakeup: int = 4,
    ) -> None:
        self.sock = sock
        self.decoder = decoder
        self.on_frames = on_frames
        self.on_close = on_close
        self.loop = loop or asyncio.get_running_loop()
        self.max_reads = max_reads_per_wakeup
        self.closed = False
        self.paused = False
        self.bytes_read = 0
        self.drained = False
        # a TLS socket returns one record per read, however much more is waiting: no short-read rule
        self._record_reads = isinstance(sock, ssl.SSLSocket)
        self._fd = sock.fileno()

    @property
    def fileno(self) -> int:
        """The socket's descriptor (what a busy-poll watches; see :mod:`hybridft_common.busypoll`)."""
        return self._fd

    def start(self) -> None:
        if not self.closed and not self.paused:
            self.loop.add_reader(self._fd, self._on_readable)

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.loop.remove_reader(self._fd)

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.loop.add_reader(self._fd, self._on_readable)

    def _read_once(self) -> bool:
        """One recv; returns False when the socket had nothing (or we closed).  Sets
        :attr:`drained` when the read did not fill the buffer: the kernel handed over all it
        held, so another recv now would most likely only say EAGAIN."""
        try:
            buf = self.decoder.get_buffer()
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return False
        except FramingError as exc:
            self.close(f"bad framing: {exc}")
            return False
        except OSError as exc:
            self.close(f"read error: {exc}")
            return False
        if n == 0:
            pending = self.decoder.pending
            tail = f" mid-record ({pending} bytes of a partial record lost)" if pending else ""
            self.close("peer closed" + tail)
            return False
        self.bytes_read += n
        self.drained = n < len(buf) and not self._record_reads
        try:
            frames = self.decoder.buffer_updated(n)
        except FramingError as exc:
            self.close(f"bad framing: {exc}")
            return False
        if frames:
            self.on_frames(frames, self.decoder.vnet_headers)
        if self.decoder.error is not None:
            self.close(f"bad framing: {self.decoder.error}")
            return False
        return True

    def _on_readable(self) -> None:
        # Stop at a short read: the socket is (as good as) empty, and the event loop reports it
        # again if more came meanwhile.  Trying once more cost a recv that said EAGAIN on most
        # wakeups of a paced stream (one per input per wakeup, for no frame).
        for _ in range(self.max_reads):
            if self.closed or self.paused or not self._read_once() or self.drained:
                break

    def read_if_ready(self) -> None:
        """One non-blocking read now, unless paused or closed (an empty socket costs one ``recv``)."""
        if not self.closed and not self.paused:
            self._read_once()

    def drain_now(self) -> None:
        """Read (synchronously) everything the kernel already holds for this socket.

        Only what it holds *now*: a peer that keeps writing while we read cannot keep us here (nor
        grow our buffers past a pause) for as long as it likes.
        """
        held = _unread_bytes(self.sock)
        start = self.bytes_read
        while not self.closed and (held is None or self.bytes_read - start < held) and self._read_once():
            pass

    def close(self, reason: str = "closed locally") -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.on_close(reason)


def _unread_bytes(sock: socket.socket) -> int | None:
    """Bytes waiting in the socket's receive queue (FIONREAD), or ``None`` if it cannot tell."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count, True)
    except OSError:
        return None
    return count[0]


class FrameSocketWriter:
    """Buffered, non-blocking writes of encoded records; reports its backlog for back-pressure.

    :meth:`write` never blocks: what the kernel does not take now is kept (in order) and sent when
    the socket is writable.  ``on_drained`` runs whenever the backlog falls to zero after having
    been non-empty (the shell resumes paused readers then).  ``on_close(reason)`` runs once.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_close: CloseCallback,
        *,
        on_drained: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.sock = sock
        self.on_close = on_close
        self.on_drained = on_drained
        self.loop = loop or asyncio.get_running_loop()
        self.closed = False
        self.bytes_written = 0
        self._chunks: deque[bytes | memoryview] = deque()
        self._backlog = 0
        self._fd = sock.fileno()
        self._watching = False

    @property
    def backlog(self) -> int:
        """Bytes accepted by :meth:`write` but not yet taken by the kernel."""
        return self._backlog

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self._chunks:
            self._chunks.append(data)
            self._backlog += len(data)
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self.close(f"write error: {exc}")
            return
        self.bytes_written += n
        if n < len(data):
            self._chunks.append(memoryview(data)[n:])
            self._backlog += len(data) - n
            self._watch()

    def _watch(self) -> None:
        if not self._watching and not self.closed:
            self._watching = True
            self.loop.add_writer(self._fd, self._on_writable)

    def _send_some(self) -> int:
        """One scatter-gather send of the first queued chunks; returns bytes taken (no copying
        of the backlog: a slow reader must not make every send memmove megabytes)."""
        chunks = self._chunks
        n = self.sock.sendmsg(list(itertools.islice(chunks, 64)))
        self.bytes_written += n
        self._backlog -= n
        left = n
        while left:
            first = chunks[0]
            if len(first) <= left:
                left -= len(first)
                chunks.popleft()
            else:
                chunks[0] = memoryview(first)[left:]
                left = 0
        return n

    def _on_writable(self) -> None:
        while self._chunks and not self.closed:
            try:
                if not self._send_some():
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(f"write error: {exc}")
                return
        if self._watching:
            self._watching = False
            self.loop.remove_writer(self._fd)
        if self.on_drained is not None and not self.closed:
            self.on_drained()

    def take_unsent(self) -> tuple[list[bytes], int]:
        """Remove and return the queued chunks nothing of which was sent yet (whole records, in
        order), and the number of bytes dropped from a chunk the kernel took only part of."""
        whole = [c for c in self._chunks if isinstance(c, bytes)]
        lost = sum(len(c) for c in self._chunks if not isinstance(c, bytes))
        self._chunks.clear()
        self._backlog = 0
        return whole, lost

    def flush_blocking(self, timeout: float = 5.0) -> None:
        """Push the backlog out synchronously (shutdown path); gives up after ``timeout``."""
        if not self._chunks or self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            while self._chunks:
                self._send_some()
        except OSError as exc:
            log.warning("flush of %d bytes failed: %s", self._backlog, exc)
        finally:
            with contextlib.suppress(OSError):
                self.sock.setblocking(False)

    def close(self, reason: str = "closed locally") -> None:
        if self.closed:
            return
        self.closed = True
        if self._watching:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self._fd)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.on_close(reason)


# ------------------------------------------------------------------------------------------------
# stream helpers (tools, tests): the same codec over asyncio streams
# ------------------------------------------------------------------------------------------------


async def read_frame_batches(
    reader: asyncio.StreamReader, decoder: FrameDecoder, chunk: int = 256 << 10
) -> AsyncIterator[list[bytes]]:
    """Yield each read's complete frames until EOF; raises :class:`FramingError` on bad input."""
    while True:
        data = await reader.read(chunk)
        if not data:
            if decoder.pending:
                raise FramingError(f"stream ended inside a record ({decoder.pending} bytes)")
            return
        frames = decoder.feed(data)
        if frames:
            yield frames


async def write_frames(
    writer: asyncio.StreamWriter,
    frames: Sequence[bytes],
    vnet_headers: Sequence[bytes] | None = None,
) -> None:
    """Write a batch of records and wait for the stream's flow control."""
    writer.write(encode_frames(frames, vnet_headers))
    await writer.drain()


def is_disconnect(exc: BaseException) -> bool:
    """True for the errors a vanished peer produces (reset, broken pipe)."""
    return isinstance(exc, ConnectionError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
    )
