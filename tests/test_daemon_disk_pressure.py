"""The disk server's checkpoint mark reaches the daemon, and prepare-checkpoint un-pauses its writes.

Why it matters: the primary mirrors with copy-mode=write-blocking and QMP ``stop`` drains in-flight
I/O.  A disk server paused at its speculation budget would hold the very writes that ``stop`` waits
for.  So the daemon checkpoints at the lower mark (``checkpoint_needed``) and sends
``prepare-checkpoint`` beside every ``stop``.  Real ``hybridft disk serve`` process, real libnbd.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nbd

from controller.daemon import Daemon
from controller.daemon_config import DaemonConfig
from controller.pair_state import PairState
from hybridft_common.control import call
from tests.helpers.disk_server import DiskServerProcess

BUDGET = 1 << 20


def _write(handle: nbd.NBD, start: int, count: int) -> None:
    """Synchronous 4 KiB writes (count must stay below the budget: a paused write never returns)."""
    for i in range(count):
        handle.pwrite(b"\x5a" * 4096, (start + i) * 4096)


def test_daemon_requests_a_checkpoint_at_the_disk_mark(tmp_path: Path) -> None:
    server = DiskServerProcess(tmp_path, None, "--speculation-budget", str(BUDGET))
    handle = nbd.NBD()
    try:
        handle.set_export_name("replica")
        handle.connect_uri(server.uri("replica"))
        config = DaemonConfig(
            primary_qmp="unix:/nonexistent", secondary_qmp="unix:/nonexistent",
            control=f"unix:{tmp_path / 'daemon.sock'}", disk_control=server.control,
        )  # fmt: skip

        async def run() -> tuple[bool, bool]:
            daemon = Daemon(config)
            daemon.state = PairState.PROTECTED
            loop_task = asyncio.create_task(daemon._disk_pressure_loop())
            try:
                await asyncio.sleep(0.4)
                before = "disk-pressure" in daemon.scheduler.pending
                await asyncio.to_thread(_write, handle, 0, 140)  # 560 KiB: past the 512 KiB mark
                deadline = time.monotonic() + 5
                while "disk-pressure" not in daemon.scheduler.pending and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return before, "disk-pressure" in daemon.scheduler.pending and daemon._wake.is_set()
            finally:
                loop_task.cancel()

        before, after = asyncio.run(run())
        assert not before, "a checkpoint was requested with an empty speculation buffer"
        assert after, "the daemon did not request a checkpoint past the disk's checkpoint mark"
        status = call(server.control, "status")
        assert status["checkpoint_needed"] and status["has_room"]
    finally:
        handle.shutdown()
        server.stop()


def test_prepare_checkpoint_lets_a_write_paused_by_the_budget_complete(tmp_path: Path) -> None:
    server = DiskServerProcess(tmp_path, None, "--speculation-budget", str(BUDGET))
    handle = nbd.NBD()
    try:
        handle.set_export_name("replica")
        handle.connect_uri(server.uri("replica"))
        # write until one request is not taken: the server paused reading at its budget
        paused_at = None
        for block in range(2 * BUDGET // 4096):
            cookie = handle.aio_pwrite(b"\xa5" * 4096, block * 4096)
            deadline = time.monotonic() + 0.5
            done = handle.aio_command_completed(cookie)  # True retires the command: ask once per poll
            while not done and time.monotonic() < deadline:
                handle.poll(20)
                done = handle.aio_command_completed(cookie)
            if not done:
                paused_at = block
                break
        assert paused_at is not None, "the speculation budget never paused the writes"
        assert paused_at * 4096 <= BUDGET
        assert not call(server.control, "status")["has_room"]
        call(server.control, "prepare-checkpoint")  # what the daemon sends beside `stop`
        deadline = time.monotonic() + 5
        while not handle.aio_command_completed(cookie):
            assert time.monotonic() < deadline, "prepare-checkpoint did not release the paused write"
            handle.poll(100)
        epoch = call(server.control, "seal")["epoch"]
        call(server.control, "commit", epoch=epoch)
        assert handle.pread(4096, paused_at * 4096) == b"\xa5" * 4096
        assert not call(server.control, "status")["checkpoint_in_progress"]
    finally:
        handle.shutdown()
        server.stop()
