"""The control protocol answers every unparsable line with ``bad-request`` and keeps the connection.

A deeply nested JSON line (``RecursionError``), bytes that are not UTF-8, and a line over
``MAX_LINE`` each get one ``ok: false`` reply, and the next request on the same connection is served.
Memory per connection stays bounded by the line limit, however long the line: a child service's
RSS is measured while a 64 MiB line streams in.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from hybridft_common.cli import hybridft_command
from hybridft_common.control import MAX_LINE, ControlError, decode_reply, encode_request, serve_control

MiB = 1 << 20
DEEP = b"[" * 200_000 + b"]" * 200_000  # well under the line limit, far over the recursion limit


async def _dispatch(verb: str, args: dict[str, Any]) -> dict[str, Any]:
    if verb == "echo":
        return {"echo": args}
    raise ControlError(f"unknown verb {verb!r}", "unknown-verb")


def exchange(path: str, chunks: list[bytes], replies: int, pause: float = 0.0) -> list[dict[str, Any]]:
    """Send ``chunks`` (pausing between them), then read ``replies`` reply lines."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(pause)
        f = sock.makefile("rb")
        out = []
        for _ in range(replies):
            line = f.readline()
            assert line, f"connection closed after {len(out)} replies: {out}"
            out.append(json.loads(line))
        return out


@pytest.mark.parametrize(
    "bad",
    [
        DEEP + b"\n",
        b'{"verb":"echo","args":{"deep":' + DEEP + b"}}\n",
        b'{"verb":"echo","args":{"x":"\xff\xfe"}}\n',  # not UTF-8
        b"\xc3\x28\n",
        b'{"verb":"echo","args":{"x":"' + b"a" * (MAX_LINE + 10) + b'"}}\n',  # over the limit
    ],
    ids=["deep-array", "deep-args", "bad-utf8-in-string", "bad-utf8", "over-limit"],
)
def test_every_parse_error_gets_bad_request_and_the_connection_survives(tmp_path: Path, bad: bytes) -> None:
    path = str(tmp_path / "ctl.sock")

    async def main() -> list[dict[str, Any]]:
        server = await serve_control(f"unix:{path}", _dispatch)
        try:
            chunks = [encode_request("echo", {"n": 1}), bad, encode_request("echo", {"n": 2})]
            return await asyncio.to_thread(exchange, path, chunks, 3)
        finally:
            server.close()
            await server.wait_closed()

    first, error, after = asyncio.run(main())
    assert first == {"ok": True, "result": {"echo": {"n": 1}}}
    assert error["ok"] is False and error["code"] == "bad-request"
    assert after == {"ok": True, "result": {"echo": {"n": 2}}}


def test_an_over_limit_line_arriving_in_pieces_is_skipped_to_its_end(tmp_path: Path) -> None:
    """The newline of an over-long line may come long after the limit was passed: the bytes in
    between are dropped as they come, not taken for the next request."""
    path = str(tmp_path / "ctl.sock")
    piece = b"z" * (MAX_LINE // 2)

    async def main() -> list[dict[str, Any]]:
        server = await serve_control(f"unix:{path}", _dispatch)
        try:
            chunks = [
                b'{"verb":"echo","args":{"x":"',
                *[piece] * 5,
                b'"}}\n',
                encode_request("echo", {"n": 3}),
            ]
            return await asyncio.to_thread(exchange, path, chunks, 2, 0.05)
        finally:
            server.close()
            await server.wait_closed()

    error, after = asyncio.run(main())
    assert error["code"] == "bad-request" and "too long" in error["error"]
    assert after == {"ok": True, "result": {"echo": {"n": 3}}}


def test_a_client_rejects_a_deeply_nested_reply_cleanly() -> None:
    with pytest.raises(ControlError) as info:
        decode_reply(DEEP + b"\n")
    assert info.value.code == "protocol"
    with pytest.raises(ControlError) as info:
        decode_reply(b'{"ok":true,"result":"\xff"}\n')
    assert info.value.code == "protocol"


def test_a_64mib_line_keeps_a_service_rss_bounded(tmp_path: Path) -> None:
    """The limit holds in a real service: the line streams through and is dropped."""
    addr = {r: f"unix:{tmp_path / (r + '.sock')}" for r in ("primary", "secondary", "out", "control")}
    cmd = hybridft_command("compare", "serve", "--primary-in", addr["primary"], "--secondary-in",
                           addr["secondary"], "--out", addr["out"], "--control", addr["control"])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        ps = psutil.Process(proc.pid)
        base = peak = ps.memory_info().rss
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(addr["control"][5:])
            done = threading.Event()

            def send() -> None:
                chunk = b"x" * MiB
                try:
                    for _ in range(64):
                        sock.sendall(chunk)
                    sock.sendall(b"\n" + encode_request("stats"))
                finally:
                    done.set()

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            while not done.wait(0.02):
                peak = max(peak, ps.memory_info().rss)
            f = sock.makefile("rb")
            error, stats = json.loads(f.readline()), json.loads(f.readline())
            peak = max(peak, ps.memory_info().rss)
        assert error["code"] == "bad-request"
        assert stats["ok"] and "transport" in stats["result"]
        # the StreamReader holds at most twice the limit before it stops reading, plus one read
        assert peak - base < 8 * MAX_LINE, f"RSS grew by {(peak - base) / MiB:.1f} MiB"
    finally:
        proc.terminate()
        proc.wait(10)
