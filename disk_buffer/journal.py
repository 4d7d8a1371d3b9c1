"""The redo journal and the applied mark: what makes a committed epoch survive kill -9.

Why a redo journal: applying an epoch to IMG is many scattered writes that a crash can tear; the
journal turns an epoch into sequential appends plus one ``fdatasync`` at commit, and IMG is brought
up to date afterwards (in the background, and again at recovery: replay is idempotent because it
writes the same bytes at the same offsets in the same order).

Files in the state directory:

``journal.0``, ``journal.1``
    Records (format and replay rules: :mod:`disk_buffer.journal_codec`), back to back from offset 0
    of the file's current *use*.  Records are queued as writes arrive and written every 1 MiB
    (writeback started at once); the COMMIT record and the single ``fdatasync`` come with
    ``commit`` -- so commit latency is one small write and a sync of data that is mostly on disk
    already.

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

This module is the I/O: the files, the journal thread, ``fdatasync`` and fault injection; every byte
it writes or replays is encoded and decoded by :mod:`disk_buffer.journal_codec`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import mmap
import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path

from disk_buffer.journal_codec import (
    MARK_SLOT,
    RECORD_OVERHEAD,
    Mark,
    PendingRecord,
    ReplayedEpoch,
    decode_mark,
    encode_commit,
    encode_mark,
    encode_records,
    first_generation,
    record_size,
    scan,
)
from disk_buffer.store import DiskBufferError
from hybridft_common.fastpath import speedups
from hybridft_common.secure import open_nofollow

# the loop of append_many in C (the Python loop below is its reference), unless HYBRIDFT_PURE_PYTHON=1
_queue_writes = None if speedups is None else speedups.journal_queue_writes

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
        if point not in FAULT_POINTS + FAILOVER_FAULT_POINTS:
            known = FAULT_POINTS + FAILOVER_FAULT_POINTS
            raise DiskBufferError(f"HYBRIDFT_DISK_FAULT: unknown point {point!r} (known: {known})", "config")
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

# Reached only by a failover: after the overlay merge and IMG's fdatasync, after the failed-over mark.
FAILOVER_FAULT_POINTS = ("failover-synced", "failover-marked")


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (files created or renamed in it) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- files ---------------------------------------------------------------------------------------

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


libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (``sync_file_range``); best effort."""
    try:
        libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), _SYNC_FILE_RANGE_WRITE)
    except (AttributeError, OSError):
        pass


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
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # never through a symlink planted in the state dir (DiskBuffer.open checked the dir is private)
        self._mark_fd = open_nofollow(state_dir / "mark", os.O_RDWR | os.O_CREAT, 0o600)
        self._fds = [open_nofollow(state_dir / name, os.O_RDWR | os.O_CREAT, 0o600) for name in self.FILES]
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hybridft-journal")
        # event-loop-thread state
        self._active = 0
        self._pos = [0, 0]
        self._generation = [0, 0]
        self._next_generation = 1
        self._pending: list[list[PendingRecord]] = [[], []]
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
        """Durably: IMG is the failed-over disk.  Only once the overlay is merged into IMG and IMG is
        fdatasynced (the caller's duty): a restart serves IMG alone from then on."""
        self._update_mark(failed_over=True)
        self.faults.hit("failover-marked")

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
        size = record_size(data, length)
        self._pos[f] = pos + size
        self._pending[f].append((pos, seq, epoch, offset, data, length))
        self._pending_bytes += size
        if self._pending_bytes >= self.FLUSH_AT:
            self._flush(f)

    def append_many(self, seq: int, epoch: int, offsets: list[int], payloads: list[bytes]) -> None:
        """:meth:`append` of a replica write per ``(offset, payload)``: the NBD fast path's batch."""
        f = self._active
        pos = self._pos[f]
        pending = self._pending[f]
        start = pos
        if _queue_writes is not None:
            pos = _queue_writes(pending, pos, seq, epoch, offsets, payloads, RECORD_OVERHEAD)
        else:
            for offset, data in zip(offsets, payloads, strict=True):
                length = len(data)
                pending.append((pos, seq, epoch, offset, data, length))
                pos += RECORD_OVERHEAD + length
        self._pos[f] = pos
        self._pending_bytes += pos - start
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

    def _write_items(self, f: int, generation: int, items: list[PendingRecord]) -> None:
        if self.broken is not None:
            return
        parts = encode_records(generation, items, self._crcs)
        start = items[0][0]
        try:
            end = pwritev_all(self._fds[f], parts, start)
        except OSError as exc:
            # A hole in the journal would hide every later record: refuse all later commits.
            self.broken = f"journal write failed: {exc.strerror or exc}"
            raise
        start_writeback(self._fds[f], start, end - start)

    def _commit_job(
        self, f: int, generation: int, items: list[PendingRecord], seq: int, epoch: int, pos: int
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
