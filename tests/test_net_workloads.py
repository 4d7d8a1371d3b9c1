"""The network workloads without a guest: their checks, the phase schedule, and the clients against
stand-ins of rrserver/tokend/blobd on localhost (ephemeral ports) driven through a fake control loop.

The stand-ins can be told to misbehave (a flipped byte, a skipped or repeated token number, a clock that
runs backwards): each must show up as an error, so a client that checked nothing would fail here.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from experiments.net_workloads import (
    BlobChecker,
    NetDivergent,
    NetRR,
    NetStream,
    TokenLedger,
    WorkloadCheckError,
    check_rr_answer,
    parse_http_head,
    rr_request,
)
from experiments.phased import Phased, build_schedule, parse_pattern
from experiments.workload import PhaseResult, Workload, WorkloadTarget
from mc_driver.guest import stream_bytes


# --- pure checks -------------------------------------------------------------------------------------
def test_rr_answers_are_checked_byte_for_byte() -> None:
    assert rr_request(64) == b"64\n"
    check_rr_answer(64, stream_bytes(64))
    bad = bytearray(stream_bytes(64))
    bad[17] ^= 0x01
    with pytest.raises(WorkloadCheckError, match="byte 17"):
        check_rr_answer(64, bytes(bad))
    with pytest.raises(WorkloadCheckError, match="63 bytes"):
        check_rr_answer(64, stream_bytes(63))
    with pytest.raises(ValueError):
        rr_request(-1)


def test_token_ledger_finds_gaps_and_repeats() -> None:
    ledger = TokenLedger()
    for seq in (3, 1, 2, 4):
        ledger.add(seq)
    assert ledger.problems() == [] and len(ledger) == 4
    ledger.add(7)
    assert ledger.problems() == ["tokend answer numbers missing: 5..6"]
    ledger.add(2)
    assert "repeated: [2]" in ledger.problems()[0]


def test_http_heads_need_a_status_and_a_length() -> None:
    head = parse_http_head(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\nContent-Length: 12")
    assert (head.status, head.length, head.keep_alive) == (200, 12, True)
    assert not parse_http_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close").keep_alive
    for bad in (b"HTTP/1.1 200 OK", b"SSH-2.0 hi\r\nContent-Length: 1", b"HTTP/1.1 200 OK\r\nno colon",
                b"HTTP/1.1 200 OK\r\nContent-Length: -1"):  # fmt: skip
        with pytest.raises(WorkloadCheckError):
            parse_http_head(bad)


def test_blob_checker_checks_every_chunk() -> None:
    expected = stream_bytes(1000)
    ok = BlobChecker(expected)
    for k in range(0, 1000, 300):
        ok.feed(expected[k : k + 300])
    assert ok.done
    wrong = BlobChecker(expected)
    wrong.feed(expected[:500])
    with pytest.raises(WorkloadCheckError, match="byte 501"):
        wrong.feed(expected[500:501] + bytes([expected[501] ^ 0xFF]))
    with pytest.raises(WorkloadCheckError, match="longer"):
        BlobChecker(expected).feed(expected + b"x")


def test_the_schedule_cycles_the_pattern_and_ends_on_time() -> None:
    plan = build_schedule("rr,divergent", 12.0, 60.0)
    assert [p.name for p in plan] == ["net-rr", "net-divergent"] * 2 + ["net-rr"]
    assert [(p.start_s, p.end_s) for p in plan] == [(0, 12), (12, 24), (24, 36), (36, 48), (48, 60)]
    assert [p.index for p in plan] == [0, 1, 2, 3, 4]
    # no sliver: 65 s of 12 s phases is 5 phases, the last one 17 s
    assert build_schedule(["net-rr"], 12.0, 65.0)[-1].end_s == 65.0 and len(build_schedule("rr", 12, 65)) == 5
    assert len(build_schedule("rr", 12.0, 3.0)) == 1
    assert parse_pattern(["stream", "net-divergent"]) == ("net-stream", "net-divergent")
    with pytest.raises(ValueError, match="unknown phase 'cpu'"):
        parse_pattern("rr,cpu")
    with pytest.raises(ValueError):
        build_schedule("rr", 0, 10)


def test_every_workload_implements_the_contract() -> None:
    for workload in (NetRR(), NetDivergent(), NetStream(), Phased()):
        assert isinstance(workload, Workload)
    assert Phased(["rr", "stream"]).unit == "requests or bytes (per phase)"
    assert Phased().unit == "requests"


# --- stand-ins of the guest's services -----------------------------------------------------------------
class StandIn(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler], fault: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.fault = fault
        self.seq = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class RRHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for served, line in enumerate(self.rfile, 1):
            answer = bytearray(stream_bytes(int(line)))
            if self.server.fault == "flip" and served == 5:  # type: ignore[attr-defined]
                answer[0] ^= 0x80
            self.wfile.write(bytes(answer))


class TokenHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: StandIn = self.server  # type: ignore[assignment]
        for answered, _ in enumerate(self.rfile, 1):
            with server.lock:
                server.seq += 1
                if server.fault == "skip" and server.seq == 5:
                    server.seq += 1
                seq = server.seq
            ns = time.time_ns()
            if server.fault == "backwards" and answered == 3:
                ns -= 10**9
            self.wfile.write(f"TOKEN {seq} {ns}\n".encode())


class BlobHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        body = stream_bytes(8 << 20)
        while True:
            request = self.rfile.readline()
            if not request:
                return
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            self.wfile.write(body)


@pytest.fixture
def local() -> WorkloadTarget:
    return WorkloadTarget(netns=None, guest_ip="127.0.0.1", guest_control="unix:/nonexistent")


def _drive(workload: NetRR | NetDivergent | NetStream, target: WorkloadTarget, seconds: float) -> PhaseResult:
    clock0 = time.monotonic()
    return workload.driver().drive(target, 0.0, clock0, clock0 + seconds)


def test_rr_clients_count_and_check_every_answer(local: WorkloadTarget) -> None:
    good = StandIn(RRHandler)
    try:
        phase = _drive(NetRR(clients=3, port=good.port), local, 0.5)
    finally:
        good.close()
    assert phase.errors == () and phase.work > 30
    assert len(phase.latencies_ms) == phase.work and phase.end_s >= 0.5 and phase.score > 0
    flipping = StandIn(RRHandler, fault="flip")
    try:
        phase = _drive(NetRR(clients=2, port=flipping.port), local, 0.5)
    finally:
        flipping.close()
    # every connection's 5th answer is wrong: each client saw it, reconnected and saw it again
    assert len(phase.errors) >= 2 and all("byte 0" in e for e in phase.errors)
    assert {e.split()[0] for e in phase.errors} == {"net-rr-0", "net-rr-1"}
    assert phase.work >= 8


@pytest.mark.parametrize(("fault", "error"), [(None, None), ("skip", "missing: 5..5"),
                                               ("backwards", "tokend answered")])  # fmt: skip
def test_token_clients_check_form_order_and_numbering(
    local: WorkloadTarget, fault: str | None, error: str | None
) -> None:
    server = StandIn(TokenHandler, fault=fault)
    try:
        phase = _drive(NetDivergent(clients=3, port=server.port), local, 0.5)
    finally:
        server.close()
    assert phase.work > (30 if fault is None else 5)
    if error is None:
        assert phase.errors == ()
    else:
        assert any(error in e for e in phase.errors), phase.errors


def test_stream_clients_count_checked_bytes(local: WorkloadTarget) -> None:
    server = StandIn(BlobHandler)
    try:
        phase = _drive(NetStream(port=server.port), local, 0.3)
    finally:
        server.close()
    assert phase.errors == ()
    assert phase.work >= 8 << 20 and phase.work % (8 << 20) == 0  # whole downloads: the last one finished
    assert len(phase.latencies_ms) == phase.work // (8 << 20)


# --- the phased workload through a fake control loop -------------------------------------------------------
class FakeControl:
    """The guest's ttyS1 command loop, as far as the workloads use it (mc_driver/guest_src/init.sh)."""

    def __init__(self, path: Path) -> None:
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rwb", buffering=0) as stream:
            for raw in stream:
                words = raw.decode().split()
                reply = {"ping": f"PONG {' '.join(words[1:])}", "start": "PID 41", "run": "PID 42",
                         "stop": f"STOPPED {words[-1]}", "kill": ""}[words[0]]  # fmt: skip
                if words[0] != "ping":
                    self.commands.append(" ".join(words))
                stream.write(((reply + "\n") if reply else "").encode() + b"HFT-END 0\n")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[WorkloadTarget, FakeControl, StandIn, StandIn]]:
    rr, token = StandIn(RRHandler), StandIn(TokenHandler)
    control = FakeControl(tmp_path / "ctl")
    target = WorkloadTarget(netns=None, guest_ip="127.0.0.1", guest_control=f"unix:{tmp_path / 'ctl'}")
    yield target, control, rr, token
    rr.close()
    token.close()


def test_phased_runs_its_schedule_with_memdirty_under_every_phase(
    services: tuple[WorkloadTarget, FakeControl, StandIn, StandIn],
) -> None:
    target, control, rr, token = services
    workload = Phased(
        "rr,divergent", phase_s=0.4, dirty_mib_s=8,
        rr=NetRR(clients=2, port=rr.port), divergent=NetDivergent(clients=2, port=token.port),
    )  # fmt: skip
    changes: list[tuple[int, str, float]] = []
    result = workload.run(target, 1.2, lambda i, name, t: changes.append((i, name, t)))
    assert result.ok, (result.errors, [p.errors for p in result.phases])
    assert [p.name for p in result.phases] == ["net-rr", "net-divergent", "net-rr"]
    assert [(i, name) for i, name, _ in changes] == [(0, "net-rr"), (1, "net-divergent"), (2, "net-rr")]
    assert [t for *_, t in changes] == [p.start_s for p in result.phases]
    assert all(p.work > 5 for p in result.phases) and result.score > 0
    for a, b in zip(result.phases, result.phases[1:], strict=False):
        assert a.end_s <= b.start_s
    # every service up before the first phase, down after the last: a change of character is the clients'
    assert control.commands == [
        "start rrserver", "start tokend", "run memdirty 8 64 0",
        "stop rrserver", "stop tokend", "kill 42 TERM",
    ]  # fmt: skip


def test_a_guest_that_cannot_be_reached_is_an_error_not_an_exception(tmp_path: Path) -> None:
    target = WorkloadTarget(netns=None, guest_ip="127.0.0.1", guest_control=f"unix:{tmp_path / 'none'}")
    import mc_driver.guest.control as control

    original = control.GuestControl.__init__

    def quick(self: control.GuestControl, endpoint: str, *, timeout: float = 30.0) -> None:
        original(self, endpoint, timeout=0.3)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(control.GuestControl, "__init__", quick)
        result = NetRR().run(target, 1.0)
    assert not result.ok and result.phases == () and "cannot connect" in result.errors[0]
