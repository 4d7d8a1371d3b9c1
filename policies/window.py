"""The contract between the daemon's sampler and a policy: an immutable :class:`Window` of signals.

Why a window and not live counters: a policy must be a pure function of what it is shown (plus state
fed only from earlier windows), so that a recorded trace replays to the same decisions.  The daemon
samples its sources into a :class:`SignalRing` (fixed-capacity numpy arrays, bounded memory) and hands
the policy a copy of the ring's tail, frozen: the arrays are read-only, the mappings immutable.

Time base and alignment
    ``t`` holds the sample times in seconds, oldest first, strictly increasing, from the daemon's
    monotonic clock (never wall time).  Every signal series has one value per sample time.  A value
    the daemon could not measure at that sample is NaN; a signal never measured in the window is
    **absent** (``has()`` is False).  A missing measurement is never faked as 0: a policy must cope
    with absence (keep its mode, fall back to another signal, say so in its reason).

Rates (``*.per_s``) are averages over the interval that ends at the sample, since the previous
sample: ``sum(rate[k] * (t[k] - t[k-1]))`` over new samples counts the events between two windows.
Levels (``*_bytes``, ``cpu.*``) are the value at the sample time or averaged over its interval.

Signal names (unit; source).  :data:`SIGNALS` is the catalogue; names outside it raise ValueError
when sampled, so a typo in the daemon cannot silently read as "absent".

CPU (psutil on the QEMU processes; vCPU thread ids from QMP ``query-cpus-fast``)
    ``cpu.primary``, ``cpu.secondary``      cores busy (0..n): the whole QEMU process
    ``cpu.primary_vcpu``, ``cpu.secondary_vcpu``  cores busy (0..n): the vCPU threads only
    ``cpu.host``                            0..1 of all the host's cores (psutil.cpu_percent / 100)
    ``cpu.cores``                           logical CPUs of the host (psutil.cpu_count())
Memory (the patched QEMU's per-checkpoint RAM figures; ``calc-dirty-rate`` page sampling on stock QEMU)
    ``mem.dirty_bytes_per_s``               bytes/s the guest dirties (calc-dirty-rate, 1 s resolution)
    ``mem.ram_bytes_per_ckpt``              bytes of RAM sent per checkpoint (mean over the interval)
    ``mem.ram_pages_per_ckpt``              pages sent per checkpoint (mean over the interval)
    ``mem.guest_bytes``                     the guest's RAM size (QMP ``query-memory-size-summary``)
Disk (``query-blockstats`` on the primary; the disk buffer's own figures)
    ``disk.write_bytes_per_s``, ``disk.write_ops_per_s``, ``disk.flushes_per_s``   guest writes
    ``disk.speculation_bytes``              bytes written in the open (uncommitted) epoch
    ``disk.writeout_backlog_bytes``         committed journal bytes not yet applied to the image
Network (the comparator; the tap's counters)
    ``net.frames_per_s.to_guest``, ``net.frames_per_s.from_guest``   frames/s
    ``net.bytes_per_s.to_guest``, ``net.bytes_per_s.from_guest``     bytes/s
    ``net.turns_per_s``                     request/response turns per second: client bytes followed
                                            by guest bytes on one flow (the comparator counts them)
    ``net.hold_p50_ms``, ``net.hold_p99_ms``  ms a primary frame is held before release (COLO: until
                                            the secondary produced the same bytes; MC: until commit)
    ``net.held_bytes``                      primary bytes held now
Divergences (the comparator: live in COLO, shadow-compared in MC with an active secondary)
    ``div.per_s``                           divergences per second, all reasons
    ``div.per_s.<reason>``                  per reason (payload, fin, rst, datagram, other, timeout,
                                            ack, queue-full: see ``colo_compare.core``)
    ``div.shadow_coverage``                 0..1: of the primary's TCP payload bytes in the MC epochs
                                            sealed over the interval, the share the shadow compared
                                            (verified or found diverged); absent (NaN) when none was
                                            sealed shadowed: COLO, a passive secondary, no traffic.
                                            Low coverage means the shadow's ``div.per_s`` of 0 says
                                            nothing: the secondary had not answered by the seal
                                            (``colo_compare.signals``, "Shadow coverage")
    ``div.shadow_compared_bytes_per_s``     bytes/s of the primary's output the shadow compared: how
                                            much evidence a coverage or a 0 rests on
Checkpoints (the daemon's epoch records)
    ``ckpt.per_s``                          checkpoints completed per second, all reasons
    ``ckpt.per_s.<reason>``                 per trigger reason (timer, safety-interval, disk-pressure,
                                            mode-switch, operator, compare:<why>, ...)
    ``ckpt.pause_p50_ms``, ``ckpt.pause_p99_ms``  guest-visible pause (primary STOP -> RESUME), ms
    ``ckpt.length_ms``                      COLO: ms the guest ran between the previous checkpoint's
                                            end and this one's start (what Gilbert's mean averages);
                                            mean over the checkpoints of the interval
The operating point per sample (the daemon; the window's :class:`ProtectionPoint` is the one now)
    ``op.colo``                             1 if the sample's interval ran in COLO, 0 in MC, the
                                            fraction in COLO for an interval that switched
    ``op.epoch_ms``                         the MC epoch length in force, ms
    ``op.passive``                          1 if the MC secondary was passive, else 0
Experiments and third-party samplers may add names under ``x.`` (for example ``x.app.queue_len``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from hybridft_common.vocabulary import Mode, check_epoch_ms

__all__ = [
    "SIGNALS",
    "ProtectionPoint",
    "SignalRing",
    "SignalSpec",
    "Window",
    "is_signal_name",
]


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """What a signal measures: its unit and where the daemon reads it."""

    unit: str
    source: str


#: The catalogue of exact signal names (families with a ``.<reason>`` suffix: :data:`REASON_FAMILIES`).
SIGNALS: Mapping[str, SignalSpec] = MappingProxyType(
    {
        "cpu.primary": SignalSpec("cores busy", "psutil, primary QEMU process"),
        "cpu.secondary": SignalSpec("cores busy", "psutil, secondary QEMU process"),
        "cpu.primary_vcpu": SignalSpec("cores busy", "psutil, primary vCPU threads (query-cpus-fast)"),
        "cpu.secondary_vcpu": SignalSpec("cores busy", "psutil, secondary vCPU threads (query-cpus-fast)"),
        "cpu.host": SignalSpec("fraction of all cores (0..1)", "psutil.cpu_percent / 100"),
        "cpu.cores": SignalSpec("logical CPUs", "psutil.cpu_count()"),
        "mem.dirty_bytes_per_s": SignalSpec("bytes/s", "calc-dirty-rate page sampling"),
        "mem.ram_bytes_per_ckpt": SignalSpec("bytes per checkpoint", "patched QEMU checkpoint stats"),
        "mem.ram_pages_per_ckpt": SignalSpec("pages per checkpoint", "patched QEMU checkpoint stats"),
        "mem.guest_bytes": SignalSpec("bytes", "QMP query-memory-size-summary"),
        "disk.write_bytes_per_s": SignalSpec("bytes/s", "query-blockstats (primary)"),
        "disk.write_ops_per_s": SignalSpec("ops/s", "query-blockstats (primary)"),
        "disk.flushes_per_s": SignalSpec("flushes/s", "query-blockstats (primary)"),
        "disk.speculation_bytes": SignalSpec("bytes", "disk buffer: open epoch"),
        "disk.writeout_backlog_bytes": SignalSpec("bytes", "disk buffer: committed, not yet applied"),
        "net.frames_per_s.to_guest": SignalSpec("frames/s", "comparator / tap"),
        "net.frames_per_s.from_guest": SignalSpec("frames/s", "comparator / tap"),
        "net.bytes_per_s.to_guest": SignalSpec("bytes/s", "comparator / tap"),
        "net.bytes_per_s.from_guest": SignalSpec("bytes/s", "comparator / tap"),
        "net.turns_per_s": SignalSpec("turns/s", "comparator: client bytes then guest bytes on a flow"),
        "net.hold_p50_ms": SignalSpec("ms", "comparator: primary frame hold before release"),
        "net.hold_p99_ms": SignalSpec("ms", "comparator: primary frame hold before release"),
        "net.held_bytes": SignalSpec("bytes", "comparator: primary bytes held"),
        "div.per_s": SignalSpec("divergences/s", "comparator (live in COLO, shadow in MC)"),
        "div.shadow_compared_bytes_per_s": SignalSpec("bytes/s", "comparator: shadow-compared in MC epochs"),
        "div.shadow_coverage": SignalSpec(
            "share of the primary's bytes (0..1)", "comparator: shadow-compared in MC epochs"
        ),
        "ckpt.per_s": SignalSpec("checkpoints/s", "daemon epoch records"),
        "ckpt.pause_p50_ms": SignalSpec("ms", "daemon: primary STOP -> RESUME"),
        "ckpt.pause_p99_ms": SignalSpec("ms", "daemon: primary STOP -> RESUME"),
        "ckpt.length_ms": SignalSpec("ms", "daemon: COLO run time between checkpoints"),
        "op.colo": SignalSpec("fraction of the interval in COLO (0..1)", "daemon operating point"),
        "op.epoch_ms": SignalSpec("ms", "daemon operating point"),
        "op.passive": SignalSpec("0 or 1", "daemon operating point"),
    }
)

#: Signals that also exist per reason, as ``<family>.<reason>``.
REASON_FAMILIES: tuple[str, ...] = ("div.per_s", "ckpt.per_s")

_REASON = re.compile(r"[a-z0-9][a-z0-9:_-]*\Z")
_EXTENSION = re.compile(r"x\.[a-z0-9_]+(\.[a-z0-9_:-]+)*\Z")


def is_signal_name(name: str) -> bool:
    """True for a catalogued name, ``<family>.<reason>`` of a reason family, or an ``x.`` extension."""
    if name in SIGNALS:
        return True
    for family in REASON_FAMILIES:
        if name.startswith(family + ".") and _REASON.match(name[len(family) + 1 :]):
            return True
    return bool(_EXTENSION.match(name))


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not is_signal_name(name):
        raise ValueError(f"unknown signal name {name!r} (see policies.window.SIGNALS; extensions start 'x.')")
    return name


@dataclass(frozen=True, slots=True)
class ProtectionPoint:
    """The protection a pair runs with, as a policy sees and chooses it: the daemon's
    :class:`controller.operating_point.OperatingPoint` without the stop way, which is the operator's.

    ``epoch_ms`` is MC's epoch (kept while in COLO, for the next MC epoch); ``passive_secondary`` only
    matters in MC (a passive secondary is stopped after each checkpoint).
    """

    mode: Mode
    epoch_ms: int
    passive_secondary: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            raise ValueError(f"mode must be a Mode, got {self.mode!r}")
        check_epoch_ms(self.epoch_ms)
        if not isinstance(self.passive_secondary, bool):
            raise ValueError(f"passive_secondary must be a bool, got {self.passive_secondary!r}")

    def describe(self) -> str:
        if self.mode is Mode.COLO:
            return "colo"
        return f"mc {self.epoch_ms} ms" + (" passive" if self.passive_secondary else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode),
            "epoch_ms": self.epoch_ms,
            "passive_secondary": self.passive_secondary,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProtectionPoint:
        try:
            return cls(Mode(data["mode"]), data["epoch_ms"], data.get("passive_secondary", False))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an operating point: {data!r}") from exc


def _frozen_series(values: object, length: int, name: str) -> np.ndarray:
    array = np.array(values, dtype=np.float64)  # always a copy: the window owns its arrays
    if array.shape != (length,):
        raise ValueError(f"signal {name!r} has shape {array.shape}, the time base has {length} samples")
    if np.isinf(array).any():
        raise ValueError(f"signal {name!r} holds an infinite value (a missing value is NaN)")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False, slots=True)
class Window:
    """An immutable tail of sampled signals plus the operating point in force at its end.

    Construct with any sequences; the window keeps read-only float64 copies.  At least one sample.
    Helpers skip NaN samples and return None when a signal has no usable value, so a policy never
    mistakes "not measured" for 0.
    """

    t: np.ndarray
    point: ProtectionPoint
    signals: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = np.array(self.t, dtype=np.float64)
        if t.ndim != 1 or t.size == 0:
            raise ValueError("a window needs a 1-D time base with at least one sample")
        if not np.isfinite(t).all():
            raise ValueError("sample times must be finite")
        if t.size > 1 and not (np.diff(t) > 0).all():
            raise ValueError("sample times must be strictly increasing, oldest first")
        t.flags.writeable = False
        if not isinstance(self.point, ProtectionPoint):
            raise ValueError(f"point must be an ProtectionPoint, got {self.point!r}")
        series = {
            _check_name(name): _frozen_series(values, t.size, name)
            for name, values in sorted(dict(self.signals).items())
        }
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "signals", MappingProxyType(series))

    # -- the operating point ------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self.point.mode

    @property
    def epoch_ms(self) -> int:
        return self.point.epoch_ms

    @property
    def passive_secondary(self) -> bool:
        return self.point.passive_secondary

    @property
    def now(self) -> float:
        """The newest sample's time: a policy's only clock."""
        return float(self.t[-1])

    @property
    def span_s(self) -> float:
        return float(self.t[-1] - self.t[0])

    def __len__(self) -> int:
        return int(self.t.size)

    # -- signal access ------------------------------------------------------------------------------
    def names(self) -> tuple[str, ...]:
        return tuple(self.signals)

    def has(self, name: str) -> bool:
        """True if the window holds at least one measured (non-NaN) value of ``name``."""
        series = self.signals.get(name)
        return series is not None and bool((~np.isnan(series)).any())

    def series(self, name: str) -> np.ndarray | None:
        """The read-only series of ``name`` (NaN where not measured), or None if absent."""
        return self.signals.get(name)

    def samples(self, name: str, after: float | None = None) -> Iterator[tuple[float, float]]:
        """``(t, value)`` of the measured samples of ``name``, oldest first, with ``t > after``."""
        series = self.signals.get(name)
        if series is None:
            return
        for when, value in zip(self.t.tolist(), series.tolist(), strict=True):
            if not math.isnan(value) and (after is None or when > after):
                yield when, value

    def latest(self, name: str, max_age_s: float | None = None) -> float | None:
        """The newest measured value of ``name``; None if absent or older than ``max_age_s``."""
        series = self.signals.get(name)
        if series is None:
            return None
        measured = np.flatnonzero(~np.isnan(series))
        if measured.size == 0:
            return None
        k = int(measured[-1])
        if max_age_s is not None and self.now - float(self.t[k]) > max_age_s:
            return None
        return float(series[k])

    def mean(self, name: str, last_s: float | None = None) -> float | None:
        """Mean of the measured samples of the last ``last_s`` seconds (all if None); None if none."""
        series = self.signals.get(name)
        if series is None:
            return None
        values = series if last_s is None else series[self.t >= self.now - last_s]
        values = values[~np.isnan(values)]
        if values.size == 0:
            return None
        return float(np.mean(values))

    def ewma(self, name: str, half_life_s: float) -> float | None:
        """Exponentially weighted mean over time: a sample ``h`` seconds older weighs half as much.

        For irregular samples each step blends with ``a = 1 - 2**(-dt / half_life_s)`` where ``dt`` is
        the time since the previous measured sample; the first measured sample starts the average.
        """
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s!r}")
        average: float | None = None
        previous = 0.0
        for when, value in self.samples(name):
            if average is None:
                average = value
            else:
                blend = 1.0 - 2.0 ** (-(when - previous) / half_life_s)
                average += blend * (value - average)
            previous = when
        return average

    def integral(self, name: str, after: float | None = None) -> float:
        """Events counted by the rate ``name`` over the intervals of samples with ``t > after``.

        Each sample's rate covers the interval since the previous sample, so the first sample of the
        window (no predecessor in it) contributes nothing; NaN samples contribute nothing.
        """
        series = self.signals.get(name)
        if series is None or self.t.size < 2:
            return 0.0
        dt = np.diff(self.t)
        rates = series[1:]
        keep = ~np.isnan(rates)
        if after is not None:
            keep &= self.t[1:] > after
        return float(np.sum(rates[keep] * dt[keep]))

    # -- equality and JSON --------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Window):
            return NotImplemented
        return (
            self.point == other.point
            and np.array_equal(self.t, other.t)
            and self.signals.keys() == other.signals.keys()
            and all(_same_bits(self.signals[n], other.signals[n]) for n in self.signals)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: equal windows need not hash alike

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; floats are written by ``repr`` (exact round trip), NaN as null."""
        return {
            "t": self.t.tolist(),
            "point": self.point.to_json(),
            "signals": {name: _nan_to_none(series) for name, series in self.signals.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Window:
        """The window :meth:`to_json` wrote (a dict, or its JSON text)."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, Mapping):
            raise ValueError("a window is a JSON object")
        try:
            signals = {
                name: [math.nan if v is None else _number(v) for v in values]
                for name, values in data.get("signals", {}).items()
            }
            return cls([_number(v) for v in data["t"]], ProtectionPoint.from_json(data["point"]), signals)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a window: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"Window({len(self)} samples {float(self.t[0]):.3f}..{self.now:.3f} s, "
            f"{self.point.describe()}, signals={list(self.signals)})"
        )


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _nan_to_none(series: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else v for v in series.tolist()]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    # equal including NaN positions and the sign of zero: a replayed window is the recorded one
    return (
        a.shape == b.shape
        and bool(np.array_equal(a, b, equal_nan=True))
        and bool(np.array_equal(np.signbit(a), np.signbit(b)))
    )


class SignalRing:
    """Fixed-capacity sample store the daemon appends to; :meth:`window` copies a bounded tail.

    Memory is bounded by ``capacity`` samples times at most ``max_signals`` series.  A series appears
    the first time a sample carries it (earlier samples read NaN: not measured).  None and NaN mean "not
    measured"; an infinite value is stored as NaN too and counted in ``nonfinite`` (a rate computed
    over a zero interval is no measurement, and the sampler must keep going).
    """

    def __init__(self, capacity: int = 600, max_signals: int = 256) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_signals < 1:
            raise ValueError("max_signals must be >= 1")
        self.capacity = capacity
        self.max_signals = max_signals
        self._t = np.full(capacity, np.nan)
        self._series: dict[str, np.ndarray] = {}
        self._next = 0  # slot of the next sample
        self._count = 0
        self.nonfinite = 0

    def __len__(self) -> int:
        return self._count

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._series))

    @property
    def last_t(self) -> float | None:
        return None if self._count == 0 else float(self._t[(self._next - 1) % self.capacity])

    def append(self, t: float, values: Mapping[str, float | int | None]) -> None:
        """Add the sample at time ``t`` (seconds, later than the previous sample)."""
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"sample time must be finite, got {t!r}")
        last = self.last_t
        if last is not None and t <= last:
            raise ValueError(f"sample time {t!r} is not after the previous sample {last!r}")
        for name in values:
            if name not in self._series:
                _check_name(name)
                if len(self._series) >= self.max_signals:
                    raise ValueError(f"more than {self.max_signals} signals (adding {name!r})")
        slot = self._next
        self._t[slot] = t
        for series in self._series.values():
            series[slot] = np.nan  # the slot may hold an overwritten sample's value
        for name, value in values.items():
            series = self._series.get(name)
            if series is None:
                series = self._series[name] = np.full(self.capacity, np.nan)
            number = _number_or_nan(value)
            if math.isinf(number):
                self.nonfinite += 1
                number = math.nan
            series[slot] = number
        self._next = (slot + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def _ordered(self, array: np.ndarray) -> np.ndarray:
        if self._count < self.capacity:
            return array[: self._count].copy()
        return np.concatenate((array[self._next :], array[: self._next]))

    def window(
        self, point: ProtectionPoint, *, span_s: float | None = None, max_samples: int | None = None
    ) -> Window:
        """A frozen copy of the newest samples: at most ``max_samples``, none older than ``span_s``.

        Series with no measured value in that tail are left out (absent), never carried as NaN.
        """
        if self._count == 0:
            raise ValueError("no samples yet")
        t = self._ordered(self._t)
        start = 0
        if max_samples is not None:
            if max_samples < 1:
                raise ValueError("max_samples must be >= 1")
            start = max(start, t.size - max_samples)
        if span_s is not None:
            start = max(start, int(np.searchsorted(t, t[-1] - span_s, side="left")))
        signals: dict[str, np.ndarray] = {}
        for name, series in self._series.items():
            tail = self._ordered(series)[start:]
            if (~np.isnan(tail)).any():
                signals[name] = tail
        return Window(t[start:], point, signals)


def _number_or_nan(value: object) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"a sample value must be a number or None, got {value!r}")
    return float(value)
