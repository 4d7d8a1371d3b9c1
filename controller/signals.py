"""The daemon's signal sampler: every period, one sample of every source, as policies read them.

Why this shape.  A policy sees a :class:`policies.window.Window` -- rates and levels per sample time,
named as in ``policies.window.SIGNALS``.  The sources are cumulative counters in other processes (QEMU's
block statistics, the comparator's counters, the kernel's CPU times), levels (the disk buffer's bytes) and
the daemon's own checkpoint records.  So the work splits in two:

* pure pieces, unit-tested without any process: :class:`RateTracker` turns cumulative counters into
  per-second rates over the interval since the previous sample (a counter that went backwards -- a
  restarted service -- gives no rate for that interval, never a negative one), and
  :func:`checkpoint_signals` turns the epoch records of an interval into the ``ckpt.*`` signals;
* :class:`SignalSampler`, the thin I/O shell: it reads each source with a short timeout, concurrently,
  and a source that fails or is not wired simply leaves its signals out of that sample (a policy sees
  them as NaN or absent, never as a made-up 0).

Cost.  The issue's bound is 2 % of one core at 4 Hz, i.e. 5 ms of daemon CPU per sample.  psutil reads
/proc (two processes, their vCPU threads, the host); the control calls are one small JSON round trip
each; QMP ``query-blockstats`` is one round trip.  ``hybridft bench sampler`` measures it.

Memory dirtying.  With the patched QEMU (patch 0006) each checkpoint reports the RAM pages and bytes it
sent (``X_COLO_CHECKPOINT_DONE``); the daemon puts them on the epoch record and
:func:`checkpoint_signals` averages them per checkpoint.  Stock QEMU has no such figures during COLO; there
``calc-dirty-rate`` (page sampling, 1 s resolution) runs in the background and gives
``mem.dirty_bytes_per_s`` (:class:`DirtyRateProbe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from colo_compare.signals import CompareStats
from controller.epoch import ControlLike
from hybridft_common.stats import percentile

log = logging.getLogger("hybridft.signals")

SOURCE_TIMEOUT = 0.2  # a source slower than this is left out of the sample (it never delays the next one)


class QmpLike(Protocol):
    async def execute(self, command: str, arguments: Any = None, **kwargs: Any) -> Any: ...


# ------------------------------------------------------------------------------------------- pure
class RateTracker:
    """Cumulative counters in, per-second rates over the interval since the previous sample out."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def rates(self, now: float, counters: Mapping[str, float | None]) -> dict[str, float | None]:
        """``{name: rate}`` for every counter given; None on its first sample or after a reset."""
        out: dict[str, float | None] = {}
        for name, value in counters.items():
            if value is None or not math.isfinite(value):
                out[name] = None
                continue
            previous = self._last.get(name)
            self._last[name] = (now, value)
            if previous is None or now <= previous[0] or value < previous[1]:
                out[name] = None
                continue
            out[name] = (value - previous[1]) / (now - previous[0])
        return out


@dataclass(frozen=True, slots=True)
class CheckpointFigures:
    """What one finished checkpoint contributes to the ``ckpt.*`` and ``mem.*`` signals."""

    ended: float  # monotonic seconds
    reasons: Mapping[str, int]
    pause_s: float | None  # the primary's STOP -> RESUME
    ran_before_s: float | None  # guest run time between the previous checkpoint's end and this start
    ram_bytes: int | None = None  # patched QEMU only
    ram_pages: int | None = None


def checkpoint_signals(
    figures: Sequence[CheckpointFigures], since: float, now: float, pause_window_s: float
) -> dict[str, float | None]:
    """``ckpt.*`` / ``mem.*_per_ckpt`` for the interval (since, now]; pauses over the last window."""
    interval = max(now - since, 1e-9)
    fresh = [f for f in figures if since < f.ended <= now]
    out: dict[str, float | None] = {"ckpt.per_s": len(fresh) / interval}
    by_reason: dict[str, int] = {}
    for f in fresh:
        for reason, count in f.reasons.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    for reason, count in by_reason.items():
        out[f"ckpt.per_s.{reason}"] = count / interval
    recent = [f.pause_s * 1000 for f in figures if f.pause_s is not None and f.ended > now - pause_window_s]
    out["ckpt.pause_p50_ms"] = percentile(recent, 0.5)
    out["ckpt.pause_p99_ms"] = percentile(recent, 0.99)
    lengths = [f.ran_before_s * 1000 for f in fresh if f.ran_before_s is not None]
    out["ckpt.length_ms"] = sum(lengths) / len(lengths) if lengths else None
    ram = [f.ram_bytes for f in fresh if f.ram_bytes is not None]
    pages = [f.ram_pages for f in fresh if f.ram_pages is not None]
    out["mem.ram_bytes_per_ckpt"] = sum(ram) / len(ram) if ram else None
    out["mem.ram_pages_per_ckpt"] = sum(pages) / len(pages) if pages else None
    return out


# ------------------------------------------------------------------------------------------- I/O
def _cpu_seconds(times: Any) -> float:
    return float(times.user + times.system)


class ProcessCpu:
    """CPU seconds of a QEMU process and of its vCPU threads (thread ids from ``query-cpus-fast``)."""

    def __init__(self, pid: int, vcpu_tids: Iterable[int] = ()) -> None:
        self.process = psutil.Process(pid)
        self.vcpu_tids = frozenset(vcpu_tids)

    def read(self) -> tuple[float, float | None]:
        """(process CPU seconds, vCPU threads' CPU seconds or None when no thread id is known)."""
        with self.process.oneshot():
            total = _cpu_seconds(self.process.cpu_times())
            if not self.vcpu_tids:
                return total, None
            vcpu = sum(t.user_time + t.system_time for t in self.process.threads() if t.id in self.vcpu_tids)
        return total, vcpu


def host_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds over all cores, total CPU seconds over all cores) since boot."""
    times = psutil.cpu_times()
    total = sum(times)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


async def vcpu_thread_ids(session: QmpLike) -> list[int]:
    """The vCPU thread ids QEMU reports (``query-cpus-fast``)."""
    cpus = await session.execute("query-cpus-fast")
    return [int(cpu["thread-id"]) for cpu in cpus if "thread-id" in cpu]


def blockstats_counters(reply: Sequence[Mapping[str, Any]], device: str) -> dict[str, float | None]:
    """Write bytes/ops and flushes of ``device`` (the guest's drive) from a ``query-blockstats`` reply."""
    for entry in reply:
        if device in (entry.get("device"), entry.get("node-name"), entry.get("qdev")):
            stats = entry.get("stats", {})
            return {
                "disk.write_bytes_per_s": float(stats.get("wr_bytes", 0)),
                "disk.write_ops_per_s": float(stats.get("wr_operations", 0)),
                "disk.flushes_per_s": float(stats.get("flush_operations", 0)),
            }
    return {}


class DirtyRateProbe:
    """``mem.dirty_bytes_per_s`` on QEMU without per-checkpoint figures: ``calc-dirty-rate`` page sampling.

    One measurement takes ``calc_time`` seconds inside QEMU; the probe starts one, collects it on a later
    sample once QEMU says ``measured``, and starts the next.  Measured here to run during COLO.
    """

    def __init__(self, session: QmpLike, calc_time: int = 1, sample_pages: int = 4096) -> None:
        self.session = session
        self.calc_time = calc_time
        self.sample_pages = sample_pages
        self._started: float | None = None
        self.last: float | None = None

    async def poll(self, now: float) -> float | None:
        if self._started is not None and now - self._started >= self.calc_time:
            reply = await self.session.execute("query-dirty-rate")
            if reply.get("status") == "measured":
                self.last = float(reply.get("dirty-rate", 0)) * 1024 * 1024  # MB/s -> bytes/s
                self._started = None
        if self._started is None:
            await self.session.execute(
                "calc-dirty-rate",
                {"calc-time": self.calc_time, "sample-pages": self.sample_pages, "mode": "page-sampling"},
            )
            self._started = now
        return self.last


@dataclass(frozen=True, slots=True)
class Reading:
    """What one source read: cumulative counters (named by the rate they become), levels, and shares:
    pairs of cumulative counters (part, whole) named by the signal their rates' ratio becomes."""

    counters: dict[str, float | None] = field(default_factory=dict)
    levels: dict[str, float | None] = field(default_factory=dict)
    ratios: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(slots=True)
class SamplerLinks:
    """What the sampler reads; anything None is not wired and its signals stay absent."""

    primary: QmpLike | None = None
    secondary: QmpLike | None = None
    compare: ControlLike | None = None
    disk: ControlLike | None = None
    primary_pid: int | None = None
    secondary_pid: int | None = None
    drive: str = "disk0"
    checkpoints: Callable[[], Sequence[CheckpointFigures]] = tuple
    dirty_rate_fallback: bool = False  # stock QEMU: calc-dirty-rate for mem.dirty_bytes_per_s


class SignalSampler:
    """One sample of every wired source per :meth:`sample` call (see the module docstring)."""

    def __init__(self, links: SamplerLinks, *, pause_window_s: float = 10.0) -> None:
        self.links = links
        self.pause_window_s = pause_window_s
        self.rates = RateTracker()
        self.cpu: dict[str, ProcessCpu] = {}
        self.dirty = DirtyRateProbe(links.primary) if links.dirty_rate_fallback and links.primary else None
        self.failures: dict[str, int] = {}
        self._last_now: float | None = None
        self.cpu_cost_s = 0.0  # this process's CPU spent sampling (for the 2 % bound)
        self.guest_bytes: float | None = None  # mem.guest_bytes, read once by start()

    async def start(self) -> None:
        """Find the vCPU threads and the guest's RAM size (once: QEMU does not change them)."""
        if self.links.primary is not None:
            with contextlib.suppress(Exception):
                summary = await asyncio.wait_for(self.links.primary.execute("query-memory-size-summary"), 2.0)
                self.guest_bytes = float(summary["base-memory"]) + float(summary.get("plugged-memory", 0))
        for side, session, pid in (
            ("primary", self.links.primary, self.links.primary_pid),
            ("secondary", self.links.secondary, self.links.secondary_pid),
        ):
            if pid is None:
                continue
            tids: list[int] = []
            if session is not None:
                with contextlib.suppress(Exception):
                    tids = await asyncio.wait_for(vcpu_thread_ids(session), 2.0)
            with contextlib.suppress(psutil.Error):
                self.cpu[side] = ProcessCpu(pid, tids)

    async def _guarded(self, name: str, action: Any) -> Reading:
        try:
            return await asyncio.wait_for(action, SOURCE_TIMEOUT)
        except Exception as exc:  # a failing source leaves its signals out; it never stops sampling
            self.failures[name] = self.failures.get(name, 0) + 1
            log.debug("signal source %s failed: %r", name, exc)
            return Reading()

    async def _blockstats(self) -> Reading:
        assert self.links.primary is not None
        reply = await self.links.primary.execute("query-blockstats")
        return Reading(counters=blockstats_counters(reply, self.links.drive))

    async def _disk(self) -> Reading:
        assert self.links.disk is not None
        status = await self.links.disk.call("status")
        return Reading(
            levels={
                "disk.speculation_bytes": float(status.get("speculation_bytes", 0)),
                "disk.writeout_backlog_bytes": float(status.get("writeout_bytes", 0)),
            }
        )

    async def _compare(self) -> Reading:
        assert self.links.compare is not None
        reply = await self.links.compare.call("stats", signals_only=True)
        return compare_reading(reply["signals"])

    async def _dirty(self, now: float) -> Reading:
        assert self.dirty is not None
        return Reading(levels={"mem.dirty_bytes_per_s": await self.dirty.poll(now)})

    def _cpu(self) -> tuple[dict[str, float | None], dict[str, float | None]]:
        counters: dict[str, float | None] = {}
        for side, cpu in self.cpu.items():
            try:
                total, vcpu = cpu.read()
            except psutil.Error:
                continue
            counters[f"cpu.{side}"] = total
            counters[f"cpu.{side}_vcpu"] = vcpu
        busy, total_host = host_busy_seconds()
        counters["cpu.host.busy"] = busy
        counters["cpu.host.total"] = total_host
        return counters, {"cpu.cores": float(psutil.cpu_count() or 1)}

    async def sample(self, now: float | None = None) -> dict[str, float | None]:
        """One sample: ``{signal name: value or None}`` (None: not measured this time)."""
        # The sampler's own CPU: this thread's time outside the one await below.  While it awaits the
        # replies, the loop runs the epoch protocol and other threads run the heartbeat and the policy;
        # process time across the await charged all of that to sampling (8 ms a sample on a busy host
        # against 1.9 ms measured alone).  Decoding the replies happens in that window and is not counted.
        started_cpu = time.thread_time()
        now = time.monotonic() if now is None else now
        links = self.links
        jobs: list[Any] = []
        if links.primary is not None:
            jobs.append(self._guarded("blockstats", self._blockstats()))
        if links.disk is not None:
            jobs.append(self._guarded("disk", self._disk()))
        if links.compare is not None:
            jobs.append(self._guarded("compare", self._compare()))
        if self.dirty is not None:
            jobs.append(self._guarded("dirty-rate", self._dirty(now)))
        spent = time.thread_time() - started_cpu
        results = await asyncio.gather(*jobs)
        resumed_cpu = time.thread_time()
        counters, levels = self._cpu()
        values: dict[str, float | None] = dict(levels)
        if self.guest_bytes is not None:
            values["mem.guest_bytes"] = self.guest_bytes
        ratios: dict[str, tuple[float, float]] = {}
        for reading in results:
            counters.update(reading.counters)
            values.update(reading.levels)
            ratios.update(reading.ratios)
        rates = self.rates.rates(now, counters)
        busy, total = rates.pop("cpu.host.busy", None), rates.pop("cpu.host.total", None)
        values["cpu.host"] = busy / total if busy is not None and total else None
        for name, (part, whole) in ratios.items():
            pair = self.rates.rates(now, {f"{name}#part": part, f"{name}#whole": whole})
            values[name] = interval_share(pair[f"{name}#part"], pair[f"{name}#whole"])
        values.update(rates)
        since = self._last_now if self._last_now is not None else now - 1.0
        values.update(checkpoint_signals(links.checkpoints(), since, now, self.pause_window_s))
        self._last_now = now
        self.cpu_cost_s += spent + time.thread_time() - resumed_cpu
        return values


def interval_share(part_per_s: float | None, whole_per_s: float | None) -> float | None:
    """A share over the interval from the rates of two cumulative counters (``Reading.ratios``), 0..1;
    None (not measured) when the whole did not grow.  ``div.shadow_coverage``: no byte was sealed
    shadowed -- COLO, a passive secondary, no traffic."""
    if part_per_s is None or whole_per_s is None or whole_per_s <= 0:
        return None
    return min(1.0, max(0.0, part_per_s / whole_per_s))


def compare_reading(signals: Mapping[str, Any]) -> Reading:
    """The comparator's ``stats`` signals as signal values (counters under their rate names).

    Divergences are live in COLO and shadow-compared in MC: the two cumulative counters only grow in
    their own mode, so their sum differentiates to "divergences per second, live or shadow".  The
    shadow's coverage counters are a ratio: ``div.shadow_coverage``, the share of the primary's bytes
    sealed over the interval that the shadow compared.  Client
    bytes come from the primary's ACK numbers (the comparator never sees the client's own frames).
    """
    stats = CompareStats.from_dict(signals)
    counters: dict[str, float | None] = {
        "net.frames_per_s.from_guest": float(stats.guest_frames),
        "net.bytes_per_s.from_guest": float(stats.guest_bytes),
        "net.bytes_per_s.to_guest": float(stats.client_bytes_acked),
        "net.turns_per_s": float(stats.turns),
        "div.per_s": float(stats.divergences.total + stats.shadow_divergences.total),
        "div.shadow_compared_bytes_per_s": float(stats.shadow_compared_bytes),
    }
    live, shadow = stats.divergences.as_dict(), stats.shadow_divergences.as_dict()
    for reason in sorted(set(live) | set(shadow)):
        counters[f"div.per_s.{reason}"] = float(live.get(reason, 0) + shadow.get(reason, 0))
    levels: dict[str, float | None] = {
        "net.held_bytes": float(stats.held_bytes),
        "net.hold_p50_ms": None if stats.hold.p50_us is None else stats.hold.p50_us / 1000,
        "net.hold_p99_ms": None if stats.hold.p99_us is None else stats.hold.p99_us / 1000,
    }
    if stats.shadow_hold.p50_us is not None:
        levels["x.colo_hold_p50_ms"] = stats.shadow_hold.p50_us / 1000
    ratios = {"div.shadow_coverage": (float(stats.shadow_compared_bytes), float(stats.shadow_sealed_bytes))}
    return Reading(counters, levels, ratios)
