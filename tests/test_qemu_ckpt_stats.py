"""Patch 0006 on a real COLO pair under TCG: per-checkpoint RAM figures, idle and with memdirty.

What must hold, checkpoint by checkpoint:

- the primary emits exactly one ``X_COLO_CHECKPOINT_DONE`` per checkpoint, numbered 1, 2, ... with RAM pages
  > 0 (an idle Linux still dirties some), at least a page's bytes per non-zero page, a device state, and a
  pause that agrees with QEMU's own ``STOP``/``RESUME`` event timestamps; the secondary emits one
  ``X_COLO_CHECKPOINT_LOADED`` with the same number and device state size, having flushed at least the pages
  the primary sent (it flushes those plus the ones it dirtied itself);
- with the guest's ``memdirty`` at 32 MiB/s the pages per checkpoint are far above idle, and the pages per
  second of run (the idle rate subtracted) match the rate memdirty itself reports in the guest, within
  20 % (memdirty writes off stalls longer than 100 ms, and its own report counts them);
- ``x-query-colo-checkpoint-stats`` returns the last checkpoint and the sums of all the events.

The figures are printed (``-s``) for the record.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mc_driver.accel import QemuChoice, choose_qemu
from mc_driver.ckpt_stats import (
    DONE_EVENT,
    GUEST_PAGE_BYTES,
    LOADED_EVENT,
    QUERY_COMMAND,
    CheckpointStats,
    CheckpointStatsTotals,
    SecondaryCheckpointStats,
)
from mc_driver.guest.control import GuestControl
from mc_driver.guest.image import GuestImage, build_guest
from mc_driver.guest.qemu_args import guest_cmdline
from mc_driver.netns import NetNamespace
from mc_driver.qemu_pair import ColoPair, ColoPairConfig

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

INTERVAL_S = 0.5
IDLE_CHECKPOINTS = 12
DIRTY_CHECKPOINTS = 12
DIRTY_MIB_S = 32
WORKING_SET_MIB = 64  # 16384 pages: a 0.5 s interval dirties 4096 distinct ones, far from wrapping round
MEMDIRTY_REPORT = re.compile(r"memdirty: pages=\d+ mib_per_s=([0-9.]+)")


@dataclass(frozen=True, slots=True)
class Observed:
    """One checkpoint as both sides reported it, and its pause from QEMU's STOP/RESUME event timestamps."""

    primary: CheckpointStats
    secondary: SecondaryCheckpointStats
    event_pause_s: float


@pytest.fixture(scope="module")
def tcg_qemu() -> QemuChoice:
    return choose_qemu(build=True, force_accel="tcg")


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_guest()


async def _checkpoints(pair: ColoPair, count: int) -> list[Observed]:
    primary, secondary = pair.sessions()
    seen = []
    for _ in range(count):
        await asyncio.sleep(INTERVAL_S)
        cp = await pair.checkpoint()
        done = await primary.wait_event(DONE_EVENT, timeout=10)
        loaded = await secondary.wait_event(LOADED_EVENT, timeout=10)
        assert cp.primary.seconds is not None
        seen.append(
            Observed(
                CheckpointStats.from_event(done.name, done.data, done.timestamp),
                SecondaryCheckpointStats.from_event(loaded.name, loaded.data, loaded.timestamp),
                cp.primary.seconds,
            )
        )
    return seen


def _memdirty_rates(log: str) -> list[float]:
    return [float(m.group(1)) for m in MEMDIRTY_REPORT.finditer(log)]


@pytest.mark.timeout(600)
def test_checkpoint_figures_idle_and_with_memdirty(
    tmp_path: Path, image: GuestImage, tcg_qemu: QemuChoice
) -> None:
    async def run() -> tuple[list[Observed], Observed, list[Observed], list[float], Any, list[str]]:
        config = ColoPairConfig(
            workdir=tmp_path, image=image, qemu=tcg_qemu, compare="none",
            cmdline=guest_cmdline(services=[]), primary_tap="k6p0", secondary_tap="k6s0",
        )  # fmt: skip
        with NetNamespace() as netns:
            async with await ColoPair.start(config, netns) as pair:
                primary, secondary = pair.sessions()
                await asyncio.sleep(2.0)  # boot services settle; no checkpoint fires on its own
                idle = await _checkpoints(pair, IDLE_CHECKPOINTS)
                control = f"unix:{pair.paths.control('primary')}"

                def start_memdirty() -> int:
                    with GuestControl(control, timeout=30) as ctl:
                        return ctl.run("memdirty", str(DIRTY_MIB_S), str(WORKING_SET_MIB), "1")

                pid = await asyncio.to_thread(start_memdirty)
                await asyncio.sleep(3.0)  # fault in the working set, reach the steady rate
                (warm_up,) = await _checkpoints(pair, 1)  # covers the start-up: not measured
                dirty = await _checkpoints(pair, DIRTY_CHECKPOINTS)

                def memdirty_log() -> str:
                    with GuestControl(control, timeout=30) as ctl:
                        return ctl.sh("cat", f"/tmp/memdirty.{pid}.log").text

                log = await asyncio.to_thread(memdirty_log)
                totals = await primary.execute(QUERY_COMMAND)
                extra = [e.name for s in (primary, secondary) for e in s.pending([DONE_EVENT, LOADED_EVENT])]
                # the memdirty reports cover the measured phase: the last ones, one a second
                measured_s = DIRTY_CHECKPOINTS * INTERVAL_S
                rates = _memdirty_rates(log)[-int(measured_s) :]
                return idle, warm_up, dirty, rates, totals, extra

    idle, warm_up, dirty, rates, totals_reply, extra = asyncio.run(run())
    everything = [*idle, warm_up, *dirty]

    # one event per checkpoint on each side, numbered from 1, nothing extra
    assert [o.primary.checkpoint for o in everything] == list(range(1, len(everything) + 1))
    assert [o.secondary.checkpoint for o in everything] == list(range(1, len(everything) + 1))
    assert extra == []
    for o in everything:
        p, s = o.primary, o.secondary
        assert p.ram_pages > 0, p
        assert p.ram_bytes >= (p.ram_pages - p.ram_zero_pages) * GUEST_PAGE_BYTES, p
        assert p.device_bytes > 0 and s.device_bytes == p.device_bytes, (p, s)
        assert s.flushed_pages >= p.ram_pages, (p, s)  # the secondary flushes the union of both sides
        assert p.ram_save_us <= p.pause_us and s.pause_us > 0
        # QEMU's own pause vs its STOP/RESUME event timestamps: the patch starts the clock just before
        # vm_stop and reads it just after vm_start(), the events fall in between (STOP after the vCPUs
        # paused, which a busy host can delay by a scheduling slice); 1 ms for wall vs monotonic clock
        assert -0.001 <= p.pause_s - o.event_pause_s <= 0.05, (p, o.event_pause_s)
        assert p.run_us >= INTERVAL_S * 1e6 * 0.9, p  # the run covers at least the sleep between them

    # typically by about a millisecond (pausing the vCPUs); a pause measured over the wrong span (the
    # request/reply round trips, the wait for the next checkpoint) would be off by far more
    pause_excess_s = statistics.median(o.primary.pause_s - o.event_pause_s for o in everything)
    assert pause_excess_s <= 0.005, pause_excess_s

    # the query agrees with the events
    totals = CheckpointStatsTotals.from_reply(totals_reply)
    assert totals.checkpoints == len(everything)
    assert totals.last is not None and totals.last.checkpoint == everything[-1].primary.checkpoint
    assert totals.last.ram_pages == everything[-1].primary.ram_pages
    assert totals.ram_pages == sum(o.primary.ram_pages for o in everything)
    assert totals.ram_bytes == sum(o.primary.ram_bytes for o in everything)
    assert totals.device_bytes == sum(o.primary.device_bytes for o in everything)
    assert totals.pause_us == sum(o.primary.pause_us for o in everything)

    # idle vs memdirty, and memdirty's own rate x the run time
    idle_pages = statistics.median(o.primary.ram_pages for o in idle)
    idle_per_s = statistics.median(o.primary.ram_pages / (o.primary.run_us / 1e6) for o in idle)
    dirty_pages = statistics.median(o.primary.ram_pages for o in dirty)
    assert rates, "memdirty reported no rate"
    guest_pages_per_s = statistics.median(rates) * (1 << 20) / GUEST_PAGE_BYTES
    measured_per_s = [(o.primary.ram_pages / (o.primary.run_us / 1e6)) - idle_per_s for o in dirty]
    consistency = statistics.median(measured_per_s) / guest_pages_per_s
    record = {
        "interval_s": INTERVAL_S,
        "idle": _summary(idle),
        "memdirty": _summary(dirty),
        "memdirty_reported_mib_s": rates,
        "memdirty_expected_pages_per_checkpoint": round(guest_pages_per_s * INTERVAL_S),
        "measured_over_reported_rate": round(consistency, 3),
        "warm_up_pages": warm_up.primary.ram_pages,
        "pause_minus_event_pause_ms_p50": round(pause_excess_s * 1000, 2),
    }
    print(f"checkpoint figures: {json.dumps(record)}")
    assert dirty_pages >= 10 * idle_pages, record
    assert 0.8 <= consistency <= 1.2, record


def _summary(observed: list[Observed]) -> dict[str, float]:
    def p50(values: list[float]) -> float:
        return round(statistics.median(values), 1)

    return {
        "n": len(observed),
        "ram_pages_p50": p50([o.primary.ram_pages for o in observed]),
        "ram_zero_pages_p50": p50([o.primary.ram_zero_pages for o in observed]),
        "ram_mib_p50": round(statistics.median(o.primary.ram_bytes for o in observed) / (1 << 20), 2),
        "device_kib_p50": round(statistics.median(o.primary.device_bytes for o in observed) / 1024, 1),
        "flushed_pages_p50": p50([o.secondary.flushed_pages for o in observed]),
        "run_ms_p50": p50([o.primary.run_us / 1000 for o in observed]),
        "pause_ms_p50": p50([o.primary.pause_us / 1000 for o in observed]),
        "event_pause_ms_p50": p50([o.event_pause_s * 1000 for o in observed]),
        "ram_save_ms_p50": p50([o.primary.ram_save_us / 1000 for o in observed]),
        "secondary_pause_ms_p50": p50([o.secondary.pause_us / 1000 for o in observed]),
    }
