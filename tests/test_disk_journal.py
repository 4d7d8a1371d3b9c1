"""The redo journal: record codec and scan rules (torn and corrupt records found by CRC, groups,
generations), the two-slot mark, idempotent replay and space recycling on real files."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path

import pytest

from disk_buffer.buffer import DiskBuffer, DiskBufferError, Export
from disk_buffer.journal import (
    MARK_SLOT,
    RECORD_OVERHEAD,
    FaultInjector,
    Journal,
    Mark,
    decode_mark,
    encode_commit,
    encode_group,
    encode_mark,
    scan,
)

Extents = list[tuple[int, int, bytes | None]]


def build(generation: int, epochs: list[tuple[int, int, Extents]], commit: set[int] | None = None) -> bytes:
    """Journal bytes: for each (seq, epoch, extents) its records, then its COMMIT unless excluded."""
    out = bytearray()
    for seq, epoch, extents in epochs:
        group, count, crcs = encode_group(generation, len(out), seq, epoch, extents)
        out += group
        if commit is None or seq in commit:
            out += encode_commit(generation, len(out), seq, epoch, count, crcs)
    return bytes(out)


def committed_epochs(buf: bytes, generation: int = 1) -> list[int]:
    return [g.epoch for g in scan(buf, generation).committed]


EPOCHS = [
    (1, 1, [(0, 4, b"aaaa"), (100, 200, None)]),
    (2, 2, [(8, 11, b"bbb")]),
    (3, 3, [(0, 5000, os.urandom(5000)), (6000, 6001, b"c")]),
]


def test_round_trip_with_payload_positions() -> None:
    buf = build(1, EPOCHS)
    result = scan(buf, 1)
    assert [g.epoch for g in result.committed] == [1, 2, 3]
    assert result.end == len(buf)
    ext = result.committed[2].extents[0]
    assert ext.offset == 0 and ext.length == 5000
    assert ext.payload_at is not None and buf[ext.payload_at : ext.payload_at + 5000] == EPOCHS[2][2][0][2]
    assert result.committed[0].extents[1].payload_at is None  # zero extent: no payload


def test_every_torn_tail_loses_exactly_the_torn_epoch() -> None:
    buf = build(1, EPOCHS)
    two = len(build(1, EPOCHS[:2]))
    for cut in range(two, len(buf)):
        assert committed_epochs(buf[:cut]) == [1, 2], cut
    assert committed_epochs(buf) == [1, 2, 3]


def test_any_flipped_byte_stops_the_scan_at_that_record() -> None:
    buf = build(1, EPOCHS)
    one = len(build(1, EPOCHS[:1]))
    two = len(build(1, EPOCHS[:2]))
    rng = random.Random(3)
    for pos in [*range(one, two), *rng.sample(range(two, len(buf)), 300)]:
        corrupt = bytearray(buf)
        corrupt[pos] ^= 1 << rng.randrange(8)
        got = committed_epochs(bytes(corrupt))
        assert got == ([1] if pos < two else [1, 2]), pos


def test_other_generations_and_misplaced_records_are_ignored() -> None:
    assert committed_epochs(build(1, EPOCHS), generation=2) == []
    # A stale generation-1 tail behind a newer generation-2 journal is not replayed.
    new = build(2, EPOCHS[:1])
    old = build(1, EPOCHS)
    assert committed_epochs(new + old[len(new) :], generation=2) == [1]
    # A valid record at the wrong position (e.g. guest data that looks like a record) stops the scan.
    shifted = b"\0" * 8 + build(1, EPOCHS)
    assert committed_epochs(shifted) == []


def test_abandoned_interleaved_and_empty_groups() -> None:
    # seq 1 (epoch 1) rolled back, seq 2 reuses epoch 1 and commits.
    assert committed_epochs(build(1, [(1, 1, [(0, 1, b"x")]), (2, 1, [(0, 1, b"y")])], commit={2})) == [1]
    # epoch 2's records are written (sealed) before epoch 1's COMMIT lands.
    g1, n1, c1 = encode_group(1, 0, 1, 1, [(0, 1, b"a")])
    g2, n2, c2 = encode_group(1, len(g1), 2, 2, [(1, 2, b"b")])
    buf = g1 + g2
    buf += encode_commit(1, len(buf), 1, 1, n1, c1)
    assert committed_epochs(buf) == [1]
    buf += encode_commit(1, len(buf), 2, 2, n2, c2)
    assert committed_epochs(buf) == [1, 2]
    # an epoch without writes (seq 3) committed after another group's records
    g4, n4, c4 = encode_group(1, len(buf), 4, 4, [(0, 1, b"z")])
    buf += g4
    buf += encode_commit(1, len(buf), 3, 3, 0, 0)
    buf += encode_commit(1, len(buf), 4, 4, n4, c4)
    assert committed_epochs(buf) == [1, 2, 3, 4]


def test_commit_must_match_its_records() -> None:
    group, count, crcs = encode_group(1, 0, 1, 1, [(0, 1, b"a"), (5, 6, b"b")])
    assert committed_epochs(group + encode_commit(1, len(group), 1, 1, count - 1, crcs)) == []
    assert committed_epochs(group + encode_commit(1, len(group), 1, 1, count, crcs ^ 1)) == []
    assert committed_epochs(group + encode_commit(1, len(group), 1, 2, count, crcs)) == []
    assert committed_epochs(group + encode_commit(1, len(group), 1, 1, count, crcs)) == [1]
    assert len(group) == 2 * RECORD_OVERHEAD + 2


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


def test_mark_codec_and_image_size_check(tmp_path: Path) -> None:
    mark = Mark(3, 9, 2, True, 1 << 30)
    assert decode_mark(encode_mark(mark)) == mark
    assert decode_mark(b"\0" * MARK_SLOT) is None
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
