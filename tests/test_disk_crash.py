"""kill -9 crash tests: a forked child drives a real DiskBuffer (image file, journal, threads) through
a random workload and is SIGKILLed -- at a random instant, or by itself at a named fault-injection
point (``HYBRIDFT_DISK_FAULT``).  After each kill the state directory is recovered and ``replica``
and ``view`` must equal, byte for byte, the plain model's image of the last committed epoch (or of
the epoch whose commit was in flight: all of it or none of it).  Some kills hit recovery itself.

A fork (not a fresh interpreter) per iteration keeps hundreds of iterations within seconds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from disk_buffer.buffer import DiskBuffer, Export
from disk_buffer.journal import FAULT_POINTS, Journal
from disk_buffer.store import REGION_SIZE
from tests.helpers.disk_model import DiskModel


@pytest.fixture(autouse=True)
def small_journal_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch journal files every ~128 KiB (forked children inherit it), so kills also land around
    file switches and reuse."""
    monkeypatch.setattr(Journal, "SWITCH_AT", 128 << 10)


SIZE = REGION_SIZE + (128 << 10)  # crosses a region boundary of the extent maps

Op = tuple


def make_ops(rng: random.Random, count: int, min_commits: int = 0) -> list[Op]:
    """Random operations, plus ``min_commits`` seal+commit pairs spread over them."""
    ops = _random_ops(rng, count)
    for i in range(min_commits, 0, -1):
        at = len(ops) * i // (min_commits + 1)
        ops[at:at] = [("seal",), ("commit",)]
    return ops


def _random_ops(rng: random.Random, count: int) -> list[Op]:
    ops: list[Op] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.55:
            export = "replica" if rng.random() < 0.8 else "view"
            low = 0 if rng.random() < 0.3 else SIZE - (256 << 10)  # mostly near the boundary
            if rng.random() < 0.7:
                offset, length = rng.randrange(low // 4096, SIZE // 4096) * 4096, 4096 * rng.randint(1, 4)
            else:
                offset, length = rng.randrange(low, SIZE - 1), rng.randint(1, 20000)
            length = min(length, SIZE - offset)
            ops.append(("write", export, offset, rng.randbytes(length)))
        elif r < 0.62:
            offset = rng.randrange(SIZE - 1)
            ops.append(("zero", "replica", offset, min(rng.randint(1, 70000), SIZE - offset)))
        elif r < 0.80:
            ops.append(("seal",))
        elif r < 0.97:
            ops.append(("commit",))
        else:
            ops.append(("rollback",))
    return ops


def apply_to_model(model: DiskModel, ops: list[Op]) -> list[tuple[int, bytes]]:
    """Run ``ops`` on the model; returns (epoch, committed image) after each commit, in order."""
    commits: list[tuple[int, bytes]] = []
    for op in ops:
        if op[0] == "write":
            model.write(op[1], op[2], op[3])
        elif op[0] == "zero":
            model.write_zeroes(op[1], op[2], op[3])
        elif op[0] == "seal":
            model.seal()
        elif op[0] == "commit":
            if model.sealed:
                epoch = model.sealed[0][0]
                model.commit(epoch)
                commits.append((epoch, bytes(model.committed_image)))
        elif op[0] == "rollback" and model.sealed:
            model.rollback()
    return commits


async def _drive(image: Path, state: Path, ops: list[Op], report: int) -> None:
    buf = DiskBuffer.open(image, state)
    os.write(report, f"R {buf.status()['committed']}\n".encode())
    for op in ops:
        if op[0] == "write":
            buf.write(Export(op[1]), op[2], op[3])
        elif op[0] == "zero":
            buf.write_zeroes(Export(op[1]), op[2], op[3])
        elif op[0] == "seal":
            buf.seal()
        elif op[0] == "commit":
            sealed = buf.status()["sealed"]
            if sealed:
                await buf.commit(sealed[0])
                os.write(report, f"C {sealed[0]}\n".encode())
        elif op[0] == "rollback" and buf.status()["sealed"]:
            buf.rollback()
    await buf.aclose()
    os.write(report, b"D\n")


@dataclass
class ChildResult:
    killed: bool
    recovered: int | None
    commits: list[int]
    done: bool
    elapsed: float  # fork to exit


def run_child(
    image: Path,
    state: Path,
    ops: list[Op],
    *,
    kill_after: float | None = None,
    after_commits: int = 0,
    fault: str | None = None,
) -> ChildResult:
    """Fork a child that runs ``ops`` on a DiskBuffer.  With ``kill_after``, SIGKILL it that many
    seconds after it reported ``after_commits`` returned commits (counted from its own reports, so
    the kill lands mid-run however slow the machine is)."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            if fault:
                os.environ["HYBRIDFT_DISK_FAULT"] = fault
            else:
                os.environ.pop("HYBRIDFT_DISK_FAULT", None)
            asyncio.run(_drive(image, state, ops, write_end))
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    os.close(write_end)
    received = b""
    if kill_after is not None:
        while received.count(b"\nC ") + received.startswith(b"C ") < after_commits:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            received += chunk
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - started
    chunks = [received]
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), f"child failed: {status}"
    recovered = None
    commits = []
    done = False
    for line in b"".join(chunks).decode().splitlines():
        kind, _, value = line.partition(" ")
        if kind == "R":
            recovered = int(value)
        elif kind == "C":
            commits.append(int(value))
        elif kind == "D":
            done = True
    return ChildResult(killed, recovered, commits, done, elapsed)


class CrashHarness:
    """Chains iterations on one image + state dir, tracking the model's committed image."""

    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.image = tmp_path / "img"
        self.state = tmp_path / "state"
        initial = self.rng.randbytes(SIZE)
        self.image.write_bytes(initial)
        self.epoch = 0
        self.committed_image = initial
        self.kills = 0

    def iteration(
        self,
        *,
        kill_after: float | None = None,
        random_kill: bool = False,
        fault: str | None = None,
        recovery_kill: float | None = None,
    ) -> ChildResult:
        ops = make_ops(self.rng, self.rng.randint(10, 40), min_commits=3)
        model = DiskModel.from_image(self.committed_image, self.epoch)
        commits = apply_to_model(model, ops)
        after_commits = 0
        if random_kill:
            # After a random number of returned commits (never the last: work must remain, or an idle
            # fast machine finishes before the kill lands), plus up to 2 ms.
            after_commits = self.rng.randint(0, max(len(commits) - 2, 0))
            kill_after = self.rng.uniform(0, 0.002)
        result = run_child(
            self.image, self.state, ops, kill_after=kill_after, after_commits=after_commits, fault=fault
        )
        self.kills += result.killed
        if result.recovered is not None:
            assert result.recovered == self.epoch, "child recovered a different epoch"
        assert result.commits == [e for e, _ in commits[: len(result.commits)]]
        if recovery_kill is not None:  # kill a recovery midway; the next one must still be right
            run_child(self.image, self.state, [], kill_after=recovery_kill)
        # The epoch whose commit returned is there; the next one may be (it was in flight).
        candidates = dict(commits[max(len(result.commits) - 1, 0) : len(result.commits) + 1])
        if not result.commits:
            candidates[self.epoch] = self.committed_image
        if result.done:
            candidates = {commits[-1][0]: commits[-1][1]} if commits else {self.epoch: self.committed_image}
        self.verify(candidates)
        return result

    def verify(self, candidates: dict[int, bytes]) -> None:
        buf = DiskBuffer.open(self.image, self.state)
        try:
            epoch = buf.status()["committed"]
            assert epoch in candidates, (epoch, sorted(candidates))
            expected = candidates[epoch]
            assert buf.read(Export.REPLICA, 0, SIZE) == expected, f"replica differs from epoch {epoch}"
            assert buf.read(Export.VIEW, 0, SIZE) == expected, (
                "view after recovery is not the committed epoch"
            )
            assert buf.status()["sealed"] == []
        finally:
            buf.close()
        assert self.image.read_bytes() == expected, "recovery did not bring IMG to the committed epoch"
        self.epoch = epoch
        self.committed_image = expected


def test_kill_at_random_instants(crash_dir: Path) -> None:
    harness = CrashHarness(crash_dir, seed=1234)
    iterations = 100
    mid_run = 0
    for i in range(iterations):
        recovery_kill = harness.rng.uniform(0, 0.01) if i % 4 == 0 else None
        result = harness.iteration(random_kill=True, recovery_kill=recovery_kill)
        mid_run += result.killed and bool(result.commits)
    # Kills must land while the child works, both before and after commits returned.
    assert harness.kills >= iterations * 0.7, harness.kills
    assert mid_run >= iterations * 0.3, mid_run
    assert harness.kills - mid_run >= 5, harness.kills - mid_run


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_kill_at_fault_point(crash_dir: Path, point: str) -> None:
    harness = CrashHarness(crash_dir, seed=zlib.crc32(point.encode()))
    iterations = 20
    for _ in range(iterations):
        harness.iteration(fault=f"{point}:{harness.rng.randint(1, 3)}")
    assert harness.kills >= iterations * 0.6, f"{point} reached in only {harness.kills} of {iterations} runs"
    assert harness.epoch > 0


def test_failover_survives_kill(crash_dir: Path) -> None:
    """After failover the state dir says so: a restart serves the merged view as a plain disk."""
    rng = random.Random(7)
    image = crash_dir / "img"
    initial = rng.randbytes(SIZE)
    image.write_bytes(initial)
    model = DiskModel.from_image(initial)
    ops = make_ops(rng, 60)
    apply_to_model(model, ops)

    async def drive_and_fail_over(report: int) -> None:
        buf = DiskBuffer.open(image, crash_dir / "state")
        for op in ops:
            if op[0] == "write":
                buf.write(Export(op[1]), op[2], op[3])
            elif op[0] == "zero":
                buf.write_zeroes(Export(op[1]), op[2], op[3])
            elif op[0] == "seal":
                buf.seal()
            elif op[0] == "commit" and buf.status()["sealed"]:
                await buf.commit(buf.status()["sealed"][0])
            elif op[0] == "rollback" and buf.status()["sealed"]:
                buf.rollback()
        if buf.status()["sealed"]:
            buf.rollback()
        await buf.failover()
        buf.write(Export.VIEW, 4096, b"after failover")
        os.write(report, b"F\n")
        time.sleep(60)  # killed here

    if model.sealed:
        model.rollback()
    model.failover()
    model.write("view", 4096, b"after failover")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            asyncio.run(drive_and_fail_over(write_end))
        finally:
            os._exit(3)
    assert os.read(read_end, 2) == b"F\n"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_end)
    os.close(write_end)
    buf = DiskBuffer.open(image, crash_dir / "state")
    try:
        assert buf.status()["failed_over"]
        assert buf.read(Export.VIEW, 0, SIZE) == bytes(model.view)
        buf.write(Export.VIEW, 0, b"plain disk")
        buf.flush(Export.VIEW)
    finally:
        buf.close()
    assert image.read_bytes()[:10] == b"plain disk"
