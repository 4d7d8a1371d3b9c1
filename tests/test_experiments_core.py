"""The experiment runner's pure parts: config, matrix, results and resume, meter, headline/oracle, report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from experiments import catalog, runner
from experiments.config import Cell, ConfigError, ModeSpec, hold_out, pair_groups, parse_config
from experiments.guest_workloads import (
    CPUBURN_LINE,
    MEMDIRTY_LINE,
    MEMDIRTY_START,
    DiskStreamChecker,
    ReportLog,
)
from experiments.headline import headline, write_headline
from experiments.meter import PairMeter
from experiments.report import write_report
from experiments.results import (
    CSV_COLUMNS,
    CellRecord,
    PhaseRecord,
    append_cell,
    finished_ids,
    load_cells,
    write_csv,
)

GOOD: dict[str, Any] = {
    "seconds": 5,
    "repetitions": 2,
    "workloads": ["cpu", "memdirty-64", "disk"],
    "modes": {"unreplicated": True, "mc": [20, 100], "colo": True, "auto": ["gilbert"]},
}


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


# ------------------------------------------------------------------------------------------- config
def test_a_good_config_expands_to_every_cell_grouped_by_rep_and_mode() -> None:
    config = parse_config(GOOD)
    labels = [s.label for s in config.modes]
    assert labels == ["unreplicated", "mc-20", "mc-100", "colo", "auto-gilbert"]
    cells = config.cells()
    assert len(cells) == 3 * 5 * 2
    assert len({c.id for c in cells}) == len(cells)
    groups = pair_groups(cells, reuse_pair=True)
    assert len(groups) == 5 * 2 and all(len(g) == 3 for g in groups)
    assert all(len({(c.rep, c.spec) for c in g}) == 1 for g in groups)
    assert len(pair_groups(cells, reuse_pair=False)) == len(cells)
    assert cells[0].id == "cpu__unreplicated__rep1"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (with_(repetitons=2), "unknown key 'repetitons' (allowed: seconds, repetitions"),
        (with_(seconds=0), "seconds = 0: must be a number in 1..3600"),
        (with_(seconds="10"), "seconds = '10': must be a number"),
        (with_(repetitions=1.5), "repetitions = 1.5: must be an integer in 1..100"),
        (with_(phase_seconds=-1), "phase_seconds = -1"),
        (with_(workloads=["cpu", "gpu"]), "unknown workload 'gpu' (allowed: cpu, disk, net-rr"),
        (with_(workloads=["memdirty-0"]), "memdirty rate 0 is outside 1..4096"),
        (with_(workloads=[]), "workloads = []: must be a non-empty list"),
        (with_(workloads=["cpu", "cpu"]), "listed twice"),
        (with_(modes={"mc": [0]}), "modes.mc epoch = 0: must be an integer in 1..600000"),
        (with_(modes={"mc": 20}), "modes.mc = 20: must be a list"),
        (with_(modes={"colo": "yes"}), "modes.colo = 'yes': must be true or false"),
        (with_(modes={"auto": ["nosuch"]}), "unknown policy 'nosuch' (allowed: static-mc"),
        (with_(modes={"replicated": True}), "unknown key modes.replicated (allowed: unreplicated, mc"),
        (with_(modes={}), "selects no mode"),
        (with_(reuse_pair=1), "reuse_pair = 1: must be true or false"),
        ({k: v for k, v in GOOD.items() if k != "modes"}, "missing [modes]"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_the_shipped_configs_parse() -> None:
    from experiments.config import load_config

    root = Path(__file__).resolve().parent.parent / "experiments" / "configs"
    quick, full = load_config(root / "quick.toml"), load_config(root / "full.toml")
    assert {s.mode for s in full.modes} == {"unreplicated", "mc", "colo", "auto"}
    assert "gilbert" in {s.policy for s in full.modes}
    assert "phased" in full.workloads and len(quick.cells()) < len(full.cells())


# ------------------------------------------------------------------------------------------ catalog
def test_catalog_names_and_a_missing_module_is_an_error_for_that_workload(monkeypatch: Any) -> None:
    assert catalog.name_problem("memdirty-128") is None
    assert "unknown workload" in str(catalog.name_problem("memdirty"))
    assert catalog.build("memdirty-16", phase_seconds=5).name == "memdirty-16"
    assert catalog.build("cpu", phase_seconds=5).name == "cpu"
    monkeypatch.setitem(catalog.FIXED, "net-rr", ("experiments.no_such_module", "NetRR"))
    with pytest.raises(catalog.CatalogError, match="not available in this checkout"):
        catalog.build("net-rr", phase_seconds=5)


def test_catalog_hands_the_phase_length_to_a_phased_workload(monkeypatch: Any) -> None:
    import types

    class FakePhased:
        name, unit = "phased", "requests"

        def __init__(self, phase_s: float = 15.0) -> None:
            self.phase_s = phase_s

        def run(self, target: Any, seconds: float, on_phase: Any = None) -> Any:
            raise NotImplementedError

    module = types.ModuleType("fake_phased")
    module.Phased = FakePhased  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_phased", module)
    monkeypatch.setitem(catalog.FIXED, "phased", ("fake_phased", "Phased"))
    assert catalog.build("phased", phase_seconds=7.5).phase_s == 7.5  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------- guest parsers
def test_report_log_checks_every_line_and_that_totals_never_go_back() -> None:
    log = ReportLog(CPUBURN_LINE)
    log.feed("cpuburn: rounds=1\ncpuburn: rounds=5\n")
    assert log.totals == [1, 5] and not log.errors
    log.feed("cpuburn: rounds=5\ncpuburn: rounds=4\ngarbage\n")
    assert log.totals == [5, 4]
    assert any("went back" in e for e in log.errors) and any(
        "not the program's format" in e for e in log.errors
    )
    mem = ReportLog(MEMDIRTY_LINE, MEMDIRTY_START)
    mem.feed(
        "memdirty: started rate=64.0 MiB/s working_set=16384 pages\n"
        "memdirty: pages=100 mib_per_s=1.56\nmemdirty: pages=300 mib_per_s=3.13\n"
    )
    assert mem.totals == [100, 300] and not mem.errors
    mem.feed("memdirty: pages=100 mib_per_s=1.56\nmemdirty: started rate=64.0 MiB/s working_set=1 pages\n")
    assert mem.errors  # the header is only allowed first


def test_disk_stream_checker_accepts_exactly_run_then_consecutive_numbers() -> None:
    checker = DiskStreamChecker()
    assert checker.feed(b"RUN 1a2b\n1\n2") == 1
    assert checker.feed(b"\n3\n") == 2
    assert checker.run == 0x1A2B and checker.records == 3 and not checker.errors
    checker.feed(b"5\n")
    assert checker.errors == ["diskwriter sent b'5', expected b'4'"]
    full = DiskStreamChecker()
    full.feed(b"RUN ff\n1\nFULL\n")
    assert full.records == 1 and full.errors == ["diskwriter: the disk is full"]
    bad = DiskStreamChecker()
    bad.feed(b"HELLO\n")
    assert bad.errors and bad.records == 0


# -------------------------------------------------------------------------------------------- meter
def _status(mode: str, committed: int, switches: int, div: int, ram: float | None = None) -> dict[str, Any]:
    return {
        "state": "protected",
        "mode": mode,
        "epoch_ms": 20,
        "checkpoints": {"committed": committed, "mode_switches": switches},
        "divergences": {"payload": div},
        "signals": {"mem.ram_bytes_per_ckpt": ram, "ckpt.per_s": 10.0},
    }


def test_meter_turns_polled_status_and_history_into_the_cells_figures() -> None:
    meter = PairMeter(wall_start=1000.0)
    meter.feed_status(10.0, _status("mc", 100, 3, 7, ram=2e6))
    meter.feed_status(12.0, _status("mc", 140, 3, 7, ram=4e6))
    meter.feed_status(13.0, _status("colo", 150, 4, 10))
    meter.feed_status(14.0, _status("colo", 150, 4, 12))
    meter.feed_history([
        {"number": 1, "started": 999.0, "primary_pause_ms": 500.0},  # before the cell: not counted
        {"number": 2, "started": 1001.0, "primary_pause_ms": 10.0},
        {"number": 3, "started": 1002.0, "primary_pause_ms": 30.0},
    ])  # fmt: skip
    meter.feed_history([{"number": 3, "started": 1002.0, "primary_pause_ms": 30.0}])  # a repeat
    figures = meter.summary()
    assert figures["checkpoints_per_s"] == pytest.approx(50 / 4)
    assert figures["divergences"] == 5 and figures["switches"] == 1
    assert figures["time_in_mode_s"] == {"mc": 3.0, "colo": 1.0}
    assert figures["pause_p50_ms"] == 30.0 and figures["pause_p99_ms"] == 30.0
    assert figures["bytes_per_checkpoint"] == pytest.approx(3e6)
    assert figures["replication_mb_s"] == pytest.approx(30.0)  # mean(2e6, 4e6) x 10/s


# ---------------------------------------------------------------------------- results and headline
def cell(
    workload: str, spec: ModeSpec, rep: int, phases: list[float] | None, *, ok: bool = True
) -> CellRecord:
    """A cell whose phases (10 s each) scored ``phases`` units/s."""
    records = tuple(
        PhaseRecord(f"p{i}", 10.0 * i, 10.0 * (i + 1), s * 10.0, s) for i, s in enumerate(phases or [])
    )
    score = math.exp(sum(math.log(s) for s in phases) / len(phases)) if phases else None
    return CellRecord(
        id=Cell(workload, spec, rep).id,
        workload=workload,
        mode=spec.mode,
        policy=spec.policy,
        epoch_ms=spec.epoch_ms,
        rep=rep,
        ok=ok,
        error=None if ok else "boom",
        unit="requests",
        score=score if ok else None,
        phases=records,
        latency_p50_ms=1.0,
    )


UNREP, MC20, MC100 = ModeSpec("unreplicated"), ModeSpec("mc", 20), ModeSpec("mc", 100)
COLO, GILBERT = ModeSpec("colo"), ModeSpec("auto", policy="gilbert")


def synthetic() -> list[CellRecord]:
    return [
        cell("phased", UNREP, 1, [20.0, 20.0]),
        cell("phased", MC20, 1, [10.0, 1.0]),
        cell("phased", MC20, 2, [10.0, 1.0]),
        cell("phased", MC100, 1, [6.0, 2.0]),
        cell("phased", COLO, 1, [1.0, 9.0]),
        cell("phased", COLO, 2, [3.0, 7.0]),  # colo phase means: (2, 8)
        cell("phased", GILBERT, 1, [8.0, 6.0]),
        cell("phased", GILBERT, 2, [8.0, 6.0]),
        cell("cpu", UNREP, 1, [100.0]),
        cell("cpu", MC20, 1, [70.0]),
        cell("cpu", COLO, 1, [80.0]),
        cell("cpu", COLO, 2, None, ok=False),
        cell("cpu", GILBERT, 1, [75.0]),
    ]


def test_headline_and_oracle_by_hand() -> None:
    rows = {(r.workload, r.policy): r for r in headline(synthetic())}
    phased = rows[("phased", "gilbert")]
    # static means: mc-20 sqrt(10*1)=3.162, mc-100 sqrt(12)=3.464, colo mean(sqrt(9), sqrt(21))=3.791
    colo = (3.0 + math.sqrt(21.0)) / 2
    assert phased.best_static == "colo" and phased.best_static_score == pytest.approx(colo)
    # oracle: phase 0 best is mc-20 (10), phase 1 best is colo (mean 8): sqrt(80)
    assert phased.oracle_phases == ("mc-20", "colo")
    assert phased.oracle_score == pytest.approx(math.sqrt(80.0))
    assert phased.score == pytest.approx(math.sqrt(48.0))
    assert phased.vs_best_static == pytest.approx(math.sqrt(48.0) / colo)
    assert phased.vs_oracle == pytest.approx(math.sqrt(48.0 / 80.0))
    steady = rows[("cpu", "gilbert")]  # one phase: the oracle is the best static (the failed run ignored)
    assert steady.best_static == "colo"
    assert steady.best_static_score == pytest.approx(80.0) and steady.oracle_score == pytest.approx(80.0)
    assert steady.vs_best_static == pytest.approx(75.0 / 80.0)


def test_results_round_trip_resume_and_csv(tmp_path: Path) -> None:
    records = synthetic()
    for r in records:
        append_cell(tmp_path, r)
    with (tmp_path / "cells.jsonl").open("a") as out:
        out.write('{"id": "torn')  # a kill in the middle of a write
    loaded = load_cells(tmp_path)
    assert loaded == records
    assert finished_ids(loaded) == {r.id for r in records if r.ok}
    retried = cell("cpu", COLO, 2, [90.0])
    append_cell(tmp_path, retried)  # a rerun: the newest line of a cell wins
    assert {r.id: r for r in load_cells(tmp_path)}[retried.id].ok
    write_csv(tmp_path, load_cells(tmp_path))
    lines = (tmp_path / "cells.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert tuple(header) == CSV_COLUMNS
    assert header[:7] == ["workload", "mode", "policy", "epoch_ms", "rep", "score", "normalised"]
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert len(rows) == len(records)
    mc = next(r for r in rows if r["workload"] == "cpu" and r["mode"] == "mc")
    assert (mc["epoch_ms"], float(mc["normalised"])) == ("20", pytest.approx(0.7))
    write_headline(tmp_path, headline(load_cells(tmp_path)))
    data = json.loads((tmp_path / "headline.json").read_text())
    assert isinstance(data, list) and {d["workload"] for d in data} == {"phased", "cpu"}
    assert set(data[0]) >= {
        "workload", "policy", "score", "best_static", "best_static_score", "oracle_score",
        "vs_best_static", "vs_oracle",
    }  # fmt: skip


def test_a_learned_policy_is_not_run_on_the_workloads_it_was_trained_on() -> None:
    config = parse_config(with_(modes={"colo": True, "auto": ["gilbert", "learned"]}))
    kept, left_out = hold_out(config.cells(), {"learned": ("disk", "memdirty-64")})
    assert {c.id for c in left_out} == {
        f"{w}__auto-learned__rep{r}" for w in ("disk", "memdirty-64") for r in (1, 2)
    }
    assert len(kept) + len(left_out) == len(config.cells())
    # the other policies and the static modes run every workload; learned the rest
    assert {c.workload for c in kept if c.spec.policy == "gilbert"} == set(config.workloads)
    assert {c.workload for c in kept if c.spec.policy == "learned"} == {"cpu"}
    assert hold_out(config.cells(), {})[0] == config.cells()


# ---------------------------------------------------------------------------------------- report
def test_report_renders_markdown_and_pngs_from_a_results_directory(tmp_path: Path) -> None:
    records = synthetic()
    for r in records:
        append_cell(tmp_path, r)
        cell_dir = tmp_path / "cells" / r.id
        cell_dir.mkdir(parents=True)
        (cell_dir / "latencies.json").write_text(json.dumps([1.0, 2.0, 3.0, 10.0]))
    auto_dir = tmp_path / "cells" / "phased__auto-gilbert__rep1"
    (auto_dir / "timeline.json").write_text(
        json.dumps(
            {
                "t0": 100.0,
                "phases": [
                    {"index": 0, "name": "net-rr", "t": 100.5},
                    {"index": 1, "name": "disk", "t": 110.5},
                ],
                "modes": [
                    {"t": 100.0 + i, "mode": "mc" if i < 11 else "colo", "epoch_ms": 20} for i in range(20)
                ],
            }
        )
    )
    trace = []
    for i in range(20):
        mode = "mc" if i < 11 else "colo"
        trace.append(
            json.dumps(
                {
                    "t": 100.0 + i,
                    "window": {"t": [99.0 + i, 100.0 + i], "signals": {"div.per_s": [None, float(20 - i)]}},
                    "decision": {
                        "mode": mode,
                        "epoch_ms": 20,
                        "reason": f"div.per_s={20 - i}",
                        "signal": "div.per_s",
                    },
                    "applied": {"mode": mode, "epoch_ms": 20, "passive_secondary": False},
                }
            )
        )
    (auto_dir / "decisions.jsonl").write_text("\n".join(trace) + "\n")
    (tmp_path / "learned.json").write_text(
        json.dumps({"model": "/x/learned.skops", "source": "train-steady", "samples": 812,
                    "trained_on": ["net-rr", "memdirty-64"],
                    "held_out_cells": ["net-rr__auto-learned__rep1"]})
    )  # fmt: skip
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| phased | auto-gilbert | 2/2 |" in text and "| cpu | colo | 1/2 |" in text
    assert "trained on 812 decision windows of the workloads `net-rr`, `memdirty-64`" in text
    assert "its 1 cells on its training workloads were not run" in text
    for png in ("score.png", "latency_cdf.png", "timeline-phased__auto-gilbert__rep1.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in text
    assert (tmp_path / "cells.csv").exists() and (tmp_path / "headline.json").exists()


def test_latency_sample_keeps_the_cdf_shape_within_its_bound() -> None:
    values = [float(v) for v in range(100_000, 0, -1)]
    kept = runner.latency_sample(values, keep=1001)
    assert len(kept) == 1001 and kept == sorted(kept)
    assert (kept[0], kept[500], kept[-1]) == (1.0, 50_001.0, 100_000.0)  # rank round(500 * 99.999)
    assert runner.latency_sample([3.0, 1.0]) == [1.0, 3.0]


def test_the_timeline_plot_works_from_the_compact_decisions_when_the_raw_trace_is_gone(
    tmp_path: Path,
) -> None:
    from experiments.report import plot_timeline, trace_points

    line = json.dumps({
        "t": 105.0,
        "window": {"t": [104.0, 105.0], "signals": {"div.per_s": [1.0, None]}},
        "decision": {"mode": "colo", "epoch_ms": 20, "reason": "few divergences", "signal": "div.per_s"},
        "applied": {"mode": "colo", "epoch_ms": 20, "passive_secondary": False},
    })  # fmt: skip
    points = trace_points([line, line.replace('"t": 105.0', '"t": 106.0')])
    assert points[0] == {
        "t": 105.0,
        "applied": "colo",
        "reason": "few divergences",
        "signal": "div.per_s",
        "value": 1.0,
    }
    timeline = {"t0": 100.0, "phases": [], "modes": [{"t": 100.0, "mode": "mc"}], "decisions": points}
    (tmp_path / "timeline.json").write_text(json.dumps(timeline))
    assert plot_timeline(tmp_path, "compact", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- runner (pair and cells faked)
class FakePairs:
    """Stands in for pair_up/pair_down/run_cell: records what ran; can fail or be interrupted."""

    def __init__(self, fail: set[str] | None = None, interrupt_at: str | None = None) -> None:
        self.ups: list[str] = []
        self.downs = 0
        self.ran: list[str] = []
        self.evidence: list[str] = []
        self.fail = fail or set()
        self.interrupt_at = interrupt_at

    def install(self, monkeypatch: Any) -> None:
        monkeypatch.setattr(runner, "pair_up", self.pair_up)
        monkeypatch.setattr(runner, "pair_down", self.pair_down)
        monkeypatch.setattr(runner, "run_cell", self.run_cell)
        monkeypatch.setattr(runner, "keep_evidence", self.keep_evidence)

    def pair_up(self, workdir: Path, spec: ModeSpec) -> runner.LivePair:
        self.ups.append(spec.label)
        return runner.LivePair(workdir, spec, handle=None)

    def pair_down(self, live: runner.LivePair) -> None:
        self.downs += 1

    def keep_evidence(self, live: runner.LivePair, cell_dir: Path) -> None:
        self.evidence.append(cell_dir.name)

    def run_cell(
        self, live: runner.LivePair, c: Cell, workload: Any, config: Any, cell_dir: Path
    ) -> CellRecord:
        if c.id == self.interrupt_at:
            raise KeyboardInterrupt
        self.ran.append(c.id)
        if c.id in self.fail:
            raise RuntimeError("the guest did not answer")
        return cell(c.workload, c.spec, c.rep, [50.0])


def small_config() -> Any:
    return parse_config(
        {"seconds": 1, "workloads": ["cpu", "disk"], "modes": {"unreplicated": True, "colo": True}}
    )


def test_runner_resumes_after_an_interrupt_and_runs_nothing_when_done(
    tmp_path: Path, monkeypatch: Any
) -> None:
    config = small_config()
    fake = FakePairs(interrupt_at="cpu__colo__rep1")
    fake.install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(config, tmp_path)
    assert fake.ran == ["cpu__unreplicated__rep1", "disk__unreplicated__rep1"]
    assert fake.ups == ["unreplicated", "colo"] and fake.downs == 2  # the interrupted pair is down too
    again = FakePairs()
    again.install(monkeypatch)
    assert runner.run_experiment(config, tmp_path) == (2, 0)
    assert again.ran == ["cpu__colo__rep1", "disk__colo__rep1"]
    last = FakePairs()
    last.install(monkeypatch)
    assert runner.run_experiment(config, tmp_path) == (0, 0)
    assert last.ran == [] and last.ups == []
    assert len((tmp_path / "cells.csv").read_text().splitlines()) == 1 + 4


def test_a_failed_cell_is_recorded_its_pair_replaced_and_the_matrix_goes_on(
    tmp_path: Path, monkeypatch: Any
) -> None:
    config = small_config()
    fake = FakePairs(fail={"cpu__unreplicated__rep1"})
    fake.install(monkeypatch)
    assert runner.run_experiment(config, tmp_path) == (4, 1)
    assert fake.ups == ["unreplicated", "unreplicated", "colo"]  # a fresh pair after the failure
    assert fake.evidence == ["cpu__unreplicated__rep1"]  # its logs kept before it went down
    failed = {r.id: r for r in load_cells(tmp_path)}["cpu__unreplicated__rep1"]
    assert not failed.ok and failed.error == "RuntimeError: the guest did not answer"
    retry = FakePairs()
    retry.install(monkeypatch)
    assert runner.run_experiment(config, tmp_path) == (1, 0)  # only the failed cell runs again
    assert retry.ran == ["cpu__unreplicated__rep1"]


def test_a_workload_that_cannot_be_built_fails_alone_without_a_pair(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setitem(catalog.FIXED, "net-rr", ("experiments.no_such_module", "NetRR"))
    config = parse_config({"seconds": 1, "workloads": ["net-rr", "cpu"], "modes": {"colo": True}})
    fake = FakePairs()
    fake.install(monkeypatch)
    assert runner.run_experiment(config, tmp_path) == (2, 1)
    assert fake.ran == ["cpu__colo__rep1"] and fake.ups == ["colo"] and fake.downs == 1
    error = {r.id: r for r in load_cells(tmp_path)}["net-rr__colo__rep1"].error
    assert "experiments.no_such_module is not available" in str(error)


def test_a_directory_holds_one_experiment(tmp_path: Path, monkeypatch: Any) -> None:
    FakePairs().install(monkeypatch)
    runner.run_experiment(small_config(), tmp_path)
    other = parse_config({"seconds": 2, "workloads": ["cpu"], "modes": {"colo": True}})
    with pytest.raises(runner.RunnerError, match="use another --out"):
        runner.run_experiment(other, tmp_path)


def test_cli_reports_a_config_error_and_exits_non_zero(tmp_path: Path) -> None:
    from experiments.cli import experiment

    bad = tmp_path / "bad.toml"
    bad.write_text('seconds = 5\nworkloads = ["cpu"]\n[modes]\nmc = [0]\n')
    result = CliRunner().invoke(experiment, ["run", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "modes.mc epoch = 0: must be an integer in 1..600000" in result.output


# ------------------------------------------------------------------------------ a live run vs reference
PROBE = {
    "t0": 500.0,
    "phases": [
        {"name": "p0", "start_s": 0.0, "seconds": 10.0, "per_s": 9.0},
        {"name": "p1", "start_s": 10.0, "seconds": 10.0, "per_s": 4.0},
    ],
}


def test_a_live_phased_run_beside_the_reference_runs_phases_by_hand(tmp_path: Path) -> None:
    from experiments.versus import ProbeError, live_phases, reference_columns, summary_rows, timeline_of

    probe = PROBE
    live = live_phases(probe)
    columns = reference_columns(synthetic(), "phased", ["p0", "p1"])
    # phase means over repetitions: colo (2, 8); the oracle per phase: mc-20's 10, then colo's 8
    assert columns["colo"] == [2.0, 8.0] and columns["mc-20"] == [10.0, 1.0]
    assert columns["oracle"] == [10.0, 8.0] and columns["auto-gilbert"] == [8.0, 6.0]
    rows = summary_rows(live, {"colo": columns["colo"], "oracle": columns["oracle"]})
    assert rows == [["this run", "9.0", "4.0", "6.0"], ["reference: colo", "2.0", "8.0", "4.0"],
                    ["reference: oracle", "10.0", "8.0", f"{math.sqrt(80):.1f}"]]  # fmt: skip
    # a reference run with other phases lines up with nothing
    assert reference_columns(synthetic(), "phased", ["net-rr", "net-divergent"]) == {}
    with pytest.raises(ProbeError, match="no phases"):
        live_phases({"probe": "workload"})
    with pytest.raises(ProbeError, match=r"phase 1 .* malformed"):
        live_phases({"phases": [probe["phases"][0], {"name": "p1"}]})
    trace = [
        json.dumps({"t": 500.0 + i, "applied": {"mode": "mc" if i < 12 else "colo"}}) for i in range(-5, 30)
    ]
    timeline, kept = timeline_of([*trace, "not json"], 500.0, live)
    assert [p["t"] for p in timeline["phases"]] == [500.0, 510.0]
    assert len(kept) == 23 and timeline["modes"][0] == {"t": 499.0, "mode": "mc"}  # 1 s either side


def test_experiment_versus_prints_the_table_and_draws_the_live_timeline(tmp_path: Path) -> None:
    reference = tmp_path / "ref"
    reference.mkdir()
    for r in synthetic():
        append_cell(reference, r)
    probe = PROBE
    probe_path = tmp_path / "probe.json"
    probe_path.write_text(json.dumps(probe) + "\n")
    workdir = tmp_path / "pair"
    workdir.mkdir()
    decisions = [{"t": 500.0 + i, "applied": {"mode": "mc" if i < 12 else "colo"},
                  "decision": {"reason": "x", "signal": "div.per_s"},
                  "window": {"signals": {"div.per_s": [1.0]}}} for i in range(20)]  # fmt: skip
    (workdir / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    plot = tmp_path / "out" / "timeline.png"
    args = ["versus", str(probe_path), "--reference", str(reference), "--policy", "auto cost-model",
            "--workdir", str(workdir), "--plot", str(plot)]  # fmt: skip
    from experiments.cli import experiment

    result = CliRunner().invoke(experiment, args)
    assert result.exit_code == 0, result.output
    assert "reference: colo" in result.output and "this run: auto" in result.output
    assert "phase 1: p1" in result.output and "not measured now" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {plot.resolve()}" in result.output
    bad = CliRunner().invoke(experiment, ["versus", str(probe_path), "--reference", str(tmp_path)])
    assert bad.exit_code != 0 and "has no ok runs of phased with these phases" in bad.output
    other = CliRunner().invoke(experiment, [*args[:4], "--workload", "cpu"])  # one phase, not two
    assert other.exit_code != 0 and "no ok runs of cpu with these phases" in other.output
