"""The net-filter frame codec and the socket helpers, over real sockets (no QEMU here)."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_compare.transport import (
    MAX_RECORD,
    FrameDecoder,
    FrameSocketReader,
    FrameSocketWriter,
    FrameTooLarge,
    FramingError,
    encode_frame,
    encode_frames,
    read_frame_batches,
    tune_socket,
    write_frames,
)


def run_async(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(asyncio.wait_for(fn(), 30))

    return wrapper


frames_st = st.lists(st.binary(min_size=0, max_size=3000), min_size=0, max_size=40)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def test_layout_without_vnet_hdr() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert FrameDecoder().feed(b"\x00\x00\x00\x03abc\x00\x00\x00\x00") == [b"abc", b""]


def test_layout_with_vnet_hdr() -> None:
    hdr = bytes(range(12))
    record = encode_frame(b"frame", hdr)
    assert record == struct.pack(">II", 17, 12) + hdr + b"frame"
    dec = FrameDecoder(vnet_hdr=True)
    assert dec.feed(record) == [b"frame"]
    assert dec.vnet_headers == [hdr]


@settings(max_examples=200, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(min_value=0), max_size=30), vnet=st.booleans())
def test_any_segmentation_round_trips(frames: list[bytes], cuts: list[int], vnet: bool) -> None:
    headers = [bytes([i % 256]) * (i % 13) for i in range(len(frames))] if vnet else None
    data = encode_frames(frames, headers)
    dec = FrameDecoder(vnet_hdr=vnet, read_size=1024)
    got, got_headers = [], []
    for piece in _split(data, cuts):
        got += dec.feed(piece)
        got_headers += dec.vnet_headers
    assert got == frames
    if vnet:
        assert got_headers == headers
    assert dec.pending == 0
    assert dec.frames_decoded == len(frames)


def test_byte_by_byte_and_partial_state() -> None:
    frames = [os.urandom(n) for n in (60, 1514, 0, 9000, MAX_RECORD)]
    data = encode_frames(frames)
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert dec.pending > 0 or got  # a partial record stays buffered
    assert got == frames


def test_absurd_length_is_rejected_and_earlier_frames_survive() -> None:
    dec = FrameDecoder()
    good = encode_frames([b"one", b"two"])
    frames = dec.feed(good + struct.pack(">I", MAX_RECORD + 1) + b"junk")
    assert frames == [b"one", b"two"]  # nothing complete is lost
    assert isinstance(dec.error, FrameTooLarge)
    with pytest.raises(FramingError, match="exceeds"):
        dec.feed(b"more")


def test_absurd_length_alone_raises() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_lying_vnet_header_length() -> None:
    dec = FrameDecoder(vnet_hdr=True)
    with pytest.raises(FrameTooLarge, match="vnet_hdr_len"):
        dec.feed(struct.pack(">II", 10, 20) + bytes(10))


def test_encode_frames_checks_header_count() -> None:
    with pytest.raises(ValueError):
        encode_frames([b"a", b"b"], [b""])


async def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    tune_socket(a)
    tune_socket(b)
    return a, b


@run_async
async def test_socket_reader_writer_batches_and_back_pressure() -> None:
    a, b = await _pair()
    received: list[bytes] = []
    batches = 0
    closed: list[str] = []
    done = asyncio.Event()
    frames = [os.urandom(1 + (i * 37) % 1500) for i in range(20000)]

    def on_frames(batch: list[bytes], headers: list[bytes]) -> None:
        nonlocal batches
        batches += 1
        received.extend(batch)
        if len(received) == len(frames):
            done.set()

    reader = FrameSocketReader(b, FrameDecoder(), on_frames, closed.append)
    writer = FrameSocketWriter(a, closed.append)
    reader.pause()  # nothing is read: the writer must buffer instead of blocking
    reader.start()
    for i in range(0, len(frames), 500):
        writer.write(encode_frames(frames[i : i + 500]))
    assert writer.backlog > 0
    await asyncio.sleep(0.05)
    assert received == []
    reader.resume()
    await asyncio.wait_for(done.wait(), 10)
    assert received == frames
    assert batches < len(frames) / 5  # batched reads, not one callback per frame
    assert writer.backlog == 0
    writer.close()
    await asyncio.sleep(0.05)
    assert "closed locally" in closed and any("peer closed" in c for c in closed)


@run_async
async def test_socket_reader_closes_only_on_bad_framing() -> None:
    a, b = await _pair()
    got: list[bytes] = []
    reasons: list[str] = []
    reader = FrameSocketReader(b, FrameDecoder(), lambda f, h: got.extend(f), reasons.append)
    reader.start()
    a.send(encode_frame(b"fine") + b"\x7f\xff\xff\xff")
    for _ in range(100):
        if reasons:
            break
        await asyncio.sleep(0.01)
    assert got == [b"fine"]
    assert reasons and "bad framing" in reasons[0]
    assert reader.closed
    a.close()


class _CountingSocket(socket.socket):
    """A real socket that counts its reads (the reader under test is not replaced)."""

    reads = 0

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self.reads += 1
        return super().recv_into(*args, **kwargs)


@run_async
async def test_a_short_read_ends_the_wakeup_without_a_second_recv() -> None:
    a, b = await _pair()
    counted = _CountingSocket(fileno=b.detach())
    counted.setblocking(False)
    got: list[bytes] = []
    reader = FrameSocketReader(counted, FrameDecoder(), lambda f, h: got.extend(f), lambda r: None)
    reader.start()
    for burst in range(1, 21):  # a paced stream: each burst is read on its own wakeup
        a.sendall(encode_frames([b"y" * 200] * 8))
        for _ in range(200):
            if len(got) == 8 * burst:
                break
            await asyncio.sleep(0.001)
        assert len(got) == 8 * burst
    # one recv per burst (each one short); before, every wakeup also paid a recv that said EAGAIN
    assert counted.reads <= 24, counted.reads
    # a read that fills the buffer is followed by another in the same wakeup
    before = counted.reads
    a.sendall(encode_frames([b"z" * 1000] * 600))  # 602 KB: more than one read's buffer
    for _ in range(500):
        if len(got) == 160 + 600:
            break
        await asyncio.sleep(0.001)
    assert len(got) == 760 and counted.reads - before >= 2
    reader.close()
    a.close()


@run_async
async def test_drain_now_reads_what_the_kernel_holds() -> None:
    a, b = await _pair()
    got: list[bytes] = []
    reader = FrameSocketReader(b, FrameDecoder(), lambda f, h: got.extend(f), lambda r: None)
    a.sendall(encode_frames([b"x" * 100] * 50))
    reader.drain_now()  # synchronous: no event-loop turn needed
    assert len(got) == 50
    reader.close()
    a.close()


@run_async
async def test_stream_helpers() -> None:
    received: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async for batch in read_frame_batches(r, FrameDecoder(vnet_hdr=True)):
            received.extend(batch)
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _r, w = await asyncio.open_connection("127.0.0.1", port)
    await write_frames(w, [b"a" * 10, b"b" * 20], [bytes(12), bytes(12)])
    w.close()
    await w.wait_closed()
    for _ in range(100):
        if len(received) == 2:
            break
        await asyncio.sleep(0.01)
    server.close()
    assert received == [b"a" * 10, b"b" * 20]
