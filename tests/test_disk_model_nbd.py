"""The same model check, end to end: a real `hybridft disk serve` process, libnbd clients on both
exports (nbd+unix URIs), `seal`/`commit`/`rollback`/`failover` over the control socket, and crash =
kill -9 of the server and a restart.  Both exports are compared byte for byte after every step."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from tempfile import mkdtemp

import hypothesis.strategies as st
import nbd
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from disk_buffer.store import REGION_SIZE
from hybridft_common.control import ControlError, call
from tests.helpers.disk_model import DiskModel, ModelError
from tests.helpers.disk_server import start_disk_serve
from tests.helpers.scratch import RAM_DIR

SIZE = REGION_SIZE + (64 << 10)
LOW = SIZE - (128 << 10)  # I/O lands here, across a region boundary
EXPORTS = st.sampled_from(["replica", "view"])
SECTOR = 512


def sector_ranges() -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(LOW // SECTOR, SIZE // SECTOR - 1), st.integers(1, 40)).map(
        lambda t: (t[0] * SECTOR, min(t[1], SIZE // SECTOR - t[0]) * SECTOR)
    )


class ServedDiskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(mkdtemp(prefix="hft-nbd-model-", dir=RAM_DIR if RAM_DIR.is_dir() else None))
        self.image = self.dir / "img"
        initial = random.Random(3).randbytes(SIZE)
        self.image.write_bytes(initial)
        self.nbd_sock = self.dir / "nbd.sock"
        self.control = f"unix:{self.dir / 'ctl.sock'}"
        self.model = DiskModel.from_image(initial)
        self.proc: subprocess.Popen[str] | None = None
        self.handles: dict[str, nbd.NBD] = {}
        self.start()

    def start(self) -> None:
        self.proc, _ready = start_disk_serve(
            self.image, self.dir / "state", nbd=f"unix:{self.nbd_sock}", control=self.control
        )
        for export in ("replica", "view"):
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///{export}?socket={self.nbd_sock}")
            self.handles[export] = h

    def disconnect(self) -> None:
        for h in self.handles.values():
            try:
                h.shutdown()
            except nbd.Error:
                pass
        self.handles.clear()

    def teardown(self) -> None:
        self.disconnect()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ctl(self, verb: str, **args: object) -> dict:
        return call(self.control, verb, io_timeout=30, **args)

    def same(self, real, model):  # type: ignore[no-untyped-def]
        """Both succeed, or both refuse with the same code."""
        try:
            expected = model()
        except ModelError as exc:
            try:
                real()
            except ControlError as real_exc:
                assert real_exc.code == exc.code, (real_exc.code, real_exc.message, exc.code)
                return None, None
            except nbd.Error:
                assert exc.code == "wrong-state"  # refused NBD write (EPERM) after failover
                return None, None
            raise AssertionError(f"model refused ({exc.code}) but the server accepted") from None
        return real(), expected

    @rule(export=EXPORTS, rng=sector_ranges(), seed=st.integers(0, 1 << 30))
    def write(self, export: str, rng: tuple[int, int], seed: int) -> None:
        offset, length = rng
        data = random.Random(seed).randbytes(length)
        self.same(
            lambda: self.handles[export].pwrite(data, offset), lambda: self.model.write(export, offset, data)
        )

    @rule(export=EXPORTS, rng=sector_ranges(), trim=st.booleans())
    def zero(self, export: str, rng: tuple[int, int], trim: bool) -> None:
        offset, length = rng
        h = self.handles[export]
        if trim:
            self.same(lambda: h.trim(length, offset), lambda: self.model.trim(export, offset, length))
        else:
            self.same(lambda: h.zero(length, offset), lambda: self.model.write_zeroes(export, offset, length))

    @rule(export=EXPORTS)
    def flush(self, export: str) -> None:
        self.handles[export].flush()

    @rule()
    def seal(self) -> None:
        real, expected = self.same(lambda: self.ctl("seal")["epoch"], self.model.seal)
        assert real == expected

    @rule(which=st.sampled_from(["oldest", "newest", "current", "far"]))
    def commit(self, which: str) -> None:
        sealed = [e for e, _ in self.model.sealed]
        epoch = {
            "oldest": sealed[0] if sealed else self.model.current_epoch,
            "newest": sealed[-1] if sealed else self.model.current_epoch,
            "current": self.model.current_epoch,
            "far": self.model.current_epoch + 3,
        }[which]
        self.same(lambda: self.ctl("commit", epoch=epoch), lambda: self.model.commit(epoch))

    @rule()
    def rollback(self) -> None:
        real, expected = self.same(lambda: self.ctl("rollback"), self.model.rollback)
        if real is not None:
            assert real["dropped_epochs"] == expected

    @rule(rare=st.integers(0, 4))
    def failover(self, rare: int) -> None:
        if not rare:
            self.same(lambda: self.ctl("failover"), self.model.failover)

    @rule()
    def kill_9_and_restart(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.disconnect()
        self.model.crash()
        self.start()

    @invariant()
    def exports_match_model(self) -> None:
        for export in ("replica", "view"):
            got = self.handles[export].pread(SIZE, 0)
            assert got == self.model.read(export, 0, SIZE), export
        status = self.ctl("status")
        assert status["committed"] == self.model.committed_epoch
        assert status["sealed"] == [e for e, _ in self.model.sealed]
        assert status["failed_over"] == self.model.failed_over


ServedDiskMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("HFT_MODEL_EXAMPLES_NBD", "6")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
test_served_disk_against_model = ServedDiskMachine.TestCase
