"""An experiment directory's results: one JSON line per cell run, and the CSV derived from them.

Why JSON lines as the record.  A run can be killed at any moment; appending one complete line per
finished cell (flushed and fsynced) means the directory always says exactly which cells ran, so
``run`` on the same directory continues where it stopped (:func:`finished_ids`).  A cell that failed
is recorded with its error and run again by the next ``run``; the newest line for a cell wins.
``cells.csv`` is rewritten from the JSON lines after every cell (the ``normalised`` column needs the
unreplicated runs, which may come later), so it is never the only copy of anything.

Pure apart from :func:`append_cell` / :func:`load_cells` / :func:`write_csv` (plain file I/O).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.config import ModeSpec

CELLS_JSONL = "cells.jsonl"
CELLS_CSV = "cells.csv"
LEARNED_JSON = "learned.json"  # the learned policy's model as a run used it, and the cells it held out

# the interface columns first (other tools rely on them), then the per-cell measurements
CSV_COLUMNS = (
    "workload", "mode", "policy", "epoch_ms", "rep", "score", "normalised",
    "unit", "ok", "error", "seconds", "latency_p50_ms", "latency_p99_ms", "checkpoints_per_s",
    "pause_p50_ms", "pause_p99_ms", "bytes_per_checkpoint", "replication_mb_s", "divergences",
    "time_mc_s", "time_colo_s", "switches", "cpu_primary", "cpu_secondary", "pair_reused", "wall_s",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PhaseRecord:
    name: str
    start_s: float
    end_s: float
    work: float
    score: float


@dataclass(frozen=True, slots=True)
class CellRecord:
    """One cell as run: the workload's score and phases, and what the pair did meanwhile."""

    id: str
    workload: str
    mode: str
    policy: str | None
    epoch_ms: int | None
    rep: int
    ok: bool
    error: str | None = None
    unit: str = ""
    score: float | None = None
    seconds: float | None = None
    phases: tuple[PhaseRecord, ...] = ()
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    checkpoints_per_s: float | None = None
    pause_p50_ms: float | None = None
    pause_p99_ms: float | None = None
    bytes_per_checkpoint: float | None = None
    replication_mb_s: float | None = None
    divergences: int | None = None
    time_in_mode_s: dict[str, float] = field(default_factory=dict)
    switches: int | None = None
    cpu_primary: float | None = None  # cores busy, mean over the cell
    cpu_secondary: float | None = None
    pair_reused: bool = False
    wall_s: float | None = None
    started: float | None = None  # wall clock

    @property
    def spec(self) -> ModeSpec:
        return ModeSpec(self.mode, self.epoch_ms, self.policy)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["phases"] = [dataclasses.asdict(p) for p in self.phases]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["phases"] = tuple(PhaseRecord(**p) for p in data.get("phases", ()))
        return cls(**values)


def trace_lines_between(lines: Iterable[str], t0: float, t1: float) -> list[str]:
    """The decision-trace lines whose monotonic ``t`` lies in [t0, t1] (unparsable lines are skipped):
    a cell's or a live run's slice of the daemon's ``decisions.jsonl``."""
    kept = []
    for line in lines:
        try:
            t = float(json.loads(line)["t"])
        except (ValueError, KeyError, TypeError):
            continue
        if t0 <= t <= t1:
            kept.append(line)
    return kept


def append_cell(directory: Path, record: CellRecord) -> None:
    """Append one cell's line, durably (a kill right after must not lose a finished cell)."""
    line = json.dumps(record.to_json(), allow_nan=False, separators=(",", ":")) + "\n"
    path = directory / CELLS_JSONL
    with path.open("a+b") as out:
        out.seek(0, os.SEEK_END)
        if out.tell() > 0:
            out.seek(-1, os.SEEK_END)
            if out.read(1) != b"\n":  # a torn line from a killed run: never append to it
                line = "\n" + line
        out.write(line.encode())
        out.flush()
        os.fsync(out.fileno())


def load_cells(directory: Path) -> list[CellRecord]:
    """The newest record of every cell, in first-run order; a torn last line (a kill mid-write) is
    ignored."""
    path = directory / CELLS_JSONL
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    latest: dict[str, CellRecord] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = CellRecord.from_json(json.loads(line))
        except (ValueError, TypeError, KeyError):
            continue
        latest[record.id] = record
    return list(latest.values())


def finished_ids(records: Iterable[CellRecord]) -> set[str]:
    """Cells that need not run again: those that ran without error."""
    return {r.id for r in records if r.ok}


def baselines(records: Iterable[CellRecord]) -> dict[str, float]:
    """workload -> mean score of its successful unreplicated runs."""
    scores: dict[str, list[float]] = {}
    for r in records:
        if r.mode == "unreplicated" and r.ok and r.score is not None and r.score > 0:
            scores.setdefault(r.workload, []).append(r.score)
    return {w: statistics.fmean(s) for w, s in scores.items()}


def normalised(record: CellRecord, base: dict[str, float]) -> float | None:
    """The cell's score over its workload's unreplicated mean (None without a baseline or a score)."""
    if not record.ok or record.score is None or record.workload not in base:
        return None
    return record.score / base[record.workload]


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def csv_rows(records: list[CellRecord]) -> list[dict[str, object]]:
    base = baselines(records)
    rows = []
    for r in records:
        row: dict[str, object] = {
            "workload": r.workload, "mode": r.mode, "policy": r.policy, "epoch_ms": r.epoch_ms,
            "rep": r.rep, "score": r.score, "normalised": normalised(r, base), "unit": r.unit,
            "ok": r.ok, "error": r.error, "seconds": r.seconds,
            "latency_p50_ms": r.latency_p50_ms, "latency_p99_ms": r.latency_p99_ms,
            "checkpoints_per_s": r.checkpoints_per_s, "pause_p50_ms": r.pause_p50_ms,
            "pause_p99_ms": r.pause_p99_ms, "bytes_per_checkpoint": r.bytes_per_checkpoint,
            "replication_mb_s": r.replication_mb_s, "divergences": r.divergences,
            "time_mc_s": r.time_in_mode_s.get("mc"), "time_colo_s": r.time_in_mode_s.get("colo"),
            "switches": r.switches, "cpu_primary": r.cpu_primary, "cpu_secondary": r.cpu_secondary,
            "pair_reused": r.pair_reused, "wall_s": r.wall_s,
        }  # fmt: skip
        rows.append({k: _csv_value(v) for k, v in row.items()})
    return rows


def write_csv(directory: Path, records: list[CellRecord]) -> Path:
    """``cells.csv``: one row per cell and repetition (written whole, then renamed into place)."""
    path = directory / CELLS_CSV
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(records))
    tmp.replace(path)
    return path
