"""The redo journal and the applied mark: what makes a committed epoch survive kill -9.

Why a redo journal: applying an epoch to IMG is many scattered writes that a crash can tear; the
journal turns an epoch into one sequential write plus one ``fdatasync``, and IMG is brought up to
date afterwards (in the background, and again at recovery: replay is idempotent because it writes
the same bytes at the same offsets in the same order).

Files in the state directory:

``journal``
    Records, back to back from offset 0.  Every record is ``header | payload | crc32`` where the
    CRC covers header and payload, and the header names the journal *generation*, its own file
    position, the epoch and a per-process *group* sequence number.  An epoch is a group of EXTENT
    records followed by one COMMIT record carrying the record count and a CRC over the records'
    CRCs.  The group is written when the epoch is sealed (``sync_file_range`` starts the disk
    write early), the COMMIT record and the single ``fdatasync`` when it is committed -- so commit
    latency is one small write and a sync of data that is mostly on its way already.
    Replay stops at the first record that is torn, corrupt, from another generation or not where
    it claims to be; a group without a COMMIT (an epoch killed mid-commit, or rolled back) is
    ignored, so an epoch is all there or not at all.

``mark``
    Two 512-byte slots written alternately (each with a sequence number and CRC, ``fdatasync``
    after each write): the applied epoch ("IMG holds every epoch <= N"), the current journal
    generation, the failed-over flag and the image size.  A torn slot falls back to the other one,
    which is older but true.

Space is recycled by starting a new generation at offset 0, and only once the write-out has
applied every committed epoch and ``fdatasync``\\ ed IMG: the mark with the new generation is
durable before the first record of it is written, so stale records of old generations can never
be replayed.

The view's overlay (the secondary VM's own writes) is deliberately *not* journaled: after a crash
the secondary VM restarts from a checkpoint, whose disk is exactly the last committed epoch.

The codec functions are pure; :class:`Journal` adds the files and a lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import signal
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from disk_buffer.store import DiskBufferError

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

FAULT_POINTS = ("journal-written", "journal-synced", "writeout-mid", "image-synced")


class JournalCorrupt(DiskBufferError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "corrupt")


# -- fault injection ---------------------------------------------------------------------------


class FaultInjector:
    """``HYBRIDFT_DISK_FAULT=<point>[:<n>]``: SIGKILL this process the n-th time it reaches <point>."""

    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.remaining = 0
        self._lock = threading.Lock()
        if not spec:
            return
        point, _, count = spec.partition(":")
        if point not in FAULT_POINTS:
            raise DiskBufferError(
                f"HYBRIDFT_DISK_FAULT: unknown point {point!r} (known: {FAULT_POINTS})", "config"
            )
        try:
            self.remaining = int(count) if count else 1
        except ValueError:
            raise DiskBufferError(f"HYBRIDFT_DISK_FAULT: bad count {count!r}", "config") from None
        self.point = point

    @classmethod
    def from_env(cls) -> FaultInjector:
        return cls(os.environ.get("HYBRIDFT_DISK_FAULT"))

    def hit(self, point: str) -> None:
        if point != self.point:
            return
        with self._lock:
            self.remaining -= 1
            if self.remaining == 0:
                os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = FaultInjector(None)


# -- codec ---------------------------------------------------------------------------------------


def encode_extent(
    generation: int, position: int, seq: int, epoch: int, offset: int, data: bytes | None, length: int
) -> tuple[bytes, bytes | None, bytes]:
    """One EXTENT record as (header, payload or None, crc) -- kept apart so callers can writev."""
    flags = FLAG_ZERO if data is None else 0
    header = HEADER.pack(MAGIC, REC_EXTENT, flags, 0, generation, position, seq, epoch, offset, length)
    crc = zlib.crc32(header)
    if data is not None:
        crc = zlib.crc32(data, crc)
    return header, data, CRC.pack(crc)


def encode_commit(
    generation: int, position: int, seq: int, epoch: int, count: int, crc_of_crcs: int
) -> bytes:
    header = HEADER.pack(MAGIC, REC_COMMIT, 0, 0, generation, position, seq, epoch, count, crc_of_crcs)
    return header + CRC.pack(zlib.crc32(header))


def encode_group(
    generation: int, position: int, seq: int, epoch: int, extents: Iterable[tuple[int, int, bytes | None]]
) -> tuple[bytes, int, int]:
    """The EXTENT records of one epoch as one buffer: ``(buffer, record count, crc over record crcs)``."""
    parts: list[bytes] = []
    pos = position
    crcs = 0
    count = 0
    for start, end, data in extents:
        length = end - start
        header, payload, crc = encode_extent(generation, pos, seq, epoch, start, data, length)
        parts.append(header)
        if payload is not None:
            parts.append(payload)
        parts.append(crc)
        crcs = zlib.crc32(crc, crcs)
        count += 1
        pos += RECORD_OVERHEAD + (length if payload is not None else 0)
    return b"".join(parts), count, crcs


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
    # Groups written but not (yet) committed, by seq.  Several can be open: epoch N+1 may be sealed
    # (its records written) before N's COMMIT record lands after them.
    open_groups: dict[int, tuple[ReplayedEpoch, int]] = {}
    extending: int | None = None  # seq of the group whose records directly precede this point
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
        if zlib.crc32(view[pos:body_end]) != crc:
            reason = "crc mismatch"
            break
        if rtype == REC_EXTENT:
            if seq != extending:
                if seq <= max_seq:
                    reason = "group out of order"
                    break
                open_groups[seq] = (ReplayedEpoch(epoch, seq, []), 0)
                max_seq = extending = seq
            group, crcs = open_groups[seq]
            if epoch != group.epoch:
                reason = "epoch changed inside a group"
                break
            group.extents.append(ReplayedExtent(a, b, None if flags & FLAG_ZERO else pos + HEADER.size))
            open_groups[seq] = (group, zlib.crc32(view[body_end : body_end + CRC.size], crcs))
        else:
            extending = None
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
    return (body + CRC.pack(zlib.crc32(body))).ljust(MARK_SLOT, b"\0")


def decode_mark(slot: bytes) -> Mark | None:
    if len(slot) < MARK.size + CRC.size:
        return None
    body = slot[: MARK.size]
    (crc,) = CRC.unpack_from(slot, MARK.size)
    if zlib.crc32(body) != crc:
        return None
    magic, seq, applied, generation, flags, image_size = MARK.unpack(body)
    if magic != MARK_MAGIC:
        return None
    return Mark(seq, applied, generation, bool(flags & MARK_FAILED_OVER), image_size)


# -- files ---------------------------------------------------------------------------------------

libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (``sync_file_range``); best effort."""
    try:
        libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)
    except (AttributeError, OSError):
        pass


@dataclass(slots=True)
class _PendingGroup:
    epoch: int
    position: int
    count: int
    crcs: int


class Journal:
    """The journal and mark files of one state directory.  Thread safe (one lock)."""

    PREALLOCATE = 16 << 20

    def __init__(self, state_dir: Path, image_size: int, faults: FaultInjector = NO_FAULTS) -> None:
        self.state_dir = state_dir
        self.faults = faults
        self._lock = threading.Lock()
        state_dir.mkdir(parents=True, exist_ok=True)
        self._mark_fd = os.open(state_dir / "mark", os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = os.open(state_dir / "journal", os.O_RDWR | os.O_CREAT, 0o600)
        self._pending: dict[int, _PendingGroup] = {}
        self.position = 0
        self.last_committed = 0
        marks = [decode_mark(os.pread(self._mark_fd, MARK_SLOT, i * MARK_SLOT)) for i in (0, 1)]
        valid = [m for m in marks if m is not None]
        if valid:
            self.mark = max(valid, key=lambda m: m.seq)
            if self.mark.image_size != image_size:
                self.close()
                raise DiskBufferError(
                    f"state dir {state_dir} belongs to an image of {self.mark.image_size} bytes, "
                    f"this image has {image_size}",
                    "config",
                )
        else:
            if os.fstat(self._mark_fd).st_size > 0:
                self.close()
                raise JournalCorrupt(f"{state_dir / 'mark'}: no valid mark slot (both corrupt)")
            self.mark = Mark(0, 0, 1, False, image_size)
            self._write_mark(self.mark)
        self.last_committed = self.mark.applied

    def close(self) -> None:
        for fd in (self._fd, self._mark_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._mark_fd = -1

    # -- mark ----------------------------------------------------------------------------------

    def _write_mark(self, mark: Mark) -> None:
        os.pwrite(self._mark_fd, encode_mark(mark), (mark.seq % 2) * MARK_SLOT)
        os.fdatasync(self._mark_fd)
        self.mark = mark

    def _next_mark(
        self, *, applied: int | None = None, generation: int | None = None, failed_over: bool | None = None
    ) -> Mark:
        m = self.mark
        return Mark(
            m.seq + 1,
            m.applied if applied is None else applied,
            m.generation if generation is None else generation,
            m.failed_over if failed_over is None else failed_over,
            m.image_size,
        )

    def mark_applied(self, epoch: int) -> None:
        """IMG is fdatasynced and holds every epoch <= ``epoch``."""
        with self._lock:
            if epoch > self.mark.applied:
                self._write_mark(self._next_mark(applied=epoch))

    def mark_failed_over(self) -> None:
        with self._lock:
            self._write_mark(self._next_mark(failed_over=True))

    # -- recovery ------------------------------------------------------------------------------

    def scan(self) -> tuple[ScanResult, mmap.mmap | None]:
        """Scan the current generation; the caller applies ``committed`` and then calls :meth:`restart`."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return ScanResult([], 0, "empty"), None
        mm = mmap.mmap(self._fd, size, prot=mmap.PROT_READ)
        return scan(mm, self.mark.generation), mm

    def restart(self, applied: int) -> None:
        """After recovery applied and fdatasynced everything: start a fresh generation at offset 0."""
        with self._lock:
            self._write_mark(self._next_mark(applied=applied, generation=self.mark.generation + 1))
            self._pending.clear()
            self.position = 0
            self.last_committed = applied
            if os.fstat(self._fd).st_size < self.PREALLOCATE:
                # Overwriting allocated blocks syncs faster than growing the file.
                os.pwrite(self._fd, bytes(self.PREALLOCATE), 0)
                os.fdatasync(self._fd)

    # -- the hot path --------------------------------------------------------------------------

    def prewrite(self, seq: int, epoch: int, extents: Iterable[tuple[int, int, bytes | None]]) -> None:
        """Write a sealed epoch's records (not yet durable) and start their writeback."""
        with self._lock:
            if not self._pending and self.mark.applied == self.last_committed and self.position > 0:
                # Everything in the journal is in IMG and fdatasynced: recycle the space.
                self._write_mark(self._next_mark(generation=self.mark.generation + 1))
                self.position = 0
            position = self.position
            buf, count, crcs = encode_group(self.mark.generation, position, seq, epoch, extents)
            if buf:
                written = os.pwrite(self._fd, buf, position)
                if written != len(buf):
                    raise DiskBufferError(f"short journal write ({written} of {len(buf)} bytes)", "nospace")
                start_writeback(self._fd, position, len(buf))
            self.position = position + len(buf)
            self._pending[seq] = _PendingGroup(epoch, position, count, crcs)

    def commit(self, seq: int) -> None:
        """Make a prewritten group durable: COMMIT record, one fdatasync.  Returns once durable."""
        with self._lock:
            group = self._pending.get(seq)
            if group is None:
                raise DiskBufferError(f"journal has no records for group {seq}", "wrong-state")
            record = encode_commit(
                self.mark.generation, self.position, seq, group.epoch, group.count, group.crcs
            )
            written = os.pwrite(self._fd, record, self.position)
            if written != len(record):
                raise DiskBufferError("short journal write of a commit record", "nospace")
            self.faults.hit("journal-written")
            os.fdatasync(self._fd)
            self.faults.hit("journal-synced")
            self.position += len(record)
            del self._pending[seq]
            self.last_committed = group.epoch

    def has_group(self, seq: int) -> bool:
        with self._lock:
            return seq in self._pending

    def abandon(self, seqs: Iterable[int]) -> None:
        """Groups that will never be committed (rolled back): their records stay, ignored by replay."""
        with self._lock:
            for seq in seqs:
                self._pending.pop(seq, None)

    def stats(self) -> dict[str, int]:
        return {
            "journal_position": self.position,
            "journal_generation": self.mark.generation,
            "journal_applied_mark": self.mark.applied,
        }
