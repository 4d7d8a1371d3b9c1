"""The ``[controller]`` settings reach the autopilot and its guard: file -> ``pair up`` flags -> daemon
flags -> DaemonConfig -> AutopilotConfig/GuardConfig; a bad value is named with its allowed range at every
door (the file, a daemon flag, a config built in code)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import controller.daemon_cli as daemon_cli
import mc_driver.pair_cli as pair_cli
from controller.autopilot import Autopilot, AutopilotConfig
from controller.daemon import Daemon
from controller.daemon_config import CONTROLLER_KEYS, DaemonConfig, DaemonError
from controller.operating_point import OperatingPoint
from hybridft_common.settings import DAEMON_CONTROLLER_KEYS, ControllerSettings, SettingsError, parse_settings
from hybridft_common.vocabulary import Mode, StopVia
from policies.guard import GuardConfig
from tests.test_manifest import manifest_for

OPERATOR = {
    "sample_period_ms": 200,
    "window_s": 4.0,
    "decide_every_samples": 2,
    "policy_timeout_ms": 150,
    "min_dwell_s": 2.5,
    "switch_budget_per_min": 12,
    "hysteresis_windows": 3,
    "checkpoint_timeout_s": 20.0,
    "shadow_probe_every_s": 0.5,
    "shadow_probe_epoch_ms": 80,
}


def test_every_key_pair_up_passes_is_one_the_daemon_takes() -> None:
    assert set(CONTROLLER_KEYS.values()) == set(DAEMON_CONTROLLER_KEYS) == set(OPERATOR)


def _daemon_config_from_flags(tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``hybridft daemon`` on a real pair.json with ``args``; capture the config it would run."""
    seen: list[DaemonConfig] = []

    async def fake_run(config: DaemonConfig, ready: Any) -> None:
        seen.append(config)

    monkeypatch.setattr(daemon_cli, "run_daemon", fake_run)
    pair_json = tmp_path / "pair.json"
    manifest_for(tmp_path).write(pair_json)
    result = CliRunner().invoke(daemon_cli.daemon_command, ["--config", str(pair_json), *args])
    return result, seen


def test_the_file_reaches_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings({"protection": {"mode": "auto"}, "controller": OPERATOR})
    flags = list(pair_cli.pair_config(tmp_path, settings).daemon_args)
    assert flags[:4] == ["--sample-period-ms", "200", "--window-s", "4.0"]
    result, seen = _daemon_config_from_flags(tmp_path, flags, monkeypatch)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert config.policy == "cost-model" and config.checkpoint_timeout == 20.0
    auto = config.autopilot_config()
    assert (auto.period_s, auto.window_s, auto.decide_every_samples) == (0.2, 4.0, 2)
    guard = auto.guard
    assert (guard.min_dwell_s, guard.switches_per_minute, guard.confirm_windows) == (2.5, 12, 3)
    assert guard.time_limit_s == pytest.approx(0.15)
    assert auto.trace_path == tmp_path / "decisions.jsonl"
    assert (config.shadow_probe_every_s, config.shadow_probe_epoch_ms) == (0.5, 80)
    config.primary_qmp = config.secondary_qmp = "/nonexistent"
    scheduler = Daemon(config).scheduler  # the scheduler runs with the file's probes
    assert (scheduler.probe_every_s, scheduler.probe_epoch_ms) == (0.5, 80)


def test_without_settings_the_daemon_runs_the_schemas_defaults(tmp_path: Path) -> None:
    defaults = ControllerSettings()
    auto = DaemonConfig(primary_qmp="/p", secondary_qmp="/s", control="unix:/c").autopilot_config()
    assert auto.guard == GuardConfig(
        min_dwell_s=defaults.min_dwell_s,
        switches_per_minute=defaults.switch_budget_per_min,
        confirm_windows=defaults.hysteresis_windows,
        time_limit_s=defaults.policy_timeout_ms / 1000,
    )
    assert auto.period_s == defaults.sample_period_ms / 1000 and auto.window_s == defaults.window_s


@pytest.mark.parametrize(
    ("flag", "value", "range_text"),
    [
        ("--min-dwell-s", "5000", "0<=x<=3600"),
        ("--hysteresis-windows", "0", "1<=x<=100"),
        ("--switch-budget-per-min", "601", "1<=x<=600"),
        ("--policy-timeout-ms", "0", "1<=x<=10000"),
        ("--window-s", "0.1", "0.5<=x<=600"),
        ("--decide-every-samples", "101", "1<=x<=100"),
        ("--shadow-probe-epoch-ms", "5", "10<=x<=2000"),
        ("--shadow-probe-every-s", "-1", "0<=x<=60"),
    ],
)
def test_a_bad_daemon_flag_is_named_with_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, value: str, range_text: str
) -> None:
    result, seen = _daemon_config_from_flags(tmp_path, [flag, value], monkeypatch)
    assert result.exit_code != 0 and flag in result.output and range_text in result.output
    assert seen == []


def test_a_bad_value_in_code_or_file_is_named_with_its_range() -> None:
    config = DaemonConfig(primary_qmp="/p", secondary_qmp="/s", control="unix:/c", min_dwell_s=-1.0)
    with pytest.raises(DaemonError, match=r"controller\.min_dwell_s: -1\.0 .*a number 0\.\.3600"):
        config.autopilot_config()
    config = DaemonConfig(primary_qmp="/p", secondary_qmp="/s", control="unix:/c", hysteresis_windows=0)
    with pytest.raises(DaemonError, match=r"controller\.hysteresis_windows: 0 .*an integer 1\.\.100"):
        config.autopilot_config()
    with pytest.raises(SettingsError, match=r"controller\.switch_budget_per_min: 0 .*1\.\.600"):
        parse_settings({"controller": {"switch_budget_per_min": 0}})


class _NoSignals:
    cpu_cost_s = 0.0

    async def start(self) -> None:
        pass

    async def sample(self, now: float | None = None) -> dict[str, float | None]:
        return {}


def test_the_policy_decides_every_nth_sample() -> None:
    point = OperatingPoint(Mode.MC, 50, False, StopVia.QEMU)
    autopilot = Autopilot(
        _NoSignals(),  # type: ignore[arg-type]
        AutopilotConfig(period_s=0.1, decide_every_samples=3),
        point=lambda: point,
        request=lambda _request: None,
        active=lambda: True,
    )
    autopilot.engage("static-mc")

    async def steps() -> None:
        for k in range(9):
            await autopilot.step(100.0 + k * 0.1)

    try:
        asyncio.run(steps())
    finally:
        autopilot.close()
    assert autopilot.samples == 9 and autopilot.decisions == 3
