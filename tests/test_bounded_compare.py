"""A secondary cannot make the comparator keep unbounded memory: the pieces under the shell.

The secondary's bytes that the core keeps (stream bytes the primary has not sent yet, or sent
differently, and frames set aside behind a pending seal) are counted, so that ``compare serve``
can bound them (the flood of a real ``compare serve`` is in tests/test_compare_serve.py); and the
seal's synchronous drain reads what the kernel held, not what a peer keeps sending meanwhile.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

from colo_compare.core import Comparator
from colo_compare.transport import FrameDecoder, FrameSocketReader, tune_socket
from hybridft_common.vocabulary import Mode
from tests.helpers.frames import tcp_frame

MiB = 1 << 20


def test_secondary_frames_set_aside_behind_a_seal_are_counted() -> None:
    """Between a seal and its commit the secondary's frames wait in the core: they count too."""
    core = Comparator(Mode.COLO)
    core.feed_primary([tcp_frame(1, b"p" * 100)], 0.0)
    ahead = [tcp_frame(1, b"q" * 1000, sport=81)]  # a stream the primary has not sent
    core.feed_secondary(ahead, 0.0)
    assert core.secondary_buffered_bytes == 1000  # the payload is what the core keeps
    epoch = core.seal()
    aside = [tcp_frame(1 + 10 * i, b"r" * 10, sport=82) for i in range(5)]
    core.feed_secondary(aside, 0.0)
    assert core.secondary_buffered_bytes == 1000 + sum(map(len, aside))
    core.commit(epoch)  # the re-anchor drops the old bytes; the set-aside frames are compared anew
    assert core.secondary_buffered_bytes == 50


WRITER = """
import socket, struct, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
records = (struct.pack(">I", 1400) + b"x" * 1400) * 256
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    sock.sendall(records)
"""


def test_a_drain_reads_what_the_kernel_holds_not_what_a_writer_keeps_sending() -> None:
    """The seal drains both inputs synchronously, ignoring a pause: a peer that keeps writing must
    not keep the service in that loop, feeding the core past its ceiling."""
    ours, theirs = socket.socketpair()
    tune_socket(ours)
    fd = theirs.fileno()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(fd)], pass_fds=[fd], stderr=subprocess.DEVNULL
    )
    theirs.close()

    async def drain() -> tuple[int, float]:
        # a millisecond per batch stands for the core's work: the writer is faster than we are
        reader = FrameSocketReader(ours, FrameDecoder(), lambda f, h: time.sleep(0.001), lambda why: None)
        await asyncio.sleep(0.5)  # the writer has started and the kernel's buffers are full
        t0 = time.monotonic()
        reader.drain_now()
        elapsed = time.monotonic() - t0
        reader.close()
        return reader.bytes_read, elapsed

    try:
        read, elapsed = asyncio.run(drain())
    finally:
        writer.kill()
        writer.wait()
    assert read <= 16 * MiB, f"the drain read {read / MiB:.0f} MiB in {elapsed:.1f} s"
    assert elapsed < 2
