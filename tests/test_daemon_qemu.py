"""The daemon against a real COLO pair (patched QEMU 7.2, TCG, the project's Linux guest).

One pair for the module (boot + initial COLO migration cost most of the time; the ``harness`` and
``daemon`` fixtures of tests/helpers/daemon_harness.py): two QEMUs from
:class:`mc_driver.qemu_pair.ColoPair` with ``compare="none"`` plus the external comparator's wiring
(filter-mirror, redirectors, rewriter) to a real ``hybridft compare serve`` process, and a real
``hybridft disk serve`` process whose epochs the daemon seals/commits/rolls back.  (The disk server
here is not the secondary's disk: the pair's own launcher, ``pair up``, wires that; these tests prove
the protocol's order and recovery against the real server.)  The daemon runs in the test's event loop
on its own QMP monitors; the ColoPair's monitors observe the same QEMU events independently.

Order of the tests matters (they share the pair): the last one kills the secondary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from controller.daemon import Daemon
from controller.heartbeat import Heartbeat
from controller.operating_point import PointRequest
from controller.requests import resolve_stop_via
from hybridft_common.control import ControlError, call
from hybridft_common.vocabulary import Mode, StopVia
from mc_driver.guest.expected import ECHO_PORT
from mc_driver.guest.qemu_args import DEFAULT_GUEST_IP
from mc_driver.netns import NetNamespace
from tests.helpers.daemon_harness import Harness

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.netns]

GUEST_IP = DEFAULT_GUEST_IP.split("/")[0]


@pytest.fixture(scope="module", params=list(StopVia), ids=lambda via: f"stop-via-{via}")
def stop_via(request: pytest.FixtureRequest) -> StopVia:
    """Every test runs for both ways of stopping the VMs (each on its own pair: the last test kills
    the secondary): ``qemu`` (patch 0005, what ``auto`` picks on this build) and ``qmp`` (what stock
    QEMU gets)."""
    return StopVia(request.param)


class EchoClient:
    """One TCP connection to the guest's echo service from inside the namespace."""

    def __init__(self, netns: NetNamespace) -> None:
        with netns.entered():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.connect_ex((GUEST_IP, ECHO_PORT))

    async def wait_connected(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err == 0, os.strerror(err)
            try:
                self.sock.getpeername()
                return
            except OSError:
                await asyncio.sleep(0.02)
        del loop
        raise TimeoutError("echo connection not established")

    async def send(self, payload: bytes) -> float:
        await asyncio.get_running_loop().sock_sendall(self.sock, payload)
        return time.time()

    async def recv_exact(self, n: int, timeout: float) -> tuple[bytes, float]:
        data = b""
        loop = asyncio.get_running_loop()
        while len(data) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, n - len(data)), timeout)
            assert chunk, "echo connection closed"
            data += chunk
        return data, time.time()

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------- tests
def test_checkpoint_delay_fires_one_checkpoint_at_once(harness: Harness) -> None:
    """ARCHITECTURE.md §2 relies on it: each migrate-set-parameters x-checkpoint-delay in COLO fires
    exactly one checkpoint, immediately; with the delay huge QEMU fires none on its own."""

    async def run() -> tuple[list[float], int, int]:
        primary, secondary = harness.pair.primary, harness.pair.secondary
        assert primary is not None and secondary is not None
        latencies = []
        primary.discard_events()
        secondary.discard_events()
        for _ in range(3):
            fired = time.time()
            await primary.execute("migrate-set-parameters", {"x-checkpoint-delay": 200_000})
            stop = await primary.wait_event("STOP", timeout=5)
            await secondary.wait_event("STOP", timeout=10)
            await primary.wait_event("RESUME", timeout=10)
            await secondary.wait_event("RESUME", timeout=10)
            latencies.append(stop.timestamp - fired)
        await asyncio.sleep(2.0)  # no further checkpoint follows on its own
        return latencies, len(primary.take("STOP")), len(secondary.take("STOP"))

    latencies, extra_p, extra_s = harness.run(run())
    assert max(latencies) < 0.5, latencies
    assert (extra_p, extra_s) == (0, 0)


def test_protocol_order_seen_from_qemu_and_the_services(harness: Harness, daemon: Daemon) -> None:
    assert daemon.seal_hook is True and daemon.protocol.point.stop_via is harness.stop_via
    assert resolve_stop_via("auto", daemon.seal_hook) is StopVia.QEMU  # what auto picks on the patched build
    harness.run(_protocol_order(harness, daemon))


async def _protocol_order(harness: Harness, daemon: Daemon) -> None:
    observer_p, observer_s = harness.pair.primary, harness.pair.secondary
    assert observer_p is not None and observer_s is not None
    observer_p.discard_events()
    observer_s.discard_events()
    disk_before = call(harness.disk_ctl, "status")
    record = await daemon.request_checkpoint("test", timeout=30)
    p_events = [(e.name, e.timestamp) for e in observer_p.events() if e.name in ("STOP", "RESUME")]
    s_events = [(e.name, e.timestamp) for e in observer_s.events() if e.name in ("STOP", "RESUME")]
    assert [n for n, _ in p_events] == ["STOP", "RESUME"], p_events
    assert [n for n, _ in s_events] == ["STOP", "RESUME"], s_events
    # 1 stop secondary, 2 stop primary, (3 seal), 4 the secondary loads and resumes; the primary resumes
    assert s_events[0][1] <= p_events[0][1] <= s_events[1][1]
    assert p_events[0][1] <= p_events[1][1]
    steps = [name for name, _ in record.steps]
    # stopping via QEMU, QEMU stops both and says so; the secondary's load awaits the seal
    if daemon.protocol.point.stop_via is StopVia.QEMU:
        assert steps[:3] == ["expect-seal", "fire", "stopped"], steps
        release = "sealed"
    else:
        assert steps[:2] == ["stop-secondary", "stop-primary"], steps
        release = "fire"
    rest = steps[-5:]
    assert sorted(steps[len(steps) - 7 : -5]) == ["compare-seal", "disk-seal"], steps  # concurrent
    assert rest == [release, "resume-primary", "resume-secondary", "disk-commit", "compare-commit"], steps

    assert record.outcome == "committed" and record.primary_pause is not None
    disk = call(harness.disk_ctl, "status")
    assert record.number == disk["committed"] and disk["committed"] > (disk_before["committed"] or 0)
    compare = call(harness.compare_ctl, "stats")["core"]
    assert compare["mode"] == "mc" and record.compare_epoch is not None
    status = daemon.status()
    assert status["last_committed_epoch"] == record.number
    assert status["unrequested_stops"] == 0


def test_mc_client_sees_bytes_only_after_the_secondary_loaded(harness: Harness, daemon: Daemon) -> None:
    harness.run(_mc_visibility(harness, daemon), timeout=240)


async def _mc_visibility(harness: Harness, daemon: Daemon) -> None:
    echo = EchoClient(harness.netns)
    try:
        connecting = asyncio.create_task(echo.wait_connected(30))
        while not connecting.done():  # the SYN-ACK itself is guest output: held until a commit
            await daemon.request_checkpoint("test", timeout=30)
            await asyncio.sleep(0.05)
        await connecting
        for round_trip in range(3):
            payload = os.urandom(1000) + bytes([round_trip])
            sent = await echo.send(payload)
            with pytest.raises(TimeoutError):  # no checkpoint -> nothing reaches the client
                await echo.recv_exact(1, timeout=1.0)
            record = await daemon.request_checkpoint("test", timeout=30)
            data, received = await echo.recv_exact(len(payload), timeout=10)
            assert data == payload
            assert record.secondary_resume is not None and sent < record.secondary_resume < received
        # now with the timer: every reply still comes after a load that followed its request
        daemon.protocol.request(PointRequest(mode=Mode.MC, epoch_ms=100))
        await daemon.request_checkpoint("mode-switch", timeout=30)
        for _ in range(10):
            payload = os.urandom(64)
            sent = await echo.send(payload)
            data, received = await echo.recv_exact(len(payload), timeout=10)
            assert data == payload
            await asyncio.sleep(0.2)  # the daemon files its record just after the commit released the bytes
            loads = [r.secondary_resume for r in daemon.records if r.secondary_resume is not None]
            assert any(sent < load < received for load in loads)
        assert daemon.status()["unrequested_stops"] == 0
    finally:
        echo.close()


async def _connect_echo(harness: Harness, daemon: Daemon) -> EchoClient:
    echo = EchoClient(harness.netns)
    connecting = asyncio.create_task(echo.wait_connected(30))
    while not connecting.done():  # in MC the SYN-ACK waits for a checkpoint; in COLO it does not
        if daemon.protocol.point.mode is Mode.MC:
            await daemon.request_checkpoint("test", timeout=30)
        await asyncio.sleep(0.05)
    await connecting
    return echo


def test_colo_switch_at_a_boundary_then_releases_without_checkpoints(
    harness: Harness, daemon: Daemon
) -> None:
    harness.run(_colo(harness, daemon), timeout=240)


async def _colo(harness: Harness, daemon: Daemon) -> None:
    reply = await daemon.dispatch("mode", {"mode": "colo"})
    assert reply["pending_mode"] == "colo"
    assert daemon.status()["mode"] == "mc"  # not before the checkpoint boundary
    deadline = time.monotonic() + 30
    while daemon.protocol.point.mode is not Mode.COLO:
        assert time.monotonic() < deadline, "the mode switch did not happen at the next checkpoint"
        await asyncio.sleep(0.05)
    switch = [r for r in daemon.records if "mode-switch" in r.reasons][-1]
    assert switch.mode is Mode.MC and switch.outcome == "committed"  # the epoch it closed was MC
    assert call(harness.compare_ctl, "stats")["core"]["mode"] == "colo"
    echo = await _connect_echo(harness, daemon)
    try:
        before = daemon.accounting.checkpoints_started
        rtts = []
        for _ in range(20):
            payload = os.urandom(256)
            sent = await echo.send(payload)
            data, received = await echo.recv_exact(len(payload), timeout=15)
            assert data == payload
            rtts.append(received - sent)
        during = daemon.accounting.checkpoints_started - before
    finally:
        echo.close()
    rtts.sort()
    # the VMs agree on echo traffic: bytes are released as soon as the secondary produced them,
    # far sooner than the 10 s safety interval, and without a checkpoint per round trip
    assert rtts[len(rtts) // 2] < 1.0, rtts
    assert during <= 3, (during, daemon.status()["divergences"])
    assert daemon.status()["unrequested_stops"] == 0


def test_every_primary_stop_is_a_daemon_checkpoint(harness: Harness, daemon: Daemon) -> None:
    async def run() -> tuple[int, int]:
        observer = harness.pair.primary
        assert observer is not None
        observer.discard_events()
        before = daemon.accounting.checkpoints_started
        await daemon.dispatch("mode", {"mode": "mc", "epoch_ms": 50})
        await asyncio.sleep(3.0)
        await daemon.dispatch("mode", {"mode": "mc", "epoch_ms": 60_000})
        await daemon.request_checkpoint("test", timeout=30)  # the long epoch is in force after this one
        await asyncio.sleep(1.0)
        return len(observer.take("STOP")), daemon.accounting.checkpoints_started - before

    stops, checkpoints = harness.run(run(), timeout=120)
    assert checkpoints >= 10  # the 50 ms timer ran
    assert stops == checkpoints
    status = daemon.status()
    assert status["unrequested_stops"] == 0 and status["checkpoints"]["failed"] == 0


def test_secondary_lost_before_load_rolls_back_and_runs_unprotected(harness: Harness, daemon: Daemon) -> None:
    """Kill -9 the secondary QEMU right after the seal (a real failure at the worst point): the disk
    epoch is rolled back, held output is released, the primary serves on unprotected."""
    harness.run(_secondary_lost(harness, daemon), timeout=240)


async def _secondary_lost(harness: Harness, daemon: Daemon) -> None:
    secondary = harness.pair.secondary_proc
    assert secondary is not None
    echo = await _connect_echo(harness, daemon)
    original_send = daemon.heartbeat.send
    killed: list[object] = []
    killed_at: list[float] = []

    def send_and_kill(message: Heartbeat) -> None:
        original_send(message)
        if message.state == "sealed" and not killed:
            secondary.send_signal(signal.SIGKILL)
            killed.append(message.epoch)
            killed_at.append(time.monotonic())

    try:
        payload = os.urandom(512)
        await echo.send(payload)
        with pytest.raises(TimeoutError):
            await echo.recv_exact(1, timeout=1.0)  # MC: held
        committed_before = call(harness.disk_ctl, "status")["committed"]
        daemon.heartbeat.send = send_and_kill  # type: ignore[method-assign]
        with pytest.raises(ControlError):
            await daemon.request_checkpoint("test", timeout=60)
        assert killed
        record = daemon.records[-1]
        assert record.outcome == "rolled-back" and record.number == killed[0]
        disk = call(harness.disk_ctl, "status")
        assert disk["committed"] == committed_before and disk["sealed"] == []
        deadline = time.monotonic() + 20
        while daemon.state != "unprotected":
            assert time.monotonic() < deadline, daemon.status()
            await asyncio.sleep(0.01)
        # no waiting out checkpoint_timeout (15 s here) while the primary stays paused: stopping via
        # QEMU, telling the dead secondary x-colo-sealed fails at once; via QMP, the primary's COLO_EXIT
        # ends the wait for a RESUME that cannot come (15 s before that was handled)
        assert time.monotonic() - killed_at[0] < 3.0, daemon.status()["loss_timeline"]
        failure = daemon.failures[-1]
        if daemon.protocol.point.stop_via is StopVia.QEMU:
            assert failure["step"] == "sealed", failure
        else:
            assert failure["step"] == "resume-primary" and "left COLO" in failure["cause"], failure
        data, _ = await echo.recv_exact(len(payload), timeout=20)  # released by release-all
        assert data == payload
        payload = os.urandom(512)
        await echo.send(payload)
        data, _ = await echo.recv_exact(len(payload), timeout=20)  # the primary serves, unprotected
        assert data == payload
        status = daemon.status()
        assert status["protected"] is False and status["checkpoints"]["rolled_back"] == 1
        assert any(step.startswith("compare release-all") for step, _ in status["loss_timeline"])
    finally:
        daemon.heartbeat.send = original_send  # type: ignore[method-assign]
        echo.close()
