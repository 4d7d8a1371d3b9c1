"""The headline: does ``auto`` with a policy beat every static mode, and how close is it to the oracle?

Definitions (all scores are the workload's own units per second, higher is better):

* a mode's score on a workload is the mean over its successful repetitions;
* **best static**: the static mode (MC at any listed epoch, or COLO) with the highest score;
* **oracle**: per phase, the best static mode's phase score (the mean over repetitions of that
  mode's phase), switching between them for free; its score is the geometric mean of those per-phase
  maxima, like a phased workload's own score.  For a one-phase workload it equals the best static;
  otherwise it is at least the best static (a maximum per phase, and the geometric mean of means is
  never below the mean of geometric means);
* ``vs_best_static`` = policy score / best static score, ``vs_oracle`` = policy score / oracle score.

``headline.json`` is a list with one object per workload x auto policy that has both a successful
auto run and at least one successful static run.  Pure: records in, rows out.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from experiments.results import CellRecord

HEADLINE_JSON = "headline.json"


@dataclass(frozen=True, slots=True)
class HeadlineRow:
    workload: str
    policy: str
    score: float
    best_static: str  # the mode's label: "mc-20", "colo"
    best_static_score: float
    oracle_score: float
    vs_best_static: float
    vs_oracle: float
    oracle_phases: tuple[str, ...] = ()  # the static mode the oracle picks in each phase


def geomean(values: list[float]) -> float:
    if not values or min(values) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def mode_scores(records: Iterable[CellRecord], workload: str) -> dict[str, float]:
    """label -> mean score of the successful runs of ``workload`` in that mode."""
    scores: dict[str, list[float]] = {}
    for r in records:
        if r.workload == workload and r.ok and r.score is not None:
            scores.setdefault(r.spec.label, []).append(r.score)
    return {label: statistics.fmean(s) for label, s in scores.items()}


def phase_means(records: Iterable[CellRecord], workload: str, label: str) -> list[float] | None:
    """Mean score per phase index over the successful runs (None: no run, or runs disagree on phases)."""
    runs = [r for r in records if r.workload == workload and r.ok and r.spec.label == label and r.phases]
    if not runs or len({len(r.phases) for r in runs}) != 1:
        return None
    return [statistics.fmean(r.phases[i].score for r in runs) for i in range(len(runs[0].phases))]


def oracle(records: list[CellRecord], workload: str) -> tuple[float, tuple[str, ...]] | None:
    """The oracle's score and its pick per phase (None without static runs with phases)."""
    statics = sorted({r.spec.label for r in records if r.workload == workload and r.ok and r.spec.static})
    per_mode = {label: phase_means(records, workload, label) for label in statics}
    per_mode = {k: v for k, v in per_mode.items() if v is not None}
    if not per_mode:
        return None
    phases = len(next(iter(per_mode.values())))
    per_mode = {k: v for k, v in per_mode.items() if len(v) == phases}
    best: list[float] = []
    picks: list[str] = []
    for i in range(phases):
        label = max(per_mode, key=lambda k: per_mode[k][i])
        picks.append(label)
        best.append(per_mode[label][i])
    return geomean(best), tuple(picks)


def headline(records: list[CellRecord]) -> list[HeadlineRow]:
    rows: list[HeadlineRow] = []
    workloads = list(dict.fromkeys(r.workload for r in records))
    for workload in workloads:
        scores = mode_scores(records, workload)
        statics = {
            label: s
            for label, s in scores.items()
            if any(r.spec.label == label and r.spec.static for r in records)
        }
        found = oracle(records, workload)
        if not statics or found is None:
            continue
        best = max(statics, key=lambda k: statics[k])
        oracle_score, picks = found
        policies = list(
            dict.fromkeys(r.policy for r in records if r.workload == workload and r.mode == "auto" and r.ok)
        )
        for policy in policies:
            score = scores[f"auto-{policy}"]
            rows.append(
                HeadlineRow(
                    workload=workload,
                    policy=str(policy),
                    score=score,
                    best_static=best,
                    best_static_score=statics[best],
                    oracle_score=oracle_score,
                    vs_best_static=score / statics[best] if statics[best] > 0 else math.nan,
                    vs_oracle=score / oracle_score if oracle_score > 0 else math.nan,
                    oracle_phases=picks,
                )
            )
    return rows


def _json_number(value: object) -> object:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    return value


def write_headline(directory: Path, rows: list[HeadlineRow]) -> Path:
    path = directory / HEADLINE_JSON
    data = [{k: _json_number(v) for k, v in asdict(row).items()} for row in rows]
    for item in data:
        item["oracle_phases"] = list(item["oracle_phases"])  # type: ignore[arg-type]
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
