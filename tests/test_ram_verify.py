"""The RAM check of a running pair (``hybridft verify``) without QEMU: the chunk planning and run
grouping of :mod:`mc_driver.ram_compare`, its pmemsave loop against fake QEMUs whose "guest memory"
is a byte array, run_checkpoint's held checkpoint (patch 0007) against the recording peers of
tests/test_epoch_protocol.py, the agent's reading of a held secondary, and the daemon's refusals.

The real-pair proof (both modes, after a failover and re-protection) is tests/test_reprotect_qemu.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from controller.agent import FailoverDecider
from controller.daemon import Daemon
from controller.daemon_config import DaemonConfig
from controller.epoch import CheckpointError, Recovery, Step, run_checkpoint
from controller.heartbeat import Heartbeat
from controller.pair_state import PairState
from controller.verify_cli import format_verify, verify_command
from hybridft_common.control import ControlError
from hybridft_common.vocabulary import HELD_EVENT, HOLD_HOOK_COMMAND, StopVia
from mc_driver.ram_compare import (
    PAGE_SIZE,
    RUNS_KEPT,
    Chunk,
    DiffRun,
    Mapping,
    RamCompareError,
    RamComparison,
    compare_held_ram,
    parse_flat_memory,
    plan_chunks,
    runs_in_chunk,
)
from tests.test_epoch_protocol import FakeEvent, RecordingQmp, _links, mc50

# `info mtree -f` of a booted 256 MiB guest (the pc machine, BIOS shadow RAM enabled), I/O view cut
MTREE = """\
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000c9fff (prio 1, rom): pc.rom
  00000000000ca000-00000000000effff (prio 0, ram): pc.ram @00000000000ca000
  00000000000f0000-00000000000fffff (prio 0, rom): pc.bios @0000000000030000
  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
"""
MIB = 1 << 20


# ------------------------------------------------------------------------------ planning, grouping
def test_only_ram_ranges_are_planned_in_page_aligned_chunks_with_their_block_offsets() -> None:
    mappings = parse_flat_memory(MTREE)
    assert [m.kind for m in mappings].count("ram") == 3
    chunks = plan_chunks(mappings, 64 * MIB)
    # ROM and I/O are never read (pmemsave of an I/O range would read device registers)
    assert chunks[0] == Chunk(0, 0xA0000, "pc.ram", 0)
    assert chunks[1] == Chunk(0xCA000, 0xF0000 - 0xCA000, "pc.ram", 0xCA000)
    big = chunks[2:]
    assert [c.size for c in big] == [64 * MIB, 64 * MIB, 64 * MIB, 64 * MIB - MIB]
    assert [c.gpa for c in big] == [MIB + i * 64 * MIB for i in range(4)]
    assert all(c.gpa == c.offset for c in big)  # pc.ram is mapped at its own offset above 1 MiB
    assert sum(c.size for c in chunks) == 0xA0000 + (0xF0000 - 0xCA000) + 255 * MIB


def test_planning_refuses_what_pmemsave_could_not_compare_page_by_page() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        plan_chunks([], 1000)
    with pytest.raises(RamCompareError, match="not page-aligned"):
        plan_chunks([Mapping(0x800, 0x1FFF, "ram", "pc.ram", 0)])


def test_differing_pages_become_runs_with_block_offset_and_guest_address() -> None:
    chunk = Chunk(gpa=0x200000, size=64 * PAGE_SIZE, block="pc.ram", offset=0x200000)
    runs = runs_in_chunk(chunk, np.array([0, 1, 2, 10, 63]))
    assert runs == [
        DiffRun("pc.ram", 0x200000, 3, 0x200000),
        DiffRun("pc.ram", 0x200000 + 10 * PAGE_SIZE, 1, 0x200000 + 10 * PAGE_SIZE),
        DiffRun("pc.ram", 0x200000 + 63 * PAGE_SIZE, 1, 0x200000 + 63 * PAGE_SIZE),
    ]
    assert runs_in_chunk(chunk, np.zeros(0, dtype=np.int64)) == []


def test_a_comparison_counts_every_differing_page_but_keeps_the_first_runs_only() -> None:
    result = RamComparison()
    chunk = Chunk(0, 4 * RUNS_KEPT * PAGE_SIZE, "pc.ram", 0)
    result.add(chunk, np.arange(0, 4 * RUNS_KEPT, 2))  # every other page: 2 * RUNS_KEPT runs
    assert not result.identical and result.differing_pages == 2 * RUNS_KEPT
    assert len(result.runs) == RUNS_KEPT and result.pages == 4 * RUNS_KEPT
    data = result.as_dict()
    assert data["identical"] is False and data["runs"][0] == {
        "block": "pc.ram",
        "offset": 0,
        "pages": 1,
        "gpa": 0,
    }
    json.dumps(data)  # the verb's reply is JSON


# ------------------------------------------------------------------------------ the pmemsave loop
class FakeRamQmp:
    """A stopped QEMU: ``info mtree -f`` and ``pmemsave`` over a byte array as guest-physical memory."""

    def __init__(self, memory: bytearray, mtree: str = MTREE) -> None:
        self.memory, self.mtree = memory, mtree
        self.saves: list[tuple[int, int]] = []
        self.short = False  # write less than asked (a full disk)

    async def hmp(self, command_line: str) -> str:
        assert command_line == "info mtree -f"
        return self.mtree

    async def execute(self, command: str, arguments: Any = None, **kwargs: Any) -> Any:
        assert command == "pmemsave", command
        gpa, size = arguments["val"], arguments["size"]
        self.saves.append((gpa, size))
        data = bytes(self.memory[gpa : gpa + size])
        Path(arguments["filename"]).write_bytes(data[: size // 2] if self.short else data)
        return {}


def guest_memory() -> bytearray:
    rng = np.random.default_rng(7)
    return bytearray(rng.integers(0, 256, 256 * MIB, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def memory() -> bytearray:
    return guest_memory()


def test_identical_memory_is_identical_and_every_ram_byte_was_compared(
    memory: bytearray, tmp_path: Path
) -> None:
    primary, secondary = FakeRamQmp(memory), FakeRamQmp(bytearray(memory))
    result = asyncio.run(compare_held_ram(primary, secondary, chunk_bytes=32 * MIB, scratch=tmp_path))
    assert result.identical and result.differing_pages == 0 and result.ranges == 3
    ram = 0xA0000 + (0xF0000 - 0xCA000) + 255 * MIB
    assert result.pages == ram // PAGE_SIZE
    assert primary.saves == secondary.saves and max(size for _, size in primary.saves) == 32 * MIB
    assert list(tmp_path.iterdir()) == []  # the scratch copies are gone


def test_a_page_that_differs_is_found_where_the_guest_sees_it(memory: bytearray, tmp_path: Path) -> None:
    other = bytearray(memory)
    where = 0x5A3C000 + 100  # one byte in one page, in the third 32 MiB chunk of the big range
    other[where] ^= 0xFF
    other[0xCB000 : 0xCB000 + 2 * PAGE_SIZE] = bytes(2 * PAGE_SIZE)  # two pages of shadow RAM, zeroed
    other[0xC1000] ^= 1  # ROM is not compared
    result = asyncio.run(
        compare_held_ram(FakeRamQmp(memory), FakeRamQmp(other), chunk_bytes=32 * MIB, scratch=tmp_path)
    )
    assert not result.identical and result.differing_pages == 3
    assert result.runs == [DiffRun("pc.ram", 0xCB000, 2, 0xCB000), DiffRun("pc.ram", 0x5A3C000, 1, 0x5A3C000)]


def test_different_memory_maps_or_a_short_copy_are_errors_not_results(
    memory: bytearray, tmp_path: Path
) -> None:
    smaller = MTREE.replace("000000000fffffff (prio 0, ram)", "0000000007ffffff (prio 0, ram)")
    with pytest.raises(RamCompareError, match="memory maps differ"):
        asyncio.run(compare_held_ram(FakeRamQmp(memory), FakeRamQmp(memory, smaller), scratch=tmp_path))
    with pytest.raises(RamCompareError, match="no RAM"):
        asyncio.run(compare_held_ram(FakeRamQmp(memory, ""), FakeRamQmp(memory, ""), scratch=tmp_path))
    short = FakeRamQmp(memory)
    short.short = True
    with pytest.raises(RamCompareError, match="incomplete"):
        asyncio.run(compare_held_ram(FakeRamQmp(memory), short, scratch=tmp_path))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the held checkpoint
class HoldingQmp(RecordingQmp):
    """A recording peer with patch 0007: armed, its next checkpoint ends held (HELD, no RESUME) until cont."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False

    async def execute(self, command: str, arguments: Any = None, **kwargs: Any) -> Any:
        if command == HOLD_HOOK_COMMAND:
            enable = (arguments or {}).get("enable", True)
            self.log.append(f"{self.name}:hold" if enable else f"{self.name}:hold-off")
            self.armed = enable
            return {}
        if command == "cont":
            self.log.append(f"{self.name}:cont")
            if not self.running:
                self.running = True
                self.queue.append(FakeEvent("RESUME", self.clock + 0.5))
            return {}
        return await super().execute(command, arguments, **kwargs)

    def peer_resume(self) -> None:
        if any(side.fail_on == "exit" for side in self.peers):
            self.queue.append(FakeEvent("COLO_EXIT", self.clock, {"mode": "primary", "reason": "error"}))
            return
        for side in reversed(self.peers):  # the secondary holds before it tells the primary
            if side.armed:
                side.armed = False
                side.queue.append(FakeEvent(HELD_EVENT, side.clock + 0.05))
            else:
                side.running = True
                side.queue.append(FakeEvent("RESUME", side.clock + 0.05))


def held_links(log: list[str], *, fail: dict[str, str] | None = None) -> tuple[Any, list[Heartbeat]]:
    links, beats = _links(log, fail=fail)
    primary = HoldingQmp("primary", log, (fail or {}).get("primary"))
    secondary = HoldingQmp("secondary", log, (fail or {}).get("secondary"))
    primary.peers = [primary, secondary]  # type: ignore[attr-defined]
    secondary.peers = []  # type: ignore[attr-defined]
    secondary.primary = primary  # type: ignore[attr-defined]
    links.primary, links.secondary = primary, secondary
    return links, beats


@pytest.mark.parametrize("stop_via", list(StopVia))
def test_a_held_checkpoint_is_inspected_with_both_stopped_then_resumed_and_committed(
    stop_via: StopVia,
) -> None:
    log: list[str] = []
    links, beats = held_links(log)
    seen: list[tuple[bool, bool]] = []

    async def inspect() -> None:
        log.append("inspect")
        seen.append((links.primary.running, links.secondary.running))

    links.hold = inspect
    record = asyncio.run(run_checkpoint(links, mc50(stop_via), {"verify": 1}))
    # armed before anything of the checkpoint: no checkpoint can complete between the two requests
    assert sorted(log[:2]) == ["primary:hold", "secondary:hold"]
    after = log[log.index(f"primary:{HELD_EVENT}") :]
    assert after == [
        f"primary:{HELD_EVENT}",
        f"secondary:{HELD_EVENT}",
        "heartbeat:loaded",  # the secondary holds N: the agent must commit N if the primary dies now
        "inspect",
        "secondary:cont",
        "primary:cont",
        "primary:RESUME",
        "secondary:RESUME",
        "disk:commit 101",
        "compare:commit 1",
        "heartbeat:committed",
    ]
    assert seen == [(False, False)]
    assert [b.state for b in beats] == ["sealed", "loaded", "committed"]
    assert record.outcome == "committed"
    # the pause the guest saw includes the inspection: STOP .. the RESUME after cont
    assert record.primary_pause is not None and record.primary_pause >= 0.5
    steps = [name for name, _ in record.steps]
    assert steps[0] == str(Step.HOLD_ARM) and str(Step.HOLD_INSPECT) in steps


def test_a_checkpoint_without_a_hold_never_arms_one() -> None:
    log: list[str] = []
    links, _ = held_links(log)
    asyncio.run(run_checkpoint(links, mc50(StopVia.QEMU), {"timer": 1}))
    assert not [entry for entry in log if "hold" in entry or "cont" in entry or HELD_EVENT in entry]


def test_an_inspection_that_raises_still_resumes_both_and_keeps_the_loaded_epoch() -> None:
    log: list[str] = []
    links, _ = held_links(log)

    async def broken() -> None:
        raise RuntimeError("inspector crashed")

    links.hold = broken
    protocol = mc50()
    with pytest.raises(CheckpointError) as failure:
        asyncio.run(run_checkpoint(links, protocol, {"verify": 1}))
    assert failure.value.step is Step.HOLD_INSPECT
    assert failure.value.recovery is Recovery.COMMIT  # the secondary loaded N: N is committed
    assert log.index("secondary:cont") < log.index("primary:cont")
    assert links.primary.running and links.secondary.running
    assert "disk:commit 101" in log and "disk:rollback" not in log


def test_a_checkpoint_failing_before_the_hold_withdraws_it_on_both_sides() -> None:
    log: list[str] = []
    links, _ = held_links(log, fail={"compare": "seal"})
    links.hold = lambda: asyncio.sleep(0)
    with pytest.raises(CheckpointError) as failure:
        asyncio.run(run_checkpoint(links, mc50(StopVia.QEMU), {"verify": 1}))
    assert failure.value.step is Step.COMPARE_SEAL and failure.value.recovery is Recovery.ROLLBACK
    assert "secondary:hold-off" in log and "primary:hold-off" in log
    assert not links.primary.armed and not links.secondary.armed  # no later checkpoint holds


def test_a_primary_lost_while_held_leaves_the_held_secondary_to_the_agent() -> None:
    log: list[str] = []
    links, _ = held_links(log)
    alive = {"primary": True}
    links.primary_alive = lambda: alive["primary"]

    async def primary_dies() -> None:
        alive["primary"] = False

    links.hold = primary_dies
    with pytest.raises(CheckpointError):
        asyncio.run(run_checkpoint(links, mc50(), {"verify": 1}))
    # the agent fails over from what the secondary holds and resumes it after the disk steps; a cont
    # from the daemon could let it write while the agent changes its disk
    assert "secondary:cont" not in log


def test_the_agent_counts_a_held_secondary_as_having_loaded_the_epoch() -> None:
    decider = FailoverDecider()
    decider.message(Heartbeat(10.0, 7, "sealed"), 10.0)
    assert not decider.loaded(7)
    decider.secondary_event(HELD_EVENT, 10.5)
    assert decider.loaded(7)


# ------------------------------------------------------------------------------ the daemon's verb
def test_the_verb_refuses_a_pair_it_cannot_verify_with_the_reason() -> None:
    daemon = Daemon(DaemonConfig(primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control="unix:/x"))

    async def ask(args: dict[str, Any]) -> ControlError:
        with pytest.raises(ControlError) as refused:
            await daemon.dispatch("verify", args)
        return refused.value

    assert asyncio.run(ask({})).code == "not-protected"
    daemon.state = PairState.PROTECTED
    missing = asyncio.run(ask({}))
    assert missing.code == "no-hold-hook" and "patch 0007" in missing.message
    assert asyncio.run(ask({"timeout": -1})).code == "bad-args"
    daemon.hold_hook = True
    late = asyncio.run(ask({"timeout": 0.05}))  # no epoch loop runs: nothing answers in time
    assert late.code == "timeout" and daemon._verify_waiters == []
    assert daemon.scheduler.pending["verify"] == 1  # it asked the epoch protocol for a checkpoint


def test_the_command_prints_the_verdict_and_exits_1_on_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    reply = {"epoch": 12, "mode": "colo", "stop_via": "qemu", "identical": False, "pages": 65483,
             "differing_pages": 2, "ranges": 4, "seconds": 0.3, "mib": 255.8,
             "runs": [{"block": "pc.ram", "offset": 0x1A3C000, "pages": 2, "gpa": 0x1A3C000}]}  # fmt: skip
    monkeypatch.setattr("controller.verify_cli.request", lambda *a, **k: reply)
    result = CliRunner().invoke(verify_command, ["--control", "unix:/nowhere"])
    assert result.exit_code == 1
    assert "2 of 65483 pages differ" in result.output and "pc.ram +0x1a3c000 (GPA 0x1a3c000)" in result.output
    reply.update(identical=True, differing_pages=0, runs=[])
    result = CliRunner().invoke(verify_command, ["--control", "unix:/nowhere", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["identical"] is True
    assert "IDENTICAL" in format_verify(reply)


def test_the_held_checkpoint_answers_every_waiting_verify_with_one_comparison(memory: bytearray) -> None:
    daemon = Daemon(DaemonConfig(primary_qmp="/nonexistent", secondary_qmp="/nonexistent", control="unix:/x"))
    other = bytearray(memory)
    other[0x300000] ^= 1
    daemon.attach(FakeRamQmp(memory), FakeRamQmp(other))  # type: ignore[arg-type]

    async def held() -> list[Any]:
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future(), loop.create_future()]
        await daemon._held_ram_check(waiters)()
        return [w.result() for w in waiters]

    first, second = asyncio.run(held())
    assert first == second and first["mode"] == "mc" and first["stop_via"] == "qmp"
    assert first["identical"] is False and first["runs"] == [
        {"block": "pc.ram", "offset": 0x300000, "pages": 1, "gpa": 0x300000}
    ]

    async def broken() -> BaseException | None:
        daemon.attach(FakeRamQmp(memory), FakeRamQmp(memory, ""))  # type: ignore[arg-type]
        waiter = asyncio.get_running_loop().create_future()
        await daemon._held_ram_check([waiter])()  # the checkpoint goes on: the verify gets the error
        return waiter.exception()

    error = asyncio.run(broken())
    assert isinstance(error, ControlError) and error.code == "verify-failed"
    assert "memory maps" in error.message
