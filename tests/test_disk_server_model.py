"""The whole stack against the plain model (tests/disk_model.py): a hypothesis state machine that
drives a real ``hybridft disk serve`` process with libnbd (writes, view writes, trims, zeroes) and
its control socket (seal, commit, rollback, failover), kills it with SIGKILL and restarts it
(crash + recover), and after every step compares both exports byte for byte with the model.
Refusals must match: the model's error codes for control verbs, NBD errors for I/O.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import nbd as libnbd
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from controller.control import ControlError, call
from disk_buffer import nbd
from tests.disk_model import DiskModel, ModelError
from tests.test_disk_ctl import DiskServerProcess

pytestmark = pytest.mark.slow

SIZE = 256 << 10
EXPORTS = st.sampled_from(["replica", "view"])
RANGES = st.tuples(st.integers(0, SIZE // 512 - 1), st.integers(1, 16)).map(
    lambda t: (t[0] * 512, min(t[1] * 512, SIZE - t[0] * 512))
)


class ServerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # short path: unix socket names are limited to 107 bytes
        self.directory = Path(tempfile.mkdtemp(prefix="hbm-", dir="/tmp"))
        self.server = DiskServerProcess(self.directory, size=SIZE)
        self.model = DiskModel.from_image(bytes(SIZE))
        self.handles: dict[str, Any] = {}
        self._connect()

    def _connect(self) -> None:
        self.handles = {export: self.server.connect(export) for export in ("replica", "view")}

    def _verb(self, verb: str, model_call: Any, **args: Any) -> Any:
        try:
            expected = model_call()
        except ModelError as exc:
            try:
                call(self.server.control, verb, **args)
            except ControlError as refused:
                assert refused.code == exc.code, (verb, args, refused.message)
                return None
            raise AssertionError(f"{verb} {args} succeeded; the model refuses it ({exc.code})") from None
        return expected, call(self.server.control, verb, **args)

    @rule(export=EXPORTS, where=RANGES, byte=st.integers(1, 255))
    def write(self, export: str, where: tuple[int, int], byte: int) -> None:
        offset, length = where
        data = bytes([byte]) * length
        try:
            self.model.write(export, offset, data)
        except ModelError as exc:
            assert exc.code == "wrong-state"
            try:
                self.handles[export].pwrite(data, offset)
            except libnbd.Error as refused:
                assert refused.errnum == nbd.EPERM
                return
            raise AssertionError("write to replica after failover succeeded") from None
        self.handles[export].pwrite(data, offset)

    @rule(export=EXPORTS, where=RANGES, trim=st.booleans())
    def zero(self, export: str, where: tuple[int, int], trim: bool) -> None:
        offset, length = where
        handle = self.handles[export]
        try:
            self.model.write_zeroes(export, offset, length)
        except ModelError:
            try:
                handle.trim(length, offset) if trim else handle.zero(length, offset)
            except libnbd.Error as refused:
                assert refused.errnum == nbd.EPERM
                return
            raise AssertionError("zeroing replica after failover succeeded") from None
        handle.trim(length, offset) if trim else handle.zero(length, offset)

    @rule()
    def seal(self) -> None:
        result = self._verb("seal", self.model.seal)
        if result is not None:
            expected, got = result
            assert got["epoch"] == expected

    @rule(delta=st.integers(-1, 2))
    def commit(self, delta: int) -> None:
        sealed = [e for e, _ in self.model.sealed]
        epoch = (sealed[0] if sealed else self.model.current_epoch) + delta
        self._verb("commit", lambda: self.model.commit(epoch), epoch=epoch)

    @rule()
    def rollback(self) -> None:
        self._verb("rollback", self.model.rollback)

    @precondition(lambda self: not self.model.failed_over)
    @rule()
    def failover(self) -> None:
        self._verb("failover", self.model.failover)

    @rule()
    def crash_and_recover(self) -> None:
        self.handles.clear()  # libnbd closes a handle when it is collected
        self.server.stop(signal.SIGKILL)
        self.model.crash()
        self.server.start()
        self._connect()

    @invariant()
    def exports_match_the_model(self) -> None:
        for export in ("replica", "view"):
            assert self.handles[export].pread(SIZE, 0) == self.model.read(export, 0, SIZE), export

    def teardown(self) -> None:
        try:
            self.handles.clear()
        finally:
            self.server.stop(signal.SIGKILL)  # never leak a server process, whatever failed
            shutil.rmtree(self.directory, ignore_errors=True)


ServerMachine.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestServerAgainstModel = ServerMachine.TestCase
