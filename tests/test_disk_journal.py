"""The redo journal on real files: the two-slot mark, idempotent replay and space recycling.
The byte format and the scan rules on their own: tests/test_disk_journal_codec.py."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

from disk_buffer.buffer import DiskBuffer, DiskBufferError, Export
from disk_buffer.journal import FaultInjector, Journal
from disk_buffer.journal_codec import MARK_SLOT


def test_mark_slots_fall_back_to_the_older_valid_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 4096)
    assert journal.mark.applied == 0 and not journal.mark.failed_over
    journal.mark_applied(5)
    journal.mark_applied(6)
    journal.close()
    assert Journal(tmp_path, 4096).mark.applied == 6
    newest = Journal(tmp_path, 4096)
    slot = (newest.mark.seq % 2) * MARK_SLOT
    newest.close()
    with open(tmp_path / "mark", "r+b") as f:  # tear the newest slot
        f.seek(slot + 10)
        f.write(b"\xff\xff")
    assert Journal(tmp_path, 4096).mark.applied == 5
    with open(tmp_path / "mark", "r+b") as f:
        f.write(b"\0" * 2 * MARK_SLOT)
    with pytest.raises(DiskBufferError) as info:
        Journal(tmp_path, 4096)
    assert info.value.code == "corrupt"


def test_image_size_check(tmp_path: Path) -> None:
    Journal(tmp_path, 4096).close()
    with pytest.raises(DiskBufferError) as info:
        Journal(tmp_path, 8192)
    assert info.value.code == "config" and "4096" in info.value.message


def _image(tmp_path: Path, size: int = 1 << 20) -> tuple[Path, bytes]:
    data = random.Random(5).randbytes(size)
    path = tmp_path / "img"
    path.write_bytes(data)
    return path, data


def test_replay_is_idempotent(tmp_path: Path) -> None:
    """Records committed but never applied are replayed at open; replaying again (a crash before the
    mark) gives the same image, and replay over an image that already has them changes nothing."""
    image, original = _image(tmp_path)
    state = tmp_path / "state"
    journal = Journal(state, len(original))
    journal.restart(0)
    rng = random.Random(9)
    expected = bytearray(original)
    journal.open_group(1, 1)
    for seq in range(1, 6):
        for _ in range(20):  # overlapping writes and zeroes, in order
            offset = rng.randrange(len(original) - 9000)
            length = rng.randint(1, 9000)
            data = None if rng.random() < 0.2 else rng.randbytes(length)
            journal.append(seq, seq, offset, data, length)
            expected[offset : offset + length] = bytes(length) if data is None else data
        journal.seal(seq, seq + 1, seq + 1)
        journal.commit(seq).result()
        journal.committed(seq)
    journal.append(6, 6, 0, b"uncommitted", 11)  # the open epoch: never replayed
    journal.close()
    assert image.read_bytes() == original  # nothing applied yet
    shutil.copytree(state, tmp_path / "before")
    DiskBuffer.open(image, state).close()
    assert image.read_bytes() == bytes(expected)
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "before", state)  # as if killed right before the applied mark
    buf = DiskBuffer.open(image, state)
    assert buf.status()["committed"] == 5
    assert buf.read(Export.REPLICA, 0, len(original)) == bytes(expected)
    buf.close()
    assert image.read_bytes() == bytes(expected)


def test_space_is_reused_only_after_the_image_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Journal, "SWITCH_AT", 64 << 10)
    image, original = _image(tmp_path)
    expected = bytearray(original)

    async def run() -> None:
        buf = DiskBuffer.open(image, tmp_path / "state")
        gen = buf.status()["journal_generation"]
        assert buf.status()["journal_file"] == 0
        for i in range(20):
            buf.write(Export.REPLICA, i * 4096, bytes([i]) * 4096)
        expected[: 20 * 4096] = b"".join(bytes([i]) * 4096 for i in range(20))
        first = buf.seal()  # file 0 is past SWITCH_AT, but file 1 is free: epoch 2 goes to file 1
        assert buf.status()["journal_file"] == 1 and buf.status()["journal_generation"] == gen + 1
        buf.write(Export.REPLICA, 0, b"x" * 70000)
        expected[:70000] = b"x" * 70000
        # File 0 holds epoch 1, which is not even committed: no switch back yet.
        second = buf.seal()
        assert buf.status()["journal_file"] == 1
        await buf.commit(first)
        await buf.commit(second)
        while buf.status()["journal_applied_mark"] < second:
            await asyncio.sleep(0.001)
        buf.write(Export.REPLICA, 4096, b"y")
        expected[4096:4097] = b"y"
        third = buf.seal()  # everything in file 0 is applied and synced: reuse it from offset 0
        assert buf.status()["journal_file"] == 0 and buf.status()["journal_generation"] == gen + 2
        await buf.commit(third)
        buf.simulate_crash()
        buf = DiskBuffer.open(image, tmp_path / "state")
        assert buf.status()["committed"] == third
        assert buf.read(Export.REPLICA, 0, len(original)) == bytes(expected)
        await buf.aclose()

    asyncio.run(run())


def test_fault_injector_parsing() -> None:
    assert FaultInjector(None).point is None
    injector = FaultInjector("journal-synced:3")
    assert injector.point == "journal-synced" and injector.remaining == 3
    injector.hit("journal-written")
    injector.hit("journal-synced")
    assert injector.remaining == 2
    for bad in ("nowhere", "journal-synced:x"):
        with pytest.raises(DiskBufferError) as info:
            FaultInjector(bad)
        assert info.value.code == "config"
