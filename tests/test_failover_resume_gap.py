"""A write the secondary makes between QEMU's own resume at a failover and the agent's ``stop``.

QEMU 7.2 resumes a COLO secondary by itself as soon as it leaves COLO (``process_incoming_migration_bh``;
``-S`` is ignored on a secondary), before the agent's ``stop`` can reach it.  When the primary died
after sealing epoch N but before the secondary loaded it, the disk server's ``view`` already shows N,
and the agent then rolls N back.  A write the VM made in that gap landed in the view the rollback
dropped -- acknowledged to the guest, and gone -- until the rollback kept the VM's writes made since
the seal (:meth:`disk_buffer.store.EpochStore.rollback`).  The disk server here is the real one
(DiskBuffer behind NbdServer and the fenced control dispatch), the guest's write comes through a real
NBD client (libnbd); the secondary is the stand-in of ``tests/test_failover_order.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nbd as libnbd

from controller.agent import FailoverDecider, Timeline, fail_over
from controller.heartbeat import Heartbeat
from disk_buffer.buffer import Export
from disk_buffer.server import NbdServer
from mc_driver.qmp import Event
from tests.test_failover_order import LoadingSecondary, _disk_buffer, _serve
from tests.test_manifest import manifest_for

GUEST_OFFSET = 64 << 10
GUEST_DATA = b"G" * 4096
PRIMARY_DATA = b"P" * 4096  # the primary's write of epoch N, which the secondary never loaded


class Disk:
    """A disk server in this event loop: DiskBuffer + NBD (unix) + fenced control, as ``disk serve``."""

    def __init__(self, tmp_path: Path, control: str) -> None:
        self.buffer = _disk_buffer(tmp_path)
        self.image = tmp_path / "replica.img"  # _disk_buffer's image
        self.nbd = NbdServer(self.buffer, {"replica": Export.REPLICA, "view": Export.VIEW})
        self.socket = tmp_path / "nbd.sock"
        self.control = control
        self.servers: list[asyncio.Server] = []

    async def start(self) -> Disk:
        self.servers.append(await self.nbd.listen(f"unix:{self.socket}"))
        self.servers.append(await _serve(self.buffer, self.control))
        return self

    async def view_client(self) -> Any:
        """A real NBD client on `view`, as the secondary QEMU's disk."""
        handle = libnbd.NBD()
        await asyncio.to_thread(handle.connect_uri, f"nbd+unix:///view?socket={self.socket}")
        return handle

    async def close(self) -> None:
        self.nbd.close_connections()
        for server in self.servers:
            server.close()
        await self.buffer.aclose()


def _image_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as image:
        image.seek(offset)
        return image.read(length)


class ResumingSecondary(LoadingSecondary):
    """A secondary stopped for checkpoint N when the primary died, N sealed but never loaded.  On the
    failover QEMU resumes it by itself and the guest writes at once, through a real NBD client on
    `view`; ``stop`` returns only once that write completed (QEMU's stop drains the VM's I/O)."""

    def __init__(self, handle: Any) -> None:
        super().__init__(loading=False, running=False)
        self.handle = handle
        self.guest_write: asyncio.Task[None] | None = None

    async def _finish_load_then_fail_over(self) -> None:
        await asyncio.sleep(0.01)
        self.in_colo = False
        now = time.time()
        self.events.put_nowait(Event("COLO_EXIT", {"mode": "secondary", "reason": "request"}, now, now))
        await asyncio.sleep(0.01)
        self.running = True  # process_incoming_migration_bh: vm_start ...
        self.guest_write = asyncio.create_task(
            asyncio.to_thread(self.handle.pwrite, GUEST_DATA, GUEST_OFFSET)
        )
        await asyncio.sleep(0.01)
        self.incoming = "completed"  # ... then the migration ends

    async def execute(self, command: str, arguments: Any = None, **args: Any) -> Any:
        if command == "stop" and self.guest_write is not None:
            await asyncio.wait_for(asyncio.shield(self.guest_write), 4.0)  # the drain
        return await super().execute(command, arguments, **args)


def test_a_write_of_the_resumed_secondary_survives_the_rollback_of_an_epoch_it_never_loaded(
    tmp_path: Path,
) -> None:
    """The guest's write was served into the view of sealed epoch N and the rollback dropped that
    view: the failed-over disk lacked a write the guest was told was done (seen failing before the
    fix: zeroes where the guest wrote)."""

    async def scenario() -> tuple[dict[str, Any], bytes, bytes]:
        config = manifest_for(tmp_path)
        disk = await Disk(tmp_path, config.disk_control).start()
        try:
            handle = await disk.view_client()
            disk.buffer.write(Export.REPLICA, 0, PRIMARY_DATA)
            epoch = disk.buffer.seal()
            decider = FailoverDecider()
            decider.message(Heartbeat(time.time(), epoch, "sealed"), 0.0)  # no RESUME after it
            secondary = ResumingSecondary(handle)
            report = await fail_over(config, decider, secondary, Timeline())
            assert secondary.guest_write is not None and secondary.guest_write.done()
            await asyncio.to_thread(handle.shutdown)
        finally:
            await disk.close()
        return report, _image_at(disk.image, GUEST_OFFSET, len(GUEST_DATA)), _image_at(disk.image, 0, 4096)

    report, guest, primary = asyncio.run(scenario())
    assert report["disk"]["action"] == "rollback" and report["resumed"], report
    assert guest == GUEST_DATA  # the guest's acknowledged write is on the failed-over disk
    assert primary == bytes(4096)  # and epoch N, which its memory never had, is not
    steps = [step for step, _ in report["steps"]]
    assert steps.index("stop") < steps.index("disk failover"), steps  # the write landed before the decision
    assert not [e for e in report["errors"] if "stop" in e or "disk" in e], report["errors"]
