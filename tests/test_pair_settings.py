"""``pair up``'s settings: the TOML file, flags over it, and what reaches the launcher and the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import mc_driver.pair_cli as pair_cli
from hybridft_common.settings import parse_settings
from hybridft_common.vocabulary import Mode


def test_auto_starts_in_mc_and_hands_the_policy_to_the_daemon(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "protection": {"mode": "auto", "policy": "gilbert", "epoch_ms": 80},
            "policy": {"params": {"passive_count": 50}},
            "controller": {"sample_period_ms": 500},
            "pair": {"memory_mib": 512, "guest_run": [["memdirty", "8", "32"]]},
        }
    )
    config = pair_cli.pair_config(tmp_path, settings)
    assert config.mode is Mode.MC and config.epoch_ms == 80 and config.memory_mib == 512
    assert config.guest_run == (("memdirty", "8", "32"),)
    assert config.daemon_args[:2] == ("--sample-period-ms", "500")  # every [controller] key follows
    assert config.daemon_args[-4:] == ("--policy", "gilbert", "--param", "passive_count=50")


def test_a_forced_mode_passes_no_policy(tmp_path: Path) -> None:
    config = pair_cli.pair_config(tmp_path, parse_settings({"protection": {"mode": "colo"}}))
    assert config.mode is Mode.COLO and "--policy" not in config.daemon_args


def _captured_up(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []

    def fake_up(config: Any) -> dict[str, Any]:  # stands in for starting QEMUs: only the config matters
        seen.append(config)
        raise pair_cli.PairError("stopped before launching")

    monkeypatch.setattr(pair_cli, "up", fake_up)
    return seen


def test_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _captured_up(monkeypatch)
    settings = tmp_path / "pair.toml"
    settings.write_text('[pair]\nmemory_mib = 512\npassive_secondary = true\n[protection]\nmode = "colo"\n')
    group = click.Group(commands={"up": pair_cli.up_command})
    result = CliRunner().invoke(
        group, ["up", "--workdir", str(tmp_path / "w"), "--config", str(settings), "--memory", "384",
                "--policy", "threshold"],
    )  # fmt: skip
    assert "stopped before launching" in result.output
    (config,) = seen
    assert config.memory_mib == 384 and config.passive_secondary is True
    # a policy named on the command line overrides the file's forced mode: it starts in auto (in MC)
    assert config.mode is Mode.MC and config.daemon_args[-2:] == ("--policy", "threshold")


def test_a_bad_file_is_named_and_nothing_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _captured_up(monkeypatch)
    settings = tmp_path / "pair.toml"
    settings.write_text("[protection]\nepoch_ms = 0\n")
    group = click.Group(commands={"up": pair_cli.up_command})
    result = CliRunner().invoke(group, ["up", "--workdir", str(tmp_path / "w"), "--config", str(settings)])
    assert result.exit_code != 0 and "protection.epoch_ms" in result.output and "1..600000" in result.output
    assert seen == []
