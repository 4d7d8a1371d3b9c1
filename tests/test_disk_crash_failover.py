"""kill -9 in the middle of ``DiskBuffer.failover()`` (issue 12), with the crash machinery of
tests/test_disk_crash.py: a forked child drives a real DiskBuffer through random writes to both exports,
then fails over and is SIGKILLed at a named point.

* after the durable failed-over mark: a restart must serve the merged view -- IMG already holds the
  overlay, because the merge and IMG's fdatasync come before the mark;
* after the merge and sync, before the mark: a restart is not failed over, and the failover asked for
  again (the agent retries) completes.

Also: the state directory's entries are fsynced when they are created.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import traceback
from pathlib import Path

import pytest

from disk_buffer.buffer import DiskBuffer, Export
from disk_buffer.journal import FAILOVER_FAULT_POINTS
from tests.helpers.disk_model import DiskModel
from tests.test_disk_crash import SIZE, apply_to_model, make_ops

LAST_VIEW_WRITE = b"the secondary's own write"


def _run_until_killed(image: Path, state: Path, ops: list[tuple], fault: str) -> bool:
    """Fork a child that runs ``ops`` then fails over with ``fault`` set; True if it was SIGKILLed."""

    async def drive() -> None:
        buf = DiskBuffer.open(image, state)
        for op in ops:
            if op[0] == "write":
                buf.write(Export(op[1]), op[2], op[3])
            elif op[0] == "zero":
                buf.write_zeroes(Export(op[1]), op[2], op[3])
            elif op[0] == "seal":
                buf.seal()
            elif op[0] == "commit" and buf.status()["sealed"]:
                await buf.commit(buf.status()["sealed"][0])
            elif op[0] == "rollback" and buf.status()["sealed"]:
                buf.rollback()
        if buf.status()["sealed"]:
            buf.rollback()
        buf.write(Export.VIEW, 8192, LAST_VIEW_WRITE)  # the overlay is never empty at failover
        await buf.failover()
        await buf.aclose()

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ["HYBRIDFT_DISK_FAULT"] = fault
            asyncio.run(drive())
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _model_after(initial: bytes, ops: list[tuple]) -> DiskModel:
    model = DiskModel.from_image(initial)
    apply_to_model(model, ops)
    if model.sealed:
        model.rollback()
    model.write("view", 8192, LAST_VIEW_WRITE)
    model.failover()
    return model


@pytest.mark.parametrize("seed", range(6))
def test_killed_right_after_the_failed_over_mark_serves_the_merged_view(crash_dir: Path, seed: int) -> None:
    rng = random.Random(seed)
    image = crash_dir / "img"
    initial = rng.randbytes(SIZE)
    image.write_bytes(initial)
    ops = make_ops(rng, 60, min_commits=2)
    model = _model_after(initial, ops)
    assert _run_until_killed(image, crash_dir / "state", ops, "failover-marked")
    buf = DiskBuffer.open(image, crash_dir / "state")
    try:
        assert buf.status()["failed_over"]
        assert buf.read(Export.VIEW, 0, SIZE) == bytes(model.view), "the overlay is missing from IMG"
    finally:
        buf.close()


@pytest.mark.parametrize("seed", range(3))
def test_killed_between_the_sync_and_the_mark_restarts_unfailed_and_can_fail_over(
    crash_dir: Path, seed: int
) -> None:
    rng = random.Random(100 + seed)
    image = crash_dir / "img"
    image.write_bytes(rng.randbytes(SIZE))
    ops = make_ops(rng, 40, min_commits=2)
    assert _run_until_killed(image, crash_dir / "state", ops, "failover-synced")

    async def retry() -> dict:
        buf = DiskBuffer.open(image, crash_dir / "state")
        try:
            assert not buf.status()["failed_over"]
            await buf.failover()  # the agent's retry
            return buf.status()
        finally:
            await buf.aclose()

    assert asyncio.run(retry())["failed_over"]
    reopened = DiskBuffer.open(image, crash_dir / "state")
    try:
        assert reopened.status()["failed_over"]
    finally:
        reopened.close()


def test_every_failover_fault_point_is_reached(crash_dir: Path) -> None:
    for point in FAILOVER_FAULT_POINTS:
        image = crash_dir / f"img-{point}"
        image.write_bytes(bytes(SIZE))
        assert _run_until_killed(image, crash_dir / f"state-{point}", [], point), point


def test_the_state_directory_entries_are_fsynced_when_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 20))
    DiskBuffer.open(image, tmp_path / "state").close()
    assert str(tmp_path) in synced, "the new state directory's entry in its parent was not fsynced"
    assert str(tmp_path / "state") in synced, "the journal files' and mark's entries were not fsynced"
