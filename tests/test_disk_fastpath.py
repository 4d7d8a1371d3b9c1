"""The disk buffer's compiled fast path against its Python reference, on the same inputs.

Issue 14: the journal's CRC (``_speedups.crc32``, PCLMULQDQ folding, against ``zlib.crc32``), the
journal's record encoder (``journal_encode_records`` against ``encode_records_python``: the same
bytes once joined, the same per-group CRC state, and a scan of the result replays it), the batch
of writes into an extent map (``extents_put_many`` against ``ExtentMap.put_many_python``: the same
regions, extents, payload objects and memory count, for random overlapping writes), and the
journal's queue of a batch (``journal_queue_writes``).  Whatever ``HYBRIDFT_PURE_PYTHON`` says,
both run here side by side; a build without the extension fails these tests, never skips them.
"""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disk_buffer import journal as journal_module
from disk_buffer import journal_codec
from disk_buffer.journal import Journal
from disk_buffer.store import EXTENT_OVERHEAD, REGION_SIZE, ExtentMap, SortedExtents
from hybridft_common import fastpath


def _compiled():  # type: ignore[no-untyped-def]
    assert fastpath.available is not None, (
        "the compiled fast path is not built (hybridft_common._speedups): run `pip install -e .`"
    )
    return fastpath.available


# -- CRC-32 ----------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, (1 << 32) - 1), st.integers(0, 15))
def test_crc32_matches_zlib(data: bytes, value: int, skew: int) -> None:
    speedups = _compiled()
    view = memoryview(b"\0" * skew + data)[skew:]  # unaligned starts too
    assert speedups.crc32(view, value) == zlib.crc32(data, value)
    assert speedups.crc32(data) == zlib.crc32(data)


@pytest.mark.parametrize("size", [63, 64, 65, 79, 80, 127, 128, 129, 4096, 4096 + 52, 65535, 65536, 1 << 20])
def test_crc32_matches_zlib_at_the_fold_boundaries(size: int) -> None:
    speedups = _compiled()
    data = random.Random(size).randbytes(size)
    assert speedups.crc32(data) == zlib.crc32(data)
    assert speedups.crc32(data[size // 3 :], speedups.crc32(data[: size // 3])) == zlib.crc32(data)


def test_crc32_uses_the_carry_less_multiply_where_the_cpu_has_it() -> None:
    """On x86-64 with PCLMULQDQ (every x86 CPU since 2010, this machine's too) the fast code runs."""
    speedups = _compiled()
    flags = Path("/proc/cpuinfo").read_text()
    expected = int(" pclmulqdq" in flags and " sse4_1" in flags and os.uname().machine == "x86_64")
    assert speedups.crc32_clmul == expected


def test_crc32_refuses_what_zlib_refuses() -> None:
    speedups = _compiled()
    with pytest.raises(TypeError):
        speedups.crc32("text")
    with pytest.raises(TypeError):
        speedups.crc32()


# -- journal records -------------------------------------------------------------------------------


@st.composite
def pending_records(draw: st.DrawFn) -> list[tuple]:
    """Records as the journal queues them: groups one after another, positions back to back."""
    records: list[tuple] = []
    pos = draw(st.integers(0, 1 << 30))
    seq = draw(st.integers(1, 1 << 40))
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 5)) == 0:
            seq += draw(st.integers(1, 3))
        epoch = seq * 2
        offset = draw(st.integers(0, 1 << 40)) & ~511
        if draw(st.booleans()):
            length = draw(st.integers(1, 1 << 30))
            data = None
        else:
            data = draw(
                st.binary(min_size=1, max_size=300).map(bytes)
                | st.sampled_from([bytes(4096), b"\xa5" * 70000])
            )
            length = len(data)
        records.append((pos, seq, epoch, offset, data, length))
        pos += journal_codec.record_size(data, length)
    return records


@settings(max_examples=300, deadline=None)
@given(
    pending_records(),
    st.integers(0, (1 << 32) - 1),
    st.dictionaries(
        st.integers(1, 1 << 41), st.tuples(st.integers(0, 1000), st.integers(0, (1 << 32) - 1)), max_size=3
    ),
)
def test_compiled_journal_records_match_python(records: list[tuple], generation: int, known: dict) -> None:
    _compiled()
    crcs_python, crcs_compiled = dict(known), dict(known)
    expected = journal_codec.encode_records_python(generation, records, crcs_python)
    parts = journal_codec.encode_records_compiled(generation, records, crcs_compiled)
    assert b"".join(parts) == b"".join(expected)
    assert crcs_compiled == crcs_python
    # payloads are passed through, never copied: one buffer between two payloads
    payloads = [r[4] for r in records if r[4] is not None]
    assert [p for p in parts[1::2]] == payloads
    assert all(p is q for p, q in zip(parts[1::2], payloads, strict=True))
    assert len(parts) == 2 * len(payloads) + (1 if records else 0)


def test_compiled_journal_records_replay() -> None:
    """Records the compiled encoder wrote, committed, come back from a scan."""
    _compiled()
    records = []
    pos = 0
    for i in range(50):
        data = None if i % 7 == 0 else os.urandom(4096)
        records.append((pos, 3, 9, i * 8192, data, 4096))
        pos += journal_codec.record_size(data, 4096)
    crcs: dict[int, tuple[int, int]] = {}
    buf = b"".join(journal_codec.encode_records_compiled(5, records, crcs))
    count, crc_of_crcs = crcs[3]
    buf += journal_codec.encode_commit(5, pos, 3, 9, count, crc_of_crcs)
    result = journal_codec.scan(buf, 5)
    assert result.stop_reason == "end"
    assert [e.epoch for e in result.committed] == [9]
    assert [(x.offset, x.payload_at is None) for x in result.committed[0].extents] == [
        (r[3], r[4] is None) for r in records
    ]


def test_compiled_journal_records_refuse_bad_records() -> None:
    speedups = _compiled()
    with pytest.raises(TypeError):
        speedups.journal_encode_records(1, [(0, 1, 2, 3, b"x")], {})
    with pytest.raises(OverflowError):
        speedups.journal_encode_records(1 << 32, [], {})
    with pytest.raises((OverflowError, ValueError)):
        speedups.journal_encode_records(1, [(-1, 1, 2, 3, b"x", 1)], {})


def test_journal_queues_a_batch_as_the_python_loop_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _compiled()
    queued = []
    for queue in (None, journal_module._queue_writes):
        monkeypatch.setattr(journal_module, "_queue_writes", queue)
        j = Journal(tmp_path / f"state{len(queued)}", 1 << 30)
        try:
            j.restart(0)
            j.open_group(1, 1)
            j.append(1, 1, 0, b"a" * 512, 512)
            j.append_many(1, 1, [4096, 8192, 1 << 20], [b"b" * 4096, b"c" * 512, b"d" * 65536])
            queued.append((list(j._pending[0]), j._pos[0], j._pending_bytes))
        finally:
            j.close()
    assert queued[0] == queued[1]


# -- extent maps -----------------------------------------------------------------------------------


def _state(m: ExtentMap) -> tuple:
    regions = {
        k: (list(r.starts), list(r.ends), [None if d is None else bytes(d) for d in r.datas], r.data_bytes)
        for k, r in m.regions.items()
    }
    return m.data_bytes, regions


@st.composite
def write_batches(draw: st.DrawFn) -> tuple[list[tuple[int, int, bool]], list[int], list[int]]:
    """Existing extents (some zero), then a batch: block-aligned 4 KiB rewrites, small unaligned
    overlaps, writes across a region boundary, empty writes."""
    span = 4 * REGION_SIZE
    before = [
        (draw(st.integers(0, span - 1)), draw(st.integers(1, 3 * 4096)), draw(st.booleans()))
        for _ in range(draw(st.integers(0, 30)))
    ]
    offsets: list[int] = []
    lengths: list[int] = []
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(st.integers(0, 4))
        if kind <= 1:
            offsets.append(draw(st.integers(0, span // 4096 - 1)) * 4096)
            lengths.append(4096)
        elif kind == 2:
            offsets.append(draw(st.integers(0, span - 1)))
            lengths.append(draw(st.integers(0, 9000)))
        elif kind == 3:
            boundary = draw(st.integers(1, 3)) * REGION_SIZE
            offsets.append(boundary - draw(st.integers(1, 5000)))
            lengths.append(draw(st.integers(1, 2 * REGION_SIZE)))
        else:  # a rewrite of an earlier write of the batch
            if offsets:
                i = draw(st.integers(0, len(offsets) - 1))
                offsets.append(offsets[i])
                lengths.append(lengths[i])
    return before, offsets, lengths


@settings(max_examples=300, deadline=None)
@given(write_batches())
def test_compiled_extent_batches_match_python(batch: tuple) -> None:
    _compiled()
    before, offsets, lengths = batch
    maps = [ExtentMap(), ExtentMap()]
    for m in maps:
        for start, length, is_data in before:
            m.put(start, length, bytes([start % 251]) * length if is_data else None)
    payloads = [bytes([i % 256]) * n for i, n in enumerate(lengths)]
    maps[0].put_many_python(offsets, payloads)
    maps[1].put_many_compiled(offsets, payloads)
    assert _state(maps[1]) == _state(maps[0])
    # the count is exact: payload bytes plus an overhead per extent
    m = maps[1]
    extents = m.items()
    assert m.data_bytes == sum(EXTENT_OVERHEAD + (e - s if d is not None else 0) for s, e, d in extents)
    # the map holds the payload objects themselves where a write was not cut (no copies)
    held = {id(d) for r in m.regions.values() for d in r.datas}
    whole = [p for o, p in zip(offsets, payloads, strict=True) if p and (o + len(p) - 1) >> 20 == o >> 20]
    assert any(id(p) in held for p in whole) or not whole


def test_compiled_extent_batch_keeps_its_count_when_a_write_fails() -> None:
    speedups = _compiled()
    m = ExtentMap()
    with pytest.raises(TypeError):
        speedups.extents_put_many(
            m, [0, 8192, 4096], [b"a" * 4096, 42, b"c"], SortedExtents, EXTENT_OVERHEAD, 20
        )
    assert [(s, e) for s, e, _ in m.items()] == [(0, 4096)]
    assert m.data_bytes == EXTENT_OVERHEAD + 4096
    with pytest.raises(ValueError):
        speedups.extents_put_many(m, [0], [], SortedExtents, EXTENT_OVERHEAD, 20)


# -- the write-out's loop ---------------------------------------------------------------------------


class _SnapshotAtFault:
    """A fault injector that copies the image when the write-out reaches ``writeout-mid``."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.snapshots: list[bytes] = []

    def hit(self, point: str) -> None:
        assert point == "writeout-mid"
        self.snapshots.append(os.pread(self.fd, self.size, 0))


@settings(max_examples=150, deadline=None)
@given(write_batches(), st.integers(1, 5), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 9000))))
def test_compiled_write_out_writes_what_python_writes(batch: tuple, chunk: int, zeroes: list) -> None:
    """The same bytes in IMG, and the same IMG at the ``writeout-mid`` fault point, for epochs of
    random writes and zeroed ranges; chunks as small as one extent exercise the chunking."""
    _compiled()
    from types import SimpleNamespace

    from disk_buffer.buffer import DiskBuffer

    before, offsets, lengths = batch
    epochs = [ExtentMap(), ExtentMap()]
    for start, length, is_data in before:
        epochs[0].put(start, length, bytes([start % 251 or 1]) * length if is_data else None)
    for start, length in zeroes:
        epochs[0].put(start, length, None)
    epochs[1].put_many_python(offsets, [bytes([i % 255 + 1]) * n for i, n in enumerate(lengths)])
    size = 5 * REGION_SIZE
    images = []
    for kind in ("python", "compiled"):
        fd = os.memfd_create(f"img-{kind}")
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, b"\x77" * size, 0)  # zeroing must show
            faults = _SnapshotAtFault(fd, size)
            shell = SimpleNamespace(_fd=fd, _crashing=False, _faults=faults, APPLY_CHUNK=chunk)
            sealed = [SimpleNamespace(extents=e) for e in epochs]
            assert getattr(DiskBuffer, f"_apply_{kind}")(shell, sealed) is True
            images.append((os.pread(fd, size, 0), faults.snapshots))
        finally:
            os.close(fd)
    assert images[1] == images[0]


def test_write_extents_reports_a_failed_write_as_oserror() -> None:
    speedups = _compiled()
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(OSError):  # a pipe cannot be written at an offset
            speedups.write_extents(r, [(0, 4, b"abcd")], 0, 1)
    finally:
        os.close(r)
    with pytest.raises(ValueError):
        speedups.write_extents(0, [(0, 5, b"abcd")], 0, 1)


# -- attributes read and written at their slot's offset -------------------------------------------


class _MapA:
    __slots__ = ("data_bytes", "regions")


class _MapB:  # the same names at other offsets: a cache keyed by name alone would mix them up
    __slots__ = ("a_pad", "b_pad", "c_pad", "data_bytes", "regions")


class _MapDict:  # no slots: the attributes live in the instance dict
    pass


def _new_map(cls: type) -> object:
    m = cls()
    m.regions = {}  # type: ignore[attr-defined]
    m.data_bytes = 0  # type: ignore[attr-defined]
    return m


def _reference(offsets: list[int], payloads: list[bytes]) -> ExtentMap:
    ref = ExtentMap()
    ref.put_many_python(offsets, payloads)
    return ref


def test_compiled_attributes_follow_each_type_and_class_changes() -> None:
    """``_speedups`` reads and writes slotted attributes directly at their offsets, cached per type
    and name; that must stay exact for types whose slots sit at other offsets, for dict-based
    objects, and for a class changed after the cache was filled (here a slot replaced by a
    property, whose setter must then see every write)."""
    compiled = _compiled()
    rng = random.Random(5)
    maps = {cls: _new_map(cls) for cls in (_MapA, _MapB, _MapDict)}
    written: dict[type, tuple[list[int], list[bytes]]] = {cls: ([], []) for cls in maps}
    for _ in range(30):  # interleaved: each call meets the other types' cache entries
        for cls, m in maps.items():
            # 4 KiB-aligned, at most 4 KiB: each write within one region
            offsets = [rng.randrange(0, 8 * REGION_SIZE, 4096) for _ in range(rng.randrange(1, 6))]
            payloads = [rng.randbytes(rng.choice((512, 4096))) for _ in offsets]
            compiled.extents_put_many(m, offsets, payloads, SortedExtents, EXTENT_OVERHEAD, 20)
            written[cls][0].extend(offsets)
            written[cls][1].extend(payloads)
    for cls, m in maps.items():
        ref = _reference(*written[cls])
        assert m.data_bytes == ref.data_bytes, cls  # type: ignore[attr-defined]
        assert sorted(m.regions) == sorted(ref.regions), cls  # type: ignore[attr-defined]
        if cls is _MapB:
            assert not any(hasattr(m, pad) for pad in ("a_pad", "b_pad", "c_pad"))  # no stray writes

    class _MapC:
        __slots__ = ("data_bytes", "regions")

    m = _new_map(_MapC)
    compiled.extents_put_many(m, [0], [b"x" * 4096], SortedExtents, EXTENT_OVERHEAD, 20)  # fills the cache
    first = m.data_bytes
    assert first == _reference([0], [b"x" * 4096]).data_bytes
    seen: list[int] = []
    _MapC.data_bytes = property(  # type: ignore[assignment]
        lambda self: seen[-1] if seen else first, lambda self, value: seen.append(value)
    )
    compiled.extents_put_many(m, [8192], [b"y" * 4096], SortedExtents, EXTENT_OVERHEAD, 20)
    assert seen == [_reference([0, 8192], [b"x" * 4096, b"y" * 4096]).data_bytes]

    class _MapWatched:  # slots, but its own __setattr__: every write must go through it
        __slots__ = ("data_bytes", "regions")

        def __setattr__(self, name: str, value: object) -> None:
            sets.append(name)
            object.__setattr__(self, name, value)

    sets: list[str] = []
    w = _new_map(_MapWatched)
    sets.clear()
    compiled.extents_put_many(w, [0], [b"z" * 4096], SortedExtents, EXTENT_OVERHEAD, 20)
    compiled.extents_put_many(w, [4096], [b"z" * 4096], SortedExtents, EXTENT_OVERHEAD, 20)
    assert sets == ["data_bytes", "data_bytes"]
