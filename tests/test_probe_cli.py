"""``python -m experiments.probe workload``: what ``make demo`` drives against its pair.  Bad input is
named and nothing runs (the real-pair path is the demo's; the workloads themselves are tested in
test_net_workloads)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from experiments.probe import main
from tests.test_manifest import manifest_for


def test_a_workdir_without_pair_json_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["workload", "net-rr", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "pair.json" in result.output, result.output


def test_an_unknown_workload_is_refused_with_the_allowed_names(tmp_path: Path) -> None:
    manifest_for(tmp_path).write(tmp_path / "pair.json")
    result = CliRunner().invoke(main, ["workload", "net-nonsense", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "net-divergent" in result.output, result.output
    assert not result.output.lstrip().startswith("{")  # no result line for a workload that never ran
