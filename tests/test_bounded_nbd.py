"""One NBD peer cannot make a real ``hybridft disk serve`` process hold unbounded memory.

A READ is the one request whose reply is bigger than the request: 16 pipelined 32 MiB READs are
448 bytes.  A peer that sends them and never reads must cost the server its reply budget, not
512 MiB of replies (plus copies): the server's RSS is measured with psutil.  A real client (libnbd)
with many large reads in flight gets every byte right across the pauses.  The in-process tests of
the budget, the handshake timeout, the connection limit and the maximum block size are in
tests/test_disk_server.py.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import nbd as libnbd
import psutil
import pytest

from disk_buffer import nbd
from disk_buffer.nbd import Cmd, Rep
from tests.helpers.disk_server import DiskServerProcess

MiB = 1 << 20


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def slow_reader(path: Path) -> socket.socket:
    """A raw client past NBD_OPT_GO on ``replica`` that hardly reads (a 4 KiB receive buffer)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(str(path))
    assert recv_exactly(sock, 18)[:8] == b"NBDMAGIC"
    sock.sendall(struct.pack(">I", 3) + nbd.encode_go("replica"))
    while True:
        _option, reply, length = nbd.decode_option_reply(recv_exactly(sock, 20))
        recv_exactly(sock, length)
        if reply == Rep.ACK:
            return sock
        assert reply == Rep.INFO


class Served:
    """A :class:`DiskServerProcess` and its process as psutil sees it."""

    def __init__(self, server: DiskServerProcess) -> None:
        self.server = server
        assert server.proc is not None
        self.ps = psutil.Process(server.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def busy(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)


@pytest.fixture
def disk_serve(tmp_path: Path) -> Iterator[Served]:
    server = DiskServerProcess(tmp_path, size=64 * MiB)
    try:
        yield Served(server)
    finally:
        server.stop()


def test_pipelined_32mib_reads_never_read_keep_the_server_rss_bounded(disk_serve: Served) -> None:
    """The review's attack: 16 pipelined 32 MiB READs (448 bytes) took the server to 1.6-2.0 GB."""
    # the default --reply-budget (64 MiB), one 32 MiB reply in the making (the store's read plan and
    # the pread result) and the transport buffer's growth slack: far below the 512 MiB asked for
    bound = 64 * MiB + 4 * nbd.MAX_PAYLOAD
    base = disk_serve.rss()
    client = slow_reader(disk_serve.server.nbd_socket)
    size = nbd.MAX_PAYLOAD
    client.sendall(b"".join(nbd.encode_request(Cmd.READ, i, 0, size) for i in range(16)))
    peak = base
    last_busy, since, deadline = disk_serve.busy(), time.monotonic(), time.monotonic() + 30
    while time.monotonic() < deadline:  # until it has made a reply and then been idle for a second
        peak = max(peak, disk_serve.rss())
        assert peak - base < bound, f"server RSS grew by {(peak - base) / MiB:.0f} MiB"
        time.sleep(0.02)
        busy = disk_serve.busy()
        if busy != last_busy or peak - base < size // 2:
            last_busy, since = busy, time.monotonic()
        elif time.monotonic() - since > 1.0:
            break
    else:
        raise AssertionError("the server never settled")
    zeros = bytes(MiB)
    for cookie in range(16):  # every reply arrives, intact, while memory stays bounded
        assert nbd.decode_simple_reply(recv_exactly(client, 16)) == (0, cookie)
        for _ in range(size // MiB):
            assert recv_exactly(client, MiB) == zeros
        peak = max(peak, disk_serve.rss())
    client.close()
    assert peak - base < bound, f"server RSS grew by {(peak - base) / MiB:.0f} MiB"


def test_libnbd_pipelined_big_reads_with_a_small_reply_budget(tmp_path: Path) -> None:
    """A real client with many large reads in flight gets every byte right across the pauses."""
    server = DiskServerProcess(tmp_path, None, "--reply-budget", str(MiB), size=64 * MiB)
    try:
        h = server.connect("replica")
        marks = {offset: os.urandom(4096) for offset in range(0, 64 * MiB, 3 * MiB + 4096)}
        for offset, data in marks.items():
            h.pwrite(data, offset)
        expected = bytearray(64 * MiB)
        for offset, data in marks.items():
            expected[offset : offset + len(data)] = data
        reads = [(i * 4 * MiB, 8 * MiB) for i in range(14)] + [(i * 512, 4096) for i in range(64)]
        buffers = [libnbd.Buffer(length) for _offset, length in reads]
        cookies = [h.aio_pread(buf, offset) for buf, (offset, _length) in zip(buffers, reads, strict=True)]
        for cookie in cookies:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        for buf, (offset, length) in zip(buffers, reads, strict=True):
            assert buf.to_bytearray() == expected[offset : offset + length]
        assert not h.get_structured_replies_negotiated()  # refused politely; simple replies work
        h.shutdown()
    finally:
        server.stop()


def test_prefault_is_off_by_default_and_holds_its_memory_when_asked(tmp_path: Path) -> None:
    """``--prefault`` faults heap in at start (RSS shows it at once); without it RSS is only what the
    buffer holds, which the memory tests above read."""
    rss = {}
    for name, extra in (("off", ()), ("on", ("--prefault", str(96 * MiB)))):
        (tmp_path / name).mkdir()
        server = DiskServerProcess(tmp_path / name, None, *extra, size=64 * MiB)
        try:
            assert server.proc is not None
            rss[name] = psutil.Process(server.proc.pid).memory_info().rss
        finally:
            server.stop()
    assert rss["on"] - rss["off"] >= 80 * MiB, rss
