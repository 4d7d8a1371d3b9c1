"""What the pair did during one cell, from the daemon's ``status`` and ``history`` answers: sans-I/O.

Why sampled, not read once: the daemon keeps its last 512 checkpoint records and its status shows the
latest signal sample, so a 60 s cell at 20 ms epochs outruns both.  The runner polls while the workload
runs and feeds every answer here with the time it was taken; :meth:`PairMeter.summary` turns the
samples into the cell's figures.  Counters (checkpoints, divergences, switches) are differences between
the first and last status; the time in each mode is the time between samples attributed to the mode
the earlier sample showed; pauses are the primary's STOP->RESUME of every checkpoint that started
inside the cell (records deduplicated by number); bytes per checkpoint and replication bandwidth come
from the daemon's ``mem.ram_bytes_per_ckpt`` and ``ckpt.per_s`` signals (absent on a QEMU without the
per-checkpoint RAM figures: then None, never 0).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from hybridft_common.stats import percentile


@dataclass
class PairMeter:
    wall_start: float  # time.time() when the cell's workload started (history records use wall time)
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    pauses_ms: dict[int, float] = field(default_factory=dict)
    bandwidth: list[float] = field(default_factory=list)  # bytes/s samples
    per_ckpt: list[float] = field(default_factory=list)
    mode_samples: list[tuple[float, str, int | None]] = field(default_factory=list)

    def feed_status(self, t: float, status: dict[str, Any]) -> None:
        """One ``status`` answer taken at monotonic time ``t``."""
        self.statuses.append((t, status))
        mode = str(status.get("mode")) if status.get("state") == "protected" else "unprotected"
        self.mode_samples.append((t, mode, status.get("epoch_ms")))
        signals = status.get("signals") or {}
        ram, rate = signals.get("mem.ram_bytes_per_ckpt"), signals.get("ckpt.per_s")
        if isinstance(ram, int | float):
            self.per_ckpt.append(float(ram))
            if isinstance(rate, int | float):
                self.bandwidth.append(float(ram) * float(rate))

    def feed_history(self, checkpoints: list[dict[str, Any]], wall_end: float | None = None) -> None:
        """A ``history`` answer: the pause of every checkpoint that started in the cell."""
        for record in checkpoints:
            started, pause = record.get("started"), record.get("primary_pause_ms")
            if not isinstance(started, int | float) or pause is None or started < self.wall_start:
                continue
            if wall_end is not None and started > wall_end:
                continue
            self.pauses_ms[int(record["number"])] = float(pause)

    def _counter(self, *path: str) -> float | None:
        def get(status: dict[str, Any]) -> float | None:
            value: Any = status
            for key in path:
                if not isinstance(value, dict):
                    return None
                value = value.get(key)
            return float(value) if isinstance(value, int | float) else None

        if len(self.statuses) < 2:
            return None
        first, last = get(self.statuses[0][1]), get(self.statuses[-1][1])
        return None if first is None or last is None else last - first

    def time_in_mode(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for (t, mode, _), (t_next, _, _) in zip(self.mode_samples, self.mode_samples[1:], strict=False):
            spent[mode] = spent.get(mode, 0.0) + (t_next - t)
        return {k: round(v, 3) for k, v in spent.items()}

    def summary(self) -> dict[str, Any]:
        span = self.statuses[-1][0] - self.statuses[0][0] if len(self.statuses) >= 2 else 0.0
        committed = self._counter("checkpoints", "committed")
        divergences = None
        if len(self.statuses) >= 2:
            first = self.statuses[0][1].get("divergences") or {}
            last = self.statuses[-1][1].get("divergences") or {}
            divergences = int(sum(last.values()) - sum(first.values()))
        pauses = list(self.pauses_ms.values())
        switches = self._counter("checkpoints", "mode_switches")
        return {
            "checkpoints_per_s": None if committed is None or span <= 0 else committed / span,
            "pause_p50_ms": percentile(pauses, 0.5),
            "pause_p99_ms": percentile(pauses, 0.99),
            "bytes_per_checkpoint": statistics.fmean(self.per_ckpt) if self.per_ckpt else None,
            "replication_mb_s": statistics.fmean(self.bandwidth) / 1e6 if self.bandwidth else None,
            "divergences": divergences,
            "switches": None if switches is None else int(switches),
            "time_in_mode_s": self.time_in_mode(),
        }
