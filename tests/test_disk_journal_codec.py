"""The redo journal's byte format without a file: records, commit records, the scan rules (torn
and corrupt records found by CRC, groups, generations) and the mark slot.

What crash safety rests on, checked here on bytes alone: a scan returns exactly the epochs whose
COMMIT record is intact, in order, and nothing of a torn or corrupted record or of what follows it.
"""

from __future__ import annotations

import ast
import itertools
import os
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from disk_buffer import journal_codec
from disk_buffer.journal_codec import (
    CRC,
    MARK,
    MARK_SLOT,
    RECORD_OVERHEAD,
    Mark,
    PendingRecord,
    decode_mark,
    encode_commit,
    encode_group,
    encode_mark,
    encode_records,
    first_generation,
    record_size,
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


def test_mark_codec() -> None:
    mark = Mark(3, 9, 2, True, 1 << 30)
    assert decode_mark(encode_mark(mark)) == mark
    assert decode_mark(b"\0" * MARK_SLOT) is None


# -- properties ----------------------------------------------------------------------------------

# An extent: (image offset, length, data or None for zeroes); data, when present, has that length.
extents_st = st.lists(
    st.tuples(st.integers(0, 1 << 40), st.binary(max_size=64), st.booleans()).map(
        lambda t: (t[0], t[0] + len(t[1]), None if t[2] else t[1])
    ),
    max_size=5,
)
epochs_st = st.lists(extents_st, min_size=1, max_size=5)
generation_st = st.integers(1, (1 << 32) - 1)


def build_with_bounds(generation: int, epochs: list[Extents]) -> tuple[bytes, list[int], list[int]]:
    """Epoch i (seq i+1, epoch i+1) and its COMMIT, back to back; also where each record starts and
    where each epoch's COMMIT record ends."""
    out = bytearray()
    starts: list[int] = []
    commit_ends: list[int] = []
    for i, extents in enumerate(epochs):
        group, count, crcs = encode_group(generation, len(out), i + 1, i + 1, extents)
        pos = len(out)
        for start, end, data in extents:
            starts.append(pos)
            pos += record_size(data, end - start)
        out += group
        starts.append(len(out))
        out += encode_commit(generation, len(out), i + 1, i + 1, count, crcs)
        commit_ends.append(len(out))
    return bytes(out), starts, commit_ends


@given(generation_st, epochs_st)
def test_every_committed_epoch_comes_back_exactly(generation: int, epochs: list[Extents]) -> None:
    buf, _starts, _ends = build_with_bounds(generation, epochs)
    result = scan(buf, generation)
    assert result.end == len(buf) and result.stop_reason == "end"
    assert [(g.seq, g.epoch) for g in result.committed] == [(i + 1, i + 1) for i in range(len(epochs))]
    for group, extents in zip(result.committed, epochs, strict=True):
        got = [
            (
                e.offset,
                e.offset + e.length,
                None if e.payload_at is None else buf[e.payload_at : e.payload_at + e.length],
            )
            for e in group.extents
        ]
        assert got == extents
    assert first_generation(buf) == generation


@given(generation_st, epochs_st, st.data())
def test_a_torn_journal_keeps_exactly_the_epochs_committed_before_the_tear(
    generation: int, epochs: list[Extents], data: st.DataObject
) -> None:
    buf, _starts, commit_ends = build_with_bounds(generation, epochs)
    cut = data.draw(st.integers(0, len(buf)), label="cut")
    kept = [i + 1 for i, end in enumerate(commit_ends) if end <= cut]
    assert [g.epoch for g in scan(buf[:cut], generation).committed] == kept


@given(generation_st, epochs_st, st.data())
def test_a_flipped_bit_stops_the_scan_at_its_record(
    generation: int, epochs: list[Extents], data: st.DataObject
) -> None:
    buf, starts, commit_ends = build_with_bounds(generation, epochs)
    at = data.draw(st.integers(0, len(buf) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    corrupt = bytearray(buf)
    corrupt[at] ^= 1 << bit
    record_start = max(s for s in starts if s <= at)
    result = scan(bytes(corrupt), generation)
    assert [g.epoch for g in result.committed] == [
        i + 1 for i, end in enumerate(commit_ends) if end <= record_start
    ]
    assert result.end == record_start and result.stop_reason != "end"


@given(generation_st, extents_st, st.lists(st.integers(0, 5), max_size=5))
def test_records_encoded_in_batches_equal_the_group_and_its_commit(
    generation: int, extents: Extents, cuts: list[int]
) -> None:
    """The journal thread encodes a group batch by batch; the bytes and the COMMIT's count and CRC
    must not depend on where the batches were cut."""
    records: list[PendingRecord] = []
    pos = 100
    for start, end, payload in extents:
        records.append((pos, 7, 3, start, payload, end - start))
        pos += record_size(payload, end - start)
    bounds = sorted({0, len(records), *(min(c, len(records)) for c in cuts)})
    group_crcs: dict[int, tuple[int, int]] = {}
    parts: list[bytes] = []
    for a, b in itertools.pairwise(bounds):
        parts += encode_records(generation, records[a:b], group_crcs)
    group, count, crcs = encode_group(generation, 100, 7, 3, extents)
    assert b"".join(parts) == group
    assert group_crcs.get(7, (0, 0)) == (count, crcs) and count == len(extents)


@given(
    st.builds(
        Mark,
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 32) - 1),
        st.booleans(),
        st.integers(0, (1 << 64) - 1),
    ),
    st.data(),
)
def test_mark_round_trip_and_any_flipped_bit_is_refused(mark: Mark, data: st.DataObject) -> None:
    slot = encode_mark(mark)
    assert len(slot) == MARK_SLOT and decode_mark(slot) == mark
    at = data.draw(st.integers(0, MARK.size + CRC.size - 1), label="byte")
    corrupt = bytearray(slot)
    corrupt[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    assert decode_mark(bytes(corrupt)) is None
    assert decode_mark(slot[: MARK.size + CRC.size - 1]) is None  # torn


def test_first_generation_needs_a_whole_valid_first_record() -> None:
    buf = build(5, EPOCHS)
    assert first_generation(buf) == 5
    first = RECORD_OVERHEAD + 4  # EPOCHS' first record carries 4 bytes
    assert first_generation(buf[: first - 1]) is None
    assert first_generation(b"\0" * 8 + buf) is None
    corrupt = bytearray(buf)
    corrupt[first - 1] ^= 1
    assert first_generation(bytes(corrupt)) is None


def test_the_codec_does_no_io() -> None:
    """Bytes in, records out: at run time the codec imports nothing that reaches files, threads or
    the clock (``mmap`` only names a buffer type, for the type checker; ``hybridft_common.fastpath``
    only picks the compiled encoder and CRC, which are pure functions too)."""
    tree = ast.parse(Path(journal_codec.__file__).read_text())
    imported: set[str] = set()
    for node in tree.body:  # module level; an ``if TYPE_CHECKING:`` block is not an import
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    allowed = {
        "__future__",
        "struct",
        "zlib",
        "collections.abc",
        "dataclasses",
        "typing",
        "hybridft_common.fastpath",
    }
    assert imported <= allowed, imported
