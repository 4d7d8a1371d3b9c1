"""The shared address syntax and JSON-lines control protocol, over real unix and TCP sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from hybridft_common.control import AsyncControlClient, ControlError, call, serve_control
from hybridft_common.endpoints import Endpoint, parse_endpoint
from tests.helpers.tls import make_creds, tls_connect


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/tmp/x.sock", Endpoint("unix", path="/tmp/x.sock")),
        ("tcp:127.0.0.1:10809", Endpoint("tcp", host="127.0.0.1", port=10809)),
        ("tcp:[::1]:7", Endpoint("tcp", host="::1", port=7)),
        ("tcp:localhost:0", Endpoint("tcp", host="localhost", port=0)),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected
    assert parse_endpoint(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "unix:", "tcp:host", "tcp:host:port", "tcp:h:70000", "udp:h:1", "tcp:[::1]7", "/tmp/sock"]
)
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad address"):
        parse_endpoint(text)


async def _dispatch(verb: str, args: dict[str, Any]) -> dict[str, Any]:
    if verb == "echo":
        return {"echo": args}
    raise ControlError(f"unknown verb {verb!r}", "unknown-verb")


def test_control_roundtrip_unix(tmp_path: Any) -> None:
    path = str(tmp_path / "ctl.sock")

    async def main() -> None:
        server = await serve_control(f"unix:{path}", _dispatch)
        client = AsyncControlClient(f"unix:{path}")
        assert await client.call("echo", n=1) == {"echo": {"n": 1}}
        with pytest.raises(ControlError) as info:
            await client.call("nope")
        assert info.value.code == "unknown-verb"
        # the connection survives a refused request
        assert await client.call("echo") == {"echo": {}}
        # the blocking client (used by CLIs) from a thread
        assert await asyncio.to_thread(call, f"unix:{path}", "echo", x="y") == {"echo": {"x": "y"}}
        await client.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_control_malformed_lines_tcp(tmp_path: Path) -> None:
    creds = make_creds(tmp_path)

    async def main() -> None:
        server = await serve_control(f"tcp:127.0.0.1:0,tls-creds={creds.host}", _dispatch)
        port = server.sockets[0].getsockname()[1]

        def raw() -> list[dict[str, Any]]:
            with tls_connect(port, creds.client_context()) as s:
                s.sendall(
                    b'not json\n[1,2]\n{"verb": 3}\n{"verb":"echo","args":[]}\n'
                    b'{"verb":"echo","args":{"a":1}}\n'
                )
                f = s.makefile("rb")
                return [json.loads(f.readline()) for _ in range(5)]

        replies = await asyncio.to_thread(raw)
        assert [r["ok"] for r in replies] == [False, False, False, False, True]
        assert all(r["code"] == "bad-request" for r in replies[:4])
        assert replies[4]["result"] == {"echo": {"a": 1}}
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_call_passes_a_timeout_argument_to_the_verb(tmp_path: Any) -> None:
    """``timeout`` is a verb argument (e.g. next-request's long poll), not the socket timeout."""
    path = str(tmp_path / "ctl.sock")

    async def main() -> None:
        server = await serve_control(f"unix:{path}", _dispatch)
        result = await asyncio.to_thread(call, f"unix:{path}", "echo", io_timeout=5, timeout=0.5)
        assert result == {"echo": {"timeout": 0.5}}
        server.close()
        await server.wait_closed()

    asyncio.run(main())
