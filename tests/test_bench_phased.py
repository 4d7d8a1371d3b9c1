"""``hybridft bench phased``'s evaluation without a pair: the mode timeline, the better mode per phase,
the per-phase rows and the switches read back from a decision trace."""

from __future__ import annotations

import json
import math
from pathlib import Path

from click.testing import CliRunner

from bench.cli import bench
from experiments.phased_bench import (
    ModeSample,
    PolicyRun,
    better_modes,
    format_table,
    mode_at,
    mode_changes,
    phase_rows,
    start_point,
    time_to_mode,
    traced_decisions,
)
from experiments.workload import PhaseResult

TIMELINE = [
    ModeSample(10.0, "mc", 50, False),
    ModeSample(11.0, "mc", 50, False),
    ModeSample(12.0, "colo", 50, False),
    ModeSample(20.0, "colo", 50, False),
    ModeSample(21.5, "mc", 40, False),
    ModeSample(30.0, "mc", 40, False),
]


def test_the_timeline_says_when_the_mode_changed() -> None:
    assert (
        mode_at(TIMELINE, 9.0) is None
        and mode_at(TIMELINE, 12.5) == "colo"
        and mode_at(TIMELINE, 21.5) == "mc"
    )
    assert mode_changes(TIMELINE, 0, 100) == [(12.0, "mc", "colo"), (21.5, "colo", "mc")]
    assert mode_changes(TIMELINE, 12.5, 21.5) == []
    assert time_to_mode(TIMELINE, "colo", 10.5, 20.0) == 1.5
    assert time_to_mode(TIMELINE, "colo", 12.5, 20.0) == 0.0  # already there
    assert time_to_mode(TIMELINE, "mc", 13.0, 21.0) is None  # not before the end
    assert start_point("static-colo")[0] == "colo" and start_point("cost-model") == ("mc", 10)


def _run(policy: str, rates: list[float], timeline: list[ModeSample]) -> PolicyRun:
    phases = [
        PhaseResult(name, 10.0 * k, 10.0 * (k + 1), rate * 10.0, (1.0, 2.0, 30.0))
        for k, (name, rate) in enumerate(zip(["net-rr", "net-divergent"], rates, strict=True))
    ]
    return PolicyRun(policy, phases, [10.0, 20.0], 30.0, timeline, [], [])


def test_the_better_mode_is_the_one_with_more_requests_per_second() -> None:
    mc = _run("static-mc", [50.0, 80.0], [])
    colo = _run("static-colo", [90.0, 20.0], [])
    assert better_modes(mc, colo) == ["colo", "mc"]
    rows = phase_rows(_run("cost-model", [85.0, 75.0], TIMELINE), ["colo", "mc"])
    first, second = rows
    assert (first.time_to_better_s, first.switches, first.mode_at_end) == (2.0, 1, "colo")
    assert (second.time_to_better_s, second.switches, second.mode_at_end) == (1.5, 1, "mc")
    assert first.rate_per_s == 85.0 and first.p50_ms == 2.0 and first.p99_ms == 30.0
    assert math.isclose(first.colo_share, 1 / 3)  # polled at 10, 11 (mc) and 12 (colo)
    table = format_table(rows)
    assert "cost-model" in table and "net-divergent" in table and len(table.splitlines()) == 3


def test_switches_are_read_back_from_the_trace(tmp_path: Path) -> None:
    trace = tmp_path / "decisions.jsonl"

    def record(t: float, policy: str, kind: str, mode: str) -> str:
        decision = {
            "mode": mode,
            "epoch_ms": 40,
            "reason": f"div.per_s=3 > 1 ({mode})",
            "signal": "div.per_s",
        }
        point = {"mode": mode, "epoch_ms": 40, "passive_secondary": False}
        return json.dumps(
            {"t": t, "policy": policy, "decision": decision, "verdict": {"kind": kind, "point": point}}
        )

    trace.write_text(
        "\n".join(
            [
                record(5.0, "cost-model", "apply", "colo"),  # before this run
                record(11.0, "cost-model", "hold", "colo"),
                record(12.0, "cost-model", "apply", "colo"),
                record(13.0, "gilbert", "apply", "mc"),  # another policy
                '{"t": 14.0, "policy": "cost-mo',  # cut by a crash
            ]
        )
    )
    decisions = traced_decisions(trace, "cost-model", since=10.0)
    assert [(d.t, d.kind) for d in decisions] == [(11.0, "hold"), (12.0, "apply")]
    (applied,) = PolicyRun("cost-model", [], [], 0.0, [], decisions, []).applied
    assert (applied.t, applied.mode, applied.signal) == (12.0, "colo", "div.per_s")
    assert applied.reason.startswith("div.per_s=3")
    assert traced_decisions(tmp_path / "absent.jsonl", "cost-model", 0.0) == []


def test_the_bench_is_registered() -> None:
    result = CliRunner().invoke(bench, ["phased", "--help"])
    assert result.exit_code == 0 and "--phase-s" in result.output and "--dirty-mib-s" in result.output
