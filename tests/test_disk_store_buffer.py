"""The DiskBuffer facade on real files: back-pressure (both budgets), configuration errors,
range errors, failover turning `view` into a plain disk, and a cancelled commit."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from disk_buffer.buffer import DiskBuffer, DiskBufferError, Export

SIZE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img"
    path.write_bytes(random.Random(2).randbytes(SIZE))
    return path


def test_speculation_budget_pauses_until_a_checkpoint(image: Path, tmp_path: Path) -> None:
    async def run() -> None:
        buf = DiskBuffer.open(
            image, tmp_path / "state", speculation_budget=64 << 10, checkpoint_mark=64 << 10
        )
        for i in range(15):
            buf.write(Export.REPLICA, i * 4096, b"a" * 4096)
        assert buf.has_room() and not buf.needs_checkpoint()
        buf.write(Export.VIEW, 1 << 20, b"v" * 4096)  # the overlay counts too
        assert not buf.has_room() and buf.needs_checkpoint() and buf.status()["checkpoint_needed"]
        waiter = asyncio.ensure_future(buf.wait_for_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        epoch = buf.seal()  # sealed data and the kept rollback overlay still count
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await buf.commit(epoch)
        await asyncio.wait_for(waiter, 5)
        assert buf.has_room() and not buf.status()["checkpoint_needed"]
        await buf.aclose()

    asyncio.run(run())


def test_checkpoint_needed_fires_at_the_mark_and_prepare_lifts_the_pause(image: Path, tmp_path: Path) -> None:
    """checkpoint_needed at half the budget; prepare-checkpoint lets paused writes in until commit.

    Without it the daemon's QMP ``stop`` would wait for mirror writes this server no longer reads.
    """

    async def run() -> None:
        buf = DiskBuffer.open(image, tmp_path / "state", speculation_budget=64 << 10)
        assert buf.checkpoint_mark == 32 << 10
        for i in range(8):
            buf.write(Export.REPLICA, i * 4096, b"a" * 4096)
        assert buf.has_room() and buf.needs_checkpoint() and buf.status()["checkpoint_needed"]
        for i in range(8, 16):
            buf.write(Export.REPLICA, i * 4096, b"a" * 4096)
        assert not buf.has_room()
        waiter = asyncio.ensure_future(buf.wait_for_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        buf.prepare_checkpoint()
        await asyncio.wait_for(waiter, 5)
        assert buf.has_room() and buf.status()["checkpoint_in_progress"]
        buf.write(Export.REPLICA, 16 * 4096, b"b" * 4096)  # an in-flight request gets in
        epoch = buf.seal()
        await buf.commit(epoch)
        assert not buf.status()["checkpoint_in_progress"]
        for i in range(16):
            buf.write(Export.REPLICA, i * 4096, b"c" * 4096)
        assert not buf.has_room()  # the pause is back for the next epoch
        buf.prepare_checkpoint()
        buf.seal()
        buf.rollback()
        assert not buf.status()["checkpoint_in_progress"]
        await buf.aclose()

    asyncio.run(run())


def test_bad_checkpoint_mark_is_a_config_error(image: Path, tmp_path: Path) -> None:
    with pytest.raises(DiskBufferError) as info:
        DiskBuffer.open(image, tmp_path / "state", speculation_budget=64 << 10, checkpoint_mark=128 << 10)
    assert info.value.code == "config"


def test_writeout_budget_pauses_until_the_image_catches_up(image: Path, tmp_path: Path) -> None:
    async def run() -> None:
        buf = DiskBuffer.open(image, tmp_path / "state", writeout_budget=32 << 10)
        for i in range(64):
            buf.write(Export.REPLICA, i * 4096, bytes([i]) * 4096)
        epoch = buf.seal()
        await buf.commit(epoch)
        # Freed only by the write-out thread (notified across threads), never by a checkpoint.
        await asyncio.wait_for(buf.wait_for_room(), 10)
        assert buf.has_room() and buf.status()["backlog"] == 0
        await buf.aclose()
        data = image.read_bytes()
        assert all(data[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096 for i in range(64))

    asyncio.run(run())


def test_configuration_errors_are_clear(image: Path, tmp_path: Path) -> None:
    with pytest.raises(DiskBufferError) as info:
        DiskBuffer.open(tmp_path / "missing.img", tmp_path / "state")
    assert info.value.code == "config" and "missing.img" in info.value.message
    with pytest.raises(DiskBufferError) as info:
        DiskBuffer.open(image, tmp_path / "state", speculation_budget=0)
    assert info.value.code == "config"
    buf = DiskBuffer.open(image, tmp_path / "state")
    with pytest.raises(DiskBufferError) as info:
        DiskBuffer.open(image, tmp_path / "state")
    assert info.value.code == "config" and "in use" in info.value.message
    buf.close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(8192))
    with pytest.raises(DiskBufferError) as info:
        DiskBuffer.open(other, tmp_path / "state")
    assert info.value.code == "config" and str(SIZE) in info.value.message
    os.environ["HYBRIDFT_DISK_FAULT"] = "bogus"
    try:
        with pytest.raises(DiskBufferError) as info:
            DiskBuffer.open(image, tmp_path / "state")
        assert info.value.code == "config"
    finally:
        del os.environ["HYBRIDFT_DISK_FAULT"]
    DiskBuffer.open(image, tmp_path / "state").close()  # nothing was left locked or half-open


def test_range_errors_change_nothing(image: Path, tmp_path: Path) -> None:
    buf = DiskBuffer.open(image, tmp_path / "state")
    before = buf.status()
    for call in (
        lambda: buf.read(Export.REPLICA, SIZE - 1, 2),
        lambda: buf.read(Export.VIEW, -1, 1),
        lambda: buf.write(Export.REPLICA, SIZE, b"x"),
        lambda: buf.write(Export.VIEW, SIZE - 2, memoryview(b"xyz")),
        lambda: buf.write_zeroes(Export.REPLICA, 0, SIZE + 1),
        lambda: buf.trim(Export.VIEW, SIZE, 1),
    ):
        with pytest.raises(DiskBufferError) as info:
            call()
        assert info.value.code == "range"
    assert buf.status() == before
    assert buf.read(Export.REPLICA, SIZE - 1, 1) == image.read_bytes()[-1:]
    buf.close()


def test_failover_makes_view_a_plain_disk(image: Path, tmp_path: Path) -> None:
    original = image.read_bytes()

    async def run() -> None:
        buf = DiskBuffer.open(image, tmp_path / "state")
        buf.write(Export.REPLICA, 0, b"committed")
        epoch = buf.seal()
        buf.write(Export.VIEW, 100, b"overlay")
        with pytest.raises(DiskBufferError) as info:
            await buf.failover()  # a sealed epoch must be committed or rolled back first
        assert info.value.code == "wrong-state"
        await buf.commit(epoch)
        buf.write(Export.REPLICA, 200, b"never committed")
        await buf.failover()
        status = buf.status()
        assert status["failed_over"] and status["backlog"] == 0
        data = image.read_bytes()
        assert data[:9] == b"committed" and data[100:107] == b"overlay"
        assert data[200:215] == original[200:215]  # the uncommitted primary write is gone
        buf.write(Export.VIEW, 300, b"direct")
        buf.trim(Export.VIEW, 1 << 20, 1 << 20)  # large: punched
        buf.write_zeroes(Export.VIEW, 400, 10)
        buf.flush(Export.VIEW)
        data = image.read_bytes()
        assert data[300:306] == b"direct" and data[400:410] == bytes(10)
        assert data[1 << 20 : 2 << 20] == bytes(1 << 20)
        assert buf.read(Export.REPLICA, 300, 6) == b"direct"  # one disk now
        for call in (lambda: buf.write(Export.REPLICA, 0, b"x"), buf.seal, buf.rollback):
            with pytest.raises(DiskBufferError) as info:
                call()
            assert info.value.code == "wrong-state"
        with pytest.raises(DiskBufferError):
            await buf.failover()
        await buf.aclose()

    asyncio.run(run())


def test_cancelled_commit_still_settles(image: Path, tmp_path: Path) -> None:
    async def run() -> None:
        buf = DiskBuffer.open(image, tmp_path / "state")
        buf.write(Export.REPLICA, 0, b"x" * 4096)
        epoch = buf.seal()
        task = asyncio.ensure_future(buf.commit(epoch))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(1000):
            if buf.status()["committing"] is None:
                break
            await asyncio.sleep(0.001)
        status = buf.status()
        assert status["committing"] is None
        assert status["committed"] == epoch or status["sealed"] == [epoch]
        await buf.aclose()

    asyncio.run(run())


_PREFAULT_PROBE = """
import os, resource, sys
from disk_buffer.buffer import keep_freed_memory, prefault_heap
keep_freed_memory()
done = prefault_heap(int(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
kept = [os.urandom(16) * 256 for _ in range(10000)]  # what 10k 4 KiB writes keep
print(done, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_prefaulted_heap_takes_the_first_writes_without_page_faults() -> None:
    import subprocess
    import sys

    def probe(nbytes: int) -> tuple[int, int]:
        command = [sys.executable, "-c", _PREFAULT_PROBE, str(nbytes)]
        root = Path(__file__).parent.parent
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root).stdout.split()
        return int(out[0]), int(out[1])

    done, faults = probe(64 << 20)
    assert done >= 64 << 20
    assert faults < 1000, faults  # 40 MiB of data in 64 MiB already faulted in
    done, faults = probe(0)
    assert done == 0 and faults > 9000  # without: a fault per write
