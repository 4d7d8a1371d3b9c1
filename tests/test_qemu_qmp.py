"""The QMP layer (mc_driver/qmp.py) against a real QEMU (``-machine none``, no guest, TCG)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mc_driver.qmp import QmpCommandError, QmpConnectError, QmpDisconnected, QmpSession, QmpTimeout

pytestmark = pytest.mark.qemu

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"  # missing -> Popen fails loudly


def _start_qemu(sock: Path, delay: float = 0.0) -> subprocess.Popen[bytes]:
    cmd = [QEMU, "-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
           "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
    if delay:
        cmd = ["sh", "-c", f'sleep {delay}; exec "$@"', "sh", *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_connect_retries_until_qemu_is_up_then_commands_and_events(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = _start_qemu(sock, delay=0.7)  # the socket appears only later: connect must retry

    async def run() -> None:
        started = time.monotonic()
        session = await QmpSession.connect(sock, timeout=30, alive=lambda: proc.poll() is None)
        assert time.monotonic() - started >= 0.5
        async with session:
            status = await session.execute("query-status")
            assert status["status"] == "prelaunch" and status["running"] is False
            await session.execute("cont")
            resume = await session.wait_event("RESUME", timeout=10)
            assert resume.timestamp > 0 and abs(resume.timestamp - time.time()) < 60
            await session.execute("stop")
            stop = await session.wait_event("STOP", timeout=10)
            assert stop.timestamp >= resume.timestamp
            # an event that already arrived is not lost: fire, sleep, then wait
            await session.execute("cont")
            await asyncio.sleep(0.3)
            assert [e.name for e in session.pending("RESUME")] == ["RESUME"]
            assert (await session.wait_event("RESUME", timeout=1)).name == "RESUME"
            with pytest.raises(QmpTimeout, match="no STOP event"):
                await session.wait_event("STOP", timeout=0.3)
            with pytest.raises(QmpCommandError) as info:
                await session.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(QmpCommandError) as info:
                await session.execute("migrate-set-parameters", {"x-checkpoint-delay": "soon"})
            assert info.value.error_class == "GenericError"
            assert "VM status" in await session.hmp("info status")
            await session.execute("quit")
            proc.wait(timeout=10)
            with pytest.raises(QmpDisconnected):
                await session.execute("query-status")

    try:
        asyncio.run(run())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_connect_gives_up_when_qemu_died_or_deadline_passed(tmp_path: Path) -> None:
    dead = subprocess.Popen([QEMU, "-machine", "no-such-machine"], stderr=subprocess.PIPE)
    dead.wait(timeout=30)
    assert dead.returncode != 0

    async def run() -> None:
        with pytest.raises(QmpConnectError, match="exited"):
            await QmpSession.connect(tmp_path / "never.sock", timeout=10, alive=lambda: dead.poll() is None)
        started = time.monotonic()
        with pytest.raises(QmpConnectError, match="cannot connect"):
            await QmpSession.connect(tmp_path / "never.sock", timeout=0.5)
        assert time.monotonic() - started < 5

    asyncio.run(run())
