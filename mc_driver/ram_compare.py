"""Compare two held VMs' RAM page by page: the proof that a checkpoint left the secondary at the primary.

Two users, one comparison:

* ``hybridft verify-checkpoint`` (:mod:`mc_driver.verify`) boots its own test pair, whose RAM lives in
  ``/dev/shm`` files (``memory-backend-file,share=on``) and whose QEMUs hold every checkpoint
  (``QEMU_COLO_HOLD_AFTER_CHECKPOINT=1``): it compares the two files directly (:func:`differing_pages`).
* The daemon's ``verify`` verb (``hybridft verify``) checks a pair that runs a guest for real.  Its
  QEMUs keep their RAM anonymous, and they must: an 8 GiB guest's two RAM files would not fit the
  tmpfs (half of the machine's memory), ``pair up`` and re-protection would have to start every QEMU
  differently, and a file-backed RAM changes the pair that is being verified.  So the daemon holds one
  checkpoint (patch 0007's ``x-colo-hold-next-checkpoint``) and copies RAM out of both stopped QEMUs
  with ``pmemsave``, a chunk at a time (:func:`compare_held_ram`): slower than reading shared files
  (two copies per page), but only while one checkpoint is held, on demand, with scratch space bounded
  by two chunks.

What is compared: every range that ``info mtree -f`` shows as ``ram`` in the system address space
(``pmemsave`` of an I/O range would read device registers), on both sides the same map (else that is
the error).  A difference is reported as runs of pages with their RAM block, offset in it and
guest-physical address, so a failure points at "pc.ram +0x1a3c000 (GPA 0x1a3c000), 3 pages" rather
than at "RAM differs".

The planning (:func:`plan_chunks`) and the grouping of differing pages into runs
(:func:`runs_in_chunk`) are plain functions; only :func:`compare_held_ram` talks to QEMU.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

PAGE_SIZE = 4096
DEFAULT_CHUNK_BYTES = 64 << 20  # pmemsave'd per side and step: scratch space is two of these
RUNS_KEPT = 50  # differing runs reported (their total is always counted)
_CHUNK_PAGES = 8192  # 32 MiB per numpy comparison step
_FLAT_RANGE_RE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([\w-]+)\): (\S+)(?: @([0-9a-f]+))?", re.IGNORECASE
)


class RamCompareError(Exception):
    """The comparison could not run (not a difference: those are results)."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """A guest-physical range that shows ``block`` from ``offset`` (one line of ``info mtree -f``)."""

    gpa_start: int
    gpa_end: int  # inclusive
    kind: str
    block: str
    offset: int

    @property
    def size(self) -> int:
        return self.gpa_end - self.gpa_start + 1


def parse_flat_memory(mtree_text: str) -> list[Mapping]:
    """The guest-physical mappings of the system address space ("memory") in ``info mtree -f`` output."""
    mappings: list[Mapping] = []
    in_memory_view = False
    for line in mtree_text.splitlines():
        if line.startswith("FlatView"):
            if mappings:
                break  # the first view that contains "memory" is the one
            in_memory_view = False
            continue
        if line.strip().startswith('AS "memory"'):
            in_memory_view = True
            continue
        if not in_memory_view:
            continue
        match = _FLAT_RANGE_RE.match(line)
        if match:
            start, end, kind, name, offset = match.groups()
            mappings.append(Mapping(int(start, 16), int(end, 16), kind, name, int(offset or "0", 16)))
    return mappings


@dataclass(frozen=True, slots=True)
class DiffRun:
    """Consecutive differing pages of a RAM block, with where the guest sees them."""

    block: str
    offset: int
    pages: int
    gpa: int | None  # None: the block range is not mapped (or shadowed) in the flat view

    def describe(self) -> str:
        where = f"GPA 0x{self.gpa:x}" if self.gpa is not None else "not mapped"
        return f"{self.block} +0x{self.offset:x} ({where}), {self.pages} page{'s' * (self.pages != 1)}"


def differing_pages(a: Path, b: Path) -> np.ndarray:
    """Indices of the 4 KiB pages in which files ``a`` and ``b`` differ (they must be the same size)."""
    size = a.stat().st_size
    if size != b.stat().st_size:
        raise RamCompareError(f"RAM files differ in size: {a} {size} bytes, {b} {b.stat().st_size} bytes")
    if size % PAGE_SIZE:
        raise RamCompareError(f"RAM file {a} is not a whole number of pages ({size} bytes)")
    pages = size // PAGE_SIZE
    if pages == 0:
        return np.zeros(0, dtype=np.int64)
    left = np.memmap(a, dtype=np.uint64, mode="r", shape=(pages, PAGE_SIZE // 8))
    right = np.memmap(b, dtype=np.uint64, mode="r", shape=(pages, PAGE_SIZE // 8))
    found: list[np.ndarray] = []
    for first in range(0, pages, _CHUNK_PAGES):
        last = min(first + _CHUNK_PAGES, pages)
        if np.array_equal(left[first:last], right[first:last]):
            continue
        rows = np.nonzero((left[first:last] != right[first:last]).any(axis=1))[0]
        found.append(rows + first)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def page_runs(pages: np.ndarray, block: str, mappings: list[Mapping]) -> list[DiffRun]:
    """Group page indices of ``block`` into runs and attach the guest-physical address of each start."""
    runs: list[DiffRun] = []
    if len(pages) == 0:
        return runs
    breaks = np.nonzero(np.diff(pages) != 1)[0] + 1
    for chunk in np.split(pages, breaks):
        offset = int(chunk[0]) * PAGE_SIZE
        gpa = None
        for m in mappings:
            if (
                m.block == block
                and m.kind == "ram"
                and m.offset <= offset <= m.offset + (m.gpa_end - m.gpa_start)
            ):
                gpa = m.gpa_start + (offset - m.offset)
                break
        runs.append(DiffRun(block, offset, len(chunk), gpa))
    return runs


# ------------------------------------------------------------------- held RAM, copied out with pmemsave
@dataclass(frozen=True, slots=True)
class Chunk:
    """``size`` bytes at guest-physical ``gpa``: RAM block ``block`` from ``offset``."""

    gpa: int
    size: int
    block: str
    offset: int


def ram_ranges(mappings: Sequence[Mapping]) -> list[Mapping]:
    """The ranges that are RAM (not ROM, not I/O: reading those through pmemsave could touch devices)."""
    return [m for m in mappings if m.kind == "ram"]


def plan_chunks(mappings: Sequence[Mapping], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Chunk]:
    """The RAM ranges of ``mappings`` cut into pieces of at most ``chunk_bytes`` (page-aligned)."""
    if chunk_bytes < PAGE_SIZE or chunk_bytes % PAGE_SIZE:
        raise ValueError(f"chunk_bytes must be a positive multiple of {PAGE_SIZE}, not {chunk_bytes}")
    chunks: list[Chunk] = []
    for m in ram_ranges(mappings):
        if m.gpa_start % PAGE_SIZE or m.size % PAGE_SIZE:
            raise RamCompareError(f"RAM range {m} is not page-aligned")
        for start in range(0, m.size, chunk_bytes):
            size = min(chunk_bytes, m.size - start)
            chunks.append(Chunk(m.gpa_start + start, size, m.block, m.offset + start))
    return chunks


def runs_in_chunk(chunk: Chunk, pages: np.ndarray) -> list[DiffRun]:
    """Differing page indices within ``chunk`` as runs with block offsets and guest-physical addresses."""
    runs: list[DiffRun] = []
    if len(pages) == 0:
        return runs
    breaks = np.nonzero(np.diff(pages) != 1)[0] + 1
    for run in np.split(pages, breaks):
        first = int(run[0]) * PAGE_SIZE
        runs.append(DiffRun(chunk.block, chunk.offset + first, len(run), chunk.gpa + first))
    return runs


@dataclass(slots=True)
class RamComparison:
    """Both VMs' RAM at one held checkpoint: identical, or where not."""

    identical: bool = True
    pages: int = 0  # pages compared
    differing_pages: int = 0
    runs: list[DiffRun] = field(default_factory=list)  # the first RUNS_KEPT
    ranges: int = 0  # RAM ranges of the memory map
    seconds: float = 0.0

    def add(self, chunk: Chunk, pages: np.ndarray) -> None:
        self.pages += chunk.size // PAGE_SIZE
        if len(pages):
            self.identical = False
            self.differing_pages += len(pages)
            room = RUNS_KEPT - len(self.runs)
            if room > 0:
                self.runs.extend(runs_in_chunk(chunk, pages)[:room])

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["mib"] = round(self.pages * PAGE_SIZE / (1 << 20), 1)
        return data


@dataclass(frozen=True, slots=True)
class HeldCheckpointVerdict:
    """The ``verify`` verb's reply: which checkpoint was held, under which operating point, and what
    the comparison found (flattened into one JSON object by :meth:`as_dict`)."""

    epoch: int | None
    mode: str
    stop_via: str
    comparison: RamComparison

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "mode": self.mode, "stop_via": self.stop_via} | self.comparison.as_dict()


class HmpQmp(Protocol):
    """What :func:`compare_held_ram` needs of a QMP session (:class:`mc_driver.qmp.QmpSession`)."""

    async def execute(self, command: str, arguments: Any = None, **kwargs: Any) -> Any: ...
    async def hmp(self, command_line: str) -> str: ...


def scratch_root() -> Path | None:
    """Where the chunks go: /dev/shm (memory, no disk writes) where it exists, else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else None


async def memory_map(session: HmpQmp) -> list[Mapping]:
    return parse_flat_memory(await session.hmp("info mtree -f"))


async def compare_held_ram(
    primary: HmpQmp,
    secondary: HmpQmp,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    scratch: Path | None = None,
    timeout: float = 60.0,
) -> RamComparison:
    """Compare the RAM of two stopped QEMUs (held at the same checkpoint), ``chunk_bytes`` at a time.

    Both must stay stopped throughout (the caller holds them).  Raises :class:`RamCompareError` when
    the memory maps differ or a copy fails; :class:`TimeoutError` past ``timeout`` seconds in all.
    """
    started = time.monotonic()
    deadline = started + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the RAM comparison took longer than {timeout} s")
        return remaining

    p_map, s_map = await asyncio.wait_for(asyncio.gather(memory_map(primary), memory_map(secondary)), left())
    p_ram, s_ram = ram_ranges(p_map), ram_ranges(s_map)
    if not p_ram:
        raise RamCompareError("the primary's memory map shows no RAM (info mtree -f unreadable?)")
    if p_ram != s_ram:
        raise RamCompareError(f"the memory maps differ: primary RAM {p_ram}, secondary RAM {s_ram}")
    result = RamComparison(ranges=len(p_ram))
    directory = Path(tempfile.mkdtemp(prefix="hybridft-ram-", dir=scratch or scratch_root()))
    try:
        p_file, s_file = directory / "primary.bin", directory / "secondary.bin"
        for chunk in plan_chunks(p_ram, chunk_bytes):
            args = {"val": chunk.gpa, "size": chunk.size}
            await asyncio.wait_for(
                asyncio.gather(
                    primary.execute("pmemsave", args | {"filename": str(p_file)}),
                    secondary.execute("pmemsave", args | {"filename": str(s_file)}),
                ),
                left(),
            )
            for path in (p_file, s_file):
                if not path.is_file() or path.stat().st_size != chunk.size:
                    raise RamCompareError(f"pmemsave of {chunk} left {path} incomplete")
            pages = await asyncio.wait_for(asyncio.to_thread(differing_pages, p_file, s_file), left())
            result.add(chunk, pages)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result
