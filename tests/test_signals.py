"""The daemon's signal sampler: counters become rates, checkpoint records become ckpt.* signals, the
comparator's real signals map onto the policies' catalogue, and a live sample of this process's CPU."""

from __future__ import annotations

import asyncio
import math
import os

import pytest

from colo_compare.core import Comparator
from controller.signals import (
    CheckpointFigures,
    RateTracker,
    SamplerLinks,
    SignalSampler,
    blockstats_counters,
    checkpoint_signals,
    compare_reading,
    interval_share,
)
from hybridft_common.vocabulary import Mode
from policies.window import ProtectionPoint, SignalRing, is_signal_name
from tests.helpers.frames import stream_frames, tcp_frame


def test_rates_over_the_interval_since_the_previous_sample() -> None:
    rates = RateTracker()
    assert rates.rates(10.0, {"a": 100.0}) == {"a": None}  # first sample: no interval yet
    assert rates.rates(10.5, {"a": 150.0}) == {"a": pytest.approx(100.0)}
    assert rates.rates(11.5, {"a": 150.0}) == {"a": 0.0}
    assert rates.rates(12.0, {"a": 10.0}) == {"a": None}  # a restarted source: never a negative rate
    assert rates.rates(13.0, {"a": 30.0}) == {"a": pytest.approx(20.0)}
    assert rates.rates(14.0, {"a": None, "b": math.nan}) == {"a": None, "b": None}


def test_checkpoint_signals_count_the_interval_and_take_pauses_from_the_window() -> None:
    figures = [
        CheckpointFigures(ended=1.0, reasons={"timer": 1}, pause_s=0.004, ran_before_s=0.05),
        CheckpointFigures(ended=2.1, reasons={"timer": 1}, pause_s=0.006, ran_before_s=0.05, ram_bytes=4096,
                          ram_pages=1),
        CheckpointFigures(ended=2.6, reasons={"compare:payload": 2, "timer": 1}, pause_s=0.010,
                          ran_before_s=0.45, ram_bytes=3 * 4096, ram_pages=3),
    ]  # fmt: skip
    out = checkpoint_signals(figures, since=2.0, now=3.0, pause_window_s=10.0)
    assert out["ckpt.per_s"] == pytest.approx(2.0)
    assert out["ckpt.per_s.timer"] == pytest.approx(2.0)
    assert out["ckpt.per_s.compare:payload"] == pytest.approx(2.0)
    assert out["ckpt.pause_p50_ms"] == pytest.approx(6.0)  # nearest rank over all three in the window
    assert out["ckpt.pause_p99_ms"] == pytest.approx(10.0)
    assert out["ckpt.length_ms"] == pytest.approx(250.0)
    assert out["mem.ram_bytes_per_ckpt"] == pytest.approx(2 * 4096)
    assert out["mem.ram_pages_per_ckpt"] == pytest.approx(2.0)
    quiet = checkpoint_signals(figures, since=3.0, now=4.0, pause_window_s=1.0)
    assert quiet["ckpt.per_s"] == 0.0 and quiet["ckpt.pause_p50_ms"] is None
    assert quiet["mem.ram_bytes_per_ckpt"] is None  # not measured is not zero


def test_blockstats_of_the_guest_drive() -> None:
    reply = [
        {"device": "", "node-name": "other", "stats": {"wr_bytes": 1}},
        {"device": "disk0", "stats": {"wr_bytes": 8192, "wr_operations": 2, "flush_operations": 1}},
    ]
    assert blockstats_counters(reply, "disk0") == {
        "disk.write_bytes_per_s": 8192.0,
        "disk.write_ops_per_s": 2.0,
        "disk.flushes_per_s": 1.0,
    }
    assert blockstats_counters(reply, "absent") == {}


def test_a_real_comparators_signals_become_catalogued_signals() -> None:
    core = Comparator(Mode.COLO)
    data = b"hello, client\n" * 20
    core.feed_primary(stream_frames(data, [100], isn=1000), now=0.0)
    core.feed_secondary(stream_frames(b"HELLO, client\n" * 20, [100], isn=5000), now=0.01)
    reading = compare_reading(core.signals(now=0.02).as_dict())
    for name in (*reading.counters, *reading.levels, *reading.ratios):
        assert is_signal_name(name), name
    assert reading.counters["net.bytes_per_s.from_guest"] > len(data)  # headers included
    assert reading.counters["div.per_s"] == 1.0
    assert reading.counters["div.per_s.payload"] == 1.0
    assert reading.levels["net.held_bytes"] > 0


def test_mc_shadow_divergences_count_as_divergences() -> None:
    core = Comparator(Mode.MC)
    core.feed_primary([tcp_frame(1001, b"primary")], now=0.0)
    core.feed_secondary([tcp_frame(1001, b"another")], now=0.0)
    reading = compare_reading(core.signals(now=0.0).as_dict())
    assert reading.counters["div.per_s"] == 1.0


def test_a_live_sample_of_this_process_fits_a_window_and_is_cheap() -> None:
    figures: list[CheckpointFigures] = []
    sampler = SignalSampler(SamplerLinks(primary_pid=os.getpid(), checkpoints=lambda: figures))
    ring = SignalRing(capacity=64)

    async def run() -> None:
        await sampler.start()
        for i in range(8):
            values = await sampler.sample(now=100.0 + i * 0.25)
            ring.append(100.0 + i * 0.25, values)
            sum(range(200_000))  # some CPU between samples

    asyncio.run(run())
    window = ring.window(ProtectionPoint(Mode.MC, 50, False))
    cpu = window.mean("cpu.primary")
    assert cpu is not None and cpu > 0
    host = window.latest("cpu.host")
    assert host is not None and 0.0 <= host <= 1.0
    assert window.latest("ckpt.per_s") == 0.0
    assert not window.has("net.turns_per_s")  # no comparator wired: absent, not zero
    # the bound: 2 % of one core at 4 Hz = 5 ms of CPU per sample (generous here: psutil only)
    assert sampler.cpu_cost_s / 8 < 0.005


class _ComparatorLink:
    """A real comparator core behind the ``stats`` verb, as the sampler's compare link."""

    def __init__(self, core: Comparator) -> None:
        self.core = core

    async def call(self, verb: str, **args: object) -> dict[str, object]:
        assert verb == "stats" and args == {"signals_only": True}
        return {"signals": self.core.signals(now=0.0).as_dict()}


def test_shadow_coverage_is_the_share_of_the_intervals_sealed_bytes_the_shadow_compared() -> None:
    """div.shadow_coverage: the ratio of the two counters' rates over each interval; absent (None) when
    nothing was sealed shadowed, never a made-up 0 or 1."""
    core = Comparator(Mode.MC)
    sampler = SignalSampler(SamplerLinks(compare=_ComparatorLink(core)))
    data = bytes(range(256)) * 16

    async def sample(now: float) -> float | None:
        return (await sampler.sample(now=now))["div.shadow_coverage"]

    async def run() -> list[float | None]:
        got = [await sample(1.0)]  # first sample: no interval yet
        core.feed_primary(stream_frames(data[:1000], [500], isn=10, fin=False), 1.1)
        core.feed_secondary(stream_frames(data[:250], [250], isn=10, fin=False), 1.1)
        core.commit(core.seal())
        got.append(await sample(1.25))  # 250 of 1000 bytes compared
        got.append(await sample(1.5))  # nothing sealed in the interval
        core.feed_primary([tcp_frame(11 + 1000, data[1000:1600])], 1.6)
        core.feed_secondary([tcp_frame(11 + 1000, data[1000:1600])], 1.6)
        core.commit(core.seal())
        got.append(await sample(1.75))  # the secondary kept up: all 600 compared
        return got

    assert asyncio.run(run()) == [None, 0.25, None, 1.0]
    assert interval_share(None, 5.0) is None and interval_share(1.0, 0.0) is None
    assert interval_share(6.0, 4.0) == 1.0  # counters sampled a hair apart never give more than all


class _PrimaryQmp:
    async def execute(self, command: str, arguments: object = None, **kwargs: object) -> object:
        if command == "query-memory-size-summary":
            return {"base-memory": 256 << 20}
        if command == "query-blockstats":
            return []
        raise AssertionError(command)


def test_the_guests_ram_size_is_read_once_and_sampled_as_mem_guest_bytes() -> None:
    sampler = SignalSampler(SamplerLinks(primary=_PrimaryQmp()))

    async def run() -> dict[str, float | None]:
        await sampler.start()
        return await sampler.sample(now=5.0)

    assert asyncio.run(run())["mem.guest_bytes"] == float(256 << 20)
    # without a primary monitor: absent, not 0
    bare = SignalSampler(SamplerLinks())
    assert "mem.guest_bytes" not in asyncio.run(bare.sample(now=5.0))
