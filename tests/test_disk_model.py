"""DiskBuffer against the plain model (tests/helpers/disk_model.py): a hypothesis state machine of writes,
view writes, trims, zeroes, seal, commit, rollback, failover and crash+recover, on a real image
file and state directory.  Every step compares both exports byte for byte and the refusal codes."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from tempfile import mkdtemp

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from disk_buffer.buffer import DiskBuffer, DiskBufferError, Export
from disk_buffer.store import REGION_SIZE, WriteBatchError
from tests.helpers.disk_model import DiskModel, ModelError
from tests.helpers.scratch import RAM_DIR

SIZE = REGION_SIZE + (32 << 10)  # the image ends 32 KiB past a region boundary
WINDOW = 64 << 10  # I/O lands in the last 64 KiB, across the boundary
LOW = SIZE - WINDOW
EXPORTS = st.sampled_from([Export.REPLICA, Export.VIEW])


def ranges() -> st.SearchStrategy[tuple[int, int]]:
    aligned = st.tuples(st.integers(LOW // 512, SIZE // 512 - 1), st.integers(1, 24)).map(
        lambda t: (t[0] * 512, min(t[1] * 512, SIZE - t[0] * 512))
    )
    unaligned = st.tuples(st.integers(LOW, SIZE - 1), st.integers(1, 9000)).map(
        lambda t: (t[0], min(t[1], SIZE - t[0]))
    )
    return st.one_of(aligned, unaligned)


def same_outcome(real_call, model_call):  # type: ignore[no-untyped-def]
    """Run both; they must both succeed (returning their results) or both refuse with one code."""
    try:
        expected = model_call()
    except ModelError as exc:
        try:
            real_call()
        except DiskBufferError as real_exc:
            assert real_exc.code == exc.code, (real_exc.code, real_exc.message, exc.code)
            return None, None
        raise AssertionError(f"model refused ({exc.code}) but the buffer accepted") from None
    return real_call(), expected


class DiskBufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(mkdtemp(prefix="hft-model-", dir=RAM_DIR if RAM_DIR.is_dir() else None))
        self.image = self.dir / "img"
        initial = random.Random(1).randbytes(SIZE)
        self.image.write_bytes(initial)
        self.loop = asyncio.new_event_loop()
        self.buf = DiskBuffer.open(self.image, self.dir / "state")
        self.model = DiskModel.from_image(initial)

    def teardown(self) -> None:
        self.buf.close()
        self.loop.close()
        for p in sorted(self.dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        self.dir.rmdir()

    @rule(export=EXPORTS, rng=ranges(), seed=st.integers(0, 1 << 30))
    def write(self, export: Export, rng: tuple[int, int], seed: int) -> None:
        offset, length = rng
        data = random.Random(seed).randbytes(length)
        same_outcome(
            lambda: self.buf.write(export, offset, data), lambda: self.model.write(export, offset, data)
        )

    @rule(
        export=EXPORTS,
        writes=st.lists(
            st.tuples(st.one_of(ranges(), st.just((SIZE - 512, 1024))), st.integers(0, 1 << 30)),
            min_size=1,
            max_size=5,
        ),
    )
    def write_batch(self, export: Export, writes: list[tuple[tuple[int, int], int]]) -> None:
        """The NBD fast path's write_many: the writes before a refused one applied, the refusal at its
        index with the model's code, nothing after it (a range past the end is the refusal drawn)."""
        offsets = [offset for (offset, _), _ in writes]
        payloads = [random.Random(seed).randbytes(length) for (_, length), seed in writes]
        refused: tuple[int, str] | None = None
        for i, (offset, data) in enumerate(zip(offsets, payloads, strict=True)):
            try:
                self.model.write(export, offset, data)
            except ModelError as exc:
                refused = (i, exc.code)
                break
        try:
            self.buf.write_many(export, offsets, payloads)
        except WriteBatchError as exc:
            assert isinstance(exc.cause, DiskBufferError)
            assert refused == (exc.index, exc.cause.code), (refused, exc.index, exc.cause)
        else:
            assert refused is None, f"the model refused write {refused} but the batch went through"

    @rule(export=EXPORTS, rng=ranges(), trim=st.booleans())
    def zero(self, export: Export, rng: tuple[int, int], trim: bool) -> None:
        offset, length = rng
        if trim:
            same_outcome(
                lambda: self.buf.trim(export, offset, length), lambda: self.model.trim(export, offset, length)
            )
        else:
            same_outcome(
                lambda: self.buf.write_zeroes(export, offset, length),
                lambda: self.model.write_zeroes(export, offset, length),
            )

    @rule(export=EXPORTS, offset=st.integers(LOW - 10, SIZE + 10), length=st.integers(0, 5000))
    def read_anywhere(self, export: Export, offset: int, length: int) -> None:
        real, expected = same_outcome(
            lambda: self.buf.read(export, offset, length), lambda: self.model.read(export, offset, length)
        )
        assert real == expected

    @rule()
    def seal(self) -> None:
        real, expected = same_outcome(self.buf.seal, self.model.seal)
        assert real == expected

    @rule(which=st.sampled_from(["oldest", "newest", "current", "committed", "far"]))
    def commit(self, which: str) -> None:
        sealed = [e for e, _ in self.model.sealed]
        epoch = {
            "oldest": sealed[0] if sealed else self.model.current_epoch,
            "newest": sealed[-1] if sealed else self.model.current_epoch,
            "current": self.model.current_epoch,
            "committed": self.model.committed_epoch,
            "far": self.model.current_epoch + 5,
        }[which]
        same_outcome(
            lambda: self.loop.run_until_complete(self.buf.commit(epoch)), lambda: self.model.commit(epoch)
        )

    @rule()
    def rollback(self) -> None:
        real, expected = same_outcome(self.buf.rollback, self.model.rollback)
        if real is not None:
            assert real["dropped_epochs"] == expected

    @rule(rare=st.integers(0, 3))
    def failover(self, rare: int) -> None:
        if rare:  # keep most runs in replication mode, where most of the rules are
            return
        same_outcome(lambda: self.loop.run_until_complete(self.buf.failover()), self.model.failover)

    @rule()
    def crash_and_recover(self) -> None:
        self.buf.simulate_crash()
        self.buf = DiskBuffer.open(self.image, self.dir / "state")
        self.model.crash()

    @rule()
    def settle_writeout(self) -> None:
        deadline = time.monotonic() + 10
        while self.buf.status()["backlog"] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert self.buf.status()["backlog"] == 0

    @invariant()
    def exports_match_model(self) -> None:
        for export in (Export.REPLICA, Export.VIEW):
            assert self.buf.read(export, 0, SIZE) == self.model.read(export, 0, SIZE), export
        status = self.buf.status()
        assert status["committed"] == self.model.committed_epoch
        assert status["epoch"] == self.model.current_epoch
        assert status["sealed"] == [e for e, _ in self.model.sealed]
        assert status["failed_over"] == self.model.failed_over


DiskBufferMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("HFT_MODEL_EXAMPLES", "30")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_disk_buffer_against_model = DiskBufferMachine.TestCase
