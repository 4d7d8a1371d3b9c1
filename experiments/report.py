"""``hybridft experiment report DIR``: a markdown table and PNG plots from an experiment directory.

Everything is read from files the runner wrote (``cells.jsonl``; per cell ``latencies.json``,
``timeline.json`` and the cell's slice of the daemon's ``decisions.jsonl``), so a report can be made
again at any time, from a committed results directory, on a machine without QEMU.  Plots:

* ``score.png`` -- normalised score (unreplicated = 1) per workload and mode, mean over repetitions;
* ``latency_cdf.png`` -- per workload with per-request latencies, one CDF per mode;
* ``timeline-<cell>.png`` -- for auto runs (phased ones first): the mode over time with the
  workload's phases, and below it the signals that drove the policy's decisions, each switch marked
  with the decision's reason.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from experiments.config import ModeSpec
from experiments.headline import HEADLINE_JSON, geomean, headline, write_headline
from experiments.results import LEARNED_JSON, CellRecord, baselines, load_cells, normalised, write_csv

REPORT_MD = "report.md"
MODE_ORDER = {"unreplicated": 0, "mc": 1, "colo": 2, "auto": 3}


def _order(spec: ModeSpec) -> tuple[int, int, str]:
    return (MODE_ORDER.get(spec.mode, 9), spec.epoch_ms or 0, spec.policy or "")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summary_rows(records: list[CellRecord]) -> list[dict[str, Any]]:
    """One row per workload x mode: means over the successful repetitions."""
    base = baselines(records)
    keys: dict[tuple[str, ModeSpec], list[CellRecord]] = {}
    for r in records:
        keys.setdefault((r.workload, r.spec), []).append(r)
    workloads = list(dict.fromkeys(r.workload for r in records))
    rows = []
    for (workload, spec), runs in sorted(
        keys.items(), key=lambda kv: (workloads.index(kv[0][0]), _order(kv[0][1]))
    ):
        ok = [r for r in runs if r.ok]
        rows.append(
            {
                "workload": workload,
                "mode": spec.label,
                "runs": f"{len(ok)}/{len(runs)}",
                "score": _mean(r.score for r in ok),
                "unit": ok[0].unit if ok else "",
                "normalised": _mean(normalised(r, base) for r in ok),
                "p50": _mean(r.latency_p50_ms for r in ok),
                "p99": _mean(r.latency_p99_ms for r in ok),
                "ckpt_s": _mean(r.checkpoints_per_s for r in ok),
                "pause_p50": _mean(r.pause_p50_ms for r in ok),
                "pause_p99": _mean(r.pause_p99_ms for r in ok),
                "switches": _mean(r.switches for r in ok),
                "errors": "; ".join(sorted({r.error for r in runs if r.error}))[:120],
            }
        )
    return rows


def phase_sections(records: list[CellRecord]) -> list[str]:
    """Per workload with several phases: each mode's mean rate per phase and the oracle's pick, so a
    policy's score can be traced to the phase where it won or lost."""
    from experiments.versus import reference_columns

    lines: list[str] = []
    for workload in dict.fromkeys(r.workload for r in records):
        runs = [r for r in records if r.workload == workload and r.ok and len(r.phases) > 1]
        if not runs:
            continue
        names = [p.name for p in runs[0].phases]
        columns = reference_columns(records, workload, names)
        if not columns:
            continue
        lines += ["", f"## Phases of `{workload}` (mean rate per phase over repetitions)", ""]
        lines.append("| mode | " + " | ".join(f"{k}: {n}" for k, n in enumerate(names)) + " | score |")
        lines.append("|---" * (len(names) + 2) + "|")
        for label, rates in columns.items():
            cells = " | ".join(_fmt(r, 4) for r in rates)
            lines.append(f"| {label} | {cells} | {_fmt(geomean(list(rates)), 4)} |")
        lines.append(
            "\nThe oracle row takes the best static mode's rate in each phase; an `auto` row above it in "
            "a phase ran that phase faster than every static cell did (cell-to-cell spread, or an MC "
            "epoch no static cell used)."
        )
    return lines


def learned_section(learned: dict[str, Any] | None, records: list[CellRecord]) -> list[str]:
    """What the learned policy was trained on and which of its cells were held out (runner's
    ``learned.json``); nothing when the run had no learned cells."""
    if learned is None and not any(r.policy == "learned" for r in records):
        return []
    lines = ["", "## The learned policy: evaluated outside its training set", ""]
    if learned is None:
        lines.append("This run did not record the learned policy's model (a run from before the record).")
        return lines
    trained_on = ", ".join(f"`{w}`" for w in learned.get("trained_on", [])) or "(not recorded)"
    held = learned.get("held_out_cells", [])
    if held:
        held_text = f"its {len(held)} cells on its training workloads were not run."
    else:
        held_text = "none of this run's workloads was in its training set."
    lines.append(
        f"`learned` ran with `{Path(learned.get('model', '?')).name}`, trained on {learned.get('samples')} "
        f"decision windows of the workloads {trained_on} (from `{learned.get('source')}`).  It is "
        f"evaluated only on the other workloads: {held_text}"
    )
    return lines


def markdown(
    records: list[CellRecord],
    plots: list[str],
    headline_rows: list[dict[str, Any]],
    learned: dict[str, Any] | None = None,
) -> str:
    lines = ["# Experiment results", ""]
    lines.append(
        "Scores are the workload's own units per second (higher is better), mean over successful "
        "repetitions; *normalised* divides by the same workload's unreplicated mean.  Latencies are per "
        "request; for `disk` they are the gaps between consecutive durable-write acknowledgements (0 when "
        "several arrive together, as MC releases them at a commit)."
    )
    lines += ["", "| workload | mode | ok | score | unit/s | normalised | lat p50 ms | lat p99 ms | ckpt/s "
              "| pause p50 ms | pause p99 ms | switches | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in summary_rows(records):
        lines.append(
            f"| {row['workload']} | {row['mode']} | {row['runs']} | {_fmt(row['score'], 4)} | {row['unit']} "
            f"| {_fmt(row['normalised'])} | {_fmt(row['p50'])} | {_fmt(row['p99'])} "
            f"| {_fmt(row['ckpt_s'])} | {_fmt(row['pause_p50'])} | {_fmt(row['pause_p99'])} "
            f"| {_fmt(row['switches'])} | {row['errors']} |"
        )
    lines += ["", "## Headline (auto vs the best static mode and the per-phase oracle)", ""]
    if headline_rows:
        lines += [
            "| workload | policy | score | best static | its score | oracle | vs best static | vs oracle |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for h in headline_rows:
            lines.append(
                f"| {h['workload']} | {h['policy']} | {_fmt(h['score'], 4)} | {h['best_static']} "
                f"| {_fmt(h['best_static_score'], 4)} | {_fmt(h['oracle_score'], 4)} "
                f"| {_fmt(h['vs_best_static'])} | {_fmt(h['vs_oracle'])} |"
            )
    else:
        lines.append("No auto run with a static run beside it: no headline.")
    lines += phase_sections(records)
    lines += learned_section(learned, records)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(records: list[CellRecord], path: Path) -> bool:
    base = baselines(records)
    workloads = list(dict.fromkeys(r.workload for r in records))
    specs = sorted({r.spec for r in records}, key=_order)
    values = {
        (w, s): _mean(normalised(r, base) for r in records if r.workload == w and r.spec == s and r.ok)
        for w in workloads
        for s in specs
    }
    if not any(v is not None for v in values.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(workloads) * max(1, len(specs)) / 3), 4.5))
    width = 0.8 / max(1, len(specs))
    for k, spec in enumerate(specs):
        xs = [i + k * width for i in range(len(workloads))]
        ys = [values[(w, spec)] or 0.0 for w in workloads]
        ax.bar(xs, ys, width, label=spec.label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + width * (len(specs) - 1) / 2 for i in range(len(workloads))], workloads)
    ax.set_ylabel("score / unreplicated")
    ax.set_title("Normalised score per workload and mode")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _latencies(directory: Path, record: CellRecord) -> list[float]:
    try:
        return [
            float(v) for v in json.loads((directory / "cells" / record.id / "latencies.json").read_text())
        ]
    except (OSError, ValueError):
        return []


def plot_latency_cdfs(directory: Path, records: list[CellRecord], path: Path) -> bool:
    per: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r.ok:
            values = _latencies(directory, r)
            if values:
                per.setdefault(r.workload, {}).setdefault(r.spec.label, []).extend(values)
    if not per:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(per), figsize=(5 * len(per), 4), squeeze=False)
    for ax, (workload, modes) in zip(axes[0], per.items(), strict=False):
        for label, values in modes.items():
            ordered = sorted(values)
            n = len(ordered)
            ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(workload)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def trace_points(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Per decision-trace line: time, applied mode, the decision's reason and signal, and that signal's
    last value in the window the policy saw (what the timeline plot shows; a few dozen bytes a line,
    where the raw line holds the whole window)."""
    points = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            continue
        decision = data.get("decision") or {}
        signal = decision.get("signal")
        series = ((data.get("window") or {}).get("signals") or {}).get(signal) if signal else None
        value = next((v for v in reversed(series) if v is not None), None) if series else None
        points.append(
            {
                "t": float(data["t"]),
                "applied": (data.get("applied") or {}).get("mode"),
                "reason": decision.get("reason"),
                "signal": signal,
                "value": value,
            }
        )
    return points


def load_trace_points(cell_dir: Path, timeline: dict[str, Any]) -> list[dict[str, Any]]:
    """The cell's decision points: from its raw ``decisions.jsonl`` when kept, else the compact copy
    the runner put in ``timeline.json`` (raw traces are too big to commit)."""
    try:
        return trace_points((cell_dir / "decisions.jsonl").read_text().splitlines())
    except OSError:
        return list(timeline.get("decisions") or [])


def plot_timeline(cell_dir: Path, title: str, path: Path) -> bool:
    try:
        timeline = json.loads((cell_dir / "timeline.json").read_text())
    except (OSError, ValueError):
        return False
    t0 = float(timeline["t0"])
    modes = timeline.get("modes") or []
    points = load_trace_points(cell_dir, timeline)
    if not modes and not points:
        return False
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[1, 2])
    level = {"mc": 0, "colo": 1, "unprotected": -1}
    if modes:
        top.step([m["t"] - t0 for m in modes], [level.get(m["mode"], -1) for m in modes], where="post")
    top.set_yticks([-1, 0, 1], ["none", "MC", "COLO"])
    top.set_title(title, pad=18)
    for phase in timeline.get("phases") or []:
        x = phase["t"] - t0
        for ax in (top, bottom):
            ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
        top.annotate(
            phase["name"],
            (x, 1.02),
            xycoords=("data", "axes fraction"),
            fontsize="x-small",
            annotation_clip=False,
        )
    signals = sorted({p["signal"] for p in points if p["signal"]})
    for name in signals:
        xs = [p["t"] - t0 for p in points if p["signal"] == name and p["value"] is not None]
        ys = [p["value"] for p in points if p["signal"] == name and p["value"] is not None]
        if xs:
            bottom.plot(xs, ys, marker=".", linewidth=0.8, label=name)
    previous = None
    for p in points:
        if previous is not None and p["applied"] != previous:
            x = p["t"] - t0
            bottom.axvline(x, color="red", linewidth=0.8)
            bottom.annotate((p["reason"] or "")[:60], (x, 0.95), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize="xx-small", va="top")  # fmt: skip
        previous = p["applied"]
    bottom.set_xlabel("seconds since the workload started")
    bottom.set_ylabel("driving signal")
    if signals:
        bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(directory: Path) -> Path:
    """Write ``report.md`` and the plots into ``directory`` (also refreshes cells.csv, headline.json)."""
    records = load_cells(directory)
    write_csv(directory, records)
    write_headline(directory, headline(records))
    plots: list[str] = []
    if plot_scores(records, directory / "score.png"):
        plots.append("score.png")
    if plot_latency_cdfs(directory, records, directory / "latency_cdf.png"):
        plots.append("latency_cdf.png")
    autos = [r for r in records if r.mode == "auto" and r.ok]
    # the first repetition of every policy on the phased workload first
    autos.sort(key=lambda r: (r.workload != "phased", r.rep, r.workload, r.policy or ""))
    for r in autos[:8]:
        name = f"timeline-{r.id}.png"
        if plot_timeline(
            directory / "cells" / r.id, f"{r.workload}, auto {r.policy}, rep {r.rep}", directory / name
        ):
            plots.append(name)
    headline_rows = json.loads((directory / HEADLINE_JSON).read_text())
    learned_path = directory / LEARNED_JSON
    learned = json.loads(learned_path.read_text()) if learned_path.exists() else None
    path = directory / REPORT_MD
    path.write_text(markdown(records, plots, headline_rows, learned))
    return path
