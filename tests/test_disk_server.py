"""The asyncio NBD server over real unix sockets, with libnbd and raw-socket clients.

These tests exercise the server shell and the protocol (handshake, replies, errors, back-pressure)
against a small in-memory backend defined here (test code only).  The epoch semantics with the real
DiskBuffer are covered by tests/test_disk_qemu.py and tests/test_disk_ctl.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd as libnbd
import pytest

from disk_buffer import nbd
from disk_buffer.nbd import Cmd, Opt, Rep
from disk_buffer.server import NbdServer
from hybridft_common.control import ControlError

SIZE = 4 << 20


class MemoryBackend:
    """Two independent in-memory disks, a room budget, and the DiskBuffer error style."""

    def __init__(self, size: int, budget: int = 1 << 40) -> None:
        self.size = size
        self.disks = {"replica": bytearray(size), "view": bytearray(size)}
        self.budget = budget
        self.used = 0
        self.flushes = 0
        self.fail_next: Exception | None = None
        self._room = asyncio.Event()

    def _check(self, offset: int, length: int) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if offset < 0 or offset + length > self.size:
            raise ControlError("out of range", "range")

    def read(self, export: str, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.disks[export][offset : offset + length])

    def write(self, export: str, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self.disks[export][offset : offset + len(data)] = data
        self.used += len(data)

    def write_zeroes(self, export: str, offset: int, length: int) -> None:
        self._check(offset, length)
        self.disks[export][offset : offset + length] = bytes(length)

    trim = write_zeroes

    def flush(self, export: str) -> None:
        self.flushes += 1

    def has_room(self) -> bool:
        return self.used < self.budget

    async def wait_for_room(self) -> None:
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    def release(self) -> None:
        self.used = 0
        self._room.set()


class ServerThread:
    """An NbdServer on its own event loop thread, so blocking clients can run in the test."""

    def __init__(self, backend: MemoryBackend, path: Path) -> None:
        self.backend = backend
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server: NbdServer | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                self.server = NbdServer(backend, {"replica": "replica", "view": "view"})
                self.listener = await self.server.listen(f"unix:{path}")
                ready.set()

            self.loop.run_until_complete(start())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(60)

    def call(self, fn: Any, *args: Any) -> Any:
        async def wrapper() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(60)

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self.server is not None
            self.listener.close()
            self.server.close_connections()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(MemoryBackend(SIZE), tmp_path / "nbd.sock")
    yield thread
    thread.stop()


def connect(path: Path, export: str) -> libnbd.NBD:
    h = libnbd.NBD()
    h.set_export_name(export)
    h.connect_unix(str(path))
    return h


def test_libnbd_sees_both_exports_with_flags_and_block_size(served: ServerThread) -> None:
    for export in ("replica", "view"):
        h = connect(served.path, export)
        assert h.get_size() == SIZE
        assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
        assert not h.is_read_only() and not h.can_cache() and not h.can_df()
        assert h.get_block_size(libnbd.SIZE_MINIMUM) == 512
        assert h.get_block_size(libnbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(libnbd.SIZE_MAXIMUM) == nbd.MAX_PAYLOAD
        h.shutdown()


def test_list_info_and_go_in_option_mode(served: ServerThread) -> None:
    h = libnbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(served.path))
    names: list[str] = []
    h.opt_list(lambda name, _description: names.append(name) or 0)
    assert sorted(names) == ["replica", "view"]
    h.set_export_name("nope")
    with pytest.raises(libnbd.Error):
        h.opt_info()
    h.set_export_name("view")
    h.opt_info()
    assert h.get_size() == SIZE
    h.opt_go()
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


def test_read_write_zero_trim_flush_round_trip(served: ServerThread) -> None:
    h = connect(served.path, "replica")
    data = bytes(range(256)) * 64
    h.pwrite(data, 8192)
    h.pwrite(b"\x55" * 4096, 0, libnbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 8192) == data
    h.zero(4096, 8192)
    h.zero(512, 12288, libnbd.CMD_FLAG_NO_HOLE)
    assert h.pread(8192, 8192) == bytes(4608) + data[4608:8192]
    h.trim(512, 0)
    assert h.pread(512, 0) == bytes(512)
    flushes = served.backend.flushes
    h.flush()
    assert served.backend.flushes == flushes + 1
    h.shutdown()
    assert served.backend.disks["replica"][8192 + 8192 : 8192 + len(data)] == data[8192:]
    assert served.backend.disks["view"] == bytes(SIZE)


def test_many_in_flight_commands_on_two_connections(served: ServerThread) -> None:
    handles = [connect(served.path, "replica") for _ in range(2)]
    cookies = []
    for i in range(64):
        h = handles[i % 2]
        cookies.append((h, h.aio_pwrite(bytes([i]) * 4096, i * 4096)))
    for h, cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    for i in range(64):
        assert handles[0].pread(4096, i * 4096) == bytes([i]) * 4096


def test_out_of_range_requests_get_protocol_errors(served: ServerThread) -> None:
    h = connect(served.path, "view")
    h.set_strict_mode(0)  # let the bad requests reach the server
    with pytest.raises(libnbd.Error) as read_err:
        h.pread(1024, SIZE - 512)
    assert read_err.value.errnum == nbd.EINVAL
    with pytest.raises(libnbd.Error) as write_err:
        h.pwrite(bytes(1024), SIZE - 512)
    assert write_err.value.errnum == nbd.ENOSPC
    with pytest.raises(libnbd.Error) as trim_err:
        h.trim(1024, SIZE)
    assert trim_err.value.errnum == nbd.EINVAL
    with pytest.raises(libnbd.Error) as unaligned:
        h.pwrite(bytes(100), 3)
    assert unaligned.value.errnum == nbd.EINVAL
    # the connection stays usable and nothing was written
    assert h.pread(512, SIZE - 512) == bytes(512)
    assert served.backend.disks["view"] == bytes(SIZE)


def test_backend_refusal_becomes_error_reply(served: ServerThread) -> None:
    h = connect(served.path, "replica")
    served.backend.fail_next = ControlError("no room", "nospace")
    with pytest.raises(libnbd.Error) as exc:
        h.pwrite(bytes(512), 0)
    assert exc.value.errnum == nbd.ENOSPC
    served.backend.fail_next = OSError(5, "disk on fire")
    with pytest.raises(libnbd.Error) as exc:
        h.pread(512, 0)
    assert exc.value.errnum == nbd.EIO
    h.pwrite(b"\x01" * 512, 0)
    assert h.pread(512, 0) == b"\x01" * 512


class RawClient:
    """A hand-rolled client to send what libnbd refuses to send."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        assert self.recv(18)[:8] == b"NBDMAGIC"

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def go(self, export: str = "replica", infos: tuple[int, ...] = (nbd.Info.BLOCK_SIZE,)) -> None:
        self.sock.sendall(struct.pack(">I", 3) + nbd.encode_go(export, infos))
        while True:
            _option, reply, length = nbd.decode_option_reply(self.recv(20))
            self.recv(length)
            if reply == Rep.ACK:
                return
            assert reply == Rep.INFO

    def request(
        self,
        command: int,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> tuple[int, int]:
        self.sock.sendall(nbd.encode_request(command, cookie, offset, length, flags) + payload)
        return nbd.decode_simple_reply(self.recv(16))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_malformed_handshake_closes_only_that_connection(served: ServerThread) -> None:
    good = connect(served.path, "replica")
    bad = RawClient(served.path)
    bad.sock.sendall(struct.pack(">I", 3) + b"BADMAGIC" + bytes(8))
    assert bad.closed()
    unknown = RawClient(served.path)
    unknown.sock.sendall(struct.pack(">I", 3) + nbd.encode_option(Opt.EXPORT_NAME, b"nope"))
    assert unknown.closed()
    good.pwrite(b"\x07" * 512, 0)
    assert good.pread(512, 0) == b"\x07" * 512


def test_abort_and_structured_reply_refusal(served: ServerThread) -> None:
    client = RawClient(served.path)
    client.sock.sendall(
        struct.pack(">I", 3) + nbd.encode_option(Opt.STRUCTURED_REPLY) + nbd.encode_option(Opt.ABORT)
    )
    _option, reply, length = nbd.decode_option_reply(client.recv(20))
    assert reply == Rep.ERR_UNSUP
    client.recv(length)
    assert client.recv(20) == nbd.option_reply(Opt.ABORT, Rep.ACK)
    assert client.closed()


def test_unknown_command_oversized_write_and_bad_magic(served: ServerThread) -> None:
    client = RawClient(served.path)
    client.go()
    assert client.request(99, 1, 0, 512) == (nbd.EINVAL, 1)
    assert client.request(Cmd.BLOCK_STATUS, 2, 0, 512) == (nbd.EINVAL, 2)
    big = nbd.MAX_PAYLOAD + 4096
    assert client.request(Cmd.WRITE, 3, 0, big, payload=b"\xaa" * big) == (nbd.EINVAL, 3)
    assert client.request(Cmd.FLUSH, 4, 512, 0) == (nbd.EINVAL, 4)
    assert client.request(Cmd.READ, 5, 0, 512) == (0, 5)
    assert client.recv(512) == bytes(512)  # the oversized write wrote nothing
    client.sock.sendall(b"\x00" * 28)
    assert client.closed()
    assert served.backend.disks["replica"] == bytes(SIZE)


def test_disc_closes_after_pending_replies(served: ServerThread) -> None:
    client = RawClient(served.path)
    client.go("view")
    write = nbd.encode_request(Cmd.WRITE, 1, 0, 512) + b"\x09" * 512
    client.sock.sendall(write + nbd.encode_request(Cmd.DISC, 2))
    assert nbd.decode_simple_reply(client.recv(16)) == (0, 1)
    assert client.closed()
    assert served.backend.disks["view"][:512] == b"\x09" * 512


def test_back_pressure_pauses_until_room(served: ServerThread) -> None:
    served.backend.budget = 8192
    h = connect(served.path, "replica")
    h.pwrite(b"\x01" * 8192, 0)  # fills the budget: the server stops taking requests
    cookie = h.aio_pwrite(b"\x02" * 4096, 8192)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        h.poll(50)
        assert not h.aio_command_completed(cookie)
    assert served.backend.disks["replica"][8192] == 0
    served.call(served.backend.release)
    while not h.aio_command_completed(cookie):
        h.poll(1000)
    assert h.pread(4096, 8192) == b"\x02" * 4096


def test_byte_granular_requests_from_clients_that_did_not_ask_for_block_sizes(served: ServerThread) -> None:
    export_name_client = RawClient(served.path)
    export_name_client.sock.sendall(struct.pack(">I", 3) + nbd.encode_option(Opt.EXPORT_NAME, b"view"))
    assert struct.unpack(">Q", export_name_client.recv(10)[:8]) == (SIZE,)
    assert export_name_client.request(Cmd.WRITE, 1, 3, 5, payload=b"hello") == (0, 1)
    assert export_name_client.request(Cmd.READ, 2, 0, 10) == (0, 2)
    assert export_name_client.recv(10) == b"\0\0\0hello\0\0"
    plain_go = RawClient(served.path)
    plain_go.go("view", ())
    assert plain_go.request(Cmd.WRITE_ZEROES, 3, 4, 2) == (0, 3)
    assert served.backend.disks["view"][:10] == b"\0\0\0h\0\0lo\0\0"
    strict = RawClient(served.path)
    strict.go("view")  # asked for block sizes: must honour the 512-byte minimum
    assert strict.request(Cmd.WRITE, 4, 3, 5, payload=b"nope!") == (nbd.EINVAL, 4)
