"""A fixed micro-benchmark of the disk server's request path, without sockets: the server's own cost.

Why: on a 2-core machine the NBD client and the server share the cores, and the end-to-end
``bench disk`` numbers move by 20 % between runs.  This module feeds prebuilt pipelined 4 KiB
``NBD_CMD_WRITE`` requests (random offsets, ``--qd`` per receive, as a client with that queue depth
delivers them) straight into :class:`disk_buffer.server.NbdConnection` over a real
:class:`disk_buffer.buffer.DiskBuffer` (journal thread included), with a transport that only counts
replies.  What it measures is everything the server does per request except the socket system calls.

``python -m bench.disk_micro`` prints microseconds per request (process CPU, every thread, and wall);
``--callgrind`` runs it under callgrind for N and for 2N requests and prints the difference per
request: instructions, which a loaded machine does not disturb.  (A difference of two full runs, not
a run minus a setup-only run: whatever the first requests import or compile lazily is in both.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
CMD_WRITE = 1
BLOCK = 4096
IMAGE_SIZE = 1 << 30
DISTINCT_RECEIVES = 64  # prebuilt receives, reused round robin (offsets differ between them)


class CountingTransport:
    """The part of an asyncio transport the request path uses; it keeps nothing."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def writelines(self, chunks: Any) -> None:
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def receives(qd: int, seed: int = 1) -> list[bytes]:
    """``DISTINCT_RECEIVES`` byte strings of ``qd`` pipelined 4 KiB writes each."""
    rng = random.Random(seed)
    payload = rng.randbytes(BLOCK)
    out = []
    for _ in range(DISTINCT_RECEIVES):
        chunk = b"".join(
            REQUEST.pack(
                REQUEST_MAGIC, 0, CMD_WRITE, cookie, rng.randrange(IMAGE_SIZE // BLOCK) * BLOCK, BLOCK
            )
            + payload
            for cookie in range(qd)
        )
        out.append(chunk)
    return out


async def run(requests: int, qd: int) -> dict[str, Any]:
    from disk_buffer.buffer import DiskBuffer
    from disk_buffer.server import NbdConnection, NbdServer
    from disk_buffer.store import Export

    with tempfile.TemporaryDirectory(
        prefix="hft-disk-micro-", dir=os.environ.get("TMPDIR", "/var/tmp")
    ) as tmp:
        image = Path(tmp) / "image.raw"
        with image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        buffer = DiskBuffer.open(
            image, Path(tmp) / "state", speculation_budget=8 << 30, writeout_budget=8 << 30
        )
        try:
            connection = NbdConnection(NbdServer(buffer, {"replica": Export.REPLICA}))
            transport = CountingTransport()
            # past the handshake: attached to `replica`, byte-granular (no block size asked for)
            connection.transport = transport  # type: ignore[assignment]
            connection.handshake = None
            connection.export = Export.REPLICA
            connection.min_block = 1
            chunks = receives(qd)
            batches = requests // qd
            cpu, wall = time.process_time(), time.perf_counter()
            for k in range(batches):
                data = chunks[k % DISTINCT_RECEIVES]
                view = connection.get_buffer(len(data))
                view[: len(data)] = data
                connection.buffer_updated(len(data))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            done = batches * qd
            return {
                "requests": done,
                "qd": qd,
                "reply_writes": transport.writes,
                "cpu_us_per_request": round(cpu / done * 1e6, 3) if done else None,
                "wall_us_per_request": round(wall / done * 1e6, 3) if done else None,
            }
        finally:
            buffer.close()


def callgrind(requests: int, qd: int) -> dict[str, Any]:
    """Instructions per request: a run of 2N requests minus a run of N, both under callgrind."""

    def instructions(count: int) -> int:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
             "bench.disk_micro", "--requests", str(count), "--qd", str(qd)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count from callgrind: {proc.stderr[-500:]}")
        return int(found.group(1))

    per_request = (instructions(2 * requests) - instructions(requests)) / requests
    return {"requests": requests, "qd": qd, "instructions_per_request": round(per_request)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disk_micro", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--qd", type=int, default=16, help="requests per receive (the client's queue depth)")
    parser.add_argument("--callgrind", action="store_true", help="instructions per request (deterministic)")
    args = parser.parse_args(argv)
    if args.callgrind:
        print(json.dumps(callgrind(args.requests, args.qd)))
    else:
        print(json.dumps(asyncio.run(run(args.requests, args.qd))))


if __name__ == "__main__":
    main()
