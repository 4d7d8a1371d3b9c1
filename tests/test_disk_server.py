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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd as libnbd
import pytest

from disk_buffer import nbd
from disk_buffer.nbd import Cmd, Opt, Rep
from disk_buffer.server import NbdServer
from disk_buffer.store import WriteBatchError
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
        self.batches: list[int] = []  # the size of each write_many batch (the server's fast path)
        self.refuse_offsets: set[int] = set()  # writes there are refused with ENOSPC
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
        if offset in self.refuse_offsets:
            raise ControlError("no room", "nospace")
        self.disks[export][offset : offset + len(data)] = data
        self.used += len(data)

    def write_many(self, export: str, offsets: list[int], payloads: list[bytes]) -> None:
        self.batches.append(len(offsets))
        for i, (offset, data) in enumerate(zip(offsets, payloads, strict=True)):
            try:
                self.write(export, offset, data)
            except Exception as exc:
                raise WriteBatchError(i, exc) from None

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

    def __init__(self, backend: MemoryBackend, path: Path, poll_ns: int = 0) -> None:
        self.backend = backend
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server: NbdServer | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                self.server = NbdServer(backend, {"replica": "replica", "view": "view"}, poll_ns=poll_ns)
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


def test_pipelined_writes_are_batched_and_each_gets_its_own_answer(served: ServerThread) -> None:
    """The fast path takes runs of plain writes as one batch; a refused write in the middle gets its
    error, the writes around it are applied, and a FUA write still takes the one-by-one path."""
    served.backend.refuse_offsets = {1024}
    client = RawClient(served.path)
    client.go()
    burst = b""
    for cookie, offset, flags in [
        (1, 0, 0),
        (2, 512, 0),
        (3, 1024, 0),
        (4, 1536, 0),
        (5, 2048, 1),
        (6, 2560, 0),
    ]:
        burst += nbd.encode_request(Cmd.WRITE, cookie, offset, 512, flags) + bytes([cookie]) * 512
    client.sock.sendall(burst)
    answers = [nbd.decode_simple_reply(client.recv(16)) for _ in range(6)]
    assert answers == [(0, 1), (0, 2), (nbd.ENOSPC, 3), (0, 4), (0, 5), (0, 6)]
    disk = served.backend.disks["replica"]
    assert [disk[i * 512] for i in range(6)] == [1, 2, 0, 4, 5, 6]
    assert max(served.backend.batches) >= 2, served.backend.batches


def test_a_batch_with_two_refused_writes_answers_each_in_place(served: ServerThread) -> None:
    """Two refusals in one batch: after each the rest of the batch is tried again, and every write
    gets its own answer, as one call per write would have given."""
    served.backend.refuse_offsets = {512, 1536}
    client = RawClient(served.path)
    client.go()
    burst = b"".join(
        nbd.encode_request(Cmd.WRITE, cookie, (cookie - 1) * 512, 512) + bytes([cookie]) * 512
        for cookie in range(1, 6)
    )
    client.sock.sendall(burst)
    answers = sorted(nbd.decode_simple_reply(client.recv(16)) for _ in range(5))
    assert answers == sorted([(0, 1), (nbd.ENOSPC, 2), (0, 3), (nbd.ENOSPC, 4), (0, 5)])
    disk = served.backend.disks["replica"]
    assert [disk[i * 512] for i in range(5)] == [1, 0, 3, 0, 5]


def test_a_polling_connection_catches_the_next_request_and_backs_off_when_it_does_not_come(
    tmp_path: Path,
) -> None:
    """With a window far above the client's gap, the spin after each answer sees the next request:
    nearly every poll hits, and every write lands.  A client slower than the window gets a few
    missed spins, then none for a back-off period, so a quiet client costs almost nothing."""
    served = ServerThread(MemoryBackend(SIZE), tmp_path / "nbd.sock", poll_ns=20_000_000)
    try:
        assert served.server is not None
        counters = served.server.poll_counters
        h = connect(served.path, "replica")
        for i in range(200):
            h.pwrite(bytes([i % 251 + 1]) * 512, i * 512)
        disk = served.backend.disks["replica"]
        assert [disk[i * 512] for i in range(200)] == [i % 251 + 1 for i in range(200)]
        hits = served.call(lambda: counters.hits)
        assert hits >= 190, counters
        assert served.call(lambda: counters.back_offs) == 0

        served.server.poll_ns = 1_000_000  # new connections: a 1 ms window
        slow = connect(served.path, "view")
        polls_before = served.call(lambda: counters.polls)
        for i in range(40):  # one write every 5 ms: every spin would miss
            slow.pwrite(b"\x07" * 512, i * 512)
            time.sleep(0.005)
        slow_polls = served.call(lambda: counters.polls) - polls_before
        assert served.call(lambda: counters.back_offs) >= 2, counters
        assert slow_polls <= 20, (slow_polls, counters)
        h.shutdown()
        slow.shutdown()
    finally:
        served.stop()


def test_no_spinning_without_a_window(served: ServerThread) -> None:
    h = connect(served.path, "replica")
    for i in range(20):
        h.pwrite(b"\x01" * 512, i * 512)
    assert served.server is not None
    assert served.server.poll_counters.polls == 0


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


# --- one peer cannot make the server hold unbounded memory or connections ----------------------
# A READ is the one request whose reply is bigger than the request: a peer that pipelines READs
# and never reads must cost the server its reply budget, not the sum of its replies.  These tests
# count the reads the backend executed; tests/test_bounded_nbd.py measures a real server's RSS.
# Settings are set on the running server (not passed to NbdServer) so that they run, and fail,
# against a server without them too.

MIB = 1 << 20


class CountingBackend(MemoryBackend):
    """Counts the reads the server executed (a read is where the reply's memory comes from)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads = 0
        for name, disk in self.disks.items():  # distinct bytes everywhere: replies are checked
            disk[:] = (bytes(range(256)) + name.encode()) * (size // (256 + len(name))) + bytes(
                size % (256 + len(name))
            )

    def read(self, export: str, offset: int, length: int) -> bytes:
        self.reads += 1
        return super().read(export, offset, length)


def start_with(tmp_path: Path, backend: MemoryBackend, **settings: object) -> ServerThread:
    served = ServerThread(backend, tmp_path / "nbd.sock")
    for name, value in settings.items():
        served.call(setattr, served.server, name, value)
    return served


def settled(count: Callable[[], int], quiet: float = 0.5, limit: float = 10.0) -> int:
    """Wait until ``count()`` is positive and has not changed for ``quiet`` seconds; return it."""
    deadline = time.monotonic() + limit
    while count() == 0:
        assert time.monotonic() < deadline, "the server never started on the requests"
        time.sleep(0.01)
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def slow_reader(path: Path) -> RawClient:
    client = RawClient(path)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.go()
    return client


def read_replies(client: RawClient, backend: MemoryBackend, requests: list[tuple[int, int]]) -> None:
    disk = backend.disks["replica"]
    for cookie, (offset, length) in enumerate(requests):
        assert nbd.decode_simple_reply(client.recv(16)) == (0, cookie)
        assert client.recv(length) == disk[offset : offset + length]


@pytest.mark.parametrize(("length", "count", "budget"), [(MIB, 64, 4 * MIB), (4096, 4096, MIB)])
def test_pipelined_reads_stop_at_the_reply_budget_until_the_client_reads(
    tmp_path: Path, length: int, count: int, budget: int
) -> None:
    backend = CountingBackend(8 * MIB)
    served = start_with(tmp_path, backend, reply_budget=budget)
    try:
        client = slow_reader(served.path)
        requests = [((i * length * 7) % (backend.size - length) // 512 * 512, length) for i in range(count)]
        client.sock.sendall(
            b"".join(nbd.encode_request(Cmd.READ, i, o, n) for i, (o, n) in enumerate(requests))
        )
        executed = settled(lambda: backend.reads)
        # the budget, plus the reply that crossed it, plus what the kernel's socket buffers took
        assert executed * length <= budget + 2 * MIB, f"{executed} reads of {length} executed"
        read_replies(client, backend, requests)  # reading resumes the rest, in order, intact
        assert backend.reads == count
        assert client.request(Cmd.READ, count, 0, 512) == (0, count)
        assert client.recv(512) == backend.disks["replica"][:512]
    finally:
        served.stop()


def test_read_longer_than_the_advertised_maximum_gets_einval_and_nothing_is_read(tmp_path: Path) -> None:
    backend = CountingBackend(SIZE)
    served = start_with(tmp_path, backend, max_payload=MIB)
    try:
        h = connect(served.path, "replica")
        assert h.get_block_size(libnbd.SIZE_MAXIMUM) == MIB  # what the client is told is enforced
        h.shutdown()
        client = RawClient(served.path)
        client.go()
        assert client.request(Cmd.READ, 1, 0, MIB + 512) == (nbd.EINVAL, 1)
        assert client.request(Cmd.READ, 2, 0, 0xFFFFFE00) == (nbd.EINVAL, 2)
        assert backend.reads == 0
        assert client.request(Cmd.READ, 3, 0, MIB) == (0, 3)  # the connection carries on
        assert client.recv(MIB) == backend.disks["replica"][:MIB]
    finally:
        served.stop()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_silent_or_stalled_handshake_is_dropped(tmp_path: Path) -> None:
    served = start_with(tmp_path, MemoryBackend(SIZE), handshake_timeout=0.5)
    try:
        attached = connect(served.path, "replica")
        silent = RawClient(served.path)  # reads the greeting, then says nothing
        stalled = RawClient(served.path)  # stops in the middle of an option header
        stalled.sock.sendall(struct.pack(">I", 3) + nbd.encode_go("replica")[:10])
        t0 = time.monotonic()
        assert closed_within(silent.sock, 5) and closed_within(stalled.sock, 5)
        assert time.monotonic() - t0 >= 0.3  # dropped by the timer, not at once
        time.sleep(0.6)  # a finished handshake is not on the clock any more
        attached.pwrite(b"\x05" * 512, 0)
        assert attached.pread(512, 0) == b"\x05" * 512
    finally:
        served.stop()


def test_connections_beyond_the_limit_are_refused_and_the_others_carry_on(tmp_path: Path) -> None:
    served = start_with(tmp_path, MemoryBackend(SIZE), max_connections=2)
    try:
        first, second = connect(served.path, "replica"), connect(served.path, "view")
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(str(served.path))
        assert closed_within(extra, 5)  # closed before the greeting
        with pytest.raises(libnbd.Error):
            connect(served.path, "replica")
        first.pwrite(b"\x01" * 512, 0)
        second.pwrite(b"\x02" * 512, 0)
        assert first.pread(512, 0) == b"\x01" * 512 and second.pread(512, 0) == b"\x02" * 512
        second.shutdown()
        deadline = time.monotonic() + 5
        while True:  # the server notices the closed connection within a loop turn or two
            try:
                third = connect(served.path, "view")
                break
            except libnbd.Error:
                assert time.monotonic() < deadline, "a slot was never freed"
                time.sleep(0.05)
        assert third.pread(512, 0) == b"\x02" * 512
    finally:
        served.stop()
