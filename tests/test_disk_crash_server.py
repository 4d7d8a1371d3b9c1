"""kill -9 of the real server: `hybridft disk serve` is killed at random instants (and kills itself at
each fault-injection point) while a libnbd client writes and the control socket seals and commits;
after a restart `replica` and `view` must equal the model's last committed epoch, or the one whose
commit was in flight.  (tests/test_disk_crash.py does hundreds of cheaper forked iterations.)"""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

from disk_buffer.journal import FAULT_POINTS
from hybridft_common.control import ControlError, call
from tests.helpers.disk_model import DiskModel
from tests.helpers.disk_server import start_disk_serve

SIZE = 2 << 20


class Server:
    def __init__(self, tmp: Path, fault: str | None = None) -> None:
        self.nbd_sock = tmp / "nbd.sock"
        self.control = f"unix:{tmp / 'ctl.sock'}"
        env = dict(os.environ)
        env.pop("HYBRIDFT_DISK_FAULT", None)
        if fault:
            env["HYBRIDFT_DISK_FAULT"] = fault
        for stale in (self.nbd_sock, tmp / "ctl.sock"):
            stale.unlink(missing_ok=True)  # left behind by a killed server
        self.proc, _ready = start_disk_serve(
            tmp / "img", tmp / "state", nbd=f"unix:{self.nbd_sock}", control=self.control, env=env
        )

    def connect(self, export: str) -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{export}?socket={self.nbd_sock}")
        return h

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@dataclass
class Outcome:
    images: dict[int, bytes]  # epoch -> committed image, for every epoch recovery may land on
    committed: list[int] = field(default_factory=list)  # commits that returned
    in_flight: int | None = None  # the commit that was running when the server died
    died: bool = False


def workload(rng: random.Random, server: Server, model: DiskModel, operations: int) -> Outcome:
    """Write/seal/commit until the server dies (or after ``operations``)."""
    outcome = Outcome({model.committed_epoch: bytes(model.committed_image)})
    try:
        handles = {"replica": server.connect("replica"), "view": server.connect("view")}
        for _ in range(operations):
            r = rng.random()
            if r < 0.75:
                offset = rng.randrange(SIZE // 512 - 64) * 512
                data = rng.randbytes(512 * rng.randint(1, 64))
                export = "view" if rng.random() < 0.2 else "replica"
                handles[export].pwrite(data, offset)
                model.write(export, offset, data)
            elif r < 0.9:
                assert call(server.control, "seal")["epoch"] == model.seal()
            elif model.sealed:
                epoch, image = model.sealed[0]
                outcome.in_flight = epoch
                outcome.images[epoch] = image
                call(server.control, "commit", epoch=epoch)
                model.commit(epoch)
                outcome.committed.append(epoch)
                outcome.images = {epoch: image}  # older epochs can no longer be the answer
                outcome.in_flight = None
    except (nbd.Error, ControlError, OSError):
        outcome.died = True  # the server died under us
    return outcome


def run_iterations(tmp: Path, count: int, fault: str | None, seed: int) -> int:
    rng = random.Random(seed)
    image = rng.randbytes(SIZE)
    (tmp / "img").write_bytes(image)
    epoch = 0
    kills = 0
    for _ in range(count):
        model = DiskModel.from_image(image, epoch)
        server = Server(tmp, fault=f"{fault}:{rng.randint(1, 3)}" if fault else None)
        timer = None
        if fault is None:
            timer = threading.Timer(rng.uniform(0.02, 0.4), server.kill)
            timer.start()
        outcome = workload(rng, server, model, 300 if fault else 100_000)
        if timer is not None:
            timer.cancel()
            timer.join()
        server.kill()
        kills += outcome.died
        allowed = {outcome.committed[-1] if outcome.committed else epoch}
        if outcome.in_flight is not None:
            allowed.add(outcome.in_flight)
        restarted = Server(tmp)
        try:
            epoch = call(restarted.control, "status")["committed"]
            assert epoch in allowed, (epoch, allowed)
            image = outcome.images[epoch]
            for export in ("replica", "view"):
                h = restarted.connect(export)
                assert h.pread(SIZE, 0) == image, f"{export} is not epoch {epoch}"
                h.shutdown()
        finally:
            restarted.proc.send_signal(signal.SIGTERM)
            restarted.proc.wait(30)
    return kills


def test_server_killed_at_random_instants(crash_dir: Path) -> None:
    kills = run_iterations(crash_dir, 6, None, seed=11)
    assert kills >= 4, kills


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_server_kills_itself_at_fault_point(crash_dir: Path, point: str) -> None:
    kills = run_iterations(crash_dir, 2, point, seed=len(point))
    assert kills >= 1, f"{point}: reached in {kills} of 2 runs"
