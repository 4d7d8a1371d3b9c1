"""Training the learned policy from an experiment directory: windows the daemon saw, labelled by the oracle.

Where the labels come from.  The runner measures every workload under each static point; the oracle
(:mod:`experiments.headline`) names, per phase, the static point that served it best.  Where the
windows come from: every ``auto`` cell keeps the daemon's decision trace (``cells/<id>/decisions.jsonl``,
one window per decision; gzipped in a shipped run) and the monotonic times at which its phases began
(``timeline.json``, same clock as the windows).  A window is labelled with the oracle's pick for the
phase it falls in, once the window lies wholly inside that phase (``settle_s`` after the change: a
window that straddles two phases describes neither).  The features are the workload's, not the mode's
(:func:`policies.learned.features`), so windows recorded in MC teach what to do in COLO and the other
way round.

Pure apart from reading the directory: :func:`labelled_windows` returns the rows, :func:`train` fits
and writes the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.headline import oracle
from experiments.results import CellRecord, load_cells
from policies.learned import LearnedModel, ModelError, features, fit_model, save_model
from policies.trace import TraceError, load_trace
from policies.window import Window

__all__ = ["LabelledWindow", "labelled_windows", "train"]


@dataclass(frozen=True, slots=True)
class LabelledWindow:
    cell: str
    workload: str
    phase: int
    label: str
    window: Window


def _phase_spans(timeline: dict, cell: CellRecord) -> list[tuple[float, float]]:
    """(start, end) on the daemon's monotonic clock of each phase of ``cell``."""
    starts = [float(p["t"]) for p in sorted(timeline.get("phases", []), key=lambda p: p["index"])]
    if not starts or len(starts) != len(cell.phases):
        return []
    # the last phase ends when the workload did: its start plus its recorded length
    last = cell.phases[-1]
    return list(zip(starts, [*starts[1:], starts[-1] + (last.end_s - last.start_s)], strict=True))


def labelled_windows(
    directory: Path, *, settle_s: float = 1.0, average_s: float = 1.0
) -> Iterator[LabelledWindow]:
    """Every trace window of the directory's auto cells that lies inside one phase, with its label."""
    records = load_cells(directory)
    picks: dict[str, tuple[str, ...]] = {}
    for workload in dict.fromkeys(r.workload for r in records):
        found = oracle(records, workload)
        if found is not None:
            picks[workload] = found[1]
    for cell in records:
        if cell.mode != "auto" or not cell.ok or cell.workload not in picks:
            continue
        cell_dir = directory / "cells" / cell.id
        timeline_path = cell_dir / "timeline.json"
        # the runner writes decisions.jsonl; a shipped training run keeps it gzipped
        trace_path = next(
            (p for p in (cell_dir / "decisions.jsonl", cell_dir / "decisions.jsonl.gz") if p.exists()), None
        )
        if trace_path is None or not timeline_path.exists():
            continue
        spans = _phase_spans(json.loads(timeline_path.read_text()), cell)
        if len(spans) != len(picks[cell.workload]):
            continue
        try:
            trace = load_trace(trace_path)
        except TraceError:
            continue
        for record in trace:
            window = record.window
            oldest = window.now - average_s
            for index, (start, end) in enumerate(spans):
                if start + settle_s <= oldest and window.now <= end:
                    yield LabelledWindow(cell.id, cell.workload, index, picks[cell.workload][index], window)
                    break


def train(
    directories: list[Path], out: Path, *, settle_s: float = 1.0, average_s: float = 1.0
) -> LearnedModel:
    """Fit the learned policy on every labelled window of ``directories`` and write it to ``out``."""
    rows, labels, workloads = [], [], set()
    for directory in directories:
        for item in labelled_windows(directory, settle_s=settle_s, average_s=average_s):
            rows.append(features(item.window, average_s))
            labels.append(item.label)
            workloads.add(item.workload)
    if not rows:
        raise ModelError(
            f"no labelled windows in {', '.join(map(str, directories))}: it needs auto cells with "
            "decisions.jsonl and static cells of the same workloads"
        )
    model = fit_model(
        np.array(rows),
        labels,
        average_s=average_s,
        source=", ".join(d.name for d in directories),
        workloads=sorted(workloads),
    )
    save_model(model, out)
    return model
