"""The sans-I/O epoch store: what every byte of ``replica`` and ``view`` is, without touching a file.

Why a separate, I/O-free core: the epoch rules (what a read sees, what seal/commit/rollback/failover
do, which calls are refused) are the part that must be exactly right, and they are easiest to get
right -- and to test against a plain model -- when they are a state machine over in-memory extent
maps.  The shell (:mod:`disk_buffer.buffer`) owns the image file, the journal and the threads; it
asks this store *what* to read or persist and does the I/O itself.

Layers, newest first (each one an :class:`ExtentMap` of byte ranges -> data or zeroes)::

    replica:  current epoch  >  sealed epochs (newest first)  >  committed, not yet applied  >  IMG
    view:     overlay        >  sealed epochs <= view base    >  committed, not yet applied  >  IMG

* The *current* epoch collects the primary's writes (``replica``).  ``seal`` freezes it as epoch N
  and starts N+1.
* ``view`` is a base epoch plus an *overlay* of the secondary VM's own writes.  ``seal`` moves the
  base to N with an empty overlay and keeps the previous view (base + overlay) for ``rollback``,
  which brings it back with the VM's writes made since put on top (:meth:`EpochStore.rollback`).
* ``commit N`` (after the shell made N durable) moves N to the write-out queue; the shell applies
  it to IMG in the background and calls :meth:`EpochStore.applied`.
* Every live view's base is >= the last committed epoch, so IMG (applied epochs only) is always
  below every layer stack and a layer can be dropped as soon as its bytes were written to IMG.

Sealed and committed maps are never mutated again, which is what lets the write-out thread read
them while the event loop keeps writing into the current epoch.  The store itself is not thread
safe: the shell serialises calls that change the layer structure.

A refused call raises :class:`DiskBufferError` and changes nothing.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hybridft_common.errors import HybridftError
from hybridft_common.fastpath import available, speedups

#: Bookkeeping cost charged per extent, so that budgets also bound floods of tiny writes and trims.
EXTENT_OVERHEAD = 64


class Export(StrEnum):
    """The two NBD exports of the disk buffer."""

    REPLICA = "replica"
    VIEW = "view"


class DiskBufferError(HybridftError):
    """A refused disk buffer call.  ``code`` is one of ``unknown-epoch``, ``out-of-order``,
    ``wrong-state``, ``range``, ``nospace``, ``io``, ``config``, ``corrupt``.  State is unchanged."""


class WriteBatchError(Exception):
    """A batch of writes stopped at ``index``: the writes before it are applied, the one at it failed
    with ``cause``, the rest were not attempted -- what one call per write would have done."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index, cause)
        self.index = index
        self.cause = cause


#: Extent maps are split into regions of this many bytes (a power of two).  Within a region a sorted
#: list keeps inserts cheap (at most a few hundred entries to shift); across regions a dict.
REGION_SHIFT = 20
REGION_SIZE = 1 << REGION_SHIFT


def _cost(start: int, end: int, data: bytes | None) -> int:
    return EXTENT_OVERHEAD + (end - start if data is not None else 0)


class SortedExtents:
    """Non-overlapping byte ranges ``[start, end)`` -> data (``bytes``) or zeroes (``None``), as three
    parallel sorted lists searched with :mod:`bisect`.  A write that overlaps nothing is one
    ``list.insert`` per list; an exact rewrite of an existing extent is one assignment."""

    __slots__ = ("data_bytes", "datas", "ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.datas: list[bytes | None] = []
        self.data_bytes = 0

    def put(self, start: int, end: int, data: bytes | None) -> None:
        starts, ends, datas = self.starts, self.ends, self.datas
        i = bisect_right(starts, start) - 1
        if i >= 0 and ends[i] > start:
            first = i
            if starts[i] == start and ends[i] == end:  # exact rewrite: the common case for a VM disk
                self.data_bytes += _cost(start, end, data) - _cost(start, end, datas[i])
                datas[i] = data
                return
        else:
            first = i + 1
        stop = bisect_left(starts, end, first)
        if first == stop:  # overlaps nothing
            starts.insert(first, start)
            ends.insert(first, end)
            datas.insert(first, data)
            self.data_bytes += _cost(start, end, data)
            return
        new_starts = []
        new_ends = []
        new_datas: list[bytes | None] = []
        removed = 0
        for j in range(first, stop):
            removed += _cost(starts[j], ends[j], datas[j])
        s0, d0 = starts[first], datas[first]
        if s0 < start:
            new_starts.append(s0)
            new_ends.append(start)
            new_datas.append(None if d0 is None else d0[: start - s0])
        new_starts.append(start)
        new_ends.append(end)
        new_datas.append(data)
        sl, el, dl = starts[stop - 1], ends[stop - 1], datas[stop - 1]
        if el > end:
            new_starts.append(end)
            new_ends.append(el)
            new_datas.append(None if dl is None else dl[end - sl :])
        starts[first:stop] = new_starts
        ends[first:stop] = new_ends
        datas[first:stop] = new_datas
        added = sum(_cost(s, e, d) for s, e, d in zip(new_starts, new_ends, new_datas, strict=True))
        self.data_bytes += added - removed

    def overlapping(self, start: int, end: int) -> tuple[int, int]:
        """Index range ``[first, stop)`` of the extents that overlap ``[start, end)``."""
        starts = self.starts
        i = bisect_right(starts, start) - 1
        first = i if i >= 0 and self.ends[i] > start else i + 1
        return first, bisect_left(starts, end, first)


class ExtentMap:
    """Byte ranges of a disk -> data or zeroes: a dict of 1 MiB regions, each a :class:`SortedExtents`.

    Why regions: one flat sorted list made a random 4 KiB write cost O(extents) (27 us at 50k
    extents, measured); a dict keyed by 4 KiB block cannot hold a 1 GiB trim or a 1 MiB write as one
    entry.  Regions keep both cheap: inserts shift at most a region's entries, big writes and trims
    are one extent per region.  Extents never cross a region boundary.
    """

    __slots__ = ("data_bytes", "regions")

    def __init__(self) -> None:
        self.regions: dict[int, SortedExtents] = {}
        #: Memory held: data bytes plus :data:`EXTENT_OVERHEAD` per extent.
        self.data_bytes = 0

    def __len__(self) -> int:
        return sum(len(r.starts) for r in self.regions.values())

    def __bool__(self) -> bool:
        return bool(self.regions)

    def put(self, start: int, length: int, data: bytes | None) -> None:
        """Make ``[start, start+length)`` read as ``data`` (``None``: zeroes), replacing what was there."""
        if length <= 0:
            return
        end = start + length
        index = start >> REGION_SHIFT
        regions = self.regions
        if (end - 1) >> REGION_SHIFT == index:  # the common case: one region
            region = regions.get(index)
            if region is None:
                region = regions[index] = SortedExtents()
            before = region.data_bytes
            region.put(start, end, data)
            self.data_bytes += region.data_bytes - before
            return
        view = None if data is None else memoryview(data)
        pos = start
        while pos < end:
            index = pos >> REGION_SHIFT
            stop = min(end, (index + 1) << REGION_SHIFT)
            region = regions.get(index)
            if region is None:
                region = regions[index] = SortedExtents()
            before = region.data_bytes
            region.put(pos, stop, None if view is None else bytes(view[pos - start : stop - start]))
            self.data_bytes += region.data_bytes - before
            pos = stop

    def put_many_python(self, offsets: list[int], payloads: list[bytes]) -> None:
        """:meth:`put` of each ``(offset, payload)`` in order: the NBD fast path's batch of writes.

        The same result as calling :meth:`put` once per write; the one-region case (every write
        of a guest's 4 KiB pages) is inlined, because at 50k+ writes/s the call overhead is a
        measurable share of the event loop's time.  The reference of :meth:`put_many_compiled`.
        """
        regions = self.regions
        grown = 0
        for start, data in zip(offsets, payloads, strict=True):
            length = len(data)
            if length <= 0:
                continue
            index = start >> REGION_SHIFT
            if (start + length - 1) >> REGION_SHIFT != index:
                self.data_bytes += grown
                grown = 0
                self.put(start, length, data)
                continue
            region = regions.get(index)
            if region is None:
                region = regions[index] = SortedExtents()
            before = region.data_bytes
            region.put(start, start + length, data)
            grown += region.data_bytes - before
        self.data_bytes += grown

    def put_many_compiled(self, offsets: list[int], payloads: list[bytes]) -> None:
        """:meth:`put_many_python` in C (``_speedups.extents_put_many``): an exact rewrite of an
        extent and a write that overlaps nothing are done in C, anything else by the regions' own
        :meth:`SortedExtents.put`; ``data_bytes`` stays exact if a write fails part way."""
        assert available is not None
        available.extents_put_many(self, offsets, payloads, SortedExtents, EXTENT_OVERHEAD, REGION_SHIFT)

    put_many = put_many_python if speedups is None else put_many_compiled

    def items(self) -> list[tuple[int, int, bytes | None]]:
        """All extents as ``(start, end, data|None)``, in offset order."""
        out: list[tuple[int, int, bytes | None]] = []
        regions = self.regions
        for index in sorted(regions):
            r = regions[index]
            out.extend(zip(r.starts, r.ends, r.datas, strict=True))
        return out

    def payload_bytes(self) -> int:
        """Bytes of real data (zero extents excluded)."""
        return sum(e - s for s, e, d in self.items() if d is not None)


@dataclass(slots=True)
class ReadPlan:
    """A read the store could not answer alone: ``holes`` (absolute ``(start, end)``) must be filled
    from IMG into ``buffer`` at ``start - offset``.  Everything else in ``buffer`` is final."""

    offset: int
    buffer: bytearray
    holes: list[tuple[int, int]]


def resolve(layers: tuple[ExtentMap, ...], offset: int, length: int) -> bytes | ReadPlan:
    """Read ``[offset, offset+length)`` through ``layers`` (newest first).

    Returns the bytes when the layers cover the whole range, else a :class:`ReadPlan` whose holes
    fall through to IMG.  Fast paths: no layer overlaps (one hole), or the topmost overlapping
    layer covers the range with a single extent (no copy when it is exactly that extent).
    """
    end = offset + length
    index = offset >> REGION_SHIFT
    if length <= 0 or (end - 1) >> REGION_SHIFT != index:
        out = bytearray(length)
        holes: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            index = pos >> REGION_SHIFT
            stop = min(end, (index + 1) << REGION_SHIFT)
            subs = [r for layer in layers if (r := layer.regions.get(index)) is not None]
            _fill(subs, pos, stop, out, offset, holes)
            pos = stop
        return ReadPlan(offset, out, holes) if holes else bytes(out)
    subs = [r for layer in layers if (r := layer.regions.get(index)) is not None]
    for depth, region in enumerate(subs):
        first, stop = region.overlapping(offset, end)
        if first == stop:
            continue
        if stop - first == 1:
            s, e = region.starts[first], region.ends[first]
            if s <= offset and e >= end:
                data = region.datas[first]
                if data is None:
                    return bytes(length)
                if s == offset and e == end:
                    return data
                return data[offset - s : end - s]
        out = bytearray(length)
        holes = []
        _fill(subs[depth:], offset, end, out, offset, holes)
        return ReadPlan(offset, out, holes) if holes else bytes(out)
    return ReadPlan(offset, bytearray(length), [(offset, end)])


def _fill(
    regions: list[SortedExtents],
    start: int,
    end: int,
    out: bytearray,
    base: int,
    holes: list[tuple[int, int]],
) -> None:
    """Copy ``[start, end)`` from ``regions`` (newest first) into ``out`` (indexed from ``base``,
    zero-filled, so zero extents need no copy); append what no region covers to ``holes``."""
    pending = [(start, end)]
    for region in regions:
        starts, ends, datas = region.starts, region.ends, region.datas
        remaining: list[tuple[int, int]] = []
        for hs, he in pending:
            first, stop = region.overlapping(hs, he)
            cursor = hs
            for j in range(first, stop):
                s = max(starts[j], hs)
                e = min(ends[j], he)
                if s > cursor:
                    remaining.append((cursor, s))
                data = datas[j]
                if data is not None:
                    origin = starts[j]
                    out[s - base : e - base] = memoryview(data)[s - origin : e - origin]
                cursor = e
            if cursor < he:
                remaining.append((cursor, he))
        pending = remaining
        if not pending:
            return
    holes.extend(pending)


@dataclass(slots=True)
class SealedEpoch:
    """A closed epoch: its number, a sequence number unique for this process (journal grouping),
    and its frozen extents."""

    epoch: int
    seq: int
    extents: ExtentMap


@dataclass(slots=True)
class View:
    """The secondary VM's disk: every epoch <= ``base`` plus ``overlay``."""

    base: int
    overlay: ExtentMap = field(default_factory=ExtentMap)


class EpochStore:
    """The in-memory state machine behind both exports (see the module docstring)."""

    def __init__(self, size: int, committed: int = 0, *, failed_over: bool = False) -> None:
        if size < 0:
            raise DiskBufferError(f"negative image size {size}", "config")
        self.size = size
        self.committed = committed
        self.applied = committed
        self.failed_over = failed_over
        self.current = ExtentMap()
        self.current_epoch = committed + 1
        self.sealed: list[SealedEpoch] = []
        self.committing: int | None = None
        self.failing_over = False
        #: Committed epochs not yet applied to IMG, oldest first.
        self.writeout: list[SealedEpoch] = []
        self.writeout_bytes = 0
        self.view = View(committed)
        #: epoch -> the view as it was before that epoch was sealed (what rollback brings back).
        self.rollback_views: dict[int, View] = {}
        #: Journal group of the current epoch (unique per process; a rolled-back epoch number is
        #: reused, its group number never is).
        self.current_seq = 1
        self._frozen_bytes = 0  # sealed epochs + kept rollback overlays
        self.replica_layers: tuple[ExtentMap, ...] = ()
        self.view_layers: tuple[ExtentMap, ...] = ()
        self._rebuild()

    # -- layer bookkeeping ---------------------------------------------------------------------

    def _rebuild(self) -> None:
        committed_maps = [s.extents for s in reversed(self.writeout)]
        sealed_new_first = list(reversed(self.sealed))
        self.replica_layers = (self.current, *(s.extents for s in sealed_new_first), *committed_maps)
        self.view_layers = (
            self.view.overlay,
            *(s.extents for s in sealed_new_first if s.epoch <= self.view.base),
            *committed_maps,
        )
        self._frozen_bytes = sum(s.extents.data_bytes for s in self.sealed) + sum(
            v.overlay.data_bytes for v in self.rollback_views.values()
        )

    def speculation_bytes(self) -> int:
        """Memory only a checkpoint frees: current + sealed epochs, the overlay, kept rollback views."""
        return self.current.data_bytes + self.view.overlay.data_bytes + self._frozen_bytes

    # -- I/O decisions -------------------------------------------------------------------------

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskBufferError(
                f"range offset={offset} length={length} is outside the {self.size}-byte image", "range"
            )

    def layers(self, export: Export) -> tuple[ExtentMap, ...]:
        """The layer stack a read of ``export`` goes through (empty after failover: IMG only)."""
        if self.failed_over:
            return ()
        return self.replica_layers if export == Export.REPLICA else self.view_layers

    def target(self, export: Export) -> ExtentMap | None:
        """Where a write to ``export`` goes; ``None`` means straight to IMG (view after failover)."""
        if self.failed_over:
            if export == Export.REPLICA:
                raise DiskBufferError("replica is read-only after failover", "wrong-state")
            return None
        if export == Export.REPLICA:
            if self.failing_over:
                raise DiskBufferError("replica is read-only during failover", "wrong-state")
            return self.current
        return self.view.overlay

    # -- epoch verbs ---------------------------------------------------------------------------

    def _require_active(self, verb: str) -> None:
        if self.failed_over or self.failing_over:
            raise DiskBufferError(f"{verb}: the disk buffer has failed over", "wrong-state")

    def seal(self) -> SealedEpoch:
        """Close the current epoch N; the view moves to committed + N with an empty overlay."""
        self._require_active("seal")
        sealed = SealedEpoch(self.current_epoch, self.current_seq, self.current)
        self.current_seq += 1
        self.rollback_views[sealed.epoch] = self.view
        self.sealed.append(sealed)
        self.view = View(sealed.epoch)
        self.current = ExtentMap()
        self.current_epoch += 1
        self._rebuild()
        return sealed

    def check_commit(self, epoch: int) -> SealedEpoch:
        """Validate ``commit epoch`` without changing anything; returns the sealed epoch."""
        self._require_active("commit")
        if self.committing is not None:
            raise DiskBufferError(f"commit of epoch {self.committing} is in progress", "wrong-state")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise DiskBufferError(f"epoch must be an integer, not {epoch!r}", "unknown-epoch")
        if epoch <= self.committed:
            raise DiskBufferError(
                f"epoch {epoch} is already committed (last committed: {self.committed})", "out-of-order"
            )
        if epoch == self.current_epoch:
            raise DiskBufferError(f"epoch {epoch} is still open: seal it before committing", "wrong-state")
        numbers = [s.epoch for s in self.sealed]
        if epoch not in numbers:
            raise DiskBufferError(f"unknown epoch {epoch} (sealed: {numbers or 'none'})", "unknown-epoch")
        if epoch != numbers[0]:
            raise DiskBufferError(f"commit {epoch} out of order: commit {numbers[0]} first", "out-of-order")
        return self.sealed[0]

    def begin_commit(self, epoch: int) -> SealedEpoch:
        sealed = self.check_commit(epoch)
        self.committing = epoch
        return sealed

    def abort_commit(self, epoch: int) -> None:
        if self.committing == epoch:
            self.committing = None

    def finish_commit(self, epoch: int) -> None:
        """Epoch ``epoch`` is durable: move it to the write-out queue and drop its rollback view."""
        assert self.committing == epoch and self.sealed and self.sealed[0].epoch == epoch
        sealed = self.sealed.pop(0)
        self.committing = None
        self.committed = epoch
        self.rollback_views.pop(epoch, None)
        self.writeout.append(sealed)
        self.writeout_bytes += sealed.extents.data_bytes
        self._rebuild()

    def rollback(self) -> dict[str, Any]:
        """Drop every uncommitted primary write and bring back the view from before the oldest seal.

        The current (unsealed) epoch is dropped too: its writes were made on top of the dropped
        epochs, so keeping them would give ``replica`` a state the primary never had.
        """
        self._require_active("rollback")
        if self.committing is not None:
            raise DiskBufferError(f"commit of epoch {self.committing} is in progress", "wrong-state")
        if not self.sealed:
            raise DiskBufferError("nothing to roll back: no sealed, uncommitted epoch", "wrong-state")
        dropped = [s.epoch for s in self.sealed]
        discarded = sum(s.extents.payload_bytes() for s in self.sealed) + self.current.payload_bytes()
        restored = self.rollback_views[dropped[0]]
        # The secondary VM's writes since that seal are kept, on top of the view they roll back to:
        # the epoch protocol never runs a VM between a seal and its load, so whatever wrote them runs
        # a memory that never held the dropped epochs -- QEMU 7.2 resumes a secondary by itself when
        # it leaves COLO, before the agent can stop it (unless asked to keep it paused, patch 0010).
        # Dropped with the view of the epoch they were not part of, they were writes the guest saw
        # complete and the disk then lost.
        kept = [self.rollback_views[epoch].overlay for epoch in dropped[1:]] + [self.view.overlay]
        kept_bytes = 0
        for overlay in kept:
            for start, end, data in overlay.items():
                restored.overlay.put(start, end - start, data)
                kept_bytes += end - start
        self.view = restored
        self.rollback_views.clear()
        self.sealed.clear()
        self.current = ExtentMap()
        self.current_epoch = self.committed + 1
        self.current_seq += 1
        self._rebuild()
        return {
            "dropped_epochs": dropped,
            "discarded_bytes": discarded,
            "epoch": self.current_epoch,
            "view_base": self.view.base,
            "view_bytes_kept": kept_bytes,
        }

    def check_failover(self) -> None:
        self._require_active("failover")
        if self.committing is not None:
            raise DiskBufferError(f"commit of epoch {self.committing} is in progress", "wrong-state")
        if self.sealed:
            raise DiskBufferError(
                f"sealed, uncommitted epochs {[s.epoch for s in self.sealed]}: commit or roll back first",
                "wrong-state",
            )

    def begin_failover(self) -> None:
        """Refuse primary writes from now on and drop the current epoch's speculation."""
        self.check_failover()
        self.failing_over = True
        self.current = ExtentMap()
        self._rebuild()

    def finish_failover(self) -> None:
        """The overlay is merged into IMG: ``view`` is now a plain disk."""
        assert not self.writeout
        self.failing_over = False
        self.failed_over = True
        self.view = View(self.committed)
        self.rollback_views.clear()
        self._rebuild()

    def applied_upto(self, epoch: int) -> None:
        """The shell wrote every committed epoch <= ``epoch`` to IMG (and fdatasynced it)."""
        kept = [s for s in self.writeout if s.epoch > epoch]
        for s in self.writeout:
            if s.epoch <= epoch:
                self.writeout_bytes -= s.extents.data_bytes
        self.writeout = kept
        self.applied = max(self.applied, epoch)
        self._rebuild()

    def status(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "epoch": self.current_epoch,
            "committed": self.committed,
            "applied": self.applied,
            "sealed": [s.epoch for s in self.sealed],
            "committing": self.committing,
            "view_base": self.view.base,
            "speculation_bytes": self.current.data_bytes + self._frozen_bytes,
            "overlay_bytes": self.view.overlay.data_bytes,
            "writeout_bytes": self.writeout_bytes,
            "backlog": len(self.writeout),
            "failed_over": self.failed_over,
        }
