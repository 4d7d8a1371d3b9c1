"""A plain reference model of the disk buffer: whole-disk bytearrays and the obvious semantics.

Deliberately naive (a full copy of the disk per seal) so that it is obviously right; the tests
check :class:`disk_buffer.buffer.DiskBuffer` (directly, and through the NBD server) against it.
Methods mirror the real API; refused calls raise :class:`ModelError` with the same ``code`` the
real buffer uses, and change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ModelError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class DiskModel:
    size: int
    committed_image: bytearray = field(default_factory=bytearray)
    committed_epoch: int = 0
    current_epoch: int = 1
    replica: bytearray = field(default_factory=bytearray)
    view: bytearray = field(default_factory=bytearray)
    #: (epoch, replica image right after sealing it), oldest first
    sealed: list[tuple[int, bytes]] = field(default_factory=list)
    #: epoch -> the view image from before that epoch was sealed
    rollback_views: dict[int, bytes] = field(default_factory=dict)
    #: epoch -> the view writes made since that epoch was sealed, in order (a rollback keeps them)
    view_writes_since: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    failed_over: bool = False

    @classmethod
    def from_image(cls, image: bytes, committed_epoch: int = 0) -> DiskModel:
        return cls(
            size=len(image),
            committed_image=bytearray(image),
            committed_epoch=committed_epoch,
            current_epoch=committed_epoch + 1,
            replica=bytearray(image),
            view=bytearray(image),
        )

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ModelError("range")

    def _disk(self, export: str) -> bytearray:
        if export == "replica":
            if self.failed_over:
                raise ModelError("wrong-state")
            return self.replica
        return self.view

    def read(self, export: str, offset: int, length: int) -> bytes:
        self._check(offset, length)
        disk = self.view if self.failed_over else (self.replica if export == "replica" else self.view)
        return bytes(disk[offset : offset + length])

    def write(self, export: str, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self._disk(export)[offset : offset + len(data)] = data
        if export == "view":
            for writes in self.view_writes_since.values():
                writes.append((offset, bytes(data)))

    def write_zeroes(self, export: str, offset: int, length: int) -> None:
        self._check(offset, length)
        self.write(export, offset, bytes(length))

    trim = write_zeroes

    def seal(self) -> int:
        if self.failed_over:
            raise ModelError("wrong-state")
        epoch = self.current_epoch
        self.sealed.append((epoch, bytes(self.replica)))
        self.rollback_views[epoch] = bytes(self.view)
        self.view_writes_since[epoch] = []
        self.view = bytearray(self.replica)
        self.current_epoch += 1
        return epoch

    def commit(self, epoch: int) -> None:
        if self.failed_over:
            raise ModelError("wrong-state")
        if epoch <= self.committed_epoch:
            raise ModelError("out-of-order")
        if epoch == self.current_epoch:
            raise ModelError("wrong-state")
        numbers = [e for e, _ in self.sealed]
        if epoch not in numbers:
            raise ModelError("unknown-epoch")
        if epoch != numbers[0]:
            raise ModelError("out-of-order")
        _, image = self.sealed.pop(0)
        self.committed_image = bytearray(image)
        self.committed_epoch = epoch
        del self.rollback_views[epoch]
        del self.view_writes_since[epoch]

    def rollback(self) -> list[int]:
        if self.failed_over or not self.sealed:
            raise ModelError("wrong-state")
        dropped = [e for e, _ in self.sealed]
        self.view = bytearray(self.rollback_views[dropped[0]])
        for offset, data in self.view_writes_since[dropped[0]]:  # the VM's writes since: kept
            self.view[offset : offset + len(data)] = data
        self.replica = bytearray(self.committed_image)
        self.sealed.clear()
        self.rollback_views.clear()
        self.view_writes_since.clear()
        self.current_epoch = self.committed_epoch + 1
        return dropped

    def failover(self) -> None:
        if self.failed_over or self.sealed:
            raise ModelError("wrong-state")
        self.failed_over = True
        self.replica = self.view  # one plain disk from now on

    def crash(self) -> None:
        """kill -9 and restart: only the committed epoch survives (after failover: the plain disk)."""
        if self.failed_over:
            self.committed_image = bytearray(self.view)
            return
        self.replica = bytearray(self.committed_image)
        self.view = bytearray(self.committed_image)
        self.sealed.clear()
        self.rollback_views.clear()
        self.view_writes_since.clear()
        self.current_epoch = self.committed_epoch + 1
