"""The guest's C programs and the host-side helpers that check their output, run on the host.

The programs are static Linux binaries, so they run here unchanged; network ones run inside a fresh
network namespace (loopback only, no port conflicts). The in-guest behaviour is in test_guest_boot.py.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mc_driver.guest.errors import GuestError
from mc_driver.guest.expected import (
    DISKWRITER_PORT,
    DiskWriterReports,
    Token,
    TokenReplies,
    disk_record,
    read_disk_records,
    stream_bytes,
)
from mc_driver.guest.image import PROGRAMS, SRC_DIR
from mc_driver.netns import NetNamespace


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bins")
    procs = {
        p: subprocess.Popen(
            ["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(out / p), str(SRC_DIR / f"{p}.c")]
        )
        for p in PROGRAMS
    }
    for name, proc in procs.items():
        assert proc.wait() == 0, f"{name}.c does not compile cleanly"
    return {p: out / p for p in PROGRAMS}


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    with NetNamespace() as n:
        yield n


def _wait_port(ns: NetNamespace, port: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with ns.entered():
            s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            s.close()
            return
        except ConnectionRefusedError:
            s.close()
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


def _connect(ns: NetNamespace, port: int) -> socket.socket:
    with ns.entered():
        return socket.create_connection(("127.0.0.1", port), timeout=10)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = s.recv(min(1 << 20, n - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def test_blobgen_matches_the_host_stream(bins: dict[str, Path]) -> None:
    out = subprocess.run([bins["blobgen"], str(1 << 20)], capture_output=True, check=True).stdout
    assert out == stream_bytes(1 << 20)
    odd = subprocess.run([bins["blobgen"], "13", "7"], capture_output=True, check=True).stdout
    assert odd == stream_bytes(13, seed=7) and odd != stream_bytes(13)
    assert len(set(stream_bytes(4096))) > 200  # not a constant or short cycle


@pytest.mark.netns
def test_echod_echoes_many_concurrent_connections_exactly(bins: dict[str, Path], ns: NetNamespace) -> None:
    ns.popen([str(bins["echod"]), "7007"])
    _wait_port(ns, 7007)
    conns = [_connect(ns, 7007) for _ in range(100)]
    payloads = [os.urandom(50_000 + 997 * i) for i in range(len(conns))]
    results: list[bytes] = [b""] * len(conns)

    def reader(i: int) -> None:
        results[i] = _recv_exactly(conns[i], len(payloads[i]))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for c, p in zip(conns, payloads, strict=True):
        for off in range(0, len(p), 50_000):  # interleave the writers
            c.sendall(p[off : off + 50_000])
    for t in threads:
        t.join(timeout=30)
    assert results == payloads
    for c in conns:
        c.close()


@pytest.mark.netns
def test_echod_applies_back_pressure_to_a_client_that_does_not_read(
    bins: dict[str, Path], ns: NetNamespace
) -> None:
    ns.popen([str(bins["echod"]), "7007"])
    _wait_port(ns, 7007)
    c = _connect(ns, 7007)
    payload = os.urandom(8 << 20)
    sender = threading.Thread(target=c.sendall, args=(payload,))
    sender.start()
    time.sleep(0.5)  # the server now has to stop reading: our receive buffer is full
    assert _recv_exactly(c, len(payload)) == payload
    sender.join(timeout=10)
    c.close()


@pytest.mark.netns
def test_rrserver_answers_prefixes_of_the_stream_and_rejects_bad_requests(
    bins: dict[str, Path], ns: NetNamespace
) -> None:
    ns.popen([str(bins["rrserver"]), "8008"])
    _wait_port(ns, 8008)
    c = _connect(ns, 8008)
    for n in (1, 0, 8, 13, 100_000, 1 << 20):
        c.sendall(f"{n}\n".encode())
        assert _recv_exactly(c, n) == stream_bytes(n)
    c.close()
    bad = _connect(ns, 8008)
    bad.sendall(b"12x\n")
    bad.shutdown(socket.SHUT_WR)
    assert _recv_exactly(bad, 100) == b"ERR\n"  # then closed
    bad.close()
    huge = _connect(ns, 8008)
    huge.sendall(b"99999999999\n")
    huge.shutdown(socket.SHUT_WR)
    assert _recv_exactly(huge, 100) == b"ERR\n"
    huge.close()


def _tokens(s: socket.socket, replies: TokenReplies, n: int) -> list[Token]:
    got: list[Token] = []
    while len(got) < n:
        data = s.recv(65536)
        assert data, f"tokend closed the connection after {len(got)} of {n} tokens"
        got += replies.feed(data)
    return got


@pytest.mark.netns
def test_tokend_answers_every_request_line_with_a_new_token_from_the_clock(
    bins: dict[str, Path], ns: NetNamespace
) -> None:
    ns.popen([str(bins["tokend"]), "9090"])
    _wait_port(ns, 9090)
    c = _connect(ns, 9090)
    replies = TokenReplies()
    one_by_one = []
    for i in range(20):
        c.sendall(f"request {i}\n".encode())
        one_by_one += _tokens(c, replies, 1)
    assert [t.seq for t in one_by_one] == list(range(1, 21))
    assert all(a.ns < b.ns for a, b in itertools.pairwise(one_by_one))  # a round trip apart
    assert abs(one_by_one[-1].ns - time.time_ns()) < 5e9  # CLOCK_REALTIME, the host's clock here
    # pipelined lines (any content, empty too) are each answered, in order; a partial line waits
    c.sendall(b"x\n" * 999 + b"\n" + b"no newline yet")
    assert [t.seq for t in _tokens(c, replies, 1000)] == list(range(21, 1021))
    c.sendall(b"... now\n")
    assert [t.seq for t in _tokens(c, replies, 1)] == [1021]
    # every connection draws from the same sequence: no two answers of the service are alike
    other = _connect(ns, 9090)
    other.sendall(b"\n")
    assert [t.seq for t in _tokens(other, TokenReplies(), 1)] == [1022]
    c.close()
    other.close()


SERVICE_REQUESTS = {  # a request, and how its whole answer ends
    "tokend": (b"\n", b"\n"),
    "rrserver": (b"8\n", stream_bytes(8)),
    "blobd": (b"GET /bytes/8 HTTP/1.1\r\nHost: x\r\n\r\n", stream_bytes(8)),
}


@pytest.mark.netns
@pytest.mark.parametrize("program", SERVICE_REQUESTS)
def test_a_terminated_service_closes_its_open_connections_and_refuses_new_ones(
    bins: dict[str, Path], ns: NetNamespace, program: str
) -> None:
    """What the guest's ``stop SERVICE`` relies on: SIGTERM to the listener ends the whole service."""
    proc = ns.popen([str(bins[program]), "9091"])
    _wait_port(ns, 9091)
    c = _connect(ns, 9091)
    # a whole answer proves the connection has its own process, which must end too
    request, answer_end = SERVICE_REQUESTS[program]
    c.sendall(request)
    answer = b""
    while not answer.endswith(answer_end):
        data = c.recv(4096)
        assert data
        answer += data
    proc.terminate()
    assert proc.wait(timeout=5) == 0
    try:
        assert c.recv(4096) == b""  # the connection's process ended with the listener
    except ConnectionResetError:
        pass
    c.close()
    with pytest.raises(ConnectionRefusedError), ns.entered():
        socket.create_connection(("127.0.0.1", 9091), timeout=5)


def test_token_reply_parser() -> None:
    r = TokenReplies()
    assert r.feed(b"TOKEN 1 100\nTOKEN 2 1") == [Token(1, 100)]
    assert r.feed(b"00\n") == [Token(2, 100)]  # the same nanosecond is possible on a coarse clock
    for bad, match in ((b"TOKEN 2 200\n", "after"), (b"TOKEN 3 99\n", "after"),
                       (b"TOKEN x 1\n", "unexpected"), (b"TOKEN 3 1 2\n", "unexpected"),
                       (b"3 1\n", "unexpected")):  # fmt: skip
        with pytest.raises(GuestError, match=match):
            TokenReplies(list(r.tokens)).feed(bad)


def _start_diskwriter(ns: NetNamespace, binary: Path, *args: str) -> None:
    """Start diskwriter and wait for its banner (printed once it listens); a probe connection would be
    its first client and take the first records with it."""
    proc = ns.popen([str(binary), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("diskwriter: ")


@pytest.mark.netns
def test_blobd_serves_deterministic_answers_on_a_persistent_connection(
    bins: dict[str, Path], ns: NetNamespace
) -> None:
    import http.client

    ns.popen([str(bins["blobd"]), "8088"])
    _wait_port(ns, 8088)
    with ns.entered():
        conn = http.client.HTTPConnection("127.0.0.1", 8088, timeout=10)
        conn.connect()
    first_sock = conn.sock
    answers = []
    for path in ("/blob", "/bytes/0", "/bytes/13", "/nope", "/bytes/99999999999"):
        conn.request("GET", path)
        resp = conn.getresponse()
        answers.append((resp.status, resp.read(), dict(resp.getheaders())))
    assert conn.sock is first_sock  # one keep-alive connection for all requests
    assert [a[0] for a in answers] == [200, 200, 200, 404, 404]
    assert answers[0][1] == stream_bytes(8 << 20)
    assert answers[1][1] == b"" and answers[2][1] == stream_bytes(13)
    assert not any(h in answers[0][2] for h in ("Date", "Last-Modified", "ETag"))
    conn.request("POST", "/blob", body=b"")
    assert conn.getresponse().status == 405
    conn.close()
    raw = _connect(ns, 8088)
    raw.sendall(b"garbage\r\n\r\nmore")
    raw.shutdown(socket.SHUT_WR)
    assert _recv_exactly(raw, 1000).startswith(b"HTTP/1.1 400 ")
    raw.close()
    closing = _connect(ns, 8088)
    closing.sendall(b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = _recv_exactly(closing, 1000)  # ends when the server closes
    closing.close()
    assert reply.endswith(b"\r\n\r\n" + stream_bytes(5)) and b"Connection: close" in reply


def _read_reports(s: socket.socket) -> DiskWriterReports:
    reports = DiskWriterReports()
    while reports.finished is None:
        data = s.recv(65536)
        if not data:
            break
        reports.feed(data)
    return reports


@pytest.mark.netns
def test_diskwriter_reports_only_durable_records_and_they_verify(
    bins: dict[str, Path], ns: NetNamespace, tmp_path: Path
) -> None:
    dev = tmp_path / "disk.img"
    dev.write_bytes(b"\0" * (1 << 20))
    _start_diskwriter(ns, bins["diskwriter"], str(dev), "--port", "9009", "--count", "60")
    c = _connect(ns, 9009)
    reports = _read_reports(c)
    c.close()
    assert reports.finished == "DONE"
    assert reports.run is not None
    assert reports.durable == list(range(1, 61))
    on_disk = read_disk_records(dev.read_bytes(), reports.run)
    assert set(reports.durable) <= on_disk == set(range(1, 61))
    # a torn record and a record of another run do not verify
    data = bytearray(dev.read_bytes())
    data[5 * 4096 + 100] ^= 0xFF
    assert read_disk_records(bytes(data), reports.run) == on_disk - {6}
    assert read_disk_records(bytes(data), reports.run + 1) == set()


@pytest.mark.netns
def test_diskwriter_paces_records_at_the_asked_rate(
    bins: dict[str, Path], ns: NetNamespace, tmp_path: Path
) -> None:
    dev = tmp_path / "disk.img"
    dev.write_bytes(b"\0" * (64 * 4096))
    _start_diskwriter(ns, bins["diskwriter"], str(dev), "--port", "9011", "--rate", "100", "--count", "30")
    c = _connect(ns, 9011)
    start = time.monotonic()
    reports = _read_reports(c)
    elapsed = time.monotonic() - start
    c.close()
    assert reports.durable == list(range(1, 31))
    assert elapsed >= 0.28  # 30 records at 100/s: 29 gaps of 10 ms at least


@pytest.mark.netns
def test_diskwriter_continues_numbering_for_the_next_client(
    bins: dict[str, Path], ns: NetNamespace, tmp_path: Path
) -> None:
    dev = tmp_path / "disk.img"
    dev.write_bytes(b"\0" * (256 * 4096))
    _start_diskwriter(ns, bins["diskwriter"], str(dev), "--port", "9012", "--rate", "200", "--count", "80")
    first = _connect(ns, 9012)
    early = DiskWriterReports()
    while len(early.durable) < 5:
        early.feed(first.recv(64))
    first.close()  # gone mid-run: the writer notices on its next report and waits for a new client
    second = _connect(ns, 9012)
    late = _read_reports(second)
    second.close()
    assert late.run == early.run and late.finished == "DONE"
    assert late.durable[0] > early.durable[-1] and late.durable[-1] == 80
    on_disk = read_disk_records(dev.read_bytes(), late.run or 0)
    assert set(early.durable) | set(late.durable) <= on_disk == set(range(1, 81))


@pytest.mark.netns
def test_diskwriter_stops_when_the_device_is_full(
    bins: dict[str, Path], ns: NetNamespace, tmp_path: Path
) -> None:
    dev = tmp_path / "small.img"
    dev.write_bytes(b"\0" * (8 * 4096))
    _start_diskwriter(ns, bins["diskwriter"], str(dev), "--port", "9010")
    c = _connect(ns, 9010)
    reports = _read_reports(c)
    c.close()
    assert reports.finished == "FULL"
    assert read_disk_records(dev.read_bytes(), reports.run or 0) >= set(reports.durable)
    assert reports.durable == list(range(1, 9))


@pytest.mark.netns
def test_diskwriter_reports_on_its_default_port_when_none_is_given(
    bins: dict[str, Path], ns: NetNamespace, tmp_path: Path
) -> None:
    """`pair up --guest-run diskwriter,/dev/vda` gives no port: clients connect to DISKWRITER_PORT."""
    dev = tmp_path / "disk.img"
    dev.write_bytes(b"\0" * (4 * 4096))
    proc = ns.popen([str(bins["diskwriter"]), str(dev)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert f" port={DISKWRITER_PORT}" in proc.stdout.readline()
    c = _connect(ns, DISKWRITER_PORT)
    assert _read_reports(c).finished == "FULL"
    c.close()


def test_diskwriter_rejects_bad_arguments(bins: dict[str, Path], tmp_path: Path) -> None:
    for args in (
        [],
        ["--port", "1"],
        [str(tmp_path / "x"), "--port", "0"],
        [str(tmp_path / "x"), "--bogus", "1"],
    ):
        proc = subprocess.run([bins["diskwriter"], *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run([bins["diskwriter"], str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 1 and "open" in proc.stderr


def test_disk_writer_report_parser() -> None:
    r = DiskWriterReports()
    assert r.feed(b"RUN ff\n1\n2") == [1]
    assert r.feed(b"\n3\nDONE\n") == [2, 3]
    assert (r.run, r.durable, r.finished) == (255, [1, 2, 3], "DONE")
    with pytest.raises(GuestError, match="reported 5 after 3"):
        r.feed(b"5\n")
    with pytest.raises(GuestError, match="unexpected"):
        DiskWriterReports().feed(b"garbage\n")
    assert len(disk_record(1, 2)) == 4096


def test_memdirty_keeps_its_rate_and_rejects_bad_arguments(bins: dict[str, Path]) -> None:
    for args in ([], ["1"], ["-1", "8"], ["x", "8"], ["8", "0"]):
        proc = subprocess.run([bins["memdirty"], *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.Popen([bins["memdirty"], "64", "32", "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("memdirty: started")
        rates = [float(proc.stdout.readline().rsplit("=", 1)[1]) for _ in range(2)]
    finally:
        proc.kill()
        proc.wait()
    # never above the asked rate (pacing); below only if this busy host starves it for > 100 ms
    assert all(32 < r < 70 for r in rates), rates


def test_cpuburn_stops_after_its_time(bins: dict[str, Path]) -> None:
    start = time.monotonic()
    proc = subprocess.run([bins["cpuburn"], "0.3"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and "Mrounds" in proc.stdout
    assert time.monotonic() - start >= 0.3
    assert subprocess.run([bins["cpuburn"], "0"], capture_output=True).returncode == 2


def test_cpuburn_reports_its_rounds_while_it_runs(bins: dict[str, Path]) -> None:
    # the experiment runner's cpu score reads these lines while cpuburn runs (SECONDS 0: until killed)
    proc = subprocess.Popen([bins["cpuburn"], "0", "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        counts = [int(proc.stdout.readline().strip().removeprefix("cpuburn: rounds=")) for _ in range(3)]
    finally:
        proc.kill()
        proc.wait()
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    assert subprocess.run([bins["cpuburn"], "1", "0"], capture_output=True).returncode == 2
