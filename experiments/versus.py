"""A live run beside a shipped reference run: the table ``make demo`` prints after its phased workload.

Why a reference.  The demo runs one phased workload under ``auto`` on a fresh pair.  Whether that was
good depends on what the static modes score on the same phases, which the demo cannot measure in its few
minutes (each static mode would need its own run).  A shipped run (``make demo`` uses
``experiments/results/phased``) measured them on this kind of machine; this module lines them up
beside the live phases, labelled as a reference and never mixed into the live numbers.  It also turns
the live run's slice of the daemon's decision trace into the runner's ``timeline.json`` shape, so the
report's timeline plot draws it.

Pure: probe output and records in, rows and dicts out (the CLI reads and writes the files).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.headline import geomean, oracle, phase_means
from experiments.report import trace_points
from experiments.results import CellRecord, trace_lines_between

__all__ = ["LivePhase", "ProbeError", "live_phases", "reference_columns", "summary_rows", "timeline_of"]


class ProbeError(ValueError):
    """The probe's output is not a phased workload's result this module can line up."""


@dataclass(frozen=True, slots=True)
class LivePhase:
    name: str
    per_s: float
    start_s: float  # seconds since the probe's workload started
    seconds: float


def live_phases(probe: Mapping[str, Any]) -> list[LivePhase]:
    """The phases of ``python -m experiments.probe workload`` output (ProbeError names what is wrong)."""
    phases = probe.get("phases")
    if not isinstance(phases, list) or not phases:
        raise ProbeError("the probe output has no phases (was it `probe workload ...`?)")
    out = []
    for k, phase in enumerate(phases):
        try:
            out.append(
                LivePhase(
                    str(phase["name"]),
                    float(phase["per_s"]),
                    float(phase.get("start_s", 0.0)),
                    float(phase["seconds"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProbeError(f"phase {k} of the probe output is malformed: {exc!r}") from None
    return out


def reference_columns(
    records: Sequence[CellRecord], workload: str, names: Sequence[str]
) -> dict[str, list[float]]:
    """label -> mean score per phase in the reference run, for every mode whose runs of ``workload``
    had the same phases (same count, same names, in order) as the live run; plus ``oracle``."""
    columns: dict[str, list[float]] = {}
    for label in dict.fromkeys(r.spec.label for r in records if r.workload == workload and r.ok):
        runs = [r for r in records if r.workload == workload and r.ok and r.spec.label == label]
        if any([p.name for p in r.phases] != list(names) for r in runs):
            continue
        means = phase_means(records, workload, label)
        if means is not None:
            columns[label] = means
    found = oracle(list(records), workload)
    # the oracle's picks are static modes: present only when those modes had the live run's phases
    if found is not None and len(found[1]) == len(names) and all(p in columns for p in found[1]):
        columns["oracle"] = [columns[pick][i] for i, pick in enumerate(found[1])]
    return columns


def summary_rows(
    live: Sequence[LivePhase], reference: Mapping[str, Sequence[float]], live_label: str = "this run"
) -> list[list[str]]:
    """One row for the live run, then one per reference column: its rate in each phase and its score
    (the geometric mean of the phases, as the runner scores a phased run).  Rows, not columns, per
    mode: the table stays as wide as the phases, whatever the reference holds."""
    rows = [[live_label, *(f"{p.per_s:.1f}" for p in live), f"{geomean([p.per_s for p in live]):.1f}"]]
    for label, rates in reference.items():
        rows.append([f"reference: {label}", *(f"{r:.1f}" for r in rates), f"{geomean(list(rates)):.1f}"])
    return rows


def timeline_of(
    trace_lines: Iterable[str], t0: float, live: Sequence[LivePhase]
) -> tuple[dict[str, Any], list[str]]:
    """(timeline.json content, the trace lines inside the run) for :func:`experiments.report.plot_timeline`:
    ``t0`` is the monotonic time the probe's workload started (the trace's clock)."""
    end = t0 + max((p.start_s + p.seconds for p in live), default=0.0)
    lines = trace_lines_between(trace_lines, t0 - 1.0, end + 1.0)
    modes = [{"t": p["t"], "mode": p["applied"]} for p in trace_points(lines) if p["applied"]]
    timeline = {
        "t0": t0,
        "phases": [{"index": k, "name": p.name, "t": t0 + p.start_s} for k, p in enumerate(live)],
        "modes": modes,
    }
    return timeline, lines
