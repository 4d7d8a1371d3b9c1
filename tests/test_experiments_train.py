"""``hybridft experiment train``: windows of auto cells labelled by the oracle's pick for their phase."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from experiments.cli import experiment
from experiments.results import CellRecord, PhaseRecord, append_cell
from experiments.train import labelled_windows, train
from hybridft_common.vocabulary import Mode
from policies.base import Decision
from policies.guard import GuardVerdict, VerdictKind
from policies.learned import ModelError, load_model
from policies.registry import load_policy
from policies.static import StaticMC
from policies.trace import make_record
from policies.window import ProtectionPoint, Window

PHASE_S = 10.0
T0 = 1000.0


def phases(scores: tuple[float, float]) -> tuple[PhaseRecord, ...]:
    return (
        PhaseRecord("net-rr", 0.0, PHASE_S, scores[0] * PHASE_S, scores[0]),
        PhaseRecord("net-divergent", PHASE_S, 2 * PHASE_S, scores[1] * PHASE_S, scores[1]),
    )


def cell(
    mode: str, scores: tuple[float, float], epoch: int | None = None, policy: str | None = None
) -> CellRecord:
    label = {"mc": f"mc-{epoch}", "auto": f"auto-{policy}"}.get(mode, mode)
    return CellRecord(
        id=f"phased__{label}__rep1", workload="phased", mode=mode, policy=policy, epoch_ms=epoch, rep=1,
        ok=True, unit="requests", score=float(np.sqrt(scores[0] * scores[1])), seconds=2 * PHASE_S,
        phases=phases(scores),
    )  # fmt: skip


def window_at(now: float, divergent: bool) -> Window:
    t = now - np.arange(8)[::-1] * 0.25
    signals = {
        "div.per_s": [25.0 if divergent else 0.0] * 8,
        "net.turns_per_s": [300.0 if not divergent else 120.0] * 8,
    }
    return Window(t, ProtectionPoint(Mode.MC, 50, False), signals)


def experiment_dir(tmp_path: Path) -> Path:
    """COLO serves the RPC phase best, MC at 10 ms the divergent one; an auto cell saw both phases."""
    out = tmp_path / "exp"
    out.mkdir()
    append_cell(out, cell("colo", (900.0, 100.0)))
    append_cell(out, cell("mc", (150.0, 300.0), epoch=10))
    auto = cell("auto", (800.0, 280.0), policy="cost-model")
    append_cell(out, auto)
    cell_dir = out / "cells" / auto.id
    cell_dir.mkdir(parents=True)
    timeline = {
        "t0": T0,
        "phases": [{"index": 0, "name": "net-rr", "t": T0}, {"index": 1, "name": "x", "t": T0 + PHASE_S}],
    }
    (cell_dir / "timeline.json").write_text(json.dumps(timeline))
    policy = StaticMC()
    point = ProtectionPoint(Mode.MC, 50, False)
    with open(cell_dir / "decisions.jsonl", "w") as trace:
        for seq, now in enumerate(np.arange(T0 + 0.5, T0 + 2 * PHASE_S, 0.5)):
            window = window_at(float(now), divergent=now > T0 + PHASE_S)
            verdict = GuardVerdict(VerdictKind.HOLD, point, "test")
            trace.write(
                make_record(seq, policy, window, Decision(Mode.MC, 50, "x"), 0.001, verdict).to_line() + "\n"
            )
    return out


def test_windows_inside_a_phase_get_that_phases_oracle_pick(tmp_path: Path) -> None:
    items = list(labelled_windows(experiment_dir(tmp_path), settle_s=1.0, average_s=1.0))
    assert {i.label for i in items if i.phase == 0} == {"colo"}
    assert {i.label for i in items if i.phase == 1} == {"mc-10"}
    # a window that began before a phase change plus the settling time is nobody's
    for item in items:
        start = T0 + item.phase * PHASE_S
        assert item.window.now - 1.0 >= start + 1.0
    assert 20 <= len(items) <= 36


def test_train_writes_a_model_the_policy_loads_and_follows(tmp_path: Path) -> None:
    model_path = tmp_path / "m.skops"
    model = train([experiment_dir(tmp_path)], model_path)
    assert model.samples >= 20 and set(load_model(model_path).labels) == {"colo", "mc-10"}
    # the file keeps what it learned from: an experiment holds those workloads out
    assert model.workloads == load_model(model_path).workloads == ("phased",)
    policy = load_policy("learned", {"model": str(model_path)})
    assert policy.decide(window_at(5000.0, divergent=True)).point == ProtectionPoint(Mode.MC, 10, False)
    assert policy.decide(window_at(5000.0, divergent=False)).mode is Mode.COLO
    result = CliRunner().invoke(
        experiment, ["train", str(tmp_path / "exp"), "--out", str(tmp_path / "cli.skops")]
    )
    assert result.exit_code == 0, result.output
    assert "labels {'colo':" in result.output and (tmp_path / "cli.skops").exists()
    assert "windows from phased," in result.output and "held out" in result.output


def test_a_shipped_run_with_gzipped_traces_trains_the_same_model(tmp_path: Path) -> None:
    out = experiment_dir(tmp_path)
    plain = train([out], tmp_path / "plain.skops")
    for trace in (out / "cells").glob("*/decisions.jsonl"):
        trace.with_name(trace.name + ".gz").write_bytes(gzip.compress(trace.read_bytes()))
        trace.unlink()
    shipped = train([out], tmp_path / "shipped.skops")
    assert shipped.samples == plain.samples >= 20
    assert np.array_equal(shipped.pipeline.steps[-1][1].coef_, plain.pipeline.steps[-1][1].coef_)


def test_a_directory_without_auto_traces_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "static-only"
    out.mkdir()
    append_cell(out, cell("colo", (900.0, 100.0)))
    with pytest.raises(ModelError, match="no labelled windows"):
        train([out], tmp_path / "m.skops")
