"""The redo journal's byte format: records and commit records, the scan that replays them, the mark.

Pure functions over bytes (no files, no threads, no clock): :mod:`disk_buffer.journal` owns the
files, the journal thread and the ``fdatasync`` calls, and uses this module to turn queued writes
into bytes and journal bytes back into committed epochs.  Kept apart so that the crash-safety rules
(what a torn or corrupt record does to replay) can be read, and tested, without a file in sight.

Records, back to back from offset 0 of a journal file's current *use*: every record is
``header | payload | crc32``; the CRC covers header and payload, and the header names the
generation of the use, the record's own file position, the epoch and a per-process *group* number
(one group per epoch attempt: a rolled-back epoch number is reused, a group never is).  An epoch is
a group of EXTENT records (each replica write or zeroing, in arrival order) followed by one COMMIT
record carrying the record count and a CRC over the records' CRCs.  Epoch N+1's records may come
before N's COMMIT record; records of two groups never interleave.

:func:`scan` stops at the first record that is torn, fails its CRC, belongs to another generation or
is not where it claims to be; a group without a COMMIT (killed mid-commit, rolled back, or still
open) is ignored, so an epoch is all there or not at all.

The mark is one 512-byte slot (sequence number, applied epoch, generation, failed-over flag, image
size, CRC); the journal writes two slots alternately, and a slot that fails :func:`decode_mark` is
simply not a candidate.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridft_common.fastpath import available, speedups

if TYPE_CHECKING:
    import mmap

#: zlib.crc32, or the same function compiled with PCLMULQDQ (``_speedups.crc32``: 16.9 GB/s here
#: against zlib's 1.9, and it lets go of the GIL for big buffers): the journal CRCs every byte a
#: guest writes, so this is the journal thread's largest cost.
crc32 = zlib.crc32 if speedups is None else speedups.crc32

MAGIC = b"HJR1"
REC_EXTENT = 1
REC_COMMIT = 2
FLAG_ZERO = 1
# magic, type, flags, reserved, generation, position, group seq, epoch, a, b
HEADER = struct.Struct("<4sBBHIQQQQQ")
CRC = struct.Struct("<I")
RECORD_OVERHEAD = HEADER.size + CRC.size
MAX_RECORD_PAYLOAD = 1 << 40

MARK_MAGIC = b"HMK1"
# magic, seq, applied epoch, generation, flags, image size
MARK = struct.Struct("<4sQQIIQ")
MARK_SLOT = 512
MARK_FAILED_OVER = 1

# A record waiting to be encoded: (file position, group seq, epoch, image offset, data or None for
# zeroes, length).  Positions are allocated when the record is queued, so encoding needs no state.
PendingRecord = tuple[int, int, int, int, bytes | None, int]


def record_size(data: bytes | None, length: int) -> int:
    """Bytes one EXTENT record takes in the journal (a zero extent carries no payload)."""
    return RECORD_OVERHEAD + (length if data is not None else 0)


# -- encoding ------------------------------------------------------------------------------------


def encode_records_python(
    generation: int, records: Iterable[PendingRecord], group_crcs: dict[int, tuple[int, int]]
) -> list[bytes]:
    """EXTENT records as buffers to write back to back (header, payload, crc: never joined, so a
    caller can ``pwritev`` them without copying the payloads).

    ``group_crcs`` carries, per group seq, the records encoded so far and the CRC over their CRCs --
    what the group's COMMIT record must state -- across calls (a group is written in batches).

    The reference; :func:`encode_records` is the compiled one unless ``HYBRIDFT_PURE_PYTHON=1``.
    """
    parts: list[bytes] = []
    pack = HEADER.pack
    for pos, seq, epoch, offset, data, length in records:
        if data is None:
            header = pack(MAGIC, REC_EXTENT, FLAG_ZERO, 0, generation, pos, seq, epoch, offset, length)
            crc = CRC.pack(zlib.crc32(header))
            parts.append(header)
        else:
            header = pack(MAGIC, REC_EXTENT, 0, 0, generation, pos, seq, epoch, offset, length)
            crc = CRC.pack(zlib.crc32(data, zlib.crc32(header)))
            parts.append(header)
            parts.append(data)
        parts.append(crc)
        count, acc = group_crcs.get(seq, (0, 0))
        group_crcs[seq] = (count + 1, zlib.crc32(crc, acc))
    return parts


def encode_records_compiled(
    generation: int, records: list[PendingRecord], group_crcs: dict[int, tuple[int, int]]
) -> list[bytes]:
    """:func:`encode_records_python` in C (``_speedups.journal_encode_records``): the same bytes once
    joined and the same ``group_crcs``; what lies between two payloads comes as one buffer, and the
    CRCs are computed without the GIL, so the event loop runs while the journal thread encodes."""
    assert available is not None
    return available.journal_encode_records(generation, records, group_crcs)  # type: ignore[no-any-return]


encode_records = encode_records_python if speedups is None else encode_records_compiled


def encode_commit(
    generation: int, position: int, seq: int, epoch: int, count: int, crc_of_crcs: int
) -> bytes:
    header = HEADER.pack(MAGIC, REC_COMMIT, 0, 0, generation, position, seq, epoch, count, crc_of_crcs)
    return header + CRC.pack(crc32(header))


def encode_group(
    generation: int, position: int, seq: int, epoch: int, extents: Iterable[tuple[int, int, bytes | None]]
) -> tuple[bytes, int, int]:
    """The EXTENT records of one epoch as one buffer: ``(buffer, record count, crc over record crcs)``."""
    records: list[PendingRecord] = []
    pos = position
    for start, end, data in extents:
        records.append((pos, seq, epoch, start, data, end - start))
        pos += record_size(data, end - start)
    group_crcs: dict[int, tuple[int, int]] = {}
    buffer = b"".join(encode_records(generation, records, group_crcs))
    count, crcs = group_crcs.get(seq, (0, 0))
    return buffer, count, crcs


# -- decoding ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ReplayedExtent:
    offset: int
    length: int
    payload_at: int | None  # position of the data in the journal buffer, None for zeroes


@dataclass(slots=True)
class ReplayedEpoch:
    epoch: int
    seq: int
    extents: list[ReplayedExtent]
    source: int = 0  # which journal file (index into the buffers the caller scanned)


@dataclass(slots=True)
class ScanResult:
    committed: list[ReplayedEpoch]  # in journal order, epochs strictly increasing
    end: int  # position just after the last valid record
    stop_reason: str


def scan(buf: bytes | memoryview | mmap.mmap, generation: int) -> ScanResult:
    """Decode the valid prefix of a journal of ``generation``: every committed group in order.

    Stops (never raises) at the first record that is torn, fails its CRC, belongs to another
    generation, claims another position, or breaks the group/epoch ordering.
    """
    view = memoryview(buf)
    size = len(view)
    pos = 0
    committed: list[ReplayedEpoch] = []
    # Groups written but not (yet) committed, by seq.  Several can be open: epoch N+1's records are
    # written while N waits for its COMMIT, which then lands between them.  Records of one group
    # are never interleaved with another group's records, only with COMMIT records.
    open_groups: dict[int, tuple[ReplayedEpoch, int]] = {}
    max_seq = 0
    committed_seqs: set[int] = set()
    last_epoch = -1
    reason = "end"
    while True:
        if pos + RECORD_OVERHEAD > size:
            reason = "end"
            break
        magic, rtype, flags, _res, gen, rpos, seq, epoch, a, b = HEADER.unpack_from(view, pos)
        if magic != MAGIC:
            reason = "no record"
            break
        if gen != generation:
            reason = "other generation"
            break
        if rpos != pos:
            reason = "misplaced record"
            break
        if rtype == REC_EXTENT:
            payload = b if not flags & FLAG_ZERO else 0
            if b > MAX_RECORD_PAYLOAD or pos + RECORD_OVERHEAD + payload > size:
                reason = "torn record"
                break
        elif rtype == REC_COMMIT:
            payload = 0
        else:
            reason = "unknown record type"
            break
        body_end = pos + HEADER.size + payload
        (crc,) = CRC.unpack_from(view, body_end)
        if crc32(view[pos:body_end]) != crc:
            reason = "crc mismatch"
            break
        if rtype == REC_EXTENT:
            if seq != max_seq or seq not in open_groups:
                if seq <= max_seq:
                    reason = "group out of order"
                    break
                open_groups[seq] = (ReplayedEpoch(epoch, seq, []), 0)
                max_seq = seq
            group, crcs = open_groups[seq]
            if epoch != group.epoch:
                reason = "epoch changed inside a group"
                break
            group.extents.append(ReplayedExtent(a, b, None if flags & FLAG_ZERO else pos + HEADER.size))
            open_groups[seq] = (group, crc32(view[body_end : body_end + CRC.size], crcs))
        else:
            if seq not in open_groups:
                if a != 0 or seq in committed_seqs:
                    reason = "commit of an unknown group"
                    break
                open_groups[seq] = (ReplayedEpoch(epoch, seq, []), 0)  # an epoch without writes
            group, crcs = open_groups[seq]
            if epoch != group.epoch or a != len(group.extents) or b != crcs:
                reason = "commit does not match its records"
                break
            if epoch <= last_epoch:
                reason = "epoch out of order"
                break
            del open_groups[seq]
            committed_seqs.add(seq)
            committed.append(group)
            last_epoch = epoch
        pos = body_end + CRC.size
    return ScanResult(committed, pos, reason)


def first_generation(buf: bytes | memoryview | mmap.mmap) -> int | None:
    """The generation of a journal file's current use: that of its first record, if it is valid."""
    view = memoryview(buf)
    if len(view) < RECORD_OVERHEAD:
        return None
    magic, rtype, flags, _res, gen, rpos, _seq, _epoch, _a, b = HEADER.unpack_from(view, 0)
    if magic != MAGIC or rpos != 0:
        return None
    payload = b if rtype == REC_EXTENT and not flags & FLAG_ZERO else 0
    if HEADER.size + payload + CRC.size > len(view):
        return None
    (crc,) = CRC.unpack_from(view, HEADER.size + payload)
    return gen if crc32(view[: HEADER.size + payload]) == crc else None


# -- the mark ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mark:
    seq: int
    applied: int
    generation: int
    failed_over: bool
    image_size: int


def encode_mark(mark: Mark) -> bytes:
    body = MARK.pack(
        MARK_MAGIC,
        mark.seq,
        mark.applied,
        mark.generation,
        MARK_FAILED_OVER if mark.failed_over else 0,
        mark.image_size,
    )
    return (body + CRC.pack(crc32(body))).ljust(MARK_SLOT, b"\0")


def decode_mark(slot: bytes) -> Mark | None:
    if len(slot) < MARK.size + CRC.size:
        return None
    body = slot[: MARK.size]
    (crc,) = CRC.unpack_from(slot, MARK.size)
    if crc32(body) != crc:
        return None
    magic, seq, applied, generation, flags, image_size = MARK.unpack(body)
    if magic != MARK_MAGIC:
        return None
    return Mark(seq, applied, generation, bool(flags & MARK_FAILED_OVER), image_size)
