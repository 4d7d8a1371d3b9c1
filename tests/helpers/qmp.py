"""A minimal synchronous QMP client for tests that poke one QEMU monitor a few times.

The project's own QMP sessions are asyncio (``qemu.qmp``); a test that only needs to add or delete a
filter between two steps is clearer with one blocking connection.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path


def qmp_commands(path: Path, *commands: dict[str, object]) -> list[dict[str, object]]:
    """Run ``commands`` in order on one connection (events skipped); their replies, each a success."""
    replies = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for command in [{"execute": "qmp_capabilities"}, *commands]:
            f.write(json.dumps(command).encode() + b"\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
            assert "return" in reply, reply
            replies.append(reply)
    return replies[1:]
