"""The decision trace: lines round-trip exactly, and a replay reproduces the recorded decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.policy_cli import policy as policy_group
from hybridft_common.vocabulary import Mode
from policies.base import Decision, Failure, Policy
from policies.cli import format_policy
from policies.guard import GuardConfig
from policies.registry import BUILTINS, load_policy
from policies.trace import TraceError, TraceRecord, read_trace, replay, replay_guarded
from policies.window import ProtectionPoint
from tests.helpers.policy_windows import simulate

SIGNAL_RANGES = {
    "cpu.primary": (0.0, 2.0),
    "cpu.secondary": (0.0, 2.0),
    "cpu.host": (0.0, 1.0),
    "cpu.cores": (1.0, 8.0),
    "mem.dirty_bytes_per_s": (0.0, 2e9),
    "mem.ram_bytes_per_ckpt": (0.0, 5e8),
    "net.turns_per_s": (0.0, 500.0),
    "net.hold_p50_ms": (0.0, 50.0),
    "div.per_s": (0.0, 300.0),
    "div.per_s.timeout": (0.0, 5.0),
    "ckpt.per_s": (0.0, 50.0),
    "ckpt.pause_p50_ms": (1.0, 100.0),
    "ckpt.length_ms": (1.0, 2000.0),
}


@st.composite
def scenarios(draw: st.DrawFn):
    """A synthetic pair: per mode, each signal either absent, constant, or drifting, plus dropouts."""
    shapes = {}
    for name, (low, high) in SIGNAL_RANGES.items():
        kind = draw(st.sampled_from(["absent", "const", "ramp", "flaky"]))
        a = draw(st.floats(low, high))
        b = draw(st.floats(low, high))
        seed = draw(st.integers(0, 2**16))
        shapes[name] = (kind, a, b, seed)

    def scenario(t: float, now: ProtectionPoint) -> dict[str, float | None]:
        step = round(t * 2)
        values: dict[str, float | None] = {}
        for name, (kind, a, b, seed) in shapes.items():
            if kind == "absent":
                continue
            if kind == "const":
                values[name] = a if now.mode is Mode.COLO else b
            elif kind == "ramp":
                values[name] = a + (b - a) * ((step % 17) / 16)
            else:  # measured on some samples only
                values[name] = a if (step * 7919 + seed) % 3 else None
        return values

    return scenario


policy_names = st.sampled_from(sorted(BUILTINS))


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(policy_names, scenarios(), st.sampled_from(list(Mode)), st.integers(10, 60), st.integers(1, 3))
def test_replay_reproduces_the_recorded_decisions(
    name: str, scenario, start: Mode, steps: int, confirm: int
) -> None:
    guard = GuardConfig(min_dwell_s=2.0, confirm_windows=confirm, switches_per_minute=6)
    run = simulate(load_policy(name), scenario, steps, start=ProtectionPoint(start, 50), guard=guard)
    lines = [record.to_line() for record in run.records]
    assert all(json.loads(line) for line in lines)  # strict JSON, one object per line

    # the lines read back to the very records (windows bit for bit)
    back = list(read_trace(lines))
    for record, again in zip(run.records, back, strict=True):
        assert again.window == record.window
        assert again.outcome == record.outcome and again.verdict == record.verdict
        assert again.to_line() == record.to_line()

    # a fresh instance of the same policy decides exactly what was recorded
    replayed = replay(lines, load_policy(name))
    assert replayed == [record.outcome for record in run.records]
    # and a fresh guard, fed the same outcomes and times, gives the same verdicts
    guarded = replay_guarded(lines, load_policy(name), guard)
    assert [verdict for _, verdict in guarded] == [record.verdict for record in run.records]


def test_replay_twice_with_one_instance_resets_it() -> None:
    def scenario(t: float, now: ProtectionPoint) -> dict[str, float | None]:
        return {"ckpt.per_s": 9.5, "ckpt.length_ms": 100.0} if now.mode is Mode.COLO else {"ckpt.per_s": 4.0}

    run = simulate(load_policy("gilbert"), scenario, 60)
    lines = [r.to_line() for r in run.records]
    policy = load_policy("gilbert")
    assert replay(lines, policy) == replay(lines, policy) == [r.outcome for r in run.records]


class Flaky(Policy):
    """Raises on every third window, returns nonsense on every fifth: failures replay too."""

    name = "flaky"
    description = "test"

    def reset(self) -> None:
        self.calls = 0

    def decide(self, window):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError(f"call {self.calls}")
        if self.calls % 5 == 0:
            return "mc"
        return Decision(Mode.MC if self.calls % 2 else Mode.COLO, 40, f"call {self.calls}", None)


def test_failures_are_recorded_and_replayed() -> None:
    run = simulate(Flaky(), lambda t, p: {"cpu.host": 0.5}, 12)
    outcomes = [r.outcome for r in run.records]
    assert outcomes[2] == Failure("raised RuntimeError: call 3")
    assert outcomes[4].error.startswith("nonsense: not a Decision: str")
    lines = [r.to_line() for r in run.records]
    assert json.loads(lines[2])["decision"] is None and json.loads(lines[2])["error"] == outcomes[2].error
    assert replay(lines, Flaky()) == outcomes
    assert [v.kind for v in run.verdicts].count("reject") == 6  # calls 3, 5, 6, 9, 10, 12


def test_replay_with_another_policy_differs_where_it_should() -> None:
    run = simulate(load_policy("static-mc"), lambda t, p: {"div.per_s": 0.0}, 5)
    lines = [r.to_line() for r in run.records]
    assert {d.mode for d in replay(lines, load_policy("static-colo"))} == {Mode.COLO}


def test_bad_lines_are_named() -> None:
    run = simulate(load_policy("static-mc"), lambda t, p: {}, 2)
    good = run.records[0].to_line()
    data = json.loads(good)
    with pytest.raises(TraceError, match="trace line 3"):
        list(read_trace([good, "", "{not json"]))
    for broken in (
        {**data, "v": 2},
        {**data, "error": "x"},
        {**data, "decision": None},
        {**data, "elapsed_s": "fast"},
        {k: v for k, v in data.items() if k != "window"},
    ):
        with pytest.raises(TraceError, match="trace line 1"):
            list(read_trace([json.dumps(broken)]))


def test_record_line_is_strict_json_with_the_applied_point() -> None:
    run = simulate(load_policy("threshold"), lambda t, p: {"div.per_s": math.nan, "cpu.host": 0.5}, 3)
    line = run.records[-1].to_line()
    data = json.loads(line)
    assert "NaN" not in line
    assert set(data) == {
        "v",
        "seq",
        "t",
        "policy",
        "params",
        "window",
        "decision",
        "error",
        "elapsed_s",
        "verdict",
        "applied",
    }
    assert data["policy"] == "threshold" and data["params"]["div_high"] == 2.0
    assert data["applied"] == data["verdict"]["point"]
    assert TraceRecord.from_line(line).applied == run.records[-1].applied


def write_trace(path: Path, policy_name: str, params: dict | None = None) -> list[TraceRecord]:
    def scenario(t: float, now: ProtectionPoint) -> dict[str, float | None]:
        return {"div.per_s": 3.0 if int(t) % 20 < 10 else 0.1, "net.turns_per_s": 60.0}

    run = simulate(load_policy(policy_name, params), scenario, 40)
    path.write_text("\n".join(r.to_line() for r in run.records) + "\n")
    return run.records


def test_cli_replay(tmp_path: Path) -> None:
    trace = tmp_path / "decisions.jsonl"
    records = write_trace(trace, "threshold", {"div_high": 2.5})
    runner = CliRunner()
    # default: the policy and parameters that wrote the trace, which reproduce it
    result = runner.invoke(policy_group, ["replay", str(trace), "--check"])
    assert result.exit_code == 0, result.output
    assert (
        f"{len(records)} decisions replayed with threshold: {len(records)} as recorded, 0 differ"
        in result.output
    )
    # other parameters: different decisions, --check fails, the differing lines show both
    result = runner.invoke(policy_group, ["replay", str(trace), "--param", "div_high=5", "--check"])
    assert result.exit_code == 1
    assert "!=" in result.output and "recorded: mc" in result.output
    # JSON, guarded, another policy
    result = runner.invoke(
        policy_group, ["replay", str(trace), "--policy", "static-colo", "--json", "--guarded"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == len(records) and all(row["replayed"]["mode"] == "colo" for row in rows)
    assert rows[0]["verdict"].startswith(("keep", "apply", "hold"))
    # errors name the problem
    bad = runner.invoke(policy_group, ["replay", str(trace), "--param", "div_hgh=5"])
    assert bad.exit_code != 0 and "unknown parameter 'div_hgh'" in bad.output
    bad = runner.invoke(policy_group, ["replay", str(trace), "--param", "oops"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no decisions" in runner.invoke(policy_group, ["replay", str(empty)]).output


def test_format_policy_for_show() -> None:
    policy = load_policy("gilbert", {"passive_count": 50})
    run = simulate(policy, lambda t, p: {"ckpt.per_s": 1.0, "ckpt.length_ms": 900.0}, 3)
    text = format_policy(policy, run.records[-2:])
    lines = text.splitlines()
    assert lines[0].startswith("policy gilbert: Gilbert's COLO hybrid mode")
    assert any(
        line.split()[0] == "passive_count" and "50 (default 100)  [an integer in 1..1000000]" in line
        for line in lines[2:7]
    )
    assert "recent decisions:" in lines
    assert lines[-1].startswith("  t=1001.000  colo: ") and "-> keep: already running" in lines[-1]
    assert format_policy(policy, [Decision(Mode.MC, 30, "why", None)]).endswith("  mc 30 ms: why")
