"""The disk buffer's I/O facade: the epoch store plus the image file, the journal and two threads.

The NBD server and the control socket call this and nothing below it.  What lives where:

* :mod:`disk_buffer.store` decides what every read sees and what every verb does (no I/O).
* This module does the I/O those decisions need: ``pread`` holes from IMG, journal writes, the
  write-out of committed epochs to IMG, recovery at :meth:`DiskBuffer.open`.
* The *journal thread* (owned by :class:`~disk_buffer.journal.Journal`) encodes and writes replica
  writes' journal records in 1 MiB batches as they arrive, and on ``commit`` the COMMIT record and
  the one ``fdatasync``; ordering is its queue.
* The *write-out thread* applies committed epochs to IMG, ``fdatasync``\\ s IMG, writes the applied
  mark and only then drops the epochs from memory (a read never sees IMG without those bytes).

Everything public is called from one thread (the server's event loop); the two worker threads
only touch frozen (sealed/committed) extent maps, and structural changes to the store are made
under one lock.  Reads take no lock: they snapshot an immutable tuple of layers.

Crash safety (kill -9 at any instant, then :meth:`DiskBuffer.open` again): ``replica`` equals the
last committed epoch -- an epoch whose ``commit`` returned is in the journal (fdatasynced), one
killed mid-commit has a COMMIT record or not.  The view's overlay and every uncommitted primary
write are in memory only and are gone, on purpose: the secondary VM restarts from the last
checkpoint, and the last checkpoint's disk is exactly the committed epoch.  After ``failover`` the
state directory records it, and a restart serves IMG as a plain disk.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import threading
from operator import add
from pathlib import Path
from typing import Any

from disk_buffer.journal import FaultInjector, Journal, JournalCorrupt, libc
from disk_buffer.store import DiskBufferError, EpochStore, Export, SealedEpoch, WriteBatchError, resolve
from hybridft_common.fastpath import available, speedups
from hybridft_common.secure import ChannelError, ensure_private_dir, open_nofollow

__all__ = ["DiskBuffer", "DiskBufferError", "Export"]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)

try:
    _fallocate = libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - every glibc has it
    _fallocate = None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False
_libc_heap = ctypes.CDLL(None)  # its own handle: prefault_heap sets argtypes on malloc/free


def keep_freed_memory() -> None:
    """Make glibc keep and reuse freed epoch buffers instead of returning them to the kernel.

    Epoch data is allocated, held until the write-out, freed, and allocated again for the next
    epochs.  By default glibc serves big blocks with mmap and unmaps them on free, so every MiB
    is page-faulted in afresh: measured ~3 ms per MiB on this VM, which caps writes at ~300 MB/s.
    Served from the heap and never trimmed, reused memory costs ~0.4 ms per MiB.  The heap then
    stays at its peak, which the budgets bound.  Process-wide, so done once, by the disk server.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)  # a C int: the largest it takes
    except (AttributeError, OSError):  # not glibc
        pass


def prefault_heap(nbytes: int, chunk: int = 16 << 20) -> int:
    """Fault in ``nbytes`` of the heap now, so epoch data does not fault its pages in one by one.

    Every 4 KiB write the server keeps is a new ``bytes`` object; until freed memory is reused
    (after the first checkpoints) each lands on a fresh page, and the page fault, the zeroing and
    the cgroup charge cost more than the rest of the request.  Chunks below the mmap threshold come
    from the heap; freed, they merge into its top, which :func:`keep_freed_memory` keeps (glibc
    only; a no-op elsewhere).  Returns the bytes faulted in.
    """
    if nbytes <= 0 or not _malloc_tuned:
        return 0
    try:
        malloc, free = _libc_heap.malloc, _libc_heap.free
    except AttributeError:
        return 0
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    blocks: list[int] = []
    done = 0
    while done < nbytes:
        block = malloc(chunk)
        if not block:
            break
        ctypes.memset(block, 0, chunk)
        blocks.append(block)
        done += chunk
    for block in reversed(blocks):
        free(block)
    return done


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of a file read as zeroes (punch a hole, else write zeroes)."""
    if (
        length >= 65536
        and _fallocate is not None
        and (_fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0)
    ):
        return
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        os.pwrite(fd, _ZERO_CHUNK[:n], offset)
        offset += n
        length -= n


def _io_error(what: str, exc: OSError) -> DiskBufferError:
    code = "nospace" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io"
    return DiskBufferError(f"{what}: {exc.strerror or exc}", code)


def _extents_of(batch: list[SealedEpoch]) -> list[tuple[int, int, bytes | None]]:
    """The write-out's work for ``batch``: every sealed epoch's extents, oldest epoch first."""
    extents: list[tuple[int, int, bytes | None]] = []
    for sealed in batch:
        extents.extend(sealed.extents.items())
    return extents


class DiskBuffer:
    """Both NBD exports over one raw image and one state directory.  Use :meth:`open`."""

    def __init__(
        self,
        image: Path,
        state_dir: Path,
        img_fd: int,
        lock_fd: int,
        journal: Journal,
        store: EpochStore,
        faults: FaultInjector,
        speculation_budget: int,
        writeout_budget: int,
    ) -> None:
        self.image = image
        self.state_dir = state_dir
        self.size = store.size
        self.speculation_budget = speculation_budget
        self.writeout_budget = writeout_budget
        self.checkpoint_mark = speculation_budget // 2
        # Set by prepare_checkpoint(): the speculation budget stops pausing NBD reading until the
        # checkpoint commits or rolls back (see prepare_checkpoint for why).
        self._checkpoint_in_progress = False
        self._fd = img_fd
        self._lock_fd = lock_fd
        self._journal = journal
        self._store = store
        self._faults = faults
        self._cond = threading.Condition()
        self._stopping = False
        self._crashing = False
        self._closed = False
        self.writeout_error: str | None = None
        self._room_waiters: set[asyncio.Future[None]] = set()
        self._waiter_loop: asyncio.AbstractEventLoop | None = None
        self._writeout_thread: threading.Thread | None = None
        if not store.failed_over:
            journal.open_group(store.current_seq, store.current_epoch)
            self._writeout_thread = threading.Thread(
                target=self._writeout_loop, name="hybridft-writeout", daemon=True
            )
            self._writeout_thread.start()

    # -- opening and recovery ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        image: str | Path,
        state_dir: str | Path,
        *,
        speculation_budget: int = 256 << 20,
        writeout_budget: int = 256 << 20,
        checkpoint_mark: int | None = None,
    ) -> DiskBuffer:
        """Open IMG and its state directory, replaying committed epochs the journal still holds.

        ``checkpoint_mark`` (default: half the speculation budget) is where ``checkpoint_needed``
        turns on, well before the budget itself pauses NBD reading (see :meth:`prepare_checkpoint`).
        """
        image = Path(image)
        state_dir = Path(state_dir)
        if speculation_budget <= 0 or writeout_budget <= 0:
            raise DiskBufferError("budgets must be positive", "config")
        if checkpoint_mark is None:
            checkpoint_mark = speculation_budget // 2
        if not 0 < checkpoint_mark <= speculation_budget:
            raise DiskBufferError("the checkpoint mark must be positive and at most the budget", "config")
        faults = FaultInjector.from_env()
        keep_freed_memory()
        # what this open creates: the directory entries must outlive a crash like the files' contents
        new_dir = not state_dir.exists()
        new_files = new_dir or not all((state_dir / n).exists() for n in ("lock", "mark", *Journal.FILES))
        try:
            img_fd = os.open(image, os.O_RDWR)
        except OSError as exc:
            raise DiskBufferError(f"cannot open image {image}: {exc.strerror}", "config") from None
        lock_fd = -1
        try:
            if not os.path.isfile(image):
                raise DiskBufferError(f"image {image} is not a regular file", "config")
            try:  # a private directory, files never opened through a planted symlink
                ensure_private_dir(state_dir, what="state dir")
                lock_fd = open_nofollow(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            except ChannelError as exc:
                raise DiskBufferError(exc.message, "config") from None
            except OSError as exc:
                raise DiskBufferError(f"cannot use state dir {state_dir}: {exc.strerror}", "config") from None
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskBufferError(
                    f"state dir {state_dir} is in use by another process", "config"
                ) from None
            size = os.fstat(img_fd).st_size
            journal = Journal(state_dir, size, faults)
            if new_files:
                from disk_buffer.journal import fsync_dir

                if new_dir:
                    fsync_dir(state_dir.resolve().parent)
                fsync_dir(state_dir)
            try:
                store = cls._recover(img_fd, size, journal)
            except BaseException:
                journal.close()
                raise
        except BaseException:
            os.close(img_fd)
            if lock_fd >= 0:
                os.close(lock_fd)
            raise
        buffer = cls(
            image, state_dir, img_fd, lock_fd, journal, store, faults, speculation_budget, writeout_budget
        )
        buffer.checkpoint_mark = checkpoint_mark
        return buffer

    @staticmethod
    def _recover(img_fd: int, size: int, journal: Journal) -> EpochStore:
        mark = journal.mark
        if mark.failed_over:
            return EpochStore(size, mark.applied, failed_over=True)
        epochs, maps = journal.scan()
        last = mark.applied
        try:
            for epoch in epochs:
                if epoch.epoch <= last:
                    continue  # already in IMG (fdatasynced before the mark said so)
                mm = maps[epoch.source]
                assert mm is not None
                for ext in epoch.extents:
                    if ext.offset + ext.length > size:
                        raise JournalCorrupt(
                            f"journal epoch {epoch.epoch} writes {ext.length} bytes at {ext.offset}, "
                            f"beyond the {size}-byte image"
                        )
                    if ext.payload_at is None:
                        zero_range(img_fd, ext.offset, ext.length)
                    else:
                        os.pwrite(img_fd, mm[ext.payload_at : ext.payload_at + ext.length], ext.offset)
                last = epoch.epoch
        finally:
            for mm in maps:
                if mm is not None:
                    mm.close()
        if last > mark.applied:
            os.fdatasync(img_fd)
        journal.restart(last)
        return EpochStore(size, last)

    # -- data path -----------------------------------------------------------------------------

    def read(self, export: Export, offset: int, length: int) -> bytes:
        store = self._store
        if offset < 0 or length < 0 or offset + length > store.size:
            store.check_range(offset, length)
        plan = resolve(store.layers(export), offset, length)
        if isinstance(plan, bytes):
            return plan
        holes = plan.holes
        if len(holes) == 1 and holes[0] == (offset, offset + length):
            data = os.pread(self._fd, length, offset)
            return data if len(data) == length else data.ljust(length, b"\0")
        buf = memoryview(plan.buffer)
        for start, end in holes:
            os.preadv(self._fd, [buf[start - offset : end - offset]], start)
        return bytes(plan.buffer)

    def write(self, export: Export, offset: int, data: bytes | bytearray | memoryview) -> None:
        store = self._store
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        if offset < 0 or offset + length > store.size:
            store.check_range(offset, length)
        target = store.target(export)
        if target is None:
            try:
                os.pwrite(self._fd, data, offset)
            except OSError as exc:
                raise _io_error("image write failed", exc) from None
            return
        payload = data if type(data) is bytes else bytes(data)
        target.put(offset, length, payload)
        if target is store.current:
            self._journal.append(store.current_seq, store.current_epoch, offset, payload, length)

    def write_many(self, export: Export, offsets: list[int], payloads: list[bytes]) -> None:
        """:meth:`write` of each ``(offset, payload)``, in order, as one batch: the NBD fast path.

        Raises :class:`WriteBatchError` at the first write refused, with the ones before it
        applied, exactly as one :meth:`write` per item would have left things.
        """
        count = len(offsets)
        if count != len(payloads):
            raise ValueError("write_many: as many offsets as payloads")
        store = self._store
        size = store.size
        refused: WriteBatchError | None = None  # the first write out of range; those before it apply
        if count == 1:  # a client at queue depth 1: spare it min, max and three maps
            out_of_range = offsets[0] < 0 or offsets[0] + len(payloads[0]) > size
        elif count:
            out_of_range = min(offsets) < 0 or max(map(add, offsets, map(len, payloads))) > size
        else:
            return
        if out_of_range:
            ranges = enumerate(zip(offsets, payloads, strict=True))
            count = next(i for i, (o, d) in ranges if o < 0 or o + len(d) > size)
            try:
                store.check_range(offsets[count], len(payloads[count]))
            except DiskBufferError as exc:
                refused = WriteBatchError(count, exc)
        if refused is not None and count == 0:
            raise refused  # as write() does: the range before the state
        try:
            target = store.target(export)
        except DiskBufferError as exc:
            raise WriteBatchError(0, exc) from None
        if target is None:  # after failover: to IMG, one by one
            for i in range(count):
                try:
                    self.write(export, offsets[i], payloads[i])
                except DiskBufferError as exc:
                    raise WriteBatchError(i, exc) from None
        else:
            done_offsets = offsets if refused is None else offsets[:count]
            done_payloads = payloads if refused is None else payloads[:count]
            target.put_many(done_offsets, done_payloads)
            if target is store.current:
                self._journal.append_many(store.current_seq, store.current_epoch, done_offsets, done_payloads)
        if refused is not None:
            raise refused

    def write_zeroes(self, export: Export, offset: int, length: int) -> None:
        store = self._store
        if offset < 0 or length < 0 or offset + length > store.size:
            store.check_range(offset, length)
        target = store.target(export)
        if target is None:
            try:
                zero_range(self._fd, offset, length)
            except OSError as exc:
                raise _io_error("image write failed", exc) from None
            return
        target.put(offset, length, None)
        if target is store.current:
            self._journal.append(store.current_seq, store.current_epoch, offset, None, length)

    def trim(self, export: Export, offset: int, length: int) -> None:
        """Discard a range; it reads back as zeroes afterwards (stronger than NBD requires)."""
        self.write_zeroes(export, offset, length)

    def flush(self, export: Export) -> None:
        """A no-op before failover (epochs, not NBD FLUSH, make data durable); fdatasync of IMG after."""
        if self._store.failed_over:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise _io_error("fdatasync of the image failed", exc) from None

    # -- back-pressure -------------------------------------------------------------------------

    def has_room(self) -> bool:
        store = self._store
        return (
            self._checkpoint_in_progress or store.speculation_bytes() < self.speculation_budget
        ) and store.writeout_bytes < self.writeout_budget

    def needs_checkpoint(self) -> bool:
        return self._store.speculation_bytes() >= self.checkpoint_mark

    def prepare_checkpoint(self) -> None:
        """The daemon is about to stop the primary: lift the speculation pause until commit/rollback.

        Why: the primary mirrors with copy-mode=write-blocking, so a guest write completes only once
        this server took it, and QMP ``stop`` waits for in-flight I/O to drain.  If the budget has
        paused NBD reading, that ``stop`` would wait for writes that wait for a checkpoint that waits
        for the ``stop``: a deadlock.  Letting the paused requests in is bounded (the client's
        in-flight requests, e.g. the mirror job's queue); ``checkpoint_needed`` fires at the lower
        ``checkpoint_mark`` so this is the exception.  The write-out budget keeps pausing: the
        write-out thread drains it by itself, no checkpoint needed.
        """
        self._checkpoint_in_progress = True
        self._notify_room()

    async def wait_for_room(self) -> None:
        while not self.has_room():
            loop = asyncio.get_running_loop()
            self._waiter_loop = loop
            fut: asyncio.Future[None] = loop.create_future()
            self._room_waiters.add(fut)
            try:
                if self.has_room():  # the write-out thread may have freed room meanwhile
                    return
                await fut
            finally:
                self._room_waiters.discard(fut)

    def _notify_room(self) -> None:
        for fut in list(self._room_waiters):
            if not fut.done():
                fut.set_result(None)

    def _notify_room_threadsafe(self) -> None:
        loop = self._waiter_loop
        if loop is not None and self._room_waiters:
            try:
                loop.call_soon_threadsafe(self._notify_room)
            except RuntimeError:  # loop closed
                pass

    # -- epoch verbs ---------------------------------------------------------------------------

    def seal(self) -> int:
        store = self._store
        with self._cond:
            sealed = store.seal()
        self._journal.seal(sealed.seq, store.current_seq, store.current_epoch)
        return sealed.epoch

    async def commit(self, epoch: int) -> None:
        """Return once ``epoch`` is durable; it is applied to IMG in the background."""
        with self._cond:
            sealed = self._store.begin_commit(epoch)
        if self._journal.broken is not None:
            self._abort_commit(epoch)
            raise DiskBufferError(f"{self._journal.broken}; restart the disk buffer to recover", "io")
        job = asyncio.wrap_future(self._journal.commit(sealed.seq))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # The journal write goes on regardless; record its outcome when it lands.
            job.add_done_callback(lambda f: self._settle_commit(epoch, sealed.seq, f))
            raise
        except DiskBufferError:
            self._abort_commit(epoch)
            raise
        except OSError as exc:
            self._abort_commit(epoch)
            raise _io_error(f"journal write of epoch {epoch} failed", exc) from None
        self._finish_commit(epoch, sealed.seq)

    def _settle_commit(self, epoch: int, seq: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self._abort_commit(epoch)
        else:
            self._finish_commit(epoch, seq)

    def _abort_commit(self, epoch: int) -> None:
        with self._cond:
            self._store.abort_commit(epoch)

    def _finish_commit(self, epoch: int, seq: int) -> None:
        self._journal.committed(seq)
        with self._cond:
            self._store.finish_commit(epoch)
            self._cond.notify_all()
        self._checkpoint_in_progress = False
        self._notify_room()

    def rollback(self) -> dict[str, Any]:
        store = self._store
        with self._cond:
            seqs = [s.seq for s in store.sealed] + [store.current_seq]
            result = store.rollback()
        self._journal.abandon(seqs)
        self._journal.open_group(store.current_seq, store.current_epoch)
        self._checkpoint_in_progress = False
        self._notify_room()
        return result

    async def failover(self) -> None:
        """Finish the write-out, drop uncommitted primary writes, merge the overlay into IMG, sync,
        and only then mark the state directory failed over.

        Why this order: the durable mark makes every restart serve IMG alone, so IMG must hold the
        overlay (the secondary VM's own writes) -- merged *and* fdatasynced -- before the mark says so.
        Killed before the mark, the buffer restarts not failed over and the failover is simply asked
        for again.  The merge, the sync, the mark and the switch run without yielding to the event
        loop, so no view write can land in the overlay after it was merged (a failover is rare; the
        NBD connections wait for one fdatasync)."""
        with self._cond:
            self._store.begin_failover()
        self._journal.abandon([self._store.current_seq])
        await asyncio.to_thread(self._wait_writeout_drained)
        if self.writeout_error is not None:
            raise DiskBufferError(f"failover: write-out failed: {self.writeout_error}", "io")
        try:
            for start, end, data in self._store.view.overlay.items():
                if data is None:
                    zero_range(self._fd, start, end - start)
                else:
                    os.pwrite(self._fd, data, start)
            os.fdatasync(self._fd)
            self._faults.hit("failover-synced")
            self._journal.mark_failed_over()
        except OSError as exc:
            raise _io_error("failover", exc) from None
        with self._cond:
            self._store.finish_failover()
            self._stopping = True
            self._cond.notify_all()
        self._notify_room()

    def _wait_writeout_drained(self) -> None:
        with self._cond:
            while self._store.writeout and self.writeout_error is None:
                self._cond.wait()

    def status(self) -> dict[str, Any]:
        with self._cond:
            result = self._store.status()
        result.update(self._journal.stats())
        result["checkpoint_needed"] = self.needs_checkpoint()
        result["has_room"] = self.has_room()
        result["speculation_budget"] = self.speculation_budget
        result["checkpoint_mark"] = self.checkpoint_mark
        result["checkpoint_in_progress"] = self._checkpoint_in_progress
        result["writeout_budget"] = self.writeout_budget
        result["writeout_error"] = self.writeout_error
        return result

    # -- write-out -----------------------------------------------------------------------------

    def _writeout_loop(self) -> None:
        store = self._store
        while True:
            with self._cond:
                while not store.writeout and not self._stopping:
                    self._cond.wait()
                if self._crashing or (self._stopping and not store.writeout):
                    return
                batch = list(store.writeout)
            try:
                if not self._apply(batch):
                    return
                os.fdatasync(self._fd)
                self._faults.hit("image-synced")
                if self._crashing:
                    return
                self._journal.mark_applied(batch[-1].epoch)
            except OSError as exc:
                with self._cond:
                    self.writeout_error = f"{exc.strerror or exc}"
                    self._cond.notify_all()
                return
            with self._cond:
                store.applied_upto(batch[-1].epoch)
                self._cond.notify_all()
            self._notify_room_threadsafe()

    def _apply_python(self, batch: list[SealedEpoch]) -> bool:
        """Write ``batch``'s extents to IMG (not synced); False if a simulated crash stopped it.
        The reference of :meth:`_apply_compiled`."""
        fd = self._fd
        extents = _extents_of(batch)
        middle = len(extents) // 2
        for i, (start, end, data) in enumerate(extents):
            if self._crashing:
                return False
            if data is None:
                zero_range(fd, start, end - start)
            else:
                os.pwrite(fd, data, start)
            if i == middle:
                self._faults.hit("writeout-mid")
        return True

    #: extents per call of the compiled loop: how often it looks at a simulated crash
    APPLY_CHUNK = 1024

    def _apply_compiled(self, batch: list[SealedEpoch]) -> bool:
        """:meth:`_apply_python` with the data extents written by ``_speedups.write_extents``: runs
        of them without the GIL, adjacent ones in one ``pwritev``.  The same writes in the same
        order; the fault point ``writeout-mid`` is still hit right after the middle extent."""
        assert available is not None
        write_extents = available.write_extents
        fd = self._fd
        extents = _extents_of(batch)
        middle = len(extents) // 2
        i, count = 0, len(extents)
        while i < count:
            if self._crashing:
                return False
            # stop right after the middle extent, so the fault point sees what the reference's does
            stop = min(count, i + self.APPLY_CHUNK, middle + 1 if i <= middle else count)
            start, end, data = extents[i]
            if data is None:
                zero_range(fd, start, end - start)
                i += 1
            else:
                i = write_extents(fd, extents, i, stop)
            if i == middle + 1:
                self._faults.hit("writeout-mid")
        return True

    _apply = _apply_python if speedups is None else _apply_compiled

    # -- shutdown ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Finish the write-out, stop both threads and close the files."""
        if self._closed:
            return
        await asyncio.to_thread(self._shutdown)

    def close(self) -> None:
        """Synchronous :meth:`aclose` (for tools and tests without an event loop)."""
        if not self._closed:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._writeout_thread is not None:
            self._writeout_thread.join()
        self._close_files()

    def simulate_crash(self) -> None:
        """Test support: stop like kill -9 would -- workers stop at their next step, nothing more is
        written or synced, memory is dropped.  (Real kill -9 tests use subprocesses.)"""
        if self._closed:
            return
        with self._cond:
            self._crashing = True
            self._stopping = True
            self._cond.notify_all()
        if self._writeout_thread is not None:
            self._writeout_thread.join()
        self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        self._journal.close()
        for fd in (self._fd, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass
