"""The sans-I/O epoch store: extent maps against a bytearray, layer resolution, and the epoch verbs'
rules (what each verb does, what it refuses, and that a refusal changes nothing)."""

from __future__ import annotations

import copy
import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from disk_buffer.store import (
    EXTENT_OVERHEAD,
    REGION_SHIFT,
    REGION_SIZE,
    DiskBufferError,
    EpochStore,
    Export,
    ExtentMap,
    ReadPlan,
    resolve,
)

SIZE = 4096


def materialise(layers: tuple[ExtentMap, ...], base: bytes, offset: int, length: int) -> bytes:
    plan = resolve(layers, offset, length)
    if isinstance(plan, bytes):
        return plan
    assert isinstance(plan, ReadPlan)
    out = plan.buffer
    for start, end in plan.holes:
        out[start - offset : end - offset] = base[start:end]
    return bytes(out)


puts = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(1, 700), st.integers(0, 255), st.booleans()), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(puts=puts, reads=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 900)), max_size=10))
def test_extent_map_reads_like_a_bytearray(
    puts: list[tuple[int, int, int, bool]], reads: list[tuple[int, int]]
) -> None:
    # The window straddles a region boundary, so extents get split across regions.
    origin = REGION_SIZE - SIZE // 2
    base = bytes(origin) + bytes(range(256)) * (SIZE // 256)
    reference = bytearray(base)
    emap = ExtentMap()
    for offset, length, fill, zero in puts:
        length = min(length, SIZE - offset)
        offset += origin
        data = None if zero else bytes([fill]) * length
        emap.put(offset, length, data)
        reference[offset : offset + length] = bytes(length) if zero else data
        items = emap.items()
        assert all(s < e and s >> REGION_SHIFT == (e - 1) >> REGION_SHIFT for s, e, _ in items)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(items)), "extents overlap"
        assert all(d is None or len(d) == e - s for s, e, d in items)
        assert emap.data_bytes == sum(EXTENT_OVERHEAD + (e - s if d is not None else 0) for s, e, d in items)
    assert materialise((emap,), base, origin, SIZE) == bytes(reference[origin:])
    for offset, length in reads:
        length = min(length, SIZE - offset)
        offset += origin
        assert materialise((emap,), base, offset, length) == bytes(reference[offset : offset + length])


def test_resolve_layers_newest_first_and_fast_paths() -> None:
    top, below = ExtentMap(), ExtentMap()
    block = b"T" * 4096
    top.put(4096, 4096, block)
    below.put(0, 16384, b"B" * 16384)
    assert resolve((top, below), 4096, 4096) is block  # whole extent: no copy
    assert resolve((top, below), 5000, 10) == b"T" * 10
    assert resolve((top, below), 4000, 200) == b"B" * 96 + b"T" * 104
    plan = resolve((top, below), 16000, 1000)
    assert isinstance(plan, ReadPlan) and plan.holes == [(16384, 17000)]
    assert bytes(plan.buffer[:384]) == b"B" * 384
    empty = resolve((), 0, 10)
    assert isinstance(empty, ReadPlan) and empty.holes == [(0, 10)]
    top.put(0, 100, None)
    assert resolve((top, below), 0, 100) == bytes(100)


def test_seal_moves_view_and_commit_moves_to_writeout() -> None:
    s = EpochStore(1 << 20)
    s.target(Export.REPLICA).put(0, 3, b"abc")
    s.target(Export.VIEW).put(10, 2, b"vv")
    assert resolve(s.layers(Export.VIEW), 0, 3).holes == [(0, 3)]  # type: ignore[union-attr]
    sealed = s.seal()
    assert sealed.epoch == 1 and s.current_epoch == 2 and s.view.base == 1
    assert resolve(s.layers(Export.VIEW), 0, 3) == b"abc"  # the sealed epoch is visible in view now
    assert isinstance(resolve(s.layers(Export.VIEW), 10, 2), ReadPlan)  # overlay emptied
    s.target(Export.REPLICA).put(0, 3, b"xyz")  # epoch 2
    assert resolve(s.layers(Export.REPLICA), 0, 3) == b"xyz"
    assert resolve(s.layers(Export.VIEW), 0, 3) == b"abc"
    s.begin_commit(1)
    s.finish_commit(1)
    assert s.committed == 1 and s.writeout_bytes > 0 and s.status()["backlog"] == 1
    assert 1 not in s.rollback_views
    s.applied_upto(1)
    assert s.writeout == [] and s.writeout_bytes == 0 and s.applied == 1


@pytest.mark.parametrize(
    ("prepare", "epoch", "code"),
    [
        (0, 1, "wrong-state"),  # still open
        (0, 7, "unknown-epoch"),
        (2, 2, "out-of-order"),  # 1 must come first
        (2, 0, "out-of-order"),  # already committed (nothing is, 0 is the start)
        (1, "1", "unknown-epoch"),
    ],
)
def test_commit_refusals_change_nothing(prepare: int, epoch: object, code: str) -> None:
    s = EpochStore(1 << 20)
    for _ in range(prepare):
        s.target(Export.REPLICA).put(0, 1, b"x")
        s.seal()
    before = copy.deepcopy(s.status())
    with pytest.raises(DiskBufferError) as info:
        s.begin_commit(epoch)  # type: ignore[arg-type]
    assert info.value.code == code, info.value.message
    assert s.status() == before


def test_no_second_commit_or_rollback_while_committing() -> None:
    s = EpochStore(1 << 20)
    s.seal()
    s.seal()
    s.begin_commit(1)
    for call in (lambda: s.begin_commit(2), s.rollback, s.begin_failover):
        with pytest.raises(DiskBufferError) as info:
            call()
        assert info.value.code == "wrong-state"
    s.abort_commit(1)
    s.begin_commit(1)
    s.finish_commit(1)
    assert s.committed == 1 and [e.epoch for e in s.sealed] == [2]


def test_rollback_restores_the_view_from_before_the_oldest_seal_with_the_vms_writes_since() -> None:
    s = EpochStore(1 << 20)
    s.target(Export.VIEW).put(0, 2, b"o1")
    s.target(Export.VIEW).put(10, 2, b"k1")
    s.target(Export.REPLICA).put(100, 1, b"p")
    s.target(Export.REPLICA).put(200, 2, b"pp")
    s.seal()  # epoch 1, view keeps overlay o1 for rollback
    assert resolve(s.layers(Export.VIEW), 200, 2) == b"pp"  # the view is at epoch 1 now
    s.target(Export.VIEW).put(0, 2, b"o2")
    s.seal()  # epoch 2
    s.target(Export.VIEW).put(1, 1, b"3")
    s.target(Export.REPLICA).put(100, 1, b"q")  # epoch 3, open
    result = s.rollback()
    assert result["dropped_epochs"] == [1, 2] and result["epoch"] == 1
    # the primary's epochs are gone from the view; the VM's own writes made since (it never loaded
    # them, or it would not be rolled back) are kept, newest last, over what it wrote before
    assert isinstance(resolve(s.layers(Export.VIEW), 200, 2), ReadPlan)
    assert resolve(s.layers(Export.VIEW), 0, 2) == b"o3"
    assert resolve(s.layers(Export.VIEW), 10, 2) == b"k1"
    assert result["view_bytes_kept"] == 3
    assert isinstance(resolve(s.layers(Export.REPLICA), 100, 1), ReadPlan)  # every uncommitted write gone
    with pytest.raises(DiskBufferError) as info:
        s.rollback()
    assert info.value.code == "wrong-state"


def test_rollback_after_a_commit_keeps_the_committed_epoch() -> None:
    s = EpochStore(1 << 20)
    s.target(Export.REPLICA).put(0, 1, b"a")
    s.seal()
    s.target(Export.VIEW).put(5, 1, b"v")
    s.target(Export.REPLICA).put(0, 1, b"b")
    s.seal()
    s.begin_commit(1)
    s.finish_commit(1)
    s.rollback()
    assert resolve(s.layers(Export.REPLICA), 0, 1) == b"a"
    assert resolve(s.layers(Export.VIEW), 0, 1) == b"a"
    assert resolve(s.layers(Export.VIEW), 5, 1) == b"v"  # the view as it was before epoch 2 was sealed


def test_failover_rules() -> None:
    s = EpochStore(1 << 20)
    s.seal()
    with pytest.raises(DiskBufferError) as info:
        s.begin_failover()
    assert info.value.code == "wrong-state"
    s.begin_commit(1)
    s.finish_commit(1)
    s.target(Export.REPLICA).put(0, 1, b"lost")
    s.begin_failover()
    assert s.current.items() == []
    with pytest.raises(DiskBufferError):
        s.target(Export.REPLICA)
    s.applied_upto(1)
    s.finish_failover()
    assert s.target(Export.VIEW) is None and s.layers(Export.VIEW) == ()
    for call in (s.seal, s.rollback, lambda: s.begin_commit(2), s.begin_failover):
        with pytest.raises(DiskBufferError) as info:
            call()
        assert info.value.code == "wrong-state"


def test_range_checks() -> None:
    s = EpochStore(4096)
    s.check_range(0, 4096)
    for offset, length in ((-1, 1), (0, 4097), (4096, 1), (10, -1)):
        with pytest.raises(DiskBufferError) as info:
            s.check_range(offset, length)
        assert info.value.code == "range"


def test_speculation_accounting() -> None:
    s = EpochStore(1 << 20)
    s.target(Export.REPLICA).put(0, 4096, bytes(4096))
    s.target(Export.VIEW).put(0, 4096, bytes(4096))
    assert s.speculation_bytes() == 2 * (4096 + EXTENT_OVERHEAD)
    s.seal()  # sealed epoch + kept rollback overlay still count
    assert s.speculation_bytes() == 2 * (4096 + EXTENT_OVERHEAD)
    s.begin_commit(1)
    s.finish_commit(1)
    assert s.speculation_bytes() == 0 and s.writeout_bytes == 4096 + EXTENT_OVERHEAD
