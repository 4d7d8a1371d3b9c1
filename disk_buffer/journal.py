"""The redo journal and the applied mark: what makes a committed epoch survive kill -9.

Why a redo journal: applying an epoch to IMG is many scattered writes that a crash can tear; the
journal turns an epoch into sequential appends plus one ``fdatasync`` at commit, and IMG is brought
up to date afterwards (in the background, and again at recovery: replay is idempotent because it
writes the same bytes at the same offsets in the same order).

Files in the state directory:

``journal.0``, ``journal.1``
    Records, back to back from offset 0 of the file's current *use*.  Every record is
    ``header | payload | crc32``; the CRC covers header and payload, and the header names the
    generation of the use, the record's own file position, the epoch and a per-process *group*
    number (one group per epoch attempt: a rolled-back epoch number is reused, a group never is).
    An epoch is a group of EXTENT records (each replica write or zeroing, in arrival order)
    followed by one COMMIT record carrying the record count and a CRC over the records' CRCs.
    Records are queued as writes arrive and written every 1 MiB (writeback started at once); the
    COMMIT record and the single ``fdatasync`` come with ``commit`` -- so commit latency is one
    small write and a sync of data that is mostly on disk already.  Epoch N+1's records may come
    before N's COMMIT record; records of two groups never interleave.
    Replay stops at the first record that is torn, fails its CRC, belongs to another generation or
    is not where it claims to be; a group without a COMMIT (killed mid-commit, rolled back, or
    still open) is ignored, so an epoch is all there or not at all.

``mark``
    Two 512-byte slots written alternately (each with a sequence number and CRC, ``fdatasync``
    after each write): the applied epoch ("IMG holds every epoch <= N"), the failed-over flag and
    the image size.  A torn slot falls back to the other one, which is older but true.

Space: at a seal, once the active file is past ``SWITCH_AT`` and the other file holds only epochs
the *durable* mark calls applied (the write-out fdatasyncs IMG before writing the mark), the next
epoch starts at offset 0 of the other file with a higher generation; stale records behind it are
of an older generation and never replayed.  Recovery applies every committed epoch above the mark,
fdatasyncs IMG, writes the mark and starts over at offset 0.

The view's overlay (the secondary VM's own writes) is deliberately *not* journaled: after a crash
the secondary VM restarts from a checkpoint, whose disk is exactly the last committed epoch.

The codec functions are pure; :class:`Journal` adds the files and the journal thread.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
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


IOV_MAX = 1024


def pwritev_all(fd: int, parts: list[bytes], offset: int) -> int:
    """Write ``parts`` back to back at ``offset`` without joining them (a join would allocate -- and
    page-fault in -- a fresh buffer per batch, ~3 ms per MiB on this VM); returns the end offset."""
    for i in range(0, len(parts), IOV_MAX):
        chunk = parts[i : i + IOV_MAX]
        total = sum(map(len, chunk))
        written = os.pwritev(fd, chunk, offset)
        if written < total:  # rare for regular files: finish the chunk the slow way
            rest = memoryview(b"".join(chunk))[written:]
            while rest:
                n = os.pwrite(fd, rest, offset + written)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short journal write")
                written += n
                rest = rest[n:]
        offset += total
    return offset


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
        if zlib.crc32(view[pos:body_end]) != crc:
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
            open_groups[seq] = (group, zlib.crc32(view[body_end : body_end + CRC.size], crcs))
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

libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (``sync_file_range``); best effort."""
    try:
        libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)
    except (AttributeError, OSError):
        pass


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
    return gen if zlib.crc32(view[: HEADER.size + payload]) == crc else None


# A pending record: (position, seq, epoch, image offset, data or None for zeroes, length)
_Item = tuple[int, int, int, int, bytes | None, int]


class Journal:
    """Two journal files and the mark of one state directory.

    Threading: :meth:`append`, :meth:`seal`, :meth:`commit`, :meth:`abandon` and :meth:`committed`
    are called from the event loop thread only; they allocate file positions and queue records.
    Encoding (CRCs), writing and ``fdatasync`` run on the journal's own single worker thread, in
    submission order.  :meth:`mark_applied` is called by the write-out thread (a lock guards the mark).

    Why records are written as they arrive rather than at commit: a commit of 1000 x 4 KiB must
    cost ~1 ms, and writing + syncing 4 MiB alone takes ~4 ms on this machine; queued records are
    written every :attr:`FLUSH_AT` bytes with writeback started at once, so at commit the disk has
    mostly caught up and only the COMMIT record and a small tail remain to be synced.

    Why two files: records of the open epoch keep arriving, so a single file never has a moment
    when all of it is applied.  At a seal, once the active file is past :attr:`SWITCH_AT` and the
    other one holds only applied epochs (per the durable mark), the next epoch starts at offset 0 of
    the other file with a new generation: space is reused only after IMG was fdatasynced.
    """

    FLUSH_AT = 1 << 20
    SWITCH_AT = 64 << 20
    PREALLOCATE = 16 << 20
    FILES = ("journal.0", "journal.1")

    def __init__(self, state_dir: Path, image_size: int, faults: FaultInjector = NO_FAULTS) -> None:
        self.state_dir = state_dir
        self.faults = faults
        self._mark_lock = threading.Lock()
        state_dir.mkdir(parents=True, exist_ok=True)
        self._mark_fd = os.open(state_dir / "mark", os.O_RDWR | os.O_CREAT, 0o600)
        self._fds = [os.open(state_dir / name, os.O_RDWR | os.O_CREAT, 0o600) for name in self.FILES]
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hybridft-journal")
        # event-loop-thread state
        self._active = 0
        self._pos = [0, 0]
        self._generation = [0, 0]
        self._next_generation = 1
        self._pending: list[list[_Item]] = [[], []]
        self._pending_bytes = 0
        self._groups: dict[int, tuple[int, int]] = {}  # seq -> (file, epoch), not committed/abandoned
        self._file_epoch = [0, 0]  # highest committed epoch in each file's current use
        # journal-thread state
        self._crcs: dict[int, tuple[int, int]] = {}  # seq -> (records written, crc over their crcs)
        self.broken: str | None = None
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
            self.mark = Mark(0, 0, 0, False, image_size)
            self._write_mark(self.mark)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in (*self._fds, self._mark_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = [-1, -1]
        self._mark_fd = -1

    # -- mark ----------------------------------------------------------------------------------

    def _write_mark(self, mark: Mark) -> None:
        os.pwrite(self._mark_fd, encode_mark(mark), (mark.seq % 2) * MARK_SLOT)
        os.fdatasync(self._mark_fd)
        self.mark = mark

    def _update_mark(
        self, *, applied: int | None = None, generation: int | None = None, failed_over: bool | None = None
    ) -> None:
        with self._mark_lock:
            m = self.mark
            self._write_mark(
                Mark(
                    m.seq + 1,
                    m.applied if applied is None else applied,
                    m.generation if generation is None else generation,
                    m.failed_over if failed_over is None else failed_over,
                    m.image_size,
                )
            )

    def mark_applied(self, epoch: int) -> None:
        """IMG is fdatasynced and holds every committed epoch <= ``epoch``."""
        if epoch > self.mark.applied:
            self._update_mark(applied=epoch)

    def mark_failed_over(self) -> None:
        self._update_mark(failed_over=True)

    # -- recovery ------------------------------------------------------------------------------

    def scan(self) -> tuple[list[ReplayedEpoch], list[mmap.mmap | None]]:
        """Committed epochs of both files, in epoch order (``source`` says which mmap holds the data).
        The caller applies those above the applied mark, then calls :meth:`restart`."""
        found: list[ReplayedEpoch] = []
        maps: list[mmap.mmap | None] = []
        for index, fd in enumerate(self._fds):
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
            maps.append(mm)
            generation = first_generation(mm) if mm is not None else None
            if generation is None:
                continue
            self._next_generation = max(self._next_generation, generation + 1)
            for epoch in scan(mm, generation).committed:  # type: ignore[arg-type]
                epoch.source = index
                found.append(epoch)
        found.sort(key=lambda e: e.epoch)
        return found, maps

    def restart(self, applied: int) -> None:
        """After recovery applied and fdatasynced everything up to ``applied``: start afresh."""
        self._update_mark(applied=max(applied, self.mark.applied), generation=self._next_generation)
        self._pos = [0, 0]
        self._active = 0
        self._file_epoch = [0, 0]
        self._generation[0] = self._next_generation
        self._next_generation += 1
        if os.fstat(self._fds[0]).st_size < self.PREALLOCATE:
            # Overwriting allocated blocks syncs faster than growing the file.  First in the
            # journal thread's queue, so it runs before any record is written.
            self._pool.submit(self._preallocate, self._fds[0])

    def _preallocate(self, fd: int) -> None:
        try:
            os.pwrite(fd, bytes(self.PREALLOCATE), 0)
            os.fdatasync(fd)
        except OSError:
            pass  # only an optimisation; the file grows as records are written

    # -- the hot path (event loop thread) ------------------------------------------------------

    def open_group(self, seq: int, epoch: int) -> None:
        """The current epoch ``epoch`` (group ``seq``) starts; its records go to the active file."""
        self._groups[seq] = (self._active, epoch)

    def append(self, seq: int, epoch: int, offset: int, data: bytes | None, length: int) -> None:
        """Queue one record of the open group (a replica write, or zeroes when ``data`` is None)."""
        f = self._active
        pos = self._pos[f]
        size = RECORD_OVERHEAD + (length if data is not None else 0)
        self._pos[f] = pos + size
        self._pending[f].append((pos, seq, epoch, offset, data, length))
        self._pending_bytes += size
        if self._pending_bytes >= self.FLUSH_AT:
            self._flush(f)

    def _flush(self, f: int) -> None:
        items = self._pending[f]
        if items:
            self._pending[f] = []
            self._pending_bytes = 0
            self._pool.submit(self._write_items, f, self._generation[f], items)

    def seal(self, seq: int, next_seq: int, next_epoch: int) -> None:
        """Group ``seq`` is complete: write its queued records; the next group may switch files."""
        f, _ = self._groups[seq]
        self._flush(f)
        other = 1 - self._active
        if (
            self._pos[self._active] >= self.SWITCH_AT
            and not any(g[0] == other for g in self._groups.values())
            and self._file_epoch[other] <= self.mark.applied
        ):
            self._active = other
            self._pos[other] = 0
            self._file_epoch[other] = 0
            self._generation[other] = self._next_generation
            self._next_generation += 1
        self.open_group(next_seq, next_epoch)

    def commit(self, seq: int) -> concurrent.futures.Future[None]:
        """Write group ``seq``'s COMMIT record and fdatasync; the future completes once durable."""
        f, epoch = self._groups[seq]
        items = self._pending[f]
        self._pending[f] = []
        self._pending_bytes = 0
        pos = self._pos[f]
        self._pos[f] = pos + RECORD_OVERHEAD
        return self._pool.submit(self._commit_job, f, self._generation[f], items, seq, epoch, pos)

    def committed(self, seq: int) -> None:
        """The commit of ``seq`` returned: forget the group."""
        f, epoch = self._groups.pop(seq)
        self._file_epoch[f] = max(self._file_epoch[f], epoch)

    def abandon(self, seqs: Iterable[int]) -> None:
        """Groups that will never be committed (rolled back, failed over); their records stay, ignored."""
        dropped = set(seqs)
        for seq in dropped:
            self._groups.pop(seq, None)
        # Their queued records are still written: they own file positions, and a hole would hide
        # every record after it from replay.
        self._flush(0)
        self._flush(1)
        self._pool.submit(self._forget, dropped)

    # -- journal thread --------------------------------------------------------------------------

    def _forget(self, seqs: set[int]) -> None:
        for seq in seqs:
            self._crcs.pop(seq, None)

    def _write_items(self, f: int, generation: int, items: list[_Item]) -> None:
        if self.broken is not None:
            return
        parts: list[bytes] = []
        crcs = self._crcs
        pack = HEADER.pack
        for pos, seq, epoch, offset, data, length in items:
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
            count, acc = crcs.get(seq, (0, 0))
            crcs[seq] = (count + 1, zlib.crc32(crc, acc))
        start = items[0][0]
        try:
            end = pwritev_all(self._fds[f], parts, start)
        except OSError as exc:
            # A hole in the journal would hide every later record: refuse all later commits.
            self.broken = f"journal write failed: {exc.strerror or exc}"
            raise
        start_writeback(self._fds[f], start, end - start)

    def _commit_job(
        self, f: int, generation: int, items: list[_Item], seq: int, epoch: int, pos: int
    ) -> None:
        if items:
            self._write_items(f, generation, items)
        if self.broken is not None:
            raise DiskBufferError(f"{self.broken}; restart the disk buffer to recover", "io")
        count, crcs = self._crcs.pop(seq, (0, 0))
        record = encode_commit(generation, pos, seq, epoch, count, crcs)
        fd = self._fds[f]
        try:
            if os.pwrite(fd, record, pos) != len(record):
                raise OSError(28, "short journal write of a commit record")
            self.faults.hit("journal-written")
            os.fdatasync(fd)
        except OSError as exc:
            self.broken = f"journal commit failed: {exc.strerror or exc}"
            raise
        self.faults.hit("journal-synced")

    def stats(self) -> dict[str, int]:
        return {
            "journal_file": self._active,
            "journal_position": self._pos[self._active],
            "journal_generation": self._generation[self._active],
            "journal_applied_mark": self.mark.applied,
        }
